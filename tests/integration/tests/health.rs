//! Passive health and retries, on every dataplane, with two backends: one
//! that misbehaves as told and one that always answers.
//!
//! - A 503 that reached no client byte sends the request on to the other
//!   backend; with `--retries 0` the client gets the backend's own 503.
//!   The prefix index then holds the prompt only where it was served.
//! - A backend that resets inside its response head, or accepts and never
//!   answers, fails its requests (502, 504: they may have reached the
//!   engine, so they are not retried), is ejected after
//!   `--eject-after-failures`, gets no request while ejected, and is
//!   readmitted by one trial request once it answers again.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    Stopper, dataplane_or_skip, each_mode, get, loopback_listener, metric, post_json, read_request,
    read_response, start_router_with,
};
use router_daemon::{Config, dataplane::Mode};
use serde_json::json;
use tokio::{io::AsyncWriteExt as _, net::TcpStream};

/// How a backend answers, switchable while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Behaviour {
    /// 200 naming the backend.
    Answer,
    /// 503 naming the backend.
    Unavailable,
    /// Part of a response head, then a reset.
    ResetMidHead,
    /// Nothing, ever (the connection stays open).
    Silent,
    /// At the next request: stop listening, and close that connection
    /// without an answer (a server going away under a kept-alive
    /// connection).
    Vanish,
}

/// A backend and its switch; `requests` counts what reached it.
struct Backend {
    url: String,
    behaviour: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
}

/// What a backend's connections share: its switch, its count, and how to
/// stop its listener.
#[derive(Clone)]
struct Shared {
    name: &'static str,
    behaviour: Arc<AtomicU8>,
    requests: Arc<AtomicUsize>,
    listening: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

impl Backend {
    async fn start(name: &'static str, behaviour: Behaviour) -> Self {
        let listener = loopback_listener();
        let addr = listener.local_addr().expect("addr");
        let shared = Shared {
            name,
            behaviour: Arc::new(AtomicU8::new(behaviour as u8)),
            requests: Arc::new(AtomicUsize::new(0)),
            listening: Arc::default(),
        };
        let connections = shared.clone();
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, connections.clone()));
            }
        });
        *shared.listening.lock().expect("lock") = Some(accepting.abort_handle());
        Self {
            url: format!("http://{addr}"),
            behaviour: shared.behaviour,
            requests: shared.requests,
        }
    }

    fn set(&self, behaviour: Behaviour) {
        self.behaviour.store(behaviour as u8, Ordering::SeqCst);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn serve(mut stream: TcpStream, shared: Shared) {
    let Shared {
        name,
        behaviour,
        requests,
        listening,
    } = shared;
    let mut pending = Vec::new();
    while read_request(&mut stream, &mut pending).await {
        requests.fetch_add(1, Ordering::SeqCst);
        let (status, reason) = match behaviour.load(Ordering::SeqCst) {
            b if b == Behaviour::Answer as u8 => (200, "OK"),
            b if b == Behaviour::Unavailable as u8 => (503, "Service Unavailable"),
            b if b == Behaviour::ResetMidHead as u8 => {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-").await;
                let _ = stream.set_zero_linger();
                return;
            }
            b if b == Behaviour::Vanish as u8 => {
                if let Some(accepting) = listening.lock().expect("lock").take() {
                    accepting.abort();
                }
                return;
            }
            _ => {
                // Silent: hold the connection until the router closes it.
                std::future::pending::<()>().await;
                return;
            }
        };
        let body = format!("{{\"served_by\":\"{name}\",\"status\":{status}}}");
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A router in front of `bad` then `good`, with discovery off (its probes
/// would meet the behaviours too) and `configure`'s settings.
async fn router(
    mode: Mode,
    bad: &Backend,
    good: &Backend,
    configure: impl FnOnce(&mut Config),
) -> Option<(SocketAddr, Stopper)> {
    let dataplane = dataplane_or_skip(mode)?;
    Some(
        start_router_with(
            vec![bad.url.clone(), good.url.clone()],
            dataplane,
            |config| {
                config.discovery_interval_ms = 0;
                configure(config);
            },
        )
        .await,
    )
}

/// A backend answering 503 and one answering, behind a router that never
/// ejects (every request routed to the first one first meets its 503),
/// with `configure`'s settings too.
async fn unavailable_and_good(
    mode: Mode,
    configure: impl FnOnce(&mut Config),
) -> Option<(Backend, Backend, SocketAddr, Stopper)> {
    let bad = Backend::start("bad", Behaviour::Unavailable).await;
    let good = Backend::start("good", Behaviour::Answer).await;
    let (router, stop) = router(mode, &bad, &good, |config| {
        config.eject_after_failures = 0;
        configure(config);
    })
    .await?;
    Some((bad, good, router, stop))
}

/// Sends a completion with prompt number `i`: the status and who served it.
async fn complete(router: SocketAddr, i: usize) -> (u16, String) {
    complete_prompt(router, &format!("Question number {i}: why?")).await
}

/// [`complete`] on a kept-alive connection.
async fn complete_on(client: &mut TcpStream, i: usize) -> (u16, String) {
    let body = json!({"model": "m", "prompt": format!("Question number {i}: why?")}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    client.write_all(request.as_bytes()).await.expect("send");
    let response = read_response(client).await;
    let served_by = response.json()["served_by"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (response.status, served_by)
}

async fn metrics(router: SocketAddr) -> String {
    get(router, "/metrics").await.text()
}

async fn a_503_goes_to_the_next_backend(mode: Mode) {
    let Some((bad, _good, router, _stop)) = unavailable_and_good(mode, |_| {}).await else {
        return;
    };
    for i in 0..20 {
        assert_eq!(
            complete(router, i).await,
            (200, "good".to_owned()),
            "request {i}"
        );
    }
    let tried_bad = bad.requests();
    assert!(
        tried_bad > 0,
        "no request was routed to the 503 backend first"
    );
    let text = metrics(router).await;
    assert_eq!(
        metric(&text, "router_retries_total{reason=\"unavailable\"}"),
        Some(tried_bad as f64),
        "{text}"
    );

    // Answering again, it gets its prompts back: a 503 moved only the
    // request that met it.
    bad.set(Behaviour::Answer);
    let served = complete_many(router, 20).await;
    assert!(
        served.iter().all(|(status, _)| *status == 200),
        "{served:?}"
    );
    assert!(served.iter().any(|(_, by)| by == "bad"), "{served:?}");
}

/// A prompt of `len` bytes of its own, starting with `i`.
fn long_prompt(i: usize, len: usize) -> String {
    let mut prompt = format!("Document {i}:");
    while prompt.len() < len {
        prompt.push_str(&format!(" paragraph {} of document {i}.", prompt.len()));
    }
    prompt
}

/// Sends `prompt` as a completion: the status and who served it.
async fn complete_prompt(router: SocketAddr, prompt: &str) -> (u16, String) {
    let body = json!({"model": "m", "prompt": prompt});
    let response = post_json(router, "/v1/completions", &body).await;
    let served_by = response.json()["served_by"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (response.status, served_by)
}

async fn a_503_leaves_no_prefix_behind_even_for_a_long_prompt(mode: Mode) {
    let Some((bad, _good, router, _stop)) = unavailable_and_good(mode, |_| {}).await else {
        return;
    };
    // Longer than the 4,096 index blocks (256 KiB) past which the router
    // gives back the buffers that hashed a prompt.
    // New prompts until two were routed to `bad` first (each is, at even
    // odds, by its rendezvous hash).
    let mut met_503 = Vec::new();
    for i in 0..64 {
        let prompt = long_prompt(i, 300_000);
        let before = bad.requests();
        assert_eq!(
            complete_prompt(router, &prompt).await,
            (200, "good".to_owned())
        );
        if bad.requests() > before {
            met_503.push(prompt);
            if met_503.len() == 2 {
                break;
            }
        }
    }
    assert!(!met_503.is_empty(), "no prompt was routed to `bad` first");
    // Once `bad` answers, a prompt that met its 503 is cached only where it
    // was served, and is sent there again.
    bad.set(Behaviour::Answer);
    for prompt in &met_503 {
        assert_eq!(
            complete_prompt(router, prompt).await,
            (200, "good".to_owned())
        );
    }
}

/// `n` completions with prompts unlike the other tests' ones.
async fn complete_many(router: SocketAddr, n: usize) -> Vec<(u16, String)> {
    let mut served = Vec::new();
    for i in 100..100 + n {
        served.push(complete(router, i).await);
    }
    served
}

async fn without_retries_the_client_gets_the_backend_s_503(mode: Mode) {
    let Some((bad, _good, router, _stop)) =
        unavailable_and_good(mode, |config| config.retries = 0).await
    else {
        return;
    };
    let mut answers = Vec::new();
    for i in 0..20 {
        answers.push(complete(router, i).await);
    }
    assert!(
        answers.contains(&(503, "bad".to_owned())),
        "the backend's own 503 reaches the client: {answers:?}"
    );
    assert_eq!(
        answers.iter().filter(|(status, _)| *status == 503).count(),
        bad.requests()
    );
    let text = metrics(router).await;
    assert_eq!(
        metric(&text, "router_retries_total{reason=\"unavailable\"}"),
        Some(0.0)
    );
}

async fn a_backend_gone_under_a_pooled_connection_sends_its_request_on(mode: Mode) {
    let bad = Backend::start("bad", Behaviour::Answer).await;
    let good = Backend::start("good", Behaviour::Answer).await;
    // One worker, so the request meets the connection its prompt's earlier
    // request left in that worker's pool.
    let Some((router, _stop)) = router(mode, &bad, &good, |config| config.workers = 1).await else {
        return;
    };
    // A kept-alive client: one that says `connection: close` may have its
    // FIN passed on to the backend, whose connection is then not pooled.
    let mut client = TcpStream::connect(router).await.expect("connect");
    let mut on_bad = None;
    for i in 0..40 {
        if complete_on(&mut client, i).await == (200, "bad".to_owned()) {
            on_bad = Some(i);
            break;
        }
    }
    let i = on_bad.expect("some prompt is routed to the first backend");
    bad.set(Behaviour::Vanish);
    // The pooled connection is closed unanswered and no new one is taken:
    // nothing reached an engine, so the next backend answers.
    assert_eq!(complete_on(&mut client, i).await, (200, "good".to_owned()));
    let text = metrics(router).await;
    assert_eq!(
        metric(&text, "router_retries_total{reason=\"connect\"}"),
        Some(1.0),
        "{text}"
    );
}

/// `failing` fails its requests, is ejected, gets nothing while ejected,
/// and is readmitted once it answers again.
/// The ejection period of [`ejected_then_readmitted`].
const EJECT_MS: u64 = 5_000;

async fn ejected_then_readmitted(mode: Mode, failing: Behaviour, status: u16) {
    let bad = Backend::start("bad", failing).await;
    let good = Backend::start("good", Behaviour::Answer).await;
    let Some((router, _stop)) = router(mode, &bad, &good, |config| {
        config.eject_after_failures = 2;
        config.eject_ms = EJECT_MS;
        config.first_byte_timeout_ms = 300;
    })
    .await
    else {
        return;
    };
    let ejected = format!("router_backend_ejected{{backend=\"{}\"}}", bad.url);
    // Until it is ejected, the requests routed to it fail (not retried:
    // they may have reached the engine).
    let mut failed = 0;
    let mut i = 0;
    // When the request that failed last was sent: the ejection came after.
    let mut last_failure_sent = Instant::now();
    while metric(&metrics(router).await, &ejected) != Some(1.0) {
        let sent = Instant::now();
        let (got, by) = complete(router, i).await;
        if got != 200 {
            assert_eq!(got, status, "request {i}");
            failed += 1;
            last_failure_sent = sent;
        } else {
            assert_eq!(by, "good");
        }
        i += 1;
        assert!(i < 100, "never ejected");
    }
    assert_eq!(failed, 2, "ejected at the second failure in a row");
    assert_eq!(bad.requests(), 2);

    // While ejected, everything goes to the other backend. Only a trial
    // once the period is over may reach it (and fail): on a busy machine
    // ten requests can outlast the period, so a failure is allowed only
    // after it, which the failure's own end bounds from below.
    let period = Duration::from_millis(EJECT_MS);
    let mut trials = 0;
    for j in 0..10 {
        let (got, by) = complete(router, 1000 + j).await;
        if got == 200 {
            assert_eq!(by, "good", "request {j}");
        } else {
            assert_eq!(got, status, "request {j}");
            assert!(
                last_failure_sent.elapsed() >= period,
                "request {j} reached the ejected backend {:?} after its ejection began",
                last_failure_sent.elapsed()
            );
            trials += 1;
        }
    }
    assert_eq!(bad.requests(), 2 + trials, "only trials reached it");

    // It recovers: after the period one trial request readmits it, and
    // prompts hashed to it return.
    bad.set(Behaviour::Answer);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut j = 0;
    loop {
        let (got, by) = complete(router, 2000 + j).await;
        assert_eq!(got, 200);
        if by == "bad" {
            break;
        }
        assert!(Instant::now() < deadline, "never readmitted");
        j += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&metrics(router).await, &ejected), Some(0.0));
}

async fn a_backend_resetting_mid_head_is_ejected_and_readmitted(mode: Mode) {
    ejected_then_readmitted(mode, Behaviour::ResetMidHead, 502).await;
}

async fn a_silent_backend_is_ejected_and_readmitted(mode: Mode) {
    ejected_then_readmitted(mode, Behaviour::Silent, 504).await;
}

each_mode!(
    a_503_goes_to_the_next_backend,
    a_503_leaves_no_prefix_behind_even_for_a_long_prompt,
    a_backend_gone_under_a_pooled_connection_sends_its_request_on,
    without_retries_the_client_gets_the_backend_s_503,
    a_backend_resetting_mid_head_is_ejected_and_readmitted,
    a_silent_backend_is_ejected_and_readmitted,
);
