//! A daemon stopped and started again on the same socket.

use std::time::Duration;

use crate::harness::{Daemon, eventually, standard_args};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_serve_through_a_daemon_restart_and_checkouts_made_meanwhile_wait_for_it() {
    let mut daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(2)
        .max_workers(3)
        .timeout(Some(Duration::from_secs(60)))
        .build();
    eventually("two workers are idle", || client.status().idle == 2).await;
    let held = client.checkout().await.unwrap();
    assert_eq!(held.call::<u64>("incr", &()).await.unwrap(), 1);

    assert!(daemon.stop().success());
    // The workers outlive the daemon: the held one serves on, the idle one
    // serves a new checkout.
    assert_eq!(held.call::<u64>("incr", &()).await.unwrap(), 2);
    let idle = client.checkout().await.unwrap();
    assert_eq!(idle.call::<u64>("incr", &()).await.unwrap(), 1);

    // A checkout that needs a new worker waits for the daemon.
    let pending = tokio::spawn({
        let client = client.clone();
        async move {
            let worker = client.checkout().await?;
            worker.call::<u64>("incr", &()).await
        }
    });
    eventually("the new checkout waits", || client.status().waiting == 1).await;
    assert_eq!(held.call::<u64>("incr", &()).await.unwrap(), 3);

    daemon.relaunch(&standard_args(&[]));
    assert_eq!(pending.await.unwrap().unwrap(), 1, "served once the daemon is back");
    assert_eq!(held.call::<u64>("incr", &()).await.unwrap(), 4);
    assert_eq!(idle.call::<u64>("incr", &()).await.unwrap(), 2);
    assert_eq!(client.status().failed_calls, 0, "nothing was reported to anyone");
}
