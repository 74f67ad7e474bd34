//! Simulator configuration: the command line, its environment twins, the
//! `--profile` presets, and the derived timing model.
//!
//! Every field is a `--flag` with a `VLLM_SIM_*` environment twin. A profile
//! ([`Profile`]) supplies the timing and scheduler limits of one model on one
//! kind of hardware; any of those flags given explicitly overrides the
//! profile's value. Parse the command line with [`Config::from_cli`], which
//! applies the profile (clap's derived `Config::parse` does not).
//!
//! The numbers of each profile and where they come from are in the crate
//! README ("Profiles"); they are estimates, not measurements of this
//! simulator's host.

use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

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
/// Default fixed prefill cost, in milliseconds (default profile).
pub const DEFAULT_PREFILL_OVERHEAD_MS: f64 = 10.0;
/// Default prefill cost per uncached prompt token, in microseconds (default profile).
pub const DEFAULT_PREFILL_PER_TOKEN_US: f64 = 40.0;
/// Default inter-token latency of a lone sequence, in milliseconds (default profile).
pub const DEFAULT_ITL_MS: f64 = 6.0;
/// Default decode-step growth per extra running sequence, in microseconds (default profile).
pub const DEFAULT_ITL_PER_SEQ_US: f64 = 100.0;
/// Default limit of running sequences (vLLM's for GPUs under 70 GiB).
pub const DEFAULT_MAX_NUM_SEQS: usize = 256;
/// Default token budget of one engine step (vLLM's API-server default for
/// GPUs under 70 GiB).
pub const DEFAULT_MAX_NUM_BATCHED_TOKENS: usize = 2048;

/// A latency and scheduler preset: one model on one kind of hardware.
#[derive(ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Profile {
    /// Llama-3.2-1B-Instruct, bf16, on one 24 GB A10-class GPU (the default).
    #[default]
    #[value(name = "llama-3.2-1b-1gpu")]
    Llama1bOneGpu,
    /// Llama-3.1-8B-Instruct, bf16, on one H100 80 GB, under moderate load.
    #[value(name = "llama-8b-h100")]
    Llama8bH100,
    /// Llama-3.1-70B-Instruct, bf16, tensor-parallel on four H100 80 GB.
    #[value(name = "llama-70b-4xh100")]
    Llama70b4xH100,
    /// No delays at all, with the default profile's scheduler limits: for
    /// tests that need speed but want the queue.
    #[value(name = "instant")]
    Instant,
}

/// The values a [`Profile`] supplies.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preset {
    /// Fixed cost of an engine step that prefills, in milliseconds.
    pub prefill_overhead_ms: f64,
    /// Cost of each uncached prompt token, in microseconds.
    pub prefill_per_token_us: f64,
    /// Decode step of a lone sequence, in milliseconds.
    pub itl_ms: f64,
    /// Growth of the decode step per extra running sequence, in microseconds.
    pub itl_per_seq_us: f64,
    /// Running-sequence limit.
    pub max_num_seqs: usize,
    /// Token budget of one step.
    pub max_num_batched_tokens: usize,
}

impl std::fmt::Display for Profile {
    /// The profile's `--profile` spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_possible_value() {
            Some(value) => f.write_str(value.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

impl Profile {
    /// The profile's numbers (sources in the README).
    pub fn preset(self) -> Preset {
        match self {
            Self::Llama1bOneGpu => Preset {
                prefill_overhead_ms: DEFAULT_PREFILL_OVERHEAD_MS,
                prefill_per_token_us: DEFAULT_PREFILL_PER_TOKEN_US,
                itl_ms: DEFAULT_ITL_MS,
                itl_per_seq_us: DEFAULT_ITL_PER_SEQ_US,
                max_num_seqs: DEFAULT_MAX_NUM_SEQS,
                max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            },
            Self::Llama8bH100 => Preset {
                prefill_overhead_ms: 30.0,
                prefill_per_token_us: 250.0,
                itl_ms: 12.0,
                itl_per_seq_us: 70.0,
                max_num_seqs: 1024,
                max_num_batched_tokens: 8192,
            },
            Self::Llama70b4xH100 => Preset {
                prefill_overhead_ms: 110.0,
                prefill_per_token_us: 720.0,
                itl_ms: 26.0,
                itl_per_seq_us: 150.0,
                max_num_seqs: 1024,
                max_num_batched_tokens: 8192,
            },
            Self::Instant => Preset {
                prefill_overhead_ms: 0.0,
                prefill_per_token_us: 0.0,
                itl_ms: 0.0,
                itl_per_seq_us: 0.0,
                max_num_seqs: DEFAULT_MAX_NUM_SEQS,
                max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            },
        }
    }
}

/// Everything `vllm-sim` can be told, from its command line or environment.
#[derive(Parser, Clone, Debug, PartialEq)]
#[command(
    name = "vllm-sim",
    version,
    about = "A vLLM OpenAI-server simulator with a real prefix-cache model and scheduler."
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

    /// Latency and scheduler preset; the flags below override its values.
    #[arg(long, env = "VLLM_SIM_PROFILE", value_enum, default_value_t = Profile::default())]
    pub profile: Profile,

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

    /// Seed of the generated text (a request's own `seed` overrides it) and of `--fail-rate`.
    #[arg(long, env = "VLLM_SIM_SEED", default_value_t = 0)]
    pub seed: u64,

    /// Multiplies every simulated engine delay; 0 answers as fast as possible.
    #[arg(long, env = "VLLM_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,

    /// Fixed cost of an engine step that prefills, in milliseconds; default from --profile.
    #[arg(long, env = "VLLM_SIM_PREFILL_OVERHEAD_MS", default_value_t = DEFAULT_PREFILL_OVERHEAD_MS)]
    pub prefill_overhead_ms: f64,

    /// Prefill cost of each prompt token not served from the prefix cache, in microseconds; default from --profile.
    #[arg(long, env = "VLLM_SIM_PREFILL_PER_TOKEN_US", default_value_t = DEFAULT_PREFILL_PER_TOKEN_US)]
    pub prefill_per_token_us: f64,

    /// Decode step (inter-token latency) with one running sequence, in milliseconds; default from --profile.
    #[arg(long, env = "VLLM_SIM_ITL_MS", default_value_t = DEFAULT_ITL_MS)]
    pub itl_ms: f64,

    /// Growth of the decode step per additional running sequence, in microseconds; default from --profile.
    #[arg(long, env = "VLLM_SIM_ITL_PER_SEQ_US", default_value_t = DEFAULT_ITL_PER_SEQ_US)]
    pub itl_per_seq_us: f64,

    /// At most this many requests run at once; the rest wait in a FIFO queue; default from --profile.
    #[arg(long, env = "VLLM_SIM_MAX_NUM_SEQS", default_value_t = DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,

    /// Tokens one engine step may process (decodes plus prefill chunks); default from --profile.
    #[arg(long, env = "VLLM_SIM_MAX_NUM_BATCHED_TOKENS", default_value_t = DEFAULT_MAX_NUM_BATCHED_TOKENS)]
    pub max_num_batched_tokens: usize,

    /// Fault: fraction of generation requests answered 500 (seeded by --seed).
    #[arg(long, env = "VLLM_SIM_FAIL_RATE", default_value_t = 0.0)]
    pub fail_rate: f64,

    /// Fault: after this many generated tokens in total, drop every connection and stop.
    #[arg(long, env = "VLLM_SIM_DIE_AFTER_TOKENS")]
    pub die_after_tokens: Option<u64>,

    /// Fault: pause every generation request this long before it is queued, in milliseconds (not scaled).
    #[arg(long, env = "VLLM_SIM_STALL_MS", default_value_t = 0.0)]
    pub stall_ms: f64,

    /// Fault: answer 503 to everything, /health included, for this long after start, in seconds (not scaled).
    #[arg(long, env = "VLLM_SIM_STARTUP_DELAY_S", default_value_t = 0.0)]
    pub startup_delay_s: f64,
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
            profile: Profile::default(),
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_blocks: DEFAULT_KV_CACHE_BLOCKS,
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            output_len: DEFAULT_OUTPUT_LEN,
            seed: 0,
            time_scale: 1.0,
            prefill_overhead_ms: DEFAULT_PREFILL_OVERHEAD_MS,
            prefill_per_token_us: DEFAULT_PREFILL_PER_TOKEN_US,
            itl_ms: DEFAULT_ITL_MS,
            itl_per_seq_us: DEFAULT_ITL_PER_SEQ_US,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_num_batched_tokens: DEFAULT_MAX_NUM_BATCHED_TOKENS,
            fail_rate: 0.0,
            die_after_tokens: None,
            stall_ms: 0.0,
            startup_delay_s: 0.0,
        }
    }
}

/// Argument ids (field names) that a profile sets unless given explicitly.
const PROFILE_ARGS: [&str; 6] = [
    "prefill_overhead_ms",
    "prefill_per_token_us",
    "itl_ms",
    "itl_per_seq_us",
    "max_num_seqs",
    "max_num_batched_tokens",
];

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

    /// Parses the process's command line and environment, applying
    /// `--profile` under the flags given explicitly; exits with a usage
    /// message on error, like `clap::Parser::parse`.
    pub fn from_cli() -> Self {
        Self::try_from_cli(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    /// [`Self::from_cli`] for the given arguments (the first is the program
    /// name), returning errors instead of exiting.
    pub fn try_from_cli<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().try_get_matches_from(args)?;
        let mut config = Self::from_arg_matches(&matches)?;
        config.apply_profile(|id| is_explicit(&matches, id));
        Ok(config)
    }

    /// This configuration with `profile`'s timing and scheduler limits.
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self.apply_profile(|_| false);
        self
    }

    /// Copies the profile's values into the fields for which `explicit`
    /// returns false.
    fn apply_profile(&mut self, explicit: impl Fn(&str) -> bool) {
        let preset = self.profile.preset();
        let [overhead, per_token, itl, per_seq, seqs, batched] =
            PROFILE_ARGS.map(|id| !explicit(id));
        if overhead {
            self.prefill_overhead_ms = preset.prefill_overhead_ms;
        }
        if per_token {
            self.prefill_per_token_us = preset.prefill_per_token_us;
        }
        if itl {
            self.itl_ms = preset.itl_ms;
        }
        if per_seq {
            self.itl_per_seq_us = preset.itl_per_seq_us;
        }
        if seqs {
            self.max_num_seqs = preset.max_num_seqs;
        }
        if batched {
            self.max_num_batched_tokens = preset.max_num_batched_tokens;
        }
    }

    /// Checks the values that clap's types cannot: sizes that must be
    /// positive, durations that must be finite and non-negative, a rate
    /// within [0, 1].
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("block-size", self.block_size),
            ("max-model-len", self.max_model_len),
            ("output-len", self.output_len),
            ("max-num-seqs", self.max_num_seqs),
            ("max-num-batched-tokens", self.max_num_batched_tokens),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(flag));
            }
        }
        // As in vLLM: every running sequence must fit one decode token into a step.
        if self.max_num_batched_tokens < self.max_num_seqs {
            return Err(ConfigError::BudgetBelowSeqs {
                tokens: self.max_num_batched_tokens,
                seqs: self.max_num_seqs,
            });
        }
        if axum::http::HeaderValue::from_str(&self.id).is_err() {
            return Err(ConfigError::InvalidId(self.id.clone()));
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(ConfigError::NotAFraction {
                flag: "fail-rate",
                value: self.fail_rate,
            });
        }
        for (flag, value) in [
            ("time-scale", self.time_scale),
            ("prefill-overhead-ms", self.prefill_overhead_ms),
            ("prefill-per-token-us", self.prefill_per_token_us),
            ("itl-ms", self.itl_ms),
            ("itl-per-seq-us", self.itl_per_seq_us),
            ("stall-ms", self.stall_ms),
            ("startup-delay-s", self.startup_delay_s),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ConfigError::NotADuration { flag, value });
            }
        }
        // The delays are later built with `Duration::from_secs_f64`, which
        // panics past `Duration::MAX`; this keeps every product in range.
        Timing::try_from(self)?;
        Faults::try_from(self)?;
        Ok(())
    }
}

/// Whether argument `id` was given on the command line or in the environment.
fn is_explicit(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// The simulated latency model, already multiplied by `time_scale`.
///
/// One engine step processes every running sequence's next decode token and
/// up to the rest of the token budget in prompt tokens; it lasts
/// `prefill_overhead + prefill_per_token × prompt_tokens` if it prefills,
/// plus `inter_token + decode_per_seq × (decodes − 1)` if it decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Fixed cost of each step that prefills.
    pub prefill_overhead: Duration,
    /// Cost of each prompt token that missed the prefix cache.
    pub prefill_per_token: Duration,
    /// Decode step of a lone sequence.
    pub inter_token: Duration,
    /// Growth of the decode step per additional sequence in it.
    pub decode_per_seq: Duration,
}

impl Timing {
    /// Time to prefill `uncached_tokens` in one step; a lone request's first
    /// output token is produced at its end.
    pub fn prefill(&self, uncached_tokens: usize) -> Duration {
        self.prefill_overhead
            .saturating_add(times(self.prefill_per_token, uncached_tokens))
    }

    /// Time of a decode step over `sequences` running sequences (0 for none).
    pub fn decode(&self, sequences: usize) -> Duration {
        match sequences {
            0 => Duration::ZERO,
            n => self
                .inter_token
                .saturating_add(times(self.decode_per_seq, n - 1)),
        }
    }

    /// Time of a step that prefills `prefill_tokens` and decodes one token
    /// for each of `decodes` sequences.
    pub fn step(&self, prefill_tokens: usize, decodes: usize) -> Duration {
        let prefill = match prefill_tokens {
            0 => Duration::ZERO,
            n => self.prefill(n),
        };
        prefill.saturating_add(self.decode(decodes))
    }
}

/// `unit × n`, saturating.
fn times(unit: Duration, n: usize) -> Duration {
    u32::try_from(n)
        .ok()
        .and_then(|n| unit.checked_mul(n))
        .unwrap_or(Duration::MAX)
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
            decode_per_seq: scaled("itl-per-seq-us", config.itl_per_seq_us, 1e-6)?,
        })
    }
}

/// The injected faults, in wall-clock time (`--time-scale` does not apply).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Fraction of generation requests answered 500.
    pub fail_rate: f64,
    /// Generated tokens after which the server dies.
    pub die_after_tokens: Option<u64>,
    /// Pause before a generation request is queued.
    pub stall: Duration,
    /// Time after start during which everything is answered 503.
    pub startup_delay: Duration,
}

impl TryFrom<&Config> for Faults {
    type Error = ConfigError;

    fn try_from(config: &Config) -> Result<Self, ConfigError> {
        let duration = |flag: &'static str, value: f64, unit_secs: f64| {
            Duration::try_from_secs_f64(value * unit_secs)
                .map_err(|_| ConfigError::NotADuration { flag, value })
        };
        Ok(Self {
            fail_rate: config.fail_rate,
            die_after_tokens: config.die_after_tokens,
            stall: duration("stall-ms", config.stall_ms, 1e-3)?,
            startup_delay: duration("startup-delay-s", config.startup_delay_s, 1.0)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_sim_env() -> bool {
        std::env::vars().all(|(k, _)| !k.starts_with("VLLM_SIM_"))
    }

    #[test]
    fn cli_defaults_match_default_impl() {
        // The environment may legitimately set VLLM_SIM_* on a developer
        // machine; only compare when it does not.
        if no_sim_env() {
            let parsed = Config::try_from_cli(["vllm-sim"]).ok();
            assert_eq!(parsed, Some(Config::default()));
        }
    }

    #[test]
    fn default_profile_matches_the_defaults() {
        assert_eq!(
            Config::default().with_profile(Profile::default()),
            Config::default()
        );
    }

    #[test]
    fn flags_parse() {
        let config = Config::try_from_cli([
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
            "--max-num-seqs",
            "2",
            "--fail-rate",
            "0.25",
            "--die-after-tokens",
            "100",
            "--stall-ms",
            "50",
            "--startup-delay-s",
            "1.5",
        ])
        .expect("valid flags parse");
        assert_eq!(config.port, 8001);
        assert_eq!(config.id, "sim-0");
        assert_eq!(config.model, "m");
        assert!((config.time_scale - 0.5).abs() < f64::EPSILON);
        assert_eq!(config.max_num_seqs, 2);
        assert_eq!(config.die_after_tokens, Some(100));
        let faults = Faults::try_from(&config).expect("valid");
        assert_eq!(faults.stall, Duration::from_millis(50));
        assert_eq!(faults.startup_delay, Duration::from_millis(1500));
        assert!((faults.fail_rate - 0.25).abs() < f64::EPSILON);
    }

    #[test]
    fn a_profile_sets_what_was_not_given_explicitly() {
        if !no_sim_env() {
            return;
        }
        let config =
            Config::try_from_cli(["vllm-sim", "--profile", "llama-8b-h100", "--itl-ms", "20"])
                .expect("valid flags parse");
        let preset = Profile::Llama8bH100.preset();
        assert_eq!(config.profile, Profile::Llama8bH100);
        assert_eq!(config.profile.to_string(), "llama-8b-h100");
        assert!((config.prefill_overhead_ms - 30.0).abs() < f64::EPSILON);
        assert!((config.prefill_per_token_us - 250.0).abs() < f64::EPSILON);
        assert!(
            (config.itl_ms - 20.0).abs() < f64::EPSILON,
            "explicit flag wins"
        );
        assert_eq!(config.max_num_seqs, preset.max_num_seqs);
        assert_eq!(config.max_num_batched_tokens, preset.max_num_batched_tokens);
        assert_eq!(
            config,
            Config {
                itl_ms: 20.0,
                ..Config::default().with_profile(Profile::Llama8bH100)
            }
        );
    }

    #[test]
    fn every_profile_is_valid() {
        for profile in Profile::value_variants() {
            let config = Config::default().with_profile(*profile);
            assert!(config.validate().is_ok(), "{profile:?}");
        }
        let instant =
            Timing::try_from(&Config::default().with_profile(Profile::Instant)).expect("valid");
        assert_eq!(instant.step(10_000, 100), Duration::ZERO);
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
        assert_eq!(timing.decode_per_seq, Duration::from_micros(50));
    }

    #[test]
    fn steps_grow_with_the_batch() {
        let timing = Timing::try_from(&Config::default()).expect("valid");
        assert_eq!(timing.decode(0), Duration::ZERO);
        assert_eq!(timing.decode(1), Duration::from_millis(6));
        assert_eq!(timing.decode(11), Duration::from_millis(7));
        assert_eq!(timing.step(0, 0), Duration::ZERO);
        assert_eq!(timing.step(100, 0), Duration::from_millis(14));
        assert_eq!(timing.step(100, 11), Duration::from_millis(14 + 7));
    }

    #[test]
    fn zero_time_scale_disables_delays() {
        let timing = Timing::try_from(&Config::for_tests("t")).expect("valid");
        assert_eq!(timing.prefill(100_000), Duration::ZERO);
        assert_eq!(timing.step(100_000, 1000), Duration::ZERO);
        assert_eq!(timing.inter_token, Duration::ZERO);
    }

    #[test]
    fn faults_are_not_scaled() {
        let config = Config {
            stall_ms: 40.0,
            ..Config::for_tests("t")
        };
        let faults = Faults::try_from(&config).expect("valid");
        assert_eq!(faults.stall, Duration::from_millis(40));
    }

    #[test]
    fn invalid_values_are_rejected() {
        let bad = [
            Config {
                block_size: 0,
                ..Config::default()
            },
            Config {
                max_num_seqs: 0,
                ..Config::default()
            },
            Config {
                max_num_seqs: 4096,
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
            Config {
                fail_rate: 1.5,
                ..Config::default()
            },
            Config {
                fail_rate: f64::NAN,
                ..Config::default()
            },
            Config {
                stall_ms: -3.0,
                ..Config::default()
            },
            Config {
                startup_delay_s: f64::INFINITY,
                ..Config::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(Config::default().validate().is_ok());
    }
}
