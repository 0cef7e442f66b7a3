//! A worker killed in the middle of a call.

use std::time::Duration;

use wasm_task::Error;

use crate::harness::{Daemon, eventually, signal};

#[tokio::test]
async fn worker_killed_mid_call_fails_that_call_and_later_ones_and_is_replaced() {
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(1)
        .timeout(Some(Duration::from_secs(120)))
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
            signal(pid, libc::SIGKILL);
        },
    );
    // Reported as a death, not at the timeout two minutes away.
    let died = in_flight.unwrap_err();
    assert!(matches!(&died, Error::WorkerDied { pid: p, .. } if *p == pid), "{died:?}");
    let Err(Error::EarlierCallFailed { earlier, .. }) = queued else {
        panic!("expected the queued call to be skipped, got {queued:?}");
    };
    assert!(matches!(*earlier, Error::WorkerDied { .. }));
    let later = worker.call::<u64>("incr", &()).await.unwrap_err();
    assert_eq!(later.to_string(), died.to_string(), "the same error for every later call");

    // The pool replaces the dead worker while its checkout is still held.
    eventually("a replacement is idle", || client.status().idle == 1).await;
    assert_eq!(client.status().retired.death, 1);
    drop(worker);
    let next = client.checkout().await.unwrap();
    assert_ne!(next.worker_pid(), pid);
    assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 1);
}
