//! The library's error types: what can stop the simulator from starting or
//! serving. Per-request failures are HTTP responses, not errors, and live in
//! the private `api` module.

/// Why [`crate::serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The tokenizer could not be built.
    #[error("cannot load the tokenizer")]
    Tokenizer(#[from] TokenizerError),
    /// The HTTP server stopped with an I/O error.
    #[error("HTTP server failed")]
    Serve(#[source] std::io::Error),
    /// The simulated crash of `--die-after-tokens` happened: every
    /// connection was dropped.
    #[error("simulated crash after {0} generated tokens (--die-after-tokens)")]
    Died(u64),
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size that must be at least 1 is 0.
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    /// A delay or scale that is negative, not finite, or too large.
    #[error("--{flag} = {value} is not a usable non-negative duration")]
    NotADuration {
        /// The flag's name, without dashes.
        flag: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// A fraction outside [0, 1].
    #[error("--{flag} = {value} is not a fraction between 0 and 1")]
    NotAFraction {
        /// The flag's name, without dashes.
        flag: &'static str,
        /// The rejected value.
        value: f64,
    },
    /// The step budget cannot hold one decode token per running sequence.
    #[error("--max-num-batched-tokens ({tokens}) must be at least --max-num-seqs ({seqs})")]
    BudgetBelowSeqs {
        /// `--max-num-batched-tokens`.
        tokens: usize,
        /// `--max-num-seqs`.
        seqs: usize,
    },
    /// The instance id cannot be sent as an HTTP header value.
    #[error("--id {0:?} is not a valid HTTP header value")]
    InvalidId(String),
}

/// The tokenizer's vocabulary could not be loaded or does not fit the
/// simulator's assumptions.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// tiktoken failed to build cl100k_base.
    #[error("cannot build cl100k_base: {0}")]
    Load(String),
    /// The loading task panicked or was cancelled.
    #[error("the tokenizer loading task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A word of the generation vocabulary is not exactly one token.
    #[error("generation word {0:?} is not a single cl100k token")]
    NotOneToken(String),
}
