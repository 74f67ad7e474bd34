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
//! Each backend keeps its families in a map and orders them twice, by
//! last touch and (the young ones) by birth, so expiry takes the oldest
//! first and every sum follows each change: a touch costs O(log n) with
//! n at most [`MAX_FAMILIES`]. Past that the least recently touched family
//! leaves (an engine's cache holds far fewer families of a thousand tokens
//! or more), so memory is bounded whatever the traffic: under 192 KiB per
//! backend (a test measures it). Backends are split over [`SHARDS`] locks
//! by their id, so decisions for different backends rarely meet.
use std::{
    collections::{BTreeSet, HashMap},
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
pub(crate) const MAX_FAMILIES: usize = 512;
/// The reuse rate below which recent traffic is mostly one-off prompts,
/// whose young families then weigh no more than it ([`Occupancy::in_use`]).
pub(crate) const MOSTLY_ONE_OFFS: f64 = 0.5;
/// Locks the backends are split over.
const SHARDS: usize = 8;

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
    /// Touched once, less than [`YOUNG_FOR`] ago: counted in
    /// [`Backend::young`].
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
    /// `(last touch, seed)` of every family.
    by_last: BTreeSet<(Instant, u64)>,
    /// `(birth, seed)` of the young families.
    by_birth: BTreeSet<(Instant, u64)>,
    /// Bytes of the families in use.
    in_use: usize,
    /// Bytes of the young families.
    young: usize,
}

impl Backend {
    fn touch(&mut self, seed: u64, bytes: usize, now: Instant, proven: &ReuseRate) {
        self.expire(now, proven);
        match self.families.get_mut(&seed) {
            Some(family) => {
                self.by_last.remove(&(family.last, seed));
                if family.in_use() {
                    self.in_use -= family.bytes;
                }
                if family.young {
                    // Its second request: proven.
                    self.young -= family.bytes;
                    self.by_birth.remove(&(family.born, seed));
                    family.young = false;
                    proven.observe(true);
                }
                family.uses = family.uses.saturating_add(1);
                family.bytes = family.bytes.max(bytes);
                family.last = now;
                if family.in_use() {
                    self.in_use += family.bytes;
                }
            }
            None => {
                self.families.insert(
                    seed,
                    Family {
                        bytes,
                        uses: 1,
                        born: now,
                        last: now,
                        young: true,
                    },
                );
                self.by_birth.insert((now, seed));
                self.young += bytes;
            }
        }
        self.by_last.insert((now, seed));
        while self.families.len() > MAX_FAMILIES {
            let Some((_, oldest)) = self.by_last.pop_first() else {
                break;
            };
            self.forget(oldest);
        }
    }

    /// Drops the families whose last touch is [`IN_USE_FOR`] before `now`,
    /// and stops counting those born [`YOUNG_FOR`] before it as young
    /// (one-offs, as far as `proven` goes).
    fn expire(&mut self, now: Instant, proven: &ReuseRate) {
        while let Some(&(born, seed)) = self.by_birth.first() {
            if now.saturating_duration_since(born) < YOUNG_FOR {
                break;
            }
            self.by_birth.pop_first();
            if let Some(family) = self.families.get_mut(&seed) {
                self.young -= family.bytes;
                family.young = false;
                proven.observe(false);
            }
        }
        while let Some(&(last, seed)) = self.by_last.first() {
            if now.saturating_duration_since(last) < IN_USE_FOR {
                break;
            }
            self.by_last.pop_first();
            self.forget(seed);
        }
    }

    /// Removes family `seed` (already out of `by_last`) and what it counted.
    fn forget(&mut self, seed: u64) {
        let Some(family) = self.families.remove(&seed) else {
            return;
        };
        if family.in_use() {
            self.in_use -= family.bytes;
        }
        if family.young {
            self.young -= family.bytes;
            self.by_birth.remove(&(family.born, seed));
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
    /// out family `except` (the request's own). Where fewer than
    /// [`MOSTLY_ONE_OFFS`] of recent requests followed a cached prefix
    /// (`reuse`), the young weigh at most that: the proven rate learns only
    /// as young families grow up, [`YOUNG_FOR`] after their birth, so
    /// through a cold start of one-off prompts it stays at 1 and each
    /// counts whole (one `router-bench quality` run of no-sharing at 16
    /// sessions filled an engine's cache with them in its router's view and
    /// starved that engine; README, Limits), while the reuse rate falls
    /// within a few dozen such requests. Traffic that shares more keeps the
    /// proven weight, so a cold start of shared prefixes is weighed as
    /// before.
    pub(crate) fn in_use(
        &self,
        backend: BackendId,
        except: u64,
        now: Instant,
        reuse: f64,
    ) -> usize {
        let proven = self.proven.get();
        let young = if reuse < MOSTLY_ONE_OFFS {
            proven.min(reuse.max(0.0))
        } else {
            proven
        };
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
        let in_use = |except, secs| occupancy.in_use(1, except, at(secs), 1.0);
        occupancy.touch(1, 10, 6_000, t0);
        // Young, and (no family grew up unproven yet) counted whole.
        assert_eq!(in_use(0, 0), 6_000);
        occupancy.touch(1, 10, 6_500, at(1));
        occupancy.touch(1, 20, 3_000, at(1));
        occupancy.touch(1, 20, 3_000, at(2));
        assert_eq!(in_use(0, 2), 9_500);
        assert_eq!(in_use(10, 2), 3_000, "its own family is left out");
        assert_eq!(occupancy.in_use(2, 0, at(2), 1.0), 0, "another backend");
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
        assert_eq!(occupancy.in_use(1, 0, at(200), 1.0), 6_000);
        assert_eq!(occupancy.in_use(1, 20, at(200), 1.0), 4_000, "not its own");
        // Proven: in use.
        occupancy.touch(1, 20, 2_500, at(300));
        assert_eq!(occupancy.in_use(1, 0, at(400), 1.0), 6_500);
        // Family 10 was never proven: once YOUNG_FOR passed it no longer
        // counts, and the next young family counts for less.
        let later = u64::try_from(YOUNG_FOR.as_millis()).unwrap();
        assert_eq!(occupancy.in_use(1, 0, at(later), 1.0), 2_500);
        occupancy.touch(1, 30, 3_000, at(later));
        let young = occupancy.in_use(1, 0, at(later), 1.0) - 2_500;
        assert!((1..3_000).contains(&young), "{young}");
        // One-offs only: young families soon count for next to nothing.
        for n in 0..64 {
            occupancy.touch(2, 100 + n, 3_000, at(later + n * later));
        }
        assert!(occupancy.in_use(2, 0, at(65 * later), 1.0) < 300);
    }

    #[test]
    fn where_few_requests_reuse_a_prefix_young_families_count_no_more_than_they() {
        let occupancy = Occupancy::default();
        let t0 = Instant::now();
        // A cold start of one-offs, younger than any expiry: the proven
        // rate is still 1.
        for n in 0..16 {
            occupancy.touch(1, 100 + n, 4_000, t0);
        }
        occupancy.touch(1, 7, 3_000, t0);
        occupancy.touch(1, 7, 3_000, t0);
        assert_eq!(occupancy.in_use(1, 0, t0, 1.0), 67_000);
        assert_eq!(occupancy.in_use(1, 0, t0, MOSTLY_ONE_OFFS), 67_000);
        // Traffic that shares little: they weigh as little as its reuse,
        // and a family in use counts whole.
        assert_eq!(occupancy.in_use(1, 0, t0, 0.0), 3_000);
        assert_eq!(occupancy.in_use(1, 0, t0, 0.25), 19_000);
    }

    #[test]
    fn a_flood_of_new_prompts_keeps_memory_bounded() {
        // A million one-off prompts on one backend within a minute, and
        // a family in use throughout, touched more often than the map
        // turns over.
        let occupancy = Occupancy::default();
        let t0 = Instant::now();
        for n in 0..1_000_000u64 {
            let now = t0 + Duration::from_micros(n * 50);
            occupancy.touch(1, 1_000 + n, 4_000, now);
            if n % 200 == 0 {
                occupancy.touch(1, 7, 6_000, now);
            }
        }
        let shard = occupancy.shard(1);
        let held = &shard[&1];
        assert!(held.families.len() <= MAX_FAMILIES);
        assert_eq!(held.by_last.len(), held.families.len());
        assert!(held.by_birth.len() <= held.families.len());
        // What the backend's tables hold allocated: the map's buckets (a
        // control byte each) and, at most, both ordered sets' entries with
        // a B-tree's slack (nodes of 11 at least half full).
        let entry = size_of::<(u64, Family)>() + 1;
        let ordered = 2 * size_of::<(Instant, u64)>();
        let bytes = held.families.capacity() * 8 / 7 * entry
            + (held.by_last.len() + held.by_birth.len()) * ordered;
        assert!(bytes < 192 * 1024, "{bytes} bytes for one backend");
        // The family in use is among the most recently touched: kept.
        assert_eq!(held.families[&7].bytes, 6_000);
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
                prop_assert_eq!(held.by_last.len(), held.families.len());
                prop_assert_eq!(held.by_birth.len(), held.families.values().filter(|f| f.young).count());
                prop_assert!(held.families.values().all(|f| now.saturating_duration_since(f.last) < IN_USE_FOR));
            }
        }
    }
}
