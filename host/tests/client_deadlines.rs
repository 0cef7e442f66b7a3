//! Attacks on a checkout's deadline and abort handling (the deadline timer
//! kept in the seat, and the turn wait that sets a timer only when it has to
//! wait): calls waiting behind calls left unpolled, dropped or aborted,
//! deadlines at turn handovers, several tasks and threads on one checkout,
//! and what becomes of the worker and the pool's capacity afterwards.

mod client_fake;

use std::sync::Arc;
use std::time::Duration;

use client_fake::{FakeDaemon, Options, started, wait_until};
use futures_util::FutureExt;
use wasm_task::client::{Phase, Status};
use wasm_task::{Checkout, Client, Error};

/// A bound on any wait of these tests: a hang shows as a failure.
const BOUND: Duration = Duration::from_secs(7200);

fn calls_seen(daemon: &FakeDaemon, pid: u32) -> Vec<String> {
    daemon.events_of(pid).into_iter().filter(|e| e.starts_with("call ")).collect()
}

fn is_timeout<T: std::fmt::Debug>(result: &Result<T, Error>) -> bool {
    matches!(result, Err(Error::Timeout { phase: Phase::Calling { .. }, .. }))
}

/// A fake daemon, a client of one worker with `timeout` per checkout, and
/// a checkout of that worker.
async fn one_worker(timeout: Duration) -> (FakeDaemon, Client, Checkout) {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(timeout)).build();
    let checkout = client.checkout().await.unwrap();
    (daemon, client, checkout)
}

/// Ends `checkout` (a checkout of worker `pid`, or the last handle to one)
/// and takes the next one, which must get another worker (that one was
/// closed, not reused); the status then.
async fn replaced(client: &Client, checkout: impl Sized, pid: u32) -> Status {
    drop(checkout);
    let next = bounded("next checkout", client.checkout()).await.unwrap();
    assert_ne!(next.worker_pid(), pid, "the closed worker was reused");
    client.status()
}

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(BOUND, future).await.unwrap_or_else(|_| panic!("hung: {what}"))
}

#[tokio::test(start_paused = true)]
async fn every_pipelined_call_times_out_and_the_worker_is_not_reused() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();
    let start = tokio::time::Instant::now();

    let on = &checkout;
    let mut calls = vec![on.call::<u32>("slow", &0u32).boxed_local()];
    calls.extend((1..40u32).map(|i| async move { on.call::<u32>("echo", &i).await }.boxed_local()));
    let results = bounded("pipelined calls", futures_util::future::join_all(calls)).await;
    for (i, result) in results.iter().enumerate() {
        assert!(is_timeout(result), "call {i}: {result:?}");
    }
    assert!(start.elapsed() >= Duration::from_secs(5));
    assert!(start.elapsed() < Duration::from_secs(6), "{:?}", start.elapsed());
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    drop(checkout);

    let next = bounded("next checkout", client.checkout()).await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    let status = client.status();
    assert_eq!(status.retired.timeout, 1, "{status:?}");
    assert_eq!(status.retired.aborted, 0, "{status:?}");
    assert_eq!((status.calls, status.failed_calls), (40, 40), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn holder_left_unpolled_past_the_deadline_times_out_when_polled_again() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();

    let holder = started(checkout.call::<()>("slow", &()));
    wait_until("the slow call reached the worker", || calls_seen(&daemon, pid).len() == 1).await;

    let queued = bounded("queued call", checkout.call::<u8>("echo", &1u8)).await;
    assert!(is_timeout(&queued), "{queued:?}");
    tokio::time::sleep(Duration::from_secs(10)).await;

    let late = bounded("holder polled late", holder).await;
    assert!(is_timeout(&late), "{late:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    let again = checkout.call::<u8>("echo", &2u8).await;
    assert!(is_timeout(&again), "{again:?}");
    drop(checkout);

    let next = bounded("next checkout", client.checkout()).await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(client.status().retired.timeout, 1, "{:?}", client.status());
    assert_eq!(calls_seen(&daemon, pid), ["call slow"]);
}

#[tokio::test(start_paused = true)]
async fn calls_queued_behind_a_dropped_holder_end_before_the_deadline_passes() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();

    let holder = started(checkout.call::<()>("slow", &()));
    let queued = started(checkout.call::<u8>("echo", &1u8));
    wait_until("the slow call reached the worker", || calls_seen(&daemon, pid).len() == 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(holder);

    let start = tokio::time::Instant::now();
    let err = bounded("queued call", queued).await.unwrap_err();
    assert!(matches!(err, Error::WorkerClosed { .. }), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "it waited for the deadline");
    wait_until("the worker is closed", || daemon.closed(pid)).await;

    // Past the deadline now: calls time out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let late = checkout.call::<u8>("echo", &2u8).await;
    assert!(is_timeout(&late), "{late:?}");
    let status = replaced(&client, checkout, pid).await;
    assert_eq!((status.retired.aborted, status.retired.timeout), (1, 0), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_call_sent_ahead_then_the_deadline_closes_the_worker_once() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();

    let mut slow = started(checkout.call::<()>("slow", &()));
    let ahead = started(checkout.call::<u8>("echo", &1u8));
    let sent_ahead = wait_until("the echo was sent ahead", || {
        daemon.events_of(pid).contains(&"request while busy".into())
    });
    tokio::select! {
        _ = &mut slow => panic!("the slow call ended first"),
        () = sent_ahead => {}
    }
    drop(ahead);
    let behind = started(checkout.call::<u8>("echo", &2u8));

    let (slow, behind) = bounded("both calls", async { tokio::join!(slow, behind) }).await;
    assert!(is_timeout(&slow), "{slow:?}");
    assert!(is_timeout(&behind), "{behind:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    let status = replaced(&client, checkout, pid).await;
    assert_eq!(status.retired.timeout + status.retired.aborted, 1, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn abort_while_the_holder_is_unpolled_ends_queued_calls_before_the_deadline() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(60))).build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let pid = checkout.worker_pid();

    let holder = started(checkout.call::<()>("slow", &()));
    wait_until("the slow call reached the worker", || calls_seen(&daemon, pid).len() == 1).await;
    let queued = tokio::spawn({
        let checkout = checkout.clone();
        async move { checkout.call::<u8>("echo", &1u8).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = tokio::time::Instant::now();
    checkout.abort();
    let queued = bounded("queued call", queued).await.unwrap();
    assert!(matches!(queued, Err(Error::Aborted { .. })), "{queued:?}");
    assert!(start.elapsed() < Duration::from_secs(1), "{:?}", start.elapsed());

    let holder = bounded("holder", holder).await;
    assert!(matches!(holder, Err(Error::Aborted { .. })), "{holder:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    let status = replaced(&client, checkout, pid).await;
    assert_eq!((status.retired.aborted, status.retired.timeout), (1, 0), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn abort_at_the_deadline_ends_every_call_and_closes_the_worker_once() {
    for offset_ms in [0u64, 1] {
        let daemon = FakeDaemon::running(Options::default());
        let timeout = Duration::from_secs(5);
        let client = daemon.client().max_workers(1).timeout(Some(timeout)).build();
        let checkout = Arc::new(client.checkout().await.unwrap());
        let pid = checkout.worker_pid();
        let deadline = checkout.deadline().unwrap();

        let aborter = tokio::spawn({
            let checkout = checkout.clone();
            async move {
                tokio::time::sleep_until(deadline - Duration::from_millis(offset_ms)).await;
                checkout.abort();
            }
        });
        let on = &*checkout;
        let calls = (0..5u32).map(|i| {
            let method = if i == 0 { "slow" } else { "echo" };
            async move { on.call::<u32>(method, &i).await }
        });
        let results = bounded("calls", futures_util::future::join_all(calls)).await;
        for result in &results {
            assert!(
                is_timeout(result) || matches!(result, Err(Error::Aborted { .. })),
                "offset {offset_ms}: {result:?}"
            );
        }
        aborter.await.unwrap();
        wait_until("the worker is closed", || daemon.closed(pid)).await;
        let later = checkout.call::<u8>("echo", &9u8).await;
        assert!(matches!(later, Err(Error::Aborted { .. })), "{later:?}");
        let status = replaced(&client, checkout, pid).await;
        assert_eq!(status.retired.aborted + status.retired.timeout, 1, "{status:?}");
        assert_eq!(status.workers(), 1, "{status:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_reply_due_at_the_deadline_hands_the_turn_to_a_call_that_times_out() {
    // `slow` answers 3600 s after it arrives; the checkout's deadline is at
    // the same virtual instant (nothing else advances the paused clock).
    let (daemon, client, checkout) = one_worker(Duration::from_secs(3600)).await;
    let pid = checkout.worker_pid();

    let (first, second) = bounded("both calls", async {
        tokio::join!(checkout.call::<u8>("slow", &1u8), checkout.call::<u8>("echo", &2u8))
    })
    .await;
    assert!(first.is_ok() || is_timeout(&first), "{first:?}");
    assert!(is_timeout(&second), "{second:?}");
    drop(checkout);
    let next = bounded("next checkout", client.checkout()).await.unwrap();
    assert_ne!(next.worker_pid(), pid, "a worker whose checkout timed out was reused");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    assert_eq!(client.status().retired.timeout, 1, "{:?}", client.status());
}

#[tokio::test(start_paused = true)]
async fn a_later_call_from_another_task_is_interrupted_by_the_kept_timer() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(5))).build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let pid = checkout.worker_pid();
    let start = tokio::time::Instant::now();

    // The first call sets the timer while it waits for its reply, in a task
    // that then ends.
    let first = tokio::spawn({
        let checkout = checkout.clone();
        async move { checkout.call::<u8>("echo", &1u8).await }
    });
    assert_eq!(first.await.unwrap().unwrap(), 1);
    let second = tokio::spawn({
        let checkout = checkout.clone();
        async move { checkout.call::<()>("slow", &()).await }
    });
    let second = bounded("the second call", second).await.unwrap();
    assert!(is_timeout(&second), "{second:?}");
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(6), "{elapsed:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    assert_eq!(client.status().retired.timeout, 1);
}

#[tokio::test(start_paused = true)]
async fn checkout_without_a_timeout_keeps_queued_calls_waiting_for_hours() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(None).build();
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    assert!(checkout.deadline().is_none());

    let (slow, echo) = bounded("calls", async {
        tokio::join!(checkout.call::<u8>("slow", &1u8), checkout.call::<u8>("echo", &2u8))
    })
    .await;
    assert_eq!((slow.unwrap(), echo.unwrap()), (1, 2));
    // Much later, still fine; then an abort ends a call in flight and one queued.
    tokio::time::sleep(Duration::from_secs(100_000)).await;
    let mut in_flight = Box::pin(checkout.call::<()>("slow", &()));
    let mut queued = Box::pin(checkout.call::<u8>("echo", &3u8));
    assert!(in_flight.as_mut().now_or_never().is_none());
    assert!(queued.as_mut().now_or_never().is_none());
    tokio::time::sleep(Duration::from_secs(10)).await;
    checkout.abort();
    let (in_flight, queued) =
        bounded("aborted calls", async { tokio::join!(in_flight, queued) }).await;
    assert!(matches!(in_flight, Err(Error::Aborted { .. })), "{in_flight:?}");
    assert!(matches!(queued, Err(Error::Aborted { .. })), "{queued:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    drop(checkout);
    let status = client.status();
    assert_eq!((status.retired.aborted, status.retired.timeout), (1, 0), "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_call_made_after_the_deadline_closes_the_idle_worker_at_once() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();
    assert_eq!(checkout.call::<u8>("echo", &1u8).await.unwrap(), 1);

    tokio::time::sleep(Duration::from_secs(6)).await;
    let late = checkout.call::<u8>("echo", &2u8).await;
    assert!(is_timeout(&late), "{late:?}");
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    // The slot is free while the timed-out checkout is still held.
    let next = bounded("next checkout", client.checkout()).await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    drop(checkout);
    let status = client.status();
    assert_eq!(status.retired.timeout, 1, "{status:?}");
    assert_eq!(calls_seen(&daemon, pid), ["call echo"]);
}

#[tokio::test(start_paused = true)]
async fn deadline_passing_between_calls_then_drop_reuses_the_worker_only_if_no_call_timed_out() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(5))).build();

    // No call after the deadline: the worker did nothing wrong.
    let checkout = client.checkout().await.unwrap();
    let pid = checkout.worker_pid();
    assert_eq!(checkout.call::<u8>("echo", &1u8).await.unwrap(), 1);
    tokio::time::sleep(Duration::from_secs(6)).await;
    drop(checkout);
    let again = bounded("second checkout", client.checkout()).await.unwrap();
    assert_eq!(again.worker_pid(), pid);
    // Its fresh deadline holds: the kept timer of the last checkout is gone.
    let start = tokio::time::Instant::now();
    assert_eq!(again.call::<u8>("echo", &2u8).await.unwrap(), 2);
    let slow = bounded("slow call", again.call::<()>("slow", &())).await;
    assert!(is_timeout(&slow), "{slow:?}");
    assert!(start.elapsed() >= Duration::from_secs(5), "{:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn queued_calls_left_unpolled_time_out_when_polled_and_the_holder_times_out() {
    let (daemon, client, checkout) = one_worker(Duration::from_secs(5)).await;
    let pid = checkout.worker_pid();

    let holder = started(checkout.call::<()>("slow", &()));
    const VALUES: [u8; 5] = [0, 1, 2, 3, 4];
    let mut parked: Vec<_> =
        VALUES.iter().map(|i| Box::pin(checkout.call::<u8>("echo", i))).collect();
    for call in &mut parked {
        assert!(call.as_mut().now_or_never().is_none());
    }
    let holder = bounded("holder", holder).await;
    assert!(is_timeout(&holder), "{holder:?}");
    for call in parked {
        let result = bounded("parked call", call).await;
        assert!(is_timeout(&result), "{result:?}");
    }
    wait_until("the worker is closed", || daemon.closed(pid)).await;
    drop(checkout);
    let status = client.status();
    assert_eq!((status.retired.timeout, status.retired.aborted), (1, 0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_on_two_threads_sharing_a_checkout_all_stop_at_the_deadline() {
    for round in 0..5 {
        let daemon = FakeDaemon::running(Options::default());
        let timeout = Duration::from_millis(300);
        let client = daemon.client().max_workers(1).timeout(Some(timeout)).build();
        let checkout = Arc::new(client.checkout().await.unwrap());
        let pid = checkout.worker_pid();
        let deadline = checkout.deadline().unwrap();

        let tasks: Vec<_> = (0..6u32)
            .map(|t| {
                let checkout = checkout.clone();
                tokio::spawn(async move {
                    let mut ok = 0u32;
                    for i in 0.. {
                        let method = if t == 0 && i == 50 { "slow" } else { "echo" };
                        match checkout.call::<u32>(method, &i).await {
                            Ok(got) => {
                                assert_eq!(got, i);
                                ok += 1;
                            }
                            Err(Error::Timeout { .. }) => {
                                assert!(tokio::time::Instant::now() >= deadline);
                                return ok;
                            }
                            Err(other) => panic!("round {round} task {t}: {other:?}"),
                        }
                    }
                    unreachable!()
                })
            })
            .collect();
        for task in tasks {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a task never stopped"))
                .unwrap();
        }
        drop(checkout);
        let next = tokio::time::timeout(Duration::from_secs(20), client.checkout())
            .await
            .expect("capacity leaked")
            .unwrap();
        assert_ne!(next.worker_pid(), pid, "round {round}");
        let status = client.status();
        assert_eq!(status.retired.timeout, 1, "round {round}: {status:?}");
        assert_eq!(status.retired.aborted, 0, "round {round}: {status:?}");
        assert_eq!(status.workers(), 1, "round {round}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_racing_abort_and_deadline_leak_nothing() {
    for round in 0..10u64 {
        let daemon = FakeDaemon::running(Options::default());
        let client =
            daemon.client().max_workers(1).timeout(Some(Duration::from_millis(200))).build();
        let checkout = Arc::new(client.checkout().await.unwrap());
        let pid = checkout.worker_pid();
        let deadline = checkout.deadline().unwrap();

        let callers: Vec<_> = (0..4u32)
            .map(|t| {
                let checkout = checkout.clone();
                tokio::spawn(async move {
                    for i in 0.. {
                        match checkout.call::<u32>("echo", &(t * 1000 + i)).await {
                            Ok(_) => {}
                            Err(Error::Timeout { .. } | Error::Aborted { .. }) => return,
                            Err(other) => panic!("round {round}: {other:?}"),
                        }
                    }
                })
            })
            .collect();
        let aborter = tokio::spawn({
            let checkout = checkout.clone();
            async move {
                // Around the deadline, a little before or after.
                let at = deadline + Duration::from_millis(round % 5) - Duration::from_millis(2);
                tokio::time::sleep_until(at).await;
                checkout.abort();
            }
        });
        for caller in callers {
            tokio::time::timeout(Duration::from_secs(20), caller)
                .await
                .unwrap_or_else(|_| panic!("round {round}: a caller never stopped"))
                .unwrap();
        }
        aborter.await.unwrap();
        drop(checkout);
        let next = tokio::time::timeout(Duration::from_secs(20), client.checkout())
            .await
            .expect("capacity leaked")
            .unwrap();
        assert_ne!(next.worker_pid(), pid, "round {round}");
        let status = client.status();
        assert_eq!(status.retired.aborted + status.retired.timeout, 1, "round {round}: {status:?}");
        assert_eq!(status.workers(), 1, "round {round}: {status:?}");
    }
}

/// A call made from another runtime (a short-lived one, as a blocking
/// wrapper might make) leaves the checkout's deadline timer on that runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_from_another_runtime_does_not_break_the_deadline_of_later_calls() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(3))).build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let pid = checkout.worker_pid();

    let first = std::thread::spawn({
        let checkout = checkout.clone();
        move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(echo_many(&checkout))
        }
    })
    .join()
    .unwrap();
    first.unwrap();
    slow_call_times_out(&checkout, &daemon, pid).await;
}

/// A slow call made now, on the test's runtime, ends at the checkout's
/// deadline (3 s) and its worker is closed.
async fn slow_call_times_out(checkout: &Arc<wasm_task::Checkout>, daemon: &FakeDaemon, pid: u32) {
    let second = tokio::spawn({
        let checkout = checkout.clone();
        async move { checkout.call::<()>("slow", &()).await }
    });
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the slow call outlived its 3 s deadline by 7 s");
    match second {
        Ok(result) => assert!(is_timeout(&result), "{result:?}"),
        Err(join) => panic!("the call panicked: {join}"),
    }
    wait_until_real("the worker is closed", || daemon.closed(pid)).await;
}

async fn wait_until_real(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("gave up waiting until {what}");
}

/// Like the one above, but the other runtime stays alive, idle: nothing
/// drives its timers any more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_made_from_an_idle_runtime_does_not_disarm_the_deadline_of_later_calls() {
    let daemon = FakeDaemon::running(Options::default());
    let client = daemon.client().max_workers(1).timeout(Some(Duration::from_secs(3))).build();
    let checkout = Arc::new(client.checkout().await.unwrap());
    let pid = checkout.worker_pid();

    let other = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let first = std::thread::scope(|scope| {
        scope.spawn(|| other.block_on(echo_many(&checkout))).join().unwrap()
    });
    first.unwrap();
    slow_call_times_out(&checkout, &daemon, pid).await;
    std::thread::spawn(move || drop(other)).join().unwrap();
}

/// Calls `echo` many times: at least one of them surely waits for its reply
/// (the one that sets the checkout's deadline timer), however fast the fake
/// daemon answers.
async fn echo_many(checkout: &wasm_task::Checkout) -> Result<(), Error> {
    for i in 0..100u32 {
        assert_eq!(checkout.call::<u32>("echo", &i).await?, i);
    }
    Ok(())
}
