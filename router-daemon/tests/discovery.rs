//! Discovery against real simulated vLLM servers: two `vllm-sim` instances
//! serving different models and one dead address.
//!
//! Rounds of probing are driven by hand with [`Backends::probe_all`], so
//! the assertions do not depend on timing; waits for the simulator's engine
//! are bounded polls.
#![allow(clippy::unwrap_used, reason = "tests")]

use std::{future::Future, net::SocketAddr, time::Duration};

use router_daemon::{
    Config, Dataplane,
    backend::{Backends, Discovery, ModelError},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
};

/// Bound on every wait, so a hang fails instead of stalling CI.
const WAIT: Duration = Duration::from_secs(20);

const MODEL_A: &str = "org/model-a";
const MODEL_B: &str = "org/model-b";

/// Probing by hand: the interval is never used.
const DISCOVERY: Discovery = Discovery {
    interval: Duration::from_secs(3600),
    timeout: Duration::from_secs(5),
    connect_timeout: Duration::from_secs(5),
    down_after: 2,
};

/// Stops a background server when dropped.
struct Stop(#[allow(dead_code, reason = "held for its drop")] oneshot::Sender<()>);

fn stopper() -> (Stop, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = oneshot::channel();
    (Stop(tx), async move {
        let _ = rx.await;
    })
}

/// Starts a simulator serving `model` on an ephemeral port.
async fn start_sim(
    id: &str,
    model: &str,
    configure: impl FnOnce(&mut vllm_sim::Config),
) -> (String, Stop) {
    let mut config = vllm_sim::Config::for_tests(id);
    config.model = model.to_owned();
    configure(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = stopper();
    tokio::spawn(async move {
        if let Err(err) = vllm_sim::serve(listener, config, shutdown).await {
            panic!("vllm-sim failed: {err}");
        }
    });
    (format!("http://{addr}"), stop)
}

/// An address nobody listens on, and the socket that holds its port: bound
/// but never listening, so connects are refused and no other process (a
/// test or benchmark running beside this one) can take the port and answer.
fn dead_address() -> (String, TcpSocket) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let addr = socket.local_addr().unwrap();
    (format!("http://{addr}"), socket)
}

/// Starts a streamed completion that runs for a long time, and returns its
/// connection: the simulator aborts the request when it closes.
async fn slow_stream(sim: &str, model: &str) -> TcpStream {
    let addr = sim.trim_start_matches("http://");
    let body = format!(
        r#"{{"model":"{model}","prompt":"Tell me everything you know.","max_tokens":100000,"stream":true}}"#
    );
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn candidates_health_and_load_from_real_servers() {
    // Sim A decodes at real speed one sequence at a time, so requests
    // queue behind the first; sim B answers instantly.
    let (sim_a, _stop_a) = start_sim("sim-a", MODEL_A, |config| {
        config.time_scale = 1.0;
        config.max_num_seqs = 1;
    })
    .await;
    let (sim_b, _stop_b) = start_sim("sim-b", MODEL_B, |_| {}).await;
    let (dead, _held) = dead_address();
    let backends = Backends::resolve(&[sim_a.clone(), sim_b, dead])
        .await
        .unwrap();

    // Before any answer, every backend may serve anything.
    assert_eq!(backends.candidates(Some(MODEL_A)).unwrap(), [0, 1, 2]);

    backends.probe_all(&DISCOVERY).await;
    assert_eq!(backends.get(0).unwrap().models().unwrap()[..], [MODEL_A]);
    assert_eq!(backends.get(1).unwrap().models().unwrap()[..], [MODEL_B]);
    assert!(backends.get(2).unwrap().models().is_none());
    // One failure is below the threshold: the dead one is still up, and
    // still a candidate for any model.
    assert!(backends.get(2).unwrap().is_up());
    assert_eq!(backends.candidates(Some(MODEL_A)).unwrap(), [0, 2]);

    backends.probe_all(&DISCOVERY).await;
    assert!(backends.get(0).unwrap().is_up());
    assert!(backends.get(1).unwrap().is_up());
    assert!(!backends.get(2).unwrap().is_up(), "down after 2 failures");

    assert_eq!(backends.candidates(Some(MODEL_A)).unwrap(), [0]);
    assert_eq!(backends.candidates(Some(MODEL_B)).unwrap(), [1]);
    let served = vec![MODEL_A.to_owned(), MODEL_B.to_owned()];
    let unknown = backends.candidates(Some("org/nope")).unwrap_err();
    assert_eq!(
        unknown,
        ModelError::Unknown {
            model: "org/nope".into(),
            served: served.clone(),
        }
    );
    assert_eq!(unknown.status(), 404);
    assert!(unknown.to_string().contains("org/model-a, org/model-b"));
    let required = backends.candidates(None).unwrap_err();
    assert_eq!(required, ModelError::Required { served });
    assert_eq!(required.status(), 400);

    // Load: three long streams on a one-sequence engine are one running and
    // two waiting, as the next scrapes should show.
    let a = backends.get(0).unwrap();
    assert_eq!((a.waiting(), a.running()), (0, 0));
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(slow_stream(&sim_a, MODEL_A).await);
    }
    let loaded = tokio::time::timeout(WAIT, async {
        loop {
            backends.probe_all(&DISCOVERY).await;
            if a.running() == 1 && a.waiting() == 2 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        loaded.is_ok(),
        "sim A never showed 1 running and 2 waiting (last: {} running, {} waiting)",
        a.running(),
        a.waiting()
    );
    assert_eq!(backends.get(1).unwrap().running(), 0);

    // Closing the streams aborts the requests; the load drains.
    drop(streams);
    let drained = tokio::time::timeout(WAIT, async {
        loop {
            backends.probe_all(&DISCOVERY).await;
            if a.running() == 0 && a.waiting() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "sim A's load never drained");
}

/// GET `path` on `addr`, reading to the end (the daemon closes after
/// `connection: close`).
async fn get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("a response in time")
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_polls_and_exports_backend_gauges() {
    let (sim_a, _stop_a) = start_sim("sim-a", MODEL_A, |config| {
        config.block_size = 16;
        config.kv_cache_blocks = 300;
    })
    .await;
    let (dead, _held) = dead_address();
    let listener = router_daemon::listener(([127, 0, 0, 1], 0).into()).unwrap();
    let router = listener.local_addr().unwrap();
    let mut config = Config::with_backends(router, vec![sim_a.clone(), dead.clone()]);
    config.discovery_interval_ms = 10;
    config.down_after_failures = 1;
    let (_stop, shutdown) = stopper();
    tokio::spawn(async move {
        router_daemon::run(listener, config, Dataplane::userspace(), shutdown)
            .await
            .unwrap();
    });

    let wanted = [
        format!("router_backend_models{{backend=\"{sim_a}\",model=\"{MODEL_A}\"}} 1"),
        format!("router_backend_up{{backend=\"{sim_a}\"}} 1"),
        format!("router_backend_up{{backend=\"{dead}\"}} 0"),
        format!("router_backend_waiting{{backend=\"{sim_a}\"}} 0"),
        format!("router_backend_running{{backend=\"{sim_a}\"}} 0"),
        // 300 blocks of 16 tokens, as its vllm:cache_config_info says.
        format!("router_backend_kv_cache_tokens{{backend=\"{sim_a}\"}} 4800"),
        format!("router_backend_kv_cache_tokens{{backend=\"{dead}\"}} 0"),
        // Nothing sent yet, so no ratio learned.
        format!("router_backend_key_bytes_per_token{{backend=\"{sim_a}\"}} 0.0"),
    ];
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let metrics = get(router, "/metrics").await;
            if wanted.iter().all(|line| metrics.contains(line.as_str())) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        seen.is_ok(),
        "missing gauges; last /metrics:\n{}",
        get(router, "/metrics").await
    );
}
