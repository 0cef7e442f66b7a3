//! Background connection attempts, retried with back-off while needed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, timeout};
use tracing::Instrument;

use super::pool::Pool;
use super::worker::{ConnectFailure, Worker};

/// First pause after a failed attempt.
const FIRST_RETRY: Duration = Duration::from_millis(16);
/// Longest pause between attempts.
const MAX_RETRY: Duration = Duration::from_secs(1);

/// One connection attempt counted in the pool's `connecting`. Dropped
/// without an outcome (its task was cancelled), it stops being counted.
pub(crate) struct ConnectingSlot {
    pool: Arc<Pool>,
    armed: bool,
}

impl ConnectingSlot {
    /// Wraps an attempt the pool has already counted.
    pub(crate) fn new(pool: Arc<Pool>) -> Self {
        ConnectingSlot { pool, armed: true }
    }

    fn deliver(mut self, worker: Worker) {
        self.armed = false;
        self.pool.connected(worker);
    }

    /// Whether to go on trying; if not, the attempt is no longer counted.
    fn still_needed(&mut self) -> bool {
        let needed = self.pool.keep_connecting();
        self.armed = needed;
        needed
    }
}

impl Drop for ConnectingSlot {
    fn drop(&mut self) {
        if self.armed {
            self.pool.stop_connecting();
        }
    }
}

/// Doubling pauses between failed attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: FIRST_RETRY }
    }

    fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        pause
    }
}

/// Connects one worker, retrying while a checkout waits or the pool is below
/// its minimum.
///
/// An unreachable daemon is retried after a pause that doubles up to
/// [`MAX_RETRY`]. A refusal goes to the oldest waiting checkout, and the next
/// attempt (for the next waiter, if any) follows at once; with nobody waiting
/// it is paused like a failure, so a pool that cannot fill its minimum does
/// not spin.
pub(crate) async fn run(slot: ConnectingSlot) {
    let config = slot.pool.config.clone();
    let span = tracing::debug_span!("connect", address = %config.address, module = %config.module);
    attempts(slot).instrument(span).await;
}

async fn attempts(mut slot: ConnectingSlot) {
    let config = slot.pool.config.clone();
    let mut backoff = Backoff::new();
    loop {
        let attempt = match timeout(config.connect_timeout, Worker::connect(config.clone())).await {
            Ok(attempt) => attempt,
            Err(_) => Err(ConnectFailure::Unavailable(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no hello within {:?}", config.connect_timeout),
            ))),
        };
        let pause = match attempt {
            Ok(worker) => return slot.deliver(worker),
            Err(ConnectFailure::Unavailable(err)) => {
                slot.pool.connect_failed(err);
                backoff.pause()
            }
            Err(ConnectFailure::Refused(err)) => {
                if slot.pool.refuse_oldest(err) {
                    backoff = Backoff::new();
                    Duration::ZERO
                } else {
                    backoff.pause()
                }
            }
        };

        if !slot.still_needed() {
            return;
        }
        if !pause.is_zero() {
            sleep(pause).await;
            if !slot.still_needed() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_the_first_retry_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let pauses: Vec<u64> = (0..9).map(|_| backoff.pause().as_millis() as u64).collect();
        assert_eq!(pauses, [16, 32, 64, 128, 256, 512, 1000, 1000, 1000]);
    }
}
