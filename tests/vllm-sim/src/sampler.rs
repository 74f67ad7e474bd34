//! Deterministic stand-in for sampling: the generated text.
//!
//! Each output token is a word drawn from a fixed vocabulary by a PRNG seeded
//! from `(seed, prompt token ids)`, so the same request always produces the
//! same text, streamed or not. Every word is exactly one cl100k token both
//! with and without a leading space (checked when the vocabulary is built),
//! so the completion re-tokenizes to the ids the simulator cached, and a
//! follow-up turn that quotes the answer hits the cache like it would on
//! vLLM.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::Xxh3;

use crate::error::TokenizerError;
use crate::tokenize::{TokenId, Tokenizer};

/// The words the simulator "generates", each with its leading space.
const WORDS: &[&str] = &[
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by", " this", " from", " or", " an", " are", " not", " but", " have",
    " which", " one", " all", " can", " their", " more", " time", " model", " data", " system",
    " cache", " token", " request", " server", " block", " memory", " value", " result", " first",
    " new", " other", " some", " would", " about", " there", " when",
];

/// How the first generated word is spelled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextStyle {
    /// Every word keeps its leading space: the text continues a prompt.
    Completion,
    /// The first word has no leading space: the text is a chat message.
    Chat,
}

/// One vocabulary word in both spellings.
#[derive(Debug)]
struct Word {
    spaced: &'static str,
    spaced_id: TokenId,
    bare_id: TokenId,
}

/// The generation vocabulary with each word's token ids.
#[derive(Debug)]
pub struct Vocabulary {
    words: Vec<Word>,
}

impl Vocabulary {
    /// Looks up every word's ids, failing if a word is not a single token.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self, TokenizerError> {
        let single = |text: &str| match tokenizer.encode_ordinary(text)[..] {
            [id] => Ok(id),
            _ => Err(TokenizerError::NotOneToken(text.to_owned())),
        };
        let words = WORDS
            .iter()
            .map(|&spaced| {
                Ok(Word {
                    spaced,
                    spaced_id: single(spaced)?,
                    bare_id: single(bare(spaced))?,
                })
            })
            .collect::<Result<_, TokenizerError>>()?;
        Ok(Self { words })
    }
}

fn bare(spaced: &'static str) -> &'static str {
    spaced.strip_prefix(' ').unwrap_or(spaced)
}

/// One generated token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampledToken {
    /// Its id, as the tokenizer would encode `text` in context.
    pub id: TokenId,
    /// Its text.
    pub text: &'static str,
}

/// The per-request token source.
#[derive(Debug)]
pub struct Sampler {
    rng: StdRng,
    style: TextStyle,
    emitted: usize,
}

impl Sampler {
    /// A sampler whose output depends only on `seed`, `prompt` and `style`.
    pub fn new(seed: u64, prompt: &[TokenId], style: TextStyle) -> Self {
        let mut hasher = Xxh3::with_seed(seed);
        for id in prompt {
            hasher.update(&id.to_le_bytes());
        }
        Self {
            rng: StdRng::seed_from_u64(hasher.digest()),
            style,
            emitted: 0,
        }
    }

    /// Draws the next token.
    pub fn next_token(&mut self, vocabulary: &Vocabulary) -> SampledToken {
        let word = &vocabulary.words[self.rng.random_range(0..vocabulary.words.len())];
        let first = self.emitted == 0;
        self.emitted += 1;
        if first && self.style == TextStyle::Chat {
            SampledToken {
                id: word.bare_id,
                text: bare(word.spaced),
            }
        } else {
            SampledToken {
                id: word.spaced_id,
                text: word.spaced,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocabulary() -> Vocabulary {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        Vocabulary::new(tokenizer).expect("every word is one token in both spellings")
    }

    fn sample(seed: u64, prompt: &[TokenId], style: TextStyle, n: usize) -> Vec<SampledToken> {
        let vocabulary = vocabulary();
        let mut sampler = Sampler::new(seed, prompt, style);
        (0..n).map(|_| sampler.next_token(&vocabulary)).collect()
    }

    #[test]
    fn output_is_deterministic_per_seed_and_prompt() {
        let a = sample(7, &[1, 2, 3], TextStyle::Completion, 20);
        assert_eq!(a, sample(7, &[1, 2, 3], TextStyle::Completion, 20));
        assert_ne!(a, sample(8, &[1, 2, 3], TextStyle::Completion, 20));
        assert_ne!(a, sample(7, &[1, 2, 4], TextStyle::Completion, 20));
    }

    #[test]
    fn generated_text_retokenizes_to_the_sampled_ids() {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        for style in [TextStyle::Completion, TextStyle::Chat] {
            let tokens = sample(3, &[42], style, 40);
            let text: String = tokens.iter().map(|t| t.text).collect();
            let ids: Vec<TokenId> = tokens.iter().map(|t| t.id).collect();
            assert_eq!(tokenizer.encode_ordinary(&text), ids, "{style:?}");
        }
    }

    #[test]
    fn chat_text_starts_without_a_space() {
        let chat = sample(1, &[9], TextStyle::Chat, 3);
        let completion = sample(1, &[9], TextStyle::Completion, 3);
        assert!(!chat[0].text.starts_with(' '));
        assert_eq!(format!(" {}", chat[0].text), completion[0].text);
        assert_eq!(chat[1..], completion[1..]);
    }
}
