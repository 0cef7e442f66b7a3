//! Attacks on the client's unix-socket I/O: writes that find the socket
//! full, the second descriptor watched for writing, and everything that can
//! happen to a call while it is blocked writing.
//!
//! Descriptor counts are taken of this whole test process, and some tests
//! lower its descriptor limit: each test takes [`SERIAL`] first.

use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use wasm_task::{Checkout, Client, Error};

use crate::harness::{Daemon, alive, eventually, signal, state};

/// Taken by every test first: they count this process's descriptors, and
/// some lower its limit.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest any single awaited step may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(30);

#[derive(serde::Serialize)]
struct Borrowed<'a> {
    name: &'a str,
    #[serde(with = "serde_bytes")]
    bytes: &'a [u8],
}

/// `len` bytes that differ with `seed` and position.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sends `bytes` through `swap_borrowed` and checks they come back whole.
async fn round_trip(worker: &Checkout, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let (back, back_name): (serde_bytes::ByteBuf, String) =
        worker.call("swap_borrowed", &Borrowed { name, bytes }).await?;
    assert_eq!(back_name, name, "name of {name} changed");
    assert!(back.as_slice() == bytes, "{name}: {} bytes came back changed", bytes.len());
    Ok(())
}

/// Socket inode -> how many of this process's descriptors refer to it.
fn socket_fds() -> HashMap<String, usize> {
    let mut map = HashMap::new();
    for entry in fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(target) = fs::read_link(entry.path()) {
            let target = target.to_string_lossy().into_owned();
            if target.starts_with("socket:") {
                *map.entry(target).or_insert(0) += 1;
            }
        }
    }
    map
}

/// How many sockets this process holds by more than one descriptor: the
/// client's connections with a second descriptor watched for writing.
fn dup_sockets() -> usize {
    socket_fds().values().filter(|&&n| n > 1).count()
}

fn own_fds() -> usize {
    fs::read_dir("/proc/self/fd").unwrap().count()
}

async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(HANG, fut).await.unwrap_or_else(|_| panic!("hang: {what}"))
}

/// Stops `pid` and waits until it is stopped.
async fn stop(pid: u32) {
    signal(pid, libc::SIGSTOP);
    eventually("the worker is stopped", || state(pid) == Some('T')).await;
}

/// A client of one worker, with a long deadline.
fn one_worker(daemon: &Daemon) -> Client {
    daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(1)
        .timeout(Some(Duration::from_secs(120)))
        .build()
}

/// Checks the pool still serves: a fresh checkout round-trips a large and a
/// small argument.
async fn pool_serves(client: &Client) {
    let worker = bounded("checkout after the attack", client.checkout()).await.unwrap();
    let big = payload(99, 3 << 20);
    bounded("large call after the attack", round_trip(&worker, "after-big", &big)).await.unwrap();
    bounded("small call after the attack", round_trip(&worker, "after-small", b"x")).await.unwrap();
}

/// Sizes around the socket buffer and up to near the 16 MiB frame limit,
/// sent ahead on one checkout together with slow calls, every result checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sizes_with_slow_guest() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    let dups_before = dup_sockets();
    let client = one_worker(&daemon);
    let worker = client.checkout().await.unwrap();
    let sizes = [
        0usize,
        1,
        100,
        4095,
        4096,
        16 << 10,
        (32 << 10) - 40,
        32 << 10,
        (32 << 10) + 1,
        65_536,
        212_992,
        212_993,
        1 << 20,
        (4 << 20) + 3,
        (16 << 20) - 200,
    ];
    for round in 0..3u64 {
        let datas: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &n)| payload(round * 100 + i as u64, n)).collect();
        let names: Vec<String> =
            sizes.iter().enumerate().map(|(i, n)| format!("r{round}-{i}-{n}")).collect();
        let calls = datas.iter().zip(&names).enumerate().map(|(i, (data, name))| {
            let worker = &worker;
            async move {
                if i % 3 == 0 {
                    let ms: u64 = worker.call("sleep_ms", &20u64).await?;
                    assert_eq!(ms, 20);
                }
                round_trip(worker, name, data).await
            }
        });
        let results = bounded("pipelined calls", join_all(calls)).await;
        for (name, result) in names.iter().zip(results) {
            result.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
    }
    // Also concurrent calls all issued at once, without the sleeps.
    let datas: Vec<Vec<u8>> = (0..40u64)
        .map(|i| payload(1000 + i, [10usize, 40_000, 300_000, 2 << 20][i as usize % 4]))
        .collect();
    let calls = datas.iter().enumerate().map(|(i, d)| {
        let worker = &worker;
        async move { round_trip(worker, &format!("burst-{i}"), d).await }
    });
    for r in bounded("burst", join_all(calls)).await {
        r.unwrap();
    }
    drop(worker);
    assert_eq!(
        dup_sockets(),
        dups_before,
        "a second descriptor outlived the writes: {:?}",
        socket_fds()
    );
}

/// Starts a call of `len` bytes against a stopped worker and waits until the
/// client has found the socket full (a second descriptor appears).
async fn blocked_write<'a>(
    worker: &'a Checkout,
    data: &'a [u8],
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send + 'a>> {
    let dups = dup_sockets();
    let mut call = Box::pin(round_trip(worker, "blocked", data));
    let started = Instant::now();
    loop {
        tokio::select! {
            r = &mut call => panic!("the call against a stopped worker ended: {r:?}"),
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
        if dup_sockets() > dups {
            return call;
        }
        assert!(started.elapsed() < HANG, "the write never blocked");
    }
}

/// The worker stops reading mid-request and resumes: the call completes with
/// the right answer, and the second descriptor goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_reader_resumes() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    let dups_before = dup_sockets();
    let client = one_worker(&daemon);
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    round_trip(&worker, "warm", b"hello").await.unwrap();
    let fds = own_fds();
    for len in [300_000usize, 1 << 20, 8 << 20] {
        stop(pid).await;
        let data = payload(len as u64, len);
        let call = blocked_write(&worker, &data).await;
        signal(pid, libc::SIGCONT);
        bounded("call after SIGCONT", call).await.unwrap();
        assert_eq!(dup_sockets(), dups_before, "{:?}", socket_fds());
    }
    // Several rounds of stop/continue while one large request is written.
    stop(pid).await;
    let data = payload(7, 12 << 20);
    let call = blocked_write(&worker, &data).await;
    let pump = async {
        for _ in 0..20 {
            signal(pid, libc::SIGCONT);
            tokio::time::sleep(Duration::from_millis(2)).await;
            signal(pid, libc::SIGSTOP);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        signal(pid, libc::SIGCONT);
    };
    let (r, ()) = bounded("call with stop/cont", async { tokio::join!(call, pump) }).await;
    r.unwrap();
    assert_eq!(own_fds(), fds, "descriptors changed");
    drop(worker);
    pool_serves(&client).await;
}

#[derive(Debug, Clone, Copy)]
enum Interrupt {
    Kill,
    Abort,
    Deadline,
    Drop,
}

async fn interrupted_while_writing(how: Interrupt, daemon: &Daemon, queued: bool) {
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(1)
        .timeout(Some(if matches!(how, Interrupt::Deadline) {
            Duration::from_millis(1500)
        } else {
            Duration::from_secs(120)
        }))
        .build();
    let fds_before = own_fds();
    let worker = client.checkout().await.unwrap();
    let pid = worker.worker_pid();
    round_trip(&worker, "warm", b"hello").await.unwrap();
    stop(pid).await;
    let data = payload(1, 8 << 20);
    let call = blocked_write(&worker, &data).await;
    // A small call queued behind the blocked one.
    let behind = async { if queued { Some(worker.call::<u64>("incr", &()).await) } else { None } };
    let act = async {
        match how {
            Interrupt::Kill => signal(pid, libc::SIGKILL),
            Interrupt::Abort => worker.abort(),
            Interrupt::Deadline | Interrupt::Drop => {}
        }
    };
    let result = match how {
        Interrupt::Drop => {
            let r = tokio::time::timeout(Duration::from_millis(200), call).await;
            assert!(r.is_err(), "a call against a stopped worker ended: {r:?}");
            drop(behind);
            drop(act);
            None
        }
        _ => {
            let (r, b, ()) =
                bounded("interrupted call", async { tokio::join!(call, behind, act) }).await;
            Some((r, b))
        }
    };
    if let Some((r, b)) = &result {
        let err = r.as_ref().unwrap_err();
        let ok = match how {
            Interrupt::Kill => matches!(err, Error::WorkerDied { .. }),
            Interrupt::Abort => matches!(err, Error::Aborted { .. }),
            Interrupt::Deadline => matches!(err, Error::Timeout { .. }),
            Interrupt::Drop => unreachable!(),
        };
        assert!(ok, "{how:?}: unexpected error {err:?}");
        if let Some(b) = b {
            assert!(b.is_err(), "{how:?}: call behind got {b:?}");
        }
    }
    // Later calls on the checkout fail at once.
    let later = bounded("later call", worker.call::<u64>("incr", &())).await;
    assert!(later.is_err(), "{how:?}: a later call succeeded: {later:?}");
    drop(worker);
    // Let the stopped worker go, whatever the client did to it.
    signal(pid, libc::SIGCONT);
    eventually("the old worker is gone", || !alive(pid)).await;
    pool_serves(&client).await;
    eventually("the worker is back in the pool", || client.status().busy == 0).await;
    drop(client);
    // The pool's tasks close connections asynchronously: wait for the count.
    let started = Instant::now();
    while own_fds() > fds_before {
        assert!(
            started.elapsed() < HANG,
            "{how:?}: fds {} > {fds_before} after the client was dropped: {:?}",
            own_fds(),
            socket_fds()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_while_blocked_writing() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    for queued in [false, true] {
        for how in [Interrupt::Kill, Interrupt::Abort, Interrupt::Deadline, Interrupt::Drop] {
            eprintln!("-- {how:?} queued={queued}");
            interrupted_while_writing(how, &daemon, queued).await;
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn interrupts_while_blocked_writing_current_thread() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    for how in [Interrupt::Kill, Interrupt::Abort, Interrupt::Deadline, Interrupt::Drop] {
        eprintln!("-- {how:?}");
        interrupted_while_writing(how, &daemon, true).await;
    }
}

/// Calls made on other runtimes than the client's, the writes blocking there.
fn calls_elsewhere(client: Client, multi: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = if multi {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        .unwrap();
        rt.block_on(async move {
            let worker = bounded("checkout elsewhere", client.checkout()).await.unwrap();
            let pid = worker.worker_pid();
            for (i, len) in [10usize, 500_000, 6 << 20, 100, 13 << 20].into_iter().enumerate() {
                let data = payload(i as u64, len);
                bounded("call elsewhere", round_trip(&worker, &format!("e{i}"), &data))
                    .await
                    .unwrap();
            }
            // Blocked writing on this runtime, then resumed.
            stop(pid).await;
            let data = payload(77, 8 << 20);
            let call = blocked_write(&worker, &data).await;
            signal(pid, libc::SIGCONT);
            bounded("blocked call elsewhere", call).await.unwrap();
            // Pipelined calls from this runtime.
            let datas: Vec<Vec<u8>> =
                (0..20u64).map(|i| payload(i, (i as usize % 5) * 700_000)).collect();
            let calls = datas.iter().enumerate().map(|(i, d)| {
                let worker = &worker;
                async move { round_trip(worker, &format!("p{i}"), d).await }
            });
            for r in bounded("pipelined elsewhere", join_all(calls)).await {
                r.unwrap();
            }
            // Killed while blocked writing from here.
            stop(pid).await;
            let call = blocked_write(&worker, &data).await;
            signal(pid, libc::SIGKILL);
            let err = bounded("killed elsewhere", call).await.unwrap_err();
            assert!(matches!(err, Error::WorkerDied { .. }), "{err:?}");
            drop(worker);
            let worker = bounded("checkout elsewhere 2", client.checkout()).await.unwrap();
            bounded("after kill elsewhere", round_trip(&worker, "z", &data)).await.unwrap();
        });
        drop(rt);
    })
}

async fn join_thread(handle: std::thread::JoinHandle<()>) {
    let joined = tokio::task::spawn_blocking(move || handle.join());
    let r = bounded("thread", joined).await.unwrap();
    if let Err(panic) = r {
        std::panic::resume_unwind(panic);
    }
}

/// Calls from a current-thread and from a multi-thread runtime on other
/// threads, on a client built on this one; no second descriptor is left.
async fn calls_from_other_runtimes() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    let dups_before = dup_sockets();
    let client = one_worker(&daemon);
    join_thread(calls_elsewhere(client.clone(), false)).await;
    join_thread(calls_elsewhere(client.clone(), true)).await;
    pool_serves(&client).await;
    assert_eq!(dup_sockets(), dups_before, "{:?}", socket_fds());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_runtimes_from_multi_thread_client() {
    calls_from_other_runtimes().await;
}

#[tokio::test(flavor = "current_thread")]
async fn other_runtimes_from_current_thread_client() {
    calls_from_other_runtimes().await;
}

/// Fills this process's descriptor table (with a lowered soft limit) and
/// returns the descriptors taken and the old limit.
fn exhaust_fds() -> (Vec<fs::File>, libc::rlimit) {
    let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the struct passed.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) };
    let lowered =
        libc::rlimit { rlim_cur: (own_fds() + 32) as libc::rlim_t, rlim_max: old.rlim_max };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    let mut held = Vec::new();
    while let Ok(f) = fs::File::open("/dev/null") {
        held.push(f);
    }
    (held, old)
}

fn restore_fds(held: Vec<fs::File>, old: libc::rlimit) {
    drop(held);
    // SAFETY: as in exhaust_fds.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
}

/// A large call to a worker that is slow to read, made while the process
/// has no descriptor to spare: the call should wait for the worker, as a
/// call over TCP does, not fail because a second descriptor could not be
/// made.
async fn large_call_without_spare_fds(client: &Client) -> (Result<(), Error>, Duration) {
    let worker = bounded("checkout", client.checkout()).await.unwrap();
    let pid = worker.worker_pid();
    round_trip(&worker, "warm", b"x").await.unwrap();
    stop(pid).await;
    let data = payload(3, 8 << 20);
    let (held, old) = exhaust_fds();
    let started = Instant::now();
    let call = round_trip(&worker, "no-fds", &data);
    // The descriptors come back soon and the worker resumes: only for a
    // moment was there none to spare.
    let (r, ()) = bounded("large call without spare fds", async {
        tokio::join!(call, async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            restore_fds(held, old);
            tokio::time::sleep(Duration::from_millis(300)).await;
            signal(pid, libc::SIGCONT);
        })
    })
    .await;
    let took = started.elapsed();
    (r, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_without_spare_fds_unix() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    // No deadline: the call can only end by its reply or by an error.
    let client = daemon.client("testguest").min_workers(1).max_workers(1).timeout(None).build();
    let (r, took) = large_call_without_spare_fds(&client).await;
    assert!(
        r.is_ok(),
        "after {took:?}: {r:?} ({:#})",
        r.as_ref().map_err(|e| anyhow::Error::new(e.clone())).unwrap_err()
    );
    pool_serves(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_without_spare_fds_tcp() {
    let _serial = SERIAL.lock().await;
    let g = crate::harness::guests();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_wasm-task"))
        .args(["serve", &format!("--listen=tcp:127.0.0.1:{port}")])
        .arg(format!("--module=testguest={}", g.testguest.display()))
        .stderr(fs::File::create(dir.path().join("tcp.log")).unwrap())
        .spawn()
        .unwrap();
    eventually("tcp daemon listens or exits", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            || child.try_wait().unwrap().is_some()
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "tcp daemon exited (port race?)");
    let address: wasm_task::Address = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let client =
        Client::builder(address, "testguest").min_workers(1).max_workers(1).timeout(None).build();
    let (r, took) = large_call_without_spare_fds(&client).await;
    signal(child.id(), libc::SIGTERM);
    let _ = child.wait();
    assert!(r.is_ok(), "after {took:?}: {r:?}");
}

/// As above with a deadline: the call should succeed well within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_write_without_spare_fds_unix_deadline() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    let client = daemon
        .client("testguest")
        .min_workers(1)
        .max_workers(1)
        .timeout(Some(Duration::from_secs(5)))
        .build();
    let (r, took) = large_call_without_spare_fds(&client).await;
    let text = r.as_ref().err().map(|e| format!("{:#}", anyhow::Error::new(e.clone())));
    assert!(r.is_ok(), "after {took:?}: {r:?} ({text:?})");
    pool_serves(&client).await;
}

/// One checkout shared by two threads, each on its own runtime, sending
/// large and small calls at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_checkout_two_runtimes() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&[]);
    let client = one_worker(&daemon);
    let worker = std::sync::Arc::new(client.checkout().await.unwrap());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let worker = worker.clone();
            std::thread::spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async move {
                    let datas: Vec<Vec<u8>> = (0..30u64)
                        .map(|i| {
                            payload(
                                t * 1000 + i,
                                [3usize, 50_000, 1 << 20, 5 << 20][i as usize % 4],
                            )
                        })
                        .collect();
                    let calls = datas.iter().enumerate().map(|(i, d)| {
                        let worker = &worker;
                        async move { round_trip(worker, &format!("t{t}-{i}"), d).await }
                    });
                    for r in bounded("calls on a shared checkout", join_all(calls)).await {
                        r.unwrap();
                    }
                });
            })
        })
        .collect();
    for t in threads {
        join_thread(t).await;
    }
}
