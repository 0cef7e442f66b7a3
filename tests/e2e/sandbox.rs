//! The lookup example guest under a read-only preopen: it works on its data
//! and can reach nothing else, even though its file access is naive.

use std::path::Path;

use serde::Serialize;
use wasm_task::Error;

use crate::harness::{Daemon, guests, workspace};

#[derive(Serialize)]
struct PutFile<'a> {
    name: &'a str,
    contents: &'a str,
}

/// A daemon serving the lookup guest on a copy of its data directory, with
/// a symlink that points out of it.
fn lookup_daemon() -> (Daemon, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let src = workspace().join("examples/lookup/data/capitals.tsv");
    std::fs::copy(&src, data.path().join("capitals.tsv")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", data.path().join("passwd-link")).unwrap();
    std::os::unix::fs::symlink("/etc", data.path().join("etc-link")).unwrap();
    let daemon = Daemon::start_with(&[
        format!("--module=lookup={}", guests().lookup.display()),
        format!("--dir=lookup={}:/data:ro", data.path().display()),
    ]);
    (daemon, data)
}

async fn get_file(worker: &wasm_task::Checkout, name: &str) -> Result<String, Error> {
    worker.call::<String>("get_file", &name).await
}

#[tokio::test]
async fn lookup_answers_from_its_preopened_data() {
    let (daemon, _data) = lookup_daemon();
    let client = daemon.client("lookup").build();
    let worker = client.checkout().await.unwrap();
    let capital: Option<String> = worker.call("lookup", &"france").await.unwrap();
    assert_eq!(capital.as_deref(), Some("Paris"));
    let none: Option<String> = worker.call("lookup", &"atlantis").await.unwrap();
    assert_eq!(none, None);
    assert!(get_file(&worker, "capitals.tsv").await.unwrap().contains("Paris"));
}

#[tokio::test]
async fn lookup_guest_cannot_reach_outside_its_directory() {
    assert!(Path::new("/etc/passwd").exists(), "the host file the guest must not read");
    let (daemon, _data) = lookup_daemon();
    let client = daemon.client("lookup").build();
    let worker = client.checkout().await.unwrap();

    for name in
        ["/etc/passwd", "../etc/passwd", "../../../../etc/passwd", "passwd-link", "etc-link/passwd"]
    {
        match get_file(&worker, name).await {
            Err(Error::GuestError { message, .. }) => {
                assert!(!message.contains("root:"), "{name}: {message}")
            }
            other => panic!("reading {name} must fail inside the guest, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn lookup_guest_cannot_write_into_its_read_only_directory() {
    let (daemon, data) = lookup_daemon();
    let client = daemon.client("lookup").build();
    let worker = client.checkout().await.unwrap();

    for name in ["new.txt", "capitals.tsv"] {
        let err =
            worker.call::<()>("put_file", &PutFile { name, contents: "x" }).await.unwrap_err();
        assert!(matches!(err, Error::GuestError { .. }), "{name}: {err:?}");
    }
    assert!(!data.path().join("new.txt").exists());
    let capitals = std::fs::read_to_string(data.path().join("capitals.tsv")).unwrap();
    assert!(capitals.contains("Paris"), "data file untouched");
}

#[tokio::test]
async fn lookup_setup_failure_names_the_missing_file() {
    let empty = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(&[
        format!("--module=lookup={}", guests().lookup.display()),
        format!("--dir=lookup={}:/data:ro", empty.path().display()),
    ]);
    let client = daemon.client("lookup").min_workers(0).build();
    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::SetupFailed { message, .. } => {
            assert!(message.contains("capitals.tsv"), "{message}")
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }
}

#[tokio::test]
async fn preopens_stay_the_directories_given_at_start_up() {
    // Someone who can write next to a preopened directory (say a guest of
    // another module with a writable preopen of the parent) swaps it for a
    // symlink leading out. New workers must still get the original.
    let root = tempfile::tempdir().unwrap();
    let (cfg, outside) = (root.path().join("cfg"), root.path().join("outside"));
    std::fs::create_dir(&cfg).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(cfg.join("f"), "benign config").unwrap();
    std::fs::write(outside.join("f"), "outside the sandbox").unwrap();
    let daemon = Daemon::start_with(&[
        format!("--module=testguest={}", guests().testguest.display()),
        format!("--dir=testguest={}:/cfg:ro", cfg.display()),
    ]);

    std::fs::rename(&cfg, root.path().join("cfg_old")).unwrap();
    std::os::unix::fs::symlink("outside", &cfg).unwrap();

    let client = daemon.client("testguest").min_workers(0).build();
    let worker = client.checkout().await.unwrap();
    let got: String = worker.call("read_file", &"/cfg/f").await.unwrap();
    assert_eq!(got, "benign config");
}
