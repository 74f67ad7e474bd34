//! HTTP/1.1 request framing: finds one request in a byte buffer.
//!
//! [`parse_head`] checks a buffer for a complete request head, parses it with
//! httparse within [`Limits`], and returns the facts the router needs plus
//! the head rewritten for the backend. The body is framed by
//! `Content-Length` only; `Transfer-Encoding` request bodies are refused for
//! now with a clear error.
//!
//! The head sent to the backend asks it to close the connection after the
//! response (`connection: close`): the end of the backend's byte stream is
//! then the end of the response, which the in-kernel dataplane can see
//! without reading response bytes.
use crate::error::ApiError;

/// Size limits applied while reading a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest request head (request line and headers) in bytes.
    pub max_head: usize,
    /// Most header fields in one request.
    pub max_headers: usize,
    /// Longest request body in bytes.
    pub max_body: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_headers: 64,
            max_body: 32 * 1024 * 1024,
        }
    }
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Request method, e.g. `POST`.
    pub method: String,
    /// Request target without the query string, e.g. `/v1/completions`.
    pub path: String,
    /// Length of the head in the buffer, including the blank line.
    pub head_len: usize,
    /// Length of the body that follows the head.
    pub body_len: usize,
    /// The client sent `Expect: 100-continue`.
    pub expect_continue: bool,
    /// The client asked to close the connection after this request
    /// (`Connection: close`, or HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// The client's `x-request-id`, if it sent one.
    pub request_id: Option<String>,
    /// The head to send to the backend: hop-by-hop headers removed,
    /// `connection: close` added, `Expect` answered by the router.
    pub forward_head: Vec<u8>,
}

/// Headers that describe one hop and are not forwarded.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
];

/// Parses the request head at the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, and an [`ApiError`] (4xx)
/// for a head that is malformed or over a limit.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Head>, ApiError> {
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_head {
                return Err(ApiError::header_too_large(format!(
                    "request head is over {} bytes",
                    limits.max_head
                )));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::header_too_large(format!(
                "request has more than {} header fields",
                limits.max_headers
            )));
        }
        Err(err) => {
            return Err(ApiError::bad_request(format!(
                "malformed HTTP request: {err}"
            )));
        }
    };
    if head_len > limits.max_head {
        return Err(ApiError::header_too_large(format!(
            "request head is over {} bytes",
            limits.max_head
        )));
    }
    let method = request
        .method
        .expect("invariant: a complete parse has a method");
    let target = request
        .path
        .expect("invariant: a complete parse has a path");
    let minor = request
        .version
        .expect("invariant: a complete parse has a version");
    let path = target.split_once('?').map_or(target, |(path, _query)| path);

    let mut body_len: Option<usize> = None;
    let mut expect_continue = false;
    let mut request_id = None;
    // Headers named in `Connection` are hop-by-hop too.
    let mut connection_named: Vec<String> = Vec::new();
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_content_length(header.value)?;
            if body_len.is_some_and(|seen| seen != len) {
                return Err(ApiError::bad_request("conflicting Content-Length headers"));
            }
            body_len = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::not_implemented(
                "Transfer-Encoding request bodies are not supported yet; send Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("expect") {
            if header.value.eq_ignore_ascii_case(b"100-continue") {
                expect_continue = true;
            } else {
                return Err(ApiError::bad_request(
                    "only `Expect: 100-continue` is supported",
                ));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            connection_named.extend(
                String::from_utf8_lossy(header.value)
                    .split(',')
                    .map(|token| token.trim().to_ascii_lowercase())
                    .filter(|token| !token.is_empty()),
            );
        } else if name.eq_ignore_ascii_case("x-request-id") {
            request_id = std::str::from_utf8(header.value).ok().map(str::to_owned);
        }
    }
    let close = if minor == 0 {
        !connection_named.iter().any(|token| token == "keep-alive")
    } else {
        connection_named.iter().any(|token| token == "close")
    };
    let body_len = body_len.unwrap_or(0);
    if body_len > limits.max_body {
        return Err(ApiError::payload_too_large(format!(
            "request body of {body_len} bytes is over the {} byte limit",
            limits.max_body
        )));
    }

    let mut forward_head = Vec::with_capacity(head_len + 32);
    forward_head.extend_from_slice(method.as_bytes());
    forward_head.push(b' ');
    forward_head.extend_from_slice(target.as_bytes());
    forward_head.extend_from_slice(format!(" HTTP/1.{minor}\r\n").as_bytes());
    for header in request.headers.iter() {
        let hop_by_hop = HOP_BY_HOP
            .iter()
            .any(|hop| header.name.eq_ignore_ascii_case(hop))
            || connection_named
                .iter()
                .any(|named| header.name.eq_ignore_ascii_case(named));
        if hop_by_hop {
            continue;
        }
        forward_head.extend_from_slice(header.name.as_bytes());
        forward_head.extend_from_slice(b": ");
        forward_head.extend_from_slice(header.value);
        forward_head.extend_from_slice(b"\r\n");
    }
    forward_head.extend_from_slice(b"connection: close\r\n\r\n");

    Ok(Some(Head {
        method: method.to_owned(),
        path: path.to_owned(),
        head_len,
        body_len,
        expect_continue,
        close,
        request_id,
        forward_head,
    }))
}

fn parse_content_length(value: &[u8]) -> Result<usize, ApiError> {
    let invalid = || ApiError::bad_request("invalid Content-Length header");
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    std::str::from_utf8(value)
        .map_err(|_| invalid())?
        .parse()
        .map_err(|_| invalid())
}

/// A `200 OK` response with the given content type and body; `close` adds
/// `connection: close`.
pub fn ok_response(content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
    let connection = if close { "connection: close\r\n" } else { "" };
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{connection}\r\n",
        body.len()
    )
    .into_bytes();
    response.extend_from_slice(body);
    response
}

/// The interim response that tells a client waiting on `Expect: 100-continue`
/// to send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    const TUTORIAL: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: localhost:30080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn parses_the_tutorial_request() {
        let head = parse_head(TUTORIAL, &Limits::default()).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/v1/completions");
        assert_eq!(head.body_len, 2);
        assert!(!head.close);
        assert_eq!(&TUTORIAL[head.head_len..], b"{}");
        let forward = String::from_utf8(head.forward_head).unwrap();
        assert!(forward.starts_with("POST /v1/completions HTTP/1.1\r\nHost: localhost:30080\r\n"));
        assert!(forward.ends_with("Content-Length: 2\r\nconnection: close\r\n\r\n"));
    }

    #[test]
    fn every_split_point_is_partial_until_the_head_is_complete() {
        let head_len = parse_head(TUTORIAL, &Limits::default())
            .unwrap()
            .unwrap()
            .head_len;
        for split in 0..head_len {
            assert_eq!(
                parse_head(&TUTORIAL[..split], &Limits::default()).unwrap(),
                None,
                "split at {split}"
            );
        }
        for split in head_len..=TUTORIAL.len() {
            let head = parse_head(&TUTORIAL[..split], &Limits::default()).unwrap();
            assert_eq!(head.unwrap().head_len, head_len, "split at {split}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_replaced() {
        let raw = b"POST /v1/completions?x=1 HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(raw, &Limits::default()).unwrap().unwrap();
        assert_eq!(head.path, "/v1/completions");
        assert!(head.expect_continue);
        let forward = String::from_utf8(head.forward_head).unwrap();
        assert_eq!(
            forward,
            "POST /v1/completions?x=1 HTTP/1.1\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn connection_close_follows_the_version_rules() {
        let close = |raw: &[u8]| parse_head(raw, &Limits::default()).unwrap().unwrap().close;
        assert!(close(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"));
        assert!(!close(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(close(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(!close(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn limits_and_malformed_heads_are_client_errors() {
        let limits = Limits {
            max_head: 64,
            max_headers: 4,
            max_body: 10,
        };
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 100]].concat();
        assert_eq!(parse_head(&long, &limits).unwrap_err().status, 431);
        let many = b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n";
        assert_eq!(parse_head(many, &limits).unwrap_err().status, 431);
        let big = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse_head(big, &limits).unwrap_err().status, 413);
        let bad_len = b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(parse_head(bad_len, &limits).unwrap_err().status, 400);
        let conflict = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse_head(conflict, &limits).unwrap_err().status, 400);
        let garbage = b"\x16\x03\x01\x00 not http\r\n\r\n";
        assert_eq!(parse_head(garbage, &limits).unwrap_err().status, 400);
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked, &limits).unwrap_err().status, 501);
    }
}
