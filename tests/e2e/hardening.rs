//! The OS wall around each worker: its system-call filter, rlimits,
//! descriptors and identity, checked on live worker processes.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use serde::Serialize;
use wasm_task::Error;

use crate::harness::{Daemon, RawWorker, guests, hostile_wat, proc_limit, proc_status};

/// A daemon serving the spin guest (a worker that just idles) plus `extra`.
fn spin_daemon(extra: &[&str]) -> Daemon {
    let mut args = vec![format!("--module=spin={}", hostile_wat("spin").display())];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(&args)
}

#[test]
fn workers_run_under_a_system_call_filter_without_new_privileges() {
    let daemon = spin_daemon(&[]);
    let worker = RawWorker::connect(&daemon, "spin");
    assert_eq!(proc_status(worker.pid, "Seccomp").as_deref(), Some("2"), "filter mode");
    // The zygote's filter (which allows forking a worker), and the worker's
    // own on top (which does not).
    assert_eq!(proc_status(worker.pid, "Seccomp_filters").as_deref(), Some("2"));
    assert_eq!(proc_status(worker.pid, "NoNewPrivs").as_deref(), Some("1"));
    // A spare forked a moment ago may not have renamed itself yet.
    let started = std::time::Instant::now();
    let zygote = loop {
        let zygotes = crate::harness::zygotes(daemon.pid());
        if zygotes.len() == 1 || started.elapsed() > crate::harness::READY_BOUND {
            break zygotes;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(zygote.len(), 1, "one zygote for the one module");
    assert_eq!(proc_status(zygote[0], "Seccomp_filters").as_deref(), Some("1"));
    // The daemon itself is not filtered.
    assert_eq!(proc_status(daemon.pid(), "Seccomp").as_deref(), Some("0"));

    // A plainly forked worker has just the worker filter.
    let daemon = spin_daemon(&["--spawn=fork"]);
    let worker = RawWorker::connect(&daemon, "spin");
    assert_eq!(proc_status(worker.pid, "Seccomp_filters").as_deref(), Some("1"));
    assert!(crate::harness::zygotes(daemon.pid()).is_empty());
}

#[test]
fn seccomp_off_installs_no_filter() {
    let daemon = spin_daemon(&["--seccomp=off"]);
    let worker = RawWorker::connect(&daemon, "spin");
    assert_eq!(proc_status(worker.pid, "Seccomp").as_deref(), Some("0"));
}

#[test]
fn workers_run_with_no_core_dumps_few_descriptors_and_bounded_address_space() {
    let daemon = spin_daemon(&["--limit=spin:files=100", "--limit=spin:host-memory=512MiB"]);
    let mut worker = RawWorker::connect(&daemon, "spin");
    worker.call("ok", &(), None).unwrap();

    let pair = |s: &str| (s.to_owned(), s.to_owned());
    assert_eq!(proc_limit(worker.pid, "Max core file size"), Some(pair("0")));
    assert_eq!(proc_limit(worker.pid, "Max open files"), Some(pair("100")));

    // Room for the guest's 4 GiB memory reservation and its guards, plus
    // the host's 512 MiB, on top of what the worker had mapped.
    let (soft, _) = proc_limit(worker.pid, "Max address space").unwrap();
    let cap: u64 = soft.parse().expect("a finite address-space limit");
    let reservation = (4u64 << 30) + (64 << 20);
    assert!(cap > reservation + (512 << 20), "cap {cap}");
    assert!(cap < reservation + (512 << 20) + (1 << 30), "cap {cap}");

    // The CPU-time backstop is armed for every guest entry.
    let (cpu, _) = proc_limit(worker.pid, "Max cpu time").unwrap();
    assert!(cpu.parse::<u64>().is_ok(), "cpu limit {cpu}");
}

#[tokio::test]
async fn serving_workers_make_no_forbidden_system_call() {
    // In kill mode any call outside the allow-list ends the worker with
    // SIGSYS. Run everything a worker does while serving: file i/o in a
    // read-write directory, sleeps, output, traps (signals), deadlines,
    // memory growth and its refusal, stack overflow.
    let dir = tempfile::tempdir().unwrap();
    let g = guests();
    let daemon = Daemon::start_with(&[
        format!("--module=testguest={}", g.testguest.display()),
        format!("--module=memory={}", hostile_wat("memory").display()),
        format!("--module=recursion={}", hostile_wat("recursion").display()),
        format!("--module=flood={}", hostile_wat("flood").display()),
        format!("--dir=testguest={}:/scratch:rw", dir.path().display()),
        "--seccomp=kill".into(),
    ]);

    #[derive(Serialize)]
    struct WriteFile<'a> {
        path: &'a str,
        contents: &'a str,
    }
    let client = daemon.client("testguest").min_workers(0).max_workers(1).build();
    let worker = client.checkout().await.unwrap();
    let file = WriteFile { path: "/scratch/a.txt", contents: "written under seccomp" };
    worker.call::<()>("write_file", &file).await.unwrap();
    let back: String = worker.call("read_file", &"/scratch/a.txt").await.unwrap();
    assert_eq!(back, file.contents);
    assert_eq!(worker.call::<u64>("sleep_ms", &20u64).await.unwrap(), 20);
    worker.call::<()>("log", &"to every stream").await.unwrap();
    let err = worker.call::<()>("panic", &"trapped").await.unwrap_err();
    assert!(matches!(err, Error::GuestTrap { .. }), "{err:?}");
    drop(worker);

    let timed = daemon
        .client("testguest")
        .min_workers(0)
        .timeout(Some(std::time::Duration::from_millis(200)))
        .build();
    let err = timed.checkout().await.unwrap().call::<()>("spin", &()).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err:?}");

    for (module, method, expect_ok) in [
        ("memory", "grow_to_4gib", true),
        ("memory", "grow_until_refused", false),
        ("recursion", "recurse", false),
    ] {
        let client = daemon.client(module).min_workers(0).build();
        let got = client.checkout().await.unwrap().call::<serde::de::IgnoredAny>(method, &()).await;
        assert_eq!(got.is_ok(), expect_ok, "{module}.{method}: {got:?}");
    }
    let flood = daemon.client("flood").min_workers(0).build();
    flood.checkout().await.unwrap().call::<()>("stdout", &2u32).await.unwrap();

    let log = daemon.log_text();
    assert!(!log.contains("SIGSYS"), "a worker made a forbidden call:\n{log}");
}

/// The targets of `pid`'s open descriptors, by number.
fn fd_links(pid: u32) -> Vec<(i32, String)> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    let mut links: Vec<(i32, String)> = dir
        .filter_map(|e| {
            let e = e.ok()?;
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    links.sort();
    links
}

#[test]
fn workers_keep_none_of_the_daemons_descriptors() {
    // Hand the daemon a descriptor it does not know about, as a careless
    // supervisor would.
    let leaked = tempfile::NamedTempFile::new().unwrap();
    let leaked_path: PathBuf = leaked.path().to_owned();
    // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns.
    unsafe { libc::fcntl(leaked.as_file().as_raw_fd(), libc::F_SETFD, 0) };
    let daemon = spin_daemon(&[]);
    // SAFETY: restoring FD_CLOEXEC, so later children do not inherit it.
    unsafe { libc::fcntl(leaked.as_file().as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };

    let leaked_name = leaked_path.to_string_lossy().into_owned();
    let daemon_fds = fd_links(daemon.pid());
    assert!(daemon_fds.iter().any(|(_, t)| *t == leaked_name), "the daemon inherited it");
    let listener: Vec<&String> =
        daemon_fds.iter().map(|(_, t)| t).filter(|t| t.starts_with("socket:")).collect();
    assert!(!listener.is_empty());

    let worker = RawWorker::connect(&daemon, "spin");
    let worker_fds = fd_links(worker.pid);
    for (fd, target) in &worker_fds {
        assert_ne!(*target, leaked_name, "fd {fd}: the worker kept the inherited file");
        assert!(!listener.contains(&target), "fd {fd}: the worker kept the listener");
        assert!(!target.contains("signalfd"), "fd {fd}: the worker kept the signalfd");
    }
    for fd in [0, 1] {
        let target = worker_fds.iter().find(|(n, _)| *n == fd).map(|(_, t)| t.as_str());
        assert_eq!(target, Some("/dev/null"), "fd {fd}");
    }
    // Its connection (for reading, writing, and the watchdog) and no other
    // socket: none of those its zygote talks to the daemon and to its
    // spares with.
    let mut sockets: Vec<&String> =
        worker_fds.iter().map(|(_, t)| t).filter(|t| t.starts_with("socket:")).collect();
    sockets.dedup();
    assert_eq!(sockets.len(), 1, "{worker_fds:?}");
}

#[test]
fn workers_run_as_the_given_user_when_the_daemon_is_root() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: dropping privileges needs a daemon running as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user `nobody` on this host");
        return;
    };
    let daemon = spin_daemon(&["--user=nobody"]);
    let mut worker = RawWorker::connect(&daemon, "spin");
    assert!(worker.call("ok", &(), None).unwrap().result.is_ok());

    let ids = |key| {
        let line = proc_status(worker.pid, key).unwrap();
        line.split_whitespace().map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(ids("Uid"), [nobody.uid.as_raw(); 4], "real, effective, saved, fs uid");
    assert_eq!(ids("Gid"), [nobody.gid.as_raw(); 4]);
    assert_eq!(ids("Groups"), [nobody.gid.as_raw()], "no supplementary groups kept");
    // The daemon itself stays root.
    assert_eq!(proc_status(daemon.pid(), "Uid").unwrap().split_whitespace().next(), Some("0"));
}
