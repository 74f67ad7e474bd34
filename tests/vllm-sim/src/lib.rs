//! `vllm-sim`: a stand-in for a vLLM OpenAI-compatible server, for running
//! and testing a prefix-aware router without GPUs.
//!
//! It speaks vLLM's HTTP API (completions and chat completions, streamed or
//! not, `/v1/models`, `/health`, `/metrics`, `/tokenize`, …), tokenizes
//! prompts for real, models vLLM's automatic prefix caching block by block,
//! and paces its answers with a simple latency model in which cached prompt
//! tokens are free. See `README.md` for the defaults and their rationale.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vllm_sim::Error> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(vllm_sim::Error::Serve)?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! vllm_sim::serve(listener, vllm_sim::Config::for_tests("sim-0"), shutdown).await
//! # }
//! ```
//!
//! Module map: [`config`] (flags), [`tokenize`] and [`chat_template`]
//! (prompt to ids), [`cache`] (prefix cache), [`sampler`] (generated text),
//! [`engine`] (request lifecycle and timing), [`metrics`], and the private
//! `api` (HTTP).

mod api;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod sampler;
pub mod tokenize;

use std::future::Future;

use tokio::net::TcpListener;

pub use crate::api::SERVED_BY;
pub use crate::config::Config;
pub use crate::error::Error;
use crate::error::TokenizerError;
use crate::tokenize::Tokenizer;

/// Serves the simulator on `listener` until `shutdown` completes, then stops
/// accepting and waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    config.validate()?;
    // Building the vocabulary takes a while on first use: keep it off the
    // runtime's worker threads.
    let tokenizer = tokio::task::spawn_blocking(Tokenizer::shared)
        .await
        .map_err(TokenizerError::Task)??;
    let router = api::router(&config, tokenizer)?;
    match listener.local_addr() {
        Ok(addr) => {
            tracing::info!(sim = %config.id, model = %config.model, "listening on http://{addr}")
        }
        Err(error) => tracing::warn!(sim = %config.id, %error, "listening on an unknown address"),
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::Serve)?;
    tracing::info!(sim = %config.id, "stopped");
    Ok(())
}
