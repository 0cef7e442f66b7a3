//! The life of workers in the pool against a fake daemon: closing ones still
//! counting against `max_workers`, idle timeout, maximum lifetime, idle
//! workers dying, the refusal back-off, and the counts of `Client::status`.

mod client_fake;

use std::time::Duration;

use client_fake::{FakeDaemon, Options, wait_until};
use futures_util::FutureExt;
use wasm_task::Error;

#[tokio::test(start_paused = true)]
async fn closing_worker_counts_against_max_workers_until_it_hangs_up() {
    let linger = Duration::from_secs(5);
    let daemon = FakeDaemon::running(Options { linger: Some(linger), ..Options::default() });
    let client = daemon.client().min_workers(0).max_workers(1).max_checkouts(Some(1)).build();

    let first = client.checkout().await.unwrap();
    let pid = first.worker_pid();
    drop(first);
    let status = client.status();
    assert_eq!((status.closing, status.retired.max_checkouts), (1, 1), "{status:?}");

    let started = tokio::time::Instant::now();
    let mut next = Box::pin(client.checkout());
    assert!(next.as_mut().now_or_never().is_none(), "no room while the old worker lingers");
    assert_eq!(client.status().connecting, 0);
    let next = next.await.unwrap();
    assert!(daemon.closed(pid), "the replacement came after the old worker hung up");
    assert!(started.elapsed() >= linger, "{:?}", started.elapsed());
    assert_ne!(next.worker_pid(), pid);
    assert!(daemon.open() <= 1);
}

#[tokio::test(start_paused = true)]
async fn idle_workers_beyond_the_minimum_close_after_the_idle_timeout() {
    let daemon = FakeDaemon::running(Options::default());
    let idle_timeout = Duration::from_secs(10);
    let client =
        daemon.client().min_workers(1).max_workers(3).idle_timeout(Some(idle_timeout)).build();
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| client.checkout())).await;
    assert!(held.iter().all(Result::is_ok));
    drop(held);
    assert_eq!(client.status().idle, 3);

    tokio::time::sleep(idle_timeout / 2).await;
    assert_eq!(client.status().idle, 3, "not before their time");
    wait_until("two idle workers were closed", || client.status().retired.idle == 2).await;
    wait_until("they have gone", || daemon.open() == 1).await;
    let status = client.status();
    assert_eq!((status.idle, status.connecting, status.closing), (1, 0, 0), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn workers_are_replaced_after_their_lifetime_but_never_mid_checkout() {
    let daemon = FakeDaemon::running(Options::default());
    let lifetime = Duration::from_secs(60);
    let client = daemon
        .client()
        .min_workers(2)
        .max_workers(2)
        .timeout(None)
        .max_lifetime(Some(lifetime))
        .build();
    wait_until("both workers are idle", || client.status().idle == 2).await;
    let held = client.checkout().await.unwrap();
    let held_pid = held.worker_pid();

    tokio::time::sleep(lifetime + Duration::from_secs(2)).await;
    let status = client.status();
    assert_eq!(status.retired.lifetime, 1, "the idle one expired: {status:?}");
    assert_eq!(held.call::<u32>("pid", &()).await.unwrap(), held_pid, "the held one serves on");
    drop(held);
    wait_until("the held one expired on release", || client.status().retired.lifetime == 2).await;
    wait_until("the old workers are gone", || daemon.closed(held_pid)).await;
}

#[tokio::test(start_paused = true)]
async fn idle_worker_that_dies_is_replaced_before_anyone_asks() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().min_workers(1).max_workers(1).build();
    wait_until("the worker is idle", || client.status().idle == 1).await;

    daemon.kill_idle_workers();
    wait_until("a replacement is idle", || {
        let status = client.status();
        status.retired.death == 1 && status.idle == 1
    })
    .await;
    assert_eq!(daemon.hellos(), 2);
    assert_eq!(client.status().checkouts, 0, "nobody asked");
}

#[tokio::test(start_paused = true)]
async fn refusals_are_paced_by_one_backoff_for_the_whole_pool() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon
        .client_of("bad_setup")
        .min_workers(0)
        .max_workers(4)
        .timeout(Some(Duration::from_secs(10)))
        .build();

    // A caller that retries at once after every failure.
    let started = tokio::time::Instant::now();
    let mut failures = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let err = client.checkout().await.unwrap_err();
        assert!(
            matches!(&err, Error::SetupFailed { message, .. } if message.contains("bad_setup"))
        );
        failures += 1;
    }
    // Pauses of 16 ms doubling to 2 s: about a dozen attempts in 10 s.
    let hellos = daemon.hellos();
    assert!((5..=20).contains(&hellos), "{hellos} attempts, {failures} failed checkouts");
    assert_eq!(client.status().refused, hellos as u64);
}

#[tokio::test(start_paused = true)]
async fn checkout_timing_out_during_refusals_reports_the_refusal() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon
        .client_of("bad_setup")
        .min_workers(1)
        .timeout(Some(Duration::from_millis(100)))
        .build();
    wait_until("the daemon refused a few times", || daemon.hellos() >= 3).await;

    let err = client.checkout().await.unwrap_err();
    assert!(matches!(err, Error::SetupFailed { .. }), "{err:?}");
}

#[tokio::test(start_paused = true)]
async fn status_counts_checkouts_calls_and_connections() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().min_workers(0).max_workers(2).build();
    for i in 0..3u8 {
        let checkout = client.checkout().await.unwrap();
        assert_eq!(checkout.call::<u8>("echo", &i).await.unwrap(), i);
        let _ = checkout.call::<u8>("nope", &()).await;
    }
    let status = client.status();
    assert_eq!((status.checkouts, status.calls, status.failed_calls), (3, 6, 3));
    assert_eq!((status.connected, status.retired.error), (3, 3), "{status:?}");
}
