//! TEMPORARY stand-in (full JSON parse) until the memchr scanner lands.
use std::borrow::Cow;

/// Which OpenAI endpoint the body belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/completions`
    Completions,
    /// `/v1/chat/completions`
    ChatCompletions,
}

/// What routing needs from a request body.
#[derive(Debug, PartialEq, Eq)]
pub struct RoutingInput<'a> {
    /// The model.
    pub model: Option<Cow<'a, str>>,
    /// The prompt key.
    pub key: Cow<'a, [u8]>,
}

/// Extraction failure.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromptError {
    /// Bad body.
    #[error("{0}")]
    Malformed(String),
}

/// Extracts model and key.
pub fn extract(endpoint: Endpoint, body: &[u8]) -> Result<RoutingInput<'_>, PromptError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| PromptError::Malformed(e.to_string()))?;
    let model = value
        .get("model")
        .and_then(|m| m.as_str())
        .map(|m| Cow::Owned(m.to_owned()));
    let field = match endpoint {
        Endpoint::Completions => "prompt",
        Endpoint::ChatCompletions => "messages",
    };
    let key = match value.get(field) {
        Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
        Some(other) => other.to_string().into_bytes(),
        None => return Err(PromptError::Malformed(format!("missing field `{field}`"))),
    };
    Ok(RoutingInput {
        model,
        key: Cow::Owned(key),
    })
}
