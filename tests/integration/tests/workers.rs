//! Several worker threads behind one port: every client connection is
//! served whichever worker accepted it, the workers route on one shared
//! prefix index, and no other process can listen on the port meanwhile.
use std::io::ErrorKind;

use integration_tests::{
    EXCHANGE_TIMEOUT, Response, dataplane_or_skip, each_mode, get, read_response,
    start_router_with, start_sims,
};
use router_daemon::{Dataplane, dataplane::Mode};
use serde_json::json;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
/// More workers than this machine kind has CPUs, so most connections land
/// on workers other than the one that called `run`.
const WORKERS: usize = 4;
const CONVERSATIONS: usize = 12;

/// Sends one completion on a new connection and returns the response.
async fn complete_on_new_connection(
    router: std::net::SocketAddr,
    prompt: String,
    stream: bool,
) -> Response {
    let body =
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream}).to_string();
    let raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conn = TcpStream::connect(router).await.expect("connect");
    conn.write_all(raw.as_bytes()).await.expect("send");
    tokio::time::timeout(EXCHANGE_TIMEOUT, read_response(&mut conn))
        .await
        .expect("a response in time")
}

/// Conversations started on connections of their own, then continued on
/// new connections: the kernel spreads connections over the workers by
/// address, so most follow-ups are served by another worker than their
/// opening. Every request is answered, and every follow-up goes where its
/// conversation started.
async fn conversations_keep_their_backend_across_workers(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (urls, _sims) = start_sims(3).await;
    let (router, _stop) = start_router_with(urls, dataplane, |config| {
        config.workers = WORKERS;
        // Scrapes often catch an opening queued in its sim (that queue
        // must not count once the opening has ended).
        config.discovery_interval_ms = 20;
    })
    .await;
    let opening = |i: usize| format!("Conversation {i}: tell me about the number {i}.");
    let mut first = Vec::new();
    for i in 0..CONVERSATIONS {
        let response = complete_on_new_connection(router, opening(i), i % 2 == 0).await;
        assert_eq!(response.status, 200, "{}", response.text());
        first.push(served_by(&response));
    }
    for (i, expected) in first.iter().enumerate() {
        let prompt = format!("{} And then?", opening(i));
        let response = complete_on_new_connection(router, prompt, i % 2 == 1).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(&served_by(&response), expected, "conversation {i} moved");
    }
    let distinct: std::collections::HashSet<&String> = first.iter().collect();
    assert!(distinct.len() >= 2, "all conversations on {distinct:?}");
}

fn served_by(response: &Response) -> String {
    response
        .header("x-served-by")
        .unwrap_or_else(|| panic!("no x-served-by: {}", response.text()))
        .to_owned()
}

each_mode!(conversations_keep_their_backend_across_workers);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_other_process_can_listen_on_a_served_port() {
    let (urls, _sims) = start_sims(1).await;
    let (router, _stop) = start_router_with(urls, Dataplane::userspace(), |config| {
        config.workers = WORKERS;
    })
    .await;
    // Served: the workers' sockets are open.
    assert_eq!(get(router, "/health").await.status, 200);
    let err = router_daemon::listener(router).expect_err("a second daemon's listener");
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
    let err = std::net::TcpListener::bind(router).expect_err("a plain listener");
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
}
