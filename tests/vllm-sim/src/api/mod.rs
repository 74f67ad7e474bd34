//! The HTTP surface: axum routes for vLLM's OpenAI-compatible API and its
//! side endpoints, and the faults injected at this layer (`--fail-rate`,
//! `--stall-ms`, `--startup-delay-s`). Every response, errors included,
//! carries `x-served-by: <instance id>`.

mod chat;
mod completions;
mod error;
mod info;
mod prompt;
mod protocol;
mod respond;
mod tokens;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use self::error::ApiError;
use self::prompt::Limits;
use self::protocol::StreamOptions;
use self::respond::ResponseMeta;
use crate::config::{Config, Faults};
use crate::engine::Engine;
use crate::error::{ConfigError, Error};
use crate::tokenize::Tokenizer;

/// Name of the header identifying the instance that answered.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// Largest accepted request body (long-context prompts are megabytes).
const MAX_BODY_BYTES: usize = 64 << 20;

/// The vLLM release whose API and metrics the simulator follows, reported
/// by `GET /version`.
pub const VLLM_VERSION: &str = "0.11.0";

/// Mixed into `--seed` for the `--fail-rate` draws, so they do not repeat
/// the generated text's.
const FAIL_RATE_SEED: u64 = 0x6661_696c_7261_7465; // "failrate"

/// What the handlers share.
#[derive(Debug)]
pub(crate) struct App {
    model: String,
    /// Unix seconds at start, reported as the model's creation time.
    created: u64,
    /// Seed of requests that bring none.
    seed: u64,
    limits: Limits,
    tokenizer: &'static Tokenizer,
    engine: Arc<Engine>,
    faults: Faults,
    /// Draws of `--fail-rate`, in request order.
    fail_rng: Mutex<StdRng>,
    /// End of `--startup-delay-s`.
    ready_at: Instant,
}

impl App {
    /// 404 unless `requested` is absent or the served model, like vLLM.
    fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            Some(model) if model != self.model => Err(ApiError::not_found(format!(
                "The model `{model}` does not exist."
            ))),
            _ => Ok(()),
        }
    }

    /// The faults of a generation request that passed validation: maybe a
    /// 500 (`--fail-rate`), then maybe a pause (`--stall-ms`).
    async fn inject_faults(&self) -> Result<(), ApiError> {
        if self.faults.fail_rate > 0.0 {
            let fail = self
                .fail_rng
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .random_bool(self.faults.fail_rate);
            if fail {
                return Err(ApiError::internal(
                    "Simulated engine failure (--fail-rate).",
                ));
            }
        }
        if !self.faults.stall.is_zero() {
            tokio::time::sleep(self.faults.stall).await;
        }
        Ok(())
    }

    /// The request's seed, or the server's.
    fn seed(&self, requested: Option<i64>) -> u64 {
        requested.map_or(self.seed, i64::cast_unsigned)
    }

    /// Id, timestamp and model of a new response. The id reuses the
    /// client's `X-Request-Id` when it sends one, as vLLM does.
    fn response_meta(&self, prefix: &str, headers: &HeaderMap) -> ResponseMeta {
        let client_id = headers
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .filter(|id| !id.is_empty());
        let id = match client_id {
            Some(id) => format!("{prefix}-{id}"),
            None => format!("{prefix}-{:032x}", rand::random::<u128>()),
        };
        ResponseMeta {
            id,
            created: unix_now(),
            model: self.model.clone(),
        }
    }
}

/// Whether a stream should end with a usage chunk.
fn include_usage(options: Option<&StreamOptions>) -> bool {
    options.and_then(|options| options.include_usage) == Some(true)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// When a server that starts now and waits `delay` becomes ready (a
/// century at most).
fn ready_at(delay: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(delay.min(CENTURY)).unwrap_or(now)
}

/// Longer than any test or run waits.
const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Answers 503 to everything until `--startup-delay-s` has passed.
async fn readiness(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if Instant::now() < app.ready_at {
        return ApiError::unavailable("The server is starting up (--startup-delay-s).")
            .into_response();
    }
    next.run(request).await
}

/// Starts the engine for `config` and builds the routes serving it.
pub(crate) fn router(
    config: &Config,
    tokenizer: &'static Tokenizer,
) -> Result<(Router, Arc<Engine>), Error> {
    let engine = Engine::spawn(config, tokenizer)?;
    let faults = Faults::try_from(config)?;
    let served_by =
        HeaderValue::from_str(&config.id).map_err(|_| ConfigError::InvalidId(config.id.clone()))?;
    let app = Arc::new(App {
        model: config.model.clone(),
        created: unix_now(),
        seed: config.seed,
        limits: Limits {
            max_model_len: config.max_model_len,
            default_output_len: config.output_len,
        },
        tokenizer,
        engine: Arc::clone(&engine),
        faults,
        fail_rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ FAIL_RATE_SEED)),
        ready_at: ready_at(faults.startup_delay),
    });
    let router = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions/render", post(completions::render))
        .route("/v1/chat/completions/render", post(chat::render))
        .route("/tokenize", post(tokens::tokenize))
        .route("/v1/models", get(info::models))
        .route("/health", get(info::health))
        .route("/version", get(info::version))
        .route("/metrics", get(info::metrics))
        .route("/server_info", get(info::server_info))
        .route("/get_server_info", get(info::server_info))
        .route("/model_info", get(info::server_info))
        .route("/get_model_info", get(info::server_info))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            readiness,
        ))
        .layer(axum::middleware::map_response(
            move |mut response: Response| {
                let served_by = served_by.clone();
                async move {
                    response.headers_mut().insert(SERVED_BY, served_by);
                    response
                }
            },
        ))
        .with_state(app);
    Ok((router, engine))
}
