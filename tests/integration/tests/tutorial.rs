//! The seed tutorial, reproduced: the second curl lands where the first did.
use integration_tests::{
    Fleet, assert_bytes_took_path, dataplane_or_skip, each_mode, get, metric, post_json,
};
use router_daemon::dataplane::Mode;
use serde_json::json;

const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
const FOLLOW_UP: &str = " And what is its population?";
const COUNTRIES: [&str; 25] = [
    "France", "Spain", "Italy", "Germany", "Poland", "Norway", "Sweden", "Finland", "Greece",
    "Portugal", "Austria", "Hungary", "Ireland", "Japan", "Kenya", "Chile", "Peru", "Canada",
    "Mexico", "Brazil", "Egypt", "India", "Nepal", "Vietnam", "Ghana",
];

/// 50 first prompts: 25 short ones like the tutorial's, and 25 that carry a
/// context long enough to span several 16-token cache blocks.
fn first_prompts() -> Vec<String> {
    let mut prompts: Vec<String> = COUNTRIES
        .iter()
        .map(|country| format!("What is the capital of {country}?"))
        .collect();
    prompts.extend(COUNTRIES.iter().map(|country| {
        format!(
            "You are a careful geography tutor. Answer in one short paragraph, cite the \
             official name of the city, and mention one historical fact about it. The student \
             is preparing for an exam about {country} and its neighbours. \
             What is the capital of {country}?"
        )
    }));
    prompts
}

fn completion(prompt: &str) -> serde_json::Value {
    json!({ "model": MODEL, "prompt": prompt, "max_tokens": 8 })
}

async fn tutorial_pairs(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(2, dataplane).await;
    let mut served = std::collections::HashSet::new();
    let mut received_bytes = 0usize;
    for first_prompt in first_prompts() {
        let first = post_json(fleet.router, "/v1/completions", &completion(&first_prompt)).await;
        let second_prompt = format!("{first_prompt}{FOLLOW_UP}");
        let second = post_json(fleet.router, "/v1/completions", &completion(&second_prompt)).await;
        received_bytes += first.raw.len() + second.raw.len();
        assert_eq!(first.status, 200, "{}", first.text());
        assert_eq!(second.status, 200, "{}", second.text());

        let first_sim = first.header("x-served-by").expect("x-served-by on first");
        let second_sim = second.header("x-served-by").expect("x-served-by on second");
        assert_eq!(
            first_sim, second_sim,
            "the follow-up of {first_prompt:?} went to another instance"
        );
        served.insert(first_sim.to_owned());

        // vLLM reuses whole 16-token blocks only: once the shared prefix
        // spans two of them, the follow-up must reuse cached tokens.
        let shared_tokens = first.json()["usage"]["prompt_tokens"]
            .as_u64()
            .expect("usage.prompt_tokens");
        let cached = second.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("usage.prompt_tokens_details.cached_tokens");
        if shared_tokens > 32 {
            assert!(
                cached >= 32,
                "{second_prompt:?}: {cached} cached tokens after a {shared_tokens}-token prefix"
            );
        }
    }
    assert_eq!(
        served.len(),
        2,
        "all 50 conversations landed on one instance"
    );

    let metrics = get(fleet.router, "/metrics").await.text();
    let info = format!("router_dataplane_info{{mode=\"{}\"}}", mode.as_str());
    assert_eq!(metric(&metrics, &info), Some(1.0), "{metrics}");
    let per_backend: f64 = fleet
        .sims
        .iter()
        .map(|sim| {
            metric(
                &metrics,
                &format!("router_requests_total{{backend=\"http://{sim}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(per_backend, 100.0, "{metrics}");

    // Every response byte is accounted for. These small responses arrive
    // whole with their heads, which the daemon reads in every mode, so no
    // share of them has to take the mode's own path.
    assert_bytes_took_path(fleet.router, mode, received_bytes, 0.0).await;
}

each_mode!(tutorial_pairs);
