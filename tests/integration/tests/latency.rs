//! Time to first token and inter-token latency as the router measures them,
//! per backend, on streamed completions: every streamed response adds one
//! first-token sample to the histogram of the backend that served it, no
//! sample is faster than the engine's own prefill, and the later tokens add
//! gaps (on the dataplanes where the daemon sees them).
use std::collections::HashMap;

use integration_tests::{Fleet, dataplane_or_skip, each_mode, get, metric, post_json, sse_data};
use router_daemon::dataplane::Mode;
use serde_json::json;

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
const STREAMS: usize = 6;
const TOKENS: usize = 8;

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
    for i in 0..STREAMS {
        let body = json!({
            "model": MODEL,
            "prompt": format!("Stream number {i}: tell me about the sea."),
            "max_tokens": TOKENS,
            "stream": true,
        });
        let response = post_json(fleet.router, "/v1/completions", &body).await;
        assert_eq!(response.status, 200, "{}", response.text());
        assert!(
            sse_data(&response.body).len() >= TOKENS,
            "{}",
            response.text()
        );
        let sim = response.header("x-served-by").expect("x-served-by");
        *served.entry(sim.to_owned()).or_default() += 1;
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
