//! `Client::status`: workers by stage, checkouts waiting, calls, and
//! retirements by cause, matching what the daemon actually runs.

use std::time::Duration;

use futures_util::FutureExt;

use crate::harness::{Daemon, eventually, gone, running_children, signal};

#[tokio::test]
async fn status_reports_workers_by_stage_calls_and_retirements_by_cause() {
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(2)
        .max_checkouts(Some(3))
        .idle_timeout(Some(Duration::from_millis(300)))
        .timeout(Some(Duration::from_secs(2)))
        .build();
    eventually("the minimum is idle", || client.status().idle == 1).await;

    // Busy and waiting.
    let first = client.checkout().await.unwrap();
    let second = client.checkout().await.unwrap();
    let mut third = Box::pin(client.checkout());
    assert!(third.as_mut().now_or_never().is_none());
    let now = client.status();
    assert_eq!((now.busy, now.waiting, now.idle, now.connecting), (2, 1, 0, 0), "{now:?}");
    drop(third);

    // error: a guest error retires the worker on release.
    first.call::<()>("fail", &"no").await.unwrap_err();
    drop(first);
    // timeout: the checkout's deadline passes in the middle of a call.
    second.call::<()>("spin", &()).await.unwrap_err();
    drop(second);
    // max_checkouts: three checkouts of one worker, each taken once the
    // worker is back (its checkout-done hook runs after the release).
    let mut recycled = 0;
    for _ in 0..3 {
        eventually("one worker is idle", || {
            let now = client.status();
            now.idle == 1 && now.busy + now.connecting + now.closing == 0
        })
        .await;
        let worker = client.checkout().await.unwrap();
        worker.call::<u64>("incr", &()).await.unwrap();
        recycled = worker.worker_pid();
    }
    // death: an idle worker killed from outside.
    eventually("the recycled worker is gone and another idle", || {
        gone(recycled) && client.status().idle == 1 && running_children(daemon.pid()).len() == 1
    })
    .await;
    signal(running_children(daemon.pid())[0], libc::SIGKILL);
    eventually("the dead worker was noticed", || client.status().retired.death == 1).await;
    // idle: two workers, the one beyond the minimum times out.
    let pair: Vec<_> = futures_util::future::join_all((0..2).map(|_| client.checkout())).await;
    drop(pair);
    eventually("the extra worker timed out", || client.status().retired.idle >= 1).await;

    let status = client.status();
    let retired = status.retired;
    assert_eq!(
        (retired.error, retired.timeout, retired.max_checkouts, retired.death),
        (1, 1, 1, 1),
        "{status:?}"
    );
    assert_eq!((status.calls, status.failed_calls), (5, 2), "{status:?}");
    assert_eq!(status.checkouts, 7, "{status:?}");

    // The gauges are what the daemon runs.
    eventually("the pool settles", || {
        let now = client.status();
        now.busy + now.connecting + now.closing == 0 && now.idle == 1
    })
    .await;
    eventually("one worker process runs", || running_children(daemon.pid()).len() == 1).await;
}
