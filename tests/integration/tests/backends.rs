//! What a client sees when a backend misbehaves: a clear error or a close,
//! a counted failure, and never another exchange's bytes; a connection
//! that misbehaved is not pooled for the next request.
use std::time::Duration;

use integration_tests::{
    dataplane_or_skip, each_mode, get, metric, scripted_backend, scripted_backend_once,
    start_router_with,
};
use router_daemon::dataplane::Mode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const REQUEST: &[u8] =
    b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}";

/// A router in front of `backend` alone, with discovery off (the scripted
/// backends answer probes with the same misbehaviour).
async fn router_before(
    mode: Mode,
    backend: String,
) -> Option<(std::net::SocketAddr, integration_tests::Stopper)> {
    let dataplane = dataplane_or_skip(mode)?;
    Some(
        start_router_with(vec![backend], dataplane, |config| {
            config.discovery_interval_ms = 0;
        })
        .await,
    )
}

/// Sends [`REQUEST`] on a new connection and reads until the router closes
/// it or 10 s pass; returns what arrived.
async fn send_and_read_to_close(router: std::net::SocketAddr) -> Vec<u8> {
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(REQUEST).await.expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    received.extend_from_slice(&buf[..n]);
                    if integration_tests::response_len(&received) == Some(received.len()) {
                        return;
                    }
                }
            }
        }
    })
    .await;
    received
}

async fn metrics(router: std::net::SocketAddr) -> String {
    get(router, "/metrics").await.text()
}

/// A response head that is not HTTP: 502, in OpenAI's error shape.
async fn a_garbage_head_is_a_502(mode: Mode) {
    let backend = scripted_backend_once(b"SSH-2.0-OpenSSH_9.6\r\n\r\n".to_vec()).await;
    let Some((router, _stop)) = router_before(mode, backend).await else {
        return;
    };
    let response = integration_tests::parse_response(send_and_read_to_close(router).await);
    assert_eq!(response.status, 502, "{}", response.text());
    assert_eq!(response.json()["error"]["code"], 502);
    let text = metrics(router).await;
    assert_eq!(
        metric(&text, "router_errors_total{status=\"502\"}"),
        Some(1.0)
    );
}

/// A head that never ends (4 MiB of header lines and counting): 502 once
/// it passes the response head limit, without reading the rest.
async fn an_endless_head_is_a_502(mode: Mode) {
    let mut endless = b"HTTP/1.1 200 OK\r\n".to_vec();
    while endless.len() < 4 << 20 {
        endless.extend_from_slice(b"X-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    let backend = scripted_backend(endless, 64 * 1024).await;
    let Some((router, _stop)) = router_before(mode, backend).await else {
        return;
    };
    let response = integration_tests::parse_response(send_and_read_to_close(router).await);
    assert_eq!(response.status, 502, "{}", response.text());
}

/// A backend that sends more than its `Content-Length`: the client gets
/// exactly the length, and the extra bytes are never read as the next
/// response: that connection is not reused.
async fn bytes_past_the_content_length_are_not_relayed(mode: Mode) {
    let backend = scripted_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
            .to_vec(),
        4096,
    )
    .await;
    let Some((router, _stop)) = router_before(mode, backend).await else {
        return;
    };
    for attempt in 0..3 {
        let response = integration_tests::parse_response(send_and_read_to_close(router).await);
        assert_eq!(
            response.status,
            200,
            "attempt {attempt}: {}",
            response.text()
        );
        assert_eq!(response.body, b"hello", "attempt {attempt}");
    }
}

/// A chunked body cut off mid-chunk: the client's connection closes without
/// the last chunk (it can tell the body is incomplete), and the failure is
/// counted.
async fn a_close_mid_chunk_closes_the_client(mode: Mode) {
    let backend = scripted_backend_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n9\r\nhal".to_vec(),
    )
    .await;
    let Some((router, _stop)) = router_before(mode, backend).await else {
        return;
    };
    let received = send_and_read_to_close(router).await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "a cut body looks complete: {text}"
    );
    assert_eq!(integration_tests::response_len(&received), None, "{text}");
    let text = metrics(router).await;
    let failures = metric(&text, "router_backend_failures_total").expect("failures sample");
    assert!(failures >= 1.0, "{failures}");
}

each_mode!(
    a_garbage_head_is_a_502,
    an_endless_head_is_a_502,
    bytes_past_the_content_length_are_not_relayed,
    a_close_mid_chunk_closes_the_client,
);
