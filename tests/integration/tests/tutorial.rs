//! The seed tutorial, reproduced: the second curl lands where the first did,
//! and questions behind one shared system prompt all land on one instance.
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

/// A system prompt of about 1,200 characters (260 tokens), as users put in
/// front of every question.
fn system_prompt() -> String {
    "You are the support assistant of a travel agency. Answer politely and briefly, \
     name the relevant country's official language and currency when it helps, and \
     never invent prices or opening hours. "
        .repeat(6)
}

const QUESTIONS: [&str; 6] = [
    "Which documents do I need to visit Japan?",
    "Is tap water safe to drink in Peru?",
    "What is the best season to visit Kenya?",
    "Can I pay by card in rural Norway?",
    "How long is the train from Paris to Rome?",
    "Do I need a visa for a short stay in Chile?",
];

/// The tutorial's promise for the most common sharing pattern: one shared
/// system prompt followed by different questions, as completions and as
/// chats. Every request after the first lands on the first one's instance
/// and reuses the system prompt's cache blocks there.
async fn shared_system_prompt(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let fleet = Fleet::with_test_sims(2, dataplane).await;
    let system = system_prompt();
    assert!((1_100..1_400).contains(&system.len()), "{}", system.len());
    for chat in [false, true] {
        // Each pattern gets a system prompt of its own.
        let system = format!("{}{system}", if chat { "Chat. " } else { "" });
        let mut first_sim = None;
        for (i, question) in QUESTIONS.iter().enumerate() {
            let (path, body) = if chat {
                let messages = json!([
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]);
                (
                    "/v1/chat/completions",
                    json!({"model": MODEL, "messages": messages, "max_tokens": 8}),
                )
            } else {
                (
                    "/v1/completions",
                    completion(&format!("{system}{question}")),
                )
            };
            let response = post_json(fleet.router, path, &body).await;
            assert_eq!(response.status, 200, "{}", response.text());
            let sim = response.header("x-served-by").expect("x-served-by");
            let first = first_sim.get_or_insert_with(|| sim.to_owned());
            assert_eq!(
                sim, first,
                "question {i} (chat: {chat}) went to another instance"
            );
            let usage = &response.json()["usage"];
            let cached = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .expect("usage.prompt_tokens_details.cached_tokens");
            let prompt = usage["prompt_tokens"]
                .as_u64()
                .expect("usage.prompt_tokens");
            if i > 0 {
                // All of the system prompt's full 16-token blocks are reused:
                // only the question (under 20 tokens) and the partial
                // blocks around it are computed again.
                assert!(
                    cached + 48 >= prompt,
                    "question {i} (chat: {chat}): {cached} of {prompt} tokens cached"
                );
            }
        }
    }
}

each_mode!(shared_system_prompt);
