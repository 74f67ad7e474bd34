//! What a hostile client can make the router hold: every byte it sends and
//! every connection it opens is bounded, and each refusal is a clear error
//! (or a close) and a count in `router_limit_exceeded_total`.
use std::time::Duration;

use integration_tests::{
    dataplane_or_skip, each_mode, get, metric, parse_response, read_response, scripted_backend,
    start_router_with, start_sim,
};
use router_daemon::{config::Config, dataplane::Mode};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const BODY: &str = r#"{"model":"meta-llama/Llama-3.2-1B-Instruct","prompt":"What is the capital of France?","max_tokens":5}"#;

/// How much a flooding client may send before the test gives up on the
/// router answering: far more than any limit it tests.
const FLOOD_CAP: usize = 64 << 20;

/// A router with one simulator behind it, configured by `configure`.
async fn router_with(
    mode: Mode,
    configure: impl FnOnce(&mut Config),
) -> Option<(std::net::SocketAddr, Vec<integration_tests::Stopper>)> {
    let dataplane = dataplane_or_skip(mode)?;
    let (sim, sim_stop) = start_sim(vllm_sim::Config::for_tests("sim-0")).await;
    let (router, router_stop) =
        start_router_with(vec![format!("http://{sim}")], dataplane, configure).await;
    Some((router, vec![sim_stop, router_stop]))
}

/// The count of refusals for `limit` in the router's `/metrics`.
async fn refusals(router: std::net::SocketAddr, limit: &str) -> f64 {
    let text = get(router, "/metrics").await.text();
    metric(
        &text,
        &format!("router_limit_exceeded_total{{limit=\"{limit}\"}}"),
    )
    .unwrap_or_else(|| panic!("no {limit} sample in {text}"))
}

/// Sends `start`, then `line` over and over (up to [`FLOOD_CAP`] bytes)
/// while reading what the router answers; returns that answer.
async fn flood(router: std::net::SocketAddr, start: &[u8], line: &[u8]) -> Vec<u8> {
    let stream = TcpStream::connect(router).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(start).await.expect("send the start");
    let line = line.to_vec();
    let sender = tokio::spawn(async move {
        let mut sent = 0;
        // Stops when the router closes (a write fails) or at the cap.
        while sent < FLOOD_CAP && writer.write_all(&line).await.is_ok() {
            sent += line.len();
        }
        sent
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while integration_tests::response_len(&answer).is_none() {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    sender.abort();
    assert!(read.is_ok(), "no answer to the flood within 20 s");
    answer
}

fn chunked_head() -> &'static [u8] {
    b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
}

/// A valid chunked body, its last chunk, then endless 4,000-byte trailer
/// lines (each under the line limit): 431 once the trailers pass the
/// head's limits, not a router buffering them until the request times out.
async fn trailer_flood_is_cut_off(mode: Mode) {
    let Some((router, _stops)) = router_with(mode, |_| {}).await else {
        return;
    };
    let mut start = chunked_head().to_vec();
    start.extend_from_slice(format!("{:x}\r\n{BODY}\r\n0\r\n", BODY.len()).as_bytes());
    let line = format!("X-Trailer: {}\r\n", "t".repeat(3986));
    let answer = parse_response(flood(router, &start, line.as_bytes()).await);
    assert_eq!(answer.status, 431, "{}", answer.text());
    assert_eq!(answer.json()["error"]["code"], 431);
    assert!(answer.text().contains("trailer"), "{}", answer.text());
    assert_eq!(refusals(router, "trailers").await, 1.0);
}

/// One-byte chunks with 4,000-byte extensions: the bytes as sent count
/// against the request's limit, not just the decoded ones.
async fn chunk_extension_flood_is_cut_off(mode: Mode) {
    let Some((router, _stops)) = router_with(mode, |config| {
        config.max_body_bytes = 256 << 10;
    })
    .await
    else {
        return;
    };
    let chunk = format!("1;{}\r\n \r\n", "e".repeat(4000));
    let answer = parse_response(flood(router, chunked_head(), chunk.as_bytes()).await);
    assert_eq!(answer.status, 413, "{}", answer.text());
    assert!(answer.text().contains("as sent"), "{}", answer.text());
    assert_eq!(refusals(router, "body").await, 1.0);
}

/// A request head that never ends (slowloris) gets a 408 once the request
/// time-out passes.
async fn a_head_that_never_ends_times_out(mode: Mode) {
    let Some((router, _stops)) = router_with(mode, |config| {
        config.request_timeout_ms = 300;
    })
    .await
    else {
        return;
    };
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nX-Slow: ")
        .await
        .expect("send part of a head");
    let answer = read_response(&mut stream).await;
    assert_eq!(answer.status, 408, "{}", answer.text());
    assert_eq!(refusals(router, "request_time").await, 1.0);
}

/// A kept-alive connection that sends nothing is closed after the idle
/// time-out.
async fn an_idle_connection_is_closed(mode: Mode) {
    let Some((router, _stops)) = router_with(mode, |config| {
        config.idle_timeout_ms = 200;
    })
    .await
    else {
        return;
    };
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("closed within 20 s");
    assert!(matches!(read, Ok(0)), "{read:?}");
    assert_eq!(refusals(router, "idle_time").await, 1.0);
}

/// Past `--max-connections`, a new connection is answered 503 and closed;
/// once a connection ends, its place is free again.
async fn connections_past_the_limit_are_refused(mode: Mode) {
    let Some((router, _stops)) = router_with(mode, |config| {
        config.max_connections = Some(2);
    })
    .await
    else {
        return;
    };
    // Both are admitted once each has had an answer (the workers accept
    // from sockets of their own, so connecting alone proves nothing).
    let mut first = TcpStream::connect(router).await.expect("first");
    let mut second = TcpStream::connect(router).await.expect("second");
    for stream in [&mut first, &mut second] {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n")
            .await
            .expect("send");
        assert_eq!(read_response(stream).await.status, 200);
    }
    let mut third = TcpStream::connect(router).await.expect("third");
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\n")
        .await
        .expect("send");
    let refused = read_response(&mut third).await;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.text().contains("--max-connections"),
        "{}",
        refused.text()
    );
    // The first leaves; its place frees once the router sees it go.
    drop(first);
    let mut admitted = None;
    for _ in 0..800 {
        let mut stream = TcpStream::connect(router).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: r\r\n\r\n")
            .await
            .expect("send");
        let answer = read_response(&mut stream).await;
        if answer.status == 200 {
            admitted = Some(answer.text());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = admitted.expect("a place freed after a connection closed");
    // `second` and this one are open.
    assert_eq!(metric(&text, "router_client_connections"), Some(2.0));
    let refused_count = metric(&text, "router_limit_exceeded_total{limit=\"connections\"}")
        .expect("connections sample");
    assert!(refused_count >= 1.0, "{refused_count}");
}

/// Pipelined requests behind a large response the client does not read yet
/// are read ahead only up to `--max-pipelined-bytes`; the rest waits in
/// TCP, and every response still arrives whole and in order.
async fn pipelined_read_ahead_is_bounded(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let body = vec![b'x'; 256 << 10];
    let mut response =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    response.extend_from_slice(&body);
    let backend = scripted_backend(response.clone(), 64 * 1024).await;
    let (router, _stop) = start_router_with(vec![backend], dataplane, |config| {
        config.max_pipelined_bytes = 1024;
    })
    .await;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    // 24 requests, about 4 KiB: four times the read-ahead limit.
    let requests = 24;
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream
        .write_all(request.repeat(requests).as_bytes())
        .await
        .expect("send the pipelined requests");
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let expected = response.len() * requests;
    tokio::time::timeout(Duration::from_secs(60), async {
        while received < expected {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed after {received} of {expected} bytes");
            received += n;
        }
    })
    .await
    .expect("every response within 60 s");
    assert_eq!(received, expected);
    assert!(refusals(router, "pipelined").await >= 1.0);
}

each_mode!(
    pipelined_read_ahead_is_bounded,
    trailer_flood_is_cut_off,
    chunk_extension_flood_is_cut_off,
    a_head_that_never_ends_times_out,
    an_idle_connection_is_closed,
    connections_past_the_limit_are_refused,
);
