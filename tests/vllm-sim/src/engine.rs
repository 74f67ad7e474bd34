//! The simulated engine: a step loop over the [`Scheduler`], timed by the
//! latency model, delivering each request's tokens as they are produced.
//!
//! [`Engine::spawn`] starts the loop on the current tokio runtime. Like
//! vLLM's engine core it runs one step after another while there is work:
//! it asks the scheduler for a step (admitting waiting requests), waits the
//! step's simulated duration ([`Timing::step`]: the prefill part
//! `prefill_overhead + prompt_tokens × prefill_per_token` plus the decode
//! part `itl + itl_per_seq × (decodes − 1)`), then hands the step's tokens to
//! their requests. Deadlines are absolute (step *n+1* starts when step *n*
//! was due), so timer rounding does not drift the rate; a loop that fell more
//! than [`CATCH_UP_LIMIT`] behind (a starved host) starts the next step
//! from now instead of bursting to catch up. With no work the loop sleeps
//! until a request arrives, and it ends once the engine is dropped.
//!
//! [`Engine::submit`] queues a request and returns its [`Generation`], the
//! receiving end of its tokens. Dropping a [`Generation`] before its last
//! token (a client disconnect) removes the request, waiting or running,
//! frees its slot and counts an abort.
//!
//! With `--die-after-tokens N` the engine dies once it has generated `N`
//! tokens: every request is dropped, every [`Generation`] ends with
//! [`EngineDied`], and [`Engine::death`] fires so the server can drop its
//! connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::config::{Config, Timing};
use crate::error::Error;
use crate::metrics::{CacheShape, FinishReason, Gauges, Metrics};
use crate::sampler::Vocabulary;
use crate::scheduler::{Limits, Scheduler, SeqId, Step};
use crate::tokenize::Tokenizer;

pub use crate::scheduler::NewSeq as GenerationRequest;

/// How late the loop may be on a step's deadline and still schedule the next
/// step from that deadline rather than from now.
pub const CATCH_UP_LIMIT: Duration = Duration::from_millis(5);

/// Stand-in for a step too long to represent (absurd settings).
const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// One generated token, as handed to the API layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// Its text.
    pub text: &'static str,
    /// Set on the last token.
    pub finish_reason: Option<FinishReason>,
}

/// The engine died (`--die-after-tokens`) before the request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the engine died (--die-after-tokens) before the request ended")]
pub struct EngineDied;

/// What a request's channel carries.
#[derive(Clone, Copy, Debug)]
struct Emitted {
    token: Token,
    cached_tokens: usize,
}

/// How far behind its latency model the step loop ran: each timed step's
/// end came this much after its deadline, because the host did not run the
/// loop in time (a simulator sharing CPUs with its load and the router
/// under test). Tokens go out when the loop wakes, so this much of what a
/// client measures is the host's, not the model's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lateness {
    /// Timed steps ended.
    pub steps: u64,
    /// Σ how late each of them woke.
    pub late: Duration,
}

impl Lateness {
    /// What happened between `earlier` and `self` (two readings of one
    /// engine).
    pub fn since(self, earlier: Lateness) -> Lateness {
        Lateness {
            steps: self.steps.saturating_sub(earlier.steps),
            late: self.late.saturating_sub(earlier.late),
        }
    }
}

/// The shared state of one simulated vLLM engine.
#[derive(Debug)]
pub struct Engine {
    /// Instance name, for logs.
    id: String,
    timing: Timing,
    vocabulary: Vocabulary,
    metrics: Metrics,
    die_after_tokens: Option<u64>,
    state: Mutex<State>,
    /// Wakes the idle step loop.
    wake: Arc<Notify>,
    /// Set once, when the engine dies.
    death: watch::Sender<bool>,
    /// [`Lateness::steps`].
    timed_steps: AtomicU64,
    /// [`Lateness::late`], in nanoseconds.
    late_ns: AtomicU64,
}

#[derive(Debug)]
struct State {
    scheduler: Scheduler,
    /// Where each live request's tokens go.
    subscribers: HashMap<SeqId, mpsc::UnboundedSender<Emitted>>,
    dead: bool,
}

impl Engine {
    /// Builds an idle engine for `config`, generating words the tokenizer
    /// knows, and starts its step loop on the current tokio runtime (panics
    /// outside one).
    pub fn spawn(config: &Config, tokenizer: &Tokenizer) -> Result<Arc<Self>, Error> {
        config.validate()?;
        let limits = Limits {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
        };
        let engine = Arc::new(Self {
            id: config.id.clone(),
            timing: Timing::try_from(config)?,
            vocabulary: Vocabulary::new(tokenizer)?,
            metrics: Metrics::new(
                &config.model,
                CacheShape {
                    block_size: config.block_size,
                    blocks: config.kv_cache_blocks,
                },
            ),
            die_after_tokens: config.die_after_tokens,
            state: Mutex::new(State {
                scheduler: Scheduler::new(limits, config.block_size, config.kv_cache_blocks),
                subscribers: HashMap::new(),
                dead: false,
            }),
            wake: Arc::new(Notify::new()),
            death: watch::Sender::new(false),
            timed_steps: AtomicU64::new(0),
            late_ns: AtomicU64::new(0),
        });
        tokio::spawn(run(Arc::downgrade(&engine), Arc::clone(&engine.wake)));
        Ok(engine)
    }

    /// The engine's counters and histograms.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// How far behind its latency model the step loop has run so far.
    pub fn lateness(&self) -> Lateness {
        Lateness {
            steps: self.timed_steps.load(Ordering::Relaxed),
            late: Duration::from_nanos(self.late_ns.load(Ordering::Relaxed)),
        }
    }

    /// Notes a timed step that ended `late` after its deadline.
    fn woke_late(&self, late: Duration) {
        self.timed_steps.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(late.as_nanos()).unwrap_or(u64::MAX);
        self.late_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Running and waiting requests and KV-cache usage, now.
    pub fn gauges(&self) -> Gauges {
        let state = self.state();
        Gauges {
            running: state.scheduler.running(),
            waiting: state.scheduler.waiting(),
            kv_cache_usage: state.scheduler.cache().usage(),
        }
    }

    /// The Prometheus exposition of the engine's metrics.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(self.gauges())
    }

    /// Whether the engine died (`--die-after-tokens`).
    pub fn is_dead(&self) -> bool {
        *self.death.borrow()
    }

    /// A receiver whose value turns `true` when the engine dies.
    pub fn death(&self) -> watch::Receiver<bool> {
        self.death.subscribe()
    }

    /// Queues `request`. Its tokens arrive through the returned
    /// [`Generation`]; a dead engine's generations end at once.
    pub fn submit(self: &Arc<Self>, request: GenerationRequest) -> Generation {
        let (tx, rx) = mpsc::unbounded_channel();
        let request_id = request.request_id.clone();
        let prompt_tokens = request.prompt.len();
        let id = {
            let mut state = self.state();
            let id = state.scheduler.add(request, Instant::now());
            if !state.dead {
                state.subscribers.insert(id, tx);
            } else {
                state.scheduler.remove(id);
            }
            id
        };
        self.wake.notify_one();
        Generation {
            engine: Arc::clone(self),
            id,
            request_id,
            rx,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            phase: Phase::Open,
        }
    }

    /// Plans the next step and accounts for the requests it admits; `None`
    /// when idle.
    fn plan(&self, now: Instant) -> Option<Step> {
        let mut state = self.state();
        if state.dead {
            return None;
        }
        let step = state.scheduler.schedule(now)?;
        for admitted in &step.admitted {
            self.metrics.request_scheduled(
                admitted.prompt_tokens,
                admitted.cached_tokens,
                admitted.queued,
            );
            tracing::info!(
                sim = %self.id,
                "Retrieved {} out of {} tokens for request {}",
                admitted.cached_tokens,
                admitted.prompt_tokens,
                admitted.request_id,
            );
        }
        Some(step)
    }

    /// Applies a step that ended at `now`: delivers its tokens, records
    /// latencies, and dies if the token limit was reached.
    fn complete(&self, step: &Step, now: Instant) {
        let mut state = self.state();
        if state.dead {
            return;
        }
        let outputs = state.scheduler.complete(step, &self.vocabulary);
        for output in outputs {
            let since_arrival = now.saturating_duration_since(output.arrival);
            self.metrics
                .token_generated(output.first.then_some(since_arrival));
            let emitted = Emitted {
                token: Token {
                    text: output.text,
                    finish_reason: output.finish_reason,
                },
                cached_tokens: output.cached_tokens,
            };
            if let Some(reason) = output.finish_reason {
                self.metrics.request_finished(reason, since_arrival);
                if let Some(tx) = state.subscribers.remove(&output.id) {
                    let _ = tx.send(emitted);
                }
            } else if let Some(tx) = state.subscribers.get(&output.id) {
                let _ = tx.send(emitted);
            }
            let generated = self.metrics.generation_tokens();
            if self
                .die_after_tokens
                .is_some_and(|limit| generated >= limit)
            {
                self.die(&mut state, generated);
                return;
            }
        }
    }

    /// The simulated crash: drops every request and announces the death.
    fn die(&self, state: &mut State, generated: u64) {
        tracing::error!(
            sim = %self.id,
            "simulated crash after {generated} generated tokens (--die-after-tokens)"
        );
        state.dead = true;
        state.scheduler.clear();
        // Dropping the senders ends every generation with `EngineDied`.
        state.subscribers.clear();
        self.death.send_replace(true);
    }

    /// Removes a request whose client left; counts an abort if it was
    /// still waiting or running.
    fn abort(&self, id: SeqId, request_id: &str) {
        let mut state = self.state();
        state.subscribers.remove(&id);
        if let Some(removed) = state.scheduler.remove(id) {
            let e2e = Instant::now().saturating_duration_since(removed.arrival);
            self.metrics.request_finished(FinishReason::Abort, e2e);
            tracing::debug!(
                sim = %self.id,
                %request_id,
                running = removed.was_running,
                "request aborted",
            );
        }
    }

    /// The engine's state, locked. A panic while it was held cannot leave it
    /// in a state worse than miscounted hits, so poisoning is ignored.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Lets the idle loop see that the engine is gone.
        self.wake.notify_one();
    }
}

/// The step loop. Holds the engine only while stepping, so dropping the
/// last other handle ends it.
async fn run(engine: Weak<Engine>, wake: Arc<Notify>) {
    // When the previous step was due, while the engine is busy.
    let mut due: Option<Instant> = None;
    loop {
        let Some(engine) = engine.upgrade() else {
            return;
        };
        let now = Instant::now();
        let Some(step) = engine.plan(now) else {
            due = None;
            drop(engine);
            wake.notified().await;
            continue;
        };
        let start = match due {
            Some(due) if now.saturating_duration_since(due) <= CATCH_UP_LIMIT => due,
            _ => now,
        };
        let duration = engine.timing.step(step.prefill_tokens, step.decodes);
        let end = start.checked_add(duration).unwrap_or_else(|| now + FOREVER);
        if duration.is_zero() {
            // Let the clients and the HTTP server run between instant steps.
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep_until(end).await;
            engine.woke_late(Instant::now().saturating_duration_since(end));
        }
        due = Some(end);
        engine.complete(&step, Instant::now().max(end));
    }
}

/// Where a [`Generation`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Finished,
    Killed,
}

/// A submitted request, producing its tokens as the engine generates them.
#[derive(Debug)]
pub struct Generation {
    engine: Arc<Engine>,
    id: SeqId,
    request_id: String,
    rx: mpsc::UnboundedReceiver<Emitted>,
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
    phase: Phase,
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

    /// Prompt tokens served from the prefix cache (known from the first
    /// token on; 0 before).
    pub fn cached_tokens(&self) -> usize {
        self.cached_tokens
    }

    /// Tokens received so far.
    pub fn completion_tokens(&self) -> usize {
        self.completion_tokens
    }

    /// Waits for and returns the next token; `Ok(None)` once the last one
    /// (the one carrying a finish reason) was returned, `Err` if the engine
    /// died first.
    pub async fn next_token(&mut self) -> Result<Option<Token>, EngineDied> {
        match self.phase {
            Phase::Finished => return Ok(None),
            Phase::Killed => return Err(EngineDied),
            Phase::Open => {}
        }
        match self.rx.recv().await {
            Some(emitted) => {
                self.cached_tokens = emitted.cached_tokens;
                self.completion_tokens += 1;
                if emitted.token.finish_reason.is_some() {
                    self.phase = Phase::Finished;
                }
                Ok(Some(emitted.token))
            }
            None => {
                self.phase = Phase::Killed;
                Err(EngineDied)
            }
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.phase == Phase::Open {
            self.engine.abort(self.id, &self.request_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::TextStyle;
    use crate::tokenize::TokenId;

    fn engine(config: Config) -> Arc<Engine> {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        Engine::spawn(&config, tokenizer).expect("test config is valid")
    }

    /// A config with round numbers: 10 ms + 1 ms per prompt token, 5 ms ITL
    /// plus 1 ms per extra sequence.
    fn timed(max_num_seqs: usize) -> Config {
        Config {
            time_scale: 1.0,
            prefill_overhead_ms: 10.0,
            prefill_per_token_us: 1000.0,
            itl_ms: 5.0,
            itl_per_seq_us: 1000.0,
            max_num_seqs,
            ..Config::for_tests("t")
        }
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
        let mut generation = engine.submit(request(prompt, max_tokens));
        let mut text = String::new();
        while let Some(token) = generation.next_token().await.expect("alive") {
            text.push_str(token.text);
        }
        (generation.cached_tokens(), text)
    }

    fn tokens(base: u32, n: usize) -> Vec<TokenId> {
        (base..).take(n).collect()
    }

    /// Waits (bounded) until the engine's gauges satisfy `ok`.
    async fn until(engine: &Engine, ok: impl Fn(Gauges) -> bool) {
        for _ in 0..1000 {
            if ok(engine.gauges()) {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("gauges never got there: {:?}", engine.gauges());
    }

    #[tokio::test]
    async fn generates_max_tokens_then_stops() {
        let engine = engine(Config::for_tests("t"));
        let mut generation = engine.submit(request(tokens(0, 5), 3));
        let mut reasons = Vec::new();
        while let Some(token) = generation.next_token().await.expect("alive") {
            reasons.push(token.finish_reason);
        }
        assert_eq!(reasons, [None, None, Some(FinishReason::Length)]);
        assert_eq!(generation.completion_tokens(), 3);
        assert_eq!(engine.metrics().finished(FinishReason::Length), 1);
        assert_eq!(engine.gauges().running, 0);
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
        let (_, answer) = run(&engine, prompt.clone(), 40).await;
        // The follow-up holds prompt + answer: 50 tokens = 3 full blocks.
        let tokenizer = Tokenizer::shared().expect("embedded");
        let mut follow_up = prompt;
        follow_up.extend(tokenizer.encode_ordinary(&answer));
        assert_eq!(follow_up.len(), 50);
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
        let mut generation = engine.submit(request(tokens(0, 40), 10));
        assert!(generation.next_token().await.expect("alive").is_some());
        assert_eq!(engine.state().scheduler.cache().pinned(), 2);
        drop(generation);
        assert_eq!(engine.metrics().finished(FinishReason::Abort), 1);
        assert_eq!(engine.gauges().running, 0);
        let state = engine.state();
        assert_eq!(state.scheduler.cache().pinned(), 0);
        assert_eq!(state.scheduler.cache().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_follow_the_latency_model() {
        let engine = engine(timed(256));
        let start = Instant::now();
        let mut generation = engine.submit(request(tokens(0, 20), 3));
        generation.next_token().await.expect("alive");
        assert_eq!(start.elapsed(), Duration::from_millis(10 + 20));
        generation.next_token().await.expect("alive");
        generation.next_token().await.expect("alive");
        assert_eq!(start.elapsed(), Duration::from_millis(10 + 20 + 2 * 5));
        let ttft = engine.metrics().time_to_first_token();
        assert_eq!(ttft.count, 1);
        assert!((ttft.sum - 0.030).abs() < 1e-9, "{}", ttft.sum);
        let e2e = engine.metrics().e2e_request_latency();
        assert!((e2e.sum - 0.040).abs() < 1e-9, "{}", e2e.sum);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_the_host_ran_late_is_counted_and_delays_its_tokens() {
        let engine = engine(timed(256));
        let start = Instant::now();
        let mut generation = engine.submit(request(tokens(0, 20), 2));
        // The loop is asleep in the 30 ms prefill step; the host then lets
        // 100 ms pass before it runs again.
        until(&engine, |g| g.running == 1).await;
        tokio::time::advance(Duration::from_millis(100)).await;
        generation.next_token().await.expect("alive");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        let late = engine.lateness();
        assert_eq!(late.steps, 1);
        assert_eq!(late.late, Duration::from_millis(70));
        // The decode step after it runs on time, from then.
        generation.next_token().await.expect("alive");
        assert_eq!(start.elapsed(), Duration::from_millis(105));
        assert_eq!(
            engine.lateness().since(late),
            Lateness {
                steps: 1,
                late: Duration::ZERO
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn decode_steps_grow_with_the_batch() {
        let engine = engine(timed(256));
        let start = Instant::now();
        let mut batch: Vec<Generation> = (0..4)
            .map(|i| engine.submit(request(tokens(i * 100, 10), 3)))
            .collect();
        for generation in &mut batch {
            generation.next_token().await.expect("alive");
        }
        // One step prefilled all four prompts together.
        let prefilled = Duration::from_millis(10 + 40);
        assert_eq!(start.elapsed(), prefilled);
        for generation in &mut batch {
            generation.next_token().await.expect("alive");
        }
        // A decode step over 4 sequences: 5 ms + 3 × 1 ms.
        assert_eq!(start.elapsed(), prefilled + Duration::from_millis(8));
    }

    /// Reads `generation` to its end on its own task; returns when its first
    /// and last tokens arrived, after `start`.
    fn timeline(
        mut generation: Generation,
        start: Instant,
    ) -> tokio::task::JoinHandle<(Duration, Duration)> {
        tokio::spawn(async move {
            generation.next_token().await.expect("alive");
            let first = start.elapsed();
            while generation.next_token().await.expect("alive").is_some() {}
            (first, start.elapsed())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_max_num_seqs_requests_wait_for_a_slot() {
        let engine = engine(timed(2));
        let start = Instant::now();
        let generations: Vec<Generation> = (0..4)
            .map(|i| engine.submit(request(tokens(i * 100, 10), 5)))
            .collect();
        until(&engine, |g| g.running == 2 && g.waiting == 2).await;
        let tasks: Vec<_> = generations
            .into_iter()
            .map(|generation| timeline(generation, start))
            .collect();
        let mut times = Vec::new();
        for task in tasks {
            times.push(task.await.expect("reader ran"));
        }
        let ms = Duration::from_millis;
        // The first two: prefilled together, then 4 decode steps of 2 seqs.
        assert_eq!(times[..2], [(ms(10 + 20), ms(30 + 4 * 6)); 2]);
        // The last two start when the first two have finished.
        assert_eq!(times[2..], [(ms(54 + 30), ms(84 + 24)); 2]);
        let queued = engine.metrics().request_queue_time();
        assert_eq!(queued.count, 4);
        assert!((queued.sum - 2.0 * 0.054).abs() < 1e-9, "{}", queued.sum);
        let ttft = engine.metrics().time_to_first_token();
        assert!(
            (ttft.sum - (2.0 * 0.030 + 2.0 * 0.084)).abs() < 1e-9,
            "{}",
            ttft.sum
        );
        assert_eq!(engine.gauges(), Gauges::default());
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefill_stalls_the_running_decodes() {
        let engine = engine(timed(256));
        let mut running = engine.submit(request(tokens(0, 10), 100));
        running.next_token().await.expect("alive");
        let before = Instant::now();
        running.next_token().await.expect("alive");
        assert_eq!(before.elapsed(), Duration::from_millis(5));
        // A 100-token prompt joins. The step already under way is a plain
        // decode; the next one prefills the newcomer beside the decode.
        let _newcomer = engine.submit(request(tokens(5000, 100), 5));
        running.next_token().await.expect("alive");
        let before = Instant::now();
        running.next_token().await.expect("alive");
        assert_eq!(before.elapsed(), Duration::from_millis(10 + 100 + 5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_can_be_aborted() {
        let engine = engine(timed(1));
        let mut first = engine.submit(request(tokens(0, 10), 5));
        let second = engine.submit(request(tokens(100, 10), 5));
        first.next_token().await.expect("alive");
        assert_eq!(engine.gauges().waiting, 1);
        drop(second);
        assert_eq!(engine.gauges().waiting, 0);
        assert_eq!(engine.metrics().finished(FinishReason::Abort), 1);
        while first.next_token().await.expect("alive").is_some() {}
        assert_eq!(engine.metrics().finished(FinishReason::Length), 1);
    }

    #[tokio::test]
    async fn the_engine_dies_after_n_tokens() {
        let engine = engine(Config {
            die_after_tokens: Some(5),
            ..Config::for_tests("t")
        });
        let mut death = engine.death();
        let mut generation = engine.submit(request(tokens(0, 10), 100));
        let mut received = 0;
        let outcome = loop {
            match generation.next_token().await {
                Ok(Some(_)) => received += 1,
                other => break other,
            }
        };
        assert_eq!(outcome, Err(EngineDied));
        assert_eq!(received, 5);
        assert!(engine.is_dead());
        assert!(death.wait_for(|dead| *dead).await.is_ok());
        assert_eq!(engine.metrics().generation_tokens(), 5);
        // Later requests end at once, and no abort is counted for them.
        let mut late = engine.submit(request(tokens(0, 10), 3));
        assert_eq!(late.next_token().await, Err(EngineDied));
        drop(late);
        drop(generation);
        assert_eq!(engine.metrics().finished(FinishReason::Abort), 0);
    }

    #[tokio::test]
    async fn the_loop_ends_with_the_engine() {
        let engine = engine(Config::for_tests("t"));
        let weak = Arc::downgrade(&engine);
        run(&engine, tokens(0, 4), 2).await;
        drop(engine);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(weak.upgrade().is_none());
    }
}
