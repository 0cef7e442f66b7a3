//! Settings of a client, gathered by [`ClientBuilder`].

use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use super::maintenance;
use super::pool::Pool;
use super::{Address, Client};
use crate::protocol::DEFAULT_MAX_FRAME;

/// Everything a pool needs to know, fixed when the client is built.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) address: Address,
    pub(crate) module: String,
    pub(crate) client_name: String,
    pub(crate) min_workers: usize,
    pub(crate) max_workers: usize,
    pub(crate) timeout: Option<Duration>,
    pub(crate) max_checkouts: Option<u64>,
    pub(crate) max_frame: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) retire_after_error: bool,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
}

/// Configures and builds a [`Client`]; made by [`Client::builder`].
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use wasm_task::Client;
///
/// let client = Client::builder("unix:/run/wasm-task.sock".parse()?, "hasher")
///     .max_workers(8)
///     .timeout(Some(Duration::from_secs(5)))
///     .build();
/// let worker = client.checkout().await?;
/// let digest: String = worker.call("hash", "hunter2").await?;
/// # let _ = digest;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct ClientBuilder {
    config: Config,
}

impl ClientBuilder {
    pub(crate) fn new(address: Address, module: String) -> Self {
        ClientBuilder {
            config: Config {
                address,
                module,
                client_name: default_client_name(),
                min_workers: 2,
                max_workers: 20,
                timeout: Some(Duration::from_secs(30)),
                max_checkouts: None,
                max_frame: DEFAULT_MAX_FRAME,
                connect_timeout: Duration::from_secs(10),
                retire_after_error: true,
                idle_timeout: None,
                max_lifetime: None,
            },
        }
    }

    /// Workers kept connected even when nobody uses them. Default 2.
    ///
    /// They are started in the background by [`build`](Self::build), and the
    /// pool is topped up to this number whenever a worker is retired. Values
    /// above [`max_workers`](Self::max_workers) count as `max_workers`.
    pub fn min_workers(mut self, workers: usize) -> Self {
        self.config.min_workers = workers;
        self
    }

    /// Most workers at once, counting connecting, idle and checked out ones.
    /// Default 20. Checkouts beyond it wait in FIFO order.
    ///
    /// # Panics
    ///
    /// If `workers` is 0.
    pub fn max_workers(mut self, workers: usize) -> Self {
        assert!(workers > 0, "max_workers must be at least 1");
        self.config.max_workers = workers;
        self
    }

    /// Time allowed to each checkout, from the call to
    /// [`Client::checkout`] to the end of its last call. Default 30 s;
    /// `None` waits and calls without limit.
    ///
    /// The one deadline covers the wait for a worker and every call on it; a
    /// worker whose call runs out of time is closed. The same time bounds
    /// each checkout-done hook run after the checkout.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// Checkouts after which a worker is closed and replaced, to bound what a
    /// guest can accumulate. Default `None`: unlimited. A worker is only ever
    /// retired when it is released, never during a checkout.
    pub fn max_checkouts(mut self, checkouts: Option<u64>) -> Self {
        self.config.max_checkouts = checkouts;
        self
    }

    /// Whether a worker that returned an error during a checkout (the guest
    /// method returned `Err`, or the method did not exist) is closed when the
    /// checkout ends, since the error may have left its state corrupt.
    /// Default `true`; `false` keeps such workers.
    ///
    /// A worker that trapped, timed out, hit a limit or died is closed at
    /// once whatever this says.
    pub fn retire_after_error(mut self, retire: bool) -> Self {
        self.config.retire_after_error = retire;
        self
    }

    /// Time after which an idle worker is closed, as long as more than
    /// `min_workers` remain. Default `None`: idle workers are kept.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.idle_timeout = timeout;
        self
    }

    /// Age after which a worker is closed and replaced: when idle, or when
    /// released if it is checked out then, never during a checkout. Default
    /// `None`: no limit.
    pub fn max_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.config.max_lifetime = lifetime;
        self
    }

    /// Name sent in the hello, for the daemon's logs. Default: the program's
    /// file name and process id, as in `myservice[4121]`.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.config.client_name = name.into();
        self
    }

    /// Largest frame body sent or accepted, in bytes. Default
    /// [`DEFAULT_MAX_FRAME`] (16 MiB). A worker that sends a larger frame is
    /// closed with a [`Protocol`](super::Error::Protocol) error.
    pub fn max_frame(mut self, bytes: usize) -> Self {
        self.config.max_frame = bytes;
        self
    }

    /// Time allowed to one connection attempt, from connecting to the
    /// worker's hello. Default 10 s. An attempt that runs out is retried like
    /// a refused connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// Builds the client and starts connecting `min_workers` workers in the
    /// background, and a housekeeping task that replaces idle workers that
    /// died or expired.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime: the client keeps a handle to the
    /// runtime for the work it starts (connections, checkout-done hooks).
    pub fn build(mut self) -> Client {
        self.config.min_workers = self.config.min_workers.min(self.config.max_workers);
        let pool = Pool::new(Arc::new(self.config), Handle::current());
        pool.fill();
        maintenance::start(&pool);
        Client::from_pool(pool)
    }
}

fn default_client_name() -> String {
    let program = std::env::args_os()
        .next()
        .as_deref()
        .map(std::path::Path::new)
        .and_then(|path| path.file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "wasm-task-client".to_owned());
    format!("{program}[{}]", std::process::id())
}
