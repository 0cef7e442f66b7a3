//! Calls queued on one checkout, and aborted checkouts.

use std::sync::Arc;
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

/// Spends the task's scheduling budget, so that its next waits on tokio
/// resources return at once without making progress.
async fn spend_budget() {
    tokio::task::yield_now().await;
    let semaphore = tokio::sync::Semaphore::new(1);
    for _ in 0..128 {
        drop(semaphore.acquire().await.unwrap());
    }
}

#[tokio::test(flavor = "current_thread")]
async fn calls_take_turns_in_the_order_made_whatever_order_they_ask_in() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = Arc::new(client.checkout().await.unwrap());

    // Out of budget, `join!` polls its calls again starting from another
    // one, so they ask for the worker in another order than they were made.
    spend_budget().await;
    let (a, b, c) = tokio::join!(
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
    );
    assert_eq!((a.unwrap(), b.unwrap(), c.unwrap()), (1, 2, 3));

    // The same while another task's call holds the worker, so that the
    // three are sent ahead and must read their replies in the order sent.
    let holder = tokio::spawn({
        let worker = worker.clone();
        async move { worker.call::<u64>("sleep_ms", &100u64).await }
    });
    tokio::task::yield_now().await;
    spend_budget().await;
    let (d, e, f) = tokio::join!(
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
        worker.call::<u64>("incr", &()),
    );
    assert_eq!(holder.await.unwrap().unwrap(), 100);
    assert_eq!((d.unwrap(), e.unwrap(), f.unwrap()), (4, 5, 6));
    assert_eq!(client.status().retired.aborted, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_from_several_threads_on_one_checkout_all_run() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").max_workers(1).build();
    for _ in 0..100 {
        let worker = Arc::new(client.checkout().await.unwrap());
        let calls: Vec<_> = (0..8u64)
            .map(|i| {
                let worker = worker.clone();
                tokio::spawn(async move { (i, worker.call::<u64>("echo", &i).await) })
            })
            .collect();
        for call in calls {
            let (i, echoed) = call.await.unwrap();
            assert_eq!(echoed.unwrap(), i);
        }
    }
    assert_eq!(client.status().retired.aborted, 0);
}

#[tokio::test(flavor = "current_thread")]
async fn replies_already_sent_are_read_after_the_worker_exits() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    // More calls than the pipeline holds, sent ahead behind a sleep; the
    // third traps. While the client's thread is held up, the worker answers
    // the first three and exits: sending the rest then fails, but the
    // replies in the socket still reach their calls.
    let calls = futures_util::future::join_all((0..100).map(|i| {
        let worker = &worker;
        async move {
            match i {
                0 => worker.call::<u64>("sleep_ms", &100u64).await,
                2 => worker.call::<u64>("panic", &"boom").await,
                _ => worker.call::<u64>("incr", &()).await,
            }
        }
    }));
    let hold_up = async {
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_millis(400));
    };
    let (results, ()) = tokio::join!(calls, hold_up);
    assert_eq!(*results[0].as_ref().unwrap(), 100);
    assert_eq!(*results[1].as_ref().unwrap(), 1, "the call before the trap ran");
    assert!(matches!(&results[2], Err(Error::GuestTrap { .. })), "{:?}", results[2]);
    for later in &results[3..] {
        let Err(Error::EarlierCallFailed { earlier, .. }) = later else {
            panic!("expected the trap to be named, got {later:?}");
        };
        assert!(matches!(**earlier, Error::GuestTrap { .. }), "{earlier:?}");
    }
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
