//! Latency of `Router::decide` on a warmed index (prompt extraction excluded).
//!
//! Run with `cargo bench -p router-daemon --bench route`. Each case routes the
//! next turn of a chat conversation whose earlier turn the index holds, among
//! 1,000 other conversations sharing the same system prompt, over 8 backends;
//! the key sizes are 2, 8, 32 and 128 KB. A second group routes a conversation
//! the index has never seen (placement).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use router_daemon::route::{BackendLoad, RouteRequest, Router};

const MODEL: &[u8] = b"meta-llama/Llama-3.2-1B-Instruct";
const NAMES: [&str; 8] = [
    "http://10.0.0.1:8000",
    "http://10.0.0.2:8000",
    "http://10.0.0.3:8000",
    "http://10.0.0.4:8000",
    "http://10.0.0.5:8000",
    "http://10.0.0.6:8000",
    "http://10.0.0.7:8000",
    "http://10.0.0.8:8000",
];

/// A chat key of about `len` bytes: a 1 KB system prompt, a first user turn
/// naming conversation `id`, then filler turns. Returns the key and its
/// conversation prefix length.
fn chat_key(id: usize, len: usize) -> (Vec<u8>, usize) {
    let mut key = b"system\x1f".to_vec();
    while key.len() < 1024 {
        key.extend_from_slice(b"You are a helpful assistant that answers briefly. ");
    }
    key.push(0x1e);
    key.extend_from_slice(format!("user\x1fconversation {id}: please help\x1e").as_bytes());
    let conversation = key.len();
    let mut turn = 0;
    while key.len() < len {
        let role = if turn % 2 == 0 { "assistant" } else { "user" };
        key.extend_from_slice(format!("{role}\x1fturn {turn} of {id}, ").as_bytes());
        while !key.len().is_multiple_of(512) && key.len() < len {
            key.extend_from_slice(b"words ");
        }
        key.push(0x1e);
        turn += 1;
    }
    (key, conversation)
}

fn bench(c: &mut Criterion) {
    let backends: Vec<BackendLoad> = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| BackendLoad::new(name, i % 3).with_waiting(i % 2))
        .collect();
    let router = Router::new(32, 1 << 20);
    for id in 0..1_000 {
        let (key, conversation) = chat_key(id, 2_048);
        let request = RouteRequest {
            model: MODEL,
            key: &key,
            conversation,
            session: None,
            later_turns: key.len() > conversation,
            previous: None,
        };
        router.decide(&request, &backends);
    }

    let mut group = c.benchmark_group("route_decide");
    for size in [2_048, 8_192, 32_768, 131_072] {
        let (key, conversation) = chat_key(7, size);
        // The earlier turn: the key up to a turn boundary about 600 bytes back.
        let cut = key[..size - 600]
            .iter()
            .rposition(|&b| b == 0x1e)
            .expect("the key has turns")
            + 1;
        let earlier = key[..cut].to_vec();
        let learn = RouteRequest {
            model: MODEL,
            key: &earlier,
            conversation,
            session: None,
            later_turns: key.len() > conversation,
            previous: None,
        };
        router.decide(&learn, &backends);
        let request = RouteRequest { key: &key, ..learn };
        group.throughput(Throughput::Bytes(key.len() as u64));
        group.bench_with_input(BenchmarkId::new("continuation", size), &request, |b, r| {
            b.iter(|| router.decide(black_box(r), black_box(&backends)))
        });
        let (fresh, conversation) = chat_key(1_000_000 + size, size);
        let request = RouteRequest {
            model: MODEL,
            key: &fresh,
            conversation,
            session: None,
            later_turns: key.len() > conversation,
            previous: None,
        };
        // Each iteration records the prompt, so later ones see it as known;
        // a separate router per size keeps that from leaking across sizes.
        let placing = Router::new(32, 1 << 20);
        group.bench_with_input(BenchmarkId::new("repeat", size), &request, |b, r| {
            b.iter(|| placing.decide(black_box(r), black_box(&backends)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
