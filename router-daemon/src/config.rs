//! Command-line and environment configuration.
use std::{net::SocketAddr, time::Duration};

use crate::{
    backend::{
        Discovery, Ejection,
        kubernetes::{self, PodSelector},
    },
    dataplane::{Requested, ResponseTimeouts},
    http::Limits,
    route::{Logic, Policy, policy::PatienceHolds},
};

/// Where the backend set comes from (`--discovery`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The `--backend` URLs.
    Static,
    /// Pods watched through the Kubernetes API server.
    K8s,
}

/// How log lines are written (`--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event; coloured only on a terminal.
    Text,
    /// One JSON object per line, for log pipelines (Loki, Elasticsearch).
    Json,
}

/// Where a pod's service account says its namespace is.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Everything the daemon can be told; each flag has an environment twin.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "router-daemon",
    version,
    about = "Prefix-aware router for vLLM fleets"
)]
pub struct Config {
    /// Address to accept client connections on.
    #[arg(long, env = "ROUTER_LISTEN", default_value = "0.0.0.0:30080")]
    pub listen: SocketAddr,

    /// How log lines are written: `text`, coloured only when standard
    /// output is a terminal (and `NO_COLOR` is unset), or `json`, one object
    /// per line. `RUST_LOG` sets the level (default `info`).
    #[arg(long, env = "ROUTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// A backend URL (http://host:port); repeat the flag, or comma-separate in
    /// the environment variable, for each vLLM instance.
    #[arg(long = "backend", env = "ROUTER_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<String>,

    /// Where the backends come from: `static`, the `--backend` URLs (host
    /// names re-resolved every `--resolve-interval-ms`, every address
    /// counting); or `k8s`, the Ready, non-terminating pods that
    /// `--k8s-selector` picks in `--k8s-namespace`, watched through the
    /// Kubernetes API server (in-cluster service account, or KUBECONFIG).
    #[arg(long, env = "ROUTER_DISCOVERY", value_enum, default_value_t = Source::Static)]
    pub discovery: Source,

    /// `--discovery k8s`: the namespace whose pods are watched. Default:
    /// the router's own (its service account's), else `default`.
    #[arg(long, env = "ROUTER_K8S_NAMESPACE")]
    pub k8s_namespace: Option<String>,

    /// `--discovery k8s`: the label selector of the vLLM pods. The default
    /// is the labels production-stack's Helm chart gives its engine pods.
    #[arg(long, env = "ROUTER_K8S_SELECTOR", default_value = kubernetes::DEFAULT_SELECTOR)]
    pub k8s_selector: String,

    /// `--discovery k8s`: the vLLM port in each pod, unless
    /// `--k8s-port-name` names one of its container ports.
    #[arg(long, env = "ROUTER_K8S_PORT", default_value_t = 8000)]
    pub k8s_port: u16,

    /// `--discovery k8s`: a container port name whose number is used
    /// where a pod declares it.
    #[arg(long, env = "ROUTER_K8S_PORT_NAME")]
    pub k8s_port_name: Option<String>,

    /// `--discovery k8s`: the node the router runs on (the downward API's
    /// `spec.nodeName`). Its pods win when costs are close: a tie, or
    /// against a pod cheaper by less than half a request of load; never
    /// against a cached prefix or its rendezvous placement.
    #[arg(long, env = "ROUTER_NODE_NAME")]
    pub node_name: Option<String>,

    /// How many other routers send requests to the same backends, if
    /// known: 0 for a router alone in front of them. Before a backend's
    /// scrapes show who sends there, 0 lets --placement-patience spread a
    /// cold start's first prompts by this router's view of load, and more
    /// keep each new prompt where every replica places it. Unset: unknown,
    /// and the scrapes decide (see --placement-patience-when).
    /// --peer-selector, when given, finds them in Kubernetes instead.
    #[arg(long, env = "ROUTER_PEERS")]
    pub peers: Option<usize>,

    /// The label selector of this router's replicas (the DaemonSet's
    /// pods) in --peer-namespace: the ready ones other than --pod-name are
    /// its peers (see --peers), followed through the Kubernetes API server
    /// as nodes come and go.
    #[arg(long, env = "ROUTER_PEER_SELECTOR")]
    pub peer_selector: Option<String>,

    /// --peer-selector: the namespace of the router's pods. Default: the
    /// router's own (its service account's), else `default`.
    #[arg(long, env = "ROUTER_PEER_NAMESPACE")]
    pub peer_namespace: Option<String>,

    /// --peer-selector: this router's own pod (the downward API's
    /// `metadata.name`), which is not its own peer. Default: the host name,
    /// which is the pod's name unless it runs on the host's network.
    #[arg(long, env = "ROUTER_POD_NAME")]
    pub pod_name: Option<String>,

    /// How response bytes travel: `sockmap` redirects them in the kernel
    /// as they reach the router (needs privilege; lowest latency),
    /// `sockmap-send` redirects them inside the send of a backend on this
    /// host (needs privilege; see --sockops-cgroup; other backends' are
    /// copied), `splice` moves them through a pipe with splice(2),
    /// `userspace` copies them through the daemon; `auto`, the measured
    /// default (least CPU per streamed token), is `sockmap-send` where it
    /// loads and `userspace` elsewhere, and the log says which and why.
    #[arg(long, env = "ROUTER_DATAPLANE", value_enum, default_value_t = Requested::Auto)]
    pub dataplane: Requested,

    /// With `--dataplane sockmap-send` (or `auto`): the cgroup directory whose
    /// processes' sockets the sockops program watches (its `unified/`
    /// subdirectory where cgroup v2 is mounted there); it must hold the
    /// co-located backends (in Kubernetes, the host's `/sys/fs/cgroup`
    /// mounted into the pod). Default: `/sys/fs/cgroup`, so this host's
    /// cgroup v2 root.
    #[arg(long, env = "ROUTER_SOCKOPS_CGROUP")]
    pub sockops_cgroup: Option<std::path::PathBuf>,

    /// Worker threads, each serving the connections it accepts to their
    /// end on its own event loop; 0 is one per CPU this process may use.
    #[arg(long, env = "ROUTER_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// Prefix-index block size, in prompt bytes (1 to 64). Smaller blocks
    /// match prefixes more finely and cost more index entries and hashing
    /// per prompt; the default is about one vLLM cache block (16 tokens of
    /// about 4 bytes), the finest grain a backend's cache can reuse.
    #[arg(long, env = "ROUTER_BLOCK_BYTES", default_value_t = 64,
          value_parser = clap::value_parser!(u8).range(1..=64))]
    pub block_bytes: u8,

    /// Most entries held by the prefix index (about 40 bytes each); the
    /// least recently used are dropped first.
    #[arg(long, env = "ROUTER_INDEX_ENTRIES", default_value_t = 1 << 20)]
    pub index_entries: usize,

    /// Longest request body accepted, in bytes.
    #[arg(long, env = "ROUTER_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,

    /// Longest request head accepted, in bytes.
    #[arg(long, env = "ROUTER_MAX_HEAD_BYTES", default_value_t = 16 << 10)]
    pub max_head_bytes: usize,

    /// Most bytes of pipelined requests read ahead per client while a
    /// response is relayed; past it the client is not read until the
    /// response ends, so TCP pushes back on it
    /// (`router_limit_exceeded_total{limit="pipelined"}` counts each time).
    #[arg(long, env = "ROUTER_MAX_PIPELINED_BYTES",
          default_value_t = crate::dataplane::PIPELINED_LIMIT)]
    pub max_pipelined_bytes: usize,

    /// How long to wait for a backend connection before trying another, in
    /// milliseconds.
    #[arg(long, env = "ROUTER_CONNECT_TIMEOUT_MS", default_value_t = 2_000)]
    pub connect_timeout_ms: u64,

    /// How long a backend may take to send its response's first byte, in
    /// milliseconds, from the request sent; past it the client gets a 504
    /// and the backend connection closes (vLLM then aborts the request).
    /// Generous: queueing and prefill come first, and a request that does
    /// not stream gets its first byte only when the whole answer is done.
    /// 0 waits forever.
    #[arg(long, env = "ROUTER_FIRST_BYTE_TIMEOUT_MS", default_value_t = 300_000)]
    pub first_byte_timeout_ms: u64,

    /// The longest silence between a response's bytes once it began (a
    /// stream's gap between tokens), in milliseconds; past it the client
    /// connection closes (or gets a 504 if nothing reached it yet) and so
    /// does the backend's. 0 waits forever.
    #[arg(
        long,
        env = "ROUTER_RESPONSE_IDLE_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub response_idle_timeout_ms: u64,

    /// How many more backends a request may be sent to after one that took
    /// nothing of it: refused or timed out the connection, or answered 503
    /// before any byte reached the client. Never after response bytes
    /// reached the client.
    #[arg(long, env = "ROUTER_RETRIES", default_value_t = 2)]
    pub retries: u32,

    /// Requests failing in a row on a backend (connect failures, a close
    /// or reset before the response, a 5xx head, a response timeout) that
    /// eject it: it gets no new request for `--eject-ms`, then one to try
    /// it. 0 never ejects.
    #[arg(long, env = "ROUTER_EJECT_AFTER_FAILURES", default_value_t = 5)]
    pub eject_after_failures: u32,

    /// How long a first ejection lasts, in milliseconds; each ejection in a
    /// row doubles it, up to 16 times.
    #[arg(long, env = "ROUTER_EJECT_MS", default_value_t = 10_000)]
    pub eject_ms: u64,

    /// Most idle kept-alive connections held per backend for reuse.
    #[arg(long, env = "ROUTER_POOL_MAX_IDLE", default_value_t = 1024)]
    pub pool_max_idle: usize,

    /// How long an idle backend connection is kept for reuse, in
    /// milliseconds (below vLLM's 5 s keep-alive timeout, so the router
    /// rarely reuses a connection the backend is closing).
    #[arg(long, env = "ROUTER_POOL_IDLE_TIMEOUT_MS", default_value_t = 4_000)]
    pub pool_idle_timeout_ms: u64,

    /// How long a client may take to send a whole request once it started,
    /// in milliseconds; past it the router answers 408.
    #[arg(long, env = "ROUTER_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// How long a kept-alive client connection may wait for its next
    /// request, in milliseconds, before the router closes it.
    #[arg(long, env = "ROUTER_IDLE_TIMEOUT_MS", default_value_t = 120_000)]
    pub idle_timeout_ms: u64,

    /// After SIGTERM (or SIGINT), how long the daemon keeps accepting
    /// connections, in milliseconds, while `/ready` answers 503 and every
    /// response says `connection: close`: time for Kubernetes to take the
    /// pod out of its Service's endpoints. Then the listener closes.
    #[arg(long, env = "ROUTER_DRAIN_DELAY_MS", default_value_t = 5_000)]
    pub drain_delay_ms: u64,

    /// After SIGTERM (or SIGINT), how long in-flight requests and streams
    /// have to finish, in milliseconds, counted from the signal (the drain
    /// delay included); then the daemon exits. Set the pod's
    /// `terminationGracePeriodSeconds` above it. A second signal exits at
    /// once.
    #[arg(long, env = "ROUTER_DRAIN_TIMEOUT_MS", default_value_t = 30_000)]
    pub drain_timeout_ms: u64,

    /// Serve `/metrics`, `/health` and `/ready` on this address instead
    /// (e.g. the pod IP), so the client-facing port serves only the OpenAI
    /// API. Unset: the client-facing port serves both.
    #[arg(long, env = "ROUTER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Run as this user (from the password database) once start-up is
    /// done: after the listener is bound and the sockmap program loaded.
    /// Every capability is dropped then either way.
    #[arg(long, env = "ROUTER_USER")]
    pub user: Option<String>,

    /// Most client connections open at once; past it a new connection is
    /// answered 503 and closed. Default: half the open-file limit (which
    /// the daemon raises to its hard ceiling at start; each client
    /// connection may hold a backend connection too), less 128 for the
    /// daemon's own files and listeners.
    #[arg(long, env = "ROUTER_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,

    /// How often the `--backend` host names are resolved again, in
    /// milliseconds; every address of a name is a backend, and the set
    /// follows their changes while the daemon serves. 0 resolves once.
    #[arg(long, env = "ROUTER_RESOLVE_INTERVAL_MS", default_value_t = 5_000)]
    pub resolve_interval_ms: u64,

    /// A file of `ADDRESS NAME...` lines (`/etc/hosts` form) giving the
    /// addresses of `--backend` host names ahead of DNS; read again at each
    /// resolution.
    #[arg(long, env = "ROUTER_HOSTS_FILE")]
    pub hosts_file: Option<std::path::PathBuf>,

    /// How often each backend is asked for its models (`GET /v1/models`)
    /// and load (`GET /metrics`), in milliseconds; 0 turns discovery off
    /// (every backend then counts as up, serving any model).
    #[arg(long, env = "ROUTER_DISCOVERY_INTERVAL_MS", default_value_t = 5_000)]
    pub discovery_interval_ms: u64,

    /// How long one discovery request may take, connect included, in
    /// milliseconds; past it the probe counts as failed.
    #[arg(long, env = "ROUTER_DISCOVERY_TIMEOUT_MS", default_value_t = 2_000)]
    pub discovery_timeout_ms: u64,

    /// Discovery failures in a row after which a backend is marked down
    /// (it is back up at its next answer).
    #[arg(long, env = "ROUTER_DOWN_AFTER_FAILURES", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub down_after_failures: u32,
    /// Load slack ε: no backend takes a request that would put its load
    /// (in flight plus waiting) above ceil((1 + ε) × mean load) while another
    /// backend is below that.
    #[arg(long, env = "ROUTER_LOAD_EPSILON", default_value_t = Policy::DEFAULT.epsilon,
          value_parser = non_negative)]
    pub load_epsilon: f64,

    /// Weight of prefill: cost per KiB of prompt a backend would have to
    /// prefill for a request (what it does not hold cached, plus what it
    /// is still prefilling for others).
    #[arg(long, env = "ROUTER_AFFINITY_WEIGHT", default_value_t = Policy::DEFAULT.affinity_weight,
          value_parser = non_negative)]
    pub affinity_weight: f64,

    /// Weight of load: cost per request in flight or waiting on a backend.
    /// With the defaults, 100 bytes of prefill (about 25 tokens) cost as
    /// much as one request: a request already decoding delays a newcomer
    /// far less than recomputing a cached prefix would, which also evicts
    /// what the other backend held.
    #[arg(long, env = "ROUTER_LOAD_WEIGHT", default_value_t = Policy::DEFAULT.load_weight,
          value_parser = non_negative)]
    pub load_weight: f64,

    /// Weight of queued prefill: cost per KiB of prompt a backend is still
    /// prefilling for other requests of this router (sent, no response
    /// byte yet). An engine prefills what arrives together in one step, so
    /// a request waits for all of it.
    #[arg(long, env = "ROUTER_PREFILLING_WEIGHT", default_value_t = Policy::DEFAULT.prefilling_weight,
          value_parser = non_negative)]
    pub prefilling_weight: f64,

    /// Family layout slack: when set, the prefix families this router has
    /// seen reused (system prompts, templates) are laid out evenly over the
    /// backends, none given more than (1 + this) × its share, and their
    /// requests go there; replicas that know the same families lay them
    /// out alike. Evens out the few large prefixes that hashing alone
    /// spreads lumpily, at the cost of moving a family once or twice while
    /// families become known. 0: as even as counts allow.
    #[arg(long, env = "ROUTER_PLACEMENT_EPSILON", value_parser = non_negative)]
    pub placement_epsilon: Option<f64>,

    /// A cached prefix that covers at least this fraction of a request's
    /// conversation prefix (for a completion, its prompt) is followed to the
    /// backends that hold it, load permitting: a long system prompt or
    /// few-shot block followed by different questions stays on one backend
    /// until load spreads it. A shorter shared part is not worth following;
    /// such a request is placed by rendezvous hashing.
    #[arg(long, env = "ROUTER_FOLLOW_FRACTION", default_value_t = Policy::DEFAULT.follow_fraction,
          value_parser = fraction)]
    pub follow_fraction: f64,

    /// How much a new conversation prefers its rendezvous backend, in cost
    /// units (see --affinity-weight): another backend must be cheaper by
    /// more than this to take it. Higher: replicas agree more often; lower:
    /// bursts spread more evenly.
    #[arg(long, env = "ROUTER_RENDEZVOUS_WEIGHT", default_value_t = Policy::DEFAULT.rendezvous_weight,
          value_parser = non_negative)]
    pub rendezvous_weight: f64,

    /// Placement hashes at most this many leading bytes of the conversation
    /// prefix, so prompts that share that much are placed alike by every
    /// replica (a prefix family stays together across routers).
    #[arg(long, env = "ROUTER_PLACEMENT_PREFIX_BYTES",
          default_value_t = Policy::DEFAULT.placement_prefix as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub placement_prefix_bytes: u64,

    /// How strongly a new prompt keeps to its rendezvous backend when load
    /// would move it: its leading part (see --placement-prefix-bytes),
    /// weighed by how often recent requests reused a cached prefix, counts
    /// like a cached prefix of that size (see --load-weight). With traffic
    /// that shares prefixes, a new family stays where every replica places
    /// it; with traffic that does not, placement spreads by load. 0: off.
    #[arg(long, env = "ROUTER_FAMILY_WEIGHT", default_value_t = Policy::DEFAULT.family_weight,
          value_parser = non_negative)]
    pub family_weight: f64,

    /// How many prompts of its own size a new prompt waits behind on its
    /// rendezvous backend before one prefilling less takes it, while no
    /// sibling has proved it a family (see --placement-patience-when for
    /// where it holds). For a router that sees all of its backends'
    /// traffic, it spreads a cold start's first prompts instead of queueing
    /// them behind each other: measured, 1 cut the p99 TTFT near capacity by
    /// a third, and 0.5, which moves the second of two colliding prompts
    /// too, cut it further at light load (see the README).
    #[arg(long, env = "ROUTER_PLACEMENT_PATIENCE", value_parser = non_negative,
          default_value_t = 0.5)]
    pub placement_patience: f64,

    /// Where --placement-patience holds: `alone` (only while the router
    /// knows no other client sends to its backends: --peers 0, or their
    /// scraped `/metrics` show no requests but this router's; with router
    /// replicas, a prompt spread by one replica's view of load is copied
    /// where the others place it, and hit rates fall), `until-shared`
    /// (also before the first scrapes show who else sends, so a cold
    /// start's burst of new prompts spreads: for a router alone in front of
    /// its backends that cannot be told so with --peers), `always`, or
    /// `never` (a new prompt always goes where every replica places it,
    /// within the load bound).
    #[arg(long, env = "ROUTER_PLACEMENT_PATIENCE_WHEN", value_enum,
          default_value_t = PatienceWhen::Alone)]
    pub placement_patience_when: PatienceWhen,

    /// Where a router knows it is alone (see --placement-patience-when),
    /// backends whose cost for a new prompt is within this many prompts of
    /// its own size of the cheapest count as equal, and the one sent a
    /// request least recently takes it: its prefill ahead began longest
    /// ago, so the newcomer waits least. The rendezvous lead of a prompt
    /// not yet proven a family then shrinks with the reuse rate. 0: off.
    #[arg(long, env = "ROUTER_RECENCY_MARGIN", default_value_t = Policy::DEFAULT.recency_margin,
          value_parser = non_negative)]
    pub recency_margin: f64,

    /// Where a router knows it is alone (see --placement-patience-when),
    /// while fewer than this fraction of recent requests followed a cached
    /// prefix, a new prompt that would go to an engine answering other
    /// requests goes to an idle one instead, if no other request takes it
    /// first: its prefill would hold up their decoding, or their next turn,
    /// for a whole engine step. Of several idle engines, the one that
    /// answered the client connection's previous request. 0: off; 1 or
    /// more: at any reuse rate.
    #[arg(long, env = "ROUTER_IDLE_BELOW_REUSE", default_value_t = Policy::DEFAULT.idle_below_reuse,
          value_parser = non_negative)]
    pub idle_below_reuse: f64,

    /// Prompt bytes per token, to weigh prompt families against the
    /// tokens each engine's KV cache holds (`vllm:cache_config_info`): a
    /// new family (a system prompt, a template, a conversation) is placed
    /// on the next backend in rendezvous order when its own is full of
    /// families in use, so it does not evict them. Used for an engine until
    /// its own `vllm:prompt_tokens_total`, scraped while only this router
    /// sends there, gives the ratio of the prompts actually sent. English
    /// text is about 4 bytes per token with Llama-3's tokenizer; a lower
    /// value counts caches as fuller. 0: caches are not weighed.
    #[arg(long, env = "ROUTER_BYTES_PER_TOKEN", default_value_t = Policy::DEFAULT.bytes_per_token,
          value_parser = non_negative)]
    pub bytes_per_token: f64,

    /// How backends are picked: `prefixaware` (by prefix affinity weighed
    /// against load; the flags above and --session-header tune it) or
    /// `roundrobin` (each in turn, whatever the prompt or session; no prefix
    /// index: a baseline, or for engines without a prefix cache).
    /// The production-stack chart's `routingLogic`.
    #[arg(long, env = "ROUTER_ROUTING_LOGIC", value_enum, default_value_t = Policy::DEFAULT.logic)]
    pub routing_logic: Logic,

    /// Request header whose value pins a session to one backend (by
    /// rendezvous hashing, within the load bound).
    #[arg(long, env = "ROUTER_SESSION_HEADER", default_value = "x-session-id")]
    pub session_header: String,
}

/// `namespace`, else the router's own (its service account's), else
/// `default`.
fn namespace_or_own(namespace: Option<&String>) -> String {
    namespace.cloned().unwrap_or_else(|| {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .map(|namespace| namespace.trim().to_owned())
            .ok()
            .filter(|namespace| !namespace.is_empty())
            .unwrap_or_else(|| "default".to_owned())
    })
}

/// Where placement patience holds (`--placement-patience-when`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PatienceWhen {
    /// While no other client is seen sending requests to the backends,
    /// and some are known to serve only this router.
    Alone,
    /// While no other client is seen sending requests to the backends,
    /// including before anything is known (a cold start).
    UntilShared,
    /// Whoever else sends requests to the backends.
    Always,
    /// Never: patience is off.
    Never,
}

/// Parses a number from 0 to 1.
fn fraction(s: &str) -> Result<f64, String> {
    match non_negative(s)? {
        v if v <= 1.0 => Ok(v),
        _ => Err("must be a number from 0 to 1".into()),
    }
}

/// Parses a finite number that is 0 or more.
fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number, 0 or more".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl Config {
    /// A configuration for `backends` with every other knob at its
    /// default: the flags' own defaults, parsed with the environment left
    /// out (so a `ROUTER_*` variable set around a test changes nothing).
    pub fn with_backends(listen: SocketAddr, backends: Vec<String>) -> Self {
        use clap::{CommandFactory as _, FromArgMatches as _};
        let command = Self::command().mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(["router-daemon", "--backend", "http://placeholder:1"])
            .expect("invariant: one --backend is all the flags require");
        let defaults = Self::from_arg_matches(&matches)
            .expect("invariant: matches from this struct's own command");
        Self {
            listen,
            backends,
            ..defaults
        }
    }

    /// The routing policy's tunables.
    pub fn policy(&self) -> Policy {
        Policy {
            logic: self.routing_logic,
            epsilon: self.load_epsilon,
            affinity_weight: self.affinity_weight,
            load_weight: self.load_weight,
            prefilling_weight: self.prefilling_weight,
            placement_epsilon: self.placement_epsilon,
            follow_fraction: self.follow_fraction,
            rendezvous_weight: self.rendezvous_weight,
            placement_prefix: usize::try_from(self.placement_prefix_bytes).unwrap_or(usize::MAX),
            family_weight: self.family_weight,
            placement_patience: (self.placement_patience_when != PatienceWhen::Never)
                .then_some(self.placement_patience),
            patience_holds: match self.placement_patience_when {
                PatienceWhen::Alone | PatienceWhen::Never => PatienceHolds::Alone,
                PatienceWhen::UntilShared => PatienceHolds::UntilShared,
                PatienceWhen::Always => PatienceHolds::Always,
            },
            bytes_per_token: self.bytes_per_token,
            recency_margin: self.recency_margin,
            idle_below_reuse: self.idle_below_reuse,
        }
    }

    /// The request size limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_head: self.max_head_bytes,
            max_body: self.max_body_bytes,
            ..Limits::default()
        }
    }

    /// Worker threads to run: `--workers`, or one per CPU when it is 0.
    pub fn workers(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }

    /// Most client connections open at once: `--max-connections`, or what
    /// an open-file limit of `open_files` allows.
    pub fn max_connections(&self, open_files: u64) -> usize {
        let limit = self
            .max_connections
            .unwrap_or_else(|| (open_files / 2).saturating_sub(128).max(1));
        usize::try_from(limit).unwrap_or(usize::MAX)
    }

    /// How long a started request may take to arrive.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// How long an idle connection may wait for its next request.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How long an idle backend connection is kept.
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_idle_timeout_ms)
    }

    /// The backend connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// How long a backend may keep a response waiting.
    pub fn response_timeouts(&self) -> ResponseTimeouts {
        let bound = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        ResponseTimeouts {
            first_byte: bound(self.first_byte_timeout_ms),
            idle: bound(self.response_idle_timeout_ms),
        }
    }

    /// The pods `--discovery k8s` takes as backends.
    pub fn pod_selector(&self) -> PodSelector {
        PodSelector {
            namespace: namespace_or_own(self.k8s_namespace.as_ref()),
            labels: self.k8s_selector.clone(),
            port: self.k8s_port,
            port_name: self.k8s_port_name.clone(),
            node: self.node_name.clone(),
        }
    }

    /// The router pods `--peer-selector` picks as this router's replicas,
    /// and this router's own pod name among them; `None` without one.
    pub fn peer_selector(&self) -> Option<(PodSelector, String)> {
        let labels = self.peer_selector.clone()?;
        let own = self.pod_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_default()
        });
        Some((
            PodSelector {
                namespace: namespace_or_own(self.peer_namespace.as_ref()),
                labels,
                // Peers are counted, never connected to.
                port: 0,
                port_name: None,
                node: None,
            },
            own,
        ))
    }

    /// How many other routers are known at the start: `--peers`, unless
    /// `--peer-selector` is to find them.
    pub fn peers(&self) -> Option<usize> {
        self.peers.filter(|_| self.peer_selector.is_none())
    }

    /// When passive health ejects a backend.
    pub fn ejection(&self) -> Ejection {
        Ejection {
            after_failures: self.eject_after_failures,
            period: Duration::from_millis(self.eject_ms),
        }
    }

    /// The drain's timing after a shutdown signal.
    pub(crate) fn drain(&self) -> crate::drain::DrainTiming {
        crate::drain::DrainTiming {
            delay: Duration::from_millis(self.drain_delay_ms),
            timeout: Duration::from_millis(self.drain_timeout_ms),
        }
    }

    /// The discovery poller's settings; its connects are bounded by both
    /// the backend connect timeout and the discovery timeout.
    pub fn discovery(&self) -> Discovery {
        let timeout = Duration::from_millis(self.discovery_timeout_ms);
        Discovery {
            interval: Duration::from_millis(self.discovery_interval_ms),
            timeout,
            connect_timeout: self.connect_timeout().min(timeout),
            down_after: self.down_after_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn defaults_match_with_backends() {
        let parsed = Config::try_parse_from(["router-daemon", "--backend", "http://a:1"])
            .expect("valid flags");
        let built = Config::with_backends(
            "0.0.0.0:30080".parse().expect("addr"),
            vec!["http://a:1".into()],
        );
        assert_eq!(format!("{parsed:?}"), format!("{built:?}"));
    }

    #[test]
    fn response_timeouts_default_to_the_dataplane_s_and_zero_turns_them_off() {
        let built = Config::with_backends(
            "0.0.0.0:30080".parse().expect("addr"),
            vec!["http://a:1".into()],
        );
        assert_eq!(built.response_timeouts(), ResponseTimeouts::DEFAULT);
        assert_eq!(built.ejection(), Ejection::DEFAULT);
        let off = Config::try_parse_from([
            "router-daemon",
            "--backend",
            "x:1",
            "--first-byte-timeout-ms",
            "0",
            "--response-idle-timeout-ms",
            "0",
        ])
        .expect("valid flags");
        let none = ResponseTimeouts {
            first_byte: None,
            idle: None,
        };
        assert_eq!(off.response_timeouts(), none);
    }

    #[test]
    fn discovery_flags_parse_into_settings() {
        let parsed = Config::try_parse_from([
            "router-daemon",
            "--backend",
            "x:1",
            "--discovery-interval-ms",
            "250",
            "--discovery-timeout-ms",
            "500",
            "--down-after-failures",
            "5",
        ])
        .expect("valid flags");
        assert_eq!(
            parsed.discovery(),
            Discovery {
                interval: Duration::from_millis(250),
                timeout: Duration::from_millis(500),
                connect_timeout: Duration::from_millis(500),
                down_after: 5,
            }
        );
        let zero = Config::try_parse_from([
            "router-daemon",
            "--backend",
            "x:1",
            "--down-after-failures",
            "0",
        ]);
        assert!(zero.is_err());
    }

    #[test]
    fn default_policy_matches_the_flags() {
        let built = Config::with_backends(
            "0.0.0.0:30080".parse().expect("addr"),
            vec!["http://a:1".into()],
        );
        assert_eq!(built.policy(), Policy::default());
    }

    #[test]
    fn weights_must_be_non_negative() {
        for flag in [
            "--load-epsilon",
            "--affinity-weight",
            "--load-weight",
            "--prefilling-weight",
            "--rendezvous-weight",
            "--follow-fraction",
            "--recency-margin",
            "--idle-below-reuse",
        ] {
            for bad in ["-1", "NaN", "inf", "x"] {
                let err = Config::try_parse_from(["router-daemon", "--backend", "x:1", flag, bad]);
                assert!(err.is_err(), "{flag} {bad}");
            }
            let ok = Config::try_parse_from(["router-daemon", "--backend", "x:1", flag, "0.5"]);
            assert!(ok.is_ok(), "{flag}");
        }
        let over = [
            "router-daemon",
            "--backend",
            "x:1",
            "--follow-fraction",
            "1.5",
        ];
        assert!(Config::try_parse_from(over).is_err());
    }

    #[test]
    fn block_size_is_range_checked() {
        let err =
            Config::try_parse_from(["router-daemon", "--backend", "x:1", "--block-bytes", "65"]);
        assert!(err.is_err());
    }
}
