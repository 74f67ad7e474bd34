//! `POST /tokenize`: a prompt or a conversation as the engine would see it.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};

use super::App;
use super::error::ApiError;
use super::prompt::{chat_prompt, completion_prompt, parse_json};
use super::protocol::{Null, TokenizeRequest, TokenizeResponse};

/// Tokenizes `prompt` (BOS unless `add_special_tokens` is false) or
/// `messages` (through the chat template).
pub async fn tokenize(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: TokenizeRequest = parse_json(body)?;
    app.check_model(request.model.as_deref())?;
    let tokens = match (&request.prompt, &request.messages) {
        (Some(prompt), None) => completion_prompt(
            app.tokenizer,
            prompt,
            request.add_special_tokens.unwrap_or(true),
        )?,
        (None, Some(messages)) => chat_prompt(
            app.tokenizer,
            messages,
            request.add_generation_prompt.unwrap_or(true),
        ),
        _ => {
            return Err(ApiError::bad_request(
                "Exactly one of `prompt` and `messages` must be given.",
            ));
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: app.limits.max_model_len,
        tokens: &tokens,
        token_strs: Null,
    })
    .into_response())
}
