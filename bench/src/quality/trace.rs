//! Mooncake-style request traces: reading one from JSONL, generating a
//! small synthetic one with the same shape, and turning a line's hash ids
//! into prompt text.
//!
//! A line is `{"timestamp": ms, "input_length": tokens, "output_length":
//! tokens, "hash_ids": [..]}`, as in the traces Mooncake published
//! (`kvcache-ai/Mooncake`, `mooncake_trace.jsonl`). Each hash id stands for
//! a block of [`BLOCK_TOKENS`] prompt tokens: two requests whose lists start
//! with the same ids share that many blocks of prefix. Here every id becomes
//! a fixed text of [`BLOCK_TOKENS`] one-token words (the same id always
//! gives the same text), and a prompt is the first `input_length` words of
//! its blocks in order, so its last block may be partial.
use std::{collections::HashMap, path::Path};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::workload::WORDS;

/// Prompt tokens one hash id stands for.
pub const BLOCK_TOKENS: usize = 512;

/// Lines a trace file may have (a guard against reading a huge file whole).
const MAX_LINES: usize = 1_000_000;

/// Hash ids a line may have.
const MAX_BLOCKS: usize = 4096;

/// Mixed into a hash id to seed its block's text.
const BLOCK_SEED: u64 = 0x6d6f_6f6e_6361_6b65;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Request {
    /// When it is sent, ms from the trace's origin.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: usize,
    /// Generated tokens.
    pub output_length: usize,
    /// One id per block of [`BLOCK_TOKENS`] prompt tokens, the last
    /// possibly partial.
    pub hash_ids: Vec<u64>,
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a trace request.
    #[error("line {line}: {reason}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Too many lines to hold.
    #[error("more than {MAX_LINES} lines")]
    TooLong,
    /// No request at all.
    #[error("the trace has no requests")]
    Empty,
}

/// Reads a JSONL trace file (see [`parse`]).
pub fn load(path: &Path) -> Result<Vec<Request>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parses JSONL trace text: one request per non-blank line, each checked
/// (at least one hash id, an input that fits its blocks and needs every
/// one of them). Requests come back sorted by timestamp (stable).
pub fn parse(text: &str) -> Result<Vec<Request>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        if out.len() >= MAX_LINES {
            return Err(TraceError::TooLong);
        }
        let bad = |reason: String| TraceError::Line {
            line: line_no,
            reason,
        };
        let request: Request =
            serde_json::from_str(line).map_err(|e| bad(format!("not a trace request: {e}")))?;
        let blocks = request.hash_ids.len();
        if blocks == 0 {
            return Err(bad("hash_ids is empty".into()));
        }
        if blocks > MAX_BLOCKS {
            return Err(bad(format!("more than {MAX_BLOCKS} hash ids")));
        }
        if request.input_length == 0 {
            return Err(bad("input_length is 0".into()));
        }
        if request.input_length > blocks * BLOCK_TOKENS {
            return Err(bad(format!(
                "input_length {} is more than its {blocks} blocks of {BLOCK_TOKENS} tokens hold",
                request.input_length
            )));
        }
        if request.input_length <= (blocks - 1) * BLOCK_TOKENS {
            return Err(bad(format!(
                "input_length {} leaves the last of its {blocks} blocks empty",
                request.input_length
            )));
        }
        out.push(request);
    }
    if out.is_empty() {
        return Err(TraceError::Empty);
    }
    out.sort_by_key(|r| r.timestamp);
    Ok(out)
}

/// The text of block `id`: [`BLOCK_TOKENS`] words, each one token, a pure
/// function of the id.
pub fn block_words(id: u64) -> Vec<&'static str> {
    let mut rng = StdRng::seed_from_u64(id ^ BLOCK_SEED);
    (0..BLOCK_TOKENS)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect()
}

/// Builds prompts from hash ids, remembering each block's text.
#[derive(Debug, Default)]
pub struct Texts {
    blocks: HashMap<u64, Vec<&'static str>>,
}

impl Texts {
    /// The prompt of `request`: the first `input_length` words of its
    /// blocks in order.
    pub fn prompt(&mut self, request: &Request) -> String {
        let mut out = String::with_capacity(request.input_length * 6);
        let mut left = request.input_length;
        for &id in &request.hash_ids {
            if left == 0 {
                break;
            }
            let words = self.blocks.entry(id).or_insert_with(|| block_words(id));
            let take = left.min(words.len());
            for word in &words[..take] {
                out.push_str(word);
            }
            left -= take;
        }
        out
    }
}

/// The shape of a synthetic trace.
#[derive(Clone, Debug)]
pub struct Synthetic {
    /// Requests.
    pub requests: usize,
    /// Mean requests per second (Poisson arrivals).
    pub rate: f64,
    /// Fewest and most generated tokens of a request.
    pub output: (usize, usize),
}

/// Shared prefixes ("system prompts", documents) per request of a
/// synthetic trace.
const ROOTS_PER_REQUEST: f64 = 1.0 / 8.0;
/// Blocks of a shared prefix: 1 to this many.
const ROOT_BLOCKS_MAX: usize = 4;
/// Zipf exponent of the shared prefixes' popularity.
const ZIPF_S: f64 = 1.1;
/// Chance that a request continues a recent conversation.
const CONTINUE_P: f64 = 0.45;
/// Conversations a new turn may continue: the most recent ones.
const RECENT: usize = 24;
/// Blocks past which a conversation is not continued.
const CONVERSATION_BLOCKS_MAX: usize = 10;

/// A seeded trace shaped like Mooncake's: a pool of shared prefixes whose
/// popularity is Zipf-distributed (a few very popular, a long tail used
/// once or twice), conversations that come back and extend their whole
/// history by one or two blocks, fresh blocks for what is new, a partial
/// last block, and Poisson arrival times.
pub fn synthetic(shape: &Synthetic, seed: u64) -> Vec<Request> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0074_7261_6365);
    let roots_n = ((shape.requests as f64 * ROOTS_PER_REQUEST).ceil() as usize).max(2);
    let mut next_id = 0u64;
    let mut fresh = |n: usize| {
        let ids = (next_id..next_id + n as u64).collect::<Vec<_>>();
        next_id += n as u64;
        ids
    };
    let roots = (0..roots_n)
        .map(|_| {
            let n = rng.random_range(1..=ROOT_BLOCKS_MAX);
            fresh(n)
        })
        .collect::<Vec<_>>();
    // Zipf by inverse CDF over the roots' ranks.
    let weights = (1..=roots_n)
        .map(|k| 1.0 / (k as f64).powf(ZIPF_S))
        .collect::<Vec<_>>();
    let total: f64 = weights.iter().sum();
    let cdf = weights
        .iter()
        .scan(0.0, |acc, w| {
            *acc += w / total;
            Some(*acc)
        })
        .collect::<Vec<_>>();
    let (lo, hi) = (
        shape.output.0.max(1),
        shape.output.1.max(shape.output.0.max(1)),
    );
    let rate = if shape.rate > 0.0 { shape.rate } else { 1.0 };
    let mut conversations: Vec<Vec<u64>> = Vec::new();
    let mut at = 0.0f64;
    let mut out = Vec::with_capacity(shape.requests);
    for _ in 0..shape.requests {
        // Exponential gaps: -ln(U) / rate, U in (0, 1].
        let u: f64 = 1.0 - rng.random::<f64>();
        at += -u.ln() / rate * 1000.0;
        let recent = conversations.len().saturating_sub(RECENT);
        let open = (recent..conversations.len())
            .filter(|&i| conversations[i].len() < CONVERSATION_BLOCKS_MAX)
            .collect::<Vec<_>>();
        let new_blocks = rng.random_range(1..=2);
        let ids = if !open.is_empty() && rng.random_bool(CONTINUE_P) {
            let i = open[rng.random_range(0..open.len())];
            let mut ids = conversations[i].clone();
            ids.extend(fresh(new_blocks));
            conversations[i] = ids.clone();
            ids
        } else {
            let x: f64 = rng.random();
            let root = cdf.iter().position(|&c| x < c).unwrap_or(roots_n - 1);
            let mut ids = roots[root].clone();
            ids.extend(fresh(new_blocks));
            conversations.push(ids.clone());
            ids
        };
        let last = rng.random_range(BLOCK_TOKENS / 8..=BLOCK_TOKENS);
        out.push(Request {
            timestamp: at as u64,
            input_length: (ids.len() - 1) * BLOCK_TOKENS + last,
            output_length: rng.random_range(lo..=hi),
            hash_ids: ids,
        });
    }
    out
}

/// Distinct hash ids of a trace, in tokens: what a fleet must hold for
/// every reusable block to hit.
pub fn working_set_tokens(trace: &[Request]) -> usize {
    let mut ids = std::collections::HashSet::new();
    for r in trace {
        ids.extend(r.hash_ids.iter().copied());
    }
    ids.len() * BLOCK_TOKENS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(ts: u64, input: usize, ids: &[u64]) -> String {
        serde_json::json!({
            "timestamp": ts, "input_length": input, "output_length": 4, "hash_ids": ids
        })
        .to_string()
    }

    #[test]
    fn a_trace_parses_sorted_by_time() {
        let text = format!("{}\n\n{}\n", line(900, 700, &[1, 2]), line(100, 512, &[1]));
        let trace = parse(&text).expect("valid");
        assert_eq!(trace.len(), 2);
        assert_eq!(trace[0].timestamp, 100);
        assert_eq!(trace[1].hash_ids, [1, 2]);
    }

    #[test]
    fn inconsistent_lines_are_refused_with_their_number() {
        for (bad, why) in [
            (line(0, 1025, &[1, 2]), "hold"),
            (line(0, 512, &[1, 2]), "empty"),
            (line(0, 10, &[]), "hash_ids is empty"),
            (line(0, 0, &[1]), "input_length is 0"),
            (r#"{"timestamp": 1}"#.to_owned(), "not a trace request"),
        ] {
            let text = format!("{}\n{bad}\n", line(0, 10, &[7]));
            match parse(&text) {
                Err(TraceError::Line { line: 2, reason }) => {
                    assert!(reason.contains(why), "{reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(parse("\n \n"), Err(TraceError::Empty)));
    }

    #[test]
    fn the_sample_trace_in_the_repository_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces/mooncake-sample.jsonl");
        let trace = load(&path).expect("the sample trace is valid");
        assert!(trace.len() >= 50);
        // Requests share prefixes: some first block comes back.
        let firsts = trace.iter().map(|r| r.hash_ids[0]).collect::<Vec<_>>();
        let distinct = firsts.iter().collect::<std::collections::HashSet<_>>();
        assert!(distinct.len() < firsts.len());
    }

    #[test]
    fn the_same_id_gives_the_same_text_and_the_last_block_is_partial() {
        let tokenizer = vllm_sim::tokenize::Tokenizer::shared().expect("embedded");
        let mut texts = Texts::default();
        let a = Request {
            timestamp: 0,
            input_length: BLOCK_TOKENS + 100,
            output_length: 1,
            hash_ids: vec![5, 6],
        };
        let b = Request {
            input_length: 2 * BLOCK_TOKENS + 3,
            hash_ids: vec![5, 6, 9],
            ..a.clone()
        };
        let (pa, pb) = (texts.prompt(&a), texts.prompt(&b));
        // One token per word.
        assert_eq!(tokenizer.encode_ordinary(&pa).len(), BLOCK_TOKENS + 100);
        assert_eq!(tokenizer.encode_ordinary(&pb).len(), 2 * BLOCK_TOKENS + 3);
        // b extends a: same blocks, same text; a fresh Texts agrees.
        assert!(pb.starts_with(&pa));
        assert_eq!(Texts::default().prompt(&a), pa);
        // Different ids, different text.
        let c = Request {
            hash_ids: vec![7, 6],
            ..a.clone()
        };
        assert_ne!(texts.prompt(&c)[..200], pa[..200]);
    }

    #[test]
    fn a_synthetic_trace_is_seeded_valid_and_reuses_prefixes() {
        let shape = Synthetic {
            requests: 400,
            rate: 50.0,
            output: (4, 16),
        };
        let a = synthetic(&shape, 3);
        assert_eq!(a, synthetic(&shape, 3));
        assert_ne!(a, synthetic(&shape, 4));
        assert_eq!(a.len(), 400);
        // It survives its own parser (every line consistent).
        let text = a
            .iter()
            .map(|r| serde_json::to_string(r).expect("serialisable"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(parse(&text).expect("valid"), a);
        // Poisson at 50/s: 400 requests in about 8 s.
        let span = a.last().map_or(0, |r| r.timestamp);
        assert!((5_000..12_000).contains(&span), "{span} ms");
        assert!(a.iter().all(|r| (4..=16).contains(&r.output_length)));
        // Reuse is heavy-tailed: the most used first block serves many
        // requests, and most blocks are used once.
        let mut uses: HashMap<u64, usize> = HashMap::new();
        for r in &a {
            for &id in &r.hash_ids {
                *uses.entry(id).or_default() += 1;
            }
        }
        let max = uses.values().copied().max().unwrap_or(0);
        let once = uses.values().filter(|&&n| n == 1).count();
        assert!(max >= 40, "the most popular block is used {max} times");
        assert!(once * 3 > uses.len(), "{once} of {} used once", uses.len());
        // Conversations come back: some request extends an earlier one's
        // whole list.
        let extends = a.iter().enumerate().any(|(i, r)| {
            a[..i].iter().any(|p| {
                p.hash_ids.len() > 2
                    && r.hash_ids.len() > p.hash_ids.len()
                    && r.hash_ids.starts_with(&p.hash_ids)
            })
        });
        assert!(extends);
        assert_eq!(working_set_tokens(&a), uses.len() * BLOCK_TOKENS);
    }
}
