//! The pool's semantics at full strength, against the real daemon and real
//! guests: calls queued on a checkout, aborts, retirement, pool size,
//! setup failures, dead workers, a daemon restart, guest logs, statistics,
//! and stress under cancellation and recycling.

mod death;
mod logs;
mod queued;
mod restart;
mod retirement;
mod setup;
mod sizing;
mod status;
mod stress;
