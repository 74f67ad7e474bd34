//! The two framing fields both directions parse alike: a chunk-size line
//! and a `Content-Length` value (RFC 9112 §7.1, RFC 9110 §8.6).

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
