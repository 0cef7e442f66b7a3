//! Queue scale: many checkouts queued against two workers.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use serde_bytes::ByteBuf;
use tokio::sync::Semaphore;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use wasm_task::protocol::DEFAULT_MAX_FRAME;

use crate::harness::Daemon;
use crate::report::{Better, Row};
use crate::roundtrip::{PingPong, pingpong_echo};
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

/// A framed connection to a ping-pong peer.
type Peer = Framed<tokio::net::UnixStream, LengthDelimitedCodec>;

/// The same queue without the library, for the floor of its socket work:
/// tasks share two ping-pong peers through a FIFO semaphore of two permits
/// and a free list, each sending one call frame (framed as the client
/// frames it) and reading the echo.
pub struct ByHand {
    free: Arc<Mutex<Vec<Peer>>>,
    permits: Arc<Semaphore>,
}

impl ByHand {
    /// Connects to both peers.
    pub fn new(peers: &mut [PingPong; 2]) -> anyhow::Result<ByHand> {
        let mut free = Vec::new();
        for peer in peers.iter_mut() {
            let codec =
                LengthDelimitedCodec::builder().max_frame_length(DEFAULT_MAX_FRAME).new_codec();
            free.push(Framed::new(peer.connect()?, codec));
        }
        Ok(ByHand { free: Arc::new(Mutex::new(free)), permits: Arc::new(Semaphore::new(2)) })
    }

    /// Queues `n` calls at once, as [`run`] queues checkouts.
    pub async fn run(&self, n: usize) -> anyhow::Result<QueueRun> {
        let cpu = sys::process_cpu();
        let started = Instant::now();
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let (free, permits) = (self.free.clone(), self.permits.clone());
                tokio::spawn(async move {
                    let _permit = permits.acquire().await?;
                    let mut peer = free.lock().unwrap().pop().context("no free peer")?;
                    let sent = ByteBuf::from((i as u64).to_le_bytes().to_vec());
                    let back = pingpong_echo(&mut peer, i as u64, &sent, None).await?;
                    free.lock().unwrap().push(peer);
                    anyhow::ensure!(back == sent, "call {i} got another's answer");
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let total = started.elapsed();
        let cpu = sys::process_cpu() - cpu;
        Ok(QueueRun {
            checkouts: n,
            total_s: total.as_secs_f64(),
            client_cpu_per_call_us: cpu.as_secs_f64() * 1e6 / n as f64,
        })
    }
}

/// The queue rows: client CPU per call against the 5 µs target, and
/// against the same queue made by hand over ping-pong peers that sleep
/// between calls (`sleeping`) and that never do (`polled`).
pub fn rows(run: &QueueRun, sleeping: &QueueRun, polled: &QueueRun) -> Vec<Row> {
    let by_hand = |peers: &str, by_hand: &QueueRun| {
        Row::new(
            "queue",
            format!("the same, against a hand-made pool of 2 ping-pong peers {peers}"),
            "us",
            (run.client_cpu_per_call_us, None),
            format!("by hand ({:.2} s total)", by_hand.total_s),
            (by_hand.client_cpu_per_call_us, None),
            Better::Lower,
            None,
        )
    };
    vec![
        Row::new(
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
        ),
        by_hand("that sleep between calls", sleeping),
        by_hand("that poll, never sleeping while busy", polled),
    ]
}
