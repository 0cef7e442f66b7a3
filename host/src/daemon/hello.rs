//! Reading each new connection's hello in the daemon, without blocking.
//!
//! The hello names the module, and the module decides where its worker comes
//! from (the module's zygote or a plain fork), so the daemon reads the hello
//! before anything is forked. It reads exactly the hello's frame and not a
//! byte more: whatever the client sends next stays in the socket for the
//! worker. The accept loop polls every unfinished hello beside the listener,
//! so a slow or silent client holds up no one, and drops it at its deadline.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use tracing::debug;

use super::worker::Stream;
use crate::protocol::{
    self, ErrorKind, ErrorReply, FrameError, HEADER_LEN, PROTOCOL_VERSION, Request, Response,
};

/// How long a fresh connection may take to send its whole hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest hello frame accepted, in bytes; a hello holds two short names.
pub const MAX_HELLO: usize = 64 << 10;

/// Characters kept of the names a client sends, for logs and messages.
const MAX_NAME_CHARS: usize = 128;

/// A connection whose hello is still arriving.
pub struct Pending {
    stream: Stream,
    header: [u8; HEADER_LEN],
    body: Vec<u8>,
    /// Bytes of the frame (header and body) read so far.
    read: usize,
    /// When the client's time to finish its hello is up.
    pub deadline: Instant,
}

/// A client's hello.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The module it asks for.
    pub module: String,
    /// The name the client gave for itself, cut to a printable length.
    pub client: String,
}

/// Where reading a hello stands.
pub enum Progress {
    /// More bytes are to come.
    Waiting,
    /// The client closed or broke the connection first.
    Gone,
    /// The whole hello, well-formed.
    Done(Hello),
    /// A hello that cannot be served: refuse it with this error.
    Bad(ErrorReply),
}

impl Pending {
    /// Starts reading the hello from `stream`, which must be non-blocking.
    pub fn new(stream: Stream, now: Instant) -> Pending {
        Pending {
            stream,
            header: [0; HEADER_LEN],
            body: Vec::new(),
            read: 0,
            deadline: now + HELLO_TIMEOUT,
        }
    }

    /// The connection's descriptor, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Reads what has arrived, never past the end of the hello's frame.
    pub fn advance(&mut self) -> Progress {
        loop {
            let buf = if self.read < HEADER_LEN {
                &mut self.header[self.read..]
            } else {
                &mut self.body[self.read - HEADER_LEN..]
            };
            if buf.is_empty() {
                return match parse(&self.body) {
                    Ok(hello) => Progress::Done(hello),
                    Err(e) => Progress::Bad(e),
                };
            }
            match self.stream.read(buf) {
                Ok(0) if self.read == 0 => return Progress::Gone,
                // It may still read why it is refused.
                Ok(0) => return Progress::Bad(protocol_error(FrameError::Truncated.to_string())),
                Ok(n) => self.read += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Progress::Waiting,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!(error = %e, "reading a hello failed");
                    return Progress::Gone;
                }
            }
            if self.read == HEADER_LEN {
                let len = u32::from_be_bytes(self.header) as usize;
                if len > MAX_HELLO {
                    let e = FrameError::TooLarge { len, max: MAX_HELLO };
                    return Progress::Bad(protocol_error(format!("hello: {e}")));
                }
                self.body = vec![0; len];
            }
        }
    }

    /// The connection, set back to blocking for the worker that serves it.
    pub fn into_stream(self) -> io::Result<Stream> {
        self.stream.set_nonblocking(false)?;
        Ok(self.stream)
    }

    /// Tells the client why it is not served, as far as its socket takes
    /// the reply without waiting, and closes the connection.
    pub fn refuse(self, error: ErrorReply) {
        refuse(self.stream, error)
    }
}

/// Sends `error` as a refusal on the non-blocking `stream`, best effort,
/// and closes it.
pub fn refuse(mut stream: Stream, error: ErrorReply) {
    let mut frame = Vec::new();
    if protocol::encode_frame(&Response::Refused(error), &mut frame).is_ok()
        && let Err(e) = stream.write_all(&frame)
    {
        debug!(error = %e, "could not tell the client why it is refused");
    }
}

/// Checks a hello's body.
fn parse(body: &[u8]) -> Result<Hello, ErrorReply> {
    match protocol::decode::<Request>(body) {
        Ok(Request::Hello { version, module, client }) if version == PROTOCOL_VERSION => {
            Ok(Hello { module: module.to_owned(), client: printable(client) })
        }
        Ok(Request::Hello { version, .. }) => Err(protocol_error(format!(
            "protocol version {version} is not supported (the daemon speaks {PROTOCOL_VERSION})"
        ))),
        Ok(_) => Err(protocol_error("expected a hello first".into())),
        Err(e) => Err(protocol_error(format!("{e}: {}", source_of(&e)))),
    }
}

fn protocol_error(message: String) -> ErrorReply {
    ErrorReply::new(ErrorKind::Protocol, message)
}

/// `text` cut to a length fit for logs and messages: a peer chooses it.
pub fn printable(text: &str) -> String {
    text.chars().take(MAX_NAME_CHARS).collect()
}

/// The cause of a frame error, as text.
pub fn source_of(e: &FrameError) -> String {
    std::error::Error::source(e).map(|s| s.to_string()).unwrap_or_default()
}
