//! What [`Client::status`](super::Client::status) reports: the pool's workers
//! by stage, the checkouts waiting, and counts of what happened so far.

use super::Error;

/// A snapshot of a client's pool, from [`Client::status`](super::Client::status).
///
/// The worker and checkout counts are read off the pool's own records at the
/// moment of the call (each worker is in exactly one stage), so they cannot
/// drift from what the pool holds. The event counts only ever grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Status {
    /// Connection attempts under way, including ones pausing between retries.
    pub connecting: usize,
    /// Connected workers nobody has checked out.
    pub idle: usize,
    /// Workers checked out, or running their checkout-done hook.
    pub busy: usize,
    /// Workers closed by the client whose process has not yet gone. They
    /// still count against `max_workers`.
    pub closing: usize,
    /// Checkouts queued for a worker.
    pub waiting: usize,
    /// Checkouts handed a worker so far.
    pub checkouts: u64,
    /// Calls made so far, failed ones included.
    pub calls: u64,
    /// Calls that ended in an error.
    pub failed_calls: u64,
    /// Workers connected so far.
    pub connected: u64,
    /// Connection attempts the daemon refused (failed setup, unknown module).
    pub refused: u64,
    /// Workers closed so far, by cause.
    pub retired: Retired,
}

impl Status {
    /// Every worker the pool counts against `max_workers`: connecting, idle,
    /// busy and closing.
    pub fn workers(&self) -> usize {
        self.connecting + self.idle + self.busy + self.closing
    }
}

/// How many workers the pool closed, by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Retired {
    /// After an error: a trap, a resource limit, a protocol violation, a
    /// failed checkout-done hook, or (by default) any error returned during
    /// the checkout.
    pub error: u64,
    /// After reaching `max_checkouts`.
    pub max_checkouts: u64,
    /// After a call ran out of time.
    pub timeout: u64,
    /// Found dead: the connection broke mid-call or while idle.
    pub death: u64,
    /// Idle for longer than the idle timeout.
    pub idle: u64,
    /// Older than the maximum lifetime.
    pub lifetime: u64,
    /// Killed by [`Checkout::abort`](super::Checkout::abort), or because a
    /// call's future was dropped mid-call.
    pub aborted: u64,
}

/// Why the pool closes a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retirement {
    Error,
    MaxCheckouts,
    Timeout,
    Death,
    Idle,
    Lifetime,
    Aborted,
}

impl Retirement {
    /// The cause to count for a worker closed because of `error`.
    pub(crate) fn after(error: &Error) -> Retirement {
        match error {
            Error::Timeout { .. } => Retirement::Timeout,
            Error::WorkerDied { .. } => Retirement::Death,
            Error::Aborted { .. } | Error::WorkerClosed { .. } => Retirement::Aborted,
            _ => Retirement::Error,
        }
    }

    /// How the cause reads in logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Retirement::Error => "error",
            Retirement::MaxCheckouts => "max_checkouts",
            Retirement::Timeout => "timeout",
            Retirement::Death => "death",
            Retirement::Idle => "idle",
            Retirement::Lifetime => "lifetime",
            Retirement::Aborted => "aborted",
        }
    }
}

impl Retired {
    /// Counts one more worker closed for `cause`.
    pub(crate) fn count(&mut self, cause: Retirement) {
        let counter = match cause {
            Retirement::Error => &mut self.error,
            Retirement::MaxCheckouts => &mut self.max_checkouts,
            Retirement::Timeout => &mut self.timeout,
            Retirement::Death => &mut self.death,
            Retirement::Idle => &mut self.idle,
            Retirement::Lifetime => &mut self.lifetime,
            Retirement::Aborted => &mut self.aborted,
        };
        *counter += 1;
    }
}

/// The event counts of a [`Status`], kept by the pool.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Events {
    pub(crate) checkouts: u64,
    pub(crate) calls: u64,
    pub(crate) failed_calls: u64,
    pub(crate) connected: u64,
    pub(crate) refused: u64,
    pub(crate) retired: Retired,
}
