//! The parent process: bind, accept, fork one worker per connection, reap.
//!
//! The loop is single-threaded on purpose: fork() carries only the calling
//! thread into the child, so no other thread may exist to hold a lock the
//! child would need. Signals arrive through a signalfd polled beside the
//! listening socket, so there are no signal handlers either.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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
use super::{Config, title};
use crate::Address;

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Compiles every module first (a bad module is an error before anything
/// listens), then binds `config.listen` and serves. On a stop signal it stops
/// accepting, removes its socket file and returns; workers already running
/// finish their calls and end when their clients disconnect.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let modules = Modules::load(&config)?;
    let names: Vec<_> = modules.modules.iter().map(|m| m.name.as_str()).collect();

    let mut signals = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        signals.add(s);
    }
    let old_mask = signals.thread_swap_mask(SigmaskHow::SIG_BLOCK).context("blocking signals")?;
    let mut sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .context("creating signalfd")?;

    let listener = Listener::bind(&config.listen)?;
    info!(address = %listener.describe(), modules = ?names, pid = std::process::id(), "listening");

    loop {
        let (accept, signal) = wait_readable(listener.fd(), sfd.as_fd())?;
        if signal && handle_signals(&mut sfd)? {
            break;
        }
        if accept {
            accept_all(&listener, &modules, &config, &old_mask, sfd.as_raw_fd());
        }
    }

    info!("stop signal received; no longer accepting, running workers finish on their own");
    listener.remove_socket_file();
    Ok(())
}

/// Blocks until the listener or the signalfd is readable.
fn wait_readable(
    listener: BorrowedFd<'_>,
    signals: BorrowedFd<'_>,
) -> anyhow::Result<(bool, bool)> {
    let mut fds =
        [PollFd::new(listener, PollFlags::POLLIN), PollFd::new(signals, PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e).context("waiting for connections"),
        }
    }
    let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
    Ok((ready(&fds[0]), ready(&fds[1])))
}

/// Reads pending signals, reaping children; returns whether to stop.
fn handle_signals(sfd: &mut SignalFd) -> anyhow::Result<bool> {
    let mut stop = false;
    while let Some(info) = sfd.read_signal().context("reading signalfd")? {
        match Signal::try_from(info.ssi_signo as i32) {
            Ok(Signal::SIGCHLD) => reap_children(),
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
fn reap_children() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                info!(worker.pid = pid.as_raw(), code, "worker exited")
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                info!(worker.pid = pid.as_raw(), signal = %sig, "worker killed")
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}

/// Accepts every pending connection, forking a worker for each.
fn accept_all(listener: &Listener, modules: &Modules, config: &Config, mask: &SigSet, sfd: RawFd) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors or similar. The connection stays queued
                // and the listener stays readable, so pause before the next
                // try instead of spinning (and flooding the log).
                error!(error = %e, "accepting a connection failed; pausing 100 ms");
                std::thread::sleep(std::time::Duration::from_millis(100));
                return;
            }
        };
        // SAFETY: this process is single-threaded here (see the module docs),
        // so the child starts with consistent memory; the child never returns
        // from `become_worker`.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                become_worker(stream, modules, config, mask, [listener.fd().as_raw_fd(), sfd])
            }
            Ok(ForkResult::Parent { child }) => {
                info!(worker.pid = child.as_raw(), "worker forked");
                // The stream is dropped here: the parent keeps no descriptor
                // of a worker's connection.
            }
            Err(e) => error!(error = %e, "fork failed; dropping the connection"),
        }
    }
}

/// The first steps of a freshly forked child; never returns.
fn become_worker(
    stream: Stream,
    modules: &Modules,
    config: &Config,
    mask: &SigSet,
    parent_fds: [RawFd; 2],
) -> ! {
    for fd in parent_fds {
        // The Rust owners of these descriptors live on in the parent's frames,
        // which this process never returns to, so they are never closed twice.
        let _ = nix::unistd::close(fd);
    }
    // Ctrl-C in a terminal signals the whole process group; a worker finishes
    // its call instead and ends when its client leaves.
    // SAFETY: installing SIG_IGN / SIG_DFL runs no handler code.
    unsafe {
        let _ = signal(Signal::SIGINT, SigHandler::SigIgn);
        let _ = signal(Signal::SIGCHLD, SigHandler::SigDfl);
    }
    let _ = mask.thread_set_mask();
    // fork() copied the parent's random generator state; without this all
    // siblings would draw the same "random" numbers.
    rand::rng().reseed().ok();
    title::set("wasm-task worker", "wt:worker");
    worker::run(stream, modules, config.max_frame)
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
