//! `POST /v1/chat/completions` and `POST /v1/chat/completions/render`.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::prompt::{chat_prompt, parse_json};
use super::protocol::{
    AssistantMessage, ChatChoice, ChatChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatStreamChoice, Delta, Null, RenderResponse, Usage,
};
use super::respond::{self, ChunkEncoder, ResponseMeta, push_event};
use super::{App, include_usage};
use crate::engine::{GenerationRequest, Token};
use crate::sampler::TextStyle;

const ROLE: &str = "assistant";

/// Generates a chat completion, streamed or not.
pub async fn create(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatCompletionRequest = parse_json(body)?;
    app.check_model(request.model.as_deref())?;
    let prompt = chat_prompt(
        app.tokenizer,
        &request.messages,
        request.add_generation_prompt.unwrap_or(true),
    );
    let requested = request.max_completion_tokens.or(request.max_tokens);
    let max_tokens = app.limits.budget(prompt.len(), requested)?;
    app.inject_faults().await?;
    let meta = app.response_meta("chatcmpl", &headers);
    let generation = app.engine.submit(GenerationRequest {
        request_id: meta.id.clone(),
        prompt,
        max_tokens,
        seed: app.seed(request.seed),
        style: TextStyle::Chat,
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
    let body = ChatCompletionResponse {
        id: &meta.id,
        object: "chat.completion",
        created: meta.created,
        model: &meta.model,
        choices: [ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: ROLE,
                content: &done.text,
                tool_calls: [],
            },
            logprobs: Null,
            finish_reason: done.finish_reason.as_str(),
            stop_reason: Null,
        }],
        usage: done.usage,
        prompt_logprobs: Null,
    };
    Ok(Json(body).into_response())
}

/// Returns the rendered conversation's token ids without generating.
pub async fn render(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatCompletionRequest = parse_json(body)?;
    app.check_model(request.model.as_deref())?;
    let prompt = chat_prompt(
        app.tokenizer,
        &request.messages,
        request.add_generation_prompt.unwrap_or(true),
    );
    Ok(Json(RenderResponse::new(&prompt)).into_response())
}

/// Chat chunks: the role (sent with the first token, as vLLM does once the
/// prefill is done), one content delta per token, the last with its finish
/// reason.
struct Encoder {
    meta: ResponseMeta,
}

impl Encoder {
    fn write_chunk(
        &self,
        out: &mut String,
        choices: &[ChatStreamChoice<'_>],
        usage: Option<Usage>,
    ) {
        let chunk = ChatChunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices,
            usage,
        };
        push_event(out, &chunk);
    }
}

impl ChunkEncoder for Encoder {
    fn write_token(&self, token: &Token, first: bool, out: &mut String) {
        if first {
            let role = [ChatStreamChoice {
                index: 0,
                delta: Delta {
                    role: Some(ROLE),
                    content: "",
                },
                logprobs: Null,
                finish_reason: None,
                stop_reason: None,
            }];
            self.write_chunk(out, &role, None);
        }
        let finish_reason = token.finish_reason.map(|reason| reason.as_str());
        let content = [ChatStreamChoice {
            index: 0,
            delta: Delta {
                role: None,
                content: token.text,
            },
            logprobs: Null,
            finish_reason,
            stop_reason: finish_reason.map(|_| Null),
        }];
        self.write_chunk(out, &content, None);
    }

    fn write_usage(&self, usage: Usage, out: &mut String) {
        self.write_chunk(out, &[], Some(usage));
    }
}
