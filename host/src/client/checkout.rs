//! A worker checked out for exclusive use, and the calls made on it.

use std::collections::VecDeque;
use std::fmt;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, MutexGuard as StdGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::runtime::{Handle, Id as RuntimeId};
use tokio::sync::{Mutex, MutexGuard};
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::error::{Chain, Error, Phase};
use super::ledger::{Ledger, Ticket};
use super::pool::Pool;
use super::release::release;
use super::report::{CallReport, CallTimings};
use super::status::Retirement;
use super::worker::{Answer, CallSpec, Worker};
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
    /// The worker, held by one call at a time: the first of the outbox.
    seat: Arc<Mutex<Seat>>,
    ledger: std::sync::Mutex<Ledger>,
    /// The calls made and not yet answered, in the order they were made.
    outbox: std::sync::Mutex<Outbox>,
    /// Wakes the call holding the worker.
    bell: Bell,
    /// Cancelled by [`Checkout::abort`], for the calls waiting for their turn.
    abort: CancellationToken,
}

/// The worker of a checkout, while it has one.
struct Seat {
    /// `None` once the worker was closed during the checkout.
    worker: Option<Worker>,
    /// Whether the worker returned an error during the checkout.
    tainted: bool,
    /// The timer of the checkout's deadline, polled by the call holding the
    /// worker while it waits for its reply: set once, on the first call
    /// that waits, rather than once per call; again only for a call made
    /// on another runtime than the timer's (whose timers that runtime
    /// drives, if it still runs at all).
    alarm: Option<(RuntimeId, Pin<Box<Sleep>>)>,
}

/// Wakes the call holding the worker (one call at a time holds it) when a
/// call is made behind it or the checkout is aborted: a flag each, and the
/// holder's waker.
#[derive(Default)]
struct Bell {
    waker: AtomicWaker,
    queued: AtomicBool,
    aborted: AtomicBool,
}

impl Bell {
    fn ring(&self, flag: &AtomicBool) {
        flag.store(true, SeqCst);
        self.waker.wake();
    }

    /// Resolves once `flag` is set, clearing it if `take`.
    fn wait<'a>(&'a self, flag: &'a AtomicBool, take: bool) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            self.waker.register(cx.waker());
            let set = if take { flag.swap(false, SeqCst) } else { flag.load(SeqCst) };
            if set { Poll::Ready(()) } else { Poll::Pending }
        })
    }
}

/// The capacity a call's encoded arguments start with.
const ARGS_CAPACITY: usize = 256;

/// Why a call stopped waiting for its turn.
enum Interrupted {
    Aborted,
    Deadline,
}

/// The calls of a checkout that were made and are not yet answered.
///
/// The call holding the worker sends, while it waits for its own reply,
/// the requests of the calls queued behind it as they are made (as many as
/// the pipeline's bounds allow), so that the worker finds its next call
/// waiting when it is done with one. Each call still takes the worker in
/// turn to read its own reply.
#[derive(Default)]
struct Outbox {
    next_seq: u64,
    /// Ordered by `seq`, which is also the order calls take the worker.
    calls: VecDeque<Outgoing>,
}

/// A call made on the checkout, until it is answered or given up.
struct Outgoing {
    seq: u64,
    ticket: Ticket,
    method: String,
    args: Vec<u8>,
    sent: Sent,
    /// Woken when the call becomes the first of the outbox: its turn.
    waker: Option<Waker>,
}

/// How far a call's request got.
enum Sent {
    /// Not sent yet.
    No,
    /// Sent as call `id`, at `at`.
    Yes { id: u64, at: Instant },
    /// Sending it failed before anything reached the worker.
    Failed(Error),
}

/// A call's own request when its turn comes.
enum Own {
    /// Sent ahead as call `id`, at `at`.
    Ahead { id: u64, at: Instant },
    /// Not sent: its arguments, for the call to send itself.
    Unsent(Vec<u8>),
    /// Sending it failed before anything reached the worker.
    Failed(Error),
}

impl Outbox {
    fn position(&self, seq: u64) -> Option<usize> {
        self.calls.binary_search_by_key(&seq, |call| call.seq).ok()
    }

    /// How far call `seq`'s request got, taking its arguments if it is
    /// still to be sent (calls sent ahead are only those after the one
    /// holding the worker, so nobody else sends it now).
    fn take_turn(&mut self, seq: u64) -> Own {
        let i = self.position(seq).expect("a call keeps its place until it ends");
        let call = &mut self.calls[i];
        match &call.sent {
            Sent::No => Own::Unsent(std::mem::take(&mut call.args)),
            Sent::Yes { id, at } => Own::Ahead { id: *id, at: *at },
            Sent::Failed(error) => Own::Failed(error.clone()),
        }
    }
}

/// A call's place in the outbox; dropping it takes the call out.
struct Place<'a> {
    outbox: &'a std::sync::Mutex<Outbox>,
    seq: u64,
}

impl Place<'_> {
    /// Waits until every call made before this one has ended.
    fn first(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
            let first = outbox.calls.front().expect("a call keeps its place until it ends");
            if first.seq == self.seq {
                return Poll::Ready(());
            }
            let i = outbox.position(self.seq).expect("a call keeps its place until it ends");
            outbox.calls[i].waker = Some(cx.waker().clone());
            Poll::Pending
        })
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut outbox = self.outbox.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(i) = outbox.position(self.seq) else { return };
        outbox.calls.remove(i);
        if i == 0
            && let Some(waker) = outbox.calls.front_mut().and_then(|next| next.waker.take())
        {
            waker.wake();
        }
    }
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
            seat: Arc::new(Mutex::new(Seat { worker: Some(worker), tainted: false, alarm: None })),
            ledger: std::sync::Mutex::default(),
            outbox: std::sync::Mutex::default(),
            bell: Bell::default(),
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
    /// its worker one at a time, in the order they were made (the order
    /// their futures are first polled), their requests
    /// sent ahead while earlier calls run. If one fails, those made before
    /// its failure and still waiting fail at once with
    /// [`Error::EarlierCallFailed`] (the worker skips those it already has);
    /// calls made afterwards run normally as long as the worker is there. A
    /// result that fails to decode is the one failure the worker does not
    /// see: calls already sent behind it run and return their own results.
    /// Once the worker is lost (it trapped, died, hit a limit), every later
    /// call fails at once with the error that lost it; after
    /// [`abort`](Self::abort), with [`Error::Aborted`].
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
        self.bell.ring(&self.bell.aborted);
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

    fn outbox(&self) -> StdGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn report<R: DeserializeOwned>(
        &self,
        method: &str,
        args: &(impl Serialize + ?Sized),
    ) -> CallReport<R> {
        let issued = Instant::now();
        let timings = CallTimings { checkout_wait: self.waited, ..CallTimings::default() };
        let mut trace = Trace { logs: Vec::new(), timings };
        // Room for small arguments from the start: grown from nothing, the
        // buffer was reallocated five times for 64 bytes.
        let mut buf = Vec::with_capacity(ARGS_CAPACITY);
        let result = match rmp_serde::encode::write_named(&mut buf, args) {
            Ok(()) => self.before_deadline(method, buf, issued, &mut trace).await,
            Err(source) => {
                Err(Error::Encode { method: method.to_owned(), source: Arc::new(source) })
            }
        };
        CallReport { result, logs: trace.logs, timings: trace.timings }
    }

    async fn before_deadline<R: DeserializeOwned>(
        &self,
        method: &str,
        args: Vec<u8>,
        issued: Instant,
        trace: &mut Trace,
    ) -> Result<R, Error> {
        // Ticket and place are taken together, and the worker's lock asked
        // for before any await: the order of the three is the same.
        let (ticket, place, behind) = {
            // The ticket is taken under the outbox's lock, so that tickets
            // never decrease along the outbox (see `next_to_send`).
            let mut outbox = self.outbox();
            let ticket = self.ledger().ticket()?;
            let behind = !outbox.calls.is_empty();
            let seq = outbox.next_seq;
            outbox.next_seq += 1;
            // Only a call made behind others may be sent by another call;
            // the first sends itself and keeps its method name at hand.
            let method = if behind { method.to_owned() } else { String::new() };
            let call = Outgoing { seq, ticket, method, args, sent: Sent::No, waker: None };
            outbox.calls.push_back(call);
            (ticket, Place { outbox: &self.outbox, seq }, behind)
        };
        if behind {
            // The call holding the worker sends it ahead if it can.
            self.bell.ring(&self.bell.queued);
        }
        // The clock was read when the call was made, a moment ago.
        if self.deadline.is_some_and(|deadline| issued >= deadline) {
            return Err(self.time_out(method));
        }
        self.in_turn(method, &place, ticket, issued, trace).await
    }

    /// Waits until the call's turn has come and the worker is free, unless
    /// the checkout is aborted or its deadline passes first. A call that
    /// finds its turn at once (one caller making calls one after another)
    /// sets no timer and polls no abort signal.
    async fn take_seat(&self, place: &Place<'_>) -> Result<MutexGuard<'_, Seat>, Interrupted> {
        let mut wait = pin!(async {
            place.first().await;
            match self.seat.try_lock() {
                Ok(seat) => seat,
                Err(_) => self.seat.lock().await,
            }
        });
        let mut aborted = pin!(None);
        let mut alarm = pin!(None::<Sleep>);
        std::future::poll_fn(|cx| {
            if self.bell.aborted.load(SeqCst) {
                return Poll::Ready(Err(Interrupted::Aborted));
            }
            if let Poll::Ready(seat) = wait.as_mut().poll(cx) {
                return Poll::Ready(Ok(seat));
            }
            if aborted.is_none() {
                aborted.set(Some(self.abort.cancelled()));
            }
            if aborted.as_mut().as_pin_mut().is_some_and(|a| a.poll(cx).is_ready()) {
                return Poll::Ready(Err(Interrupted::Aborted));
            }
            let Some(deadline) = self.deadline else { return Poll::Pending };
            if alarm.is_none() {
                alarm.set(Some(sleep_until(deadline)));
            }
            match alarm.as_mut().as_pin_mut().map(|a| a.poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(Interrupted::Deadline)),
                _ => Poll::Pending,
            }
        })
        .await
    }

    /// Waits for the calls made before this one, then makes it (unless it
    /// was already sent ahead) and reads its reply.
    async fn in_turn<R: DeserializeOwned>(
        &self,
        method: &str,
        place: &Place<'_>,
        ticket: Ticket,
        issued: Instant,
        trace: &mut Trace,
    ) -> Result<R, Error> {
        // Turns go by the order calls were made, not by the order they
        // first asked for the worker's lock: the two can differ (calls made
        // from several threads, or a task out of its scheduling budget),
        // and calls sent ahead must read their replies in the order sent.
        let seat = match self.take_seat(place).await {
            Ok(seat) => seat,
            Err(Interrupted::Aborted) => return Err(self.ledger().aborted_error(self.pid)),
            Err(Interrupted::Deadline) => return Err(self.time_out(method)),
        };
        let now = Instant::now();
        trace.timings.turn_wait = now.saturating_duration_since(issued);
        let mut turn = Turn { seat, in_call: false, deadline: self.deadline };
        let time_left = self.deadline.map(|d| d.saturating_duration_since(now));
        if time_left.is_some_and(|left| left.is_zero()) {
            // The turn came with the deadline: time out, as the wait would have.
            turn.close(Retirement::Timeout);
            return Err(self.time_out(method));
        }
        let own = self.outbox().take_turn(place.seq);
        let id = match own {
            Own::Ahead { id, .. } => Some(id),
            Own::Unsent(_) | Own::Failed(_) => None,
        };
        // A call sent ahead is answered by the worker even when it is to be
        // skipped: its reply must be read. One not sent is skipped here.
        if id.is_none() || turn.seat.worker.is_none() {
            let skipped = self.ledger().skip(self.pid, method, ticket);
            if let Some(error) = skipped {
                if self.bell.aborted.load(SeqCst) {
                    turn.close(Retirement::Aborted);
                }
                return Err(error);
            }
        }
        let Some(worker) = turn.seat.worker.as_ref() else {
            return Err(Error::WorkerClosed { pid: self.pid, method: method.to_owned() });
        };
        if worker.oldest_in_flight() != id {
            // A call sent ahead was given up before its reply was read: the
            // replies no longer line up with the calls waiting for them.
            tracing::warn!(worker.pid = self.pid, "a call sent ahead was dropped; closing worker");
            turn.close(Retirement::Aborted);
            return Err(Error::WorkerClosed { pid: self.pid, method: method.to_owned() });
        }
        if let Own::Failed(error) = own {
            return self.settle(&mut turn, method, Err(error), None, Duration::ZERO);
        }

        turn.in_call = true;
        let seat = &mut *turn.seat;
        let worker = seat.worker.as_mut().expect("checked above");
        let answer = tokio::select! {
            biased;
            () = self.bell.wait(&self.bell.aborted, false) => Err(Interrupted::Aborted),
            answer = self.exchange::<R>(worker, method, place.seq, own, time_left) => Ok(answer),
            () = alarm(&mut seat.alarm, self.deadline) => Err(Interrupted::Deadline),
        };
        turn.in_call = false;
        let (answer, sent_at) = match answer {
            Ok(answer) => answer,
            Err(Interrupted::Aborted) => {
                turn.close(Retirement::Aborted);
                return Err(self.ledger().aborted_error(self.pid));
            }
            Err(Interrupted::Deadline) => {
                turn.close(Retirement::Timeout);
                return Err(self.time_out(method));
            }
        };
        let now = Instant::now();
        trace.timings.round_trip =
            sent_at.map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        trace.logs = answer.logs;
        trace.timings.worker = answer.stats;
        let mut retire = answer.retire;
        if answer.skipped {
            // The worker skipped it for the failure the ledger has recorded;
            // skipping without one breaks the protocol.
            match self.ledger().skip(self.pid, method, ticket) {
                Some(error) => return Err(error),
                None => retire = Some(Retirement::Error),
            }
        }
        let took = now.saturating_duration_since(sent_at.unwrap_or(issued));
        self.settle(&mut turn, method, answer.result, retire, took)
    }

    /// Sends this call's request if it was not sent ahead, then reads its
    /// reply; meanwhile it sends the requests of the calls queued behind it,
    /// as they are made, within the pipeline's bounds. Returns the answer
    /// and when the request was sent.
    async fn exchange<R: DeserializeOwned>(
        &self,
        worker: &mut Worker,
        method: &str,
        seq: u64,
        own: Own,
        time_left: Option<Duration>,
    ) -> (Answer<R>, Option<Instant>) {
        let (id, at) = match own {
            Own::Ahead { id, at } => (id, at),
            Own::Unsent(args) => {
                let spec = CallSpec { method, args: &args, timeout_ms: time_left.map(ceil_ms) };
                match worker.feed_call(&spec).await {
                    Ok(id) => (id, Instant::now()),
                    Err(failure) => return (Answer::failed(failure.error, failure.retire), None),
                }
            }
            Own::Failed(error) => return (Answer::failed(error, false), None),
        };
        loop {
            // Sending fails only once the worker has closed the connection;
            // its reply to this call may still be waiting to be read.
            self.send_queued(worker, seq).await;
            worker.flush().await;
            let frame = tokio::select! {
                biased;
                frame = worker.next_frame() => frame,
                () = self.bell.wait(&self.bell.queued, true) => continue,
            };
            return (worker.answer(frame, id, method, self.started), Some(at));
        }
    }

    /// Feeds the requests of the calls made after call `after` that may be
    /// sent now: not sent, not to be skipped, with no failed one before
    /// them, and within the pipeline's bounds. Stops when the connection
    /// breaks, leaving the rest unsent for their callers to find out.
    async fn send_queued(&self, worker: &mut Worker, mut after: u64) {
        while let Some((seq, method, args)) = self.next_to_send(worker, after) {
            let spec = CallSpec { method: &method, args: &args, timeout_ms: self.time_left_ms() };
            let fed = worker.feed_call(&spec).await;
            after = seq;
            let mut outbox = self.outbox();
            // A call given up meanwhile has no entry left; the next call to
            // take the worker finds its reply unread and closes the worker.
            let Some(i) = outbox.position(seq) else { continue };
            match fed {
                Ok(id) => outbox.calls[i].sent = Sent::Yes { id, at: Instant::now() },
                Err(failure) if failure.retire => return,
                // Nothing was sent: its caller gets the error in its turn, and
                // no later call goes ahead of it.
                Err(failure) => {
                    outbox.calls[i].sent = Sent::Failed(failure.error);
                    return;
                }
            }
        }
    }

    /// Takes the request (sequence number, method, arguments) of the first
    /// call after call `after` that may be sent now.
    fn next_to_send(&self, worker: &Worker, after: u64) -> Option<(u64, String, Vec<u8>)> {
        let mut outbox = self.outbox();
        if outbox.calls.back().is_none_or(|last| last.seq <= after) {
            return None;
        }
        let line = self.ledger().skips();
        // Past this call's own place and the calls the ledger skips (a
        // prefix, tickets growing along the outbox), only the calls in
        // flight are passed over: the scan stays short however many wait.
        let start =
            outbox.calls.partition_point(|call| call.seq <= after || line.skips(call.ticket));
        let call =
            outbox.calls.range_mut(start..).find(|call| !matches!(call.sent, Sent::Yes { .. }))?;
        if matches!(call.sent, Sent::Failed(_))
            || !worker.has_room(call.args.len() + call.method.len())
        {
            return None;
        }
        Some((call.seq, std::mem::take(&mut call.method), std::mem::take(&mut call.args)))
    }

    /// The time left before the deadline, in whole milliseconds rounded up.
    fn time_left_ms(&self) -> Option<u64> {
        self.deadline.map(|d| ceil_ms(d.saturating_duration_since(Instant::now())))
    }

    /// Records how a call that got an answer `took` (since its request was
    /// sent), closing the worker if it cannot be used any more.
    fn settle<R>(
        &self,
        turn: &mut Turn<'_>,
        method: &str,
        result: Result<R, Error>,
        retire: Option<Retirement>,
        took: Duration,
    ) -> Result<R, Error> {
        let elapsed_ms = took.as_millis() as u64;
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

/// Resolves once `deadline` has passed, never without one. The timer lives
/// in `slot`, made on the first poll and kept for later calls made on the
/// same runtime.
fn alarm(
    slot: &mut Option<(RuntimeId, Pin<Box<Sleep>>)>,
    deadline: Option<Instant>,
) -> impl Future<Output = ()> + '_ {
    let here = deadline.map(|_| Handle::current().id());
    std::future::poll_fn(move |cx| {
        let (Some(deadline), Some(here)) = (deadline, here) else { return Poll::Pending };
        if slot.as_ref().is_none_or(|(made_on, _)| *made_on != here) {
            *slot = Some((here, Box::pin(sleep_until(deadline))));
        }
        let (_, sleep) = slot.as_mut().expect("set above");
        sleep.as_mut().poll(cx)
    })
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
        if aborted || worker.oldest_in_flight().is_some() {
            // A reply nobody will read would be taken for the next one's.
            worker.retire(Retirement::Aborted);
        } else if worker.is_broken() {
            worker.retire(Retirement::Death);
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
