//! The simulator's counters and gauges, and their Prometheus text exposition
//! under vLLM's own metric names.
//!
//! vLLM's names contain `:`, which the `prometheus-client` crate rejects, so
//! the exposition is written here by hand (text format 0.0.4), mirroring what
//! vLLM's Python client prints: every series carries `engine="0"` and
//! `model_name`, counters are named with their `_total` suffix in `# HELP` /
//! `# TYPE` too, and values are floats.
//!
//! Aborted requests (client gone before the last token) are counted, as in
//! vLLM, by `vllm:request_success_total{finished_reason="abort"}`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Process-lifetime counters of one simulated engine.
#[derive(Debug)]
pub struct Metrics {
    /// Label value of `model_name`, already escaped.
    model_label: String,
    running: AtomicU64,
    prefix_cache_queries: AtomicU64,
    prefix_cache_hits: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished: [AtomicU64; 3],
}

impl Metrics {
    /// Zeroed metrics for `model`.
    pub fn new(model: &str) -> Self {
        Self {
            model_label: escape_label_value(model),
            running: AtomicU64::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Default::default(),
        }
    }

    /// A request was scheduled with `prompt_tokens`, of which `cached_tokens`
    /// came from the prefix cache.
    pub fn request_started(&self, prompt_tokens: usize, cached_tokens: usize) {
        self.running.fetch_add(1, Ordering::Relaxed);
        self.prefix_cache_queries
            .fetch_add(as_u64(prompt_tokens), Ordering::Relaxed);
        self.prefix_cache_hits
            .fetch_add(as_u64(cached_tokens), Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(as_u64(prompt_tokens), Ordering::Relaxed);
    }

    /// One token was generated.
    pub fn token_generated(&self) {
        self.generation_tokens.fetch_add(1, Ordering::Relaxed);
    }

    /// A request started with [`Self::request_started`] ended.
    pub fn request_finished(&self, reason: FinishReason) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        self.finished[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests currently generating.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
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

    /// The Prometheus text exposition; `kv_cache_usage` is the fraction of
    /// KV blocks in use, sampled by the caller.
    pub fn render(&self, kv_cache_usage: f64) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::with_capacity(2048);
        write_family(
            &mut out,
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
        );
        self.sample(
            &mut out,
            "vllm:num_requests_running",
            "",
            load(&self.running),
        );
        // The simulator schedules every request at once; the queue comes
        // with `--max-num-seqs`.
        write_family(
            &mut out,
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
        );
        self.sample(&mut out, "vllm:num_requests_waiting", "", 0);
        write_family(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
        );
        self.sample_f64(&mut out, "vllm:kv_cache_usage_perc", "", kv_cache_usage);
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
        out
    }

    /// One integer-valued sample, printed as a float like vLLM does.
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

    fn value_of(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn exposition_uses_vllm_names_and_labels() {
        let metrics = Metrics::new("meta-llama/Llama-3.2-1B-Instruct");
        metrics.request_started(100, 64);
        metrics.token_generated();
        metrics.token_generated();
        metrics.request_started(10, 0);
        metrics.request_finished(FinishReason::Length);
        let text = metrics.render(0.25);
        let labels = "{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"}";
        let at = |name: &str| value_of(&text, &format!("{name}{labels}"));
        assert_eq!(at("vllm:prefix_cache_queries_total"), Some(110.0));
        assert_eq!(at("vllm:prefix_cache_hits_total"), Some(64.0));
        assert_eq!(at("vllm:prompt_tokens_total"), Some(110.0));
        assert_eq!(at("vllm:generation_tokens_total"), Some(2.0));
        assert_eq!(at("vllm:num_requests_running"), Some(1.0));
        assert_eq!(at("vllm:num_requests_waiting"), Some(0.0));
        assert_eq!(at("vllm:kv_cache_usage_perc"), Some(0.25));
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
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
