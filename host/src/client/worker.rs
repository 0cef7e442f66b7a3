//! One worker as the client sees it: a connection that said hello, and the
//! request/response exchanges made on it.

use std::io;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use tokio::time::Instant;

use super::Config;
use super::connection::{Connection, WireError};
use super::error::{Error, Phase, ProtocolError};
use super::logs::{self, Origin};
use crate::protocol::{ErrorKind, ErrorReply, HelloReply, PROTOCOL_VERSION, Request, Response};

/// A connected worker process that has said hello.
pub(crate) struct Worker {
    conn: Connection,
    hello: HelloReply,
    config: Arc<Config>,
    next_id: u64,
    /// How many checkouts this worker has been handed to.
    pub(crate) checkouts: u64,
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

/// A failed call, and whether the worker must be closed because of it.
pub(crate) struct Failure {
    pub(crate) error: Error,
    pub(crate) retire: bool,
}

impl Failure {
    fn keep(error: Error) -> Self {
        Failure { error, retire: false }
    }

    fn retire(error: Error) -> Self {
        Failure { error, retire: true }
    }
}

/// What one call sends.
pub(crate) struct CallSpec<'a> {
    pub(crate) method: &'a str,
    /// Arguments, already encoded as MessagePack.
    pub(crate) args: &'a [u8],
    /// Time the worker may give the guest.
    pub(crate) timeout_ms: Option<u64>,
    /// Start of the checkout, for the elapsed time of a timeout error.
    pub(crate) started: Instant,
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

impl Worker {
    /// Connects and exchanges hellos.
    pub(crate) async fn connect(config: Arc<Config>) -> Result<Worker, ConnectFailure> {
        let address = &config.address;
        let mut conn = Connection::open(address, config.max_frame)
            .await
            .map_err(ConnectFailure::Unavailable)?;

        let hello = Request::Hello {
            version: PROTOCOL_VERSION,
            module: &config.module,
            client: &config.client_name,
        };
        conn.send(&hello).await.map_err(|err| hello_failure(&config, err))?;
        let frame = conn.recv().await.map_err(|err| hello_failure(&config, err))?;

        let refused = |source| ConnectFailure::Refused(protocol_error(&config, None, source));
        let hello = match rmp_serde::from_slice::<Response>(&frame) {
            Err(err) => return Err(refused(ProtocolError::Malformed(err))),
            Ok(Response::Hello(hello)) => hello,
            Ok(Response::Refused(reply)) => {
                return Err(ConnectFailure::Refused(refusal(&config, reply)));
            }
            Ok(other) => {
                let got = message_name(&other);
                return Err(refused(ProtocolError::Unexpected { expected: "a hello reply", got }));
            }
        };
        if hello.version != PROTOCOL_VERSION {
            let source = ProtocolError::Version { theirs: hello.version, ours: PROTOCOL_VERSION };
            return Err(ConnectFailure::Refused(protocol_error(&config, Some(hello.pid), source)));
        }
        Ok(Worker { conn, hello, config, next_id: 1, checkouts: 0 })
    }

    /// Process id of the worker.
    pub(crate) fn pid(&self) -> u32 {
        self.hello.pid
    }

    /// Whether the guest has a checkout-done hook to run between checkouts.
    pub(crate) fn has_hook(&self) -> bool {
        self.hello.checkout_done_hook
    }

    /// Whether the connection is still open and quiet, checked without blocking.
    pub(crate) fn is_usable(&self) -> bool {
        self.conn.is_usable()
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Calls a method and decodes its result.
    ///
    /// Not cancel safe: dropping the future mid-way leaves the connection in an
    /// unknown state, and the caller must then close the worker.
    pub(crate) async fn call<R: DeserializeOwned>(
        &mut self,
        spec: &CallSpec<'_>,
    ) -> Result<R, Failure> {
        let method = spec.method;
        let id = self.next_id();
        let request = Request::Call { id, method, args: spec.args, timeout_ms: spec.timeout_ms };
        self.conn.send(&request).await.map_err(|err| self.send_failure(method, err))?;

        let frame = self.conn.recv().await.map_err(|err| self.recv_failure(method, err))?;
        let (got, result, records) = match rmp_serde::from_slice::<Response>(&frame) {
            Ok(Response::Reply { id, result, logs, .. }) => (id, result, logs),
            Ok(other) => {
                let got = message_name(&other);
                let source = ProtocolError::Unexpected { expected: "a call reply", got };
                return Err(Failure::retire(self.protocol(source)));
            }
            Err(err) => return Err(Failure::retire(self.protocol(ProtocolError::Malformed(err)))),
        };
        if got != id {
            return Err(Failure::retire(
                self.protocol(ProtocolError::WrongId { expected: id, got }),
            ));
        }
        logs::emit(&self.origin(method), &records);

        match result {
            Ok(payload) => rmp_serde::from_slice(payload.0).map_err(|source| {
                Failure::keep(Error::Decode { method: method.to_owned(), source })
            }),
            Err(reply) => {
                let retire = reply.kind.is_fatal();
                Err(Failure { error: self.reply_error(reply, spec), retire })
            }
        }
    }

    /// Runs the guest's checkout-done hook.
    ///
    /// Not cancel safe, like [`Worker::call`].
    pub(crate) async fn checkout_done(&mut self) -> Result<(), HookError> {
        let id = self.next_id();
        self.conn.send(&Request::CheckoutDone { id }).await?;
        let frame = self.conn.recv().await?;
        let response =
            rmp_serde::from_slice::<Response>(&frame).map_err(ProtocolError::Malformed)?;
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
    fn send_failure(&self, method: &str, err: WireError) -> Failure {
        match err {
            WireError::TooLong { len, max } => {
                Failure::keep(Error::ArgsTooLarge { method: method.to_owned(), len, max })
            }
            WireError::Encode(err) => Failure::keep(self.protocol(ProtocolError::Encode(err))),
            other => self.recv_failure(method, other),
        }
    }

    /// Maps a failed receive; the worker is closed in every case.
    fn recv_failure(&self, method: &str, err: WireError) -> Failure {
        let pid = self.pid();
        let method = method.to_owned();
        let error = match err {
            WireError::TooLarge { max } => self.protocol(ProtocolError::FrameTooLarge { max }),
            WireError::Encode(err) => self.protocol(ProtocolError::Encode(err)),
            WireError::Closed => Error::WorkerDied { pid, method, source: None },
            WireError::Io(err) => Error::WorkerDied { pid, method, source: Some(err) },
            err @ (WireError::Truncated | WireError::TooLong { .. }) => {
                let source = io::Error::new(io::ErrorKind::UnexpectedEof, err.to_string());
                Error::WorkerDied { pid, method, source: Some(source) }
            }
        };
        Failure::retire(error)
    }

    /// Maps an error reply from the worker onto the caller's error type.
    fn reply_error(&self, reply: ErrorReply, spec: &CallSpec<'_>) -> Error {
        let pid = self.pid();
        let method = spec.method.to_owned();
        let module = self.config.module.clone();
        let message = reply.message;
        match reply.kind {
            ErrorKind::GuestError => Error::GuestError { pid, method, message },
            ErrorKind::GuestTrap => {
                Error::GuestTrap { pid, method, message, backtrace: reply.backtrace }
            }
            ErrorKind::Limit => Error::Limit { pid, method, message },
            ErrorKind::Timeout => {
                Error::Timeout { phase: Phase::Calling { method }, elapsed: spec.started.elapsed() }
            }
            ErrorKind::UnknownMethod => Error::UnknownMethod { pid, method },
            ErrorKind::UnknownModule => Error::UnknownModule { module, message },
            ErrorKind::SetupFailed => Error::SetupFailed { module, message },
            kind @ (ErrorKind::CheckoutDoneFailed | ErrorKind::Protocol) => {
                self.protocol(ProtocolError::Reported { kind, message })
            }
        }
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
        WireError::Encode(err) => {
            ConnectFailure::Refused(protocol_error(config, None, ProtocolError::Encode(err)))
        }
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
