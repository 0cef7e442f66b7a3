//! The parent process: bind, accept, read hellos, start workers, reap.
//!
//! The loop is single-threaded on purpose: fork() carries only the calling
//! thread into the child, so no other thread may exist to hold a lock the
//! child would need. Signals arrive through a signalfd polled beside the
//! listening socket, so there are no signal handlers either.
//!
//! Each connection's hello is read here, without blocking (`hello`); it
//! names the module, whose setting decides where the worker comes from: the
//! module's zygote (`zygote`, started here and restarted with back-off
//! when it fails) or a plain fork of this process. Either way the worker is
//! this process's child, reaped and counted here.
//!
//! At most `max_workers` workers live at once, connections still sending
//! their hello or waiting for their zygote included. At the cap the loop
//! stops accepting: further connections wait in the kernel's backlog (their
//! clients see a slow connect, bounded by their own timeouts) and are
//! accepted as workers exit.

use std::collections::{HashSet, VecDeque};
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, socketpair};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};
use tracing::{debug, error, info, warn};

use super::guest::{self, setup_error};
use super::hello::{self, Hello, Pending, Progress, printable};
use super::modules::Modules;
use super::settings::Spawn;
use super::worker::{self, Start, Stream};
use super::zygote::{self, Handoff, Report};
use super::{Config, harden, seccomp, title};
use crate::Address;
use crate::protocol::{ErrorKind, ErrorReply};

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Compiles every module first (a bad module is an error before anything
/// listens), then binds `config.listen` and serves. On a stop signal it stops
/// accepting, removes its socket file and returns; workers already running
/// finish their calls and end when their clients disconnect.
pub fn serve(config: Config) -> anyhow::Result<()> {
    check_config(&config)?;
    let filter = seccomp::Filter::new(config.seccomp);
    let zygote_filter = seccomp::Filter::for_zygote(config.seccomp);
    if config.seccomp != seccomp::Mode::Off && filter.is_none() {
        bail!("system-call filters are not built for this architecture; pass --seccomp off");
    }
    let modules = Modules::load(&config)?;
    release_free_heap();
    check_descriptors(config.max_workers);
    let names: Vec<_> = modules.modules.iter().map(|m| m.name.as_str()).collect();
    // Without /dev/null workers keep the daemon's stdin and stdout.
    let dev_null = harden::open_dev_null().ok();

    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    let old_mask = signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).context("blocking signals")?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating signalfd")?;

    title::prepare();
    // One malloc arena for every thread: a worker's watchdog and runtime
    // threads then skip glibc's per-thread arena (a 64-128 MiB mapping each,
    // set up while the worker starts) and share the main one.
    // SAFETY: mallopt only tunes the allocator; called before any thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let listener = Listener::bind(&config.listen)?;
    info!(
        address = %listener.describe(),
        modules = ?names,
        pid = std::process::id(),
        max_workers = config.max_workers,
        hung_timeout_ms = config.hung_timeout.as_millis() as u64,
        seccomp = %config.seccomp,
        "listening"
    );
    for m in &modules.modules {
        info!(module = %m.name, limits = %m.settings.limits, spawn = %m.settings.spawn, "module settings");
    }
    let start = ChildStart {
        modules: &modules,
        options: worker::Options {
            // No frame can be longer, whatever the configuration says.
            max_frame: config.max_frame.min(crate::protocol::LARGEST_FRAME),
            hung_timeout: config.hung_timeout,
            filter: filter.as_ref(),
        },
        zygote_filter: zygote_filter.as_ref(),
        identity: config.identity,
        mask: &old_mask,
        dev_null: dev_null.as_ref(),
    };
    let zygotes = modules
        .modules
        .iter()
        .map(|m| (m.settings.spawn == Spawn::Zygote).then(Zygote::default))
        .collect();
    let mut daemon = Daemon {
        max_workers: config.max_workers,
        listener,
        sfd,
        start,
        pending: Vec::new(),
        zygotes,
        workers: HashSet::new(),
        reaped_early: HashSet::new(),
        reports: vec![0; zygote::MAX_MESSAGE],
        cap_warned: None,
    };
    for index in 0..daemon.zygotes.len() {
        if daemon.zygotes[index].is_some() {
            daemon.start_zygote(index);
        }
    }
    daemon.run()?;

    info!("stop signal received; no longer accepting, running workers finish on their own");
    daemon.stop_zygotes();
    daemon.listener.remove_socket_file();
    Ok(())
}

/// Gives the heap's free pages back to the kernel.
///
/// Compiling modules leaves megabytes of freed heap that malloc keeps
/// mapped; every fork would copy their page tables and every child would
/// inherit them. Dropping them makes forks cheaper.
pub fn release_free_heap() {
    // SAFETY: malloc_trim only returns free memory to the kernel.
    unsafe { libc::malloc_trim(0) };
}

/// Least time between two warnings that the worker cap is reached.
const CAP_WARNING: Duration = Duration::from_secs(60);

/// First wait before restarting a failed zygote; it doubles with each
/// failure in a row, up to [`ZYGOTE_BACKOFF_MAX`].
const ZYGOTE_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait before restarting a failed zygote.
const ZYGOTE_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// Refuses settings the daemon cannot honour on this host.
fn check_config(config: &Config) -> anyhow::Result<()> {
    if config.max_workers == 0 {
        bail!("--max-workers must be at least 1");
    }
    if config.hung_timeout.is_zero() {
        bail!("--hung-timeout must be above 0");
    }
    if config.identity.is_none() && nix::unistd::Uid::effective().is_root() {
        warn!("workers run as root; pass --user to run them as an unprivileged user");
    }
    Ok(())
}

/// Raises the daemon's descriptor limit to its hard limit, and warns when
/// that still leaves too few for `max_workers` connections in waiting (the
/// daemon holds each one's descriptor until a worker has it).
fn check_descriptors(max_workers: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `limit` is valid for reads and writes during both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    // Room for the listener, the signalfd, the modules and the zygotes.
    let needed = (max_workers as u64).saturating_mul(2).saturating_add(64);
    if limit.rlim_cur < needed {
        warn!(
            max_workers,
            rlimit_nofile = limit.rlim_cur,
            "the descriptor limit is low for --max-workers; connections may be refused (raise `ulimit -n`)"
        );
    }
}

/// What every forked worker and zygote starts from.
struct ChildStart<'a> {
    modules: &'a Modules,
    options: worker::Options<'a>,
    /// The filter zygotes install (a worker's, plus forking).
    zygote_filter: Option<&'a seccomp::Filter>,
    identity: Option<harden::Identity>,
    /// The signal mask the daemon started with, restored in children.
    mask: &'a SigSet,
    dev_null: Option<&'a OwnedFd>,
}

/// The daemon's state between two turns of its loop.
struct Daemon<'a> {
    max_workers: usize,
    listener: Listener,
    sfd: SignalFd,
    start: ChildStart<'a>,
    /// Connections whose hello is still arriving.
    pending: Vec<Pending>,
    /// Per module, in the modules' order: its zygote, or `None` when its
    /// workers are plain forks.
    zygotes: Vec<Option<Zygote>>,
    /// Worker processes alive (the daemon's children either way).
    workers: HashSet<i32>,
    /// Workers reaped before their zygote reported forking them.
    reaped_early: HashSet<i32>,
    /// Buffer for zygotes' reports.
    reports: Vec<u8>,
    cap_warned: Option<Instant>,
}

/// A module's zygote as the daemon sees it.
#[derive(Default)]
struct Zygote {
    state: ZygoteState,
    /// Connections waiting for the zygote to become ready or for its socket
    /// to take them, in arrival order.
    queue: VecDeque<Waiting>,
    /// Connections handed over that the zygote has not reported on yet,
    /// oldest first (it handles them in order). The daemon keeps its copy
    /// of each, to refuse it clearly should the zygote fail before forking
    /// a worker for it.
    inflight: VecDeque<(OwnedFd, Handoff)>,
    /// Failures in a row, for the back-off.
    failures: u32,
    /// Why the running zygote said it failed.
    error: Option<ErrorReply>,
}

/// A connection waiting for its module's zygote.
struct Waiting {
    fd: OwnedFd,
    handoff: Handoff,
    /// Whether to watch it for a hang-up (until data follows the hello:
    /// then it would stay readable, and its client is there anyway).
    watch: bool,
}

#[derive(Default)]
enum ZygoteState {
    /// A zygote process exists.
    Up {
        pid: i32,
        /// The daemon's end of the socket shared with it (non-blocking).
        sock: OwnedFd,
        /// Whether its guest is built and it takes connections.
        ready: bool,
        /// Whether it closed its end.
        closed: bool,
    },
    /// No zygote runs; one starts again at `restart_at`.
    Down { restart_at: Instant, reason: ErrorReply },
    /// Not started yet.
    #[default]
    New,
}

/// Which descriptors polled ready, by kind.
#[derive(Default)]
struct Events {
    signal: bool,
    accept: bool,
    /// Zygote indices whose socket is readable or writable.
    zygotes: Vec<usize>,
    /// Indices into `pending` that are readable.
    pending: Vec<usize>,
    /// Connections waiting for a zygote that became readable or hung up:
    /// (zygote index, queue index).
    waiting: Vec<(usize, usize)>,
}

/// Most connections accepted in one turn of the loop, so that a flood of
/// connections that close at once cannot keep it from reaping children,
/// restarting zygotes and hearing signals.
const ACCEPTS_PER_TURN: usize = 64;

impl Daemon<'_> {
    fn run(&mut self) -> anyhow::Result<()> {
        loop {
            let events = self.wait()?;
            // First, while the queues are as they were polled.
            self.check_waiting(&events.waiting);
            if events.signal && self.handle_signals()? {
                return Ok(());
            }
            for index in events.zygotes {
                self.read_reports(index, true);
                self.flush(index);
            }
            self.read_hellos(&events.pending);
            if events.accept {
                self.accept_all();
            }
            self.run_timers();
        }
    }

    /// Slots of `max_workers` taken: live workers, and connections on
    /// their way to becoming workers.
    fn used(&self) -> usize {
        let zygotes: usize =
            self.zygotes.iter().flatten().map(|z| z.queue.len() + z.inflight.len()).sum();
        self.workers.len() + self.pending.len() + zygotes
    }

    /// Blocks until something needs the loop's attention.
    fn wait(&self) -> anyhow::Result<Events> {
        let now = Instant::now();
        let room = self.used() < self.max_workers;
        let mut fds = vec![PollFd::new(self.sfd.as_fd(), PollFlags::POLLIN)];
        if room {
            fds.push(PollFd::new(self.listener.fd(), PollFlags::POLLIN));
        }
        let mut zygote_at = Vec::new();
        for (index, z) in self.zygotes.iter().enumerate() {
            let Some(Zygote {
                state: ZygoteState::Up { sock, ready, closed: false, .. },
                queue,
                ..
            }) = z
            else {
                continue;
            };
            let mut flags = PollFlags::POLLIN;
            if *ready && !queue.is_empty() {
                flags |= PollFlags::POLLOUT;
            }
            fds.push(PollFd::new(sock.as_fd(), flags));
            zygote_at.push(index);
        }
        let first_pending = fds.len();
        fds.extend(self.pending.iter().map(|p| PollFd::new(p.fd(), PollFlags::POLLIN)));
        let first_waiting = fds.len();
        let mut waiting_at = Vec::new();
        for (index, z) in self.zygotes.iter().enumerate() {
            for (at, w) in z.iter().flat_map(|z| z.queue.iter()).enumerate() {
                if w.watch {
                    fds.push(PollFd::new(w.fd.as_fd(), PollFlags::POLLIN));
                    waiting_at.push((index, at));
                }
            }
        }

        let timeout = match self.next_timer() {
            None => PollTimeout::NONE,
            Some(at) => {
                let ms = at.saturating_duration_since(now).as_millis().saturating_add(1);
                PollTimeout::try_from(ms.min(60_000) as u32).unwrap_or(PollTimeout::MAX)
            }
        };
        loop {
            match poll(&mut fds, timeout) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).context("waiting for connections"),
            }
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let zygote_events = first_pending - zygote_at.len();
        Ok(Events {
            signal: ready(&fds[0]),
            accept: room && ready(&fds[1]),
            zygotes: zygote_at
                .iter()
                .enumerate()
                .filter(|(i, _)| ready(&fds[zygote_events + i]))
                .map(|(_, &index)| index)
                .collect(),
            pending: (0..self.pending.len()).filter(|i| ready(&fds[first_pending + i])).collect(),
            waiting: waiting_at
                .into_iter()
                .enumerate()
                .filter(|(i, _)| ready(&fds[first_waiting + i]))
                .map(|(_, at)| at)
                .collect(),
        })
    }

    /// The earliest moment something is due: a hello's deadline or a
    /// zygote's restart.
    fn next_timer(&self) -> Option<Instant> {
        let hellos = self.pending.iter().map(|p| p.deadline);
        let restarts = self.zygotes.iter().flatten().filter_map(|z| match z.state {
            ZygoteState::Down { restart_at, .. } => Some(restart_at),
            _ => None,
        });
        hellos.chain(restarts).min()
    }

    /// Reads pending signals and reaps children; returns whether to stop.
    fn handle_signals(&mut self) -> anyhow::Result<bool> {
        let mut stop = false;
        while let Some(info) = self.sfd.read_signal().context("reading signalfd")? {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap_children(),
                Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                    info!(signal = %sig, "received stop signal");
                    stop = true;
                }
                _ => {}
            }
        }
        Ok(stop)
    }

    /// Collects every exited child, so none lingers as a zombie.
    fn reap_children(&mut self) {
        loop {
            let (pid, how) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => {
                    (pid.as_raw(), format!("exited with code {code}"))
                }
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    (pid.as_raw(), format!("was killed by {sig}"))
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            let zygote = self.zygotes.iter().position(|z| {
                matches!(z, Some(Zygote { state: ZygoteState::Up { pid: p, .. }, .. }) if *p == pid)
            });
            if let Some(index) = zygote {
                self.zygote_down(index, &how);
            } else if self.workers.remove(&pid) {
                info!(worker.pid = pid, "worker {how}");
            } else {
                // Its zygote has not reported it yet.
                info!(worker.pid = pid, "worker {how}");
                self.reaped_early.insert(pid);
            }
        }
    }

    /// Advances the hellos whose sockets are readable, routing the finished ones.
    fn read_hellos(&mut self, readable: &[usize]) {
        if readable.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let mut readable = readable.iter().peekable();
        for (i, mut p) in pending.into_iter().enumerate() {
            if readable.next_if_eq(&&i).is_none() {
                self.pending.push(p);
                continue;
            }
            match p.advance() {
                Progress::Waiting => self.pending.push(p),
                Progress::Gone => debug!("a client left before finishing its hello"),
                Progress::Bad(e) => p.refuse(e),
                Progress::Done(hello) => self.route(p, hello),
            }
        }
    }

    /// Accepts pending connections, as many as the worker cap leaves room for.
    fn accept_all(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            if self.used() >= self.max_workers {
                break;
            }
            let stream = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or similar. The connection stays queued
                    // and the listener stays readable, so pause before the next
                    // try instead of spinning (and flooding the log).
                    error!(error = %e, "accepting a connection failed; pausing 100 ms");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            };
            // The hello often arrives with the connection: no need to wait
            // for the next turn of the loop to read it.
            let mut p = Pending::new(stream, Instant::now());
            match p.advance() {
                Progress::Waiting => self.pending.push(p),
                Progress::Gone => debug!("a client left before finishing its hello"),
                Progress::Bad(e) => p.refuse(e),
                Progress::Done(hello) => self.route(p, hello),
            }
        }
        // Once a minute at most: a daemon kept at its cap would otherwise
        // say so at every worker start.
        if self.used() >= self.max_workers
            && self.cap_warned.is_none_or(|t| t.elapsed() > CAP_WARNING)
        {
            warn!(
                max_workers = self.max_workers,
                "at the worker cap; new connections wait until a worker exits"
            );
            self.cap_warned = Some(Instant::now());
        }
    }

    /// Gives a connection whose hello is in to a worker of its module.
    fn route(&mut self, pending: Pending, hello: Hello) {
        let modules = self.start.modules;
        let Some(index) = modules.modules.iter().position(|m| m.name == hello.module) else {
            let served: Vec<_> = modules.modules.iter().map(|m| m.name.as_str()).collect();
            let message = format!(
                "the daemon serves no module {:?} (it serves: {})",
                printable(&hello.module),
                served.join(", ")
            );
            return pending.refuse(ErrorReply {
                kind: ErrorKind::UnknownModule,
                message,
                backtrace: None,
            });
        };
        if let Some(Zygote { state: ZygoteState::Down { restart_at, reason }, .. }) =
            &self.zygotes[index]
        {
            let error = zygote_down_error(&modules.modules[index].name, reason, *restart_at);
            return pending.refuse(error);
        }
        let stream = match pending.into_stream() {
            Ok(s) => s,
            Err(e) => return warn!(error = %e, "a connection became unusable"),
        };
        match &mut self.zygotes[index] {
            None => self.fork_worker(stream, index, hello),
            Some(z) => {
                let unix = stream.is_unix();
                let handoff = Handoff { client: hello.client, unix };
                z.queue.push_back(Waiting { fd: stream.into_fd(), handoff, watch: true });
                self.flush(index);
            }
        }
    }

    /// Forks a worker that builds its guest itself.
    fn fork_worker(&mut self, stream: Stream, index: usize, hello: Hello) {
        let module = &self.start.modules.modules[index];
        // SAFETY: this process is single-threaded here (see the module docs),
        // so the child starts with consistent memory; the child never returns
        // from `worker::run`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                enter_child(&self.start, &[stream.raw_fd()]);
                worker::run(stream, Start::Fresh(module), &hello, self.start.options)
            }
            Ok(ForkResult::Parent { child }) => {
                info!(worker.pid = child.as_raw(), module = %module.name, "worker forked");
                self.workers.insert(child.as_raw());
                // The stream is dropped here: the parent keeps no descriptor
                // of a worker's connection.
            }
            Err(e) => error!(error = %e, "fork failed; dropping the connection"),
        }
    }

    /// Starts the zygote of the module at `index`.
    fn start_zygote(&mut self, index: usize) {
        let module = &self.start.modules.modules[index];
        let (ours, theirs) = match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(pair) => pair,
            Err(e) => return self.zygote_failed_to_start(index, &format!("socketpair: {e}")),
        };
        if let Err(e) =
            nix::fcntl::fcntl(&ours, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))
        {
            return self.zygote_failed_to_start(index, &format!("fcntl: {e}"));
        }
        // SAFETY: single-threaded, as for workers; the child never returns
        // from `zygote::run`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                enter_child(&self.start, &[theirs.as_raw_fd()]);
                zygote::run(theirs, module, self.start.options, self.start.zygote_filter)
            }
            Ok(ForkResult::Parent { child }) => {
                info!(zygote.pid = child.as_raw(), module = %module.name, "zygote forked");
                let z = self.zygotes[index].as_mut().expect("a zygote module");
                z.state = ZygoteState::Up {
                    pid: child.as_raw(),
                    sock: ours,
                    ready: false,
                    closed: false,
                };
            }
            Err(e) => self.zygote_failed_to_start(index, &format!("fork: {e}")),
        }
    }

    fn zygote_failed_to_start(&mut self, index: usize, why: &str) {
        error!(module = %self.start.modules.modules[index].name, error = why, "could not start a zygote");
        self.mark_down(index, setup_error(format!("its zygote could not be started ({why})")));
    }

    /// Reads what the zygote at `index` has reported; `alive` when it has
    /// not been reaped yet (and may be stopped if it talks nonsense).
    fn read_reports(&mut self, index: usize, alive: bool) {
        let name = &self.start.modules.modules[index].name;
        let mut reset = false;
        loop {
            let Some(z) = self.zygotes[index].as_mut() else { return };
            let ZygoteState::Up { sock, ready, closed, pid } = &mut z.state else { return };
            let report = match zygote::receive_with::<Report>(sock, &mut self.reports) {
                Ok(Some((report, _))) => report,
                Ok(None) => {
                    *closed = true;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A zygote that died with handoffs unread: the kernel says
                // so once, then hands over the reports still queued.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !reset => {
                    reset = true;
                    continue;
                }
                Err(e) => {
                    warn!(module = %name, error = %e, "unreadable report from a zygote");
                    if alive {
                        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                    }
                    *closed = true;
                    return;
                }
            };
            match report {
                Report::Ready => {
                    info!(module = %name, zygote.pid = *pid, "zygote ready");
                    *ready = true;
                    z.failures = 0;
                }
                Report::Failed(e) => {
                    warn!(module = %name, error = ?e.message, "zygote could not build the guest");
                    z.error = Some(e);
                }
                Report::Spawned(worker) => {
                    // The worker has its own copy of the connection now.
                    z.inflight.pop_front();
                    info!(worker.pid = worker, module = %name, "worker forked from the zygote");
                    if !self.reaped_early.remove(&worker) {
                        self.workers.insert(worker);
                    }
                }
                Report::SpawnFailed(e) => {
                    warn!(module = %name, error = ?e, "the zygote could not fork a worker");
                    if let Some((fd, handoff)) = z.inflight.pop_front() {
                        let message = format!("the daemon could not start a worker: {e}");
                        refuse_fd(fd, handoff.unix, setup_error(message));
                    }
                }
            }
        }
    }

    /// Hands the queued connections to the zygote at `index`, as far as it
    /// is ready and its socket takes them.
    fn flush(&mut self, index: usize) {
        let Some(z) = self.zygotes[index].as_mut() else { return };
        let ZygoteState::Up { sock, ready: true, closed: false, .. } = &z.state else { return };
        while let Some(w) = z.queue.front() {
            let keep = match w.fd.try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    // Out of descriptors: waiting would only spin on the
                    // socket's writability.
                    warn!(error = %e, "cannot keep a copy of a connection; refusing it");
                    let w = z.queue.pop_front().expect("looked at above");
                    let message = format!("the daemon could not hand the connection over: {e}");
                    refuse_fd(w.fd, w.handoff.unix, setup_error(message));
                    continue;
                }
            };
            match zygote::send_with(sock, &w.handoff, Some(&w.fd)) {
                Ok(()) => {
                    let w = z.queue.pop_front().expect("looked at above");
                    drop(w.fd);
                    z.inflight.push_back((keep, w.handoff));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // The zygote is going away; the queue is refused once
                    // it has been reaped.
                    warn!(error = %e, "handing a connection to the zygote failed");
                    return;
                }
            }
        }
    }

    /// Drops the waiting connections whose clients hung up.
    fn check_waiting(&mut self, readable: &[(usize, usize)]) {
        // Back to front, so that removals keep the earlier indices valid.
        for &(index, at) in readable.iter().rev() {
            let Some(z) = self.zygotes[index].as_mut() else { continue };
            let Some(w) = z.queue.get_mut(at) else { continue };
            let mut byte = [0u8; 1];
            match nix::sys::socket::recv(
                w.fd.as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    debug!("a client waiting for its zygote hung up");
                    z.queue.remove(at);
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(e) => {
                    debug!(error = %e, "a connection waiting for its zygote broke");
                    z.queue.remove(at);
                }
                Ok(_) => w.watch = false,
            }
        }
    }

    /// The zygote at `index` has ended (and been reaped).
    fn zygote_down(&mut self, index: usize, how: &str) {
        // Reports it sent before it ended still count.
        self.read_reports(index, false);
        for other in 0..self.zygotes.len() {
            if other != index {
                self.read_reports(other, true);
            }
        }
        // Workers it forked but did not live to report are the daemon's
        // children all the same: find them, and count them.
        let zygote_pids: Vec<i32> = self.zygotes.iter().flatten().filter_map(Zygote::pid).collect();
        let orphans: Vec<i32> = own_children()
            .into_iter()
            .filter(|p| !self.workers.contains(p) && !zygote_pids.contains(p) && !is_spare(*p))
            .collect();
        let z = self.zygotes[index].as_mut().expect("a zygote module");
        let served = orphans.len().min(z.inflight.len());
        for pid in orphans {
            info!(worker.pid = pid, "worker forked by a zygote that died before reporting it");
            self.workers.insert(pid);
        }
        // The oldest handoffs are the ones those workers serve; the
        // daemon's copies of them just close.
        z.inflight.drain(..served);
        let reason = z.error.take().unwrap_or_else(|| setup_error(format!("its zygote {how}")));
        let name = &self.start.modules.modules[index].name;
        warn!(module = %name, reason = ?reason.message, "zygote ended");
        self.mark_down(index, reason);
        if self.zygotes.iter().flatten().all(|z| z.inflight.is_empty()) {
            // No report is due any more that could name these.
            self.reaped_early.clear();
        }
    }

    /// Schedules the restart of the zygote at `index` after a failure, and
    /// refuses the connections waiting for it.
    fn mark_down(&mut self, index: usize, reason: ErrorReply) {
        let name = &self.start.modules.modules[index].name;
        let z = self.zygotes[index].as_mut().expect("a zygote module");
        let delay = ZYGOTE_BACKOFF.saturating_mul(1 << z.failures.min(16)).min(ZYGOTE_BACKOFF_MAX);
        z.failures = z.failures.saturating_add(1);
        let restart_at = Instant::now() + delay;
        let error = zygote_down_error(name, &reason, restart_at);
        let waiting = z.queue.drain(..).map(|w| (w.fd, w.handoff));
        for (fd, handoff) in z.inflight.drain(..).chain(waiting) {
            refuse_fd(fd, handoff.unix, error.clone());
        }
        z.state = ZygoteState::Down { restart_at, reason };
    }

    /// Drops hellos past their deadline and restarts zygotes due.
    fn run_timers(&mut self) {
        let now = Instant::now();
        let (expired, pending) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition::<Vec<_>, _>(|p| p.deadline <= now);
        self.pending = pending;
        for p in expired {
            info!("a client sent no complete hello in time; closing its connection");
            let message = format!("no complete hello within {:?}", hello::HELLO_TIMEOUT);
            p.refuse(ErrorReply { kind: ErrorKind::Protocol, message, backtrace: None });
        }
        for index in 0..self.zygotes.len() {
            if let Some(Zygote { state: ZygoteState::Down { restart_at, .. }, .. }) =
                &self.zygotes[index]
                && *restart_at <= now
            {
                self.start_zygote(index);
            }
        }
    }

    /// Ends every zygote: the daemon is stopping and forks no more workers.
    /// Connections not yet handed to a worker are refused.
    fn stop_zygotes(&mut self) {
        let stopping = || setup_error("the daemon is stopping".into());
        for z in self.zygotes.iter_mut().flatten() {
            if let ZygoteState::Up { pid, .. } = z.state {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let waiting = z.queue.drain(..).map(|w| (w.fd, w.handoff));
            for (fd, handoff) in z.inflight.drain(..).chain(waiting) {
                refuse_fd(fd, handoff.unix, stopping());
            }
        }
        for p in self.pending.drain(..) {
            p.refuse(stopping());
        }
    }
}

/// The refusal a client of a module without a working zygote gets.
fn zygote_down_error(module: &str, reason: &ErrorReply, restart_at: Instant) -> ErrorReply {
    let wait = restart_at.saturating_duration_since(Instant::now()).as_millis();
    ErrorReply {
        kind: ErrorKind::SetupFailed,
        message: format!(
            "module `{module}` cannot start workers: {} (the daemon tries again in {wait} ms)",
            reason.message
        ),
        backtrace: reason.backtrace.clone(),
    }
}

/// Refuses a connection held as a bare descriptor, best effort.
fn refuse_fd(fd: OwnedFd, unix: bool, error: ErrorReply) {
    let stream = Stream::from_fd(fd, unix);
    if stream.set_nonblocking(true).is_ok() {
        hello::refuse(stream, error);
    }
}

/// The pids of this process's children, from `/proc`.
fn own_children() -> Vec<i32> {
    let pid = std::process::id();
    let path = format!("/proc/{pid}/task/{pid}/children");
    let text = fs::read_to_string(path).unwrap_or_default();
    text.split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// Whether `pid` is a zygote's spare worker still waiting for a connection
/// (it ends on its own once its zygote's socket closes).
fn is_spare(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("ws:"))
}

impl Zygote {
    fn pid(&self) -> Option<i32> {
        match self.state {
            ZygoteState::Up { pid, .. } => Some(pid),
            _ => None,
        }
    }
}

/// The first steps of every freshly forked child, worker or zygote: it
/// keeps only `keep`, stderr and the modules' memory images of the
/// descriptors it inherited, and takes on the workers' identity.
fn enter_child(start: &ChildStart<'_>, keep: &[RawFd]) {
    // The listener, the signalfd, other clients' connections and anything
    // the daemon inherited. The Rust owners of the closed descriptors live
    // on in the parent's frames, which this process never returns to, so
    // nothing is closed twice.
    let keep: Vec<RawFd> = start.modules.fds.iter().copied().chain(keep.iter().copied()).collect();
    harden::close_inherited_fds(start.dev_null, &keep);
    // Ctrl-C in a terminal signals the whole process group; a worker finishes
    // its call instead and ends when its client leaves.
    // SAFETY: installing SIG_IGN / SIG_DFL runs no handler code.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::SigIgn);
        let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
    }
    let _ = start.mask.thread_set_mask();
    // Before a single byte from the client is read.
    if let Some(identity) = start.identity
        && let Err(e) = identity.assume()
    {
        error!(error = %e, uid = identity.uid.as_raw(), "could not drop privileges; child exits");
        // SAFETY: ends this forked child without running the parent's
        // exit-time handlers.
        unsafe { libc::_exit(1) }
    }
    // fork() copied the parent's random generator state; without this all
    // siblings would draw the same "random" numbers.
    guest::forked();
    // WASI's internal runtime (started on a guest's first file call, see
    // worker.rs) would otherwise start a thread per core in every worker;
    // one serves a guest that blocks its own thread anyway.
    // SAFETY: this forked child has a single thread, so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("TOKIO_WORKER_THREADS", "1") };
}

/// The listening socket.
enum Listener {
    Unix { listener: UnixListener, path: PathBuf, inode: (u64, u64) },
    Tcp(TcpListener),
}

impl Listener {
    fn bind(address: &Address) -> anyhow::Result<Listener> {
        let listener = match address {
            Address::Unix(path) => {
                let listener = bind_unix(path)?;
                let meta =
                    fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
                Listener::Unix { listener, path: path.clone(), inode: (meta.dev(), meta.ino()) }
            }
            Address::Tcp { host, port } => Listener::Tcp(
                TcpListener::bind((host.as_str(), *port))
                    .with_context(|| format!("binding {address}"))?,
            ),
        };
        match &listener {
            Listener::Unix { listener, .. } => listener.set_nonblocking(true),
            Listener::Tcp(listener) => listener.set_nonblocking(true),
        }
        .context("making the listener non-blocking")?;
        Ok(listener)
    }

    /// The address actually bound (a TCP port of 0 resolved).
    fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("tcp:{addr}"),
                Err(_) => "tcp:?".to_owned(),
            },
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix { listener, .. } => listener.as_fd(),
            Listener::Tcp(listener) => listener.as_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Unix { listener, .. } => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(true)?;
                Stream::Unix(s)
            }
            Listener::Tcp(listener) => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        Ok(stream)
    }

    /// Removes the socket file, if it is still the one this daemon created.
    fn remove_socket_file(&self) {
        let Listener::Unix { path, inode, .. } = self else { return };
        match fs::symlink_metadata(path) {
            Ok(meta) if (meta.dev(), meta.ino()) == *inode => {
                if let Err(e) = fs::remove_file(path) {
                    warn!(path = %path.display(), error = %e, "could not remove the socket file");
                }
            }
            _ => info!(path = %path.display(), "socket file was replaced or removed; leaving it"),
        }
    }
}

/// Binds an owner-only unix socket at `path`, replacing a stale one.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            bail!("{} exists and is not a socket; refusing to replace it", path.display())
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => bail!("another daemon is already listening on {}", path.display()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing stale socket file");
                fs::remove_file(path)
                    .with_context(|| format!("removing stale socket {}", path.display()))?;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("checking existing socket {}", path.display()));
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("stat {}", path.display())),
    }
    // Owner-only from the first moment: a chmod after bind would leave a window.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    bound.with_context(|| format!("binding unix:{}", path.display()))
}
