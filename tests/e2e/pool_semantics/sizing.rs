//! The pool's size: never above `max_workers` while workers die and are
//! replaced, several connections at once for a long queue, dead idle
//! workers replaced, idle timeout and maximum lifetime.

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::FutureExt;
use wasm_task::Error;

use crate::harness::{ChildWatch, Daemon, alive, eventually, gone, running_children, signal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_never_exceeds_max_workers_while_workers_die_and_are_replaced() {
    let daemon = Daemon::start(&[]);
    let watch = ChildWatch::start(daemon.pid());
    let client = daemon.client("testguest").min_workers(2).max_workers(3).build();

    let tasks: Vec<_> = (0..60u64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let worker = client.checkout().await.unwrap();
                match i % 3 {
                    // A trap kills the worker in the middle of its checkout.
                    0 => assert!(matches!(
                        worker.call::<()>("panic", &"die").await,
                        Err(Error::GuestTrap { .. })
                    )),
                    // A guest error retires it when released.
                    1 => assert!(matches!(
                        worker.call::<()>("fail", &"retire me").await,
                        Err(Error::GuestError { .. })
                    )),
                    _ => assert_eq!(worker.call::<u64>("echo", &i).await.unwrap(), i),
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    eventually("the pool settles", || {
        let status = client.status();
        status.busy + status.connecting + status.closing == 0 && status.idle == 2
    })
    .await;
    let most = watch.most();
    assert!(most <= 3, "{most} worker processes were alive at once");
    assert_eq!(client.status().retired.error, 40);
}

#[tokio::test]
async fn long_queue_starts_several_connections_at_once() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(0).max_workers(4).build();

    let mut queued: Vec<_> = (0..8)
        .map(|_| Box::pin(async { client.checkout().await.map(|w| w.worker_pid()) }))
        .collect();
    for checkout in &mut queued {
        assert!(checkout.as_mut().now_or_never().is_none());
    }
    let status = client.status();
    assert_eq!((status.waiting, status.connecting), (8, 4), "{status:?}");

    let pids: Vec<_> = futures_util::future::join_all(queued).await;
    let distinct: BTreeSet<_> = pids.into_iter().map(Result::unwrap).collect();
    assert!(distinct.len() <= 4, "{distinct:?}");
}

#[tokio::test]
async fn idle_worker_killed_from_outside_is_replaced_without_failing_a_checkout() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(1).max_workers(1).build();
    let pid = client.checkout().await.unwrap().worker_pid();
    eventually("the worker is idle", || client.status().idle == 1).await;

    signal(pid, libc::SIGKILL);
    // Once reaped, its connection is closed for sure.
    eventually("the killed worker is reaped", || gone(pid)).await;
    let worker = client.checkout().await.expect("a checkout never sees the dead worker");
    assert_ne!(worker.worker_pid(), pid);
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
    assert_eq!(client.status().retired.death, 1);
    drop(worker);

    // Killed while idle with nobody asking: replaced all the same.
    eventually("the worker is idle again", || client.status().idle == 1).await;
    let second = running_children(daemon.pid());
    assert_eq!(second.len(), 1);
    signal(second[0], libc::SIGKILL);
    eventually("a replacement is idle", || {
        let status = client.status();
        status.retired.death == 2 && status.idle == 1
    })
    .await;
    assert_ne!(client.checkout().await.unwrap().worker_pid(), second[0]);
}

#[tokio::test]
async fn idle_workers_beyond_the_minimum_are_closed_after_the_idle_timeout() {
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(3)
        .idle_timeout(Some(Duration::from_millis(200)))
        .build();
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| client.checkout())).await;
    assert!(held.iter().all(Result::is_ok));
    drop(held);

    eventually("two idle workers were closed", || client.status().retired.idle == 2).await;
    eventually("one worker process is left", || running_children(daemon.pid()).len() == 1).await;
    assert_eq!(client.status().idle, 1);
}

#[tokio::test]
async fn worker_outliving_its_lifetime_serves_its_checkout_then_is_replaced() {
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(1)
        .max_lifetime(Some(Duration::from_millis(300)))
        .build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    // The checkout outlasts the lifetime; the worker is not closed under it.
    assert_eq!(worker.call::<u64>("sleep_ms", &400u64).await.unwrap(), 400);
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
    drop(worker);

    eventually("the old worker is gone", || !alive(pid)).await;
    assert_eq!(client.status().retired.lifetime, 1);
    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid);
}
