//! Throughput of a CPU-bound method on 1 and 2 workers, beside the same
//! method called in-process on one thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use wasm_task::client::CallReport;
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

    // Calibrate on the fastest of a few long calls (one call disturbed by
    // another process would make every call short of the target), then
    // size the rounds to the target.
    burn(1000)?;
    let mut per_round = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        burn(10_000)?;
        per_round = per_round.min(started.elapsed().as_secs_f64() / 10_000.0);
    }
    let rounds = ((CALL_TARGET.as_secs_f64() / per_round) as u32).max(1);

    let started = Instant::now();
    for _ in 0..calls {
        burn(rounds)?;
    }
    Ok((calls as f64 / started.elapsed().as_secs_f64(), rounds))
}

/// How the throughput run keeps calls in flight.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Every call its own checkout, with four checkouts per worker waiting.
    CheckoutPerCall,
    /// One checkout held per worker, with four calls made on each at a time:
    /// the client sends them ahead, so a worker finds its next call waiting.
    HeldCheckouts,
}

/// Calls made at a time per worker.
const PER_WORKER: usize = 4;

/// Calls per second through the pool with `workers` workers and many calls
/// in flight, kept in flight as `mode` says.
pub async fn pooled(
    daemon: &Daemon,
    workers: usize,
    rounds: u32,
    calls: usize,
    mode: Mode,
) -> anyhow::Result<f64> {
    let client = daemon.client("bench").min_workers(workers).max_workers(workers).build();
    // Warm up: every worker connected and has run the method once.
    let warm: Vec<_> = (0..workers).map(|_| client.checkout()).collect();
    let held = futures_util::future::try_join_all(warm).await?;
    for checkout in &held {
        checkout.call::<u64>("burn", &rounds).await?;
    }

    let left = AtomicUsize::new(calls);
    let take =
        || left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
    let spent = Spent::default();
    let started = Instant::now();
    match mode {
        Mode::CheckoutPerCall => {
            drop(held);
            let streams = (0..workers * PER_WORKER).map(|_| async {
                while take() {
                    let checkout = client.checkout().await?;
                    spent.add(checkout.call_report::<u64>("burn", &rounds).await)?;
                }
                anyhow::Ok(())
            });
            futures_util::future::try_join_all(streams).await?;
        }
        Mode::HeldCheckouts => {
            let streams = held.iter().map(|checkout| async {
                let mut in_flight = FuturesUnordered::new();
                loop {
                    while in_flight.len() < PER_WORKER && take() {
                        in_flight.push(checkout.call_report::<u64>("burn", &rounds));
                    }
                    let Some(report) = in_flight.next().await else { break };
                    spent.add(report)?;
                }
                anyhow::Ok(())
            });
            futures_util::future::try_join_all(streams).await?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "throughput, {workers} workers, {mode:?}: {:.0} us per call in the worker's guest ({:.0} us CPU), {:.0} us per call per worker, all in",
        spent.guest_us.get() as f64 / calls as f64,
        spent.cpu_us.get() as f64 / calls as f64,
        elapsed * 1e6 * workers as f64 / calls as f64
    );
    Ok(calls as f64 / elapsed)
}

/// What the worker measured, summed over the calls.
#[derive(Default)]
struct Spent {
    guest_us: Cell<u64>,
    cpu_us: Cell<u64>,
}

impl Spent {
    fn add(&self, report: CallReport<u64>) -> anyhow::Result<()> {
        report.result?;
        if let Some(stats) = report.timings.worker {
            self.guest_us.set(self.guest_us.get() + stats.wall_us);
            self.cpu_us.set(self.cpu_us.get() + stats.cpu_us);
        }
        Ok(())
    }
}

/// The throughput rows: calls per second with 1 and 2 workers, each call
/// its own checkout (`per_call`) and on held checkouts (`held`).
pub fn rows(in_process: f64, per_call: [f64; 2], held: [f64; 2]) -> Vec<Row> {
    // The length of one call, as the in-process loop measured it.
    let call_us = 1e6 / in_process;
    let row = |workers: &str, how: &str, value: f64, target: Option<f64>| {
        Row::new(
            "throughput",
            format!("{workers}, {call_us:.0} us calls, {how}"),
            "calls/s",
            (value, None),
            "in-process, 1 thread",
            (in_process, None),
            Better::Higher,
            target,
        )
    };
    // The targets are for many calls in flight, as on held
    // checkouts. A checkout per call cannot overlap calls on one worker:
    // each call leaves its worker idle for a round trip, so those rows are
    // shown without a target.
    vec![
        row("1 worker", "held checkout", held[0], Some(0.95)),
        row("2 workers", "held checkouts", held[1], Some(1.85)),
        row("1 worker", "a checkout per call", per_call[0], None),
        row("2 workers", "a checkout per call", per_call[1], None),
    ]
}
