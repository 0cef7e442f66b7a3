//! wasm-task: run untrusted WebAssembly workers in a pool of sandboxed processes.
//!
//! - [`client`]: the tokio client: a pool of workers, FIFO checkouts, calls.
//! - [`protocol`]: the length-prefixed MessagePack frames both sides speak.
//! - `daemon` (feature `daemon`, on by default): the fork-per-connection
//!   server that hosts guests in wasmtime. Build with
//!   `default-features = false` for a client that does not compile wasmtime.

pub mod client;
pub mod protocol;

#[cfg(feature = "daemon")]
pub mod daemon;

pub use client::{Address, Checkout, Client, ClientBuilder, Error};
