//! What both directions parse alike: a chunk-size line, a `Content-Length`
//! value (RFC 9112 §7.1, RFC 9110 §8.6), and a whole chunked body
//! ([`ChunkedDecoder`]: request bodies, and discovery's responses).
use super::MAX_LINE;

/// Most hex digits of a chunk size: 15 keep it below 2⁶⁰.
const MAX_SIZE_DIGITS: usize = 15;

/// The size a chunk-size line gives: hex digits, then optional whitespace
/// and `;extensions` (ignored), then the line's CRLF if it is included.
/// None when there is no size or it is not hex.
pub(crate) fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    if digits.is_empty() || digits.len() > MAX_SIZE_DIGITS {
        return None;
    }
    digits.iter().try_fold(0u64, |size, &b| {
        let digit = char::from(b).to_digit(16)?;
        Some(size << 4 | u64::from(digit))
    })
}

/// The length a `Content-Length` field value gives: decimal digits only,
/// around which a header may carry spaces or tabs. None for anything else
/// (a sign, a list, an overflow).
pub(crate) fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |len, &b| {
        let digit = char::from(b).to_digit(10)?;
        len.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// Why a chunked body could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// A chunk-size or trailer line is over `MAX_LINE`.
    #[error("chunk line too long")]
    LineTooLong,
    /// A chunk-size line does not start with a hex size.
    #[error("invalid chunk size")]
    BadSize,
    /// A chunk's data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    /// The decoded body would pass `ChunkLimits::body`.
    #[error("body is over the {limit} byte limit")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The body as sent (chunk sizes, extensions, data, line ends and
    /// trailers) would pass `ChunkLimits::raw`.
    #[error(
        "chunked body is over the {limit} byte limit as sent (chunk sizes, extensions and trailers included)"
    )]
    RawTooLarge {
        /// The limit.
        limit: usize,
    },
    /// More trailer fields than `ChunkLimits::trailer_fields`.
    #[error("more than {limit} trailer fields")]
    TooManyTrailers {
        /// The limit.
        limit: usize,
    },
    /// The trailer section is over `ChunkLimits::trailer_bytes`.
    #[error("trailer section is over the {limit} byte limit")]
    TrailersTooLarge {
        /// The limit.
        limit: usize,
    },
}

/// What one chunked body may take: everything a sender controls is
/// bounded, so a body of tiny chunks with long extensions, or a flood of
/// trailer lines, ends in an error rather than in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLimits {
    /// Most decoded body bytes.
    pub(crate) body: usize,
    /// Most bytes of the body as sent: sizes, extensions, data, line ends
    /// and trailers.
    pub(crate) raw: usize,
    /// Most trailer fields.
    pub(crate) trailer_fields: usize,
    /// Most bytes of the trailer section.
    pub(crate) trailer_bytes: usize,
}

/// Decodes a chunked body as its bytes arrive.
///
/// Feed it the bytes after the head, each time with everything received so
/// far; it resumes where it stopped (within chunks and within trailers), so
/// a large body costs O(length) overall.
#[derive(Debug)]
pub struct ChunkedDecoder {
    limits: ChunkLimits,
    /// Input bytes consumed so far: whole chunks, then whole trailer lines.
    consumed: usize,
    /// The last chunk has been read; `consumed` is within the trailers.
    in_trailers: bool,
    /// Trailer fields read so far.
    trailer_fields: usize,
    /// Bytes of trailer fields read so far.
    trailer_bytes: usize,
    /// Decoded body so far.
    body: Vec<u8>,
}

impl ChunkedDecoder {
    /// A decoder for one body within `limits`.
    pub fn new(limits: ChunkLimits) -> Self {
        Self {
            limits,
            consumed: 0,
            in_trailers: false,
            trailer_fields: 0,
            trailer_bytes: 0,
            body: Vec::new(),
        }
    }

    /// Advances over `input` (all bytes after the head so far). Returns the
    /// number of input bytes the whole chunked body took once its last
    /// chunk and trailers are complete, `None` while more bytes are needed.
    pub fn decode(&mut self, input: &[u8]) -> Result<Option<usize>, ChunkError> {
        while !self.in_trailers {
            let rest = &input[self.consumed..];
            let Some(line_end) = find_crlf(rest)? else {
                return Ok(None);
            };
            let size = chunk_size(&rest[..line_end])
                .and_then(|size| usize::try_from(size).ok())
                .ok_or(ChunkError::BadSize)?;
            let data_start = line_end + 2;
            if size == 0 {
                self.consumed += data_start;
                self.in_trailers = true;
                break;
            }
            if self.body.len().saturating_add(size) > self.limits.body {
                return Err(ChunkError::TooLarge {
                    limit: self.limits.body,
                });
            }
            let data_end = data_start + size;
            // Checked before the data is waited for, so it is never buffered.
            if self.consumed.saturating_add(data_end + 2) > self.limits.raw {
                return Err(self.raw_too_large());
            }
            if rest.len() < data_end + 2 {
                return Ok(None);
            }
            if &rest[data_end..data_end + 2] != b"\r\n" {
                return Err(ChunkError::MissingCrlf);
            }
            self.body.extend_from_slice(&rest[data_start..data_end]);
            self.consumed += data_end + 2;
        }
        // Trailer fields, then a blank line; each line is read once.
        loop {
            if self.consumed > self.limits.raw {
                return Err(self.raw_too_large());
            }
            let Some(end) = find_crlf(&input[self.consumed..])? else {
                return Ok(None);
            };
            self.consumed += end + 2;
            if end == 0 {
                return Ok(Some(self.consumed));
            }
            self.trailer_fields += 1;
            self.trailer_bytes += end + 2;
            if self.trailer_fields > self.limits.trailer_fields {
                return Err(ChunkError::TooManyTrailers {
                    limit: self.limits.trailer_fields,
                });
            }
            if self.trailer_bytes > self.limits.trailer_bytes {
                return Err(ChunkError::TrailersTooLarge {
                    limit: self.limits.trailer_bytes,
                });
            }
        }
    }

    /// The decoded body.
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    fn raw_too_large(&self) -> ChunkError {
        ChunkError::RawTooLarge {
            limit: self.limits.raw,
        }
    }
}

/// Position of the first CRLF in `bytes`, if within [`MAX_LINE`] bytes.
fn find_crlf(bytes: &[u8]) -> Result<Option<usize>, ChunkError> {
    match memchr::memmem::find(&bytes[..bytes.len().min(MAX_LINE + 2)], b"\r\n") {
        Some(at) => Ok(Some(at)),
        None if bytes.len() > MAX_LINE => Err(ChunkError::LineTooLong),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_with_optional_extensions() {
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"FF;name=value"), Some(255));
        assert_eq!(chunk_size(b"10 ;ext\r\n"), Some(16));
        assert_eq!(chunk_size(b"fffffffffffffff"), Some((1 << 60) - 1));
        for bad in [
            &b""[..],
            b"\r\n",
            b";ext",
            b"+5",
            b"-1",
            b" 5",
            b"0x10",
            b"g",
            b"1000000000000000",
        ] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_lengths_are_plain_decimal() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b"42"), Some(42));
        assert_eq!(content_length(b" 42\t"), Some(42));
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b" ",
            b"+5",
            b"-5",
            b"5,5",
            b"5 5",
            b"0x5",
            b"18446744073709551616",
        ] {
            assert_eq!(
                content_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
