//! One-shot GETs to a backend, for discovery's probes (`/v1/models`,
//! `/metrics`): hyper's HTTP/1.1 client on a fresh connection per GET, with
//! `connection: close`.
//!
//! This is off the request path: it runs from the discovery poller a few
//! times a second at most, so it favours simplicity over speed. Every read
//! is bounded: connect and whole-exchange timeouts, at most
//! [`MAX_RESPONSE_BYTES`] of body.
use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::{
    Request,
    body::Bytes,
    header::{ACCEPT, CONNECTION, HOST, USER_AGENT},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body a probe reads; vLLM's `/metrics` is tens of
/// kilobytes, its `/v1/models` far less.
pub(crate) const MAX_RESPONSE_BYTES: usize = 4 << 20;

/// Why a probe got no usable answer from a backend.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProbeError {
    /// The TCP connection could not be made.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connect or the whole exchange took too long.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The exchange failed: a reset, a close mid-response, bytes that are
    /// not HTTP/1.1.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (a path or host that is not valid in
    /// a request head).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The body is larger than [`MAX_RESPONSE_BYTES`].
    #[error("response body over {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
    /// Reading the body failed otherwise.
    #[error("reading the body: {0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// A complete HTTP response.
#[derive(Debug)]
pub(crate) struct Response {
    /// The status code.
    pub(crate) status: u16,
    /// The body, de-chunked.
    pub(crate) body: Vec<u8>,
}

/// Where and how to send probe requests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    /// The address to connect to.
    pub(crate) addr: SocketAddr,
    /// The `Host` header value.
    pub(crate) host: &'a str,
    /// Bound on the TCP connect.
    pub(crate) connect_timeout: Duration,
    /// Bound on the whole exchange, connect included.
    pub(crate) timeout: Duration,
}

/// Sends `GET path` to `target` on a new connection and reads the whole
/// response.
pub(crate) async fn get(target: Target<'_>, path: &str) -> Result<Response, ProbeError> {
    tokio::time::timeout(target.timeout, exchange(target, path))
        .await
        .unwrap_or(Err(ProbeError::Timeout(target.timeout)))
}

async fn exchange(target: Target<'_>, path: &str) -> Result<Response, ProbeError> {
    let stream = tokio::time::timeout(target.connect_timeout, TcpStream::connect(target.addr))
        .await
        .map_err(|_| ProbeError::Timeout(target.connect_timeout))?
        .map_err(ProbeError::Connect)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await?;
    // The connection's own task moves the bytes; it ends with the exchange,
    // and is stopped if the exchange is given up (a timeout).
    let _connection = AbortOnDrop(tokio::spawn(connection));
    let request = Request::get(path)
        .header(HOST, target.host)
        .header(USER_AGENT, "prefix-router")
        .header(ACCEPT, "*/*")
        .header(CONNECTION, "close")
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|err| match err.downcast::<hyper::Error>() {
            Ok(err) => ProbeError::Http(*err),
            Err(err) if err.is::<LengthLimitError>() => ProbeError::TooLarge,
            Err(err) => ProbeError::Body(err),
        })?
        .to_bytes()
        .to_vec();
    Ok(Response { status, body })
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Serves one connection: reads the request head, checks it is the
    /// probe's GET, then writes `raw` in pieces of `piece` bytes and
    /// closes (or, with `hold`, keeps the connection open, silent).
    async fn serve_raw(raw: Vec<u8>, piece: usize, hold: bool) -> SocketAddr {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed inside the request");
                head.extend_from_slice(&buf[..n]);
            }
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(head.starts_with("get /probe http/1.1\r\n"), "{head}");
            assert!(head.contains("host: vllm.test:8000\r\n"), "{head}");
            for chunk in raw.chunks(piece.max(1)) {
                stream.write_all(chunk).await.expect("write");
                tokio::task::yield_now().await;
            }
            if hold {
                std::future::pending::<()>().await;
            }
        });
        addr
    }

    async fn probe(raw: &[u8], piece: usize) -> Result<Response, ProbeError> {
        probe_within(raw, piece, false, Duration::from_secs(10)).await
    }

    async fn probe_within(
        raw: &[u8],
        piece: usize,
        hold: bool,
        timeout: Duration,
    ) -> Result<Response, ProbeError> {
        let addr = serve_raw(raw.to_vec(), piece, hold).await;
        let target = Target {
            addr,
            host: "vllm.test:8000",
            connect_timeout: timeout,
            timeout,
        };
        get(target, "/probe").await
    }

    #[tokio::test]
    async fn responses_are_read_whole_whatever_their_framing_and_pieces() {
        let cases: [(&[u8], u16, &[u8]); 4] = [
            (
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\nhello",
                200,
                b"hello",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\n\r\n",
                200,
                b"hello",
            ),
            // Interim responses are skipped; a body without framing ends
            // at the close.
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\n\r\nloading",
                503,
                b"loading",
            ),
            (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b""),
        ];
        for (raw, status, body) in cases {
            for piece in [1, 7, raw.len()] {
                let response = probe(raw, piece)
                    .await
                    .unwrap_or_else(|err| panic!("{err}: {:?}", String::from_utf8_lossy(raw)));
                assert_eq!(
                    (response.status, &response.body[..]),
                    (status, body),
                    "pieces of {piece}"
                );
            }
        }
    }

    #[tokio::test]
    async fn malformed_truncated_and_huge_responses_are_errors() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            b"",
        ] {
            let result = probe(raw, raw.len()).await;
            assert!(
                matches!(result, Err(ProbeError::Http(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let mut huge = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_RESPONSE_BYTES + 1
        )
        .into_bytes();
        huge.resize(huge.len() + MAX_RESPONSE_BYTES + 1, b'x');
        assert!(matches!(
            probe(&huge, 64 << 10).await,
            Err(ProbeError::TooLarge)
        ));
    }

    #[tokio::test]
    async fn a_silent_backend_times_out_and_a_closed_port_fails_to_connect() {
        let silent = probe_within(b"", 1, true, Duration::from_millis(200)).await;
        assert!(matches!(silent, Err(ProbeError::Timeout(_))), "{silent:?}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let target = Target {
            addr,
            host: "vllm.test:8000",
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        };
        let refused = get(target, "/probe").await;
        assert!(
            matches!(refused, Err(ProbeError::Connect(_))),
            "{refused:?}"
        );
    }
}
