//! The hostile-guest corpus (tests/guests/hostile): every attack gets a
//! distinct, accurate error; the daemon keeps serving; the pool replaces the
//! attacked worker; a bystander worker and its client notice nothing.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::IgnoredAny;
use wasm_task::Error;

use crate::harness::{
    Daemon, READY_BOUND, RawWorker, alive, eventually, guests, hostile_rust, hostile_wat,
    proc_status,
};

/// The WAT guests of the corpus, each served under its file name.
const WAT_GUESTS: &[&str] =
    &["spin", "memory", "recursion", "flood", "reply", "traps", "liar", "liar_alloc"];

/// A daemon serving every hostile guest (the Rust one as `hostile`) and the
/// echo guest as a bystander, plus `extra` arguments.
fn hostile_daemon(extra: &[String]) -> Daemon {
    let mut args: Vec<String> = WAT_GUESTS
        .iter()
        .map(|name| format!("--module={name}={}", hostile_wat(name).display()))
        .collect();
    args.push(format!("--module=hostile={}", hostile_rust().display()));
    args.push(format!("--module=echo={}", guests().echo_wat.display()));
    args.extend(extra.iter().cloned());
    Daemon::start_with(&args)
}

/// Calls `method` of `module` on a fresh worker while a bystander holds an
/// echo worker, and returns the error it gave, after checking the aftermath:
/// the attacked worker is gone, the pool hands out a new one that answers,
/// the bystander still answers and the daemon lives.
async fn attack(
    daemon: &Daemon,
    module: &str,
    method: &str,
    args: impl Serialize,
    timeout: Option<Duration>,
) -> Error {
    let bystanders = daemon.client("echo").min_workers(0).build();
    let bystander = bystanders.checkout().await.unwrap();
    let timeout = timeout.or(Some(READY_BOUND));
    let client = daemon.client(module).min_workers(0).max_workers(1).timeout(timeout).build();

    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let err = match worker.call::<IgnoredAny>(method, &args).await {
        Ok(_) => panic!("{module}.{method} succeeded"),
        Err(e) => e,
    };
    drop(worker);
    eventually("the attacked worker is gone", || !alive(pid)).await;

    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid, "the pool replaced the worker");
    next.call::<()>("ok", &()).await.unwrap();
    assert_eq!(bystander.call::<u32>("echo", &7u32).await.unwrap(), 7, "the bystander answers");
    assert!(alive(daemon.pid()), "the daemon lives");
    err
}

/// Expects a guest trap whose message contains `needle`.
async fn expect_trap(
    daemon: &Daemon,
    module: &str,
    method: &str,
    args: impl Serialize,
    needle: &str,
) {
    match attack(daemon, module, method, args, None).await {
        Error::GuestTrap { message, .. } => assert!(message.contains(needle), "{message}"),
        other => panic!("{module}.{method}: expected a trap, got {other:?}"),
    }
}

/// Expects a resource-limit error whose message contains `needle`.
async fn expect_limit(
    daemon: &Daemon,
    module: &str,
    method: &str,
    args: impl Serialize,
    needle: &str,
) {
    match attack(daemon, module, method, args, None).await {
        Error::Limit { message, .. } => assert!(message.contains(needle), "{message}"),
        other => panic!("{module}.{method}: expected a limit error, got {other:?}"),
    }
}

/// Expects the worker's report that the guest broke the ABI, naming `needle`.
async fn expect_abi_violation(daemon: &Daemon, module: &str, method: &str, needle: &str) {
    let err = attack(daemon, module, method, (), None).await;
    assert!(matches!(err, Error::Protocol { .. }), "{module}.{method}: {err:?}");
    let text = format!("{:?}", err);
    assert!(text.contains("guest broke the ABI") && text.contains(needle), "{method}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_guests_stop_at_their_deadline_while_a_normal_call_answers() {
    let daemon = hostile_daemon(&[]);
    const SPINNERS: usize = 6;
    let deadline = Duration::from_millis(800);
    let spinners =
        daemon.client("spin").min_workers(0).max_workers(SPINNERS).timeout(Some(deadline)).build();
    let normal = daemon.client("echo").min_workers(0).build();
    let worker = normal.checkout().await.unwrap();

    let started = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..SPINNERS)
        .map(|_| {
            let (spinners, started) = (spinners.clone(), started.clone());
            tokio::spawn(async move {
                let w = spinners.checkout().await.unwrap();
                let pid = w.worker_pid();
                started.fetch_add(1, Ordering::SeqCst);
                (w.call::<()>("spin", &()).await, pid)
            })
        })
        .collect();
    eventually("every spinner is in its call", || started.load(Ordering::SeqCst) == SPINNERS).await;

    // Every core is busy spinning; a normal call still answers well within
    // the spinners' deadline.
    let asked = Instant::now();
    assert_eq!(worker.call::<u32>("echo", &42u32).await.unwrap(), 42);
    assert!(asked.elapsed() < deadline, "normal call took {:?}", asked.elapsed());

    for task in tasks {
        let (result, pid) = task.await.unwrap();
        assert!(matches!(result, Err(Error::Timeout { .. })), "{result:?}");
        eventually("the spinning worker is gone", || !alive(pid)).await;
    }
    let fresh = spinners.checkout().await.unwrap();
    fresh.call::<()>("ok", &()).await.unwrap();
}

#[tokio::test]
async fn guest_blocked_in_a_ten_minute_wasi_sleep_is_stopped_at_its_short_deadline() {
    let daemon = hostile_daemon(&[]);
    let started = Instant::now();
    let err = attack(&daemon, "spin", "sleep", (), Some(Duration::from_millis(300))).await;
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    // The worker ended itself (deadline plus a second of grace) long
    // before the sleep would have.
    assert!(started.elapsed() < Duration::from_secs(60), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn growing_memory_toward_4_gib_fails_as_the_guest_sees_it_and_it_carries_on() {
    let daemon = hostile_daemon(&[]);
    let client = daemon.client("memory").min_workers(0).build();
    let worker = client.checkout().await.unwrap();
    assert_eq!(worker.call::<i32>("grow_to_4gib", &()).await.unwrap(), -1, "memory.grow result");
    assert_eq!(worker.call::<i32>("grow_table", &()).await.unwrap(), -1, "table.grow result");
    // A refused growth the guest handled is no failure: the worker serves on.
    worker.call::<()>("ok", &()).await.unwrap();
    assert!(alive(worker.worker_pid()));
}

#[tokio::test]
async fn memory_bomb_that_traps_after_a_refused_growth_is_a_memory_limit_error() {
    let daemon = hostile_daemon(&[]);
    expect_limit(&daemon, "memory", "grow_until_refused", (), "memory").await;
}

#[tokio::test]
async fn rust_allocation_loop_is_a_memory_limit_error() {
    let daemon = hostile_daemon(&[]);
    expect_limit(&daemon, "hostile", "allocate_forever", (), "memory").await;
}

#[tokio::test]
async fn unbounded_recursion_is_a_stack_overflow_trap_not_a_crash() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "recursion", "recurse", (), "call stack exhausted").await;
    expect_trap(&daemon, "hostile", "recurse", 0u64, "call stack exhausted").await;
}

/// Peak resident memory of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let hwm = proc_status(pid, "VmHWM").expect("VmHWM");
    hwm.trim_end_matches(" kB").trim().parse().unwrap()
}

#[tokio::test]
async fn stdout_and_stderr_floods_are_capped_and_cost_the_worker_no_memory() {
    let daemon = hostile_daemon(&[]);
    let mut raw = RawWorker::connect(&daemon, "flood");
    let before = peak_rss_kib(raw.pid);
    let daemon_before = peak_rss_kib(daemon.pid());

    for stream in ["stdout", "stderr"] {
        // 64 MiB in 64 KiB writes.
        let reply = raw.call(stream, &64u32, None).expect("the worker answers");
        assert!(reply.result.is_ok(), "{stream}: {:?}", reply.result);
        let kept: usize =
            reply.logs.iter().filter(|r| r.target == stream).map(|r| r.message.len() + 1).sum();
        assert!(kept > 0 && kept <= 64 << 10, "{stream}: kept {kept} bytes");
        let note =
            reply.logs.iter().find(|r| r.message.contains(&format!("bytes of {stream} dropped")));
        assert!(
            note.is_some(),
            "{stream}: no note of the dropped bytes in {:?}",
            reply.logs.last()
        );
    }
    raw.call("ok", &(), None).expect("the worker still serves");

    // Nothing of the 128 MiB stayed in the worker or reached the daemon.
    let grown = peak_rss_kib(raw.pid).saturating_sub(before);
    assert!(grown < 16 << 10, "worker peak memory grew by {grown} KiB");
    assert!(peak_rss_kib(daemon.pid()) < daemon_before + (16 << 10), "daemon memory grew");
}

#[tokio::test]
async fn rust_print_flood_is_capped_and_the_call_succeeds() {
    let daemon = hostile_daemon(&[]);
    let client = daemon.client("hostile").min_workers(0).build();
    let worker = client.checkout().await.unwrap();
    worker.call::<()>("print_flood", &4usize).await.unwrap();
    worker.call::<()>("ok", &()).await.unwrap();
}

#[tokio::test]
async fn reply_above_the_frame_limit_is_a_limit_error() {
    let daemon = hostile_daemon(&["--max-frame=65536".into()]);
    expect_limit(&daemon, "reply", "big", 1u32 << 20, "exceeds the 65536 byte frame limit").await;
}

#[tokio::test]
async fn unreachable_is_a_trap_naming_it() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "traps", "unreachable", (), "unreachable").await;
}

#[tokio::test]
async fn out_of_bounds_access_is_a_trap_naming_it() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "traps", "oob", (), "out of bounds memory access").await;
}

#[tokio::test]
async fn division_by_zero_is_a_trap_naming_it() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "traps", "div0", 0u32, "integer divide by zero").await;
}

#[tokio::test]
async fn call_through_an_empty_table_slot_is_a_trap_naming_it() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "traps", "call_null", (), "uninitialized element").await;
}

#[tokio::test]
async fn proc_exit_with_a_non_zero_code_is_a_trap_naming_the_code() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "traps", "exit", 3u32, "proc_exit(3)").await;
    expect_trap(&daemon, "hostile", "exit", 4i32, "proc_exit(4)").await;
}

#[tokio::test]
async fn rust_panic_is_a_trap_with_its_message() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "hostile", "panic", "the sky fell", "the sky fell").await;
}

#[tokio::test]
async fn rust_abort_is_a_trap() {
    let daemon = hostile_daemon(&[]);
    expect_trap(&daemon, "hostile", "abort", (), "unreachable").await;
}

#[tokio::test]
async fn lies_in_the_reply_record_are_abi_violations() {
    let daemon = hostile_daemon(&[]);
    for (method, needle) in [
        ("reply_oob", "reply: bytes"),
        ("reply_wrap", "reply: bytes"),
        ("negative_len", "reply: bytes"),
        ("record_oob", "reply record"),
        ("record_unaligned", "not 4-byte aligned"),
        ("bad_status", "unknown reply status 7"),
    ] {
        expect_abi_violation(&daemon, "liar", method, needle).await;
    }
}

#[tokio::test]
async fn host_imports_called_with_pointers_outside_memory_are_abi_violations() {
    let daemon = hostile_daemon(&[]);
    expect_abi_violation(&daemon, "liar", "log_oob", "outside").await;
    expect_abi_violation(&daemon, "liar", "trap_message_oob", "outside").await;
}

#[tokio::test]
async fn allocator_answering_a_pointer_outside_memory_is_an_abi_violation() {
    let daemon = hostile_daemon(&[]);
    let client = daemon.client("liar_alloc").min_workers(0).max_workers(1).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let err = worker.call::<()>("anything", &()).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("request buffer") && text.contains("outside"), "{text}");
    drop(worker);
    eventually("the lying worker is gone", || !alive(pid)).await;
    assert!(alive(daemon.pid()));
}

/// What the fs guest answers: (errno, count, bytes).
type FsAnswer = (u32, u32, serde_bytes::ByteBuf);

/// WASI errno 0.
const OK: u32 = 0;

/// A daemon whose fs guest has `rw` at fd 3 (read-write) and `ro` at fd 4
/// (read-only); each holds `inside.txt`, and `rw` holds symlinks out.
fn fs_daemon(rw: &Path, ro: &Path) -> Daemon {
    std::fs::write(rw.join("inside.txt"), "inside rw\n").unwrap();
    std::fs::write(ro.join("inside.txt"), "inside ro\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", rw.join("link-passwd")).unwrap();
    std::os::unix::fs::symlink("/etc", rw.join("link-etc")).unwrap();
    std::os::unix::fs::symlink("..", rw.join("link-up")).unwrap();
    std::fs::create_dir(rw.join("sub")).unwrap();
    hostile_daemon(&[
        format!("--module=fs={}", crate::harness::hostile_wat("fs").display()),
        format!("--dir=fs={}:/rw:rw", rw.display()),
        format!("--dir=fs={}:/ro:ro", ro.display()),
    ])
}

async fn fs_call<A: Serialize>(worker: &wasm_task::Checkout, method: &str, args: A) -> FsAnswer {
    worker.call::<FsAnswer>(method, &args).await.unwrap()
}

#[tokio::test]
async fn guest_cannot_open_files_outside_its_preopened_directories() {
    assert!(Path::new("/etc/passwd").exists(), "the host file the guest must not read");
    let (rw, ro) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let daemon = fs_daemon(rw.path(), ro.path());
    let client = daemon.client("fs").min_workers(0).build();
    let worker = client.checkout().await.unwrap();

    let (errno, _, bytes) = fs_call(&worker, "read", (3, "inside.txt")).await;
    assert_eq!((errno, bytes.as_slice()), (OK, &b"inside rw\n"[..]), "reading inside works");

    for path in [
        "/etc/passwd",
        "../etc/passwd",
        "../../../../../../etc/passwd",
        "sub/../../etc/passwd",
        "link-passwd",
        "link-etc/passwd",
        "link-up/etc/passwd",
    ] {
        let (errno, _, bytes) = fs_call(&worker, "read", (3, path)).await;
        assert_ne!(errno, OK, "{path} opened");
        assert!(bytes.is_empty(), "{path} read");
    }
    worker.call::<()>("ok", &()).await.unwrap();
}

#[tokio::test]
async fn symlinks_the_guest_makes_do_not_lead_out() {
    let (rw, ro) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let daemon = fs_daemon(rw.path(), ro.path());
    let client = daemon.client("fs").min_workers(0).build();
    let worker = client.checkout().await.unwrap();

    for (target, name, through) in [
        ("/etc/passwd", "abs", "abs"),
        ("/etc", "abs-dir", "abs-dir/passwd"),
        ("../../../../../../etc", "up", "up/passwd"),
    ] {
        // Making the link may be refused; if it is not, following it must be.
        let _ = fs_call(&worker, "symlink", (3, target, name)).await;
        let (errno, _, bytes) = fs_call(&worker, "read", (3, through)).await;
        assert_ne!(errno, OK, "{through} (-> {target}) opened");
        assert!(bytes.is_empty());
    }
}

#[tokio::test]
async fn read_only_preopen_refuses_every_write() {
    let (rw, ro) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let daemon = fs_daemon(rw.path(), ro.path());
    let client = daemon.client("fs").min_workers(0).build();
    let worker = client.checkout().await.unwrap();

    let (errno, written, _) = fs_call(&worker, "create", (3, "new.txt")).await;
    assert_eq!((errno, written), (OK, 5), "writing into the read-write directory works");
    assert_eq!(std::fs::read_to_string(rw.path().join("new.txt")).unwrap(), "pwned");

    for (method, path) in
        [("create", "new.txt"), ("create", "inside.txt"), ("remove", "inside.txt")]
    {
        let (errno, _, _) = fs_call(&worker, method, (4, path)).await;
        assert_ne!(errno, OK, "{method} {path} in the read-only directory");
    }
    let (errno, _, _) = fs_call(&worker, "symlink", (4, "inside.txt", "link")).await;
    assert_ne!(errno, OK, "symlink in the read-only directory");

    assert!(!ro.path().join("new.txt").exists());
    assert!(!ro.path().join("link").exists());
    let kept = std::fs::read_to_string(ro.path().join("inside.txt")).unwrap();
    assert_eq!(kept, "inside ro\n", "the read-only file is untouched");
}
