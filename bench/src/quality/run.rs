//! One measured run: a fresh fleet of in-process vllm-sim backends, one
//! router in front of it (or a client-side choice of backend), and a
//! load generator (closed loop, Poisson arrivals, or a trace's timestamps)
//! that streams every request and records its TTFT, latency, serving
//! backend and cached tokens; meanwhile each simulator's load is sampled,
//! and a router process's CPU time and peak memory are read from /proc.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use vllm_sim::engine::Lateness;

use super::{
    load::{Sampler, Samples},
    workload::{Prompt, Session, Workload, chat_messages},
};
use crate::{
    http, procfs,
    procs::{Proc, router_env},
};

/// The open-file limit nginx's workers get: two descriptors per proxied
/// connection, for far more sessions than any level runs.
const NGINX_NOFILE: u64 = 8192;

/// Seed of the generator that sprays requests over router replicas.
const SPRAY_SEED: u64 = 0x7370_7261_7921;

/// How requests reach the backends.
#[derive(Clone, Debug)]
pub enum RouterKind {
    /// The router-daemon binary with these extra flags, as `replicas`
    /// processes with no shared state; with more than one, each request goes
    /// to a replica picked at random (seeded), as clients behind a node port
    /// spread over a DaemonSet's routers.
    Daemon {
        /// The binary.
        bin: PathBuf,
        /// Flags after `--listen` and `--backend`.
        extra: Vec<String>,
        /// How many router processes.
        replicas: usize,
    },
    /// The load generator sends each request to the next backend in turn.
    RoundRobin,
    /// The load generator sends each request to the backend with the fewest
    /// of its requests in flight (ties in turn).
    LeastLoaded,
    /// nginx as a plain L7 proxy: round-robin over kept-alive upstream
    /// connections, `proxy_buffering off` ([`crate::nginx`]).
    Nginx {
        /// The binary.
        bin: PathBuf,
    },
    /// Another router, started with `bash -c CMD` (`$PORT`, `$BACKEND_URLS`
    /// comma-separated, `$MODEL`, and `$METRICS_PORT`, a second free port
    /// for a metrics listener, in its environment).
    Peer {
        /// The command line.
        cmd: String,
    },
}

/// A router of the comparison.
#[derive(Clone, Debug)]
pub struct Router {
    /// Its name in the report.
    pub name: String,
    /// How it is run.
    pub kind: RouterKind,
}

/// The simulator settings of a run.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Simulators.
    pub backends: usize,
    /// A simulator's base configuration (its id is set per instance).
    pub sim: vllm_sim::Config,
    /// Simulator i listens on this + i when that port is free.
    pub port_base: Option<u16>,
}

/// When sessions start.
#[derive(Clone, Copy, Debug)]
pub enum Arrivals {
    /// This many sessions in flight; the next starts when one ends.
    Closed(usize),
    /// Sessions start at Poisson times, this many per second on average
    /// (seeded), however many are in flight.
    Poisson {
        /// Sessions per second.
        rate: f64,
        /// Seed of the arrival times.
        seed: u64,
    },
}

/// What one request gave.
#[derive(Clone, Debug)]
pub struct Record {
    /// Session index.
    pub session: usize,
    /// Turn within the session.
    pub turn: usize,
    /// `x-served-by`.
    pub served_by: String,
    /// When the request was sent.
    pub sent: Instant,
    /// Request sent to first token received.
    pub ttft: Duration,
    /// Request sent to last byte received.
    pub e2e: Duration,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
    /// The generated text.
    pub reply: String,
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Successful requests.
    pub records: Vec<Record>,
    /// Failed requests, with the first few messages.
    pub errors: u64,
    /// The first error messages.
    pub error_samples: Vec<String>,
    /// First request sent to last answer received.
    pub elapsed: Duration,
    /// When the first session started.
    pub started: Instant,
    /// Simulator ids, in fleet order.
    pub backend_ids: Vec<String>,
    /// The router's command line, when it is a process.
    pub command: Option<String>,
    /// Each simulator's running + waiting requests over the run.
    pub load: Samples,
    /// The router processes' CPU time during the run and peak memory
    /// (summed over replicas); `None` for client-side choices.
    pub usage: Option<RouterUsage>,
    /// router-daemon's routing decisions during the run, by reason, summed
    /// over replicas (`router_route_decisions_total`); empty for others.
    pub decisions: Vec<(String, u64)>,
    /// router-daemon's mean time from a request written to an engine to its
    /// first token, as the router saw it, over the run and its replicas
    /// (`router_backend_time_to_first_token_seconds`): the client's TTFT
    /// less this is what the hop and the client cost. `None` for others.
    pub engine_ttft: Option<Duration>,
    /// How far the simulators' step loops ran behind their latency model
    /// during the run, over the fleet: what the host's CPUs, shared with the
    /// load and the router, added to the engines' own times.
    pub sims_late: Lateness,
}

/// What the router processes used.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RouterUsage {
    /// utime + stime from the first request sent to the last answer.
    pub cpu: Duration,
    /// Peak resident set (VmHWM), bytes.
    pub peak_rss_bytes: u64,
}

/// Per-request limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// In-process simulators, stopped on [`Fleet::stop`].
struct Fleet {
    addrs: Vec<SocketAddr>,
    ids: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<Result<(), vllm_sim::Error>>>,
    /// The engines, as each simulator hands it over.
    engines: Vec<oneshot::Receiver<Arc<vllm_sim::engine::Engine>>>,
}

impl Fleet {
    async fn start(config: &FleetConfig) -> Result<Self> {
        let mut fleet = Fleet {
            addrs: Vec::new(),
            ids: Vec::new(),
            stops: Vec::new(),
            tasks: Vec::new(),
            engines: Vec::new(),
        };
        for i in 0..config.backends {
            let fixed = config
                .port_base
                .and_then(|base| u16::try_from(usize::from(base) + i).ok());
            let fixed = match fixed {
                Some(port) => match TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await {
                    Ok(listener) => Some(listener),
                    Err(err) => {
                        eprintln!("router-bench: port {port} is taken ({err}); a free one instead");
                        None
                    }
                },
                None => None,
            };
            let listener = match fixed {
                Some(listener) => listener,
                None => TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                    .await
                    .context("binding a simulator")?,
            };
            let addr = listener.local_addr().context("simulator address")?;
            let id = format!("sim-{i}");
            let sim = vllm_sim::Config {
                id: id.clone(),
                port: addr.port(),
                ..config.sim.clone()
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let shutdown = async move {
                let _ = stopped.await;
            };
            let (engine, engine_rx) = oneshot::channel();
            let observe = move |e| {
                let _ = engine.send(e);
            };
            fleet.addrs.push(addr);
            fleet.ids.push(id);
            fleet.stops.push(stop);
            fleet.engines.push(engine_rx);
            fleet.tasks.push(tokio::spawn(vllm_sim::serve_observed(
                listener, sim, shutdown, observe,
            )));
        }
        Ok(fleet)
    }

    async fn stop(self) -> Result<()> {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for task in self.tasks {
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => bail!("a simulator failed: {err}"),
                Ok(Err(err)) => bail!("a simulator task failed: {err}"),
                Err(_) => bail!("a simulator did not stop within 10 s"),
            }
        }
        Ok(())
    }
}

/// Where the load generator sends a request.
enum Target {
    /// Always to this address (a router).
    Fixed(SocketAddr),
    /// The next backend in turn.
    RoundRobin {
        addrs: Vec<SocketAddr>,
        next: AtomicUsize,
    },
    /// The backend with the fewest requests in flight from this generator.
    LeastLoaded {
        addrs: Vec<SocketAddr>,
        in_flight: Vec<AtomicUsize>,
        next: AtomicUsize,
    },
    /// A router replica picked at random (seeded) for every request.
    /// Boxed: the generator is much larger than the other variants.
    Spray {
        addrs: Vec<SocketAddr>,
        rng: Box<Mutex<StdRng>>,
    },
}

impl Target {
    /// Picks an address; the index is passed back to [`Target::done`].
    fn pick(&self) -> (usize, SocketAddr) {
        match self {
            Target::Fixed(addr) => (0, *addr),
            Target::Spray { addrs, rng } => {
                let i = rng
                    .lock()
                    .map(|mut rng| rng.random_range(0..addrs.len()))
                    .unwrap_or(0);
                (i, addrs[i])
            }
            Target::RoundRobin { addrs, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % addrs.len();
                (i, addrs[i])
            }
            Target::LeastLoaded {
                addrs,
                in_flight,
                next,
            } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                let n = addrs.len();
                let i = (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|&i| in_flight[i].load(Ordering::Relaxed))
                    .unwrap_or(0);
                in_flight[i].fetch_add(1, Ordering::Relaxed);
                (i, addrs[i])
            }
        }
    }

    fn done(&self, i: usize) {
        if let Target::LeastLoaded { in_flight, .. } = self {
            in_flight[i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs `workload` through `router` in front of a fresh fleet, sessions
/// starting as `arrivals` says.
pub async fn run(
    workload: Arc<Workload>,
    router: &Router,
    fleet: &FleetConfig,
    arrivals: Arrivals,
    session_header: Option<&str>,
    tmp: &Path,
) -> Result<Outcome> {
    let mut sims = Fleet::start(fleet).await?;
    let result = drive(workload, router, &mut sims, arrivals, session_header, tmp).await;
    let stopped = sims.stop().await;
    let outcome = result?;
    stopped?;
    Ok(outcome)
}

async fn drive(
    workload: Arc<Workload>,
    router: &Router,
    sims: &mut Fleet,
    arrivals: Arrivals,
    session_header: Option<&str>,
    tmp: &Path,
) -> Result<Outcome> {
    let urls = sims
        .addrs
        .iter()
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>();
    let mut procs = Vec::new();
    let mut command = None;
    let target = match &router.kind {
        RouterKind::RoundRobin => Target::RoundRobin {
            addrs: sims.addrs.clone(),
            next: AtomicUsize::new(0),
        },
        RouterKind::LeastLoaded => Target::LeastLoaded {
            addrs: sims.addrs.clone(),
            in_flight: sims.addrs.iter().map(|_| AtomicUsize::new(0)).collect(),
            next: AtomicUsize::new(0),
        },
        RouterKind::Daemon {
            bin,
            extra,
            replicas,
        } => {
            let mut addrs = Vec::new();
            for replica in 0..(*replicas).max(1) {
                let addr = free_addr()?;
                let mut cmd = Command::new(bin);
                cmd.arg("--listen").arg(addr.to_string());
                for url in &urls {
                    cmd.arg("--backend").arg(url);
                }
                // The other replicas, as the chart's DaemonSet learns them
                // (--peer-selector), unless the extra flags say otherwise.
                let told = extra.iter().any(|arg| arg.starts_with("--peer"))
                    || std::env::var_os("ROUTER_PEERS").is_some();
                if !told {
                    cmd.arg("--peers").arg((replicas.max(&1) - 1).to_string());
                }
                router_env(cmd.args(extra));
                if replica == 0 {
                    let times = if *replicas > 1 {
                        format!(" (×{replicas}, each on its own port)")
                    } else {
                        String::new()
                    };
                    command = Some(format!("RUST_LOG=warn {}{times}", crate::run::show(&cmd)));
                }
                let log = tmp.join(format!("{}-{replica}.log", file_name(&router.name)));
                procs.push(Proc::spawn(&router.name, cmd, &log)?);
                addrs.push(addr);
            }
            match addrs.as_slice() {
                [addr] => Target::Fixed(*addr),
                _ => Target::Spray {
                    addrs,
                    rng: Box::new(Mutex::new(StdRng::seed_from_u64(SPRAY_SEED))),
                },
            }
        }
        RouterKind::Nginx { bin } => {
            let streaming = free_addr()?;
            let dir = tmp.join(format!("nginx-{}", streaming.port()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let layout = crate::nginx::Layout {
                dir: &dir,
                buffered: free_addr()?,
                streaming,
                backends: &sims.addrs,
                // One worker: each keeps its own round-robin turn, so two
                // would send two requests at once to one backend now and
                // then, and the row would not be the client-side order.
                workers: "1",
                nofile: NGINX_NOFILE,
            };
            let (cmd, _config) = crate::nginx::prepare(bin, &layout)?;
            command = Some(format!(
                "{} (worker_processes 1, `proxy_buffering off`)",
                crate::run::show(&cmd)
            ));
            procs.push(Proc::spawn(&router.name, cmd, &dir.join("nginx.log"))?);
            Target::Fixed(streaming)
        }
        RouterKind::Peer { cmd: line } => {
            let addr = free_addr()?;
            let metrics = free_addr()?;
            let mut cmd = Command::new("bash");
            cmd.arg("-c")
                .arg(line)
                .env("PORT", addr.port().to_string())
                .env("METRICS_PORT", metrics.port().to_string())
                .env("BACKEND_URLS", urls.join(","))
                .env("MODEL", vllm_sim::config::DEFAULT_MODEL);
            command = Some(format!(
                "PORT={} METRICS_PORT={} BACKEND_URLS={} bash -c '{line}'",
                addr.port(),
                metrics.port(),
                urls.join(",")
            ));
            let log = tmp.join(format!("{}.log", file_name(&router.name)));
            procs.push(Proc::spawn(&router.name, cmd, &log)?);
            Target::Fixed(addr)
        }
    };
    // Every backend answers first (the tokenizer is built on first use).
    for addr in &sims.addrs {
        wait_ready(*addr, None).await?;
    }
    match &target {
        Target::Fixed(addr) => {
            if let Some(p) = procs.first_mut() {
                wait_ready(*addr, Some(p)).await?;
            }
        }
        Target::Spray { addrs, .. } => {
            for (addr, p) in addrs.iter().zip(procs.iter_mut()) {
                wait_ready(*addr, Some(p)).await?;
            }
        }
        Target::RoundRobin { .. } | Target::LeastLoaded { .. } => {}
    }
    // Every simulator has answered, so each has handed over its engine.
    let mut engines = Vec::new();
    for rx in sims.engines.drain(..) {
        engines.push(
            rx.await
                .context("a simulator did not hand over its engine")?,
        );
    }

    let shared = Arc::new(Shared {
        workload,
        target,
        next: AtomicUsize::new(0),
        errors: Mutex::new((0, Vec::new())),
        session_header: session_header.map(str::to_owned),
    });
    let daemons = match (&router.kind, &shared.target) {
        (RouterKind::Daemon { .. }, Target::Fixed(addr)) => vec![*addr],
        (RouterKind::Daemon { .. }, Target::Spray { addrs, .. }) => addrs.clone(),
        _ => Vec::new(),
    };
    let scraped_before = Scraped::from(&daemons).await;
    let cpu_before = procs
        .iter()
        .map(|p| procfs::tree_usage(p.pid()).cpu_ns)
        .sum::<u64>();
    let late_before = lateness(&engines);
    let sampler = Sampler::start(engines.clone());
    let started = Instant::now();
    let workers = match arrivals {
        _ if shared.workload.timed() => {
            let origin = tokio::time::Instant::now();
            let mut tasks = Vec::new();
            for session in 0..shared.workload.sessions.len() {
                let at = shared.workload.sessions[session].at.unwrap_or_default();
                tokio::time::sleep_until(origin + at).await;
                tasks.push(spawn_session(Arc::clone(&shared), session));
            }
            tasks
        }
        Arrivals::Closed(concurrency) => (0..concurrency.max(1))
            .map(|_| tokio::spawn(worker(Arc::clone(&shared))))
            .collect::<Vec<_>>(),
        Arrivals::Poisson { rate, seed } => {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut at = tokio::time::Instant::now();
            let mut tasks = Vec::new();
            for session in 0..shared.workload.sessions.len() {
                // Exponential gaps: -ln(U) / rate, U in (0, 1].
                let u: f64 = 1.0 - rng.random::<f64>();
                at += Duration::from_secs_f64(-u.ln() / rate);
                tokio::time::sleep_until(at).await;
                tasks.push(spawn_session(Arc::clone(&shared), session));
            }
            tasks
        }
    };
    let mut records = Vec::new();
    let mut panicked = None;
    for w in workers {
        match w.await {
            Ok(r) => records.extend(r),
            Err(err) => panicked = Some(err),
        }
    }
    let elapsed = started.elapsed();
    let load = sampler.finish().await;
    let usage = (!procs.is_empty()).then(|| {
        let now = procs
            .iter()
            .map(|p| procfs::tree_usage(p.pid()))
            .collect::<Vec<_>>();
        RouterUsage {
            cpu: Duration::from_nanos(
                now.iter()
                    .map(|u| u.cpu_ns)
                    .sum::<u64>()
                    .saturating_sub(cpu_before),
            ),
            peak_rss_bytes: now.iter().map(|u| u.peak_rss_bytes).sum(),
        }
    });
    if let Some(err) = panicked {
        bail!("a load task panicked: {err}");
    }
    let sims_late = lateness(&engines).since(late_before);
    let scraped = Scraped::from(&daemons).await;
    let decided = scraped.decisions_since(&scraped_before);
    let engine_ttft = scraped.mean_ttft_since(&scraped_before);
    for mut p in procs {
        if let Some(status) = p.exited() {
            bail!(
                "{} exited during the run ({status}): {}",
                p.name,
                p.log_tail(5)
            );
        }
        p.stop();
    }
    let (errors, error_samples) = shared.errors.lock().map(|e| e.clone()).unwrap_or_default();
    Ok(Outcome {
        records,
        errors,
        error_samples,
        elapsed,
        started,
        backend_ids: sims.ids.clone(),
        command,
        load,
        usage,
        decisions: decided,
        engine_ttft,
        sims_late,
    })
}

/// The fleet's [`Lateness`] so far, summed over its engines.
fn lateness(engines: &[Arc<vllm_sim::engine::Engine>]) -> Lateness {
    engines
        .iter()
        .map(|e| e.lateness())
        .fold(Lateness::default(), |a, b| Lateness {
            steps: a.steps + b.steps,
            late: a.late + b.late,
        })
}

/// Name of router-daemon's decision counter in its `/metrics` text.
const DECISIONS_METRIC: &str = "router_route_decisions_total{reason=\"";

/// Name of router-daemon's time-to-first-token histogram, by backend.
const TTFT_METRIC: &str = "router_backend_time_to_first_token_seconds";

/// What router-daemon's `/metrics` said at one moment, summed over
/// replicas; a replica that does not answer adds nothing, so a missing
/// count shows as a short total rather than failing the run.
#[derive(Debug, Default, PartialEq)]
struct Scraped {
    /// Decisions so far, by reason.
    decisions: Vec<(String, u64)>,
    /// Σ seconds to first token, over backends.
    ttft_sum_s: f64,
    /// Responses counted in `ttft_sum_s`.
    ttft_count: u64,
}

impl Scraped {
    /// Scrapes every daemon in `daemons`.
    async fn from(daemons: &[SocketAddr]) -> Self {
        let mut scraped = Scraped::default();
        for addr in daemons {
            if let Ok(text) = metrics_text(*addr).await {
                scraped.add(&text);
            }
        }
        scraped
    }

    /// Adds one daemon's `/metrics` text.
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(DECISIONS_METRIC) {
                let Some((reason, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let Ok(n) = value.trim().parse::<f64>() else {
                    continue;
                };
                match self.decisions.iter_mut().find(|(r, _)| r == reason) {
                    Some((_, sum)) => *sum += n as u64,
                    None => self.decisions.push((reason.to_owned(), n as u64)),
                }
            } else if let Some(rest) = line.strip_prefix(TTFT_METRIC) {
                // `_sum{backend="..."} 1.25` and `_count{backend="..."} 10`.
                let value = rest.rsplit_once(' ').map(|(_, v)| v.trim());
                let Some(Ok(v)) = value.map(str::parse::<f64>) else {
                    continue;
                };
                if rest.starts_with("_sum") {
                    self.ttft_sum_s += v;
                } else if rest.starts_with("_count") {
                    self.ttft_count += v as u64;
                }
            }
        }
    }

    /// Decisions made since `before`, most frequent first, none of 0.
    fn decisions_since(&self, before: &Scraped) -> Vec<(String, u64)> {
        let mut since = self
            .decisions
            .iter()
            .map(|(reason, n)| {
                let was = before
                    .decisions
                    .iter()
                    .find(|(r, _)| r == reason)
                    .map_or(0, |(_, n)| *n);
                (reason.clone(), n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect::<Vec<_>>();
        since.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        since
    }

    /// Mean time to first token of the responses since `before`; `None`
    /// when there were none.
    fn mean_ttft_since(&self, before: &Scraped) -> Option<Duration> {
        let n = self.ttft_count.checked_sub(before.ttft_count)?;
        let sum = self.ttft_sum_s - before.ttft_sum_s;
        (n > 0 && sum >= 0.0).then(|| Duration::from_secs_f64(sum / n as f64))
    }
}

/// `GET /metrics` from `addr`, on a connection of its own.
async fn metrics_text(addr: SocketAddr) -> Result<String> {
    let mut stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .context("connecting for /metrics timed out")??;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut body))
        .await
        .context("reading /metrics timed out")??;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Runs one session on its own connections (open-loop arrivals).
fn spawn_session(shared: Arc<Shared>, session: usize) -> JoinHandle<Vec<Record>> {
    tokio::spawn(async move {
        let mut conns = HashMap::new();
        match shared.workload.sessions.get(session) {
            Some(s) => run_session(&shared, &mut conns, s).await,
            None => Vec::new(),
        }
    })
}

/// A router's name as part of a file name: anything but ASCII letters,
/// digits, `-` and `.` becomes `_`.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A free port on 127.0.0.1 for a router process.
fn free_addr() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a port")?;
    probe.local_addr().context("finding a port")
}

/// Waits until `addr` answers a one-token completion (whose prompt is too
/// short to cache a block) with 200.
async fn wait_ready(addr: SocketAddr, mut proc: Option<&mut Proc>) -> Result<()> {
    let body = serde_json::json!({
        "model": vllm_sim::config::DEFAULT_MODEL,
        "prompt": "ping",
        "max_tokens": 1,
    })
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut conns = HashMap::new();
        let last = match exchange(
            &mut conns,
            addr,
            "/v1/completions",
            body.as_bytes(),
            None,
            Duration::from_secs(2),
        )
        .await
        {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        if let Some(p) = proc.as_deref_mut()
            && let Some(status) = p.exited()
        {
            bail!("{} exited ({status}): {}", p.name, p.log_tail(5));
        }
        if Instant::now() > deadline {
            bail!("{addr} did not answer a completion within 30 s (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// State the load workers share.
struct Shared {
    workload: Arc<Workload>,
    target: Target,
    /// The next session to start.
    next: AtomicUsize,
    /// Failed requests and the first messages.
    errors: Mutex<(u64, Vec<String>)>,
    session_header: Option<String>,
}

impl Shared {
    fn error(&self, msg: String) {
        if let Ok(mut e) = self.errors.lock() {
            e.0 += 1;
            if e.1.len() < 5 {
                e.1.push(msg);
            }
        }
    }
}

/// One closed-loop client: takes the next session, runs it, repeats until
/// none are left.
async fn worker(shared: Arc<Shared>) -> Vec<Record> {
    let mut records = Vec::new();
    let mut conns: HashMap<SocketAddr, TcpStream> = HashMap::new();
    loop {
        let i = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(session) = shared.workload.sessions.get(i) else {
            break;
        };
        records.extend(run_session(&shared, &mut conns, session).await);
    }
    records
}

/// Sends a session's requests one after another; a conversation stops at
/// its first failure (the next turn needs the reply).
async fn run_session(
    shared: &Shared,
    conns: &mut HashMap<SocketAddr, TcpStream>,
    session: &Session,
) -> Vec<Record> {
    let model = vllm_sim::config::DEFAULT_MODEL;
    let output = session.output_len.unwrap_or(shared.workload.output_len);
    let mut records = Vec::new();
    let mut replies: Vec<String> = Vec::new();
    let session_id = format!("session-{}", session.id);
    for turn in 0..session.prompt.requests() {
        let (path, body) = match &session.prompt {
            Prompt::Text(text) => (
                "/v1/completions",
                serde_json::json!({
                    "model": model,
                    "prompt": text,
                    "max_tokens": output,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                }),
            ),
            Prompt::Chat { system, turns } => {
                let messages = chat_messages(system, turns, &replies, turn)
                    .into_iter()
                    .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
                    .collect::<Vec<_>>();
                (
                    "/v1/chat/completions",
                    serde_json::json!({
                        "model": model,
                        "messages": messages,
                        "max_tokens": output,
                        "stream": true,
                        "stream_options": {"include_usage": true},
                    }),
                )
            }
        };
        let body = body.to_string();
        let header = shared
            .session_header
            .as_deref()
            .map(|name| (name, session_id.as_str()));
        let (slot, addr) = shared.target.pick();
        let sent = Instant::now();
        let answer = exchange(conns, addr, path, body.as_bytes(), header, REQUEST_TIMEOUT).await;
        shared.target.done(slot);
        match answer {
            Ok(a) => {
                replies.push(a.text.clone());
                records.push(Record {
                    session: session.id,
                    turn,
                    served_by: a.served_by,
                    sent,
                    ttft: a.ttft,
                    e2e: a.e2e,
                    prompt_tokens: a.prompt_tokens,
                    cached_tokens: a.cached_tokens,
                    reply: a.text,
                });
            }
            Err(err) => {
                shared.error(format!("session {} turn {turn}: {err}", session.id));
                break;
            }
        }
    }
    records
}

/// One streamed answer.
#[derive(Debug)]
struct Answer {
    served_by: String,
    ttft: Duration,
    e2e: Duration,
    prompt_tokens: u64,
    cached_tokens: u64,
    text: String,
}

/// Sends one request over a kept-alive connection to `addr` (a new one
/// when there is none, or when a reused one fails before answering) and
/// reads the whole answer.
async fn exchange(
    conns: &mut HashMap<SocketAddr, TcpStream>,
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    header: Option<(&str, &str)>,
    limit: Duration,
) -> Result<Answer, String> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some((name, value)) = header {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);

    for attempt in 0..2 {
        let (mut stream, reused) = match conns.remove(&addr) {
            Some(s) => (s, true),
            None => {
                let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .map_err(|_| format!("connect to {addr} timed out"))?
                    .map_err(|e| format!("connect to {addr}: {e}"))?;
                let _ = s.set_nodelay(true);
                (s, false)
            }
        };
        let start = Instant::now();
        let result = tokio::time::timeout(limit, read_answer(&mut stream, &request, start)).await;
        match result {
            Ok(Ok((answer, keep))) => {
                if keep {
                    conns.insert(addr, stream);
                }
                return Ok(answer);
            }
            // The server closed the idle connection: retry on a new one.
            Ok(Err(Failure::Stale(_))) if reused && attempt == 0 => continue,
            Ok(Err(Failure::Stale(e) | Failure::Other(e))) => return Err(e),
            Err(_) => return Err(format!("no complete answer within {} s", limit.as_secs())),
        }
    }
    Err("connection closed twice before an answer".into())
}

/// Why an exchange failed.
enum Failure {
    /// Failed before any response byte (retryable on a reused connection).
    Stale(String),
    /// Anything else.
    Other(String),
}

async fn read_answer(
    stream: &mut TcpStream,
    request: &[u8],
    start: Instant,
) -> Result<(Answer, bool), Failure> {
    stream
        .write_all(request)
        .await
        .map_err(|e| Failure::Stale(format!("write: {e}")))?;
    let mut buf = Vec::with_capacity(16 << 10);
    let mut chunk = vec![0u8; 16 << 10];
    let head = loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Stale(format!("read: {e}")))?;
        if n == 0 {
            return Err(Failure::Stale("closed before a response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = http::parse_response(&buf).map_err(|e| Failure::Other(e.to_string()))? {
            break head;
        }
        if buf.len() > 64 << 10 {
            return Err(Failure::Other("response head too long".into()));
        }
    };
    let served_by =
        header_value(&buf[..head.len], vllm_sim::SERVED_BY.as_str()).unwrap_or_default();
    let mut sse = Sse::default();
    let mut body_done;
    let rest = buf.split_off(head.len);
    let mut dechunker = http::Dechunker::default();
    let mut remaining = match head.framing {
        http::Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut feed = |input: &[u8], sse: &mut Sse| -> Result<bool, Failure> {
        let now = Instant::now();
        match head.framing {
            http::Framing::Chunked => {
                let mut data = Vec::new();
                let (_, done) = dechunker
                    .feed(input, |d| data.extend_from_slice(d))
                    .map_err(|e| Failure::Other(e.to_string()))?;
                sse.feed(&data, now);
                Ok(done)
            }
            http::Framing::Length(_) => {
                let take = usize::try_from(remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                sse.feed(&input[..take], now);
                remaining -= take as u64;
                Ok(remaining == 0)
            }
            http::Framing::UntilClose => {
                sse.feed(input, now);
                Ok(false)
            }
        }
    };
    body_done = feed(&rest, &mut sse)?;
    while !body_done {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| Failure::Other(format!("read body: {e}")))?;
        if n == 0 {
            if head.framing == http::Framing::UntilClose {
                break;
            }
            return Err(Failure::Other("closed mid-body".into()));
        }
        body_done = feed(&chunk[..n], &mut sse)?;
    }
    let e2e = start.elapsed();
    if head.status != 200 {
        let text = String::from_utf8_lossy(&sse.pending);
        return Err(Failure::Other(format!(
            "HTTP {} from {}: {}",
            head.status,
            if served_by.is_empty() {
                "?"
            } else {
                &served_by
            },
            text.chars().take(200).collect::<String>()
        )));
    }
    let ttft = sse.first.map_or(e2e, |t| t.duration_since(start));
    let answer = Answer {
        served_by,
        ttft,
        e2e,
        prompt_tokens: sse.prompt_tokens,
        cached_tokens: sse.cached_tokens,
        text: sse.text,
    };
    Ok((answer, !head.close))
}

/// The value of header `name` in a response head.
fn header_value(head: &[u8], name: &str) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).ok()?;
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).into_owned())
}

/// An SSE body read as it arrives: the first token's time, the text and
/// the usage.
#[derive(Debug, Default)]
struct Sse {
    /// Bytes of an event not yet complete (the whole body when not SSE).
    pending: Vec<u8>,
    first: Option<Instant>,
    text: String,
    prompt_tokens: u64,
    cached_tokens: u64,
}

impl Sse {
    fn feed(&mut self, data: &[u8], now: Instant) {
        self.pending.extend_from_slice(data);
        while let Some(end) = memchr::memmem::find(&self.pending, b"\n\n") {
            let event = self.pending.drain(..end + 2).collect::<Vec<_>>();
            for line in event.split(|&b| b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data: ") {
                    self.event(data, now);
                }
            }
        }
    }

    fn event(&mut self, data: &[u8], now: Instant) {
        if data == b"[DONE]" {
            return;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let choice = &v["choices"][0];
        let piece = choice["text"]
            .as_str()
            .or_else(|| choice["delta"]["content"].as_str())
            .unwrap_or("");
        if !piece.is_empty() {
            self.first.get_or_insert(now);
            self.text.push_str(piece);
        }
        let usage = &v["usage"];
        if let Some(prompt) = usage["prompt_tokens"].as_u64() {
            self.prompt_tokens = prompt;
            self.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two replicas' `/metrics`, as router-daemon writes them.
    fn replica(decided: u64, ttft_sum: f64, ttft_count: u64) -> String {
        format!(
            "# HELP router_backend_time_to_first_token_seconds Time from a request written.\n\
             # TYPE router_backend_time_to_first_token_seconds histogram\n\
             router_backend_time_to_first_token_seconds_sum{{backend=\"http://a\"}} {ttft_sum}\n\
             router_backend_time_to_first_token_seconds_count{{backend=\"http://a\"}} {ttft_count}\n\
             router_backend_time_to_first_token_seconds_bucket{{le=\"0.001\",backend=\"http://a\"}} 7\n\
             router_backend_time_to_first_token_seconds_sum{{backend=\"http://b\"}} 0.5\n\
             router_backend_time_to_first_token_seconds_count{{backend=\"http://b\"}} 5\n\
             router_route_decisions_total{{reason=\"placed\"}} {decided}\n\
             router_route_decisions_total{{reason=\"prefix-match\"}} 4\n"
        )
    }

    #[test]
    fn a_scrape_sums_replicas_and_a_run_counts_what_changed() {
        let mut before = Scraped::default();
        before.add(&replica(2, 1.0, 10));
        before.add(&replica(1, 0.0, 0));
        assert_eq!(before.ttft_count, 20);
        assert_eq!(before.ttft_sum_s, 2.0);
        let mut after = Scraped::default();
        after.add(&replica(5, 3.0, 20));
        after.add(&replica(1, 0.0, 0));
        // 10 more responses took 2 s more: 200 ms each; the buckets are not
        // counted as responses.
        assert_eq!(
            after.mean_ttft_since(&before),
            Some(Duration::from_millis(200))
        );
        assert_eq!(after.decisions_since(&before), vec![("placed".into(), 3)]);
        assert_eq!(after.mean_ttft_since(&after), None);
        assert_eq!(Scraped::default().mean_ttft_since(&before), None);
    }

    #[test]
    fn sse_events_split_anywhere_give_the_same_answer() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"the\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\" cache\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":40,\"prompt_tokens_details\":{\"cached_tokens\":32}}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        let now = Instant::now();
        for cut in 0..body.len() {
            let mut sse = Sse::default();
            sse.feed(&body[..cut], now);
            sse.feed(&body[cut..], now);
            assert_eq!(sse.text, "the cache");
            assert_eq!((sse.prompt_tokens, sse.cached_tokens), (40, 32));
            assert!(sse.first.is_some());
        }
    }
}
