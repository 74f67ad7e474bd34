//! The simulated engine: one request's life from scheduling to its last
//! token, with the prefix cache, the latency model and the metrics.
//!
//! [`Engine::start`] schedules a request at once (there is no queue yet): it
//! looks the prompt up in the prefix cache and pins the hit blocks. The
//! returned [`Generation`] is then pulled token by token:
//!
//! * the first token comes after the prefill, `prefill_overhead +
//!   uncached_tokens × prefill_per_token`;
//! * every later one `inter_token` after the previous one (deadlines are
//!   absolute, so a slow reader receives a burst, as from a real server that
//!   kept generating).
//!
//! Blocks become cached once their KV would be computed: the prompt's full
//! blocks at the end of the prefill, then each further full block of prompt
//! plus output as decoding fills it (the newest token's KV is never computed,
//! so it is never cached). Like vLLM, at least the last prompt token is always
//! recomputed, so a prompt of `n` tokens reuses at most `⌊(n-1)/block_size⌋`
//! blocks.
//!
//! Dropping a [`Generation`] before its last token (a client disconnect)
//! stops it and counts an abort; either way its blocks are unpinned.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::cache::{BlockHash, PrefixCache, extend_block_hashes};
use crate::config::{Config, Timing};
use crate::error::Error;
use crate::metrics::{FinishReason, Metrics};
use crate::sampler::{Sampler, TextStyle, Vocabulary};
use crate::tokenize::{TokenId, Tokenizer};

/// Stand-in deadline for a delay too long to represent (absurd settings).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The shared state of one simulated vLLM engine.
#[derive(Debug)]
pub struct Engine {
    /// Instance name, for logs.
    id: String,
    block_size: usize,
    timing: Timing,
    vocabulary: Vocabulary,
    cache: Mutex<PrefixCache>,
    metrics: Metrics,
}

/// What [`Engine::start`] needs to know about a request.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The request's id, for logs.
    pub request_id: String,
    /// The prompt's token ids.
    pub prompt: Vec<TokenId>,
    /// Tokens to generate; at least 1.
    pub max_tokens: usize,
    /// Seed of the generated text.
    pub seed: u64,
    /// Spelling of the generated text.
    pub style: TextStyle,
}

/// One generated token, as handed to the API layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// Its text.
    pub text: &'static str,
    /// Set on the last token.
    pub finish_reason: Option<FinishReason>,
}

impl Engine {
    /// An idle engine for `config`, generating words the tokenizer knows.
    pub fn new(config: &Config, tokenizer: &Tokenizer) -> Result<Self, Error> {
        config.validate()?;
        Ok(Self {
            id: config.id.clone(),
            block_size: config.block_size,
            timing: Timing::try_from(config)?,
            vocabulary: Vocabulary::new(tokenizer)?,
            cache: Mutex::new(PrefixCache::new(config.kv_cache_blocks)),
            metrics: Metrics::new(&config.model),
        })
    }

    /// The engine's counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The Prometheus exposition of the engine's metrics.
    pub fn render_metrics(&self) -> String {
        let usage = self.cache().usage();
        self.metrics.render(usage)
    }

    /// Schedules `request`: looks its prompt up in the prefix cache and pins
    /// the reused blocks. Generation starts when the result is first polled;
    /// its clock starts now.
    pub fn start(self: &Arc<Self>, request: GenerationRequest) -> Generation {
        let GenerationRequest {
            request_id,
            prompt,
            max_tokens,
            seed,
            style,
        } = request;
        let mut blocks = Vec::new();
        extend_block_hashes(&mut blocks, &prompt, self.block_size);
        // At least one prompt token is always computed (vLLM needs its logits).
        let reusable = prompt.len().saturating_sub(1) / self.block_size;
        let hit_blocks = self.cache().acquire_prefix(&blocks[..reusable]);
        let cached_tokens = hit_blocks * self.block_size;
        self.metrics.request_started(prompt.len(), cached_tokens);
        tracing::info!(
            sim = %self.id,
            "Retrieved {cached_tokens} out of {} tokens for request {request_id}",
            prompt.len(),
        );
        Generation {
            engine: Arc::clone(self),
            sampler: Sampler::new(seed, &prompt, style),
            prompt_tokens: prompt.len(),
            tokens: prompt,
            request_id,
            cached_tokens,
            max_tokens,
            blocks,
            pinned: hit_blocks,
            caching: true,
            deadline: Instant::now(),
            finished: false,
        }
    }

    /// The prefix cache, locked. A panic while it was held cannot leave it
    /// in a state worse than miscounted hits, so poisoning is ignored.
    fn cache(&self) -> MutexGuard<'_, PrefixCache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A scheduled request, producing its tokens on demand.
#[derive(Debug)]
pub struct Generation {
    engine: Arc<Engine>,
    request_id: String,
    /// Prompt, then every generated token.
    tokens: Vec<TokenId>,
    prompt_tokens: usize,
    cached_tokens: usize,
    max_tokens: usize,
    sampler: Sampler,
    /// Chained hashes of the full blocks of `tokens` seen so far.
    blocks: Vec<BlockHash>,
    /// `blocks[..pinned]` are pinned in the cache for this request.
    pinned: usize,
    /// Cleared once the cache had no room, ending this request's insertions.
    caching: bool,
    /// When the latest token was (or, before the first, the request was) due.
    deadline: Instant,
    finished: bool,
}

impl Generation {
    /// The request's id.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Prompt length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Prompt tokens served from the prefix cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Tokens generated so far.
    pub fn completion_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_tokens
    }

    /// Waits for and returns the next token, or `None` once the last one
    /// (the one carrying a finish reason) was returned.
    pub async fn next_token(&mut self) -> Option<Token> {
        if self.finished {
            return None;
        }
        let generated = self.completion_tokens();
        let timing = &self.engine.timing;
        let delay = if generated == 0 {
            timing.prefill(self.prompt_tokens - self.cached_tokens)
        } else {
            timing.inter_token
        };
        if !delay.is_zero() {
            self.deadline = self
                .deadline
                .checked_add(delay)
                .unwrap_or_else(|| Instant::now() + FOREVER);
            tokio::time::sleep_until(self.deadline).await;
        }

        let engine = Arc::clone(&self.engine);
        let token = self.sampler.next_token(&engine.vocabulary);
        self.tokens.push(token.id);
        engine.metrics.token_generated();
        // Everything but the newest token has had its KV computed.
        self.cache_computed_blocks(self.tokens.len() - 1);

        let finish_reason = (generated + 1 >= self.max_tokens).then_some(FinishReason::Length);
        if let Some(reason) = finish_reason {
            self.finish(reason);
        }
        Some(Token {
            text: token.text,
            finish_reason,
        })
    }

    /// Caches (and pins) the full blocks among the first `computed` tokens.
    fn cache_computed_blocks(&mut self, computed: usize) {
        extend_block_hashes(
            &mut self.blocks,
            &self.tokens[..computed],
            self.engine.block_size,
        );
        if !self.caching || self.pinned == self.blocks.len() {
            return;
        }
        let mut cache = self.engine.cache();
        for &hash in &self.blocks[self.pinned..] {
            if !cache.acquire(hash) {
                // No room: later blocks could never be reached anyway.
                self.caching = false;
                break;
            }
            self.pinned += 1;
        }
    }

    /// Unpins the request's blocks and records how it ended.
    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.engine.cache().release(&self.blocks[..self.pinned]);
        self.pinned = 0;
        self.engine.metrics.request_finished(reason);
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if !self.finished {
            tracing::debug!(
                sim = %self.engine.id,
                request_id = %self.request_id,
                generated = self.completion_tokens(),
                "request aborted",
            );
            self.finish(FinishReason::Abort);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(config: Config) -> Arc<Engine> {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        Arc::new(Engine::new(&config, tokenizer).expect("test config is valid"))
    }

    fn request(prompt: Vec<TokenId>, max_tokens: usize) -> GenerationRequest {
        GenerationRequest {
            request_id: "test".to_owned(),
            prompt,
            max_tokens,
            seed: 0,
            style: TextStyle::Completion,
        }
    }

    async fn run(engine: &Arc<Engine>, prompt: Vec<TokenId>, max_tokens: usize) -> (usize, String) {
        let mut generation = engine.start(request(prompt, max_tokens));
        let cached = generation.cached_tokens();
        let mut text = String::new();
        while let Some(token) = generation.next_token().await {
            text.push_str(token.text);
        }
        (cached, text)
    }

    fn tokens(base: u32, n: usize) -> Vec<TokenId> {
        (base..).take(n).collect()
    }

    #[tokio::test]
    async fn generates_max_tokens_then_stops() {
        let engine = engine(Config::for_tests("t"));
        let mut generation = engine.start(request(tokens(0, 5), 3));
        let mut reasons = Vec::new();
        while let Some(token) = generation.next_token().await {
            reasons.push(token.finish_reason);
        }
        assert_eq!(reasons, [None, None, Some(FinishReason::Length)]);
        assert_eq!(generation.completion_tokens(), 3);
        assert_eq!(engine.metrics().finished(FinishReason::Length), 1);
        assert_eq!(engine.metrics().running(), 0);
    }

    #[tokio::test]
    async fn shared_full_blocks_are_reused() {
        let engine = engine(Config::for_tests("t"));
        let mut first = tokens(0, 48);
        first.extend(tokens(1000, 5));
        let mut second = tokens(0, 48);
        second.extend(tokens(2000, 9));
        assert_eq!(run(&engine, first, 1).await.0, 0);
        assert_eq!(run(&engine, second, 1).await.0, 48);
        assert_eq!(engine.metrics().prefix_cache_hits(), 48);
        assert_eq!(engine.metrics().prefix_cache_queries(), 53 + 57);
    }

    #[tokio::test]
    async fn the_last_prompt_token_is_always_recomputed() {
        let engine = engine(Config::for_tests("t"));
        let prompt = tokens(0, 32);
        run(&engine, prompt.clone(), 1).await;
        assert_eq!(run(&engine, prompt, 1).await.0, 16);
    }

    #[tokio::test]
    async fn generated_blocks_are_cached_for_the_next_turn() {
        let engine = engine(Config::for_tests("t"));
        let prompt = tokens(0, 10);
        let mut generation = engine.start(request(prompt.clone(), 40));
        while generation.next_token().await.is_some() {}
        // The follow-up holds prompt + answer: 50 tokens = 3 full blocks.
        let follow_up = generation.tokens.clone();
        drop(generation);
        assert_eq!(run(&engine, follow_up, 1).await.0, 48);
    }

    #[tokio::test]
    async fn same_request_same_text() {
        let engine = engine(Config::for_tests("t"));
        let (_, a) = run(&engine, tokens(5, 20), 8).await;
        let (_, b) = run(&engine, tokens(5, 20), 8).await;
        assert_eq!(a, b);
        assert_eq!(a.split_whitespace().count(), 8);
    }

    #[tokio::test]
    async fn dropping_early_counts_an_abort_and_unpins() {
        let engine = engine(Config::for_tests("t"));
        let mut generation = engine.start(request(tokens(0, 40), 10));
        assert!(generation.next_token().await.is_some());
        assert_eq!(engine.cache().pinned(), 2);
        drop(generation);
        assert_eq!(engine.metrics().finished(FinishReason::Abort), 1);
        assert_eq!(engine.metrics().running(), 0);
        assert_eq!(engine.cache().pinned(), 0);
        assert_eq!(engine.cache().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_follow_the_latency_model() {
        let config = Config {
            prefill_overhead_ms: 10.0,
            prefill_per_token_us: 1000.0,
            itl_ms: 5.0,
            ..Config::for_tests("t")
        };
        let engine = engine(Config {
            time_scale: 1.0,
            ..config
        });
        let start = Instant::now();
        let mut generation = engine.start(request(tokens(0, 20), 3));
        generation.next_token().await;
        assert_eq!(start.elapsed().as_millis(), 10 + 20);
        generation.next_token().await;
        generation.next_token().await;
        assert_eq!(start.elapsed().as_millis(), 10 + 20 + 2 * 5);
    }
}
