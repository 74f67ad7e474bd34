//! The workloads of `router-bench quality`: seeded generators of sessions
//! (one completion, or one chat conversation of several turns), a
//! Mooncake trace's requests as timed sessions, and the ideal prefix-cache
//! hit rate of a workload, computed from the prompts themselves.
//!
//! Prompts are made of words that are each one cl100k token with their
//! leading space, so a length given in tokens is (about) a length in words.
//! Distinct random texts share no 16-token block in practice (64 words,
//! 64^16 combinations).
use std::{collections::HashSet, time::Duration};

use super::trace;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::SliceRandom as _};
use vllm_sim::{
    cache::{BlockHash, block_hashes},
    chat_template,
    tokenize::{TokenId, Tokenizer},
};

/// Words of generated prompts, each one token with its leading space.
pub const WORDS: &[&str] = &[
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " at", " by", " this", " from", " or", " an", " are", " not", " but", " have",
    " which", " one", " all", " can", " their", " more", " time", " model", " data", " system",
    " cache", " token", " request", " server", " block", " memory", " value", " result", " first",
    " new", " other", " some", " would", " about", " there", " when", " what", " so", " if",
    " out", " up", " into", " than", " then", " also", " only", " over", " after", " most", " how",
];

/// A workload shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// SGLang's generated-shared-prefix: groups of prompts sharing a long
    /// system prompt, each with its own question.
    SharedPrefix,
    /// vLLM's multi-turn benchmark: chat conversations that resend their
    /// whole history each turn, under a common and a per-conversation
    /// prefix.
    MultiTurn,
    /// A few prefixes, each followed by many different suffixes.
    PrefixRepetition,
    /// Random prompts sharing nothing.
    NoSharing,
    /// A Mooncake-style trace replayed at its timestamps: hash ids of
    /// 512-token blocks become text; synthetic unless `--trace FILE`.
    Mooncake,
}

impl Kind {
    /// The name used on the command line and in the report.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SharedPrefix => "shared-prefix",
            Kind::MultiTurn => "multi-turn",
            Kind::PrefixRepetition => "prefix-repetition",
            Kind::NoSharing => "no-sharing",
            Kind::Mooncake => "mooncake",
        }
    }
}

/// The sizes of every workload (resolved from the flags).
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Generated tokens per request.
    pub output_len: usize,
    /// shared-prefix: groups.
    pub sp_groups: usize,
    /// shared-prefix: prompts per group.
    pub sp_prompts: usize,
    /// shared-prefix: system-prompt tokens.
    pub sp_system_len: usize,
    /// shared-prefix: question tokens.
    pub sp_question_len: usize,
    /// multi-turn: conversations.
    pub mt_conversations: usize,
    /// multi-turn: fewest turns of a conversation.
    pub mt_turns_min: usize,
    /// multi-turn: most turns of a conversation.
    pub mt_turns_max: usize,
    /// multi-turn: tokens of the prefix common to all conversations.
    pub mt_common_len: usize,
    /// multi-turn: tokens of each conversation's own prefix.
    pub mt_conv_prefix_len: usize,
    /// multi-turn: tokens of each user turn.
    pub mt_question_len: usize,
    /// prefix-repetition: prefixes.
    pub pr_prefixes: usize,
    /// prefix-repetition: suffixes per prefix.
    pub pr_suffixes: usize,
    /// prefix-repetition: prefix tokens.
    pub pr_prefix_len: usize,
    /// prefix-repetition: suffix tokens.
    pub pr_suffix_len: usize,
    /// no-sharing: requests.
    pub ns_requests: usize,
    /// no-sharing: prompt tokens.
    pub ns_prompt_len: usize,
    /// mooncake: requests of the synthetic trace (of a trace file: at most
    /// this many, the earliest; `None` is all).
    pub mc_requests: Option<usize>,
    /// mooncake: mean requests per second of the synthetic trace.
    pub mc_rate: f64,
    /// mooncake: replay speed (timestamps are divided by it).
    pub trace_speed: f64,
    /// mooncake: at most this many generated tokens per request.
    pub mc_max_output: usize,
}

/// What a session sends.
#[derive(Clone, Debug)]
pub enum Prompt {
    /// One `/v1/completions` request.
    Text(String),
    /// A conversation on `/v1/chat/completions`: the system message, then one
    /// request per user turn, each resending the whole history.
    Chat {
        /// The system message.
        system: String,
        /// The user turns, in order.
        turns: Vec<String>,
    },
}

impl Prompt {
    /// Requests the session sends.
    pub fn requests(&self) -> usize {
        match self {
            Prompt::Text(_) => 1,
            Prompt::Chat { turns, .. } => turns.len(),
        }
    }
}

/// One closed-loop unit of work: its requests go one after another.
#[derive(Clone, Debug)]
pub struct Session {
    /// Index in [`Workload::sessions`].
    pub id: usize,
    /// What it sends.
    pub prompt: Prompt,
    /// When it starts, from the run's start (a trace's timestamp); `None`
    /// when the arrival process decides.
    pub at: Option<Duration>,
    /// Generated tokens, when not [`Workload::output_len`].
    pub output_len: Option<usize>,
    /// The prefix family it belongs to, for `--records`: its shared-prefix
    /// group or prefix-repetition prefix, numbered in generation order;
    /// None for the other workloads.
    pub group: Option<usize>,
}

/// A generated workload.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Its shape.
    pub kind: Kind,
    /// Sessions in the order the load generator starts them.
    pub sessions: Vec<Session>,
    /// Its parameters, for the report.
    pub description: String,
    /// Tokens the fleet must cache for every reusable block to hit (an
    /// estimate from the structure; sizes the simulators' KV cache).
    pub working_set_tokens: usize,
    /// Generated tokens per request.
    pub output_len: usize,
}

impl Workload {
    /// Requests in all.
    pub fn requests(&self) -> usize {
        self.sessions.iter().map(|s| s.prompt.requests()).sum()
    }

    /// Whether its sessions carry their own start times (a trace replay),
    /// which then override `--concurrency` and `--rate`.
    pub fn timed(&self) -> bool {
        self.sessions.iter().any(|s| s.at.is_some())
    }
}

/// `len` random words.
fn text(rng: &mut StdRng, len: usize) -> String {
    let mut out = String::with_capacity(len * 6);
    for _ in 0..len {
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

/// Generates `kind` from `seed` (each workload has its own stream, so one
/// workload's sizes do not change another's prompts). `trace` is the
/// trace file's requests for [`Kind::Mooncake`] (none: a synthetic one).
pub fn generate(
    kind: Kind,
    sizes: &Sizes,
    seed: u64,
    trace: Option<&[trace::Request]>,
) -> Workload {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (kind as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let s = sizes;
    let (prompts, description, working_set_tokens) = match kind {
        Kind::SharedPrefix => {
            let mut prompts = Vec::new();
            for group in 0..s.sp_groups {
                let system = text(&mut rng, s.sp_system_len);
                for _ in 0..s.sp_prompts {
                    let question = text(&mut rng, s.sp_question_len);
                    prompts.push((Prompt::Text(format!("{system}{question}")), Some(group)));
                }
            }
            (
                prompts,
                format!(
                    "{} groups × {} prompts; system prompt {} tokens, question {} tokens, output {} \
                     tokens; requests shuffled",
                    s.sp_groups, s.sp_prompts, s.sp_system_len, s.sp_question_len, s.output_len
                ),
                s.sp_groups * s.sp_system_len,
            )
        }
        Kind::MultiTurn => {
            let common = text(&mut rng, s.mt_common_len);
            let mut convs = Vec::new();
            let mut tokens = s.mt_common_len;
            for _ in 0..s.mt_conversations {
                let own = text(&mut rng, s.mt_conv_prefix_len);
                let n = rng.random_range(s.mt_turns_min..=s.mt_turns_max);
                let turns = (0..n)
                    .map(|_| text(&mut rng, s.mt_question_len))
                    .collect::<Vec<_>>();
                tokens += s.mt_conv_prefix_len + n * (s.mt_question_len + s.output_len + 10);
                convs.push((
                    Prompt::Chat {
                        system: format!("{common}{own}"),
                        turns,
                    },
                    None,
                ));
            }
            (
                convs,
                format!(
                    "{} conversations of {}–{} turns on /v1/chat/completions, each resending its \
                     history; common prefix {} tokens, per-conversation prefix {} tokens, user turn \
                     {} tokens, output {} tokens",
                    s.mt_conversations,
                    s.mt_turns_min,
                    s.mt_turns_max,
                    s.mt_common_len,
                    s.mt_conv_prefix_len,
                    s.mt_question_len,
                    s.output_len
                ),
                tokens,
            )
        }
        Kind::PrefixRepetition => {
            let mut prompts = Vec::new();
            for group in 0..s.pr_prefixes {
                let prefix = text(&mut rng, s.pr_prefix_len);
                for _ in 0..s.pr_suffixes {
                    let suffix = text(&mut rng, s.pr_suffix_len);
                    prompts.push((Prompt::Text(format!("{prefix}{suffix}")), Some(group)));
                }
            }
            (
                prompts,
                format!(
                    "{} prefixes × {} suffixes; prefix {} tokens, suffix {} tokens, output {} \
                     tokens; requests shuffled",
                    s.pr_prefixes, s.pr_suffixes, s.pr_prefix_len, s.pr_suffix_len, s.output_len
                ),
                s.pr_prefixes * s.pr_prefix_len,
            )
        }
        Kind::Mooncake => return mooncake(sizes, seed, trace),
        Kind::NoSharing => {
            let prompts = (0..s.ns_requests)
                .map(|_| (Prompt::Text(text(&mut rng, s.ns_prompt_len)), None))
                .collect::<Vec<_>>();
            (
                prompts,
                format!(
                    "{} random prompts of {} tokens, output {} tokens",
                    s.ns_requests, s.ns_prompt_len, s.output_len
                ),
                s.ns_requests * s.ns_prompt_len,
            )
        }
    };
    let mut prompts = prompts;
    prompts.shuffle(&mut rng);
    let sessions = prompts
        .into_iter()
        .enumerate()
        .map(|(id, (prompt, group))| Session {
            id,
            prompt,
            at: None,
            output_len: None,
            group,
        })
        .collect();
    Workload {
        kind,
        sessions,
        description,
        working_set_tokens,
        output_len: s.output_len,
    }
}

/// The synthetic Mooncake trace's shape: `--mc-requests` at `--mc-rate`,
/// outputs of ½ to 2× `--output-len`.
pub fn synthetic_shape(s: &Sizes) -> trace::Synthetic {
    trace::Synthetic {
        requests: s.mc_requests.unwrap_or(0),
        rate: s.mc_rate,
        output: (s.output_len.div_ceil(2), s.output_len * 2),
    }
}

/// A Mooncake trace as a workload: one completion per line, sent at its
/// timestamp ÷ `--trace-speed` from the first line's, with its own output
/// length (capped by `--mc-max-output`), in timestamp order.
fn mooncake(sizes: &Sizes, seed: u64, file: Option<&[trace::Request]>) -> Workload {
    let s = sizes;
    let (requests, origin) = match file {
        Some(lines) => {
            let n = s.mc_requests.unwrap_or(lines.len()).min(lines.len());
            (lines[..n].to_vec(), "trace file")
        }
        None => (
            trace::synthetic(&synthetic_shape(s), seed),
            "synthetic trace",
        ),
    };
    let start = requests.first().map_or(0, |r| r.timestamp);
    let speed = if s.trace_speed > 0.0 {
        s.trace_speed
    } else {
        1.0
    };
    let mut texts = trace::Texts::default();
    let sessions = requests
        .iter()
        .enumerate()
        .map(|(id, r)| Session {
            id,
            prompt: Prompt::Text(texts.prompt(r)),
            at: Some(Duration::from_secs_f64(
                r.timestamp.saturating_sub(start) as f64 / 1e3 / speed,
            )),
            output_len: Some(r.output_length.clamp(1, s.mc_max_output.max(1))),
            group: None,
        })
        .collect::<Vec<_>>();
    let span = sessions.last().and_then(|x| x.at).unwrap_or_default();
    let blocks = requests.iter().map(|r| r.hash_ids.len()).sum::<usize>();
    let input = requests.iter().map(|r| r.input_length).sum::<usize>();
    let output = sessions.iter().filter_map(|x| x.output_len).sum::<usize>();
    let n = requests.len().max(1);
    let working_set_tokens = trace::working_set_tokens(&requests);
    Workload {
        kind: Kind::Mooncake,
        description: format!(
            "{origin}: {} requests over {:.1} s (speed ×{speed}); per request on average {:.1} \
             blocks of {} tokens, {} prompt tokens, {} output tokens (at most {}); {} distinct \
             blocks; replayed at its timestamps (open loop, whatever --concurrency or --rate)",
            requests.len(),
            span.as_secs_f64(),
            blocks as f64 / n as f64,
            trace::BLOCK_TOKENS,
            input / n,
            output / n,
            s.mc_max_output,
            working_set_tokens / trace::BLOCK_TOKENS,
        ),
        sessions,
        working_set_tokens,
        output_len: s.output_len,
    }
}

/// The chat messages of turn `turn` (0-based) of a conversation, given the
/// assistant's earlier replies.
pub fn chat_messages<'a>(
    system: &'a str,
    turns: &'a [String],
    replies: &'a [String],
    turn: usize,
) -> Vec<(&'static str, &'a str)> {
    let mut messages = vec![("system", system)];
    for (i, question) in turns.iter().enumerate().take(turn + 1) {
        messages.push(("user", question.as_str()));
        if i < turn {
            let reply = replies.get(i).map_or("", String::as_str);
            messages.push(("assistant", reply));
        }
    }
    messages
}

/// The token ids vllm-sim computes for a request: BOS plus the text for a
/// completion, the Llama-3 chat template for a conversation.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    prompt: &Prompt,
    replies: &[String],
    turn: usize,
) -> Vec<TokenId> {
    match prompt {
        Prompt::Text(text) => tokenizer.encode(text, true),
        Prompt::Chat { system, turns } => {
            let messages = chat_messages(system, turns, replies, turn);
            tokenizer.encode(&chat_template::render(messages, true), false)
        }
    }
}

/// The best hit rate any router could get.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Ideal {
    /// Prompt tokens of all requests.
    pub prompt_tokens: u64,
    /// Prompt tokens an unbounded, fleet-wide cache would serve.
    pub cached_tokens: u64,
}

impl Ideal {
    /// `cached / prompt`, 0 for an empty workload.
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

/// The ideal hit rate: requests replayed in workload order into one
/// unbounded cache. A request hits the longest run of its leading whole
/// blocks that an earlier request computed (its prompt, and for a chat its
/// prompt plus the reply, which the next turn quotes), at most
/// ⌊(n−1)/block⌋ blocks, as vLLM always recomputes the last prompt token.
/// `replies[session][turn]` is the reply of that turn (from a run; a
/// simulator's reply depends only on the prompt).
pub fn ideal(
    workload: &Workload,
    replies: &[Vec<String>],
    tokenizer: &Tokenizer,
    block_size: usize,
) -> Ideal {
    let mut seen: HashSet<BlockHash> = HashSet::new();
    let mut out = Ideal::default();
    let empty = Vec::new();
    for session in &workload.sessions {
        let replies = replies.get(session.id).unwrap_or(&empty);
        for turn in 0..session.prompt.requests() {
            let ids = prompt_ids(tokenizer, &session.prompt, replies, turn);
            let hashes = block_hashes(&ids, block_size);
            let reusable = ids.len().saturating_sub(1) / block_size;
            let hit = hashes
                .iter()
                .take(reusable)
                .take_while(|h| seen.contains(h))
                .count();
            out.prompt_tokens += ids.len() as u64;
            out.cached_tokens += (hit * block_size) as u64;
            let mut computed = ids;
            if let Some(reply) = replies.get(turn) {
                computed.extend(tokenizer.encode_ordinary(reply));
            }
            seen.extend(block_hashes(&computed, block_size));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Sizes {
        Sizes {
            output_len: 4,
            sp_groups: 2,
            sp_prompts: 3,
            sp_system_len: 64,
            sp_question_len: 8,
            mt_conversations: 2,
            mt_turns_min: 2,
            mt_turns_max: 3,
            mt_common_len: 32,
            mt_conv_prefix_len: 32,
            mt_question_len: 8,
            pr_prefixes: 2,
            pr_suffixes: 2,
            pr_prefix_len: 64,
            pr_suffix_len: 8,
            ns_requests: 4,
            ns_prompt_len: 40,
            mc_requests: Some(40),
            mc_rate: 100.0,
            trace_speed: 2.0,
            mc_max_output: 6,
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        for kind in [
            Kind::SharedPrefix,
            Kind::MultiTurn,
            Kind::PrefixRepetition,
            Kind::Mooncake,
        ] {
            let a = generate(kind, &tiny(), 7, None);
            let b = generate(kind, &tiny(), 7, None);
            let c = generate(kind, &tiny(), 8, None);
            assert_eq!(format!("{:?}", a.sessions), format!("{:?}", b.sessions));
            assert_ne!(format!("{:?}", a.sessions), format!("{:?}", c.sessions));
        }
    }

    #[test]
    fn ideal_counts_shared_blocks_only() {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        let ns = generate(Kind::NoSharing, &tiny(), 1, None);
        assert_eq!(ideal(&ns, &[], tokenizer, 16).cached_tokens, 0);
        let sp = generate(Kind::SharedPrefix, &tiny(), 1, None);
        let got = ideal(&sp, &[], tokenizer, 16);
        // Two of each group's three prompts reuse the 64-token system
        // prompt (plus BOS): 4 blocks each.
        assert_eq!(got.cached_tokens, 2 * 2 * 64);
        assert!(got.hit_rate() > 0.0 && got.hit_rate() < 1.0);
    }

    #[test]
    fn sessions_name_the_prefix_family_they_belong_to() {
        let text = |session: &Session| match &session.prompt {
            Prompt::Text(text) => text.clone(),
            Prompt::Chat { .. } => panic!("a completion workload"),
        };
        for kind in [Kind::SharedPrefix, Kind::PrefixRepetition] {
            let w = generate(kind, &tiny(), 1, None);
            let groups: Vec<usize> = w.sessions.iter().filter_map(|s| s.group).collect();
            assert_eq!(
                groups.len(),
                w.sessions.len(),
                "{kind:?}: every one has a group"
            );
            for a in &w.sessions {
                for b in &w.sessions {
                    // 40 bytes fall inside the shared prefix and past any
                    // chance agreement of two random texts.
                    let alike = text(a)[..40] == text(b)[..40];
                    assert_eq!(alike, a.group == b.group, "{kind:?}: {a:?} and {b:?}");
                }
            }
        }
        for kind in [Kind::NoSharing, Kind::MultiTurn] {
            let w = generate(kind, &tiny(), 1, None);
            assert!(w.sessions.iter().all(|s| s.group.is_none()), "{kind:?}");
        }
    }

    #[test]
    fn a_later_turn_reuses_the_earlier_turn_and_its_reply() {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        let mt = generate(Kind::MultiTurn, &tiny(), 3, None);
        let replies: Vec<Vec<String>> = mt
            .sessions
            .iter()
            .map(|s| vec!["the cache of the model".repeat(8); s.prompt.requests()])
            .collect();
        let with = ideal(&mt, &replies, tokenizer, 16);
        let without = ideal(&mt, &[], tokenizer, 16);
        assert!(with.cached_tokens > without.cached_tokens);
    }

    #[test]
    fn a_trace_replays_at_its_scaled_timestamps_with_its_own_outputs() {
        let lines = trace::parse(concat!(
            r#"{"timestamp": 1000, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}"#,
            "\n",
            r#"{"timestamp": 3000, "input_length": 1100, "output_length": 50, "hash_ids": [1, 2, 3]}"#,
            "\n",
            r#"{"timestamp": 5000, "input_length": 40, "output_length": 9, "hash_ids": [4]}"#,
        ))
        .expect("valid");
        let w = generate(Kind::Mooncake, &tiny(), 1, Some(&lines));
        assert!(w.timed());
        let at = w.sessions.iter().map(|s| s.at).collect::<Vec<_>>();
        // Speed 2: 0, 1 s, 2 s after the first line.
        assert_eq!(
            at,
            [0, 1000, 2000].map(|ms| Some(Duration::from_millis(ms)))
        );
        let out = w.sessions.iter().map(|s| s.output_len).collect::<Vec<_>>();
        // Capped at --mc-max-output 6.
        assert_eq!(out, [Some(3), Some(6), Some(6)]);
        assert_eq!(w.working_set_tokens, 4 * trace::BLOCK_TOKENS);
        // --mc-requests keeps the earliest lines.
        assert_eq!(w.requests(), 3);
        let sizes = Sizes {
            mc_requests: Some(2),
            ..tiny()
        };
        assert_eq!(
            generate(Kind::Mooncake, &sizes, 1, Some(&lines)).requests(),
            2
        );
    }

    #[test]
    fn a_trace_ideal_counts_its_shared_blocks() {
        let tokenizer = Tokenizer::shared().expect("cl100k_base is embedded");
        let lines = trace::parse(concat!(
            r#"{"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}"#,
            "\n",
            r#"{"timestamp": 1, "input_length": 1100, "output_length": 3, "hash_ids": [1, 2, 3]}"#,
            "\n",
            r#"{"timestamp": 2, "input_length": 700, "output_length": 3, "hash_ids": [1, 9]}"#,
            "\n",
            r#"{"timestamp": 3, "input_length": 512, "output_length": 3, "hash_ids": [8]}"#,
        ))
        .expect("valid");
        let w = generate(Kind::Mooncake, &tiny(), 1, Some(&lines));
        let got = ideal(&w, &[], tokenizer, 16);
        // BOS + words, one token each.
        assert_eq!(got.prompt_tokens, 4 + 600 + 1100 + 700 + 512);
        // Line 2 reuses line 1's 601 tokens: 37 whole 16-token blocks.
        // Line 3 shares block 1 (and BOS): 513 tokens, 32 blocks. Line 4
        // shares nothing.
        assert_eq!(got.cached_tokens, (37 + 32) * 16);
        // A synthetic trace shares a good part of its prompts.
        let synthetic = generate(Kind::Mooncake, &tiny(), 5, None);
        let rate = ideal(&synthetic, &[], tokenizer, 16).hit_rate();
        assert!(rate > 0.2 && rate < 0.95, "{rate}");
    }
}
