//! The worker's watchdog thread: call deadlines and vanished clients.
//!
//! While a call runs, the main thread is inside the guest and reads nothing
//! from the socket. The watchdog watches for it: when the call's deadline
//! passes it bumps the engine's epoch, which makes the guest trap at its next
//! epoch check; when the client hangs up, or the guest is still stuck a grace
//! period after its deadline (blocked in a host call, where epochs do not
//! reach), it ends the process. Between calls it sleeps, costing nothing.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use wasmtime::Engine;

/// How long a guest may stay stuck past its deadline before the worker exits.
const GRACE: Duration = Duration::from_secs(1);

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
        });
        let state = shared.clone();
        let handle = thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || watch(&state, &conn, &engine))?;
        Ok(Watchdog { shared, thread: handle.thread().clone() })
    }

    /// A call starts now and may run for `timeout` (or forever when `None`).
    pub fn begin(&self, timeout: Option<Duration>) {
        let s = &self.shared;
        let deadline = timeout.map_or(0, |t| (s.now_ns() + t.as_nanos() as u64).max(1));
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
            d => TICK.min(Duration::from_nanos((d + GRACE.as_nanos() as u64).saturating_sub(now))),
        };
        if client_gone(conn, wait) {
            tracing::info!("client closed the connection during a call; worker exits");
            exit(0);
        }

        let same_call = || s.busy.load(SeqCst) && s.seq.load(SeqCst) == seq;
        let now = s.now_ns();
        if deadline != 0 && now >= deadline && interrupted != seq && same_call() {
            engine.increment_epoch();
            interrupted = seq;
        }
        if deadline != 0 && now >= deadline + GRACE.as_nanos() as u64 && same_call() {
            tracing::error!(
                grace_ms = GRACE.as_millis() as u64,
                "guest still running after its deadline and grace period (blocked in a host call?); worker exits"
            );
            exit(1);
        }
    }
}

/// Waits up to `wait` for the peer of `conn` to hang up.
fn client_gone(conn: &OwnedFd, wait: Duration) -> bool {
    // nix does not name POLLRDHUP; it is Linux's "peer closed its end".
    let flags = PollFlags::from_bits_retain(libc::POLLRDHUP);
    let mut fds = [PollFd::new(conn.as_fd(), flags)];
    let ms = PollTimeout::try_from(wait.as_millis().max(1) as i32).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(0) | Err(nix::errno::Errno::EINTR) => false,
        Ok(_) => {
            let got = fds[0].revents().unwrap_or(PollFlags::empty());
            got.intersects(flags | PollFlags::POLLHUP | PollFlags::POLLERR)
        }
        Err(_) => true,
    }
}

fn exit(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; the main thread may be inside
    // the guest, and nothing it holds needs orderly teardown.
    unsafe { libc::_exit(code) }
}
