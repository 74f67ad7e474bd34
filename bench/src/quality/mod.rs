//! `router-bench quality`: how well each router keeps prefixes cached, and
//! what that buys in time to first token, on workloads shaped like SGLang's
//! and vLLM's prefix-caching benchmarks and on a Mooncake-style trace.
//!
//! For every workload and every router the run starts a fresh fleet of
//! in-process vllm-sim backends (cold caches, KV capacity sized so the
//! working set fits the fleet but not one simulator), puts the router in
//! front, and drives the workload closed-loop (or open-loop with `--rate`;
//! a trace replays at its own timestamps). Every request streams with
//! `stream_options.include_usage`, so the client sees its TTFT, its cached
//! tokens and (from `x-served-by`) its backend. Meanwhile each simulator's
//! running + waiting requests are sampled, and a router process's CPU time
//! and peak memory are read from /proc.
//!
//! Routers: the router-daemon binary with its default policy; two
//! client-side baselines, where the load generator itself picks the
//! backend and talks to it directly (`round-robin`: the next backend in
//! turn; `least-loaded`: the fewest of this generator's requests in
//! flight); nginx round-robin where nginx is installed, the first
//! baseline plus one proxy hop (what a hop costs with no policy of ours);
//! vllm-router and sglang-router when installed (see [`peers`];
//! `--no-peers` leaves them out); and any `--peer NAME=CMD`, a command
//! that listens on `$PORT`.
//!
//! Layout: [`workload`] generates the workloads and their ideal hit rate,
//! [`trace`] reads and synthesises Mooncake traces, [`peers`] knows the
//! peer routers, [`run`](mod@run) runs one workload through one router,
//! [`load`] samples the simulators, [`report`] writes the markdown,
//! [`plot`] draws the PNGs. A router that fails on a workload is a
//! *failed* row; the run goes on.
use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub mod load;
pub mod peers;
pub mod plot;
pub mod report;
pub mod run;
pub mod trace;
pub mod workload;

use report::{Report, Row, Section};
use run::{FleetConfig, Router, RouterKind};
use workload::{Kind, Sizes};

/// A router of the comparison, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Builtin {
    /// router-daemon with its default policy.
    RouterDaemon,
    /// router-daemon with `--routing-logic roundrobin`: round-robin with
    /// the proxy hop, to set against the client-side one.
    RouterDaemonRoundrobin,
    /// Client-side: the next backend in turn.
    RoundRobin,
    /// Client-side: the backend with the fewest requests in flight.
    LeastLoaded,
    /// nginx as a plain L7 proxy, round-robin over kept-alive upstream
    /// connections with `proxy_buffering off`: the client-side
    /// round-robin plus one proxy hop, and no policy of ours. Left out,
    /// with a message, where nginx is not installed.
    Nginx,
}

/// The `nginx` row's name in the report.
pub const NGINX_ROW: &str = "nginx round-robin";

/// A load level of the run (`--levels`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    /// This many sessions in flight; the next starts when one ends.
    Closed(usize),
    /// Sessions start at Poisson times, this many per second.
    Open(f64),
    /// An open loop at this fraction of the capacity measured at the
    /// closed level run before it.
    Capacity(f64),
}

impl std::str::FromStr for Level {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v > 0.0 && *v <= 100_000.0)
                .ok_or_else(|| format!("{s:?}: a positive number must follow"))
        };
        if let Some(n) = s.strip_prefix("cap") {
            Ok(Level::Capacity(number(n)?))
        } else if let Some(n) = s.strip_prefix('c') {
            n.parse::<usize>()
                .ok()
                .filter(|&n| (1..=4096).contains(&n))
                .map(Level::Closed)
                .ok_or_else(|| format!("{s:?}: c takes 1 to 4096 sessions"))
        } else if let Some(n) = s.strip_prefix('r') {
            Ok(Level::Open(number(n)?))
        } else {
            Err(format!("{s:?}: a level is cN, rX or capF"))
        }
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Level::Closed(n) => write!(f, "closed loop, {n} sessions"),
            Level::Open(rate) => write!(f, "open loop, {rate} sessions/s"),
            Level::Capacity(frac) => write!(f, "open loop at {frac}× capacity"),
        }
    }
}

/// Options of `router-bench quality`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Workloads to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "shared-prefix,multi-turn,prefix-repetition,no-sharing,mooncake"
    )]
    pub workloads: Vec<Kind>,
    /// Routers to compare (`router-daemon-roundrobin` adds the daemon
    /// under `--routing-logic roundrobin`, `nginx` nginx's round-robin:
    /// what a proxy hop costs without our policy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "round-robin,least-loaded,router-daemon,nginx"
    )]
    pub routers: Vec<Builtin>,
    /// Another router, `NAME=CMD`, started with `bash -c CMD` with `$PORT`
    /// (to listen on, 127.0.0.1), `$BACKEND_URLS` (comma-separated) and
    /// `$MODEL` set; repeatable.
    #[arg(long = "peer", value_name = "NAME=CMD")]
    pub peers: Vec<String>,
    /// Leave out vllm-router and sglang-router even when installed.
    #[arg(long)]
    pub no_peers: bool,
    /// Where vllm-router and sglang-router are (default: on `PATH`);
    /// `cargo xtask bench quality` passes its venv's `bin`.
    #[arg(long, value_name = "DIR")]
    pub peers_dir: Option<PathBuf>,
    /// The peers' policies, one row each [default: cache_aware,round_robin;
    /// quick: cache_aware].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub peer_policies: Option<Vec<peers::Policy>>,
    /// The nginx binary of the `nginx` row (default: `nginx` on `PATH`,
    /// else /usr/sbin/nginx); `cargo xtask bench quality` installs it.
    #[arg(long, value_name = "PATH")]
    pub nginx_bin: Option<PathBuf>,
    /// The router-daemon binary (default: next to this executable).
    #[arg(long, value_name = "PATH")]
    pub router_bin: Option<PathBuf>,
    /// With K > 1, also run K router-daemon replicas with no shared state,
    /// each request sent to one picked at random (a row `router-daemon ×K`).
    #[arg(long, value_name = "K", default_value_t = 1)]
    pub daemon_replicas: usize,
    /// An extra router-daemon flag (repeatable), e.g. `--router-arg=--load-epsilon=0.5`.
    #[arg(long = "router-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub router_args: Vec<String>,
    /// Seed of every workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// About three minutes in all: smaller workloads, fewer turns, three
    /// closed-loop levels, the peers under cache_aware only.
    #[arg(long)]
    pub quick: bool,
    /// Runs of every router at every level, each on a fresh fleet, the
    /// routers taking turns; each cell of the report is the median over
    /// them, so one unlucky run does not decide a ratio [default: 3,
    /// quick 1].
    #[arg(long)]
    pub windows: Option<usize>,
    /// Simulators in the fleet.
    #[arg(long, default_value_t = 4)]
    pub backends: usize,
    /// One load level instead of --levels: this many sessions in flight at
    /// once (closed loop).
    #[arg(long, conflicts_with_all = ["rate", "levels"])]
    pub concurrency: Option<usize>,
    /// One load level instead of --levels: open loop, sessions start at
    /// Poisson times, this many per second on average (seeded by --seed).
    #[arg(long, value_name = "PER_SEC", conflicts_with = "levels")]
    pub rate: Option<f64>,
    /// Load levels each workload runs at, in order: `cN` is a closed loop
    /// of N sessions, `rX` an open loop of X sessions/s, `capF` an open loop
    /// at F × the fleet's capacity as measured at the closed level before it
    /// (round-robin's sessions/s) [default: c4,c16,c64,cap0.9; quick
    /// c2,c8,c32]. A trace replays once, at its own timestamps.
    #[arg(long, value_delimiter = ',', value_name = "LEVELS")]
    pub levels: Option<Vec<Level>>,
    /// The simulators' latency profile.
    #[arg(long, value_enum, default_value_t = vllm_sim::Profile::Llama8bH100)]
    pub profile: vllm_sim::Profile,
    /// Multiplies the simulators' delays (prefill, decode); > 0 so TTFT
    /// reflects prefill work.
    #[arg(long, default_value_t = 0.2)]
    pub time_scale: f64,
    /// KV capacity of the whole fleet ÷ the workload's working set: with
    /// the default 1.5 and 4 simulators one holds 37.5% of it.
    #[arg(long, default_value_t = 1.5)]
    pub kv_fit: f64,
    /// Simulator i listens on 127.0.0.1:(this + i), so backend URLs, and
    /// with them rendezvous placements, are the same in every run and for
    /// every router: two runs differ by timing alone (0: any free ports,
    /// a different hash layout each time; a taken port falls back to a
    /// free one). Below Linux's ephemeral range, so the routers' own free
    /// ports never take it.
    #[arg(long, default_value_t = 18600)]
    pub backend_port_base: u16,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Generated tokens per request [default: 16, quick 8].
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Send this header with each conversation's id (multi-turn), e.g.
    /// x-session-id; off by default, as in vLLM's benchmark.
    #[arg(long, value_name = "NAME")]
    pub session_header: Option<String>,
    /// shared-prefix: groups [default: 16, quick 8].
    #[arg(long)]
    pub sp_groups: Option<usize>,
    /// shared-prefix: prompts per group [default: 32, quick 16].
    #[arg(long)]
    pub sp_prompts: Option<usize>,
    /// shared-prefix: system-prompt tokens [default: 1536, quick 1024].
    #[arg(long)]
    pub sp_system_len: Option<usize>,
    /// shared-prefix: question tokens.
    #[arg(long, default_value_t = 96)]
    pub sp_question_len: usize,
    /// multi-turn: conversations [default: 32, quick 16].
    #[arg(long)]
    pub mt_conversations: Option<usize>,
    /// multi-turn: fewest turns [default: 12, quick 4].
    #[arg(long)]
    pub mt_turns_min: Option<usize>,
    /// multi-turn: most turns [default: 18, quick 8].
    #[arg(long)]
    pub mt_turns_max: Option<usize>,
    /// multi-turn: tokens of the prefix all conversations share.
    #[arg(long, default_value_t = 256)]
    pub mt_common_len: usize,
    /// multi-turn: tokens of each conversation's own prefix [default: 1024, quick 512].
    #[arg(long)]
    pub mt_conv_prefix_len: Option<usize>,
    /// multi-turn: tokens of a user turn.
    #[arg(long, default_value_t = 48)]
    pub mt_question_len: usize,
    /// prefix-repetition: prefixes [default: 12, quick 6].
    #[arg(long)]
    pub pr_prefixes: Option<usize>,
    /// prefix-repetition: suffixes per prefix [default: 40, quick 20].
    #[arg(long)]
    pub pr_suffixes: Option<usize>,
    /// prefix-repetition: prefix tokens [default: 1536, quick 1024].
    #[arg(long)]
    pub pr_prefix_len: Option<usize>,
    /// prefix-repetition: suffix tokens.
    #[arg(long, default_value_t = 64)]
    pub pr_suffix_len: usize,
    /// no-sharing: requests [default: 256, quick 96].
    #[arg(long)]
    pub ns_requests: Option<usize>,
    /// no-sharing: prompt tokens [default: 1024, quick 512].
    #[arg(long)]
    pub ns_prompt_len: Option<usize>,
    /// mooncake: replay this JSONL trace (`{"timestamp": ms,
    /// "input_length", "output_length", "hash_ids": [..]}` per line, 512
    /// tokens per hash id) instead of a synthetic one, e.g.
    /// bench/traces/mooncake-sample.jsonl.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// mooncake: replay speed; timestamps are divided by it.
    #[arg(long, default_value_t = 1.0)]
    pub trace_speed: f64,
    /// mooncake: requests of the synthetic trace, or the first this many
    /// of --trace [default: 240, quick 80; --trace: all].
    #[arg(long)]
    pub mc_requests: Option<usize>,
    /// mooncake: requests per second of the synthetic trace (Poisson).
    #[arg(long, default_value_t = 40.0)]
    pub mc_rate: f64,
    /// mooncake: at most this many generated tokens per request (a trace's
    /// output_length is capped).
    #[arg(long, default_value_t = 256)]
    pub mc_max_output: usize,
    /// mooncake: also write the trace replayed (synthetic or the part of
    /// --trace used) to FILE as JSONL.
    #[arg(long, value_name = "FILE")]
    pub save_trace: Option<PathBuf>,
    /// Tokio worker threads of the load generator and simulators (0 = one
    /// per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where the report goes.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    pub out_dir: PathBuf,
    /// Keep the temporary directory (router logs) after a clean run.
    #[arg(long)]
    pub keep_tmp: bool,
    /// Also write every request's outcome, one CSV per workload, level and
    /// router, into this directory: when it was sent, its session, prefix
    /// family (shared-prefix group or prefix-repetition prefix) and turn,
    /// the backend that served it, TTFT, end-to-end time and cached tokens.
    /// What a tail is made of.
    #[arg(long, value_name = "DIR")]
    pub records: Option<PathBuf>,
    /// Leave out the PNG plots (TTFT CDF per workload, hit rate vs load
    /// imbalance).
    #[arg(long)]
    pub no_plots: bool,
    /// The command line to print in the report (set by `cargo xtask`).
    #[arg(long, hide = true)]
    pub invoked_as: Option<String>,
}

impl Args {
    fn sizes(&self) -> Sizes {
        let q = self.quick;
        let pick = |v: Option<usize>, normal: usize, quick: usize| {
            v.unwrap_or(if q { quick } else { normal })
        };
        Sizes {
            output_len: pick(self.output_len, 16, 8),
            sp_groups: pick(self.sp_groups, 16, 8),
            sp_prompts: pick(self.sp_prompts, 32, 16),
            sp_system_len: pick(self.sp_system_len, 1536, 1024),
            sp_question_len: self.sp_question_len,
            mt_conversations: pick(self.mt_conversations, 32, 16),
            mt_turns_min: pick(self.mt_turns_min, 12, 4),
            mt_turns_max: pick(self.mt_turns_max, 18, 8),
            mt_common_len: self.mt_common_len,
            mt_conv_prefix_len: pick(self.mt_conv_prefix_len, 1024, 512),
            mt_question_len: self.mt_question_len,
            pr_prefixes: pick(self.pr_prefixes, 12, 6),
            pr_suffixes: pick(self.pr_suffixes, 40, 20),
            pr_prefix_len: pick(self.pr_prefix_len, 1536, 1024),
            pr_suffix_len: self.pr_suffix_len,
            ns_requests: pick(self.ns_requests, 256, 96),
            ns_prompt_len: pick(self.ns_prompt_len, 1024, 512),
            mc_requests: match (&self.trace, self.mc_requests) {
                (_, Some(n)) => Some(n),
                (Some(_), None) => None,
                (None, None) => Some(if q { 80 } else { 240 }),
            },
            mc_rate: self.mc_rate,
            trace_speed: self.trace_speed,
            mc_max_output: self.mc_max_output,
        }
    }

    /// Runs per router and level (`--windows`).
    fn windows(&self) -> usize {
        self.windows
            .unwrap_or(if self.quick { 1 } else { 3 })
            .max(1)
    }

    /// The load levels to run, in order.
    fn levels(&self) -> Vec<Level> {
        match (self.concurrency, self.rate, &self.levels) {
            (Some(c), _, _) => vec![Level::Closed(c)],
            (None, Some(rate), _) => vec![Level::Open(rate)],
            (None, None, Some(levels)) => levels.clone(),
            (None, None, None) if self.quick => {
                vec![Level::Closed(2), Level::Closed(8), Level::Closed(32)]
            }
            (None, None, None) => vec![
                Level::Closed(4),
                Level::Closed(16),
                Level::Closed(64),
                Level::Capacity(0.9),
            ],
        }
    }

    fn check(&self, sizes: &Sizes) -> Result<()> {
        if !(1..=64).contains(&self.backends) {
            bail!("--backends: between 1 and 64");
        }
        if !(self.time_scale >= 0.0 && self.time_scale <= 100.0) {
            bail!("--time-scale: between 0 and 100");
        }
        if !(self.kv_fit > 0.0 && self.kv_fit <= 1000.0) {
            bail!("--kv-fit: above 0");
        }
        if let Some(rate) = self.rate
            && !(rate > 0.0 && rate <= 100_000.0)
        {
            bail!("--rate: above 0 sessions per second");
        }
        if !(self.trace_speed > 0.0 && self.trace_speed <= 1e6) {
            bail!("--trace-speed: above 0");
        }
        if !(self.mc_rate > 0.0 && self.mc_rate <= 100_000.0) {
            bail!("--mc-rate: above 0 requests per second");
        }
        if !(1..=1024).contains(&self.block_size) {
            bail!("--block-size: between 1 and 1024");
        }
        let levels = self.levels();
        if levels.is_empty() {
            bail!("--levels: at least one");
        }
        if let Some(Level::Capacity(_)) = levels.first() {
            bail!("--levels: a capF level needs a closed level before it to measure capacity");
        }
        if sizes.output_len == 0
            || sizes.mt_turns_min == 0
            || sizes.mt_turns_min > sizes.mt_turns_max
        {
            bail!("--output-len must be ≥ 1 and 1 ≤ --mt-turns-min ≤ --mt-turns-max");
        }
        Ok(())
    }

    fn routers(&self) -> Result<Vec<Router>> {
        let mut out = Vec::new();
        for b in &self.routers {
            let (name, kind) = match b {
                Builtin::RoundRobin => (report::BASELINE, RouterKind::RoundRobin),
                Builtin::LeastLoaded => ("least-loaded", RouterKind::LeastLoaded),
                Builtin::Nginx => match self.nginx_bin.clone().or_else(crate::nginx::find) {
                    Some(bin) => (NGINX_ROW, RouterKind::Nginx { bin }),
                    None => {
                        eprintln!(
                            "router-bench: nginx is not installed; leaving out its row \
                             (`cargo xtask bench quality` installs it: apt-get install -y nginx)"
                        );
                        continue;
                    }
                },
                Builtin::RouterDaemon | Builtin::RouterDaemonRoundrobin => {
                    let bin = match &self.router_bin {
                        Some(bin) => bin.clone(),
                        None => std::env::current_exe()
                            .context("locating router-bench")?
                            .parent()
                            .map(|dir| dir.join("router-daemon"))
                            .context("router-bench has no parent directory")?,
                    };
                    if !bin.is_file() {
                        bail!(
                            "{} is missing: build it (cargo build --release -p router-daemon), \
                             pass --router-bin, or leave router-daemon out of --routers",
                            bin.display()
                        );
                    }
                    let mut extra = self.router_args.clone();
                    if *b == Builtin::RouterDaemonRoundrobin {
                        extra.extend(["--routing-logic".to_owned(), "roundrobin".to_owned()]);
                        out.push(Router {
                            name: "router-daemon roundrobin".to_owned(),
                            kind: RouterKind::Daemon {
                                bin,
                                extra,
                                replicas: 1,
                            },
                        });
                        continue;
                    }
                    if self.daemon_replicas > 1 {
                        out.push(Router {
                            name: "router-daemon".to_owned(),
                            kind: RouterKind::Daemon {
                                bin: bin.clone(),
                                extra: extra.clone(),
                                replicas: 1,
                            },
                        });
                        let name = format!("router-daemon ×{}", self.daemon_replicas);
                        out.push(Router {
                            name,
                            kind: RouterKind::Daemon {
                                bin,
                                extra,
                                replicas: self.daemon_replicas,
                            },
                        });
                        continue;
                    }
                    (
                        "router-daemon",
                        RouterKind::Daemon {
                            bin,
                            extra,
                            replicas: 1,
                        },
                    )
                }
            };
            out.push(Router {
                name: name.to_owned(),
                kind,
            });
        }
        if !self.no_peers {
            let policies = self.peer_policies.clone().unwrap_or_else(|| {
                if self.quick {
                    vec![peers::Policy::CacheAware]
                } else {
                    vec![peers::Policy::CacheAware, peers::Policy::RoundRobin]
                }
            });
            for peer in peers::ALL {
                let Some(bin) = peers::find(peer.program(), self.peers_dir.as_deref()) else {
                    eprintln!(
                        "router-bench: {} is not installed ({}); leaving it out (`cargo xtask \
                         bench quality` installs it: pip install {})",
                        peer.program(),
                        self.peers_dir.as_ref().map_or_else(
                            || "not on PATH".to_owned(),
                            |d| format!("not in {}", d.display())
                        ),
                        peers::PIP_SPECS
                    );
                    continue;
                };
                for &policy in &policies {
                    out.push(Router {
                        name: format!("{} {}", peer.program(), policy.as_str()),
                        kind: RouterKind::Peer {
                            cmd: peer.command(&bin, policy),
                        },
                    });
                }
            }
        }
        for peer in &self.peers {
            let (name, cmd) = peer.split_once('=').context("--peer takes NAME=CMD")?;
            out.push(Router {
                name: name.trim().to_owned(),
                kind: RouterKind::Peer {
                    cmd: cmd.to_owned(),
                },
            });
        }
        if out.is_empty() {
            bail!("no routers to compare");
        }
        Ok(out)
    }
}

/// Runs the benchmark, prints the report and writes it; returns the report
/// and where it went.
pub fn run(args: Args) -> Result<(Report, PathBuf)> {
    let started = Instant::now();
    let sizes = args.sizes();
    args.check(&sizes)?;
    let routers = args.routers()?;
    let threads = if args.threads == 0 {
        crate::procfs::cpus().max(1)
    } else {
        args.threads
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("building the runtime")?;
    let stamp = crate::run::timestamp();
    let tmp = std::env::temp_dir().join(format!(
        "router-bench-quality-{stamp}-{}",
        std::process::id()
    ));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let tokenizer = vllm_sim::tokenize::Tokenizer::shared().context("loading the tokenizer")?;
    let levels = args.levels();

    let trace = match (&args.trace, args.workloads.contains(&Kind::Mooncake)) {
        (Some(path), true) => {
            Some(trace::load(path).with_context(|| format!("the trace {}", path.display()))?)
        }
        _ => None,
    };
    if let Some(path) = &args.save_trace {
        let requests = match &trace {
            Some(t) => t[..sizes.mc_requests.unwrap_or(t.len()).min(t.len())].to_vec(),
            None => trace::synthetic(&workload::synthetic_shape(&sizes), args.seed),
        };
        let mut text = String::new();
        for r in &requests {
            text.push_str(&serde_json::to_string(r).context("serialising the trace")?);
            text.push('\n');
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "router-bench: wrote the mooncake trace ({} requests) to {}",
            requests.len(),
            path.display()
        );
    }

    let mut sections = Vec::new();
    let mut commands: Vec<String> = Vec::new();
    let mut failed = false;
    for &kind in &args.workloads {
        let workload = Arc::new(workload::generate(
            kind,
            &sizes,
            args.seed,
            trace.as_deref(),
        ));
        let ws_blocks = workload.working_set_tokens.div_ceil(args.block_size);
        let kv_blocks =
            ((ws_blocks as f64 * args.kv_fit / args.backends as f64).ceil() as usize).max(1);
        let sim = vllm_sim::Config {
            port: 0,
            time_scale: args.time_scale,
            kv_cache_blocks: kv_blocks,
            block_size: args.block_size,
            seed: args.seed,
            ..vllm_sim::Config::default().with_profile(args.profile)
        };
        let fleet = FleetConfig {
            backends: args.backends,
            sim,
            port_base: (args.backend_port_base > 0).then_some(args.backend_port_base),
        };
        eprintln!(
            "router-bench: {} ({} requests, {} sessions)",
            workload.kind.as_str(),
            workload.requests(),
            workload.sessions.len()
        );
        // Sessions per second the fleet completed at the last closed level
        // (round-robin's, else the best router's): what capF levels scale.
        let mut capacity: Option<f64> = None;
        // A trace replays at its own timestamps: one level is all it has.
        let workload_levels = if workload.timed() {
            &levels[..1]
        } else {
            &levels[..]
        };
        for &level in workload_levels {
            let (arrivals, level_name) = match level {
                // Ignored by a trace, which keeps its own timestamps.
                _ if workload.timed() => (run::Arrivals::Closed(1), "trace".to_owned()),
                Level::Closed(n) => (run::Arrivals::Closed(n), format!("c{n}")),
                Level::Open(rate) => (
                    run::Arrivals::Poisson {
                        rate,
                        seed: args.seed,
                    },
                    format!("r{rate}"),
                ),
                Level::Capacity(fraction) => {
                    let measured =
                        capacity.context("a capF level needs a closed level before it")?;
                    let rate = fraction * measured;
                    (
                        run::Arrivals::Poisson {
                            rate,
                            seed: args.seed,
                        },
                        format!("cap{fraction} ({rate:.1} sessions/s)"),
                    )
                }
            };
            if workload_levels.len() > 1 {
                eprintln!("router-bench:  level {level_name}: {level}");
            }
            let mut windows: Vec<Vec<Row>> = vec![Vec::new(); routers.len()];
            let mut notes = Vec::new();
            let mut best: Option<run::Outcome> = None;
            for window in 0..args.windows() {
                for (router, runs) in routers.iter().zip(windows.iter_mut()) {
                    let t = Instant::now();
                    let outcome = runtime.block_on(run::run(
                        Arc::clone(&workload),
                        router,
                        &fleet,
                        arrivals,
                        args.session_header.as_deref(),
                        &tmp,
                    ));
                    match outcome {
                        Ok(outcome) => {
                            let row = Row::new(&router.name, &outcome);
                            eprintln!(
                                "router-bench:   {:<26} {:>5.1}% hit, mean TTFT {:>7.1} ms, {:>5.1} req/s, \
                                 {} errors ({:.1} s)",
                                router.name,
                                row.hit_rate() * 100.0,
                                row.ttft_mean_ms,
                                row.req_per_s,
                                outcome.errors,
                                t.elapsed().as_secs_f64()
                            );
                            if outcome.errors > 0 {
                                failed = true;
                                notes.push(format!(
                                    "{}: {} requests failed, e.g. {}",
                                    router.name,
                                    outcome.errors,
                                    outcome.error_samples.join("; ")
                                ));
                            }
                            // One command line per router (ports differ between runs).
                            let label = format!("{}:", router.name);
                            if let Some(cmd) = &outcome.command
                                && !commands.iter().any(|c| c.starts_with(&label))
                            {
                                commands.push(format!("{label} `{cmd}`"));
                            }
                            runs.push(row);
                            if let Some(dir) = &args.records {
                                let level = level_name.split(' ').next().unwrap_or_default();
                                let window = match args.windows() {
                                    1 => String::new(),
                                    _ => format!("-w{}", window + 1),
                                };
                                let name = format!(
                                    "{}-{level}-{}{window}.csv",
                                    kind.as_str(),
                                    router.name
                                );
                                write_records(
                                    &dir.join(name.replace([' ', '/'], "_")),
                                    &outcome.records,
                                    &workload.sessions,
                                    outcome.started,
                                )?;
                            }
                            if best
                                .as_ref()
                                .is_none_or(|b| b.records.len() < outcome.records.len())
                            {
                                best = Some(outcome);
                            }
                        }
                        Err(err) => {
                            failed = true;
                            eprintln!("router-bench:   {}: FAILED: {err:#}", router.name);
                            notes.push(format!("{}: FAILED: {err:#}", router.name));
                            runs.push(Row::failed(&router.name, format!("{err:#}")));
                        }
                    }
                }
            }
            let rows = windows.into_iter().map(Row::median).collect::<Vec<_>>();
            // The replies of the most complete run (a simulator's reply depends
            // only on the prompt, so every router saw the same ones).
            let mut replies = vec![Vec::new(); workload.sessions.len()];
            if let Some(b) = &best {
                let mut recs = b.records.iter().collect::<Vec<_>>();
                recs.sort_by_key(|r| (r.session, r.turn));
                for r in recs {
                    if let Some(session) = replies.get_mut(r.session)
                        && session.len() == r.turn
                    {
                        session.push(r.reply.clone());
                    }
                }
            }
            let ideal = workload::ideal(&workload, &replies, tokenizer, args.block_size);
            if let Some(row) = rows.iter().find(|r| {
                r.failure.is_none() && r.errors == 0 && r.prompt_tokens != ideal.prompt_tokens
            }) {
                notes.push(format!(
                    "the simulators counted {} prompt tokens under {}, the ideal's tokenization {}",
                    row.prompt_tokens, row.router, ideal.prompt_tokens
                ));
            }
            if let Level::Closed(_) = level {
                let per_session =
                    workload.sessions.len() as f64 / workload.requests().max(1) as f64;
                let baseline = rows
                    .iter()
                    .filter(|r| r.failure.is_none())
                    .find(|r| r.router == report::BASELINE)
                    .map(|r| r.req_per_s);
                let best = rows
                    .iter()
                    .filter(|r| r.failure.is_none())
                    .map(|r| r.req_per_s)
                    .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
                capacity = baseline.or(best).map(|req_per_s| req_per_s * per_session);
            }
            sections.push(Section {
                workload: kind.as_str().to_owned(),
                level: if workload_levels.len() > 1 || levels.len() > 1 {
                    Some(level_name.clone())
                } else {
                    None
                },
                description: workload.description.clone(),
                requests: workload.requests(),
                ideal,
                kv_blocks,
                working_set_blocks: ws_blocks,
                backends: (0..args.backends).map(|i| format!("sim-{i}")).collect(),
                rows,
                notes,
            });
        }
    }

    let command = args.invoked_as.clone().unwrap_or_else(|| {
        std::env::args()
            .map(|a| if a.contains(' ') { format!("'{a}'") } else { a })
            .collect::<Vec<_>>()
            .join(" ")
    });
    let env = vec![format!(
        "{} · {} CPUs · load average {} · git {}",
        crate::run::utc_string(),
        crate::procfs::cpus(),
        crate::procfs::load_average(),
        crate::run::git_describe()
    )];
    let settings = vec![
        format!(
            "fleet: {} in-process vllm-sim, profile `{}`, time scale {}, block {} tokens, \
             KV cache sized to {}× the workload's working set across the fleet; fresh \
             simulators (cold caches) for every router, {}",
            args.backends,
            args.profile,
            args.time_scale,
            args.block_size,
            args.kv_fit,
            match args.backend_port_base {
                0 => "on free ports (backend URLs differ run to run)".to_owned(),
                base => format!(
                    "on ports {base}–{} where free (the same backend URLs every run)",
                    u32::from(base) + args.backends.saturating_sub(1) as u32
                ),
            }
        ),
        format!(
            "load: {}; seed {}, every request streamed with `stream_options.include_usage`; \
             mooncake replays its trace's timestamps instead (a closed loop tends to send a \
             request as another ends, right as an engine step starts, where it waits for all \
             of it: compare the open-loop levels too)",
            levels
                .iter()
                .map(Level::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            args.seed
        ),
        match args.windows() {
            1 => "windows: 1 (every figure from one run)".to_owned(),
            n => format!(
                "windows: {n}; every router ran each level {n} times on fresh simulators, the \
                 routers taking turns, and each figure is the median of its {n} runs (the \
                 per-backend split and the decisions are the median run's; failed requests \
                 add up)"
            ),
        },
    ];
    let mut router_lines = vec![
        "round-robin, least-loaded: client-side baselines. The load generator picks the backend \
         itself (the next in turn; the fewest of its own requests in flight, ties in turn) and \
         talks to the simulator directly, so they pay no proxy hop."
            .to_owned(),
    ];
    if routers.iter().any(|r| r.name == NGINX_ROW) {
        router_lines.push(format!(
            "{NGINX_ROW}: round-robin through nginx, a plain L7 proxy with kept-alive \
             upstream connections: what one proxy hop costs with no routing policy."
        ));
    }
    router_lines.extend(commands);
    let report = Report {
        command,
        env,
        settings,
        routers: router_lines,
        sections,
        elapsed: started.elapsed(),
        plots: Ok(Vec::new()),
    };
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let mut report = report;
    if !args.no_plots {
        report.plots = plots(&report, &args.out_dir, &stamp);
    }
    let text = report::render(&report);
    let out = args.out_dir.join(format!("quality-{stamp}.md"));
    fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("{text}");
    eprintln!("router-bench: wrote {}", out.display());
    if failed || args.keep_tmp {
        eprintln!("router-bench: router logs kept in {}", tmp.display());
    } else {
        let _ = fs::remove_dir_all(&tmp);
    }
    // Let the runtime's sockets close before returning.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok((report, out))
}

/// Draws the plots next to the report; their file names, or why not.
fn plots(report: &Report, dir: &Path, stamp: &str) -> Result<Vec<String>, String> {
    plot::font()?;
    let mut files = Vec::new();
    for s in &report.sections {
        let file = format!("quality-{stamp}-ttft-{}.png", s.slug());
        let series = s
            .rows
            .iter()
            .filter(|r| r.failure.is_none())
            .map(|r| (r.router.as_str(), r.ttft_sorted_ms.as_slice()))
            .collect::<Vec<_>>();
        plot::ttft_cdf(
            &dir.join(&file),
            &format!("TTFT CDF: {}", s.workload),
            &series,
        )?;
        files.push(file);
        let file = format!("quality-{stamp}-load-{}.png", s.slug());
        let panels = s
            .rows
            .iter()
            .filter(|r| r.failure.is_none())
            .map(|r| (r.router.as_str(), &r.load))
            .collect::<Vec<_>>();
        plot::load_over_time(
            &dir.join(&file),
            &format!(
                "running + waiting requests per backend, every {} ms: {}",
                load::EVERY.as_millis(),
                s.workload
            ),
            &s.backends,
            &panels,
        )?;
        files.push(file);
    }
    let mut routers: Vec<&str> = Vec::new();
    let mut points = Vec::new();
    for s in &report.sections {
        for r in s.rows.iter().filter(|r| r.failure.is_none()) {
            if !routers.contains(&r.router.as_str()) {
                routers.push(&r.router);
            }
            points.push(plot::Point {
                router: r.router.clone(),
                workload: s.workload.clone(),
                load: r.max_over_mean(),
                hit: r.hit_rate(),
            });
        }
    }
    let file = format!("quality-{stamp}-hit-vs-load.png");
    plot::hit_vs_load(&dir.join(&file), &routers, &points)?;
    files.push(file);
    for workload in report::workloads(report) {
        let (levels, series) = report::ttft_by_level(report, &workload);
        if levels.len() < 2 {
            continue;
        }
        let file = format!("quality-{stamp}-ttft-vs-load-{workload}.png");
        let series: Vec<(&str, &[Option<f64>])> = series
            .iter()
            .map(|(router, v)| (router.as_str(), v.as_slice()))
            .collect();
        plot::ttft_vs_load(
            &dir.join(&file),
            &format!("mean TTFT against load: {workload}"),
            &levels,
            &series,
        )?;
        files.push(file);
    }
    Ok(files)
}

/// Writes `records` of the workload whose sessions are `sessions` to
/// `path` as CSV, in the order they were sent, times from `started`
/// (`--records`).
fn write_records(
    path: &Path,
    records: &[run::Record],
    sessions: &[workload::Session],
    started: Instant,
) -> Result<()> {
    /// One CSV row: a request's outcome, times in milliseconds.
    #[derive(serde::Serialize)]
    struct Row<'a> {
        sent_ms: String,
        session: usize,
        /// Its prefix family, empty when the workload has none.
        group: Option<usize>,
        turn: usize,
        served_by: &'a str,
        ttft_ms: String,
        e2e_ms: String,
        prompt_tokens: u64,
        cached_tokens: u64,
    }
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
    let mut records = records.iter().collect::<Vec<_>>();
    records.sort_by_key(|r| r.sent);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut csv =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    for r in records {
        csv.serialize(Row {
            sent_ms: ms(r.sent.saturating_duration_since(started)),
            session: r.session,
            group: sessions.get(r.session).and_then(|s| s.group),
            turn: r.turn,
            served_by: &r.served_by,
            ttft_ms: ms(r.ttft),
            e2e_ms: ms(r.e2e),
            prompt_tokens: r.prompt_tokens,
            cached_tokens: r.cached_tokens,
        })
        .with_context(|| format!("writing {}", path.display()))?;
    }
    csv.flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn records_are_written_in_the_order_they_were_sent() {
        let started = Instant::now();
        let record = |session, sent_ms, served_by: &str| run::Record {
            session,
            turn: 0,
            served_by: served_by.to_owned(),
            sent: started + Duration::from_millis(sent_ms),
            ttft: Duration::from_micros(12_500),
            e2e: Duration::from_millis(40),
            prompt_tokens: 1601,
            cached_tokens: 1536,
            reply: String::new(),
        };
        let session = |id, group| workload::Session {
            id,
            prompt: workload::Prompt::Text(String::new()),
            at: None,
            output_len: None,
            group,
        };
        let dir = std::env::temp_dir().join(format!("records-{}", std::process::id()));
        let path = dir.join("shared-prefix-c16-router-daemon.csv");
        write_records(
            &path,
            &[record(1, 30, "sim-2"), record(0, 10, "sim-0, the first")],
            &[session(0, None), session(1, Some(7))],
            started,
        )
        .expect("a temporary directory is writable");
        let text = fs::read_to_string(&path).expect("just written");
        fs::remove_dir_all(&dir).expect("just created");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "sent_ms,session,group,turn,served_by,ttft_ms,e2e_ms,prompt_tokens,cached_tokens",
                "10.000,0,,0,\"sim-0, the first\",12.500,40.000,1601,1536",
                "30.000,1,7,0,sim-2,12.500,40.000,1601,1536",
            ]
        );
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn a_tiny_quick_run_writes_a_sane_report() {
        let out =
            std::env::temp_dir().join(format!("router-bench-quality-test-{}", std::process::id()));
        let mut argv = vec![
            "router-bench".to_owned(),
            "--quick".into(),
            "--backends=2".into(),
            "--concurrency=3".into(),
            "--time-scale=0.01".into(),
            "--output-len=4".into(),
            "--sp-groups=2".into(),
            "--sp-prompts=3".into(),
            "--sp-system-len=64".into(),
            "--sp-question-len=16".into(),
            "--mt-conversations=2".into(),
            "--mt-turns-min=2".into(),
            "--mt-turns-max=3".into(),
            "--mt-common-len=32".into(),
            "--mt-conv-prefix-len=48".into(),
            "--mt-question-len=8".into(),
            "--pr-prefixes=2".into(),
            "--pr-suffixes=3".into(),
            "--pr-prefix-len=64".into(),
            "--ns-requests=4".into(),
            "--ns-prompt-len=40".into(),
            "--mc-requests=12".into(),
            "--mc-rate=200".into(),
            "--threads=2".into(),
            // Two runs of each router per level, each row their median.
            "--windows=2".into(),
            // Peers are not installed for CI; their rows are not tested here.
            "--no-peers".into(),
            format!("--out-dir={}", out.display()),
        ];
        // The daemon is a separate binary this test does not build: name
        // one to include it.
        // nginx too, where `cargo xtask test` found or installed it.
        let mut routers = vec!["round-robin", "least-loaded"];
        if let Some(bin) = std::env::var_os("ROUTER_BENCH_TEST_DAEMON") {
            routers.push("router-daemon");
            argv.push(format!("--router-bin={}", PathBuf::from(bin).display()));
        }
        if let Some(bin) = std::env::var_os("ROUTER_BENCH_TEST_NGINX") {
            routers.push("nginx");
            argv.push(format!("--nginx-bin={}", PathBuf::from(bin).display()));
        }
        argv.push(format!("--routers={}", routers.join(",")));
        let with_daemon = routers.contains(&"router-daemon");
        let args = Cli::parse_from(argv).args;
        let routers = args.routers.len();
        let (report, path) = run(args).expect("the run completes");
        let text = fs::read_to_string(&path).expect("the report is written");
        assert!(text.contains("| router | hit rate |"));
        assert!(text.contains("| router CPU s | peak RSS MiB |"));
        assert!(text.contains("- windows: 2; every router ran each level 2 times"));
        // Every section says how late the simulators ran, and, with the
        // daemon, what its engines took of its TTFT as it saw them.
        assert_eq!(
            text.matches("- simulators' steps ended late by, mean ms per step: round-robin ")
                .count(),
            5
        );
        if with_daemon {
            assert_eq!(
                text.matches("- router-daemon engines' TTFT as the router saw it: mean ")
                    .count(),
                5,
                "{text}"
            );
        }
        assert_eq!(report.sections.len(), 5);
        for s in &report.sections {
            assert_eq!(s.rows.len(), routers, "{}: {:?}", s.workload, s.notes);
            let ideal = s.ideal.hit_rate();
            assert!(
                (0.0..=1.0).contains(&ideal),
                "{}: ideal {ideal}",
                s.workload
            );
            if s.workload != "no-sharing" {
                assert!(ideal > 0.0, "{}: the workload shares prefixes", s.workload);
            }
            for row in &s.rows {
                assert_eq!(row.errors, 0, "{}/{}", s.workload, row.router);
                assert_eq!(row.requests, s.requests, "{}/{}", s.workload, row.router);
                assert!(row.prompt_tokens > 0 && row.ttft_mean_ms > 0.0 && row.req_per_s > 0.0);
                assert!((0.0..=1.0).contains(&row.hit_rate()));
                assert!(
                    row.cached_tokens <= s.ideal.cached_tokens,
                    "{}/{}",
                    s.workload,
                    row.router
                );
                assert!(row.max_over_mean() >= 1.0);
                assert!(row.failure.is_none());
                // The round-robin rows, with a hop or without, send in turn.
                if row.router == report::BASELINE || row.router == NGINX_ROW {
                    let most = row.loads.iter().max().copied().unwrap_or(0);
                    let least = row.loads.iter().min().copied().unwrap_or(0);
                    assert!(
                        most - least <= 1,
                        "{}/{}: {:?}",
                        s.workload,
                        row.router,
                        row.loads
                    );
                }
                // Client-side choices have no process; the daemon and
                // nginx do.
                let process = row.router.starts_with("router-daemon") || row.router == NGINX_ROW;
                assert_eq!(row.cpu_s.is_some(), process, "{}", row.router);
                assert_eq!(row.peak_rss_mib.is_some(), process, "{}", row.router);
                if let (Some(cpu), Some(rss)) = (row.cpu_s, row.peak_rss_mib) {
                    assert!((0.0..60.0).contains(&cpu), "{}: {cpu} s", row.router);
                    assert!(rss > 1.0 && rss < 4096.0, "{}: {rss} MiB", row.router);
                }
                // The simulators were sampled, one series each, and saw
                // the requests.
                assert_eq!(row.load.per_backend.len(), 2);
                assert!(!row.load.times.is_empty());
                assert!(
                    row.load
                        .per_backend
                        .iter()
                        .all(|v| v.len() == row.load.times.len())
                );
            }
        }
        let mooncake = &report.sections[4];
        assert_eq!(mooncake.workload, "mooncake");
        assert_eq!(mooncake.requests, 12);
        // Plots need a system font; with one, each is written and linked.
        if let Ok(files) = &report.plots {
            assert_eq!(files.len(), 2 * report.sections.len() + 1);
            for s in &report.sections {
                let load = format!("-load-{}.png", s.workload);
                assert!(files.iter().any(|f| f.ends_with(&load)), "{load}");
            }
            for file in files {
                let meta = fs::metadata(out.join(file)).expect("the plot is written");
                assert!(meta.len() > 1000, "{file}");
                assert!(text.contains(&format!("]({file})")), "{file} is linked");
            }
        }
        let _ = fs::remove_dir_all(&out);
    }

    #[test]
    fn levels_parse_and_default_by_mode() {
        let parse = |s: &str| s.parse::<Level>();
        assert_eq!(parse("c16"), Ok(Level::Closed(16)));
        assert_eq!(parse("r12.5"), Ok(Level::Open(12.5)));
        assert_eq!(parse("cap0.9"), Ok(Level::Capacity(0.9)));
        for bad in ["c0", "c", "x4", "r-1", "capNaN", "r"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let args = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("router-bench").chain(argv.iter().copied()))
                .map(|cli| cli.args)
        };
        let quick = args(&["--quick"]).expect("valid arguments");
        assert_eq!(
            quick.levels(),
            [Level::Closed(2), Level::Closed(8), Level::Closed(32)]
        );
        let full = args(&[]).expect("valid arguments");
        assert_eq!(full.levels().len(), 4);
        assert_eq!(
            args(&["--concurrency=3"])
                .expect("valid arguments")
                .levels(),
            [Level::Closed(3)]
        );
        assert_eq!(
            args(&["--levels=c1,cap0.5"])
                .expect("valid arguments")
                .levels(),
            [Level::Closed(1), Level::Capacity(0.5)]
        );
        assert!(args(&["--levels=c1", "--rate=3"]).is_err());
        let capacity_first = args(&["--levels=cap0.5,c4"]).expect("valid arguments");
        assert!(capacity_first.check(&capacity_first.sizes()).is_err());
    }
}
