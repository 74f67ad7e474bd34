//! Where each known prefix family lives: a layout that every replica
//! knowing the same families computes alike, under `--placement-epsilon`
//! (even counts) or, for replicas, by room in the engines' KV caches.
//!
//! Hashing a dozen families onto four backends is lumpy (a 4/5/4/3 split
//! of 16 is typical, 7/3/1/1 of 12 happens), and the busiest backend sets
//! the tail, or evicts families its cache cannot hold. A bound on what
//! each backend was given evens that out, but counted in the order one
//! replica happened to see the families it makes replicas disagree. The
//! layout is instead a function of the *set* of families this router knows
//! to be families: seeds whose prefix a later request followed as a
//! sibling ([`Layout::observe`]). They are laid out in order of their
//! placement seed, highest first, each on the first backend in its
//! rendezvous order that the [`Bound`] lets take it:
//!
//! - [`Bound::Even`]: whose count stays within `(1 + ε) · (families laid
//!   out so far + 1) / n`, or that has the fewest;
//! - [`Bound::Room`]: whose KV cache holds the family's shared prefix
//!   beside the families laid there before it, or else the rendezvous
//!   winner. A family that fits where it hashes stays there, so only the
//!   families a lumpy hash piled beyond a cache move, and the lowest
//!   ranked of them.
//!   Caches are weighed at the policy's key bytes per token
//!   (`--bytes-per-token`), not at a ratio learned from an engine's
//!   counters: replicas would each learn theirs at another moment, and
//!   lay the families out differently until the last one had.
//!
//! So:
//!
//! - a family's place depends only on the families ranked above it:
//!   learning one moves only families ranked below it;
//! - replicas that know the same families agree on every place, whatever
//!   order they learned them in;
//! - a seed not known as a family (a new prompt, a one-off) goes where it
//!   would be laid out next among the families ranked above it, and counts
//!   for nobody: one-offs neither disturb the layout nor, by differing
//!   between replicas, make them disagree. With no families known, every
//!   place is the rendezvous winner.
//!
//! The policy sends a new prompt to its place (rule 3), and moves a
//! sibling there from the backend the index knows it on when its place
//! changed (rule 2; see `policy`).
//!
//! Memory is bounded: at most [`CAPACITY`] seeds are kept; when more
//! arrive, the ones not seen in the last `CAPACITY / 2` observations go,
//! and every `CAPACITY` observations those not seen in the last `CAPACITY`
//! go, so a family that stops arriving leaves the layout.
use std::collections::HashMap;

use super::{BackendLoad, index, policy::rendezvous};

/// Seeds kept at most.
pub(crate) const CAPACITY: usize = 1024;
/// Layouts kept at once, one per list of candidate backends: a fleet
/// serving several models asks with a different list for each, and laying
/// out again at every change of model would cost O(families × backends)
/// per request.
const LISTS: usize = 8;

/// What a backend may take in the layout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Bound {
    /// Family counts within `1 + ε` of even (`--placement-epsilon`).
    Even(f64),
    /// Families' key bytes within each backend's KV cache
    /// ([`BackendLoad::cache_tokens`] tokens) at this many key bytes per
    /// token; a backend whose cache size is unknown takes any.
    Room(f64),
}

/// What the layout knows of one seed.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// The observation that last saw it.
    at: u64,
    /// A sibling followed its prefix: it is a family, and laid out.
    family: bool,
    /// What the family takes of a cache under [`Bound::Room`], rounded up
    /// to [`ROOM_GRAIN`]: the longest shared prefix a sibling followed
    /// (before one did, the first request's key). A chat's later turns,
    /// which extend their own conversation, do not count: a system prompt
    /// shared by many long conversations is still its own size.
    bytes: u64,
}

/// Key bytes and cache room are counted in steps of this many bytes, so
/// that replicas that saw a family's siblings of slightly different
/// lengths, or learn a ratio a little apart, still lay it out alike.
const ROOM_GRAIN: u64 = 1024;

/// The families laid out for one list of backends.
#[derive(Debug)]
struct Laid {
    /// The backends it was laid out for, in their order.
    ids: Vec<index::BackendId>,
    /// Each backend's room in key bytes under [`Bound::Room`] (empty
    /// otherwise): what it was laid out for, with `ids`.
    room: Vec<u64>,
    /// Each family's seed, highest first, and its place (position in `ids`).
    places: Vec<(u64, usize)>,
    /// What each backend took after laying out the first `k` of `places`
    /// (families under [`Bound::Even`], key bytes under [`Bound::Room`]):
    /// `taken[k * n..(k + 1) * n]`, `n` backends.
    taken: Vec<u64>,
}

/// The known seeds and, computed when first needed, their layout.
#[derive(Debug)]
pub(crate) struct Layout {
    /// What a backend may take.
    bound: Bound,
    seen: HashMap<u64, Seen>,
    /// How many of `seen` are families.
    families: usize,
    /// Observations so far.
    observations: u64,
    /// The layouts for the lists of backends asked about most recently,
    /// latest first; emptied when the families change.
    laid: Vec<Laid>,
}

impl Layout {
    /// An empty layout bounded by `bound` (a negative ε counts as 0: as
    /// even as counts allow).
    pub(crate) fn new(bound: Bound) -> Self {
        Self {
            bound: match bound {
                Bound::Even(epsilon) => Bound::Even(epsilon.max(0.0)),
                room => room,
            },
            seen: HashMap::new(),
            families: 0,
            observations: 0,
            laid: Vec::new(),
        }
    }

    /// Records a request with placement seed `seed`; `sibling` when it
    /// proved the seed a family (it followed the prefix of another request
    /// as a sibling, or joined one still connecting), and `bytes` the
    /// prefix it shared then (its key, for the seed's first request).
    pub(crate) fn observe(&mut self, seed: u64, sibling: bool, bytes: usize) {
        self.observations += 1;
        let now = self.observations;
        let bytes = grains(bytes as u64);
        let entry = self.seen.entry(seed).or_insert(Seen {
            at: now,
            family: false,
            bytes,
        });
        entry.at = now;
        if sibling && !entry.family {
            entry.family = true;
            entry.bytes = bytes;
            self.families += 1;
            self.laid.clear();
        } else if sibling && bytes > entry.bytes {
            entry.bytes = bytes;
            if matches!(self.bound, Bound::Room(_)) {
                self.laid.clear();
            }
        }
        let cap = CAPACITY as u64;
        let horizon = if self.seen.len() > CAPACITY {
            cap / 2
        } else if now.is_multiple_of(cap) {
            cap
        } else {
            return;
        };
        let before = self.families;
        self.seen.retain(|_, seen| seen.at + horizon > now);
        self.families = self.seen.values().filter(|seen| seen.family).count();
        if self.families != before {
            self.laid.clear();
        }
    }

    /// The place of seed `seed`, for a key of `bytes`, among `backends` (a
    /// position), or None when no family is known: the rendezvous winner
    /// is the place then.
    pub(crate) fn place(
        &mut self,
        seed: u64,
        bytes: usize,
        backends: &[BackendLoad],
    ) -> Option<usize> {
        if backends.is_empty() || self.families == 0 {
            return None;
        }
        let ids = backends.iter().map(|b| index::backend_id(b.name));
        // Compared in place: a layout is found far more often than made.
        let room = backends.iter().filter_map(|b| self.room(b));
        match self.laid.iter().position(|laid| {
            laid.ids.iter().copied().eq(ids.clone()) && laid.room.iter().copied().eq(room.clone())
        }) {
            Some(at) => self.laid[..=at].rotate_right(1),
            None => {
                let laid = self.lay_out(backends, room.collect());
                self.laid.truncate(LISTS - 1);
                self.laid.insert(0, laid);
            }
        }
        let laid = self.laid.first()?;
        // Families ranked above `seed` (higher seeds) come first.
        let above = laid.places.partition_point(|&(s, _)| s > seed);
        if let Some(&(s, place)) = laid.places.get(above)
            && s == seed
        {
            return Some(place);
        }
        let n = backends.len();
        let taken = &laid.taken[above * n..(above + 1) * n];
        Some(self.next_place(seed, grains(bytes as u64), backends, taken, &laid.room))
    }

    /// Backend `b`'s room in key bytes under [`Bound::Room`] (`u64::MAX`
    /// where its cache size is unknown); None under [`Bound::Even`].
    fn room(&self, b: &BackendLoad) -> Option<u64> {
        let Bound::Room(bytes_per_token) = self.bound else {
            return None;
        };
        let bytes = b.cache_tokens as f64 * bytes_per_token;
        Some(if b.cache_tokens == 0 || bytes >= u64::MAX as f64 {
            u64::MAX
        } else {
            // Finite, not negative, below u64::MAX.
            let bytes = bytes.max(0.0) as u64;
            bytes / ROOM_GRAIN * ROOM_GRAIN
        })
    }

    /// Lays the known families out over `backends`, whose room is `room`.
    fn lay_out(&self, backends: &[BackendLoad], room: Vec<u64>) -> Laid {
        let mut seeds: Vec<(u64, u64)> = self
            .seen
            .iter()
            .filter(|(_, seen)| seen.family)
            .map(|(&seed, seen)| (seed, seen.bytes))
            .collect();
        seeds.sort_unstable_by_key(|&(seed, _)| std::cmp::Reverse(seed));
        let n = backends.len();
        let mut taken = vec![0u64; n * (seeds.len() + 1)];
        let mut places = Vec::with_capacity(seeds.len());
        for (k, (seed, bytes)) in seeds.into_iter().enumerate() {
            let (done, next) = taken.split_at_mut((k + 1) * n);
            let now = &done[k * n..];
            let place = self.next_place(seed, bytes, backends, now, &room);
            next[..n].copy_from_slice(now);
            next[place] = next[place].saturating_add(match self.bound {
                Bound::Even(_) => 1,
                Bound::Room(_) => bytes,
            });
            places.push((seed, place));
        }
        Laid {
            ids: backends.iter().map(|b| index::backend_id(b.name)).collect(),
            room,
            places,
            taken,
        }
    }

    /// Where `seed`, whose key takes `bytes`, goes given what each backend
    /// took already: the first backend in its rendezvous order that the
    /// bound lets take it; failing that, under [`Bound::Even`] the first
    /// with the fewest, under [`Bound::Room`] the rendezvous winner.
    fn next_place(
        &self,
        seed: u64,
        bytes: u64,
        backends: &[BackendLoad],
        taken: &[u64],
        room: &[u64],
    ) -> usize {
        let rank = |&i: &usize| rendezvous(backends[i].name, seed);
        let all = 0..backends.len();
        match self.bound {
            Bound::Even(epsilon) => {
                let total: u64 = taken.iter().sum();
                let fewest = taken.iter().copied().min().unwrap_or(0);
                let limit = (1.0 + epsilon) * (total + 1) as f64 / backends.len() as f64;
                all.filter(|&i| (taken[i] + 1) as f64 <= limit || taken[i] == fewest)
                    .max_by_key(rank)
            }
            Bound::Room(_) => all
                .clone()
                .filter(|&i| taken[i].saturating_add(bytes) <= room[i])
                .max_by_key(rank)
                .or_else(|| all.max_by_key(rank)),
        }
        .unwrap_or(0)
    }
}

/// `bytes` rounded up to whole [`ROOM_GRAIN`]s.
fn grains(bytes: u64) -> u64 {
    bytes.div_ceil(ROOM_GRAIN).saturating_mul(ROOM_GRAIN)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 4] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];

    /// Key bytes of one request in these tests (6 KiB once rounded).
    const KEY: usize = 6_000;

    fn idle() -> Vec<BackendLoad<'static>> {
        NAMES.iter().map(|name| BackendLoad::new(name, 0)).collect()
    }

    /// Backends whose KV caches each hold `families` keys of [`KEY`] bytes
    /// at 4 key bytes per token.
    fn holding(families: usize) -> Vec<BackendLoad<'static>> {
        let tokens = families * grains(KEY as u64) as usize / 4;
        idle()
            .into_iter()
            .map(|b| b.with_cache_tokens(tokens))
            .collect()
    }

    /// Seeds from a fixed sequence, `wanted[i]` of them hashing onto
    /// backend `i`.
    fn hashing(wanted: [usize; 4]) -> Vec<u64> {
        let mut left = wanted;
        let mut seeds = Vec::new();
        for i in 0..10_000u64 {
            let seed = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let winner = rendezvous_winner(seed);
            if left[winner] > 0 {
                left[winner] -= 1;
                seeds.push(seed);
            }
        }
        assert_eq!(left, [0; 4], "the sequence hashes onto every backend");
        seeds
    }

    /// A layout that knows `seeds` as families, learned in their order.
    fn knowing(seeds: &[u64]) -> Layout {
        let mut layout = Layout::new(Bound::Even(0.0));
        for &seed in seeds {
            layout.observe(seed, false, KEY);
            layout.observe(seed, true, KEY);
        }
        layout
    }

    /// Families per backend of `seeds` laid out by `layout`.
    fn spread(layout: &mut Layout, seeds: &[u64]) -> [usize; 4] {
        let mut per = [0; 4];
        for &seed in seeds {
            per[layout.place(seed, KEY, &idle()).unwrap()] += 1;
        }
        per
    }

    fn rendezvous_winner(seed: u64) -> usize {
        (0..4).max_by_key(|&i| rendezvous(NAMES[i], seed)).unwrap()
    }

    #[test]
    fn with_no_family_known_the_rendezvous_winner_places() {
        let mut layout = Layout::new(Bound::Even(0.0));
        // Seen once each: one-offs, not families.
        for seed in 0..100 {
            layout.observe(seed, false, KEY);
        }
        assert_eq!(layout.place(7, KEY, &idle()), None);
        // Once one family is known, it and everything else still go to
        // their rendezvous winners (nothing is over the bound yet).
        layout.observe(7, true, KEY);
        assert_eq!(layout.place(7, KEY, &idle()), Some(rendezvous_winner(7)));
    }

    #[test]
    fn sixteen_families_lie_four_to_a_backend() {
        // Rendezvous alone splits these lumpily; the layout does not.
        let seeds: Vec<u64> = (0..16u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut lumpy = [0; 4];
        for &seed in &seeds {
            lumpy[rendezvous_winner(seed)] += 1;
        }
        assert_ne!(lumpy, [4; 4], "pick seeds that hash lumpily");
        assert_eq!(spread(&mut knowing(&seeds), &seeds), [4; 4]);
    }

    #[test]
    fn one_offs_do_not_move_the_families() {
        let seeds: Vec<u64> = (0..12u64)
            .map(|i| i.wrapping_mul(0x2545_f491_4f6c_dd1d))
            .collect();
        let mut layout = knowing(&seeds);
        let before: Vec<_> = seeds
            .iter()
            .map(|&s| layout.place(s, KEY, &idle()))
            .collect();
        for one_off in 1000..1500 {
            layout.observe(one_off, false, KEY);
            layout.place(one_off, KEY, &idle());
        }
        let after: Vec<_> = seeds
            .iter()
            .map(|&s| layout.place(s, KEY, &idle()))
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_new_family_moves_only_families_ranked_below_it() {
        let seeds: Vec<u64> = (1..=12).map(|i| i * 0x1234_5678_9abc_def1).collect();
        let mut layout = knowing(&seeds);
        let before: Vec<_> = seeds
            .iter()
            .map(|&s| layout.place(s, KEY, &idle()))
            .collect();
        let newcomer = 6 * 0x1234_5678_9abc_def1 + 1;
        layout.observe(newcomer, true, KEY);
        for (&seed, place) in seeds.iter().zip(before) {
            if seed > newcomer {
                assert_eq!(layout.place(seed, KEY, &idle()), place, "{seed}");
            }
        }
    }

    #[test]
    fn the_layout_follows_the_backend_list() {
        let seeds: Vec<u64> = (0..8u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let mut layout = knowing(&seeds);
        let three: Vec<_> = idle().into_iter().take(3).collect();
        for &seed in &seeds {
            assert!(layout.place(seed, KEY, &three).unwrap() < 3);
        }
        // Listed in another order, each family keeps its backend (by name).
        let mut reversed = idle();
        reversed.reverse();
        for &seed in &seeds {
            let here = layout.place(seed, KEY, &idle()).unwrap();
            let there = layout.place(seed, KEY, &reversed).unwrap();
            assert_eq!(NAMES[here], reversed[there].name);
        }
        // Both orders stay laid out (a fleet of two models asks by turns),
        // and no more than `LISTS` lists are kept.
        assert_eq!(layout.laid.len(), 3);
        for subset in 1..16usize {
            let some: Vec<_> = idle()
                .into_iter()
                .enumerate()
                .filter(|(i, _)| subset & (1 << i) != 0)
                .map(|(_, b)| b)
                .collect();
            layout.place(seeds[0], KEY, &some);
        }
        assert_eq!(layout.laid.len(), LISTS);
    }

    #[test]
    fn memory_stays_bounded_and_idle_families_leave() {
        let mut layout = knowing(&[42]);
        for one_off in 0..(20 * CAPACITY as u64) {
            layout.observe(one_off + 1000, false, KEY);
            assert!(layout.seen.len() <= CAPACITY + 1);
        }
        assert_eq!(layout.families, 0, "a family not seen for long stays");
        assert_eq!(layout.place(42, KEY, &idle()), None);
    }

    #[test]
    fn by_room_only_the_families_a_cache_cannot_hold_move() {
        // Twelve families hashing 6/2/2/2 onto caches of four each.
        let seeds = hashing([6, 2, 2, 2]);
        let mut layout = Layout::new(Bound::Room(4.0));
        for &seed in &seeds {
            layout.observe(seed, true, KEY);
        }
        let backends = holding(4);
        let place = |layout: &mut Layout, seed| layout.place(seed, KEY, &backends).unwrap();
        let mut per = [0; 4];
        for &seed in &seeds {
            per[place(&mut layout, seed)] += 1;
        }
        assert!(per.iter().all(|&n| n <= 4), "{per:?}");
        // Families hashing where there is room stay there, and of the six
        // on the first backend the four ranked highest (highest seeds).
        let mut crowded: Vec<u64> = seeds
            .iter()
            .copied()
            .filter(|&s| rendezvous_winner(s) == 0)
            .collect();
        crowded.sort_unstable_by(|a, b| b.cmp(a));
        for &seed in &seeds {
            let stays = rendezvous_winner(seed) != 0 || crowded[..4].contains(&seed);
            assert_eq!(
                place(&mut layout, seed) == rendezvous_winner(seed),
                stays,
                "{seed}"
            );
        }
        // A new prompt goes where it fits after the families above it.
        let newcomer = crowded[5] - 1;
        assert_ne!(place(&mut layout, newcomer), 0);
        // Where no cache size is known, everything stays where it hashes.
        for &seed in &seeds {
            assert_eq!(
                layout.place(seed, KEY, &idle()),
                Some(rendezvous_winner(seed))
            );
        }
        // Caches twice as large hold them where they hash; so does a
        // layout at twice the bytes per token. A ratio one router learned
        // from an engine's counters is not used: replicas would each
        // learn theirs at another moment.
        for &seed in &seeds {
            assert_eq!(
                layout.place(seed, KEY, &holding(8)),
                Some(rendezvous_winner(seed))
            );
        }
        let mut denser = Layout::new(Bound::Room(8.0));
        for &seed in &seeds {
            denser.observe(seed, true, KEY);
        }
        let learned: Vec<_> = holding(4)
            .into_iter()
            .map(|b| b.with_bytes_per_token(8.0))
            .collect();
        for &seed in &seeds {
            assert_eq!(
                denser.place(seed, KEY, &backends),
                Some(rendezvous_winner(seed))
            );
            let stays = rendezvous_winner(seed) != 0 || crowded[..4].contains(&seed);
            assert_eq!(
                layout.place(seed, KEY, &learned) == Some(rendezvous_winner(seed)),
                stays
            );
        }
    }

    #[test]
    fn by_room_a_family_whose_shared_prefix_grew_is_laid_out_again() {
        let seeds = hashing([3, 1, 1, 1]);
        let mut layout = Layout::new(Bound::Room(4.0));
        for &seed in &seeds {
            layout.observe(seed, true, KEY);
        }
        let backends = holding(3);
        let stayed = seeds
            .iter()
            .filter(|&&s| layout.place(s, KEY, &backends) == Some(rendezvous_winner(s)))
            .count();
        assert_eq!(stayed, 6, "three families fit each cache");
        let mut crowded: Vec<u64> = seeds
            .iter()
            .copied()
            .filter(|&s| rendezvous_winner(s) == 0)
            .collect();
        crowded.sort_unstable();
        // Long requests that only extend their own conversation (a chat's
        // later turns under a family's system prompt) change nothing.
        for &seed in &seeds {
            layout.observe(seed, false, 20 * KEY);
        }
        let before: Vec<_> = seeds
            .iter()
            .map(|&s| layout.place(s, KEY, &backends))
            .collect();
        assert!(
            before
                .iter()
                .zip(&seeds)
                .all(|(&p, &s)| p == Some(rendezvous_winner(s)))
        );
        // A sibling shows the lowest ranked family on the first backend
        // sharing twice as long a prefix: it no longer fits beside the
        // other two.
        layout.observe(crowded[0], true, 2 * KEY);
        assert_ne!(layout.place(crowded[0], 2 * KEY, &backends), Some(0));
        assert_eq!(layout.place(crowded[1], KEY, &backends), Some(0));
    }

    proptest! {
        #[test]
        fn replicas_that_know_the_same_families_agree(
            seeds in prop::collection::hash_set(any::<u64>(), 1..40),
            epsilon in 0.0f64..1.0,
            probe in any::<u64>(),
        ) {
            let seeds: Vec<u64> = seeds.into_iter().collect();
            let mut reversed = seeds.clone();
            reversed.reverse();
            let learn = |order: &[u64]| {
                let mut layout = Layout::new(Bound::Even(epsilon));
                for &seed in order {
                    layout.observe(seed, true, KEY);
                }
                layout
            };
            let (mut a, mut b) = (learn(&seeds), learn(&reversed));
            for &seed in seeds.iter().chain([&probe]) {
                prop_assert_eq!(a.place(seed, KEY, &idle()), b.place(seed, KEY, &idle()));
            }
            // And no backend holds more than the bound allows.
            let per = spread(&mut a, &seeds);
            let most = per.iter().max().copied().unwrap_or(0) as f64;
            let allowed = ((1.0 + epsilon) * seeds.len() as f64 / 4.0).ceil().max(seeds.len().div_ceil(4) as f64);
            prop_assert!(most <= allowed, "{:?} over {}", per, allowed);
        }

        #[test]
        fn by_room_replicas_that_know_the_same_families_agree(
            seeds in prop::collection::hash_map(any::<u64>(), 1..40_000usize, 1..40),
            families in 1..8usize,
            probe in any::<u64>(),
        ) {
            let seeds: Vec<(u64, usize)> = seeds.into_iter().collect();
            let mut reversed = seeds.clone();
            reversed.reverse();
            // Each replica sees a family's first request, then siblings
            // sharing a little less and the whole prefix in its own order,
            // and a long later turn of a conversation under it.
            let learn = |order: &[(u64, usize)], shorter_first: bool| {
                let mut layout = Layout::new(Bound::Room(4.0));
                for &(seed, bytes) in order {
                    let siblings = [bytes.saturating_sub(100), bytes];
                    let (one, two) = if shorter_first {
                        (siblings[0], siblings[1])
                    } else {
                        (siblings[1], siblings[0])
                    };
                    layout.observe(seed, false, bytes + 50);
                    layout.observe(seed, true, one);
                    layout.observe(seed, true, two);
                    layout.observe(seed, false, 10 * bytes);
                }
                layout
            };
            let (mut a, mut b) = (learn(&seeds, true), learn(&reversed, false));
            let backends = holding(families);
            for &(seed, bytes) in seeds.iter().chain([&(probe, KEY)]) {
                prop_assert_eq!(a.place(seed, bytes, &backends), b.place(seed, bytes, &backends));
            }
        }
    }
}
