//! Kept-alive connections on both sides: every request of a client
//! connection is routed on its own prompt, responses come back in request
//! order (pipelined or not), backend connections are pooled and reused, and
//! the router's in-flight counts match what the simulated vLLMs report.
use std::{collections::HashSet, time::Duration};

use integration_tests::{
    EXCHANGE_TIMEOUT, Fleet, Response, assert_bytes_took_path, dataplane_or_skip, each_mode, get,
    metric, parse_response, read_response, response_len, scripted_backend_once, sse_data,
    start_router,
};
use router_daemon::dataplane::Mode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";

/// A completion request on a kept-alive connection, with our request id.
fn completion(prompt: &str, id: &str, stream: bool) -> Vec<u8> {
    let body =
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": stream}).to_string();
    let mut raw = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nx-request-id: {id}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body.as_bytes());
    raw
}

/// The sum of a per-backend sample over the fleet's sims.
fn per_sim(metrics: &str, fleet: &Fleet, name: &str) -> Vec<f64> {
    fleet
        .sims
        .iter()
        .map(|sim| metric(metrics, &format!("{name}{{backend=\"http://{sim}\"}}")).unwrap_or(0.0))
        .collect()
}

fn served_by(response: &Response) -> String {
    response
        .header("x-served-by")
        .unwrap_or_else(|| panic!("no x-served-by: {}", response.text()))
        .to_owned()
}

/// Twenty conversations over one client connection: they spread over the
/// sims, each follow-up lands where its conversation started, and the
/// router opened at most one connection per sim.
async fn one_connection_many_backends(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(4, dataplane).await;
    let mut stream = TcpStream::connect(fleet.router).await.expect("connect");
    let mut first = Vec::new();
    for i in 0..20 {
        let prompt = format!("Conversation {i}: tell me about the number {i}.");
        stream
            .write_all(&completion(&prompt, &format!("first-{i}"), i % 2 == 0))
            .await
            .expect("send");
        let response = read_response(&mut stream).await;
        assert_eq!(response.status, 200, "{}", response.text());
        first.push(served_by(&response));
    }
    let distinct: HashSet<&String> = first.iter().collect();
    assert!(
        distinct.len() >= 2,
        "one client connection was pinned to {distinct:?}"
    );
    for (i, expected) in first.iter().enumerate() {
        let prompt = format!("Conversation {i}: tell me about the number {i}. And then?");
        stream
            .write_all(&completion(&prompt, &format!("next-{i}"), i % 2 == 1))
            .await
            .expect("send");
        let response = read_response(&mut stream).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(&served_by(&response), expected, "conversation {i} moved");
    }
    let metrics = get(fleet.router, "/metrics").await.text();
    let opened: f64 = per_sim(&metrics, &fleet, "router_backend_connections_opened_total")
        .iter()
        .sum();
    assert!(
        opened <= distinct.len() as f64,
        "{opened} backend connections for 40 sequential requests over {} sims\n{metrics}",
        distinct.len()
    );
}

/// Three requests written at once: three responses, in request order, each
/// the answer to its own request (the sim echoes the request id), one of
/// them streamed.
async fn pipelined_requests_are_answered_in_order(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(2, dataplane).await;
    let mut stream = TcpStream::connect(fleet.router).await.expect("connect");
    let ids = ["pipe-a", "pipe-b", "pipe-c"];
    let mut burst = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        burst.extend_from_slice(&completion(&format!("pipelined question {i}"), id, i == 1));
    }
    stream.write_all(&burst).await.expect("send three requests");
    // The responses may arrive back to back in one read: split them by
    // their framing.
    let mut received = Vec::new();
    let mut responses = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while responses.len() < ids.len() {
        while let Some(len) = response_len(&received) {
            responses.push(parse_response(received.drain(..len).collect()));
        }
        if responses.len() == ids.len() {
            break;
        }
        let n = tokio::time::timeout(EXCHANGE_TIMEOUT, stream.read(&mut buf))
            .await
            .expect("responses in time")
            .expect("read");
        assert!(n > 0, "closed after {} responses", responses.len());
        received.extend_from_slice(&buf[..n]);
    }
    for (i, (id, response)) in ids.iter().zip(responses).enumerate() {
        assert_eq!(response.status, 200, "{}", response.text());
        let response_id = if i == 1 {
            let events = sse_data(&response.body);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            let first: serde_json::Value = serde_json::from_str(&events[0]).expect("JSON event");
            first["id"].as_str().expect("id").to_owned()
        } else {
            response.json()["id"].as_str().expect("id").to_owned()
        };
        assert_eq!(
            response_id,
            format!("cmpl-{id}"),
            "response {i} out of order"
        );
    }
}

/// While streams are running, the router's exact in-flight count per
/// backend equals what each sim reports as running plus waiting; once they
/// end, both are zero. The end of each response is found from its framing
/// (the connections stay open), so this checks response tracking against
/// the simulator's ground truth.
async fn in_flight_matches_the_sims(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::start(2, dataplane, |id| {
        let mut config = vllm_sim::Config::for_tests(id);
        // Real pacing: 150 tokens at 6 ms take about a second.
        config.time_scale = 1.0;
        config
    })
    .await;
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut stream = TcpStream::connect(fleet.router).await.expect("connect");
        let body = json!({"model": MODEL, "prompt": format!("stream {i} please"), "max_tokens": 150, "stream": true})
            .to_string();
        let raw = format!(
            "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(raw.as_bytes()).await.expect("send");
        streams.push(stream);
    }
    // Wait (bounded) until both sides have every request.
    let mut agreed = None;
    for _ in 0..50 {
        let router = get(fleet.router, "/metrics").await.text();
        let ours = per_sim(&router, &fleet, "router_backend_in_flight");
        let mut theirs = Vec::new();
        for sim in &fleet.sims {
            let text = get(*sim, "/metrics").await.text();
            theirs.push(
                metric(&text, "vllm:num_requests_running").unwrap_or(0.0)
                    + metric(&text, "vllm:num_requests_waiting").unwrap_or(0.0),
            );
        }
        if ours == theirs && ours.iter().sum::<f64>() == 6.0 {
            agreed = Some(ours);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        agreed.is_some(),
        "router and sims never agreed on 6 in flight"
    );
    let mut received = 0;
    for stream in &mut streams {
        let response = read_response(stream).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(
            sse_data(&response.body).last().map(String::as_str),
            Some("[DONE]")
        );
        received += response.raw.len();
    }
    // The router counts a response once it has relayed its last byte,
    // which the client may read first: wait (bounded) for the counts.
    let mut metrics = String::new();
    for _ in 0..250 {
        metrics = get(fleet.router, "/metrics").await.text();
        if metric(&metrics, "router_backend_first_byte_seconds_count") == Some(6.0)
            && per_sim(&metrics, &fleet, "router_backend_in_flight") == [0.0, 0.0]
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        per_sim(&metrics, &fleet, "router_backend_in_flight"),
        vec![0.0, 0.0],
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "router_backend_first_byte_seconds_count"),
        Some(6.0),
        "{metrics}"
    );
    // Streamed tokens take the mode's own path: the head (and anything that
    // came with it) is the only part the daemon must handle itself.
    assert_bytes_took_path(fleet.router, mode, received, 0.8).await;
}

/// A backend that closes every connection after one response without
/// saying so: the router meets stale pooled connections and must send the
/// request again on a new one, never failing the client.
async fn stale_pooled_connections_are_retried(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let body = "fresh";
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let backend = scripted_backend_once(response).await;
    let (router, _stop) = start_router(vec![backend], dataplane).await;
    let mut stream = TcpStream::connect(router).await.expect("connect");
    for i in 0..30 {
        stream
            .write_all(&completion("same prompt", &format!("stale-{i}"), false))
            .await
            .expect("send");
        let received = read_response(&mut stream).await;
        assert_eq!(received.status, 200, "request {i}: {}", received.text());
        assert_eq!(received.text(), body);
        if i % 3 == 0 {
            // Give the backend's FIN time to arrive before the next take.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

each_mode!(
    one_connection_many_backends,
    pipelined_requests_are_answered_in_order,
    in_flight_matches_the_sims,
    stale_pooled_connections_are_retried,
);
