//! The OpenAI-compatible wire types, shaped like vLLM's.
//!
//! Requests keep only the fields the simulator acts on; every other field
//! (temperature, top_p, …) is accepted and ignored. Responses mirror vLLM's
//! field order and its `null`s.

use serde::{Deserialize, Serialize};

use crate::tokenize::TokenId;

/// A field vLLM always sends and the simulator never fills: serializes as
/// JSON `null`.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Null;

// ---------------------------------------------------------------- requests

/// `prompt` of a completion request. Batches are accepted but only their
/// first element is served (one choice per response).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// A string.
    Text(String),
    /// Token ids.
    Tokens(Vec<TokenId>),
    /// A batch of strings.
    Texts(Vec<String>),
    /// A batch of token-id lists.
    TokenBatches(Vec<Vec<TokenId>>),
}

/// `stream_options`.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `POST /v1/completions` (also `/v1/completions/render`).
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// Must name the served model when present.
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens to generate.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Seed of the generated text.
    #[serde(default)]
    pub seed: Option<i64>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// Absent or `null` for e.g. assistant tool calls.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// A message's `content`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts.
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Text.
    Text {
        /// The text.
        text: String,
    },
    /// An image (rendered as one placeholder token).
    ImageUrl,
    /// Any other kind of part (ignored).
    #[serde(other)]
    Other,
}

/// `POST /v1/chat/completions` (also `/v1/chat/completions/render`).
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// Must name the served model when present.
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Tokens to generate (preferred).
    #[serde(default)]
    pub max_completion_tokens: Option<usize>,
    /// Tokens to generate (legacy spelling).
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Answer with server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Seed of the generated text.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Append the assistant header (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

/// `POST /tokenize`: either a completion-style `prompt` or chat `messages`.
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    /// Must name the served model when present.
    #[serde(default)]
    pub model: Option<String>,
    /// Text or token prompt.
    #[serde(default)]
    pub prompt: Option<Prompt>,
    /// A conversation, rendered with the chat template.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Prepend BOS to a `prompt` (default true; ignored for messages, whose
    /// template has it).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// For `messages`: append the assistant header (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

// --------------------------------------------------------------- responses

/// `usage`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Prompt plus completion.
    pub total_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Prefix-cache detail.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl Usage {
    /// Usage of a request with these token counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A non-streaming completion.
#[derive(Debug, Serialize)]
pub struct CompletionResponse<'a> {
    /// `cmpl-…`.
    pub id: &'a str,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: &'a str,
    /// The single choice.
    pub choices: [CompletionChoice<'a>; 1],
    /// Token counts.
    pub usage: Usage,
}

/// A completion's choice.
#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// Generated text.
    pub text: &'a str,
    /// Always null.
    pub logprobs: Null,
    /// `length` or `stop`.
    pub finish_reason: &'static str,
    /// Always null.
    pub stop_reason: Null,
    /// Always null.
    pub prompt_logprobs: Null,
}

/// A streamed completion chunk; with `choices` empty and `usage` set, the
/// final usage chunk.
#[derive(Debug, Serialize)]
pub struct CompletionChunk<'a> {
    /// `cmpl-…`.
    pub id: &'a str,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: &'a str,
    /// Zero or one choice.
    pub choices: &'a [CompletionStreamChoice<'a>],
    /// Null except in the usage chunk.
    pub usage: Option<Usage>,
}

/// A completion chunk's choice.
#[derive(Debug, Serialize)]
pub struct CompletionStreamChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// This chunk's text.
    pub text: &'a str,
    /// Always null.
    pub logprobs: Null,
    /// Set on the last token.
    pub finish_reason: Option<&'static str>,
    /// Always null.
    pub stop_reason: Null,
}

/// A non-streaming chat completion.
#[derive(Debug, Serialize)]
pub struct ChatCompletionResponse<'a> {
    /// `chatcmpl-…`.
    pub id: &'a str,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: &'a str,
    /// The single choice.
    pub choices: [ChatChoice<'a>; 1],
    /// Token counts.
    pub usage: Usage,
    /// Always null.
    pub prompt_logprobs: Null,
}

/// A chat completion's choice.
#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage<'a>,
    /// Always null.
    pub logprobs: Null,
    /// `length` or `stop`.
    pub finish_reason: &'static str,
    /// Always null.
    pub stop_reason: Null,
}

/// The generated chat message.
#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    /// Always `assistant`.
    pub role: &'static str,
    /// Generated text.
    pub content: &'a str,
    /// Always empty.
    pub tool_calls: [Null; 0],
}

/// A streamed chat chunk; with `choices` empty and `usage` set, the final
/// usage chunk.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    /// `chatcmpl-…`.
    pub id: &'a str,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: &'a str,
    /// Zero or one choice.
    pub choices: &'a [ChatStreamChoice<'a>],
    /// Only in the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A chat chunk's choice.
#[derive(Debug, Serialize)]
pub struct ChatStreamChoice<'a> {
    /// Always 0.
    pub index: u32,
    /// The increment.
    pub delta: Delta<'a>,
    /// Always null.
    pub logprobs: Null,
    /// Set on the last token.
    pub finish_reason: Option<&'static str>,
    /// Present (as null) only with a finish reason, as in vLLM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<Null>,
}

/// A chat chunk's increment.
#[derive(Debug, Serialize)]
pub struct Delta<'a> {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    pub content: &'a str,
}

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    /// Always `list`.
    pub object: &'static str,
    /// The served model.
    pub data: [ModelCard<'a>; 1],
}

/// One served model.
#[derive(Debug, Serialize)]
pub struct ModelCard<'a> {
    /// Model name.
    pub id: &'a str,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds the server started.
    pub created: u64,
    /// Always `vllm`.
    pub owned_by: &'static str,
    /// Model name.
    pub root: &'a str,
    /// Always null.
    pub parent: Null,
    /// Context window.
    pub max_model_len: usize,
}

/// `POST /tokenize`.
#[derive(Debug, Serialize)]
pub struct TokenizeResponse<'a> {
    /// Number of tokens.
    pub count: usize,
    /// Context window.
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: &'a [TokenId],
    /// Always null.
    pub token_strs: Null,
}

/// `POST /v1/completions/render` and `/v1/chat/completions/render`: the
/// prompt as the engine would see it, under both names clients read
/// (vllm-router 0.1.17's cache-aware policy reads `token_ids` and refuses a
/// reply without it as `invalid_token_ids`).
#[derive(Debug, Serialize)]
pub struct RenderResponse<'a> {
    /// The prompt's token ids.
    pub token_ids: &'a [TokenId],
    /// The same ids, under the engine-prompt name.
    pub prompt_token_ids: &'a [TokenId],
}

impl<'a> RenderResponse<'a> {
    /// The reply for a prompt of `ids`.
    pub fn new(ids: &'a [TokenId]) -> Self {
        Self {
            token_ids: ids,
            prompt_token_ids: ids,
        }
    }
}

/// `GET /version`.
#[derive(Debug, Serialize)]
pub struct Version {
    /// The vLLM release the simulator follows.
    pub version: &'static str,
}

/// `GET /server_info`, `/model_info` and their `get_` twins.
#[derive(Debug, Serialize)]
pub struct ServerInfo<'a> {
    /// Served model.
    pub served_model_name: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_forms_parse() {
        let parse = |json: &str| serde_json::from_str::<Prompt>(json).expect("valid prompt");
        assert!(matches!(parse(r#""hi""#), Prompt::Text(t) if t == "hi"));
        assert!(matches!(parse("[1, 2]"), Prompt::Tokens(t) if t == [1, 2]));
        assert!(matches!(parse(r#"["a", "b"]"#), Prompt::Texts(t) if t.len() == 2));
        assert!(matches!(parse("[[1], [2, 3]]"), Prompt::TokenBatches(t) if t.len() == 2));
    }

    #[test]
    fn content_parts_parse() {
        let message: ChatMessage = serde_json::from_str(
            r#"{"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                {"type": "input_audio", "input_audio": {}}
            ]}"#,
        )
        .expect("valid message");
        let Some(MessageContent::Parts(parts)) = message.content else {
            panic!("parts expected");
        };
        assert!(matches!(&parts[0], ContentPart::Text { text } if text == "look"));
        assert!(matches!(parts[1], ContentPart::ImageUrl));
        assert!(matches!(parts[2], ContentPart::Other));
    }

    #[test]
    fn chunk_shapes_match_vllm() {
        let choice = [CompletionStreamChoice {
            index: 0,
            text: " a",
            logprobs: Null,
            finish_reason: None,
            stop_reason: Null,
        }];
        let chunk = CompletionChunk {
            id: "cmpl-1",
            object: "text_completion",
            created: 7,
            model: "m",
            choices: &choice,
            usage: None,
        };
        assert_eq!(
            serde_json::to_string(&chunk).expect("serializable"),
            r#"{"id":"cmpl-1","object":"text_completion","created":7,"model":"m","choices":[{"index":0,"text":" a","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}"#
        );
        let choice = [ChatStreamChoice {
            index: 0,
            delta: Delta {
                role: Some("assistant"),
                content: "",
            },
            logprobs: Null,
            finish_reason: None,
            stop_reason: None,
        }];
        let chunk = ChatChunk {
            id: "chatcmpl-1",
            object: "chat.completion.chunk",
            created: 7,
            model: "m",
            choices: &choice,
            usage: None,
        };
        assert_eq!(
            serde_json::to_string(&chunk).expect("serializable"),
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#
        );
    }
}
