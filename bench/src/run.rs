//! `router-bench dataplane`: starts the backend, nginx and one router per
//! dataplane, runs the three cases against each of them and against the
//! backend directly, and writes the report.
//!
//! Everything listens on 127.0.0.1. All systems are started once and stay
//! up for the whole run; the cases run one after another, and within a
//! case the systems take turns (repetitions interleave the systems), so
//! slow drift of the machine's load spreads over all of them.
use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    client::{self, Errors, RequestLoad, StreamLoad},
    nginx,
    procfs::{self, HostCpu, HostCpuDelta},
    procs::{Proc, router_env},
    report,
};

/// A router dataplane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Dataplane {
    /// The sockmap eBPF program redirects response bytes in the kernel.
    Sockmap,
    /// The sk_msg program redirects response bytes in the backend's own
    /// send (the bench backend runs on this host, as a co-located vLLM).
    SockmapSend,
    /// splice(2) through a pipe.
    Splice,
    /// read/write through the daemon.
    Userspace,
}

impl Dataplane {
    /// The `--dataplane` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Dataplane::Sockmap => "sockmap",
            Dataplane::SockmapSend => "sockmap-send",
            Dataplane::Splice => "splice",
            Dataplane::Userspace => "userspace",
        }
    }

    /// Whether the dataplane loads a kernel program (needs root).
    pub fn in_kernel(self) -> bool {
        matches!(self, Dataplane::Sockmap | Dataplane::SockmapSend)
    }
}

/// A case of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Case {
    /// Small non-streaming requests.
    A,
    /// Concurrent SSE streams.
    B,
    /// One large response.
    C,
}

/// Options of `router-bench dataplane`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The router-daemon binary (default: next to this executable).
    #[arg(long, value_name = "PATH")]
    router_bin: Option<PathBuf>,
    /// The nginx binary (default: `nginx` on PATH, else /usr/sbin/nginx).
    #[arg(long, value_name = "PATH")]
    nginx_bin: Option<PathBuf>,
    /// Leave nginx out.
    #[arg(long)]
    no_nginx: bool,
    /// Dataplanes to run (sockmap and sockmap-send are skipped when not
    /// root).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sockmap,sockmap-send,splice,userspace"
    )]
    dataplanes: Vec<Dataplane>,
    /// Cases to run.
    #[arg(long, value_delimiter = ',', default_value = "a,b,c")]
    cases: Vec<Case>,
    /// About one minute in all: shorter windows, fewer transfers.
    #[arg(long)]
    quick: bool,
    /// Measured windows per row of cases (a) and (b), the systems taking
    /// turns; rows report the median [default: 5, quick 1]. With 3, case
    /// (a)'s ratios moved by up to 15% from run to run.
    #[arg(long, value_name = "N")]
    repeat: Option<usize>,
    /// Case (a): connection counts.
    #[arg(long, value_delimiter = ',', value_name = "C,C")]
    levels: Option<Vec<usize>>,
    /// Case (a): seconds of one measured window [default: 3, quick 2].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Case (a): warm-up seconds before the first window of each row
    /// [default: 1, quick 0.5].
    #[arg(long, value_name = "SECS")]
    warmup: Option<f64>,
    /// Case (b): concurrent SSE streams.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Case (b): events per second per stream.
    #[arg(long, value_name = "HZ", default_value_t = 50.0)]
    chunk_rate: f64,
    /// Case (b): seconds of the measured window, once all streams run
    /// [default: 4, quick 2].
    #[arg(long, value_name = "SECS")]
    stream_window: Option<f64>,
    /// Case (c): the response size in MB (10^6 bytes).
    #[arg(long, value_name = "MB", default_value_t = 100)]
    bulk_mb: u64,
    /// Case (c): measured transfers per system; the throughput is their
    /// median [default: 5, quick 3].
    #[arg(long, value_name = "N")]
    bulk_reps: Option<usize>,
    /// The run listens on 127.0.0.1, ports base+1 to base+7.
    #[arg(long, default_value_t = 19100)]
    base_port: u16,
    /// nginx's `worker_processes`.
    #[arg(long, default_value = "auto")]
    nginx_workers: String,
    /// Tokio worker threads of the load generator and of the backend
    /// (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Where the report goes.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out_dir: PathBuf,
    /// Keep the temporary directory (nginx config, logs) after a clean run.
    #[arg(long)]
    keep_tmp: bool,
    /// The command line to print in the report (set by `cargo xtask`).
    #[arg(long, hide = true)]
    invoked_as: Option<String>,
}

/// Everything the run was asked to do, with defaults resolved.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Cases to run.
    pub cases: Vec<Case>,
    /// Measured windows per row of (a) and (b).
    pub repeat: usize,
    /// (a): connection counts.
    pub levels: Vec<usize>,
    /// (a): warm-up.
    pub warmup: Duration,
    /// (a): window.
    pub window: Duration,
    /// (b): streams.
    pub streams: usize,
    /// (b): events per second per stream.
    pub chunk_rate: f64,
    /// (b): streams start evenly over this long.
    pub ramp: Duration,
    /// (b): wait after the ramp before measuring.
    pub settle: Duration,
    /// (b): window.
    pub stream_window: Duration,
    /// (c): response bytes.
    pub bulk_bytes: u64,
    /// (c): measured transfers per system.
    pub bulk_reps: usize,
    /// nginx's worker_processes.
    pub nginx_workers: String,
    /// The command line for the report.
    pub command: String,
}

impl Plan {
    fn new(args: &Args) -> Result<Self> {
        let quick = args.quick;
        let secs = |v: Option<f64>, normal: f64, fast: f64| -> Result<Duration> {
            let s = v.unwrap_or(if quick { fast } else { normal });
            if !(0.0..=3600.0).contains(&s) {
                bail!("durations must be between 0 and 3600 seconds, not {s}");
            }
            Ok(Duration::from_secs_f64(s))
        };
        let levels = args.levels.clone().unwrap_or_else(|| vec![32, 256]);
        if levels.is_empty() || levels.iter().any(|&c| c == 0 || c > 4096) {
            bail!("--levels: between 1 and 4096 connections each");
        }
        if args.streams == 0 || args.streams > 5000 {
            bail!("--streams: between 1 and 5000");
        }
        if !(1.0..=1000.0).contains(&args.chunk_rate) {
            bail!("--chunk-rate: between 1 and 1000 events per second");
        }
        if args.bulk_mb == 0 || args.bulk_mb > 10_000 {
            bail!("--bulk-mb: between 1 and 10000");
        }
        let repeat = args.repeat.unwrap_or(if quick { 1 } else { 5 });
        if !(1..=20).contains(&repeat) {
            bail!("--repeat: between 1 and 20");
        }
        let bulk_reps = args.bulk_reps.unwrap_or(if quick { 3 } else { 5 });
        if !(1..=100).contains(&bulk_reps) {
            bail!("--bulk-reps: between 1 and 100");
        }
        let command = args
            .invoked_as
            .clone()
            .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
        Ok(Self {
            cases: args.cases.clone(),
            repeat,
            levels,
            warmup: secs(args.warmup, 1.0, 0.5)?,
            window: secs(args.duration, 3.0, 2.0)?,
            streams: args.streams,
            chunk_rate: args.chunk_rate,
            ramp: Duration::from_secs(1),
            settle: Duration::from_secs(1),
            stream_window: secs(args.stream_window, 4.0, 2.0)?,
            bulk_bytes: args.bulk_mb * 1_000_000,
            bulk_reps,
            nginx_workers: args.nginx_workers.clone(),
            command,
        })
    }

    /// The interval between a stream's events.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.chunk_rate)
    }

    /// How long one stream of case (b) lasts: past the end of the window by
    /// a second, for the last-started stream too.
    fn stream_life(&self) -> Duration {
        self.ramp + self.settle + self.stream_window + Duration::from_secs(1)
    }

    /// Events per stream.
    pub fn stream_events(&self) -> u64 {
        (self.stream_life().as_secs_f64() * self.chunk_rate).ceil() as u64
    }
}

/// What a system is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The backend itself.
    Direct,
    /// nginx (with its default response buffering in case c).
    Nginx,
    /// nginx with `proxy_buffering off` (case c only; cases a and b use
    /// [`Kind::Nginx`]'s listeners).
    NginxUnbuffered,
    /// router-daemon with a dataplane.
    Router(Dataplane),
}

impl Kind {
    /// The name in the report.
    pub fn label(self) -> String {
        match self {
            Kind::Direct => "direct".into(),
            Kind::Nginx => "nginx".into(),
            Kind::NginxUnbuffered => "nginx unbuffered".into(),
            Kind::Router(dp) => format!("router {}", dp.as_str()),
        }
    }
}

/// A system under test, ready to take load.
#[derive(Clone, Debug)]
struct System {
    kind: Kind,
    /// Where case (a) goes.
    addr: SocketAddr,
    /// Where cases (b) and (c) go.
    stream_addr: SocketAddr,
    /// The proxy's process (tree), for its CPU time.
    pid: Option<u32>,
}

/// CPU counters at one instant.
#[derive(Clone, Debug)]
struct Snapshot {
    at: Instant,
    host: HostCpu,
    proxy_ns: u64,
    backend_ns: u64,
    loadgen_ns: u64,
    kernel_ns: u64,
    others: HashMap<u32, u64>,
}

impl Snapshot {
    /// `ours`: every process of the run (this one, the backend, the
    /// proxies), left out of [`Cpu::others_ns`].
    fn take(proxy: Option<u32>, backend: u32, ours: &[u32]) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            host: HostCpu::now()?,
            proxy_ns: proxy.map_or(0, procfs::tree_cpu_ns),
            backend_ns: procfs::tree_cpu_ns(backend),
            loadgen_ns: procfs::process_cpu_ns(std::process::id()),
            kernel_ns: procfs::tree_cpu_ns(procfs::KTHREADD),
            others: procfs::others_cpu(ours),
        })
    }
}

/// CPU used over a window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    /// Wall-clock length of the window.
    pub wall: Duration,
    /// The whole machine.
    pub host: HostCpuDelta,
    /// The proxy process tree (0 for direct).
    pub proxy_ns: u64,
    /// The backend process.
    pub backend_ns: u64,
    /// This process (the load generator).
    pub loadgen_ns: u64,
    /// Kernel threads (kworkers, ksoftirqd, ...): work the kernel deferred,
    /// such as sockmap's redirect backlog.
    pub kernel_ns: u64,
    /// Everything else in user space: other users of the machine.
    pub others_ns: u64,
}

impl Cpu {
    fn between(a: &Snapshot, b: &Snapshot) -> Self {
        Self {
            wall: b.at.saturating_duration_since(a.at),
            host: b.host.since(a.host),
            proxy_ns: b.proxy_ns.saturating_sub(a.proxy_ns),
            backend_ns: b.backend_ns.saturating_sub(a.backend_ns),
            loadgen_ns: b.loadgen_ns.saturating_sub(a.loadgen_ns),
            kernel_ns: b.kernel_ns.saturating_sub(a.kernel_ns),
            others_ns: procfs::others_since(&a.others, &b.others),
        }
    }

    fn add(&mut self, other: &Cpu) {
        self.wall += other.wall;
        self.host.add(other.host);
        self.proxy_ns += other.proxy_ns;
        self.backend_ns += other.backend_ns;
        self.loadgen_ns += other.loadgen_ns;
        self.kernel_ns += other.kernel_ns;
        self.others_ns += other.others_ns;
    }

    /// The system-wide busy time less other users' processes, in seconds:
    /// the benchmark's processes and all kernel work, softirq and kernel
    /// threads included (also work the kernel does on an otherwise idle
    /// CPU, which no process is charged for).
    pub fn bench_secs(&self) -> f64 {
        (self.host.busy_secs() - self.others_ns as f64 / 1e9).max(0.0)
    }

    /// Busy CPU time of other users' processes, as a share of all CPUs'
    /// time.
    pub fn other_share(&self) -> f64 {
        let total = self.host.total as f64 / procfs::clock_ticks() as f64;
        if total <= 0.0 {
            return 0.0;
        }
        (self.others_ns as f64 / 1e9 / total).min(1.0)
    }
}

/// One measured window of case (a).
#[derive(Clone, Debug)]
pub struct WindowA {
    /// Complete responses per second.
    pub rps: f64,
    /// Complete responses.
    pub ok: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// CPU over the window.
    pub cpu: Cpu,
    /// Failures.
    pub errors: Errors,
    /// Connects that needed a SYN retransmission (≥ 0.9 s).
    pub slow_connects: u64,
}

/// A row of case (a): one system, one client connection mode, one level.
#[derive(Clone, Debug)]
pub struct RowA {
    /// The system.
    pub kind: Kind,
    /// The load generator keeps connections alive.
    pub keep_alive: bool,
    /// Concurrent connections.
    pub conns: usize,
    /// The measured windows.
    pub windows: Vec<WindowA>,
    /// Share of completions per backend, over warm-up and windows.
    pub split: String,
    /// Why the row has no numbers, if it has none.
    pub failed: Option<String>,
}

/// One run of case (b) on one system.
#[derive(Clone, Debug)]
pub struct WindowB {
    /// Events received in the window per second.
    pub events_per_sec: f64,
    /// Events received in the window.
    pub events: u64,
    /// Event latency percentiles, µs: p50, p99, p99.9.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Streams that ended complete.
    pub complete: u64,
    /// Failed streams.
    pub errors: Errors,
    /// CPU over the window.
    pub cpu: Cpu,
}

impl WindowB {
    /// System-wide CPU per event, µs.
    pub fn host_us_per_event(&self) -> f64 {
        per(self.cpu.host.busy_secs() * 1e6, self.events)
    }

    /// CPU of the benchmark's processes and kernel threads per event, µs.
    pub fn bench_us_per_event(&self) -> f64 {
        per(self.cpu.bench_secs() * 1e6, self.events)
    }

    /// Proxy CPU per event, µs.
    pub fn proxy_us_per_event(&self) -> f64 {
        per(self.cpu.proxy_ns as f64 / 1e3, self.events)
    }
}

/// A row of case (b).
#[derive(Clone, Debug)]
pub struct RowB {
    /// The system.
    pub kind: Kind,
    /// The runs.
    pub windows: Vec<WindowB>,
    /// Why the row has no numbers, if it has none.
    pub failed: Option<String>,
}

/// A row of case (c).
#[derive(Clone, Debug)]
pub struct RowC {
    /// The system.
    pub kind: Kind,
    /// Throughput of each transfer, MB/s (10^6 bytes).
    pub mb_per_sec: Vec<f64>,
    /// Bytes received over the measured transfers.
    pub bytes: u64,
    /// CPU summed over the measured transfers.
    pub cpu: Cpu,
    /// Failed transfers.
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
}

/// Everything a run measured, for the report.
#[derive(Debug)]
pub struct Results {
    /// What was asked.
    pub plan: Plan,
    /// Case (a) rows.
    pub a: Vec<RowA>,
    /// Case (b) rows.
    pub b: Vec<RowB>,
    /// Case (c) rows.
    pub c: Vec<RowC>,
    /// Facts about the machine and the binaries.
    pub env: Vec<String>,
    /// Systems skipped or failed, and other remarks.
    pub notes: Vec<String>,
    /// Each system's command line.
    pub commands: Vec<String>,
    /// nginx's configuration file, when nginx ran.
    pub nginx_config: Option<String>,
    /// Total wall time.
    pub elapsed: Duration,
}

/// `x / n`, or 0 when `n` is 0.
pub fn per(x: f64, n: u64) -> f64 {
    if n == 0 { 0.0 } else { x / n as f64 }
}

/// Runs `router-bench dataplane`.
pub fn run(args: Args) -> Result<()> {
    let plan = Plan::new(&args)?;
    let nofile = procfs::raise_nofile()?;
    let need = (plan.streams as u64) * 3 + 512;
    if nofile < need && plan.cases.contains(&Case::B) {
        eprintln!(
            "router-bench: warning: the open-file limit is {nofile}; {} streams need about {need}",
            plan.streams
        );
    }
    let threads = args.threads;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = builder.build().context("building the tokio runtime")?;

    let stamp = timestamp();
    let tmp = std::env::temp_dir().join(format!("router-bench-{stamp}-{}", std::process::id()));
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let started = Instant::now();
    let mut bench = Bench::new(&args, plan, nofile, &tmp)?;
    // Ctrl-C or SIGTERM ends the run early, and the processes are stopped
    // cleanly (nginx's workers outlive a master that is killed).
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")?;
        tokio::select! {
            outcome = bench.run_cases() => outcome,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow::anyhow!("terminated")),
        }
    });
    let metrics = runtime.block_on(bench.router_metrics());
    bench.notes.extend(metrics);
    bench.stop_all();
    if outcome.is_err() {
        eprintln!(
            "router-bench: logs and nginx config kept in {}",
            tmp.display()
        );
    }
    outcome?;

    let results = Results {
        plan: bench.plan.clone(),
        a: bench.a,
        b: bench.b,
        c: bench.c,
        env: bench.env,
        notes: bench.notes,
        commands: bench.commands,
        nginx_config: bench.nginx_config.take(),
        elapsed: started.elapsed(),
    };
    let text = report::render(&results);
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let out = args.out_dir.join(format!("dataplane-{stamp}.md"));
    fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
    println!("{text}");
    eprintln!("router-bench: wrote {}", out.display());
    if args.keep_tmp || results_failed(&results) {
        eprintln!(
            "router-bench: logs and nginx config kept in {}",
            tmp.display()
        );
    } else {
        let _ = fs::remove_dir_all(&tmp);
    }
    Ok(())
}

fn results_failed(results: &Results) -> bool {
    results.a.iter().any(|r| r.failed.is_some())
        || results.b.iter().any(|r| r.failed.is_some())
        || results.c.iter().any(|r| r.errors > 0)
}

/// The run's state: its processes and what it measured so far.
struct Bench {
    plan: Plan,
    backend: Proc,
    backends: Vec<SocketAddr>,
    /// nginx and the routers, by kind.
    proxies: Vec<(Kind, Proc)>,
    systems: Vec<System>,
    a: Vec<RowA>,
    b: Vec<RowB>,
    c: Vec<RowC>,
    env: Vec<String>,
    notes: Vec<String>,
    commands: Vec<String>,
    nginx_config: Option<String>,
}

impl Bench {
    /// Starts the backend, nginx and the routers.
    fn new(args: &Args, plan: Plan, nofile: u64, tmp: &Path) -> Result<Self> {
        let port = |offset: u16| -> Result<SocketAddr> {
            let port = args
                .base_port
                .checked_add(offset)
                .context("--base-port is too high")?;
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            // Bind-probe: another process on the port would be measured
            // instead of ours.
            TcpListener::bind(addr).with_context(|| {
                format!("{addr} is in use; stop what listens there or pass --base-port")
            })?;
            Ok(addr)
        };
        let backends = vec![port(1)?, port(2)?];
        let nginx_addr = port(3)?;
        let nginx_stream_addr = port(4)?;
        let router_addr = |dp: Dataplane| {
            port(
                5 + match dp {
                    Dataplane::Sockmap => 0,
                    Dataplane::Splice => 1,
                    Dataplane::Userspace => 2,
                    Dataplane::SockmapSend => 3,
                },
            )
        };

        let me = std::env::current_exe().context("locating router-bench")?;
        let mut env = vec![
            format!(
                "{} · {} CPUs · kernel {} · {}",
                utc_string(),
                procfs::cpus(),
                procfs::kernel_release(),
                procfs::cpu_model()
            ),
            format!(
                "before the run: load average {}, {:.0}% of all CPUs busy over 1 s (other users \
                 of the machine)",
                procfs::load_average(),
                idle_busy_share() * 100.0
            ),
        ];
        let mut notes = Vec::new();
        let mut commands = Vec::new();
        let mut nginx_config = None;

        // The backend.
        let mut cmd = Command::new(&me);
        cmd.arg("serve");
        for addr in &backends {
            cmd.arg("--listen").arg(addr.to_string());
        }
        if args.threads > 0 {
            cmd.arg("--threads").arg(args.threads.to_string());
        }
        commands.push(format!("backend: `{}`", show(&cmd)));
        let mut backend = Proc::spawn("backend", cmd, &tmp.join("backend.log"))?;
        for addr in &backends {
            wait_listening(&mut backend, *addr)?;
        }

        let mut systems = vec![System {
            kind: Kind::Direct,
            addr: backends[0],
            stream_addr: backends[0],
            pid: None,
        }];
        let mut proxies = Vec::new();

        // nginx.
        let nginx_bin = if args.no_nginx {
            notes.push("nginx: left out (--no-nginx)".into());
            None
        } else if let Some(bin) = args.nginx_bin.clone().or_else(nginx::find) {
            Some(bin)
        } else {
            notes.push(
                "nginx: not found (install it: `apt-get install -y nginx`); its rows are missing"
                    .into(),
            );
            None
        };
        if let Some(bin) = nginx_bin {
            env.push(format!(
                "nginx {} ({}), worker_processes {} ({} workers here)",
                nginx::version(&bin),
                bin.display(),
                plan.nginx_workers,
                if plan.nginx_workers == "auto" {
                    procfs::cpus().to_string()
                } else {
                    plan.nginx_workers.clone()
                }
            ));
            let layout = nginx::Layout {
                dir: tmp,
                buffered: nginx_addr,
                streaming: nginx_stream_addr,
                backends: &backends,
                workers: &plan.nginx_workers,
                nofile,
            };
            let started = nginx::prepare(&bin, &layout).and_then(|(cmd, config)| {
                commands.push(format!(
                    "nginx: `{}` (its configuration is below)",
                    show(&cmd)
                ));
                nginx_config = fs::read_to_string(&config).ok();
                let mut proc = Proc::spawn("nginx", cmd, &tmp.join("nginx.log"))?;
                wait_ready(&mut proc, nginx_addr)?;
                wait_ready(&mut proc, nginx_stream_addr)?;
                Ok(proc)
            });
            match started {
                Ok(proc) => {
                    systems.push(System {
                        kind: Kind::Nginx,
                        addr: nginx_addr,
                        stream_addr: nginx_stream_addr,
                        pid: Some(proc.pid()),
                    });
                    proxies.push((Kind::Nginx, proc));
                }
                Err(err) => notes.push(format!("nginx: FAILED to start: {err:#}")),
            }
        }

        // The routers.
        let router_bin = match &args.router_bin {
            Some(bin) => bin.clone(),
            None => me
                .parent()
                .map(|dir| dir.join("router-daemon"))
                .context("router-bench has no parent directory")?,
        };
        if router_bin.is_file() {
            env.push(format!(
                "router-daemon: {} (built {}; work tree {})",
                router_bin.display(),
                modified(&router_bin),
                git_describe()
            ));
        }
        let mut dataplanes = args.dataplanes.clone();
        dataplanes.sort();
        dataplanes.dedup();
        for dp in dataplanes {
            if dp.in_kernel() && !procfs::is_root() {
                notes.push(format!(
                    "router {}: skipped, the dataplane needs root",
                    dp.as_str()
                ));
                continue;
            }
            let addr = router_addr(dp)?;
            let mut cmd = Command::new(&router_bin);
            cmd.arg("--listen")
                .arg(addr.to_string())
                .arg("--dataplane")
                .arg(dp.as_str());
            for backend in &backends {
                cmd.arg("--backend").arg(format!("http://{backend}"));
            }
            router_env(&mut cmd);
            commands.push(format!(
                "router {}: `RUST_LOG=warn {}`",
                dp.as_str(),
                show(&cmd)
            ));
            let kind = Kind::Router(dp);
            let started = Proc::spawn(
                &kind.label(),
                cmd,
                &tmp.join(format!("router-{}.log", dp.as_str())),
            )
            .and_then(|mut proc| {
                wait_ready(&mut proc, addr)?;
                Ok(proc)
            });
            match started {
                Ok(proc) => {
                    systems.push(System {
                        kind,
                        addr,
                        stream_addr: addr,
                        pid: Some(proc.pid()),
                    });
                    proxies.push((kind, proc));
                }
                Err(err) => notes.push(format!("router {}: FAILED to start: {err:#}", dp.as_str())),
            }
        }
        let backlogs: Vec<String> = std::iter::once(("backend", backends[0]))
            .chain(
                systems
                    .iter()
                    .filter(|sys| sys.kind != Kind::Direct)
                    .map(|sys| {
                        (
                            match sys.kind {
                                Kind::Nginx | Kind::NginxUnbuffered => "nginx",
                                Kind::Router(_) => "router-daemon",
                                Kind::Direct => "backend",
                            },
                            sys.addr,
                        )
                    }),
            )
            .filter_map(|(name, addr)| listen_backlog(addr).map(|b| format!("{name} {b}")))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !backlogs.is_empty() {
            env.push(format!(
                "listen backlog (accept queue, from `ss`): {}",
                backlogs.join(", ")
            ));
        }
        Ok(Self {
            plan,
            backend,
            backends,
            proxies,
            systems,
            a: Vec::new(),
            b: Vec::new(),
            c: Vec::new(),
            env,
            notes,
            commands,
            nginx_config,
        })
    }

    async fn run_cases(&mut self) -> Result<()> {
        let cases = self.plan.cases.clone();
        for case in cases {
            match case {
                Case::A => self.case_a().await?,
                Case::B => self.case_b().await?,
                Case::C => self.case_c().await?,
            }
        }
        Ok(())
    }

    /// Every process of the run: this one, the backend, the proxies.
    fn ours(&self) -> Vec<u32> {
        [std::process::id(), self.backend.pid()]
            .into_iter()
            .chain(self.proxies.iter().map(|(_, proc)| proc.pid()))
            .collect()
    }

    /// Whether a proxy died; records why once.
    fn dead(&mut self, kind: Kind) -> Option<String> {
        let kind = if kind == Kind::NginxUnbuffered {
            Kind::Nginx
        } else {
            kind
        };
        let (_, proc) = self.proxies.iter_mut().find(|(k, _)| *k == kind)?;
        let status = proc.exited()?;
        Some(format!(
            "{} exited ({status}): {}",
            proc.name,
            proc.log_tail(3)
        ))
    }

    /// Case (a): every system, client connection mode and level.
    async fn case_a(&mut self) -> Result<()> {
        let plan = self.plan.clone();
        let mut variants: Vec<(System, bool)> = Vec::new();
        for system in &self.systems {
            // Every system keeps client connections alive (the router routes
            // each request of a kept-alive connection on its own), and each
            // is also measured with a new connection per request.
            variants.push((system.clone(), true));
            variants.push((system.clone(), false));
        }
        for &conns in &plan.levels {
            let first = self.a.len();
            for (system, keep_alive) in &variants {
                self.a.push(RowA {
                    kind: system.kind,
                    keep_alive: *keep_alive,
                    conns,
                    windows: Vec::new(),
                    split: "-".into(),
                    failed: None,
                });
            }
            // Completions per backend during each row's own windows.
            let mut served: Vec<Vec<u64>> = vec![vec![0; self.backends.len()]; variants.len()];
            for rep in 0..plan.repeat {
                for (i, (system, keep_alive)) in variants.iter().enumerate() {
                    let row = first + i;
                    if self.a[row].failed.is_some() {
                        continue;
                    }
                    if let Some(why) = self.dead(system.kind) {
                        self.a[row].failed = Some(why);
                        continue;
                    }
                    eprintln!(
                        "router-bench: (a) {} {} c={conns}: {}window {}/{}",
                        system.kind.label(),
                        if *keep_alive {
                            "keep-alive"
                        } else {
                            "new-conn"
                        },
                        if rep == 0 { "warm-up, " } else { "" },
                        rep + 1,
                        plan.repeat
                    );
                    let before = self.backend_counts().await;
                    // The systems take turns: each window after the first
                    // gets a short warm-up of its own.
                    let warmup = if rep == 0 {
                        plan.warmup
                    } else {
                        plan.warmup.min(Duration::from_millis(500))
                    };
                    let window = self
                        .window_a(system, *keep_alive, conns, warmup, plan.window)
                        .await?;
                    eprintln!(
                        "router-bench:     {:.0} req/s, p50 {} ms, p99 {} ms, errors {}",
                        window.rps,
                        report::ms(window.p50_us),
                        report::ms(window.p99_us),
                        window.errors.describe()
                    );
                    if window.ok == 0 {
                        let why = self.dead(system.kind).unwrap_or_else(|| {
                            format!("no complete response (errors {})", window.errors.describe())
                        });
                        self.a[row].failed = Some(why);
                    }
                    self.a[row].windows.push(window);
                    if let (Some(before), Some(after)) = (before, self.backend_counts().await) {
                        for ((total, b), a) in served[i].iter_mut().zip(&before).zip(&after) {
                            *total += a.saturating_sub(*b);
                        }
                    }
                }
            }
            for (i, counts) in served.iter().enumerate() {
                self.a[first + i].split = split(&vec![0; counts.len()], counts);
            }
        }
        Ok(())
    }

    /// One window of case (a), after `warmup`.
    async fn window_a(
        &self,
        system: &System,
        keep_alive: bool,
        conns: usize,
        warmup: Duration,
        window: Duration,
    ) -> Result<WindowA> {
        // The load starts now; the window opens after the warm-up.
        let window_start = Instant::now() + warmup + Duration::from_millis(50);
        let window_end = window_start + window;
        let load = RequestLoad {
            addr: system.addr,
            keep_alive,
            connections: conns,
            window_start,
            window_end,
            request_timeout: Duration::from_secs(5),
        };
        let sampler = sample_at(
            system.pid,
            self.backend.pid(),
            self.ours(),
            window_start,
            window_end,
        );
        let result = client::requests(load).await;
        let cpu = join_sampler(sampler)?;
        let secs = (window_end - window_start).as_secs_f64();
        Ok(WindowA {
            rps: result.ok as f64 / secs,
            ok: result.ok,
            p50_us: result.latency.value_at_quantile(0.50),
            p99_us: result.latency.value_at_quantile(0.99),
            cpu,
            errors: result.errors,
            slow_connects: result.slow_connects,
        })
    }

    /// Case (b): every system but the keep-alive variants (each stream has
    /// its own connection everywhere).
    async fn case_b(&mut self) -> Result<()> {
        let plan = self.plan.clone();
        let systems = self.systems.clone();
        let first = self.b.len();
        for system in &systems {
            self.b.push(RowB {
                kind: system.kind,
                windows: Vec::new(),
                failed: None,
            });
        }
        for rep in 0..plan.repeat {
            for (i, system) in systems.iter().enumerate() {
                let row = first + i;
                if self.b[row].failed.is_some() {
                    continue;
                }
                if let Some(why) = self.dead(system.kind) {
                    self.b[row].failed = Some(why);
                    continue;
                }
                eprintln!(
                    "router-bench: (b) {}: {} streams x {} events/s, window {}/{}",
                    system.kind.label(),
                    plan.streams,
                    plan.chunk_rate,
                    rep + 1,
                    plan.repeat
                );
                let window = self.window_b(system, &plan).await?;
                eprintln!(
                    "router-bench:     {:.0} events/s, p50 {} ms, p99 {} ms, {:.1} µs CPU/event, {} of {} streams complete, errors {}",
                    window.events_per_sec,
                    report::ms(window.p50_us),
                    report::ms(window.p99_us),
                    window.host_us_per_event(),
                    window.complete,
                    plan.streams,
                    window.errors.describe()
                );
                if window.events == 0 {
                    let why = self.dead(system.kind).unwrap_or_else(|| {
                        format!("no event received (errors {})", window.errors.describe())
                    });
                    self.b[row].failed = Some(why);
                }
                self.b[row].windows.push(window);
                // Let the closed streams' sockets settle between systems.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok(())
    }

    async fn window_b(&self, system: &System, plan: &Plan) -> Result<WindowB> {
        let start = Instant::now();
        let start_ns = procfs::mono_ns();
        let window_start = start + plan.ramp + plan.settle;
        let window_end = window_start + plan.stream_window;
        let offset = |at: Instant| start_ns + u64::try_from((at - start).as_nanos()).unwrap_or(0);
        let load = StreamLoad {
            addr: system.stream_addr,
            streams: plan.streams,
            events: plan.stream_events(),
            interval: plan.interval(),
            ramp: plan.ramp,
            window_start_ns: offset(window_start),
            window_end_ns: offset(window_end),
            stream_timeout: plan.stream_life() + plan.ramp + Duration::from_secs(15),
        };
        let sampler = sample_at(
            system.pid,
            self.backend.pid(),
            self.ours(),
            window_start,
            window_end,
        );
        let result = client::streams(load).await;
        let cpu = join_sampler(sampler)?;
        let secs = plan.stream_window.as_secs_f64();
        Ok(WindowB {
            events_per_sec: result.events_in_window as f64 / secs,
            events: result.events_in_window,
            p50_us: result.latency.value_at_quantile(0.50),
            p99_us: result.latency.value_at_quantile(0.99),
            p999_us: result.latency.value_at_quantile(0.999),
            complete: result.complete,
            errors: result.errors,
            cpu,
        })
    }

    /// Case (c): one warm-up transfer per system, then the measured ones,
    /// the systems taking turns.
    async fn case_c(&mut self) -> Result<()> {
        let plan = self.plan.clone();
        // nginx twice: its default buffered listener and the unbuffered one.
        let mut systems: Vec<(Kind, SocketAddr, Option<u32>)> = Vec::new();
        for system in &self.systems {
            if system.kind == Kind::Nginx {
                systems.push((Kind::Nginx, system.addr, system.pid));
                systems.push((Kind::NginxUnbuffered, system.stream_addr, system.pid));
            } else {
                systems.push((system.kind, system.stream_addr, system.pid));
            }
        }
        let first = self.c.len();
        for (kind, _, _) in &systems {
            self.c.push(RowC {
                kind: *kind,
                mb_per_sec: Vec::new(),
                bytes: 0,
                cpu: Cpu::default(),
                errors: 0,
                first_error: None,
            });
        }
        let limit = Duration::from_secs(60);
        eprintln!(
            "router-bench: (c) {} MB responses: 1 warm-up + {} measured per system",
            plan.bulk_bytes / 1_000_000,
            plan.bulk_reps
        );
        for rep in 0..=plan.bulk_reps {
            for (i, &(kind, addr, pid)) in systems.iter().enumerate() {
                let row = first + i;
                if self.dead(kind).is_some() {
                    continue;
                }
                let ours = self.ours();
                let before = Snapshot::take(pid, self.backend.pid(), &ours)?;
                let got = client::bulk(addr, plan.bulk_bytes, limit).await;
                let after = Snapshot::take(pid, self.backend.pid(), &ours)?;
                if rep == 0 {
                    // Warm-up: only failures count.
                    if let Err(err) = got {
                        self.c[row].errors += 1;
                        self.c[row].first_error.get_or_insert(err.to_string());
                    }
                    continue;
                }
                match got {
                    Ok(bulk) if bulk.bytes == plan.bulk_bytes => {
                        let rate = bulk.bytes as f64 / bulk.elapsed.as_secs_f64() / 1e6;
                        self.c[row].mb_per_sec.push(rate);
                        self.c[row].bytes += bulk.bytes;
                        self.c[row].cpu.add(&Cpu::between(&before, &after));
                    }
                    Ok(bulk) => {
                        self.c[row].errors += 1;
                        self.c[row]
                            .first_error
                            .get_or_insert(format!("received {} bytes", bulk.bytes));
                    }
                    Err(err) => {
                        self.c[row].errors += 1;
                        self.c[row].first_error.get_or_insert(err.to_string());
                    }
                }
            }
        }
        for row in &self.c[first..] {
            let mut sorted = row.mb_per_sec.clone();
            sorted.sort_by(f64::total_cmp);
            eprintln!(
                "router-bench:     {}: median {:.0} MB/s over {} transfers, errors {}",
                row.kind.label(),
                report::median(&sorted).unwrap_or(0.0),
                sorted.len(),
                row.errors
            );
        }
        Ok(())
    }

    /// Completions per backend so far, from the backend's own counters.
    async fn backend_counts(&self) -> Option<Vec<u64>> {
        let text = client::get_text(self.backends[0], "/bench/stats")
            .await
            .ok()?;
        let counts: Vec<u64> = text
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        (counts.len() == self.backends.len()).then_some(counts)
    }

    /// The dataplane counters of each router, as notes.
    async fn router_metrics(&self) -> Vec<String> {
        let mut notes = Vec::new();
        for system in &self.systems {
            let Kind::Router(dp) = system.kind else {
                continue;
            };
            let Ok(text) = client::get_text(system.addr, "/metrics").await else {
                notes.push(format!("router {}: /metrics did not answer", dp.as_str()));
                continue;
            };
            let wanted = [
                "router_dataplane_info",
                "router_userspace_copied_bytes_total",
                "router_splice_piped_bytes_total",
                "router_sockmap_redirected",
                "router_backend_failures_total",
                "router_errors_total",
            ];
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter(|line| wanted.iter().any(|w| line.starts_with(w)))
                .collect();
            notes.push(format!(
                "router {} /metrics at the end: `{}`",
                dp.as_str(),
                lines.join("`, `")
            ));
        }
        notes
    }

    fn stop_all(&mut self) {
        for (_, proc) in &mut self.proxies {
            proc.stop();
        }
        self.backend.stop();
    }
}

/// Takes CPU snapshots at `start` and `end` on a thread of its own, so that
/// a busy runtime does not delay them.
fn sample_at(
    proxy: Option<u32>,
    backend: u32,
    ours: Vec<u32>,
    start: Instant,
    end: Instant,
) -> thread::JoinHandle<Result<Cpu>> {
    thread::spawn(move || {
        thread::sleep(start.saturating_duration_since(Instant::now()));
        let a = Snapshot::take(proxy, backend, &ours)?;
        thread::sleep(end.saturating_duration_since(Instant::now()));
        let b = Snapshot::take(proxy, backend, &ours)?;
        Ok(Cpu::between(&a, &b))
    })
}

fn join_sampler(sampler: thread::JoinHandle<Result<Cpu>>) -> Result<Cpu> {
    sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the CPU sampler thread panicked"))?
}

/// `61/39`: each backend's share of the completions between two readings.
fn split(before: &[u64], after: &[u64]) -> String {
    let deltas: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(*b))
        .collect();
    let total: u64 = deltas.iter().sum();
    if total == 0 {
        return "-".into();
    }
    deltas
        .iter()
        .map(|d| format!("{:.0}", 100.0 * *d as f64 / total as f64))
        .collect::<Vec<_>>()
        .join("/")
}

/// Share of all CPUs busy over the next second, before anything started.
fn idle_busy_share() -> f64 {
    let Ok(before) = HostCpu::now() else {
        return 0.0;
    };
    thread::sleep(Duration::from_secs(1));
    HostCpu::now().map_or(0.0, |after| after.since(before).busy_share())
}

/// The accept-queue length a listener on `addr` was given, as `ss` shows
/// it (Send-Q of a listening socket); `None` without `ss`.
fn listen_backlog(addr: SocketAddr) -> Option<u32> {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|line| line.contains(&addr.to_string()))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Waits until something accepts connections on `addr`, or the process
/// exits, or 20 s pass.
fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = proc.exited() {
            bail!(
                "{} exited ({status}) before listening on {addr}: {}",
                proc.name,
                proc.log_tail(5)
            );
        }
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on {addr} within 20 s", proc.name);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a completion request through `addr` answers 200.
fn wait_ready(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    wait_listening(proc, addr)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building a probe runtime")?;
    loop {
        let last = match runtime.block_on(client::probe(addr)) {
            Ok(200) => return Ok(()),
            Ok(status) => format!("HTTP {status}"),
            Err(err) => err.to_string(),
        };
        if let Some(status) = proc.exited() {
            bail!("{} exited ({status}): {}", proc.name, proc.log_tail(5));
        }
        if Instant::now() > deadline {
            bail!(
                "{}: POST /v1/completions did not answer 200 within 20 s (last: {last})",
                proc.name
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// A command line for the report.
pub(crate) fn show(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let _ = write!(out, " {}", arg.to_string_lossy());
    }
    out
}

/// `git describe --always --dirty` of the current directory's repository
/// (a dirty tree means the binaries hold uncommitted changes).
pub(crate) fn git_describe() -> String {
    Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".into())
}

/// When a file was last modified, in UTC.
pub(crate) fn modified(path: &Path) -> String {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(|| "?".into(), |d| civil(d.as_secs()).0)
}

/// `2026-11-25T12:38:00Z`, now.
pub(crate) fn utc_string() -> String {
    civil(now_secs()).0
}

/// `20261125-123800`, now (UTC), for file names.
pub(crate) fn timestamp() -> String {
    civil(now_secs()).1
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Seconds since the epoch as an ISO 8601 UTC time and as a file-name stamp.
fn civil(secs: u64) -> (String, String) {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}-{h:02}{m:02}{s:02}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0).0, "1970-01-01T00:00:00Z");
        assert_eq!(civil(1_795_609_080).1, "20261125-121800");
    }

    #[test]
    fn splits() {
        assert_eq!(split(&[0, 10], &[50, 60]), "50/50");
        assert_eq!(split(&[0, 0], &[0, 0]), "-");
    }

    #[test]
    fn stream_events_cover_the_window() {
        let plan = Plan::new(&Args {
            router_bin: None,
            nginx_bin: None,
            no_nginx: true,
            dataplanes: vec![],
            cases: vec![Case::B],
            quick: false,
            repeat: None,
            levels: None,
            duration: None,
            warmup: None,
            streams: 1000,
            chunk_rate: 50.0,
            stream_window: None,
            bulk_mb: 100,
            bulk_reps: None,
            base_port: 19100,
            nginx_workers: "auto".into(),
            threads: 0,
            out_dir: PathBuf::from("x"),
            keep_tmp: false,
            invoked_as: None,
        })
        .expect("valid plan");
        // ramp 1 + settle 1 + window 4 + 1 s margin, at 50 per second
        assert_eq!(plan.stream_events(), 350);
        assert_eq!(plan.interval(), Duration::from_millis(20));
    }
}
