//! The tokio client: a pool of workers, FIFO checkouts, and calls.
//!
//! - [`Client`] owns a pool of connections to one module of one daemon,
//!   each connection being one worker process. It is cheap to clone.
//! - [`ClientBuilder`] sets the pool's size, the checkout timeout and the
//!   other limits.
//! - [`Checkout`] is exclusive use of one worker until it is dropped;
//!   [`Checkout::call`] calls a guest method on it.
//! - [`Error`] tells apart what a caller can act on.
//!
//! Inside: `pool` keeps every worker by stage and the queue of checkouts,
//! `member` is one place in it (held until the worker process has gone),
//! `connector` makes new connections in the background under the pauses of
//! `backoff`, `maintenance` looks over idle workers, `worker` speaks the
//! protocol over a `connection`, `ledger` orders the outcomes of the calls
//! queued on a checkout, `release` decides what becomes of a worker after
//! its checkout, and `logs` relays the guest's log records to `tracing`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wasm_task::Error> {
//! use wasm_task::Client;
//!
//! let address = "unix:/run/wasm-task.sock".parse().expect("valid address");
//! let client = Client::builder(address, "lookup").max_workers(4).build();
//!
//! let worker = client.checkout().await?;
//! let capital: Option<String> = worker.call("lookup", "France").await?;
//! drop(worker); // back to the pool
//! # let _ = capital;
//! # Ok(())
//! # }
//! ```

mod address;
mod backoff;
mod builder;
mod checkout;
mod connection;
mod connector;
mod error;
mod ledger;
mod logs;
mod maintenance;
mod member;
mod pool;
mod release;
mod report;
mod status;
mod worker;

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

pub use address::{Address, ParseAddressError};
pub use builder::ClientBuilder;
pub use checkout::Checkout;
pub use error::{Error, Phase, ProtocolError};
pub use report::{CallReport, CallTimings};
pub use status::{Retired, Status};

use builder::Config;
use pool::Pool;

/// A pool of workers running one module, served by one daemon.
///
/// Cloning is cheap and every clone shares the pool. When the last clone is
/// dropped, idle workers are closed at once and checked-out workers when
/// their [`Checkout`] is dropped.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// What the clones of one client share; closes the pool when the last goes.
struct Shared {
    pool: Arc<Pool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.pool.close();
    }
}

impl Client {
    /// Starts configuring a client of `module` at the daemon at `address`.
    pub fn builder(address: Address, module: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(address, module.into())
    }

    pub(crate) fn from_pool(pool: Arc<Pool>) -> Client {
        Client { shared: Arc::new(Shared { pool }) }
    }

    fn pool(&self) -> &Arc<Pool> {
        &self.shared.pool
    }

    /// Checks out a worker for exclusive use until the [`Checkout`] is dropped.
    ///
    /// An idle worker is used at once. Otherwise the checkout waits, behind
    /// the ones that started waiting before it, for a worker to be returned
    /// or newly connected (up to `max_workers`). If the daemon cannot be
    /// reached, connecting is retried until the checkout's deadline; the
    /// error is then [`Error::Connect`] with the last failure. A daemon that
    /// refuses the module fails the oldest waiting checkout with
    /// [`Error::UnknownModule`] or [`Error::SetupFailed`] (carrying the
    /// guest's message); later attempts are each a freshly forked worker,
    /// made one at a time after pauses that double up to 2 s while the
    /// refusals go on. A checkout whose deadline passes meanwhile gets the
    /// last refusal rather than a bare timeout.
    ///
    /// Cancel safe: a checkout future dropped while it waits gives up its
    /// place, and a worker handed to it meanwhile goes to the next in line.
    pub async fn checkout(&self) -> Result<Checkout, Error> {
        let started = Instant::now();
        let deadline = self.pool().config.timeout.and_then(|timeout| started.checked_add(timeout));
        let worker = self.pool().acquire(started, deadline).await?;
        Ok(Checkout::new(self.pool().clone(), worker, started, deadline))
    }

    /// The pool at this moment: workers connecting, idle, busy and closing,
    /// checkouts waiting, and counts of checkouts, calls, failed calls and
    /// retirements by cause so far.
    pub fn status(&self) -> Status {
        self.pool().status()
    }

    /// The daemon's address.
    pub fn address(&self) -> &Address {
        &self.pool().config.address
    }

    /// The module the workers run.
    pub fn module(&self) -> &str {
        &self.pool().config.module
    }
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("address", self.address())
            .field("module", &self.module())
            .field("status", &self.status())
            .finish()
    }
}
