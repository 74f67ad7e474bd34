//! Time to first token and inter-token latency as the router measures them,
//! per backend, on streamed completions: every streamed response adds one
//! first-token sample to the histogram of the backend that served it, no
//! sample is faster than the engine's own prefill nor later than the
//! client's own first event (the kernel dataplanes too: they take over
//! only after the first token), and the later tokens add gaps (on the
//! dataplanes where the daemon sees them).
use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use integration_tests::{
    EXCHANGE_TIMEOUT, Fleet, Response, dataplane_or_skip, each_mode, get, metric, parse_response,
    sse_data,
};
use router_daemon::dataplane::Mode;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
const STREAMS: usize = 6;
const TOKENS: usize = 8;

/// POSTs `body` to `/v1/completions` on a new connection the server closes
/// after the response: the time from the request's first byte to the first
/// SSE event's arrival, and the whole response.
async fn stream_timed(router: SocketAddr, body: &serde_json::Value) -> (Duration, Response) {
    let body = body.to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(router).await.expect("connect");
    let start = Instant::now();
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut received = Vec::new();
    let mut first_event = None;
    tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            if n == 0 {
                return;
            }
            received.extend_from_slice(&buf[..n]);
            if first_event.is_none() && received.windows(5).any(|w| w == b"data:") {
                first_event = Some(start.elapsed());
            }
        }
    })
    .await
    .expect("the stream ended in time");
    let first_event = first_event
        .unwrap_or_else(|| panic!("no SSE event in {}", String::from_utf8_lossy(&received)));
    (first_event, parse_response(received))
}

async fn latency_histograms(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    // Real pacing: a prefill step of 10 ms, then a token every 6 ms, far
    // enough apart that a busy CI machine still reads them separately.
    let fleet = Fleet::start(2, dataplane, |id| vllm_sim::Config {
        time_scale: 1.0,
        ..vllm_sim::Config::for_tests(id)
    })
    .await;
    let prefill_floor = vllm_sim::Config::for_tests("x").prefill_overhead_ms / 1000.0;

    let mut served: HashMap<String, usize> = HashMap::new();
    // Per sim: the sum of its streams' first events as their clients saw
    // them.
    let mut first_events: HashMap<String, f64> = HashMap::new();
    for i in 0..STREAMS {
        let body = json!({
            "model": MODEL,
            "prompt": format!("Stream number {i}: tell me about the sea."),
            "max_tokens": TOKENS,
            "stream": true,
        });
        let (first_event, response) = stream_timed(fleet.router, &body).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(
            sse_data(&response.body).len() >= TOKENS,
            "{}",
            response.text()
        );
        let sim = response.header("x-served-by").expect("x-served-by");
        *served.entry(sim.to_owned()).or_default() += 1;
        *first_events.entry(sim.to_owned()).or_default() += first_event.as_secs_f64();
    }

    let metrics = get(fleet.router, "/metrics").await.text();
    let mut gaps = 0.0;
    for (i, sim) in fleet.sims.iter().enumerate() {
        let label = format!("{{backend=\"http://{sim}\"}}");
        let ttft_count = metric(
            &metrics,
            &format!("router_backend_time_to_first_token_seconds_count{label}"),
        )
        .unwrap_or(0.0);
        let ttft_sum = metric(
            &metrics,
            &format!("router_backend_time_to_first_token_seconds_sum{label}"),
        )
        .unwrap_or(0.0);
        let streams = served.get(&format!("sim-{i}")).copied().unwrap_or(0);
        assert_eq!(ttft_count, streams as f64, "sim-{i}:\n{metrics}");
        if streams > 0 {
            // The first token cannot reach the router before the engine's
            // prefill step is over.
            assert!(
                ttft_sum / ttft_count >= prefill_floor,
                "sim-{i}: mean TTFT {} s under the engine's {prefill_floor} s prefill",
                ttft_sum / ttft_count
            );
            // The router sees each first token before its client does (a
            // bound from causality, not timing): a TTFT taken when the
            // body ended instead, as a dataplane that hands the whole body
            // to the kernel would, is at least the later tokens' pacing
            // (7 × 6 ms) past it.
            let clients = first_events[&format!("sim-{i}")];
            assert!(
                ttft_sum <= clients,
                "sim-{i}: the router's TTFTs sum to {ttft_sum} s, later than its clients' \
                 first events ({clients} s)"
            );
        }
        gaps += metric(
            &metrics,
            &format!("router_backend_inter_token_seconds_count{label}"),
        )
        .unwrap_or(0.0);
    }
    if !mode.redirects_in_kernel() {
        // Each stream's tokens come in over several reads.
        assert!(gaps >= STREAMS as f64, "{gaps} gaps:\n{metrics}");
    }
}

each_mode!(latency_histograms);
