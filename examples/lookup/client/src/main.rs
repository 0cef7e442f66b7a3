//! Asks the `lookup` guest for the capital of each country given, through a
//! pool of sandboxed workers, and prints `country -> capital`.
//!
//! ```text
//! wasm-task serve --listen unix:/tmp/wt.sock \
//!     --module lookup=target/wasm32-wasip1/release/lookup_guest.wasm \
//!     --dir lookup=examples/lookup/data:/data:ro
//! lookup-client --address unix:/tmp/wt.sock France Peru Atlantis
//! ```

use std::io::{self, BufRead};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{StreamExt, TryStreamExt, stream};
use wasm_task::{Address, Client};

/// Look up capitals in a pool of wasm-task workers.
#[derive(Debug, Parser)]
struct Args {
    /// Where the daemon listens: unix:PATH or tcp:HOST:PORT.
    #[arg(long)]
    address: Address,
    /// Module name the daemon serves the lookup guest under.
    #[arg(long, default_value = "lookup")]
    module: String,
    /// Countries to look up; one a line from standard input when none is given.
    countries: Vec<String>,
}

/// Workers used at once.
const WORKERS: usize = 4;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let countries = if args.countries.is_empty() { read_stdin()? } else { args.countries.clone() };

    let client = Client::builder(args.address.clone(), &args.module).max_workers(WORKERS).build();
    let capitals: Vec<Option<String>> = stream::iter(&countries)
        .map(|country| lookup(&client, country))
        .buffered(WORKERS)
        .try_collect()
        .await
        .with_context(|| format!("talking to module {} at {}", args.module, args.address))?;

    for (country, capital) in countries.iter().zip(capitals) {
        println!("{country} -> {}", capital.as_deref().unwrap_or("(unknown)"));
    }
    Ok(())
}

async fn lookup(client: &Client, country: &str) -> Result<Option<String>> {
    let worker = client.checkout().await.context("checking out a worker")?;
    worker.call("lookup", country).await.with_context(|| format!("looking up {country:?}"))
}

/// Reads one country a line, skipping blank lines.
fn read_stdin() -> Result<Vec<String>> {
    let mut countries = Vec::new();
    for line in io::stdin().lock().lines() {
        let line = line.context("reading standard input")?;
        let country = line.trim();
        if !country.is_empty() {
            countries.push(country.to_owned());
        }
    }
    Ok(countries)
}
