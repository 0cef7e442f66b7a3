//! Throughput of a CPU-bound method on 1 and 2 workers, beside the same
//! method called in-process on one thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use wasm_task::daemon::guest::{Guest, log_budget};
use wasm_task::daemon::modules::Modules;
use wasm_task::protocol::DEFAULT_MAX_FRAME;

use crate::harness::Daemon;
use crate::report::{Better, Row};

/// How long one `burn` call should take, as in the issue: about 250 µs.
const CALL_TARGET: Duration = Duration::from_micros(250);

/// Calls per second of `burn(rounds)` in this process, on this thread, and
/// the number of rounds that makes one call last about 250 µs.
pub fn in_process(modules: &Modules, calls: usize) -> anyhow::Result<(f64, u32)> {
    let module = modules.get("bench").context("bench module not loaded")?;
    let mut guest = Guest::instantiate(module, log_budget(DEFAULT_MAX_FRAME))
        .map_err(|e| anyhow::anyhow!("instantiating: {}", e.message))?;
    let mut burn = |rounds: u32| -> anyhow::Result<()> {
        let args = rmp_serde::to_vec(&rounds)?;
        guest.call("burn", &args).map_err(|e| anyhow::anyhow!("burn: {}", e.message))?;
        Ok(())
    };

    // Calibrate on a long call, then size the rounds to the target.
    burn(1000)?;
    let started = Instant::now();
    burn(10_000)?;
    let per_round = started.elapsed().as_secs_f64() / 10_000.0;
    let rounds = ((CALL_TARGET.as_secs_f64() / per_round) as u32).max(1);

    let started = Instant::now();
    for _ in 0..calls {
        burn(rounds)?;
    }
    Ok((calls as f64 / started.elapsed().as_secs_f64(), rounds))
}

/// Calls per second through the pool with `workers` workers and many calls
/// in flight (each call its own checkout).
pub async fn pooled(
    daemon: &Daemon,
    workers: usize,
    rounds: u32,
    calls: usize,
) -> anyhow::Result<f64> {
    let client = daemon.client("bench").min_workers(workers).max_workers(workers).build();
    // Warm up: every worker connected and has run the method once.
    let warm: Vec<_> = (0..workers).map(|_| client.checkout()).collect();
    for checkout in futures_util::future::try_join_all(warm).await? {
        checkout.call::<u64>("burn", &rounds).await?;
    }

    let left = Arc::new(AtomicUsize::new(calls));
    let (guest_us, cpu_us) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers * 4)
        .map(|_| {
            let (client, left) = (client.clone(), left.clone());
            let (guest_us, cpu_us) = (guest_us.clone(), cpu_us.clone());
            tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let checkout = client.checkout().await?;
                    let report = checkout.call_report::<u64>("burn", &rounds).await;
                    report.result?;
                    if let Some(stats) = report.timings.worker {
                        guest_us.fetch_add(stats.wall_us as usize, Ordering::Relaxed);
                        cpu_us.fetch_add(stats.cpu_us as usize, Ordering::Relaxed);
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "throughput, {workers} workers: {:.0} us per call in the worker's guest ({:.0} us CPU), {:.0} us per call all in",
        guest_us.load(Ordering::Relaxed) as f64 / calls as f64,
        cpu_us.load(Ordering::Relaxed) as f64 / calls as f64,
        elapsed * 1e6 * workers as f64 / calls as f64
    );
    Ok(calls as f64 / elapsed)
}

/// The throughput rows.
pub fn rows(in_process: f64, one: f64, two: f64) -> Vec<Row> {
    let row = |name: &str, value: f64, target: f64| {
        Row::new(
            "throughput",
            name,
            "calls/s",
            (value, None),
            "in-process, 1 thread",
            (in_process, None),
            Better::Higher,
            Some(target),
        )
    };
    vec![row("1 worker, ~250 us calls", one, 0.95), row("2 workers, ~250 us calls", two, 1.85)]
}
