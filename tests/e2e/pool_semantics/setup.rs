//! Workers whose setup fails: the guest's message reaches the checkout,
//! the next attempt is a fresh worker, and a setup that always fails is
//! retried with back-off rather than in a loop.

use std::time::{Duration, Instant};

use serde::Deserialize;
use wasm_task::Error;

use crate::harness::{Daemon, bad_setup_wat};

#[derive(Debug, Deserialize)]
struct Stats {
    setup_calls: u64,
}

#[tokio::test]
async fn failed_setup_reports_the_guest_message_and_the_next_checkout_gets_a_fresh_worker() {
    let control = tempfile::tempdir().unwrap();
    let switch = control.path().join("setup_error");
    std::fs::write(&switch, "no database configured\n").unwrap();
    let dir = format!("--dir=testguest={}:/control:ro", control.path().display());
    let daemon = Daemon::start(&[dir.as_str()]);
    let client = daemon.client("testguest").min_workers(0).max_workers(2).build();

    let err = client.checkout().await.unwrap_err();
    match &err {
        Error::SetupFailed { module, message } => {
            assert_eq!(module, "testguest");
            assert!(message.contains("no database configured"), "{message}");
        }
        other => panic!("expected a setup failure, got {other:?}"),
    }

    std::fs::remove_file(&switch).unwrap();
    let worker = client.checkout().await.expect("a fresh worker whose setup succeeds");
    let stats: Stats = worker.call("stats", &()).await.unwrap();
    assert_eq!(stats.setup_calls, 1);
    assert_eq!(daemon.log_count("client connected"), 2, "one fork per attempt");
}

#[tokio::test]
async fn module_whose_setup_always_fails_is_retried_with_backoff_not_in_a_loop() {
    let module = format!("--module=bad={}", bad_setup_wat().display());
    let daemon = Daemon::start_with(&[module]);
    let client = daemon
        .client("bad")
        .min_workers(1)
        .max_workers(4)
        .timeout(Some(Duration::from_secs(1)))
        .build();

    // A caller retrying at once after every failure, for a few seconds.
    let started = Instant::now();
    let mut failures = 0;
    while failures < 3 || started.elapsed() < Duration::from_secs(3) {
        let err = client.checkout().await.unwrap_err();
        let Error::SetupFailed { message, .. } = &err else {
            panic!("expected a setup failure, got {err:?}");
        };
        assert_eq!(message, "setup failed: the configuration file is missing");
        failures += 1;
    }

    // Pauses double from 16 ms to 2 s: about ten attempts in three seconds.
    // Without them every failed checkout would cost a fork, hundreds here.
    let seconds = started.elapsed().as_secs() + 1;
    let forks = daemon.log_count("client connected");
    assert!(forks as u64 <= 10 + 2 * seconds, "{forks} forks for {failures} failed checkouts");
    assert!(client.status().refused <= forks as u64);
}
