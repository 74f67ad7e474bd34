//! Routing through a running daemon: only backends serving the requested
//! model are chosen, a session header sticks, and several router replicas
//! with no shared state keep multi-turn conversations on the backends that
//! cache them almost as well as one router does.
//!
//! Routing does not depend on the dataplane, so these run on userspace.
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    get, loopback_listener, metric, post_json, start_router, start_router_with, start_sims,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use router_daemon::Dataplane;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::Notify,
};

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";

/// Waits (bounded) until the router has learned every backend's models.
async fn discovered(router: SocketAddr, backends: &[String]) {
    for _ in 0..100 {
        let metrics = get(router, "/metrics").await.text();
        let known = backends.iter().all(|url| {
            metric(
                &metrics,
                &format!("router_backend_models{{backend=\"{url}\",model=\"{MODEL}\"}}"),
            ) == Some(1.0)
        });
        if known {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the router never learned the backends' models");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_a_404_naming_the_served_ones() {
    let (urls, _sims) = start_sims(2).await;
    let (router, _stop) = start_router(urls.clone(), Dataplane::userspace()).await;
    discovered(router, &urls).await;

    let response = post_json(
        router,
        "/v1/completions",
        &json!({"model": "no-such-model", "prompt": "hello", "max_tokens": 4}),
    )
    .await;
    assert_eq!(response.status, 404, "{}", response.text());
    let error = response.json();
    assert_eq!(error["error"]["code"], 404);
    let message = error["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("no-such-model") && message.contains(MODEL),
        "{message}"
    );

    // Without `model`, the fleet's only model serves it.
    let response = post_json(
        router,
        "/v1/completions",
        &json!({"prompt": "hello", "max_tokens": 4}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_header_keeps_unrelated_prompts_on_one_backend() {
    let (urls, _sims) = start_sims(4).await;
    let (router, _stop) = start_router(urls.clone(), Dataplane::userspace()).await;
    discovered(router, &urls).await;
    for session in ["alice", "bob", "carol"] {
        let mut served = HashSet::new();
        for i in 0..12 {
            let body = json!({"model": MODEL, "prompt": format!("unrelated prompt {i} for {session}"), "max_tokens": 4}).to_string();
            let raw = format!(
                "POST /v1/completions HTTP/1.1\r\nHost: r\r\nx-session-id: {session}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let response = integration_tests::exchange_raw(router, raw).await;
            assert_eq!(response.status, 200, "{}", response.text());
            served.insert(
                response
                    .header("x-served-by")
                    .expect("x-served-by")
                    .to_owned(),
            );
        }
        assert_eq!(served.len(), 1, "session {session} moved: {served:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_logic_takes_each_backend_in_turn_whatever_the_prompt() {
    let (urls, _sims) = start_sims(3).await;
    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        config.routing_logic = router_daemon::route::Logic::RoundRobin;
    })
    .await;
    discovered(router, &urls).await;
    let before = get(router, "/metrics").await.text();
    let counted = |metrics: &str| {
        metric(
            metrics,
            "router_route_decisions_total{reason=\"round-robin\"}",
        )
        .unwrap_or(0.0)
    };
    // The tutorial's pair, repeated: the second prompt extends the first,
    // which prefix-aware routing would keep on one backend.
    let mut served = Vec::new();
    for _ in 0..3 {
        for prompt in [
            "Hello, how are you?",
            "Hello, how are you? What is the capital of France?",
        ] {
            let response = post_json(
                router,
                "/v1/completions",
                &json!({"model": MODEL, "prompt": prompt, "max_tokens": 4}),
            )
            .await;
            assert_eq!(response.status, 200, "{}", response.text());
            served.push(
                response
                    .header("x-served-by")
                    .expect("x-served-by")
                    .to_owned(),
            );
        }
    }
    // Each window of three consecutive requests covers every backend once.
    for window in served.chunks(3) {
        let distinct: HashSet<&String> = window.iter().collect();
        assert_eq!(distinct.len(), 3, "not in turn: {served:?}");
    }
    let after = get(router, "/metrics").await.text();
    assert_eq!(counted(&after) - counted(&before), 6.0, "{after}");
}

/// One multi-turn chat workload in the shape of vLLM's multi-turn benchmark:
/// a system prompt shared by every conversation, a first user message of
/// its own per conversation, then turns that resend the whole history.
/// Each request goes to a router picked at random (seeded). Returns the
/// share of prompt tokens served from the sims' prefix caches.
async fn multi_turn_hit_rate(routers: &[SocketAddr], seed: u64) -> f64 {
    const CONVERSATIONS: usize = 16;
    const TURNS: usize = 6;
    let system = "You are a careful assistant for a logistics company. Answer in short, \
                  precise sentences, cite the relevant policy section, and never invent \
                  shipment numbers. Keep a friendly tone and ask for missing details.";
    let mut rng = StdRng::seed_from_u64(seed);
    let mut histories: Vec<Vec<Value>> = (0..CONVERSATIONS)
        .map(|c| {
            vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": format!("Customer {c} here: my parcel to warehouse {c} is late; what are my options under the delay policy?")}),
            ]
        })
        .collect();
    let (mut prompt_tokens, mut cached_tokens) = (0u64, 0u64);
    for turn in 0..TURNS {
        for (c, history) in histories.iter_mut().enumerate() {
            let router = routers[rng.random_range(0..routers.len())];
            let response = post_json(
                router,
                "/v1/chat/completions",
                &json!({"model": MODEL, "messages": history, "max_tokens": 24}),
            )
            .await;
            assert_eq!(response.status, 200, "{}", response.text());
            let answer = response.json();
            let usage = &answer["usage"];
            prompt_tokens += usage["prompt_tokens"].as_u64().expect("prompt_tokens");
            cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
            let content = answer["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_owned();
            history.push(json!({"role": "assistant", "content": content}));
            history.push(json!({"role": "user", "content": format!("Turn {turn} of conversation {c}: and what if it is still late tomorrow?")}));
        }
    }
    cached_tokens as f64 / prompt_tokens as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_conversations_on_their_cache() {
    // One router in front of its own fresh sims: the reference.
    let (urls, _sims_one) = start_sims(4).await;
    let (one, _stop_one) = start_router(urls.clone(), Dataplane::userspace()).await;
    discovered(one, &urls).await;
    let single = multi_turn_hit_rate(&[one], 7).await;

    // Three routers, no shared state, over another set of fresh sims.
    let (urls, _sims_three) = start_sims(4).await;
    let mut routers = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..3 {
        let (router, stop) = start_router(urls.clone(), Dataplane::userspace()).await;
        discovered(router, &urls).await;
        routers.push(router);
        stops.push(stop);
    }
    let replicas = multi_turn_hit_rate(&routers, 7).await;

    assert!(
        single > 0.5,
        "one router reached only {single:.3} of prompt tokens cached"
    );
    assert!(
        replicas >= 0.9 * single,
        "three replicas reached {replicas:.3} cached against {single:.3} for one router"
    );
    eprintln!("multi-turn cached share: one router {single:.3}, three replicas {replicas:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_goes_down_leaves_the_index() {
    let (urls, mut sims) = start_sims(2).await;
    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        config.discovery_interval_ms = 100;
        config.discovery_timeout_ms = 200;
        config.down_after_failures = 1;
    })
    .await;
    discovered(router, &urls).await;
    let mut served = HashSet::new();
    for i in 0..24 {
        let response = post_json(
            router,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": format!("distinct question number {i} about logistics"), "max_tokens": 4}),
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
        served.insert(
            response
                .header("x-served-by")
                .expect("x-served-by")
                .to_owned(),
        );
    }
    assert_eq!(
        served.len(),
        2,
        "24 new conversations all went to {served:?}"
    );
    let entries = |metrics: &str| metric(metrics, "router_prefix_index_entries").unwrap_or(0.0);
    let before = entries(&get(router, "/metrics").await.text());

    // sim-1 stops: discovery marks it down and its index entries go.
    drop(sims.remove(1));
    let up = format!("router_backend_up{{backend=\"{}\"}}", urls[1]);
    let mut after = before;
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = get(router, "/metrics").await.text();
        after = entries(&metrics);
        if metric(&metrics, &up) == Some(0.0) && after < before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        after < before,
        "the index kept {after} of {before} entries after sim-1 went down; metrics:\n{metrics}"
    );
    // Everything still lands on the backend that is left.
    let response = post_json(
        router,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "distinct question number 1 about logistics", "max_tokens": 4}),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.header("x-served-by"), Some("sim-0"));
}

/// A fake vLLM engine named `name` whose `/metrics` reports a completion
/// as queued while it is in progress, and which answers a completion only
/// after a scrape has seen it queued (or after 2 s): the router's last
/// scrape of it then always counts a request that has since ended.
async fn queueing_engine(name: &'static str) -> String {
    let listener = loopback_listener();
    let addr = listener.local_addr().expect("addr");
    let busy = Arc::new(AtomicUsize::new(0));
    let scraped = Arc::new(Notify::new());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_queueing(
                stream,
                name,
                Arc::clone(&busy),
                Arc::clone(&scraped),
            ));
        }
    });
    format!("http://{addr}")
}

async fn serve_queueing(
    mut stream: TcpStream,
    name: &str,
    busy: Arc<AtomicUsize>,
    scraped: Arc<Notify>,
) {
    let mut buf = Vec::new();
    loop {
        // One request: its head, then a Content-Length body.
        let head_end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let body_len: usize = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |len| len.trim().parse().expect("content-length"));
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        let path = head
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let body = match path.as_str() {
            "/v1/models" => {
                json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).to_string()
            }
            "/metrics" => {
                let waiting = busy.load(Ordering::SeqCst);
                if waiting > 0 {
                    scraped.notify_waiters();
                }
                format!("vllm:num_requests_waiting {waiting}\nvllm:num_requests_running 0\n")
            }
            _ => {
                busy.fetch_add(1, Ordering::SeqCst);
                let _ = tokio::time::timeout(Duration::from_secs(2), scraped.notified()).await;
                busy.fetch_sub(1, Ordering::SeqCst);
                json!({"object": "text_completion", "choices": [{"index": 0, "text": "Paris."}]})
                    .to_string()
            }
        };
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: {name}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The tutorial's two requests while discovery keeps catching each one
/// queued in its engine: the scraped queue is the router's own request,
/// counted exactly already, so once it ended the continuation still finds
/// its backend idle and stays there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scraped_queue_of_our_own_requests_does_not_move_a_continuation() {
    let urls = vec![queueing_engine("a").await, queueing_engine("b").await];
    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        // Scrapes come often; the next one after each answer comes well
        // after the continuation has been routed.
        config.discovery_interval_ms = 300;
    })
    .await;
    discovered(router, &urls).await;
    for country in ["France", "Japan", "Peru", "Kenya"] {
        let first = format!("What is the capital of {country}?");
        let served = |response: &integration_tests::Response| {
            assert_eq!(response.status, 200, "{}", response.text());
            response
                .header("x-served-by")
                .expect("x-served-by")
                .to_owned()
        };
        let opening = served(
            &post_json(
                router,
                "/v1/completions",
                &json!({"model": MODEL, "prompt": first, "max_tokens": 8}),
            )
            .await,
        );
        let follow_up = served(
            &post_json(
                router,
                "/v1/completions",
                &json!({"model": MODEL, "prompt": format!("{first} Paris. And its population?"), "max_tokens": 8}),
            )
            .await,
        );
        assert_eq!(follow_up, opening, "the {country} conversation moved");
    }
}
