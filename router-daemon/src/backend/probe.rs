//! What discovery asks a backend and how it reads the answers: vLLM's
//! `/v1/models` (OpenAI list JSON) and `/metrics` (Prometheus text). The
//! GETs themselves go through `dataplane::probe`.

/// The vLLM gauge counting requests queued for the engine.
pub(crate) const WAITING_METRIC: &str = "vllm:num_requests_waiting";

/// The vLLM gauge counting requests the engine is running.
pub(crate) const RUNNING_METRIC: &str = "vllm:num_requests_running";

/// The vLLM counter of prompt tokens the engine took in.
pub(crate) const PROMPT_TOKENS_METRIC: &str = "vllm:prompt_tokens_total";

/// vLLM's info gauge whose labels describe the engine's KV cache
/// (`block_size`, `num_gpu_blocks`, ...).
pub(crate) const CACHE_CONFIG_METRIC: &str = "vllm:cache_config_info";

/// Why a `/v1/models` body could not be read as a model list.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ModelsParseError {
    /// The body is not JSON.
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is not `{"data": [{"id": …}, …]}`.
    #[error("not an OpenAI model list: {0}")]
    Shape(&'static str),
}

/// The model ids in an OpenAI `/v1/models` body, sorted and deduplicated.
pub(crate) fn parse_models(body: &[u8]) -> Result<Vec<String>, ModelsParseError> {
    let json: serde_json::Value = serde_json::from_slice(body)?;
    let data = json
        .get("data")
        .and_then(serde_json::Value::as_array)
        .ok_or(ModelsParseError::Shape("no `data` array"))?;
    let mut models = data
        .iter()
        .map(|card| {
            card.get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or(ModelsParseError::Shape("a model without a string `id`"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    models.sort_unstable();
    models.dedup();
    Ok(models)
}

/// A backend's queue, as its `/metrics` reports it; `None` where the metric
/// is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Load {
    /// Sum of [`WAITING_METRIC`] over its label sets.
    pub(crate) waiting: Option<u64>,
    /// Sum of [`RUNNING_METRIC`] over its label sets.
    pub(crate) running: Option<u64>,
    /// Tokens the KV cache holds: `num_gpu_blocks × block_size` of
    /// [`CACHE_CONFIG_METRIC`], summed over its label sets (one per engine).
    pub(crate) cache_tokens: Option<u64>,
    /// Sum of [`PROMPT_TOKENS_METRIC`] over its label sets.
    pub(crate) prompt_tokens: Option<u64>,
}

/// Reads the waiting and running gauges and the KV cache's size out of
/// Prometheus text, summing each over its label sets (one per engine or
/// model). Comments, other metrics and lines that do not parse are skipped.
pub(crate) fn parse_load(text: &str) -> Load {
    let mut waiting = None;
    let mut running = None;
    let mut cache_tokens: Option<u64> = None;
    let mut prompt_tokens = None;
    for (name, labels, value) in text.lines().filter_map(sample) {
        let slot = match name {
            WAITING_METRIC => &mut waiting,
            RUNNING_METRIC => &mut running,
            PROMPT_TOKENS_METRIC => &mut prompt_tokens,
            CACHE_CONFIG_METRIC => {
                let number = |key| label(labels, key)?.parse::<u64>().ok();
                if let (Some(blocks), Some(size)) = (number("num_gpu_blocks"), number("block_size"))
                {
                    let tokens = blocks.saturating_mul(size);
                    cache_tokens = Some(cache_tokens.unwrap_or(0).saturating_add(tokens));
                }
                continue;
            }
            _ => continue,
        };
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
    Load {
        waiting: waiting.map(to_count),
        running: running.map(to_count),
        cache_tokens,
        prompt_tokens: prompt_tokens.map(to_count),
    }
}

/// The value of label `key` in a `{…}` label block, if it is there and
/// needs no unescaping (the numbers this module reads never do).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels.strip_prefix('{')?;
    loop {
        let (name, after) = rest.split_once('=')?;
        let value = after.strip_prefix('"')?;
        // The closing quote: the first not escaped by a backslash.
        let mut escaped = false;
        let end = value.bytes().position(|byte| match byte {
            _ if escaped => {
                escaped = false;
                false
            }
            b'\\' => {
                escaped = true;
                false
            }
            b => b == b'"',
        })?;
        let (value, after) = value.split_at(end);
        if name.trim_matches(|c: char| c == ',' || c.is_ascii_whitespace()) == key {
            return (!value.contains('\\')).then_some(value);
        }
        rest = &after[1..];
    }
}

/// A gauge sum as a count: rounded, negative as 0, saturating.
fn to_count(value: f64) -> u64 {
    // `as` saturates for floats; the value is finite and non-negative here.
    value.max(0.0).round() as u64
}

/// The metric name, label block (`{…}`, or empty) and value of one
/// exposition line, if it is a sample with a finite value.
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = "";
    if rest.starts_with('{') {
        let end = labels_len(rest)?;
        (labels, rest) = rest.split_at(end);
    }
    let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((name, labels, value))
}

/// The length of the `{…}` label block at the start of `text`, honouring
/// quoted values with escapes (which may contain `}`).
fn labels_len(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(at + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// The shape of vLLM's (and vllm-sim's) exposition.
    const VLLM_METRICS: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 7.0
vllm:num_requests_waiting_by_reason{engine=\"0\",reason=\"capacity\"} 100.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 0.25
";

    #[test]
    fn load_sums_label_sets_and_ignores_other_metrics() {
        assert_eq!(
            parse_load(VLLM_METRICS),
            Load {
                waiting: Some(7),
                running: Some(5),
                cache_tokens: None,
                prompt_tokens: None,
            }
        );
    }

    #[test]
    fn cache_size_is_blocks_times_block_size_summed_over_engines() {
        // vLLM's info gauge, labels as its `CacheConfig.metrics_info` prints
        // them, for two data-parallel engines.
        let info = |engine: u32, blocks: u32| {
            format!(
                "vllm:cache_config_info{{block_size=\"16\",cache_dtype=\"auto\",\
                 calculate_kv_scales=\"False\",cpu_offload_gb=\"0\",\
                 enable_prefix_caching=\"True\",engine=\"{engine}\",\
                 gpu_memory_utilization=\"0.9\",is_attention_free=\"False\",\
                 num_cpu_blocks=\"None\",num_gpu_blocks=\"{blocks}\",\
                 num_gpu_blocks_override=\"None\",prefix_caching_hash_algo=\"builtin\",\
                 sliding_window=\"None\",swap_space=\"4\"}} 1.0\n"
            )
        };
        let text = format!(
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
                            # TYPE vllm:cache_config_info gauge\n{}{}{VLLM_METRICS}",
            info(0, 2681),
            info(1, 1000)
        );
        assert_eq!(parse_load(&text).cache_tokens, Some((2681 + 1000) * 16));
        let counted = "vllm:prompt_tokens_total{engine=\"0\",model_name=\"m\"} 1200.0\n\
                       vllm:prompt_tokens_total{engine=\"1\",model_name=\"m\"} 34.0\n";
        assert_eq!(parse_load(counted).prompt_tokens, Some(1234));
        // Unknown without both numbers, or with one that is not a number.
        for labels in [
            "{block_size=\"16\"}",
            "{num_gpu_blocks=\"None\",block_size=\"16\"}",
            "{num_gpu_blocks=\"1\\\"0\",block_size=\"16\"}",
            "{num_gpu_blocks=\"10\",block_size=\"16\"",
        ] {
            let text = format!("vllm:cache_config_info{labels} 1.0\n");
            assert_eq!(parse_load(&text).cache_tokens, None, "{labels}");
        }
        // A label whose value holds an escaped quote and a comma is skipped
        // whole.
        let text = "vllm:cache_config_info{a=\"x\\\",num_gpu_blocks=\\\"9\",\
                    num_gpu_blocks=\"10\",block_size=\"16\"} 1\n";
        assert_eq!(parse_load(text).cache_tokens, Some(160));
    }

    #[test]
    fn load_tolerates_missing_metrics_and_garbage() {
        assert_eq!(parse_load(""), Load::default());
        assert_eq!(parse_load("# only a comment\n\n"), Load::default());
        let text = "vllm:num_requests_waiting{model_name=\"a} b\\\" c\"} 4 1700000000000\n\
                    vllm:num_requests_waiting 1e0\n\
                    vllm:num_requests_running{unterminated=\"x} 9\n\
                    vllm:num_requests_running NaN\n\
                    vllm:num_requests_running +Inf\n\
                    vllm:num_requests_running not-a-number\n\
                    vllm:num_requests_running\n\
                    {} 3\n\
                    \u{0}\u{ff}garbage {{{{ }}}}\n";
        assert_eq!(
            parse_load(text),
            Load {
                waiting: Some(5),
                running: None,
                cache_tokens: None,
                prompt_tokens: None,
            }
        );
    }

    #[test]
    fn load_clamps_negative_and_huge_values() {
        let text = "vllm:num_requests_waiting -3\nvllm:num_requests_running 1e300\n";
        assert_eq!(
            parse_load(text),
            Load {
                waiting: Some(0),
                running: Some(u64::MAX),
                cache_tokens: None,
                prompt_tokens: None,
            }
        );
    }

    #[test]
    fn models_from_an_openai_list() {
        let body = br#"{"object":"list","data":[
            {"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","owned_by":"vllm","root":"x","parent":null},
            {"id":"a-lora","object":"model","parent":"meta-llama/Llama-3.1-8B-Instruct"},
            {"id":"a-lora"}]}"#;
        assert_eq!(
            parse_models(body).unwrap(),
            ["a-lora", "meta-llama/Llama-3.1-8B-Instruct"]
        );
        assert_eq!(
            parse_models(br#"{"object":"list","data":[]}"#).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn garbage_models_bodies_are_errors() {
        for body in [
            &b""[..],
            b"not json",
            b"\xff\xfe",
            b"[]",
            b"{}",
            b"{\"data\":{}}",
            b"{\"data\":[{\"id\":3}]}",
            b"{\"data\":[{\"name\":\"m\"}]}",
            b"{\"data\":[\"m\"]}",
            b"{\"data\":[{\"id\":\"m\"}",
        ] {
            assert!(
                parse_models(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
