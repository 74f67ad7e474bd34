//! The simulator's counters, gauges and histograms, and their Prometheus
//! text exposition under vLLM's own metric names.
//!
//! vLLM's names contain `:`, which the `prometheus-client` crate rejects, so
//! the exposition is written here by hand (text format 0.0.4), mirroring what
//! vLLM's Python client prints: every series carries `engine="0"` and
//! `model_name`, labels are sorted by name, counters are named with their
//! `_total` suffix in `# HELP` / `# TYPE` too, values are floats, and a
//! histogram prints its cumulative `_bucket` series, then `_count` and
//! `_sum`. Names, types, help texts and bucket bounds follow vLLM V1's
//! `PrometheusStatLogger` (`vllm/v1/metrics/loggers.py`).
//!
//! Aborted requests (client gone before the last token) are counted, as in
//! vLLM, by `vllm:request_success_total{finished_reason="abort"}`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Why a request stopped generating (vLLM's `FinishReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop condition was met (the simulator does not produce these yet).
    Stop,
    /// The token limit was reached.
    Length,
    /// The client went away first.
    Abort,
}

impl FinishReason {
    const ALL: [Self; 3] = [Self::Stop, Self::Length, Self::Abort];

    /// The OpenAI / vLLM spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Stop => 0,
            Self::Length => 1,
            Self::Abort => 2,
        }
    }
}

/// Bucket bounds of `vllm:time_to_first_token_seconds`, as in vLLM.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Bucket bounds of vLLM's request-latency histograms (e2e, queue time).
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The scheduler's state at the time of a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// Fraction of the KV-cache blocks in use.
    pub kv_cache_usage: f64,
}

/// A Prometheus histogram with fixed bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default)]
struct HistogramState {
    /// Observations per bucket (not cumulative); one more for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

/// A histogram's values at one time.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    /// Cumulative counts per upper bound, `+Inf` last.
    pub cumulative: Vec<(f64, u64)>,
    /// Number of observations.
    pub count: u64,
    /// Sum of the observations.
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram with these (increasing) bucket bounds.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    /// Records one duration.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.counts[bucket] += 1;
        state.sum += seconds;
    }

    /// The current values.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut total = 0;
        let cumulative = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&state.counts)
            .map(|(bound, &count)| {
                total += count;
                (bound, total)
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            count: total,
            sum: state.sum,
        }
    }
}

/// Process-lifetime counters and histograms of one simulated engine.
#[derive(Debug)]
pub struct Metrics {
    /// Label value of `model_name`, already escaped.
    model_label: String,
    /// The KV cache's shape, for `vllm:cache_config_info`.
    cache: CacheShape,
    prefix_cache_queries: AtomicU64,
    prefix_cache_hits: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: [AtomicU64; 3],
    time_to_first_token: Histogram,
    e2e_request_latency: Histogram,
    request_queue_time: Histogram,
}

/// The KV cache's shape, as vLLM reports it in `vllm:cache_config_info`
/// (a router reads it to know how much of a prompt family fits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheShape {
    /// Tokens per block (`block_size`).
    pub block_size: usize,
    /// Blocks in the cache (`num_gpu_blocks`).
    pub blocks: usize,
}

impl Metrics {
    /// Zeroed metrics for `model`, whose engine has a KV cache of `cache`.
    pub fn new(model: &str, cache: CacheShape) -> Self {
        Self {
            model_label: escape_label_value(model),
            cache,
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            e2e_request_latency: Histogram::new(REQUEST_LATENCY_BUCKETS),
            request_queue_time: Histogram::new(REQUEST_LATENCY_BUCKETS),
        }
    }

    /// A request was scheduled after waiting `queued`, with `prompt_tokens`
    /// of which `cached_tokens` came from the prefix cache.
    pub fn request_scheduled(&self, prompt_tokens: usize, cached_tokens: usize, queued: Duration) {
        self.prefix_cache_queries
            .fetch_add(as_u64(prompt_tokens), Ordering::Relaxed);
        self.prefix_cache_hits
            .fetch_add(as_u64(cached_tokens), Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(as_u64(prompt_tokens), Ordering::Relaxed);
        self.request_queue_time.observe(queued);
    }

    /// One token was generated; `ttft` is set on a request's first.
    pub fn token_generated(&self, ttft: Option<Duration>) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
        if let Some(ttft) = ttft {
            self.time_to_first_token.observe(ttft);
        }
    }

    /// A request ended for `reason`, `e2e` after it arrived.
    pub fn request_finished(&self, reason: FinishReason, e2e: Duration) {
        self.finished[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.e2e_request_latency.observe(e2e);
    }

    /// Requests that ended for `reason` so far.
    pub fn finished(&self, reason: FinishReason) -> u64 {
        self.finished[reason.index()].load(Ordering::Relaxed)
    }

    /// Prompt tokens looked up in the prefix cache so far.
    pub fn prefix_cache_queries(&self) -> u64 {
        self.prefix_cache_queries.load(Ordering::Relaxed)
    }

    /// Prompt tokens served from the prefix cache so far.
    pub fn prefix_cache_hits(&self) -> u64 {
        self.prefix_cache_hits.load(Ordering::Relaxed)
    }

    /// Tokens generated so far.
    pub fn generation_tokens(&self) -> u64 {
        self.generation_tokens.load(Ordering::Relaxed)
    }

    /// `vllm:time_to_first_token_seconds`.
    pub fn time_to_first_token(&self) -> HistogramSnapshot {
        self.time_to_first_token.snapshot()
    }

    /// `vllm:e2e_request_latency_seconds`.
    pub fn e2e_request_latency(&self) -> HistogramSnapshot {
        self.e2e_request_latency.snapshot()
    }

    /// `vllm:request_queue_time_seconds`.
    pub fn request_queue_time(&self) -> HistogramSnapshot {
        self.request_queue_time.snapshot()
    }

    /// The Prometheus text exposition, with the scheduler's `gauges`
    /// sampled by the caller.
    pub fn render(&self, gauges: Gauges) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::with_capacity(8192);
        for (name, help, value) in [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                gauges.running,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                gauges.waiting,
            ),
        ] {
            write_family(&mut out, name, "gauge", help);
            self.sample(&mut out, name, "", as_u64(value));
        }
        // vLLM's info gauge: the engine's cache config as labels, value 1,
        // without `model_name` (`log_metrics_info` in vLLM's loggers).
        write_family(
            &mut out,
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
        );
        let _ = writeln!(
            out,
            "vllm:cache_config_info{{block_size=\"{}\",enable_prefix_caching=\"True\",\
             engine=\"0\",num_gpu_blocks=\"{}\"}} 1.0",
            self.cache.block_size, self.cache.blocks
        );
        write_family(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
        );
        self.sample_f64(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "",
            gauges.kv_cache_usage,
        );
        for (name, help, counter) in [
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                &self.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                &self.prefix_cache_hits,
            ),
            (
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &self.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &self.generation_tokens,
            ),
        ] {
            write_family(&mut out, name, "counter", help);
            self.sample(&mut out, name, "", load(counter));
        }
        write_family(
            &mut out,
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
        );
        for reason in FinishReason::ALL {
            let label = format!("finished_reason=\"{}\",", reason.as_str());
            self.sample(
                &mut out,
                "vllm:request_success_total",
                &label,
                self.finished(reason),
            );
        }
        for (name, help, histogram) in [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &self.time_to_first_token,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &self.e2e_request_latency,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &self.request_queue_time,
            ),
        ] {
            write_family(&mut out, name, "histogram", help);
            let snapshot = histogram.snapshot();
            let bucket = format!("{name}_bucket");
            for (bound, count) in &snapshot.cumulative {
                let le = if bound.is_infinite() {
                    "+Inf".to_owned()
                } else {
                    format!("{bound:?}")
                };
                self.sample(&mut out, &bucket, &format!("le=\"{le}\","), *count);
            }
            self.sample(&mut out, &format!("{name}_count"), "", snapshot.count);
            self.sample_f64(&mut out, &format!("{name}_sum"), "", snapshot.sum);
        }
        out
    }

    /// One integer-valued sample, printed as a float like vLLM does.
    /// `extra_labels` (each followed by a comma) sort between `engine` and
    /// `model_name`.
    fn sample(&self, out: &mut String, name: &str, extra_labels: &str, value: u64) {
        let _ = writeln!(
            out,
            "{name}{{engine=\"0\",{extra_labels}model_name=\"{}\"}} {value}.0",
            self.model_label
        );
    }

    fn sample_f64(&self, out: &mut String, name: &str, extra_labels: &str, value: f64) {
        let _ = writeln!(
            out,
            "{name}{{engine=\"0\",{extra_labels}model_name=\"{}\"}} {value:?}",
            self.model_label
        );
    }
}

/// Writes a metric family's `# HELP` and `# TYPE` lines.
fn write_family(out: &mut String, name: &str, kind: &str, help: &str) {
    // Writing to a String cannot fail.
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Escapes a label value for the text format (`\`, `"` and newlines).
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: &str = "{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"}";

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn exposition_uses_vllm_names_and_labels() {
        let cache = CacheShape {
            block_size: 16,
            blocks: 144,
        };
        let metrics = Metrics::new("meta-llama/Llama-3.2-1B-Instruct", cache);
        metrics.request_scheduled(100, 64, Duration::ZERO);
        metrics.token_generated(Some(Duration::from_millis(30)));
        metrics.token_generated(None);
        metrics.request_scheduled(10, 0, Duration::ZERO);
        metrics.request_finished(FinishReason::Length, Duration::from_millis(50));
        let text = metrics.render(Gauges {
            running: 1,
            waiting: 3,
            kv_cache_usage: 0.25,
        });
        let at = |name: &str| value_of(&text, &format!("{name}{LABELS}"));
        assert_eq!(at("vllm:prefix_cache_queries_total"), Some(110.0));
        assert_eq!(at("vllm:prefix_cache_hits_total"), Some(64.0));
        assert_eq!(at("vllm:prompt_tokens_total"), Some(110.0));
        assert_eq!(at("vllm:generation_tokens_total"), Some(2.0));
        assert_eq!(at("vllm:num_requests_running"), Some(1.0));
        assert_eq!(at("vllm:num_requests_waiting"), Some(3.0));
        assert_eq!(at("vllm:kv_cache_usage_perc"), Some(0.25));
        let info = "vllm:cache_config_info{block_size=\"16\",enable_prefix_caching=\"True\",\
                    engine=\"0\",num_gpu_blocks=\"144\"}";
        assert_eq!(value_of(&text, info), Some(1.0));
        let success = |reason: &str| {
            value_of(
                &text,
                &format!(
                    "vllm:request_success_total{{engine=\"0\",finished_reason=\"{reason}\",\
                     model_name=\"meta-llama/Llama-3.2-1B-Instruct\"}}"
                ),
            )
        };
        assert_eq!(success("length"), Some(1.0));
        assert_eq!(success("abort"), Some(0.0));
        assert_eq!(success("stop"), Some(0.0));
        assert!(text.contains("# TYPE vllm:prefix_cache_hits_total counter\n"));
        assert!(text.contains("# TYPE vllm:num_requests_running gauge\n"));
        assert!(text.contains("# TYPE vllm:time_to_first_token_seconds histogram\n"));
        assert!(text.contains("# TYPE vllm:e2e_request_latency_seconds histogram\n"));
    }

    #[test]
    fn histograms_print_cumulative_buckets_count_and_sum() {
        let metrics = Metrics::new("m", CacheShape::default());
        for ms in [3, 30, 30, 3000] {
            metrics.token_generated(Some(Duration::from_millis(ms)));
        }
        let text = metrics.render(Gauges::default());
        let bucket = |le: &str| {
            value_of(
                &text,
                &format!(
                    "vllm:time_to_first_token_seconds_bucket{{engine=\"0\",le=\"{le}\",model_name=\"m\"}}"
                ),
            )
        };
        assert_eq!(bucket("0.001"), Some(0.0));
        assert_eq!(bucket("0.005"), Some(1.0));
        assert_eq!(bucket("0.04"), Some(3.0));
        assert_eq!(bucket("2.5"), Some(3.0));
        assert_eq!(bucket("5.0"), Some(4.0));
        assert_eq!(bucket("2560.0"), Some(4.0));
        assert_eq!(bucket("+Inf"), Some(4.0));
        let series = |suffix: &str| {
            value_of(
                &text,
                &format!(
                    "vllm:time_to_first_token_seconds_{suffix}{{engine=\"0\",model_name=\"m\"}}"
                ),
            )
        };
        assert_eq!(series("count"), Some(4.0));
        let sum = series("sum").expect("a sum");
        assert!((sum - 3.063).abs() < 1e-9, "{sum}");
        // Bucket lines come in increasing order, then _count, then _sum.
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vllm:time_to_first_token_seconds"))
            .collect();
        assert_eq!(lines.len(), TTFT_BUCKETS.len() + 3);
        assert!(lines[TTFT_BUCKETS.len()].contains("le=\"+Inf\""));
        assert!(
            lines[TTFT_BUCKETS.len() + 1].starts_with("vllm:time_to_first_token_seconds_count")
        );
    }

    #[test]
    fn observations_on_a_bound_fall_in_its_bucket() {
        let histogram = Histogram::new(REQUEST_LATENCY_BUCKETS);
        histogram.observe(Duration::from_millis(500));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.cumulative[0], (0.3, 0));
        assert_eq!(snapshot.cumulative[1], (0.5, 1));
        assert_eq!(snapshot.cumulative.last(), Some(&(f64::INFINITY, 1)));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
