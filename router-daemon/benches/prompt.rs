//! Throughput of `prompt::extract` on representative request bodies.
//!
//! Run with `cargo bench -p router-daemon --bench prompt`. Each benchmark reports
//! bytes of request body per second.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use router_daemon::prompt::{Endpoint, extract};

/// English-like prose as it appears inside a JSON string: mostly plain ASCII with an
/// escaped newline or quote now and then.
fn prose(len: usize) -> String {
    const WORDS: &[&str] = &[
        "the", "router", "sends", "each", "request", "to", "a", "replica", "whose", "cache",
        "already", "holds", "longest", "matching", "prefix", "of", "prompt", "so", "that",
        "prefill", "work", "is", "not", "repeated", "and", "latency", "stays", "low",
    ];
    let mut s = String::with_capacity(len + 16);
    let mut i = 0usize;
    while s.len() < len {
        s.push_str(WORDS[i.wrapping_mul(7919) % WORDS.len()]);
        s.push_str(match i % 23 {
            0 => "\\n",
            11 => " \\\"quoted\\\" ",
            _ => " ",
        });
        i += 1;
    }
    s.truncate(len);
    // Never end on a lone backslash.
    while s.ends_with('\\') {
        s.pop();
    }
    s
}

/// Multilingual text (about a third non-ASCII), which takes the UTF-8 checking path.
fn multilingual(len: usize) -> String {
    let unit = "Paris est la capitale de la France. 東京は日本の首都です。 Привет, мир! ";
    let mut s = String::with_capacity(len + unit.len());
    while s.len() < len {
        s.push_str(unit);
    }
    while s.len() > len {
        s.pop();
    }
    s
}

fn completions_body(prompt: &str) -> Vec<u8> {
    format!(
        r#"{{"model": "meta-llama/Llama-3.2-1B-Instruct", "prompt": "{prompt}", "max_tokens": 100, "temperature": 0.7, "stream": false}}"#
    )
    .into_bytes()
}

fn chat_body(total: usize) -> Vec<u8> {
    let turn = total / 4;
    format!(
        r#"{{"model":"meta-llama/Llama-3.2-1B-Instruct","messages":[{{"role":"system","content":"{}"}},{{"role":"user","content":[{{"type":"text","text":"{}"}}]}},{{"role":"assistant","content":null,"tool_calls":[{{"id":"call_1","type":"function","function":{{"name":"lookup","arguments":"{{\"q\":\"x\"}}"}}}}]}},{{"role":"tool","tool_call_id":"call_1","content":"{}"}},{{"role":"user","content":"{}"}}],"max_tokens":100,"metadata":{{"prompt":"decoy"}}}}"#,
        prose(turn),
        prose(turn),
        prose(turn),
        prose(turn)
    )
    .into_bytes()
}

fn responses_body(total: usize) -> Vec<u8> {
    let turn = total / 3;
    format!(
        r#"{{"model":"m","instructions":"be brief","input":[{{"role":"system","content":"{}"}},{{"type":"message","role":"user","content":[{{"type":"input_text","text":"{}"}}]}},{{"type":"function_call","call_id":"c1","name":"f","arguments":"{{}}"}},{{"role":"user","content":"{}"}}],"stream":true}}"#,
        prose(turn),
        prose(turn),
        prose(turn)
    )
    .into_bytes()
}

fn tokens_body(len: usize) -> Vec<u8> {
    let mut ids = String::with_capacity(len + 16);
    let mut x: u32 = 12345;
    while ids.len() < len {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if !ids.is_empty() {
            ids.push_str(", ");
        }
        ids.push_str(&(x % 128_000).to_string());
    }
    format!(r#"{{"model":"m","prompt":[{ids}],"max_tokens":16}}"#).into_bytes()
}

fn bench(c: &mut Criterion) {
    let cases: Vec<(&str, Endpoint, Vec<u8>)> = vec![
        (
            "completions_string_100KB_ascii",
            Endpoint::Completions,
            completions_body(&prose(100_000)),
        ),
        (
            "completions_string_100KB_multilingual",
            Endpoint::Completions,
            completions_body(&multilingual(100_000)),
        ),
        (
            "completions_string_2KB",
            Endpoint::Completions,
            completions_body(&prose(2_000)),
        ),
        (
            "completions_tokens_100KB",
            Endpoint::Completions,
            tokens_body(100_000),
        ),
        ("chat_100KB", Endpoint::ChatCompletions, chat_body(100_000)),
        ("chat_2KB", Endpoint::ChatCompletions, chat_body(2_000)),
        (
            "responses_100KB",
            Endpoint::Responses,
            responses_body(100_000),
        ),
    ];
    let mut group = c.benchmark_group("prompt_extract");
    for (name, endpoint, body) in &cases {
        assert!(
            extract(*endpoint, body).is_ok(),
            "{name} must be a valid body"
        );
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(*name, |b| b.iter(|| extract(*endpoint, black_box(body))));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
