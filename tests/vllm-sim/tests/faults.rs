//! Injected faults: `--fail-rate`, `--stall-ms`, `--startup-delay-s` and
//! `--die-after-tokens`, seen from clients.

mod common;

use std::time::{Duration, Instant};

use common::Sim;
use serde_json::{Value, json};
use vllm_sim::Config;

const COMPLETION: &str = r#"{"prompt": "hello", "max_tokens": 3}"#;
const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}"#;

fn assert_error(response: &common::Response, status: u16, kind: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    let body = response.json();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert_eq!(body["error"]["code"], status, "{body}");
    assert_eq!(body["error"]["param"], Value::Null, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
}

#[tokio::test]
async fn fail_rate_one_answers_every_generation_with_a_500() {
    let sim = Sim::start(Config {
        fail_rate: 1.0,
        ..Config::for_tests("sim-f")
    })
    .await;
    for (path, body) in [
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
    ] {
        let response = sim.post(path, body).await;
        assert_error(&response, 500, "InternalServerError");
        assert_eq!(response.header("x-served-by"), Some("sim-f"));
    }
    // Validation comes first; the side endpoints are unaffected.
    let invalid = sim.post("/v1/completions", "{").await;
    assert_error(&invalid, 400, "BadRequestError");
    assert_eq!(sim.get("/health").await.status, 200);
    assert_eq!(
        sim.post("/tokenize", r#"{"prompt": "hello"}"#).await.status,
        200
    );
    sim.stop().await;
}

/// Statuses of `n` completions, one after another.
async fn statuses(sim: &Sim, n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        statuses.push(sim.post("/v1/completions", COMPLETION).await.status);
    }
    statuses
}

#[tokio::test]
async fn failures_are_a_seeded_fraction() {
    let config = |id: &str, seed| Config {
        fail_rate: 0.5,
        seed,
        ..Config::for_tests(id)
    };
    let a = Sim::start(config("sim-a", 11)).await;
    let b = Sim::start(config("sim-b", 11)).await;
    let first = statuses(&a, 40).await;
    assert_eq!(first, statuses(&b, 40).await, "same seed, same failures");
    let failed = first.iter().filter(|&&s| s == 500).count();
    assert!(
        (5..=35).contains(&failed),
        "{failed} of 40 failed: {first:?}"
    );
    assert!(first.iter().all(|&s| s == 200 || s == 500));
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn stall_delays_generation_requests() {
    let stall = Duration::from_millis(150);
    let sim = Sim::start(Config {
        stall_ms: 150.0,
        ..Config::for_tests("sim-s")
    })
    .await;
    for (path, body) in [
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", CHAT),
    ] {
        let start = Instant::now();
        let response = sim.post(path, body).await;
        assert_eq!(response.status, 200);
        assert!(start.elapsed() >= stall, "{path} answered before the stall");
    }
    sim.stop().await;
}

#[tokio::test]
async fn startup_delay_answers_503_until_ready() {
    let sim = Sim::start(Config {
        startup_delay_s: 1.5,
        ..Config::for_tests("sim-d")
    })
    .await;
    // The delay runs from when the server built its routes, after this.
    let start = Instant::now();
    let health = sim.get("/health").await;
    assert_error(&health, 503, "ServiceUnavailableError");
    assert_eq!(health.header("x-served-by"), Some("sim-d"));
    assert_error(
        &sim.post("/v1/completions", COMPLETION).await,
        503,
        "ServiceUnavailableError",
    );
    let mut ready_after = None;
    for _ in 0..200 {
        if sim.get("/health").await.status == 200 {
            ready_after = Some(start.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let ready_after = ready_after.expect("ready within the bounded wait");
    assert!(ready_after > Duration::from_millis(1000), "{ready_after:?}");
    assert_eq!(sim.post("/v1/completions", COMPLETION).await.status, 200);
    sim.stop().await;
}

#[tokio::test]
async fn die_after_tokens_drops_every_connection_and_stops() {
    let sim = Sim::start(Config {
        die_after_tokens: Some(10),
        ..Config::for_tests("sim-x")
    })
    .await;
    let addr = sim.addr;
    // An idle keep-alive connection.
    let mut idle = sim.connect().await;
    idle.send("GET", "/health", &[], None).await;
    assert_eq!(idle.response().await.status, 200);
    // Three tokens: still alive.
    assert_eq!(sim.post("/v1/completions", COMPLETION).await.status, 200);
    // A stream that would outlive the engine.
    let mut streaming = sim.connect().await;
    let body = json!({"prompt": "tell me everything", "max_tokens": 1000, "stream": true});
    streaming
        .send("POST", "/v1/completions", &[], Some(&body.to_string()))
        .await;
    let received = String::from_utf8_lossy(&streaming.read_to_close().await).into_owned();
    assert!(
        !received.contains("[DONE]"),
        "the stream was cut: {received}"
    );
    let tokens = received.matches("\"text\":").count();
    assert!(tokens <= 7, "at most 10 - 3 tokens arrive: {received}");
    // The idle connection was dropped too.
    assert!(idle.read_to_close().await.is_empty());
    match sim.join().await {
        Err(vllm_sim::Error::Died(generated)) => assert_eq!(generated, 10),
        other => panic!("expected a simulated crash, got {other:?}"),
    }
    // Nobody listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
