//! Building a prompt key from the scanned JSON: the prompt's shapes per
//! endpoint, chat messages and their parts, token ids, and looking up field
//! and role names (see the parent module for the key's encoding).
use std::borrow::Cow;

use memchr::memchr;

use super::{json::*, *};

/// Where the key of a prompt value is.
pub(super) enum Key<'a> {
    /// Raw bytes of the body.
    Borrowed(&'a [u8]),
    /// In the buffer passed to the function that read the value; for a prompt made of
    /// turns, the length of its conversation prefix.
    Built(Option<usize>),
}

/// Field paths of a message's parts, for errors, and which part types carry text.
pub(super) struct MessagePaths {
    pub(super) role: &'static str,
    pub(super) content: &'static str,
    pub(super) text: &'static str,
    pub(super) image_url: &'static str,
    pub(super) url: &'static str,
    /// Part `type` values: those before `text_types` are text parts, the next one is
    /// the image part.
    pub(super) part_types: &'static [&'static str],
    pub(super) text_types: usize,
}

pub(super) const CHAT_PATHS: MessagePaths = MessagePaths {
    role: "messages[].role",
    content: "messages[].content",
    text: "messages[].content[].text",
    image_url: "messages[].content[].image_url",
    url: "messages[].content[].image_url.url",
    part_types: &["text", "image_url"],
    text_types: 1,
};

pub(super) const RESPONSES_PATHS: MessagePaths = MessagePaths {
    role: "input[].role",
    content: "input[].content",
    text: "input[].content[].text",
    image_url: "input[].content[].image_url",
    url: "input[].content[].image_url.url",
    part_types: &["text", "input_text", "output_text", "image_url"],
    text_types: 3,
};

/// What a prompt field of the `prompt` family may hold.
pub(super) struct Shape {
    /// The error for a value of the wrong shape.
    pub(super) wrong: PromptError,
    /// Whether arrays of objects (input items) are accepted, and their paths.
    pub(super) items: Option<&'static MessagePaths>,
}

/// What a prompt without turns may be (completions `prompt`, embeddings
/// `input`).
pub(super) const FLAT_PROMPT: &str = "a string, an array of strings, an array of token ids \
                           (non-negative integers) or an array of arrays of token ids";

pub(super) const PROMPT: Shape = Shape {
    wrong: PromptError::WrongType {
        field: "prompt",
        expected: FLAT_PROMPT,
    },
    items: None,
};

pub(super) const EMBEDDINGS_INPUT: Shape = Shape {
    wrong: PromptError::WrongType {
        field: "input",
        expected: FLAT_PROMPT,
    },
    items: None,
};

pub(super) const RESPONSES_INPUT: Shape = Shape {
    wrong: PromptError::WrongType {
        field: "input",
        expected: "a string, an array of strings, an array of token ids \
                   (non-negative integers), an array of arrays of token ids \
                   or an array of input items (objects)",
    },
    items: Some(&RESPONSES_PATHS),
};

/// True if the (validated) role value spanning `role` is written `"user"`.
#[inline]
pub(super) fn is_user(body: &[u8], role: Option<Span>) -> bool {
    role.is_some_and(|r| r.of(body) == b"\"user\"")
}

/// A prompt value interpreted during the validating pass. The outer error is a JSON
/// error, which ends the pass; the inner one says the value is valid JSON of the wrong
/// shape, and is reported only once the rest of the body has been validated too (and
/// only if no later duplicate key replaces this value).
pub(super) type Interpreted<'a> = Result<Result<Key<'a>, PromptError>, PromptError>;

/// Empties `out` and makes room for a key built from the rest of `c`'s body, which
/// is an upper bound on its length.
pub(super) fn prepare(out: &mut Vec<u8>, c: &Cursor<'_>) {
    out.clear();
    out.reserve(c.buf.len() - c.pos);
}

/// The `model` value: a string, decoded.
pub(super) fn model_name(body: &[u8], v: Span) -> Result<Cow<'_, str>, PromptError> {
    if body[v.start] != b'"' {
        return Err(PromptError::WrongType {
            field: "model",
            expected: "a string",
        });
    }
    let raw = &body[v.start + 1..v.end - 1];
    if memchr(b'\\', raw).is_some() {
        unescape(raw).map(Cow::Owned).ok_or(PromptError::Malformed {
            offset: v.start,
            what: "invalid escape sequence",
        })
    } else {
        std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|e| PromptError::Malformed {
                offset: v.start + 1 + e.valid_up_to(),
                what: "invalid UTF-8 in string",
            })
    }
}

/// Validates a value of the `prompt` family (`prompt`, or `input` per `shape`) at the
/// cursor and builds its key on the way (into `out` unless the key is borrowed).
pub(super) fn prompt_key<'a>(
    c: &mut Cursor<'a>,
    out: &mut Vec<u8>,
    shape: &Shape,
) -> Interpreted<'a> {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Text,
        Ids,
        Batch,
        Items,
    }
    let body = c.buf;
    match c.peek() {
        Some(b'"') => {
            let s = c.string::<true>()?;
            return Ok(Ok(Key::Borrowed(&body[s.start..s.end])));
        }
        Some(b'[') => {}
        _ => {
            c.skip_value::<true>(1)?;
            return Ok(Err(shape.wrong.clone()));
        }
    }
    prepare(out, c);
    let mut kind = None;
    // The first error met, in document order; later elements are only validated.
    let mut error: Option<PromptError> = None;
    let mut first_user = None;
    c.elements::<true>(2, |c| {
        let k = match c.peek() {
            Some(b'"') => Some(Kind::Text),
            Some(b'-' | b'0'..=b'9') => Some(Kind::Ids),
            Some(b'[') => Some(Kind::Batch),
            Some(b'{') if shape.items.is_some() => Some(Kind::Items),
            _ => None,
        };
        let k = match k {
            Some(k) if error.is_none() && *kind.get_or_insert(k) == k => k,
            _ => {
                error.get_or_insert_with(|| shape.wrong.clone());
                c.skip_value::<true>(2)?;
                return Ok(());
            }
        };
        match k {
            Kind::Text => {
                let s = c.string::<true>()?;
                out.extend_from_slice(&body[s.start..s.end]);
                out.push(RECORD_SEP);
            }
            Kind::Ids => {
                let id = c.number::<true>()?;
                if push_id(out, body, id).is_none() {
                    error = Some(shape.wrong.clone());
                }
            }
            Kind::Batch => push_batch(c, out, shape, &mut error)?,
            Kind::Items => {
                let paths = shape
                    .items
                    .expect("invariant: Kind::Items is only chosen when items are accepted");
                push_item(c, out, paths, &mut error, &mut first_user)?;
            }
        }
        Ok(())
    })?;
    Ok(match error {
        Some(e) => Err(e),
        None if kind == Some(Kind::Items) => Ok(Key::Built(Some(first_user.unwrap_or(out.len())))),
        None => Ok(Key::Built(None)),
    })
}

/// One prompt of a batch of token-id prompts (`[[1, 2], [3]]`), then its
/// separator; the first element that is not a token id sets `error`.
fn push_batch(
    c: &mut Cursor<'_>,
    out: &mut Vec<u8>,
    shape: &Shape,
    error: &mut Option<PromptError>,
) -> Result<(), PromptError> {
    let body = c.buf;
    c.elements::<true>(3, |c| {
        if error.is_none() && matches!(c.peek(), Some(b'-' | b'0'..=b'9')) {
            let id = c.number::<true>()?;
            if push_id(out, body, id).is_none() {
                *error = Some(shape.wrong.clone());
            }
        } else {
            error.get_or_insert_with(|| shape.wrong.clone());
            c.skip_value::<true>(3)?;
        }
        Ok(())
    })?;
    out.push(RECORD_SEP);
    Ok(())
}

/// One input item of a Responses request: a message is keyed like a chat
/// message (its position noted in `first_user` if it is the first user
/// message); anything else (a function call, its output, a reference) is
/// keyed by its raw JSON.
fn push_item(
    c: &mut Cursor<'_>,
    out: &mut Vec<u8>,
    paths: &MessagePaths,
    error: &mut Option<PromptError>,
    first_user: &mut Option<usize>,
) -> Result<(), PromptError> {
    let body = c.buf;
    let start = c.pos;
    let (mut role, mut content) = (None, None);
    c.members::<true>(|k, c| {
        let v = c.skip_value::<true>(3)?;
        match key_index(body, k, &["role", "content"]) {
            Some(0) => role = Some(v),
            Some(_) => content = Some(v),
            None => {}
        }
        Ok(())
    })?;
    if role.is_none() {
        out.extend_from_slice(&body[start..c.pos]);
        out.push(RECORD_SEP);
    } else if let Err(e) = push_message(body, role, content, None, paths, out) {
        *error = Some(e);
    } else if first_user.is_none() && is_user(body, role) {
        *first_user = Some(out.len());
    }
    Ok(())
}

/// Appends `id,` for the valid JSON number `body[id]`; None if it is not an integer in
/// `0..=u64::MAX` (then its decimal text is canonical and copied as written).
#[inline]
pub(super) fn push_id(out: &mut Vec<u8>, body: &[u8], id: Span) -> Option<()> {
    const U64_MAX: &[u8] = b"18446744073709551615";
    let digits = id.of(body);
    let n = digits.len();
    // A number is followed by a non-digit, so it is all digits iff the run is all of it.
    if digit_run(body, id.start) != n
        || n > U64_MAX.len()
        || (n == U64_MAX.len() && digits > U64_MAX)
    {
        return None;
    }
    match body.get(id.start..).and_then(<[u8]>::first_chunk::<8>) {
        // Short ids: one 8-byte copy, then drop the bytes past the id.
        Some(word) if n <= 8 => {
            out.extend_from_slice(word);
            out.truncate(out.len() - (8 - n));
        }
        _ => out.extend_from_slice(digits),
    }
    out.push(b',');
    Some(())
}

/// Validates the `messages` value at the cursor and builds its key into `out` on the
/// way.
pub(super) fn messages_key<'a>(c: &mut Cursor<'a>, out: &mut Vec<u8>) -> Interpreted<'a> {
    const NOT_ARRAY: PromptError = PromptError::WrongType {
        field: "messages",
        expected: "an array of message objects",
    };
    let body = c.buf;
    if c.peek() != Some(b'[') {
        c.skip_value::<true>(1)?;
        return Ok(Err(NOT_ARRAY));
    }
    prepare(out, c);
    let mut error = None;
    let mut first_user = None;
    c.elements::<true>(2, |c| {
        if error.is_some() || c.peek() != Some(b'{') {
            error.get_or_insert(NOT_ARRAY);
            c.skip_value::<true>(2)?;
            return Ok(());
        }
        let (mut role, mut content, mut tool_calls) = (None, None, None);
        c.members::<true>(|k, c| {
            let v = c.skip_value::<true>(3)?;
            match key_index(body, k, &["role", "content", "tool_calls"]) {
                Some(0) => role = Some(v),
                Some(1) => content = Some(v),
                Some(_) => tool_calls = Some(v),
                None => {}
            }
            Ok(())
        })?;
        if let Err(e) = push_message(body, role, content, tool_calls, &CHAT_PATHS, out) {
            error = Some(e);
        } else if first_user.is_none() && is_user(body, role) {
            first_user = Some(out.len());
        }
        Ok(())
    })?;
    Ok(match error {
        Some(e) => Err(e),
        None => Ok(Key::Built(Some(first_user.unwrap_or(out.len())))),
    })
}

/// Appends the encoding of one message, from the spans of its (validated) members.
pub(super) fn push_message(
    body: &[u8],
    role: Option<Span>,
    content: Option<Span>,
    tool_calls: Option<Span>,
    paths: &MessagePaths,
    out: &mut Vec<u8>,
) -> Result<(), PromptError> {
    let role = role.ok_or(PromptError::MissingField(paths.role))?;
    if body[role.start] != b'"' {
        return Err(PromptError::WrongType {
            field: paths.role,
            expected: "a string",
        });
    }
    out.extend_from_slice(&body[role.start + 1..role.end - 1]);
    out.push(ROLE_SEP);
    if let Some(content) = content {
        match body[content.start] {
            b'"' => out.extend_from_slice(&body[content.start + 1..content.end - 1]),
            b'[' => push_parts(body, content, paths, out)?,
            b'n' => {}
            _ => {
                return Err(PromptError::WrongType {
                    field: paths.content,
                    expected: "a string, an array of content parts, or null",
                });
            }
        }
    }
    if let Some(tc) = tool_calls.filter(|tc| body[tc.start] != b'n') {
        out.extend_from_slice(tc.of(body));
    }
    out.push(RECORD_SEP);
    Ok(())
}

/// Appends the encoding of a (validated) content-part array spanning `v`.
pub(super) fn push_parts(
    body: &[u8],
    v: Span,
    paths: &MessagePaths,
    out: &mut Vec<u8>,
) -> Result<(), PromptError> {
    Cursor::new(body, v.start).elements::<false>(4, |c| {
        let part = c.skip_value::<false>(4)?;
        if body[part.start] != b'{' {
            out.extend_from_slice(part.of(body));
            out.push(PART_SEP);
            return Ok(());
        }
        let (mut ty, mut text, mut image) = (None, None, None);
        Cursor::new(body, part.start).members::<false>(|k, c| {
            let v = c.skip_value::<false>(5)?;
            match key_index(body, k, &["type", "text", "image_url"]) {
                Some(0) => ty = Some(v),
                Some(1) => text = Some(v),
                Some(_) => image = Some(v),
                None => {}
            }
            Ok(())
        })?;
        match ty.and_then(|t| string_index(body, t, paths.part_types)) {
            Some(i) if i < paths.text_types => {
                let text = text.ok_or(PromptError::MissingField(paths.text))?;
                if body[text.start] != b'"' {
                    return Err(PromptError::WrongType {
                        field: paths.text,
                        expected: "a string",
                    });
                }
                out.extend_from_slice(&body[text.start + 1..text.end - 1]);
            }
            Some(_) => {
                let image = image.ok_or(PromptError::MissingField(paths.image_url))?;
                let url = match body[image.start] {
                    b'"' => image,
                    b'{' => {
                        let mut url = None;
                        Cursor::new(body, image.start).members::<false>(|k, c| {
                            let v = c.skip_value::<false>(6)?;
                            if key_index(body, k, &["url"]).is_some() {
                                url = Some(v);
                            }
                            Ok(())
                        })?;
                        url.ok_or(PromptError::MissingField(paths.url))?
                    }
                    _ => {
                        return Err(PromptError::WrongType {
                            field: paths.image_url,
                            expected: "an object with a `url` string, or a string",
                        });
                    }
                };
                if body[url.start] != b'"' {
                    return Err(PromptError::WrongType {
                        field: paths.url,
                        expected: "a string",
                    });
                }
                out.extend_from_slice(&body[url.start + 1..url.end - 1]);
            }
            None => out.extend_from_slice(part.of(body)),
        }
        out.push(PART_SEP);
        Ok(())
    })
}

/// Which of `names` the object key `key` is, after decoding escapes.
#[inline]
pub(super) fn key_index(body: &[u8], key: Str, names: &[&str]) -> Option<usize> {
    let raw = &body[key.start..key.end];
    if memchr(b'\\', raw).is_some() {
        decoded_index(raw, names)
    } else {
        names.iter().position(|n| n.as_bytes() == raw)
    }
}

/// Which of `names` the string value spanning `v` (quotes included) is, if it is a
/// string at all, after decoding escapes.
pub(super) fn string_index(body: &[u8], v: Span, names: &[&str]) -> Option<usize> {
    if body[v.start] != b'"' {
        return None;
    }
    let raw = &body[v.start + 1..v.end - 1];
    if memchr(b'\\', raw).is_some() {
        decoded_index(raw, names)
    } else {
        names.iter().position(|n| n.as_bytes() == raw)
    }
}

#[cold]
#[inline(never)]
pub(super) fn decoded_index(raw: &[u8], names: &[&str]) -> Option<usize> {
    let decoded = unescape(raw)?;
    names.iter().position(|n| *n == decoded)
}
