//! A validating JSON scanner over the request body: a cursor that checks
//! (or, on the second pass, only skips) values, strings and numbers, with
//! SWAR checks for plain ASCII, and string unescaping.
use memchr::{memchr, memchr2};

use super::*;

/// Decodes the contents of a valid JSON string (escapes included). None if an escape
/// is invalid or the result is not UTF-8, which cannot happen after validation.
#[cold]
pub(super) fn unescape(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(k) = memchr(b'\\', &raw[i..]) {
        let j = i + k;
        out.extend_from_slice(&raw[i..j]);
        let (ch, len) = decode_escape(raw, j)?;
        out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
        i = j + len;
    }
    out.extend_from_slice(&raw[i..]);
    String::from_utf8(out).ok()
}

/// Decodes the escape whose backslash is at `buf[j]`: the character and the length
/// of the escape. None if it is invalid, including a `\u` escape that is an unpaired
/// UTF-16 surrogate (as serde_json rejects those).
#[inline]
pub(super) fn decode_escape(buf: &[u8], j: usize) -> Option<(char, usize)> {
    let simple = match *buf.get(j + 1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => return decode_unicode_escape(buf, j),
        _ => return None,
    };
    Some((simple, 2))
}

#[inline(never)]
pub(super) fn decode_unicode_escape(buf: &[u8], j: usize) -> Option<(char, usize)> {
    let hi = hex4(buf, j + 2)?;
    if !(0xD800..0xDC00).contains(&hi) {
        // Trailing surrogates alone are rejected by from_u32.
        return Some((char::from_u32(hi)?, 6));
    }
    if buf.get(j + 6..j + 8)? != b"\\u" {
        return None;
    }
    let lo = hex4(buf, j + 8)?;
    if !(0xDC00..0xE000).contains(&lo) {
        return None;
    }
    Some((
        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))?,
        12,
    ))
}

pub(super) fn hex4(buf: &[u8], at: usize) -> Option<u32> {
    buf.get(at..at + 4)?.iter().try_fold(0, |acc, &b| {
        let d = char::from(b).to_digit(16)?;
        Some(acc << 4 | d)
    })
}

/// Bytes of the 8-byte words used by the SWAR (SIMD within a register) checks.
pub(super) const LANES: u64 = 0x0101_0101_0101_0101;

/// True if every byte of `seg` is printable ASCII (0x20..=0x7F): 32-byte chunks with
/// a branch-free body (which the compiler turns into SIMD compares), then 8-byte
/// words, then single bytes.
#[inline]
pub(super) fn plain_ascii(seg: &[u8]) -> bool {
    let mut chunks = seg.chunks_exact(32);
    for chunk in &mut chunks {
        if chunk
            .iter()
            .fold(0, |acc, &b| acc | b.wrapping_sub(0x20) | b)
            & 0x80
            != 0
        {
            return false;
        }
    }
    let mut words = chunks.remainder().chunks_exact(8);
    for word in &mut words {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        let x = u64::from_le_bytes(bytes);
        // A byte below 0x20 borrows and sets its top bit (a borrow only disturbs the
        // bytes above a flagged one); a byte from 0x80 has its top bit set already.
        if (x.wrapping_sub(LANES * 0x20) | x) & (LANES * 0x80) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| (0x20..0x80).contains(&b))
}

/// Checks the contents of a string: no control character and valid UTF-8. Err
/// carries the offset in `seg` and the reason.
#[inline]
pub(super) fn check_contents(seg: &[u8]) -> Result<(), (usize, &'static str)> {
    if plain_ascii(seg) {
        return Ok(());
    }
    check_contents_slow(seg)
}

#[inline(never)]
pub(super) fn check_contents_slow(seg: &[u8]) -> Result<(), (usize, &'static str)> {
    if has_control(seg) {
        let at = seg.iter().position(|&b| b < 0x20).unwrap_or_default();
        return Err((at, "control character in string (it must be escaped)"));
    }
    match std::str::from_utf8(seg) {
        Ok(_) => Ok(()),
        Err(e) => Err((e.valid_up_to(), "invalid UTF-8 in string")),
    }
}

/// True if `seg` has a byte below 0x20; branch-free per 64-byte chunk, like
/// [`plain_ascii`].
pub(super) fn has_control(seg: &[u8]) -> bool {
    let mut chunks = seg.chunks_exact(64);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |acc, &b| acc | (b < 0x20)) {
            return true;
        }
    }
    chunks.remainder().iter().any(|&b| b < 0x20)
}

/// Mirrors serde_json's default (not `float_roundtrip`, not `arbitrary_precision`)
/// number conversion for a grammatically valid JSON number and returns false where
/// serde_json reports "number out of range". Only numbers that have an exponent or
/// more than 300 integer digits can be out of range, so only those come here.
#[cold]
#[inline(never)]
pub(super) fn number_in_range(t: &[u8]) -> bool {
    let mut i = usize::from(t.first() == Some(&b'-'));
    let (mut sig, mut exp) = (0u64, 0i32);
    // Integer part: digits go into the significand until it would overflow, then each
    // further digit only bumps the exponent.
    while let Some(d) = digit(t, i) {
        if overflows(sig, d) {
            while digit(t, i).is_some() {
                exp = exp.saturating_add(1);
                i += 1;
            }
            break;
        }
        sig = sig * 10 + d;
        i += 1;
    }
    // Fraction: the same until overflow, then the remaining digits are ignored.
    if t.get(i) == Some(&b'.') {
        i += 1;
        while let Some(d) = digit(t, i) {
            if overflows(sig, d) {
                while digit(t, i).is_some() {
                    i += 1;
                }
                break;
            }
            sig = sig * 10 + d;
            exp = exp.saturating_sub(1);
            i += 1;
        }
    }
    if matches!(t.get(i), Some(b'e' | b'E')) {
        match exponent(t, i + 1) {
            Ok(e) => exp = exp.saturating_add(e),
            // serde_json: an exponent overflowing i32 is an error only for a
            // non-zero significand and a positive exponent; otherwise it is 0.
            Err(positive) => return sig == 0 || !positive,
        }
    }
    // f64_from_parts: negative exponents never fail; a positive one fails when the
    // product overflows or the exponent is past 1e308 with a non-zero significand.
    if exp < 0 || sig == 0 {
        return true;
    }
    if exp > 308 {
        return false;
    }
    let pow: f64 = match format!("1e{exp}").parse() {
        Ok(p) => p,
        Err(_) => return false,
    };
    (sig as f64 * pow).is_finite()
}

/// The decimal digit at `t[i]`, if there is one.
fn digit(t: &[u8], i: usize) -> Option<u64> {
    t.get(i)
        .filter(|b| b.is_ascii_digit())
        .map(|b| u64::from(b - b'0'))
}

/// Whether appending digit `d` to the significand `sig` overflows it.
fn overflows(sig: u64, d: u64) -> bool {
    sig >= u64::MAX / 10 && (sig > u64::MAX / 10 || d > u64::MAX % 10)
}

/// The signed exponent at `t[i..]` (just past the `e`), or `Err(positive)`
/// when its digits overflow an `i32`.
fn exponent(t: &[u8], mut i: usize) -> Result<i32, bool> {
    let positive = match t.get(i) {
        Some(b'-') => {
            i += 1;
            false
        }
        Some(b'+') => {
            i += 1;
            true
        }
        _ => true,
    };
    let mut e: i32 = 0;
    while let Some(d) = digit(t, i) {
        let d = d as i32;
        if e >= i32::MAX / 10 && (e > i32::MAX / 10 || d > i32::MAX % 10) {
            return Err(positive);
        }
        e = e * 10 + d;
        i += 1;
    }
    Ok(if positive { e } else { -e })
}

/// The number of ASCII digits at `b[i..]`. Eight bytes at a time: a byte is a digit
/// iff `t = byte ^ 0x30` is below 10, i.e. iff neither `t + 0x76` nor `t` has its top
/// bit set. A carry out of a byte only happens for a non-digit byte, which is already
/// flagged, and only disturbs the bytes above it, so the lowest flag is exact.
#[inline]
pub(super) fn digit_run(b: &[u8], i: usize) -> usize {
    let mut n = 0;
    while let Some(chunk) = b.get(i + n..i + n + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let t = u64::from_le_bytes(word) ^ (LANES * 0x30);
        let non_digits = (t.wrapping_add(LANES * 0x76) | t) & (LANES * 0x80);
        if non_digits != 0 {
            return n + (non_digits.trailing_zeros() / 8) as usize;
        }
        n += 8;
    }
    while b.get(i + n).is_some_and(u8::is_ascii_digit) {
        n += 1;
    }
    n
}

/// The contents of a JSON string, between the quotes.
#[derive(Clone, Copy, Debug)]
pub(super) struct Str {
    pub(super) start: usize,
    pub(super) end: usize,
}

/// The bytes of one JSON value, from its first byte to just past its last.
#[derive(Clone, Copy, Debug)]
pub(super) struct Span {
    pub(super) start: usize,
    pub(super) end: usize,
}

impl Span {
    pub(super) fn of(self, buf: &[u8]) -> &[u8] {
        &buf[self.start..self.end]
    }
}

/// A position in the body. Methods with `const V: bool` validate when `V` is true;
/// with `V` false they trust that the bytes were validated already and only find
/// where things end (used by the second pass).
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }

    #[inline]
    pub(super) fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    #[cold]
    pub(super) fn err(&self, what: &'static str) -> PromptError {
        let what = if self.pos >= self.buf.len() {
            "unexpected end of input"
        } else {
            what
        };
        PromptError::Malformed {
            offset: self.pos,
            what,
        }
    }

    #[inline]
    pub(super) fn expect(&mut self, b: u8, what: &'static str) -> Result<(), PromptError> {
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    /// Scans the string whose opening quote is at the cursor and returns its contents.
    #[inline]
    pub(super) fn string<const V: bool>(&mut self) -> Result<Str, PromptError> {
        let start = self.pos + 1;
        let end = if V {
            self.string_end_validating(start)?
        } else {
            self.string_end_trusted(start)?
        };
        self.pos = end + 1;
        Ok(Str { start, end })
    }

    /// Finds the closing quote of a string whose contents start at `start`, checking
    /// every escape, and then the whole contents for control characters and UTF-8
    /// (escapes only contain printable ASCII, so one pass over the contents does).
    #[inline]
    pub(super) fn string_end_validating(&self, start: usize) -> Result<usize, PromptError> {
        let mut i = start;
        loop {
            let rest = self.buf.get(i..).unwrap_or_default();
            let Some(k) = memchr2(b'"', b'\\', rest) else {
                return Err(PromptError::Malformed {
                    offset: self.buf.len(),
                    what: "unexpected end of input in a string",
                });
            };
            let j = i + k;
            if self.buf[j] == b'"' {
                check_contents(&self.buf[start..j]).map_err(|(at, what)| {
                    PromptError::Malformed {
                        offset: start + at,
                        what,
                    }
                })?;
                return Ok(j);
            }
            i = match decode_escape(self.buf, j) {
                Some((_, len)) => j + len,
                None => {
                    return Err(PromptError::Malformed {
                        offset: j,
                        what: "invalid escape sequence in string",
                    });
                }
            };
        }
    }

    /// Finds the closing quote of an already validated string: the first `"` preceded
    /// by an even number of backslashes. Only stops at quotes, not at every escape.
    #[inline]
    pub(super) fn string_end_trusted(&self, start: usize) -> Result<usize, PromptError> {
        let mut i = start;
        loop {
            let rest = self.buf.get(i..).unwrap_or_default();
            let Some(k) = memchr(b'"', rest) else {
                return Err(PromptError::Malformed {
                    offset: self.buf.len(),
                    what: "unexpected end of input in a string",
                });
            };
            let j = i + k;
            let backslashes = self.buf[start..j]
                .iter()
                .rev()
                .take_while(|&&b| b == b'\\')
                .count();
            if backslashes % 2 == 0 {
                return Ok(j);
            }
            i = j + 1;
        }
    }

    /// Scans the number that starts at the cursor.
    #[inline(always)]
    pub(super) fn number<const V: bool>(&mut self) -> Result<Span, PromptError> {
        let start = self.pos;
        let b = self.buf;
        let is_digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
        let mut i = start;
        if !V {
            while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = b.get(i) {
                i += 1;
            }
            self.pos = i;
            return Ok(Span { start, end: i });
        }
        let invalid = |offset| PromptError::Malformed {
            offset,
            what: "invalid number",
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        match b.get(i) {
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i += 1 + digit_run(b, i + 1),
            _ => return Err(invalid(i)),
        }
        let int_digits = i - start;
        if b.get(i) == Some(&b'.') {
            i += 1;
            if !is_digit(i) {
                return Err(invalid(i));
            }
            i += digit_run(b, i);
        }
        let mut has_exp = false;
        if let Some(b'e' | b'E') = b.get(i) {
            has_exp = true;
            i += 1;
            if let Some(b'+' | b'-') = b.get(i) {
                i += 1;
            }
            if !is_digit(i) {
                return Err(invalid(i));
            }
            i += digit_run(b, i);
        }
        self.pos = i;
        if (has_exp || int_digits > 300) && !number_in_range(&b[start..i]) {
            return Err(PromptError::Malformed {
                offset: start,
                what: "number out of range",
            });
        }
        Ok(Span { start, end: i })
    }

    #[inline]
    pub(super) fn literal(&mut self, lit: &'static [u8]) -> Result<(), PromptError> {
        if self.buf.get(self.pos..).is_some_and(|r| r.starts_with(lit)) {
            self.pos += lit.len();
            Ok(())
        } else {
            Err(self.err("invalid literal (expected true, false or null)"))
        }
    }

    /// Skips the value that starts at the cursor (whitespace already skipped) inside a
    /// container at nesting depth `depth`, and returns its span. Iterative: the kinds
    /// of the open containers are bits of a `u128`.
    pub(super) fn skip_value<const V: bool>(&mut self, depth: u32) -> Result<Span, PromptError> {
        let start = self.pos;
        let mut objects: u128 = 0; // bit n set: the container at relative level n+1 is an object
        let mut level: u32 = 0;
        'value: loop {
            match self.peek() {
                Some(b'"') => {
                    self.string::<V>()?;
                }
                Some(open @ (b'{' | b'[')) => {
                    level += 1;
                    if depth + level > MAX_DEPTH {
                        return Err(self.err("nesting deeper than 127 levels"));
                    }
                    let bit = 1u128 << (level - 1);
                    self.pos += 1;
                    self.ws();
                    if open == b'{' {
                        objects |= bit;
                        if self.peek() == Some(b'}') {
                            self.pos += 1;
                            level -= 1;
                        } else {
                            self.object_key::<V>()?;
                            continue 'value;
                        }
                    } else {
                        objects &= !bit;
                        if self.peek() == Some(b']') {
                            self.pos += 1;
                            level -= 1;
                        } else {
                            continue 'value;
                        }
                    }
                }
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => {
                    self.number::<V>()?;
                }
                _ => return Err(self.err("expected a JSON value")),
            }
            // A value is complete: close containers until one continues with `,`.
            loop {
                if level == 0 {
                    return Ok(Span {
                        start,
                        end: self.pos,
                    });
                }
                self.ws();
                let in_object = objects >> (level - 1) & 1 == 1;
                match self.peek() {
                    Some(b',') => {
                        self.pos += 1;
                        self.ws();
                        if in_object {
                            self.object_key::<V>()?;
                        }
                        continue 'value;
                    }
                    Some(b'}') if in_object => {
                        self.pos += 1;
                        level -= 1;
                    }
                    Some(b']') if !in_object => {
                        self.pos += 1;
                        level -= 1;
                    }
                    _ if in_object => {
                        return Err(self.err("expected `,` or `}` after object member"));
                    }
                    _ => return Err(self.err("expected `,` or `]` after array element")),
                }
            }
        }
    }

    /// Scans `"key"` `:` and the whitespace after it.
    #[inline]
    pub(super) fn object_key<const V: bool>(&mut self) -> Result<Str, PromptError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a string key"));
        }
        let key = self.string::<V>()?;
        self.ws();
        self.expect(b':', "expected `:` after object key")?;
        self.ws();
        Ok(key)
    }

    /// Walks the members of the object whose `{` is at the cursor: for each, scans
    /// the key and calls `f(key, cursor)`, which must consume exactly one value
    /// (validating it when `V`; the object's depth is the caller's business). Leaves
    /// the cursor after the `}`.
    pub(super) fn members<const V: bool>(
        &mut self,
        mut f: impl FnMut(Str, &mut Self) -> Result<(), PromptError>,
    ) -> Result<(), PromptError> {
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.object_key::<V>()?;
            f(key, self)?;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.ws();
                }
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected `,` or `}` after object member")),
            }
        }
    }

    /// Walks the elements of the array whose `[` is at the cursor, at nesting depth
    /// `depth`: `f` must consume exactly one value (validating it when `V`). Leaves
    /// the cursor after the `]`.
    pub(super) fn elements<const V: bool>(
        &mut self,
        depth: u32,
        mut f: impl FnMut(&mut Self) -> Result<(), PromptError>,
    ) -> Result<(), PromptError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting deeper than 127 levels"));
        }
        self.pos += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            f(self)?;
            self.ws();
            match self.peek() {
                Some(b',') => {
                    self.pos += 1;
                    self.ws();
                }
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected `,` or `]` after array element")),
            }
        }
    }
}
