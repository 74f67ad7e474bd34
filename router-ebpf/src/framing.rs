//! Following a response body's framing through bytes the program judges:
//! lengths are counted, chunk-size lines are read. Both kernel dataplanes
//! use it, each reading bytes its own way ([`Bytes`]).
use router_common::Framing;

/// Longest chunk-size line the program reads (hex digits and CRLF).
pub(crate) const SIZE_LINE: usize = 16;

/// The bytes one program run judges.
pub(crate) trait Bytes {
    /// Up to [`SIZE_LINE`] bytes from `at`, where `left` (at least 3) bytes
    /// remain: the bytes (zero past the end) and how many were read.
    fn line(&self, at: u64, left: u64) -> Option<([u8; SIZE_LINE], usize)>;
}

/// The framing after `len` more body bytes, or `None` when these bytes hold
/// the end of the body or something the program does not follow (such as
/// more than `MAX_CHUNKS` chunk-size lines: the bound keeps the verifier's
/// work finite).
#[inline(always)]
pub(crate) fn advance<const MAX_CHUNKS: u32>(
    bytes: &impl Bytes,
    mut framing: Framing,
    len: u64,
) -> Option<Framing> {
    match framing.kind {
        Framing::KIND_UNTIL_CLOSE => Some(framing),
        Framing::KIND_LENGTH if framing.remaining > len => {
            framing.remaining -= len;
            Some(framing)
        }
        Framing::KIND_CHUNKED => advance_chunked::<MAX_CHUNKS>(bytes, framing, len),
        _ => None,
    }
}

/// Follows chunks through `len` bytes: data is counted, size lines are read.
#[inline(always)]
fn advance_chunked<const MAX_CHUNKS: u32>(
    bytes: &impl Bytes,
    mut framing: Framing,
    len: u64,
) -> Option<Framing> {
    let mut at: u64 = 0;
    for _ in 0..MAX_CHUNKS {
        if framing.phase == Framing::PHASE_DATA {
            let left = len - at;
            if framing.remaining >= left {
                framing.remaining -= left;
                if framing.remaining == 0 {
                    framing.phase = Framing::PHASE_SIZE;
                }
                return Some(framing);
            }
            at += framing.remaining;
            framing.remaining = 0;
            framing.phase = Framing::PHASE_SIZE;
        }
        // A chunk-size line starts at `at`, inside these bytes.
        let (size, line_len) = size_line(bytes, at, len - at)?;
        if size == 0 {
            // The last chunk: the body ends here.
            return None;
        }
        framing.phase = Framing::PHASE_DATA;
        framing.remaining = size + 2;
        at += line_len;
        if at == len {
            return Some(framing);
        }
    }
    None
}

/// Marks a byte that is not a hex digit in [`HEX`].
const NOT_HEX: u8 = 0xff;

/// Each byte's value as a hex digit, or [`NOT_HEX`]. A table rather than
/// range tests: the verifier reads it as one unknown value whatever the
/// byte, so the states of a size line's digits converge, where a branch
/// per digit class multiplies them (the send-side program did not load
/// with branches).
static HEX: [u8; 256] = {
    let mut table = [NOT_HEX; 256];
    let mut i = 0;
    while i < 16 {
        table[b"0123456789abcdef"[i] as usize] = i as u8;
        table[b"0123456789ABCDEF"[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Reads a chunk-size line (`hex digits CRLF`, nothing else) at `at`:
/// returns the size and the line's length, or `None` when the line is not
/// wholly in these bytes or has extensions.
#[inline(always)]
fn size_line(bytes: &impl Bytes, at: u64, left: u64) -> Option<(u64, u64)> {
    if left < 3 {
        return None;
    }
    let (line, read) = bytes.line(at, left)?;
    let mut size: u64 = 0;
    let mut i = 0;
    while i + 1 < SIZE_LINE {
        if i + 1 >= read {
            return None;
        }
        let byte = line[i];
        if byte == b'\r' {
            return (i > 0 && line[i + 1] == b'\n').then_some((size, i as u64 + 2));
        }
        let digit = HEX[usize::from(byte)];
        if digit == NOT_HEX {
            return None;
        }
        size = (size << 4) | u64::from(digit);
        i += 1;
    }
    None
}
