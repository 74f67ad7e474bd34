//! prompt: pulls the routing inputs (the `model` name and a prompt *key*) out of an
//! OpenAI-style request body, without building a JSON tree.
//!
//! This module owns everything the router reads from a request body: which top-level
//! field carries the prompt for each [`Endpoint`], how that prompt is turned into a
//! byte key whose prefixes mirror the prompt's prefixes, and the JSON validation of
//! the body. The body must be complete (no streaming or splitting here).
//!
//! # How it works
//!
//! [`extract`] makes one validating pass over the whole body and reads the members of
//! the top-level object only. Other values are skipped by an iterative scanner (no
//! recursion; a 128-bit stack records which open brackets are objects). String
//! contents are jumped over with [`memchr::memchr2`] looking for `"` and `\`, and then
//! checked for control characters and UTF-8 in one chunked pass that the compiler
//! vectorises. The prompt value is interpreted while it is validated, and any error in
//! its shape is held back until the rest of the body has been validated (and dropped if
//! a later duplicate key replaces it). Only chat content-part arrays are walked a
//! second time, from their already validated spans, with a scanner that only stops at
//! `"` (via [`memchr::memchr`]). Keys written with escapes (`"pr\u006fmpt"`) are decoded
//! on a cold path before being compared.
//!
//! # Key encoding
//!
//! "Raw" below means the bytes between a JSON string's quotes exactly as they appear
//! in the body, escapes kept verbatim (so `"a\nb"` gives the four bytes `a\nb`).
//! The separators are `PART_SEP` (0x1D), `RECORD_SEP` (0x1E) and `ROLE_SEP`
//! (0x1F); none of them can appear unescaped inside a JSON string, so they never
//! collide with raw string bytes.
//!
//! [`Endpoint::Completions`] (field `prompt`):
//!
//! | `prompt` | key |
//! | --- | --- |
//! | string | its raw bytes, borrowed from the body (zero-copy) |
//! | array of strings | raw bytes of each string, each followed by 0x1E |
//! | array of token ids | each id in decimal followed by `,` (`[1, 23]` → `1,23,`) |
//! | array of arrays of token ids | each inner array as above, followed by 0x1E |
//! | `[]` | empty key |
//!
//! A token id is a JSON integer without sign, fraction or exponent that fits in a
//! `u64`; its decimal text is then canonical, so it is copied as written.
//!
//! [`Endpoint::ChatCompletions`] (field `messages`, an array of objects): for each
//! message in order, the raw `role`, 0x1F, the content, the raw JSON text of
//! `tool_calls` if present and not `null`, then 0x1E. The content is:
//!
//! | `content` | bytes |
//! | --- | --- |
//! | string | its raw bytes |
//! | array of parts | for each part, then 0x1D: the raw `text` of a `"text"` part, the raw url of an `"image_url"` part (`image_url` either `{"url": ...}` or a plain string), and the raw JSON text of any other part |
//! | `null` or absent | nothing |
//!
//! [`Endpoint::Embeddings`] (field `input`): exactly as `prompt` above.
//!
//! [`Endpoint::Responses`] (field `input`): as `prompt` above, and also an array of
//! input items (objects; an array does not mix items with other elements). An item
//! with a `role` member is encoded as a chat message (without `tool_calls`), where
//! parts of type `input_text` and `output_text` are text parts like `text`; an item
//! without `role` (a function call, its output, an item reference) is its raw JSON
//! text followed by 0x1E.
//!
//! Members of a message or part may come in any order; the encoding order is fixed.
//! So appending to a prompt (text to a string prompt; ids, strings or id arrays to an
//! array prompt; messages to a conversation) yields a key that extends the original
//! key. Text appended inside the last element of an array prompt, or to the last
//! message, extends the key only up to that element's closing separator.
//!
//! # Conversation prefix
//!
//! [`RoutingInput::conversation`] is the length of the key prefix that names the
//! conversation, which the router hashes to place a new conversation:
//!
//! - Chat messages and responses input items: the key up to and including the 0x1E
//!   that ends the first message whose role is written `user` (raw bytes: an escaped
//!   `"us\u0065r"` does not count). That is the system prompt plus the first user
//!   turn, so conversations that share a system prompt still differ, and later turns
//!   of one conversation keep the same prefix. With no user message, the whole key.
//! - Anything else has no turns: the whole key, at most `FLAT_CONVERSATION_BYTES`.
//!   A prompt that extends a long one keeps its conversation prefix; short prompts
//!   name themselves entirely.
//!
//! # Validation
//!
//! The whole body is validated, and everything `serde_json::from_slice::<Value>`
//! rejects is rejected: bad structure, literals, numbers and escapes, control
//! characters and invalid UTF-8 in strings, trailing characters, unpaired UTF-16
//! surrogates in `\u` escapes, nesting deeper than 127 arrays/objects (serde_json's
//! recursion limit, the top-level object included) and numbers that serde_json
//! reports as out of range (those it would round to an infinite `f64`, e.g. `1e400`;
//! its default, non-`float_roundtrip` algorithm is mirrored exactly). There are no
//! deliberate deviations. Duplicate keys are accepted and the last one wins, as with
//! serde_json's `Value` maps. (Should the build ever enable serde_json's
//! `float_roundtrip` or `arbitrary_precision` feature, serde_json's own verdict on
//! numbers at or beyond the edge of the `f64` range changes; the tests compare with
//! the serde_json they are built with and would flag it.)

mod json;
mod key;
#[cfg(test)]
mod tests;

use std::borrow::Cow;

use memchr::memchr;

use self::{json::*, key::*};

/// Separator written after each content part of a chat message.
pub(crate) const PART_SEP: u8 = 0x1D;
/// Separator written after each string or token-id array of a batched prompt, and
/// after each chat message.
pub(crate) const RECORD_SEP: u8 = 0x1E;
/// Separator written between a chat message's role and its content.
pub(crate) const ROLE_SEP: u8 = 0x1F;

/// Deepest nesting of arrays and objects accepted, the top-level object counting as 1
/// (serde_json's default recursion limit).
const MAX_DEPTH: u32 = 127;

/// Longest conversation prefix of a prompt without turns (completions, embeddings, and
/// responses whose `input` is not an array of items), in key bytes. See
/// [`RoutingInput::conversation`].
pub(crate) const FLAT_CONVERSATION_BYTES: usize = 4096;

/// Which OpenAI endpoint the body belongs to; decides which field carries the prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`: the prompt is the `prompt` field.
    Completions,
    /// `/v1/chat/completions`: the prompt is the `messages` field.
    ChatCompletions,
    /// `/v1/embeddings`: the prompt is the `input` field (shaped like `prompt`).
    Embeddings,
    /// `/v1/responses`: the prompt is the `input` field (like `prompt`, or an array of
    /// input items).
    Responses,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 4] = [
        Self::Completions,
        Self::ChatCompletions,
        Self::Embeddings,
        Self::Responses,
    ];

    /// The endpoint served at `path`, if it carries a prompt.
    pub(crate) fn of_path(path: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|endpoint| endpoint.path() == path)
    }

    /// The endpoint's path.
    pub(crate) const fn path(self) -> &'static str {
        match self {
            Self::Completions => "/v1/completions",
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Embeddings => "/v1/embeddings",
            Self::Responses => "/v1/responses",
        }
    }

    /// The name of the top-level field that carries the prompt for this endpoint.
    pub const fn prompt_field(self) -> &'static str {
        match self {
            Self::Completions => "prompt",
            Self::ChatCompletions => "messages",
            Self::Embeddings | Self::Responses => "input",
        }
    }
}

/// What routing needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RoutingInput<'a> {
    /// The `model` string, JSON escapes decoded; None when the key is absent.
    pub model: Option<Cow<'a, str>>,
    /// The prompt key: bytes whose prefixes mirror the prompt's prefixes (see the
    /// module documentation for the encoding).
    pub key: Cow<'a, [u8]>,
    /// Length of the prefix of `key` that identifies the conversation (see the module
    /// documentation); at most `key.len()`.
    pub conversation: usize,
    /// The prompt has turns after its conversation prefix: a later turn of a
    /// chat, so the conversation already exists somewhere. Never set for a
    /// prompt without turns.
    pub later_turns: bool,
}

/// Why a body yields no routing input. The `Display` text is meant for the client, in
/// the body of a 400 response.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    /// The body's first non-whitespace byte is not `{` (this includes an empty body).
    #[error("request body must be a JSON object")]
    NotAnObject,
    /// The body is not valid JSON; `offset` is the byte at which that was found.
    #[error("malformed JSON at byte {offset}: {what}")]
    Malformed {
        /// Byte offset into the body.
        offset: usize,
        /// What was wrong there.
        what: &'static str,
    },
    /// A required field is absent (e.g. `prompt`, `messages[].role`).
    #[error("missing required field `{0}`")]
    MissingField(&'static str),
    /// A field is present but its JSON type is not one that is accepted.
    #[error("field `{field}` must be {expected}")]
    WrongType {
        /// The field, as a path such as `messages[].content`.
        field: &'static str,
        /// What it must be, in words.
        expected: &'static str,
    },
}

/// Extracts the routing inputs from a complete request body.
///
/// The whole body is validated (see the module documentation); the returned strings
/// borrow from `body` where possible.
///
/// # Errors
///
/// [`PromptError::NotAnObject`] if the top level is not an object,
/// [`PromptError::Malformed`] if the body is not valid JSON, and
/// [`PromptError::MissingField`] / [`PromptError::WrongType`] if `model` or the
/// endpoint's prompt field does not have the expected shape. Validity is checked
/// first, then `model`, then the prompt.
pub fn extract(endpoint: Endpoint, body: &[u8]) -> Result<RoutingInput<'_>, PromptError> {
    let mut c = Cursor::new(body, 0);
    c.ws();
    if c.peek() != Some(b'{') {
        return Err(PromptError::NotAnObject);
    }
    let field = endpoint.prompt_field();
    let (mut model, mut prompt) = (None, None);
    // Built keys go here; a duplicate prompt field reuses it rather than allocating.
    let mut built = Vec::new();
    c.members::<true>(|key, c| {
        match key_index(body, key, &["model", field]) {
            Some(0) => model = Some(c.skip_value::<true>(1)?),
            Some(_) => {
                prompt = Some(match endpoint {
                    Endpoint::Completions => prompt_key(c, &mut built, &PROMPT)?,
                    Endpoint::ChatCompletions => messages_key(c, &mut built)?,
                    Endpoint::Embeddings => prompt_key(c, &mut built, &EMBEDDINGS_INPUT)?,
                    Endpoint::Responses => prompt_key(c, &mut built, &RESPONSES_INPUT)?,
                });
            }
            None => {
                c.skip_value::<true>(1)?;
            }
        }
        Ok(())
    })?;
    c.ws();
    if c.pos != body.len() {
        return Err(c.err("trailing characters after the top-level object"));
    }

    let model = model.map(|v| model_name(body, v)).transpose()?;
    let (key, turns) = match prompt.ok_or(PromptError::MissingField(field))?? {
        Key::Borrowed(raw) => (Cow::Borrowed(raw), None),
        Key::Built(turns) => (Cow::Owned(built), turns),
    };
    let conversation = turns.unwrap_or(FLAT_CONVERSATION_BYTES).min(key.len());
    let later_turns = turns.is_some_and(|turns| turns < key.len());
    Ok(RoutingInput {
        model,
        key,
        conversation,
        later_turns,
    })
}

/// In a chat key's conversation prefix (see [`RoutingInput::conversation`]),
/// the length of the messages before its first user message (the system
/// part), when there are any.
pub(crate) fn preamble_len(conversation: &[u8]) -> Option<usize> {
    let before = conversation.strip_suffix(&[RECORD_SEP])?;
    let start = memchr::memrchr(RECORD_SEP, before)? + 1;
    before[start..].starts_with(b"user\x1f").then_some(start)
}

/// The length of the assistant message that `rest` (what follows an
/// earlier prompt within a chat key) opens with, its separator included;
/// 0 when it opens with anything else.
pub(crate) fn opening_reply_len(rest: &[u8]) -> usize {
    if !rest.starts_with(b"assistant\x1f") {
        return 0;
    }
    memchr(RECORD_SEP, rest).map_or(0, |end| end + 1)
}
