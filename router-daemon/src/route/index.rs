//! The prefix index: which backends recently received which prompt prefixes,
//! sharded so that no lock covers the whole index, and bounded in memory.
//!
//! # Hashes
//! A prompt key (see [`crate::prompt`]) is cut into blocks of `block` bytes.
//! Each block boundary gets a chained hash, `h(k) = xxh3(block k, seed =
//! h(k-1))`, with `h(0)` derived from the model name, so equal prefixes of the
//! same model share hashes and different models never do.
//!
//! Prompts rarely end on a boundary, and short prompts may not reach one. So a
//! prompt that ends `t` bytes past its last boundary also stores a *tail* hash
//! of those `t` bytes, and marks `t` in that boundary's tail bitmap (bit 0
//! marks a prompt that ended on the boundary itself). A lookup follows
//! boundaries while they match, then tries only the tail lengths marked at the
//! deepest match. A prompt that extends an earlier prompt of any length
//! therefore finds it, at a cost of O(prompt length) hashing and O(blocks) map
//! probes, and learns that it extends that prompt as a whole
//! ([`Matches::whole`]); an earlier prompt that ended at a shallower boundary
//! than the deepest match is not reported as whole.
//!
//! # Holders
//! Each entry remembers up to [`HOLDERS`] backends, roughly most recent
//! first, by a 32-bit hash of the backend's name ([`BackendId`]), not by its
//! position in the backend list: a hot prefix (a shared system prompt) ends up
//! recorded on every backend it was sent to, and a backend that leaves the
//! list is simply never resolved again (its entries age out, or
//! [`PrefixIndex::remove_backend`] drops them at once). A record leaves an
//! entry alone when it already lists the backend where the next newcomer
//! would not push it out (`Entry::keeps`): otherwise every request of a
//! shared prefix that goes to a different backend than the one before would
//! rewrite every boundary of that prefix (measured: a quarter of the daemon's
//! instructions per request, with two backends sharing a 1.5 KB prefix).
//!
//! # Shards and memory
//! Entries live in shards chosen by bits of the entry's hash, each behind its
//! own `Mutex`. A lookup or a record groups the prompt's hashes by shard and
//! takes each shard's lock once, so a decision costs at most `2 × shards`
//! uncontended lock round trips whatever the prompt length, and concurrent
//! decisions only meet on the shards they share, briefly. Those round trips
//! are not free (measured with 32 shards on 2 cores: their atomic operations
//! were 40% of a lookup), so the index has [`SHARDS_PER_CPU`] shards per CPU,
//! between 1 and [`MAX_SHARDS`]: enough that the CPUs rarely meet on one.
//!
//! Each shard holds two generations of at most `capacity / (2 × shards)`
//! entries: when the young one fills, the old one is dropped and the young one
//! ages. A hit in the old generation is copied to the young one, so entries in
//! use survive and idle ones age out (an approximate LRU with O(1) upkeep).
//! The total is therefore never above `capacity`; a capacity below 2 disables
//! the index.
use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Mutex, MutexGuard},
};

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Largest block size: tail lengths are kept in a 64-bit map.
pub const MAX_BLOCK: usize = 64;
/// Backends remembered per entry.
pub(crate) const HOLDERS: usize = 4;
/// Most shards the index is split into.
pub(crate) const MAX_SHARDS: usize = 32;
/// Shards per CPU the daemon may run on (rounded up to a power of two).
pub(crate) const SHARDS_PER_CPU: usize = 2;
/// Most distinct backends a lookup reports (the first met along the prompt).
pub(crate) const MAX_MATCHES: usize = 8;
/// Salt that keeps tail hashes apart from boundary hashes.
const TAIL_SALT: u64 = 0x7461_696c_5f68_6173;

/// A backend as the index knows it: a non-zero 32-bit hash of its name.
pub(crate) type BackendId = u32;

/// The [`BackendId`] of the backend called `name`.
pub(crate) fn backend_id(name: &str) -> BackendId {
    // Truncating the hash is the point: 32 bits keep entries small, and two
    // names of one fleet colliding (odds 1 in 2^32 per pair) only merges
    // their cache hints.
    let id = xxh3_64(name.as_bytes()) as u32;
    id.max(1)
}

/// What the index knows about one boundary or tail hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// Backends that received a prompt through here, roughly most recent
    /// first; 0 is an empty slot (and empty slots come last).
    holders: [BackendId; HOLDERS],
    /// Bit `t` is set when some prompt ended `t` bytes past this boundary.
    tails: u64,
}

impl Entry {
    /// Moves `id` to the front, dropping the least recent holder if full.
    fn hold(&mut self, id: BackendId) {
        let at = self
            .holders
            .iter()
            .position(|&h| h == id || h == 0)
            .unwrap_or(HOLDERS - 1);
        self.holders.copy_within(0..at, 1);
        self.holders[0] = id;
    }

    /// Whether `id` is listed where holding it again may be skipped: the
    /// next newcomer would not push it out.
    fn keeps(&self, id: BackendId) -> bool {
        self.holders[..HOLDERS - 1].contains(&id)
    }

    /// Forgets `id`; true when no holder is left.
    fn release(&mut self, id: BackendId) -> bool {
        if let Some(at) = self.holders.iter().position(|&h| h == id) {
            self.holders.copy_within(at + 1.., at);
            self.holders[HOLDERS - 1] = 0;
        }
        self.holders[0] == 0
    }
}

/// Hasher for keys that are already xxh3 hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `u64` keys; this keeps the impl total.
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<u64, Entry, BuildHasherDefault<Prehashed>>;

/// One shard: two generations of at most `cap` entries each.
#[derive(Debug, Default)]
struct Shard {
    young: Map,
    old: Map,
}

impl Shard {
    fn get(&mut self, hash: u64, cap: usize) -> Option<Entry> {
        if let Some(entry) = self.young.get(&hash) {
            return Some(*entry);
        }
        let entry = self.old.remove(&hash)?;
        self.put_young(hash, entry, cap);
        Some(entry)
    }

    fn upsert(&mut self, hash: u64, id: BackendId, tails: u64, cap: usize) {
        if let Some(entry) = self.young.get_mut(&hash) {
            entry.hold(id);
            entry.tails |= tails;
            return;
        }
        let mut entry = self.old.remove(&hash).unwrap_or_default();
        entry.hold(id);
        entry.tails |= tails;
        self.put_young(hash, entry, cap);
    }

    /// Takes `id` off the entry of `hash`, in either generation; an entry
    /// left with no holder goes.
    fn release(&mut self, hash: u64, id: BackendId) {
        for generation in [&mut self.young, &mut self.old] {
            if let Some(entry) = generation.get_mut(&hash) {
                if entry.release(id) {
                    generation.remove(&hash);
                }
                return;
            }
        }
    }

    fn put_young(&mut self, hash: u64, entry: Entry, cap: usize) {
        if self.young.len() >= cap {
            // Age the young generation; reuse the old one's allocation.
            std::mem::swap(&mut self.young, &mut self.old);
            self.young.clear();
        }
        self.young.insert(hash, entry);
    }
}

/// A prompt's boundary hashes, grouped by shard; computed once per decision
/// and used for both the lookup and the record.
#[derive(Debug)]
pub struct Walk {
    /// The index's block size.
    block: usize,
    /// `hashes[k]` is the hash of the boundary after `k` blocks (`hashes[0]`
    /// is the model's root).
    hashes: Vec<u64>,
    /// Indexes into `hashes`, grouped by shard.
    order: Vec<u32>,
    /// `order[starts[s]..starts[s + 1]]` belong to shard `s`.
    starts: [u32; MAX_SHARDS + 1],
    /// What the lookup found at each boundary (default: nothing), so that the
    /// record can skip entries that already say what it would write.
    seen: Vec<Entry>,
    /// The tail hash the lookup matched, and its entry.
    tail_seen: Option<(u64, Entry)>,
}

impl Default for Walk {
    /// An empty walk, to be filled by `PrefixIndex::walk_into`.
    fn default() -> Self {
        Self {
            block: 1,
            hashes: Vec::new(),
            order: Vec::new(),
            starts: [0; MAX_SHARDS + 1],
            seen: Vec::new(),
            tail_seen: None,
        }
    }
}

impl Walk {
    /// Boundaries past which a kept walk gives its buffers back: a thread
    /// keeps buffers for at most this many (about 150 KiB: prompts up to
    /// 256 KiB with 64-byte blocks) between decisions.
    pub(crate) const KEPT_BOUNDARIES: usize = 4 * 1024;

    /// Frees the buffers if a long prompt grew them past
    /// [`Self::KEPT_BOUNDARIES`].
    pub(crate) fn shrink(&mut self) {
        self.shrink_to(Self::KEPT_BOUNDARIES);
    }

    /// Frees the buffers if they have room for more than `boundaries`.
    pub(crate) fn shrink_to(&mut self, boundaries: usize) {
        if self.hashes.capacity() > boundaries {
            *self = Self::default();
        }
    }

    /// A hash of `key[..len]` (`key` is the walk's key, `len` at most its
    /// length): equal for equal prefixes of the same model, and costing at
    /// most one block of hashing, since the walk has hashed the whole blocks.
    pub(crate) fn prefix_hash(&self, key: &[u8], len: usize, salt: u64) -> u64 {
        let len = len.min(key.len());
        let blocks = (len / self.block).min(self.hashes.len() - 1);
        let start = blocks * self.block;
        xxh3_64_with_seed(&key[start..len], self.hashes[blocks] ^ salt)
    }
}

/// Per-backend depth of the longest known prefix of one prompt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Matches {
    found: [(BackendId, usize); MAX_MATCHES],
    len: usize,
    /// Length of an earlier prompt, as a whole, that the key extends or
    /// equals (the longest found at the deepest matched boundary); 0 if none.
    pub(crate) whole: usize,
}

impl Matches {
    /// `(backend, matched key bytes)` pairs, at most one per backend.
    pub(crate) fn as_slice(&self) -> &[(BackendId, usize)] {
        &self.found[..self.len]
    }

    /// Bytes matched for `id` (0 when it holds no prefix of the prompt).
    pub(crate) fn get(&self, id: BackendId) -> usize {
        self.as_slice()
            .iter()
            .find(|(h, _)| *h == id)
            .map_or(0, |(_, len)| *len)
    }

    /// Records that every holder in `holders` holds `len` bytes.
    fn note_all(&mut self, holders: &[BackendId; HOLDERS], len: usize) {
        for &id in holders.iter().take_while(|&&h| h != 0) {
            self.note(id, len);
        }
    }

    /// Records that `id` holds `len` bytes, keeping the deeper of two depths.
    fn note(&mut self, id: BackendId, len: usize) {
        if let Some(slot) = self.found[..self.len].iter_mut().find(|(h, _)| *h == id) {
            slot.1 = slot.1.max(len);
        } else if self.len < MAX_MATCHES {
            self.found[self.len] = (id, len);
            self.len += 1;
        }
    }
}

/// Prefix hashes of recent prompts, bounded in memory, safe to share.
#[derive(Debug)]
pub struct PrefixIndex {
    block: usize,
    generation_cap: usize,
    shards: Box<[Mutex<Shard>]>,
}

impl PrefixIndex {
    /// An empty index with `block`-byte blocks and at most `capacity`
    /// entries, sharded for the CPUs this process may run on.
    ///
    /// # Panics
    /// If `block` is 0 or over [`MAX_BLOCK`]; the CLI rejects such values.
    pub(crate) fn new(block: usize, capacity: usize) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_shards(block, capacity, cpus.saturating_mul(SHARDS_PER_CPU))
    }

    /// An empty index with `block`-byte blocks, at most `capacity` entries
    /// and about `shards` shards (a power of two between 1 and
    /// [`MAX_SHARDS`], and fewer when `capacity` is too small to fill them).
    ///
    /// # Panics
    /// If `block` is 0 or over [`MAX_BLOCK`]; the CLI rejects such values.
    pub(crate) fn with_shards(block: usize, capacity: usize, shards: usize) -> Self {
        assert!(
            (1..=MAX_BLOCK).contains(&block),
            "invariant: block size is validated by the CLI"
        );
        // A power of two, and at least 2 entries per shard when possible.
        let mut shards = shards.clamp(1, MAX_SHARDS).next_power_of_two();
        while shards > 1 && capacity / (2 * shards) == 0 {
            shards /= 2;
        }
        Self {
            block,
            generation_cap: capacity / (2 * shards),
            shards: (0..shards).map(|_| Mutex::default()).collect(),
        }
    }

    /// Number of entries held (both generations of every shard).
    pub(crate) fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|s| {
                let shard = self.lock(s);
                shard.young.len() + shard.old.len()
            })
            .sum()
    }

    #[cfg(test)]
    /// Hashes `key`'s block boundaries for `model` and groups them by shard.
    pub(crate) fn walk(&self, model: &[u8], key: &[u8]) -> Walk {
        let mut walk = Walk::default();
        self.walk_into(&mut walk, model, key);
        walk
    }

    /// Walks `key` for `model` into an earlier walk's buffers, so a thread that
    /// keeps one walk allocates nothing once its buffers are large enough.
    pub(crate) fn walk_into(&self, walk: &mut Walk, model: &[u8], key: &[u8]) {
        let Walk {
            block,
            hashes,
            order,
            starts,
            seen,
            tail_seen,
        } = walk;
        *block = self.block;
        hashes.clear();
        let mut hash = xxh3_64(model);
        hashes.push(hash);
        for chunk in key.chunks_exact(self.block) {
            hash = xxh3_64_with_seed(chunk, hash);
            hashes.push(hash);
        }
        // Counting sort by shard.
        *starts = [0u32; MAX_SHARDS + 1];
        for &h in hashes.iter() {
            starts[self.shard_of(h) + 1] += 1;
        }
        for s in 0..MAX_SHARDS {
            starts[s + 1] += starts[s];
        }
        let mut next = *starts;
        order.clear();
        order.resize(hashes.len(), 0);
        for (i, &h) in hashes.iter().enumerate() {
            let s = self.shard_of(h);
            order[next[s] as usize] =
                u32::try_from(i).expect("invariant: bodies are far below 4 GiB");
            next[s] += 1;
        }
        seen.clear();
        *tail_seen = None;
    }

    /// For each backend holding a prefix of `key`, the longest such prefix
    /// (`walk` must come from [`Self::walk_into`] on the same model and key).
    pub(crate) fn longest_matches(&self, walk: &mut Walk, key: &[u8]) -> Matches {
        let mut matches = Matches::default();
        if self.generation_cap == 0 {
            return matches;
        }
        // An entry always has a holder, so a default (holder-less) entry
        // stands for "absent".
        let mut found = std::mem::take(&mut walk.seen);
        found.clear();
        found.resize(walk.hashes.len(), Entry::default());
        for s in 0..self.shards.len() {
            let group = &walk.order[walk.starts[s] as usize..walk.starts[s + 1] as usize];
            if group.is_empty() {
                continue;
            }
            let mut shard = self.lock(s);
            for &i in group {
                let i = i as usize;
                if let Some(entry) = shard.get(walk.hashes[i], self.generation_cap) {
                    found[i] = entry;
                }
            }
        }
        // The root (depth 0) is matched by every prompt of the model; it only
        // contributes its tails. Runs of boundaries with the same holders (the
        // common case) are noted once, at their deepest.
        let mut deepest = 0;
        let mut run = [0; HOLDERS];
        for (depth, entry) in found.iter().enumerate().skip(1) {
            if entry.holders[0] == 0 {
                break;
            }
            if entry.holders != run {
                matches.note_all(&run, deepest * self.block);
                run = entry.holders;
            }
            deepest = depth;
        }
        matches.note_all(&run, deepest * self.block);
        let entry = found[deepest];
        walk.seen = found;
        if entry.holders[0] == 0 && entry.tails == 0 {
            return matches;
        }
        let depth = deepest * self.block;
        let rest = &key[depth..];
        let seed = walk.hashes[deepest] ^ TAIL_SALT;
        // Bit 0 marks a prompt that ended on this very boundary.
        let mut tails = entry.tails & !1;
        while tails != 0 {
            let t = (u64::BITS - 1 - tails.leading_zeros()) as usize;
            tails &= !(1 << t);
            if t > rest.len() {
                continue;
            }
            let hash = xxh3_64_with_seed(&rest[..t], seed);
            if let Some(tail) = self
                .lock(self.shard_of(hash))
                .get(hash, self.generation_cap)
            {
                matches.note_all(&tail.holders, depth + t);
                matches.whole = depth + t;
                walk.tail_seen = Some((hash, tail));
                return matches;
            }
        }
        if entry.tails & 1 != 0 {
            matches.whole = depth;
        }
        matches
    }

    /// Records that `key` (whose walk is `walk`) was sent to backend `id`.
    pub(crate) fn record(&self, walk: &Walk, key: &[u8], id: BackendId) {
        if self.generation_cap == 0 {
            return;
        }
        let last = walk.hashes.len() - 1;
        let tail = &key[last * self.block..];
        let tail_bit = 1 << tail.len();
        for s in 0..self.shards.len() {
            let group = &walk.order[walk.starts[s] as usize..walk.starts[s + 1] as usize];
            if group.is_empty() {
                continue;
            }
            // Entries the lookup saw keeping `id`, with the tail bit set,
            // are left alone (see "Holders" above).
            let stale = |i: usize| {
                let tails = if i == last { tail_bit } else { 0 };
                walk.seen
                    .get(i)
                    .is_none_or(|e| !e.keeps(id) || e.tails & tails != tails)
            };
            if !group.iter().any(|&i| stale(i as usize)) {
                continue;
            }
            let mut shard = self.lock(s);
            for &i in group {
                let i = i as usize;
                if stale(i) {
                    let tails = if i == last { tail_bit } else { 0 };
                    shard.upsert(walk.hashes[i], id, tails, self.generation_cap);
                }
            }
        }
        if !tail.is_empty() {
            let hash = xxh3_64_with_seed(tail, walk.hashes[last] ^ TAIL_SALT);
            if !matches!(walk.tail_seen, Some((h, e)) if h == hash && e.keeps(id)) {
                self.lock(self.shard_of(hash))
                    .upsert(hash, id, 0, self.generation_cap);
            }
        }
    }

    /// Undoes [`record`](Self::record) of `key` (whose walk is `walk`, its
    /// lookup done) on backend `id`, which took the request but cached
    /// nothing of it (it answered 503): `id` leaves the entries the lookup
    /// did not already find it in, and entries left with no holder go. What
    /// `id` held before, such as a system prompt its earlier requests
    /// shared, stays.
    pub(crate) fn forget(&self, walk: &Walk, key: &[u8], id: BackendId) {
        let Some(last) = walk.hashes.len().checked_sub(1) else {
            return;
        };
        let held_before = |i: usize| walk.seen.get(i).is_some_and(|e| e.holders.contains(&id));
        let tail = &key[(last * self.block).min(key.len())..];
        let tail_hash = (!tail.is_empty())
            .then(|| xxh3_64_with_seed(tail, walk.hashes[last] ^ TAIL_SALT))
            .filter(|&hash| {
                !matches!(walk.tail_seen, Some((h, e)) if h == hash && e.holders.contains(&id))
            });
        for s in 0..self.shards.len() {
            let group = &walk.order[walk.starts[s] as usize..walk.starts[s + 1] as usize];
            let added = group
                .iter()
                .map(|&i| i as usize)
                .filter(|&i| !held_before(i))
                .map(|i| walk.hashes[i]);
            let tail_here = tail_hash.filter(|&hash| self.shard_of(hash) == s);
            let mut added = added.chain(tail_here).peekable();
            if added.peek().is_none() {
                continue;
            }
            let mut shard = self.lock(s);
            for hash in added {
                shard.release(hash, id);
            }
        }
    }

    #[cfg(test)]
    /// The longest known prefix of `key` for each backend (lookup only).
    pub(crate) fn lookup(&self, model: &[u8], key: &[u8]) -> Matches {
        self.longest_matches(&mut self.walk(model, key), key)
    }

    #[cfg(test)]
    /// Records that `key` (for `model`) was sent to backend `id`.
    pub(crate) fn insert(&self, model: &[u8], key: &[u8], id: BackendId) {
        self.record(&self.walk(model, key), key, id);
    }

    /// Forgets backend `id` everywhere; entries left with no holder go.
    ///
    /// Takes each shard's lock in turn (O(entries) in all): meant for a
    /// backend leaving the fleet, not for the request path.
    pub(crate) fn remove_backend(&self, id: BackendId) {
        for s in 0..self.shards.len() {
            let mut shard = self.lock(s);
            let Shard { young, old } = &mut *shard;
            for map in [young, old] {
                map.retain(|_, entry| !entry.release(id));
            }
        }
    }

    fn shard_of(&self, hash: u64) -> usize {
        // Bits 32.. are used neither for the bucket (low bits) nor for the
        // control byte (top 7 bits) of the shard's hash map.
        (hash >> 32) as usize & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock leaves at worst a stale hint.
        self.shards[shard]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    const MODEL: &[u8] = b"meta-llama/Llama-3.2-1B-Instruct";

    fn best(m: &Matches) -> Option<(BackendId, usize)> {
        m.as_slice().iter().copied().max_by_key(|&(_, len)| len)
    }

    #[test]
    fn models_do_not_share_prefixes() {
        let index = PrefixIndex::new(16, 1024);
        index.insert(b"a", b"same prompt text that is long", 1);
        assert_eq!(
            best(&index.lookup(b"b", b"same prompt text that is long")),
            None
        );
        assert_eq!(
            best(&index.lookup(b"a", b"same prompt text that is long!")),
            Some((1, 29))
        );
    }

    #[test]
    fn unrelated_prompt_does_not_match() {
        let index = PrefixIndex::new(16, 1024);
        index.insert(MODEL, b"What is the capital of France?", 7);
        assert_eq!(best(&index.lookup(MODEL, b"Tell me a joke")), None);
        // Sharing a few leading bytes (less than a block, not a whole prompt)
        // is not a match either.
        assert_eq!(best(&index.lookup(MODEL, b"What is love?")), None);
    }

    #[test]
    fn shorter_prompt_matches_whole_blocks_of_a_longer_one() {
        let index = PrefixIndex::new(4, 1024);
        index.insert(MODEL, b"abcdefghij", 2);
        assert_eq!(best(&index.lookup(MODEL, b"abcdefgXYZ")), Some((2, 4)));
    }

    #[test]
    fn whole_earlier_prompts_are_reported() {
        let index = PrefixIndex::new(4, 1024);
        index.insert(MODEL, b"abcdefgh", 1);
        index.insert(MODEL, b"abcdefghij", 2);
        assert_eq!(index.lookup(MODEL, b"abcdefghijkl").whole, 10);
        assert_eq!(index.lookup(MODEL, b"abcdefghXY").whole, 8);
        assert_eq!(index.lookup(MODEL, b"abcdefgh").whole, 8);
        // Sharing blocks is not extending a whole prompt.
        assert_eq!(index.lookup(MODEL, b"abcdXXXXXX").whole, 0);
        assert_eq!(index.lookup(MODEL, b"abcdefgZ").whole, 0);
    }

    #[test]
    fn several_backends_hold_one_prefix() {
        let index = PrefixIndex::new(4, 1024);
        index.insert(MODEL, b"system prompt|alice", 1);
        index.insert(MODEL, b"system prompt|bob", 2);
        let m = index.lookup(MODEL, b"system prompt|carol");
        assert_eq!(m.get(1), 12);
        assert_eq!(m.get(2), 12);
        assert_eq!(index.lookup(MODEL, b"system prompt|bob, again").get(2), 17);
    }

    /// Looks `key` up, records it on `id` and forgets it there again, as a
    /// request that met a 503 does.
    fn record_then_forget(index: &PrefixIndex, key: &[u8], id: BackendId) {
        let mut walk = index.walk(MODEL, key);
        index.longest_matches(&mut walk, key);
        index.record(&walk, key, id);
        assert_eq!(index.lookup(MODEL, key).get(id), key.len());
        index.forget(&walk, key, id);
    }

    #[test]
    fn forgetting_undoes_only_what_the_record_added() {
        let index = PrefixIndex::new(4, 1024);
        index.insert(MODEL, b"system prompt|alice", 1);
        // Backend 2 answered 503 to a sibling: it holds none of it.
        record_then_forget(&index, b"system prompt|bob", 2);
        let m = index.lookup(MODEL, b"system prompt|bob");
        assert_eq!((m.get(1), m.get(2), m.whole), (12, 0, 0));
        // What backend 2 held before a 503 stays: here the shared part.
        index.insert(MODEL, b"system prompt|carol", 2);
        record_then_forget(&index, b"system prompt|dave, a longer one", 2);
        let m = index.lookup(MODEL, b"system prompt|dave, a longer one");
        assert_eq!((m.get(1), m.get(2)), (12, 12));
        // A prompt no one else held leaves no entry behind.
        let entries = index.len();
        record_then_forget(&index, b"a prompt of its own, tail included", 3);
        assert_eq!(index.len(), entries);
    }

    #[test]
    fn holders_are_bounded_most_recent_first() {
        let mut entry = Entry::default();
        for id in 1..=6 {
            entry.hold(id);
        }
        assert_eq!(entry.holders, [6, 5, 4, 3]);
        entry.hold(4);
        assert_eq!(entry.holders, [4, 6, 5, 3]);
        assert!(!entry.release(6));
        assert_eq!(entry.holders, [4, 5, 3, 0]);
        entry.hold(9);
        assert_eq!(entry.holders, [9, 4, 5, 3]);
    }

    #[test]
    fn a_listed_holder_is_refreshed_only_before_it_would_go() {
        let index = PrefixIndex::new(4, 1024);
        let prompt = b"a system prompt every backend gets";
        let survivors = |ids: &[BackendId]| {
            let m = index.lookup(MODEL, prompt);
            ids.iter()
                .map(|&id| m.get(id) == prompt.len())
                .collect::<Vec<_>>()
        };
        // As a decision does it: look up, then record.
        let send = |id: BackendId| {
            let mut walk = index.walk(MODEL, prompt);
            index.longest_matches(&mut walk, prompt);
            index.record(&walk, prompt, id);
        };
        for id in 1..=4 {
            send(id);
        }
        // Holders 4 3 2 1. 3 is listed and not last: recording it again is
        // skipped, so three newcomers push out 1, 2, then 3.
        send(3);
        for id in 5..=7 {
            send(id);
        }
        assert_eq!(survivors(&[3, 4, 5, 6, 7]), [false, true, true, true, true]);
        // Holders 7 6 5 4. 4 is last: recording it again moves it to the
        // front, so the next newcomer pushes out 5 instead.
        send(4);
        send(8);
        assert_eq!(survivors(&[4, 5, 6, 7, 8]), [true, false, true, true, true]);
    }

    #[test]
    fn removed_backend_is_forgotten() {
        let index = PrefixIndex::new(8, 1024);
        index.insert(MODEL, b"a prompt that two backends received", 1);
        index.insert(MODEL, b"a prompt that two backends received", 2);
        index.insert(MODEL, b"other text that only one backend got", 1);
        let before = index.len();
        index.remove_backend(1);
        let m = index.lookup(MODEL, b"a prompt that two backends received");
        assert_eq!(m.get(1), 0);
        assert_eq!(m.get(2), b"a prompt that two backends received".len());
        assert!(index.len() < before, "entries held only by 1 are dropped");
        assert_eq!(
            best(&index.lookup(MODEL, b"other text that only one backend got")),
            None
        );
    }

    #[test]
    fn memory_stays_bounded_and_recent_entries_survive() {
        for shards in [1, 4, MAX_SHARDS] {
            let index = PrefixIndex::with_shards(16, 1000, shards);
            let kept = b"a prompt that keeps being used, again and again";
            index.insert(MODEL, kept, 3);
            for i in 0..10_000u32 {
                let prompt = format!("{i:08} distinct prompt padding padding padding");
                index.insert(MODEL, prompt.as_bytes(), 5);
                assert!(index.len() <= 1000, "len {} after {i}", index.len());
                if i % 20 == 0 {
                    assert_eq!(best(&index.lookup(MODEL, kept)).unwrap().0, 3);
                }
            }
        }
    }

    #[test]
    fn tiny_capacities_stay_bounded() {
        for shards in [1, 4, MAX_SHARDS] {
            for capacity in 0..70 {
                let index = PrefixIndex::with_shards(4, capacity, shards);
                for i in 0..200u32 {
                    index.insert(MODEL, format!("{i} and more text").as_bytes(), 1);
                }
                assert!(index.len() <= capacity, "{} > {capacity}", index.len());
            }
        }
    }

    #[test]
    fn shard_counts_give_the_same_answers() {
        let one = PrefixIndex::with_shards(8, 1 << 12, 1);
        let many = PrefixIndex::with_shards(8, 1 << 12, MAX_SHARDS);
        for (i, prompt) in ["system prompt, then alice", "system prompt, then bob"]
            .iter()
            .enumerate()
        {
            one.insert(MODEL, prompt.as_bytes(), i as BackendId + 1);
            many.insert(MODEL, prompt.as_bytes(), i as BackendId + 1);
        }
        for probe in ["system prompt, then carol", "system prompt, then bob!"] {
            assert_eq!(
                one.lookup(MODEL, probe.as_bytes()),
                many.lookup(MODEL, probe.as_bytes())
            );
        }
        assert_eq!(one.lookup(MODEL, b"system prompt, then bob!").get(2), 23);
    }

    #[test]
    fn a_reused_walk_answers_as_a_fresh_one() {
        let reused = PrefixIndex::with_shards(8, 1 << 12, 4);
        let fresh = PrefixIndex::with_shards(8, 1 << 12, 4);
        let mut walk = Walk::default();
        let prompts: [&[u8]; 5] = [
            b"a long shared system prompt, then question one",
            b"short",
            b"a long shared system prompt, then question two",
            b"a long",
            b"a long shared system prompt, then question one",
        ];
        for (i, prompt) in prompts.iter().enumerate() {
            let id = i as BackendId % 2 + 1;
            reused.walk_into(&mut walk, MODEL, prompt);
            let found = reused.longest_matches(&mut walk, prompt);
            reused.record(&walk, prompt, id);
            let mut own = fresh.walk(MODEL, prompt);
            assert_eq!(found, fresh.longest_matches(&mut own, prompt), "{i}");
            fresh.record(&own, prompt, id);
        }
        for probe in prompts {
            assert_eq!(reused.lookup(MODEL, probe), fresh.lookup(MODEL, probe));
        }
        assert_eq!(reused.len(), fresh.len());
    }

    #[test]
    fn prefix_hashes_depend_on_the_prefix_and_model_only() {
        let index = PrefixIndex::new(8, 1024);
        let hash =
            |model: &[u8], key: &[u8], len: usize| index.walk(model, key).prefix_hash(key, len, 1);
        let short = b"a conversation prefix|first turn";
        let long = b"a conversation prefix|first turn|and a much longer second one";
        for len in [0, 5, 8, 21, short.len()] {
            assert_eq!(hash(MODEL, short, len), hash(MODEL, long, len), "len {len}");
        }
        assert_ne!(hash(MODEL, short, 21), hash(MODEL, short, 22));
        assert_ne!(hash(MODEL, short, 21), hash(b"other", short, 21));
        assert_ne!(
            hash(MODEL, b"a conversation prefiX|first turn", 21),
            hash(MODEL, short, 21)
        );
        // A difference in a whole block, and one in the tail.
        assert_ne!(
            hash(MODEL, short, 16),
            hash(MODEL, b"A conversation prefix", 16)
        );
        assert_ne!(
            hash(MODEL, short, 20),
            hash(MODEL, b"a conversation pREFIX", 20)
        );
    }

    #[test]
    fn backend_ids_are_never_zero() {
        assert_ne!(backend_id(""), 0);
        assert_ne!(backend_id("http://a:1"), backend_id("http://b:1"));
    }
}
