//! Calls through a checkout: payloads, guest state, and every error kind.

use serde::{Deserialize, Serialize};
use wasm_task::Error;

use crate::harness::{Daemon, RawWorker, alive, eventually};
use wasm_task::protocol::ErrorKind;

#[derive(Serialize)]
struct AddArgs<'a> {
    a: i64,
    b: i64,
    label: &'a str,
}

#[derive(Debug, Deserialize, PartialEq)]
struct AddResult {
    sum: i64,
    label: String,
}

#[derive(Debug, Deserialize)]
struct Stats {
    setup_calls: u64,
    checkout_done_calls: u64,
    calls: u64,
}

#[tokio::test]
async fn structured_args_and_results_round_trip() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    let got: AddResult =
        worker.call("add", &AddArgs { a: 40, b: 2, label: "answer" }).await.unwrap();
    assert_eq!(got, AddResult { sum: 42, label: "ANSWER".into() });

    let nested =
        (vec![1u8, 2, 3], Some("x".to_string()), std::collections::BTreeMap::from([("k", 1.5)]));
    let echoed: (Vec<u8>, Option<String>, std::collections::BTreeMap<String, f64>) =
        worker.call("echo", &nested).await.unwrap();
    assert_eq!(echoed.0, nested.0);
    assert_eq!(echoed.1, nested.1);
    assert_eq!(echoed.2["k"], 1.5);
}

#[tokio::test]
async fn hand_written_wat_guest_echoes_payloads() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("echo").build();
    let worker = client.checkout().await.unwrap();
    let big = "x".repeat(100_000);
    let got: (String, u32) = worker.call("echo", &(big.clone(), 7u32)).await.unwrap();
    assert_eq!(got, (big, 7));
    let err = worker.call::<()>("nope", &()).await.unwrap_err();
    assert!(matches!(err, Error::UnknownMethod { .. }), "{err:?}");
}

#[tokio::test]
async fn guest_state_persists_across_calls_and_checkouts() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(1).max_workers(1).build();

    let first = client.checkout().await.unwrap();
    assert_eq!(first.call::<u64>("incr", &()).await.unwrap(), 1);
    assert_eq!(first.call::<u64>("incr", &()).await.unwrap(), 2);
    let pid = first.worker_pid();
    drop(first);

    let second = client.checkout().await.unwrap();
    assert_eq!(second.worker_pid(), pid, "max_workers 1 must reuse the same worker");
    assert_eq!(second.call::<u64>("incr", &()).await.unwrap(), 3);
}

#[tokio::test]
async fn setup_runs_once_per_worker_and_checkout_done_on_every_release() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(0).max_workers(1).build();

    for _ in 0..5 {
        let worker = client.checkout().await.unwrap();
        worker.call::<u64>("incr", &()).await.unwrap();
    }
    let worker = client.checkout().await.unwrap();
    let stats: Stats = worker.call("stats", &()).await.unwrap();
    assert_eq!(stats.setup_calls, 1);
    assert_eq!(stats.checkout_done_calls, 5, "one hook run per released checkout");
    assert_eq!(stats.calls, 6);
}

#[tokio::test]
async fn guest_error_is_its_own_kind_and_keeps_the_worker() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();

    let err = worker.call::<()>("fail", &"no such user").await.unwrap_err();
    match &err {
        Error::GuestError { message, .. } => assert_eq!(message, "no such user"),
        other => panic!("expected a guest error, got {other:?}"),
    }
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1, "worker still serves");
}

#[tokio::test]
async fn guest_panic_is_a_trap_with_its_message_and_the_worker_is_replaced() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(1).max_workers(1).build();

    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let err = worker.call::<()>("panic", &"the sky fell").await.unwrap_err();
    match &err {
        Error::GuestTrap { message, .. } => assert!(message.contains("the sky fell"), "{message}"),
        other => panic!("expected a guest trap, got {other:?}"),
    }
    drop(worker);
    eventually("the trapped worker exits", || !alive(pid)).await;

    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 1);
}

#[tokio::test]
async fn unknown_method_is_its_own_kind() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();
    let err = worker.call::<()>("no_such_method", &()).await.unwrap_err();
    assert!(matches!(err, Error::UnknownMethod { .. }), "{err:?}");
    assert!(err.to_string().contains("no_such_method"), "{err}");
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
}

#[tokio::test]
async fn unknown_module_is_its_own_kind() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("no-such-module").min_workers(0).build();
    let err = client.checkout().await.unwrap_err();
    assert!(matches!(err, Error::UnknownModule { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-module"), "{err}");
}

#[derive(Serialize)]
struct Verify<'a> {
    password: &'a str,
    hash: &'a str,
}

#[tokio::test]
async fn hasher_example_hashes_and_verifies_passwords() {
    let hasher = crate::harness::guests().hasher.display().to_string();
    let daemon = Daemon::start_with(&[format!("--module=hasher={hasher}")]);
    let client = daemon.client("hasher").build();
    let worker = client.checkout().await.unwrap();

    let hash: String = worker.call("hash", &"hunter2").await.unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let again: String = worker.call("hash", &"hunter2").await.unwrap();
    assert_ne!(hash, again, "every hash gets a fresh salt");

    let ok: bool =
        worker.call("verify", &Verify { password: "hunter2", hash: &hash }).await.unwrap();
    assert!(ok);
    let wrong: bool =
        worker.call("verify", &Verify { password: "hunter3", hash: &hash }).await.unwrap();
    assert!(!wrong);
    let err = worker.call::<bool>("verify", &Verify { password: "x", hash: "not a hash" }).await;
    assert!(matches!(err, Err(Error::GuestError { .. })), "{err:?}");
}

#[test]
fn calls_sent_ahead_are_skipped_after_a_failure_they_depend_on() {
    let daemon = Daemon::start(&[]);
    let mut worker = RawWorker::connect(&daemon, "testguest");
    let decode = |bytes: &[u8]| rmp_serde::from_slice::<u64>(bytes).unwrap();

    // Sent together, as a client sends calls ahead: those behind the first
    // run only if no call from the first on has failed.
    let first = worker.send("incr", &(), None, None).unwrap();
    worker.send("fail", &"bad input", None, Some(first)).unwrap();
    worker.send("incr", &(), None, Some(first)).unwrap();
    assert_eq!(decode(&worker.receive().unwrap().result.unwrap()), 1);
    let failed = worker.receive().unwrap().result.unwrap_err();
    assert_eq!((failed.kind, failed.message.as_str()), (ErrorKind::GuestError, "bad input"));
    let skipped = worker.receive().unwrap();
    let error = skipped.result.unwrap_err();
    assert_eq!(error.kind, ErrorKind::Skipped, "{error:?}");
    assert!(error.message.contains(&format!("call {}", first + 1)), "{}", error.message);

    // A call sent after the failure was seen depends only on calls after it,
    // and the skipped one did not run.
    let after = worker.send("incr", &(), None, Some(skipped.id)).unwrap();
    let reply = worker.receive().unwrap();
    assert_eq!((reply.id, decode(&reply.result.unwrap())), (after, 2));
}

#[test]
fn call_stats_tell_cpu_time_from_wall_time() {
    let daemon = Daemon::start(&[]);
    let mut worker = RawWorker::connect(&daemon, "testguest");
    let slept = worker.call("sleep_ms", &50u64, None).unwrap();
    assert!(slept.result.is_ok(), "{:?}", slept.result);
    // A short call: the CPU clock is not read for it, its wall time bounds it.
    let short = worker.call("incr", &(), None).unwrap();
    assert!(short.result.is_ok(), "{:?}", short.result);
    // Spins until its deadline interrupts it; the reply still has its stats.
    let spun = worker.call("spin", &(), Some(50)).unwrap();
    assert_eq!(spun.result.unwrap_err().kind, ErrorKind::Timeout);

    let (slept, spun, short) = (slept.stats, spun.stats, short.stats);
    assert!(slept.wall_us >= 50_000 && spun.wall_us >= 50_000, "{slept:?} {spun:?}");
    assert!(slept.cpu_us < 10_000, "sleeping used next to no CPU: {slept:?}");
    assert!(spun.cpu_us > slept.cpu_us, "spinning used more CPU than sleeping: {slept:?} {spun:?}");
    for stats in [slept, spun, short] {
        assert!(stats.cpu_us <= stats.wall_us, "one thread's CPU within its wall time: {stats:?}");
    }
}
