//! The prefix cache: vLLM's automatic prefix caching, reduced to bookkeeping.
//!
//! A sequence of token ids is cut into blocks of `block_size`; only **full**
//! blocks are ever hashed, cached or reused. Each block's hash chains its
//! parent's (`hash(parent, tokens)`), so a hash names the block *and the whole
//! prefix before it*, and a lookup walks the chain from the first block and
//! stops at the first miss: a block is reused only if every earlier block is.
//!
//! The cache holds at most `capacity` blocks. Blocks used by running requests
//! are pinned (reference-counted) and never evicted; unpinned blocks stay
//! cached and are evicted least-recently-freed first. When a request frees its
//! blocks they are queued tail first, so a request's last blocks are evicted
//! before its first ones, as in vLLM's free-block queue.
//!
//! Hashes are 64-bit xxh3; a collision would only produce a spurious hit.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::Xxh3;

use crate::tokenize::TokenId;

/// The chained hash naming a full block and everything before it.
pub type BlockHash = u64;

/// Parent hash of a sequence's first block.
const ROOT_HASH: BlockHash = 0x766c_6c6d_2d73_696d; // "vllm-sim"

/// Hash of the block holding `tokens`, following the block named `parent`
/// (`None` for a sequence's first block).
pub fn block_hash(parent: Option<BlockHash>, tokens: &[TokenId]) -> BlockHash {
    let mut hasher = Xxh3::new();
    hasher.update(&parent.unwrap_or(ROOT_HASH).to_le_bytes());
    for token in tokens {
        hasher.update(&token.to_le_bytes());
    }
    hasher.digest()
}

/// Appends to `hashes` the chained hashes of the full blocks of `tokens` that
/// it does not cover yet; `hashes` must hold the hashes of the first
/// `hashes.len()` blocks of `tokens`. A trailing partial block is left out.
pub fn extend_block_hashes(hashes: &mut Vec<BlockHash>, tokens: &[TokenId], block_size: usize) {
    let covered = hashes.len() * block_size;
    let Some(rest) = tokens.get(covered..) else {
        return;
    };
    for block in rest.chunks_exact(block_size) {
        let hash = block_hash(hashes.last().copied(), block);
        hashes.push(hash);
    }
}

/// The chained hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[TokenId], block_size: usize) -> Vec<BlockHash> {
    let mut hashes = Vec::with_capacity(tokens.len() / block_size);
    extend_block_hashes(&mut hashes, tokens, block_size);
    hashes
}

/// One cached block's state.
#[derive(Debug)]
struct Entry {
    /// Running requests using the block.
    pins: usize,
    /// Place in the eviction queue; `Some` exactly when `pins == 0`.
    queued_at: Option<u64>,
}

/// A bounded set of cached blocks with pinning and LRU eviction.
#[derive(Debug)]
pub struct PrefixCache {
    capacity: usize,
    blocks: HashMap<BlockHash, Entry>,
    /// Unpinned blocks by the order they became free; the first is evicted next.
    evictable: BTreeMap<u64, BlockHash>,
    next_position: u64,
}

impl PrefixCache {
    /// An empty cache holding at most `capacity` blocks (0 caches nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            blocks: HashMap::new(),
            evictable: BTreeMap::new(),
            next_position: 0,
        }
    }

    /// Maximum number of blocks.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of cached blocks, pinned or not.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether no block is cached.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Number of blocks pinned by running requests.
    pub fn pinned(&self) -> usize {
        self.blocks.len() - self.evictable.len()
    }

    /// Whether the block named `hash` is cached.
    pub fn contains(&self, hash: BlockHash) -> bool {
        self.blocks.contains_key(&hash)
    }

    /// Finds how many leading blocks of `hashes` are cached, stopping at the
    /// first miss, and pins those. Returns their count.
    pub fn acquire_prefix(&mut self, hashes: &[BlockHash]) -> usize {
        let hits = hashes
            .iter()
            .take_while(|hash| self.blocks.contains_key(hash))
            .count();
        for &hash in &hashes[..hits] {
            self.pin_cached(hash);
        }
        hits
    }

    /// Pins the block named `hash`, caching it first if needed, which may
    /// evict the least recently freed unpinned block. Returns `false`, caching
    /// nothing, when the cache is full of pinned blocks.
    pub fn acquire(&mut self, hash: BlockHash) -> bool {
        if self.blocks.contains_key(&hash) {
            self.pin_cached(hash);
            return true;
        }
        if self.blocks.len() >= self.capacity && !self.evict_one() {
            return false;
        }
        self.blocks.insert(
            hash,
            Entry {
                pins: 1,
                queued_at: None,
            },
        );
        true
    }

    /// Unpins blocks that a request acquired, given in sequence order. Blocks
    /// left without pins become evictable, the last of `hashes` first.
    pub fn release(&mut self, hashes: &[BlockHash]) {
        for &hash in hashes.iter().rev() {
            let Some(entry) = self.blocks.get_mut(&hash) else {
                debug_assert!(false, "released block {hash:#x} is not cached");
                continue;
            };
            debug_assert!(entry.pins > 0, "released block {hash:#x} is not pinned");
            entry.pins = entry.pins.saturating_sub(1);
            if entry.pins == 0 && entry.queued_at.is_none() {
                let position = self.next_position;
                self.next_position += 1;
                entry.queued_at = Some(position);
                self.evictable.insert(position, hash);
            }
        }
    }

    /// Fraction of the capacity pinned by running requests, like vLLM's
    /// `kv_cache_usage_perc` (cached but unpinned blocks count as free).
    pub fn usage(&self) -> f64 {
        if self.capacity == 0 {
            return 0.0;
        }
        // Block counts are far below 2^52, so the conversions are exact.
        self.pinned() as f64 / self.capacity as f64
    }

    fn pin_cached(&mut self, hash: BlockHash) {
        if let Some(entry) = self.blocks.get_mut(&hash) {
            entry.pins += 1;
            if let Some(position) = entry.queued_at.take() {
                self.evictable.remove(&position);
            }
        }
    }

    /// Drops the least recently freed unpinned block, if there is one.
    fn evict_one(&mut self) -> bool {
        match self.evictable.pop_first() {
            Some((_, hash)) => {
                self.blocks.remove(&hash);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 16;

    /// A prompt of `n` tokens whose values start at `base`.
    fn tokens(base: u32, n: usize) -> Vec<TokenId> {
        (base..).take(n).collect()
    }

    /// Runs one request's cache lifecycle: look up, insert every full block,
    /// release. Returns the number of hit tokens.
    fn serve(cache: &mut PrefixCache, prompt: &[TokenId]) -> usize {
        let hashes = block_hashes(prompt, BS);
        let hits = cache.acquire_prefix(&hashes);
        let mut pinned = hits;
        for &hash in &hashes[hits..] {
            if !cache.acquire(hash) {
                break;
            }
            pinned += 1;
        }
        cache.release(&hashes[..pinned]);
        hits * BS
    }

    #[test]
    fn hashes_cover_full_blocks_only() {
        assert_eq!(block_hashes(&tokens(0, 15), BS).len(), 0);
        assert_eq!(block_hashes(&tokens(0, 16), BS).len(), 1);
        assert_eq!(block_hashes(&tokens(0, 47), BS).len(), 2);
    }

    #[test]
    fn hashes_are_chained() {
        let a = block_hashes(&tokens(0, 32), BS);
        let mut b_prompt = tokens(100, 16);
        b_prompt.extend(tokens(16, 16)); // same second block, other first block
        let b = block_hashes(&b_prompt, BS);
        assert_ne!(a[1], b[1], "a block's hash depends on its prefix");
    }

    #[test]
    fn extending_matches_hashing_at_once() {
        let all = tokens(7, 80);
        let mut hashes = Vec::new();
        for end in [3, 16, 17, 40, 80] {
            extend_block_hashes(&mut hashes, &all[..end], BS);
            assert_eq!(hashes, block_hashes(&all[..end], BS));
        }
    }

    #[test]
    fn shared_prefix_of_k_full_blocks_is_reused() {
        for k in 0..4 {
            let mut cache = PrefixCache::new(64);
            let shared = tokens(0, k * BS);
            let mut first = shared.clone();
            first.extend(tokens(1000, 20));
            let mut second = shared.clone();
            second.extend(tokens(2000, 37));
            assert_eq!(serve(&mut cache, &first), 0);
            assert_eq!(serve(&mut cache, &second), k * BS, "k = {k}");
        }
    }

    #[test]
    fn partial_blocks_are_never_cached() {
        let mut cache = PrefixCache::new(64);
        let prompt = tokens(0, 16 + 10);
        serve(&mut cache, &prompt);
        assert_eq!(cache.len(), 1);
        // The same 26 tokens again: only the full block hits.
        assert_eq!(serve(&mut cache, &prompt), 16);
        // A prompt sharing 31 tokens shares one full block only.
        let mut longer = tokens(0, 31);
        longer.push(9999);
        serve(&mut cache, &longer);
        let mut other = tokens(0, 31);
        other.extend([5, 5, 5]);
        assert_eq!(serve(&mut cache, &other), 16);
    }

    #[test]
    fn a_miss_stops_the_walk() {
        let mut cache = PrefixCache::new(64);
        serve(&mut cache, &tokens(0, 48));
        let mut diverging = tokens(0, 48);
        diverging[20] = 777; // second block differs; third equals by content
        assert_eq!(serve(&mut cache, &diverging), 16);
    }

    #[test]
    fn eviction_is_least_recently_freed_first() {
        let mut cache = PrefixCache::new(2);
        let a = tokens(0, 16);
        let b = tokens(100, 16);
        let c = tokens(200, 16);
        serve(&mut cache, &a);
        serve(&mut cache, &b);
        // Touch `a`: `b` is now the least recently freed.
        assert_eq!(serve(&mut cache, &a), 16);
        serve(&mut cache, &c);
        assert!(cache.contains(block_hashes(&a, BS)[0]));
        assert!(!cache.contains(block_hashes(&b, BS)[0]));
        assert!(cache.contains(block_hashes(&c, BS)[0]));
    }

    #[test]
    fn a_requests_tail_blocks_are_evicted_before_its_head() {
        let mut cache = PrefixCache::new(3);
        let prompt = tokens(0, 48);
        let hashes = block_hashes(&prompt, BS);
        serve(&mut cache, &prompt);
        serve(&mut cache, &tokens(500, 16)); // evicts the tail block
        assert!(cache.contains(hashes[0]));
        assert!(cache.contains(hashes[1]));
        assert!(!cache.contains(hashes[2]));
        assert_eq!(serve(&mut cache, &prompt), 32);
    }

    #[test]
    fn pinned_blocks_are_not_evicted() {
        let mut cache = PrefixCache::new(2);
        let running = block_hashes(&tokens(0, 32), BS);
        assert_eq!(cache.acquire_prefix(&running), 0);
        assert!(cache.acquire(running[0]));
        assert!(cache.acquire(running[1]));
        assert_eq!(cache.pinned(), 2);
        assert!((cache.usage() - 1.0).abs() < f64::EPSILON);
        // Full of pinned blocks: a new block cannot be cached.
        let other = block_hashes(&tokens(900, 16), BS);
        assert!(!cache.acquire(other[0]));
        cache.release(&running);
        assert_eq!(cache.pinned(), 0);
        assert!(cache.acquire(other[0]));
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn shared_blocks_stay_pinned_until_the_last_user_leaves() {
        let mut cache = PrefixCache::new(1);
        let hash = block_hashes(&tokens(0, 16), BS)[0];
        assert!(cache.acquire(hash));
        assert_eq!(cache.acquire_prefix(&[hash]), 1);
        cache.release(&[hash]);
        assert_eq!(cache.pinned(), 1);
        cache.release(&[hash]);
        assert_eq!(cache.pinned(), 0);
        assert!(cache.contains(hash));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let mut cache = PrefixCache::new(0);
        let prompt = tokens(0, 64);
        serve(&mut cache, &prompt);
        assert_eq!(serve(&mut cache, &prompt), 0);
        assert!(cache.is_empty());
    }
}
