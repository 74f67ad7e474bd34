//! The scheduler: vLLM's continuous batching with chunked prefill, reduced
//! to bookkeeping. It decides what each engine step does; the engine
//! ([`crate::engine`]) times the steps and delivers their tokens.
//!
//! Requests arrive in a FIFO waiting queue. Each step, like vLLM V1's
//! scheduler:
//!
//! 1. every decoding request gets one token out of a budget of
//!    `max_num_batched_tokens` (which holds `max_num_seqs` at least);
//! 2. requests still prefilling get the next chunk of their prompt, in
//!    admission order: what is left of it, or of the budget;
//! 3. waiting requests are admitted, oldest first, while fewer than
//!    `max_num_seqs` run and budget is left. Admission looks the prompt up
//!    in the prefix cache and pins the hit blocks; the hit tokens are not
//!    prefilled. As in vLLM the last prompt token is always computed, so a
//!    prompt of `n` tokens reuses at most `⌊(n-1)/block_size⌋` blocks.
//!
//! A prompt's full blocks enter the cache when the step that computes them
//! is planned, as vLLM V1's `allocate_slots` caches the blocks of the tokens
//! it schedules: a request admitted later in the same step, or in a later
//! one, reuses the blocks another request is computing, since the engine
//! writes a layer's KV before any request of the batch attends to it. So
//! siblings of a system prompt that arrive together prefill it once.
//!
//! When a step ends ([`Scheduler::complete`]), prefill chunks count as
//! computed; a request whose prompt is complete, and every decoding one,
//! gets its next token. Each further full block of prompt plus output is
//! cached as decoding fills it (the newest token's KV is never computed, so
//! never cached). A request that reached its `max_tokens` leaves and unpins
//! its blocks.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::{BlockHash, PrefixCache, extend_block_hashes};
use crate::metrics::FinishReason;
use crate::sampler::{Sampler, TextStyle, Vocabulary};
use crate::tokenize::TokenId;

/// The scheduler's name for a request; increasing in arrival order.
pub type SeqId = u64;

/// How much work one step may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Running requests at most.
    pub max_num_seqs: usize,
    /// Tokens per step (decode tokens plus prompt tokens); at least
    /// `max_num_seqs`.
    pub max_num_batched_tokens: usize,
}

/// A request as the scheduler receives it.
#[derive(Clone, Debug)]
pub struct NewSeq {
    /// The request's id, for logs.
    pub request_id: String,
    /// The prompt's token ids; not empty.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate; at least 1.
    pub max_tokens: usize,
    /// Seed of the generated text.
    pub seed: u64,
    /// Spelling of the generated text.
    pub style: TextStyle,
}

/// One request's state.
#[derive(Debug)]
struct Seq {
    request_id: String,
    /// Prompt, then every generated token.
    tokens: Vec<TokenId>,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    arrival: Instant,
    /// Prompt tokens served from the prefix cache (known once admitted).
    cached_tokens: usize,
    /// Prompt tokens whose KV is computed, cache hits included.
    computed: usize,
    /// Chained hashes of the full blocks of `tokens` seen so far.
    blocks: Vec<BlockHash>,
    /// `blocks[..pinned]` are pinned in the cache for this request.
    pinned: usize,
    /// Cleared once the cache had no room, ending this request's insertions.
    caching: bool,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// What a step does for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Work {
    /// Computes this many more prompt tokens.
    Prefill(usize),
    /// Generates one token.
    Decode,
}

/// A request that left the waiting queue in this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// The request.
    pub id: SeqId,
    /// Its id, for logs.
    pub request_id: String,
    /// Its prompt length.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    /// Time spent waiting.
    pub queued: Duration,
}

/// The plan of one engine step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Work per request, in admission order.
    pub work: Vec<(SeqId, Work)>,
    /// Requests admitted for this step.
    pub admitted: Vec<Admission>,
    /// Prompt tokens computed in the step.
    pub prefill_tokens: usize,
    /// Requests decoding one token in the step.
    pub decodes: usize,
}

/// A token produced by a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Output {
    /// The request.
    pub id: SeqId,
    /// The token's text.
    pub text: &'static str,
    /// Set on the request's last token.
    pub finish_reason: Option<FinishReason>,
    /// Whether this is the request's first token.
    pub first: bool,
    /// Prompt tokens the request got from the prefix cache.
    pub cached_tokens: usize,
    /// When the request arrived.
    pub arrival: Instant,
}

/// A request removed before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Removed {
    /// When it arrived.
    pub arrival: Instant,
    /// Whether it was running (else waiting).
    pub was_running: bool,
}

/// Waiting and running requests, and the prefix cache they share.
#[derive(Debug)]
pub struct Scheduler {
    limits: Limits,
    block_size: usize,
    cache: PrefixCache,
    waiting: VecDeque<(SeqId, Seq)>,
    running: BTreeMap<SeqId, Seq>,
    next_id: SeqId,
}

impl Scheduler {
    /// An idle scheduler with an empty cache of `cache_blocks` blocks.
    pub fn new(limits: Limits, block_size: usize, cache_blocks: usize) -> Self {
        Self {
            limits,
            block_size,
            cache: PrefixCache::new(cache_blocks),
            waiting: VecDeque::new(),
            running: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// Queues a request that arrived at `now`; returns its id.
    pub fn add(&mut self, request: NewSeq, now: Instant) -> SeqId {
        let NewSeq {
            request_id,
            prompt,
            max_tokens,
            seed,
            style,
        } = request;
        let id = self.next_id;
        self.next_id += 1;
        let seq = Seq {
            request_id,
            sampler: Sampler::new(seed, &prompt, style),
            prompt_len: prompt.len(),
            tokens: prompt,
            max_tokens,
            arrival: now,
            cached_tokens: 0,
            computed: 0,
            blocks: Vec::new(),
            pinned: 0,
            caching: true,
        };
        self.waiting.push_back((id, seq));
        id
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// The prefix cache.
    pub fn cache(&self) -> &PrefixCache {
        &self.cache
    }

    /// Plans the next step at `now`, admitting waiting requests; `None` when
    /// there is nothing to do.
    pub fn schedule(&mut self, now: Instant) -> Option<Step> {
        let mut step = Step::default();
        let mut budget = self.limits.max_num_batched_tokens;
        // Decodes first: there are at most `max_num_seqs` of them, which the
        // budget always holds, so a long prefill never starves them.
        for (&id, seq) in &self.running {
            if seq.computed == seq.prompt_len {
                step.decodes += 1;
                budget -= 1;
                step.work.push((id, Work::Decode));
            }
        }
        for (&id, seq) in &mut self.running {
            let left = seq.prompt_len - seq.computed;
            if left > 0 && budget > 0 {
                let chunk = left.min(budget);
                step.prefill_tokens += chunk;
                budget -= chunk;
                step.work.push((id, Work::Prefill(chunk)));
                let scheduled = seq.computed + chunk;
                cache_computed_blocks(&mut self.cache, self.block_size, seq, scheduled);
            }
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some((id, mut seq)) = self.waiting.pop_front() else {
                break;
            };
            self.admit(&mut seq);
            let chunk = (seq.prompt_len - seq.computed).min(budget);
            step.prefill_tokens += chunk;
            budget -= chunk;
            step.work.push((id, Work::Prefill(chunk)));
            let scheduled = seq.computed + chunk;
            cache_computed_blocks(&mut self.cache, self.block_size, &mut seq, scheduled);
            step.admitted.push(Admission {
                id,
                request_id: seq.request_id.clone(),
                prompt_tokens: seq.prompt_len,
                cached_tokens: seq.cached_tokens,
                queued: now.saturating_duration_since(seq.arrival),
            });
            self.running.insert(id, seq);
        }
        (!step.work.is_empty()).then_some(step)
    }

    /// Looks `seq`'s prompt up in the prefix cache and pins the hit blocks.
    fn admit(&mut self, seq: &mut Seq) {
        extend_block_hashes(
            &mut seq.blocks,
            &seq.tokens[..seq.prompt_len],
            self.block_size,
        );
        // At least one prompt token is always computed (vLLM needs its logits).
        let reusable = (seq.prompt_len - 1) / self.block_size;
        let hits = self.cache.acquire_prefix(&seq.blocks[..reusable]);
        seq.pinned = hits;
        seq.cached_tokens = hits * self.block_size;
        seq.computed = seq.cached_tokens;
    }

    /// Applies a finished step: prompt chunks become computed, and requests
    /// done prefilling or decoding get their next token, drawn from
    /// `vocabulary`. Requests removed since [`Self::schedule`] are skipped.
    /// Tokens come out in the step's order.
    pub fn complete(&mut self, step: &Step, vocabulary: &Vocabulary) -> Vec<Output> {
        let mut outputs = Vec::with_capacity(step.work.len());
        for &(id, work) in &step.work {
            let Some(seq) = self.running.get_mut(&id) else {
                continue;
            };
            if let Work::Prefill(chunk) = work {
                // The chunk's blocks were cached when the step was planned.
                seq.computed += chunk;
                if seq.computed < seq.prompt_len {
                    continue;
                }
            }
            let token = seq.sampler.next_token(vocabulary);
            seq.tokens.push(token.id);
            // Everything but the newest token has had its KV computed.
            let computed = seq.tokens.len() - 1;
            cache_computed_blocks(&mut self.cache, self.block_size, seq, computed);
            let generated = seq.generated();
            let finish_reason = (generated >= seq.max_tokens).then_some(FinishReason::Length);
            outputs.push(Output {
                id,
                text: token.text,
                finish_reason,
                first: generated == 1,
                cached_tokens: seq.cached_tokens,
                arrival: seq.arrival,
            });
            if finish_reason.is_some() {
                self.remove(id);
            }
        }
        outputs
    }

    /// Removes request `id`, waiting or running, unpinning its blocks.
    /// `None` if it is not here (finished, or never added).
    pub fn remove(&mut self, id: SeqId) -> Option<Removed> {
        if let Some(seq) = self.running.remove(&id) {
            self.cache.release(&seq.blocks[..seq.pinned]);
            return Some(Removed {
                arrival: seq.arrival,
                was_running: true,
            });
        }
        let at = self
            .waiting
            .iter()
            .position(|(waiting, _)| *waiting == id)?;
        let (_, seq) = self.waiting.remove(at)?;
        Some(Removed {
            arrival: seq.arrival,
            was_running: false,
        })
    }

    /// Removes every request, unpinning their blocks; returns their ids.
    pub fn clear(&mut self) -> Vec<SeqId> {
        let mut ids: Vec<SeqId> = self.running.keys().copied().collect();
        ids.extend(self.waiting.iter().map(|(id, _)| *id));
        for &id in &ids {
            self.remove(id);
        }
        ids
    }
}

/// Caches (and pins) the full blocks among the first `computed` tokens of
/// `seq`: computed, or scheduled in the step being planned.
fn cache_computed_blocks(
    cache: &mut PrefixCache,
    block_size: usize,
    seq: &mut Seq,
    computed: usize,
) {
    extend_block_hashes(&mut seq.blocks, &seq.tokens[..computed], block_size);
    if !seq.caching || seq.pinned >= seq.blocks.len() {
        return;
    }
    for &hash in &seq.blocks[seq.pinned..] {
        if !cache.acquire(hash) {
            // No room: later blocks could never be reached anyway.
            seq.caching = false;
            break;
        }
        seq.pinned += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::Tokenizer;

    const BS: usize = 16;

    fn vocabulary() -> Vocabulary {
        Vocabulary::new(Tokenizer::shared().expect("embedded")).expect("valid vocabulary")
    }

    fn scheduler(max_num_seqs: usize, max_num_batched_tokens: usize) -> Scheduler {
        Scheduler::new(
            Limits {
                max_num_seqs,
                max_num_batched_tokens,
            },
            BS,
            64,
        )
    }

    fn request(base: u32, prompt_len: usize, max_tokens: usize) -> NewSeq {
        NewSeq {
            request_id: format!("r{base}"),
            prompt: (base..).take(prompt_len).collect(),
            max_tokens,
            seed: 0,
            style: TextStyle::Completion,
        }
    }

    /// Runs steps until idle; returns the number of steps.
    fn drain(scheduler: &mut Scheduler, vocabulary: &Vocabulary, now: Instant) -> usize {
        let mut steps = 0;
        while let Some(step) = scheduler.schedule(now) {
            scheduler.complete(&step, vocabulary);
            steps += 1;
            assert!(steps < 10_000, "bounded");
        }
        steps
    }

    #[test]
    fn at_most_max_num_seqs_run() {
        let now = Instant::now();
        let mut s = scheduler(2, 2048);
        let ids: Vec<SeqId> = (0..4)
            .map(|i| s.add(request(i * 100, 10, 3), now))
            .collect();
        let step = s.schedule(now).expect("work");
        assert_eq!(
            step.work,
            [(ids[0], Work::Prefill(10)), (ids[1], Work::Prefill(10))]
        );
        assert_eq!((s.running(), s.waiting()), (2, 2));
        assert_eq!(step.admitted.len(), 2);
    }

    #[test]
    fn waiting_requests_start_when_a_slot_frees() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(1, 2048);
        let a = s.add(request(0, 10, 2), now);
        let b = s.add(request(100, 10, 2), now);
        let first = s.schedule(now).expect("work");
        assert_eq!(first.work, [(a, Work::Prefill(10))]);
        let out = s.complete(&first, &vocabulary);
        assert_eq!(out.len(), 1);
        assert!(out[0].first);
        // Decoding `a`'s second and last token; `b` still waits.
        let second = s.schedule(now).expect("work");
        assert_eq!(second.work, [(a, Work::Decode)]);
        let out = s.complete(&second, &vocabulary);
        assert_eq!(out[0].finish_reason, Some(FinishReason::Length));
        let later = now + Duration::from_millis(7);
        let third = s.schedule(later).expect("work");
        assert_eq!(third.work, [(b, Work::Prefill(10))]);
        assert_eq!(third.admitted[0].queued, Duration::from_millis(7));
    }

    #[test]
    fn long_prompts_are_prefilled_in_chunks_beside_decodes() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(4, 100);
        let short = s.add(request(0, 10, 50), now);
        let step = s.schedule(now).expect("work");
        s.complete(&step, &vocabulary);
        let long = s.add(request(1000, 250, 5), now);
        let mut chunks = Vec::new();
        for _ in 0..3 {
            let step = s.schedule(now).expect("work");
            assert_eq!(step.work[0], (short, Work::Decode), "decodes go first");
            assert_eq!(step.decodes, 1);
            chunks.push(step.work[1]);
            let out = s.complete(&step, &vocabulary);
            assert_eq!(
                out.iter().filter(|o| o.id == long).count(),
                usize::from(chunks.len() == 3)
            );
        }
        assert_eq!(
            chunks,
            [
                (long, Work::Prefill(99)),
                (long, Work::Prefill(99)),
                (long, Work::Prefill(52))
            ]
        );
    }

    #[test]
    fn a_shared_prefix_is_not_prefilled_again() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(4, 2048);
        s.add(request(0, 40, 1), now);
        drain(&mut s, &vocabulary, now);
        let mut prompt = request(0, 40, 1);
        prompt.prompt.extend([7, 7, 7]);
        s.add(prompt, now);
        let step = s.schedule(now).expect("work");
        assert_eq!(step.admitted[0].cached_tokens, 32);
        assert_eq!(step.prefill_tokens, 43 - 32);
    }

    #[test]
    fn siblings_admitted_together_prefill_their_shared_prefix_once() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(4, 2048);
        // Two prompts sharing 48 tokens (three full blocks), then different.
        let mut first = request(0, 48, 1);
        first.prompt.extend([1, 2, 3, 4, 5]);
        let mut second = request(0, 48, 1);
        second.prompt.extend([9, 9]);
        let a = s.add(first, now);
        let b = s.add(second, now);
        let step = s.schedule(now).expect("work");
        let cached: Vec<(SeqId, usize)> = step
            .admitted
            .iter()
            .map(|admission| (admission.id, admission.cached_tokens))
            .collect();
        assert_eq!(cached, [(a, 0), (b, 48)], "b reuses what a computes");
        assert_eq!(step.work, [(a, Work::Prefill(53)), (b, Work::Prefill(2))]);
        assert_eq!(step.prefill_tokens, 55);
        let out = s.complete(&step, &vocabulary);
        assert_eq!(out.iter().filter(|o| o.first).count(), 2);
        assert_eq!(out[1].cached_tokens, 48);
    }

    #[test]
    fn a_sibling_reuses_a_running_prefill_s_chunk_planned_in_its_step() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(4, 40);
        let a = s.add(request(0, 100, 1), now);
        for _ in 0..2 {
            let step = s.schedule(now).expect("work");
            assert_eq!(step.work, [(a, Work::Prefill(40))]);
            s.complete(&step, &vocabulary);
        }
        // `a`'s last chunk (tokens 80..100) is planned before `b` is
        // admitted: `b` reuses the six full blocks `a` will have computed,
        // the last of them in this very step.
        let mut sibling = request(0, 96, 1);
        sibling.prompt.push(7);
        let b = s.add(sibling, now);
        let step = s.schedule(now).expect("work");
        assert_eq!(step.work, [(a, Work::Prefill(20)), (b, Work::Prefill(1))]);
        assert_eq!(step.admitted[0].cached_tokens, 96);
    }

    #[test]
    fn removal_unpins_and_frees_the_slot() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(1, 2048);
        let a = s.add(request(0, 40, 100), now);
        let b = s.add(request(100, 10, 1), now);
        let step = s.schedule(now).expect("work");
        s.complete(&step, &vocabulary);
        assert_eq!(s.cache().pinned(), 2);
        assert_eq!(
            s.remove(b),
            Some(Removed {
                arrival: now,
                was_running: false
            })
        );
        assert!(s.remove(a).is_some_and(|r| r.was_running));
        assert_eq!(s.cache().pinned(), 0);
        assert!(s.is_idle());
        assert_eq!(s.remove(a), None);
    }

    #[test]
    fn a_step_planned_before_a_removal_skips_it() {
        let vocabulary = vocabulary();
        let now = Instant::now();
        let mut s = scheduler(2, 2048);
        let a = s.add(request(0, 10, 3), now);
        let b = s.add(request(100, 10, 3), now);
        let step = s.schedule(now).expect("work");
        s.remove(a);
        let out = s.complete(&step, &vocabulary);
        assert_eq!(out.iter().map(|o| o.id).collect::<Vec<_>>(), [b]);
    }
}
