//! A worker checked out for exclusive use, and the calls made on it.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::Instrument;

use super::error::{Chain, Error, Phase};
use super::pool::Lease;
use super::worker::{CallSpec, Worker};

/// Exclusive use of one worker, from [`Client::checkout`](super::Client::checkout).
///
/// Dropping it returns the worker to the pool. If the guest has a
/// checkout-done hook, the hook runs first (in a background task) and the
/// worker is reused only once it succeeded. A worker that failed fatally,
/// timed out or was interrupted mid-call is closed instead, as is one that
/// reached the client's `max_checkouts`.
pub struct Checkout {
    /// `None` once the worker was closed during this checkout.
    slot: Mutex<Option<Worker>>,
    /// Always `Some` until dropped.
    lease: Option<Lease>,
    pid: u32,
    started: Instant,
    deadline: Option<Instant>,
    /// Set when the deadline passed: the worker is closed, not returned.
    expired: AtomicBool,
}

impl Checkout {
    pub(crate) fn new(
        mut worker: Worker,
        lease: Lease,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Self {
        worker.checkouts += 1;
        Checkout {
            pid: worker.pid(),
            slot: Mutex::new(Some(worker)),
            lease: Some(lease),
            started,
            deadline,
            expired: AtomicBool::new(false),
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

    /// Calls `method` with `args` and decodes its result as `R`.
    ///
    /// Arguments and result travel as MessagePack (structs as maps). Calls on
    /// one checkout run one at a time, in the order they were made.
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
        let args = rmp_serde::to_vec_named(args)
            .map_err(|source| Error::Encode { method: method.to_owned(), source })?;
        let span = tracing::debug_span!("call", worker.pid = self.pid, method);
        self.call_before_deadline(method, &args).instrument(span).await
    }

    async fn call_before_deadline<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &[u8],
    ) -> Result<R, Error> {
        let Some(deadline) = self.deadline else {
            return self.call_in_turn(method, args).await;
        };
        if Instant::now() >= deadline {
            return Err(self.time_out(method));
        }
        match timeout_at(deadline, self.call_in_turn(method, args)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(self.time_out(method)),
        }
    }

    /// Waits for the calls made before this one, then makes it.
    async fn call_in_turn<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &[u8],
    ) -> Result<R, Error> {
        let mut turn = Turn { slot: self.slot.lock().await, in_call: true };
        let Some(worker) = turn.slot.as_mut() else {
            turn.in_call = false;
            return Err(Error::WorkerClosed { pid: self.pid, method: method.to_owned() });
        };

        let timeout_ms = self.deadline.map(|deadline| ceil_ms(deadline - Instant::now()));
        let spec = CallSpec { method, args, timeout_ms, started: self.started };
        let call_started = Instant::now();
        let outcome = worker.call::<R>(&spec).await;
        turn.in_call = false;

        let elapsed_ms = call_started.elapsed().as_millis() as u64;
        match outcome {
            Ok(result) => {
                tracing::debug!(worker.pid = self.pid, method, elapsed_ms, "call done");
                Ok(result)
            }
            Err(failure) => {
                let error = Chain(&failure.error);
                tracing::debug!(worker.pid = self.pid, method, elapsed_ms, %error, "call failed");
                if failure.retire {
                    tracing::info!(
                        worker.pid = self.pid,
                        method,
                        "closing worker after a fatal error"
                    );
                    turn.slot.take();
                }
                Err(failure.error)
            }
        }
    }

    /// Ends the checkout's time: the worker will be closed, not returned.
    fn time_out(&self, method: &str) -> Error {
        self.expired.store(true, Ordering::Relaxed);
        // Close the connection now if no other call holds it; otherwise the
        // call that does is interrupted by the same deadline, or the drop of
        // the checkout closes it.
        if let Ok(mut slot) = self.slot.try_lock() {
            slot.take();
        }
        let elapsed = self.started.elapsed();
        tracing::warn!(
            worker.pid = self.pid,
            method,
            elapsed_ms = elapsed.as_millis() as u64,
            "checkout timed out; closing worker"
        );
        Error::Timeout { phase: Phase::Calling { method: method.to_owned() }, elapsed }
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
    slot: MutexGuard<'a, Option<Worker>>,
    in_call: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.in_call
            && let Some(worker) = self.slot.take()
        {
            tracing::warn!(worker.pid = worker.pid(), "call interrupted; closing worker");
        }
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        let worker = self.slot.get_mut().take();
        if *self.expired.get_mut() {
            return;
        }
        if let Some(worker) = worker {
            release(lease, worker);
        }
    }
}

/// Returns a worker that is still healthy at the end of its checkout.
fn release(lease: Lease, mut worker: Worker) {
    let config = &lease.pool().config;
    if config.max_checkouts.is_some_and(|max| worker.checkouts >= max) {
        tracing::info!(
            worker.pid = worker.pid(),
            checkouts = worker.checkouts,
            "worker reached max checkouts; closing it"
        );
        return;
    }
    if !worker.has_hook() {
        return lease.check_in(worker);
    }

    let limit = config.timeout;
    let handle = lease.pool().handle.clone();
    handle.spawn(async move {
        let outcome = match limit {
            Some(limit) => timeout(limit, worker.checkout_done()).await.ok(),
            None => Some(worker.checkout_done().await),
        };
        match outcome {
            Some(Ok(())) => lease.check_in(worker),
            Some(Err(err)) => {
                tracing::warn!(worker.pid = worker.pid(), error = %Chain(&err), "checkout-done hook failed; closing worker");
            }
            None => {
                tracing::warn!(worker.pid = worker.pid(), "checkout-done hook timed out; closing worker");
            }
        }
    });
}

impl fmt::Debug for Checkout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkout")
            .field("worker_pid", &self.pid)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
