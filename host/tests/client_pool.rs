//! The client's pool against a fake daemon: sizing, FIFO order, cancellation,
//! timeouts while waiting, reconnection and retirement.

mod client_fake;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_fake::{FakeDaemon, Options, started, wait_until};
use futures_util::FutureExt;
use wasm_task::client::{Phase, Status};
use wasm_task::{Address, Error};

/// The gauges of a status, in the order (idle, busy, connecting, waiting);
/// nothing may be closing when a test compares them.
fn gauges(status: Status) -> (usize, usize, usize, usize) {
    assert_eq!(status.closing, 0, "{status:?}");
    (status.idle, status.busy, status.connecting, status.waiting)
}

#[tokio::test(start_paused = true)]
async fn min_workers_are_connected_eagerly_at_build() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().min_workers(3).max_workers(5).build();

    wait_until("3 workers are idle", || client.status().idle == 3).await;
    assert_eq!(gauges(client.status()), (3, 0, 0, 0));
    assert_eq!(daemon.hellos(), 3);
}

#[tokio::test(start_paused = true)]
async fn checkouts_beyond_max_workers_are_served_in_fifo_order() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let first = client.checkout().await.unwrap();

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..5 {
        let (waiter, order) = (client.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let checkout = waiter.checkout().await.unwrap();
            order.lock().unwrap().push((i, checkout.worker_pid()));
        }));
        wait_until("the checkout queues", || client.status().waiting == i + 1).await;
    }
    drop(first);
    for task in tasks {
        task.await.unwrap();
    }

    let order = order.lock().unwrap().clone();
    assert_eq!(order.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
    assert!(order.iter().all(|(_, pid)| *pid == order[0].1), "one worker served all: {order:?}");
    assert_eq!(daemon.hellos(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropped_waiting_checkout_gives_up_its_place() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let first = client.checkout().await.unwrap();

    let dropped = tokio::spawn({
        let client = client.clone();
        async move { client.checkout().await.map(|c| c.worker_pid()) }
    });
    wait_until("the first waiter queues", || client.status().waiting == 1).await;
    let served = tokio::spawn({
        let client = client.clone();
        async move { client.checkout().await.map(|c| c.worker_pid()) }
    });
    wait_until("the second waiter queues", || client.status().waiting == 2).await;

    dropped.abort();
    wait_until("the aborted waiter leaves", || client.status().waiting == 1).await;
    let pid = first.worker_pid();
    drop(first);

    assert_eq!(served.await.unwrap().unwrap(), pid);
    assert_eq!(gauges(client.status()), (1, 0, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn worker_handed_to_a_dropped_waiter_goes_to_the_next_one() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let first = client.checkout().await.unwrap();
    let pid = first.worker_pid();

    let mut abandoned = Box::pin(client.checkout());
    assert!(abandoned.as_mut().now_or_never().is_none(), "the checkout must wait");
    let next = tokio::spawn({
        let client = client.clone();
        async move { client.checkout().await.map(|c| c.worker_pid()) }
    });
    wait_until("both wait", || client.status().waiting == 2).await;

    // The worker goes to the abandoned checkout, which never looks at it.
    drop(first);
    assert_eq!(gauges(client.status()), (0, 1, 0, 1));
    drop(abandoned);

    assert_eq!(next.await.unwrap().unwrap(), pid);
    assert_eq!(gauges(client.status()), (1, 0, 0, 0));
    assert_eq!(daemon.hellos(), 1);
}

#[tokio::test(start_paused = true)]
async fn waiting_checkout_times_out_naming_the_waiting_phase() {
    let daemon = FakeDaemon::running(Options::default());
    let timeout = Duration::from_secs(5);
    let client = daemon.client().max_workers(1).timeout(Some(timeout)).build();
    let _held = client.checkout().await.unwrap();

    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::Timeout { phase: Phase::WaitingForWorker, elapsed } => {
            assert!(*elapsed >= timeout, "{elapsed:?}");
        }
        other => panic!("expected a timeout while waiting, got {other:?}"),
    }
    assert!(err.to_string().starts_with("timed out waiting for a worker after "), "{err}");
    assert_eq!(gauges(client.status()), (0, 1, 0, 0));
}

#[tokio::test(start_paused = true)]
async fn aborted_checkouts_never_leak_capacity() {
    let daemon = FakeDaemon::running(Options::default());
    let max = 3;
    let client = daemon.client().min_workers(1).max_workers(max).build();

    let mut tasks = Vec::new();
    for i in 0..60u64 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let checkout = client.checkout().await.unwrap();
            tokio::time::sleep(Duration::from_millis(i % 4)).await;
            let echoed: u64 = checkout.call("echo", &i).await.unwrap();
            assert_eq!(echoed, i);
        }));
    }
    // Abort a third of them at different moments: queued, holding a worker,
    // or in the middle of a call.
    for (i, task) in tasks.iter().enumerate() {
        let total = client.status();
        assert!(total.workers() <= max, "{total:?}");
        if i % 3 == 0 {
            task.abort();
        }
        tokio::time::sleep(Duration::from_millis((i % 2) as u64)).await;
    }
    for task in tasks {
        if let Err(err) = task.await {
            assert!(err.is_cancelled(), "{err}");
        }
    }

    wait_until("the pool settles", || {
        let now = client.status();
        now.busy == 0 && now.connecting == 0 && now.waiting == 0
    })
    .await;
    let settled = client.status();
    assert!(settled.idle >= 1 && settled.idle <= max, "{settled:?}");

    // All of the capacity is still there, and no more.
    let all: Vec<_> = futures_util::future::join_all((0..max).map(|_| client.checkout())).await;
    assert!(all.iter().all(Result::is_ok));
    let mut extra = Box::pin(client.checkout());
    assert!(extra.as_mut().now_or_never().is_none(), "a fourth checkout must wait");
    assert_eq!(client.status().busy, max);
}

#[tokio::test(start_paused = true)]
async fn checkout_waits_for_a_daemon_that_starts_late() {
    let mut daemon = FakeDaemon::stopped(Options::default());
    let client = daemon
        .client()
        .min_workers(0)
        .max_workers(1)
        .timeout(Some(Duration::from_secs(60)))
        .build();

    let pending = tokio::spawn({
        let client = client.clone();
        async move { client.checkout().await.map(|c| c.worker_pid()) }
    });
    // Let a few connection attempts fail (virtual time).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished());
    assert_eq!(gauges(client.status()), (0, 0, 1, 1));

    daemon.start();
    let pid = pending.await.unwrap().expect("a worker once the daemon is up");
    assert!(pid >= 1000);
    assert_eq!(daemon.hellos(), 1);
}

#[tokio::test(start_paused = true)]
async fn pool_fills_its_minimum_once_the_daemon_starts() {
    let mut daemon = FakeDaemon::stopped(Options::default());
    let client = daemon.client().min_workers(2).build();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gauges(client.status()), (0, 0, 2, 0));

    daemon.start();
    wait_until("2 workers are idle", || gauges(client.status()) == (2, 0, 0, 0)).await;
}

#[tokio::test(start_paused = true)]
async fn timeout_without_a_daemon_reports_the_last_connect_error() {
    let daemon = FakeDaemon::stopped(Options::default());
    let client = daemon.client().timeout(Some(Duration::from_secs(2))).build();

    let err = client.checkout().await.unwrap_err();
    let Error::Connect { address, source } = &err else {
        panic!("expected a connect error, got {err:?}");
    };
    assert_eq!(*address, Address::Unix(daemon.path()));
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(err.to_string(), format!("connecting to unix:{}", daemon.path().display()));
}

#[tokio::test(start_paused = true)]
async fn unknown_module_fails_the_checkout_without_a_retry_loop() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client_of("missing").min_workers(0).build();

    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::UnknownModule { module, message } => {
            assert_eq!((module.as_str(), message.as_str()), ("missing", "refusing module missing"));
        }
        other => panic!("expected an unknown module, got {other:?}"),
    }
    wait_until("connecting stops", || client.status().connecting == 0).await;
    assert_eq!(daemon.hellos(), 1);
}

#[tokio::test(start_paused = true)]
async fn refusal_goes_to_the_oldest_waiter_and_the_next_gets_a_worker() {
    let daemon = FakeDaemon::running(Options { refuse_first: 1, ..Options::default() });
    let client = daemon.client().min_workers(0).max_workers(1).build();

    // Both queue before the first connection attempt has even started.
    let oldest = started(client.checkout());
    let next = started(client.checkout());
    assert_eq!(gauges(client.status()), (0, 0, 1, 2));

    let (oldest, next) = tokio::join!(oldest, next);
    assert!(matches!(oldest, Err(Error::UnknownModule { .. })), "{oldest:?}");
    assert!(next.is_ok());
    assert_eq!(daemon.hellos(), 2);
}

#[tokio::test(start_paused = true)]
async fn refusals_with_nobody_waiting_are_retried_with_backoff() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client_of("bad_setup").min_workers(1).build();

    // Pauses of 16, 32, .. 512 ms: 7 attempts in the first second, not hundreds.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!((2..=8).contains(&daemon.hellos()), "{} hellos", daemon.hellos());
    assert_eq!(gauges(client.status()), (0, 0, 1, 0));

    let err = client.checkout().await.unwrap_err();
    assert!(matches!(err, Error::SetupFailed { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn dead_idle_worker_is_replaced_without_failing_the_checkout() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().min_workers(1).max_workers(1).build();
    let old = client.checkout().await.unwrap().worker_pid();
    wait_until("the worker is idle", || client.status().idle == 1).await;

    daemon.kill_idle_workers();
    wait_until("the daemon closed it", || daemon.closed(old)).await;

    let checkout = client.checkout().await.expect("a fresh worker");
    assert_ne!(checkout.worker_pid(), old);
    let echoed: String = checkout.call("echo", "still works").await.unwrap();
    assert_eq!(echoed, "still works");
}

#[tokio::test(start_paused = true)]
async fn worker_is_retired_after_max_checkouts() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).max_checkouts(Some(2)).build();

    let mut pids = Vec::new();
    for _ in 0..5 {
        pids.push(client.checkout().await.unwrap().worker_pid());
    }
    assert_eq!(pids[0], pids[1]);
    assert_ne!(pids[1], pids[2]);
    assert_eq!(pids[2], pids[3]);
    assert_ne!(pids[3], pids[4]);
    wait_until("the retired workers are closed", || {
        daemon.closed(pids[0]) && daemon.closed(pids[2])
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn dropping_the_client_closes_idle_workers() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().min_workers(2).build();
    wait_until("2 workers are idle", || client.status().idle == 2).await;

    drop(client);
    wait_until("the daemon sees both close", || daemon.open() == 0).await;
}

#[tokio::test(start_paused = true)]
async fn pool_works_over_tcp() {
    let daemon = FakeDaemon::running_tcp(Options::default()).await;
    let client = daemon.client().max_workers(2).build();

    let checkout = client.checkout().await.unwrap();
    let echoed: Vec<u8> = checkout.call("echo", &[1u8, 2, 3]).await.unwrap();
    assert_eq!(echoed, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_works_on_a_multi_thread_runtime() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(2).build();

    let tasks: Vec<_> = (0..16u32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let checkout = client.checkout().await.unwrap();
                checkout.call::<u32>("echo", &i).await.unwrap()
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap(), i as u32);
    }
    let now = client.status();
    assert!(now.workers() <= 2, "{now:?}");
}
