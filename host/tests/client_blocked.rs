//! A checkout's abort signal, deadline timer and argument buffer under
//! stress: abort and deadlines while the call holding the worker is blocked
//! writing to a worker that never reads, and aborts racing pipelined calls
//! from many tasks and threads.

mod client_fake;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use client_fake::{FakeDaemon, Options};
use wasm_task::protocol::{self, HelloReply, PROTOCOL_VERSION, Request, Response};
use wasm_task::{Address, Client, Error};

const BOUND: Duration = Duration::from_secs(30);

/// A daemon whose workers answer the hello and then never read again; each
/// connection is kept open while the listener thread runs.
fn deaf_daemon() -> (tempfile::TempDir, Address) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deaf.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut body = Vec::new();
            if !protocol::read_frame(&mut conn, &mut body, 1 << 20).unwrap_or(false) {
                continue;
            }
            assert!(matches!(protocol::decode::<Request>(&body).unwrap(), Request::Hello { .. }));
            let hello = Response::Hello(HelloReply {
                version: PROTOCOL_VERSION,
                pid: 70_000 + n as u32,
                module: "echo".into(),
                methods: vec!["echo".into()],
                checkout_done_hook: false,
            });
            let mut frame = Vec::new();
            protocol::encode_frame(&hello, &mut frame).unwrap();
            conn.write_all(&frame).unwrap();
            kept.push(conn);
        }
    });
    (dir, Address::Unix(path))
}

fn big() -> Vec<u64> {
    vec![u64::MAX; 1 << 20]
}

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future).await.unwrap_or_else(|_| panic!("hung: {what}"))
}

/// The holder is blocked writing ~9 MiB to a worker that never reads; calls
/// queued behind it from other tasks; abort from another thread ends them
/// all with `Aborted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_a_blocked_write_ends_every_call() {
    let (_dir, address) = deaf_daemon();
    let client = Client::builder(address, "echo").max_frame(64 << 20).build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let mut calls = Vec::new();
    for i in 0..6u32 {
        let c = checkout.clone();
        calls.push(tokio::spawn(async move {
            if i == 0 {
                c.call::<Vec<u64>>("echo", &big()).await.map(|_| ())
            } else {
                c.call::<u32>("echo", &i).await.map(|_| ())
            }
        }));
        tokio::task::yield_now().await;
    }
    // Let the first call get stuck in its write (it cannot finish anyway).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(calls.iter().all(|c| !c.is_finished()), "nothing can have an answer");
    let aborter = checkout.clone();
    std::thread::spawn(move || aborter.abort()).join().unwrap();
    for (i, call) in calls.into_iter().enumerate() {
        let result = bounded("a call after abort", call).await.unwrap();
        assert!(matches!(result, Err(Error::Aborted { .. })), "call {i}: {result:?}");
    }
}

/// Same blocked write, ended by the checkout's deadline instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_during_a_blocked_write_times_out() {
    let (_dir, address) = deaf_daemon();
    let client = Client::builder(address, "echo")
        .max_frame(64 << 20)
        .timeout(Some(Duration::from_millis(400)))
        .build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let first = {
        let c = checkout.clone();
        tokio::spawn(async move { c.call::<Vec<u64>>("echo", &big()).await.map(|_| ()) })
    };
    tokio::task::yield_now().await;
    let second = {
        let c = checkout.clone();
        tokio::spawn(async move { c.call::<u32>("echo", &1u32).await.map(|_| ()) })
    };
    for (i, call) in [first, second].into_iter().enumerate() {
        let result = bounded("a call past the deadline", call).await.unwrap();
        assert!(matches!(result, Err(Error::Timeout { .. })), "call {i}: {result:?}");
    }
}

/// A checkout with a deadline: a call abandoned (future dropped) on a
/// runtime that then shuts down, the next call on another runtime: no hang,
/// no panic, a clear error.
#[test]
fn calls_on_a_second_runtime_after_the_first_ended() {
    let (_dir, address) = deaf_daemon();
    let rt1 = tokio::runtime::Runtime::new().unwrap();
    let (client, checkout) = rt1.block_on(async {
        let client = Client::builder(address, "echo")
            .max_frame(64 << 20)
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let c = client.checkout().await.unwrap();
        (client, c)
    });
    let checkout = Arc::new(checkout);
    {
        let rt_short = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let c = checkout.clone();
        let r = rt_short.block_on(async move {
            tokio::time::timeout(Duration::from_millis(100), c.call::<u32>("echo", &1u32)).await
        });
        assert!(r.is_err(), "the deaf worker cannot answer");
    }
    let rt2 = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let c = checkout.clone();
    let r =
        rt2.block_on(async move { bounded("second runtime", c.call::<u32>("echo", &2u32)).await });
    assert!(matches!(r, Err(Error::WorkerClosed { .. })), "{r:?}");
    drop(checkout);
    drop(client);
    drop(rt1);
}

/// Many tasks on several threads pipeline calls on one checkout while an
/// abort lands at a varying moment: every call ends, each with its own echo
/// or an error; never another call's result; later calls fail `Aborted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn abort_racing_pipelined_calls_from_many_tasks() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(4).build();
    for round in 0..60u64 {
        let checkout = Arc::new(client.checkout().await.unwrap());
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let c = checkout.clone();
            tasks.push(tokio::spawn(async move {
                for k in 0..20u64 {
                    let v = round * 100_000 + t * 1000 + k;
                    // Mixed sizes: under and over the pre-sized buffer.
                    let pad = "p".repeat(((k * 37) % 600) as usize);
                    let r = c.call::<(u64, String)>("echo", &(v, pad.clone())).await;
                    match &r {
                        Ok((got, p)) => assert!(*got == v && *p == pad, "another call's result"),
                        Err(Error::Aborted { .. })
                        | Err(Error::WorkerClosed { .. })
                        | Err(Error::EarlierCallFailed { .. }) => {}
                        Err(e) => panic!("unexpected error: {e:?}"),
                    }
                }
            }));
        }
        let c = checkout.clone();
        let delay = round % 12;
        let aborter = std::thread::spawn(move || {
            for _ in 0..delay * 50 {
                std::thread::yield_now();
            }
            c.abort();
        });
        for task in tasks {
            bounded("pipelined call with abort", task).await.unwrap();
        }
        aborter.join().unwrap();
        let r = bounded("call after abort", checkout.call::<u64>("echo", &1u64)).await;
        assert!(matches!(r, Err(Error::Aborted { .. })), "{r:?}");
    }
    let checkout = bounded("checkout after aborts", client.checkout()).await.unwrap();
    assert_eq!(checkout.call::<u64>("echo", &5u64).await.unwrap(), 5);
}
