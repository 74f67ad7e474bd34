//! Scheduling seen from clients: `--max-num-seqs` running at most, the rest
//! waiting, and how the wait shows in time to first token and in the
//! metrics. Real time, so every assertion is a relation between measured
//! times or a lower bound the simulator guarantees, with generous margins
//! for a noisy machine; the exact timeline is tested on a paused clock in
//! `engine`'s unit tests.

mod common;

use std::time::{Duration, Instant};

use common::{Sim, metric};
use serde_json::json;
use vllm_sim::Config;

const MODEL: &str = vllm_sim::config::DEFAULT_MODEL;

fn series(name: &str, extra_labels: &str) -> String {
    format!("{name}{{engine=\"0\",{extra_labels}model_name=\"{MODEL}\"}}")
}

#[tokio::test]
async fn beyond_max_num_seqs_two_requests_wait_and_their_ttft_shows_it() {
    const ITL_MS: f64 = 20.0;
    const MAX_TOKENS: usize = 40;
    let sim = Sim::start(Config {
        time_scale: 1.0,
        max_num_seqs: 2,
        prefill_overhead_ms: 2.0,
        prefill_per_token_us: 10.0,
        itl_ms: ITL_MS,
        itl_per_seq_us: 0.0,
        ..Config::for_tests("sim-q")
    })
    .await;
    // The least time a request holds its slot after its first token: the
    // engine sleeps at least this long before freeing it.
    let generation = Duration::from_secs_f64(ITL_MS * (MAX_TOKENS - 1) as f64 / 1e3);

    let start = Instant::now();
    let mut readers = Vec::new();
    for i in 0..4 {
        let mut conn = sim.connect().await;
        let body = json!({
            "model": MODEL,
            "prompt": format!("Request number {i} asks for a story."),
            "max_tokens": MAX_TOKENS,
            "stream": true,
        })
        .to_string();
        conn.send("POST", "/v1/completions", &[], Some(&body)).await;
        readers.push(tokio::spawn(async move {
            // The first token chunk; the role-less completion stream has
            // nothing before it.
            conn.wait_for(b"data: ").await;
            let ttft = start.elapsed();
            (ttft, conn.response().await)
        }));
    }

    // From the side, while the first two run: two running, two waiting.
    let running = series("vllm:num_requests_running", "");
    let waiting = series("vllm:num_requests_waiting", "");
    let mut saw_queue = false;
    for _ in 0..400 {
        let text = sim.get("/metrics").await.text().to_owned();
        if metric(&text, &running) == 2.0 && metric(&text, &waiting) == 2.0 {
            saw_queue = true;
            break;
        }
        if readers.iter().all(|r| r.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_queue, "never saw 2 running and 2 waiting");

    let mut ttfts = Vec::new();
    for reader in readers {
        let (ttft, response) = reader.await.expect("reader ran");
        assert_eq!(response.status, 200);
        let events = response.events();
        assert_eq!(events.len(), MAX_TOKENS + 1, "every token, then [DONE]");
        ttfts.push(ttft);
    }
    ttfts.sort();
    // A waiting request starts only after a running one finished, so the
    // gap is about a whole generation; half of it leaves room for noise.
    let gap = ttfts[2].saturating_sub(ttfts[1]);
    assert!(
        gap >= generation / 2,
        "TTFTs {ttfts:?}: the waiting pair should trail the first pair by about {generation:?}"
    );

    // The server's own histograms agree: at most two requests were served
    // quickly, two waited for a slot.
    let text = sim.get("/metrics").await.text().to_owned();
    let le = |bound: &str| format!("le=\"{bound}\",");
    let ttft_count = metric(&text, &series("vllm:time_to_first_token_seconds_count", ""));
    assert_eq!(ttft_count, 4.0);
    let fast_ttft = metric(
        &text,
        &series("vllm:time_to_first_token_seconds_bucket", &le("0.5")),
    );
    assert!(fast_ttft <= 2.0, "{fast_ttft} requests had TTFT ≤ 0.5 s");
    let short_queue = metric(
        &text,
        &series("vllm:request_queue_time_seconds_bucket", &le("0.5")),
    );
    assert!(short_queue <= 2.0, "{short_queue} requests queued ≤ 0.5 s");
    assert_eq!(metric(&text, &waiting), 0.0);
    sim.stop().await;
}

#[tokio::test]
async fn a_client_leaving_the_queue_frees_its_place() {
    let sim = Sim::start(Config {
        time_scale: 1.0,
        max_num_seqs: 1,
        prefill_overhead_ms: 0.0,
        itl_ms: 20.0,
        ..Config::for_tests("sim-q")
    })
    .await;
    let body = json!({"prompt": "x", "max_tokens": 5000, "stream": true}).to_string();
    let mut running = sim.connect().await;
    running
        .send("POST", "/v1/completions", &[], Some(&body))
        .await;
    running.wait_for(b"data: ").await;
    let mut queued = sim.connect().await;
    queued
        .send("POST", "/v1/completions", &[], Some(&body))
        .await;
    let waiting = series("vllm:num_requests_waiting", "");
    let abort = series("vllm:request_success_total", "finished_reason=\"abort\",");
    let mut seen = Vec::new();
    for _ in 0..400 {
        let value = sim.metric(&waiting).await;
        seen.push(value);
        if value == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen.last(), Some(&1.0), "the second request waits");
    drop(queued);
    let mut aborted = 0.0;
    for _ in 0..400 {
        aborted = sim.metric(&abort).await;
        if aborted == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        aborted, 1.0,
        "the abandoned waiting request counts as an abort"
    );
    assert_eq!(sim.metric(&waiting).await, 0.0);
    drop(running);
    sim.stop().await;
}
