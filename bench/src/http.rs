//! The little HTTP/1.1 the benchmark needs: request heads (backend side),
//! response heads and chunked bodies (client side), and the request bodies
//! of the three cases.
use std::io;

/// Most header lines accepted in a head.
const MAX_HEADERS: usize = 64;

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `content-length` bytes (0 when absent on a request).
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the peer closes (a response with neither).
    UntilClose,
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target.
    pub path: String,
    /// Body length (chunked request bodies are not used by the benchmark).
    pub body_len: usize,
    /// The connection should close after the response.
    pub close: bool,
}

/// Parses a request head at the start of `buf`; `None` while incomplete.
pub fn parse_request(buf: &[u8]) -> io::Result<Option<RequestHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf).map_err(invalid)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let mut body_len = 0usize;
    let mut close = req.version == Some(0);
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid("chunked request bodies are not supported"));
        } else if header.name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(header.value).to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
    }
    Ok(Some(RequestHead {
        len,
        method: req.method.unwrap_or_default().to_owned(),
        path: req.path.unwrap_or_default().to_owned(),
        body_len,
        close,
    }))
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub framing: Framing,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// Parses a response head at the start of `buf`; `None` while incomplete.
pub fn parse_response(buf: &[u8]) -> io::Result<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf).map_err(invalid)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let mut framing = Framing::UntilClose;
    let mut close = resp.version == Some(0);
    for header in resp.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| invalid("bad content-length"))?;
            if framing != Framing::Chunked {
                framing = Framing::Length(n);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if String::from_utf8_lossy(header.value)
                .to_ascii_lowercase()
                .contains("chunked")
            {
                framing = Framing::Chunked;
            }
        } else if header.name.eq_ignore_ascii_case("connection") {
            let value = String::from_utf8_lossy(header.value).to_ascii_lowercase();
            if value.contains("close") {
                close = true;
            } else if value.contains("keep-alive") {
                close = false;
            }
        }
    }
    if framing == Framing::UntilClose {
        close = true;
    }
    Ok(Some(ResponseHead {
        len,
        status: resp.code.unwrap_or(0),
        framing,
        close,
    }))
}

/// Incremental decoder of a chunked body.
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    /// Digits of the size line being read.
    size: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading hex digits of a chunk size.
    #[default]
    Size,
    /// Skipping a chunk extension up to the line end.
    Extension,
    /// Expecting the `\n` of the size line.
    SizeLf,
    /// Inside chunk data, `size` bytes left.
    Data,
    /// Expecting the `\r` after chunk data.
    DataCr,
    /// Expecting the `\n` after chunk data.
    DataLf,
    /// After the last chunk: skipping trailers up to the blank line.
    Trailer {
        /// Bytes on the current trailer line so far.
        line: usize,
    },
    /// The body is complete.
    Done,
}

impl Dechunker {
    /// Feeds bytes; calls `data` with each piece of body data. Returns how
    /// many bytes of `input` belong to the body (the rest follows it), and
    /// whether the body is complete.
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> io::Result<(usize, bool)> {
        let mut i = 0;
        while i < input.len() {
            let byte = input[i];
            match self.state {
                ChunkState::Size => match byte {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (byte as char).to_digit(16).unwrap_or(0);
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(digit)))
                            .ok_or_else(|| invalid("chunk size overflow"))?;
                    }
                    b';' | b' ' | b'\t' => self.state = ChunkState::Extension,
                    b'\r' => self.state = ChunkState::SizeLf,
                    _ => return Err(invalid("bad chunk size")),
                },
                ChunkState::Extension => {
                    if byte == b'\r' {
                        self.state = ChunkState::SizeLf;
                    }
                }
                ChunkState::SizeLf => {
                    if byte != b'\n' {
                        return Err(invalid("bad chunk size line"));
                    }
                    self.state = if self.size == 0 {
                        ChunkState::Trailer { line: 0 }
                    } else {
                        ChunkState::Data
                    };
                }
                ChunkState::Data => {
                    let left = usize::try_from(self.size).unwrap_or(usize::MAX);
                    let take = left.min(input.len() - i);
                    data(&input[i..i + take]);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = ChunkState::DataCr;
                    }
                    continue;
                }
                ChunkState::DataCr => {
                    if byte != b'\r' {
                        return Err(invalid("chunk data longer than its size"));
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if byte != b'\n' {
                        return Err(invalid("bad chunk end"));
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailer { line } => match byte {
                    b'\r' => {}
                    b'\n' if line == 0 => {
                        self.state = ChunkState::Done;
                        return Ok((i + 1, true));
                    }
                    b'\n' => self.state = ChunkState::Trailer { line: 0 },
                    _ => self.state = ChunkState::Trailer { line: line + 1 },
                },
                ChunkState::Done => return Ok((i, true)),
            }
            i += 1;
        }
        Ok((input.len(), self.state == ChunkState::Done))
    }
}

/// An `InvalidData` error.
pub fn invalid(err: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

/// Distinct prompt suffixes in case (a), as in `../shared/bench/completions.lua`.
pub const VARIANTS: usize = 64;
/// Length of the prompt prefix every request of case (a) shares.
const PREFIX_LEN: usize = 1500;
/// Length of each distinct suffix.
const SUFFIX_LEN: usize = 500;

/// `seed w0 seed w1 ...` cut to `len` characters.
fn fill(seed: &str, len: usize) -> String {
    let mut out = String::with_capacity(len + seed.len() + 16);
    let mut i = 0;
    while out.len() < len {
        out.push_str(seed);
        out.push_str(&format!(" w{i} "));
        i += 1;
    }
    out.truncate(len);
    out
}

/// The shared prompt prefix.
fn prefix() -> String {
    fill(
        "SYSTEM: you are a careful assistant; answer briefly and cite the shared policy text.",
        PREFIX_LEN,
    )
}

/// A full request: `POST /v1/completions` with `body`.
fn post(host: &str, body: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Accept: */*\r\n{connection}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The [`VARIANTS`] requests of case (a): a ~2 KB completion request each,
/// a 1,500-character prefix shared by all plus one of 64 suffixes.
pub fn small_requests(host: &str, close: bool) -> Vec<Vec<u8>> {
    let prefix = prefix();
    (1..=VARIANTS)
        .map(|v| {
            let suffix = fill(
                &format!("USER variant {v:02} asks about topic {:02}", (v * 37) % 101),
                SUFFIX_LEN,
            );
            let body = format!(r#"{{"model":"m","prompt":"{prefix}{suffix}","max_tokens":16}}"#);
            post(host, &body, close)
        })
        .collect()
}

/// A streaming request of case (b): `chunks` SSE events, one every
/// `interval_us` microseconds.
pub fn stream_request(host: &str, stream: usize, chunks: u64, interval_us: u64) -> Vec<u8> {
    let body = format!(
        r#"{{"model":"m","prompt":"{} stream {stream}","max_tokens":{chunks},"stream":true,"bench_interval_us":{interval_us}}}"#,
        prefix()
    );
    post(host, &body, true)
}

/// The request of case (c): a response body of `bytes` bytes.
pub fn bulk_request(host: &str, bytes: u64) -> Vec<u8> {
    let body =
        format!(r#"{{"model":"m","prompt":"bulk download","max_tokens":1,"bench_bytes":{bytes}}}"#);
    post(host, &body, true)
}

/// The unsigned integer after `"key":` in a JSON body, if any.
pub fn json_u64(body: &[u8], key: &str) -> Option<u64> {
    let needle = format!("\"{key}\":");
    let at = memchr::memmem::find(body, needle.as_bytes())? + needle.len();
    body[at..]
        .iter()
        .skip_while(|b| b.is_ascii_whitespace())
        .take_while(|b| b.is_ascii_digit())
        .fold(None, |acc: Option<u64>, &b| {
            Some(acc.unwrap_or(0).saturating_mul(10) + u64::from(b - b'0'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_split_input() {
        let body = b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut d = Dechunker::default();
            let mut out = Vec::new();
            let (used1, done1) = d
                .feed(&body[..split], |b| out.extend_from_slice(b))
                .expect("valid");
            if done1 {
                assert_eq!(&body[used1..], b"NEXT");
                assert_eq!(out, b"hello world");
                continue;
            }
            assert_eq!(used1, split);
            let (used2, done2) = d
                .feed(&body[split..], |b| out.extend_from_slice(b))
                .expect("valid");
            assert!(done2);
            assert_eq!(&body[split + used2..], b"NEXT");
            assert_eq!(out, b"hello world");
        }
    }

    #[test]
    fn small_requests_are_about_2kb() {
        let reqs = small_requests("h", false);
        assert_eq!(reqs.len(), VARIANTS);
        let len = reqs[0].len();
        assert!((2000..2300).contains(&len), "{len}");
        let head = parse_request(&reqs[0]).expect("valid").expect("complete");
        assert_eq!(head.len + head.body_len, len);
        assert!(!head.close);
    }

    #[test]
    fn finds_numbers_in_json() {
        let body = br#"{"max_tokens":500,"stream":true,"bench_interval_us": 20000}"#;
        assert_eq!(json_u64(body, "max_tokens"), Some(500));
        assert_eq!(json_u64(body, "bench_interval_us"), Some(20000));
        assert_eq!(json_u64(body, "bench_bytes"), None);
    }

    #[test]
    fn parses_response_framing() {
        let head = parse_response(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .expect("valid")
            .expect("complete");
        assert_eq!(head.framing, Framing::Chunked);
        assert!(!head.close);
        let head =
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n")
                .expect("valid")
                .expect("complete");
        assert_eq!(head.framing, Framing::Length(3));
        assert!(head.close);
    }
}
