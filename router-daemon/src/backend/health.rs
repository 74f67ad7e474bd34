//! Passive health: what requests learn of a backend between discovery
//! polls. A backend whose requests fail `--eject-after-failures` times in a
//! row (connect failures, a close or reset before the response, a 5xx head,
//! a response timeout) is ejected: it takes no new request for
//! `--eject-ms`, doubled for each ejection in a row up to 16 times. Then it
//! is tried again with one request at a time (half-open): the first
//! success readmits it, a failure ejects it again for longer.
//!
//! All of it is a few atomics on the backend, read and written by the
//! request path without a lock.
use std::{
    sync::{
        LazyLock,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// When passive health ejects a backend (`--eject-after-failures`,
/// `--eject-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row that eject; 0 never ejects.
    pub(crate) after_failures: u32,
    /// The first ejection's length; each one in a row doubles it.
    pub(crate) period: Duration,
}

/// The longest ejection, in first periods.
const MAX_BACKOFF: u32 = 16;

/// What one request's attempt on a backend says of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The backend answered with a status below 500.
    Success,
    /// The backend failed the request (see the module doc).
    Failure,
}

/// One backend's passive health.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Failures since the last success.
    failures: AtomicU32,
    /// Ejections since the last success: the back-off's exponent.
    ejections: AtomicU32,
    /// While ejected, when the ejection ends (milliseconds on [`clock`]);
    /// 0 when not ejected.
    ejected_until: AtomicU64,
    /// Half-open: when the trial request in flight was let through
    /// (milliseconds on [`clock`]); 0 when none is.
    trial_since: AtomicU64,
}

/// Milliseconds since the first call: the clock the atomics hold. Never 0
/// for a reading taken after start-up, since 0 means "none".
pub(crate) fn clock() -> u64 {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    u64::try_from(START.elapsed().as_millis())
        .unwrap_or(u64::MAX)
        .saturating_add(1)
}

impl Ejection {
    /// The flags' defaults: 5 failures in a row, 10 s.
    pub(crate) const DEFAULT: Self = Self {
        after_failures: 5,
        period: Duration::from_secs(10),
    };
}

impl Health {
    /// Not ejected: nothing to check (one load, no clock).
    pub(crate) fn is_clear(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) == 0
    }

    /// Not ejected and no failure since the last success: a success
    /// changes nothing (loads only, so successes on several workers do not
    /// contend for the cache line).
    pub(crate) fn is_healthy(&self) -> bool {
        self.is_clear() && self.failures.load(Ordering::Relaxed) == 0
    }

    /// Whether the backend may take a new request now (`now` from
    /// [`clock`]): not ejected, or past its ejection with no trial request
    /// in flight. A trial that has run for a whole first period is taken
    /// as lost (its client may have left without an outcome).
    pub(crate) fn admits(&self, now: u64, ejection: &Ejection) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if now < until {
            return false;
        }
        let trial = self.trial_since.load(Ordering::Relaxed);
        trial == 0 || now.saturating_sub(trial) >= millis(ejection.period)
    }

    /// Whether the backend is ejected now (for `/metrics`).
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    /// A request was sent to the backend: if it is past an ejection, this
    /// request is its trial, and no other goes there until it ends.
    pub(crate) fn chosen(&self, now: u64) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && now >= until {
            self.trial_since.store(now, Ordering::Relaxed);
        }
    }

    /// Records a request's `outcome`; returns what changed, for the log.
    pub(crate) fn record(&self, outcome: Outcome, now: u64, ejection: &Ejection) -> Change {
        match outcome {
            Outcome::Success => {
                self.failures.store(0, Ordering::Relaxed);
                self.trial_since.store(0, Ordering::Relaxed);
                let was = self.ejected_until.swap(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
                if was == 0 {
                    Change::None
                } else {
                    Change::Readmitted
                }
            }
            Outcome::Failure => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                let trial = self.trial_since.swap(0, Ordering::Relaxed) != 0;
                let ejected = self.ejected_until.load(Ordering::Relaxed) != 0;
                // A failed trial ejects again at once; otherwise the count
                // does, once, as it reaches the bound.
                let eject = (trial && ejected)
                    || (ejection.after_failures > 0 && failures == ejection.after_failures);
                if !eject {
                    return Change::None;
                }
                let ejections = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
                let factor = 1u32
                    .checked_shl(ejections - 1)
                    .unwrap_or(MAX_BACKOFF)
                    .min(MAX_BACKOFF);
                let period = ejection.period * factor;
                self.ejected_until
                    .store(now.saturating_add(millis(period)), Ordering::Relaxed);
                Change::Ejected { period }
            }
        }
    }
}

/// What a recorded outcome changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing to report.
    None,
    /// The backend is ejected for `period`.
    Ejected {
        /// How long.
        period: Duration,
    },
    /// The backend's trial succeeded: it takes requests again.
    Readmitted,
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EJECTION: Ejection = Ejection {
        after_failures: 3,
        period: Duration::from_millis(1000),
    };

    #[test]
    fn failures_in_a_row_eject_and_a_success_resets_the_count() {
        let health = Health::default();
        let now = 10;
        for _ in 0..2 {
            assert_eq!(
                health.record(Outcome::Failure, now, &EJECTION),
                Change::None
            );
        }
        assert_eq!(
            health.record(Outcome::Success, now, &EJECTION),
            Change::None
        );
        for _ in 0..2 {
            assert_eq!(
                health.record(Outcome::Failure, now, &EJECTION),
                Change::None
            );
        }
        assert!(health.admits(now, &EJECTION), "two in a row do not eject");
        assert_eq!(
            health.record(Outcome::Failure, now, &EJECTION),
            Change::Ejected {
                period: Duration::from_millis(1000)
            }
        );
        assert!(!health.admits(now, &EJECTION));
        assert!(!health.admits(now + 999, &EJECTION));
        assert!(health.is_ejected(now + 999));
        assert!(health.admits(now + 1000, &EJECTION), "the ejection ends");
        // Failures of requests already in flight do not extend it.
        assert_eq!(
            health.record(Outcome::Failure, now, &EJECTION),
            Change::None
        );
    }

    #[test]
    fn half_open_lets_one_trial_through_and_backs_off_on_failure() {
        let health = Health::default();
        let mut now = 10;
        for _ in 0..3 {
            health.record(Outcome::Failure, now, &EJECTION);
        }
        now += 1000;
        assert!(health.admits(now, &EJECTION));
        health.chosen(now);
        assert!(!health.admits(now, &EJECTION), "one trial at a time");
        assert_eq!(
            health.record(Outcome::Failure, now, &EJECTION),
            Change::Ejected {
                period: Duration::from_millis(2000)
            },
            "a failed trial ejects again, for twice as long"
        );
        assert!(!health.admits(now + 1999, &EJECTION));
        now += 2000;
        assert!(health.admits(now, &EJECTION));
        health.chosen(now);
        assert_eq!(
            health.record(Outcome::Success, now, &EJECTION),
            Change::Readmitted
        );
        assert!(health.admits(now, &EJECTION));
        assert!(!health.is_ejected(now));
        // The back-off starts over.
        for _ in 0..3 {
            health.record(Outcome::Failure, now, &EJECTION);
        }
        assert!(health.admits(now + 1000, &EJECTION));
    }

    #[test]
    fn a_lost_trial_frees_the_slot_after_a_period() {
        let health = Health::default();
        for _ in 0..3 {
            health.record(Outcome::Failure, 10, &EJECTION);
        }
        health.chosen(1010);
        assert!(!health.admits(1500, &EJECTION));
        assert!(health.admits(2010, &EJECTION), "the trial never reported");
    }

    #[test]
    fn the_back_off_is_capped() {
        let health = Health::default();
        let mut now = 10;
        for _ in 0..3 {
            health.record(Outcome::Failure, now, &EJECTION);
        }
        let mut last = Change::None;
        for _ in 0..40 {
            now += 100_000;
            health.chosen(now);
            last = health.record(Outcome::Failure, now, &EJECTION);
        }
        assert_eq!(
            last,
            Change::Ejected {
                period: Duration::from_millis(16_000)
            }
        );
    }

    #[test]
    fn zero_never_ejects() {
        let never = Ejection {
            after_failures: 0,
            ..EJECTION
        };
        let health = Health::default();
        for _ in 0..100 {
            assert_eq!(health.record(Outcome::Failure, 10, &never), Change::None);
        }
        assert!(health.admits(10, &never));
    }
}
