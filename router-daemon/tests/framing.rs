//! The router's request framing against an independent parser: Python's
//! h11 (what uvicorn can run on, so what a vLLM server may see), on the
//! same byte streams.
//!
//! The property: wherever the router accepts a request, h11 accepts it too,
//! ending it at the same byte with the same body. So no byte stream the
//! router takes as one request can be read as a different request (or two)
//! by a parser of its own; the router is free to be stricter. The cases
//! RFC 9112 says a server must or should refuse are also checked to be
//! refused, with the status a client sees.
//!
//! Bare LF: accepted as a line end in the head, as h11 and httparse both
//! do (RFC 9112 §2.2 allows it); the head is rebuilt with CRLF before it
//! is forwarded. In a chunked body only CRLF ends a line, so a body with
//! bare LFs is refused (400), where h11 would accept it.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use router_daemon::http::{ChunkedDecoder, Framing, Limits, parse_head};

/// The h11 script, next to this file.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/framing/h11_verdicts.py");

/// A request that follows every case, so where the first one ends matters.
const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n";

/// What a parser made of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    /// A whole first request: the bytes it took, and its decoded body.
    Accepted { end: usize, body: Vec<u8> },
    /// More bytes needed.
    Incomplete,
    /// Refused (the router's status; 0 for h11).
    Rejected(u16),
}

/// The router's verdict, as the daemon reads a request: head, then body.
fn router(stream: &[u8]) -> Verdict {
    let limits = Limits::default();
    let mut forwarded = Vec::new();
    let head = match parse_head(stream, &limits, "x-session-id", &mut forwarded) {
        Err(err) => return Verdict::Rejected(err.status),
        Ok(None) => return Verdict::Incomplete,
        Ok(Some(head)) => head,
    };
    let rest = &stream[head.head_len..];
    match head.body {
        Framing::Length(len) if rest.len() >= len => Verdict::Accepted {
            end: head.head_len + len,
            body: rest[..len].to_vec(),
        },
        Framing::Length(_) => Verdict::Incomplete,
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new(limits.chunked(head.head_len));
            match decoder.decode(rest) {
                Ok(Some(used)) => Verdict::Accepted {
                    end: head.head_len + used,
                    body: decoder.into_body(),
                },
                Ok(None) => Verdict::Incomplete,
                Err(err) => Verdict::Rejected(router_daemon::error::ApiError::from(err).status),
            }
        }
    }
}

/// h11's verdicts on `streams`, in order; None when python3 or h11 is
/// missing.
fn h11(streams: &[Vec<u8>]) -> Option<Vec<Verdict>> {
    let input = serde_json::to_string(
        &streams
            .iter()
            .map(|s| s.iter().map(|b| format!("{b:02x}")).collect::<String>())
            .collect::<Vec<_>>(),
    )
    .expect("json");
    let mut child = Command::new("python3")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write streams");
    let output = child.wait_with_output().expect("h11 script");
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(
            err.contains("No module named 'h11'"),
            "h11 script failed: {err}"
        );
        return None;
    }
    let verdicts = String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("json verdict");
            match v["verdict"].as_str() {
                Some("accepted") => Verdict::Accepted {
                    end: usize::try_from(v["end"].as_u64().expect("end")).expect("usize"),
                    body: unhex(v["body"].as_str().expect("body")),
                },
                Some("incomplete") => Verdict::Incomplete,
                _ => Verdict::Rejected(0),
            }
        })
        .collect();
    Some(verdicts)
}

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The cases: (name, the first request's bytes, the status the router must
/// refuse it with, if it must).
fn cases() -> Vec<(&'static str, Vec<u8>, Option<u16>)> {
    let post = |headers: &str, body: &str| -> Vec<u8> {
        format!("POST /v1/completions HTTP/1.1\r\nHost: a\r\n{headers}\r\n{body}").into_bytes()
    };
    vec![
        ("content-length", post("Content-Length: 3\r\n", "abc"), None),
        (
            "content-length with spaces",
            post("Content-Length:  3 \r\n", "abc"),
            None,
        ),
        (
            "content-length with leading zeros",
            post("Content-Length: 003\r\n", "abc"),
            None,
        ),
        ("no body", post("", ""), None),
        (
            "chunked with extensions and trailers",
            post(
                "Transfer-Encoding: chunked\r\n",
                "3;name=value\r\nabc\r\n0003\r\ndef\r\n0\r\nX-Trailer: 1\r\n\r\n",
            ),
            None,
        ),
        (
            "chunked, upper case",
            post("Transfer-Encoding: Chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"),
            None,
        ),
        (
            "a trailer naming a Content-Length",
            post(
                "Transfer-Encoding: chunked\r\n",
                "3\r\nabc\r\n0\r\nContent-Length: 99\r\n\r\n",
            ),
            None,
        ),
        (
            "a quoted extension holding a line end",
            post(
                "Transfer-Encoding: chunked\r\n",
                "3;a=\"x\r\ny\"\r\nabc\r\n0\r\n\r\n",
            ),
            Some(400),
        ),
        (
            "Content-Length and Transfer-Encoding",
            post(
                "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                "3\r\nabc\r\n0\r\n\r\n",
            ),
            Some(400),
        ),
        (
            "two different Content-Lengths",
            post("Content-Length: 3\r\nContent-Length: 4\r\n", "abcd"),
            Some(400),
        ),
        (
            "a Content-Length list",
            post("Content-Length: 3, 4\r\n", "abcd"),
            Some(400),
        ),
        (
            "a signed Content-Length",
            post("Content-Length: +3\r\n", "abc"),
            Some(400),
        ),
        (
            "a negative Content-Length",
            post("Content-Length: -3\r\n", "abc"),
            Some(400),
        ),
        (
            "obs-fold",
            post("X-Folded: a\r\n b\r\nContent-Length: 3\r\n", "abc"),
            Some(400),
        ),
        (
            "whitespace before a colon",
            post("Content-Length : 3\r\n", "abc"),
            Some(400),
        ),
        (
            "an unknown transfer coding",
            post(
                "Transfer-Encoding: gzip, chunked\r\n",
                "3\r\nabc\r\n0\r\n\r\n",
            ),
            Some(501),
        ),
        (
            "identity coding",
            post("Transfer-Encoding: identity\r\n", "abc"),
            Some(501),
        ),
        (
            "a chunk size past 2^60",
            post(
                "Transfer-Encoding: chunked\r\n",
                "1000000000000000\r\nabc\r\n",
            ),
            Some(400),
        ),
        (
            "chunk data not ended by CRLF",
            post("Transfer-Encoding: chunked\r\n", "3\r\nabcd\r\n0\r\n\r\n"),
            Some(400),
        ),
        (
            "bare LF in a chunked body",
            post("Transfer-Encoding: chunked\r\n", "3\nabc\n0\n\n"),
            Some(400),
        ),
        (
            "bare LF in the head",
            b"POST /v1/completions HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc".to_vec(),
            None,
        ),
        (
            "bare CR in a header value",
            post("X-Odd: a\rb\r\nContent-Length: 3\r\n", "abc"),
            Some(400),
        ),
        (
            "a space in a header name",
            post("Content Length: 3\r\n", "abc"),
            Some(400),
        ),
        (
            "HTTP/1.0",
            b"POST /v1/completions HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc".to_vec(),
            None,
        ),
    ]
}

#[test]
fn the_router_never_frames_a_request_differently_from_h11() {
    let cases = cases();
    let streams: Vec<Vec<u8>> = cases
        .iter()
        .map(|(_, first, _)| [first.as_slice(), NEXT].concat())
        .collect();
    // The router refuses what the RFC says to refuse, whatever h11 does.
    for ((name, _, must), stream) in cases.iter().zip(&streams) {
        let verdict = router(stream);
        if let Some(status) = must {
            assert_eq!(verdict, Verdict::Rejected(*status), "{name}");
        } else {
            assert!(
                matches!(verdict, Verdict::Accepted { .. }),
                "{name}: {verdict:?}"
            );
        }
    }
    let Some(h11) = h11(&streams) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs python3 with h11 (cargo xtask test installs it)"
        );
        eprintln!("skipped: python3 with h11 is not installed (cargo xtask test installs it)");
        return;
    };
    assert_eq!(h11.len(), streams.len());
    for ((name, _, _), (stream, theirs)) in cases.iter().zip(streams.iter().zip(&h11)) {
        let ours = router(stream);
        if let Verdict::Accepted { .. } = ours {
            assert_eq!(&ours, theirs, "{name}: the router and h11 disagree");
        }
    }
}
