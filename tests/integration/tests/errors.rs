//! What a client sees when something is wrong: OpenAI-shaped JSON errors,
//! and no harm to other clients.
use integration_tests::{
    Fleet, dataplane_or_skip, each_mode, exchange_raw, get, metric, post_json, request,
    start_router,
};
use router_daemon::dataplane::Mode;
use serde_json::json;

fn assert_openai_error(response: &integration_tests::Response, status: u16, kind: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    let json = response.json();
    assert_eq!(json["error"]["code"], status, "{json}");
    assert_eq!(json["error"]["type"], kind, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{json}"
    );
}

async fn bad_requests_get_json_errors(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(1, dataplane).await;
    let router = fleet.router;

    let invalid = request(
        router,
        "POST",
        "/v1/completions",
        b"{\"prompt\": \"unterminated",
    )
    .await;
    assert_openai_error(&invalid, 400, "BadRequestError");

    let missing = post_json(router, "/v1/completions", &json!({"model": "m"})).await;
    assert_openai_error(&missing, 400, "BadRequestError");

    let unknown = get(router, "/nope").await;
    assert_openai_error(&unknown, 404, "NotFoundError");

    let garbage = exchange_raw(router, b"\x16\x03\x01 this is not HTTP\r\n\r\n").await;
    assert_openai_error(&garbage, 400, "BadRequestError");

    let too_big = exchange_raw(
        router,
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n",
    )
    .await;
    assert_openai_error(&too_big, 413, "BadRequestError");

    // The daemon is still serving, and counted what it refused.
    let health = get(router, "/health").await;
    assert_eq!(health.status, 200);
    let metrics = get(router, "/metrics").await.text();
    assert_eq!(
        metric(&metrics, "router_errors_total{status=\"400\"}"),
        Some(3.0),
        "{metrics}"
    );
}

async fn unreachable_backends_give_502(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    // A port nothing listens on: bind, read the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let (router, _stop) = start_router(vec![dead], dataplane).await;
    let body = json!({"model": "m", "prompt": "What is the capital of France?"});
    let response = post_json(router, "/v1/completions", &body).await;
    assert_openai_error(&response, 502, "ServiceUnavailableError");
}

async fn dead_backend_is_skipped(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let (sim, _sim_stop) = integration_tests::start_sim(vllm_sim::Config::for_tests("sim-0")).await;
    let (router, _stop) = start_router(vec![dead, format!("http://{sim}")], dataplane).await;
    for country in ["France", "Spain", "Italy", "Chile"] {
        let body = json!({
            "model": "meta-llama/Llama-3.2-1B-Instruct",
            "prompt": format!("What is the capital of {country}?"),
            "max_tokens": 4,
        });
        let response = post_json(router, "/v1/completions", &body).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert_eq!(response.header("x-served-by"), Some("sim-0"));
    }
}

/// Garbage from one client while another streams: the stream is intact.
async fn bad_client_does_not_disturb_others(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(2, dataplane).await;
    let body = json!({
        "model": "meta-llama/Llama-3.2-1B-Instruct",
        "prompt": "Tell me a long story.",
        "max_tokens": 200,
        "stream": true,
    });
    let router = fleet.router;
    let good = tokio::spawn(async move { post_json(router, "/v1/completions", &body).await });
    let mut bad = Vec::new();
    for i in 0..20 {
        let body = format!("{{{i}:}}");
        let raw = format!(
            "POST /v1/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        bad.push(tokio::spawn(exchange_raw(fleet.router, raw.into_bytes())));
    }
    for response in bad {
        assert_eq!(response.await.expect("bad client").status, 400);
    }
    let good = good.await.expect("good client");
    assert_eq!(good.status, 200);
    let events = integration_tests::sse_data(&good.body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
}

each_mode!(
    bad_requests_get_json_errors,
    unreachable_backends_give_502,
    dead_backend_is_skipped,
    bad_client_does_not_disturb_others,
);
