//! `router-bench serve`: the fake vLLM backend every system of the benchmark
//! sits in front of. Raw tokio and HTTP/1.1, so that the backend costs as
//! little as possible and costs the same for every system.
//!
//! `POST /v1/completions` (and `/v1/chat/completions`) answers by the body:
//! - `"bench_bytes":N` (case c): `N` bytes of `x` with a `content-length`;
//! - `"stream":true` (case b): `max_tokens` SSE events of 64 bytes each, in
//!   chunked encoding, one every `bench_interval_us` microseconds, each
//!   carrying the `CLOCK_MONOTONIC` time at which it was written (`"t":ns`);
//! - otherwise (case a): a fixed ~330-byte completion JSON.
//!
//! `GET /health` answers `ok`; `GET /bench/stats` the completions answered
//! per listener. Connections are kept alive (the router pools them) unless
//! the request says `connection: close`; then the backend closes after the
//! response.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
};

use crate::{http, procfs::mono_ns};

/// Options of `router-bench serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An address to serve on (repeatable); each is one "backend".
    #[arg(long = "listen", required = true, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// Tokio worker threads (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The fixed completion of case (a), as vLLM would answer `max_tokens: 16`.
const COMPLETION: &str = r#"{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"m","choices":[{"index":0,"text":" the quick brown fox jumps over the lazy dog again and","logprobs":null,"finish_reason":"length","stop_reason":null}],"usage":{"prompt_tokens":500,"total_tokens":516,"completion_tokens":16}}"#;
/// Size of one SSE event of case (b), framing (`data: ` and `\n\n`) included.
pub const EVENT_BYTES: usize = 64;
/// Largest request head plus body accepted.
const MAX_REQUEST: usize = 1 << 20;
/// The block case (c) writes repeatedly.
const BULK_BLOCK: usize = 1 << 20;
/// Most SSE events one response may ask for.
const MAX_EVENTS: u64 = 1_000_000;
/// Shortest interval between SSE events.
const MIN_INTERVAL: Duration = Duration::from_micros(100);

/// Completions answered, per listener.
type Counters = Arc<Vec<AtomicU64>>;

/// Serves until SIGTERM or SIGINT.
pub fn run(args: Args) -> Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let runtime = builder.build().context("building the tokio runtime")?;
    runtime.block_on(serve(args.listen))
}

async fn serve(addrs: Vec<SocketAddr>) -> Result<()> {
    let counters: Counters = Arc::new(addrs.iter().map(|_| AtomicU64::new(0)).collect());
    for (index, addr) in addrs.iter().enumerate() {
        let listener = listen(*addr).with_context(|| format!("listening on {addr}"))?;
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let counters = counters.clone();
                        tokio::spawn(async move {
                            // A failed connection (a reset, a client gone
                            // mid-stream) concerns that connection only.
                            let _ = connection(stream, index, counters).await;
                        });
                    }
                    // Out of fds or a reset before accept: back off briefly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        });
    }
    eprintln!("router-bench backend listening on {addrs:?}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// A listener with a deep accept queue (256 connections arrive at once).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// What a request asks for.
enum Answer {
    Health,
    Stats,
    Small,
    Stream { events: u64, interval: Duration },
    Bulk { bytes: u64 },
    NotFound,
}

fn classify(method: &str, path: &str, body: &[u8]) -> Answer {
    match (method, path) {
        ("GET", "/health") => Answer::Health,
        ("GET", "/bench/stats") => Answer::Stats,
        ("POST", "/v1/completions" | "/v1/chat/completions") => {
            if let Some(bytes) = http::json_u64(body, "bench_bytes") {
                Answer::Bulk { bytes }
            } else if memchr::memmem::find(body, b"\"stream\":true").is_some() {
                let events = http::json_u64(body, "max_tokens")
                    .unwrap_or(16)
                    .min(MAX_EVENTS);
                let interval = Duration::from_micros(
                    http::json_u64(body, "bench_interval_us").unwrap_or(20_000),
                )
                .max(MIN_INTERVAL);
                Answer::Stream { events, interval }
            } else {
                Answer::Small
            }
        }
        _ => Answer::NotFound,
    }
}

/// Serves the requests of one connection in order.
async fn connection(
    mut stream: TcpStream,
    index: usize,
    counters: Counters,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    loop {
        let head = loop {
            if let Some(head) = http::parse_request(&buf)? {
                break head;
            }
            if buf.len() > MAX_REQUEST {
                return Err(http::invalid("request head too large"));
            }
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        };
        let total = head.len + head.body_len;
        if total > MAX_REQUEST {
            return Err(http::invalid("request too large"));
        }
        while buf.len() < total {
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        }
        let answer = classify(&head.method, &head.path, &buf[head.len..total]);
        if matches!(
            answer,
            Answer::Small | Answer::Stream { .. } | Answer::Bulk { .. }
        ) && let Some(counter) = counters.get(index)
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        respond(&mut stream, answer, head.close, &counters).await?;
        buf.drain(..total);
        if head.close {
            // Dropping the socket sends our FIN: the end of the response.
            return Ok(());
        }
    }
}

/// Reads more bytes into `buf`; false at end of stream.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(8192);
    }
    Ok(stream.read_buf(buf).await? > 0)
}

/// A response head with a body of `len` bytes.
fn head(status: &str, content_type: &str, len: u64, close: bool) -> String {
    let connection = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len}\r\n{connection}\r\n"
    )
}

async fn respond(
    stream: &mut TcpStream,
    answer: Answer,
    close: bool,
    counters: &Counters,
) -> std::io::Result<()> {
    match answer {
        Answer::Health => {
            let mut out = head("200 OK", "text/plain", 3, close).into_bytes();
            out.extend_from_slice(b"ok\n");
            stream.write_all(&out).await
        }
        Answer::Stats => {
            let body: Vec<String> = counters
                .iter()
                .map(|c| c.load(Ordering::Relaxed).to_string())
                .collect();
            let body = body.join(" ") + "\n";
            let mut out = head("200 OK", "text/plain", body.len() as u64, close).into_bytes();
            out.extend_from_slice(body.as_bytes());
            stream.write_all(&out).await
        }
        Answer::Small => {
            let mut out =
                head("200 OK", "application/json", COMPLETION.len() as u64, close).into_bytes();
            out.extend_from_slice(COMPLETION.as_bytes());
            stream.write_all(&out).await
        }
        Answer::NotFound => {
            let body = r#"{"error":{"message":"not found","type":"NotFound","code":404}}"#;
            let mut out = head(
                "404 Not Found",
                "application/json",
                body.len() as u64,
                close,
            )
            .into_bytes();
            out.extend_from_slice(body.as_bytes());
            stream.write_all(&out).await
        }
        Answer::Bulk { bytes } => {
            let out = head("200 OK", "application/octet-stream", bytes, close);
            stream.write_all(out.as_bytes()).await?;
            let block = vec![b'x'; BULK_BLOCK];
            let mut left = bytes;
            while left > 0 {
                let n = usize::try_from(left).map_or(BULK_BLOCK, |l| l.min(BULK_BLOCK));
                stream.write_all(&block[..n]).await?;
                left -= n as u64;
            }
            Ok(())
        }
        Answer::Stream { events, interval } => stream_events(stream, events, interval, close).await,
    }
}

/// Case (b): `events` SSE events, one per `interval`, each in its own chunk
/// and its own write, as a token server sends them.
async fn stream_events(
    stream: &mut TcpStream,
    events: u64,
    interval: Duration,
    close: bool,
) -> std::io::Result<()> {
    let connection = if close { "connection: close\r\n" } else { "" };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
         transfer-encoding: chunked\r\n{connection}\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chunk = Vec::with_capacity(EVENT_BYTES + 8);
    for i in 0..events {
        ticker.tick().await;
        chunk.clear();
        chunk.extend_from_slice(format!("{EVENT_BYTES:x}\r\n").as_bytes());
        let event = event(i, mono_ns());
        chunk.extend_from_slice(event.as_bytes());
        chunk.extend_from_slice(b"\r\n");
        stream.write_all(&chunk).await?;
    }
    ticker.tick().await;
    let done = "data: [DONE]\n\n";
    let tail = format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len());
    stream.write_all(tail.as_bytes()).await
}

/// One SSE event of exactly [`EVENT_BYTES`] bytes: `data: {"i":…,"t":…,"p":"…"}\n\n`.
pub fn event(index: u64, sent_ns: u64) -> String {
    let event = format!(
        "data: {{\"i\":{:06},\"t\":{:020},\"p\":\"{}\"}}\n\n",
        index % 1_000_000,
        sent_ns,
        "abcdefghijkl"
    );
    debug_assert_eq!(event.len(), EVENT_BYTES);
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_64_bytes() {
        assert_eq!(event(7, 123).len(), EVENT_BYTES);
        assert_eq!(event(999_999, u64::MAX).len(), EVENT_BYTES);
    }

    #[test]
    fn classifies_by_body() {
        assert!(matches!(
            classify("POST", "/v1/completions", br#"{"bench_bytes":5}"#),
            Answer::Bulk { bytes: 5 }
        ));
        assert!(matches!(
            classify(
                "POST",
                "/v1/completions",
                br#"{"max_tokens":3,"stream":true,"bench_interval_us":1000}"#
            ),
            Answer::Stream { events: 3, .. }
        ));
        assert!(matches!(
            classify("POST", "/v1/completions", b"{}"),
            Answer::Small
        ));
        assert!(matches!(classify("GET", "/x", b""), Answer::NotFound));
    }
}
