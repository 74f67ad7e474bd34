//! From a request body to what the engine is given: the JSON parsed, the
//! prompt as token ids, and the number of tokens to generate.

use std::borrow::Cow;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::protocol::{ChatMessage, ContentPart, MessageContent, Prompt};
use crate::chat_template::{self, IMAGE_PLACEHOLDER};
use crate::tokenize::{TokenId, Tokenizer};

/// Parses a JSON body, whatever its content type, into `T`.
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body?;
    serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("Invalid request body: {error}")))
}

/// The token ids of a completion prompt; text gets a BOS when `add_bos`.
/// Of a batch, only the first prompt is used.
pub fn completion_prompt(
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    add_bos: bool,
) -> Result<Vec<TokenId>, ApiError> {
    let ids = match prompt {
        Prompt::Text(text) => tokenizer.encode(text, add_bos),
        Prompt::Texts(texts) => match texts.first() {
            Some(text) => tokenizer.encode(text, add_bos),
            None => Vec::new(),
        },
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::TokenBatches(batches) => batches.first().cloned().unwrap_or_default(),
    };
    if ids.is_empty() {
        return Err(ApiError::bad_request("The prompt cannot be empty."));
    }
    Ok(ids)
}

/// The token ids of a conversation rendered with the chat template.
pub fn chat_prompt(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> Vec<TokenId> {
    let contents: Vec<Cow<'_, str>> = messages
        .iter()
        .map(|message| content_text(message.content.as_ref()))
        .collect();
    let text = chat_template::render(
        messages
            .iter()
            .zip(&contents)
            .map(|(message, content)| (message.role.as_str(), content.as_ref())),
        add_generation_prompt,
    );
    // The template spells out BOS itself.
    tokenizer.encode(&text, false)
}

/// A message's content as template text: parts joined, images as their
/// placeholder, other parts dropped.
fn content_text(content: Option<&MessageContent>) -> Cow<'_, str> {
    match content {
        None => Cow::Borrowed(""),
        Some(MessageContent::Text(text)) => Cow::Borrowed(text),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                match part {
                    ContentPart::Text { text: part } => text.push_str(part),
                    ContentPart::ImageUrl => text.push_str(IMAGE_PLACEHOLDER),
                    ContentPart::Other => {}
                }
            }
            Cow::Owned(text)
        }
    }
}

/// Context-window limits applied to every generation request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Prompt plus completion may not exceed this.
    pub max_model_len: usize,
    /// Tokens generated when the request names no limit.
    pub default_output_len: usize,
}

impl Limits {
    /// Tokens to generate for a prompt of `prompt_len` tokens: `requested`
    /// if it fits the context window, else the default, shortened to fit.
    pub fn budget(&self, prompt_len: usize, requested: Option<usize>) -> Result<usize, ApiError> {
        match requested {
            Some(0) => Err(ApiError::bad_request(
                "max_tokens must be at least 1, got 0.",
            )),
            Some(n) if prompt_len.saturating_add(n) > self.max_model_len => {
                Err(ApiError::bad_request(format!(
                    "This model's maximum context length is {} tokens. However, you requested \
                     {} tokens ({prompt_len} in the messages, {n} in the completion). Please \
                     reduce the length of the messages or completion.",
                    self.max_model_len,
                    prompt_len.saturating_add(n),
                )))
            }
            Some(n) => Ok(n),
            None if prompt_len >= self.max_model_len => Err(ApiError::bad_request(format!(
                "This model's maximum context length is {} tokens. However, your request has \
                 {prompt_len} input tokens. Please reduce the length of the input messages.",
                self.max_model_len,
            ))),
            None => Ok(self.default_output_len.min(self.max_model_len - prompt_len)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::BEGIN_OF_TEXT;

    fn tokenizer() -> &'static Tokenizer {
        Tokenizer::shared().expect("cl100k_base is embedded")
    }

    fn message(role: &str, content: MessageContent) -> ChatMessage {
        ChatMessage {
            role: role.to_owned(),
            content: Some(content),
        }
    }

    #[test]
    fn text_prompts_get_a_bos_and_token_prompts_do_not() {
        let text = completion_prompt(tokenizer(), &Prompt::Text("hi".into()), true);
        assert_eq!(text.expect("valid")[0], BEGIN_OF_TEXT);
        let ids = completion_prompt(tokenizer(), &Prompt::Tokens(vec![5, 6]), true);
        assert_eq!(ids.expect("valid"), [5, 6]);
    }

    #[test]
    fn batches_use_their_first_prompt() {
        let ids = completion_prompt(
            tokenizer(),
            &Prompt::TokenBatches(vec![vec![1], vec![2]]),
            true,
        );
        assert_eq!(ids.expect("valid"), [1]);
        let texts = Prompt::Texts(vec!["a".into(), "b".into()]);
        let text = Prompt::Text("a".into());
        assert_eq!(
            completion_prompt(tokenizer(), &texts, true),
            completion_prompt(tokenizer(), &text, true)
        );
    }

    #[test]
    fn empty_prompts_are_rejected() {
        for prompt in [
            Prompt::Tokens(vec![]),
            Prompt::Texts(vec![]),
            Prompt::TokenBatches(vec![]),
        ] {
            assert!(completion_prompt(tokenizer(), &prompt, true).is_err());
        }
    }

    #[test]
    fn chat_and_prerendered_completion_agree() {
        let messages = [message("user", MessageContent::Text("Hello there".into()))];
        let chat = chat_prompt(tokenizer(), &messages, true);
        let rendered = chat_template::render([("user", "Hello there")], true);
        // A client that renders the template itself sends no extra BOS.
        let completion = tokenizer().encode(&rendered, false);
        assert_eq!(chat, completion);
        assert_eq!(chat[0], BEGIN_OF_TEXT);
    }

    #[test]
    fn parts_are_joined_and_images_cost_one_token() {
        let parts = MessageContent::Parts(vec![
            ContentPart::Text { text: "a ".into() },
            ContentPart::ImageUrl,
            ContentPart::Other,
            ContentPart::Text { text: " b".into() },
        ]);
        let with_image = chat_prompt(tokenizer(), &[message("user", parts)], true);
        let text = MessageContent::Text("a <|image|> b".into());
        assert_eq!(
            with_image,
            chat_prompt(tokenizer(), &[message("user", text)], true)
        );
        assert!(with_image.contains(&128_256));
    }

    #[test]
    fn budget_respects_the_context_window() {
        let limits = Limits {
            max_model_len: 100,
            default_output_len: 32,
        };
        assert_eq!(limits.budget(10, None), Ok(32));
        assert_eq!(limits.budget(90, None), Ok(10));
        assert_eq!(limits.budget(10, Some(90)), Ok(90));
        assert!(limits.budget(10, Some(91)).is_err());
        assert!(limits.budget(10, Some(0)).is_err());
        assert!(limits.budget(100, None).is_err());
    }
}
