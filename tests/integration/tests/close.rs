//! Closes and failures: half-closes travel through the router, a client
//! that leaves stops the backend's work, and a backend that dies does not
//! leave the client hanging.
use std::time::Duration;

use integration_tests::{
    dataplane_or_skip, each_mode, get, metric, parse_response, start_router, start_sim,
};
use router_daemon::dataplane::Mode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

const REQUEST: &str = "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: 28\r\n\r\n{\"prompt\":\"half-close test\"}";

/// A backend that answers only once its peer has half-closed: it proves the
/// client's FIN reached it through the router.
async fn answers_after_eof() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_err() {
                    return;
                }
                let body = format!("saw {} bytes then EOF", request.len());
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}")
}

async fn half_close_reaches_the_backend(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (router, _stop) = start_router(vec![answers_after_eof().await], dataplane).await;
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(REQUEST.as_bytes()).await.expect("send");
    stream.shutdown().await.expect("half-close");
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the backend never saw the client's FIN")
        .expect("read");
    let response = parse_response(received);
    assert_eq!(response.status, 200);
    assert!(response.text().ends_with("then EOF"), "{}", response.text());
}

/// A client that leaves mid-stream makes the simulated vLLM abort the
/// generation, long before it would have finished.
async fn client_abort_stops_the_generation(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let mut sim_config = vllm_sim::Config::for_tests("sim-0");
    // Real pacing: 3,000 tokens at 6 ms each would take 18 s.
    sim_config.time_scale = 1.0;
    let (sim, _sim_stop) = start_sim(sim_config).await;
    let (router, _stop) = start_router(vec![format!("http://{sim}")], dataplane).await;

    let body = r#"{"model":"meta-llama/Llama-3.2-1B-Instruct","prompt":"Tell me everything.","max_tokens":3000,"stream":true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut first = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut first))
        .await
        .expect("first bytes in time")
        .expect("read");
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(stream);

    // Bounded wait for the sim to count the abort and free the slot;
    // generation alone would run for 18 s. One scrape may read the running
    // gauge before the abort and the counter after it, so both are awaited.
    let aborted = "vllm:request_success_total{finished_reason=\"abort\"}";
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = get(sim, "/metrics").await.text();
        if metric(&metrics, aborted) == Some(1.0)
            && metric(&metrics, "vllm:num_requests_running") == Some(0.0)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the sim did not abort the generation after the client left:\n{metrics}");
}

/// A backend that sends part of a response, then resets the connection.
async fn resets_mid_response() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    format!("http://{addr}")
}

async fn backend_reset_closes_the_client(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (router, _stop) = start_router(vec![resets_mid_response().await], dataplane).await;
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(REQUEST.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the client was left hanging after the backend reset");
    // Closed (cleanly or by reset) after the bytes that were sent.
    let _ = read;
    assert!(
        String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200 OK"),
        "{received:?}"
    );
    let metrics = get(router, "/metrics").await.text();
    assert_eq!(
        metric(&metrics, "router_backend_failures_total"),
        Some(1.0),
        "{metrics}"
    );
}

/// A client that says `connection: close` gets its whole response and the
/// router's close, and its connection slot is free at once: the router does
/// not wait for the client's own close (it used to, for up to two seconds,
/// holding a place under `--max-connections`).
async fn a_client_that_asked_to_close_is_let_go_at_once(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (sim, _sim_stop) = start_sim(vllm_sim::Config::for_tests("sim-0")).await;
    let (router, _stop) = start_router(vec![format!("http://{sim}")], dataplane).await;
    let body =
        r#"{"model":"meta-llama/Llama-3.2-1B-Instruct","prompt":"Say hello.","max_tokens":20}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the router did not close after the response")
        .expect("a clean close, not a reset");
    let response = parse_response(received);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.json()["usage"]["completion_tokens"], 20);

    // The client still holds its end; only the scrape's own connection
    // may be open on the router.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    loop {
        let metrics = get(router, "/metrics").await.text();
        let open = metric(&metrics, "router_client_connections");
        if open == Some(1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the router still holds the closed client's connection: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stream);

    // A request sent after the one that asked to close is not served
    // (RFC 9112, 9.6), and the asked-for response still arrives whole,
    // closed cleanly. (The router has read those bytes into its own buffer,
    // so its close resets nothing either way; that it lingers over them, in
    // case more follow, is not observable here.)
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let extra = "GET /health HTTP/1.1\r\nHost: r\r\n\r\n";
    stream
        .write_all(format!("{request}{extra}").as_bytes())
        .await
        .expect("send");
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut received))
        .await
        .expect("the router did not close after the response")
        .expect("a clean close, not a reset");
    let responses = received.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert_eq!(responses, 1, "{}", String::from_utf8_lossy(&received));
    let response = parse_response(received);
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["usage"]["completion_tokens"], 20);
}

each_mode!(
    a_client_that_asked_to_close_is_let_go_at_once,
    half_close_reaches_the_backend,
    client_abort_stops_the_generation,
    backend_reset_closes_the_client,
);
