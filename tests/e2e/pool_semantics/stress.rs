//! Stress: thousands of checkouts cancelled at random moments, and
//! thousands of worker recycles.

use std::time::Duration;

use crate::harness::{
    ChildWatch, Daemon, alive, children, eventually, fd_count, live_children, running_children,
};

/// A small deterministic random source (xorshift64*), so that a failing
/// run can be replayed from its seed.
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_checkouts_dropped_at_random_moments_leak_no_worker() {
    let daemon = Daemon::start(&[]);
    let max = 4;
    let watch = ChildWatch::start(daemon.pid());
    let client = daemon.client("testguest").min_workers(1).max_workers(max).build();
    let seed = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    eprintln!("random seed {seed:#x}");
    let mut random = Random(seed);

    // Waves of 25, each dropped after a random delay: while queued, while
    // its worker is being connected, or in the middle of its call.
    for _ in 0..80 {
        let wave: Vec<_> = (0..25)
            .map(|_| {
                let client = client.clone();
                let patience = Duration::from_micros(random.below(10_000));
                let work = random.below(6);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(patience, async {
                        let worker = client.checkout().await.unwrap();
                        worker.call::<u64>("sleep_ms", &work).await.unwrap()
                    })
                    .await;
                })
            })
            .collect();
        for task in wave {
            task.await.unwrap();
        }
        let now = client.status();
        assert!(now.workers() <= max, "{now:?}");
    }

    eventually("the pool settles", || {
        let now = client.status();
        now.busy + now.connecting + now.closing + now.waiting == 0
    })
    .await;
    // What the cancellations cost, for the record: workers closed because a
    // call was dropped mid-way count as aborted.
    eprintln!("after the waves: {:?}", client.status());
    let idle = client.status().idle;
    assert!((1..=max).contains(&idle), "{:?}", client.status());
    eventually("the daemon runs exactly the idle workers", || {
        running_children(daemon.pid()).len() == client.status().idle
    })
    .await;
    let most = watch.most();
    assert!(most <= max, "{most} worker processes were alive at once");

    // Every place is still usable, and no more than that.
    let all: Vec<_> = futures_util::future::join_all((0..max).map(|_| client.checkout())).await;
    for worker in &all {
        let worker = worker.as_ref().unwrap();
        assert_eq!(worker.call::<u64>("echo", &7u64).await.unwrap(), 7);
    }
    drop(all);
    drop(client);
    eventually("no worker outlives the client", || live_children(daemon.pid()).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_recycles_leave_no_zombie_and_no_descriptor_in_the_daemon() {
    let daemon = Daemon::start(&[]);
    let baseline = fd_count(daemon.pid());
    let client =
        daemon.client("testguest").min_workers(0).max_workers(2).max_checkouts(Some(1)).build();

    let lanes: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..1000u64 {
                    let worker = client.checkout().await.unwrap();
                    assert_eq!(worker.call::<u64>("echo", &i).await.unwrap(), i);
                }
            })
        })
        .collect();
    for lane in lanes {
        lane.await.unwrap();
    }

    eventually("every worker was recycled", || client.status().retired.max_checkouts == 2000).await;
    eventually("every exited worker is reaped", || {
        children(daemon.pid()).iter().all(|pid| alive(*pid))
    })
    .await;
    eventually("the daemon holds no more descriptors than at start", || {
        fd_count(daemon.pid()) == baseline
    })
    .await;
    drop(client);
    eventually("no worker is left", || children(daemon.pid()).is_empty()).await;
}
