//! A call's result together with what came back beside it: the guest's log
//! records and output lines, and where the time went.

use std::time::Duration;

use crate::protocol::{CallStats, LogRecord};

use super::Error;

/// The outcome of [`Checkout::call_report`](super::Checkout::call_report):
/// the result, the guest's log records, and the call's timings.
#[derive(Debug)]
#[non_exhaustive]
pub struct CallReport<R> {
    /// What [`Checkout::call`](super::Checkout::call) would have returned.
    pub result: Result<R, Error>,
    /// The log records and output lines the guest made during the call, in
    /// order (empty when no reply came). They are also emitted as `tracing`
    /// events, as for every call.
    pub logs: Vec<LogRecord>,
    /// Where the call's time went.
    pub timings: CallTimings,
}

impl<R> CallReport<R> {
    /// The result alone.
    pub fn into_result(self) -> Result<R, Error> {
        self.result
    }
}

/// Where a call's time went, as seen from the client and the worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CallTimings {
    /// Time the checkout waited in the pool's queue for its worker (the same
    /// for every call of one checkout).
    pub checkout_wait: Duration,
    /// Time this call waited behind the calls made before it on the same
    /// checkout.
    pub turn_wait: Duration,
    /// Time from sending the request to reading the reply; zero if the
    /// request was never sent. A request sent ahead of the replies to
    /// earlier calls waits behind them in this time too.
    pub round_trip: Duration,
    /// What the worker measured (the guest's wall-clock and CPU time, fuel),
    /// when a reply came.
    pub worker: Option<CallStats>,
}
