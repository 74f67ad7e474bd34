//! `POST /v1/completions` and `POST /v1/completions/render`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::prompt::{completion_prompt, parse_json};
use super::protocol::{
    CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse,
    CompletionStreamChoice, Null, RenderResponse, Usage,
};
use super::respond::{self, ChunkEncoder, ResponseMeta, push_event};
use super::{App, include_usage};
use crate::engine::{GenerationRequest, Token};
use crate::sampler::TextStyle;

const OBJECT: &str = "text_completion";

/// Generates a completion, streamed or not.
pub async fn create(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_json(body)?;
    app.check_model(request.model.as_deref())?;
    let prompt = completion_prompt(app.tokenizer, &request.prompt, true)?;
    let max_tokens = app.limits.budget(prompt.len(), request.max_tokens)?;
    app.inject_faults().await?;
    let meta = app.response_meta("cmpl", &headers);
    let generation = app.engine.submit(GenerationRequest {
        request_id: meta.id.clone(),
        prompt,
        max_tokens,
        seed: app.seed(request.seed),
        style: TextStyle::Completion,
    });

    if request.stream.unwrap_or(false) {
        let include_usage = include_usage(request.stream_options.as_ref());
        return Ok(respond::event_stream(
            generation,
            Encoder { meta },
            include_usage,
        ));
    }
    let done = match respond::collect(generation).await {
        Ok(done) => done,
        Err(died) => return Ok(respond::dropped(died)),
    };
    let body = CompletionResponse {
        id: &meta.id,
        object: OBJECT,
        created: meta.created,
        model: &meta.model,
        choices: [CompletionChoice {
            index: 0,
            text: &done.text,
            logprobs: Null,
            finish_reason: done.finish_reason.as_str(),
            stop_reason: Null,
            prompt_logprobs: Null,
        }],
        usage: done.usage,
    };
    Ok(Json(body).into_response())
}

/// Returns the prompt's token ids without generating.
pub async fn render(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_json(body)?;
    app.check_model(request.model.as_deref())?;
    let prompt = completion_prompt(app.tokenizer, &request.prompt, true)?;
    Ok(Json(RenderResponse::new(&prompt)).into_response())
}

/// Completion chunks: one per token, the last with its finish reason.
struct Encoder {
    meta: ResponseMeta,
}

impl Encoder {
    fn chunk<'a>(
        &'a self,
        choices: &'a [CompletionStreamChoice<'a>],
        usage: Option<Usage>,
    ) -> CompletionChunk<'a> {
        CompletionChunk {
            id: &self.meta.id,
            object: OBJECT,
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage,
        }
    }
}

impl ChunkEncoder for Encoder {
    fn write_token(&self, token: &Token, _first: bool, out: &mut String) {
        let choice = [CompletionStreamChoice {
            index: 0,
            text: token.text,
            logprobs: Null,
            finish_reason: token.finish_reason.map(|reason| reason.as_str()),
            stop_reason: Null,
        }];
        push_event(out, &self.chunk(&choice, None));
    }

    fn write_usage(&self, usage: Usage, out: &mut String) {
        push_event(out, &self.chunk(&[], Some(usage)));
    }
}
