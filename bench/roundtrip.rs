//! Call round trip on a held checkout, beside a plain ping-pong of the same
//! frames between two processes.

use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use nix::errno::Errno;
use nix::sys::socket::MsgFlags;
use serde_bytes::ByteBuf;
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use wasm_task::protocol::{self, CallStats, DEFAULT_MAX_FRAME, Payload, Request, Response};

use crate::report::{Row, Samples};
use crate::sys;

/// The ping-pong peer: a forked process answering each call frame with a
/// reply carrying the arguments back, with blocking I/O like a worker.
pub struct PingPong {
    pub pid: i32,
    stream: Option<StdUnixStream>,
}

/// How a ping-pong peer waits for its next frame.
#[derive(Clone, Copy)]
pub enum Wait {
    /// In a blocking read.
    Blocking,
    /// Polling (non-blocking reads, yielding the CPU between them) for up
    /// to [`POLL_FOR`] before a blocking read: between the calls of a busy
    /// client it never sleeps.
    Polling,
}

/// How long a polling peer polls before it sleeps.
const POLL_FOR: std::time::Duration = std::time::Duration::from_millis(1);

impl PingPong {
    /// Forks the peer. Call before any runtime or thread exists.
    pub fn spawn(wait: Wait) -> anyhow::Result<PingPong> {
        let (ours, theirs) = StdUnixStream::pair()?;
        // SAFETY: the benchmark is single-threaded at this point; the child
        // only serves frames and exits.
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => {
                drop(ours);
                serve(theirs, wait);
                // SAFETY: leave without running the parent's exit handlers.
                unsafe { libc::_exit(0) }
            }
            pid => Ok(PingPong { pid, stream: Some(ours) }),
        }
    }

    /// The parent's end, as a tokio stream (once).
    pub fn connect(&mut self) -> anyhow::Result<tokio::net::UnixStream> {
        let stream = self.stream.take().context("ping-pong stream taken twice")?;
        stream.set_nonblocking(true)?;
        Ok(tokio::net::UnixStream::from_std(stream)?)
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// A peer's reading end.
struct Reader {
    stream: StdUnixStream,
    wait: Wait,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Wait::Polling = self.wait {
            let started = Instant::now();
            while started.elapsed() < POLL_FOR {
                let flags = MsgFlags::MSG_DONTWAIT;
                match nix::sys::socket::recv(self.stream.as_raw_fd(), buf, flags) {
                    Err(Errno::EAGAIN) => {
                        let _ = nix::sched::sched_yield();
                    }
                    read => return read.map_err(std::io::Error::from),
                }
            }
        }
        self.stream.read(buf)
    }
}

fn serve(stream: StdUnixStream, wait: Wait) {
    let Ok(clone) = stream.try_clone() else { return };
    let mut reader = BufReader::with_capacity(64 << 10, Reader { stream: clone, wait });
    let mut writer = stream;
    let (mut body, mut out) = (Vec::new(), Vec::new());
    while let Ok(true) = protocol::read_frame(&mut reader, &mut body, DEFAULT_MAX_FRAME) {
        let Ok(Request::Call { id, args, .. }) = protocol::decode::<Request>(&body) else { return };
        let reply = Response::Reply {
            id,
            result: Ok(Payload(args)),
            logs: Vec::new(),
            stats: CallStats::default(),
        };
        if protocol::encode_frame(&reply, &mut out).is_err()
            || protocol::write_frame(&mut writer, &out).is_err()
        {
            return;
        }
    }
}

/// Round trips over the bare framing, the way the client frames a call.
pub async fn pingpong_calls(
    framed: &mut Framed<tokio::net::UnixStream, LengthDelimitedCodec>,
    payload: &ByteBuf,
    n: usize,
) -> anyhow::Result<Samples> {
    let mut samples = Vec::with_capacity(n);
    for id in 0..n as u64 {
        let started = Instant::now();
        let back = pingpong_echo(framed, id, payload, Some(30_000)).await?;
        anyhow::ensure!(back.len() == payload.len(), "ping-pong echoed the wrong size");
        samples.push(started.elapsed());
    }
    Ok(Samples(samples))
}

/// One call frame to the ping-pong peer, made as the client makes a call
/// with a deadline of `timeout_ms`, and the echoed payload.
pub async fn pingpong_echo(
    framed: &mut Framed<tokio::net::UnixStream, LengthDelimitedCodec>,
    id: u64,
    payload: &ByteBuf,
    timeout_ms: Option<u64>,
) -> anyhow::Result<ByteBuf> {
    let args = rmp_serde::to_vec_named(payload)?;
    let call =
        Request::Call { id, method: "echo", args: &args, timeout_ms, unless_failed_since: None };
    framed.send(Bytes::from(rmp_serde::to_vec_named(&call)?)).await?;
    let frame = framed.next().await.context("ping-pong peer closed")??;
    let Response::Reply { result: Ok(Payload(bytes)), .. } = protocol::decode(&frame)? else {
        bail!("unexpected ping-pong answer");
    };
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Round trips through the client library to the bench guest's `echo`.
pub async fn product_calls(
    checkout: &wasm_task::Checkout,
    payload: &ByteBuf,
    n: usize,
) -> anyhow::Result<Samples> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let back: ByteBuf = checkout.call("echo", payload).await?;
        anyhow::ensure!(back.len() == payload.len(), "echo returned the wrong size");
        samples.push(started.elapsed());
    }
    Ok(Samples(samples))
}

/// Where the client, and the worker or ping-pong peer, may run.
struct Placement {
    name: &'static str,
    client: Option<usize>,
    peer: Option<usize>,
}

/// All round-trip rows: two payload sizes, three placements (the second
/// only with two CPUs or more), runs interleaved so that drift hits
/// product and baseline alike.
///
/// Left unpinned, the scheduler may keep one pair on one core and spread
/// the other (on this kind of VM a wake-up across cores costs tens of µs,
/// so placement decides the figure): the unpinned rows tell how often each
/// peer was found on the client's core after a run.
pub async fn measure(
    client: &wasm_task::Client,
    pingpong: &mut PingPong,
    runs: usize,
    per_run: usize,
) -> anyhow::Result<(Vec<Row>, Samples, Samples)> {
    let checkout = client.checkout().await?;
    let worker = checkout.worker_pid() as i32;
    let codec = LengthDelimitedCodec::builder().max_frame_length(DEFAULT_MAX_FRAME).new_codec();
    let mut framed = Framed::new(pingpong.connect()?, codec);

    let mut placements = vec![Placement { name: "same core", client: Some(0), peer: Some(0) }];
    if sys::available_cpus() >= 2 {
        placements.push(Placement { name: "different cores", client: Some(0), peer: Some(1) });
    }
    placements.push(Placement { name: "unpinned", client: None, peer: None });

    let mut rows = Vec::new();
    let mut plotted = (Samples::default(), Samples::default());
    for placement in &placements {
        sys::pin(0, placement.client);
        for tid in [worker, pingpong.pid] {
            sys::pin(tid, placement.peer);
        }
        for size in [64usize, 64 << 10] {
            let payload = ByteBuf::from(vec![0xa5u8; size]);
            // Warm both paths (allocations, caches) before measuring.
            product_calls(&checkout, &payload, per_run.min(50)).await?;
            pingpong_calls(&mut framed, &payload, per_run.min(50)).await?;
            let (mut product, mut baseline) = (Samples::default(), Samples::default());
            // Runs after which the worker / the peer was on the client's core.
            let (mut worker_with, mut peer_with) = (0, 0);
            for _ in 0..runs {
                baseline.0.extend(pingpong_calls(&mut framed, &payload, per_run).await?.0);
                peer_with += usize::from(same_cpu(pingpong.pid));
                product.0.extend(product_calls(&checkout, &payload, per_run).await?.0);
                worker_with += usize::from(same_cpu(worker));
            }
            let label = if size == 64 { "64 B".to_owned() } else { "64 KiB".to_owned() };
            let mut name = format!("call round trip {label}, {}", placement.name);
            if placement.peer.is_none() {
                name += &format!(
                    " (on the client's core after {worker_with} of {runs} runs; ping-pong peer {peer_with} of {runs})"
                );
            }
            rows.push(Row::latency(
                "round trip",
                name,
                &product,
                "ping-pong",
                &baseline,
                Some(1.2),
            ));
            if size == 64 && placement.client == Some(0) && placement.peer == Some(0) {
                plotted = (product, baseline);
            }
        }
    }
    sys::pin(0, None);
    for tid in [worker, pingpong.pid] {
        sys::pin(tid, None);
    }
    Ok((rows, plotted.0, plotted.1))
}

/// Whether process `pid` last ran on the CPU this one runs on.
fn same_cpu(pid: i32) -> bool {
    sys::last_cpu(pid).is_some_and(|cpu| Some(cpu) == sys::last_cpu(0))
}
