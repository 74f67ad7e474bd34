//! The decision policy: a pure function of what the index matched, the
//! request's placement hashes and the backends' load.
//!
//! # Load bound
//! A backend's load is `in_flight + waiting`. With `n` candidates and total
//! load `L` (counting the new request), the bound is `ceil((1 + ε) · L / n)`,
//! and never below `ceil(L / n)`. A backend whose load would exceed the bound
//! is never chosen for a session or a placement; since the least-loaded
//! backend is always within `ceil(L / n)`, some backend always qualifies
//! ("consistent hashing with bounded loads", Mirrokni et al.). A
//! continuation may stretch it by what the backend's cached prefix is worth
//! (rule 2).
//!
//! # Order of rules
//! 1. **Session.** A request with a session value goes to the backend with the
//!    highest rendezvous score for that value ([`Reason::Session`]), or, when
//!    that one is over the bound, to the next in rendezvous order
//!    ([`Reason::Overloaded`]).
//! 2. **Continuation.** When the request extends an earlier prompt as a whole
//!    (`extends`: the tutorial's second completion extends its first), or some
//!    backend's matched prefix covers the request's conversation prefix
//!    (`matched ≥ conversation`, see
//!    [`RouteRequest::conversation`](super::RouteRequest::conversation)), the
//!    request continues something the fleet has cached. Each backend whose
//!    load is below `bound + ⌊affinity_weight × matched KiB / load_weight⌋`
//!    (the prefix's worth in requests: recomputing a long prefix elsewhere
//!    costs more than queueing behind a few) scores `affinity_weight ×
//!    matched KiB − load_weight × load`; the best wins, ties broken by
//!    rendezvous score. The reason is
//!    [`Reason::PrefixMatch`] when the winner holds the longest match,
//!    [`Reason::Spread`] when the backends holding it are over the bound (a
//!    hot prefix spills to another backend, preferring one that also holds
//!    some of it, and the index then records the prefix there too), and
//!    [`Reason::LeastLoaded`] when load outweighed a longer match.
//!
//!    Note that at low load the bound is tight: of four backends, the only one
//!    with a request in flight is already at the bound `ceil(1.25 × 2 / 4) =
//!    1`, so a continuation of less than 1 KiB goes elsewhere rather than
//!    queue behind it. Raise ε or the affinity weight to favour affinity.
//! 3. **Placement.** Otherwise the request starts a new conversation. A shared
//!    system prompt (matched, but shorter than the conversation prefix, and
//!    never a whole earlier prompt, since those end in a user turn) is
//!    deliberately *not* followed: every backend caches it after one prefill,
//!    whereas following it would pile all conversations onto one backend. The
//!    request goes to the rendezvous winner of a hash of the model and
//!    `key[..conversation]` (the index's chained block hash, so it costs at
//!    most one block of hashing) over backend names ([`Reason::Placed`]), so
//!    router replicas with no shared state (and the same `--block-bytes`)
//!    place a conversation alike, or to the next in rendezvous
//!    order when the winner is over the load bound or the placement bound
//!    ([`Reason::Overloaded`]).
//!
//! # Placement bound (opt-in)
//! Hashing a few dozen conversations (or system-prompt groups) onto four
//! backends is lumpy: one backend easily gets twice its share, and what it
//! cannot keep in its KV cache it evicts, while another sits half empty.
//! With [`Policy::placement_epsilon`] set, placement also bounds what each
//! backend was recently *given to cache*:
//! [`Inputs::placed`] is the KiB of new conversations placed on each backend,
//! decayed (the router keeps it, see [`super::Router`]). A backend qualifies
//! when, with this request's `weight` added, it stays within
//! `(1 + ε) · (Σ placed + weight) / n`, or is the least placed. The cost is
//! agreement between replicas: each counts only its own placements, so a
//! conversation near the bound may be placed differently by two replicas
//! (with thousands of conversations hashing is even and the bound never
//! binds; with a few it does). Hence off by default: one router per GPU node
//! is this product's shape.
//!
//! A conversation length of 0 means "unknown": any match counts as a
//! continuation, and placement hashes the whole key.
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{BackendLoad, Decision, Reason};

/// The policy's tunables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// ε of the load bound `ceil((1 + ε) · mean load)`; 0 or more.
    pub epsilon: f64,
    /// Score per KiB of matched prompt prefix (prefill saved).
    pub affinity_weight: f64,
    /// Score taken off per request in flight or waiting on a backend.
    pub load_weight: f64,
    /// ε of the placement bound (see the module doc); None: no bound, so
    /// replicas place every new conversation alike.
    pub placement_epsilon: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            epsilon: 0.25,
            affinity_weight: 1.0,
            load_weight: 1.0,
            placement_epsilon: None,
        }
    }
}

/// Everything a decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The candidates, in the caller's order.
    pub backends: &'a [BackendLoad<'a>],
    /// Key bytes matched in the index, per backend (same order, same length).
    pub matched: &'a [usize],
    /// Length of the key prefix naming the conversation (0: unknown).
    pub conversation: usize,
    /// The key extends (or equals) an earlier prompt as a whole.
    pub extends: bool,
    /// Rendezvous seed for placing the conversation.
    pub placement: u64,
    /// Rendezvous seed of the session value, if the request has one.
    pub session: Option<u64>,
    /// Recently placed KiB per backend (same order; empty: no placement
    /// bound). See the module doc.
    pub placed: &'a [f64],
    /// KiB this request adds to its backend's placements if it is placed.
    pub weight: f64,
}

impl Inputs<'_> {
    /// True when the request starts a new conversation (rule 3): no session,
    /// and nothing the fleet holds covers its conversation prefix.
    pub fn is_placement(&self) -> bool {
        let longest = self.matched.iter().copied().max().unwrap_or(0);
        self.session.is_none() && (longest == 0 || (longest < self.conversation && !self.extends))
    }

    /// Whether backend `i` may take one more placement of `self.weight` KiB.
    fn placement_allows(&self, epsilon: f64, i: usize) -> bool {
        let Some(&mine) = self.placed.get(i) else {
            return true;
        };
        let n = self.placed.len() as f64;
        let total: f64 = self.placed.iter().sum::<f64>() + self.weight;
        let least = self.placed.iter().copied().fold(f64::INFINITY, f64::min);
        mine + self.weight <= (1.0 + epsilon.max(0.0)) * total / n || mine <= least
    }
}

/// The highest load a backend may reach by taking one more request, given the
/// loads of all `backends`.
pub fn load_bound(epsilon: f64, backends: &[BackendLoad]) -> usize {
    let n = backends.len().max(1);
    let total = backends
        .iter()
        .fold(1usize, |sum, b| sum.saturating_add(b.load()));
    let even = total.div_ceil(n);
    // Float rounding can only lower this below `even`, which `max` undoes.
    let relaxed = ((1.0 + epsilon.max(0.0)) * total as f64 / n as f64).ceil();
    if relaxed >= usize::MAX as f64 {
        usize::MAX
    } else {
        (relaxed as usize).max(even)
    }
}

/// The rendezvous (highest random weight) score of backend `name` for `seed`.
pub fn rendezvous(name: &str, seed: u64) -> u64 {
    xxh3_64_with_seed(name.as_bytes(), seed)
}

/// Picks a backend; None only when there are no backends.
pub fn choose(policy: &Policy, input: &Inputs) -> Option<Decision> {
    let backends = input.backends;
    let bound = load_bound(policy.epsilon, backends);
    let within = |i: usize| backends[i].load() < bound;
    let decide = |backend: usize, reason| Decision {
        backend,
        matched: input.matched.get(backend).copied().unwrap_or(0),
        reason,
    };
    if let Some(seed) = input.session {
        let (first, pick) = rendezvous_pick(backends, seed, within)?;
        let reason = if first == pick {
            Reason::Session
        } else {
            Reason::Overloaded
        };
        return Some(decide(pick, reason));
    }
    let longest = input.matched.iter().copied().max().unwrap_or(0);
    if input.is_placement() {
        let qualifies = |i: usize| {
            within(i)
                && policy
                    .placement_epsilon
                    .is_none_or(|epsilon| input.placement_allows(epsilon, i))
        };
        let (first, pick) = rendezvous_pick(backends, input.placement, qualifies)?;
        let reason = if first == pick {
            Reason::Placed
        } else {
            Reason::Overloaded
        };
        return Some(decide(pick, reason));
    }
    // A backend may pass the bound by what its cached prefix is worth in
    // load units: recomputing a long prefix elsewhere costs more than
    // queueing behind a few more requests.
    let worth = |i: usize| {
        let kib = input.matched.get(i).copied().unwrap_or(0) as f64 / 1024.0;
        policy.affinity_weight * kib
    };
    let slack = |i: usize| {
        if policy.load_weight > 0.0 {
            (worth(i) / policy.load_weight).floor()
        } else {
            f64::INFINITY
        }
    };
    let keeps = |i: usize| (backends[i].load() as f64) < bound as f64 + slack(i);
    let score = |i: usize| worth(i) - policy.load_weight * backends[i].load() as f64;
    let better = |a: usize, b: usize| {
        score(a).total_cmp(&score(b)).then_with(|| {
            rendezvous(backends[a].name, input.placement)
                .cmp(&rendezvous(backends[b].name, input.placement))
        })
    };
    let pick = (0..backends.len())
        .filter(|&i| keeps(i))
        .max_by(|&a, &b| better(a, b))
        .unwrap_or_else(|| least_loaded(backends));
    let holds_longest = |i: usize| input.matched.get(i).copied() == Some(longest);
    let reason = if holds_longest(pick) {
        Reason::PrefixMatch
    } else if (0..backends.len()).any(|i| holds_longest(i) && !keeps(i)) {
        Reason::Spread
    } else {
        Reason::LeastLoaded
    };
    Some(decide(pick, reason))
}

/// The rendezvous winner for `seed` and the best-scored backend that passes
/// `within`.
fn rendezvous_pick(
    backends: &[BackendLoad],
    seed: u64,
    within: impl Fn(usize) -> bool,
) -> Option<(usize, usize)> {
    let score = |i: usize| rendezvous(backends[i].name, seed);
    let first = (0..backends.len()).max_by_key(|&i| score(i))?;
    if within(first) {
        return Some((first, first));
    }
    let pick = (0..backends.len())
        .filter(|&i| within(i))
        .max_by_key(|&i| score(i))
        .unwrap_or_else(|| least_loaded(backends));
    Some((first, pick))
}

/// The least-loaded backend (first among equals). The load bound always
/// admits it, except when loads near `usize::MAX` saturate the sum; this is
/// the answer then rather than a panic on the request path.
fn least_loaded(backends: &[BackendLoad]) -> usize {
    (0..backends.len())
        .min_by_key(|&i| backends[i].load())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 8] = [
        "http://a:1",
        "http://b:1",
        "http://c:1",
        "http://d:1",
        "http://e:1",
        "http://f:1",
        "http://g:1",
        "http://h:1",
    ];

    fn views(loads: &[(usize, usize)]) -> Vec<BackendLoad<'static>> {
        loads
            .iter()
            .zip(NAMES)
            .map(|(&(in_flight, waiting), name)| BackendLoad {
                name,
                in_flight,
                waiting,
            })
            .collect()
    }

    /// A request with no session and no placement bound; placement seed 7.
    fn inputs<'a>(
        backends: &'a [BackendLoad<'a>],
        matched: &'a [usize],
        conversation: usize,
    ) -> Inputs<'a> {
        Inputs {
            backends,
            matched,
            conversation,
            extends: false,
            placement: 7,
            session: None,
            placed: &[],
            weight: 1.0,
        }
    }

    #[test]
    fn bound_is_ceil_of_relaxed_mean() {
        let v = views(&[(3, 0), (1, 0), (0, 0), (0, 0)]);
        // 5 requests over 4 backends: mean 1.25, × 1.25 = 1.5625 → 2.
        assert_eq!(load_bound(0.25, &v), 2);
        assert_eq!(load_bound(0.0, &v), 2);
        assert_eq!(load_bound(3.0, &v), 5);
        assert_eq!(load_bound(0.25, &views(&[(0, 0), (0, 0)])), 1);
        assert_eq!(
            load_bound(0.25, &views(&[(1, 0), (0, 0), (0, 0), (0, 0)])),
            1
        );
    }

    #[test]
    fn no_backends_no_decision() {
        let input = Inputs {
            backends: &[],
            matched: &[],
            conversation: 0,
            extends: false,
            placement: 1,
            session: Some(2),
            placed: &[],
            weight: 1.0,
        };
        assert_eq!(choose(&Policy::default(), &input), None);
    }

    #[test]
    fn continuation_follows_the_longest_match_when_loads_allow() {
        let v = views(&[(1, 0), (1, 0), (0, 0)]);
        let matched = [0, 8192, 4096];
        let input = inputs(&v, &matched, 100);
        let d = choose(&Policy::default(), &input).unwrap();
        // 8 KiB − 1 request beats 4 KiB − 0.
        assert_eq!(
            (d.backend, d.matched, d.reason),
            (1, 8192, Reason::PrefixMatch)
        );
        // With load weighed 5×, the idle backend holding half wins.
        let heavy = Policy {
            load_weight: 5.0,
            ..Policy::default()
        };
        let d = choose(&heavy, &input).unwrap();
        assert_eq!((d.backend, d.reason), (2, Reason::LeastLoaded));
    }

    #[test]
    fn over_the_bound_the_prefix_spills_to_another_holder() {
        let v = views(&[(6, 2), (1, 0), (1, 0), (0, 0)]);
        let matched = [4096, 2048, 0, 0];
        let input = inputs(&v, &matched, 64);
        let d = choose(&Policy::default(), &input).unwrap();
        assert_eq!((d.backend, d.reason), (1, Reason::Spread));
    }

    #[test]
    fn a_continuation_may_pass_the_bound_by_what_its_match_is_worth() {
        // 4 requests over 4 backends (counting this one): bound 2.
        let v = views(&[(3, 0), (0, 0), (0, 0), (0, 0)]);
        let input = |matched: &'static [usize]| inputs(&v, matched, 100);
        // 4 KiB cached is worth 4 requests: 3 in flight is within 2 + 4.
        let d = choose(&Policy::default(), &input(&[4096, 0, 0, 0])).unwrap();
        assert_eq!((d.backend, d.reason), (0, Reason::PrefixMatch));
        // 1 KiB is worth 1: 3 is not within 2 + 1, so the prefix spills.
        let d = choose(&Policy::default(), &input(&[1024, 0, 0, 0])).unwrap();
        assert_ne!(d.backend, 0);
        assert_eq!(d.reason, Reason::Spread);
    }

    #[test]
    fn placement_skips_a_backend_already_given_more_than_its_share() {
        let v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        // The rendezvous winner of some seed, given twice its share.
        let seed = 11;
        let (winner, _) = rendezvous_pick(&v, seed, |_| true).unwrap();
        let mut placed = [4.0; 4];
        placed[winner] = 8.0;
        let input = Inputs {
            placement: seed,
            placed: &placed,
            weight: 4.0,
            ..inputs(&v, &[0; 4], 0)
        };
        let policy = Policy {
            placement_epsilon: Some(0.25),
            ..Policy::default()
        };
        let d = choose(&policy, &input).unwrap();
        assert_ne!(d.backend, winner);
        assert_eq!(d.reason, Reason::Overloaded);
        // Off by default: the rendezvous winner keeps it.
        let d = choose(&Policy::default(), &input).unwrap();
        assert_eq!((d.backend, d.reason), (winner, Reason::Placed));
        // Within its share, the winner keeps it.
        let mut even = placed;
        even[winner] = 4.0;
        let d = choose(
            &policy,
            &Inputs {
                placed: &even,
                ..input
            },
        )
        .unwrap();
        assert_eq!((d.backend, d.reason), (winner, Reason::Placed));
    }

    #[test]
    fn a_shared_prefix_shorter_than_the_conversation_is_not_followed() {
        let v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let matched = [2048, 0, 0, 0];
        let mut placed = [0; 4];
        for placement in 0..64u64 {
            let input = Inputs {
                placement,
                ..inputs(&v, &matched, 2100)
            };
            let d = choose(&Policy::default(), &input).unwrap();
            assert_eq!(d.reason, Reason::Placed);
            placed[d.backend] += 1;
        }
        assert!(placed.iter().all(|&n| n > 0), "{placed:?}");
    }

    #[test]
    fn session_wins_over_affinity_but_not_over_the_bound() {
        let v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let matched = [9000, 0, 0, 0];
        let seed = (0..)
            .find(|&s| rendezvous_pick(&v, s, |_| true).unwrap().0 != 0)
            .unwrap();
        let input = Inputs {
            placement: 0,
            session: Some(seed),
            ..inputs(&v, &matched, 10)
        };
        let d = choose(&Policy::default(), &input).unwrap();
        assert_eq!(d.reason, Reason::Session);
        assert_ne!(d.backend, 0);
        let mut busy = v.clone();
        busy[d.backend].waiting = 10;
        let input = Inputs {
            backends: &busy,
            ..input
        };
        let again = choose(&Policy::default(), &input).unwrap();
        assert_eq!(again.reason, Reason::Overloaded);
        assert_ne!(again.backend, d.backend);
    }

    proptest! {
        /// Whatever the loads, matches and seeds, the choice respects the bound.
        #[test]
        fn bounded_load_holds(
            loads in prop::collection::vec((0usize..50, 0usize..50), 1..=8),
            matched in prop::collection::vec(0usize..200_000, 8),
            conversation in 0usize..200_000,
            extends in any::<bool>(),
            placement in any::<u64>(),
            session in any::<Option<u64>>(),
            epsilon in 0.0f64..2.0,
            affinity_weight in 0.0f64..100.0,
            load_weight in 0.0f64..10.0,
            placed in prop::collection::vec(0.0f64..1000.0, 8),
            weight in 0.0f64..100.0,
        ) {
            let v = views(&loads);
            let policy = Policy { epsilon, affinity_weight, load_weight, placement_epsilon: Some(epsilon) };
            let input = Inputs {
                backends: &v,
                matched: &matched[..v.len()],
                conversation,
                extends,
                placement,
                session,
                placed: &placed[..v.len()],
                weight,
            };
            let d = choose(&policy, &input).unwrap();
            let total: usize = v.iter().map(BackendLoad::load).sum::<usize>() + 1;
            prop_assert!(v.iter().any(|b| b.load() < load_bound(epsilon, &v)));
            let bound = ((1.0 + epsilon) * total as f64 / v.len() as f64)
                .ceil()
                .max(total.div_ceil(v.len()) as f64);
            // Only a continuation may pass the bound, by its match's worth.
            let continues = !input.is_placement() && session.is_none();
            let slack = match (continues, load_weight > 0.0) {
                (false, _) => 0.0,
                (true, true) => (affinity_weight * matched[d.backend] as f64 / 1024.0 / load_weight).floor(),
                (true, false) => f64::INFINITY,
            };
            prop_assert!((v[d.backend].load() as f64) < bound + slack,
                "{:?} chose load {} with bound {} + {}", d, v[d.backend].load(), bound, slack);
            // A placement respects the placement bound whenever some backend
            // is within both bounds.
            if input.is_placement()
                && (0..v.len()).any(|i| (v[i].load() as f64) < bound && input.placement_allows(epsilon, i))
            {
                prop_assert!(input.placement_allows(epsilon, d.backend), "{:?}", d);
            }
            prop_assert_eq!(d.matched, matched[d.backend]);
            // A pure function: the same inputs give the same answer.
            prop_assert_eq!(choose(&policy, &input), Some(d));
        }
    }
}
