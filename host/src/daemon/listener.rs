//! The parent process: bind, accept, fork one worker per connection, reap.
//!
//! The loop is single-threaded on purpose: fork() carries only the calling
//! thread into the child, so no other thread may exist to hold a lock the
//! child would need. Signals arrive through a signalfd polled beside the
//! listening socket, so there are no signal handlers either.
//!
//! At most `max_workers` workers live at once. At the cap the loop stops
//! accepting: further connections wait in the kernel's backlog (their
//! clients see a slow connect, bounded by their own timeouts) and are
//! accepted as workers exit.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::{Mode, umask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, fork};
use tracing::{error, info, warn};

use super::modules::Modules;
use super::worker::{self, Stream};
use super::{Config, harden, seccomp, title};
use crate::Address;

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Compiles every module first (a bad module is an error before anything
/// listens), then binds `config.listen` and serves. On a stop signal it stops
/// accepting, removes its socket file and returns; workers already running
/// finish their calls and end when their clients disconnect.
pub fn serve(config: Config) -> anyhow::Result<()> {
    check_config(&config)?;
    let filter = seccomp::Filter::new(config.seccomp);
    if config.seccomp != seccomp::Mode::Off && filter.is_none() {
        bail!("system-call filters are not built for this architecture; pass --seccomp off");
    }
    let modules = Modules::load(&config)?;
    let names: Vec<_> = modules.modules.iter().map(|m| m.name.as_str()).collect();
    // Without /dev/null workers keep the daemon's stdin and stdout.
    let dev_null = harden::open_dev_null().ok();

    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    let old_mask = signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).context("blocking signals")?;
    let mut sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
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
        info!(module = %m.name, limits = %m.settings.limits, "module limits");
    }
    let worker = WorkerStart {
        modules: &modules,
        options: worker::Options {
            max_frame: config.max_frame,
            hung_timeout: config.hung_timeout,
            filter: filter.as_ref(),
        },
        identity: config.identity,
        mask: &old_mask,
        dev_null: dev_null.as_ref(),
    };

    let (mut live, mut cap_warned): (usize, Option<Instant>) = (0, None);
    loop {
        let at_cap = live >= config.max_workers;
        let (accept, signal) = wait_readable((!at_cap).then(|| listener.fd()), sfd.as_fd())?;
        if signal {
            let (stop, reaped) = handle_signals(&mut sfd)?;
            live -= reaped.min(live);
            if stop {
                break;
            }
        }
        if accept {
            live += accept_all(&listener, &worker, config.max_workers - live);
            // Once a minute at most: a daemon kept at its cap would
            // otherwise say so at every worker start.
            if live >= config.max_workers && cap_warned.is_none_or(|t| t.elapsed() > CAP_WARNING) {
                warn!(
                    max_workers = config.max_workers,
                    "at the worker cap; new connections wait until a worker exits"
                );
                cap_warned = Some(Instant::now());
            }
        }
    }

    info!("stop signal received; no longer accepting, running workers finish on their own");
    listener.remove_socket_file();
    Ok(())
}

/// Least time between two warnings that the worker cap is reached.
const CAP_WARNING: Duration = Duration::from_secs(60);

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

/// What every forked worker starts from.
struct WorkerStart<'a> {
    modules: &'a Modules,
    options: worker::Options<'a>,
    identity: Option<harden::Identity>,
    /// The signal mask the daemon started with, restored in workers.
    mask: &'a SigSet,
    dev_null: Option<&'a OwnedFd>,
}

/// Blocks until the listener (when given) or the signalfd is readable.
fn wait_readable(
    listener: Option<BorrowedFd<'_>>,
    signals: BorrowedFd<'_>,
) -> anyhow::Result<(bool, bool)> {
    let mut fds = vec![PollFd::new(signals, PollFlags::POLLIN)];
    fds.extend(listener.map(|l| PollFd::new(l, PollFlags::POLLIN)));
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for connections"),
        }
    }
    let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
    Ok((fds.get(1).is_some_and(ready), ready(&fds[0])))
}

/// Reads pending signals, reaping children; returns whether to stop and
/// how many workers ended.
fn handle_signals(sfd: &mut SignalFd) -> anyhow::Result<(bool, usize)> {
    let (mut stop, mut reaped) = (false, 0);
    while let Some(info) = sfd.read_signal().context("reading signalfd")? {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGCHLD) => reaped += reap_children(),
            Ok(sig @ (Signal::SIGTERM | Signal::SIGINT)) => {
                info!(signal = %sig, "received stop signal");
                stop = true;
            }
            _ => {}
        }
    }
    Ok((stop, reaped))
}

/// Collects every exited child, so none lingers as a zombie; returns how
/// many there were.
fn reap_children() -> usize {
    let mut reaped = 0;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                reaped += 1;
                info!(worker.pid = pid.as_raw(), code, "worker exited")
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                reaped += 1;
                info!(worker.pid = pid.as_raw(), signal = %sig, "worker killed")
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return reaped,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return reaped;
            }
        }
    }
}

/// Accepts pending connections, forking a worker for each, up to `room`
/// of them; returns how many workers it forked.
fn accept_all(listener: &Listener, start: &WorkerStart<'_>, room: usize) -> usize {
    let mut forked = 0;
    while forked < room {
        let stream = match listener.accept() {
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
        // SAFETY: this process is single-threaded here (see the module docs),
        // so the child starts with consistent memory; the child never returns
        // from `become_worker`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => become_worker(stream, start),
            Ok(ForkResult::Parent { child }) => {
                forked += 1;
                info!(worker.pid = child.as_raw(), "worker forked");
                // The stream is dropped here: the parent keeps no descriptor
                // of a worker's connection.
            }
            Err(e) => error!(error = %e, "fork failed; dropping the connection"),
        }
    }
    forked
}

/// The first steps of a freshly forked child; never returns.
fn become_worker(stream: Stream, start: &WorkerStart<'_>) -> ! {
    // The listener, the signalfd and anything the daemon inherited: a worker
    // keeps only its connection, stderr and the modules' memory images. The
    // Rust owners of the closed descriptors live on in the parent's frames,
    // which this process never returns to, so nothing is closed twice.
    let keep: Vec<RawFd> = start.modules.fds.iter().copied().chain([stream.raw_fd()]).collect();
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
        error!(error = %e, uid = identity.uid.as_raw(), "could not drop privileges; worker exits");
        // SAFETY: ends this forked child without running the parent's
        // exit-time handlers.
        unsafe { libc::_exit(1) }
    }
    // fork() copied the parent's random generator state; without this all
    // siblings would draw the same "random" numbers.
    rand::rng().reseed().ok();
    // WASI's internal runtime (started before the guest runs, see
    // worker.rs) would otherwise start a thread per core in every worker;
    // one serves a guest that blocks its own thread anyway.
    // SAFETY: this forked child has a single thread, so nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("TOKIO_WORKER_THREADS", "1") };
    title::set("wasm-task worker", "wt:worker");
    worker::run(stream, start.modules, start.options)
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
                s.set_nonblocking(false)?;
                Stream::Unix(s)
            }
            Listener::Tcp(listener) => {
                let (s, _) = listener.accept()?;
                s.set_nonblocking(false)?;
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
