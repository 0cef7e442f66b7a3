//! Capture of a guest's stdout and stderr, bounded, relayed as log records.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// How much a guest may write in one go, as WASI asks before each write.
/// Any amount works (writes beyond the capacity are dropped, not refused);
/// this only sets the size of the guest's write chunks.
const WRITE_CHUNK: usize = 64 << 10;

/// A WASI output stream that keeps what the guest writes, up to a capacity.
///
/// Writes never fail and never block: bytes beyond the capacity are counted
/// and dropped, so a flood costs the worker neither memory nor a stall.
#[derive(Clone)]
pub struct Capture {
    inner: Arc<Mutex<Buffer>>,
}

struct Buffer {
    bytes: Vec<u8>,
    capacity: usize,
    dropped: usize,
}

/// What a guest wrote to one stream since the last drain.
pub struct Drained {
    /// Complete lines, without their newline; a trailing partial line is included.
    pub lines: Vec<String>,
    /// Bytes dropped because the capacity was reached.
    pub dropped: usize,
}

impl Capture {
    /// A capture keeping at most `capacity` bytes between drains.
    pub fn new(capacity: usize) -> Capture {
        let buffer = Buffer { bytes: Vec::new(), capacity, dropped: 0 };
        Capture { inner: Arc::new(Mutex::new(buffer)) }
    }

    /// Takes everything captured so far, split into lines.
    pub fn drain(&self) -> Drained {
        let mut buf = self.lock();
        if buf.bytes.is_empty() && buf.dropped == 0 {
            return Drained { lines: Vec::new(), dropped: 0 };
        }
        let dropped = std::mem::take(&mut buf.dropped);
        let text = String::from_utf8_lossy(&buf.bytes).into_owned();
        buf.bytes.clear();
        let lines = text.lines().map(str::to_owned).collect();
        Drained { lines, dropped }
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A poisoned lock only means a panic elsewhere; the bytes are still fine.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.lock();
        let room = buf.capacity.saturating_sub(buf.bytes.len());
        let kept = room.min(bytes.len());
        buf.bytes.extend_from_slice(&bytes[..kept]);
        buf.dropped += bytes.len() - kept;
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_CHUNK)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_capacity_and_counts_the_rest() {
        let mut c = Capture::new(8);
        c.write(Bytes::from_static(b"abc\ndef\nghijkl")).unwrap();
        let d = c.drain();
        assert_eq!(d.lines, ["abc", "def"]);
        assert_eq!(d.dropped, 6);
        assert!(c.drain().lines.is_empty());
    }
}
