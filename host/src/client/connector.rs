//! Background connection attempts, retried with back-off while needed.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};
use tracing::Instrument;

use super::Config;
use super::backoff::{Backoff, Claim};
use super::connection::Connection;
use super::member::{CLOSE_BOUND, Member};
use super::pool::Pool;
use super::worker::{self, ConnectFailure, Worker};
use crate::protocol::HelloReply;

/// Connects one worker, retrying while a checkout waits or the pool is below
/// its minimum.
///
/// An unreachable daemon is retried after a pause that doubles up to
/// [`MAX_RETRY`](super::backoff::MAX_RETRY). A refusal goes to the oldest
/// waiting checkout and puts the whole pool into the refusal back-off (see
/// [`Refusals`](super::backoff::Refusals)): attempts are then made one at a
/// time, after doubling pauses, so a module whose setup always fails does
/// not make the daemon fork in a loop.
pub(crate) async fn run(member: Member) {
    let config = member.pool().config.clone();
    let span = tracing::debug_span!("connect", address = %config.address, module = %config.module);
    attempts(member).instrument(span).await;
}

async fn attempts(mut member: Member) {
    let pool = member.pool().clone();
    let mut backoff = Backoff::new();
    loop {
        let Some(probe) = wait_for_turn(&pool, &mut member).await else { return };
        let outcome = attempt(&pool.config).await;
        let pause = match outcome {
            Ok((conn, hello)) => {
                drop(probe);
                let worker = Worker::new(conn, hello, member, pool.config.clone());
                return pool.connected(worker);
            }
            Err(ConnectFailure::Unavailable(err)) => {
                pool.connect_failed(err);
                backoff.pause()
            }
            Err(ConnectFailure::Refused(err)) => {
                pool.refused(err);
                Duration::ZERO
            }
        };
        drop(probe);

        if !pool.still_wanted(&mut member) {
            return;
        }
        if !pause.is_zero() {
            sleep(pause).await;
            if !pool.still_wanted(&mut member) {
                return;
            }
        }
    }
}

/// The right to make the one attempt allowed during the refusal back-off;
/// the back-off learns that the attempt ended when it is dropped.
struct Probe(Arc<Pool>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.probe_ended();
    }
}

/// Waits until the refusal back-off lets this connector make an attempt.
/// `None` when the attempt is no longer wanted (the member is then gone);
/// otherwise the probe to hold during the attempt, if it is one.
async fn wait_for_turn(pool: &Arc<Pool>, member: &mut Member) -> Option<Option<Probe>> {
    loop {
        // Subscribed before asking, so a change in between is not missed.
        let mut changed = pool.watch_backoff();
        match pool.claim_attempt() {
            Claim::Go => return Some(None),
            Claim::Probe => return Some(Some(Probe(pool.clone()))),
            Claim::WaitUntil(at) => {
                tokio::select! {
                    () = sleep_until(at) => {}
                    _ = changed.changed() => {}
                }
            }
            Claim::WaitForProbe => {
                // The sender lives as long as the pool, which outlives this task.
                let _ = changed.changed().await;
            }
        }
        if !pool.still_wanted(member) {
            return None;
        }
    }
}

/// One connection attempt: connect and exchange hellos within the client's
/// `connect_timeout`.
async fn attempt(config: &Config) -> Result<(Connection, HelloReply), ConnectFailure> {
    let deadline = Instant::now() + config.connect_timeout;
    let opened = timeout_at(deadline, Connection::open(&config.address, config.max_frame)).await;
    let mut conn = match opened {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => return Err(ConnectFailure::Unavailable(err)),
        Err(_) => return Err(timed_out(config)),
    };
    let failure = match timeout_at(deadline, worker::hello(&mut conn, config)).await {
        Ok(Ok(hello)) => return Ok((conn, hello)),
        Ok(Err(failure)) => failure,
        Err(_) => timed_out(config),
    };
    // A worker process may have been forked for this connection: wait until
    // it has gone, so that it never overlaps with the next attempt's.
    let _ = timeout(CLOSE_BOUND, conn.finish()).await;
    Err(failure)
}

fn timed_out(config: &Config) -> ConnectFailure {
    ConnectFailure::Unavailable(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no hello within {:?}", config.connect_timeout),
    ))
}
