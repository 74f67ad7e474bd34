//! The simulator seen from a client: real sockets, raw HTTP/1.1.

mod common;

use std::time::Duration;

use common::{Sim, metric};
use serde_json::{Value, json};
use vllm_sim::Config;

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";

async fn sim(id: &str) -> Sim {
    Sim::start(Config::for_tests(id)).await
}

/// Token ids `base, base+1, …` (`n` of them).
fn ids(base: u32, n: usize) -> Vec<u32> {
    (base..).take(n).collect()
}

fn concat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

async fn cached_tokens_for(sim: &Sim, prompt: &[u32]) -> u64 {
    let response = sim
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 2}).to_string(),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached_tokens is a number")
}

fn assert_openai_error(response: &common::Response, status: u16, kind: &str) {
    assert_eq!(response.status, status, "{}", response.text());
    assert_eq!(response.header("x-served-by"), Some("sim-err"));
    let body = response.json();
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind);
    assert_eq!(error["param"], Value::Null);
    assert_eq!(error["code"], status);
}

/// The text of every chunk of a completion stream, and the parsed chunks.
fn stream_chunks(response: &common::Response) -> Vec<Value> {
    let events = response.events();
    assert_eq!(events.last(), Some(&"[DONE]"), "stream ends with [DONE]");
    assert!(response.text().ends_with("data: [DONE]\n\n"));
    events[..events.len() - 1]
        .iter()
        .map(|event| serde_json::from_str(event).expect("chunk is JSON"))
        .collect()
}

#[tokio::test]
async fn completion_has_vllm_shape() {
    let sim = sim("sim-0").await;
    let response = sim
        .post(
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "Hello, world", "max_tokens": 5}).to_string(),
        )
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-served-by"), Some("sim-0"));
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json"))
    );
    let body = response.json();
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_eq!(body["object"], "text_completion");
    assert!(body["created"].is_u64());
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["stop_reason"], Value::Null);
    assert_eq!(
        choice["text"]
            .as_str()
            .map(|t| t.split_whitespace().count()),
        Some(5)
    );
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], 5);
    let prompt_tokens = usage["prompt_tokens"].as_u64().expect("number");
    assert!(prompt_tokens > 1);
    assert_eq!(usage["total_tokens"], prompt_tokens + 5);
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);
    sim.stop().await;
}

#[tokio::test]
async fn output_len_applies_without_max_tokens() {
    let sim = Sim::start(Config {
        output_len: 7,
        ..Config::for_tests("sim-0")
    })
    .await;
    let response = sim.post("/v1/completions", r#"{"prompt": "x"}"#).await;
    assert_eq!(response.json()["usage"]["completion_tokens"], 7);
    let response = sim
        .post(
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
        )
        .await;
    assert_eq!(response.json()["usage"]["completion_tokens"], 7);
    sim.stop().await;
}

#[tokio::test]
async fn shared_full_blocks_are_reported_as_cached() {
    let sim = sim("sim-0").await;
    for k in [1usize, 2, 5] {
        let shared = ids(10_000 * k as u32, k * 16);
        assert_eq!(
            cached_tokens_for(&sim, &concat(&shared, &ids(1, 7))).await,
            0
        );
        let hit = cached_tokens_for(&sim, &concat(&shared, &ids(500, 23))).await;
        assert_eq!(hit, (k * 16) as u64, "k = {k}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn partial_blocks_are_never_cached() {
    let sim = sim("sim-0").await;
    // 2 full blocks + 12 tokens; the next prompt shares all 44, then diverges.
    let first = ids(0, 44);
    assert_eq!(cached_tokens_for(&sim, &first).await, 0);
    let second = concat(&first, &ids(9_000, 10));
    assert_eq!(cached_tokens_for(&sim, &second).await, 32);
    // A prompt shorter than one block never hits.
    let short = ids(70_000, 15);
    cached_tokens_for(&sim, &short).await;
    assert_eq!(cached_tokens_for(&sim, &short).await, 0);
    sim.stop().await;
}

#[tokio::test]
async fn text_prompts_hit_on_their_shared_prefix() {
    let sim = sim("sim-0").await;
    let document = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let ask = |question: &str| {
        json!({"model": MODEL, "prompt": format!("{document}{question}"), "max_tokens": 1})
            .to_string()
    };
    let first = sim.post("/v1/completions", &ask("Who jumps?")).await.json();
    let second = sim
        .post("/v1/completions", &ask("What colour?"))
        .await
        .json();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("number");
    // BOS + the document is well over 100 tokens; the hit is whole blocks.
    assert!(cached >= 160, "{second}");
    assert_eq!(cached % 16, 0);
    sim.stop().await;
}

#[tokio::test]
async fn a_chat_follow_up_reuses_the_conversation() {
    let sim = sim("sim-0").await;
    let system = "You are a helpful assistant. ".repeat(12);
    let turn1 = json!({"model": MODEL, "max_tokens": 20, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "Tell me something."},
    ]});
    let first = sim
        .post("/v1/chat/completions", &turn1.to_string())
        .await
        .json();
    let answer = first["choices"][0]["message"]["content"]
        .as_str()
        .expect("content");
    let turn2 = json!({"model": MODEL, "max_tokens": 20, "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": "Tell me something."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "More."},
    ]});
    let second = sim
        .post("/v1/chat/completions", &turn2.to_string())
        .await
        .json();
    let prompt1 = first["usage"]["prompt_tokens"].as_u64().expect("number");
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("number");
    // The whole first prompt's full blocks are reused, and the answer's
    // blocks too, since the simulator caches generated tokens like vLLM.
    assert!(cached >= prompt1 / 16 * 16, "{cached} < {prompt1}");
    assert!(
        cached > prompt1,
        "answer blocks hit too: {cached} vs {prompt1}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn streamed_completion_matches_the_unstreamed_one() {
    let sim = sim("sim-0").await;
    let request = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 9, "seed": 3});
    let plain = sim
        .post("/v1/completions", &request.to_string())
        .await
        .json();

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let response = sim.post("/v1/completions", &streamed.to_string()).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-served-by"), Some("sim-0"));
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    let chunks = stream_chunks(&response);
    // One chunk per token, then the usage chunk.
    assert_eq!(chunks.len(), 10);
    let (tokens, usage) = chunks.split_at(9);
    let mut text = String::new();
    for (i, chunk) in tokens.iter().enumerate() {
        assert_eq!(chunk["object"], "text_completion");
        assert!(
            chunk["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("cmpl-"))
        );
        assert_eq!(chunk["usage"], Value::Null);
        let choice = &chunk["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["logprobs"], Value::Null);
        assert_eq!(choice["stop_reason"], Value::Null);
        let expected = if i == 8 { json!("length") } else { Value::Null };
        assert_eq!(choice["finish_reason"], expected);
        text.push_str(choice["text"].as_str().expect("text"));
    }
    assert_eq!(text, plain["choices"][0]["text"].as_str().expect("text"));
    assert_eq!(usage[0]["choices"], json!([]));
    assert_eq!(usage[0]["usage"]["completion_tokens"], 9);
    assert_eq!(
        usage[0]["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    sim.stop().await;
}

#[tokio::test]
async fn streamed_chat_matches_the_unstreamed_one() {
    let sim = sim("sim-0").await;
    let request = json!({"model": MODEL, "max_completion_tokens": 6, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi there"}]},
    ]});
    let plain = sim
        .post("/v1/chat/completions", &request.to_string())
        .await
        .json();
    assert!(
        plain["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(plain["object"], "chat.completion");
    let message = &plain["choices"][0]["message"];
    assert_eq!(message["role"], "assistant");
    assert_eq!(plain["choices"][0]["finish_reason"], "length");
    assert_eq!(plain["usage"]["completion_tokens"], 6);

    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let response = sim
        .post("/v1/chat/completions", &streamed.to_string())
        .await;
    let chunks = stream_chunks(&response);
    // Role chunk + 6 token chunks; no usage chunk unless asked.
    assert_eq!(chunks.len(), 7);
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let content: String = chunks[1..]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content")
        })
        .collect();
    assert_eq!(content, message["content"].as_str().expect("content"));
    let last = &chunks[6]["choices"][0];
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(last["stop_reason"], Value::Null);
    assert!(
        chunks[1..6]
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );

    streamed["stream_options"] = json!({"include_usage": true});
    let response = sim
        .post("/v1/chat/completions", &streamed.to_string())
        .await;
    let chunks = stream_chunks(&response);
    assert_eq!(chunks.len(), 8);
    assert_eq!(chunks[7]["choices"], json!([]));
    assert_eq!(
        chunks[7]["usage"]["total_tokens"],
        plain["usage"]["total_tokens"]
    );
    sim.stop().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let sim = sim("sim-err").await;
    let invalid_json = sim.post("/v1/completions", "{not json").await;
    assert_openai_error(&invalid_json, 400, "BadRequestError");
    let no_prompt = sim
        .post("/v1/completions", &json!({"model": MODEL}).to_string())
        .await;
    assert_openai_error(&no_prompt, 400, "BadRequestError");
    let no_messages = sim
        .post("/v1/chat/completions", &json!({"model": MODEL}).to_string())
        .await;
    assert_openai_error(&no_messages, 400, "BadRequestError");
    let empty_prompt = sim.post("/v1/completions", r#"{"prompt": []}"#).await;
    assert_openai_error(&empty_prompt, 400, "BadRequestError");
    let zero_tokens = sim
        .post("/v1/completions", r#"{"prompt": "x", "max_tokens": 0}"#)
        .await;
    assert_openai_error(&zero_tokens, 400, "BadRequestError");
    let too_long = sim
        .post(
            "/v1/completions",
            r#"{"prompt": "x", "max_tokens": 10000000}"#,
        )
        .await;
    assert_openai_error(&too_long, 400, "BadRequestError");
    let wrong_model = sim
        .post(
            "/v1/chat/completions",
            r#"{"model": "gpt-4", "messages": []}"#,
        )
        .await;
    assert_openai_error(&wrong_model, 404, "NotFoundError");
    assert!(
        wrong_model.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("gpt-4"))
    );
    let unknown_route = sim.get("/v1/nope").await;
    assert_openai_error(&unknown_route, 404, "NotFoundError");
    let wrong_method = sim.get("/v1/completions").await;
    assert_openai_error(&wrong_method, 405, "MethodNotAllowedError");
    sim.stop().await;
}

#[tokio::test]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let sim = sim("sim-0").await;
    let mut conn = sim.connect().await;
    let body = json!({"prompt": "keep alive", "max_tokens": 3}).to_string();
    conn.send("POST", "/v1/completions", &[], Some(&body)).await;
    let first = conn.response().await;
    assert_eq!(first.status, 200);
    let mut streamed: Value = serde_json::from_str(&body).expect("JSON");
    streamed["stream"] = json!(true);
    conn.send("POST", "/v1/completions", &[], Some(&streamed.to_string()))
        .await;
    let second = conn.response().await;
    assert_eq!(second.events().last(), Some(&"[DONE]"));
    conn.send("GET", "/health", &[], None).await;
    let third = conn.response().await;
    assert_eq!(third.status, 200);
    assert_eq!(third.header("x-served-by"), Some("sim-0"));
    sim.stop().await;
}

#[tokio::test]
async fn connection_close_is_honoured() {
    let sim = sim("sim-0").await;
    let mut conn = sim.connect().await;
    let body = json!({"prompt": "bye", "max_tokens": 2}).to_string();
    conn.send(
        "POST",
        "/v1/completions",
        &[("Connection", "close")],
        Some(&body),
    )
    .await;
    let response = conn.response().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.is_closed().await);
    sim.stop().await;
}

#[tokio::test]
async fn side_endpoints_answer() {
    let sim = sim("sim-0").await;

    let health = sim.get("/health").await;
    assert_eq!((health.status, health.body.len()), (200, 0));
    assert_eq!(health.header("x-served-by"), Some("sim-0"));

    let version = sim.get("/version").await;
    assert_eq!(version.status, 200);
    assert_eq!(version.json(), json!({"version": vllm_sim::VLLM_VERSION}));

    let models = sim.get("/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");

    for path in [
        "/server_info",
        "/get_server_info",
        "/model_info",
        "/get_model_info",
    ] {
        let info = sim.get(path).await;
        assert_eq!(info.status, 200, "{path}");
        assert_eq!(info.json(), json!({"served_model_name": MODEL}), "{path}");
    }

    let tokenized = sim
        .post("/tokenize", r#"{"prompt": "hello world"}"#)
        .await
        .json();
    let tokens = tokenized["tokens"].as_array().expect("tokens").clone();
    assert_eq!(tokenized["count"], tokens.len());
    assert_eq!(tokens[0], 128_000, "BOS first");
    assert_eq!(tokenized["max_model_len"], 131_072);
    let bare = sim
        .post(
            "/tokenize",
            r#"{"prompt": "hello world", "add_special_tokens": false}"#,
        )
        .await
        .json();
    assert_eq!(
        bare["tokens"].as_array().map(Vec::len),
        Some(tokens.len() - 1)
    );
    let neither = sim.post("/tokenize", "{}").await;
    assert_eq!(neither.status, 400);

    let rendered = sim
        .post("/v1/completions/render", r#"{"prompt": "hello world"}"#)
        .await
        .json();
    assert_eq!(rendered["prompt_token_ids"], json!(tokens));
    assert_eq!(rendered["token_ids"], json!(tokens));

    let chat = r#"{"messages": [{"role": "user", "content": "hello"}]}"#;
    let rendered = sim.post("/v1/chat/completions/render", chat).await.json();
    let via_tokenize = sim.post("/tokenize", chat).await.json();
    assert_eq!(rendered["prompt_token_ids"], via_tokenize["tokens"]);
    assert_eq!(rendered["token_ids"], via_tokenize["tokens"]);
    // And generation sees the same prompt.
    let completion = sim.post("/v1/chat/completions", chat).await.json();
    assert_eq!(completion["usage"]["prompt_tokens"], via_tokenize["count"]);
    sim.stop().await;
}

#[tokio::test]
async fn request_ids_follow_x_request_id() {
    let sim = sim("sim-0").await;
    let mut conn = sim.connect().await;
    let body = r#"{"prompt": "x", "max_tokens": 1}"#;
    conn.send(
        "POST",
        "/v1/completions",
        &[("X-Request-Id", "abc123")],
        Some(body),
    )
    .await;
    assert_eq!(conn.response().await.json()["id"], "cmpl-abc123");
    sim.stop().await;
}

#[tokio::test]
async fn metrics_count_tokens_and_requests() {
    let sim = sim("sim-0").await;
    let shared = ids(0, 32);
    cached_tokens_for(&sim, &concat(&shared, &ids(100, 4))).await;
    cached_tokens_for(&sim, &concat(&shared, &ids(200, 4))).await;
    let response = sim.get("/metrics").await;
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain"))
    );
    let text = response.text();
    let labels = format!("{{engine=\"0\",model_name=\"{MODEL}\"}}");
    let at = |name: &str| metric(text, &format!("{name}{labels}"));
    assert_eq!(at("vllm:prefix_cache_queries_total"), 72.0);
    assert_eq!(at("vllm:prefix_cache_hits_total"), 32.0);
    assert_eq!(at("vllm:num_requests_running"), 0.0);
    assert_eq!(at("vllm:num_requests_waiting"), 0.0);
    assert_eq!(at("vllm:generation_tokens_total"), 4.0);
    let success = metric(
        text,
        &format!(
            "vllm:request_success_total{{engine=\"0\",finished_reason=\"length\",model_name=\"{MODEL}\"}}"
        ),
    );
    assert_eq!(success, 2.0);
    for histogram in [
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_queue_time_seconds",
    ] {
        assert!(text.contains(&format!("# TYPE {histogram} histogram\n")));
        assert_eq!(at(&format!("{histogram}_count")), 2.0, "{histogram}");
        let inf = format!("{histogram}_bucket{{engine=\"0\",le=\"+Inf\",model_name=\"{MODEL}\"}}");
        assert_eq!(metric(text, &inf), 2.0, "{histogram}");
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_client_leaving_mid_stream_aborts_the_request() {
    // Slow enough that the stream is surely still going when we leave.
    let sim = Sim::start(Config {
        time_scale: 1.0,
        prefill_overhead_ms: 0.0,
        itl_ms: 20.0,
        ..Config::for_tests("sim-0")
    })
    .await;
    let mut conn = sim.connect().await;
    let body = json!({"prompt": "x", "max_tokens": 5000, "stream": true}).to_string();
    conn.send("POST", "/v1/completions", &[], Some(&body)).await;
    conn.read_some().await;
    drop(conn);

    let abort = format!(
        "vllm:request_success_total{{engine=\"0\",finished_reason=\"abort\",model_name=\"{MODEL}\"}}"
    );
    let mut aborted = 0.0;
    for _ in 0..200 {
        let text = sim.get("/metrics").await.text().to_owned();
        aborted = metric(&text, &abort);
        if aborted == 1.0 {
            assert_eq!(
                metric(
                    &text,
                    &format!("vllm:num_requests_running{{engine=\"0\",model_name=\"{MODEL}\"}}")
                ),
                0.0
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(aborted, 1.0, "the abandoned stream was counted as an abort");
    sim.stop().await;
}

#[tokio::test]
async fn simulators_are_independent_and_named() {
    let a = sim("sim-a").await;
    let b = sim("sim-b").await;
    let prompt = ids(0, 48);
    cached_tokens_for(&a, &prompt).await;
    assert_eq!(
        cached_tokens_for(&b, &prompt).await,
        0,
        "caches are per instance"
    );
    assert_eq!(cached_tokens_for(&a, &prompt).await, 32);
    assert_eq!(a.get("/health").await.header("x-served-by"), Some("sim-a"));
    assert_eq!(b.get("/health").await.header("x-served-by"), Some("sim-b"));
    a.stop().await;
    b.stop().await;
}
