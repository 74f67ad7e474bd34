//! Chat messages to prompt text, with a Llama-3 chat template.
//!
//! The rendering is Llama-3-Instruct's template without Llama-3.1/3.2's
//! date-stamped default system prompt:
//!
//! ```text
//! <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content | trim}<|eot_id|>…
//! <|start_header_id|>assistant<|end_header_id|>\n\n        (the generation prompt)
//! ```
//!
//! The result is text with spelled-out special tokens, to be encoded with
//! [`crate::tokenize::Tokenizer::encode`] without an extra BOS, as vLLM does.

/// Placeholder rendered for each image part, as Llama-3.2-Vision's template
/// does; it costs one token and images are otherwise not modelled.
pub const IMAGE_PLACEHOLDER: &str = "<|image|>";

/// Renders `(role, content)` pairs; `add_generation_prompt` appends the
/// assistant header the model continues from.
pub fn render<'a>(
    messages: impl IntoIterator<Item = (&'a str, &'a str)>,
    add_generation_prompt: bool,
) -> String {
    let mut prompt = String::from("<|begin_of_text|>");
    for (role, content) in messages {
        push_header(&mut prompt, role);
        prompt.push_str(content.trim());
        prompt.push_str("<|eot_id|>");
    }
    if add_generation_prompt {
        push_header(&mut prompt, "assistant");
    }
    prompt
}

fn push_header(prompt: &mut String, role: &str) {
    prompt.push_str("<|start_header_id|>");
    prompt.push_str(role);
    prompt.push_str("<|end_header_id|>\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_llama3_layout() {
        let text = render([("system", "Be brief."), ("user", "  Hi!\n")], true);
        assert_eq!(
            text,
            "<|begin_of_text|>\
             <|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn generation_prompt_is_optional() {
        let text = render([("user", "Hi")], false);
        assert!(text.ends_with("Hi<|eot_id|>"));
    }

    #[test]
    fn a_conversation_extends_its_prefix() {
        let first = render([("user", "Hi")], false);
        let second = render(
            [("user", "Hi"), ("assistant", "Hello"), ("user", "More")],
            true,
        );
        assert!(second.starts_with(&first));
    }
}
