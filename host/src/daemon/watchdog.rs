//! The worker's watchdog thread: call deadlines and vanished clients.
//!
//! While a call runs, the main thread is inside the guest and reads nothing
//! from the socket. The watchdog watches for it: when the call's deadline
//! passes it bumps the engine's epoch, which makes the guest trap at its next
//! epoch check; when the client hangs up, or the guest is still stuck a grace
//! period after its deadline (blocked in a host call, where epochs do not
//! reach), it ends the process. Between calls it sleeps, costing nothing.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use wasmtime::Engine;

/// How long a guest may stay stuck past its deadline before the worker exits.
const GRACE: Duration = Duration::from_secs(1);

const GRACE_NS: u64 = GRACE.as_nanos() as u64;

/// Longest single wait, so that a finished call is noticed and the thread parks.
const TICK: Duration = Duration::from_millis(100);

/// Handle the main thread uses to tell the watchdog about calls.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    origin: Instant,
    /// Whether a call is running.
    busy: AtomicBool,
    /// Number of the current (or last) call.
    seq: AtomicU64,
    /// Deadline of the current call, in ns since `origin`; 0 for none.
    deadline_ns: AtomicU64,
    /// Whether the watchdog thread is parked (and needs an unpark).
    parked: AtomicBool,
    /// Whether a hang-up of the client ends the process (it does while the
    /// guest runs; while the main thread reads, it sees the close itself).
    watch_hangup: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl Watchdog {
    /// Starts the watchdog for the connection `conn` (a duplicate of the
    /// worker's socket) and the engine whose epoch interrupts the guest.
    pub fn start(conn: OwnedFd, engine: Engine) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            busy: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            deadline_ns: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            watch_hangup: AtomicBool::new(true),
        });
        let state = shared.clone();
        let handle = thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(&state, &conn, &engine))?;
        Ok(Watchdog { shared, thread: handle.thread().clone() })
    }

    /// Guest code starts running now and may run for `timeout` (or forever
    /// when `None`); a client hanging up meanwhile ends the process.
    pub fn begin(&self, timeout: Option<Duration>) {
        self.arm(timeout, true);
    }

    /// The main thread starts a read that must finish within `timeout`.
    pub fn begin_read(&self, timeout: Duration) {
        self.arm(Some(timeout), false);
    }

    fn arm(&self, timeout: Option<Duration>, watch_hangup: bool) {
        let s = &self.shared;
        s.watch_hangup.store(watch_hangup, SeqCst);
        // Saturating: a timeout of centuries means "no deadline in practice",
        // never a wrapped-around one that has already passed.
        let deadline = timeout.map_or(0, |t| {
            let t = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            s.now_ns().saturating_add(t).max(1)
        });
        s.deadline_ns.store(deadline, SeqCst);
        s.seq.fetch_add(1, SeqCst);
        s.busy.store(true, SeqCst);
        if s.parked.load(SeqCst) {
            self.thread.unpark();
        }
    }

    /// The call has returned.
    pub fn end(&self) {
        self.shared.busy.store(false, SeqCst);
    }
}

fn watch(s: &Shared, conn: &OwnedFd, engine: &Engine) {
    let mut interrupted = 0;
    loop {
        if !s.busy.load(SeqCst) {
            // Announce the park before the last look, so that a call starting
            // in between either is seen here or sees `parked` and unparks us.
            s.parked.store(true, SeqCst);
            if !s.busy.load(SeqCst) {
                thread::park();
            }
            s.parked.store(false, SeqCst);
            continue;
        }

        let seq = s.seq.load(SeqCst);
        let deadline = s.deadline_ns.load(SeqCst);
        let now = s.now_ns();
        let wait = match deadline {
            0 => TICK,
            d if d > now => TICK.min(Duration::from_nanos(d - now)),
            d => TICK.min(Duration::from_nanos(d.saturating_add(GRACE_NS).saturating_sub(now))),
        };
        if !s.watch_hangup.load(SeqCst) {
            thread::sleep(wait);
        } else if client_gone(conn, wait) {
            tracing::info!("client closed the connection during a call; worker exits");
            exit(0);
        }

        let same_call = || s.busy.load(SeqCst) && s.seq.load(SeqCst) == seq;
        let now = s.now_ns();
        if deadline != 0 && now >= deadline && interrupted != seq && same_call() {
            engine.increment_epoch();
            interrupted = seq;
        }
        if deadline != 0 && now >= deadline.saturating_add(GRACE_NS) && same_call() {
            tracing::error!(
                grace_ms = GRACE.as_millis() as u64,
                "still busy after the deadline and grace period (a guest blocked in a host call, or a client that never finished its hello); worker exits"
            );
            exit(1);
        }
    }
}

/// Waits up to `wait` for the peer of `conn` to hang up.
///
/// Uses libc's poll directly: nix's `PollFlags` has no POLLRDHUP and drops
/// the whole `revents` when the kernel reports it.
fn client_gone(conn: &OwnedFd, wait: Duration) -> bool {
    let mut fd = libc::pollfd { fd: conn.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    let ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(i32::MAX);
    // SAFETY: `fd` is one valid pollfd that outlives the call.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n < 0 {
        // EINTR: try again on the next round; any other error means the
        // descriptor is unusable, and so is the connection.
        return std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted;
    }
    n > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; the main thread may be inside
    // the guest, and nothing it holds needs orderly teardown.
    unsafe { libc::_exit(code) }
}
