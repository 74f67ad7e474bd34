//! Shared harness for the end-to-end tests.
//!
//! [`Fleet`] starts `vllm-sim` instances and a `router-daemon` in-process on
//! `127.0.0.1:0`; [`request`] is a small raw HTTP/1.1 client that returns
//! exactly the bytes received, so tests can assert on them.
//!
//! Privilege: [`sockmap_or_skip`] returns the sockmap dataplane, or `None`
//! with a message when it cannot load here. Under `CI=true` or
//! `ROUTER_REQUIRE_SOCKMAP=1` it panics instead: CI runs as root, so a
//! sockmap that does not load there is a failure, not a skip.
use std::{future::Future, net::SocketAddr, time::Duration};

use router_daemon::{Config, Dataplane, dataplane::Mode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

/// Bound on any one exchange in tests, so a hang fails instead of stalling CI.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The dataplane for `mode`, or `None` (with a message) when sockmap cannot
/// load here and the environment allows skipping.
pub fn dataplane_or_skip(mode: Mode) -> Option<Dataplane> {
    match mode {
        Mode::Sockmap => required_or_skip(Dataplane::sockmap()),
        Mode::SockmapSend => required_or_skip(Dataplane::sockmap_send(
            &router_daemon::dataplane::default_cgroup(),
        )),
        Mode::Splice => Some(Dataplane::splice()),
        Mode::Userspace => Some(Dataplane::userspace()),
    }
}

/// The sockmap dataplane, or `None` with a message when skipping is allowed.
///
/// # Panics
/// When the dataplane does not load and `CI=true` or
/// `ROUTER_REQUIRE_SOCKMAP=1` is set.
pub fn sockmap_or_skip() -> Option<Dataplane> {
    required_or_skip(Dataplane::sockmap())
}

/// A kernel dataplane that loaded, or `None` with a message when it did not
/// and skipping is allowed (see [`sockmap_or_skip`]).
fn required_or_skip(
    loaded: Result<Dataplane, router_daemon::dataplane::SockmapError>,
) -> Option<Dataplane> {
    match loaded {
        Ok(dataplane) => Some(dataplane),
        Err(err) => {
            let required = std::env::var("CI").is_ok_and(|v| v == "true")
                || std::env::var("ROUTER_REQUIRE_SOCKMAP").is_ok_and(|v| v == "1");
            assert!(!required, "the sockmap dataplane must load here: {err}");
            eprintln!("SKIPPED: sockmap dataplane unavailable ({err}); run as root to include it");
            None
        }
    }
}

/// A listener on an ephemeral loopback port, with the daemon's large accept
/// backlog, so bursts of test clients are queued rather than refused.
pub fn loopback_listener() -> TcpListener {
    router_daemon::listener(([127, 0, 0, 1], 0).into()).expect("bind a loopback listener")
}

/// A loopback address nothing listens on now (for a process the test
/// starts, which binds it itself).
pub fn free_loopback_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("an ephemeral loopback port")
}

/// Signals a background server to stop when dropped.
#[derive(Debug)]
pub struct Stopper(Option<oneshot::Sender<()>>);

impl Drop for Stopper {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// A [`Stopper`] and the future that completes when it is dropped, for a
/// server started in the background.
pub fn stopper() -> (Stopper, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = oneshot::channel();
    (Stopper(Some(tx)), async move {
        let _ = rx.await;
    })
}

/// Starts a `vllm-sim` on an ephemeral port with test timing.
pub async fn start_sim(config: vllm_sim::Config) -> (SocketAddr, Stopper) {
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("sim addr");
    let (stop, shutdown) = stopper();
    tokio::spawn(async move {
        if let Err(err) = vllm_sim::serve(listener, config, shutdown).await {
            panic!("vllm-sim failed: {err}");
        }
    });
    (addr, stop)
}

/// Starts `n` sims (`sim-0`, `sim-1`, …) with test timing; returns their
/// URLs and stoppers.
pub async fn start_sims(n: usize) -> (Vec<String>, Vec<Stopper>) {
    let mut urls = Vec::new();
    let mut stops = Vec::new();
    for i in 0..n {
        let (addr, stop) = start_sim(vllm_sim::Config::for_tests(&format!("sim-{i}"))).await;
        urls.push(format!("http://{addr}"));
        stops.push(stop);
    }
    (urls, stops)
}

/// Starts a router in front of `backends` with `dataplane`.
pub async fn start_router(backends: Vec<String>, dataplane: Dataplane) -> (SocketAddr, Stopper) {
    start_router_with(backends, dataplane, |_| {}).await
}

/// Starts a router with its configuration adjusted by `configure`.
pub async fn start_router_with(
    backends: Vec<String>,
    dataplane: Dataplane,
    configure: impl FnOnce(&mut Config),
) -> (SocketAddr, Stopper) {
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("router addr");
    let mut config = Config::with_backends(addr, backends);
    configure(&mut config);
    let (stop, shutdown) = stopper();
    tokio::spawn(async move {
        if let Err(err) = router_daemon::run(listener, config, dataplane, shutdown).await {
            panic!("router failed: {err}");
        }
    });
    (addr, stop)
}

/// A backend that answers every request with `response`, written in pieces
/// of `piece` bytes with a pause between some of them, and keeps the
/// connection open for the next request (as vLLM does). The bytes are fixed
/// so the client's copy can be compared exactly.
pub async fn scripted_backend(response: Vec<u8>, piece: usize) -> String {
    scripted(response, piece, false).await
}

/// A backend that answers one request per connection with `response` and
/// then closes it, without saying so in the response (as a server whose
/// keep-alive timeout is very short would).
pub async fn scripted_backend_once(response: Vec<u8>) -> String {
    let piece = response.len().max(1);
    scripted(response, piece, true).await
}

async fn scripted(response: Vec<u8>, piece: usize, once: bool) -> String {
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(serve_scripted(stream, response, piece, once));
        }
    });
    format!("http://{addr}")
}

/// Reads one whole request off `stream` as a backend does, head and
/// `Content-Length` body, keeping bytes past it in `pending` for the next;
/// false when the peer closed (or failed) first.
pub async fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(head_end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..head_end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|len| len.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let end = head_end + 4 + body_len;
            if pending.len() >= end {
                pending.drain(..end);
                return true;
            }
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
    }
}

async fn serve_scripted(mut stream: TcpStream, response: Vec<u8>, piece: usize, once: bool) {
    let mut request = Vec::new();
    loop {
        // The whole request, as a real server reads it: closing with unread
        // bytes would reset the connection.
        if !read_request(&mut stream, &mut request).await {
            return;
        }
        for (i, chunk) in response.chunks(piece).enumerate() {
            if stream.write_all(chunk).await.is_err() {
                return;
            }
            if i % 16 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if once {
            return;
        }
    }
}

/// A router in front of simulated vLLM instances `sim-0`, `sim-1`, …
#[derive(Debug)]
pub struct Fleet {
    /// The router's address.
    pub router: SocketAddr,
    /// Each sim's address, by index.
    pub sims: Vec<SocketAddr>,
    _stops: Vec<Stopper>,
}

impl Fleet {
    /// Starts `n` sims (configured by `sim`, given each id) and a router.
    pub async fn start(
        n: usize,
        dataplane: Dataplane,
        sim: impl Fn(&str) -> vllm_sim::Config,
    ) -> Self {
        let mut sims = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n {
            let (addr, stop) = start_sim(sim(&format!("sim-{i}"))).await;
            sims.push(addr);
            stops.push(stop);
        }
        let urls = sims.iter().map(|addr| format!("http://{addr}")).collect();
        let (router, stop) = start_router(urls, dataplane).await;
        stops.push(stop);
        Self {
            router,
            sims,
            _stops: stops,
        }
    }

    /// Starts `n` sims with [`vllm_sim::Config::for_tests`] timing.
    pub async fn with_test_sims(n: usize, dataplane: Dataplane) -> Self {
        Self::start(n, dataplane, vllm_sim::Config::for_tests).await
    }
}

/// An HTTP response as received.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked when the response was chunked.
    pub body: Vec<u8>,
    /// Every byte received, head included, exactly as it arrived.
    pub raw: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The body parsed as JSON.
    ///
    /// # Panics
    /// When the body is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `raw` bytes to `addr` on a new connection and reads one response.
///
/// # Panics
/// On I/O errors, a malformed response, or after [`EXCHANGE_TIMEOUT`].
pub async fn exchange_raw(addr: SocketAddr, raw: impl AsRef<[u8]>) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_ref()).await.expect("send request");
    read_response(&mut stream).await
}

/// Reads one response from `stream`: up to the end of its body by its
/// framing (`Content-Length` or chunked), else until the server closes.
///
/// # Panics
/// On I/O errors, a malformed response, or after [`EXCHANGE_TIMEOUT`].
pub async fn read_response(stream: &mut TcpStream) -> Response {
    let mut received = Vec::new();
    let read = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(len) = response_len(&received) {
                assert_eq!(len, received.len(), "bytes past the end of the response");
                return Ok(());
            }
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(err) => return Err(err),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => parse_response(received),
        Ok(Err(err)) => panic!("reading the response: {err}; got {} bytes", received.len()),
        Err(_) => panic!(
            "no end of response after {EXCHANGE_TIMEOUT:?}; got {} bytes: {:?}",
            received.len(),
            String::from_utf8_lossy(&received[..received.len().min(300)])
        ),
    }
}

/// The length of the complete response at the start of `raw`, when its
/// framing says where it ends and all of it is there.
pub fn response_len(raw: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let code = response.code.unwrap_or(0);
    if (100..200).contains(&code) {
        return response_len(&raw[head_len..]).map(|len| head_len + len);
    }
    if code == 204 || code == 304 {
        return Some(head_len);
    }
    let mut length = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return chunked_len(&raw[head_len..]).map(|len| head_len + len);
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok());
        }
    }
    let length = length?;
    (raw.len() >= head_len + length).then_some(head_len + length)
}

/// The length of a complete chunked body (no trailers) at the start of
/// `rest`, if it is all there.
fn chunked_len(rest: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + rest[at..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[at..line_end]).ok()?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        at = line_end + 2 + size + 2;
        if rest.len() < at {
            return None;
        }
        if size == 0 {
            return Some(at);
        }
    }
}

/// Sends one request with a body and `Connection: close`.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Response {
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    exchange_raw(addr, raw).await
}

/// `POST`s a JSON value.
pub async fn post_json(addr: SocketAddr, path: &str, json: &serde_json::Value) -> Response {
    request(addr, "POST", path, json.to_string().as_bytes()).await
}

/// `GET`s a path.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, b"").await
}

/// Parses a complete response (the connection was closed after it).
///
/// # Panics
/// When the bytes are not one well-formed HTTP/1.1 response.
pub fn parse_response(raw: Vec<u8>) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(&raw) {
        Ok(httparse::Status::Complete(len)) => len,
        other => panic!(
            "incomplete or bad response ({other:?}): {:?}",
            String::from_utf8_lossy(&raw)
        ),
    };
    let status = response.code.expect("status code");
    let headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let rest = &raw[head_len..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else if let Some((_, len)) = headers.iter().find(|(k, _)| k == "content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        assert_eq!(rest.len(), len, "body length differs from content-length");
        rest.to_vec()
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
        raw,
    }
}

/// Decodes a complete chunked body.
///
/// # Panics
/// When the framing is broken or the terminating chunk is missing.
pub fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&rest[..line_end]).expect("ascii chunk size");
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).expect("hex chunk size");
        rest = &rest[line_end + 2..];
        if size == 0 {
            assert!(rest.starts_with(b"\r\n"), "missing final CRLF");
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        assert_eq!(&rest[size..size + 2], b"\r\n", "chunk not followed by CRLF");
        rest = &rest[size + 2..];
    }
}

/// The SSE `data:` payloads of a streamed body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// The value of a sample in a `/metrics` text. `sample` is a metric name,
/// optionally with labels (`name{a="1"}`); a line matches when it has that
/// name and at least those labels, e.g. `router_sockmap_redirected_bytes_total`
/// or `vllm:request_success_total{finished_reason="abort"}`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    let (want_name, want_labels) = split_sample(sample);
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (name, labels) = split_sample(series);
            let matches = name == want_name && want_labels.iter().all(|l| labels.contains(l));
            matches.then(|| value.parse().ok())?
        })
}

fn split_sample(sample: &str) -> (&str, Vec<&str>) {
    match sample.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (sample, Vec::new()),
    }
}

/// The dataplane modes the suite runs against.
pub const MODES: [Mode; 4] = [
    Mode::Sockmap,
    Mode::SockmapSend,
    Mode::Splice,
    Mode::Userspace,
];

/// Which metric counts the response bytes of `mode`, and that no other path
/// carried any: (the mode's own counter, the counters that must stay 0).
pub fn byte_counters(mode: Mode) -> (&'static str, Vec<&'static str>) {
    const REDIRECTED: &str = "router_sockmap_redirected_bytes_total";
    const PIPED: &str = "router_splice_piped_bytes_total";
    const COPIED: &str = "router_userspace_copied_bytes_total";
    match mode {
        Mode::Sockmap | Mode::SockmapSend => (REDIRECTED, vec![PIPED, COPIED]),
        Mode::Splice => (PIPED, vec![COPIED]),
        Mode::Userspace => (COPIED, vec![PIPED]),
    }
}

/// Checks the router's `/metrics` against `bytes`, the response bytes the
/// clients received: heads plus every body path add up to exactly that; the
/// paths of other modes carried nothing; and `mode`'s own path carried at
/// least `share` of the body bytes (the daemon writes heads, and body bytes
/// that arrive together with a head, in every mode).
pub async fn assert_bytes_took_path(router: SocketAddr, mode: Mode, bytes: usize, share: f64) {
    const HEAD: &str = "router_response_head_bytes_total";
    const COPIED: &str = "router_userspace_copied_bytes_total";
    let (own, others) = byte_counters(mode);
    let total_of = |metrics: &str| {
        let value = |name: &str| metric(metrics, name).unwrap_or(0.0);
        value(HEAD)
            + value(own)
            + if others.contains(&COPIED) {
                value(COPIED)
            } else {
                0.0
            }
    };
    // A client can hold its last byte a moment before the router's task
    // counts it: wait (bounded) for the counters to settle.
    let mut metrics = get(router, "/metrics").await.text();
    for _ in 0..100 {
        if total_of(&metrics) >= bytes as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = get(router, "/metrics").await.text();
    }
    let value = |name: &str| metric(&metrics, name).unwrap_or(0.0);
    for other in &others {
        if *other != COPIED {
            assert_eq!(value(other), 0.0, "{other}\n{metrics}");
        }
    }
    assert_eq!(total_of(&metrics), bytes as f64, "bytes by path\n{metrics}");
    let body = bytes as f64 - value(HEAD);
    assert!(
        value(own) >= share * body,
        "{own} carried {} of {body} body bytes, less than {share}\n{metrics}",
        value(own)
    );
}

/// Declares one `#[tokio::test]` per dataplane mode for each named scenario
/// `async fn scenario(mode: Mode)` in scope: `scenario::sockmap`,
/// `scenario::sockmap_send`, `scenario::splice` and `scenario::userspace`.
#[macro_export]
macro_rules! each_mode {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sockmap() {
                    super::$scenario(router_daemon::dataplane::Mode::Sockmap).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sockmap_send() {
                    super::$scenario(router_daemon::dataplane::Mode::SockmapSend).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn splice() {
                    super::$scenario(router_daemon::dataplane::Mode::Splice).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn userspace() {
                    super::$scenario(router_daemon::dataplane::Mode::Userspace).await;
                }
            }
        )*
    };
}
