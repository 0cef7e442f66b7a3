//! The wire protocol between a client and one worker process.
//!
//! Every message is a frame: a 4-byte big-endian length followed by that many
//! bytes of MessagePack (structs as maps, enums externally tagged). A frame
//! longer than the agreed maximum closes the connection. See `docs/protocol.md`
//! for the message catalogue written for implementers in other languages.
//!
//! The conversation on one connection:
//!
//! ```text
//! client                                   worker
//!   Hello {version, module, client}  ---->
//!                                    <----  Hello {pid, methods, ..} | Refused {error}
//!   Call {id, method, args, timeout, ..} ---->
//!                                    <----  Reply {id, result, logs}
//!   CheckoutDone {id}                ---->        (only if the guest has the hook)
//!                                    <----  CheckoutDone {id, error, logs}
//!   ... close
//! ```

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of this protocol; a worker refuses a hello with another version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default upper bound of one frame's body, in bytes (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// Size of the length prefix in front of every frame.
pub const HEADER_LEN: usize = 4;

/// The largest frame body the length prefix can describe (4 GiB - 1).
pub const LARGEST_FRAME: usize = u32::MAX as usize;

/// A message from the client to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request<'a> {
    /// First message on every connection: which module the client wants.
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u32,
        /// Name of the module, as given to the daemon's `--module NAME=PATH`.
        module: &'a str,
        /// Free-form name of the client, for the daemon's logs.
        client: &'a str,
    },
    /// Call a guest method.
    Call {
        /// Chosen by the client, echoed in the reply.
        id: u64,
        /// Method name as the guest registered it.
        method: &'a str,
        /// MessagePack encoding of the arguments, passed to the guest untouched.
        #[serde(with = "serde_bytes")]
        args: &'a [u8],
        /// Time the worker grants the guest for this call, if the client has a
        /// deadline; the worker interrupts the guest when it runs out.
        timeout_ms: Option<u64>,
        /// Set on a call sent before the replies to earlier calls arrived:
        /// the id of the oldest of those. The worker then runs the call only
        /// if no call with this id or a later one has failed (answered with
        /// an error) on this connection, and otherwise answers
        /// [`ErrorKind::Skipped`] without running it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unless_failed_since: Option<u64>,
    },
    /// The checkout that used this worker has ended: run the guest's
    /// checkout-done hook. Only sent when the hello said the guest has one.
    CheckoutDone {
        /// Chosen by the client, echoed in the reply.
        id: u64,
    },
}

/// A message from a worker to the client.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response<'a> {
    /// The worker is ready: instantiated and set up.
    Hello(HelloReply),
    /// The worker will not serve this connection and closes it after this frame.
    Refused(ErrorReply),
    /// The outcome of a [`Request::Call`].
    Reply {
        /// The id of the call this answers.
        id: u64,
        /// MessagePack encoding of the method's result, or the error.
        #[serde(borrow)]
        result: Result<Payload<'a>, ErrorReply>,
        /// Log records the guest made during the call.
        logs: Vec<LogRecord>,
        /// What the call cost the worker (absent from older workers).
        #[serde(default)]
        stats: CallStats,
    },
    /// The outcome of a [`Request::CheckoutDone`].
    CheckoutDone {
        /// The id of the request this answers.
        id: u64,
        /// Set when the hook failed; the worker should then be retired.
        error: Option<ErrorReply>,
        /// Log records the guest made during the hook.
        logs: Vec<LogRecord>,
    },
}

/// Bytes of an already encoded MessagePack value, carried as a `bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload<'a>(#[serde(with = "serde_bytes")] pub &'a [u8]);

/// What a worker tells about itself once it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    /// The worker's protocol version.
    pub version: u32,
    /// Process id of the worker on the daemon's host.
    pub pid: u32,
    /// The module this worker runs.
    pub module: String,
    /// Method names the guest declared (empty if it declares none).
    pub methods: Vec<String>,
    /// Whether the guest exports a checkout-done hook.
    pub checkout_done_hook: bool,
}

/// A failure reported by a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// What kind of failure this is.
    pub kind: ErrorKind,
    /// Human-readable description (the guest's own message where it gave one).
    pub message: String,
    /// The wasm backtrace of a trap, where one was captured.
    pub backtrace: Option<String>,
}

/// Kinds of failure a worker reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The guest method returned an error.
    GuestError,
    /// The guest trapped (panic, unreachable, out-of-bounds access, ...).
    /// The worker exits after reporting it.
    GuestTrap,
    /// The guest hit a resource limit (memory, output size). The worker exits.
    Limit,
    /// The guest ran past the call's deadline and was interrupted. The worker exits.
    Timeout,
    /// The guest has no method of that name.
    UnknownMethod,
    /// The daemon serves no module of the name given in the hello.
    UnknownModule,
    /// The guest's setup hook failed; the worker exits.
    SetupFailed,
    /// The guest's checkout-done hook failed.
    CheckoutDoneFailed,
    /// The peer broke the protocol (bad frame, wrong version, unexpected message).
    Protocol,
    /// The call was not run: it was sent with `unless_failed_since` and a
    /// call it depends on failed. The worker serves on.
    Skipped,
}

impl ErrorReply {
    /// A failure of `kind` with `message` and no backtrace.
    pub fn new(kind: ErrorKind, message: String) -> ErrorReply {
        ErrorReply { kind, message, backtrace: None }
    }
}

impl ErrorKind {
    /// Whether a worker that reported this kind has exited or must not be reused.
    pub fn is_fatal(self) -> bool {
        !matches!(self, ErrorKind::GuestError | ErrorKind::UnknownMethod | ErrorKind::Skipped)
    }
}

/// What one call cost the worker, measured there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStats {
    /// Wall-clock time the guest ran, in microseconds.
    pub wall_us: u64,
    /// CPU time the worker's thread running the guest used during the
    /// call, in microseconds. The worker reads that thread's CPU clock at
    /// most every 50 µs of wall time (each reading is a system call): for a
    /// call shorter than that this is the wall time, which bounds it, and
    /// for a longer one it may include up to 50 µs of the worker's own time
    /// just before the call. It is never more than `wall_us`.
    pub cpu_us: u64,
    /// Fuel the guest consumed, when the module runs with a fuel budget.
    pub fuel: Option<u64>,
}

/// A log record made by the guest, relayed with the reply it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// Severity, as the `log` crate numbers it: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub level: u8,
    /// Where the record came from: the guest's module path, or `stdout`/`stderr`.
    pub target: String,
    /// The text of the record.
    pub message: String,
    /// Key-value fields attached to the record, in the order given.
    #[serde(default)]
    pub fields: Vec<(String, String)>,
    /// Microseconds from the start of the call to the record.
    pub at_us: u64,
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame above the limit.
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The connection closed in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The frame's body is not a valid message.
    #[error("malformed message")]
    Decode(#[from] rmp_serde::decode::Error),
    /// A message could not be encoded.
    #[error("encoding message")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The socket failed.
    #[error("socket i/o")]
    Io(#[from] io::Error),
}

/// Encodes `msg` as one frame (header and body) into `buf`, replacing its contents.
pub fn encode_frame<T: Serialize>(msg: &T, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    // Nothing to leave out: an empty payload is never long enough.
    encode_frame_around(msg, &[], buf).map(|_| ())
}

/// Byte strings this long or longer are left out of a frame by
/// [`encode_frame_around`]; copying a shorter one costs less than a longer
/// vectored write.
pub const LEAVE_OUT_MIN: usize = 4096;

/// Like [`encode_frame`], but leaves out the bytes of `payload` when `msg`
/// encodes that very slice as a byte string (a [`Payload`] borrowing it
/// does) and it is at least [`LEAVE_OUT_MIN`] bytes long. The length prefix
/// counts them all the same; the returned offset says where in `buf` they
/// belong. Send the frame with [`write_frame_around`].
///
/// A worker encodes a method's result this way straight from the guest's
/// memory, saving a copy of it.
pub fn encode_frame_around<T: Serialize>(
    msg: &T,
    payload: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Option<usize>, FrameError> {
    buf.clear();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    let mut writer = LeaveOut { buf, payload, at: None };
    rmp_serde::encode::write_named(&mut writer, msg)?;
    let at = writer.at;
    let body = buf.len() - HEADER_LEN + at.map_or(0, |_| payload.len());
    let len =
        u32::try_from(body).map_err(|_| FrameError::TooLarge { len: body, max: LARGEST_FRAME })?;
    buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(at)
}

/// A writer appending to a buffer, except for one byte string it only notes
/// the place of.
struct LeaveOut<'a> {
    buf: &'a mut Vec<u8>,
    payload: &'a [u8],
    at: Option<usize>,
}

impl Write for LeaveOut<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // The encoder hands a byte string's contents over in one write of
        // the very slice it was given: the same address and length.
        if self.at.is_none() && data.len() >= LEAVE_OUT_MIN && std::ptr::eq(data, self.payload) {
            self.at = Some(self.buf.len());
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes a frame made by [`encode_frame_around`] to a blocking writer, the
/// left-out bytes from `payload`, in vectored writes.
pub fn write_frame_around(
    w: &mut impl Write,
    frame: &[u8],
    at: Option<usize>,
    payload: &[u8],
) -> Result<(), FrameError> {
    let Some(at) = at else { return write_frame(w, frame) };
    let (head, tail) = frame.split_at(at);
    let mut parts = [io::IoSlice::new(head), io::IoSlice::new(payload), io::IoSlice::new(tail)];
    let mut parts = &mut parts[..];
    while !parts.is_empty() {
        match w.write_vectored(parts) {
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::WriteZero.into())),
            Ok(n) => io::IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Decodes one message from a frame's body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(rmp_serde::from_slice(body)?)
}

/// Reads one frame's body into `buf` from a blocking reader.
///
/// Returns `Ok(false)` when the peer closed the connection cleanly between
/// frames, and [`FrameError::Truncated`] when it closed inside one.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>, max: usize) -> Result<bool, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }

    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(true)
}

/// Writes an encoded frame (as made by [`encode_frame`]) to a blocking writer.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_round_trips_borrowing_from_the_frame() {
        let mut buf = Vec::new();
        let args = rmp_serde::to_vec(&(1, "two")).unwrap();
        let req = Request::Call {
            id: 7,
            method: "add",
            args: &args,
            timeout_ms: Some(250),
            unless_failed_since: None,
        };
        encode_frame(&req, &mut buf).unwrap();

        let mut body = Vec::new();
        assert!(read_frame(&mut &buf[..], &mut body, DEFAULT_MAX_FRAME).unwrap());
        match decode::<Request>(&body).unwrap() {
            Request::Call { id, method, args: got, timeout_ms, unless_failed_since } => {
                assert_eq!((id, method, got, timeout_ms), (7, "add", &args[..], Some(250)));
                assert_eq!(unless_failed_since, None);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn reply_with_error_round_trips() {
        let mut buf = Vec::new();
        let err =
            ErrorReply { kind: ErrorKind::GuestTrap, message: "boom".into(), backtrace: None };
        let resp = Response::Reply {
            id: 1,
            result: Err(err.clone()),
            logs: vec![],
            stats: CallStats::default(),
        };
        encode_frame(&resp, &mut buf).unwrap();
        match decode::<Response>(&buf[HEADER_LEN..]).unwrap() {
            Response::Reply { result: Err(e), .. } => assert_eq!(e, err),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_its_body() {
        let frame = 1000u32.to_be_bytes();
        let err = read_frame(&mut &frame[..], &mut Vec::new(), 999).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 1000, max: 999 }), "{err}");
    }

    #[test]
    fn close_between_frames_is_clean_and_inside_a_frame_is_truncation() {
        assert!(!read_frame(&mut &[][..], &mut Vec::new(), 10).unwrap());
        let err = read_frame(&mut &[0u8, 0][..], &mut Vec::new(), 10).unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
        let err = read_frame(&mut &[0u8, 0, 0, 5, 1][..], &mut Vec::new(), 10).unwrap_err();
        assert!(matches!(err, FrameError::Truncated));
    }

    /// A writer taking at most `step` bytes per call, vectored or not.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step);
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            let mut left = self.step;
            for buf in bufs {
                let n = buf.len().min(left);
                self.written.extend_from_slice(&buf[..n]);
                left -= n;
            }
            Ok(self.step - left)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reply(payload: &[u8]) -> Response<'_> {
        let logs = vec![LogRecord {
            level: 3,
            target: "t".into(),
            message: "after the payload".into(),
            fields: Vec::new(),
            at_us: 9,
        }];
        Response::Reply { id: 7, result: Ok(Payload(payload)), logs, stats: CallStats::default() }
    }

    #[test]
    fn a_frame_around_a_payload_sends_the_same_bytes() {
        for len in [0, 10, LEAVE_OUT_MIN - 1, LEAVE_OUT_MIN, 100_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut whole = Vec::new();
            encode_frame(&reply(&payload), &mut whole).unwrap();

            let mut frame = Vec::new();
            let at = encode_frame_around(&reply(&payload), &payload, &mut frame).unwrap();
            assert_eq!(at.is_some(), len >= LEAVE_OUT_MIN, "{len} bytes");
            if at.is_some() {
                assert_eq!(frame.len() + len, whole.len(), "the payload is left out");
            }
            for step in [1, 7, 4096, usize::MAX] {
                let mut w = Trickle { written: Vec::new(), step };
                write_frame_around(&mut w, &frame, at, &payload).unwrap();
                assert!(w.written == whole, "{len} bytes written {step} at a time");
            }
        }
    }

    #[test]
    fn only_the_given_slice_is_left_out() {
        // Equal bytes elsewhere are copied: only the very slice is left out.
        let payload = vec![5u8; LEAVE_OUT_MIN];
        let other = payload.clone();
        let mut frame = Vec::new();
        assert_eq!(encode_frame_around(&reply(&other), &payload, &mut frame).unwrap(), None);
        let mut whole = Vec::new();
        encode_frame(&reply(&other), &mut whole).unwrap();
        assert_eq!(frame, whole);
    }
}
