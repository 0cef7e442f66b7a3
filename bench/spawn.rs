//! Worker spawn: from asking for a worker to its first reply, beside fork
//! plus instantiate alone.

use std::time::{Duration, Instant};

use anyhow::bail;
use wasm_task::Client;
use wasm_task::daemon::guest::{Guest, log_budget};
use wasm_task::daemon::modules::Modules;
use wasm_task::protocol::DEFAULT_MAX_FRAME;

use crate::harness::{Daemon, children};
use crate::report::{Row, Samples};

/// MessagePack `nil`: the arguments of `nop`.
const NIL: &[u8] = &[0xc0];

/// Fork, instantiate the module and answer one `nop` through a pipe, `n`
/// times: what a worker start costs without sockets, hello or client.
/// Must run while the process has a single thread.
pub fn fork_instantiate(modules: &Modules, module: &str, n: usize) -> anyhow::Result<Samples> {
    let Some(module) = modules.get(module) else { bail!("module {module} not loaded") };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        let started = Instant::now();
        // SAFETY: single-threaded here; the child never returns.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                let ok = Guest::instantiate(module, log_budget(DEFAULT_MAX_FRAME))
                    .ok()
                    .and_then(|mut g| g.call("nop", NIL).ok())
                    .is_some();
                // SAFETY: write one byte to our pipe, then leave at once.
                unsafe {
                    libc::write(fds[1], [ok as u8].as_ptr().cast(), 1);
                    libc::_exit(0);
                }
            }
            pid => {
                let mut byte = [0u8];
                // SAFETY: reading one byte into a local buffer.
                let got = unsafe { libc::read(fds[0], byte.as_mut_ptr().cast(), 1) };
                samples.push(started.elapsed());
                // SAFETY: closing and reaping what this function created.
                unsafe {
                    libc::close(fds[0]);
                    libc::close(fds[1]);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                if got != 1 || byte[0] != 1 {
                    bail!("forked child failed to instantiate and call");
                }
            }
        }
    }
    Ok(Samples(samples))
}

/// Fresh workers through the pool: each checkout gets a new worker, which
/// is retired after its first reply.
pub async fn product_spawns(daemon: &Daemon, n: usize) -> anyhow::Result<Samples> {
    let client =
        daemon.client("bench").min_workers(0).max_workers(1).max_checkouts(Some(1)).build();
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        // Start each sample with no worker alive, so an exiting one does
        // not compete with the one being measured.
        settle(daemon).await?;
        let started = Instant::now();
        let checkout = client.checkout().await?;
        checkout.call::<()>("nop", &()).await?;
        samples.push(started.elapsed());
    }
    Ok(Samples(samples))
}

/// A new client's first result, with the daemon running.
pub async fn cold_clients(daemon: &Daemon, n: usize) -> anyhow::Result<Samples> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        settle(daemon).await?;
        let started = Instant::now();
        let client: Client = daemon.client("bench").min_workers(0).build();
        let checkout = client.checkout().await?;
        checkout.call::<()>("nop", &()).await?;
        samples.push(started.elapsed());
    }
    Ok(Samples(samples))
}

/// Waits (bounded) until the daemon has no worker left.
pub async fn settle(daemon: &Daemon) -> anyhow::Result<()> {
    let started = Instant::now();
    while !children(daemon.pid()).is_empty() {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("workers did not exit");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

/// The spawn rows.
pub fn rows(product: &Samples, cold: &Samples, baseline: &Samples) -> Vec<Row> {
    vec![
        Row::latency(
            "spawn",
            "spawn to first reply",
            product,
            "fork+instantiate",
            baseline,
            Some(1.3),
        ),
        Row::new(
            "spawn",
            "spawn to first reply, median",
            "us",
            (product.median_us(), None),
            "1 ms budget",
            (1000.0, None),
            crate::report::Better::Lower,
            Some(1.0),
        ),
        Row::latency("spawn", "cold client first result", cold, "fork+instantiate", baseline, None),
    ]
}
