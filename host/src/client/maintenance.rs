//! The pool's housekeeping task: it looks over the idle workers every so
//! often, closing the ones that died, outlived `max_lifetime` or sat idle too
//! long, so that the pool replaces them before a checkout needs them.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::{MissedTickBehavior, interval};

use super::Config;
use super::pool::Pool;

/// Longest time between two looks at the idle workers.
const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Shortest time between two looks, however short the configured limits.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(10);

/// Starts the housekeeping task of `pool`; it ends once the pool is closed.
///
/// It holds the pool weakly, so it never keeps a dropped client's pool alive.
pub(crate) fn start(pool: &Arc<Pool>) {
    let period = sweep_period(&pool.config);
    pool.handle.spawn(run(Arc::downgrade(pool), period));
}

async fn run(pool: Weak<Pool>, period: Duration) {
    let mut ticks = interval(period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate; the pool has nothing to look at yet.
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        if !pool.sweep() {
            return;
        }
    }
}

/// A quarter of the shortest limit configured, within the bounds above:
/// a worker is closed at most a quarter late.
fn sweep_period(config: &Config) -> Duration {
    [config.idle_timeout, config.max_lifetime]
        .into_iter()
        .flatten()
        .map(|limit| limit / 4)
        .fold(MAX_SWEEP_PERIOD, Duration::min)
        .max(MIN_SWEEP_PERIOD)
}
