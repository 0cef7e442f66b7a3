//! One worker as the client sees it: a connection that said hello, and the
//! request/response exchanges made on it.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::Config;
use super::connection::{Connection, WireError};
use super::error::{Error, Phase, ProtocolError};
use super::logs::{self, Origin};
use super::member::{Link, Member};
use super::status::Retirement;
use crate::protocol::{
    CallStats, ErrorKind, ErrorReply, HelloReply, LogRecord, PROTOCOL_VERSION, Request, Response,
};

/// A connected worker process that has said hello.
///
/// Dropping it closes the connection, which makes the worker process exit;
/// the pool keeps counting it until it has (see [`Member`]).
pub(crate) struct Worker {
    /// `Some` until dropped.
    link: Option<Link>,
    hello: HelloReply,
    config: Arc<Config>,
    next_id: u64,
    /// Calls sent whose replies are still to be read, oldest first: id and
    /// size of the request.
    in_flight: VecDeque<(u64, usize)>,
    /// The sum of the sizes in `in_flight`.
    in_flight_bytes: usize,
    /// Whether writing to the connection failed: nothing more is sent, but
    /// replies already in the socket can still be read.
    broken: bool,
    /// How many checkouts this worker has been handed to.
    pub(crate) checkouts: u64,
    /// When the worker said hello.
    born: Instant,
    /// When the worker last became idle.
    pub(crate) idle_since: Instant,
    /// Why the worker is being closed; `None` when the client shuts down.
    cause: Option<Retirement>,
    /// Whether the pool already counts this worker as closing.
    pub(crate) marked: bool,
}

/// Why a connection attempt did not give a worker.
pub(crate) enum ConnectFailure {
    /// The daemon could not be reached, or the connection broke before the
    /// hello reply: worth trying again after a pause.
    Unavailable(io::Error),
    /// A definite answer (a refusal, a protocol violation): trying again at
    /// once would only get the same answer. One waiting checkout gets it.
    Refused(Error),
}

/// Most calls sent ahead of the replies to earlier ones.
const PIPELINE_DEPTH: usize = 64;

/// Most bytes of requests in flight before another is sent ahead. Well
/// within a socket's buffer, so that writing a request never waits for the
/// worker, which may itself be waiting to write a reply that is not read
/// until that write is done.
const PIPELINE_BYTES: usize = 32 << 10;

/// One call to send.
pub(crate) struct CallSpec<'a> {
    pub(crate) method: &'a str,
    /// Arguments, already encoded as MessagePack.
    pub(crate) args: &'a [u8],
    /// Time the worker may give the guest.
    pub(crate) timeout_ms: Option<u64>,
}

/// A call that could not be sent.
pub(crate) struct SendFailure {
    pub(crate) error: Error,
    /// Whether the connection is now unusable (otherwise nothing was sent).
    pub(crate) retire: bool,
}

/// The outcome of one call, with what came back beside the result.
pub(crate) struct Answer<R> {
    pub(crate) result: Result<R, Error>,
    /// Set when the worker cannot be used any more, with the cause to count.
    pub(crate) retire: Option<Retirement>,
    /// The guest's log records and output lines, when a reply came.
    pub(crate) logs: Vec<LogRecord>,
    /// What the call cost the worker, when a reply came.
    pub(crate) stats: Option<CallStats>,
    /// The worker did not run the call, because a call sent before it failed.
    pub(crate) skipped: bool,
}

impl<R> Answer<R> {
    /// A failure without a reply; `retire` if the connection is now unusable.
    pub(crate) fn failed(error: Error, retire: bool) -> Self {
        let retire = retire.then(|| Retirement::after(&error));
        Answer { result: Err(error), retire, logs: Vec::new(), stats: None, skipped: false }
    }
}

/// Why a checkout-done hook did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HookError {
    /// The guest's hook reported an error.
    #[error("the hook failed: {0}")]
    Failed(String),
    /// The connection failed.
    #[error("talking to the worker")]
    Wire(#[from] WireError),
    /// The worker answered something else.
    #[error("unexpected answer")]
    Protocol(#[from] ProtocolError),
}

/// Exchanges hellos on a fresh connection.
pub(crate) async fn hello(
    conn: &mut Connection,
    config: &Config,
) -> Result<HelloReply, ConnectFailure> {
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        module: &config.module,
        client: &config.client_name,
    };
    conn.send(&hello).await.map_err(|err| hello_failure(config, err))?;
    let frame = conn.recv().await.map_err(|err| hello_failure(config, err))?;

    let refused = |source| ConnectFailure::Refused(protocol_error(config, None, source));
    let hello = match rmp_serde::from_slice::<Response>(&frame) {
        Err(err) => return Err(refused(ProtocolError::Malformed(Arc::new(err)))),
        Ok(Response::Hello(hello)) => hello,
        Ok(Response::Refused(reply)) => {
            return Err(ConnectFailure::Refused(refusal(config, reply)));
        }
        Ok(other) => {
            let got = message_name(&other);
            return Err(refused(ProtocolError::Unexpected { expected: "a hello reply", got }));
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let source = ProtocolError::Version { theirs: hello.version, ours: PROTOCOL_VERSION };
        return Err(ConnectFailure::Refused(protocol_error(config, Some(hello.pid), source)));
    }
    Ok(hello)
}

impl Worker {
    /// A worker on `conn`, which said `hello`, holding the place `member`.
    pub(crate) fn new(
        conn: Connection,
        hello: HelloReply,
        member: Member,
        config: Arc<Config>,
    ) -> Worker {
        let now = Instant::now();
        Worker {
            link: Some(Link { conn, member }),
            hello,
            config,
            next_id: 1,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            broken: false,
            checkouts: 0,
            born: now,
            idle_since: now,
            cause: None,
            marked: false,
        }
    }

    /// Process id of the worker.
    pub(crate) fn pid(&self) -> u32 {
        self.hello.pid
    }

    /// The key of this worker in the pool's records.
    pub(crate) fn id(&self) -> u64 {
        self.link().member.id()
    }

    /// Whether the guest has a checkout-done hook to run between checkouts.
    pub(crate) fn has_hook(&self) -> bool {
        self.hello.checkout_done_hook
    }

    /// Whether the connection is still open and quiet, checked without blocking.
    pub(crate) fn is_usable(&self) -> bool {
        self.link().conn.is_usable()
    }

    /// Whether the worker has lived longer than the client's `max_lifetime`.
    pub(crate) fn too_old(&self, now: Instant) -> bool {
        self.config.max_lifetime.is_some_and(|max| now.saturating_duration_since(self.born) >= max)
    }

    /// Sets why the worker will be closed when dropped.
    pub(crate) fn set_cause(&mut self, cause: Retirement) {
        self.cause = Some(cause);
    }

    /// Why the worker is being closed.
    pub(crate) fn cause(&self) -> Option<Retirement> {
        self.cause
    }

    /// Closes the worker, counting it as retired for `cause`.
    pub(crate) fn retire(mut self, cause: Retirement) {
        self.set_cause(cause);
    }

    fn link(&self) -> &Link {
        self.link.as_ref().expect("a worker keeps its link until dropped")
    }

    fn conn(&mut self) -> &mut Connection {
        &mut self.link.as_mut().expect("a worker keeps its link until dropped").conn
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The id of the oldest call whose reply is still to be read.
    pub(crate) fn oldest_in_flight(&self) -> Option<u64> {
        self.in_flight.front().map(|&(id, _)| id)
    }

    /// Whether a request of about `len` bytes may be sent now: always when
    /// nothing is in flight, otherwise within the pipeline's bounds.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        !self.broken
            && (self.in_flight.is_empty()
                || (self.in_flight.len() < PIPELINE_DEPTH
                    && self.in_flight_bytes.saturating_add(len) <= PIPELINE_BYTES))
    }

    /// Whether writing to the connection failed.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Puts a call's request into the send buffer, to go out with the next
    /// [`Worker::flush`], and returns its id. A request sent while others
    /// are in flight asks the worker to skip it if one of those fails.
    ///
    /// Not cancel safe: dropping the future mid-way leaves the connection in an
    /// unknown state, and the caller must then close the worker.
    pub(crate) async fn feed_call(&mut self, spec: &CallSpec<'_>) -> Result<u64, SendFailure> {
        if self.broken {
            let error =
                Error::WorkerDied { pid: self.pid(), method: spec.method.to_owned(), source: None };
            return Err(SendFailure { error, retire: true });
        }
        let id = self.next_id;
        let request = Request::Call {
            id,
            method: spec.method,
            args: spec.args,
            timeout_ms: spec.timeout_ms,
            unless_failed_since: self.oldest_in_flight(),
        };
        if let Err(err) = self.conn().feed(&request).await {
            let failure = self.send_failure(spec.method, err);
            self.broken |= failure.retire;
            return Err(failure);
        }
        self.next_id += 1;
        let len = spec.args.len() + spec.method.len();
        self.in_flight.push_back((id, len));
        self.in_flight_bytes += len;
        Ok(id)
    }

    /// Writes out the requests fed so far. A failure (the worker has
    /// closed the connection) ends all sending; what the worker answered
    /// before it closed can still be read, and reading tells each call
    /// whether its reply came.
    pub(crate) async fn flush(&mut self) {
        if !self.broken && self.conn().flush().await.is_err() {
            self.broken = true;
        }
    }

    /// Receives the next frame. Cancel safe: a frame read in part stays
    /// buffered for the next call.
    pub(crate) async fn next_frame(&mut self) -> Result<BytesMut, WireError> {
        self.conn().recv().await
    }

    /// Takes `frame` (from [`Worker::next_frame`]) as the reply to call
    /// `id`, the oldest in flight, and decodes its result.
    pub(crate) fn answer<R: DeserializeOwned>(
        &mut self,
        frame: Result<BytesMut, WireError>,
        id: u64,
        method: &str,
        started: Instant,
    ) -> Answer<R> {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => return Answer::failed(self.recv_failure(method, err), true),
        };

        let (got, result, logs, stats) = match rmp_serde::from_slice::<Response>(&frame) {
            Ok(Response::Reply { id, result, logs, stats }) => (id, result, logs, stats),
            Ok(other) => {
                let got = message_name(&other);
                let source = ProtocolError::Unexpected { expected: "a call reply", got };
                return Answer::failed(self.protocol(source), true);
            }
            Err(err) => {
                let source = ProtocolError::Malformed(Arc::new(err));
                return Answer::failed(self.protocol(source), true);
            }
        };
        if got != id {
            let source = ProtocolError::WrongId { expected: id, got };
            return Answer::failed(self.protocol(source), true);
        }
        if let Some((_, len)) = self.in_flight.pop_front() {
            self.in_flight_bytes -= len;
        }
        logs::emit(&self.origin(method), &logs);

        let mut skipped = false;
        let (result, retire) = match result {
            Ok(payload) => (
                rmp_serde::from_slice(payload.0).map_err(|source| Error::Decode {
                    method: method.to_owned(),
                    source: Arc::new(source),
                }),
                None,
            ),
            Err(reply) => {
                skipped = reply.kind == ErrorKind::Skipped;
                let fatal = reply.kind.is_fatal();
                let error = self.reply_error(reply, method, started);
                let retire = fatal.then(|| Retirement::after(&error));
                (Err(error), retire)
            }
        };
        Answer { result, retire, logs, stats: Some(stats), skipped }
    }

    /// Runs the guest's checkout-done hook.
    ///
    /// Not cancel safe, like [`Worker::call`].
    pub(crate) async fn checkout_done(&mut self) -> Result<(), HookError> {
        let id = self.next_id();
        self.conn().send(&Request::CheckoutDone { id }).await?;
        let frame = self.conn().recv().await?;
        let response = rmp_serde::from_slice::<Response>(&frame)
            .map_err(|err| ProtocolError::Malformed(Arc::new(err)))?;
        let Response::CheckoutDone { id: got, error, logs } = response else {
            let got = message_name(&response);
            return Err(ProtocolError::Unexpected { expected: "a checkout-done reply", got }.into());
        };
        if got != id {
            return Err(ProtocolError::WrongId { expected: id, got }.into());
        }
        logs::emit(&self.origin("checkout_done"), &logs);
        match error {
            Some(reply) => Err(HookError::Failed(reply.message)),
            None => Ok(()),
        }
    }

    fn origin<'a>(&'a self, method: &'a str) -> Origin<'a> {
        Origin { pid: self.pid(), module: &self.config.module, method }
    }

    fn protocol(&self, source: ProtocolError) -> Error {
        protocol_error(&self.config, Some(self.pid()), source)
    }

    /// Maps a failed send. Nothing reached the worker when the request was
    /// too large or could not be encoded, so the worker stays usable then.
    fn send_failure(&self, method: &str, err: WireError) -> SendFailure {
        let (error, retire) = match err {
            WireError::TooLong { len, max } => {
                (Error::ArgsTooLarge { method: method.to_owned(), len, max }, false)
            }
            WireError::Encode(err) => (self.protocol(ProtocolError::Encode(Arc::new(err))), false),
            other => (self.recv_failure(method, other), true),
        };
        SendFailure { error, retire }
    }

    /// Maps a failed receive; the worker is closed in every case.
    fn recv_failure(&self, method: &str, err: WireError) -> Error {
        let pid = self.pid();
        let method = method.to_owned();
        match err {
            WireError::TooLarge { max } => self.protocol(ProtocolError::FrameTooLarge { max }),
            WireError::Encode(err) => self.protocol(ProtocolError::Encode(Arc::new(err))),
            WireError::Closed => Error::WorkerDied { pid, method, source: None },
            WireError::Io(err) => Error::WorkerDied { pid, method, source: Some(Arc::new(err)) },
            err @ (WireError::Truncated | WireError::TooLong { .. }) => {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, err.to_string());
                Error::WorkerDied { pid, method, source: Some(Arc::new(source)) }
            }
        }
    }

    /// Maps an error reply from the worker onto the caller's error type.
    fn reply_error(&self, reply: ErrorReply, method: &str, started: Instant) -> Error {
        let pid = self.pid();
        let method = method.to_owned();
        let module = self.config.module.clone();
        let message = reply.message;
        match reply.kind {
            ErrorKind::GuestError => Error::GuestError { pid, method, message },
            ErrorKind::GuestTrap => {
                Error::GuestTrap { pid, method, message, backtrace: reply.backtrace }
            }
            ErrorKind::Limit => Error::Limit { pid, method, message },
            ErrorKind::Timeout => {
                Error::Timeout { phase: Phase::Calling { method }, elapsed: started.elapsed() }
            }
            ErrorKind::UnknownMethod => Error::UnknownMethod { pid, method },
            ErrorKind::UnknownModule => Error::UnknownModule { module, message },
            ErrorKind::SetupFailed => Error::SetupFailed { module, message },
            kind @ (ErrorKind::CheckoutDoneFailed | ErrorKind::Protocol | ErrorKind::Skipped) => {
                self.protocol(ProtocolError::Reported { kind, message })
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else { return };
        let pool = link.member.pool().clone();
        if !self.marked {
            pool.mark_closing(link.member.id(), self.pid(), self.cause);
        }
        // Spawning onto a runtime that has shut down drops the task, which
        // closes the connection and gives up the place all the same.
        pool.handle.spawn(link.close());
    }
}

/// Maps a failure to send the hello or to read its reply.
fn hello_failure(config: &Config, err: WireError) -> ConnectFailure {
    let unavailable = |message: &str| {
        ConnectFailure::Unavailable(io::Error::new(io::ErrorKind::UnexpectedEof, message))
    };
    match err {
        WireError::Closed => unavailable("connection closed before the hello reply"),
        WireError::Truncated => unavailable("connection closed in the middle of the hello reply"),
        WireError::Io(err) => ConnectFailure::Unavailable(err),
        WireError::TooLarge { max } | WireError::TooLong { max, .. } => ConnectFailure::Refused(
            protocol_error(config, None, ProtocolError::FrameTooLarge { max }),
        ),
        WireError::Encode(err) => ConnectFailure::Refused(protocol_error(
            config,
            None,
            ProtocolError::Encode(Arc::new(err)),
        )),
    }
}

/// Maps a worker's refusal of the hello onto the caller's error type.
fn refusal(config: &Config, reply: ErrorReply) -> Error {
    let module = config.module.clone();
    let message = reply.message;
    match reply.kind {
        ErrorKind::UnknownModule => Error::UnknownModule { module, message },
        ErrorKind::SetupFailed => Error::SetupFailed { module, message },
        kind => protocol_error(config, None, ProtocolError::Refused { kind, message }),
    }
}

fn protocol_error(config: &Config, pid: Option<u32>, source: ProtocolError) -> Error {
    Error::Protocol { address: config.address.clone(), pid, source }
}

/// Names a response for an "expected X, got Y" error.
fn message_name(response: &Response<'_>) -> &'static str {
    match response {
        Response::Hello(_) => "a hello reply",
        Response::Refused(_) => "a refusal",
        Response::Reply { .. } => "a call reply",
        Response::CheckoutDone { .. } => "a checkout-done reply",
    }
}
