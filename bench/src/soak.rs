//! `router-bench soak`: many kept-alive client connections against one
//! router-daemon for a long while, to see what its memory, descriptors and
//! counts do over time.
//!
//! `--connections` clients (10,000 by default) each hold a kept-alive
//! connection and send a one-token completion now and then (most of the
//! time they are idle); `--streams` clients stream completions back to
//! back, and a share of those streams (`--abort-share`) is cut off
//! mid-way by the client. Halfway through, one of the two in-process
//! vllm-sim backends is stopped and started again on its port. Every
//! request carries its own `x-request-id`, which the simulator puts in the
//! response's `id`, so a response meant for another client is caught.
//!
//! Every `--sample-secs` the report samples the router's resident memory
//! (`VmRSS`), its open descriptors, and from `/metrics` its open client
//! connections and requests in flight; at the end (clients gone) the
//! in-flight count must be back to 0. Output: `soak-<time>.md` and a plot
//! of memory and connections over time in `--out-dir`.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use crate::{
    http::{Dechunker, Framing, parse_response},
    procfs,
    procs::{Proc, router_env},
};

/// Options of `router-bench soak`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The router-daemon binary.
    #[arg(long)]
    router_bin: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
    /// The command line to print in the report.
    #[arg(long)]
    invoked_as: Option<String>,
    /// Kept-alive client connections, mostly idle.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Clients streaming completions back to back.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Share of streams the client cuts off mid-way.
    #[arg(long, default_value_t = 0.2)]
    abort_share: f64,
    /// How long the soak runs, in seconds.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    sample_secs: u64,
    /// How often an idle client sends a request, in seconds (on average).
    #[arg(long, default_value_t = 60)]
    idle_request_secs: u64,
    /// `--dataplane` of the router.
    #[arg(long, default_value = "auto")]
    dataplane: String,
}

/// One sample of the router.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    clients: f64,
    in_flight: f64,
    /// Client sockets in the sockmap program's map (0 on other dataplanes).
    sockmap_clients: f64,
    /// Response body bytes the kernel redirected, so far.
    redirected: f64,
    /// Response body bytes the daemon copied, so far.
    copied: f64,
}

/// What the clients counted.
#[derive(Debug, Default)]
struct Counts {
    ok: AtomicU64,
    aborted: AtomicU64,
    errors: AtomicU64,
    wrong_client: AtomicU64,
    connected: AtomicU64,
}

/// Runs the soak and writes its report.
pub fn run(args: Args) -> Result<()> {
    let open_files = procfs::raise_nofile()?;
    // The clients' sockets, and the simulators' side of the router's
    // backend connections (a few hundred at most).
    let needed = u64::try_from(args.connections + 1024).unwrap_or(u64::MAX);
    if open_files < needed {
        bail!(
            "{} connections need about {needed} open files; the limit is {open_files}",
            args.connections
        );
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("runtime")?
        .block_on(soak(args))
}

async fn soak(args: Args) -> Result<()> {
    let started = chrono_now();
    let mut sims = vec![Sim::start(None).await?, Sim::start(None).await?];
    let router_addr = free_addr()?;
    let mut cmd = Command::new(&args.router_bin);
    cmd.arg("--listen").arg(router_addr.to_string());
    for sim in &sims {
        cmd.arg("--backend").arg(format!("http://{}", sim.addr));
    }
    cmd.args([
        "--dataplane",
        &args.dataplane,
        "--discovery-interval-ms",
        "1000",
    ])
    // Idle clients send a request about every `idle_request_secs`.
    .args([
        "--idle-timeout-ms",
        &(args.idle_request_secs * 3000).to_string(),
    ])
    // Room for every client and the scrapes.
    .args([
        "--max-connections",
        &(args.connections + args.streams + 1024).to_string(),
    ]);
    router_env(&mut cmd);
    let log = std::env::temp_dir().join(format!("router-soak-{}.log", std::process::id()));
    let mut router = Proc::spawn("router-daemon", cmd, &log)?;
    wait_ready(router_addr).await?;

    // The router with no client yet: what each connection adds is
    // measured from here.
    let baseline = sample(&router, router_addr, Instant::now()).await;
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    for i in 0..args.connections {
        let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
        let every = Duration::from_secs(args.idle_request_secs.max(1));
        clients.push(tokio::spawn(idle_client(
            router_addr,
            i,
            every,
            counts,
            stop,
        )));
        if i % 500 == 499 {
            // Lets the router accept at its pace.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for i in 0..args.streams {
        let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
        clients.push(tokio::spawn(streaming_client(
            router_addr,
            i,
            args.abort_share,
            counts,
            stop,
        )));
    }

    let start = Instant::now();
    let total = Duration::from_secs(args.seconds);
    let mut samples = Vec::new();
    let mut restarted = None;
    while start.elapsed() < total {
        samples.push(sample(&router, router_addr, start).await);
        if restarted.is_none() && start.elapsed() >= total / 2 {
            let port = sims[1].addr;
            sims.remove(1).stop().await;
            sims.push(Sim::start(Some(port)).await?);
            restarted = Some(start.elapsed().as_secs_f64());
        }
        if let Some(status) = router.exited() {
            bail!(
                "router-daemon exited during the soak ({status}): {}",
                router.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_secs(args.sample_secs.max(1))).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.abort();
    }
    // The clients are gone: every count must come back to zero.
    // Idle pooled backend connections close after the pool's idle timeout
    // (4 s by default): descriptors get 30 s to come back to where they
    // were before any client.
    let left = Instant::now();
    let mut end = sample(&router, router_addr, start).await;
    for _ in 0..300 {
        let settled = end.fds <= baseline.fds;
        if end.in_flight == 0.0 && end.clients <= 1.0 && settled {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        end = sample(&router, router_addr, start).await;
    }
    let settled_after = left.elapsed();
    router.stop();
    for sim in sims {
        sim.stop().await;
    }
    write_report(
        &args,
        &started,
        baseline,
        &samples,
        (end, settled_after),
        restarted,
        &counts,
    )
}

/// A kept-alive client that sends a one-token completion about every
/// `every` (jittered), checking each response is its own.
async fn idle_client(
    router: SocketAddr,
    index: usize,
    every: Duration,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let Ok(mut stream) = TcpStream::connect(router).await else {
        counts.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    counts.connected.fetch_add(1, Ordering::Relaxed);
    let mut n = 0u64;
    // Spread the first requests over one period.
    let offset = every.mul_f64((index % 997) as f64 / 997.0);
    tokio::time::sleep(offset).await;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("soak-{index}-{n}");
        match exchange(&mut stream, &completion(&id, false), None).await {
            Ok(body) if contains_id(&body, &id) => counts.ok.fetch_add(1, Ordering::Relaxed),
            Ok(_) => counts.wrong_client.fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                // The connection is spoiled: a new one takes its place.
                match TcpStream::connect(router).await {
                    Ok(fresh) => stream = fresh,
                    Err(_) => return,
                }
                0
            }
        };
        n += 1;
        let jitter = every.mul_f64(0.5 + (index as f64 * 0.618 + n as f64 * 0.382).fract());
        tokio::time::sleep(jitter).await;
    }
}

/// A client streaming completions back to back on one connection,
/// cutting a share of them off mid-way (and reconnecting).
async fn streaming_client(
    router: SocketAddr,
    index: usize,
    abort_share: f64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    let mut stream = None;
    while !stop.load(Ordering::Relaxed) {
        let conn = match stream.take() {
            Some(conn) => conn,
            None => match TcpStream::connect(router).await {
                Ok(conn) => conn,
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let mut conn = conn;
        let id = format!("stream-{index}-{n}");
        // A deterministic share of the streams is cut off after 300 bytes.
        let abort = ((n as f64 * 0.754_877_666) + index as f64 * 0.5698).fract() < abort_share;
        let limit = abort.then_some(300);
        match exchange(&mut conn, &completion(&id, true), limit).await {
            Ok(_) if abort => {
                counts.aborted.fetch_add(1, Ordering::Relaxed);
            }
            Ok(body) if contains_id(&body, &id) => {
                counts.ok.fetch_add(1, Ordering::Relaxed);
                stream = Some(conn);
            }
            Ok(_) => {
                counts.wrong_client.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        n += 1;
    }
}

/// A completion request with `id` as its `x-request-id`.
fn completion(id: &str, stream: bool) -> Vec<u8> {
    let body = serde_json::json!({
        "model": vllm_sim::config::DEFAULT_MODEL,
        "prompt": format!("Soak request {id}: what is the capital of France?"),
        "max_tokens": if stream { 64 } else { 1 },
        "stream": stream,
    })
    .to_string();
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nx-request-id: {id}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Whether a response body names `id` (the simulator's `cmpl-<id>`).
fn contains_id(body: &[u8], id: &str) -> bool {
    let wanted = format!("\"cmpl-{id}\"");
    body.windows(wanted.len()).any(|w| w == wanted.as_bytes())
}

/// Sends `request` and reads the response's body (de-chunked); with
/// `abort_after`, returns once that many bytes arrived, leaving the rest.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    abort_after: Option<usize>,
) -> Result<Vec<u8>> {
    stream.write_all(request).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let head = loop {
        if let Some(head) = parse_response(&buf)? {
            break head;
        }
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk)).await??;
        if n == 0 {
            bail!("closed before a response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    if head.status != 200 {
        bail!("status {}", head.status);
    }
    let mut body = Vec::new();
    let mut rest = buf.split_off(head.len);
    let mut dechunker = Dechunker::default();
    loop {
        if abort_after.is_some_and(|limit| body.len() + rest.len() >= limit) {
            return Ok(body);
        }
        let done = match head.framing {
            Framing::Chunked => {
                let (_, done) = dechunker.feed(&rest, |data| body.extend_from_slice(data))?;
                rest.clear();
                done
            }
            Framing::Length(len) => {
                body.append(&mut rest);
                body.len() as u64 >= len
            }
            Framing::UntilClose => bail!("a response without a length"),
        };
        if done {
            return Ok(body);
        }
        let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut chunk)).await??;
        if n == 0 {
            bail!("closed mid-body");
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}

/// Samples the router's memory, descriptors and counts.
async fn sample(router: &Proc, addr: SocketAddr, start: Instant) -> Sample {
    let pid = router.pid();
    let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count() as u64);
    let metrics = scrape(addr).await.unwrap_or_default();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|line| line.starts_with(name) && !line.starts_with('#'))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, |sum, v| sum + v)
    };
    Sample {
        at: start.elapsed().as_secs_f64(),
        rss_kib,
        fds,
        clients: value("router_client_connections"),
        in_flight: value("router_backend_in_flight"),
        sockmap_clients: value("router_sockmap_client_sockets"),
        redirected: value("router_sockmap_redirected_bytes_total"),
        copied: value("router_userspace_copied_bytes_total"),
    }
}

/// `GET /metrics` on a connection of its own.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    let body = exchange(
        &mut stream,
        b"GET /metrics HTTP/1.1\r\nHost: soak\r\n\r\n",
        None,
    )
    .await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the router answers `/health`.
async fn wait_ready(addr: SocketAddr) -> Result<()> {
    for _ in 0..200 {
        if let Ok(mut stream) = TcpStream::connect(addr).await
            && exchange(
                &mut stream,
                b"GET /health HTTP/1.1\r\nHost: soak\r\n\r\n",
                None,
            )
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("router-daemon did not answer /health within 10 s")
}

/// An in-process simulator, paced like the quality benchmark's.
struct Sim {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), vllm_sim::Error>>,
}

impl Sim {
    /// Starts one on `addr` (a restart) or on a free port.
    async fn start(addr: Option<SocketAddr>) -> Result<Self> {
        let listener = match addr {
            Some(addr) => {
                let mut bound = None;
                // The old one's socket may take a moment to go.
                for _ in 0..100 {
                    match TcpListener::bind(addr).await {
                        Ok(listener) => {
                            bound = Some(listener);
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                bound.with_context(|| format!("rebinding {addr}"))?
            }
            None => TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?,
        };
        let addr = listener.local_addr()?;
        let config = vllm_sim::Config {
            port: addr.port(),
            time_scale: 0.2,
            ..vllm_sim::Config::for_tests(&format!("sim-{}", addr.port()))
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(vllm_sim::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr, stop, task })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn free_addr() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a port")?;
    probe.local_addr().context("finding a port")
}

/// UTC now as `YYYYMMDD-HHMMSS`, from `date`.
fn chrono_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y%m%d-%H%M%S"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "now".into())
}

fn write_report(
    args: &Args,
    stamp: &str,
    baseline: Sample,
    samples: &[Sample],
    (end, settled_after): (Sample, Duration),
    restarted: Option<f64>,
    counts: &Counts,
) -> Result<()> {
    std::fs::create_dir_all(&args.out_dir)?;
    let md = args.out_dir.join(format!("soak-{stamp}.md"));
    let png = args.out_dir.join(format!("soak-{stamp}.png"));
    if let Err(err) = plot(&png, samples) {
        eprintln!("router-bench: no plot: {err}");
    }
    // Warm-up: the first fifth of the run.
    let warm: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= samples.last().map_or(0.0, |l| l.at) / 5.0)
        .collect();
    let (low, high) = warm.iter().fold((u64::MAX, 0), |(lo, hi), s| {
        (lo.min(s.rss_kib), hi.max(s.rss_kib))
    });
    let spread = if low > 0 && low != u64::MAX {
        (high - low) as f64 / low as f64
    } else {
        0.0
    };
    let peak_clients = samples.iter().map(|s| s.clients).fold(0.0, f64::max);
    let per_conn = samples
        .iter()
        .max_by(|a, b| a.clients.total_cmp(&b.clients))
        .filter(|s| s.clients > 0.0)
        .map(|s| s.rss_kib.saturating_sub(baseline.rss_kib) as f64 * 1024.0 / s.clients);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut out = String::new();
    let _ = writeln!(out, "# Soak: `router-bench soak`\n");
    if let Some(invoked) = &args.invoked_as {
        let _ = writeln!(out, "`{invoked}`\n");
    }
    let _ = writeln!(
        out,
        "- {stamp} UTC · {} CPUs · {} kept-alive connections (a one-token completion each about every {} s), {} streaming clients ({}% of streams cut off by the client), {} s, dataplane `{}`; one of two vllm-sim backends restarted at {}\n",
        procfs::cpus(),
        args.connections,
        args.idle_request_secs,
        args.streams,
        (args.abort_share * 100.0).round(),
        args.seconds,
        args.dataplane,
        restarted.map_or_else(|| "–".to_owned(), |at| format!("{at:.0} s")),
    );
    let _ = writeln!(out, "| result | value |\n|---|---|");
    let _ = writeln!(
        out,
        "| RSS after warm-up (last 4/5), min–max | {:.1}–{:.1} MiB ({:.1}% spread) |",
        low as f64 / 1024.0,
        high as f64 / 1024.0,
        spread * 100.0
    );
    let _ = writeln!(
        out,
        "| RSS before any client | {:.1} MiB |",
        baseline.rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "| memory per open connection (RSS at the most connections, less that, ÷ connections) | {} |",
        per_conn.map_or_else(|| "–".into(), |b| format!("{:.1} KiB", b / 1024.0))
    );
    let _ = writeln!(out, "| client connections open, peak | {peak_clients:.0} |");
    let _ = writeln!(
        out,
        "| descriptors before any client / peak / after the clients left ({:.1} s later) | {} / {} / {} |",
        settled_after.as_secs_f64(),
        baseline.fds,
        samples.iter().map(|s| s.fds).max().unwrap_or(0),
        end.fds
    );
    let _ = writeln!(
        out,
        "| requests in flight after the clients left | {:.0} |",
        end.in_flight
    );
    let _ = writeln!(
        out,
        "| client connections after the clients left (the scrape's own) | {:.0} |",
        end.clients
    );
    let _ = writeln!(
        out,
        "| client sockets in the sockmap program's map after the clients left | {:.0} |",
        end.sockmap_clients
    );
    let _ = writeln!(
        out,
        "| response body bytes redirected in the kernel / copied by the daemon | {:.0} / {:.0} |",
        end.redirected, end.copied
    );
    let _ = writeln!(
        out,
        "| responses complete / cut off by the client / errors | {} / {} / {} |",
        get(&counts.ok),
        get(&counts.aborted),
        get(&counts.errors)
    );
    let _ = writeln!(
        out,
        "| responses to the wrong client | {} |",
        get(&counts.wrong_client)
    );
    let _ = writeln!(
        out,
        "\n![memory and connections over time]({})\n",
        png.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "## Samples\n\n| s | RSS MiB | fds | client connections | in flight | sockmap client sockets |\n|---:|---:|---:|---:|---:|---:|"
    );
    for s in samples.iter().chain(std::iter::once(&end)) {
        let _ = writeln!(
            out,
            "| {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.0} |",
            s.at,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.clients,
            s.in_flight,
            s.sockmap_clients
        );
    }
    std::fs::write(&md, out)?;
    eprintln!("router-bench: wrote {}", md.display());
    Ok(())
}

/// RSS (MiB) and open client connections (thousands) over time.
fn plot(path: &Path, samples: &[Sample]) -> Result<(), String> {
    crate::quality::plot::font()?;
    let text = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| text(&e))?;
    let max_t = samples.last().map_or(1.0, |s| s.at).max(1.0);
    let max_rss = samples
        .iter()
        .map(|s| s.rss_kib as f64 / 1024.0)
        .fold(1.0, f64::max)
        * 1.2;
    let max_conn = samples
        .iter()
        .map(|s| s.clients / 1000.0)
        .fold(0.1, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption("router-daemon under a soak", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(50)
        .right_y_label_area_size(50)
        .build_cartesian_2d(0.0..max_t, 0.0..max_rss)
        .map_err(|e| text(&e))?
        .set_secondary_coord(0.0..max_t, 0.0..max_conn);
    chart
        .configure_mesh()
        .x_desc("s")
        .y_desc("RSS, MiB")
        .draw()
        .map_err(|e| text(&e))?;
    chart
        .configure_secondary_axes()
        .y_desc("client connections, thousands")
        .draw()
        .map_err(|e| text(&e))?;
    chart
        .draw_series(LineSeries::new(
            samples.iter().map(|s| (s.at, s.rss_kib as f64 / 1024.0)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| text(&e))?
        .label("RSS")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(
            samples.iter().map(|s| (s.at, s.clients / 1000.0)),
            RED.stroke_width(2),
        ))
        .map_err(|e| text(&e))?
        .label("client connections")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| text(&e))?;
    root.present().map_err(|e| text(&e))
}
