//! Calls queued on one checkout, and aborted checkouts.

use std::time::Duration;

use serde::Deserialize;
use wasm_task::Error;

use crate::harness::{Daemon, alive, eventually};

#[derive(Debug, Deserialize)]
struct Stats {
    calls: u64,
}

#[tokio::test]
async fn queued_calls_run_in_order_and_those_behind_a_failure_fail_at_once() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    // Issued together, run one at a time in the order made.
    let (a, b, c) = tokio::join!(
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
    );
    assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (1, 2, 3));

    let (slow, failed, skipped, also_skipped) = tokio::join!(
        worker.call::<u64>("sleep_ms", &50u64),
        worker.call::<()>("fail", &"bad input"),
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("echo", &7u64),
    );
    assert_eq!(slow.unwrap(), 50);
    assert!(matches!(&failed, Err(Error::GuestError { message, .. }) if message == "bad input"));
    for err in [skipped.unwrap_err(), also_skipped.unwrap_err()] {
        let Error::EarlierCallFailed { earlier_method, earlier, .. } = &err else {
            panic!("expected a skipped call, got {err:?}");
        };
        assert_eq!(earlier_method, "fail");
        assert!(matches!(&**earlier, Error::GuestError { message, .. } if message == "bad input"));
        assert!(err.to_string().contains("earlier call of method fail failed"), "{err}");
    }

    // Calls made after the failure run on the same worker; the skipped ones
    // never reached it (the counter did not move, the call count shows 5).
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 4);
    let stats: Stats = worker.call("stats", &()).await.unwrap();
    assert_eq!(stats.calls, 7);
}

#[tokio::test]
async fn calls_made_while_one_runs_are_on_their_way_before_it_ends() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    let (slow, queued) = tokio::join!(
        worker.call_report::<u64>("sleep_ms", &400u64),
        worker.call_report::<u64>("echo", &7u64),
    );
    assert_eq!((slow.result.unwrap(), queued.result.unwrap()), (400, 7));
    // Sent while the guest slept, the echo's reply came only after the
    // sleep: its round trip spans most of it. Sent after, it would be well
    // under a millisecond.
    let round_trip = queued.timings.round_trip;
    assert!(round_trip >= Duration::from_millis(200), "round trip {round_trip:?}");
}

#[tokio::test]
async fn aborted_checkout_ends_its_call_kills_its_worker_and_fails_every_later_call() {
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(0)
        .max_workers(1)
        .timeout(Some(Duration::from_secs(60)))
        .build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();

    let ((in_flight, queued), ()) = tokio::join!(
        async {
            tokio::join!(
                worker.call::<u64>("sleep_ms", &600_000u64),
                worker.call::<u64>("incr", &()),
            )
        },
        async {
            eventually("the guest sleeps", || {
                daemon.log_text().contains("calling method=\"sleep_ms\"")
            })
            .await;
            worker.abort();
        },
    );
    for err in [in_flight.unwrap_err(), queued.unwrap_err()] {
        assert!(matches!(err, Error::Aborted { pid: p } if p == pid), "{err:?}");
    }
    eventually("the aborted worker's process is gone", || !alive(pid)).await;

    // Later calls fail the same way without reaching any worker.
    let connections = daemon.log_count("client connected");
    let later = worker.call::<u64>("incr", &()).await.unwrap_err();
    assert_eq!(later.to_string(), format!("checkout of worker {pid} was aborted"));
    assert_eq!(daemon.log_count("client connected"), connections);

    // The place was given back at once: the only slot serves a new checkout
    // while the aborted one is still held.
    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 1);
    assert_eq!(client.status().retired.aborted, 1);
    drop(worker);
}
