//! Text to token ids.
//!
//! Ordinary text is encoded with tiktoken's `cl100k_base`, which is close in
//! granularity to Llama-3's own BPE (itself derived from it). On top of it the
//! tokenizer knows Llama-3's special tokens under their real ids, and, like a
//! Hugging Face tokenizer, recognises their spelled-out forms inside text, so a
//! prompt rendered by a client and sent to `/v1/completions` yields the same ids
//! as the same conversation sent to `/v1/chat/completions`.
//!
//! The vocabulary is built once per process ([`Tokenizer::shared`]).

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::error::TokenizerError;

/// A token id.
pub type TokenId = u32;

/// `<|begin_of_text|>`, prepended to completion prompts like vLLM does for
/// Llama-3 models.
pub const BEGIN_OF_TEXT: TokenId = 128_000;

/// Llama-3's special tokens that can appear in a rendered prompt, with their
/// ids. `<|image|>` is Llama-3.2-Vision's image placeholder.
const SPECIAL_TOKENS: &[(&str, TokenId)] = &[
    ("<|begin_of_text|>", BEGIN_OF_TEXT),
    ("<|end_of_text|>", 128_001),
    ("<|finetune_right_pad_id|>", 128_004),
    ("<|start_header_id|>", 128_006),
    ("<|end_header_id|>", 128_007),
    ("<|eom_id|>", 128_008),
    ("<|eot_id|>", 128_009),
    ("<|python_tag|>", 128_010),
    ("<|image|>", 128_256),
];

/// Marker every special token starts with.
const SPECIAL_PREFIX: &str = "<|";

/// cl100k_base plus Llama-3's special tokens.
pub struct Tokenizer {
    bpe: CoreBPE,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Tokenizer> = OnceLock::new();

impl Tokenizer {
    /// The process-wide tokenizer, built on first use (this parses ~100k
    /// merges and takes a noticeable fraction of a second, so call it off the
    /// async runtime's worker threads the first time).
    pub fn shared() -> Result<&'static Self, TokenizerError> {
        if let Some(tokenizer) = SHARED.get() {
            return Ok(tokenizer);
        }
        // Two first callers may both build one; the loser's is dropped.
        let built = Self::load()?;
        Ok(SHARED.get_or_init(|| built))
    }

    /// Builds a fresh tokenizer.
    pub fn load() -> Result<Self, TokenizerError> {
        let bpe = tiktoken_rs::cl100k_base().map_err(|e| TokenizerError::Load(e.to_string()))?;
        Ok(Self { bpe })
    }

    /// Encodes `text`, turning spelled-out special tokens into their ids, and
    /// prepending `<|begin_of_text|>` when `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<TokenId> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(BEGIN_OF_TEXT);
        }
        let mut plain_start = 0;
        let mut search_from = 0;
        while let Some(offset) = text[search_from..].find(SPECIAL_PREFIX) {
            let at = search_from + offset;
            let special = SPECIAL_TOKENS
                .iter()
                .find(|(spelling, _)| text[at..].starts_with(spelling));
            match special {
                Some(&(spelling, id)) => {
                    ids.extend(self.bpe.encode_ordinary(&text[plain_start..at]));
                    ids.push(id);
                    plain_start = at + spelling.len();
                    search_from = plain_start;
                }
                None => search_from = at + SPECIAL_PREFIX.len(),
            }
        }
        ids.extend(self.bpe.encode_ordinary(&text[plain_start..]));
        ids
    }

    /// Encodes `text` as ordinary text only: special-token spellings are
    /// split like any other characters.
    pub fn encode_ordinary(&self, text: &str) -> Vec<TokenId> {
        self.bpe.encode_ordinary(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> &'static Tokenizer {
        Tokenizer::shared().expect("cl100k_base is embedded in tiktoken-rs")
    }

    #[test]
    fn bos_is_prepended_on_request() {
        let with = tokenizer().encode("hello world", true);
        let without = tokenizer().encode("hello world", false);
        assert_eq!(with[0], BEGIN_OF_TEXT);
        assert_eq!(&with[1..], &without[..]);
        assert_eq!(without, tokenizer().encode_ordinary("hello world"));
    }

    #[test]
    fn special_tokens_are_recognised_in_text() {
        let ids = tokenizer().encode(
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
            false,
        );
        assert_eq!(ids.first(), Some(&128_006));
        assert_eq!(ids.last(), Some(&128_009));
        assert!(ids.contains(&128_007));
    }

    #[test]
    fn unknown_markers_stay_text() {
        let ids = tokenizer().encode("a <|not_special|> b <|", false);
        assert_eq!(ids, tokenizer().encode_ordinary("a <|not_special|> b <|"));
    }

    #[test]
    fn text_between_specials_is_preserved() {
        let ids = tokenizer().encode("x<|eot_id|>y", false);
        let mut expected = tokenizer().encode_ordinary("x");
        expected.push(128_009);
        expected.extend(tokenizer().encode_ordinary("y"));
        assert_eq!(ids, expected);
    }
}
