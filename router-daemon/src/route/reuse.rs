//! How often recent requests reused a prefix the fleet already held: the
//! router's estimate of whether a new prompt's leading part will be asked
//! for again.
//!
//! A new prompt's first request cannot tell a one-off from the first of a
//! family (a system prompt, a RAG template, an agent's preamble). What the
//! router *can* see is how its recent traffic behaved: when most requests
//! followed a cached prefix, the next new leading part most likely starts a
//! family too, and moving it off its rendezvous backend to spread load
//! risks a second copy (replicas place it independently). When almost
//! nothing was reused, placement is free to spread by load. The policy
//! weighs a placement's leading part by this rate (see
//! [`Policy::family_weight`](super::Policy::family_weight)).
//!
//! The rate starts at 1, but that start counts as only [`PRIOR`]
//! observations: until [`SPAN`] requests have been seen, each moves the rate
//! by 1/(observations so far + `PRIOR`), a plain average, and only then by
//! 1/`SPAN`. Traffic that shares nothing brings it near 0 within a few dozen
//! requests, where a fixed 1/`SPAN` step took hundreds, each held to its
//! rendezvous backend instead of spread by load.
use std::sync::atomic::{AtomicU64, Ordering};

/// Fixed-point scale of the rate: 1.0 is stored as `ONE`.
const ONE: u32 = 1 << 16;
/// Once warmed up, the rate moves 1/`SPAN` of the way to each new
/// observation, so it forgets over a few `SPAN`s of requests.
const SPAN: u32 = 64;
/// How many observations the starting rate of 1 is worth.
const PRIOR: u32 = 2;

/// An exponentially weighted fraction of recent requests that followed a
/// cached prefix, averaged plainly over its first [`SPAN`] observations;
/// lock-free, shared by every connection.
#[derive(Debug)]
pub(crate) struct ReuseRate(AtomicU64);

/// The rate (low 32 bits) and how many observations it has seen, capped at
/// [`SPAN`] (high 32 bits), in one word so both move together.
fn pack(rate: u32, seen: u32) -> u64 {
    u64::from(seen) << 32 | u64::from(rate)
}

fn unpack(word: u64) -> (u32, u32) {
    // Truncation keeps exactly the low half, the rate.
    #[allow(clippy::cast_possible_truncation, reason = "splitting a packed word")]
    let rate = word as u32;
    #[allow(clippy::cast_possible_truncation, reason = "splitting a packed word")]
    let seen = (word >> 32) as u32;
    (rate, seen)
}

impl Default for ReuseRate {
    /// Starts at 1: a router in front of a prefix cache is deployed for
    /// traffic that shares prefixes, and the first families of a cold start
    /// are placed before the rate has seen anything.
    fn default() -> Self {
        Self(AtomicU64::new(pack(ONE, 0)))
    }
}

impl ReuseRate {
    /// The current rate, from 0 (nothing reused) to 1 (everything).
    pub(crate) fn get(&self) -> f64 {
        let (rate, _) = unpack(self.0.load(Ordering::Relaxed));
        f64::from(rate) / f64::from(ONE)
    }

    /// Records one request: `reused` when it followed a cached prefix.
    pub(crate) fn observe(&self, reused: bool) {
        let target = if reused { ONE } else { 0 };
        // A lost race only drops one observation of many; Relaxed is enough
        // for a statistic.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
                let (rate, seen) = unpack(word);
                let step = (seen + PRIOR + 1).min(SPAN);
                let rate = if target > rate {
                    rate + (target - rate).div_ceil(step)
                } else {
                    rate - (rate - target).div_ceil(step)
                };
                Some(pack(rate, (seen + 1).min(SPAN)))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_one_and_follows_what_it_sees() {
        let rate = ReuseRate::default();
        assert_eq!(rate.get(), 1.0);
        for _ in 0..4 * SPAN {
            rate.observe(false);
        }
        assert!(rate.get() < 0.05, "{}", rate.get());
        for _ in 0..4 * SPAN {
            rate.observe(true);
        }
        assert!(rate.get() > 0.95, "{}", rate.get());
    }

    #[test]
    fn a_cold_start_on_unshared_traffic_falls_within_a_few_dozen_requests() {
        let rate = ReuseRate::default();
        for _ in 0..32 {
            rate.observe(false);
        }
        // The start is worth PRIOR of 34 observations.
        assert!(rate.get() < 0.07, "{}", rate.get());
    }

    #[test]
    fn a_cold_start_on_shared_traffic_stays_high() {
        // One new family's first request, then its siblings, four families.
        let rate = ReuseRate::default();
        for i in 0..64 {
            rate.observe(i % 16 != 0);
            assert!(rate.get() > 0.5, "after {i}: {}", rate.get());
        }
    }

    #[test]
    fn settles_near_the_observed_fraction() {
        let rate = ReuseRate::default();
        // Three of every four requests reuse a prefix.
        for i in 0..16 * SPAN {
            rate.observe(i % 4 != 0);
        }
        assert!((rate.get() - 0.75).abs() < 0.05, "{}", rate.get());
    }

    #[test]
    fn reaches_both_ends_exactly() {
        let rate = ReuseRate::default();
        for _ in 0..64 * SPAN {
            rate.observe(false);
        }
        assert_eq!(rate.get(), 0.0);
        for _ in 0..64 * SPAN {
            rate.observe(true);
        }
        assert_eq!(rate.get(), 1.0);
    }
}
