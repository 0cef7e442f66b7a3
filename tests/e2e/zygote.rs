//! Zygotes: workers forked from a process that ran the guest's init once.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wasm_task::Error;

use crate::harness::{
    Daemon, READY_BOUND, alive, children, eventually, proc_status, signal, standard_args, zygote_of,
};

/// What the test guest's `init_info` method reports.
#[derive(Debug, Deserialize, PartialEq)]
struct InitInfo {
    init_calls: u64,
    token: u64,
    table_len: u64,
    table_sum: u64,
    file: Option<String>,
    reseed: Option<String>,
    state: u64,
}

#[derive(Serialize)]
struct TableSet {
    index: u64,
    value: u8,
}

/// Sum of the test guest's init table of `len` bytes (byte i is i % 251).
fn table_sum(len: u64) -> u64 {
    (0..len).map(|i| i % 251).sum()
}

/// A daemon serving the test guest with `extra` arguments.
fn daemon(extra: &[&str]) -> Daemon {
    Daemon::start_with(&standard_args(extra))
}

#[tokio::test]
async fn workers_start_from_the_state_init_built_once() {
    let daemon = daemon(&["--env=testguest:TG_INIT_TABLE_MIB=2"]);
    let client = daemon.client("testguest").max_workers(2).build();
    let (a, b) = (client.checkout().await.unwrap(), client.checkout().await.unwrap());
    assert_ne!(a.worker_pid(), b.worker_pid());
    let ia: InitInfo = a.call("init_info", &()).await.unwrap();
    let ib: InitInfo = b.call("init_info", &()).await.unwrap();
    // Init ran once, in the zygote: both workers hold its one token and table.
    assert_eq!((ia.init_calls, ib.init_calls), (1, 1));
    assert_eq!(ia.token, ib.token, "both workers come from one init");
    assert_eq!(ia.table_len, 2 << 20);
    assert_eq!(ia.table_sum, table_sum(2 << 20));
    assert_eq!(ia.state, 1000);
    // Per-worker setup ran in each: the reseed hook's bytes differ.
    assert!(ia.reseed.is_some() && ia.reseed != ib.reseed, "{ia:?} {ib:?}");
    assert!(zygote_of(daemon.pid(), "testguest").is_some(), "a zygote serves the module");
}

#[tokio::test]
async fn a_workers_writes_stay_its_own() {
    let daemon = daemon(&["--env=testguest:TG_INIT_TABLE_MIB=1"]);
    let client = daemon.client("testguest").max_workers(2).max_checkouts(Some(1)).build();
    let a = client.checkout().await.unwrap();
    let b = client.checkout().await.unwrap();
    assert_eq!(a.call::<u64>("poke", &7u64).await.unwrap(), 1000);
    assert_eq!(a.call::<u8>("table_set", &TableSet { index: 10, value: 99 }).await.unwrap(), 10);
    assert_eq!(a.call::<u64>("poke", &8u64).await.unwrap(), 7, "the worker keeps its own write");

    // A sibling forked before the writes does not see them...
    let ib: InitInfo = b.call("init_info", &()).await.unwrap();
    assert_eq!((ib.state, ib.table_sum), (1000, table_sum(1 << 20)));
    let a_pid = a.worker_pid();
    drop((a, b));

    // ...nor does one forked after them, from the untouched zygote.
    let c = client.checkout().await.unwrap();
    assert_ne!(c.worker_pid(), a_pid, "max_checkouts retired the first worker");
    let ic: InitInfo = c.call("init_info", &()).await.unwrap();
    assert_eq!((ic.state, ic.table_sum, ic.init_calls), (1000, table_sum(1 << 20), 1));
}

#[tokio::test]
async fn workers_draw_different_random_bytes() {
    let daemon = daemon(&[]);
    let client = daemon.client("testguest").max_workers(2).build();
    let (a, b) = (client.checkout().await.unwrap(), client.checkout().await.unwrap());
    let ra: String = a.call("random", &()).await.unwrap();
    let rb: String = b.call("random", &()).await.unwrap();
    assert_eq!(ra.len(), 32);
    assert_ne!(ra, rb, "two workers of one zygote drew the same bytes");
    assert_ne!(ra, a.call::<String>("random", &()).await.unwrap());
}

#[tokio::test]
async fn traps_and_deadlines_work_in_forked_workers() {
    let daemon = daemon(&[]);
    let client = daemon.client("testguest").timeout(Some(Duration::from_millis(500))).build();
    let worker = client.checkout().await.unwrap();
    let err = worker.call::<()>("spin", &()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    drop(worker);

    let worker = client.checkout().await.unwrap();
    let err = worker.call::<()>("panic", &"boom").await.unwrap_err();
    assert!(
        matches!(&err, Error::GuestTrap { message, .. } if message.contains("boom")),
        "{err:?}"
    );
    drop(worker);

    let worker = client.checkout().await.unwrap();
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
    assert!(alive(daemon.pid()));
}

#[tokio::test]
async fn file_and_clock_calls_in_init_leave_the_zygote_single_threaded() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("config"), "colour=blue").unwrap();
    let dir = format!("--dir={}:/data:ro", data.path().display());
    let daemon = daemon(&[
        &dir,
        "--env=testguest:TG_INIT_READ=/data/config",
        "--env=testguest:TG_INIT_SLEEP_MS=20",
    ]);
    let client = daemon.client("testguest").max_workers(2).build();
    let (a, b) = (client.checkout().await.unwrap(), client.checkout().await.unwrap());
    let info: InitInfo = a.call("init_info", &()).await.unwrap();
    assert_eq!(info.file.as_deref(), Some("colour=blue"));
    // Both workers use the descriptor init opened, each at its own position,
    // and make file calls of their own without hanging.
    for w in [&a, &b] {
        assert_eq!(w.call::<String>("read_init_file", &()).await.unwrap(), "colour=blue");
        assert_eq!(w.call::<String>("read_file", &"/data/config").await.unwrap(), "colour=blue");
        assert_eq!(w.call::<u64>("sleep_ms", &5u64).await.unwrap(), 5);
    }
    let zygote = zygote_of(daemon.pid(), "testguest").unwrap();
    assert_eq!(proc_status(zygote, "Threads").as_deref(), Some("1"));
}

#[tokio::test]
async fn a_failing_init_is_a_clear_error_and_the_zygote_is_retried_until_it_works() {
    let data = tempfile::tempdir().unwrap();
    let dir = format!("--dir={}:/data:ro", data.path().display());
    let daemon = daemon(&[&dir, "--env=testguest:TG_INIT_READ=/data/config"]);
    let client = daemon.client("testguest").min_workers(0).build();
    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::SetupFailed { message, .. } => {
            assert!(message.contains("init hook"), "{message}");
            assert!(message.contains("/data/config"), "{message}");
            assert!(message.contains("tries again"), "{message}");
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    assert!(alive(daemon.pid()));

    // Once the file is there, a restarted zygote serves the module.
    std::fs::write(data.path().join("config"), "late").unwrap();
    let started = Instant::now();
    let served = loop {
        let client = daemon.client("testguest").min_workers(0).build();
        if let Ok(w) = client.checkout().await {
            break w.call::<InitInfo>("init_info", &()).await.unwrap();
        }
        assert!(started.elapsed() < READY_BOUND, "no zygote came up:\n{}", daemon.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(served.file.as_deref(), Some("late"));
}

#[tokio::test]
async fn a_killed_zygote_is_restarted_and_its_workers_serve_on() {
    let daemon = daemon(&[]);
    let client = daemon.client("testguest").max_workers(2).build();
    let old = client.checkout().await.unwrap();
    assert_eq!(old.call::<u64>("incr", &()).await.unwrap(), 1);
    let first = zygote_of(daemon.pid(), "testguest").unwrap();
    signal(first, libc::SIGKILL);
    eventually("a new zygote runs", || {
        zygote_of(daemon.pid(), "testguest").is_some_and(|z| z != first)
    })
    .await;
    // The worker forked from the dead zygote is untouched...
    assert_eq!(old.call::<u64>("incr", &()).await.unwrap(), 2);
    // ...and new workers come from the new one.
    let new = client.checkout().await.unwrap();
    assert_ne!(new.worker_pid(), old.worker_pid());
    assert_eq!(new.call::<u64>("incr", &()).await.unwrap(), 1);
    assert_eq!(children(daemon.pid()).len(), 2);
}

#[tokio::test]
async fn an_init_that_never_ends_is_stopped_at_the_hung_timeout() {
    let daemon = daemon(&["--env=testguest:TG_INIT_SPIN=1", "--hung-timeout=300ms"]);
    let client = daemon.client("testguest").min_workers(0).build();
    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::SetupFailed { message, .. } => {
            assert!(message.contains("hung-worker timeout"), "{message}")
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
    assert!(alive(daemon.pid()));
}

#[tokio::test]
async fn in_fork_mode_every_worker_runs_init_itself() {
    let daemon = daemon(&["--spawn=testguest:fork"]);
    assert_eq!(zygote_of(daemon.pid(), "testguest"), None);
    let client = daemon.client("testguest").max_workers(2).build();
    let (a, b) = (client.checkout().await.unwrap(), client.checkout().await.unwrap());
    let ia: InitInfo = a.call("init_info", &()).await.unwrap();
    let ib: InitInfo = b.call("init_info", &()).await.unwrap();
    assert_eq!((ia.init_calls, ib.init_calls), (1, 1));
    assert_ne!(ia.token, ib.token, "each worker ran its own init");
    // The WAT guest has no init and no zygote either way but its own.
    let echo = daemon.client("echo").build();
    let w = echo.checkout().await.unwrap();
    assert_eq!(w.call::<String>("echo", &"hi").await.unwrap(), "hi");
    assert!(zygote_of(daemon.pid(), "echo").is_some(), "echo still has its zygote");
}

#[tokio::test]
async fn an_init_stuck_in_a_host_call_is_named_in_the_error() {
    let daemon = daemon(&["--env=testguest:TG_INIT_SLEEP_MS=60000", "--hung-timeout=300ms"]);
    let client = daemon.client("testguest").min_workers(0).build();
    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::SetupFailed { message, .. } => {
            assert!(message.contains("stuck in a host call"), "{message}")
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_that_leaves_while_its_zygote_starts_frees_its_slot() {
    // One slot in all; testguest's zygote takes a while to start.
    let daemon = daemon(&["--env=testguest:TG_INIT_SLEEP_MS=30000", "--max-workers=1"]);
    let mut impatient = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    let hello = wasm_task::protocol::Request::Hello {
        version: wasm_task::protocol::PROTOCOL_VERSION,
        module: "testguest",
        client: "impatient",
    };
    let mut frame = Vec::new();
    wasm_task::protocol::encode_frame(&hello, &mut frame).unwrap();
    std::io::Write::write_all(&mut impatient, &frame).unwrap();
    drop(impatient);
    // The slot it held goes to a client of the other module long before
    // that init is over.
    let echo = daemon.client("echo").min_workers(0).timeout(Some(Duration::from_secs(10))).build();
    let w = echo.checkout().await.unwrap();
    assert_eq!(w.call::<String>("echo", &"hi").await.unwrap(), "hi");
}
