//! The worker's watchdog thread: call deadlines and vanished clients.
//!
//! While a call runs, the main thread is inside the guest and reads nothing
//! from the socket. The watchdog watches for it: when the call's deadline
//! passes it bumps the engine's epoch, which makes the guest trap at its next
//! epoch check; when the client hangs up, or the guest is still stuck a grace
//! period after its deadline (blocked in a host call, where epochs do not
//! reach), it ends the process. Between calls it sleeps, costing nothing.
//!
//! Every guest entry is bounded: by the client's deadline when it gave one,
//! and in any case by the daemon's hung-worker timeout. As a backstop for the
//! watchdog itself, each entry also re-arms the kernel's CPU-time limit.
//!
//! The handle also times entries on the guest thread's CPU clock. Reading
//! that clock is a system call (the vDSO has no thread clocks), and two per
//! call were a tenth of a short call's round trip; so it is read only when
//! [`CLOCK_EVERY`] of wall time has passed since the last reading.

use std::cell::Cell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use wasmtime::Engine;

use super::harden;

/// How long a guest may stay stuck past its deadline before the worker exits.
const GRACE: Duration = Duration::from_secs(1);

const GRACE_NS: u64 = GRACE.as_nanos() as u64;

/// Longest single wait, so that a finished call is noticed and the thread parks.
const TICK: Duration = Duration::from_millis(100);

/// Wall time after which the guest thread's CPU clock is read again: at the
/// start of an entry when the last reading is older, and at the end of an
/// entry that ran at least this long.
pub const CLOCK_EVERY: Duration = Duration::from_micros(50);

/// Handle the main thread uses to tell the watchdog about calls.
pub struct Watchdog {
    shared: Arc<Shared>,
    thread: Thread,
    hung_timeout: Duration,
    /// The last reading of the guest thread's CPU clock, and when it was taken.
    clock: Cell<(Instant, Duration)>,
    /// When the current (or last) guest entry began, and the clock reading
    /// that stands for its start: taken then, or at most [`CLOCK_EVERY`] before.
    begun: Cell<(Instant, Duration)>,
}

/// What bounds a guest entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The deadline the client gave.
    Client,
    /// The daemon's hung-worker timeout (no client deadline, or a later one).
    Hung,
}

struct Shared {
    origin: Instant,
    /// The engine whose epoch interrupts the guest, once the module is known.
    engine: OnceLock<Engine>,
    /// The client's connection, once known.
    conn: OnceLock<OwnedFd>,
    /// Grace period after the current deadline before the process ends.
    grace_ns: AtomicU64,
    /// Whether a call is running.
    busy: AtomicBool,
    /// Number of the current (or last) call.
    seq: AtomicU64,
    /// Deadline of the current call, in ns since `origin`; 0 for none.
    deadline_ns: AtomicU64,
    /// Whether the watchdog thread is parked (and needs an unpark).
    parked: AtomicBool,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

impl Watchdog {
    /// Starts the watchdog, before its connection is known (see
    /// [`Watchdog::watch`]); no guest entry may outlast `hung_timeout`.
    pub fn start(hung_timeout: Duration) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            engine: OnceLock::new(),
            conn: OnceLock::new(),
            grace_ns: AtomicU64::new(GRACE_NS),
            busy: AtomicBool::new(false),
            seq: AtomicU64::new(0),
            deadline_ns: AtomicU64::new(0),
            parked: AtomicBool::new(false),
        });
        let state = shared.clone();
        let handle = thread::Builder::new().name("watchdog".into()).spawn(move || watch(&state))?;
        harden::enable_cpu_backstop();
        let reading = (Instant::now(), harden::thread_cpu());
        Ok(Watchdog {
            shared,
            thread: handle.thread().clone(),
            hung_timeout,
            clock: Cell::new(reading),
            begun: Cell::new(reading),
        })
    }

    /// Watches `conn` (a duplicate of the worker's socket) for the
    /// client's hang-up from now on.
    pub fn watch(&self, conn: OwnedFd) {
        let _ = self.shared.conn.set(conn);
    }

    /// Gives the watchdog the engine whose epoch interrupts the guest.
    pub fn attach(&self, engine: &Engine) {
        let _ = self.shared.engine.set(engine.clone());
    }

    /// Guest code starts running now and may run for `timeout`, or until
    /// the hung-worker timeout if that comes first; a client hanging up
    /// meanwhile ends the process. Returns which of the two bounds it.
    pub fn begin(&self, timeout: Option<Duration>) -> Bound {
        self.begin_at(Instant::now(), timeout)
    }

    /// [`Watchdog::begin`], with the time it is now.
    pub fn begin_at(&self, now: Instant, timeout: Option<Duration>) -> Bound {
        let (limit, bound, grace) = match timeout {
            Some(t) if t <= self.hung_timeout => (t, Bound::Client, GRACE),
            // Sub-second hung timeouts get as short a grace period.
            _ => (self.hung_timeout, Bound::Hung, GRACE.min(self.hung_timeout)),
        };
        let backstop = limit.saturating_add(grace).as_secs().saturating_add(2);
        let (read_at, mut cpu) = self.clock.get();
        if now.saturating_duration_since(read_at) >= CLOCK_EVERY {
            cpu = self.read_clock(now);
        }
        self.begun.set((now, cpu));
        // The backstop limits the process's CPU time; the guest's thread
        // stands for it, the watchdog thread using next to nothing beside
        // the second of slack the backstop keeps (a reading at most
        // CLOCK_EVERY old is as good).
        harden::ensure_cpu_room(cpu, backstop);
        self.arm(now, limit, grace);
        bound
    }

    /// CPU time the calling thread (the guest's) used in the guest entry
    /// begun last and ended at `now`, by its CPU clock. For an entry shorter than
    /// [`CLOCK_EVERY`] the clock is not read and this is the entry's wall
    /// time, which bounds it. For a longer one it may include up to
    /// `CLOCK_EVERY` of the worker's own time before the entry (when the
    /// clock was last read that long before it began), and is never more
    /// than the entry's wall time.
    pub fn cpu_used(&self, now: Instant) -> Duration {
        let (began, cpu_then) = self.begun.get();
        let wall = now.saturating_duration_since(began);
        if wall < CLOCK_EVERY {
            return wall;
        }
        self.read_clock(now).saturating_sub(cpu_then).min(wall)
    }

    fn read_clock(&self, now: Instant) -> Duration {
        let cpu = harden::thread_cpu();
        self.clock.set((now, cpu));
        cpu
    }

    fn arm(&self, now: Instant, timeout: Duration, grace: Duration) {
        let s = &self.shared;
        s.grace_ns.store(grace.as_nanos() as u64, SeqCst);
        // Saturating: a timeout of centuries means "no deadline in practice",
        // never a wrapped-around one that has already passed.
        let t = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let since_origin = now.saturating_duration_since(s.origin).as_nanos() as u64;
        let deadline = since_origin.saturating_add(t).max(1);
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

fn watch(s: &Shared) {
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
        let grace_ns = s.grace_ns.load(SeqCst);
        let now = s.now_ns();
        let wait = match deadline {
            0 => TICK,
            d if d > now => TICK.min(Duration::from_nanos(d - now)),
            d => TICK.min(Duration::from_nanos(d.saturating_add(grace_ns).saturating_sub(now))),
        };
        let same_call = || s.busy.load(SeqCst) && s.seq.load(SeqCst) == seq;
        let gone = match s.conn.get() {
            Some(conn) => client_gone(conn, wait),
            None => {
                thread::sleep(wait);
                false
            }
        };
        if gone && same_call() {
            // Only while the guest still runs: once the call is over the main
            // thread sees the hang-up itself and ends the worker in order
            // (a client that closes right after a refusal or a reply is no
            // reason to cut the worker short).
            tracing::info!("client closed the connection during a call; worker exits");
            exit(0);
        }

        let now = s.now_ns();
        if deadline != 0 && now >= deadline && interrupted != seq && same_call() {
            if let Some(engine) = s.engine.get() {
                engine.increment_epoch();
            }
            interrupted = seq;
        }
        if deadline != 0 && now >= deadline.saturating_add(grace_ns) && same_call() {
            tracing::error!(
                grace_ms = grace_ns / 1_000_000,
                "still busy after the deadline and grace period (a guest blocked in a host call); worker exits"
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
