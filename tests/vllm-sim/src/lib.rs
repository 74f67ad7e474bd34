//! `vllm-sim`: a stand-in for a vLLM OpenAI-compatible server, for running
//! and testing a prefix-aware router without GPUs.
//!
//! It speaks vLLM's HTTP API (completions and chat completions, streamed or
//! not, `/v1/models`, `/health`, `/version`, `/metrics`, `/tokenize`, …),
//! tokenizes prompts for real, models vLLM's automatic prefix caching block
//! by block, schedules requests like vLLM's continuous batching (at most
//! `--max-num-seqs` running, the rest queued, chunked prefill, decode steps
//! that slow down as the batch grows), and paces its answers with a latency
//! model in which cached prompt tokens are free. It can also misbehave on
//! purpose (`--fail-rate`, `--die-after-tokens`, `--stall-ms`,
//! `--startup-delay-s`). See `README.md` for the model, the `--profile`
//! presets and their sources.
//!
//! ```no_run
//! # async fn demo() -> Result<(), vllm_sim::Error> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(vllm_sim::Error::Serve)?;
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! vllm_sim::serve(listener, vllm_sim::Config::for_tests("sim-0"), shutdown).await
//! # }
//! ```
//!
//! Module map: [`config`] (flags, profiles, timing), [`tokenize`] and
//! [`chat_template`] (prompt to ids), [`cache`] (prefix cache),
//! [`scheduler`] (queue, batch, chunked prefill), [`engine`] (the timed step
//! loop, token delivery, the simulated crash), [`sampler`] (generated text),
//! [`metrics`], and the private `api` (HTTP) and `listener` (connections a
//! crash drops).

mod api;
pub mod cache;
pub mod chat_template;
pub mod config;
pub mod engine;
pub mod error;
mod listener;
pub mod metrics;
pub mod sampler;
pub mod scheduler;
pub mod tokenize;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;

pub use crate::api::{SERVED_BY, VLLM_VERSION};
pub use crate::config::{Config, Profile};
use crate::engine::Engine;
pub use crate::error::Error;
use crate::error::TokenizerError;
use crate::listener::DyingListener;
use crate::tokenize::Tokenizer;

/// Serves the simulator on `listener` until `shutdown` completes, then stops
/// accepting and waits for the requests in flight.
///
/// With `--die-after-tokens` it instead ends with [`Error::Died`] once the
/// engine has generated that many tokens, having dropped every connection
/// (in flight or idle) and stopped accepting; the listener is closed when
/// it returns.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    serve_observed(listener, config, shutdown, |_| {}).await
}

/// [`serve`], handing the engine to `observe` once it is built, so an
/// in-process caller (a benchmark) can read its [`Engine::gauges`].
pub async fn serve_observed(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    observe: impl FnOnce(Arc<Engine>) + Send,
) -> Result<(), Error> {
    config.validate()?;
    // Building the vocabulary takes a while on first use: keep it off the
    // runtime's worker threads.
    let tokenizer = tokio::task::spawn_blocking(Tokenizer::shared)
        .await
        .map_err(TokenizerError::Task)??;
    let (router, engine) = api::router(&config, tokenizer)?;
    observe(Arc::clone(&engine));
    match listener.local_addr() {
        Ok(addr) => tracing::info!(
            sim = %config.id,
            model = %config.model,
            profile = %config.profile,
            max_num_seqs = config.max_num_seqs,
            "listening on http://{addr}"
        ),
        Err(error) => tracing::warn!(sim = %config.id, %error, "listening on an unknown address"),
    }
    if config.startup_delay_s > 0.0 {
        tracing::info!(
            sim = %config.id,
            "answering 503 for the first {} s (--startup-delay-s)",
            config.startup_delay_s
        );
    }
    let mut death = engine.death();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            _ = death.wait_for(|dead| *dead) => {}
        }
    };
    let listener = DyingListener::new(listener, engine.death());
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
        .map_err(Error::Serve)?;
    if engine.is_dead() {
        return Err(Error::Died(engine.metrics().generation_tokens()));
    }
    tracing::info!(sim = %config.id, "stopped");
    Ok(())
}
