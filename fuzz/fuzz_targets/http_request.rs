//! Request framing: `parse_head` and the chunked decoder on any bytes.
//!
//! Run with `cargo xtask fuzz http_request`. Checks, for any input: no
//! panic; a parsed head lies within the input and its forwarded copy is
//! whole CRLF lines, none empty, with no bare CR or LF; a chunked body decodes to the same result
//! whether its bytes arrive at once or split at any point, and never takes
//! more than the request limit allows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use router_daemon::http::{ChunkedDecoder, Framing, Limits, parse_head};

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the body is split.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_head: 2048,
        max_body: 4096,
        ..Limits::default()
    };
    let mut forwarded = Vec::new();
    let Ok(Some(head)) = parse_head(data, &limits, "x-session-id", &mut forwarded) else {
        return;
    };
    assert!(head.head_len <= data.len());
    // The head as forwarded (the router adds its own fields and the blank
    // line): whole CRLF-ended lines, none empty (which would end the head
    // early for the backend), no bare CR or LF.
    let forward = head.forward_head();
    let shown = String::from_utf8_lossy(forward);
    let mut lines: Vec<&[u8]> = forward.split(|&b| b == b'\n').collect();
    assert_eq!(lines.pop(), Some(&b""[..]), "{shown:?} does not end a line");
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or_else(|| panic!("bare LF in {shown:?}"));
        assert!(!line.is_empty(), "empty line in {shown:?}");
        assert!(!line.contains(&b'\r'), "bare CR in {shown:?}");
    }
    if head.body != Framing::Chunked {
        return;
    }
    let body = &data[head.head_len..];
    let whole = {
        let mut decoder = ChunkedDecoder::new(limits.chunked(head.head_len));
        decoder.decode(body).map(|used| used.map(|used| (used, decoder.into_body())))
    };
    let split = usize::from(split).min(body.len());
    let pieces = {
        let mut decoder = ChunkedDecoder::new(limits.chunked(head.head_len));
        match decoder.decode(&body[..split]) {
            Ok(Some(used)) => Ok(Some((used, decoder.into_body()))),
            Ok(None) => decoder.decode(body).map(|used| used.map(|used| (used, decoder.into_body()))),
            Err(err) => Err(err),
        }
    };
    assert_eq!(whole, pieces, "split at {split}");
    if let Ok(Some((used, decoded))) = whole {
        assert!(used <= body.len());
        assert!(decoded.len() <= limits.max_body);
        assert!(head.head_len + used <= limits.max_head + limits.max_body);
    }
});
