//! The pool: idle workers, the FIFO queue of waiting checkouts, and the
//! count of every worker that exists or is being connected.
//!
//! All bookkeeping happens under one short `std` mutex that is never held
//! across an `.await`. Each unit of capacity is owned by a guard (a queued
//! [`WaitGuard`], a checked-out [`Lease`], a connecting
//! [`ConnectingSlot`](super::connector::ConnectingSlot)) whose `Drop` gives it
//! back, so a future cancelled at any `.await` cannot leak a place.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};

use super::Config;
use super::connector;
use super::error::{Chain, Error, Phase, copy_io_error};
use super::worker::Worker;

/// A snapshot of a client's pool, from [`Client::status`](super::Client::status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// Connected workers nobody has checked out.
    pub idle: usize,
    /// Workers checked out, or running their checkout-done hook.
    pub busy: usize,
    /// Connection attempts in progress (including ones pausing between retries).
    pub connecting: usize,
    /// Checkouts queued for a worker.
    pub waiting: usize,
}

/// What a queued checkout receives: a worker, or the refusal meant for it.
type Answer = Result<Worker, Error>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct State {
    /// Used last-in first-out, so that the workers beyond current need age
    /// out while the busy ones stay warm.
    idle: Vec<Worker>,
    waiters: VecDeque<Waiter>,
    busy: usize,
    connecting: usize,
    next_waiter: u64,
    /// The last failed connection attempt since the last successful one.
    last_connect_error: Option<(Instant, io::Error)>,
    /// Set when the last `Client` is dropped: nothing is kept or started after.
    closed: bool,
}

/// A client's workers and the checkouts waiting for them.
pub(crate) struct Pool {
    pub(crate) config: Arc<Config>,
    pub(crate) handle: Handle,
    state: Mutex<State>,
}

impl Pool {
    pub(crate) fn new(config: Arc<Config>, handle: Handle) -> Arc<Pool> {
        Arc::new(Pool { config, handle, state: Mutex::default() })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if some did, the counts are
        // still the best information there is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts connections until `min_workers` exist or are on their way.
    pub(crate) fn fill(self: &Arc<Self>) {
        let starts = self.plan(&mut self.lock());
        self.start_connectors(starts);
    }

    pub(crate) fn status(&self) -> Status {
        let state = self.lock();
        Status {
            idle: state.idle.len(),
            busy: state.busy,
            connecting: state.connecting,
            waiting: state.waiters.len(),
        }
    }

    /// Closes idle workers and stops all further work; busy workers are
    /// closed when they are released.
    pub(crate) fn close(&self) {
        let idle = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.idle)
        };
        drop(idle);
    }

    /// Gets a worker for a checkout: an idle one if any is alive, otherwise
    /// the first one that comes back or connects after the checkouts queued
    /// before this one have been served.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<(Worker, Lease), Error> {
        let mut wait = match self.take_or_queue() {
            Ok(worker) => return Ok((worker, Lease::new(self.clone()))),
            Err(wait) => wait,
        };
        let answer = match deadline {
            Some(deadline) => timeout_at(deadline, wait.answer()).await.ok(),
            None => Some(wait.answer().await),
        };
        match answer {
            Some(Ok(worker)) => Ok((worker, Lease::new(self.clone()))),
            Some(Err(err)) => Err(err),
            None => Err(self.waiting_timed_out(started)),
        }
    }

    /// Takes an idle worker that is still alive, or queues the caller.
    fn take_or_queue(self: &Arc<Self>) -> Result<Worker, WaitGuard> {
        let mut state = self.lock();
        let taken = take_live_idle(&mut state);
        let outcome = match taken {
            Some(worker) => {
                state.busy += 1;
                Ok(worker)
            }
            None => {
                let (tx, rx) = oneshot::channel();
                let id = state.next_waiter;
                state.next_waiter += 1;
                state.waiters.push_back(Waiter { id, tx });
                Err(WaitGuard { pool: self.clone(), id, rx: Some(rx) })
            }
        };
        let starts = self.plan(&mut state);
        drop(state);
        self.start_connectors(starts);
        outcome
    }

    /// The error of a checkout whose deadline passed while it waited.
    ///
    /// If connection attempts failed during the wait, their last error says
    /// more than a bare timeout: the daemon is likely down.
    fn waiting_timed_out(&self, started: Instant) -> Error {
        let state = self.lock();
        match &state.last_connect_error {
            Some((at, err)) if *at >= started => {
                Error::Connect { address: self.config.address.clone(), source: copy_io_error(err) }
            }
            _ => Error::Timeout { phase: Phase::WaitingForWorker, elapsed: started.elapsed() },
        }
    }

    /// Gives a released, healthy worker to the oldest waiting checkout, or
    /// keeps it idle.
    fn check_in(&self, worker: Worker) {
        let mut state = self.lock();
        state.busy -= 1;
        if state.closed {
            drop(state);
            tracing::debug!(worker.pid = worker.pid(), "client closed; closing released worker");
            return;
        }
        hand_over(&mut state, worker);
    }

    /// Forgets a busy worker that was closed, and replaces it if needed.
    fn retire_busy(self: &Arc<Self>) {
        let mut state = self.lock();
        state.busy -= 1;
        let starts = self.plan(&mut state);
        drop(state);
        self.start_connectors(starts);
    }

    /// How many connection attempts should be under way now.
    ///
    /// Each waiting checkout wants one (no worker is idle when one waits),
    /// and the pool wants `min_workers`; never more than `max_workers` in all.
    fn wanted_connecting(&self, state: &State) -> usize {
        if state.closed {
            return 0;
        }
        let live = state.idle.len() + state.busy;
        let demand = state.waiters.len().max(self.config.min_workers.saturating_sub(live));
        demand.min(self.config.max_workers.saturating_sub(live))
    }

    /// Counts the connection attempts to start now; the caller starts them
    /// with [`Pool::start_connectors`] once the lock is released.
    fn plan(&self, state: &mut State) -> usize {
        let starts = self.wanted_connecting(state).saturating_sub(state.connecting);
        state.connecting += starts;
        starts
    }

    fn start_connectors(self: &Arc<Self>, count: usize) {
        for _ in 0..count {
            let slot = connector::ConnectingSlot::new(self.clone());
            self.handle.spawn(connector::run(slot));
        }
    }

    /// Called by a connector before each new attempt: false (and the attempt
    /// no longer counted) when nobody needs it any more.
    pub(crate) fn keep_connecting(&self) -> bool {
        let mut state = self.lock();
        if state.connecting > self.wanted_connecting(&state) {
            state.connecting -= 1;
            return false;
        }
        true
    }

    /// Stops counting an attempt that ends without a worker.
    pub(crate) fn stop_connecting(&self) {
        self.lock().connecting -= 1;
    }

    /// Adds a freshly connected worker: to the oldest waiter, or idle.
    pub(crate) fn connected(&self, worker: Worker) {
        let mut state = self.lock();
        state.connecting -= 1;
        state.last_connect_error = None;
        if state.closed {
            drop(state);
            tracing::debug!(worker.pid = worker.pid(), "client closed; closing new worker");
            return;
        }
        tracing::info!(worker.pid = worker.pid(), module = %self.config.module, "worker connected");
        hand_over(&mut state, worker);
    }

    /// Remembers why an attempt failed, for checkouts that time out waiting.
    pub(crate) fn connect_failed(&self, err: io::Error) {
        let mut state = self.lock();
        let first = state.last_connect_error.is_none();
        let address = &self.config.address;
        if first {
            tracing::warn!(%address, error = %Chain(&err), "cannot connect to the daemon; retrying");
        } else {
            tracing::debug!(%address, error = %Chain(&err), "connecting failed again");
        }
        state.last_connect_error = Some((Instant::now(), err));
    }

    /// Fails the oldest waiting checkout with a definite refusal. Returns
    /// false when no checkout was waiting.
    pub(crate) fn refuse_oldest(&self, err: Error) -> bool {
        let mut state = self.lock();
        tracing::warn!(address = %self.config.address, error = %Chain(&err), "worker refused");
        give_oldest(&mut state.waiters, Err(err)).is_none()
    }
}

/// Pops idle workers until one is alive; the dead ones are closed.
fn take_live_idle(state: &mut State) -> Option<Worker> {
    while let Some(worker) = state.idle.pop() {
        if worker.is_usable() {
            return Some(worker);
        }
        tracing::debug!(worker.pid = worker.pid(), "idle worker went away; replacing it");
    }
    None
}

/// Gives a worker to the oldest waiter (it becomes busy), or keeps it idle.
fn hand_over(state: &mut State, worker: Worker) {
    match give_oldest(&mut state.waiters, Ok(worker)) {
        None => state.busy += 1,
        Some(Ok(worker)) => state.idle.push(worker),
        Some(Err(_)) => {}
    }
}

/// Sends an answer to the oldest waiter still listening; gives it back if
/// there is none.
fn give_oldest(waiters: &mut VecDeque<Waiter>, mut answer: Answer) -> Option<Answer> {
    while let Some(waiter) = waiters.pop_front() {
        // A waiter leaves the queue under the lock before its receiver goes
        // away, so this only fails if a checkout future was leaked.
        match waiter.tx.send(answer) {
            Ok(()) => return None,
            Err(back) => answer = back,
        }
    }
    Some(answer)
}

/// A checkout's place in the queue. Dropping it (the checkout timed out or
/// was cancelled) leaves the queue; a worker that was handed over in the
/// meantime goes on to the next waiter, or back to idle.
struct WaitGuard {
    pool: Arc<Pool>,
    id: u64,
    /// `None` once an answer was taken.
    rx: Option<oneshot::Receiver<Answer>>,
}

impl WaitGuard {
    async fn answer(&mut self) -> Answer {
        let rx = self.rx.as_mut().expect("a wait is answered once");
        let answer = rx.await.expect("the pool answers every queued checkout before forgetting it");
        self.rx = None;
        answer
    }
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        let mut state = self.pool.lock();
        if let Some(at) = state.waiters.iter().position(|waiter| waiter.id == self.id) {
            state.waiters.remove(at);
        }
        if let Ok(Ok(worker)) = rx.try_recv() {
            state.busy -= 1;
            if !state.closed {
                hand_over(&mut state, worker);
            }
        }
        // Whatever connection attempt was started for this checkout stops at
        // its next retry if no one else needs it.
    }
}

/// One unit of busy capacity: a worker checked out or running its hook.
/// Dropped without [`Lease::check_in`], it counts the worker as closed and
/// tops the pool up.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    armed: bool,
}

impl Lease {
    fn new(pool: Arc<Pool>) -> Self {
        Lease { pool, armed: true }
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Returns a healthy worker to the pool.
    pub(crate) fn check_in(mut self, worker: Worker) {
        self.armed = false;
        self.pool.check_in(worker);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed {
            self.pool.retire_busy();
        }
    }
}
