//! The pool: size bounds, FIFO waiting, timeouts, a daemon that starts late.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasm_task::{Client, Error};

use crate::harness::{Daemon, alive, eventually, guests};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_checkouts_share_five_workers() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").max_workers(5).build();

    // Watch the daemon's children for the whole run.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (done, most, pid) = (done.clone(), most.clone(), daemon.pid());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let n = crate::harness::children(pid).len();
                most.fetch_max(n, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let tasks: Vec<_> = (0..100u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let worker = client.checkout().await.unwrap();
                let got: u64 = worker.call("echo", &i).await.unwrap();
                (i, got, worker.worker_pid())
            })
        })
        .collect();
    let mut pids = BTreeSet::new();
    for task in tasks {
        let (sent, got, pid) = task.await.unwrap();
        assert_eq!(sent, got, "every checkout gets its own answer");
        pids.insert(pid);
    }
    done.store(true, Ordering::SeqCst);
    watcher.join().unwrap();

    assert!(pids.len() <= 5, "{} distinct workers served: {pids:?}", pids.len());
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 5, "{most} worker processes were alive at once");
}

#[tokio::test]
async fn checkout_times_out_when_all_workers_are_busy() {
    let daemon = Daemon::start(&[]);
    let client =
        daemon.client("testguest").max_workers(1).timeout(Some(Duration::from_millis(300))).build();
    let held = client.checkout().await.unwrap();

    let err = client.checkout().await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains("waiting for a worker"), "{err}");

    // The timed-out wait did not harm the pool: the worker serves the next checkout.
    let pid = held.worker_pid();
    drop(held);
    let next = client.checkout().await.unwrap();
    assert_eq!(next.worker_pid(), pid);
    assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 1);
}

async fn call_outliving_its_timeout(method: &str, arg: impl serde::Serialize) {
    let daemon = Daemon::start(&[]);
    let timeout = Duration::from_millis(500);
    let client = daemon.client("testguest").timeout(Some(timeout)).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();

    let started = Instant::now();
    let err = worker.call::<u64>(method, &arg).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(err.to_string().contains(method), "error names the call: {err}");
    assert!(elapsed < timeout + Duration::from_secs(1), "timed out after {elapsed:?}");

    drop(worker);
    eventually("the timed-out worker process is gone", || !alive(pid)).await;
}

#[tokio::test]
async fn call_spinning_past_the_timeout_fails_and_its_worker_is_killed() {
    call_outliving_its_timeout("spin", ()).await;
}

#[tokio::test]
async fn call_blocked_in_a_host_sleep_past_the_timeout_fails_and_its_worker_is_killed() {
    call_outliving_its_timeout("sleep_ms", 600_000u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_started_before_the_daemon_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("late.sock");
    let client = Client::builder(wasm_task::Address::Unix(socket.clone()), "testguest")
        .timeout(Some(Duration::from_secs(60)))
        .build();
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            let worker = client.checkout().await?;
            worker.call::<u64>("incr", &()).await
        }
    });

    // The daemon compiles its modules before it listens, so the client's
    // first attempts find no socket.
    let g = guests();
    let daemon =
        Daemon::spawn(dir, socket, &[format!("--module=testguest={}", g.testguest.display())]);
    assert_eq!(call.await.unwrap().unwrap(), 1);
    drop(daemon);
}

#[tokio::test]
async fn checkout_without_a_daemon_reports_the_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let client =
        Client::builder(wasm_task::Address::Unix(dir.path().join("nobody.sock")), "testguest")
            .timeout(Some(Duration::from_millis(300)))
            .build();
    let err = client.checkout().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody.sock"), "{err}");
}

#[tokio::test]
async fn trapped_worker_is_replaced_under_a_queue() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").max_workers(2).build();
    let mut pids = BTreeSet::new();
    for i in 0..10 {
        let worker = client.checkout().await.unwrap();
        pids.insert(worker.worker_pid());
        if i % 2 == 0 {
            let err = worker.call::<()>("panic", &"again").await.unwrap_err();
            assert!(matches!(err, Error::GuestTrap { .. }), "{err:?}");
        } else {
            assert_eq!(worker.call::<u64>("echo", &7u64).await.unwrap(), 7);
        }
    }
    assert!(pids.len() >= 5, "each trap costs a worker: {pids:?}");
    eventually("no zombies remain", || {
        crate::harness::children(daemon.pid()).iter().all(|p| alive(*p))
    })
    .await;
}
