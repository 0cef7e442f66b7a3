//! A checkout's memory of how its calls went: which calls must be skipped
//! because a call before them failed, and the error that lost the worker.
//!
//! Calls on one checkout run one at a time in the order they were made. A
//! call takes a ticket when it is made (the number of failed calls so far)
//! and looks at the ledger again when its turn comes: if a call failed in
//! between, it was queued behind that failure and is skipped. A call made
//! after the failure has the newer number and runs normally.

use super::Error;

/// How the calls of one checkout went.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    /// Calls that failed after being sent (or reaching their turn).
    failures: u64,
    /// The method and error of the last of those.
    last_failure: Option<(String, Error)>,
    /// The error that cost the checkout its worker; every later call gets it.
    lost: Option<Error>,
    /// Whether the checkout was aborted.
    aborted: bool,
    /// Whether the checkout's deadline passed.
    pub(crate) expired: bool,
}

/// Which calls the ledger would skip, as of when it was read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SkipLine {
    all: bool,
    failures: u64,
}

impl SkipLine {
    /// Whether the call holding `ticket` would be skipped.
    pub(crate) fn skips(self, ticket: Ticket) -> bool {
        self.all || self.failures > ticket.0
    }
}

/// The position of a call in its checkout's history of failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

impl Ledger {
    /// Takes a ticket for a call being made, or the error it fails with at
    /// once because the worker is already lost.
    pub(crate) fn ticket(&self) -> Result<Ticket, Error> {
        match &self.lost {
            Some(lost) => Err(lost.clone()),
            None => Ok(Ticket(self.failures)),
        }
    }

    /// Whether the call holding `ticket`, now at its turn, must not be sent,
    /// and the error it gets instead.
    pub(crate) fn skip(&self, pid: u32, method: &str, ticket: Ticket) -> Option<Error> {
        if self.aborted {
            return self.lost.clone();
        }
        if self.failures > ticket.0
            && let Some((earlier_method, earlier)) = &self.last_failure
        {
            return Some(Error::EarlierCallFailed {
                pid,
                method: method.to_owned(),
                earlier_method: earlier_method.clone(),
                earlier: Box::new(earlier.clone()),
            });
        }
        self.lost.clone()
    }

    /// Which calls would be skipped now (see [`Ledger::skip`]).
    pub(crate) fn skips(&self) -> SkipLine {
        SkipLine { all: self.aborted || self.lost.is_some(), failures: self.failures }
    }

    /// Records a call that failed with `error`; `lost` if the worker was
    /// closed because of it.
    pub(crate) fn failed(&mut self, method: &str, error: &Error, lost: bool) {
        self.failures += 1;
        self.last_failure = Some((method.to_owned(), error.clone()));
        if lost && self.lost.is_none() {
            self.lost = Some(error.clone());
        }
    }

    /// Marks the checkout aborted; false if it already was.
    pub(crate) fn abort(&mut self, pid: u32) -> bool {
        if self.aborted {
            return false;
        }
        self.aborted = true;
        self.lost = Some(Error::Aborted { pid });
        true
    }

    /// Whether the checkout was aborted.
    pub(crate) fn is_aborted(&self) -> bool {
        self.aborted
    }

    /// The error every call gets after an abort.
    pub(crate) fn aborted_error(&self, pid: u32) -> Error {
        self.lost.clone().unwrap_or(Error::Aborted { pid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_error(method: &str) -> Error {
        Error::GuestError { pid: 1, method: method.into(), message: "no".into() }
    }

    #[test]
    fn calls_made_before_a_failure_are_skipped_and_later_ones_run() {
        let mut ledger = Ledger::default();
        let first = ledger.ticket().unwrap();
        let queued = ledger.ticket().unwrap();
        assert!(ledger.skip(1, "a", first).is_none());
        ledger.failed("a", &guest_error("a"), false);

        match ledger.skip(1, "b", queued) {
            Some(Error::EarlierCallFailed { method, earlier_method, .. }) => {
                assert_eq!((method.as_str(), earlier_method.as_str()), ("b", "a"));
            }
            other => panic!("expected a skipped call, got {other:?}"),
        }
        let after = ledger.ticket().unwrap();
        assert!(ledger.skip(1, "c", after).is_none(), "a call made after the failure runs");
    }

    #[test]
    fn a_lost_worker_fails_every_later_call_with_the_same_error() {
        let mut ledger = Ledger::default();
        let died = Error::WorkerDied { pid: 1, method: "a".into(), source: None };
        ledger.failed("a", &died, true);
        assert!(matches!(ledger.ticket(), Err(Error::WorkerDied { .. })));
    }

    #[test]
    fn abort_fails_queued_and_later_calls_with_the_abort_error() {
        let mut ledger = Ledger::default();
        let queued = ledger.ticket().unwrap();
        assert!(ledger.abort(7));
        assert!(!ledger.abort(7), "aborting twice changes nothing");
        assert!(matches!(ledger.skip(7, "a", queued), Some(Error::Aborted { pid: 7 })));
        assert!(matches!(ledger.ticket(), Err(Error::Aborted { pid: 7 })));
    }
}
