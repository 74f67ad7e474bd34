//! HTTP/1.1 behaviour at the client edge: half-close, `Expect:
//! 100-continue`, keep-alive for local endpoints, and slow clients.
use std::time::Duration;

use integration_tests::{
    dataplane_or_skip, each_mode, parse_response, start_router_with, start_sim,
};
use router_daemon::dataplane::Mode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const BODY: &str = r#"{"model":"meta-llama/Llama-3.2-1B-Instruct","prompt":"What is the capital of France?","max_tokens":5}"#;

async fn router_with_sim(
    mode: Mode,
    request_timeout_ms: u64,
) -> Option<(std::net::SocketAddr, Vec<integration_tests::Stopper>)> {
    let dataplane = dataplane_or_skip(mode)?;
    let (sim, sim_stop) = start_sim(vllm_sim::Config::for_tests("sim-0")).await;
    let (router, router_stop) =
        start_router_with(vec![format!("http://{sim}")], dataplane, |config| {
            config.request_timeout_ms = request_timeout_ms;
        })
        .await;
    Some((router, vec![sim_stop, router_stop]))
}

fn completion_request(extra_headers: &str) -> String {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\n\r\n",
        BODY.len()
    )
}

async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("response in time")
        .expect("read response");
    received
}

/// `Expect: 100-continue` (curl sends it for large bodies): the router says
/// 100 Continue, then relays the real response.
async fn expect_continue_is_answered(mode: Mode) {
    let Some((router, _stops)) = router_with_sim(mode, 30_000).await else {
        return;
    };
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream
        .write_all(completion_request("Expect: 100-continue\r\n").as_bytes())
        .await
        .expect("send head");
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut interim))
        .await
        .expect("100 Continue in time")
        .expect("read 100 Continue");
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(BODY.as_bytes()).await.expect("send body");
    let response = integration_tests::read_response(&mut stream).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.json()["choices"][0]["text"].is_string());
}

/// `/health` and `/metrics` keep the connection open for the next request.
async fn local_endpoints_keep_alive(mode: Mode) {
    let Some((router, _stops)) = router_with_sim(mode, 30_000).await else {
        return;
    };
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: r\r\n\r\nGET /health HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
        .await
        .expect("send two pipelined requests");
    let received = String::from_utf8(read_all(&mut stream).await).expect("ascii");
    assert_eq!(received.matches("HTTP/1.1 200 OK").count(), 2, "{received}");
}

/// A client that stops sending mid-request gets a 408 and the connection
/// is released.
async fn stalled_request_gets_408(mode: Mode) {
    let Some((router, _stops)) = router_with_sim(mode, 300).await else {
        return;
    };
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let head = completion_request("");
    stream
        .write_all(format!("{head}{}", &BODY[..10]).as_bytes())
        .await
        .expect("send part of the request");
    let response = parse_response(read_all(&mut stream).await);
    assert_eq!(response.status, 408, "{}", response.text());
    assert_eq!(response.json()["error"]["code"], 408);
}

each_mode!(
    expect_continue_is_answered,
    local_endpoints_keep_alive,
    stalled_request_gets_408,
);

/// A chunked request body (what streaming HTTP clients send when they do not
/// know the length) is decoded, routed on its prompt and forwarded.
async fn chunked_request_body_is_forwarded(mode: Mode) {
    let Some((router, _stops)) = router_with_sim(mode, 30_000).await else {
        return;
    };
    let (first, second) = BODY.split_at(20);
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{first}\r\n{:x};ext=1\r\n{second}\r\n0\r\n\r\n",
        first.len(),
        second.len()
    );
    let response = integration_tests::exchange_raw(router, raw).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert!(response.json()["choices"][0]["text"].is_string());
}

each_mode!(chunked_request_body_is_forwarded);
