//! Routing through a running daemon: only backends serving the requested
//! model are chosen, a session header sticks, and several router replicas
//! with no shared state keep multi-turn conversations on the backends that
//! cache them almost as well as one router does; a new prompt family goes
//! where the engine's KV cache has room for it.
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
    Response, Stopper, get, loopback_listener, metric, post_json, read_response, start_router,
    start_router_with, start_sim, start_sims,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use router_daemon::{Dataplane, config::PatienceWhen};
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
    while let Some((path, _)) = read_request(&mut stream, &mut buf).await {
        let body = match path.as_str() {
            "/v1/models" => models(),
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
                completion()
            }
        };
        if !respond(&mut stream, name, &body).await {
            return;
        }
    }
}

/// Reads one request from `stream` (its head, then a Content-Length
/// body), keeping what follows in `buf`: its path and body, or None once
/// the stream ends.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
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
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + body_len].to_vec();
    buf.drain(..head_end + body_len);
    let path = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Some((path, body))
}

/// A fake engine's `/v1/models` answer.
fn models() -> String {
    json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}).to_string()
}

/// A fake engine's completion.
fn completion() -> String {
    json!({"object": "text_completion", "choices": [{"index": 0, "text": "Paris."}]}).to_string()
}

/// Writes an empty answer with `status`; false once the client has gone.
async fn respond_status(stream: &mut TcpStream, status: u16, reason: &str) -> bool {
    let response = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n");
    stream.write_all(response.as_bytes()).await.is_ok()
}

/// Writes a 200 answer carrying `body` from the engine called `name`;
/// false once the client has gone.
async fn respond(stream: &mut TcpStream, name: &str, body: &str) -> bool {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-served-by: {name}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await.is_ok()
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
        let opening = served_by(
            &post_json(
                router,
                "/v1/completions",
                &json!({"model": MODEL, "prompt": first, "max_tokens": 8}),
            )
            .await,
        );
        let follow_up = served_by(
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

/// A fake vLLM engine that holds every completion whose `user` is `hold`
/// until [`HoldingEngine::release`], and reports the ones it holds as
/// running in `/metrics` (or answers 404 there, when started without
/// metrics); it answers any other completion at once.
struct HoldingEngine {
    url: String,
    /// Completions held now.
    held: Arc<AtomicUsize>,
    release: Arc<Notify>,
    /// `GET /metrics` requests so far.
    scrapes: Arc<AtomicUsize>,
}

impl HoldingEngine {
    async fn start(name: &'static str) -> Self {
        Self::start_with(name, true).await
    }

    async fn start_with(name: &'static str, metrics: bool) -> Self {
        let listener = loopback_listener();
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let held = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let scrapes = Arc::new(AtomicUsize::new(0));
        let (counter, gate, scraped) = (
            Arc::clone(&held),
            Arc::clone(&release),
            Arc::clone(&scrapes),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (held, release, scraped) = (
                    Arc::clone(&counter),
                    Arc::clone(&gate),
                    Arc::clone(&scraped),
                );
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((path, body)) = read_request(&mut stream, &mut buf).await {
                        let answer = match path.as_str() {
                            "/v1/models" => models(),
                            "/metrics" => {
                                scraped.fetch_add(1, Ordering::SeqCst);
                                if !metrics {
                                    if !respond_status(&mut stream, 404, "Not Found").await {
                                        return;
                                    }
                                    continue;
                                }
                                format!(
                                    "vllm:num_requests_waiting 0\nvllm:num_requests_running {}\n",
                                    held.load(Ordering::SeqCst)
                                )
                            }
                            _ => {
                                let request: Value = serde_json::from_slice(&body).expect("json");
                                if request["user"] == "hold" {
                                    let released = release.notified();
                                    held.fetch_add(1, Ordering::SeqCst);
                                    released.await;
                                    held.fetch_sub(1, Ordering::SeqCst);
                                }
                                completion()
                            }
                        };
                        if !respond(&mut stream, name, &answer).await {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            url,
            held,
            release,
            scrapes,
        }
    }

    /// Waits (bounded) until the engine holds `n` completions.
    async fn holds(&self, n: usize) {
        for _ in 0..400 {
            if self.held.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "{} never held {n} completions (holds {})",
            self.url,
            self.held.load(Ordering::SeqCst)
        );
    }

    /// Answers every completion held now.
    fn release(&self) {
        self.release.notify_waiters();
    }
}

/// Waits (bounded) until the router's `router_backend_shared` gauge reads
/// `shared` for every backend in `urls` (1: other clients' requests seen,
/// 0: only the router's, -1: not known yet).
async fn shared_gauge(router: SocketAddr, urls: &[&str], shared: f64) {
    let readings: Vec<_> = urls.iter().map(|&url| (url, shared)).collect();
    backend_gauge(router, "router_backend_shared", &readings).await;
}

/// Waits (bounded) until the router's per-backend gauge `name` reads each
/// of `readings` (a backend URL, a value).
async fn backend_gauge(router: SocketAddr, name: &str, readings: &[(&str, f64)]) {
    for _ in 0..400 {
        let metrics = get(router, "/metrics").await.text();
        if readings.iter().all(|&(url, value)| {
            metric(&metrics, &format!("{name}{{backend=\"{url}\"}}")) == Some(value)
        }) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{name} never read {readings:?}");
}

/// A 3.3 KiB prompt of its own family (its first bytes differ from every
/// other's): shorter than a completion's conversation prefix, so the whole
/// prompt is what patience weighs.
fn family_prompt(family: usize) -> String {
    format!(
        "{family:05} {}",
        "You answer questions about one tenant's documents. ".repeat(64)
    )
}

/// Sends a [`family_prompt`] through `router` that a [`HoldingEngine`]
/// holds until released.
fn send_held(router: SocketAddr, family: usize) -> tokio::task::JoinHandle<Response> {
    let request =
        json!({"model": MODEL, "prompt": family_prompt(family), "max_tokens": 4, "user": "hold"});
    tokio::spawn(async move { post_json(router, "/v1/completions", &request).await })
}

/// The backend that served a successful `response` (its `x-served-by`).
fn served_by(response: &Response) -> String {
    assert_eq!(response.status, 200, "{}", response.text());
    response
        .header("x-served-by")
        .expect("x-served-by")
        .to_owned()
}

/// Releases what `engines` hold, then the backend that served each of
/// `tasks`, in their order.
async fn release_and_collect(
    engines: &[HoldingEngine],
    tasks: impl IntoIterator<Item = tokio::task::JoinHandle<Response>>,
) -> Vec<String> {
    for engine in engines {
        engine.release();
        engine.holds(0).await;
    }
    let mut order = Vec::new();
    for task in tasks {
        order.push(served_by(&task.await.expect("request task")));
    }
    order
}

/// Families ([`family_prompt`]) whose first prompt goes to engine `a` on
/// an idle fleet of `a` and `b` (`urls`), at least `on_a` of them, and those
/// that go to `b`, at least one: where every replica places them, by
/// rendezvous hashing, as a router without placement patience shows.
async fn families_by_rendezvous(urls: &[String], on_a: usize) -> (Vec<usize>, Vec<usize>) {
    let (probe, _stop_probe) = start_router_with(urls.to_vec(), Dataplane::userspace(), |config| {
        config.placement_patience_when = PatienceWhen::Never;
    })
    .await;
    discovered(probe, urls).await;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for family in 0..200 {
        let request = json!({"model": MODEL, "prompt": family_prompt(family), "max_tokens": 4});
        let response = post_json(probe, "/v1/completions", &request).await;
        assert_eq!(response.status, 200, "{}", response.text());
        match response.header("x-served-by") {
            Some("a") => a.push(family),
            _ => b.push(family),
        }
        if a.len() >= on_a && !b.is_empty() {
            return (a, b);
        }
    }
    panic!("200 families all hash alike");
}

/// A router alone in front of its engines spreads a new prompt off its
/// rendezvous backend once two prompts of its size queue for prefill
/// there (placement patience); once a scrape shows another client's
/// requests on a backend, new prompts go where every replica would place
/// them, queued prefill or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_prompts_spread_by_prefill_only_while_the_router_is_alone() {
    let engines = [
        HoldingEngine::start("a").await,
        HoldingEngine::start("b").await,
    ];
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let (on_a, on_b) = families_by_rendezvous(&urls, 5).await;

    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        config.discovery_interval_ms = 100;
        config.placement_patience = 1.0;
        // Patience alone: with traffic that shares this little, an idle
        // engine would take the second prompt (see the test below).
        config.idle_below_reuse = 0.0;
    })
    .await;
    discovered(router, &urls).await;
    let send = |family: usize| send_held(router, family);
    // Until scrapes have seen its requests on both engines and nothing
    // else, the router cannot tell it is alone.
    let both = [urls[0].as_str(), urls[1].as_str()];
    shared_gauge(router, &both, -1.0).await;
    let warm_up = [send(on_a[4]), send(on_b[0])];
    shared_gauge(router, &both, 0.0).await;
    for engine in &engines {
        engine.release();
        engine.holds(0).await;
    }
    for task in warm_up {
        assert_eq!(task.await.expect("warm-up task").status, 200);
    }

    // Alone: two prompts queue on a; the third goes to b.
    let first = send(on_a[0]);
    engines[0].holds(1).await;
    let second = send(on_a[1]);
    engines[0].holds(2).await;
    let third = send(on_a[2]);
    engines[1].holds(1).await;
    assert_eq!(engines[0].held.load(Ordering::SeqCst), 2);

    // Another client's request on b, seen by the next scrape.
    let direct = {
        let engine: SocketAddr = urls[1].trim_start_matches("http://").parse().expect("addr");
        let request = json!({"model": MODEL, "prompt": "direct", "max_tokens": 4, "user": "hold"});
        tokio::spawn(async move { post_json(engine, "/v1/completions", &request).await })
    };
    engines[1].holds(2).await;
    shared_gauge(router, &both[1..], 1.0).await;
    engines[1].release();
    engines[1].holds(0).await;
    // Shared: the fourth waits behind two prompts on a, where every
    // replica places it, though b is idle.
    let fourth = send(on_a[3]);
    engines[0].holds(3).await;
    assert_eq!(engines[1].held.load(Ordering::SeqCst), 0);

    engines[0].release();
    let mut order = Vec::new();
    for task in [first, second, third, fourth] {
        order.push(served_by(&task.await.expect("request task")));
    }
    assert_eq!(order, ["a", "a", "b", "a"]);
    assert_eq!(served_by(&direct.await.expect("direct task")), "b");
}

/// Before any scrape shows who else sends to the engines (here they never
/// answer `/metrics`, so it stays unknown), the default keeps a cold
/// start's new prompts where every replica would place them, queued
/// prefill or not. A router told it has no peers (`--peers 0`, or the
/// Kubernetes peer selector) spreads them, as does `--placement-patience-when
/// until-shared`, unless peers are known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_spreads_only_where_the_router_is_known_to_be_alone() {
    let engines = [
        HoldingEngine::start_with("a", false).await,
        HoldingEngine::start_with("b", false).await,
    ];
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let (on_a, _) = families_by_rendezvous(&urls, 12).await;
    let both = [urls[0].as_str(), urls[1].as_str()];
    // The patience setting, the peers known, the families sent, where they
    // go, and the `router_backend_shared` gauge meanwhile.
    let cases = [
        (PatienceWhen::Alone, None, &on_a[..3], ["a", "a", "a"], -1.0),
        (
            PatienceWhen::Alone,
            Some(0),
            &on_a[3..6],
            ["a", "a", "b"],
            0.0,
        ),
        (
            PatienceWhen::UntilShared,
            None,
            &on_a[6..9],
            ["a", "a", "b"],
            -1.0,
        ),
        (
            PatienceWhen::UntilShared,
            Some(2),
            &on_a[9..12],
            ["a", "a", "a"],
            1.0,
        ),
    ];
    for (when, peers, families, expected, shared) in cases {
        let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
            config.placement_patience_when = when;
            config.peers = peers;
            // The second prompt waits behind the first; the third spreads.
            config.placement_patience = 1.0;
            // Patience alone decides: an idle engine first would take the
            // second to b already where the router is alone.
            config.idle_below_reuse = 0.0;
        })
        .await;
        discovered(router, &urls).await;
        let send = |family: usize| send_held(router, family);
        // Three prompts of families that all hash onto a, each sent once
        // the one before is queued there.
        let first = send(families[0]);
        engines[0].holds(1).await;
        let second = send(families[1]);
        engines[0].holds(2).await;
        let third = send(families[2]);
        match expected[2] {
            "a" => engines[0].holds(3).await,
            _ => engines[1].holds(1).await,
        }
        shared_gauge(router, &both, shared).await;
        let order = release_and_collect(&engines, [first, second, third]).await;
        assert_eq!(order, expected, "{when:?}, peers {peers:?}");
    }
}

/// A router alone in front of its engines sends a new prompt, when every
/// engine is prefilling as much, to the one whose prefill began longest
/// ago: its step ends first. Without that rule the rendezvous order of the
/// prompt breaks the tie, whatever the engines' progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_a_new_prompt_waits_behind_the_oldest_prefill() {
    let engines = [
        HoldingEngine::start_with("a", false).await,
        HoldingEngine::start_with("b", false).await,
    ];
    let urls: Vec<String> = engines.iter().map(|e| e.url.clone()).collect();
    let (on_a, on_b) = families_by_rendezvous(&urls, 2).await;
    for (margin, expected) in [(0.25, ["a", "b", "a"]), (0.0, ["a", "b", "b"])] {
        let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
            config.peers = Some(0);
            config.recency_margin = margin;
            // No lead for a prompt's rendezvous backend, so that only the
            // engines' load and recency decide.
            config.rendezvous_weight = 0.0;
            config.family_weight = 0.0;
        })
        .await;
        discovered(router, &urls).await;
        // Both idle: the first goes to its rendezvous backend, a; the
        // second, also a's, to b, which prefills nothing.
        let first = send_held(router, on_a[0]);
        engines[0].holds(1).await;
        // Starts a few milliseconds apart count as one moment; these are
        // further apart however busy the machine.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = send_held(router, on_a[1]);
        engines[1].holds(1).await;
        // Each prefills one prompt of the same size; a's began first.
        let third = send_held(router, on_b[0]);
        match expected[2] {
            "a" => engines[0].holds(2).await,
            _ => engines[1].holds(2).await,
        }
        let order = release_and_collect(&engines, [first, second, third]).await;
        assert_eq!(order, expected, "recency margin {margin}");
        // The decision says why, for dashboards.
        let metrics = get(router, "/metrics").await.text();
        let by_recency = metric(
            &metrics,
            "router_route_decisions_total{reason=\"oldest-prefill\"}",
        );
        let once = if margin > 0.0 { 1.0 } else { 0.0 };
        assert_eq!(by_recency, Some(once), "recency margin {margin}");
    }
}

/// A router alone whose recent traffic shares little sends a new prompt
/// to an idle engine, not to one streaming another request's reply, even
/// where the prompt hashes onto that one: its prefill would hold the
/// other's decoding up. With `--idle-below-reuse 0` the prompt's
/// rendezvous order decides, as it does for replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_a_new_prompt_takes_an_idle_engine_over_one_answering_another() {
    let (urls, _stops) = paced_engines(&["a", "b"]).await;
    let (on_a, _) = families_by_rendezvous(&urls, 4).await;
    for (below, expected) in [(0.5, "b"), (0.0, "a")] {
        let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
            config.peers = Some(0);
            config.idle_below_reuse = below;
        })
        .await;
        discovered(router, &urls).await;
        // Traffic that shares nothing: the reuse rate falls from its cold
        // start's 1 to 2 in 14.
        for i in 0..12 {
            let prompt = format!("{i:03} A question of its own?");
            complete(router, &prompt).await;
        }
        // A long reply streams from a, its prompt's rendezvous engine.
        let mut streaming = start_stream(router, &family_prompt(on_a[0]), 300).await;
        assert!(
            streaming.received.contains("x-served-by: a"),
            "{}",
            streaming.received
        );
        let mut order = Vec::new();
        for &family in &on_a[1..4] {
            // What the router sees: a answering, b idle.
            let now = [(urls[0].as_str(), 1.0), (urls[1].as_str(), 0.0)];
            backend_gauge(router, "router_backend_in_flight", &now).await;
            order.push(complete(router, &family_prompt(family)).await.0);
        }
        assert_eq!(order, [expected; 3], "idle below reuse {below}");
        streaming.still_streaming().await;
        let metrics = get(router, "/metrics").await.text();
        let idle = metric(&metrics, "router_route_decisions_total{reason=\"idle\"}");
        let taken = if below > 0.0 { 3.0 } else { 0.0 };
        assert_eq!(idle, Some(taken), "idle below reuse {below}");
    }
}

/// A router alone sends a new prompt that hashes onto an engine answering
/// another request to an idle engine, also where traffic shares; of two idle
/// engines, to the one that answered the same client connection's previous
/// request. That client has moved on from whatever it was doing there,
/// while the other idle engine may be between two turns of another
/// client's conversation, whose next turn would wait for this prompt's
/// prefill (in `router-bench quality`, conversations whose turns ended
/// together made a new conversation land on such an engine one time in
/// two). Another connection's prompt goes by its rendezvous order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_prompt_takes_the_idle_engine_its_connection_left() {
    let (urls, _stops) = paced_engines(&["a", "b", "c"]).await;
    // Families by where their first prompt goes on an idle fleet: first of
    // all three engines, and first of a and b alone.
    let probe = |urls: Vec<String>| async move {
        let (probe, stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
            config.placement_patience_when = PatienceWhen::Never;
        })
        .await;
        discovered(probe, &urls).await;
        (probe, stop)
    };
    let (of_three, _stop_three) = probe(urls.clone()).await;
    let (of_two, _stop_two) = probe(urls[..2].to_vec()).await;
    let (mut on_a, mut on_c, mut on_c_then_b) = (None, None, Vec::new());
    for family in 0..300 {
        let first = complete(of_three, &family_prompt(family)).await.0;
        match first.as_str() {
            "a" if on_a.is_none() => on_a = Some(family),
            "c" if on_c.is_none() => on_c = Some(family),
            "c" if on_c_then_b.len() < 2
                && complete(of_two, &family_prompt(family)).await.0 == "b" =>
            {
                on_c_then_b.push(family);
            }
            _ => {}
        }
        if on_a.is_some() && on_c.is_some() && on_c_then_b.len() == 2 {
            break;
        }
    }
    let (Some(on_a), Some(on_c), &[new, other]) = (on_a, on_c, &on_c_then_b[..]) else {
        panic!("300 families never hashed every way needed");
    };

    // The router's defaults, alone.
    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        config.peers = Some(0);
    })
    .await;
    discovered(router, &urls).await;
    // One client connection, kept alive: its first request goes to a.
    let mut client = TcpStream::connect(router).await.expect("connect");
    let send = |prompt: String| {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4}).to_string();
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    client
        .write_all(send(family_prompt(on_a)).as_bytes())
        .await
        .expect("send");
    assert_eq!(served_by(&read_response(&mut client).await), "a");
    // Traffic that shares: its siblings follow it there, and most recent
    // requests have followed a cached prefix.
    for question in 0..6 {
        client
            .write_all(send(sibling_prompt(on_a, question)).as_bytes())
            .await
            .expect("send");
        assert_eq!(served_by(&read_response(&mut client).await), "a");
    }
    // Another client's long reply streams from c.
    let mut streaming = start_stream(router, &family_prompt(on_c), 300).await;
    assert!(
        streaming.received.contains("x-served-by: c"),
        "{}",
        streaming.received
    );
    // What the router sees: c answering, a and b idle.
    let now = [
        (urls[0].as_str(), 0.0),
        (urls[1].as_str(), 0.0),
        (urls[2].as_str(), 1.0),
    ];
    backend_gauge(router, "router_backend_in_flight", &now).await;
    // A new prompt hashing onto c, then b: on the same connection, a.
    client
        .write_all(send(family_prompt(new)).as_bytes())
        .await
        .expect("send");
    assert_eq!(served_by(&read_response(&mut client).await), "a");
    // The same kind of prompt on a connection of its own: b.
    assert_eq!(complete(router, &family_prompt(other)).await.0, "b");
    streaming.still_streaming().await;
    let metrics = get(router, "/metrics").await.text();
    let idle = metric(&metrics, "router_route_decisions_total{reason=\"idle\"}");
    assert_eq!(idle, Some(2.0));
}

/// Engines named `ids` that take a decode step every 20 ms, so a 300-token
/// reply streams for six seconds or more, however busy the machine; their
/// URLs and what stops them.
async fn paced_engines(ids: &[&'static str]) -> (Vec<String>, Vec<Stopper>) {
    let mut urls = Vec::new();
    let mut stops = Vec::new();
    for &id in ids {
        let (addr, stop) = start_sim(vllm_sim::Config {
            time_scale: 1.0,
            itl_ms: 20.0,
            ..vllm_sim::Config::for_tests(id)
        })
        .await;
        urls.push(format!("http://{addr}"));
        stops.push(stop);
    }
    (urls, stops)
}

/// A streamed completion in progress: its connection, and what of the
/// response had come when it started (lower case).
struct Streaming {
    stream: TcpStream,
    received: String,
}

impl Streaming {
    /// Reads (bounded) one more piece of the reply: it has not ended.
    async fn still_streaming(&mut self) {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), self.stream.read(&mut buf))
            .await
            .expect("the reply goes on streaming")
            .expect("read");
        assert!(n > 0, "the reply ended early");
    }
}

/// Starts a streamed completion of `max_tokens` for `prompt` through
/// `router`, and waits (bounded) for its first token.
async fn start_stream(router: SocketAddr, prompt: &str, max_tokens: usize) -> Streaming {
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": true})
        .to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(router).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !received.windows(5).any(|w| w == b"data:") {
            let n = stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&received));
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first token in time");
    let received = String::from_utf8_lossy(&received).to_lowercase();
    Streaming { stream, received }
}

/// A backend whose `/metrics` fails gets a few early scrapes once requests
/// start, then only discovery's interval: never one every 25 ms for as long
/// as requests are in flight. Who else sends there stays unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_scrapes_of_a_backend_without_metrics_are_bounded() {
    let engine = HoldingEngine::start_with("a", false).await;
    let urls = vec![engine.url.clone()];
    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        // Only the start-up probe comes at the interval.
        config.discovery_interval_ms = 3_600_000;
    })
    .await;
    discovered(router, &urls).await;
    let held = {
        let request = json!({"model": MODEL, "prompt": "hold me", "max_tokens": 4, "user": "hold"});
        tokio::spawn(async move { post_json(router, "/v1/completions", &request).await })
    };
    engine.holds(1).await;
    // Unbounded, a second is 40 scrapes; on a busy machine fewer, never more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..20 {
        let response = post_json(
            router,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "and me", "max_tokens": 4}),
        )
        .await;
        assert_eq!(response.status, 200, "{}", response.text());
    }
    let scrapes = engine.scrapes.load(Ordering::SeqCst);
    assert!(
        scrapes <= 13,
        "{scrapes} scrapes: one at start, at most 12 early"
    );
    shared_gauge(router, &[urls[0].as_str()], -1.0).await;
    engine.release();
    assert_eq!(held.await.expect("held task").status, 200);
}

/// `family_prompt(family)` followed by a question of its own: a sibling.
fn sibling_prompt(family: usize, question: usize) -> String {
    format!("{} Question {question}?", family_prompt(family))
}

/// Completes `prompt` (4 tokens) through `router`; returns who served it
/// and how many of its prompt tokens were cached.
async fn complete(router: SocketAddr, prompt: &str) -> (String, u64, u64) {
    let request = json!({"model": MODEL, "prompt": prompt, "max_tokens": 4});
    let response = post_json(router, "/v1/completions", &request).await;
    assert_eq!(response.status, 200, "{}", response.text());
    let served = response
        .header("x-served-by")
        .expect("x-served-by")
        .to_owned();
    let usage = &response.json()["usage"];
    let prompt_tokens = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let cached = usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    (served, prompt_tokens, cached)
}

/// Two engines ("a", "b") whose KV caches hold `room` prompt families of
/// [`sibling_prompt`]'s size (with their questions); returns their URLs,
/// what stops them, the key bytes per token of those prompts, and the
/// tokens each cache holds.
async fn engines_holding(room: f64) -> (Vec<String>, Vec<Stopper>, f64, u64) {
    // A family prompt's size in tokens, from a throwaway engine.
    let (scratch, _stop_scratch) = start_sim(vllm_sim::Config::for_tests("scratch")).await;
    let (_, family_tokens, _) = complete(scratch, &sibling_prompt(0, 0)).await;
    let bytes_per_token = sibling_prompt(0, 0).len() as f64 / family_tokens as f64;
    let blocks = (family_tokens as f64 * room / 16.0) as usize;
    let mut urls = Vec::new();
    let mut stops = Vec::new();
    for id in ["a", "b"] {
        let config = vllm_sim::Config {
            block_size: 16,
            kv_cache_blocks: blocks,
            ..vllm_sim::Config::for_tests(id)
        };
        let (addr, stop) = start_sim(config).await;
        urls.push(format!("http://{addr}"));
        stops.push(stop);
    }
    (urls, stops, bytes_per_token, blocks as u64 * 16)
}

/// Four prompt families of which the first three hash onto engine "a" of
/// `urls` and the fourth onto "b": where each family's first prompt goes
/// when caches are not weighed, its rendezvous backend. The probes share
/// only their first 2 KiB, the placement key, with the families; the
/// engines' LRU drops them first.
async fn three_families_on_a_and_one_on_b(urls: &[String]) -> [usize; 4] {
    let (probe, _stop_probe) = start_router_with(urls.to_vec(), Dataplane::userspace(), |config| {
        config.bytes_per_token = 0.0;
        config.placement_patience_when = PatienceWhen::Never;
    })
    .await;
    discovered(probe, urls).await;
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    for family in 100..400 {
        let placement_key = &family_prompt(family)[..2048];
        match complete(probe, &format!("{placement_key} probe"))
            .await
            .0
            .as_str()
        {
            "a" => on_a.push(family),
            _ => on_b.push(family),
        }
        if on_a.len() >= 3 && !on_b.is_empty() {
            break;
        }
    }
    assert!(
        on_a.len() >= 3 && !on_b.is_empty(),
        "300 families all hash alike"
    );
    [on_a[0], on_a[1], on_a[2], on_b[0]]
}

/// Waits until `router` reports that every engine of `urls` holds
/// `tokens` in its KV cache.
async fn cache_sizes_known(router: SocketAddr, urls: &[String], tokens: u64) {
    for _ in 0..100 {
        let metrics = get(router, "/metrics").await.text();
        let sized = urls.iter().all(|url| {
            metric(
                &metrics,
                &format!("router_backend_kv_cache_tokens{{backend=\"{url}\"}}"),
            ) == Some(tokens as f64)
        });
        if sized {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{router} never read the engines' cache sizes");
}

/// Two engines whose KV caches hold two prompt families each, and four
/// families, three of which hash onto engine a: the router reads each
/// engine's cache size from its `/metrics` and places the third family
/// that hashes onto a on b, where it fits, so every later request of
/// every family finds its prefix cached. (Placed by hashing alone, a holds
/// three families, evicts and recomputes them in turn.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_family_goes_where_it_fits_beside_the_families_in_use() {
    // Room for two families and their questions, not three.
    let (urls, _stops, bytes_per_token, tokens) = engines_holding(2.5).await;
    let families = three_families_on_a_and_one_on_b(&urls).await;

    let (router, _stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
        config.bytes_per_token = bytes_per_token;
    })
    .await;
    discovered(router, &urls).await;
    // The router knows both caches' sizes before the first family.
    cache_sizes_known(router, &urls, tokens).await;
    // Each family's first two questions, one family after another.
    let mut home = Vec::new();
    for &family in &families {
        let (first, _, _) = complete(router, &sibling_prompt(family, 0)).await;
        let (second, _, cached) = complete(router, &sibling_prompt(family, 1)).await;
        assert_eq!(first, second, "family {family}'s sibling followed it");
        assert!(cached > 0, "family {family}'s sibling found it cached");
        home.push(first);
    }
    assert_eq!(home, ["a", "a", "b", "b"], "the third family hashed onto a");
    let metrics = get(router, "/metrics").await.text();
    assert_eq!(
        metric(
            &metrics,
            "router_route_decisions_total{reason=\"cache-full\"}"
        ),
        Some(1.0)
    );
    // Round after round, every family's question finds its prefix cached
    // on its engine.
    for question in 2..5 {
        for (&family, home) in families.iter().zip(&home) {
            let (served, prompt_tokens, cached) =
                complete(router, &sibling_prompt(family, question)).await;
            assert_eq!(&served, home, "family {family}");
            assert!(
                cached + 32 >= prompt_tokens,
                "family {family}, question {question}: {cached} of {prompt_tokens} tokens cached"
            );
        }
    }
}

/// The same two engines and four families, behind three routers that each
/// know they have two peers, with no shared state: each sees the families
/// in its own order, and only the families it sent itself. Each lays the
/// families out by room, ranked alike, so all three move the same family
/// of the three that hash onto a to b, and every later request of every
/// family, through any router, finds its prefix cached on one engine.
/// (Weighing caches by what each sent, in the order it came, they would
/// each move another.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_move_the_same_family_off_a_full_cache() {
    let (urls, _stops, bytes_per_token, tokens) = engines_holding(2.75).await;
    let families = three_families_on_a_and_one_on_b(&urls).await;
    let mut routers = Vec::new();
    let mut router_stops = Vec::new();
    for _ in 0..3 {
        let (router, stop) = start_router_with(urls.clone(), Dataplane::userspace(), |config| {
            config.bytes_per_token = bytes_per_token;
            config.peers = Some(2);
        })
        .await;
        discovered(router, &urls).await;
        cache_sizes_known(router, &urls, tokens).await;
        routers.push(router);
        router_stops.push(stop);
    }
    // Two questions of each family through each router, in an order of
    // its own.
    for (r, &router) in routers.iter().enumerate() {
        for question in 0..2 {
            for k in 0..families.len() {
                let family = families[(k + r) % families.len()];
                complete(router, &sibling_prompt(family, 10 * r + question)).await;
            }
        }
    }
    // One more round lets the engines drop what the layout moved (while
    // the routers learned the families, a held three of them).
    for &router in &routers {
        for &family in &families {
            complete(router, &sibling_prompt(family, 99)).await;
        }
    }
    // Round after round, each family's question goes to one engine through
    // every router, and finds its prefix cached there.
    let mut homes: Vec<Option<String>> = vec![None; families.len()];
    for question in 100..103 {
        for &router in &routers {
            for (&family, home) in families.iter().zip(homes.iter_mut()) {
                let (served, prompt_tokens, cached) =
                    complete(router, &sibling_prompt(family, question)).await;
                let home = home.get_or_insert_with(|| served.clone());
                assert_eq!(&served, home, "family {family} through {router}");
                assert!(
                    cached + 32 >= prompt_tokens,
                    "family {family}, question {question} through {router}: \
                     {cached} of {prompt_tokens} tokens cached"
                );
            }
        }
    }
    let on_a = homes.iter().filter(|h| h.as_deref() == Some("a")).count();
    assert_eq!(on_a, 2, "two families on each engine: {homes:?}");
    assert_eq!(homes[3].as_deref(), Some("b"), "{homes:?}");
}
