//! One unit of the pool's capacity, from the first connection attempt until
//! the worker process has gone.
//!
//! The pool counts a worker against `max_workers` as long as its [`Member`]
//! lives: while connecting, idle, busy, and while closing, that is until
//! the worker's end of the connection has closed (it exits when its client
//! hangs up). So a worker that is dying never overlaps with its replacement.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use super::connection::Connection;
use super::pool::Pool;

/// Longest wait for a closed worker's process to go before its place in the
/// pool is given up anyway (a stopped or frozen process).
pub(crate) const CLOSE_BOUND: Duration = Duration::from_secs(10);

/// A place in the pool. Dropped, it leaves the pool, which then starts a
/// replacement if one is needed.
pub(crate) struct Member {
    pool: Arc<Pool>,
    id: u64,
    /// False once the pool has already forgotten this member.
    armed: bool,
}

impl Member {
    /// Wraps a place the pool has already recorded under `id`.
    pub(crate) fn new(pool: Arc<Pool>, id: u64) -> Self {
        Member { pool, id, armed: true }
    }

    /// The key of this member in the pool's records.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The pool this place belongs to.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Marks the place as already removed from the pool's records.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if self.armed {
            self.pool.leave(self.id);
        }
    }
}

/// A worker's connection and its place in the pool, which go together.
pub(crate) struct Link {
    pub(crate) conn: Connection,
    pub(crate) member: Member,
}

impl Link {
    /// Hangs up and keeps the place until the worker's process has gone,
    /// or for [`CLOSE_BOUND`] at most.
    pub(crate) async fn close(self) {
        let Link { conn, member } = self;
        if timeout(CLOSE_BOUND, conn.finish()).await.is_err() {
            tracing::warn!(
                bound_ms = CLOSE_BOUND.as_millis() as u64,
                "closed worker did not hang up in time; giving up its place anyway"
            );
        }
        drop(member);
    }
}
