//! The load generators of the three cases. All are closed loops over raw
//! tokio sockets, every wait bounded by a timeout and every loop by a
//! deadline.
//!
//! - [`requests`] (case a): `C` workers, each sending requests one after
//!   another, over one kept-alive connection or a new connection per
//!   request (then it reads the response, and the server's close).
//! - [`streams`] (case b): `N` SSE streams, started evenly over a ramp; the
//!   latency of each event is its receive time minus the send time the
//!   backend wrote into it (both `CLOCK_MONOTONIC`).
//! - [`bulk`] (case c): one large response, timed from the request to its
//!   last byte.
use std::{
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    time::timeout,
};

use crate::{
    backend::EVENT_BYTES,
    http::{self, Dechunker, Framing},
    procfs::mono_ns,
};

/// Highest latency the histograms track, in microseconds (60 s).
const MAX_LATENCY_US: u64 = 60_000_000;
/// How long a new-connection client waits for the server's close after a
/// complete response.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// A connect that took this long had its SYN retransmitted (the first
/// retransmission is after 1 s): the server's accept queue overflowed.
const SLOW_CONNECT: Duration = Duration::from_millis(900);
/// Read buffer size of the request/response and stream clients.
const READ_BUF: usize = 16 * 1024;
/// Read buffer size of the bulk client.
const BULK_READ_BUF: usize = 256 * 1024;

/// A latency histogram in microseconds.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .expect("invariant: static bounds 1..60e6 with 3 significant figures are valid")
}

/// Records `us`, clamped into the histogram's range.
fn record(hist: &mut Histogram<u64>, us: u64) {
    hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

/// Failures, by kind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Errors {
    /// `connect` failed.
    pub connect: u64,
    /// Reading or writing failed, or the response was malformed or cut.
    pub io: u64,
    /// A status other than 2xx.
    pub status: u64,
    /// No complete response within the timeout.
    pub timeout: u64,
}

impl Errors {
    fn add(&mut self, other: Errors) {
        self.connect += other.connect;
        self.io += other.io;
        self.status += other.status;
        self.timeout += other.timeout;
    }

    /// `connect=1 io=2 ...`, listing the non-zero kinds.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [
            ("connect", self.connect),
            ("io", self.io),
            ("status", self.status),
            ("timeout", self.timeout),
        ]
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect();
        if parts.is_empty() {
            "0".into()
        } else {
            parts.join(" ")
        }
    }
}

/// A failed request, by kind.
#[derive(Debug)]
enum Failure {
    Connect(io::Error),
    Io(io::Error),
    Status(u16),
}

/// Case (a): what to run.
#[derive(Clone, Debug)]
pub struct RequestLoad {
    /// Where to send the requests.
    pub addr: SocketAddr,
    /// One kept-alive connection per worker, else a new one per request.
    pub keep_alive: bool,
    /// Concurrent workers (connections).
    pub connections: usize,
    /// Requests are sent from now until the end of the window; only those
    /// completing inside the window count.
    pub window_start: Instant,
    /// End of the measured window.
    pub window_end: Instant,
    /// Longest a single request may take.
    pub request_timeout: Duration,
}

/// Case (a): what happened inside the window.
#[derive(Debug)]
pub struct RequestResult {
    /// Complete 2xx responses.
    pub ok: u64,
    /// Failures.
    pub errors: Errors,
    /// Latency of the complete responses, µs: from the request's start
    /// (its `connect` for a new connection) to the response's last byte.
    pub latency: Histogram<u64>,
    /// Connects of the window's requests that took a SYN retransmission.
    pub slow_connects: u64,
}

/// Runs case (a)'s closed loop and returns the window's results.
pub async fn requests(load: RequestLoad) -> RequestResult {
    let host = load.addr.to_string();
    let variants: Arc<Vec<Vec<u8>>> = Arc::new(http::small_requests(&host, !load.keep_alive));
    let mut tasks = Vec::with_capacity(load.connections);
    for worker in 0..load.connections {
        let load = load.clone();
        let variants = variants.clone();
        tasks.push(tokio::spawn(request_worker(worker, load, variants)));
    }
    let mut result = RequestResult {
        ok: 0,
        errors: Errors::default(),
        latency: histogram(),
        slow_connects: 0,
    };
    for task in tasks {
        // A panicked worker loses its counts; the others still count.
        if let Ok(part) = task.await {
            result.ok += part.ok;
            result.slow_connects += part.slow_connects;
            result.errors.add(part.errors);
            // Same bounds on both sides: adding cannot fail.
            let _ = result.latency.add(&part.latency);
        }
    }
    result
}

async fn request_worker(
    worker: usize,
    load: RequestLoad,
    variants: Arc<Vec<Vec<u8>>>,
) -> RequestResult {
    let mut out = RequestResult {
        ok: 0,
        errors: Errors::default(),
        latency: histogram(),
        slow_connects: 0,
    };
    let mut conn: Option<TcpStream> = None;
    let mut buf = vec![0u8; READ_BUF];
    let mut next = (worker * 17) % variants.len();
    while Instant::now() < load.window_end {
        let request = &variants[next];
        next = (next + 1) % variants.len();
        let start = Instant::now();
        let mut connect_time = Duration::ZERO;
        let outcome = timeout(
            load.request_timeout,
            exchange(&mut conn, load.addr, request, &mut buf, &mut connect_time),
        )
        .await;
        let done = Instant::now();
        let counted = done >= load.window_start && done < load.window_end;
        if counted && connect_time >= SLOW_CONNECT {
            out.slow_connects += 1;
        }
        match outcome {
            Ok(Ok(must_close)) => {
                if counted {
                    out.ok += 1;
                    let us =
                        u64::try_from(done.duration_since(start).as_micros()).unwrap_or(u64::MAX);
                    record(&mut out.latency, us);
                }
                if (must_close || !load.keep_alive)
                    && let Some(mut stream) = conn.take()
                {
                    await_close(&mut stream, &mut buf).await;
                }
            }
            Ok(Err(failure)) => {
                conn = None;
                let connect_failed = matches!(failure, Failure::Connect(_));
                if counted {
                    match failure {
                        Failure::Connect(_) => out.errors.connect += 1,
                        Failure::Io(_) => out.errors.io += 1,
                        Failure::Status(_) => out.errors.status += 1,
                    }
                }
                if connect_failed {
                    // Do not spin on a refused or exhausted connect.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(_) => {
                conn = None;
                if counted {
                    out.errors.timeout += 1;
                }
            }
        }
    }
    out
}

/// Sends one request on `conn` (connecting first when there is none) and
/// reads its whole response; `connect_time` is how long the connect took.
/// Returns whether the server will close the
/// connection.
async fn exchange(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    request: &[u8],
    buf: &mut [u8],
    connect_time: &mut Duration,
) -> Result<bool, Failure> {
    if conn.is_none() {
        let started = Instant::now();
        let stream = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
        *connect_time = started.elapsed();
        stream.set_nodelay(true).map_err(Failure::Connect)?;
        *conn = Some(stream);
    }
    let stream = conn
        .as_mut()
        .expect("invariant: connected just above when there was no connection");
    stream.write_all(request).await.map_err(Failure::Io)?;
    let mut filled = 0;
    let head = loop {
        if let Some(head) = http::parse_response(&buf[..filled]).map_err(Failure::Io)? {
            break head;
        }
        if filled == buf.len() {
            return Err(Failure::Io(http::invalid("response head too large")));
        }
        let n = stream.read(&mut buf[filled..]).await.map_err(Failure::Io)?;
        if n == 0 {
            return Err(Failure::Io(eof("before the response head")));
        }
        filled += n;
    };
    if !(200..300).contains(&head.status) {
        return Err(Failure::Status(head.status));
    }
    let mut have = (filled - head.len) as u64;
    match head.framing {
        Framing::Length(len) => {
            while have < len {
                let n = stream.read(buf).await.map_err(Failure::Io)?;
                if n == 0 {
                    return Err(Failure::Io(eof("inside the response body")));
                }
                have += n as u64;
            }
            if have > len {
                return Err(Failure::Io(http::invalid("bytes after the response")));
            }
        }
        Framing::Chunked => {
            let mut dechunker = Dechunker::default();
            let (_, mut done) = dechunker
                .feed(&buf[head.len..filled], |_| {})
                .map_err(Failure::Io)?;
            while !done {
                let n = stream.read(buf).await.map_err(Failure::Io)?;
                if n == 0 {
                    return Err(Failure::Io(eof("inside a chunked body")));
                }
                done = dechunker.feed(&buf[..n], |_| {}).map_err(Failure::Io)?.1;
            }
        }
        Framing::UntilClose => loop {
            let n = stream.read(buf).await.map_err(Failure::Io)?;
            if n == 0 {
                break;
            }
        },
    }
    Ok(head.close)
}

/// Waits (at most [`CLOSE_WAIT`]) for the server to close a connection
/// whose response is complete, so that the server closes first, as it does
/// with `connection: close`.
async fn await_close(stream: &mut TcpStream, buf: &mut [u8]) {
    let drain = async {
        for _ in 0..64 {
            match stream.read(buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = timeout(CLOSE_WAIT, drain).await;
}

fn eof(place: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("connection closed {place}"),
    )
}

/// Case (b): what to run.
#[derive(Clone, Debug)]
pub struct StreamLoad {
    /// Where to open the streams.
    pub addr: SocketAddr,
    /// Concurrent streams.
    pub streams: usize,
    /// Events per stream.
    pub events: u64,
    /// Time between a stream's events.
    pub interval: Duration,
    /// Streams start evenly spread over this long.
    pub ramp: Duration,
    /// `CLOCK_MONOTONIC` ns: events received from here on count...
    pub window_start_ns: u64,
    /// ...until here.
    pub window_end_ns: u64,
    /// Longest a stream may take from its start to its end.
    pub stream_timeout: Duration,
}

/// Case (b): what happened.
#[derive(Debug)]
pub struct StreamResult {
    /// Events received inside the window.
    pub events_in_window: u64,
    /// Events received in all.
    pub events_total: u64,
    /// Streams that ended with `[DONE]` and every event.
    pub complete: u64,
    /// Streams that failed or were cut.
    pub errors: Errors,
    /// Latency of the window's events, µs: receive time − send time.
    pub latency: Histogram<u64>,
}

/// Runs case (b) and returns once every stream ended (or timed out).
pub async fn streams(load: StreamLoad) -> StreamResult {
    let host = load.addr.to_string();
    let mut tasks = Vec::with_capacity(load.streams);
    let spacing = load.ramp / u32::try_from(load.streams.max(1)).unwrap_or(u32::MAX);
    let start = Instant::now();
    for stream in 0..load.streams {
        let load = load.clone();
        let request = http::stream_request(
            &host,
            stream,
            load.events,
            u64::try_from(load.interval.as_micros()).unwrap_or(u64::MAX),
        );
        let at = start + spacing * u32::try_from(stream).unwrap_or(u32::MAX);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let mut out = StreamResult {
                events_in_window: 0,
                events_total: 0,
                complete: 0,
                errors: Errors::default(),
                latency: histogram(),
            };
            match timeout(load.stream_timeout, one_stream(&load, &request, &mut out)).await {
                Ok(Ok(())) => {
                    if out.events_total == load.events {
                        out.complete = 1;
                    } else {
                        out.errors.io += 1;
                    }
                }
                Ok(Err(Failure::Connect(_))) => out.errors.connect += 1,
                Ok(Err(Failure::Io(_))) => out.errors.io += 1,
                Ok(Err(Failure::Status(_))) => out.errors.status += 1,
                Err(_) => out.errors.timeout += 1,
            }
            out
        }));
    }
    let mut result = StreamResult {
        events_in_window: 0,
        events_total: 0,
        complete: 0,
        errors: Errors::default(),
        latency: histogram(),
    };
    for task in tasks {
        if let Ok(part) = task.await {
            result.events_in_window += part.events_in_window;
            result.events_total += part.events_total;
            result.complete += part.complete;
            result.errors.add(part.errors);
            let _ = result.latency.add(&part.latency);
        }
    }
    result
}

/// One SSE stream: request, head, then events until `[DONE]` and the end
/// of the chunked body; then the server's close.
async fn one_stream(
    load: &StreamLoad,
    request: &[u8],
    out: &mut StreamResult,
) -> Result<(), Failure> {
    let mut stream = TcpStream::connect(load.addr)
        .await
        .map_err(Failure::Connect)?;
    stream.set_nodelay(true).map_err(Failure::Connect)?;
    stream.write_all(request).await.map_err(Failure::Io)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    let head = loop {
        if let Some(head) = http::parse_response(&buf[..filled]).map_err(Failure::Io)? {
            break head;
        }
        if filled == buf.len() {
            return Err(Failure::Io(http::invalid("response head too large")));
        }
        let n = stream.read(&mut buf[filled..]).await.map_err(Failure::Io)?;
        if n == 0 {
            return Err(Failure::Io(eof("before the response head")));
        }
        filled += n;
    };
    if !(200..300).contains(&head.status) {
        return Err(Failure::Status(head.status));
    }
    if head.framing != Framing::Chunked {
        return Err(Failure::Io(http::invalid(
            "the SSE response is not chunked",
        )));
    }
    let mut dechunker = Dechunker::default();
    let mut events: Vec<u8> = Vec::with_capacity(4 * EVENT_BYTES);
    let mut pending = buf[head.len..filled].to_vec();
    let mut done;
    loop {
        let now = mono_ns();
        done = dechunker
            .feed(&pending, |data| events.extend_from_slice(data))
            .map_err(Failure::Io)?
            .1;
        take_events(&mut events, now, load, out);
        if done {
            break;
        }
        let n = stream.read(&mut buf).await.map_err(Failure::Io)?;
        if n == 0 {
            return Err(Failure::Io(eof("inside the event stream")));
        }
        pending.clear();
        pending.extend_from_slice(&buf[..n]);
    }
    await_close(&mut stream, &mut buf).await;
    Ok(())
}

/// Consumes the complete events in `events`, received at `now_ns`.
fn take_events(events: &mut Vec<u8>, now_ns: u64, load: &StreamLoad, out: &mut StreamResult) {
    let mut used = 0;
    while let Some(end) = memchr::memmem::find(&events[used..], b"\n\n") {
        let event = &events[used..used + end];
        used += end + 2;
        let Some(sent_ns) = http::json_u64(event, "t") else {
            continue; // `data: [DONE]`
        };
        out.events_total += 1;
        if now_ns >= load.window_start_ns && now_ns < load.window_end_ns {
            out.events_in_window += 1;
            record(&mut out.latency, now_ns.saturating_sub(sent_ns) / 1000);
        }
    }
    events.drain(..used);
}

/// Case (c): one response of `bytes` bytes.
#[derive(Debug)]
pub struct BulkResult {
    /// Body bytes received.
    pub bytes: u64,
    /// From before `connect` to the last byte.
    pub elapsed: Duration,
}

/// Fetches one bulk response of `bytes` bytes (new connection, closed by
/// the server) and times it.
pub async fn bulk(addr: SocketAddr, bytes: u64, limit: Duration) -> io::Result<BulkResult> {
    let request = http::bulk_request(&addr.to_string(), bytes);
    let start = Instant::now();
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&request).await?;
        let mut buf = vec![0u8; BULK_READ_BUF];
        let mut filled = 0;
        let head = loop {
            if let Some(head) = http::parse_response(&buf[..filled])? {
                break head;
            }
            if filled == buf.len() {
                return Err(http::invalid("response head too large"));
            }
            let n = stream.read(&mut buf[filled..]).await?;
            if n == 0 {
                return Err(eof("before the response head"));
            }
            filled += n;
        };
        if head.status != 200 {
            return Err(http::invalid(format!("status {}", head.status)));
        }
        let Framing::Length(len) = head.framing else {
            return Err(http::invalid("the bulk response has no content-length"));
        };
        let mut have = (filled - head.len) as u64;
        while have < len {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(eof(&format!("after {have} of {len} body bytes")));
            }
            have += n as u64;
        }
        let elapsed = start.elapsed();
        await_close(&mut stream, &mut buf).await;
        Ok(BulkResult {
            bytes: have,
            elapsed,
        })
    };
    timeout(limit, fetch)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "bulk response timed out"))?
}

/// Sends one small completion request on a new connection and returns the
/// response status (readiness check).
pub async fn probe(addr: SocketAddr) -> io::Result<u16> {
    let request = http::small_requests(&addr.to_string(), true)
        .into_iter()
        .next()
        .ok_or_else(|| http::invalid("no request variant"))?;
    let mut conn = None;
    let mut buf = vec![0u8; READ_BUF];
    let mut connect_time = Duration::ZERO;
    let outcome = timeout(
        Duration::from_secs(2),
        exchange(&mut conn, addr, &request, &mut buf, &mut connect_time),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 2 s"))?;
    match outcome {
        Ok(_) => Ok(200),
        Err(Failure::Status(status)) => Ok(status),
        Err(Failure::Connect(err) | Failure::Io(err)) => Err(err),
    }
}

/// `GET path` with `connection: close`; returns the body (bounded to 4 MiB
/// and 5 s).
pub async fn get_text(addr: SocketAddr, path: &str) -> io::Result<String> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut all = Vec::new();
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 || all.len() > 4 << 20 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        let head =
            http::parse_response(&all)?.ok_or_else(|| http::invalid("incomplete response head"))?;
        if head.status != 200 {
            return Err(http::invalid(format!("status {}", head.status)));
        }
        Ok(String::from_utf8_lossy(&all[head.len..]).into_owned())
    };
    timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer within 5 s"))?
}
