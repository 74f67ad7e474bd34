//! A backend that keeps a response waiting does not hold its client
//! forever: nothing before the first byte within `--first-byte-timeout-ms`
//! gets a 504, a stream silent for `--response-idle-timeout-ms` is closed
//! after the bytes it sent, and either way the backend connection is closed
//! (so vLLM aborts the request) and the timeout is counted. A stream slower
//! in total than both bounds, but never silent for long, is not cut; on the
//! sockmap dataplane its bytes move in the kernel, unseen by the daemon's
//! reads.
//!
//! The bounds here are short (300 ms) only where the backend never answers,
//! so the outcome does not depend on how busy the machine is; the stream
//! that must survive has gaps ten times shorter than its bound.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    EXCHANGE_TIMEOUT, dataplane_or_skip, each_mode, get, loopback_listener, metric, post_json,
    read_request, start_router_with,
};
use router_daemon::dataplane::Mode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

fn chunk(data: &str) -> Vec<u8> {
    let event = format!("data: {data}\n\n");
    format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
}

/// What the backend does with each request: write each step's bytes after
/// its pause, then either wait for the next request or, with `stall`, send
/// nothing more.
#[derive(Clone)]
struct Script {
    steps: Vec<(Duration, Vec<u8>)>,
    stall: bool,
}

/// A backend following `script`; the count is of the connections the router
/// closed while the backend was stalled on them.
async fn scripted(script: Script) -> (String, Arc<AtomicUsize>) {
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("addr");
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&closed);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(follow(stream, script.clone(), Arc::clone(&counted)));
        }
    });
    (format!("http://{addr}"), closed)
}

async fn follow(mut stream: TcpStream, script: Script, closed: Arc<AtomicUsize>) {
    let mut pending = Vec::new();
    while read_request(&mut stream, &mut pending).await {
        for (pause, bytes) in &script.steps {
            tokio::time::sleep(*pause).await;
            if stream.write_all(bytes).await.is_err() {
                return;
            }
        }
        if script.stall {
            let mut buf = [0u8; 1024];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            closed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

/// A router in front of `backend` with the given bounds (milliseconds) and
/// no discovery (its probes would meet the script too).
async fn router(
    backend: String,
    mode: Mode,
    first_byte_ms: u64,
    idle_ms: u64,
) -> Option<(std::net::SocketAddr, integration_tests::Stopper)> {
    let dataplane = dataplane_or_skip(mode)?;
    Some(
        start_router_with(vec![backend], dataplane, |config| {
            config.first_byte_timeout_ms = first_byte_ms;
            config.response_idle_timeout_ms = idle_ms;
            config.discovery_interval_ms = 0;
        })
        .await,
    )
}

fn completion() -> Vec<u8> {
    let body = json!({"model": "m", "prompt": "Tell me a story", "stream": true}).to_string();
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Waits (bounded) until the backend has seen `n` connections closed.
async fn await_closed(closed: &AtomicUsize, n: usize) {
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        while closed.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the router closes the backend connection");
}

async fn timeout_count(router: std::net::SocketAddr, timeout: &str) -> Option<f64> {
    let metrics = get(router, "/metrics").await.text();
    metric(
        &metrics,
        &format!("router_backend_timeouts_total{{timeout=\"{timeout}\"}}"),
    )
}

async fn a_silent_backend_gets_504(mode: Mode) {
    let (backend, closed) = scripted(Script {
        steps: Vec::new(),
        stall: true,
    })
    .await;
    let Some((router, _stop)) = router(backend, mode, 300, 60_000).await else {
        return;
    };
    let body = json!({"model": "m", "prompt": "Tell me a story"});
    let response = post_json(router, "/v1/completions", &body).await;
    assert_eq!(response.status, 504, "{}", response.text());
    let json = response.json();
    assert_eq!(json["error"]["code"], 504, "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--first-byte-timeout-ms"), "{message}");
    await_closed(&closed, 1).await;
    assert_eq!(timeout_count(router, "first_byte").await, Some(1.0));
    assert_eq!(timeout_count(router, "response_idle").await, Some(0.0));
    assert_eq!(get(router, "/health").await.status, 200);
}

async fn a_stalled_stream_is_closed_after_what_it_sent(mode: Mode) {
    let sent = [HEAD.to_vec(), chunk("one"), chunk("two")].concat();
    let (backend, closed) = scripted(Script {
        steps: vec![(Duration::ZERO, sent.clone())],
        stall: true,
    })
    .await;
    let Some((router, _stop)) = router(backend, mode, 60_000, 300).await else {
        return;
    };
    let mut client = TcpStream::connect(router).await.expect("connect");
    client.write_all(&completion()).await.expect("send");
    let mut received = Vec::new();
    tokio::time::timeout(EXCHANGE_TIMEOUT, client.read_to_end(&mut received))
        .await
        .expect("the router closes the client")
        .expect("read");
    assert_eq!(
        String::from_utf8_lossy(&received),
        String::from_utf8_lossy(&sent),
        "the client gets what the backend sent, then the close"
    );
    await_closed(&closed, 1).await;
    assert_eq!(timeout_count(router, "response_idle").await, Some(1.0));
    assert_eq!(timeout_count(router, "first_byte").await, Some(0.0));
}

async fn a_slow_steady_stream_is_not_cut(mode: Mode) {
    // 2.4 s in all, past both 2 s bounds, but never silent for more than
    // 200 ms.
    let mut steps = vec![(Duration::from_millis(200), HEAD.to_vec())];
    for i in 0..11 {
        steps.push((Duration::from_millis(200), chunk(&format!("{i}"))));
    }
    steps.push((Duration::ZERO, b"0\r\n\r\n".to_vec()));
    let expected: Vec<u8> = steps.iter().flat_map(|(_, bytes)| bytes.clone()).collect();
    let (backend, closed) = scripted(Script {
        steps,
        stall: false,
    })
    .await;
    let Some((router, _stop)) = router(backend, mode, 2_000, 2_000).await else {
        return;
    };
    for _ in 0..2 {
        let mut client = TcpStream::connect(router).await.expect("connect");
        client.write_all(&completion()).await.expect("send");
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(EXCHANGE_TIMEOUT, async {
            while !received.ends_with(b"0\r\n\r\n") {
                let n = client.read(&mut buf).await.expect("read");
                assert!(
                    n > 0,
                    "closed mid-stream: {:?}",
                    String::from_utf8_lossy(&received)
                );
                received.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("the stream completes");
        assert!(
            received.ends_with(&expected),
            "{}",
            String::from_utf8_lossy(&received)
        );
    }
    assert_eq!(closed.load(Ordering::SeqCst), 0);
    assert_eq!(timeout_count(router, "response_idle").await, Some(0.0));
    assert_eq!(timeout_count(router, "first_byte").await, Some(0.0));
}

each_mode!(
    a_silent_backend_gets_504,
    a_stalled_stream_is_closed_after_what_it_sent,
    a_slow_steady_stream_is_not_cut,
);
