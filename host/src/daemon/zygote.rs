//! Zygotes: one process per module that builds the guest once and forks
//! every worker from it.
//!
//! A zygote is forked from the daemon and walled in like a worker. It
//! instantiates the module and runs the guest's `init` hook once, then
//! waits on a socket shared with the daemon. For each client of its module
//! the daemon sends it the connection's descriptor; the zygote forks, and
//! the child serves that connection with the instance it inherited, already
//! initialized: it runs only the per-worker `setup` hook before its first
//! call. What `init` built is shared copy-on-write between the zygote and
//! all its workers, so it costs its memory once and its time never again.
//!
//! A zygote forks with `CLONE_PARENT`, so every worker is the daemon's
//! child, reaped and counted by the daemon like a plainly forked one. The
//! zygote tells the daemon what became of each connection (a worker's pid
//! or why the fork failed) and whether init succeeded.
//!
//! Forking is only safe from a single thread, so the zygote keeps none
//! besides its main one by the time it forks: the thread that bounds
//! `init` is joined, and WASI calls made during `init` run on a
//! current-thread runtime that is dropped before the first fork (left to
//! itself, WASI would start a multi-thread runtime whose threads a forked
//! child lacks, hanging the child's first file call). The zygote checks
//! its thread count before it declares itself ready.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};
use wasmtime::Engine;

use super::guest::{self, log_budget, setup_error};
use super::hello::Hello;
use super::modules::LoadedModule;
use super::seccomp::{Filter, ZYGOTE_CLONE_FLAGS};
use super::title;
use super::worker::{self, Ready, Start, Stream};
use crate::protocol::{ErrorKind, ErrorReply};

/// Longest message on a zygote's socket, in bytes (a report of a failed
/// init carries the guest's message and backtrace, both bounded).
pub const MAX_MESSAGE: usize = 256 << 10;

/// Longest handoff message, in bytes (the client's name is cut short).
const MAX_HANDOFF: usize = 4 << 10;

/// How long `init` may stay stuck after being interrupted before the
/// zygote ends itself.
const GRACE: Duration = Duration::from_secs(1);

/// What the daemon sends with each connection it hands over (the
/// descriptor travels beside it as `SCM_RIGHTS`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Handoff {
    /// The name the client gave in its hello.
    pub client: String,
    /// Whether the connection is a unix-domain socket (else TCP).
    pub unix: bool,
}

/// What a zygote tells the daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    /// The guest is built and initialized: connections may come.
    Ready,
    /// Building the guest failed; the zygote exits.
    Failed(ErrorReply),
    /// A worker with this pid serves the connection handed over last.
    Spawned(i32),
    /// Forking for the connection handed over last failed; it is closed.
    SpawnFailed(String),
}

/// The life of a zygote, in the process forked for it; never returns.
///
/// `sock` is its end of the socket shared with the daemon; `filter` is the
/// zygote's system-call filter (a worker's, plus forking), and
/// `options.filter` the one each worker adds.
pub fn run(
    sock: OwnedFd,
    module: &LoadedModule,
    options: worker::Options<'_>,
    filter: Option<&Filter>,
) -> ! {
    title::set(&format!("wasm-task zygote {}", module.name), &format!("wz:{}", module.name));
    // A zygote has no use without its daemon, and may be busy in init when
    // the daemon dies without a word. (Forked workers do not inherit this.)
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let span = tracing::info_span!("zygote", module = %module.name, pid = std::process::id());
    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        span.in_scope(|| serve(sock, module, options, filter))
    }));
    let code = served.unwrap_or_else(|_| {
        span.in_scope(|| error!("zygote panicked; exiting"));
        101
    });
    exit_now(code)
}

fn serve(
    sock: OwnedFd,
    module: &LoadedModule,
    options: worker::Options<'_>,
    filter: Option<&Filter>,
) -> i32 {
    let started = Instant::now();
    let mut ready = match prepare(&sock, module, options, filter) {
        Ok(ready) => ready,
        Err(e) => {
            warn!(error = ?e.message, "building the guest failed; zygote exits");
            let _ = send(&sock, &Report::Failed(e));
            return 1;
        }
    };
    info!(elapsed_us = started.elapsed().as_micros() as u64, "zygote ready");
    if let Err(e) = send(&sock, &Report::Ready) {
        error!(error = %e, "cannot reach the daemon; zygote exits");
        return 1;
    }
    loop {
        match keep_a_spare(&sock, module, &mut ready, options) {
            Ok(Some(pid)) => {
                if let Err(e) = send(&sock, &Report::Spawned(pid)) {
                    error!(error = %e, "cannot reach the daemon; zygote exits");
                    return 1;
                }
            }
            Ok(None) => {
                info!("the daemon closed its socket; zygote exits");
                return 0;
            }
            Err(e) => {
                error!(error = %e, "cannot fork a spare worker; zygote exits");
                return 1;
            }
        }
    }
}

/// What a spare tells its zygote.
const TAKEN: u8 = b't';
const DAEMON_GONE: u8 = b'x';

/// Forks a spare worker and waits until it has taken a connection; returns
/// its pid then, or `None` once the daemon is gone.
///
/// The spare waits for the daemon's next connection itself, so that a
/// client never waits for a fork: the zygote forks the next spare while
/// the last one starts serving. A spare that dies before taking a
/// connection is replaced.
fn keep_a_spare(
    sock: &OwnedFd,
    module: &LoadedModule,
    ready: &mut Ready,
    options: worker::Options<'_>,
) -> io::Result<Option<i32>> {
    loop {
        let (ours, theirs) =
            socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC)?;
        let forking = Instant::now();
        // SAFETY: this process has a single thread (checked in `prepare`),
        // so the child starts with consistent memory; it never returns
        // from `spare`.
        let pid = match unsafe { fork_sibling() }? {
            0 => {
                drop(ours);
                spare(sock, theirs, module, ready, options)
            }
            pid => pid,
        };
        drop(theirs);
        debug!(spare.pid = pid, fork_us = forking.elapsed().as_micros() as u64, "spare forked");
        let mut word = [0u8; 1];
        let said = loop {
            match nix::unistd::read(&ours, &mut word) {
                Ok(n) => break (n == 1).then_some(word[0]),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break None,
            }
        };
        match said {
            Some(TAKEN) => return Ok(Some(pid)),
            Some(_) => return Ok(None),
            None => {
                warn!(spare.pid = pid, "a spare worker ended before taking a connection");
                // Not faster than this, should spares keep dying.
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A spare worker: waits for a connection from the daemon, tells the
/// zygote it took one, and serves it. Never returns.
fn spare(
    sock: &OwnedFd,
    signal: OwnedFd,
    module: &LoadedModule,
    ready: &mut Ready,
    options: worker::Options<'_>,
) -> ! {
    title::set(&format!("wasm-task spare {}", module.name), &format!("ws:{}", module.name));
    // While no client waits: installing a filter and starting a thread
    // take a while.
    let head_start = worker::HeadStart::new(&options);
    let got = receive(sock);
    let word = if matches!(got, Ok(Some(_))) { TAKEN } else { DAEMON_GONE };
    // The zygote may be gone; the daemon then finds this worker itself.
    let _ = nix::sys::socket::send(signal.as_raw_fd(), &[word], MsgFlags::MSG_NOSIGNAL);
    drop(signal);
    match got {
        Ok(Some((conn, handoff))) => {
            become_worker(sock, conn, handoff, module, ready, head_start, options)
        }
        Ok(None) => exit_now(0),
        Err(e) => {
            error!(error = %e, "a spare could not read from the daemon");
            exit_now(1)
        }
    }
}

fn exit_now(code: i32) -> ! {
    // SAFETY: ends this forked child without running the daemon's
    // exit-time handlers.
    unsafe { libc::_exit(code) }
}

/// Builds the guest and runs its init hook, leaving this process with a
/// single thread.
fn prepare(
    sock: &OwnedFd,
    module: &LoadedModule,
    options: worker::Options<'_>,
    filter: Option<&Filter>,
) -> Result<Ready, ErrorReply> {
    // Opened while paths may still be opened; read after the filter is in.
    let stat = File::open("/proc/self/stat")
        .map_err(|e| setup_error(format!("opening /proc/self/stat: {e}")))?;
    // Timers only: an I/O driver would also set up tokio's process-wide
    // signal pipe, which every worker would then share.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| setup_error(format!("starting the runtime for init: {e}")))?;
    let built = {
        // WASI's synchronous calls run on the runtime they find entered.
        let _context = runtime.enter();
        let guard = sock
            .try_clone()
            .and_then(|sock| InitGuard::start(&module.engine, options.hung_timeout, sock))
            .map_err(|e| setup_error(format!("starting the init guard: {e}")))?;
        let built = worker::build_guest(module, log_budget(options.max_frame), filter);
        guard.stop();
        built
    };
    drop(runtime);
    super::listener::release_free_heap();
    let ready = built.map_err(|mut e| {
        if e.kind == ErrorKind::Timeout {
            e.message = format!(
                "init did not finish within the daemon's hung-worker timeout of {:?}",
                options.hung_timeout
            );
        }
        if !matches!(e.kind, ErrorKind::Protocol) {
            e.kind = ErrorKind::SetupFailed;
        }
        e
    })?;
    let threads = thread_count(&stat).map_err(|e| setup_error(format!("counting threads: {e}")))?;
    if threads != 1 {
        return Err(setup_error(format!(
            "{} threads besides the main one are still running after init; workers cannot be forked safely",
            threads - 1
        )));
    }
    Ok(ready)
}

/// Bounds `init` by the hung-worker timeout: interrupts the guest at the
/// timeout, ends the process if it is still stuck a grace period later.
/// A thread of its own, joined before the zygote forks.
struct InitGuard {
    done: mpsc::Sender<()>,
    thread: thread::JoinHandle<()>,
}

impl InitGuard {
    /// `sock` (the zygote's socket) is where it says why, should it end
    /// the process.
    fn start(engine: &Engine, limit: Duration, sock: OwnedFd) -> io::Result<InitGuard> {
        let (done, finished) = mpsc::channel::<()>();
        let engine = engine.clone();
        let thread = thread::Builder::new().name("init-guard".into()).spawn(move || {
            if finished.recv_timeout(limit) != Err(RecvTimeoutError::Timeout) {
                return;
            }
            engine.increment_epoch();
            if finished.recv_timeout(GRACE) == Err(RecvTimeoutError::Timeout) {
                error!("init is stuck past the hung-worker timeout; zygote exits");
                let message = format!(
                    "init did not finish within the daemon's hung-worker timeout of {limit:?} \
                     (stuck in a host call)"
                );
                let _ = send(&sock, &Report::Failed(setup_error(message)));
                // SAFETY: ends the process at once; the main thread is
                // stuck in the guest and holds nothing that needs teardown.
                unsafe { libc::_exit(1) }
            }
        })?;
        Ok(InitGuard { done, thread })
    }

    fn stop(self) {
        drop(self.done);
        let _ = self.thread.join();
    }
}

/// Threads of this process, from its `/proc/self/stat` (field 20).
fn thread_count(stat: &File) -> io::Result<usize> {
    let mut buf = [0u8; 4096];
    let n = stat.read_at(&mut buf, 0)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    // The command name (field 2) may hold spaces and parentheses; the
    // fields after its closing parenthesis start with field 3.
    text.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| io::Error::other(format!("unreadable /proc/self/stat: {text:?}")))
}

/// The first steps of a worker forked from the zygote; never returns.
fn become_worker(
    sock: &OwnedFd,
    conn: OwnedFd,
    handoff: Handoff,
    module: &LoadedModule,
    ready: &mut Ready,
    head_start: worker::HeadStart,
    options: worker::Options<'_>,
) -> ! {
    // The zygote's socket is not the worker's business. Its owner lives on
    // in the zygote's frame, which this process never returns to.
    // SAFETY: closes a descriptor nothing in this process uses again.
    unsafe { libc::close(sock.as_raw_fd()) };
    let hello = Hello { module: module.name.clone(), client: handoff.client };
    let stream = Stream::from_fd(conn, handoff.unix);
    worker::run(stream, Start::Zygote(module, ready, head_start), &hello, options)
}

/// Forks this process as a sibling: the child's parent is this process's
/// parent (the daemon). Returns 0 in the child and its pid in the parent.
///
/// # Safety
///
/// As for `fork`: the process must have a single thread. Unlike libc's
/// `fork`, no `pthread_atfork` handlers run (none are registered here).
unsafe fn fork_sibling() -> io::Result<i32> {
    // SAFETY: a clone without a new stack continues on a copy of this one,
    // as fork does; the caller guarantees a single thread.
    let rc =
        unsafe { libc::syscall(libc::SYS_clone, ZYGOTE_CLONE_FLAGS as libc::c_ulong, 0, 0, 0, 0) };
    if rc == 0 {
        // Siblings must not draw the zygote's random numbers.
        guest::forked();
    }
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc as i32) }
}

/// Sends `msg` as one message on a zygote socket, with `fd` beside it.
pub fn send_with<T: Serialize>(sock: &OwnedFd, msg: &T, fd: Option<&OwnedFd>) -> io::Result<()> {
    let bytes = rmp_serde::to_vec(msg).map_err(io::Error::other)?;
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let rights = fds.as_ref().map(|fds| ControlMessage::ScmRights(fds));
    let cmsgs: &[ControlMessage<'_>] = match &rights {
        Some(r) => std::slice::from_ref(r),
        None => &[],
    };
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Sends `msg` as one message on a zygote socket.
pub fn send<T: Serialize>(sock: &OwnedFd, msg: &T) -> io::Result<()> {
    send_with(sock, msg, None)
}

/// Receives one message (and a descriptor, if one came with it) from a
/// zygote socket into `buf`; `None` when the other end closed it.
pub fn receive_with<T: for<'de> Deserialize<'de>>(
    sock: &OwnedFd,
    buf: &mut [u8],
) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (len, fd, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut *buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fd = None;
                for cmsg in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(fds) = cmsg {
                        for raw in fds {
                            // SAFETY: the kernel just installed this
                            // descriptor in this process for us alone.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            fd.get_or_insert(owned);
                        }
                    }
                }
                break (msg.bytes, fd, msg.flags.contains(MsgFlags::MSG_TRUNC));
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if len == 0 && fd.is_none() {
        return Ok(None);
    }
    if truncated {
        return Err(io::Error::other("message above the size limit"));
    }
    let msg = rmp_serde::from_slice(&buf[..len]).map_err(io::Error::other)?;
    Ok(Some((msg, fd)))
}

/// Waits for the daemon's next connection.
fn receive(sock: &OwnedFd) -> io::Result<Option<(OwnedFd, Handoff)>> {
    let mut buf = [0u8; MAX_HANDOFF];
    match receive_with::<Handoff>(sock, &mut buf)? {
        None => Ok(None),
        Some((handoff, Some(fd))) => Ok(Some((fd, handoff))),
        Some((_, None)) => Err(io::Error::other("a handoff came without its connection")),
    }
}
