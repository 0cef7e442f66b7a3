//! What becomes of a worker when its checkout ends: back to the pool, after
//! the guest's checkout-done hook if it has one, or closed.

use std::sync::Arc;

use tokio::time::timeout;

use super::connection::WireError;
use super::error::Chain;
use super::pool::Pool;
use super::status::Retirement;
use super::worker::{HookError, Worker};

/// Returns a worker that is still connected at the end of its checkout, or
/// retires it. `tainted` tells that it returned an error during the checkout.
pub(crate) fn release(pool: &Arc<Pool>, worker: Worker, tainted: bool) {
    if let Some(cause) = retirement(pool, &worker, tainted) {
        return worker.retire(cause);
    }
    if !worker.has_hook() {
        return pool.check_in(worker);
    }
    let pool = pool.clone();
    pool.handle.clone().spawn(run_hook(pool, worker));
}

/// Why a worker must not go back to the pool, if it must not.
fn retirement(pool: &Pool, worker: &Worker, tainted: bool) -> Option<Retirement> {
    let config = &pool.config;
    if tainted && config.retire_after_error {
        return Some(Retirement::Error);
    }
    if config.max_checkouts.is_some_and(|max| worker.checkouts >= max) {
        return Some(Retirement::MaxCheckouts);
    }
    if worker.too_old(tokio::time::Instant::now()) {
        return Some(Retirement::Lifetime);
    }
    None
}

/// Runs the checkout-done hook, within the checkout timeout, and returns
/// the worker to the pool only if it succeeded.
async fn run_hook(pool: Arc<Pool>, mut worker: Worker) {
    let outcome = match pool.config.timeout {
        Some(limit) => timeout(limit, worker.checkout_done()).await.ok(),
        None => Some(worker.checkout_done().await),
    };
    match outcome {
        Some(Ok(())) => pool.check_in(worker),
        Some(Err(err)) => {
            let pid = worker.pid();
            tracing::warn!(worker.pid = pid, error = %Chain(&err), "checkout-done hook failed");
            // A worker that died meanwhile is counted as a death.
            let died = matches!(
                err,
                HookError::Wire(WireError::Closed | WireError::Truncated | WireError::Io(_))
            );
            worker.retire(if died { Retirement::Death } else { Retirement::Error });
        }
        None => {
            tracing::warn!(worker.pid = worker.pid(), "checkout-done hook timed out");
            worker.retire(Retirement::Timeout);
        }
    }
}
