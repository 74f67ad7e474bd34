//! Delivering a generation: collected into one body, or streamed as
//! server-sent events (`data: {json}\n\n` per chunk, then `data: [DONE]`),
//! each token as soon as the engine produces it.
//!
//! The event stream owns the [`Generation`] and drives it as the client
//! reads; if the client goes away, hyper drops the stream, which stops the
//! generation and counts an abort. If the engine dies mid-generation
//! (`--die-after-tokens`), the body fails, so hyper drops the connection
//! instead of ending the response.

use std::io;

use axum::body::{Body, Bytes};
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::protocol::Usage;
use crate::engine::{EngineDied, Generation, Token};
use crate::metrics::FinishReason;

/// What every response and chunk of one request repeats.
#[derive(Clone, Debug)]
pub struct ResponseMeta {
    /// `cmpl-…` or `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: String,
}

/// A generation run to its end.
#[derive(Debug)]
pub struct Completed {
    /// All generated text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
}

/// Runs `generation` to its end.
pub async fn collect(mut generation: Generation) -> Result<Completed, EngineDied> {
    let mut text = String::new();
    let mut finish_reason = FinishReason::Length;
    while let Some(token) = generation.next_token().await? {
        text.push_str(token.text);
        if let Some(reason) = token.finish_reason {
            finish_reason = reason;
        }
    }
    Ok(Completed {
        text,
        finish_reason,
        usage: usage(&generation),
    })
}

/// A response whose body fails at once, so that hyper drops the connection:
/// what a client sees of a server that died (`--die-after-tokens`) while
/// the request ran.
pub fn dropped(died: EngineDied) -> Response {
    let body = futures_util::stream::once(async move { Err::<Bytes, _>(died_error(died)) });
    Body::from_stream(body).into_response()
}

fn died_error(died: EngineDied) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, died)
}

/// Token counts of `generation` so far.
pub fn usage(generation: &Generation) -> Usage {
    Usage::new(
        generation.prompt_tokens(),
        generation.completion_tokens(),
        generation.cached_tokens(),
    )
}

/// Spells one endpoint's stream chunks.
pub trait ChunkEncoder: Send + 'static {
    /// Appends the event(s) announcing `token`; `first` marks the first one.
    fn write_token(&self, token: &Token, first: bool, out: &mut String);
    /// Appends the final usage event.
    fn write_usage(&self, usage: Usage, out: &mut String);
}

/// Appends one SSE event carrying `chunk` as JSON.
pub fn push_event(out: &mut String, chunk: &impl Serialize) {
    out.push_str("data: ");
    out.push_str(&to_json(chunk));
    out.push_str("\n\n");
}

/// Serializes a wire type.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value)
        .expect("invariant: wire types have only string keys and infallible Serialize impls")
}

/// A `text/event-stream` response streaming `generation`, with a usage
/// chunk before `[DONE]` when `include_usage`.
pub fn event_stream(
    generation: Generation,
    encoder: impl ChunkEncoder,
    include_usage: bool,
) -> Response {
    let events = EventStream {
        generation,
        encoder,
        include_usage,
        phase: Phase::Tokens { first: true },
    };
    let body = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.next_event().await?;
        Some((event, events))
    });
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        )],
        Body::from_stream(body),
    )
        .into_response()
}

/// Where an event stream is.
#[derive(Clone, Copy, Debug)]
enum Phase {
    Tokens { first: bool },
    Usage,
    Done,
    Ended,
}

struct EventStream<E> {
    generation: Generation,
    encoder: E,
    include_usage: bool,
    phase: Phase,
}

impl<E: ChunkEncoder> EventStream<E> {
    async fn next_event(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            match self.phase {
                Phase::Tokens { first } => match self.generation.next_token().await {
                    Ok(Some(token)) => {
                        let mut out = String::new();
                        self.encoder.write_token(&token, first, &mut out);
                        self.phase = match token.finish_reason {
                            Some(_) => Phase::Usage,
                            None => Phase::Tokens { first: false },
                        };
                        return Some(Ok(out.into()));
                    }
                    Ok(None) => self.phase = Phase::Usage,
                    Err(died) => {
                        self.phase = Phase::Ended;
                        return Some(Err(died_error(died)));
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    if self.include_usage {
                        let mut out = String::new();
                        self.encoder.write_usage(usage(&self.generation), &mut out);
                        return Some(Ok(out.into()));
                    }
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    return Some(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
                }
                Phase::Ended => return None,
            }
        }
    }
}
