//! A fleet that changes while the router serves: a `--backend` host name
//! whose address moves sends new requests to the new address, while a
//! stream already on the old one finishes whole, and the departed backend's
//! metric series leave with it.
//!
//! With no address at all (scale to zero), requests get 503 with
//! `Retry-After`, and 200s again once an address appears.
//!
//! The name resolves through `--hosts-file`, rewritten by the test; the two
//! backends listen on one port at two loopback addresses, as two pods behind
//! a headless Service would.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use integration_tests::{
    Stopper, dataplane_or_skip, each_mode, get, metric, post_json, start_router_with, stopper,
};
use router_daemon::dataplane::Mode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

/// The model the simulator serves.
const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
/// How long a bounded wait in this file may take on a busy machine.
const PATIENCE: Duration = Duration::from_secs(20);

/// A backend on `listener` that answers every request with a short SSE
/// stream served by `a`; the first request's stream stops after its first
/// event until `gate` is notified.
fn gated_backend(listener: TcpListener, gate: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let gate = first.then(|| Arc::clone(&gate));
            first = false;
            tokio::spawn(async move {
                // Each request is one small POST; its head and body arrive
                // well within one read of this size on loopback.
                let mut request = [0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut request).await {
                    if n == 0 {
                        return;
                    }
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                                x-served-by: a\r\ntransfer-encoding: chunked\r\n\r\n";
                    let one = chunk("data: one\n\n");
                    if stream
                        .write_all(format!("{head}{one}").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if let Some(gate) = &gate {
                        gate.notified().await;
                    }
                    let rest = format!(
                        "{}{}0\r\n\r\n",
                        chunk("data: two\n\n"),
                        chunk("data: [DONE]\n\n")
                    );
                    if stream.write_all(rest.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// Listeners on `127.0.0.2:P` and `127.0.0.3:P` for one free port P,
/// kept bound so that nothing else can take either in between.
fn two_addresses_one_port() -> (TcpListener, TcpListener) {
    for _ in 0..20 {
        let a = router_daemon::listener(([127, 0, 0, 2], 0).into()).expect("bind 127.0.0.2");
        let port = a.local_addr().expect("addr").port();
        if let Ok(b) = router_daemon::listener(([127, 0, 0, 3], port).into()) {
            return (a, b);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn addr_of(listener: &TcpListener) -> SocketAddr {
    listener.local_addr().expect("listener addr")
}

/// Starts a `vllm-sim` named `sim-b` on `listener`.
fn start_sim_on(listener: TcpListener) -> Stopper {
    let (stop, shutdown) = stopper();
    tokio::spawn(async move {
        let config = vllm_sim::Config::for_tests("sim-b");
        if let Err(err) = vllm_sim::serve(listener, config, shutdown).await {
            panic!("vllm-sim failed: {err}");
        }
    });
    stop
}

/// Reads from `stream` until `needle` has arrived (bounded); returns all
/// bytes read.
async fn read_until(stream: &mut TcpStream, received: &mut Vec<u8>, needle: &str) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        while !String::from_utf8_lossy(received).contains(needle) {
            let n = stream.read(&mut buf).await.expect("read the stream");
            assert!(
                n > 0,
                "the stream ended before {needle:?}: {:?}",
                String::from_utf8_lossy(received)
            );
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no {needle:?} within {PATIENCE:?}: {:?}",
            String::from_utf8_lossy(received)
        )
    });
}

async fn a_moved_name_is_followed_and_its_stream_finishes(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (a_listener, b_listener) = two_addresses_one_port();
    let (a, b) = (addr_of(&a_listener), addr_of(&b_listener));
    let gate = Arc::new(Notify::new());
    let _a = gated_backend(a_listener, Arc::clone(&gate));
    let _b = start_sim_on(b_listener);
    let dir = hosts_dir(mode.as_str());
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 fleet.test\n").expect("write hosts");
    let url = format!("http://fleet.test:{}", a.port());
    let hosts_file = hosts.clone();
    let (router, _stop) = start_router_with(vec![url], dataplane, move |config| {
        config.hosts_file = Some(hosts_file);
        config.resolve_interval_ms = 50;
        config.discovery_interval_ms = 0;
    })
    .await;

    // A stream starts on the name's first address and pauses there.
    let body =
        json!({"model": MODEL, "prompt": "a stream across a move", "stream": true}).to_string();
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    read_until(&mut stream, &mut received, "data: one").await;
    assert!(String::from_utf8_lossy(&received).contains("x-served-by: a"));

    // The name moves: new requests follow it.
    std::fs::write(&hosts, "127.0.0.3 fleet.test\n").expect("rewrite hosts");
    let old = format!("backend=\"http://{a}\"");
    let new = format!("backend=\"http://{b}\"");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = post_json(
            router,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "where now", "max_tokens": 2}),
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
        if response.header("x-served-by") == Some("sim-b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests never followed the name to {b}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Once moved, every request lands there.
    for _ in 0..5 {
        let response = post_json(
            router,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "and now", "max_tokens": 2}),
        )
        .await;
        assert_eq!(
            response.header("x-served-by"),
            Some("sim-b"),
            "{}",
            response.text()
        );
    }
    // The departed backend's series are gone, the new one's are there.
    let metrics = get(router, "/metrics").await.text();
    assert!(!metrics.contains(&old), "{old} still exported:\n{metrics}");
    let requests_new = format!("router_requests_total{{{new}}}");
    assert!(
        metric(&metrics, &requests_new).is_some_and(|n| n >= 6.0),
        "{metrics}"
    );

    // The stream that was on the departed backend finishes whole.
    gate.notify_one();
    read_until(&mut stream, &mut received, "0\r\n\r\n").await;
    let text = String::from_utf8_lossy(&received);
    let events: Vec<_> = text
        .lines()
        .filter(|line| line.starts_with("data: "))
        .collect();
    assert_eq!(events, ["data: one", "data: two", "data: [DONE]"], "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A fresh directory for one test's hosts file.
fn hosts_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fleet-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_to_zero_is_503_with_retry_after_then_back() {
    let (_, b_listener) = two_addresses_one_port();
    let b = addr_of(&b_listener);
    let _b = start_sim_on(b_listener);
    let dir = hosts_dir("zero");
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, "# no pods yet\n").expect("write hosts");
    let url = format!("http://fleet.test:{}", b.port());
    let hosts_file = hosts.clone();
    let (router, _stop) = start_router_with(
        vec![url],
        router_daemon::Dataplane::userspace(),
        move |config| {
            config.hosts_file = Some(hosts_file);
            config.resolve_interval_ms = 50;
            config.discovery_interval_ms = 0;
        },
    )
    .await;
    let question = json!({"model": MODEL, "prompt": "anyone there", "max_tokens": 2});
    let ask = || post_json(router, "/v1/completions", &question);

    let response = ask().await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert_eq!(response.header("retry-after"), Some("1"));
    assert_eq!(response.json()["error"]["type"], "ServiceUnavailableError");
    assert_eq!(get(router, "/ready").await.status, 503);

    // A pod appears: served again, without a restart.
    std::fs::write(&hosts, "127.0.0.3 fleet.test\n").expect("rewrite hosts");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = ask().await;
        if response.status == 200 {
            assert_eq!(response.header("x-served-by"), Some("sim-b"));
            break;
        }
        assert_eq!(response.status, 503, "{}", response.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served after the address appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(router, "/ready").await.status, 200);
    std::fs::remove_dir_all(&dir).ok();
}

each_mode!(a_moved_name_is_followed_and_its_stream_finishes);
