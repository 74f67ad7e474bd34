//! The prefix index stays within its entry bound under a million distinct
//! long prompts routed through `Router::decide`.

use router_daemon::route::{BackendLoad, RouteRequest, Router};

#[test]
fn a_million_distinct_long_prompts_stay_within_the_bound() {
    const CAPACITY: usize = 50_000;
    const PROMPTS: u32 = 1_000_000;
    let names = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];
    let backends: Vec<BackendLoad> = names.iter().map(|n| BackendLoad::new(n, 0)).collect();
    let router = Router::new(32, CAPACITY);
    // 300-byte prompts: 9 boundary entries, a tail and its bitmap each, so
    // the index turns over about 200 times.
    let mut prompt = vec![b'.'; 300];
    let mut peak = 0;
    for i in 0..PROMPTS {
        // Distinct from the first block on, and in the tail.
        prompt[..10].copy_from_slice(format!("{i:010}").as_bytes());
        prompt[290..].copy_from_slice(format!("{i:010}").as_bytes());
        let request = RouteRequest {
            model: b"m",
            key: &prompt,
            conversation: prompt.len(),
            session: None,
            later_turns: false,
            previous: None,
        };
        assert!(router.decide(&request, &backends).is_some());
        let len = router.index_len();
        assert!(len <= CAPACITY, "{len} entries after {i} prompts");
        peak = peak.max(len);
    }
    // The bound is used, not just respected.
    assert!(peak > CAPACITY / 2, "peak {peak}");
}
