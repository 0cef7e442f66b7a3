//! Pauses between connection attempts: per attempt while the daemon cannot
//! be reached, and pool-wide while it refuses the module.

use std::time::Duration;

use tokio::time::Instant;

/// First pause after a failed attempt.
pub(crate) const FIRST_RETRY: Duration = Duration::from_millis(16);
/// Longest pause after an unreachable daemon.
pub(crate) const MAX_RETRY: Duration = Duration::from_secs(1);
/// Longest pause after a refusal (a failed setup, an unknown module): every
/// attempt then costs the daemon a fork and the guest a setup.
pub(crate) const MAX_REFUSED_RETRY: Duration = Duration::from_secs(2);

/// Doubling pauses between failed attempts of one connector.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff { next: FIRST_RETRY }
    }

    /// The next pause: twice the last one, up to [`MAX_RETRY`].
    pub(crate) fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_RETRY);
        pause
    }
}

/// What a connector may do now, as decided by [`Refusals::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Connect: the daemon has not been refusing.
    Go,
    /// Connect as the one probe allowed while the daemon refuses; report
    /// the end with [`Refusals::probe_ended`].
    Probe,
    /// Wait until this instant, or until the back-off changes.
    WaitUntil(Instant),
    /// Wait until the probe under way ends.
    WaitForProbe,
}

/// The pool-wide back-off after refusals.
///
/// A refusal means every attempt costs a fork and a failing setup, so once
/// the daemon refuses, attempts are made one at a time (a probe), each
/// after a pause that doubles with every refusal in a row, from
/// [`FIRST_RETRY`] up to [`MAX_REFUSED_RETRY`]. An accepted connection ends
/// the back-off.
#[derive(Debug, Default)]
pub(crate) struct Refusals {
    /// Refusals since the last accepted connection.
    streak: u32,
    /// When the next probe may start.
    retry_at: Option<Instant>,
    /// Whether a probe is under way.
    probing: bool,
}

impl Refusals {
    /// Decides whether a connector may make an attempt at `now`.
    pub(crate) fn claim(&mut self, now: Instant) -> Claim {
        if self.streak == 0 {
            return Claim::Go;
        }
        if self.probing {
            return Claim::WaitForProbe;
        }
        match self.retry_at {
            Some(at) if now < at => Claim::WaitUntil(at),
            _ => {
                self.probing = true;
                Claim::Probe
            }
        }
    }

    /// Counts a refusal at `now` and schedules the next probe.
    pub(crate) fn refused(&mut self, now: Instant) {
        self.streak = self.streak.saturating_add(1);
        self.retry_at = Some(now + refused_pause(self.streak));
    }

    /// Whether the daemon refused since the last accepted connection.
    pub(crate) fn is_active(&self) -> bool {
        self.streak > 0
    }

    /// Ends the back-off: the daemon accepted a connection.
    pub(crate) fn accepted(&mut self) {
        *self = Refusals::default();
    }

    /// Marks the probe under way as finished, whatever its outcome.
    pub(crate) fn probe_ended(&mut self) {
        self.probing = false;
    }
}

/// The pause after `streak` refusals in a row.
fn refused_pause(streak: u32) -> Duration {
    let doublings = streak.saturating_sub(1).min(16);
    (FIRST_RETRY * 2u32.pow(doublings)).min(MAX_REFUSED_RETRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_from_the_first_retry_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let pauses: Vec<u64> = (0..9).map(|_| backoff.pause().as_millis() as u64).collect();
        assert_eq!(pauses, [16, 32, 64, 128, 256, 512, 1000, 1000, 1000]);
    }

    #[test]
    fn refusals_allow_one_probe_at_a_time_after_a_doubling_pause() {
        let t0 = Instant::now();
        let mut refusals = Refusals::default();
        assert_eq!(refusals.claim(t0), Claim::Go);
        assert_eq!(refusals.claim(t0), Claim::Go, "no limit before a refusal");

        refusals.refused(t0);
        let first = t0 + FIRST_RETRY;
        assert_eq!(refusals.claim(t0), Claim::WaitUntil(first));
        assert_eq!(refusals.claim(first), Claim::Probe);
        assert_eq!(refusals.claim(first), Claim::WaitForProbe, "one probe at a time");

        refusals.refused(first);
        refusals.probe_ended();
        assert_eq!(refusals.claim(first), Claim::WaitUntil(first + FIRST_RETRY * 2));

        refusals.accepted();
        assert_eq!(refusals.claim(first), Claim::Go);
    }

    #[test]
    fn refused_pauses_stop_growing_at_the_cap() {
        let pauses: Vec<u64> = (1..=10).map(|n| refused_pause(n).as_millis() as u64).collect();
        assert_eq!(pauses, [16, 32, 64, 128, 256, 512, 1024, 2000, 2000, 2000]);
        assert_eq!(refused_pause(u32::MAX), MAX_REFUSED_RETRY);
    }
}
