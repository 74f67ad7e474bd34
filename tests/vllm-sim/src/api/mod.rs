//! The HTTP surface: axum routes for vLLM's OpenAI-compatible API and its
//! side endpoints. Every response, errors included, carries
//! `x-served-by: <instance id>`.

mod chat;
mod completions;
mod error;
mod info;
mod prompt;
mod protocol;
mod respond;
mod tokens;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};

use self::error::ApiError;
use self::prompt::Limits;
use self::protocol::StreamOptions;
use self::respond::ResponseMeta;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::{ConfigError, Error};
use crate::tokenize::Tokenizer;

/// Name of the header identifying the instance that answered.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-served-by");

/// Largest accepted request body (long-context prompts are megabytes).
const MAX_BODY_BYTES: usize = 64 << 20;

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

/// Builds the engine for `config` and the routes serving it.
pub(crate) fn router(config: &Config, tokenizer: &'static Tokenizer) -> Result<Router, Error> {
    let engine = Arc::new(Engine::new(config, tokenizer)?);
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
        engine,
    });
    let router = Router::new()
        .route("/v1/completions", post(completions::create))
        .route("/v1/chat/completions", post(chat::create))
        .route("/v1/completions/render", post(completions::render))
        .route("/v1/chat/completions/render", post(chat::render))
        .route("/tokenize", post(tokens::tokenize))
        .route("/v1/models", get(info::models))
        .route("/health", get(info::health))
        .route("/metrics", get(info::metrics))
        .route("/server_info", get(info::server_info))
        .route("/get_server_info", get(info::server_info))
        .route("/model_info", get(info::server_info))
        .route("/get_model_info", get(info::server_info))
        .fallback(error::route_not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
    Ok(router)
}
