//! One socket to one worker, carrying length-prefixed MessagePack frames.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;
use tokio::time::Sleep;
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use super::Address;

/// A connected socket of either family.
#[derive(Debug)]
enum Stream {
    Unix(UnixConn),
    Tcp(TcpStream),
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.read.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => s.poll_read(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Unix(s) => s.poll_write(cx, buf),
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(_) => Poll::Ready(Ok(())),
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Unix(s) => Poll::Ready(s.read.get_ref().shutdown(Shutdown::Write)),
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A unix socket watched by the runtime for reading only.
///
/// The kernel tells a unix socket's writer that it may write each time the
/// reader takes what it wrote. Watched for writing as well, the socket
/// woke the client's thread each time its worker read a request: once per
/// call, for nothing. So writes go straight to the socket, and only one
/// that finds it full has a second descriptor of it watched for writing,
/// until a write goes through whole.
#[derive(Debug)]
struct UnixConn {
    read: AsyncFd<StdUnixStream>,
    /// The runtime the socket was registered with, which also watches the
    /// second descriptor.
    runtime: Handle,
    write: Option<AsyncFd<StdUnixStream>>,
    /// When the second descriptor cannot be had (no descriptor to spare,
    /// say), a full socket is tried again at each tick of this timer
    /// instead: slower, but the frame half-written still goes out whole.
    retry: Option<Pin<Box<Sleep>>>,
}

/// How often a full socket is tried again when it cannot be watched.
const WRITE_RETRY: Duration = Duration::from_millis(1);

impl UnixConn {
    async fn connect(path: &Path) -> io::Result<UnixConn> {
        // Connected by tokio (without blocking), then watched our way.
        let stream = UnixStream::connect(path).await?.into_std()?;
        stream.set_nonblocking(true)?;
        Ok(UnixConn {
            read: watch(stream, Interest::READABLE)?,
            runtime: Handle::current(),
            write: None,
            retry: None,
        })
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut ready = std::task::ready!(self.read.poll_read_ready(cx))?;
            // SAFETY: recv writes at most `unfilled.len()` bytes into the
            // unfilled part of `buf`, and only the bytes it reports are
            // marked initialized.
            let unfilled = unsafe { buf.unfilled_mut() };
            let got = ready.try_io(|fd| {
                // SAFETY: as above; the descriptor is the socket's, open.
                let n = unsafe {
                    libc::recv(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len(), 0)
                };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            match got {
                Ok(Ok(n)) => {
                    // SAFETY: recv initialized these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            // MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE for
            // whatever process the library runs in.
            // SAFETY: `data` is valid for its length; the descriptor is the
            // socket's, open.
            let sent = unsafe {
                libc::send(
                    self.read.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            let sent = if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) };
            match sent {
                Ok(n) => {
                    if n == data.len() {
                        self.write = None;
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                Err(_) => {}
            }
            // An error here must not end the write: the frame is half out,
            // and the worker waits for the rest of it.
            if self.write.is_none() && self.retry.is_none() {
                match self.watch_for_room() {
                    Ok(watched) => self.write = Some(watched),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot watch a full socket for room; polling it")
                    }
                }
            }
            if let Some(watched) = &self.write {
                match std::task::ready!(watched.poll_write_ready(cx)) {
                    // The socket was full when written: only now is the
                    // readiness seen stale, and cleared, so that the next
                    // wait is for more room.
                    Ok(mut ready) => ready.clear_ready(),
                    Err(e) => {
                        tracing::debug!(error = %e, "watching a full socket failed; polling it");
                        self.write = None;
                        self.retry = Some(Self::tick_on(&self.runtime));
                    }
                }
                continue;
            }
            let retry = match &mut self.retry {
                Some(retry) => retry,
                none => none.insert(Self::tick_on(&self.runtime)),
            };
            std::task::ready!(retry.as_mut().poll(cx));
            self.retry = None;
        }
    }

    /// A second descriptor of the socket, watched for room to write.
    fn watch_for_room(&self) -> io::Result<AsyncFd<StdUnixStream>> {
        let _runtime = self.runtime.enter();
        watch(self.read.get_ref().try_clone()?, Interest::WRITABLE)
    }

    /// A timer for the next try at a full socket, on `runtime`.
    fn tick_on(runtime: &Handle) -> Pin<Box<Sleep>> {
        let _runtime = runtime.enter();
        Box::pin(tokio::time::sleep(WRITE_RETRY))
    }
}

/// Registers `stream` with the current runtime for `interest`.
fn watch(stream: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the stream owns its descriptor, which stays open and the
    // same for as long as the AsyncFd owns the stream.
    Ok(unsafe { AsyncFd::register_with_interest(stream, interest) }?)
}

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The peer closed the connection between two frames.
    #[error("connection closed")]
    Closed,
    /// The peer closed the connection in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// The peer announced a frame longer than the limit.
    #[error("incoming frame exceeds the {max} byte limit")]
    TooLarge {
        /// The limit in force.
        max: usize,
    },
    /// A message to send is longer than the limit.
    #[error("outgoing frame of {len} bytes exceeds the {max} byte limit")]
    TooLong {
        /// The message's length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A message could not be encoded.
    #[error("encoding a message")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The socket failed.
    #[error("socket i/o")]
    Io(#[from] io::Error),
}

/// The length-delimited codec, with typed errors for oversized and cut frames.
struct FrameCodec {
    inner: LengthDelimitedCodec,
    max: usize,
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, WireError> {
        self.inner.decode(src).map_err(|err| match err.kind() {
            // The length codec's only decode error is a frame above the limit.
            io::ErrorKind::InvalidData => WireError::TooLarge { max: self.max },
            _ => WireError::Io(err),
        })
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, WireError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(WireError::Truncated),
        }
    }
}

/// Encodes a message straight into the send buffer behind its length, with
/// no body of its own to allocate and copy; on failure the buffer is left
/// as it was.
impl<M: Serialize + ?Sized> Encoder<&M> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, msg: &M, dst: &mut BytesMut) -> Result<(), WireError> {
        let start = dst.len();
        dst.put_u32(0);
        let encoded = rmp_serde::encode::write_named(&mut (&mut *dst).writer(), msg);
        let len = dst.len() - start - 4;
        let checked = match encoded {
            Err(err) => Err(WireError::Encode(err)),
            Ok(()) if len > self.max => Err(WireError::TooLong { len, max: self.max }),
            Ok(()) => u32::try_from(len).map_err(|_| WireError::TooLong { len, max: self.max }),
        };
        match checked {
            Ok(len) => {
                dst[start..start + 4].copy_from_slice(&len.to_be_bytes());
                Ok(())
            }
            Err(err) => {
                dst.truncate(start);
                Err(err)
            }
        }
    }
}

/// A framed connection to one worker.
pub(crate) struct Connection {
    framed: Framed<Stream, FrameCodec>,
}

impl Connection {
    /// Connects to the daemon; frames above `max_frame` bytes are refused both ways.
    pub(crate) async fn open(address: &Address, max_frame: usize) -> io::Result<Connection> {
        let stream = match address {
            Address::Unix(path) => Stream::Unix(UnixConn::connect(path).await?),
            Address::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                // Requests and replies are small and strictly alternate.
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
        };
        let inner = LengthDelimitedCodec::builder()
            .length_field_type::<u32>()
            .big_endian()
            .max_frame_length(max_frame)
            .new_codec();
        Ok(Connection { framed: Framed::new(stream, FrameCodec { inner, max: max_frame }) })
    }

    /// Encodes `msg` (structs as maps, as the protocol says) and sends it as one frame.
    pub(crate) async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Encodes `msg` into the send buffer, to go out with the next
    /// [`flush`](Self::flush) (or earlier, once the buffer is large). Nothing
    /// is buffered when it fails with [`WireError::TooLong`] or
    /// [`WireError::Encode`].
    pub(crate) async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), WireError> {
        self.framed.feed(msg).await
    }

    /// Writes out everything buffered.
    pub(crate) async fn flush(&mut self) -> Result<(), WireError> {
        // The item type only picks the impl: flushing is the same for all.
        SinkExt::<&()>::flush(&mut self.framed).await
    }

    /// Receives the body of the next frame.
    pub(crate) async fn recv(&mut self) -> Result<BytesMut, WireError> {
        self.framed.next().await.unwrap_or(Err(WireError::Closed))
    }

    /// Half-closes the connection and waits until the peer closes its end,
    /// discarding whatever it still sends.
    ///
    /// A worker process exits when its client hangs up, and its end closes
    /// as it exits: so this returns once the worker has gone. Callers bound
    /// the wait.
    pub(crate) async fn finish(self) {
        let mut stream = self.framed.into_inner();
        if stream.shutdown().await.is_err() {
            return;
        }
        let mut sink = [0u8; 4096];
        while let Ok(1..) = stream.read(&mut sink).await {}
    }

    /// Tells, without blocking, whether the connection can still be used: the
    /// peer has not closed it and has sent nothing unasked.
    pub(crate) fn is_usable(&self) -> bool {
        if !self.framed.read_buffer().is_empty() {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: the descriptor belongs to the socket this connection owns,
        // which stays open for the whole call; `byte` is one writable byte and
        // the length passed is 1. MSG_PEEK leaves any data in the socket.
        let got = unsafe {
            libc::recv(
                self.framed.get_ref().as_raw_fd(),
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        // 0: the peer closed; 1: a byte nobody asked for; -1 with EAGAIN: idle
        // and open, as it should be. Any other error means a broken socket.
        got < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}
