//! The test harness: builds the guest modules, starts real daemons, inspects
//! their processes.

use std::fs;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use wasm_task::{Address, Client, ClientBuilder};

/// How long anything in a test may take to become ready before it fails.
pub const READY_BOUND: Duration = Duration::from_secs(60);

/// Root of the workspace.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Paths of the guest modules used by the tests.
pub struct Guests {
    pub testguest: PathBuf,
    pub hasher: PathBuf,
    pub lookup: PathBuf,
    /// Used by the benchmark, which shares this harness.
    #[allow(dead_code)]
    pub bench: PathBuf,
    pub echo_wat: PathBuf,
}

/// Where the guests are built: `guests/` in cargo's target directory
/// (`$CARGO_TARGET_DIR`, relative to the workspace, or `target/`).
fn guests_target() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    workspace().join(target).join("guests")
}

/// Builds the guest crates for wasm32-wasip1 (once per test process).
///
/// They are built in a target directory of their own, so this nested cargo
/// does not wait on the lock the outer `cargo test` holds on `target/`.
pub fn guests() -> &'static Guests {
    static GUESTS: OnceLock<Guests> = OnceLock::new();
    GUESTS.get_or_init(|| {
        let root = workspace();
        let target = guests_target();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "--target", "wasm32-wasip1"])
            .args([
                "-p",
                "testguest",
                "-p",
                "hasher-guest",
                "-p",
                "lookup-guest",
                "-p",
                "benchguest",
            ])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("running cargo to build the guests");
        assert!(status.success(), "building the guest modules failed");
        let wasm = |name: &str| target.join("wasm32-wasip1/release").join(format!("{name}.wasm"));
        Guests {
            testguest: wasm("testguest"),
            hasher: wasm("hasher_guest"),
            lookup: wasm("lookup_guest"),
            bench: wasm("benchguest"),
            echo_wat: root.join("tests/guests/echo.wat"),
        }
    })
}

/// A running `wasm-task serve`, stopped (and its log shown on failure) on drop.
pub struct Daemon {
    pub child: Child,
    /// Holds the socket and the log; removed when the daemon is dropped.
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts a daemon on a fresh unix socket serving the test guest as
    /// `testguest` and the echo WAT guest as `echo`, plus `extra` arguments.
    pub fn start(extra: &[&str]) -> Daemon {
        let g = guests();
        let mut args = vec![
            format!("--module=testguest={}", g.testguest.display()),
            format!("--module=echo={}", g.echo_wat.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Daemon::start_with(&args)
    }

    /// Starts a daemon with exactly `args` after `serve --listen unix:...`.
    pub fn start_with(args: &[String]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("daemon.sock");
        let daemon = Daemon::spawn(dir, socket, args);
        daemon.wait_ready();
        daemon
    }

    /// Starts a daemon in `dir` on `socket` without waiting for it, logging
    /// at debug level (tests read the log).
    pub fn spawn(dir: tempfile::TempDir, socket: PathBuf, args: &[String]) -> Daemon {
        Daemon::spawn_logging(dir, socket, args, "wasm_task=debug")
    }

    /// Like [`Daemon::spawn`] with `RUST_LOG` set to `filter`.
    pub fn spawn_logging(
        dir: tempfile::TempDir,
        socket: PathBuf,
        args: &[String],
        filter: &str,
    ) -> Daemon {
        let log = dir.path().join(format!("daemon-{}.log", unique()));
        let child = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
            .arg("serve")
            .arg(format!("--listen=unix:{}", socket.display()))
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting wasm-task serve");
        Daemon { child, _dir: dir, socket, log }
    }

    /// Polls until the daemon accepts connections.
    ///
    /// The probe connection gets a worker of its own; it says nothing and
    /// hangs up, and waits until that worker has exited and been reaped, so
    /// that tests counting workers start from none.
    pub fn wait_ready(&self) {
        let started = Instant::now();
        let mut probe = loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => break s,
                Err(_) => {
                    assert!(
                        started.elapsed() < READY_BOUND,
                        "daemon not ready:\n{}",
                        self.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        probe.shutdown(std::net::Shutdown::Write).unwrap();
        probe.set_read_timeout(Some(READY_BOUND)).unwrap();
        // Returns once the probe's worker has closed its end, i.e. exited.
        let _ = probe.read_to_end(&mut Vec::new());
        while !children(self.pid()).is_empty() {
            assert!(
                started.elapsed() < READY_BOUND,
                "probe worker not reaped:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's address for clients.
    pub fn address(&self) -> Address {
        Address::Unix(self.socket.clone())
    }

    /// A client builder for `module` on this daemon.
    pub fn client(&self, module: &str) -> ClientBuilder {
        Client::builder(self.address(), module)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the daemon logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- daemon log ({}) ----\n{}", self.log.display(), self.log_text());
        }
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.pid(), libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A number unique within this test process.
pub fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Worker processes among the children of `pid` (its zygotes left out).
pub fn children(pid: u32) -> Vec<u32> {
    all_children(pid).into_iter().filter(|&c| !is_zygote_or_spare(c)).collect()
}

/// The zygotes among the children of `pid`.
#[allow(dead_code)]
pub fn zygotes(pid: u32) -> Vec<u32> {
    let zygote =
        |c: &u32| fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|t| t.starts_with("wz:"));
    all_children(pid).into_iter().filter(zygote).collect()
}

fn all_children(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = fs::read_to_string(path).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The zygote of `module` among the children of `pid`, if one runs.
#[allow(dead_code)]
pub fn zygote_of(pid: u32, module: &str) -> Option<u32> {
    let comm = format!("wz:{module}\n");
    all_children(pid)
        .into_iter()
        .find(|c| fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|t| t == comm))
}

/// Whether `pid` is a zygote or a zygote's spare worker still waiting for
/// a connection (by the name it gives itself), not a worker.
fn is_zygote_or_spare(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.starts_with("wz:") || c.starts_with("ws:"))
}

/// The state letter of a process (`R`, `S`, `Z`, ...), or `None` if it is gone.
pub fn state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Whether the process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    state(pid).is_some_and(|s| s != 'Z')
}

/// Number of open descriptors of `pid`.
pub fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The command line of `pid`, NULs turned into spaces and trimmed.
pub fn cmdline(pid: u32) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = fs::File::open(format!("/proc/{pid}/cmdline")) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).replace('\0', " ").trim().to_string()
}

/// Polls `cond` until it holds, failing after [`READY_BOUND`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < READY_BOUND, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The arguments [`Daemon::start`] gives the daemon: the test guest as
/// `testguest`, the echo WAT guest as `echo`, then `extra`.
pub fn standard_args(extra: &[&str]) -> Vec<String> {
    let g = guests();
    let mut args = vec![
        format!("--module=testguest={}", g.testguest.display()),
        format!("--module=echo={}", g.echo_wat.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The WAT guest whose setup always fails.
pub fn bad_setup_wat() -> PathBuf {
    workspace().join("tests/guests/bad_setup.wat")
}

impl Daemon {
    /// Starts a new daemon on the same socket with `args`, once this one
    /// has stopped (see [`Daemon::stop`]), and waits until it is ready. Its
    /// log goes on in the same file.
    pub fn relaunch(&mut self, args: &[String]) {
        assert!(self.child.try_wait().unwrap().is_some(), "the daemon must be stopped first");
        let log = fs::OpenOptions::new().append(true).open(&self.log).unwrap();
        self.child = Command::new(env!("CARGO_BIN_EXE_wasm-task"))
            .arg("serve")
            .arg(format!("--listen=unix:{}", self.socket.display()))
            .args(args)
            .env("RUST_LOG", "wasm_task=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting wasm-task serve again");
        self.wait_ready();
    }

    /// How many lines of the daemon's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().lines().filter(|line| line.contains(needle)).count()
    }
}

/// Children of `pid` that are alive (zombies left out).
pub fn live_children(pid: u32) -> Vec<u32> {
    children(pid).into_iter().filter(|child| alive(*child)).collect()
}

/// Children of `pid` that are alive and still hold descriptors.
///
/// A worker's connection closes when the kernel releases its descriptors
/// as it exits; the process shows as running a little longer, while the
/// kernel finishes the exit. Those are left out: they hold nothing more.
pub fn running_children(pid: u32) -> Vec<u32> {
    live_children(pid).into_iter().filter(|child| fd_count(*child) > 0).collect()
}

/// Whether the process `pid` has exited and been reaped.
pub fn gone(pid: u32) -> bool {
    state(pid).is_none()
}

/// Samples the running children of a process (see [`running_children`]) on
/// a thread of its own, and remembers the most seen at once.
pub struct ChildWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl ChildWatch {
    /// Starts watching the children of `pid`.
    pub fn start(pid: u32) -> ChildWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut most = 0;
                while !stop.load(Ordering::SeqCst) {
                    most = most.max(running_children(pid).len());
                    std::thread::sleep(Duration::from_millis(1));
                }
                most
            }
        });
        ChildWatch { stop, thread: Some(thread) }
    }

    /// Stops watching; returns the most running children seen at once.
    pub fn most(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for ChildWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Path of the hostile WAT guest `name` (tests/guests/hostile/NAME.wat).
pub fn hostile_wat(name: &str) -> PathBuf {
    workspace().join(format!("tests/guests/hostile/{name}.wat"))
}

/// Path of a test guest in WAT (tests/guests/NAME.wat).
pub fn wat_guest(name: &str) -> PathBuf {
    workspace().join(format!("tests/guests/{name}.wat"))
}

/// Builds the Rust hostile guest (once per test process) and returns its path.
pub fn hostile_rust() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let root = workspace();
        let target = guests_target();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "--target", "wasm32-wasip1", "-p", "hostile-guest"])
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .expect("running cargo to build the hostile guest");
        assert!(status.success(), "building the hostile guest failed");
        target.join("wasm32-wasip1/release/hostile_guest.wasm")
    })
}

/// A bare protocol connection to one worker, for what the client library
/// does not show: log records, call stats, the worker's exact messages.
pub struct RawWorker {
    stream: UnixStream,
    /// The worker's process id, from its hello.
    pub pid: u32,
    next_id: u64,
}

/// A reply read by [`RawWorker::call`], owned.
#[derive(Debug)]
pub struct RawReply {
    /// The id of the call it answers.
    pub id: u64,
    /// The result bytes (MessagePack) or the worker's error.
    pub result: Result<Vec<u8>, wasm_task::protocol::ErrorReply>,
    /// The log records that came with it.
    pub logs: Vec<wasm_task::protocol::LogRecord>,
    /// What the call cost.
    pub stats: wasm_task::protocol::CallStats,
}

impl RawWorker {
    /// Connects to `daemon`, says hello for `module` and waits for the worker.
    pub fn connect(daemon: &Daemon, module: &str) -> RawWorker {
        RawWorker::connect_to(&daemon.socket, module)
    }

    /// Like [`RawWorker::connect`], to the daemon listening at `socket`.
    pub fn connect_to(socket: &Path, module: &str) -> RawWorker {
        use wasm_task::protocol::{self, PROTOCOL_VERSION, Request, Response};
        let mut stream = UnixStream::connect(socket).unwrap();
        stream.set_read_timeout(Some(READY_BOUND)).unwrap();
        let hello = Request::Hello { version: PROTOCOL_VERSION, module, client: "raw" };
        let mut frame = Vec::new();
        protocol::encode_frame(&hello, &mut frame).unwrap();
        std::io::Write::write_all(&mut stream, &frame).unwrap();
        let mut body = Vec::new();
        assert!(protocol::read_frame(&mut stream, &mut body, usize::MAX).unwrap(), "no hello");
        match protocol::decode::<Response>(&body).unwrap() {
            Response::Hello(hello) => RawWorker { stream, pid: hello.pid, next_id: 0 },
            other => panic!("expected a hello, got {other:?}"),
        }
    }

    /// Calls `method` and waits for its reply; `None` if the connection closed.
    pub fn call(
        &mut self,
        method: &str,
        args: &impl serde::Serialize,
        timeout_ms: Option<u64>,
    ) -> Option<RawReply> {
        let id = self.send(method, args, timeout_ms, None)?;
        let reply = self.receive()?;
        assert_eq!(reply.id, id, "a reply to another call");
        Some(reply)
    }

    /// Sends a call without waiting for its reply; its id, or `None` if the
    /// connection closed.
    pub fn send(
        &mut self,
        method: &str,
        args: &impl serde::Serialize,
        timeout_ms: Option<u64>,
        unless_failed_since: Option<u64>,
    ) -> Option<u64> {
        use wasm_task::protocol::{self, Request};
        self.next_id += 1;
        let args = rmp_serde::to_vec(args).unwrap();
        let call = Request::Call {
            id: self.next_id,
            method,
            args: &args,
            timeout_ms,
            unless_failed_since,
        };
        let mut frame = Vec::new();
        protocol::encode_frame(&call, &mut frame).unwrap();
        std::io::Write::write_all(&mut self.stream, &frame).ok()?;
        Some(self.next_id)
    }

    /// The connection itself, for bytes other than whole calls.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }

    /// Reads the next reply; `None` if the connection closed.
    pub fn receive(&mut self) -> Option<RawReply> {
        use wasm_task::protocol::{self, Response};
        let mut body = Vec::new();
        if !protocol::read_frame(&mut self.stream, &mut body, usize::MAX).ok()? {
            return None;
        }
        match protocol::decode::<Response>(&body).unwrap() {
            Response::Reply { id, result, logs, stats } => {
                Some(RawReply { id, result: result.map(|p| p.0.to_vec()), logs, stats })
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }
}

/// A line of `/proc/PID/status` starting with `key:`, without the key.
pub fn proc_status(pid: u32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{key}:");
    status.lines().find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

/// The soft and hard values of the rlimit named `name` (as `/proc/PID/limits`
/// spells it, e.g. "Max open files").
pub fn proc_limit(pid: u32, name: &str) -> Option<(String, String)> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let mut values = line[name.len()..].split_whitespace();
    Some((values.next()?.to_owned(), values.next()?.to_owned()))
}
