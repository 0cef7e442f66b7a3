//! End-to-end tests: the real `wasm-task` daemon binary, real guest modules
//! built for wasm32-wasip1, and the client library, talking over unix sockets.

mod harness;

mod calls;
mod daemon;
mod hardening;
mod hostile;
mod limits;
mod pool;
mod pool_semantics;
mod reading;
mod replies;
mod robustness;
mod sandbox;
mod zygote;
