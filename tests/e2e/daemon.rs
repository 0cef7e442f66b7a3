//! The daemon as a process: listening, start-up errors, signals, children,
//! and connections that break the protocol.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use wasm_task::protocol::{self, ErrorKind, Response};

use crate::harness::{Daemon, alive, cmdline, eventually, fd_count, guests, signal};

#[tokio::test]
async fn serves_over_tcp_on_loopback() {
    let g = guests();
    // Find a free port; the daemon binds it right after (retry on a lost race).
    for _ in 0..5 {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("tcp.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
            .args(["serve", &format!("--listen=tcp:127.0.0.1:{port}")])
            .arg(format!("--module=testguest={}", g.testguest.display()))
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let addr: wasm_task::Address = format!("tcp:127.0.0.1:{port}").parse().unwrap();
        eventually("tcp daemon listens or exits", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                || child.try_wait().unwrap().is_some()
        })
        .await;
        if child.try_wait().unwrap().is_some() {
            continue;
        }
        let client = wasm_task::Client::builder(addr, "testguest").build();
        let worker = client.checkout().await.unwrap();
        assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
        signal(child.id(), libc::SIGTERM);
        assert!(child.wait().unwrap().success());
        return;
    }
    panic!("could not start a tcp daemon on a free port");
}

#[test]
fn unix_socket_is_owner_only() {
    let daemon = Daemon::start(&[]);
    let mode = std::fs::metadata(&daemon.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
}

#[test]
fn stale_socket_is_replaced_and_a_live_one_is_refused() {
    let mut first = Daemon::start(&[]);
    let socket = first.socket.clone();

    // A second daemon on the same path must refuse to start.
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
        .args(["serve", &format!("--listen=unix:{}", socket.display())])
        .arg(format!("--module=testguest={}", guests().testguest.display()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("already listening"), "{stderr}");

    // A daemon killed without cleanup leaves its socket file behind ...
    signal(first.pid(), libc::SIGKILL);
    first.child.wait().unwrap();
    assert!(socket.exists());

    // ... which the next daemon replaces.
    let dir = tempfile::tempdir().unwrap();
    let args = [format!("--module=testguest={}", guests().testguest.display())];
    let second = Daemon::spawn(dir, socket.clone(), &args);
    second.wait_ready();
}

fn start_error(module_path: &std::path::Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
        .args(["serve", &format!("--listen=unix:{}", dir.path().join("s.sock").display())])
        .arg(format!("--module=bad={}", module_path.display()))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!out.status.success(), "daemon started on a bad module");
    assert!(!dir.path().join("s.sock").exists(), "nothing may listen");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_broken_or_incomplete_modules_are_start_up_errors() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.wasm");
    let err = start_error(&missing);
    assert!(err.contains("missing.wasm") && err.contains("No such file"), "{err}");

    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"this is not wasm").unwrap();
    let err = start_error(&junk);
    assert!(err.contains("junk.wasm") && err.contains("not a valid wasm module"), "{err}");

    let bare = dir.path().join("bare.wat");
    std::fs::write(&bare, "(module (memory (export \"memory\") 1))").unwrap();
    let err = start_error(&bare);
    assert!(err.contains("bare.wat") && err.contains("missing export `wasm_task_abi_v1`"), "{err}");

    let wrong = dir.path().join("wrong.wat");
    std::fs::write(
        &wrong,
        r#"(module (memory (export "memory") 1)
             (func (export "wasm_task_abi_v1"))
             (func (export "wasm_task_alloc") (param i64) (result i32) i32.const 0)
             (func (export "wasm_task_call") (param i32 i32 i32) (result i32) i32.const 0))"#,
    )
    .unwrap();
    let err = start_error(&wrong);
    assert!(err.contains("wrong.wat") && err.contains("`wasm_task_alloc` has type"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_removes_the_socket_and_lets_calls_finish() {
    let mut daemon = Daemon::start(&[]);
    let client = daemon.client("testguest").min_workers(1).max_workers(1).build();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    let call = tokio::spawn(async move {
        let got = worker.call::<u64>("sleep_ms", &500u64).await;
        (got, worker)
    });

    // Stop the daemon once the worker is inside the call.
    eventually("the call has started", || {
        daemon.log_text().contains("calling method=\"sleep_ms\"")
    })
    .await;
    let status = daemon.stop();
    assert!(status.success(), "daemon exit status {status}");
    assert!(!daemon.socket.exists(), "socket file removed");
    assert!(std::os::unix::net::UnixStream::connect(&daemon.socket).is_err(), "nothing accepts");

    let (got, worker) = call.await.unwrap();
    assert_eq!(got.unwrap(), 500, "the call in flight finishes");
    assert!(alive(pid), "the worker outlives the daemon while its client holds it");
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1, "and keeps serving");
}

#[tokio::test]
async fn workers_are_reaped_and_the_parent_keeps_no_connection_descriptors() {
    let daemon = Daemon::start(&[]);
    let baseline = fd_count(daemon.pid());

    let client = daemon.client("testguest").min_workers(0).max_workers(4).build();
    let held: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(client.checkout().await.unwrap());
        }
        v
    };
    // The daemon keeps its copy of a connection it handed to a zygote only
    // until the zygote reports the worker that took it.
    eventually("parent holds no connection descriptors", || fd_count(daemon.pid()) == baseline)
        .await;

    // Titles tell the workers apart from the daemon.
    for w in &held {
        let title = cmdline(w.worker_pid());
        assert!(title.starts_with("wasm-task worker testguest"), "worker title: {title}");
    }
    assert!(cmdline(daemon.pid()).contains("serve"), "daemon keeps its command line");

    // Churn: kill workers by trapping them, many times over.
    drop(held);
    for _ in 0..30 {
        let w = client.checkout().await.unwrap();
        let _ = w.call::<()>("panic", &"churn").await;
    }
    eventually("every exited worker is reaped", || {
        let kids = crate::harness::children(daemon.pid());
        kids.iter().all(|p| alive(*p))
    })
    .await;
    eventually("no descriptor growth after churn", || fd_count(daemon.pid()) == baseline).await;
}

/// Sends raw bytes on a fresh connection and reads the worker's answer.
fn send_raw(daemon: &Daemon, bytes: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(&daemon.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

fn expect_protocol_refusal(answer: &[u8]) -> String {
    assert!(answer.len() > 4, "worker said nothing");
    match protocol::decode::<Response>(&answer[4..]).unwrap() {
        Response::Refused(e) => {
            assert_eq!(e.kind, ErrorKind::Protocol, "{e:?}");
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn daemon_survives_garbage_truncated_and_oversized_frames() {
    let daemon = Daemon::start(&["--max-frame=4096"]);

    let garbage = [&8u32.to_be_bytes()[..], b"\xc1\xc1\xc1garbage"].concat();
    let msg = expect_protocol_refusal(&send_raw(&daemon, &garbage[..12]));
    assert!(msg.contains("malformed"), "{msg}");

    let truncated = [&100u32.to_be_bytes()[..], b"short"].concat();
    let msg = expect_protocol_refusal(&send_raw(&daemon, &truncated));
    assert!(msg.contains("closed in the middle of a frame"), "{msg}");

    let oversized = 1_000_000u32.to_be_bytes();
    let msg = expect_protocol_refusal(&send_raw(&daemon, &oversized));
    assert!(msg.contains("exceeds"), "{msg}");

    // And the next client is served normally.
    let client = daemon.client("testguest").build();
    let worker = client.checkout().await.unwrap();
    assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1);
    assert!(alive(daemon.pid()));
}
