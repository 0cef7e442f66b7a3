//! When workers are retired: after errors (unless kept), always after a
//! trap, a limit or a timeout, and after `max_checkouts` with a queue.

use std::collections::BTreeMap;
use std::time::Duration;

use wasm_task::Error;

use crate::harness::{Daemon, alive, eventually};

#[tokio::test]
async fn worker_that_returned_an_error_is_retired_on_release_unless_kept() {
    let daemon = Daemon::start(&[]);
    for keep in [false, true] {
        let client = daemon
            .client("testguest")
            .min_workers(0)
            .max_workers(1)
            .retire_after_error(!keep)
            .build();
        let worker = client.checkout().await.unwrap();
        let pid = worker.worker_pid();
        worker.call::<()>("fail", &"corrupt state?").await.unwrap_err();
        assert_eq!(worker.call::<u64>("incr", &()).await.unwrap(), 1, "serves the checkout on");
        drop(worker);

        let next = client.checkout().await.unwrap();
        if keep {
            assert_eq!(next.worker_pid(), pid, "kept after a guest error");
            assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 2);
        } else {
            assert_ne!(next.worker_pid(), pid, "retired after a guest error");
            assert_eq!(next.call::<u64>("incr", &()).await.unwrap(), 1);
            eventually("the retired worker is gone", || !alive(pid)).await;
        }
        assert_eq!(client.status().retired.error, u64::from(!keep));
    }
}

#[tokio::test]
async fn worker_that_trapped_hit_a_limit_or_timed_out_is_never_reused() {
    let daemon = Daemon::start(&["--max-memory-mib=16"]);
    let client = daemon
        .client("testguest")
        .min_workers(0)
        .max_workers(1)
        .retire_after_error(false)
        .timeout(Some(Duration::from_secs(2)))
        .build();

    let mut pids = Vec::new();
    let worker = client.checkout().await.unwrap();
    pids.push(worker.worker_pid());
    let err = worker.call::<()>("panic", &"boom").await.unwrap_err();
    assert!(matches!(err, Error::GuestTrap { .. }), "{err:?}");
    drop(worker);

    let worker = client.checkout().await.unwrap();
    pids.push(worker.worker_pid());
    let err = worker.call::<u64>("allocate", &64u64).await.unwrap_err();
    assert!(matches!(err, Error::Limit { .. }), "{err:?}");
    drop(worker);

    let worker = client.checkout().await.unwrap();
    pids.push(worker.worker_pid());
    let err = worker.call::<()>("spin", &()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
    drop(worker);

    let last = client.checkout().await.unwrap();
    pids.push(last.worker_pid());
    let distinct: std::collections::BTreeSet<_> = pids.iter().collect();
    assert_eq!(distinct.len(), 4, "each failure cost its worker: {pids:?}");
    let retired = client.status().retired;
    assert_eq!((retired.error, retired.timeout), (2, 1), "{retired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_with_a_queue_completes_every_checkout_two_per_worker() {
    let daemon = Daemon::start(&[]);
    let client =
        daemon.client("testguest").min_workers(0).max_workers(1).max_checkouts(Some(2)).build();

    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let worker = client.checkout().await.unwrap();
                let count = worker.call::<u64>("incr", &()).await.unwrap();
                (worker.worker_pid(), count)
            })
        })
        .collect();
    let mut served: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for task in tasks {
        let (pid, count) = task.await.unwrap();
        let counts = served.entry(pid).or_default();
        counts.push(count);
        counts.sort();
    }

    assert_eq!(served.len(), 10, "{served:?}");
    assert!(
        served.values().all(|counts| counts == &[1, 2]),
        "each worker served two whole checkouts: {served:?}"
    );
    eventually("every worker was retired", || client.status().retired.max_checkouts == 10).await;
}
