//! Read-only endpoints: `/health`, `/version`, `/metrics`, `/v1/models`,
//! and the `server_info` / `model_info` probes some peer routers send.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

use super::protocol::{ModelCard, ModelList, Null, ServerInfo, Version};
use super::{App, VLLM_VERSION};

/// `GET /health`: 200 with an empty body while the server runs.
pub async fn health() {}

/// `GET /version`: `{"version": …}`, like vLLM.
pub async fn version() -> impl IntoResponse {
    Json(Version {
        version: VLLM_VERSION,
    })
}

/// `GET /metrics`: Prometheus text exposition.
pub async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        app.engine.render_metrics(),
    )
}

/// `GET /v1/models`: the one served model.
pub async fn models(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(ModelList {
        object: "list",
        data: [ModelCard {
            id: &app.model,
            object: "model",
            created: app.created,
            owned_by: "vllm",
            root: &app.model,
            parent: Null,
            max_model_len: app.limits.max_model_len,
        }],
    })
    .into_response()
}

/// `GET /server_info` and friends: the served model's name only (no paths,
/// so peers fall back to their own tokenizer settings).
pub async fn server_info(State(app): State<Arc<App>>) -> impl IntoResponse {
    Json(ServerInfo {
        served_model_name: &app.model,
    })
    .into_response()
}
