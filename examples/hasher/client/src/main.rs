//! Hashes passwords with the `hasher` guest, then checks each against its
//! hash, through a pool of sandboxed workers; prints the results in input
//! order and how long it all took.
//!
//! ```text
//! wasm-task serve --listen unix:/tmp/wt.sock \
//!     --module hasher=target/wasm32-wasip1/release/hasher_guest.wasm
//! hasher-client --address unix:/tmp/wt.sock passwords.txt
//! ```

use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, stream};
use serde::Serialize;
use wasm_task::{Address, Client};

/// Hash and verify passwords in a pool of wasm-task workers.
#[derive(Debug, Parser)]
struct Args {
    /// Where the daemon listens: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    address: Address,
    /// Module name the daemon serves the hasher guest under.
    #[arg(long, default_value = "hasher")]
    module: String,
    /// Workers used at once, and so passwords in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Seconds each password may take, from checkout to verification.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// File with one password a line (blank lines are skipped); standard
    /// input when absent or `-`.
    file: Option<PathBuf>,
}

/// Arguments of the guest's `verify` method.
#[derive(Serialize)]
struct Verify<'a> {
    password: &'a str,
    hash: &'a str,
}

/// What happened to one password.
struct Outcome {
    hash: String,
    verified: bool,
    took: Duration,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let passwords = read_passwords(args.file.as_ref())?;

    let client = Client::builder(args.address.clone(), &args.module)
        .min_workers(args.concurrency)
        .max_workers(args.concurrency)
        .timeout(Some(Duration::from_secs(args.timeout)))
        .build();

    let started = Instant::now();
    let count = passwords.len();
    // `buffered` keeps `concurrency` passwords in flight and yields their
    // outcomes in input order.
    let outcomes: Vec<Outcome> = stream::iter(passwords.iter().enumerate())
        .map(|(index, password)| {
            let client = &client;
            async move {
                hash_and_verify(client, password)
                    .await
                    .with_context(|| format!("password {} of {count}", index + 1))
            }
        })
        .buffered(args.concurrency)
        .try_collect()
        .await
        .with_context(|| format!("talking to module {} at {}", args.module, args.address))?;
    let total = started.elapsed();

    for (password, outcome) in passwords.iter().zip(&outcomes) {
        let verdict = if outcome.verified { "verified" } else { "MISMATCH" };
        println!("{password}\t{}\t{verdict}", outcome.hash);
    }
    print_timing(&outcomes, total, args.concurrency);
    ensure!(outcomes.iter().all(|o| o.verified), "some hashes did not verify");
    Ok(())
}

/// Hashes one password and verifies it against the hash, on one worker.
async fn hash_and_verify(client: &Client, password: &str) -> Result<Outcome> {
    let started = Instant::now();
    let worker = client.checkout().await.context("checking out a worker")?;
    let hash: String = worker.call("hash", password).await.context("calling hash")?;
    let verified: bool =
        worker.call("verify", &Verify { password, hash: &hash }).await.context("calling verify")?;
    Ok(Outcome { hash, verified, took: started.elapsed() })
}

fn print_timing(outcomes: &[Outcome], total: Duration, workers: usize) {
    let count = outcomes.len();
    let workers = workers.min(count);
    println!("{count} passwords in {:.3} s on {workers} workers at most", total.as_secs_f64());
    if count == 0 {
        return;
    }
    let mean = outcomes.iter().map(|o| o.took).sum::<Duration>() / count as u32;
    println!(
        "mean {:.1} ms per password (checkout, hash and verify); {:.1} passwords/s",
        mean.as_secs_f64() * 1e3,
        count as f64 / total.as_secs_f64(),
    );
}

/// Reads the passwords from `file`, or from standard input.
fn read_passwords(file: Option<&PathBuf>) -> Result<Vec<String>> {
    let (name, reader): (String, Box<dyn BufRead>) = match file {
        Some(path) if path.as_os_str() != "-" => {
            let opened =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            (path.display().to_string(), Box::new(BufReader::new(opened)))
        }
        _ => ("standard input".to_owned(), Box::new(io::stdin().lock())),
    };
    let mut passwords = Vec::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("reading {name}"))?;
        let line = line.strip_suffix('\r').unwrap_or(&line);
        if !line.is_empty() {
            passwords.push(line.to_owned());
        }
    }
    Ok(passwords)
}
