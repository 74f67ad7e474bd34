//! Backend selection by prompt-prefix affinity.
//!
//! # The prefix index
//! A prompt key (see [`crate::prompt`]) is cut into blocks of `block` bytes.
//! Each block boundary gets a chained hash, `h(k) = xxh3(block k, seed =
//! h(k-1))`, with `h(0)` derived from the model name, so equal prefixes of the
//! same model share hashes and different models never do. The index maps
//! each boundary hash to the backend that last received a prompt through it.
//!
//! Prompts rarely end on a boundary, and short prompts (the tutorial's are 30
//! and 58 bytes) may not reach one. So a prompt that ends `t` bytes past its
//! last boundary also stores a *tail* hash of those `t` bytes, and marks `t`
//! in that boundary's tail bitmap. A lookup follows boundaries while they
//! match, then tries only the tail lengths marked at the deepest match. A
//! prompt that extends an earlier prompt of any length therefore finds it,
//! at a cost of O(prompt length) hashing and O(blocks) map probes.
//!
//! Memory is bounded by two generations of at most `capacity / 2` entries:
//! when the young one fills, the old one is dropped and the young one ages.
//! A hit in the old generation is copied to the young one, so entries in use
//! survive and idle ones age out (an approximate LRU with O(1) upkeep).
//!
//! # Selection
//! [`Router::route`] is the policy: the longest known prefix wins; a prompt
//! with none goes to the least-loaded backend, ties broken by rendezvous
//! hashing of the prompt, so idle routers place the same prompt alike.
use std::{collections::HashMap, sync::Mutex};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Largest block size: tail lengths are kept in a 64-bit map.
pub const MAX_BLOCK: usize = 64;
/// Salt that keeps tail hashes apart from boundary hashes.
const TAIL_SALT: u64 = 0x7461_696c_5f68_6173;

/// What the index knows about one boundary or tail hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Index of the backend that last received a prompt through here.
    backend: u32,
    /// Bit `t` is set when some prompt ended `t` bytes past this boundary.
    tails: u64,
}

/// Prefix hashes of recent prompts, bounded in memory.
#[derive(Debug)]
pub struct PrefixIndex {
    block: usize,
    generation_cap: usize,
    young: HashMap<u64, Entry>,
    old: HashMap<u64, Entry>,
}

/// The longest known prefix of a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Length of the matched prefix in key bytes.
    pub len: usize,
    /// Backend index that last received that prefix.
    pub backend: usize,
}

impl PrefixIndex {
    /// An empty index with `block`-byte blocks and at most `capacity` entries.
    ///
    /// # Panics
    /// If `block` is 0 or over [`MAX_BLOCK`]; the CLI rejects such values.
    pub fn new(block: usize, capacity: usize) -> Self {
        assert!(
            (1..=MAX_BLOCK).contains(&block),
            "invariant: block size is validated by the CLI"
        );
        Self {
            block,
            generation_cap: (capacity / 2).max(1),
            young: HashMap::new(),
            old: HashMap::new(),
        }
    }

    /// Number of entries held (both generations).
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    /// True when the index holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The longest prefix of `key` that an earlier [`insert`](Self::insert) saw.
    pub fn longest_match(&mut self, model: &[u8], key: &[u8]) -> Option<PrefixMatch> {
        let mut hash = xxh3_64(model);
        let mut entry = self.get(hash)?;
        let mut depth = 0;
        let mut best = None;
        for chunk in key.chunks_exact(self.block) {
            let next = xxh3_64_with_seed(chunk, hash);
            let Some(found) = self.get(next) else { break };
            hash = next;
            entry = found;
            depth += self.block;
            best = Some(PrefixMatch {
                len: depth,
                backend: entry.backend as usize,
            });
        }
        let rest = &key[depth..];
        let mut tails = entry.tails;
        while tails != 0 {
            let t = (u64::BITS - 1 - tails.leading_zeros()) as usize;
            tails &= !(1 << t);
            if t > rest.len() {
                continue;
            }
            if let Some(tail) = self.get(xxh3_64_with_seed(&rest[..t], hash ^ TAIL_SALT)) {
                return Some(PrefixMatch {
                    len: depth + t,
                    backend: tail.backend as usize,
                });
            }
        }
        best
    }

    /// Records that `key` (for `model`) was sent to `backend`.
    pub fn insert(&mut self, model: &[u8], key: &[u8], backend: usize) {
        let backend = u32::try_from(backend).expect("invariant: backend count fits in u32");
        let mut hash = xxh3_64(model);
        self.upsert(hash, backend, 0);
        let mut chunks = key.chunks_exact(self.block);
        for chunk in chunks.by_ref() {
            hash = xxh3_64_with_seed(chunk, hash);
            self.upsert(hash, backend, 0);
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            self.upsert(hash, backend, 1 << tail.len());
            self.upsert(xxh3_64_with_seed(tail, hash ^ TAIL_SALT), backend, 0);
        }
    }

    fn get(&mut self, hash: u64) -> Option<Entry> {
        if let Some(entry) = self.young.get(&hash) {
            return Some(*entry);
        }
        let entry = self.old.remove(&hash)?;
        self.put_young(hash, entry);
        Some(entry)
    }

    fn upsert(&mut self, hash: u64, backend: u32, tails: u64) {
        let mut entry = self
            .young
            .get(&hash)
            .or_else(|| self.old.get(&hash))
            .copied()
            .unwrap_or_default();
        entry.backend = backend;
        entry.tails |= tails;
        self.old.remove(&hash);
        self.put_young(hash, entry);
    }

    fn put_young(&mut self, hash: u64, entry: Entry) {
        if self.young.len() >= self.generation_cap && !self.young.contains_key(&hash) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(hash, entry);
    }
}

/// Why a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The prompt extends a prefix last sent to this backend.
    PrefixMatch,
    /// No known prefix: least in-flight, ties by rendezvous hash.
    LeastLoaded,
}

impl Reason {
    /// Short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::PrefixMatch => "prefix-match",
            Reason::LeastLoaded => "least-loaded",
        }
    }
}

/// A routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index of the chosen backend.
    pub backend: usize,
    /// Bytes of the prompt key matched in the index (0 without a match).
    pub matched: usize,
    /// Why this backend.
    pub reason: Reason,
}

/// What routing sees of one backend.
#[derive(Clone, Copy, Debug)]
pub struct BackendView<'a> {
    /// Stable name, for rendezvous hashing.
    pub name: &'a str,
    /// Requests in flight.
    pub in_flight: usize,
}

/// The routing policy and its state.
#[derive(Debug)]
pub struct Router {
    index: Mutex<PrefixIndex>,
}

impl Router {
    /// A router with an empty index.
    pub fn new(block: usize, capacity: usize) -> Self {
        Self {
            index: Mutex::new(PrefixIndex::new(block, capacity)),
        }
    }

    /// Picks a backend for `key` and records the choice in the index.
    ///
    /// Returns `None` only when `backends` is empty.
    pub fn route(&self, model: &[u8], key: &[u8], backends: &[BackendView]) -> Option<Decision> {
        let mut index = self
            .index
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let decision = match index.longest_match(model, key) {
            Some(found) if found.backend < backends.len() => Decision {
                backend: found.backend,
                matched: found.len,
                reason: Reason::PrefixMatch,
            },
            _ => Decision {
                backend: least_loaded(xxh3_64_with_seed(key, xxh3_64(model)), backends)?,
                matched: 0,
                reason: Reason::LeastLoaded,
            },
        };
        index.insert(model, key, decision.backend);
        Some(decision)
    }

    /// Entries held by the prefix index.
    pub fn index_len(&self) -> usize {
        self.index
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .len()
    }
}

/// The backend with the fewest requests in flight; among equals, the one with
/// the highest rendezvous score for `key_hash`.
pub fn least_loaded(key_hash: u64, backends: &[BackendView]) -> Option<usize> {
    backends
        .iter()
        .enumerate()
        .min_by_key(|(_, backend)| {
            let score = xxh3_64_with_seed(backend.name.as_bytes(), key_hash);
            (backend.in_flight, std::cmp::Reverse(score))
        })
        .map(|(index, _)| index)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MODEL: &[u8] = b"meta-llama/Llama-3.2-1B-Instruct";

    fn idle(n: usize) -> Vec<BackendView<'static>> {
        const NAMES: [&str; 4] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];
        NAMES[..n]
            .iter()
            .map(|name| BackendView { name, in_flight: 0 })
            .collect()
    }

    #[test]
    fn tutorial_second_prompt_follows_the_first() {
        let router = Router::new(16, 1 << 16);
        let first = router
            .route(MODEL, b"What is the capital of France?", &idle(2))
            .unwrap();
        assert_eq!(first.reason, Reason::LeastLoaded);
        let mut busy = idle(2);
        // Even when the first backend is now busier, affinity wins.
        busy[first.backend].in_flight = 1;
        let second = router
            .route(
                MODEL,
                b"What is the capital of France? And what is its population?",
                &busy,
            )
            .unwrap();
        assert_eq!(second.backend, first.backend);
        assert_eq!(second.reason, Reason::PrefixMatch);
        assert_eq!(second.matched, 30);
    }

    #[test]
    fn models_do_not_share_prefixes() {
        let mut index = PrefixIndex::new(16, 1024);
        index.insert(b"a", b"same prompt text that is long", 1);
        assert_eq!(
            index.longest_match(b"b", b"same prompt text that is long"),
            None
        );
        assert_eq!(
            index.longest_match(b"a", b"same prompt text that is long!"),
            Some(PrefixMatch {
                len: 29,
                backend: 1
            })
        );
    }

    #[test]
    fn unrelated_prompt_does_not_match() {
        let mut index = PrefixIndex::new(16, 1024);
        index.insert(MODEL, b"What is the capital of France?", 0);
        assert_eq!(index.longest_match(MODEL, b"Tell me a joke"), None);
        // Sharing a few leading bytes (less than a block, not a whole prompt)
        // is not a match either.
        assert_eq!(index.longest_match(MODEL, b"What is love?"), None);
    }

    #[test]
    fn shorter_prompt_matches_whole_blocks_of_a_longer_one() {
        let mut index = PrefixIndex::new(4, 1024);
        index.insert(MODEL, b"abcdefghij", 2);
        assert_eq!(
            index.longest_match(MODEL, b"abcdefgXYZ"),
            Some(PrefixMatch { len: 4, backend: 2 })
        );
    }

    #[test]
    fn memory_stays_bounded_and_recent_entries_survive() {
        let mut index = PrefixIndex::new(16, 1000);
        let kept = b"a prompt that keeps being used, again and again";
        index.insert(MODEL, kept, 3);
        for i in 0..10_000u32 {
            let prompt = format!("{i:08} distinct prompt padding padding padding");
            index.insert(MODEL, prompt.as_bytes(), 0);
            assert!(index.len() <= 1000, "len {} after {i}", index.len());
            if i % 50 == 0 {
                assert_eq!(index.longest_match(MODEL, kept).unwrap().backend, 3);
            }
        }
    }

    #[test]
    fn least_loaded_prefers_idle_then_rendezvous() {
        let mut views = idle(3);
        views[0].in_flight = 2;
        views[1].in_flight = 1;
        views[2].in_flight = 1;
        let pick = least_loaded(42, &views).unwrap();
        assert_ne!(pick, 0);
        assert_eq!(least_loaded(42, &views), Some(pick), "deterministic");
        assert_eq!(least_loaded(1, &[]), None);
    }

    proptest! {
        /// Any prompt that extends an earlier one routes to where it went.
        #[test]
        fn extension_follows_its_prefix(
            first in proptest::collection::vec(any::<u8>(), 1..200),
            more in proptest::collection::vec(any::<u8>(), 0..200),
            block in 1usize..=64,
        ) {
            let router = Router::new(block, 1 << 16);
            let views = idle(4);
            let a = router.route(MODEL, &first, &views).unwrap();
            let extended = [first.as_slice(), &more].concat();
            let b = router.route(MODEL, &extended, &views).unwrap();
            prop_assert_eq!(b.backend, a.backend);
            prop_assert!(b.matched >= first.len());
        }
    }
}
