//! Limits and settings per module (memory, fuel, stack, output, files,
//! environment, arguments, determinism) and the daemon-wide bounds (hung
//! workers, worker count, frame size), each set from the command line.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasm_task::Error;

use crate::harness::{
    Daemon, READY_BOUND, RawWorker, alive, children, eventually, fd_count, hostile_wat, wat_guest,
};

/// A daemon serving `modules` (name and path) with `extra` arguments.
fn daemon(modules: &[(&str, PathBuf)], extra: &[&str]) -> Daemon {
    let mut args: Vec<String> =
        modules.iter().map(|(name, path)| format!("--module={name}={}", path.display())).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(&args)
}

/// The error a fresh worker of `module` gives for `method`.
async fn call_error(
    daemon: &Daemon,
    module: &str,
    method: &str,
    args: impl serde::Serialize,
) -> Error {
    let client = daemon.client(module).min_workers(0).timeout(Some(READY_BOUND)).build();
    let worker = client.checkout().await.unwrap();
    worker.call::<serde::de::IgnoredAny>(method, &args).await.unwrap_err()
}

fn limit_message(err: Error) -> String {
    match err {
        Error::Limit { message, .. } => message,
        other => panic!("expected a limit error, got {other:?}"),
    }
}

#[tokio::test]
async fn memory_limit_is_set_for_all_modules_and_per_module() {
    let memory = hostile_wat("memory");
    let daemon = daemon(
        &[("small", memory.clone()), ("big", memory)],
        &["--limit=small:memory=1MiB", "--limit=memory=8MiB"],
    );
    let small = limit_message(call_error(&daemon, "small", "grow_until_refused", ()).await);
    assert!(small.contains("limit of 1024 KiB"), "{small}");
    let big = limit_message(call_error(&daemon, "big", "grow_until_refused", ()).await);
    assert!(big.contains("limit of 8192 KiB"), "{big}");
}

#[tokio::test]
async fn max_memory_mib_sets_the_default_that_a_module_limit_overrides() {
    let memory = hostile_wat("memory");
    let daemon = daemon(
        &[("a", memory.clone()), ("b", memory)],
        &["--max-memory-mib=2", "--limit=b:memory=3MiB"],
    );
    let a = limit_message(call_error(&daemon, "a", "grow_until_refused", ()).await);
    assert!(a.contains("limit of 2048 KiB"), "{a}");
    let b = limit_message(call_error(&daemon, "b", "grow_until_refused", ()).await);
    assert!(b.contains("limit of 3072 KiB"), "{b}");
}

#[tokio::test]
async fn fuel_budget_stops_a_spinning_call_with_a_fuel_limit_error() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--limit=spin:fuel=2_000_000"]);
    // No deadline at all: only the fuel can stop it.
    let client = daemon.client("spin").min_workers(0).timeout(None).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let message = limit_message(worker.call::<()>("spin", &()).await.unwrap_err());
    assert!(message.contains("fuel") && message.contains("2000000"), "{message}");
    drop(worker);
    eventually("the worker out of fuel is gone", || !alive(pid)).await;
}

#[tokio::test]
async fn fuel_consumed_is_reported_with_each_result_when_metered() {
    let spin = hostile_wat("spin");
    let daemon =
        daemon(&[("metered", spin.clone()), ("free", spin)], &["--limit=metered:fuel=1000000"]);
    let mut metered = RawWorker::connect(&daemon, "metered");
    let first = metered.call("ok", &(), None).unwrap();
    let used = first.stats.fuel.expect("fuel is reported");
    assert!(used > 0 && used < 1_000_000, "used {used}");
    // Each call has its own budget: the second costs what the first did.
    let second = metered.call("ok", &(), None).unwrap();
    assert_eq!(second.stats.fuel, Some(used));

    let mut free = RawWorker::connect(&daemon, "free");
    assert_eq!(free.call("ok", &(), None).unwrap().stats.fuel, None);
}

#[tokio::test]
async fn stack_limit_is_set_per_module() {
    let recursion = hostile_wat("recursion");
    let daemon = daemon(
        &[("roomy", recursion.clone()), ("tight", recursion)],
        &["--limit=tight:stack=64KiB"],
    );
    let client = daemon.client("roomy").min_workers(0).build();
    let worker = client.checkout().await.unwrap();
    assert_eq!(worker.call::<u32>("depth", &5000u32).await.unwrap(), 5000);

    match call_error(&daemon, "tight", "depth", 5000u32).await {
        Error::GuestTrap { message, .. } => {
            assert!(
                message.contains("call stack exhausted (the stack limit is 64 KiB)"),
                "{message}"
            )
        }
        other => panic!("expected a stack overflow trap, got {other:?}"),
    }
}

#[tokio::test]
async fn output_cap_is_set_per_module() {
    let daemon = daemon(&[("flood", hostile_wat("flood"))], &["--limit=flood:output=1KiB"]);
    let mut raw = RawWorker::connect(&daemon, "flood");
    let reply = raw.call("stdout", &1u32, None).unwrap();
    let kept: usize =
        reply.logs.iter().filter(|r| r.target == "stdout").map(|r| r.message.len() + 1).sum();
    assert_eq!(kept, 1024, "exactly the cap is kept");
    let dropped = format!("{} bytes of stdout dropped", (1 << 20) - 1024);
    assert!(reply.logs.iter().any(|r| r.message.starts_with(&dropped)), "{:?}", reply.logs);
}

/// What the fs guest answers: (errno, count, bytes).
type FsAnswer = (u32, u32, serde_bytes::ByteBuf);

#[tokio::test]
async fn open_files_limit_stops_a_guest_hoarding_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(
        &[("fs", hostile_wat("fs"))],
        &["--limit=fs:files=64", &format!("--dir=fs={}:/d:ro", dir.path().display())],
    );
    let client = daemon.client("fs").min_workers(0).build();
    let worker = client.checkout().await.unwrap();
    let (errno, opened, _) = worker.call::<FsAnswer>("open_dir", &(3, 1000)).await.unwrap();
    assert!(opened > 0 && opened < 64, "opened {opened}");
    assert_ne!(errno, 0, "the open past the limit fails");
    // The guest is told no; the worker itself carries on.
    worker.call::<()>("ok", &()).await.unwrap();
}

#[tokio::test]
async fn hung_timeout_interrupts_a_spinning_call_that_has_no_deadline() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--hung-timeout=300ms"]);
    let mut raw = RawWorker::connect(&daemon, "spin");
    let reply = raw.call("spin", &(), None).expect("a timeout reply");
    let error = reply.result.unwrap_err();
    assert_eq!(error.kind, wasm_task::protocol::ErrorKind::Timeout);
    assert!(error.message.contains("hung-worker timeout of 300ms"), "{}", error.message);
    eventually("the interrupted worker is gone", || !alive(raw.pid)).await;
}

#[tokio::test]
async fn hung_timeout_caps_a_longer_client_deadline() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--hung-timeout=300ms"]);
    let client = daemon.client("spin").min_workers(0).timeout(Some(READY_BOUND)).build();
    let worker = client.checkout().await.unwrap();
    let started = Instant::now();
    let err = worker.call::<()>("spin", &()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < READY_BOUND / 2, "took {:?}", started.elapsed());
}

#[tokio::test]
async fn hung_timeout_ends_a_worker_stuck_in_a_host_call() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--hung-timeout=300ms"]);
    let client = daemon.client("spin").min_workers(0).timeout(None).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    // A ten-minute WASI sleep, no client deadline: epochs cannot reach it,
    // so the worker ends itself.
    let err = worker.call::<()>("sleep", &()).await.unwrap_err();
    assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
    eventually("the stuck worker is gone", || !alive(pid)).await;
    assert!(daemon.log_text().contains("worker exits"), "the worker says why");
}

/// `\0`-separated strings as a list.
fn strings(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into())
        .collect()
}

#[tokio::test]
async fn guests_get_only_the_environment_and_arguments_given_to_them() {
    let environ = wat_guest("environ");
    let daemon = daemon(
        &[("plain", environ.clone()), ("given", environ)],
        &["--env=SHARED=1", "--env=given:OWN=x=y", "--arg=given:prog", "--arg=given:--flag"],
    );
    let get = |module: &'static str, what: &'static str| {
        let client = daemon.client(module).min_workers(0).build();
        async move {
            let worker = client.checkout().await.unwrap();
            strings(&worker.call::<serde_bytes::ByteBuf>(what, &()).await.unwrap())
        }
    };
    assert_eq!(get("plain", "environ").await, ["SHARED=1"]);
    assert!(get("plain", "args").await.is_empty(), "no arguments unless given");
    assert_eq!(get("given", "environ").await, ["SHARED=1", "OWN=x=y"]);
    assert_eq!(get("given", "args").await, ["prog", "--flag"]);
    // Nothing leaks from the daemon's own environment (the harness sets RUST_LOG).
    assert!(!get("plain", "environ").await.iter().any(|v| v.starts_with("RUST_LOG")));
}

type Clocks = (u64, u64, u64);

#[tokio::test]
async fn deterministic_guests_see_fixed_clocks_and_repeatable_random_numbers() {
    let environ = wat_guest("environ");
    let daemon =
        daemon(&[("det", environ.clone()), ("free", environ)], &["--deterministic=det:42"]);
    let det = daemon.client("det").min_workers(0).max_workers(2).build();
    let (a, b) = (det.checkout().await.unwrap(), det.checkout().await.unwrap());
    assert_ne!(a.worker_pid(), b.worker_pid());

    let random_a: serde_bytes::ByteBuf = a.call("random", &()).await.unwrap();
    let random_b: serde_bytes::ByteBuf = b.call("random", &()).await.unwrap();
    assert_eq!(random_a, random_b, "the same seed draws the same numbers in every worker");

    let (wall, mono1, mono2): Clocks = a.call("clock", &()).await.unwrap();
    assert_eq!(wall, 946_684_800 * 1_000_000_000, "2000-01-01T00:00:00Z");
    assert_eq!(mono2 - mono1, 1_000_000, "the monotonic clock moves 1 ms per reading");
    assert_eq!(b.call::<Clocks>("clock", &()).await.unwrap(), (wall, mono1, mono2));

    let free = daemon.client("free").min_workers(0).max_workers(2).build();
    let (c, d) = (free.checkout().await.unwrap(), free.checkout().await.unwrap());
    let random_c: serde_bytes::ByteBuf = c.call("random", &()).await.unwrap();
    let random_d: serde_bytes::ByteBuf = d.call("random", &()).await.unwrap();
    assert_ne!(random_c, random_d, "without a seed every worker draws its own numbers");
    let (wall, _, _): Clocks = c.call("clock", &()).await.unwrap();
    assert!(wall > 1_700_000_000 * 1_000_000_000, "the real clock");
}

#[test]
fn max_workers_caps_live_processes_and_later_connections_wait_their_turn() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--max-workers=2"]);
    let held = [RawWorker::connect(&daemon, "spin"), RawWorker::connect(&daemon, "spin")];

    // A third client connects (the backlog takes it) but gets no worker
    // while both are alive.
    let served = Arc::new(AtomicBool::new(false));
    let third = {
        let (socket, served) = (daemon.socket.clone(), served.clone());
        std::thread::spawn(move || {
            let worker = RawWorker::connect_to(&socket, "spin");
            served.store(true, Ordering::SeqCst);
            worker
        })
    };
    let started = Instant::now();
    while !daemon.log_text().contains("at the worker cap") {
        assert!(started.elapsed() < READY_BOUND, "the daemon never reached its cap");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(children(daemon.pid()).len(), 2);
    assert!(!served.load(Ordering::SeqCst), "a third worker was started at the cap");

    // One leaves: the waiting client is served.
    let pids: Vec<u32> = held.iter().map(|w| w.pid).collect();
    drop(held.into_iter().next());
    let mut third = third.join().unwrap();
    assert!(!pids.contains(&third.pid));
    assert!(third.call("ok", &(), None).unwrap().result.is_ok());
    assert!(children(daemon.pid()).len() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_beyond_the_cap_make_no_processes() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--max-workers=4"]);
    let baseline = fd_count(daemon.pid());
    let silent: Vec<_> =
        (0..40).map(|_| std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap()).collect();
    // The daemon waits for four hellos (the cap) without forking anything;
    // the other connections wait in the listen backlog.
    eventually("the cap is reached", || fd_count(daemon.pid()) == baseline + 4).await;
    assert!(children(daemon.pid()).is_empty(), "a silent connection made a worker");
    drop(silent);
    // Each waiting connection gets its turn and is dropped at its hang-up;
    // then a real client is served.
    eventually("every silent connection is done", || fd_count(daemon.pid()) == baseline).await;
    let client = daemon.client("spin").min_workers(0).build();
    client.checkout().await.unwrap().call::<()>("ok", &()).await.unwrap();
    assert_eq!(children(daemon.pid()).len(), 1);
}

#[tokio::test]
async fn request_above_the_frame_limit_is_refused_and_the_daemon_serves_on() {
    let daemon = daemon(&[("spin", hostile_wat("spin"))], &["--max-frame=65536"]);
    // A client that knows the limit refuses to send.
    let client = daemon.client("spin").min_workers(0).max_frame(65536).build();
    let worker = client.checkout().await.unwrap();
    let big = vec![7u8; 100_000];
    let err = worker.call::<()>("ok", &serde_bytes::ByteBuf::from(big.clone())).await.unwrap_err();
    assert!(matches!(err, Error::ArgsTooLarge { max: 65536, .. }), "{err:?}");
    worker.call::<()>("ok", &()).await.unwrap();

    // A client that does not is cut off by the worker, which says why.
    let lax = daemon.client("spin").min_workers(0).build();
    let worker = lax.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let err = worker.call::<()>("ok", &serde_bytes::ByteBuf::from(big)).await.unwrap_err();
    assert!(matches!(err, Error::Protocol { .. } | Error::WorkerDied { .. }), "{err:?}");
    drop(worker);
    eventually("the worker is gone", || !alive(pid)).await;
    assert!(daemon.log_text().contains("exceeds the 65536 byte limit"), "the worker logs why");
    lax.checkout().await.unwrap().call::<()>("ok", &()).await.unwrap();
}

/// Starts `wasm-task serve` with `args` and returns its error output; it must fail.
fn start_error(args: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
        .args(["serve", &format!("--listen=unix:{}", dir.path().join("s.sock").display())])
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "the daemon started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn impossible_settings_are_start_up_errors_naming_the_problem() {
    let module = format!("--module=spin={}", hostile_wat("spin").display());
    for (flag, needle) in [
        ("--limit=memroy=1MiB", "unknown limit `memroy`"),
        ("--limit=stack=64MiB", "outside"),
        ("--limit=other:fuel=10", "names module `other`, which is not served"),
        ("--env=other:A=1", "names module `other`"),
        ("--arg=nomodule", "MODULE:VALUE"),
        ("--limit=spin:memory=16KiB", "starts at 64 KiB, above the memory limit of 16 KiB"),
        ("--limit=host-memory=1MiB", "host-memory of 1 MiB is below"),
        ("--hung-timeout=soon", "not a duration"),
        ("--seccomp=strict", "errno, kill, off"),
    ] {
        let err = start_error(&[module.clone(), flag.to_owned()]);
        assert!(err.contains(needle), "{flag}: {err}");
    }
}
