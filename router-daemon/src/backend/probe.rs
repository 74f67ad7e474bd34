//! Asking a backend what it serves and how loaded it is: a one-shot
//! HTTP/1.1 GET client, and parsers for vLLM's `/v1/models` (OpenAI list
//! JSON) and `/metrics` (Prometheus text).
//!
//! This is off the request path: it runs from the discovery poller a few
//! times a second at most, so it favours simplicity (a fresh connection per
//! GET, `connection: close`, serde_json) over speed. Every read is bounded:
//! connect and whole-exchange timeouts, at most [`MAX_RESPONSE_BYTES`] of
//! response; heads and their framing are read by [`crate::http::response`], as on
//! the request path.
use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::http::{
    ChunkLimits, ChunkedDecoder,
    response::{self, BodyFraming},
};

/// Largest response (head and body) a probe reads; vLLM's `/metrics` is
/// tens of kilobytes, its `/v1/models` far less.
pub const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// The vLLM gauge counting requests queued for the engine.
pub const WAITING_METRIC: &str = "vllm:num_requests_waiting";

/// The vLLM gauge counting requests the engine is running.
pub const RUNNING_METRIC: &str = "vllm:num_requests_running";

/// Why a probe got no usable answer from a backend.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The TCP connection could not be made.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connect or the whole exchange took too long.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Reading or writing the connection failed.
    #[error("i/o: {0}")]
    Io(std::io::Error),
    /// The connection closed before the response was complete.
    #[error("connection closed mid-response")]
    Truncated,
    /// The response is not valid HTTP/1.1.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The response is larger than [`MAX_RESPONSE_BYTES`].
    #[error("response over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// Why a `/v1/models` body could not be read as a model list.
#[derive(Debug, thiserror::Error)]
pub enum ModelsParseError {
    /// The body is not JSON.
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The JSON is not `{"data": [{"id": …}, …]}`.
    #[error("not an OpenAI model list: {0}")]
    Shape(&'static str),
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

/// Where and how to send probe requests.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: &'a str,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Bound on the whole exchange, connect included.
    pub timeout: Duration,
}

/// Sends `GET path` to `target` on a new connection and reads the whole
/// response.
pub async fn get(target: Target<'_>, path: &str) -> Result<Response, ProbeError> {
    tokio::time::timeout(target.timeout, exchange(target, path))
        .await
        .unwrap_or(Err(ProbeError::Timeout(target.timeout)))
}

async fn exchange(target: Target<'_>, path: &str) -> Result<Response, ProbeError> {
    let mut stream = tokio::time::timeout(target.connect_timeout, TcpStream::connect(target.addr))
        .await
        .map_err(|_| ProbeError::Timeout(target.connect_timeout))?
        .map_err(ProbeError::Connect)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {}\r\nuser-agent: prefix-router\r\n\
         accept: */*\r\nconnection: close\r\n\r\n",
        target.host
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProbeError::Io)?;
    let mut buf = Vec::with_capacity(8 << 10);
    loop {
        let eof = read_more(&mut stream, &mut buf).await?;
        if let Some(response) = parse_response(&buf, eof)? {
            return Ok(response);
        }
        if eof {
            return Err(ProbeError::Truncated);
        }
    }
}

/// Reads what is available onto `buf`; true at end of stream.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<bool, ProbeError> {
    if buf.len() >= MAX_RESPONSE_BYTES {
        return Err(ProbeError::TooLarge);
    }
    let mut chunk = [0u8; 8 << 10];
    let room = chunk.len().min(MAX_RESPONSE_BYTES - buf.len());
    let n = stream
        .read(&mut chunk[..room])
        .await
        .map_err(ProbeError::Io)?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n == 0)
}

/// Parses `buf` (everything received so far) as a response to a GET.
/// `Ok(None)` while more bytes are needed; `eof` says none will come, which
/// ends a body that has neither Content-Length nor chunked framing.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>, ProbeError> {
    let mut at = 0;
    loop {
        let head = match response::parse_head(&buf[at..], false) {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(None),
            Err(err) => return Err(ProbeError::Malformed(err.to_string())),
        };
        // An interim response (100 Continue and friends) precedes the real one.
        if head.interim {
            at += head.len;
            continue;
        }
        let body = &buf[at + head.len..];
        let body = match head.body {
            BodyFraming::Empty => Some(Vec::new()),
            BodyFraming::Chunked => {
                let mut decoder = ChunkedDecoder::new(ChunkLimits::total(MAX_RESPONSE_BYTES));
                match decoder.decode(body) {
                    Ok(Some(_)) => Some(decoder.into_body()),
                    Ok(None) => None,
                    Err(err) => return Err(ProbeError::Malformed(err.to_string())),
                }
            }
            BodyFraming::Length(len) => match usize::try_from(len) {
                Ok(len) if len <= MAX_RESPONSE_BYTES => body.get(..len).map(<[u8]>::to_vec),
                _ => return Err(ProbeError::TooLarge),
            },
            BodyFraming::UntilClose => eof.then(|| body.to_vec()),
        };
        return Ok(body.map(|body| Response {
            status: head.status,
            body,
        }));
    }
}

/// The model ids in an OpenAI `/v1/models` body, sorted and deduplicated.
pub fn parse_models(body: &[u8]) -> Result<Vec<String>, ModelsParseError> {
    let json: serde_json::Value = serde_json::from_slice(body)?;
    let data = json
        .get("data")
        .and_then(serde_json::Value::as_array)
        .ok_or(ModelsParseError::Shape("no `data` array"))?;
    let mut models = data
        .iter()
        .map(|card| {
            card.get("id")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .ok_or(ModelsParseError::Shape("a model without a string `id`"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    models.sort_unstable();
    models.dedup();
    Ok(models)
}

/// A backend's queue, as its `/metrics` reports it; `None` where the metric
/// is absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Sum of [`WAITING_METRIC`] over its label sets.
    pub waiting: Option<u64>,
    /// Sum of [`RUNNING_METRIC`] over its label sets.
    pub running: Option<u64>,
}

/// Reads the waiting and running gauges out of Prometheus text, summing
/// each over its label sets (one per engine or model). Comments, other
/// metrics and lines that do not parse are skipped.
pub fn parse_load(text: &str) -> Load {
    let mut waiting = None;
    let mut running = None;
    for (name, value) in text.lines().filter_map(sample) {
        let slot = match name {
            WAITING_METRIC => &mut waiting,
            RUNNING_METRIC => &mut running,
            _ => continue,
        };
        *slot = Some(slot.unwrap_or(0.0) + value);
    }
    Load {
        waiting: waiting.map(to_count),
        running: running.map(to_count),
    }
}

/// A gauge sum as a count: rounded, negative as 0, saturating.
fn to_count(value: f64) -> u64 {
    // `as` saturates for floats; the value is finite and non-negative here.
    value.max(0.0).round() as u64
}

/// The metric name and value of one exposition line, if it is a sample with
/// a finite value.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    if rest.starts_with('{') {
        rest = &rest[labels_len(rest)?..];
    }
    let value: f64 = rest.split_ascii_whitespace().next()?.parse().ok()?;
    value.is_finite().then_some((name, value))
}

/// The length of the `{…}` label block at the start of `text`, honouring
/// quoted values with escapes (which may contain `}`).
fn labels_len(text: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (at, byte) in text.bytes().enumerate() {
        match byte {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'}' if !quoted => return Some(at + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// The shape of vLLM's (and vllm-sim's) exposition.
    const VLLM_METRICS: &str = "\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 3.0
vllm:num_requests_running{engine=\"1\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 7.0
vllm:num_requests_waiting_by_reason{engine=\"0\",reason=\"capacity\"} 100.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"meta-llama/Llama-3.2-1B-Instruct\"} 0.25
";

    #[test]
    fn load_sums_label_sets_and_ignores_other_metrics() {
        assert_eq!(
            parse_load(VLLM_METRICS),
            Load {
                waiting: Some(7),
                running: Some(5)
            }
        );
    }

    #[test]
    fn load_tolerates_missing_metrics_and_garbage() {
        assert_eq!(parse_load(""), Load::default());
        assert_eq!(parse_load("# only a comment\n\n"), Load::default());
        let text = "vllm:num_requests_waiting{model_name=\"a} b\\\" c\"} 4 1700000000000\n\
                    vllm:num_requests_waiting 1e0\n\
                    vllm:num_requests_running{unterminated=\"x} 9\n\
                    vllm:num_requests_running NaN\n\
                    vllm:num_requests_running +Inf\n\
                    vllm:num_requests_running not-a-number\n\
                    vllm:num_requests_running\n\
                    {} 3\n\
                    \u{0}\u{ff}garbage {{{{ }}}}\n";
        assert_eq!(
            parse_load(text),
            Load {
                waiting: Some(5),
                running: None
            }
        );
    }

    #[test]
    fn load_clamps_negative_and_huge_values() {
        let text = "vllm:num_requests_waiting -3\nvllm:num_requests_running 1e300\n";
        assert_eq!(
            parse_load(text),
            Load {
                waiting: Some(0),
                running: Some(u64::MAX)
            }
        );
    }

    #[test]
    fn models_from_an_openai_list() {
        let body = br#"{"object":"list","data":[
            {"id":"meta-llama/Llama-3.1-8B-Instruct","object":"model","owned_by":"vllm","root":"x","parent":null},
            {"id":"a-lora","object":"model","parent":"meta-llama/Llama-3.1-8B-Instruct"},
            {"id":"a-lora"}]}"#;
        assert_eq!(
            parse_models(body).unwrap(),
            ["a-lora", "meta-llama/Llama-3.1-8B-Instruct"]
        );
        assert_eq!(
            parse_models(br#"{"object":"list","data":[]}"#).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn garbage_models_bodies_are_errors() {
        for body in [
            &b""[..],
            b"not json",
            b"\xff\xfe",
            b"[]",
            b"{}",
            b"{\"data\":{}}",
            b"{\"data\":[{\"id\":3}]}",
            b"{\"data\":[{\"name\":\"m\"}]}",
            b"{\"data\":[\"m\"]}",
            b"{\"data\":[{\"id\":\"m\"}",
        ] {
            assert!(
                parse_models(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn response_with_content_length_at_every_split() {
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello";
        for split in 0..raw.len() {
            assert!(
                parse_response(&raw[..split], false).unwrap().is_none(),
                "{split}"
            );
        }
        let response = parse_response(raw, false).unwrap().unwrap();
        assert_eq!((response.status, &response.body[..]), (200, &b"hello"[..]));
    }

    #[test]
    fn chunked_response_at_every_split() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\n\r\n";
        for split in 0..raw.len() {
            assert!(
                parse_response(&raw[..split], false).unwrap().is_none(),
                "{split}"
            );
        }
        let response = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(response.body, b"hello");
    }

    #[test]
    fn unframed_body_ends_at_close_and_interim_responses_are_skipped() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n\r\nloading";
        assert!(parse_response(raw, false).unwrap().is_none());
        let response = parse_response(raw, true).unwrap().unwrap();
        assert_eq!(
            (response.status, &response.body[..]),
            (503, &b"loading"[..])
        );
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
        assert!(parse_response(raw, false).unwrap().unwrap().body.is_empty());
    }

    #[test]
    fn malformed_responses_are_errors() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            assert!(
                matches!(parse_response(raw, true), Err(ProbeError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let huge = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_RESPONSE_BYTES + 1
        );
        assert!(matches!(
            parse_response(huge.as_bytes(), false),
            Err(ProbeError::TooLarge)
        ));
    }
}
