//! Calls queued on one checkout against a fake daemon: order, failures that
//! fail the calls behind them, aborts, and results read with their logs and
//! timings.

mod client_fake;

use std::time::Duration;

use client_fake::{FakeDaemon, Options, wait_until};
use futures_util::FutureExt;
use wasm_task::Error;

/// The calls worker `pid` received, in order.
fn calls_seen(daemon: &FakeDaemon, pid: u32) -> Vec<String> {
    daemon.events_of(pid).into_iter().filter(|e| e.starts_with("call ")).collect()
}

#[tokio::test(start_paused = true)]
async fn calls_queued_behind_a_failure_fail_at_once_naming_it_and_later_calls_run() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let (first, failed, queued, also_queued) = tokio::join!(
        checkout.call::<u8>("echo", &1u8),
        checkout.call::<u8>("fail", &2u8),
        checkout.call::<u8>("echo", &3u8),
        checkout.call::<u8>("pid", &()),
    );
    assert_eq!(first.unwrap(), 1);
    assert!(matches!(failed, Err(Error::GuestError { .. })), "{failed:?}");
    for skipped in [queued, also_queued] {
        let err = skipped.unwrap_err();
        let Error::EarlierCallFailed { earlier_method, earlier, .. } = &err else {
            panic!("expected a skipped call, got {err:?}");
        };
        assert_eq!(earlier_method, "fail");
        assert!(matches!(**earlier, Error::GuestError { .. }), "{earlier:?}");
    }
    assert_eq!(calls_seen(&daemon, pid), ["call echo", "call fail"], "skipped calls never ran");
    // They were sent ahead while the first call ran, and the worker skipped them.
    let skips: Vec<_> =
        daemon.events_of(pid).into_iter().filter(|e| e.starts_with("skip ")).collect();
    assert_eq!(skips, ["skip echo", "skip pid"]);

    // A call made after the failure runs on the same worker.
    assert_eq!(checkout.call::<u32>("pid", &()).await.unwrap(), pid);
    let status = client.status();
    assert_eq!((status.calls, status.failed_calls), (5, 3));
}

#[tokio::test(start_paused = true)]
async fn calls_queued_behind_a_fatal_failure_name_it_and_later_calls_get_the_same_error() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let (died, queued) =
        tokio::join!(checkout.call::<()>("hang_up", &()), checkout.call::<u8>("echo", &1u8));
    assert!(matches!(died, Err(Error::WorkerDied { .. })), "{died:?}");
    assert!(matches!(queued, Err(Error::EarlierCallFailed { .. })), "{queued:?}");

    let later = checkout.call::<u8>("echo", &2u8).await.unwrap_err();
    assert!(matches!(&later, Error::WorkerDied { method, .. } if method == "hang_up"), "{later:?}");
    assert_eq!(calls_seen(&daemon, pid), ["call hang_up"]);
    assert_eq!(client.status().retired.death, 1);
}

#[tokio::test(start_paused = true)]
async fn abort_ends_the_call_in_flight_and_fails_queued_and_later_calls() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let mut in_flight = Box::pin(checkout.call::<()>("slow", &()));
    let mut queued = Box::pin(checkout.call::<u8>("echo", &1u8));
    assert!(in_flight.as_mut().now_or_never().is_none());
    assert!(queued.as_mut().now_or_never().is_none());
    wait_until("the slow call reached the worker", || calls_seen(&daemon, pid).len() == 1).await;

    checkout.abort();
    assert!(matches!(in_flight.await, Err(Error::Aborted { pid: p }) if p == pid));
    assert!(matches!(queued.await, Err(Error::Aborted { .. })));
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    let later = checkout.call::<u8>("echo", &2u8).await.unwrap_err();
    assert_eq!(later.to_string(), format!("checkout of worker {pid} was aborted"));
    assert_eq!(calls_seen(&daemon, pid), ["call slow"], "nothing reached any worker after");

    // The place was given back at once: the only worker slot serves again
    // while the aborted checkout is still held.
    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(client.status().retired.aborted, 1);
    drop(checkout);
}

#[tokio::test(start_paused = true)]
async fn abort_between_calls_closes_the_worker_at_once() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    assert_eq!(checkout.call::<u8>("echo", &1u8).await.unwrap(), 1);

    checkout.abort();
    checkout.abort();
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    assert!(matches!(checkout.call::<u8>("echo", &2u8).await, Err(Error::Aborted { .. })));
    assert_eq!(client.status().retired.aborted, 1, "aborting twice closes once");
}

#[tokio::test(start_paused = true)]
async fn call_report_gives_the_logs_and_where_the_time_went() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let held = client.checkout().await.unwrap();
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let checkout = client.checkout().await.unwrap();
            let report = checkout.call_report::<u8>("log", &5u8).await;
            (checkout.waited(), report)
        }
    });
    wait_until("the second checkout waits", || client.status().waiting == 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(held);

    let (waited, report) = waiting.await.unwrap();
    assert_eq!(report.result.as_ref().unwrap(), &5);
    assert!(waited >= Duration::from_secs(3), "{waited:?}");
    assert_eq!(report.timings.checkout_wait, waited);
    assert!(report.timings.worker.is_some(), "the reply's stats are kept");
    let messages: Vec<_> = report.logs.iter().map(|r| r.message.as_str()).collect();
    assert_eq!(messages, ["cache cold", "hello"]);
    assert_eq!(report.logs[0].fields, [("key".to_owned(), "k1".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn queued_call_reports_its_wait_for_the_turn() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().timeout(Some(Duration::from_secs(10))).build();
    let checkout = client.checkout().await.unwrap();

    let (slow, queued) = tokio::join!(
        checkout.call_report::<()>("slow", &()),
        checkout.call_report::<u8>("echo", &1u8),
    );
    assert!(matches!(slow.result, Err(Error::Timeout { .. })), "{:?}", slow.result);
    assert!(slow.timings.turn_wait.is_zero(), "{:?}", slow.timings);
    assert!(matches!(queued.result, Err(Error::Timeout { .. })), "{:?}", queued.result);
    assert!(queued.timings.round_trip.is_zero(), "no reply read: {:?}", queued.timings);
}
