//! Regressions found by attacking the daemon: workers that must notice a
//! vanished client, deadlines that must not wrap, limits that must hold.

use std::time::Duration;

use wasm_task::Error;

use crate::harness::{Daemon, alive, children, eventually};

/// A minimal guest in WAT around `body`, which defines `$call` taking the
/// method's length and returning a reply status (0 ok: the reply is the
/// MessagePack `nil` at 200; 1 error). Extra exports can be added in `body`.
fn wat_guest(body: &str) -> String {
    format!(
        r#"(module
  (import "wasm_task" "log" (func $log (param i32 i32 i32 i32 i32)))
  (memory (export "memory") 17)
  (data (i32.const 200) "\c0")
  (func (export "wasm_task_abi_v1"))
  (func (export "wasm_task_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "wasm_task_call") (param $buf i32) (param $ml i32) (param $al i32) (result i32)
    (i32.store (i32.const 0) (call $call (local.get $ml)))
    (i32.store (i32.const 4) (i32.const 200))
    (i32.store (i32.const 8) (i32.const 1))
    (i32.const 0))
  {body})"#
    )
}

/// Starts a daemon serving `wat` as module `g`.
fn daemon_with(wat: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.wat");
    std::fs::write(&path, wat).unwrap();
    (Daemon::start_with(&[format!("--module=g={}", path.display())]), dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exits_when_its_client_leaves_mid_call_without_a_deadline() {
    let daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(0).timeout(None).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let call = tokio::spawn(async move { worker.call::<()>("spin", &()).await });

    eventually("the guest spins", || daemon.log_text().contains("calling method=\"spin\"")).await;
    call.abort();
    eventually("the abandoned worker exits", || !alive(pid)).await;
}

#[tokio::test]
async fn guest_spinning_in_setup_or_initialize_is_stopped_when_the_client_gives_up() {
    for hook in ["wasm_task_setup", "_initialize"] {
        let result = if hook == "_initialize" { "" } else { "(result i32)" };
        let body = format!(
            r#"(func $call (param i32) (result i32) (i32.const 0))
  (func (export "{hook}") {result} (loop $forever (br $forever)) (unreachable))"#
        );
        let (daemon, _dir) = daemon_with(&wat_guest(&body));
        let client = daemon
            .client("g")
            .min_workers(0)
            .timeout(Some(Duration::from_millis(300)))
            .connect_timeout(Duration::from_millis(300))
            .build();
        let err = client.checkout().await.unwrap_err();
        assert!(matches!(err, Error::Timeout { .. }), "{hook}: {err:?}");
        drop(client);
        eventually("the spinning workers exit", || children(daemon.pid()).is_empty()).await;
    }
}

#[tokio::test]
async fn timeouts_of_centuries_do_not_wrap_around() {
    let daemon = Daemon::start(&[]);
    let client =
        daemon.client("testguest").timeout(Some(Duration::from_secs(18_446_744_074))).build();
    let worker = client.checkout().await.unwrap();
    assert_eq!(worker.call::<u64>("sleep_ms", &300u64).await.unwrap(), 300);
}

#[tokio::test]
async fn a_refused_memory_growth_the_guest_handled_does_not_relabel_a_later_trap() {
    // Method "g" (length 1) asks for 2 GiB more memory and handles the -1;
    // any other method traps.
    let body = r#"(func $call (param $ml i32) (result i32)
    (if (i32.eq (local.get $ml) (i32.const 1))
      (then (drop (memory.grow (i32.const 32768))) (return (i32.const 0))))
    (unreachable))"#;
    let (daemon, _dir) = daemon_with(&wat_guest(body));
    let client = daemon.client("g").build();
    let worker = client.checkout().await.unwrap();
    worker.call::<()>("g", &()).await.unwrap();
    let err = worker.call::<()>("trap", &()).await.unwrap_err();
    assert!(matches!(err, Error::GuestTrap { .. }), "{err:?}");
}

/// Peak resident memory of a process, from /proc, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn a_guest_flooding_the_log_costs_the_worker_bounded_memory() {
    // Every call logs 200 records of 1 MiB each (a message taken from the
    // guest's own memory): 200 MiB if the host kept them all.
    let body = r#"(func $call (param i32) (result i32)
    (local $i i32)
    (loop $more
      (call $log (i32.const 3) (i32.const 200) (i32.const 1) (i32.const 0) (i32.const 1048576))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 200))))
    (i32.const 0))"#;
    let (daemon, _dir) = daemon_with(&wat_guest(body));
    let client = daemon.client("g").build();
    let worker = client.checkout().await.unwrap();
    for _ in 0..3 {
        worker.call::<()>("flood", &()).await.unwrap();
    }
    let peak = peak_rss(worker.worker_pid());
    assert!(peak < 96 << 20, "worker peaked at {} MiB", peak >> 20);
}
