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
    /// A chunk-size or trailer line is over [`MAX_LINE`].
    #[error("chunk line too long")]
    LineTooLong,
    /// A chunk-size line does not start with a hex size.
    #[error("invalid chunk size")]
    BadSize,
    /// A chunk's data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    /// The decoded body would pass `limit` bytes.
    #[error("body is over the {limit} byte limit")]
    TooLarge {
        /// The limit passed to [`ChunkedDecoder::decode`].
        limit: usize,
    },
}

/// Decodes a chunked body as its bytes arrive.
///
/// Feed it the bytes after the head, each time with everything received so
/// far; it resumes where it stopped, so a large body costs O(length) overall.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    /// Input bytes consumed by complete chunks so far.
    consumed: usize,
    /// Decoded body so far.
    body: Vec<u8>,
}

impl ChunkedDecoder {
    /// Advances over `input` (all bytes after the head so far), decoding at
    /// most `max_body` bytes. Returns the number of input bytes the whole
    /// chunked body took once its last chunk and trailers are complete,
    /// `None` while more bytes are needed.
    pub fn decode(&mut self, input: &[u8], max_body: usize) -> Result<Option<usize>, ChunkError> {
        loop {
            let rest = &input[self.consumed..];
            let Some(line_end) = find_crlf(rest)? else {
                return Ok(None);
            };
            let size = chunk_size(&rest[..line_end])
                .and_then(|size| usize::try_from(size).ok())
                .ok_or(ChunkError::BadSize)?;
            let data_start = line_end + 2;
            if size == 0 {
                // Trailer fields, then a blank line.
                let mut at = data_start;
                loop {
                    let Some(end) = find_crlf(&rest[at..])? else {
                        return Ok(None);
                    };
                    at += end + 2;
                    if end == 0 {
                        self.consumed += at;
                        return Ok(Some(self.consumed));
                    }
                }
            }
            if self.body.len().saturating_add(size) > max_body {
                return Err(ChunkError::TooLarge { limit: max_body });
            }
            let data_end = data_start + size;
            if rest.len() < data_end + 2 {
                return Ok(None);
            }
            if &rest[data_end..data_end + 2] != b"\r\n" {
                return Err(ChunkError::MissingCrlf);
            }
            self.body.extend_from_slice(&rest[data_start..data_end]);
            self.consumed += data_end + 2;
        }
    }

    /// The decoded body.
    pub fn into_body(self) -> Vec<u8> {
        self.body
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
