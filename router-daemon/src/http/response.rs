//! Response framing: the head a backend sends, and where its body ends.
//!
//! Backend connections are kept alive and reused, so the router must know
//! where each response ends without the backend closing. [`parse_head`]
//! reads a response head (httparse) and says how its body is delimited;
//! `BodyTracker` follows the body through the bytes as they pass, without
//! keeping or decoding them, and says when it has ended.
//!
//! The tracker's state converts to and from [`router_common::Framing`], the
//! state the sockmap program follows in the kernel, so a response can be
//! handed from the daemon to the kernel and back at any byte where the
//! framing is expressible (see `dataplane/sockmap.rs`).
use router_common::Framing;

use super::{MAX_HEADERS, MAX_LINE, chunk};

/// Longest response head accepted from a backend.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// A backend response that breaks HTTP/1.1 framing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The head is not a valid HTTP/1.1 response head.
    #[error("malformed response head: {0}")]
    Head(String),
    /// The head is over `MAX_HEAD` bytes.
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// A chunk-size line is not hex digits (with optional extensions).
    #[error("invalid chunk-size line")]
    ChunkSize,
    /// A chunk-size or trailer line is over 4 KiB.
    #[error("chunk-size or trailer line too long")]
    LineTooLong,
}

/// How a response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (HEAD request, 1xx, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No length given: the body ends when the backend closes.
    UntilClose,
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Length of the head, blank line included.
    pub len: usize,
    /// How the body is delimited.
    pub body: BodyFraming,
    /// The backend keeps the connection open after this response (HTTP/1.1
    /// without `Connection: close`, and a body that does not end by close).
    pub keep_alive: bool,
    /// A 1xx interim response: another head follows.
    pub interim: bool,
    /// The head says `Connection: close` (or is HTTP/1.0 without
    /// keep-alive), so the client will close after it.
    pub says_close: bool,
}

/// Parses the response head at the start of `buf`; `Ok(None)` while more
/// bytes are needed. `head_request` is whether the request was `HEAD`,
/// whose response has no body whatever its headers say.
pub fn parse_head(buf: &[u8], head_request: bool) -> Result<Option<ResponseHead>, FramingError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(FramingError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(err) => return Err(FramingError::Head(err.to_string())),
    };
    let status = response
        .code
        .expect("invariant: a complete parse has a status");
    let minor = response
        .version
        .expect("invariant: a complete parse has a version");
    let mut length = None;
    let mut chunked = false;
    let mut close = minor == 0;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let value = chunk::content_length(header.value)
                .ok_or_else(|| FramingError::Head("invalid Content-Length".into()))?;
            if length.is_some_and(|seen| seen != value) {
                return Err(FramingError::Head("conflicting Content-Length".into()));
            }
            length = Some(value);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            // Chunked must be the final coding (RFC 9112 §6.3); anything
            // else is delimited by close.
            chunked = header
                .value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    close = false;
                }
            }
        }
    }
    let interim = (100..200).contains(&status) && status != 101;
    let body = if head_request || interim || status == 204 || status == 304 {
        BodyFraming::Empty
    } else if chunked {
        BodyFraming::Chunked
    } else if let Some(length) = length {
        BodyFraming::Length(length)
    } else {
        BodyFraming::UntilClose
    };
    Ok(Some(ResponseHead {
        status,
        len,
        body,
        keep_alive: !close && body != BodyFraming::UntilClose && status != 101,
        interim,
        says_close: close,
    }))
}

/// Where a body stands, in the daemon's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// `remaining` body bytes left.
    Length { remaining: u64 },
    /// Until the backend closes.
    UntilClose,
    /// Inside a chunk: `remaining` bytes left, its closing CRLF included.
    ChunkData { remaining: u64 },
    /// Reading a chunk-size line; `line` holds its bytes so far.
    ChunkSize { line: Vec<u8> },
    /// After the last chunk: reading trailer lines until an empty one.
    Trailers { line: Vec<u8> },
    /// The body has ended.
    Done,
}

/// Follows a response body through its bytes and says where it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyTracker {
    state: State,
}

impl BodyTracker {
    /// A tracker at the first body byte of a response framed as `framing`.
    pub fn new(framing: BodyFraming) -> Self {
        let state = match framing {
            BodyFraming::Empty | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(remaining) => State::Length { remaining },
            BodyFraming::Chunked => State::ChunkSize { line: Vec::new() },
            BodyFraming::UntilClose => State::UntilClose,
        };
        Self { state }
    }

    /// True once the whole body has passed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// True when the body ends only with the connection.
    pub(crate) fn until_close(&self) -> bool {
        self.state == State::UntilClose
    }

    /// Feeds the next bytes of the stream; returns how many belong to the
    /// body. Fewer than `input.len()` only once the body has ended: the rest
    /// is not part of this response.
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, FramingError> {
        let mut at = 0;
        while at < input.len() {
            let rest = &input[at..];
            match &mut self.state {
                State::Done => break,
                State::UntilClose => at = input.len(),
                State::Length { remaining } | State::ChunkData { remaining } => {
                    let take =
                        usize::try_from(*remaining).map_or(rest.len(), |r| r.min(rest.len()));
                    *remaining -= take as u64;
                    at += take;
                    if *remaining == 0 {
                        self.state = match self.state {
                            State::ChunkData { .. } => State::ChunkSize { line: Vec::new() },
                            _ => State::Done,
                        };
                    }
                }
                State::ChunkSize { line } => {
                    let (used, complete) = take_line(line, rest)?;
                    at += used;
                    if complete {
                        self.state = match chunk_size(line)? {
                            0 => State::Trailers { line: Vec::new() },
                            size => State::ChunkData {
                                remaining: size + 2,
                            },
                        };
                    }
                }
                State::Trailers { line } => {
                    let (used, complete) = take_line(line, rest)?;
                    at += used;
                    if complete {
                        self.state = if line.trim_ascii().is_empty() {
                            State::Done
                        } else {
                            State::Trailers { line: Vec::new() }
                        };
                    }
                }
            }
        }
        Ok(at)
    }

    /// Bytes that can be moved next without looking at them: `Some(n)` in a
    /// length-delimited run (`u64::MAX` until close), `None` where framing
    /// lines must be read.
    pub(crate) fn opaque_run(&self) -> Option<u64> {
        match self.state {
            State::Length { remaining } | State::ChunkData { remaining } => Some(remaining),
            State::UntilClose => Some(u64::MAX),
            State::ChunkSize { .. } | State::Trailers { .. } | State::Done => None,
        }
    }

    /// Marks `n` bytes of the current opaque run (see [`Self::opaque_run`])
    /// as passed.
    pub(crate) fn skip(&mut self, n: u64) {
        match &mut self.state {
            State::Length { remaining } | State::ChunkData { remaining } => {
                *remaining = remaining.saturating_sub(n);
                if *remaining == 0 {
                    self.state = match self.state {
                        State::ChunkData { .. } => State::ChunkSize { line: Vec::new() },
                        _ => State::Done,
                    };
                }
            }
            State::UntilClose | State::ChunkSize { .. } | State::Trailers { .. } | State::Done => {}
        }
    }

    /// Whether the body is chunked (a stream, from vLLM).
    pub(crate) fn is_chunked(&self) -> bool {
        matches!(
            self.state,
            State::ChunkData { .. } | State::ChunkSize { .. } | State::Trailers { .. }
        )
    }

    /// The state as the kernel program follows it, when it can: not inside a
    /// partly read line, in the trailers, or after the end.
    pub(crate) fn to_kernel(&self) -> Option<Framing> {
        match &self.state {
            State::Length { remaining } => Some(Framing {
                kind: Framing::KIND_LENGTH,
                phase: 0,
                remaining: *remaining,
            }),
            State::UntilClose => Some(Framing {
                kind: Framing::KIND_UNTIL_CLOSE,
                phase: 0,
                remaining: 0,
            }),
            State::ChunkData { remaining } => Some(Framing {
                kind: Framing::KIND_CHUNKED,
                phase: Framing::PHASE_DATA,
                remaining: *remaining,
            }),
            State::ChunkSize { line } if line.is_empty() => Some(Framing {
                kind: Framing::KIND_CHUNKED,
                phase: Framing::PHASE_SIZE,
                remaining: 0,
            }),
            State::ChunkSize { .. } | State::Trailers { .. } | State::Done => None,
        }
    }

    /// The tracker at the state the kernel program left, `None` for a state
    /// it never leaves (which would be a bug in one of the two).
    pub(crate) fn from_kernel(framing: Framing) -> Option<Self> {
        let state = match (framing.kind, framing.phase) {
            (Framing::KIND_LENGTH, _) if framing.remaining > 0 => State::Length {
                remaining: framing.remaining,
            },
            (Framing::KIND_UNTIL_CLOSE, _) => State::UntilClose,
            (Framing::KIND_CHUNKED, Framing::PHASE_DATA) if framing.remaining > 0 => {
                State::ChunkData {
                    remaining: framing.remaining,
                }
            }
            (Framing::KIND_CHUNKED, Framing::PHASE_SIZE) => State::ChunkSize { line: Vec::new() },
            _ => return None,
        };
        Some(Self { state })
    }
}

/// Appends bytes of `rest` to `line` up to and including its `\n`: returns
/// how many were used and whether the line is complete.
fn take_line(line: &mut Vec<u8>, rest: &[u8]) -> Result<(usize, bool), FramingError> {
    let (used, complete) = match memchr::memchr(b'\n', rest) {
        Some(at) => (at + 1, true),
        None => (rest.len(), false),
    };
    if line.len() + used > MAX_LINE {
        return Err(FramingError::LineTooLong);
    }
    line.extend_from_slice(&rest[..used]);
    Ok((used, complete))
}

/// The size in a complete chunk-size line (its CRLF included).
fn chunk_size(line: &[u8]) -> Result<u64, FramingError> {
    chunk::chunk_size(line).ok_or(FramingError::ChunkSize)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const CHUNKED: &[u8] =
        b"4\r\nWiki\r\n7;ext=1\r\npedia i\r\nB\r\nn \r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n";

    #[test]
    fn heads_give_their_framing() {
        let parse = |raw: &[u8]| parse_head(raw, false).unwrap().unwrap();
        let head = parse(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nhello");
        assert_eq!(head.body, BodyFraming::Length(12));
        assert!(head.keep_alive);
        assert_eq!(head.len, 39);
        let head = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(head.body, BodyFraming::Chunked);
        let head = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 1\r\n\r\n");
        assert!(!head.keep_alive && head.says_close);
        let head = parse(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(head.body, BodyFraming::UntilClose);
        assert!(!head.keep_alive);
        let head = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!head.keep_alive);
        let head = parse(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(head.body, BodyFraming::Empty);
        assert!(head.keep_alive);
        let head = parse(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(head.interim);
        let head = parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(head.body, BodyFraming::Empty);
    }

    #[test]
    fn bad_heads_are_errors_and_partial_heads_wait() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent", false), Ok(None));
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n", false).is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", false).is_err());
        let long = [b"HTTP/1.1 200 OK\r\nx: ".as_slice(), &[b'a'; MAX_HEAD]].concat();
        assert_eq!(parse_head(&long, false), Err(FramingError::HeadTooLarge));
    }

    #[test]
    fn chunked_body_ends_at_its_terminator_at_every_split() {
        for split in 0..=CHUNKED.len() {
            let mut tracker = BodyTracker::new(BodyFraming::Chunked);
            let first = tracker.advance(&CHUNKED[..split]).unwrap();
            assert_eq!(first, split);
            assert_eq!(tracker.is_done(), split == CHUNKED.len(), "split {split}");
            let mut rest = CHUNKED[split..].to_vec();
            rest.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            assert_eq!(tracker.advance(&rest).unwrap(), CHUNKED.len() - split);
            assert!(tracker.is_done());
        }
    }

    #[test]
    fn length_body_ends_after_its_length() {
        let mut tracker = BodyTracker::new(BodyFraming::Length(5));
        assert_eq!(tracker.advance(b"abc").unwrap(), 3);
        assert!(!tracker.is_done());
        assert_eq!(tracker.advance(b"defgh").unwrap(), 2);
        assert!(tracker.is_done());
        assert!(BodyTracker::new(BodyFraming::Length(0)).is_done());
        assert!(BodyTracker::new(BodyFraming::Empty).is_done());
    }

    #[test]
    fn bad_chunk_lines_are_errors() {
        let mut tracker = BodyTracker::new(BodyFraming::Chunked);
        assert_eq!(tracker.advance(b"zz\r\n"), Err(FramingError::ChunkSize));
        let mut tracker = BodyTracker::new(BodyFraming::Chunked);
        assert_eq!(
            tracker.advance(&[b'1'; 5000]),
            Err(FramingError::LineTooLong)
        );
    }

    /// Moves `input` through a tracker the way the splice dataplane does:
    /// opaque runs skipped without looking, framing lines fed byte windows.
    fn splice_walk(input: &[u8], window: usize) -> (usize, bool) {
        let mut tracker = BodyTracker::new(BodyFraming::Chunked);
        let mut at = 0;
        while at < input.len() && !tracker.is_done() {
            match tracker.opaque_run() {
                Some(run) => {
                    let n = (input.len() - at).min(usize::try_from(run).unwrap_or(usize::MAX));
                    tracker.skip(n as u64);
                    at += n;
                }
                None => {
                    let end = (at + window).min(input.len());
                    at += tracker.advance(&input[at..end]).unwrap();
                }
            }
        }
        (at, tracker.is_done())
    }

    fn chunked(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        /// Wherever the stream is cut, and however it is walked, the body
        /// ends exactly at the terminator.
        #[test]
        fn any_chunked_body_ends_exactly(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
            cuts in proptest::collection::vec(0usize..4000, 0..8),
            window in 1usize..64,
        ) {
            let body = chunked(&chunks);
            let mut stream = body.clone();
            stream.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let mut tracker = BodyTracker::new(BodyFraming::Chunked);
            let mut used = 0;
            let mut from = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                used += tracker.advance(&stream[from..cut]).unwrap();
                from = cut;
            }
            prop_assert_eq!(used, body.len());
            prop_assert!(tracker.is_done());
            prop_assert_eq!(splice_walk(&stream, window), (body.len(), true));
        }

        /// Handing the state to the kernel and back loses nothing: at any
        /// byte where it is expressible, a round trip continues identically.
        #[test]
        fn kernel_round_trip_is_lossless(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..100), 1..10),
            cut in 0usize..2000,
        ) {
            let body = chunked(&chunks);
            let cut = cut % body.len();
            let mut tracker = BodyTracker::new(BodyFraming::Chunked);
            tracker.advance(&body[..cut]).unwrap();
            if let Some(framing) = tracker.to_kernel() {
                let mut resumed = BodyTracker::from_kernel(framing).unwrap();
                prop_assert_eq!(&resumed, &tracker);
                prop_assert_eq!(resumed.advance(&body[cut..]).unwrap(), body.len() - cut);
                prop_assert!(resumed.is_done());
            }
        }
    }
}
