//! The pool: every worker by stage, the FIFO queue of waiting checkouts, and
//! the counts of what happened.
//!
//! All bookkeeping happens under one short `std` mutex that is never held
//! across an `.await`, nor while a worker is dropped (dropping one takes the
//! lock). Each unit of capacity is owned by a guard (a queued [`WaitGuard`],
//! a [`Member`] inside a connector or a [`Worker`]) whose `Drop` gives it
//! back, so a future cancelled at any `.await` cannot leak a place.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::runtime::Handle;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, timeout_at};

use super::Config;
use super::backoff::{Claim, MAX_REFUSED_RETRY, Refusals};
use super::connector;
use super::error::{Chain, Error, Phase};
use super::member::Member;
use super::status::{Events, Retirement, Status};
use super::worker::Worker;

/// What a queued checkout receives: a worker, or the refusal meant for it.
type Answer = Result<Worker, Error>;

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Answer>,
}

/// Where a member of the pool stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Idle,
    Busy,
    Closing,
}

/// How many members stand in each stage.
#[derive(Debug, Default)]
struct Counts {
    connecting: usize,
    idle: usize,
    busy: usize,
    closing: usize,
}

#[derive(Default)]
struct State {
    /// Every place in the pool, by key: the source of every worker count.
    members: HashMap<u64, Stage>,
    next_member: u64,
    /// The idle workers, used last-in first-out so that the workers beyond
    /// current need age out while the busy ones stay warm.
    idle: Vec<Worker>,
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    /// The last failed connection attempt since the last successful one.
    last_connect_error: Option<(Instant, Arc<io::Error>)>,
    /// The last refusal since the last successful connection.
    last_refusal: Option<(Instant, Error)>,
    refusals: Refusals,
    events: Events,
    /// Set when the last `Client` is dropped: nothing is kept or started after.
    closed: bool,
}

impl State {
    fn counts(&self) -> Counts {
        let mut counts = Counts::default();
        for stage in self.members.values() {
            match stage {
                Stage::Connecting => counts.connecting += 1,
                Stage::Idle => counts.idle += 1,
                Stage::Busy => counts.busy += 1,
                Stage::Closing => counts.closing += 1,
            }
        }
        counts
    }

    fn set_stage(&mut self, id: u64, stage: Stage) {
        if let Some(at) = self.members.get_mut(&id) {
            *at = stage;
        }
    }

    /// Counts a worker as closing (for `cause`), before it is dropped.
    fn mark_closing(&mut self, worker: &mut Worker, cause: Option<Retirement>) {
        if let Some(cause) = cause {
            worker.set_cause(cause);
        }
        worker.marked = true;
        self.closing(worker.id(), worker.pid(), worker.cause());
    }

    fn closing(&mut self, id: u64, pid: u32, cause: Option<Retirement>) {
        self.set_stage(id, Stage::Closing);
        match cause {
            Some(cause) => {
                self.events.retired.count(cause);
                tracing::info!(worker.pid = pid, cause = cause.as_str(), "closing worker");
            }
            None => tracing::debug!(worker.pid = pid, "client closed; closing worker"),
        }
    }

    /// Gives a worker to the oldest waiter (it becomes busy), or keeps it idle.
    fn hand_over(&mut self, mut worker: Worker) {
        let id = worker.id();
        worker.idle_since = Instant::now();
        match give_oldest(&mut self.waiters, Ok(worker)) {
            None => self.set_stage(id, Stage::Busy),
            Some(Ok(worker)) => {
                self.set_stage(id, Stage::Idle);
                self.idle.push(worker);
            }
            Some(Err(_)) => unreachable!("a worker was given, a worker comes back"),
        }
    }

    /// Pops idle workers until one is alive and young enough; the others go
    /// to `trash`, counted as closing.
    fn take_live_idle(&mut self, trash: &mut Vec<Worker>) -> Option<Worker> {
        let now = Instant::now();
        while let Some(mut worker) = self.idle.pop() {
            let cause = if !worker.is_usable() {
                Retirement::Death
            } else if worker.too_old(now) {
                Retirement::Lifetime
            } else {
                self.set_stage(worker.id(), Stage::Busy);
                return Some(worker);
            };
            self.mark_closing(&mut worker, Some(cause));
            trash.push(worker);
        }
        None
    }
}

/// A client's workers and the checkouts waiting for them.
pub(crate) struct Pool {
    pub(crate) config: Arc<Config>,
    pub(crate) handle: Handle,
    state: Mutex<State>,
    /// Bumped whenever the refusal back-off may let a waiting connector go.
    backoff_changed: watch::Sender<u64>,
}

impl Pool {
    pub(crate) fn new(config: Arc<Config>, handle: Handle) -> Arc<Pool> {
        let (backoff_changed, _) = watch::channel(0);
        Arc::new(Pool { config, handle, state: Mutex::default(), backoff_changed })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if some did, the records are
        // still the best information there is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `change` under the lock, then, with the lock released, drops the
    /// workers it put in the trash and starts the connections now needed.
    fn update<T>(self: &Arc<Self>, change: impl FnOnce(&mut State, &mut Vec<Worker>) -> T) -> T {
        let mut trash = Vec::new();
        let (out, starts) = {
            let mut state = self.lock();
            let out = change(&mut state, &mut trash);
            (out, self.plan(&mut state))
        };
        drop(trash);
        self.start_connectors(starts);
        out
    }

    /// Starts connections until `min_workers` exist or are on their way.
    pub(crate) fn fill(self: &Arc<Self>) {
        self.update(|_, _| ());
    }

    pub(crate) fn status(&self) -> Status {
        let state = self.lock();
        let counts = state.counts();
        debug_assert_eq!(counts.idle, state.idle.len());
        let events = state.events;
        Status {
            connecting: counts.connecting,
            idle: counts.idle,
            busy: counts.busy,
            closing: counts.closing,
            waiting: state.waiters.len(),
            checkouts: events.checkouts,
            calls: events.calls,
            failed_calls: events.failed_calls,
            connected: events.connected,
            refused: events.refused,
            retired: events.retired,
        }
    }

    /// Closes idle workers and stops all further work; busy workers are
    /// closed when they are released.
    pub(crate) fn close(self: &Arc<Self>) {
        self.update(|state, trash| {
            state.closed = true;
            let mut idle = std::mem::take(&mut state.idle);
            for worker in &mut idle {
                state.mark_closing(worker, None);
            }
            trash.append(&mut idle);
        });
    }

    /// Gets a worker for a checkout: an idle one if any is alive, otherwise
    /// the first one that comes back or connects after the checkouts queued
    /// before this one have been served.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        started: Instant,
        deadline: Option<Instant>,
    ) -> Result<Worker, Error> {
        let mut wait = match self.take_or_queue() {
            Ok(worker) => return Ok(self.counted(worker)),
            Err(wait) => wait,
        };
        let answer = match deadline {
            Some(deadline) => timeout_at(deadline, wait.answer()).await.ok(),
            None => Some(wait.answer().await),
        };
        match answer {
            Some(Ok(worker)) => Ok(self.counted(worker)),
            Some(Err(err)) => Err(err),
            None => Err(self.waiting_timed_out(started)),
        }
    }

    fn counted(&self, worker: Worker) -> Worker {
        self.lock().events.checkouts += 1;
        worker
    }

    /// Takes an idle worker that is still alive, or queues the caller.
    fn take_or_queue(self: &Arc<Self>) -> Result<Worker, WaitGuard> {
        self.update(|state, trash| {
            if let Some(worker) = state.take_live_idle(trash) {
                return Ok(worker);
            }
            let (tx, rx) = oneshot::channel();
            let id = state.next_waiter;
            state.next_waiter += 1;
            state.waiters.push_back(Waiter { id, tx });
            Err(WaitGuard { pool: self.clone(), id, rx: Some(rx) })
        })
    }

    /// The error of a checkout whose deadline passed while it waited.
    ///
    /// If connection attempts failed during the wait, or were refused during
    /// it or in the back-off pause before it, the last of those says more
    /// than a bare timeout.
    fn waiting_timed_out(&self, started: Instant) -> Error {
        let state = self.lock();
        let refused =
            state.last_refusal.as_ref().filter(|(at, _)| *at + MAX_REFUSED_RETRY >= started);
        let failed = state.last_connect_error.as_ref().filter(|(at, _)| *at >= started);
        match (refused, failed) {
            (Some((refused_at, err)), failed) if failed.is_none_or(|(at, _)| at <= refused_at) => {
                err.clone()
            }
            (_, Some((_, err))) => {
                Error::Connect { address: self.config.address.clone(), source: err.clone() }
            }
            _ => Error::Timeout { phase: Phase::WaitingForWorker, elapsed: started.elapsed() },
        }
    }

    /// Gives a released, healthy worker to the oldest waiting checkout, or
    /// keeps it idle.
    pub(crate) fn check_in(self: &Arc<Self>, mut worker: Worker) {
        self.update(|state, trash| {
            if state.closed {
                state.mark_closing(&mut worker, None);
                trash.push(worker);
            } else {
                state.hand_over(worker);
            }
        });
    }

    /// Counts a worker, about to be dropped, as closing for `cause`.
    pub(crate) fn mark_closing(&self, id: u64, pid: u32, cause: Option<Retirement>) {
        self.lock().closing(id, pid, cause);
    }

    /// Forgets a member whose process has gone or whose attempt ended, and
    /// replaces it if needed.
    pub(crate) fn leave(self: &Arc<Self>, id: u64) {
        self.update(|state, _| {
            state.members.remove(&id);
        });
    }

    /// Counts a call made on a checkout, and whether it failed.
    pub(crate) fn count_call(&self, ok: bool) {
        let mut state = self.lock();
        state.events.calls += 1;
        if !ok {
            state.events.failed_calls += 1;
        }
    }

    /// How many connection attempts should be under way now.
    ///
    /// Each waiting checkout wants one (no worker is idle when one waits),
    /// and the pool wants `min_workers` live ones; all of them together,
    /// closing ones included, never more than `max_workers`.
    fn wanted_connecting(&self, state: &State, counts: &Counts) -> usize {
        if state.closed {
            return 0;
        }
        let live = counts.idle + counts.busy;
        let demand = state.waiters.len().max(self.config.min_workers.saturating_sub(live));
        demand.min(self.config.max_workers.saturating_sub(live + counts.closing))
    }

    /// Records the connection attempts to start now, as members; the caller
    /// starts them with [`Pool::start_connectors`] once the lock is released.
    fn plan(&self, state: &mut State) -> Vec<u64> {
        let counts = state.counts();
        let starts = self.wanted_connecting(state, &counts).saturating_sub(counts.connecting);
        (0..starts)
            .map(|_| {
                let id = state.next_member;
                state.next_member += 1;
                state.members.insert(id, Stage::Connecting);
                id
            })
            .collect()
    }

    fn start_connectors(self: &Arc<Self>, ids: Vec<u64>) {
        for id in ids {
            let member = Member::new(self.clone(), id);
            self.handle.spawn(connector::run(member));
        }
    }

    /// Called by a connector before each new attempt: false (and the member
    /// already forgotten) when nobody needs the attempt any more.
    pub(crate) fn still_wanted(&self, member: &mut Member) -> bool {
        let mut state = self.lock();
        let counts = state.counts();
        if counts.connecting > self.wanted_connecting(&state, &counts) {
            state.members.remove(&member.id());
            member.disarm();
            return false;
        }
        true
    }

    /// Asks the refusal back-off whether a connector may attempt now.
    pub(crate) fn claim_attempt(&self) -> Claim {
        self.lock().refusals.claim(Instant::now())
    }

    /// Ends a probe made during the refusal back-off.
    pub(crate) fn probe_ended(&self) {
        self.lock().refusals.probe_ended();
        self.backoff_changed.send_modify(|generation| *generation += 1);
    }

    /// A receiver that wakes when the refusal back-off may have changed.
    pub(crate) fn watch_backoff(&self) -> watch::Receiver<u64> {
        self.backoff_changed.subscribe()
    }

    /// Adds a freshly connected worker: to the oldest waiter, or idle.
    pub(crate) fn connected(self: &Arc<Self>, mut worker: Worker) {
        let ended_backoff = self.update(|state, trash| {
            state.events.connected += 1;
            state.last_connect_error = None;
            state.last_refusal = None;
            let ended_backoff = state.refusals.is_active();
            state.refusals.accepted();
            if state.closed {
                state.mark_closing(&mut worker, None);
                trash.push(worker);
            } else {
                let module = &self.config.module;
                tracing::info!(worker.pid = worker.pid(), %module, "worker connected");
                state.hand_over(worker);
            }
            ended_backoff
        });
        if ended_backoff {
            self.backoff_changed.send_modify(|generation| *generation += 1);
        }
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
        state.last_connect_error = Some((Instant::now(), Arc::new(err)));
    }

    /// Counts a refusal, starts or lengthens the back-off, and fails the
    /// oldest waiting checkout with it.
    pub(crate) fn refused(&self, err: Error) {
        let mut state = self.lock();
        let now = Instant::now();
        tracing::warn!(address = %self.config.address, error = %Chain(&err), "worker refused");
        state.events.refused += 1;
        state.refusals.refused(now);
        state.last_refusal = Some((now, err.clone()));
        // Nobody waiting: the refusal stays on record for the next timeout.
        let _ = give_oldest(&mut state.waiters, Err(err));
    }

    /// Closes idle workers that died, outlived `max_lifetime`, or (beyond
    /// `min_workers`) sat idle longer than `idle_timeout`. False once the
    /// pool is closed.
    pub(crate) fn sweep(self: &Arc<Self>) -> bool {
        let config = self.config.clone();
        self.update(|state, trash| {
            if state.closed {
                return false;
            }
            let now = Instant::now();
            let counts = state.counts();
            let mut live = counts.idle + counts.busy;
            // Oldest idle first: the end of the vector is the most recent.
            for mut worker in std::mem::take(&mut state.idle) {
                let idle_for = now.saturating_duration_since(worker.idle_since);
                let cause = if !worker.is_usable() {
                    Some(Retirement::Death)
                } else if worker.too_old(now) {
                    Some(Retirement::Lifetime)
                } else if config.idle_timeout.is_some_and(|limit| idle_for >= limit)
                    && live > config.min_workers
                {
                    Some(Retirement::Idle)
                } else {
                    None
                };
                match cause {
                    Some(cause) => {
                        live -= 1;
                        state.mark_closing(&mut worker, Some(cause));
                        trash.push(worker);
                    }
                    None => state.idle.push(worker),
                }
            }
            true
        })
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
        let id = self.id;
        self.pool.update(|state, trash| {
            if let Some(at) = state.waiters.iter().position(|waiter| waiter.id == id) {
                state.waiters.remove(at);
            }
            if let Ok(Ok(mut worker)) = rx.try_recv() {
                if state.closed {
                    state.mark_closing(&mut worker, None);
                    trash.push(worker);
                } else {
                    state.hand_over(worker);
                }
            }
            // Whatever connection attempt was started for this checkout
            // stops at its next retry if no one else needs it.
        });
    }
}
