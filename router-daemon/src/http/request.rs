//! Request framing: finds one client request in a byte buffer.
//!
//! [`parse_head`] checks a buffer for a complete request head, parses it with
//! httparse within [`Limits`], and returns the facts the router needs plus
//! the head rewritten for the backend. The body is framed by
//! `Content-Length` or by `Transfer-Encoding: chunked`, which
//! [`ChunkedDecoder`](super::ChunkedDecoder) decodes so the body can be scanned and forwarded with a
//! `Content-Length`.
//!
//! The head sent to the backend leaves out hop-by-hop headers: the backend
//! connection is the router's own, kept alive and reused across clients (see
//! [`super::response`] for how the end of each response is found).
use super::{
    MAX_HEADERS,
    chunk::{self, ChunkError, ChunkLimits},
};
use crate::error::{ApiError, Limit};

/// Size limits applied while reading a request.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest request head (request line and headers) in bytes.
    pub max_head: usize,
    /// Most header fields in one request (at most `MAX_HEADERS`).
    pub max_headers: usize,
    /// Longest request body in bytes.
    pub max_body: usize,
}

impl Limits {
    /// What a chunked body after a head of `head_len` bytes may take: its
    /// decoded bytes within `max_body`, the whole request as sent (head,
    /// chunk sizes, extensions, data and trailers) within `max_head +
    /// max_body`, and its trailers within the head's limits.
    pub fn chunked(&self, head_len: usize) -> ChunkLimits {
        ChunkLimits {
            body: self.max_body,
            raw: self
                .max_head
                .saturating_add(self.max_body)
                .saturating_sub(head_len),
            trailer_fields: self.max_headers,
            trailer_bytes: self.max_head,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head: 16 * 1024,
            max_headers: MAX_HEADERS,
            max_body: 32 * 1024 * 1024,
        }
    }
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    /// Length of the method at the start of `forward_head`.
    method_len: usize,
    /// Length of the path (the target up to any `?`), which follows the
    /// method and a space in `forward_head`.
    path_len: usize,
    /// Length of the head in the buffer, including the blank line.
    pub head_len: usize,
    /// How the body that follows the head is framed.
    pub body: Framing,
    /// The client sent `Expect: 100-continue`.
    pub(crate) expect_continue: bool,
    /// The client asked to close the connection after this request
    /// (`Connection: close`, or HTTP/1.0 without `keep-alive`).
    pub(crate) close: bool,
    /// The client's `x-request-id`, if it sent one.
    pub(crate) request_id: Option<String>,
    /// The value of the session header (`--session-header`), if present.
    pub(crate) session: Option<Vec<u8>>,
    /// See [`Head::forward_head`]; private, since the method and the path
    /// are read out of it by their lengths.
    forward_head: Vec<u8>,
}

impl Head {
    /// The head to send to the backend, unfinished: the request line and
    /// the end-to-end headers. Hop-by-hop and framing headers are left out;
    /// the sender adds `content-length` and the blank line.
    pub fn forward_head(&self) -> &[u8] {
        &self.forward_head
    }

    /// The forwarded head's buffer, for the next [`parse_head`] to reuse.
    pub(crate) fn into_buffer(self) -> Vec<u8> {
        self.forward_head
    }

    /// Request method, e.g. `POST`.
    pub(crate) fn method(&self) -> &str {
        std::str::from_utf8(&self.forward_head[..self.method_len])
            .expect("invariant: copied from the method httparse validated")
    }

    /// Request target without the query string, e.g. `/v1/completions`.
    pub(crate) fn path(&self) -> &str {
        let start = self.method_len + 1;
        std::str::from_utf8(&self.forward_head[start..start + self.path_len])
            .expect("invariant: copied from the path httparse validated")
    }
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Exactly this many bytes follow the head.
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Headers that describe one hop, or the framing the router redoes, and are
/// not forwarded.
const NOT_FORWARDED: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
    "content-length",
    "transfer-encoding",
];

/// Parses the request head at the start of `buf`; `session_header` names
/// the header whose value is kept as `Head::session`.
///
/// Returns `Ok(None)` when more bytes are needed, and an [`ApiError`] (4xx)
/// for a head that is malformed or over a limit. `Head::forward_head` is
/// built in `reuse`'s allocation (taken only when the head is complete), so
/// a connection can keep one buffer for all its requests.
pub fn parse_head(
    buf: &[u8],
    limits: &Limits,
    session_header: &str,
    reuse: &mut Vec<u8>,
) -> Result<Option<Head>, ApiError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut storage[..limits.max_headers.min(MAX_HEADERS)]);
    let Some(head_len) = complete_head(&mut request, buf, limits)? else {
        return Ok(None);
    };
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
    let facts = HeaderFacts::read(request.headers, session_header)?;
    let body = facts.framing(limits)?;
    let close = facts.close(minor);

    let mut forward_head = std::mem::take(reuse);
    forward_head.clear();
    forward_head.reserve(head_len + 32);
    forward_head.extend_from_slice(method.as_bytes());
    forward_head.push(b' ');
    forward_head.extend_from_slice(target.as_bytes());
    forward_head.extend_from_slice(match minor {
        0 => b" HTTP/1.0\r\n",
        _ => b" HTTP/1.1\r\n",
    });
    for header in request.headers.iter() {
        if facts.is_hop_by_hop(header.name) {
            continue;
        }
        forward_head.extend_from_slice(header.name.as_bytes());
        forward_head.extend_from_slice(b": ");
        forward_head.extend_from_slice(header.value);
        forward_head.extend_from_slice(b"\r\n");
    }

    Ok(Some(Head {
        method_len: method.len(),
        path_len: path.len(),
        head_len,
        body,
        expect_continue: facts.expect_continue,
        close,
        request_id: facts.request_id,
        session: facts.session,
        forward_head,
    }))
}

/// Runs httparse over `buf`: the head's length once it is complete and
/// within the limits, `None` while more bytes may complete it.
fn complete_head<'b>(
    request: &mut httparse::Request<'_, 'b>,
    buf: &'b [u8],
    limits: &Limits,
) -> Result<Option<usize>, ApiError> {
    let over_size = || {
        ApiError::header_too_large(format!("request head is over {} bytes", limits.max_head))
            .over(Limit::Head)
    };
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len > limits.max_head => Err(over_size()),
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) if buf.len() > limits.max_head => Err(over_size()),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(ApiError::header_too_large(format!(
            "request has more than {} header fields",
            limits.max_headers
        ))
        .over(Limit::Head)),
        Err(err) => Err(ApiError::bad_request(format!(
            "malformed HTTP request: {err}"
        ))),
    }
}

/// What a request's header fields say, as far as the router cares.
#[derive(Default)]
struct HeaderFacts {
    /// `Content-Length`, if given.
    body_len: Option<usize>,
    /// `Transfer-Encoding: chunked`.
    chunked: bool,
    /// `Expect: 100-continue`.
    expect_continue: bool,
    /// `x-request-id`.
    request_id: Option<String>,
    /// The session header's value, if not empty.
    session: Option<Vec<u8>>,
    /// Header names listed in `Connection` (hop-by-hop too), lowercased.
    connection_named: Vec<String>,
}

impl HeaderFacts {
    /// Reads `headers`, refusing what the router cannot frame or forward
    /// safely.
    fn read(headers: &[httparse::Header<'_>], session_header: &str) -> Result<Self, ApiError> {
        let mut facts = Self::default();
        for header in headers {
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                let len = parse_content_length(header.value)?;
                if facts.body_len.is_some_and(|seen| seen != len) {
                    return Err(ApiError::bad_request("conflicting Content-Length headers"));
                }
                facts.body_len = Some(len);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if !header.value.eq_ignore_ascii_case(b"chunked") || facts.chunked {
                    return Err(ApiError::not_implemented(
                        "only `Transfer-Encoding: chunked` request bodies are supported",
                    ));
                }
                facts.chunked = true;
            } else if name.eq_ignore_ascii_case("expect") {
                if !header.value.eq_ignore_ascii_case(b"100-continue") {
                    return Err(ApiError::bad_request(
                        "only `Expect: 100-continue` is supported",
                    ));
                }
                facts.expect_continue = true;
            } else if name.eq_ignore_ascii_case("connection") {
                facts.connection_named.extend(
                    String::from_utf8_lossy(header.value)
                        .split(',')
                        .map(|token| token.trim().to_ascii_lowercase())
                        .filter(|token| !token.is_empty()),
                );
            } else if name.eq_ignore_ascii_case("x-request-id") {
                facts.request_id = std::str::from_utf8(header.value).ok().map(str::to_owned);
            } else if name.eq_ignore_ascii_case(session_header) && !header.value.is_empty() {
                facts.session = Some(header.value.to_vec());
            }
        }
        Ok(facts)
    }

    /// Whether the connection closes after this request (HTTP/1.`minor`).
    fn close(&self, minor: u8) -> bool {
        let named = |token: &str| self.connection_named.iter().any(|t| t == token);
        if minor == 0 {
            !named("keep-alive")
        } else {
            named("close")
        }
    }

    /// How the body is delimited, within the body limit.
    fn framing(&self, limits: &Limits) -> Result<Framing, ApiError> {
        match (self.chunked, self.body_len) {
            // Both would let two parsers disagree on where the request ends.
            (true, Some(_)) => Err(ApiError::bad_request(
                "both Content-Length and Transfer-Encoding: chunked",
            )),
            (true, None) => Ok(Framing::Chunked),
            (false, len) if len.unwrap_or(0) > limits.max_body => Err(too_large(limits)),
            (false, len) => Ok(Framing::Length(len.unwrap_or(0))),
        }
    }

    /// Whether the header called `name` stays on this hop.
    fn is_hop_by_hop(&self, name: &str) -> bool {
        NOT_FORWARDED
            .iter()
            .any(|hop| name.eq_ignore_ascii_case(hop))
            || self
                .connection_named
                .iter()
                .any(|named| name.eq_ignore_ascii_case(named))
    }
}

fn too_large(limits: &Limits) -> ApiError {
    ApiError::payload_too_large(format!(
        "request body is over the {} byte limit",
        limits.max_body
    ))
    .over(Limit::Body)
}

impl From<ChunkError> for ApiError {
    /// A chunked request body the router cannot decode is the client's
    /// fault: 413 past a body limit, 431 past a trailer limit, 400
    /// otherwise.
    fn from(err: ChunkError) -> Self {
        match err {
            ChunkError::TooLarge { limit } => {
                ApiError::payload_too_large(format!("request body is over the {limit} byte limit"))
                    .over(Limit::Body)
            }
            ChunkError::RawTooLarge { .. } => {
                ApiError::payload_too_large(format!("request {err}")).over(Limit::Body)
            }
            ChunkError::TooManyTrailers { .. } | ChunkError::TrailersTooLarge { .. } => {
                ApiError::header_too_large(format!("request {err}")).over(Limit::Trailers)
            }
            other => ApiError::bad_request(other),
        }
    }
}

/// The length a `Content-Length` value gives.
fn parse_content_length(value: &[u8]) -> Result<usize, ApiError> {
    chunk::content_length(value)
        .and_then(|len| usize::try_from(len).ok())
        .ok_or_else(|| ApiError::bad_request("invalid Content-Length header"))
}

/// A `200 OK` response with the given content type and body; `close` adds
/// `connection: close`.
pub(crate) fn ok_response(content_type: &str, body: &[u8], close: bool) -> Vec<u8> {
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
pub(crate) const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::{super::ChunkedDecoder, *};

    const SESSION: &str = "x-session-id";

    const TUTORIAL: &[u8] = b"POST /v1/completions HTTP/1.1\r\nHost: localhost:30080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";

    #[test]
    fn parses_the_tutorial_request() {
        let head = parse_head(TUTORIAL, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.method(), "POST");
        assert_eq!(head.path(), "/v1/completions");
        assert_eq!(head.body, Framing::Length(2));
        assert!(!head.close);
        assert_eq!(&TUTORIAL[head.head_len..], b"{}");
        let forward = String::from_utf8(head.into_buffer()).unwrap();
        assert!(forward.starts_with("POST /v1/completions HTTP/1.1\r\nHost: localhost:30080\r\n"));
        assert!(forward.ends_with("Accept: */*\r\nContent-Type: application/json\r\n"));
    }

    #[test]
    fn a_reused_buffer_gives_the_same_head() {
        let fresh = parse_head(TUTORIAL, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap()
            .unwrap();
        let mut reuse = b"GET /older/and/longer/request HTTP/1.1\r\n".to_vec();
        let reused = parse_head(TUTORIAL, &Limits::default(), SESSION, &mut reuse)
            .unwrap()
            .unwrap();
        assert_eq!(reused, fresh);
        assert_eq!(
            (reused.method(), reused.path()),
            ("POST", "/v1/completions")
        );
    }

    #[test]
    fn every_split_point_is_partial_until_the_head_is_complete() {
        let head_len = parse_head(TUTORIAL, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap()
            .unwrap()
            .head_len;
        for split in 0..head_len {
            assert_eq!(
                parse_head(
                    &TUTORIAL[..split],
                    &Limits::default(),
                    SESSION,
                    &mut Vec::new()
                )
                .unwrap(),
                None,
                "split at {split}"
            );
        }
        for split in head_len..=TUTORIAL.len() {
            let head = parse_head(
                &TUTORIAL[..split],
                &Limits::default(),
                SESSION,
                &mut Vec::new(),
            )
            .unwrap();
            assert_eq!(head.unwrap().head_len, head_len, "split at {split}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_replaced() {
        let raw = b"POST /v1/completions?x=1 HTTP/1.1\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(raw, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.path(), "/v1/completions");
        assert!(head.expect_continue);
        let forward = String::from_utf8(head.into_buffer()).unwrap();
        assert_eq!(forward, "POST /v1/completions?x=1 HTTP/1.1\r\n");
    }

    #[test]
    fn session_header_is_kept_and_forwarded() {
        let raw = b"POST / HTTP/1.1\r\nX-Session-Id: user-42\r\nContent-Length: 0\r\n\r\n";
        let head = parse_head(raw, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.session.as_deref(), Some(b"user-42".as_slice()));
        assert!(
            String::from_utf8(head.into_buffer())
                .unwrap()
                .contains("X-Session-Id: user-42")
        );
        let other = parse_head(raw, &Limits::default(), "x-user", &mut Vec::new())
            .unwrap()
            .unwrap();
        assert_eq!(other.session, None);
    }

    #[test]
    fn connection_close_follows_the_version_rules() {
        let close = |raw: &[u8]| {
            parse_head(raw, &Limits::default(), SESSION, &mut Vec::new())
                .unwrap()
                .unwrap()
                .close
        };
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
        assert_eq!(
            parse_head(&long, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            431
        );
        let many = b"GET / HTTP/1.1\r\nA: 1\r\nB: 1\r\nC: 1\r\nD: 1\r\nE: 1\r\n\r\n";
        assert_eq!(
            parse_head(many, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            431
        );
        let big = b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(
            parse_head(big, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            413
        );
        let bad_len = b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(
            parse_head(bad_len, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            400
        );
        let conflict = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse_head(conflict, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            400
        );
        let garbage = b"\x16\x03\x01\x00 not http\r\n\r\n";
        assert_eq!(
            parse_head(garbage, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            400
        );
        let gzip = b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n";
        assert_eq!(
            parse_head(gzip, &limits, SESSION, &mut Vec::new())
                .unwrap_err()
                .status,
            501
        );
        let both = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let status = parse_head(both, &Limits::default(), SESSION, &mut Vec::new())
            .unwrap_err()
            .status;
        assert_eq!(status, 400);
    }

    const CHUNKED: &[u8] =
        b"4\r\nWiki\r\n7;ext=1\r\npedia i\r\nB\r\nn \r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n";

    #[test]
    fn chunked_body_decodes_at_every_split_point() {
        for split in 0..CHUNKED.len() {
            let mut decoder = ChunkedDecoder::new(Limits::default().chunked(0));
            assert_eq!(
                decoder.decode(&CHUNKED[..split]).unwrap(),
                None,
                "split {split}"
            );
            let mut input = CHUNKED.to_vec();
            input.extend_from_slice(b"GET /next HTTP/1.1\r\n");
            assert_eq!(decoder.decode(&input).unwrap(), Some(CHUNKED.len()));
            assert_eq!(decoder.into_body(), b"Wikipedia in \r\nchunks.");
        }
    }

    #[test]
    fn bad_chunks_are_client_errors() {
        let limits = Limits {
            max_body: 8,
            ..Limits::default()
        };
        let decode = |input: &[u8]| {
            ChunkedDecoder::new(limits.chunked(0))
                .decode(input)
                .map_err(ApiError::from)
        };
        assert_eq!(decode(b"zz\r\n").unwrap_err().status, 400);
        assert_eq!(decode(b"3\r\nabcX\r\n").unwrap_err().status, 400);
        assert_eq!(decode(b"9\r\n").unwrap_err().status, 413);
        assert_eq!(decode(b"5\r\nabcde\r\n5\r\n").unwrap_err().status, 413);
        assert_eq!(decode(&[b'1'; 5000]).unwrap_err().status, 400);
    }

    /// Feeds `input` to a decoder in 1000-byte steps, as reads would.
    fn decode_in_steps(limits: &Limits, input: &[u8]) -> Result<Option<usize>, ApiError> {
        let mut decoder = ChunkedDecoder::new(limits.chunked(0));
        for end in (1000..input.len()).step_by(1000).chain([input.len()]) {
            if let Some(used) = decoder.decode(&input[..end]).map_err(ApiError::from)? {
                return Ok(Some(used));
            }
        }
        Ok(None)
    }

    #[test]
    fn chunk_metadata_counts_against_the_request_limit() {
        let limits = Limits {
            max_head: 1024,
            max_body: 64 * 1024,
            ..Limits::default()
        };
        // One-byte chunks, each with a 4,000-byte extension: 64 decoded
        // bytes, 256 KiB as sent.
        let extension = format!(";{}", "e".repeat(4000));
        let chunk = format!("1{extension}\r\nx\r\n");
        let flood = chunk.repeat(64);
        let err = decode_in_steps(&limits, flood.as_bytes()).unwrap_err();
        assert_eq!((err.status, err.limit), (413, Some(Limit::Body)), "{err}");
        // The same chunks within the limit decode.
        let fits = format!("{}0\r\n\r\n", chunk.repeat(8));
        assert_eq!(
            decode_in_steps(&limits, fits.as_bytes()).unwrap(),
            Some(fits.len())
        );
    }

    #[test]
    fn trailers_are_bounded_in_count_and_size() {
        let limits = Limits {
            max_head: 16 * 1024,
            max_headers: 8,
            ..Limits::default()
        };
        let body = |trailers: &str| format!("3\r\nabc\r\n0\r\n{trailers}\r\n");
        let few = body(&"T: 1\r\n".repeat(8));
        assert_eq!(
            decode_in_steps(&limits, few.as_bytes()).unwrap(),
            Some(few.len())
        );
        let many = body(&"T: 1\r\n".repeat(9));
        let err = decode_in_steps(&limits, many.as_bytes()).unwrap_err();
        assert_eq!(
            (err.status, err.limit),
            (431, Some(Limit::Trailers)),
            "{err}"
        );
        // Long lines, each under the line limit: 5 × 4,000 bytes.
        let long = body(&format!("T: {}\r\n", "v".repeat(3995)).repeat(5));
        let err = decode_in_steps(&limits, long.as_bytes()).unwrap_err();
        assert_eq!(
            (err.status, err.limit),
            (431, Some(Limit::Trailers)),
            "{err}"
        );
        // An endless flood stops at the first limit it passes, however
        // much more follows.
        let flood = format!(
            "0\r\n{}",
            format!("T: {}\r\n", "v".repeat(3995)).repeat(1000)
        );
        assert!(decode_in_steps(&limits, flood.as_bytes()).is_err());
    }
}
