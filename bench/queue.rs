//! Queue scale: many checkouts queued against two workers.

use std::time::Instant;

use serde_bytes::ByteBuf;

use crate::harness::Daemon;
use crate::report::{Better, Row};
use crate::sys;

/// What a queue run measured.
pub struct QueueRun {
    pub checkouts: usize,
    pub total_s: f64,
    pub client_cpu_per_call_us: f64,
}

/// Queues `n` checkouts at once against 2 workers, each echoing its own
/// number; fails if any is lost, fails or gets another's answer.
pub async fn run(daemon: &Daemon, n: usize) -> anyhow::Result<QueueRun> {
    let client = daemon.client("bench").min_workers(2).max_workers(2).timeout(None).build();
    let warm = client.checkout().await?;
    warm.call::<()>("nop", &()).await?;
    drop(warm);

    let cpu = sys::process_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let checkout = client.checkout().await?;
                let sent = ByteBuf::from((i as u64).to_le_bytes().to_vec());
                let back: ByteBuf = checkout.call("echo", &sent).await?;
                anyhow::ensure!(back == sent, "checkout {i} got another's answer");
                anyhow::Ok(())
            })
        })
        .collect();
    let mut answered = 0;
    for task in tasks {
        task.await??;
        answered += 1;
    }
    let total = started.elapsed();
    let cpu = sys::process_cpu() - cpu;
    anyhow::ensure!(answered == n, "{} of {n} checkouts answered", answered);
    Ok(QueueRun {
        checkouts: n,
        total_s: total.as_secs_f64(),
        client_cpu_per_call_us: cpu.as_secs_f64() * 1e6 / n as f64,
    })
}

/// The queue row: client CPU per call against the 5 µs budget.
pub fn rows(run: &QueueRun) -> Vec<Row> {
    vec![Row::new(
        "queue",
        format!(
            "{} checkouts on 2 workers: client CPU per call ({:.2} s total)",
            run.checkouts, run.total_s
        ),
        "us",
        (run.client_cpu_per_call_us, None),
        "5 us budget",
        (5.0, None),
        Better::Lower,
        Some(1.0),
    )]
}
