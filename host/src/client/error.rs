//! The errors a client caller can tell apart and act on.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::ErrorKind;

use super::Address;

/// Everything that can go wrong checking out a worker or calling a method.
///
/// Each variant is one thing a caller may act on: retry later (`Connect`,
/// `Timeout`, `WorkerDied`, `WorkerClosed`, `Aborted`, `EarlierCallFailed`),
/// fix the call (`UnknownMethod`, `Encode`, `Decode`, `ArgsTooLarge`), report
/// the guest's answer (`GuestError`, `GuestTrap`, `Limit`) or fix the
/// deployment (`UnknownModule`, `SetupFailed`, `Protocol`). Errors that mean
/// the worker can no longer be trusted (all but `GuestError`, `UnknownMethod`,
/// `Encode`, `Decode`, `ArgsTooLarge` and `EarlierCallFailed`) close that
/// worker at once; the pool replaces it.
///
/// Errors are cheap to clone (their sources are shared), because one failure
/// may be the answer to several calls: a checkout that lost its worker gives
/// every later call the error that lost it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The daemon could not be reached: nothing listens at the address, or the
    /// connection failed before the worker said hello.
    #[error("connecting to {address}")]
    Connect {
        /// The daemon's address.
        address: Address,
        /// The last connection failure.
        #[source]
        source: Arc<io::Error>,
    },

    /// The checkout's deadline passed. Its timeout covers the wait for a
    /// worker and every call made on it.
    #[error("timed out {phase} after {elapsed:?}")]
    Timeout {
        /// What the checkout was doing when time ran out.
        phase: Phase,
        /// Time from the start of the checkout.
        elapsed: Duration,
    },

    /// The guest method ran and returned an error.
    #[error("method {method} on worker {pid} returned an error: {message}")]
    GuestError {
        /// Process id of the worker.
        pid: u32,
        /// The method called.
        method: String,
        /// The guest's error message.
        message: String,
    },

    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access, a
    /// stack overflow). The worker is closed.
    #[error("method {method} on worker {pid} trapped: {message}")]
    GuestTrap {
        /// Process id of the worker.
        pid: u32,
        /// The method called.
        method: String,
        /// What the trap or the panic said.
        message: String,
        /// The wasm backtrace, where the worker captured one.
        backtrace: Option<String>,
    },

    /// The guest hit a resource limit (memory, output size). The worker is closed.
    #[error("method {method} on worker {pid} hit a resource limit: {message}")]
    Limit {
        /// Process id of the worker.
        pid: u32,
        /// The method called.
        method: String,
        /// Which limit, as the worker described it.
        message: String,
    },

    /// The guest has no method of that name.
    #[error("worker {pid} has no method {method:?}")]
    UnknownMethod {
        /// Process id of the worker.
        pid: u32,
        /// The name asked for.
        method: String,
    },

    /// The daemon serves no module of that name.
    #[error("unknown module {module:?}: {message}")]
    UnknownModule {
        /// The module asked for.
        module: String,
        /// The daemon's explanation.
        message: String,
    },

    /// The guest's setup hook failed, so the worker refused the connection.
    #[error("setup of module {module:?} failed: {message}")]
    SetupFailed {
        /// The module whose setup failed.
        module: String,
        /// What the setup hook said.
        message: String,
    },

    /// The worker's connection closed or broke in the middle of a call.
    #[error("worker {pid} died while calling method {method}")]
    WorkerDied {
        /// Process id of the worker.
        pid: u32,
        /// The method in progress.
        method: String,
        /// The socket error, if it was not a plain close.
        #[source]
        source: Option<Arc<io::Error>>,
    },

    /// A call on this checkout was cancelled (its future dropped) in the
    /// middle, which closed the worker, so no more calls can be made on it.
    /// Check out another worker.
    #[error("calling method {method}: worker {pid} was closed when an earlier call was cancelled")]
    WorkerClosed {
        /// Process id of the closed worker.
        pid: u32,
        /// The method that was not called.
        method: String,
    },

    /// The checkout was aborted with [`Checkout::abort`](super::Checkout::abort):
    /// its worker was killed. Every call on it, the one in flight included,
    /// fails with this error.
    #[error("checkout of worker {pid} was aborted")]
    Aborted {
        /// Process id of the killed worker.
        pid: u32,
    },

    /// A call made on this checkout before this one failed while this one
    /// waited for its turn, so this one was not run: either never sent, or
    /// sent ahead and skipped by the worker. Calls made after the failure
    /// run normally (if the worker is still there).
    #[error(
        "skipped method {method} on worker {pid}: the earlier call of method {earlier_method} failed"
    )]
    EarlierCallFailed {
        /// Process id of the worker.
        pid: u32,
        /// The method that was not called.
        method: String,
        /// The method whose call failed.
        earlier_method: String,
        /// Why the earlier call failed.
        #[source]
        earlier: Box<Error>,
    },

    /// The worker broke the protocol, or refused the connection for a reason
    /// other than an unknown module or a failed setup.
    #[error("protocol error with {}", peer(address, *pid))]
    Protocol {
        /// The daemon's address.
        address: Address,
        /// Process id of the worker, once it said hello.
        pid: Option<u32>,
        /// What was wrong.
        #[source]
        source: ProtocolError,
    },

    /// The encoded arguments do not fit in one frame.
    #[error("arguments of method {method} take {len} bytes, above the {max} byte frame limit")]
    ArgsTooLarge {
        /// The method called.
        method: String,
        /// Size of the encoded request.
        len: usize,
        /// The frame limit in force.
        max: usize,
    },

    /// The arguments could not be encoded as MessagePack.
    #[error("encoding the arguments of method {method}")]
    Encode {
        /// The method called.
        method: String,
        /// The encoder's error.
        #[source]
        source: Arc<rmp_serde::encode::Error>,
    },

    /// The method's result could not be decoded into the type asked for.
    #[error("decoding the result of method {method}")]
    Decode {
        /// The method called.
        method: String,
        /// The decoder's error.
        #[source]
        source: Arc<rmp_serde::decode::Error>,
    },
}

/// What a checkout was doing when its deadline passed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Phase {
    /// Waiting in the queue for a worker.
    WaitingForWorker,
    /// Calling a method on its worker.
    Calling {
        /// The method in progress.
        method: String,
    },
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::WaitingForWorker => f.write_str("waiting for a worker"),
            Phase::Calling { method } => write!(f, "calling method {method}"),
        }
    }
}

/// The ways a worker can break the protocol.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame announced a length above the limit.
    #[error("a frame exceeds the {max} byte limit")]
    FrameTooLarge {
        /// The frame limit in force.
        max: usize,
    },
    /// A frame's body is not a valid message.
    #[error("malformed message")]
    Malformed(#[source] Arc<rmp_serde::decode::Error>),
    /// A request could not be encoded.
    #[error("encoding a request")]
    Encode(#[source] Arc<rmp_serde::encode::Error>),
    /// A valid message arrived where another was expected.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// The message the client waited for.
        expected: &'static str,
        /// The message that came.
        got: &'static str,
    },
    /// A reply answered another request than the one in flight.
    #[error("reply to request {got} while waiting for request {expected}")]
    WrongId {
        /// The id of the request in flight.
        expected: u64,
        /// The id in the reply.
        got: u64,
    },
    /// The worker speaks another protocol version.
    #[error("worker speaks protocol version {theirs}, this client speaks {ours}")]
    Version {
        /// The worker's version.
        theirs: u32,
        /// This client's version.
        ours: u32,
    },
    /// The worker refused the connection.
    #[error("worker refused the connection ({kind:?}): {message}")]
    Refused {
        /// The kind of error given.
        kind: ErrorKind,
        /// The worker's explanation.
        message: String,
    },
    /// The worker reported an error of a kind that does not fit the request.
    #[error("worker reported {kind:?}: {message}")]
    Reported {
        /// The kind of error given.
        kind: ErrorKind,
        /// The worker's explanation.
        message: String,
    },
}

/// Names the other end of a connection for an error message.
fn peer(address: &Address, pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("worker {pid} at {address}"),
        None => format!("the worker at {address}"),
    }
}

/// Displays an error followed by its chain of sources, for log fields.
pub(crate) struct Chain<'a>(pub(crate) &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lower_case_and_name_the_value() {
        let err = Error::Timeout {
            phase: Phase::Calling { method: "hash".into() },
            elapsed: Duration::from_millis(1500),
        };
        assert_eq!(err.to_string(), "timed out calling method hash after 1.5s");

        let err = Error::Connect {
            address: "unix:/nowhere.sock".parse().unwrap(),
            source: Arc::new(io::Error::from_raw_os_error(libc::ENOENT)),
        };
        let text = Chain(&err).to_string();
        assert!(text.starts_with("connecting to unix:/nowhere.sock: "), "{text}");
    }

    #[test]
    fn skipped_call_names_the_earlier_failure_once() {
        let earlier = Error::GuestError { pid: 7, method: "parse".into(), message: "bad".into() };
        let err = Error::EarlierCallFailed {
            pid: 7,
            method: "store".into(),
            earlier_method: "parse".into(),
            earlier: Box::new(earlier),
        };
        assert_eq!(
            Chain(&err).to_string(),
            "skipped method store on worker 7: the earlier call of method parse failed: \
             method parse on worker 7 returned an error: bad"
        );
    }
}
