//! Prompt extraction and routing together: chat bodies sharing a long system
//! prompt spread over the fleet, each conversation stays on its backend, and
//! independent routers agree; many threads may decide at once.

use std::collections::HashSet;

use router_daemon::{
    prompt::{Endpoint, extract},
    route::{BackendLoad, Reason, RouteRequest, Router},
};

const NAMES: [&str; 4] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];

fn body(system: &str, turns: &[&str]) -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    for (i, turn) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({"role": role, "content": turn}));
    }
    serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages}))
        .expect("serialisable")
}

fn decide(router: &Router, body: &[u8], backends: &[BackendLoad]) -> (usize, Reason) {
    let input = extract(Endpoint::ChatCompletions, body).expect("valid body");
    let model = input.model.as_deref().unwrap_or_default();
    let request = RouteRequest {
        model: model.as_bytes(),
        key: &input.key,
        conversation: input.conversation,
        session: None,
        later_turns: input.later_turns,
    };
    let d = router.decide(&request, backends).expect("backends");
    (d.backend, d.reason)
}

#[test]
fn conversations_sharing_a_system_prompt_spread_and_stick() {
    let backends: Vec<BackendLoad> = NAMES.iter().map(|n| BackendLoad::new(n, 0)).collect();
    let system = "You are a meticulous assistant for a large bank. ".repeat(80);
    let (a, b) = (Router::new(32, 1 << 16), Router::new(32, 1 << 16));
    let mut used = HashSet::new();
    for i in 0..64 {
        let question = format!("Customer {i} asks about their account.");
        let first = body(&system, &[&question]);
        let (on_a, reason) = decide(&a, &first, &backends);
        assert_eq!(reason, Reason::Placed);
        assert_eq!(decide(&b, &first, &backends).0, on_a, "routers agree");
        used.insert(on_a);
        let later = body(&system, &[&question, "Certainly.", "Thanks, and my card?"]);
        assert_eq!(decide(&a, &later, &backends), (on_a, Reason::PrefixMatch));
    }
    assert!(used.len() >= 3, "64 conversations used {used:?}");
}

#[test]
fn concurrent_decisions_keep_the_index_bounded() {
    let backends: Vec<BackendLoad> = NAMES.iter().map(|n| BackendLoad::new(n, 0)).collect();
    let router = Router::new(16, 4_096);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (router, backends) = (&router, &backends);
            s.spawn(move || {
                for i in 0..5_000 {
                    let b = body(
                        "shared",
                        &[&format!("thread {t} message {i} with some padding")],
                    );
                    decide(router, &b, backends);
                }
            });
        }
    });
    assert!(router.index_len() <= 4_096);
}
