//! Simulator configuration: the command line, its environment twins and the
//! defaults, plus the derived timing model.
//!
//! Every field is a `--flag` with a `VLLM_SIM_*` environment twin. The timing
//! defaults model `meta-llama/Llama-3.2-1B-Instruct` in bf16 on one
//! A100/H100-class GPU (see the crate README for the reasoning):
//!
//! | knob | default | meaning |
//! | --- | --- | --- |
//! | `--prefill-overhead-ms` | 10 ms | fixed cost of a prefill step |
//! | `--prefill-per-token-us` | 40 µs | cost of each *uncached* prompt token |
//! | `--itl-ms` | 6 ms | inter-token latency while decoding |
//! | `--time-scale` | 1.0 | multiplies every delay; `0` disables them |

use std::time::Duration;

use clap::Parser;

use crate::error::ConfigError;

/// Default served model name.
pub const DEFAULT_MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
/// Default bind address.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default port (vLLM's).
pub const DEFAULT_PORT: u16 = 8000;
/// Default instance name.
pub const DEFAULT_ID: &str = "vllm-sim";
/// Default tokens per KV-cache block (vLLM's default on CUDA).
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// Default prefix-cache capacity in blocks (8192 × 16 = 131 072 tokens).
pub const DEFAULT_KV_CACHE_BLOCKS: usize = 8192;
/// Default context window (Llama-3.2-1B's 128k).
pub const DEFAULT_MAX_MODEL_LEN: usize = 131_072;
/// Default number of generated tokens when a request names no limit.
pub const DEFAULT_OUTPUT_LEN: usize = 32;
/// Default fixed prefill cost, in milliseconds.
pub const DEFAULT_PREFILL_OVERHEAD_MS: f64 = 10.0;
/// Default prefill cost per uncached prompt token, in microseconds.
pub const DEFAULT_PREFILL_PER_TOKEN_US: f64 = 40.0;
/// Default inter-token latency, in milliseconds.
pub const DEFAULT_ITL_MS: f64 = 6.0;

/// Everything `vllm-sim` can be told, from its command line or environment.
#[derive(Parser, Clone, Debug, PartialEq)]
#[command(
    name = "vllm-sim",
    version,
    about = "A vLLM OpenAI-server simulator with a real prefix-cache model."
)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "VLLM_SIM_HOST", default_value = DEFAULT_HOST)]
    pub host: String,

    /// TCP port to listen on (0 picks a free one).
    #[arg(long, env = "VLLM_SIM_PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Served model name; requests naming another model get a 404.
    #[arg(long, env = "VLLM_SIM_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,

    /// Instance name, sent in the `x-served-by` response header and logs.
    #[arg(long, env = "VLLM_SIM_ID", default_value = DEFAULT_ID)]
    pub id: String,

    /// Tokens per KV-cache block; only full blocks are cached.
    #[arg(long, env = "VLLM_SIM_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Prefix-cache capacity in blocks (LRU-evicted beyond this; 0 disables caching).
    #[arg(long, env = "VLLM_SIM_KV_CACHE_BLOCKS", default_value_t = DEFAULT_KV_CACHE_BLOCKS)]
    pub kv_cache_blocks: usize,

    /// Context window: prompt plus completion tokens may not exceed it.
    #[arg(long, env = "VLLM_SIM_MAX_MODEL_LEN", default_value_t = DEFAULT_MAX_MODEL_LEN)]
    pub max_model_len: usize,

    /// Tokens generated when the request sets no `max_tokens`.
    #[arg(long, env = "VLLM_SIM_OUTPUT_LEN", default_value_t = DEFAULT_OUTPUT_LEN)]
    pub output_len: usize,

    /// Seed of the generated text (a request's own `seed` overrides it).
    #[arg(long, env = "VLLM_SIM_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Multiplies every simulated delay; 0 answers as fast as possible.
    #[arg(long, env = "VLLM_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,

    /// Fixed cost of a prefill step, in milliseconds.
    #[arg(long, env = "VLLM_SIM_PREFILL_OVERHEAD_MS", default_value_t = DEFAULT_PREFILL_OVERHEAD_MS)]
    pub prefill_overhead_ms: f64,

    /// Prefill cost of each prompt token not served from the prefix cache, in microseconds.
    #[arg(long, env = "VLLM_SIM_PREFILL_PER_TOKEN_US", default_value_t = DEFAULT_PREFILL_PER_TOKEN_US)]
    pub prefill_per_token_us: f64,

    /// Inter-token latency while decoding, in milliseconds.
    #[arg(long, env = "VLLM_SIM_ITL_MS", default_value_t = DEFAULT_ITL_MS)]
    pub itl_ms: f64,
}

impl Default for Config {
    /// The same values as the command line's defaults, without reading the
    /// environment.
    fn default() -> Self {
        Self {
            host: DEFAULT_HOST.to_owned(),
            port: DEFAULT_PORT,
            model: DEFAULT_MODEL.to_owned(),
            id: DEFAULT_ID.to_owned(),
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_blocks: DEFAULT_KV_CACHE_BLOCKS,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            output_len: DEFAULT_OUTPUT_LEN,
            seed: 0,
            time_scale: 1.0,
            prefill_overhead_ms: DEFAULT_PREFILL_OVERHEAD_MS,
            prefill_per_token_us: DEFAULT_PREFILL_PER_TOKEN_US,
            itl_ms: DEFAULT_ITL_MS,
        }
    }
}

impl Config {
    /// A hermetic configuration for in-process tests: the default model on
    /// `127.0.0.1:0`, named `id`, with every delay disabled.
    pub fn for_tests(id: &str) -> Self {
        Self {
            port: 0,
            id: id.to_owned(),
            time_scale: 0.0,
            ..Self::default()
        }
    }

    /// Checks the values that clap's types cannot: sizes that must be
    /// positive and durations that must be finite and non-negative.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.block_size == 0 {
            return Err(ConfigError::Zero("block-size"));
        }
        if self.max_model_len == 0 {
            return Err(ConfigError::Zero("max-model-len"));
        }
        if self.output_len == 0 {
            return Err(ConfigError::Zero("output-len"));
        }
        if axum::http::HeaderValue::from_str(&self.id).is_err() {
            return Err(ConfigError::InvalidId(self.id.clone()));
        }
        for (flag, value) in [
            ("time-scale", self.time_scale),
            ("prefill-overhead-ms", self.prefill_overhead_ms),
            ("prefill-per-token-us", self.prefill_per_token_us),
            ("itl-ms", self.itl_ms),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ConfigError::NotADuration { flag, value });
            }
        }
        // The delays are later built with `Duration::from_secs_f64`, which
        // panics past `Duration::MAX`; this keeps every product in range.
        Timing::try_from(self)?;
        Ok(())
    }
}

/// The simulated latency model, already multiplied by `time_scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Fixed cost of each prefill.
    pub prefill_overhead: Duration,
    /// Cost of each prompt token that missed the prefix cache.
    pub prefill_per_token: Duration,
    /// Time between two generated tokens.
    pub inter_token: Duration,
}

impl Timing {
    /// Time to prefill a prompt of which `uncached_tokens` missed the cache;
    /// the first output token is produced at its end.
    pub fn prefill(&self, uncached_tokens: usize) -> Duration {
        let per_token = u32::try_from(uncached_tokens)
            .ok()
            .and_then(|n| self.prefill_per_token.checked_mul(n))
            .unwrap_or(Duration::MAX);
        self.prefill_overhead.saturating_add(per_token)
    }
}

impl TryFrom<&Config> for Timing {
    type Error = ConfigError;

    fn try_from(config: &Config) -> Result<Self, ConfigError> {
        let scaled = |flag: &'static str, value: f64, unit_secs: f64| {
            Duration::try_from_secs_f64(value * unit_secs * config.time_scale)
                .map_err(|_| ConfigError::NotADuration { flag, value })
        };
        Ok(Self {
            prefill_overhead: scaled("prefill-overhead-ms", config.prefill_overhead_ms, 1e-3)?,
            prefill_per_token: scaled("prefill-per-token-us", config.prefill_per_token_us, 1e-6)?,
            inter_token: scaled("itl-ms", config.itl_ms, 1e-3)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_defaults_match_default_impl() {
        let parsed = Config::try_parse_from(["vllm-sim"]);
        // The environment may legitimately set VLLM_SIM_* on a developer
        // machine; only compare when it does not.
        if std::env::vars().all(|(k, _)| !k.starts_with("VLLM_SIM_")) {
            assert_eq!(parsed.ok(), Some(Config::default()));
        }
    }

    #[test]
    fn flags_parse() {
        let config = Config::try_parse_from([
            "vllm-sim",
            "--host",
            "0.0.0.0",
            "--port",
            "8001",
            "--model",
            "m",
            "--id",
            "sim-0",
            "--time-scale",
            "0.5",
        ])
        .expect("valid flags parse");
        assert_eq!(config.port, 8001);
        assert_eq!(config.id, "sim-0");
        assert_eq!(config.model, "m");
        assert!((config.time_scale - 0.5).abs() < f64::EPSILON);
    }

    #[test]
    fn timing_is_scaled() {
        let config = Config {
            time_scale: 0.5,
            ..Config::default()
        };
        let timing = Timing::try_from(&config).expect("defaults are valid");
        assert_eq!(timing.prefill_overhead, Duration::from_millis(5));
        assert_eq!(timing.inter_token, Duration::from_millis(3));
        assert_eq!(timing.prefill(1000), Duration::from_millis(25));
    }

    #[test]
    fn zero_time_scale_disables_delays() {
        let timing = Timing::try_from(&Config::for_tests("t")).expect("valid");
        assert_eq!(timing.prefill(100_000), Duration::ZERO);
        assert_eq!(timing.inter_token, Duration::ZERO);
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad = [
            Config {
                block_size: 0,
                ..Config::default()
            },
            Config {
                time_scale: -1.0,
                ..Config::default()
            },
            Config {
                itl_ms: f64::NAN,
                ..Config::default()
            },
            Config {
                prefill_overhead_ms: 1e300,
                ..Config::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(Config::default().validate().is_ok());
    }
}
