//! Prompt extraction and routing together: chat bodies sharing a long system
//! prompt follow it at low load and spread over the fleet under load, each
//! conversation stays on its backend, and independent routers place the
//! first alike; many threads may decide at once.

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
        previous: None,
    };
    let d = router.decide(&request, backends).expect("backends");
    (d.backend, d.reason)
}

#[test]
fn conversations_sharing_a_long_system_prompt_follow_it_spread_under_load_and_stick() {
    let mut backends: Vec<BackendLoad> = NAMES.iter().map(|n| BackendLoad::new(n, 0)).collect();
    // A 3.9 KB system prompt, short questions: the system prompt is most of
    // each new conversation's prefill.
    let system = "You are a meticulous assistant for a large bank. ".repeat(80);
    let router = Router::new(32, 1 << 16);
    let mut homes: Vec<(String, usize)> = Vec::new();
    for i in 0..256 {
        let question = format!("Customer {i} asks about their account.");
        let first = body(&system, &[&question]);
        let (on, reason) = decide(&router, &first, &backends);
        if i == 0 {
            assert_eq!(reason, Reason::Placed);
            // A router that never saw it places it alike.
            let fresh = Router::new(32, 1 << 16);
            assert_eq!(decide(&fresh, &first, &backends).0, on, "routers agree");
        } else if i < 3 {
            // At low load the next conversations follow the system prompt.
            assert_eq!((on, reason), (homes[0].1, Reason::PrefixMatch), "{i}");
        }
        // Every conversation stays in flight: load builds up.
        backends[on].in_flight += 1;
        homes.push((question, on));
    }
    let used: HashSet<usize> = homes.iter().map(|&(_, on)| on).collect();
    // Under load the system prompt spread over the fleet: a holder takes
    // up to what the prefix is worth (3.9 KB at the default load weight,
    // 0.1: 39 requests) more than an idle backend before another computes
    // it, so with 256 conversations in flight every backend holds it.
    assert_eq!(used.len(), NAMES.len(), "256 conversations used {used:?}");
    let loads: Vec<usize> = backends.iter().map(BackendLoad::load).collect();
    let (most, least) = (loads.iter().max(), loads.iter().min());
    assert!(
        most.zip(least).is_some_and(|(m, l)| m - l <= 8),
        "{loads:?}"
    );
    // Each conversation's next turn stays where it is: its backend holds
    // its question and the reply it generated.
    let reply = "Certainly. Here is what your account shows this month. ".repeat(20);
    for (question, on) in &homes {
        let later = body(&system, &[question, &reply, "Thanks, and my card?"]);
        assert_eq!(
            decide(&router, &later, &backends),
            (*on, Reason::PrefixMatch)
        );
    }
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
