//! What each backend's KV cache holds of the prompt families this router
//! sends there, so that a new family is not placed where it would evict
//! families still in use.
//!
//! A family is what a placement seed names (a system prompt, a template, a
//! conversation: see [`super::policy`]). Every decision touches the
//! request's family on the chosen backend with the key bytes the backend
//! will then hold of it (the longest request of the family sent there).
//! A family is *in use* on a backend once a second request of it went
//! there, for as long as its requests keep coming within [`IN_USE_FOR`]:
//! a one-off prompt is evicted at no loss, a family in use is prefilled
//! again by its next request. [`Occupancy::in_use`] sums, per backend, the
//! bytes of its families in use, which rule 3 compares with what the
//! engine's cache holds (`vllm:cache_config_info`). It also sums the
//! *young* ones, placed less than [`YOUNG_FOR`] ago and not proven yet,
//! weighed by how often recent new prompts turned out to be families (a
//! rate that starts at 1, see `reuse`): the first requests of a cold
//! start's families, placed before any second request came, count too,
//! while one-off prompts soon stop counting.
//!
//! Upkeep is O(1) amortized: each backend keeps its families in a map and
//! a queue of touches in time order; families whose last touch is older
//! than [`IN_USE_FOR`] leave from the queue's front, and the backend's sum
//! follows every change. Each backend keeps at most [`MAX_FAMILIES`]
//! families (the least recently touched leave first) and its queue at most
//! four times that, so memory is bounded whatever the traffic. Backends are
//! split over [`SHARDS`] locks by their id, so decisions for different
//! backends rarely meet.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use super::{index::BackendId, reuse::ReuseRate};

/// How long a family stays in use after its last request: longer than a
/// system prompt's or a conversation's quiet spells, short enough that a
/// finished conversation or a retired template stops counting.
pub(crate) const IN_USE_FOR: Duration = Duration::from_secs(60);
/// How long a family placed but not yet proven by a second request counts
/// as young: a family's second request under load follows within a
/// second or two, a one-off never comes.
pub(crate) const YOUNG_FOR: Duration = Duration::from_secs(5);
/// Most families remembered per backend.
pub(crate) const MAX_FAMILIES: usize = 4096;
/// Locks the backends are split over.
const SHARDS: usize = 8;
/// A family touched again within this long is not queued again (its last
/// touch still moves): a hot family costs one queue entry per second.
const REQUEUE_AFTER: Duration = Duration::from_secs(1);

/// One family on one backend.
#[derive(Clone, Copy, Debug)]
struct Family {
    /// Key bytes the backend holds of it.
    bytes: usize,
    /// Requests of it sent there (saturating).
    uses: u32,
    /// When it was first touched.
    born: Instant,
    /// When it was last touched.
    last: Instant,
    /// When it was last queued.
    queued: Instant,
    /// Counted in [`Backend::young`].
    young: bool,
}

impl Family {
    /// Whether a second request proved it a family.
    fn in_use(&self) -> bool {
        self.uses >= 2
    }
}

/// One backend's families.
#[derive(Debug, Default)]
struct Backend {
    families: HashMap<u64, Family>,
    /// `(seed, touched at)` in time order; an entry is stale once its
    /// family was queued again later (or left).
    queue: VecDeque<(u64, Instant)>,
    /// `(seed, born)` of new families, in time order.
    newborn: VecDeque<(u64, Instant)>,
    /// Bytes of the families in use.
    in_use: usize,
    /// Bytes of the families touched once, less than [`YOUNG_FOR`] ago.
    young: usize,
}

impl Backend {
    fn touch(&mut self, seed: u64, bytes: usize, now: Instant, proven: &ReuseRate) {
        self.expire(now, proven);
        let family = self.families.entry(seed).or_insert(Family {
            bytes: 0,
            uses: 0,
            born: now,
            last: now,
            queued: now,
            young: false,
        });
        let new = family.uses == 0;
        if family.in_use() {
            self.in_use -= family.bytes;
        }
        if family.young {
            self.young -= family.bytes;
            family.young = false;
            proven.observe(true);
        }
        family.uses = family.uses.saturating_add(1);
        family.bytes = family.bytes.max(bytes);
        family.last = now;
        if family.in_use() {
            self.in_use += family.bytes;
        } else {
            self.young += family.bytes;
            family.young = true;
            self.newborn.push_back((seed, now));
        }
        if new || now.saturating_duration_since(family.queued) >= REQUEUE_AFTER {
            family.queued = now;
            self.queue.push_back((seed, now));
        }
        while self.families.len() > MAX_FAMILIES || self.queue.len() > 4 * MAX_FAMILIES {
            self.pop();
        }
        while self.newborn.len() > MAX_FAMILIES {
            self.grow_up(proven);
        }
    }

    /// Drops the families whose last touch is [`IN_USE_FOR`] before `now`,
    /// and stops counting those born [`YOUNG_FOR`] before it as young.
    fn expire(&mut self, now: Instant, proven: &ReuseRate) {
        while let Some(&(_, born)) = self.newborn.front() {
            if now.saturating_duration_since(born) < YOUNG_FOR {
                break;
            }
            self.grow_up(proven);
        }
        while let Some(&(_, at)) = self.queue.front() {
            if now.saturating_duration_since(at) < IN_USE_FOR {
                break;
            }
            self.pop();
        }
    }

    /// Pops the queue's front, and its family if that was its last touch.
    fn pop(&mut self) {
        let Some((seed, at)) = self.queue.pop_front() else {
            return;
        };
        if let Some(family) = self.families.get(&seed).filter(|f| f.queued == at) {
            if family.in_use() {
                self.in_use -= family.bytes;
            }
            if family.young {
                self.young -= family.bytes;
            }
            self.families.remove(&seed);
        }
    }

    /// Pops the newborn queue's front: its family, if still young, is
    /// not any more, and was a one-off.
    fn grow_up(&mut self, proven: &ReuseRate) {
        let Some((seed, born)) = self.newborn.pop_front() else {
            return;
        };
        if let Some(family) = self
            .families
            .get_mut(&seed)
            .filter(|f| f.young && f.born == born)
        {
            self.young -= family.bytes;
            family.young = false;
            proven.observe(false);
        }
    }
}

/// Every backend's families; see the module doc.
#[derive(Debug)]
pub(crate) struct Occupancy {
    shards: Box<[Mutex<HashMap<BackendId, Backend>>]>,
    /// How often a new family was proven by a second request before it
    /// grew up.
    proven: ReuseRate,
}

impl Default for Occupancy {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            proven: ReuseRate::default(),
        }
    }
}

impl Occupancy {
    /// Notes that a request of family `seed` went to `backend` at `now`,
    /// which then holds `bytes` of it.
    pub(crate) fn touch(&self, backend: BackendId, seed: u64, bytes: usize, now: Instant) {
        self.shard(backend)
            .entry(backend)
            .or_default()
            .touch(seed, bytes, now, &self.proven);
    }

    /// Bytes of the families in use on `backend` at `now`, and of its
    /// young families weighed by how often new ones were proven, leaving
    /// out family `except` (the request's own).
    pub(crate) fn in_use(&self, backend: BackendId, except: u64, now: Instant) -> usize {
        let young = self.proven.get();
        let mut shard = self.shard(backend);
        let Some(held) = shard.get_mut(&backend) else {
            return 0;
        };
        held.expire(now, &self.proven);
        let (mut in_use, mut young_bytes) = (held.in_use, held.young);
        if let Some(own) = held.families.get(&except) {
            if own.in_use() {
                in_use -= own.bytes;
            }
            if own.young {
                young_bytes -= own.bytes;
            }
        }
        // Rounding down: a young family counts at most what it holds.
        in_use.saturating_add((young * young_bytes as f64) as usize)
    }

    /// Forgets `backend` (it left the fleet).
    pub(crate) fn remove_backend(&self, backend: BackendId) {
        self.shard(backend).remove(&backend);
    }

    /// The shard of `backend`; a panic while holding its lock leaves at
    /// worst a family miscounted until it expires.
    fn shard(&self, backend: BackendId) -> MutexGuard<'_, HashMap<BackendId, Backend>> {
        self.shards[backend as usize % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_family_counts_from_its_second_request_until_it_goes_quiet() {
        let occupancy = Occupancy::default();
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let in_use = |except, secs| occupancy.in_use(1, except, at(secs));
        occupancy.touch(1, 10, 6_000, t0);
        // Young, and (no family grew up unproven yet) counted whole.
        assert_eq!(in_use(0, 0), 6_000);
        occupancy.touch(1, 10, 6_500, at(1));
        occupancy.touch(1, 20, 3_000, at(1));
        occupancy.touch(1, 20, 3_000, at(2));
        assert_eq!(in_use(0, 2), 9_500);
        assert_eq!(in_use(10, 2), 3_000, "its own family is left out");
        assert_eq!(occupancy.in_use(2, 0, at(2)), 0, "another backend");
        // Family 20 keeps coming; family 10 goes quiet.
        occupancy.touch(1, 20, 3_000, at(50));
        assert_eq!(in_use(0, 61), 3_000);
        assert_eq!(in_use(0, 111), 0);
        occupancy.touch(1, 20, 3_000, at(112));
        assert_eq!(in_use(0, 112), 3_000, "it starts over, young");
        occupancy.remove_backend(1);
        occupancy.touch(1, 20, 3_000, at(113));
        occupancy.touch(1, 20, 3_000, at(113));
        assert_eq!(in_use(0, 113), 3_000);
        occupancy.remove_backend(1);
        assert_eq!(in_use(0, 113), 0, "forgotten with its backend");
    }

    #[test]
    fn a_new_family_counts_as_young_as_often_as_new_ones_were_proven() {
        let occupancy = Occupancy::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        occupancy.touch(1, 10, 4_000, at(0));
        occupancy.touch(1, 20, 2_000, at(100));
        assert_eq!(occupancy.in_use(1, 0, at(200)), 6_000);
        assert_eq!(occupancy.in_use(1, 20, at(200)), 4_000, "not its own");
        // Proven: in use.
        occupancy.touch(1, 20, 2_500, at(300));
        assert_eq!(occupancy.in_use(1, 0, at(400)), 6_500);
        // Family 10 was never proven: once YOUNG_FOR passed it no longer
        // counts, and the next young family counts for less.
        let later = u64::try_from(YOUNG_FOR.as_millis()).unwrap();
        assert_eq!(occupancy.in_use(1, 0, at(later)), 2_500);
        occupancy.touch(1, 30, 3_000, at(later));
        let young = occupancy.in_use(1, 0, at(later)) - 2_500;
        assert!((1..3_000).contains(&young), "{young}");
        // One-offs only: young families soon count for next to nothing.
        for n in 0..64 {
            occupancy.touch(2, 100 + n, 3_000, at(later + n * later));
        }
        assert!(occupancy.in_use(2, 0, at(65 * later)) < 300);
    }

    proptest! {
        /// Whatever the touches, the sums are those of the families in use
        /// and of the young ones, and memory stays within its bounds.
        #[test]
        fn the_sums_are_those_of_the_families_they_count(
            touches in prop::collection::vec((0u64..6000, 0usize..5000, 0u64..300), 1..400),
        ) {
            let mut held = Backend::default();
            let proven = ReuseRate::default();
            let mut now = Instant::now();
            for (seed, bytes, step) in touches {
                now += Duration::from_millis(step * step);
                held.touch(seed % 97, bytes, now, &proven);
                held.expire(now, &proven);
                let sum = |counted: fn(&Family) -> bool| -> usize {
                    held.families.values().filter(|f| counted(f)).map(|f| f.bytes).sum()
                };
                prop_assert_eq!(held.in_use, sum(Family::in_use));
                prop_assert_eq!(held.young, sum(|f| f.young));
                let young = |f: &Family| {
                    f.uses == 1 && now.saturating_duration_since(f.born) < YOUNG_FOR
                };
                prop_assert!(held.families.values().all(|f| f.young == young(f)));
                prop_assert!(held.families.len() <= MAX_FAMILIES);
                prop_assert!(held.queue.len() <= 4 * MAX_FAMILIES);
                prop_assert!(held.families.values().all(|f| now.saturating_duration_since(f.last) < IN_USE_FOR));
            }
        }
    }
}
