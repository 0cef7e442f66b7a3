//! Memory of an idle worker, and of the daemon across many worker recycles.

use std::time::Instant;

use crate::harness::Daemon;
use crate::report::{Better, Row};
use crate::sys::{self, Memory};

/// An idle worker's memory and its guest's linear memory size.
pub async fn idle_worker(daemon: &Daemon) -> anyhow::Result<(Memory, u64)> {
    let client = daemon.client("bench").min_workers(1).max_workers(1).build();
    let checkout = client.checkout().await?;
    let linear: u64 = checkout.call("linear_memory", &()).await?;
    let pid = checkout.worker_pid();
    drop(checkout);
    // Let the release settle, then read the idle process.
    tokio::task::yield_now().await;
    Ok((sys::memory(pid)?, linear))
}

/// The daemon's memory before and after `recycles` workers came and went.
pub async fn daemon_recycles(
    daemon: &Daemon,
    recycles: usize,
) -> anyhow::Result<(Memory, Memory, f64)> {
    let client =
        daemon.client("bench").min_workers(0).max_workers(2).max_checkouts(Some(1)).build();
    // One recycle first, so that lazily created state exists before "before".
    client.checkout().await?.call::<()>("nop", &()).await?;
    let before = sys::memory(daemon.pid())?;
    let started = Instant::now();
    for _ in 0..recycles {
        client.checkout().await?.call::<()>("nop", &()).await?;
    }
    let rate = recycles as f64 / started.elapsed().as_secs_f64();
    Ok((before, sys::memory(daemon.pid())?, rate))
}

/// The memory rows.
pub fn rows(
    idle: &Memory,
    linear: u64,
    before: &Memory,
    after: &Memory,
    recycles: usize,
) -> Vec<Row> {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    vec![
        Row::new(
            "memory",
            format!(
                "idle worker private beyond linear memory (private {:.2} MiB, linear {:.2} MiB, PSS {:.2} MiB)",
                mib(idle.private),
                mib(linear),
                mib(idle.pss)
            ),
            "MiB",
            (mib(idle.private.saturating_sub(linear)), None),
            "1 MiB budget",
            (1.0, None),
            Better::Lower,
            Some(1.0),
        ),
        Row::new(
            "memory",
            format!("daemon RSS after {recycles} recycles"),
            "MiB",
            (mib(after.rss), None),
            "daemon RSS before",
            (mib(before.rss), None),
            Better::Lower,
            Some(1.05),
        ),
    ]
}
