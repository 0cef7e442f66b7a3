//! Calls on a checkout against a fake daemon: results, errors, deadlines,
//! cancellation, the checkout-done hook and relayed guest logs.

mod client_fake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use client_fake::{FakeDaemon, Options, started, wait_until};
use serde::{Deserialize, Serialize};
use wasm_task::Error;
use wasm_task::client::{Phase, ProtocolError};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Pair {
    name: String,
    count: u32,
}

#[tokio::test(start_paused = true)]
async fn call_round_trips_serde_arguments_and_results() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();

    let pair = Pair { name: "x".into(), count: 3 };
    let echoed: Pair = checkout.call("echo", &pair).await.unwrap();
    assert_eq!(echoed, pair);
    let pid: u32 = checkout.call("pid", &()).await.unwrap();
    assert_eq!(pid, checkout.worker_pid());
}

#[tokio::test(start_paused = true)]
async fn calls_on_one_checkout_run_in_order_one_at_a_time() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();

    let on = &checkout;
    let calls = (0..6u32).map(|i| async move { on.call::<u32>("echo", &i).await });
    let results: Vec<u32> =
        futures_util::future::join_all(calls).await.into_iter().map(Result::unwrap).collect();

    assert_eq!(results, [0, 1, 2, 3, 4, 5]);
    // Small integers are one byte of MessagePack: the worker got them in order.
    assert_eq!(daemon.echoed(), [[0], [1], [2], [3], [4], [5]]);
}

#[tokio::test(start_paused = true)]
async fn call_timeout_closes_the_worker_and_names_the_method() {
    let daemon = FakeDaemon::running(Options::default());
    let timeout = Duration::from_secs(5);
    let client = daemon.client().max_workers(1).timeout(Some(timeout)).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let err = checkout.call::<()>("slow", &()).await.unwrap_err();
    match &err {
        Error::Timeout { phase: Phase::Calling { method }, elapsed } => {
            assert_eq!(method, "slow");
            assert!(*elapsed >= timeout, "{elapsed:?}");
        }
        other => panic!("expected a call timeout, got {other:?}"),
    }
    assert!(err.to_string().starts_with("timed out calling method slow after "), "{err}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;

    // The worker was told how long it had: the whole timeout, as no time had passed.
    assert!(
        daemon.events_of(pid).contains(&"timeout_ms 5000".to_owned()),
        "{:?}",
        daemon.events_of(pid)
    );

    // The checkout is over: later calls time out at once, and the worker is not reused.
    let again = checkout.call::<u32>("pid", &()).await.unwrap_err();
    assert!(matches!(again, Error::Timeout { .. }), "{again:?}");
    drop(checkout);
    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
}

#[tokio::test(start_paused = true)]
async fn a_call_waiting_behind_one_left_unpolled_still_times_out() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(5))).build();
    let checkout = client.checkout().await.unwrap();
    // The first call takes the worker, then nobody polls it: the timer it
    // would watch while holding the worker is not running.
    let first = started(checkout.call::<()>("slow", &()));

    let waiting = checkout.call::<u8>("echo", &1u8);
    let second = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the waiting call keeps its own deadline")
        .unwrap_err();
    assert!(matches!(second, Error::Timeout { .. }), "{second:?}");
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn one_deadline_covers_the_wait_and_the_calls() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(10))).build();
    let held = client.checkout().await.unwrap();

    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            let checkout = client.checkout().await.unwrap();
            let pid = checkout.worker_pid();
            (pid, checkout.call::<()>("slow", &()).await.unwrap_err())
        }
    });
    wait_until("the second checkout waits", || client.status().waiting == 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    drop(held);

    let (pid, err) = waiting.await.unwrap();
    let Error::Timeout { phase: Phase::Calling { .. }, elapsed } = err else {
        panic!("expected a call timeout, got {err:?}");
    };
    assert!(elapsed >= Duration::from_secs(10), "{elapsed:?}");
    let granted: Vec<u64> = daemon
        .events_of(pid)
        .iter()
        .filter_map(|e| e.strip_prefix("timeout_ms ")?.parse().ok())
        .collect();
    assert_eq!(granted.len(), 1);
    assert!(granted[0] <= 6000, "the wait counts against the deadline: {granted:?}");
}

#[tokio::test(start_paused = true)]
async fn guest_error_keeps_the_worker_for_the_checkout_then_retires_it() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let err = checkout.call::<()>("fail", &()).await.unwrap_err();
    match &err {
        Error::GuestError { pid: got, method, message } => {
            assert_eq!((*got, method.as_str(), message.as_str()), (pid, "fail", "bad input"));
        }
        other => panic!("expected a guest error, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!("method fail on worker {pid} returned an error: bad input")
    );

    let echoed: u8 = checkout.call("echo", &7u8).await.unwrap();
    assert_eq!(echoed, 7);
    drop(checkout);
    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid, "its state may be corrupt");
    assert!(daemon.closed(pid));
    assert_eq!(client.status().retired.error, 1);
}

#[tokio::test(start_paused = true)]
async fn workers_are_kept_after_guest_errors_when_asked() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).retire_after_error(false).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    checkout.call::<()>("fail", &()).await.unwrap_err();
    checkout.call::<()>("no_such_method", &()).await.unwrap_err();
    drop(checkout);

    assert_eq!(client.checkout().await.unwrap().worker_pid(), pid);
    assert_eq!(client.status().retired.error, 0);
}

#[tokio::test(start_paused = true)]
async fn trapped_worker_is_closed_even_when_workers_are_kept_after_errors() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).retire_after_error(false).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    checkout.call::<()>("trap", &()).await.unwrap_err();
    wait_until("the trapped worker is closed", || daemon.closed(pid)).await;
    drop(checkout);

    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid);
    assert_eq!(client.status().retired.error, 1);
}

#[tokio::test(start_paused = true)]
async fn unknown_method_is_reported_and_keeps_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();

    let err = checkout.call::<()>("nope", &()).await.unwrap_err();
    assert!(matches!(&err, Error::UnknownMethod { method, .. } if method == "nope"), "{err:?}");
    assert_eq!(checkout.call::<u8>("echo", &1u8).await.unwrap(), 1);
}

#[tokio::test(start_paused = true)]
async fn fatal_error_retires_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let err = checkout.call::<()>("trap", &()).await.unwrap_err();
    match &err {
        Error::GuestTrap { method, message, backtrace, .. } => {
            assert_eq!(method, "trap");
            assert_eq!(message, "unreachable executed");
            assert_eq!(backtrace.as_deref(), Some("0: trap_here"));
        }
        other => panic!("expected a trap, got {other:?}"),
    }

    // Later calls get the same error, without reaching any worker.
    let later = checkout.call::<u8>("echo", &1u8).await.unwrap_err();
    assert!(matches!(&later, Error::GuestTrap { method, .. } if method == "trap"), "{later:?}");
    assert_eq!(daemon.events_of(pid).iter().filter(|e| e.starts_with("call")).count(), 1);
    drop(checkout);

    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(client.status().busy, 1);
    assert!(daemon.closed(pid));
}

#[tokio::test(start_paused = true)]
async fn worker_timeout_reply_is_a_timeout_error_and_retires_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let err = checkout.call::<()>("worker_timeout", &()).await.unwrap_err();
    let Error::Timeout { phase: Phase::Calling { method }, .. } = &err else {
        panic!("expected a call timeout, got {err:?}");
    };
    assert_eq!(method, "worker_timeout");
    drop(checkout);
    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid);
}

#[tokio::test(start_paused = true)]
async fn worker_dying_mid_call_is_reported_as_worker_died() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let err = checkout.call::<()>("hang_up", &()).await.unwrap_err();
    assert!(
        matches!(&err, Error::WorkerDied { pid: p, method, source: None } if *p == pid && method == "hang_up"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), format!("worker {pid} died while calling method hang_up"));

    let truncated = client.checkout();
    drop(checkout);
    let checkout = truncated.await.unwrap();
    let err = checkout.call::<()>("truncate", &()).await.unwrap_err();
    let Error::WorkerDied { source: Some(source), .. } = &err else {
        panic!("expected a died worker with a cause, got {err:?}");
    };
    assert_eq!(source.to_string(), "connection closed in the middle of a frame");
}

#[tokio::test(start_paused = true)]
async fn oversized_or_malformed_reply_is_a_protocol_error_and_closes_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).max_frame(1024).build();

    for (method, expected) in [
        ("huge", "a frame exceeds the 1024 byte limit"),
        ("garbage", "malformed message"),
        ("wrong_id", "reply to request 101 while waiting for request 1"),
    ] {
        let checkout = client.checkout().await.unwrap();
        let pid = checkout.worker_pid();
        let err = checkout.call::<()>(method, &()).await.unwrap_err();
        let Error::Protocol { pid: Some(got), source, .. } = &err else {
            panic!("{method}: expected a protocol error, got {err:?}");
        };
        assert_eq!(*got, pid);
        assert_eq!(source.to_string(), expected, "{method}");
        if method == "huge" {
            assert!(matches!(source, ProtocolError::FrameTooLarge { max: 1024 }));
        }
        drop(checkout);
        wait_until("the worker is closed", || daemon.closed(pid)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn too_large_arguments_fail_without_closing_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).max_frame(1024).build();
    let checkout = client.checkout().await.unwrap();

    let err = checkout.call::<()>("echo", &vec![0u8; 4096]).await.unwrap_err();
    assert!(matches!(&err, Error::ArgsTooLarge { max: 1024, .. }), "{err:?}");
    assert_eq!(checkout.call::<u8>("echo", &5u8).await.unwrap(), 5);
}

#[tokio::test(start_paused = true)]
async fn result_of_the_wrong_type_is_a_decode_error_naming_the_method() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();

    let err = checkout.call::<Pair>("echo", "not a pair").await.unwrap_err();
    assert!(matches!(&err, Error::Decode { method, .. } if method == "echo"), "{err:?}");
    assert_eq!(err.to_string(), "decoding the result of method echo");
    assert_eq!(checkout.call::<u8>("echo", &5u8).await.unwrap(), 5);
}

#[tokio::test(start_paused = true)]
async fn cancelled_call_closes_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let call = started(checkout.call::<()>("slow", &()));
    wait_until("the worker got the call", || daemon.events_of(pid).contains(&"call slow".into()))
        .await;
    drop(call);
    wait_until("the worker is closed", || daemon.closed(pid)).await;

    let err = checkout.call::<u8>("echo", &1u8).await.unwrap_err();
    assert!(matches!(err, Error::WorkerClosed { .. }), "{err:?}");
    drop(checkout);
    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid);
}

#[tokio::test(start_paused = true)]
async fn calls_made_while_one_runs_are_sent_ahead_and_giving_one_up_closes_the_worker() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(None).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();

    let mut slow = started(checkout.call::<()>("slow", &()));
    let ahead = started(checkout.call::<u8>("echo", &1u8));
    let sent_ahead = wait_until("the worker got the echo while busy", || {
        daemon.events_of(pid).contains(&"request while busy".into())
    });
    tokio::select! {
        _ = &mut slow => panic!("the slow call ended first"),
        () = sent_ahead => {}
    }

    // Its reply would now be taken for the next call's: the worker is closed
    // once the call before it is answered.
    drop(ahead);
    slow.await.unwrap();
    let err = checkout.call::<u8>("echo", &2u8).await.unwrap_err();
    assert!(matches!(err, Error::WorkerClosed { .. }), "{err:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    drop(checkout);
    assert_ne!(client.checkout().await.unwrap().worker_pid(), pid);
}

#[tokio::test(start_paused = true)]
async fn checkout_done_hook_runs_before_the_worker_is_reused() {
    let daemon = FakeDaemon::running(Options { hook: true, ..Options::default() });
    let client = daemon.client().max_workers(1).build();

    let first = client.checkout().await.unwrap();
    let pid = first.worker_pid();
    let _: u8 = first.call("echo", &1u8).await.unwrap();
    drop(first);
    let second = client.checkout().await.unwrap();
    assert_eq!(second.worker_pid(), pid);
    let _: u8 = second.call("echo", &2u8).await.unwrap();

    assert_eq!(
        daemon.events_of(pid),
        ["call echo", "timeout_ms 30000", "checkout_done", "call echo", "timeout_ms 30000"]
    );
}

#[tokio::test(start_paused = true)]
async fn failing_checkout_done_hook_retires_the_worker() {
    let daemon =
        FakeDaemon::running(Options { hook: true, hook_fails: true, ..Options::default() });
    let client = daemon.client().max_workers(1).build();

    let pid = client.checkout().await.unwrap().worker_pid();
    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(daemon.events_of(pid), ["checkout_done", "closed"]);
}

#[tokio::test(start_paused = true)]
async fn worker_dead_by_the_checkout_done_hook_counts_as_a_death() {
    let daemon = FakeDaemon::running(Options { hook: true, ..Options::default() });
    let client = daemon.client().max_workers(1).build();

    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    daemon.kill_idle_workers();
    wait_until("the worker is gone", || daemon.closed(pid)).await;
    drop(checkout);
    wait_until("the worker is counted", || client.status().retired.death == 1).await;
    assert_eq!(client.status().retired.error, 0);
}

/// An event's level and its fields, as text.
type Captured = (tracing::Level, HashMap<String, String>);

/// Collects the events emitted while it is the default subscriber.
#[derive(Clone, Default)]
struct Capture {
    events: Arc<Mutex<Vec<Captured>>>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        self.events.lock().unwrap().push((*event.metadata().level(), fields));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn guest_logs_are_reemitted_as_tracing_events() {
    let capture = Capture::default();
    let _default = tracing::subscriber::set_default(capture.clone());
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid().to_string();

    let _: u8 = checkout.call("log", &1u8).await.unwrap();

    let events = capture.events.lock().unwrap();
    let guest: Vec<_> = events.iter().filter(|(_, f)| f.contains_key("at_us")).collect();
    assert_eq!(guest.len(), 2, "{events:?}");
    let (level, fields) = guest[0];
    assert_eq!(*level, tracing::Level::WARN);
    for (name, value) in [
        ("message", "cache cold"),
        ("worker.pid", pid.as_str()),
        ("module", "echo"),
        ("method", "log"),
        ("target", "guest::db"),
        ("at_us", "7"),
    ] {
        assert_eq!(fields.get(name).map(String::as_str), Some(value), "{name} in {fields:?}");
    }
    assert_eq!(guest[1].0, tracing::Level::DEBUG);
    assert_eq!(guest[1].1["target"], "stdout");
}
