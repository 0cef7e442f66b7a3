//! The benchmark: the real daemon binary, a real guest and the client
//! library, each figure printed beside a baseline measured in the same run
//! (ratios, not absolute times: shared machines drift).
//!
//! - `cargo bench -p wasm-task --bench pool`: the full run (release build).
//! - `cargo test -p wasm-task --bench pool -- --quick`: a few seconds once built, to
//!   check that every measurement works; its figures mean nothing.
//!
//! The table is printed and written, with the machine it ran on, to
//! `target/bench/results.json`; the figure goes to `target/bench/figure.svg`.

#[allow(dead_code)]
#[path = "../tests/e2e/harness.rs"]
mod harness;
mod memory;
mod plot;
mod queue;
mod report;
mod roundtrip;
mod spawn;
mod sys;
mod throughput;
mod zygote;

use std::path::PathBuf;

use anyhow::Context;
use wasm_task::Address;
use wasm_task::daemon::modules::Modules;
use wasm_task::daemon::{Config, ModuleSpec};

use crate::harness::Daemon;
use crate::report::Row;
use crate::roundtrip::{PingPong, Wait};
use crate::throughput::Mode;

/// The rows, the round-trip samples to plot, and throughput by workers.
type Measured = (Vec<Row>, (report::Samples, report::Samples), Vec<(f64, f64)>);

/// How much of everything to measure.
struct Sizes {
    runs: usize,
    per_run: usize,
    spawns: usize,
    colds: usize,
    calls: usize,
    queue: usize,
    recycles: usize,
    /// Spawns per zygote row: trivial init, 64 MiB init.
    zygote: (usize, usize),
}

const FULL: Sizes = Sizes {
    runs: 5,
    per_run: 2000,
    spawns: 300,
    colds: 50,
    calls: 4000,
    queue: 10_000,
    recycles: 10_000,
    zygote: (200, 20),
};
const QUICK: Sizes = Sizes {
    runs: 2,
    per_run: 50,
    spawns: 10,
    colds: 3,
    calls: 40,
    queue: 200,
    recycles: 50,
    zygote: (3, 2),
};

/// The sections, in the order of the table.
const SECTIONS: [&str; 6] = ["round trip", "spawn", "throughput", "queue", "zygote", "memory"];

/// wasm-task's benchmark: the daemon, real guests and the client library,
/// each figure beside a baseline measured in the same run.
#[derive(clap::Parser)]
struct Args {
    /// Measure everything briefly, to check that it works (figures are
    /// not judged; written under target/bench/quick/).
    #[arg(long)]
    quick: bool,
    /// Measure one section only.
    #[arg(long, value_name = "SECTION", value_parser = clap::builder::PossibleValuesParser::new(SECTIONS))]
    only: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let Args { quick, only, bench: _ } = clap::Parser::parse();
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);
    let sizes = if quick { QUICK } else { FULL };
    // Beside cargo's own output (a relative CARGO_TARGET_DIR taken from the
    // workspace, where the README's commands run); a quick run's figures
    // apart, so as not to replace a full run's.
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    let mut out = harness::workspace().join(target).join("bench");
    if quick {
        out.push("quick");
    }
    std::fs::create_dir_all(&out)?;
    let guest = harness::guests().bench.clone();

    // Baselines that fork must run while this process has one thread.
    let spec = ModuleSpec { name: "bench".into(), path: guest.clone() };
    let modules = Modules::load(&Config::new(Address::Unix(PathBuf::from("/unused")), vec![spec]))
        .context("loading the bench guest in-process")?;
    // Each only when its section runs.
    let fork_baseline = wanted("spawn")
        .then(|| spawn::fork_instantiate(&modules, "bench", sizes.spawns))
        .transpose()?;
    let (in_process, rounds) = if wanted("throughput") {
        throughput::in_process(&modules, sizes.calls)?
    } else {
        (f64::NAN, 0)
    };
    let mut pingpong = PingPong::spawn(Wait::Blocking)?;
    // Two pairs of peers for the queue made by hand: blocking, and polling.
    let pair = |wait| anyhow::Ok([PingPong::spawn(wait)?, PingPong::spawn(wait)?]);
    let mut queue_peers = wanted("queue")
        .then(|| anyhow::Ok((pair(Wait::Blocking)?, pair(Wait::Polling)?)))
        .transpose()?;

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("bench.sock");
    let daemon = Daemon::spawn_logging(
        dir,
        socket,
        &[format!("--module=bench={}", guest.display())],
        "warn",
    );
    daemon.wait_ready();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (rows, plotted, throughput): Measured = runtime.block_on(async {
        let mut rows: Vec<Row> = Vec::new();
        let (mut plotted, mut throughput) = (Default::default(), Vec::new());
        if let Some(fork_baseline) = &fork_baseline {
            let spawned = spawn::product_spawns(&daemon, sizes.spawns).await?;
            let cold = spawn::cold_clients(&daemon, sizes.colds).await?;
            rows.extend(spawn::rows(&spawned, &cold, fork_baseline));
        }
        if wanted("throughput") {
            let mut measured = [[0.0; 2]; 2];
            for (i, mode) in [Mode::HeldCheckouts, Mode::CheckoutPerCall].into_iter().enumerate() {
                for workers in 1..=2 {
                    measured[i][workers - 1] =
                        throughput::pooled(&daemon, workers, rounds, sizes.calls, mode).await?;
                }
            }
            let [held, per_call] = measured;
            rows.extend(throughput::rows(in_process, per_call, held));
            throughput = vec![(1.0, held[0]), (2.0, held[1])];
        }
        if let Some((mut blocking, mut polling)) = queue_peers.take() {
            // A first run by hand leaves the heap grown for all the tasks, as
            // a service running for a while has it; the measured runs find it so.
            let by_hand = queue::ByHand::new(&mut blocking)?;
            by_hand.run(sizes.queue).await?;
            let product = queue::run(&daemon, sizes.queue).await?;
            let sleeping = by_hand.run(sizes.queue).await?;
            let polled = queue::ByHand::new(&mut polling)?.run(sizes.queue).await?;
            // Dropped here, so that no peer polls during later sections.
            drop((by_hand, blocking, polling));
            rows.extend(queue::rows(&product, &sleeping, &polled));
        }
        if wanted("zygote") {
            let daemon = zygote::daemon();
            rows.extend(zygote::measure(&daemon, sizes.zygote.0, sizes.zygote.1).await?);
        }
        if wanted("memory") {
            let (idle, linear) = memory::idle_worker(&daemon).await?;
            let (before, after, _) = memory::daemon_recycles(&daemon, sizes.recycles).await?;
            rows.extend(memory::rows(&idle, linear, &before, &after, sizes.recycles));
        }
        // Last: pinning and unpinning processes leaves the scheduler placing
        // them differently for a while, which moved the spawn figures by half.
        if wanted("round trip") {
            let client = daemon.client("bench").min_workers(1).max_workers(1).build();
            let (round_trips, product, baseline) =
                roundtrip::measure(&client, &mut pingpong, sizes.runs, sizes.per_run).await?;
            rows.extend(round_trips);
            plotted = (product, baseline);
        }
        anyhow::Ok((rows, plotted, throughput))
    })?;
    let mut rows = rows;
    // The table keeps the order whatever order the sections ran in.
    rows.sort_by_key(|row| SECTIONS.iter().position(|s| row.section.starts_with(s)));

    let machine = sys::machine();
    println!(
        "wasm-task benchmark{} on {machine}",
        if quick { " (quick mode: figures not meaningful)" } else { "" }
    );
    println!("{}", report::table(&rows, !quick));
    let json = serde_json::json!({ "machine": machine, "quick": quick, "rows": rows });
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.join("results.json").display());
    if only.is_none() {
        plot::write(&out.join("figure.svg"), &plotted.0, &plotted.1, &throughput, in_process)?;
        println!("wrote {}", out.join("figure.svg").display());
    }

    let broken: Vec<_> = rows.iter().filter(|r| !r.ratio.is_finite() || r.value < 0.0).collect();
    anyhow::ensure!(broken.is_empty(), "measurements without a result: {broken:?}");
    Ok(())
}
