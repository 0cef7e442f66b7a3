//! A worker checked out for exclusive use, and the calls made on it.

use std::fmt;
use std::sync::{Arc, MutexGuard as StdGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::{Chain, Error, Phase};
use super::ledger::{Ledger, Ticket};
use super::pool::Pool;
use super::release::release;
use super::report::{CallReport, CallTimings};
use super::status::Retirement;
use super::worker::{CallSpec, Worker};
use crate::protocol::LogRecord;

/// Exclusive use of one worker, from [`Client::checkout`](super::Client::checkout).
///
/// Dropping it returns the worker to the pool. If the guest has a
/// checkout-done hook, the hook runs first (in a background task) and the
/// worker is reused only once it succeeded. A worker is closed instead
/// (never in the middle of a checkout unless it failed) when it returned an
/// error during the checkout (unless the client keeps workers after errors),
/// reached the client's `max_checkouts` or `max_lifetime`, or the checkout
/// timed out or was aborted. A worker that trapped, hit a limit, timed out
/// or died is closed at once.
pub struct Checkout {
    pool: Arc<Pool>,
    pid: u32,
    started: Instant,
    /// Time spent waiting for the worker.
    waited: Duration,
    deadline: Option<Instant>,
    /// The worker, held by one call at a time; the lock is fair, so calls
    /// run in the order they were made.
    seat: Arc<Mutex<Seat>>,
    ledger: std::sync::Mutex<Ledger>,
    /// Cancelled by [`Checkout::abort`].
    abort: CancellationToken,
}

/// The worker of a checkout, while it has one.
struct Seat {
    /// `None` once the worker was closed during the checkout.
    worker: Option<Worker>,
    /// Whether the worker returned an error during the checkout.
    tainted: bool,
}

/// What a call gathers beside its result.
struct Trace {
    logs: Vec<LogRecord>,
    timings: CallTimings,
}

impl Checkout {
    pub(crate) fn new(
        pool: Arc<Pool>,
        mut worker: Worker,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        worker.checkouts += 1;
        Checkout {
            pool,
            pid: worker.pid(),
            started,
            waited: started.elapsed(),
            deadline,
            seat: Arc::new(Mutex::new(Seat { worker: Some(worker), tainted: false })),
            ledger: std::sync::Mutex::default(),
            abort: CancellationToken::new(),
        }
    }

    /// Process id of the worker, on the daemon's host.
    pub fn worker_pid(&self) -> u32 {
        self.pid
    }

    /// When this checkout's time runs out, if it has a timeout.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time this checkout waited in the pool's queue for its worker.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Calls `method` with `args` and decodes its result as `R`.
    ///
    /// Arguments and result travel as MessagePack (structs as maps). Several
    /// calls may be made on one checkout without awaiting each: they run on
    /// its worker one at a time, in the order they were made. If one fails,
    /// those made before its failure and still waiting fail at once with
    /// [`Error::EarlierCallFailed`]; calls made afterwards run normally as
    /// long as the worker is there. Once the worker is lost (it trapped,
    /// died, hit a limit), every later call fails at once with the error
    /// that lost it; after [`abort`](Self::abort), with [`Error::Aborted`].
    ///
    /// The worker is given the time left before the checkout's deadline. If
    /// the deadline passes, the call ends with [`Error::Timeout`] and the
    /// worker is closed. Dropping the future before it finishes also closes
    /// the worker, since its connection is then in an unknown state; later
    /// calls on this checkout get [`Error::WorkerClosed`].
    pub async fn call<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
    ) -> Result<R, Error> {
        self.call_report(method, args).await.result
    }

    /// Like [`call`](Self::call), and also returns the log records and
    /// output lines the guest made during the call and the call's timings:
    /// the wait for the checkout's worker, the wait behind earlier calls on
    /// this checkout, the round trip, and what the worker measured.
    pub async fn call_report<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
    ) -> CallReport<R> {
        let span = tracing::debug_span!("call", worker.pid = self.pid, method);
        let report = self.report(method, args).instrument(span).await;
        self.pool.count_call(report.result.is_ok());
        report
    }

    /// Aborts the checkout: the call in flight ends with [`Error::Aborted`],
    /// the worker is killed, and every later call fails with the same error
    /// without reaching any worker. Calling it again does nothing.
    pub fn abort(&self) {
        if !self.ledger().abort(self.pid) {
            return;
        }
        tracing::warn!(worker.pid = self.pid, "checkout aborted; closing its worker");
        self.abort.cancel();
        match self.seat.clone().try_lock_owned() {
            Ok(mut seat) => close(&mut seat, Retirement::Aborted),
            // A call holds the worker: it sees the abort and closes it. Queue
            // up behind it all the same, in case it handed the turn on first.
            Err(_) => {
                let seat = self.seat.clone();
                self.pool.handle.spawn(async move {
                    close(&mut *seat.lock_owned().await, Retirement::Aborted);
                });
            }
        }
    }

    fn ledger(&self) -> StdGuard<'_, Ledger> {
        // Nothing panics while holding it; the records stay meaningful.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn report<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
    ) -> CallReport<R> {
        let issued = Instant::now();
        let timings = CallTimings { checkout_wait: self.waited, ..CallTimings::default() };
        let mut trace = Trace { logs: Vec::new(), timings };
        let result = match rmp_serde::to_vec_named(args) {
            Ok(args) => self.before_deadline(method, &args, issued, &mut trace).await,
            Err(source) => {
                Err(Error::Encode { method: method.to_owned(), source: Arc::new(source) })
            }
        };
        CallReport { result, logs: trace.logs, timings: trace.timings }
    }

    async fn before_deadline<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &[u8],
        issued: Instant,
        trace: &mut Trace,
    ) -> Result<R, Error> {
        let ticket = self.ledger().ticket()?;
        let Some(deadline) = self.deadline else {
            return self.in_turn(method, args, ticket, issued, trace).await;
        };
        if Instant::now() >= deadline {
            return Err(self.time_out(method));
        }
        match timeout_at(deadline, self.in_turn(method, args, ticket, issued, trace)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(self.time_out(method)),
        }
    }

    /// Waits for the calls made before this one, then makes it.
    async fn in_turn<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &[u8],
        ticket: Ticket,
        issued: Instant,
        trace: &mut Trace,
    ) -> Result<R, Error> {
        let seat = tokio::select! {
            biased;
            () = self.abort.cancelled() => return Err(self.ledger().aborted_error(self.pid)),
            seat = self.seat.lock() => seat,
        };
        trace.timings.turn_wait = issued.elapsed();
        let mut turn = Turn { seat, in_call: false, deadline: self.deadline };
        let skipped = self.ledger().skip(self.pid, method, ticket);
        if let Some(error) = skipped {
            if self.abort.is_cancelled() {
                turn.close(Retirement::Aborted);
            }
            return Err(error);
        }
        if turn.seat.worker.is_none() {
            return Err(Error::WorkerClosed { pid: self.pid, method: method.to_owned() });
        }

        let timeout_ms =
            self.deadline.map(|d| ceil_ms(d.saturating_duration_since(Instant::now())));
        let spec = CallSpec { method, args, timeout_ms, started: self.started };
        turn.in_call = true;
        let sent = Instant::now();
        let answer = {
            let worker = turn.seat.worker.as_mut().expect("checked above");
            tokio::select! {
                biased;
                () = self.abort.cancelled() => None,
                answer = worker.call::<R>(&spec) => Some(answer),
            }
        };
        turn.in_call = false;
        trace.timings.round_trip = sent.elapsed();

        let Some(answer) = answer else {
            turn.close(Retirement::Aborted);
            return Err(self.ledger().aborted_error(self.pid));
        };
        trace.logs = answer.logs;
        trace.timings.worker = answer.stats;
        self.settle(&mut turn, method, answer.result, answer.retire, sent)
    }

    /// Records how a call that got an answer went, closing the worker if it
    /// cannot be used any more.
    fn settle<R>(
        &self,
        turn: &mut Turn<'_>,
        method: &str,
        result: Result<R, Error>,
        retire: Option<Retirement>,
        sent: Instant,
    ) -> Result<R, Error> {
        let elapsed_ms = sent.elapsed().as_millis() as u64;
        let error = match result {
            Ok(value) => {
                tracing::debug!(worker.pid = self.pid, method, elapsed_ms, "call done");
                return Ok(value);
            }
            Err(error) => error,
        };
        tracing::debug!(worker.pid = self.pid, method, elapsed_ms, error = %Chain(&error), "call failed");
        self.ledger().failed(method, &error, retire.is_some());
        match retire {
            Some(cause) => turn.close(cause),
            None => turn.seat.tainted |= taints(&error),
        }
        Err(error)
    }

    /// Ends the checkout's time: the worker will be closed, not returned.
    fn time_out(&self, method: &str) -> Error {
        self.ledger().expired = true;
        // Close the connection now if no other call holds it; otherwise the
        // call that does is interrupted by the same deadline, or the drop of
        // the checkout closes it.
        if let Ok(mut seat) = self.seat.try_lock() {
            close(&mut seat, Retirement::Timeout);
        }
        let elapsed = self.started.elapsed();
        tracing::warn!(
            worker.pid = self.pid,
            method,
            elapsed_ms = elapsed.as_millis() as u64,
            "checkout timed out"
        );
        Error::Timeout { phase: Phase::Calling { method: method.to_owned() }, elapsed }
    }
}

/// Whether an error means the worker's state may be corrupt, so that it is
/// retired when released (unless the client keeps workers after errors).
fn taints(error: &Error) -> bool {
    matches!(error, Error::GuestError { .. } | Error::UnknownMethod { .. })
}

/// Closes the seat's worker, if it still has one, counting it for `cause`.
fn close(seat: &mut Seat, cause: Retirement) {
    if let Some(worker) = seat.worker.take() {
        worker.retire(cause);
    }
}

/// Rounds a duration up to whole milliseconds, so that a worker never gets 0
/// while some time is left.
fn ceil_ms(left: Duration) -> u64 {
    u64::try_from(left.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

/// Holds the worker for one call. Dropped while `in_call` (the call future was
/// cancelled or timed out mid-way), it closes the worker: a request may be
/// half written or a reply half read.
struct Turn<'a> {
    seat: MutexGuard<'a, Seat>,
    in_call: bool,
    deadline: Option<Instant>,
}

impl Turn<'_> {
    fn close(&mut self, cause: Retirement) {
        close(&mut self.seat, cause);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.in_call {
            return;
        }
        let timed_out = self.deadline.is_some_and(|deadline| Instant::now() >= deadline);
        let cause = if timed_out { Retirement::Timeout } else { Retirement::Aborted };
        if let Some(worker) = &self.seat.worker {
            tracing::warn!(worker.pid = worker.pid(), "call interrupted; closing worker");
        }
        self.close(cause);
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        // Only an abort's closing task can hold the seat now; it closes the worker.
        let Ok(mut seat) = self.seat.try_lock() else { return };
        let Some(worker) = seat.worker.take() else { return };
        let tainted = seat.tainted;
        drop(seat);
        let (aborted, expired) = {
            let ledger = self.ledger();
            (ledger.is_aborted(), ledger.expired)
        };
        if aborted {
            worker.retire(Retirement::Aborted);
        } else if expired {
            worker.retire(Retirement::Timeout);
        } else {
            release(&self.pool, worker, tainted);
        }
    }
}

impl fmt::Debug for Checkout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("worker_pid", &self.pid)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
