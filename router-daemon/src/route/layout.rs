//! Where each known prefix family lives under `--placement-epsilon`: an
//! even layout that every replica knowing the same families computes alike.
//!
//! Hashing a dozen families onto four backends is lumpy (a 4/5/4/3 split
//! of 16 is typical), and the busiest backend sets the tail. A bound on
//! what each backend was given evens that out, but counted in the order one
//! replica happened to see the families it makes replicas disagree. The
//! layout is instead a function of the *set* of families this router knows
//! to be families: seeds whose prefix a later request followed as a
//! sibling ([`Layout::observe`]). They are laid out in order of their
//! placement seed, highest first, each on the first backend in its
//! rendezvous order whose count stays within `(1 + ε) · (families laid out
//! so far + 1) / n`, or that has the fewest. So:
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

/// What the layout knows of one seed.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// The observation that last saw it.
    at: u64,
    /// A sibling followed its prefix: it is a family, and laid out.
    family: bool,
}

/// The families laid out for one list of backends.
#[derive(Debug)]
struct Laid {
    /// The backends it was laid out for, in their order.
    ids: Vec<index::BackendId>,
    /// Each family's seed, highest first, and its place (position in `ids`).
    places: Vec<(u64, usize)>,
    /// Families per backend after laying out the first `k` of `places`:
    /// `counts[k * n..(k + 1) * n]`, `n` backends.
    counts: Vec<u32>,
}

/// The known seeds and, computed when first needed, their layout.
#[derive(Debug)]
pub(crate) struct Layout {
    /// ε of the layout's bound.
    epsilon: f64,
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
    /// An empty layout with slack `epsilon` (0: as even as counts allow).
    pub(crate) fn new(epsilon: f64) -> Self {
        Self {
            epsilon: epsilon.max(0.0),
            seen: HashMap::new(),
            families: 0,
            observations: 0,
            laid: Vec::new(),
        }
    }

    /// Records a request with placement seed `seed`; `sibling` when it
    /// proved the seed a family (it followed the prefix of another request
    /// as a sibling, or joined one still connecting).
    pub(crate) fn observe(&mut self, seed: u64, sibling: bool) {
        self.observations += 1;
        let now = self.observations;
        let entry = self.seen.entry(seed).or_insert(Seen {
            at: now,
            family: false,
        });
        entry.at = now;
        if sibling && !entry.family {
            entry.family = true;
            self.families += 1;
            self.laid.clear();
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

    /// The place of seed `seed` among `backends` (a position), or None
    /// when no family is known: the rendezvous winner is the place then.
    pub(crate) fn place(&mut self, seed: u64, backends: &[BackendLoad]) -> Option<usize> {
        if backends.is_empty() || self.families == 0 {
            return None;
        }
        let ids = backends.iter().map(|b| index::backend_id(b.name));
        match self
            .laid
            .iter()
            .position(|laid| laid.ids.iter().copied().eq(ids.clone()))
        {
            Some(at) => self.laid[..=at].rotate_right(1),
            None => {
                let laid = self.lay_out(backends);
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
        Some(self.next_place(seed, backends, &laid.counts[above * n..(above + 1) * n]))
    }

    /// Lays the known families out over `backends`.
    fn lay_out(&self, backends: &[BackendLoad]) -> Laid {
        let mut seeds: Vec<u64> = self
            .seen
            .iter()
            .filter(|(_, seen)| seen.family)
            .map(|(&seed, _)| seed)
            .collect();
        seeds.sort_unstable_by(|a, b| b.cmp(a));
        let n = backends.len();
        let mut counts = vec![0u32; n * (seeds.len() + 1)];
        let mut places = Vec::with_capacity(seeds.len());
        for (k, seed) in seeds.into_iter().enumerate() {
            let (done, next) = counts.split_at_mut((k + 1) * n);
            let now = &done[k * n..];
            let place = self.next_place(seed, backends, now);
            next[..n].copy_from_slice(now);
            next[place] += 1;
            places.push((seed, place));
        }
        Laid {
            ids: backends.iter().map(|b| index::backend_id(b.name)).collect(),
            places,
            counts,
        }
    }

    /// Where `seed` goes given `counts` families per backend: the first
    /// backend in its rendezvous order within the bound, or with the fewest.
    fn next_place(&self, seed: u64, backends: &[BackendLoad], counts: &[u32]) -> usize {
        let total: u32 = counts.iter().sum();
        let fewest = counts.iter().copied().min().unwrap_or(0);
        let limit = (1.0 + self.epsilon) * f64::from(total + 1) / backends.len() as f64;
        (0..backends.len())
            .filter(|&i| f64::from(counts[i] + 1) <= limit || counts[i] == fewest)
            .max_by_key(|&i| rendezvous(backends[i].name, seed))
            .unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 4] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];

    fn idle() -> Vec<BackendLoad<'static>> {
        NAMES.iter().map(|name| BackendLoad::new(name, 0)).collect()
    }

    /// A layout that knows `seeds` as families, learned in their order.
    fn knowing(seeds: &[u64]) -> Layout {
        let mut layout = Layout::new(0.0);
        for &seed in seeds {
            layout.observe(seed, false);
            layout.observe(seed, true);
        }
        layout
    }

    /// Families per backend of `seeds` laid out by `layout`.
    fn spread(layout: &mut Layout, seeds: &[u64]) -> [usize; 4] {
        let mut per = [0; 4];
        for &seed in seeds {
            per[layout.place(seed, &idle()).unwrap()] += 1;
        }
        per
    }

    fn rendezvous_winner(seed: u64) -> usize {
        (0..4).max_by_key(|&i| rendezvous(NAMES[i], seed)).unwrap()
    }

    #[test]
    fn with_no_family_known_the_rendezvous_winner_places() {
        let mut layout = Layout::new(0.0);
        // Seen once each: one-offs, not families.
        for seed in 0..100 {
            layout.observe(seed, false);
        }
        assert_eq!(layout.place(7, &idle()), None);
        // Once one family is known, it and everything else still go to
        // their rendezvous winners (nothing is over the bound yet).
        layout.observe(7, true);
        assert_eq!(layout.place(7, &idle()), Some(rendezvous_winner(7)));
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
        let before: Vec<_> = seeds.iter().map(|&s| layout.place(s, &idle())).collect();
        for one_off in 1000..1500 {
            layout.observe(one_off, false);
            layout.place(one_off, &idle());
        }
        let after: Vec<_> = seeds.iter().map(|&s| layout.place(s, &idle())).collect();
        assert_eq!(before, after);
    }

    #[test]
    fn a_new_family_moves_only_families_ranked_below_it() {
        let seeds: Vec<u64> = (1..=12).map(|i| i * 0x1234_5678_9abc_def1).collect();
        let mut layout = knowing(&seeds);
        let before: Vec<_> = seeds.iter().map(|&s| layout.place(s, &idle())).collect();
        let newcomer = 6 * 0x1234_5678_9abc_def1 + 1;
        layout.observe(newcomer, true);
        for (&seed, place) in seeds.iter().zip(before) {
            if seed > newcomer {
                assert_eq!(layout.place(seed, &idle()), place, "{seed}");
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
            assert!(layout.place(seed, &three).unwrap() < 3);
        }
        // Listed in another order, each family keeps its backend (by name).
        let mut reversed = idle();
        reversed.reverse();
        for &seed in &seeds {
            let here = layout.place(seed, &idle()).unwrap();
            let there = layout.place(seed, &reversed).unwrap();
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
            layout.place(seeds[0], &some);
        }
        assert_eq!(layout.laid.len(), LISTS);
    }

    #[test]
    fn memory_stays_bounded_and_idle_families_leave() {
        let mut layout = knowing(&[42]);
        for one_off in 0..(20 * CAPACITY as u64) {
            layout.observe(one_off + 1000, false);
            assert!(layout.seen.len() <= CAPACITY + 1);
        }
        assert_eq!(layout.families, 0, "a family not seen for long stays");
        assert_eq!(layout.place(42, &idle()), None);
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
                let mut layout = Layout::new(epsilon);
                for &seed in order {
                    layout.observe(seed, true);
                }
                layout
            };
            let (mut a, mut b) = (learn(&seeds), learn(&reversed));
            for &seed in seeds.iter().chain([&probe]) {
                prop_assert_eq!(a.place(seed, &idle()), b.place(seed, &idle()));
            }
            // And no backend holds more than the bound allows.
            let per = spread(&mut a, &seeds);
            let most = per.iter().max().copied().unwrap_or(0) as f64;
            let allowed = ((1.0 + epsilon) * seeds.len() as f64 / 4.0).ceil().max(seeds.len().div_ceil(4) as f64);
            prop_assert!(most <= allowed, "{:?} over {}", per, allowed);
        }
    }
}
