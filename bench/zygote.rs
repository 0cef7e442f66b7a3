//! Zygote against plain fork: spawn to first reply and the memory of eight
//! workers, for a guest whose init builds a 64 MiB table and for one whose
//! init is trivial.

use std::time::Instant;

use crate::harness::{Daemon, guests};
use crate::report::{Better, Row, Samples};
use crate::spawn::settle;
use crate::sys;

/// Workers whose memory is summed.
const WORKERS: usize = 8;

/// The four modules, all the test guest: with a 64 MiB init table or none,
/// from a zygote or plainly forked.
const MODULES: [(&str, bool, bool); 4] = [
    ("big", true, true),
    ("bigfork", true, false),
    ("small", false, true),
    ("smallfork", false, false),
];

/// A daemon serving the four modules.
pub fn daemon() -> Daemon {
    let guest = guests().testguest.display().to_string();
    let mut args = Vec::new();
    for (name, big, zygote) in MODULES {
        args.push(format!("--module={name}={guest}"));
        if big {
            args.push(format!("--env={name}:TG_INIT_TABLE_MIB=64"));
            args.push(format!("--limit={name}:memory=128MiB"));
        }
        if !zygote {
            args.push(format!("--spawn={name}:fork"));
        }
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let socket = dir.path().join("zygote.sock");
    let daemon = Daemon::spawn_logging(dir, socket, &args, "warn");
    daemon.wait_ready();
    daemon
}

/// Fresh workers of `module`, each retired after its first reply.
async fn spawns(daemon: &Daemon, module: &str, n: usize) -> anyhow::Result<Samples> {
    let client = daemon.client(module).min_workers(0).max_workers(1).max_checkouts(Some(1)).build();
    // Once unmeasured: the first may wait for the zygote's init.
    client.checkout().await?.call::<u64>("incr", &()).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        settle(daemon).await?;
        let started = Instant::now();
        let checkout = client.checkout().await?;
        checkout.call::<u64>("incr", &()).await?;
        samples.push(started.elapsed());
    }
    Ok(Samples(samples))
}

/// Proportional memory, in bytes, of `WORKERS` live workers of `module`,
/// and of their zygote (0 without one).
async fn pss(daemon: &Daemon, module: &str) -> anyhow::Result<(u64, u64)> {
    settle(daemon).await?;
    let client = daemon.client(module).min_workers(0).max_workers(WORKERS).build();
    let mut held = Vec::new();
    for _ in 0..WORKERS {
        let checkout = client.checkout().await?;
        checkout.call::<u64>("incr", &()).await?;
        held.push(checkout);
    }
    let mut total = 0;
    for checkout in &held {
        total += sys::memory(checkout.worker_pid())?.pss;
    }
    let zygote = match crate::harness::zygote_of(daemon.pid(), module) {
        Some(pid) => sys::memory(pid)?.pss,
        None => 0,
    };
    Ok((total, zygote))
}

/// Measures every pair and returns the rows.
pub async fn measure(daemon: &Daemon, n_small: usize, n_big: usize) -> anyhow::Result<Vec<Row>> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut rows = Vec::new();
    // Targets: the ratios a throwaway measurement on this machine gave
    // (64 MiB: 1.1 ms against 42 ms, 81 MiB against 533 MiB; trivial
    // init: 0.3 ms against 0.7 ms).
    for (label, zygote, fork, n, spawn_target, memory_target) in [
        ("init builds 64 MiB", "big", "bigfork", n_big, 1.1 / 42.0, Some(81.0 / 533.0)),
        ("trivial init", "small", "smallfork", n_small, 0.3 / 0.7, None),
    ] {
        let from_zygote = spawns(daemon, zygote, n).await?;
        let forked = spawns(daemon, fork, n).await?;
        rows.push(Row::latency(
            "zygote",
            format!("spawn to first reply, {label}"),
            &from_zygote,
            "plain fork",
            &forked,
            Some(spawn_target),
        ));
        let ((z, zygote_pss), (f, _)) = (pss(daemon, zygote).await?, pss(daemon, fork).await?);
        rows.push(Row::new(
            "zygote",
            format!(
                "PSS of {WORKERS} workers, {label} (their zygote: {:.2} MiB more)",
                mib(zygote_pss)
            ),
            "MiB",
            (mib(z), None),
            "plain fork",
            (mib(f), None),
            Better::Lower,
            memory_target,
        ));
    }
    Ok(rows)
}
