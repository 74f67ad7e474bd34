//! `cargo xtask run`: a local fleet. Starts `vllm-sim` instances (unless
//! `--backend` names real ones) and `router-daemon` in front of them, prints
//! how to reach it, and streams every child's log prefixed with its name.
//!
//! `cargo xtask sim stop N` / `sim start N`, from another terminal, stop
//! and start one simulator while the rest run (see `control`).
//!
//! Ctrl-C (or SIGTERM/SIGHUP to xtask), or any child exiting unasked, stops them all:
//! SIGTERM, up to 3 s of grace, then SIGKILL. Children run in their own
//! process group, so the terminal's Ctrl-C reaches only xtask, and with a
//! parent-death signal, so they die with xtask even if it is killed.
use std::{
    io::{self, BufRead as _, BufReader, IsTerminal as _, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, ToSocketAddrs as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{control, setup};

/// The model of the tutorial's requests.
const DEFAULT_MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
/// How long a child may take to answer `GET /health` after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a child may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How often the supervisor looks at its children.
const POLL: Duration = Duration::from_millis(100);

/// Options of `cargo xtask run`.
#[derive(clap::Args)]
pub struct Args {
    /// How many vllm-sim instances to start (ignored with --backend).
    #[arg(long, value_name = "N", default_value_t = 2)]
    sims: u16,
    /// Route to this backend instead of starting simulators (repeatable).
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// router-daemon's dataplane: auto (sockmap-send as root, else
    /// userspace), userspace, splice, sockmap or sockmap-send (its
    /// simulators are local, so their streams are redirected inside their
    /// own sends).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    dataplane: String,
    /// Where router-daemon listens.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:30080")]
    listen: String,
    /// The model the simulators serve and the example requests name.
    #[arg(long, value_name = "M", default_value = DEFAULT_MODEL)]
    model: String,
    /// Port of the first simulator; the others take the following ports.
    #[arg(long, value_name = "PORT", default_value_t = 8001)]
    first_port: u16,
    /// Extra arguments for router-daemon, after `--`.
    #[arg(last = true, value_name = "ROUTER_ARGS")]
    router_args: Vec<String>,
}

/// Starts the fleet and supervises it until Ctrl-C or a child exits.
pub fn run(args: Args) -> Result<()> {
    if args.backends.is_empty() && args.sims == 0 {
        bail!("nothing to route to: give --sims N with N > 0, or --backend URL");
    }
    let listen = args
        .listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| format!("--listen {}: not an address with a port", args.listen))?;
    let router_probe = probe_addr(listen);

    let toolchain = setup::run()?;
    let sim_bin = toolchain.release_bin("vllm-sim")?;
    let router_bin = toolchain.release_bin("router-daemon")?;

    // Simulators take 127.0.0.1 ports from --first-port; none with --backend.
    let sim_addrs: Vec<SocketAddr> = if args.backends.is_empty() {
        (0..args.sims)
            .map(|i| {
                let port = args.first_port.checked_add(i);
                let port = port.context("--first-port + --sims goes past port 65535")?;
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                ensure_free(addr, "--first-port")?;
                Ok(addr)
            })
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    ensure_free(router_probe, "--listen")?;

    let (interrupt, interrupts) = mpsc::channel();
    ctrlc::set_handler(move || {
        // The receiver lives as long as the fleet; after that nobody listens.
        let _ = interrupt.send(());
    })
    .context("installing the Ctrl-C handler")?;
    // Simulators can be stopped and started from another terminal.
    let socket = control::socket_path(toolchain.root());
    let control = if sim_addrs.is_empty() {
        None
    } else {
        Some(control::listen(&socket)?)
    };
    let mut fleet = Fleet {
        procs: Vec::new(),
        interrupts,
        control,
        sims: Vec::new(),
        sim_bin: sim_bin.to_owned(),
        model: args.model.clone(),
    };

    let backends = if sim_addrs.is_empty() {
        args.backends.clone()
    } else {
        fleet.start_sims(&sim_addrs)?
    };

    let mut cmd = Command::new(router_bin);
    cmd.args(["--listen", &args.listen]);
    for backend in &backends {
        cmd.args(["--backend", backend]);
    }
    cmd.args(["--dataplane", &args.dataplane])
        .args(&args.router_args);
    // No load balancer to wait for here, the drain must fit the stop's
    // grace, and no other router sends to these backends; `--router-arg`
    // flags still override these.
    cmd.env("ROUTER_DRAIN_DELAY_MS", "0")
        .env(
            "ROUTER_DRAIN_TIMEOUT_MS",
            (STOP_GRACE.as_millis() * 2 / 3).to_string(),
        )
        .env("ROUTER_PEERS", "0");
    let router = fleet.spawn("router", cmd)?;
    fleet.wait_healthy(router, router_probe)?;

    print_banner(&args, listen, &backends);
    let outcome = fleet.supervise();
    fleet.stop();
    if fleet.control.is_some() {
        let _ = std::fs::remove_file(&socket);
    }
    outcome
}

/// Where to reach a listen address from this machine: loopback for an
/// unspecified address.
fn probe_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, listen.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, listen.port()).into(),
        _ => listen,
    }
}

/// Fails when something already answers on `addr`: its health check would
/// pass for the wrong process.
fn ensure_free(addr: SocketAddr, flag: &str) -> Result<()> {
    if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
        bail!("{addr} is already in use; stop what listens there or choose another {flag}");
    }
    Ok(())
}

/// Whether `GET /health` on `addr` answers 200, over a raw HTTP/1.1 request.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    if stream.set_read_timeout(timeout).is_err() || stream.set_write_timeout(timeout).is_err() {
        return false;
    }
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    // Only the status line matters: `HTTP/1.1 200 OK`.
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() && !head[..len].contains(&b'\n') {
        match stream.read(&mut head[len..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => len += n,
        }
    }
    let head = String::from_utf8_lossy(&head[..len]);
    let mut status_line = head.split_whitespace();
    status_line.next().is_some_and(|v| v.starts_with("HTTP/1."))
        && status_line.next() == Some("200")
}

/// Prints where the router listens, its backends and the tutorial requests.
fn print_banner(args: &Args, listen: SocketAddr, backends: &[String]) {
    let host = match listen.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => "localhost".to_owned(),
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let url = format!("http://{host}:{}/v1/completions", listen.port());
    let model = &args.model;
    let request = |prompt: &str| {
        format!(
            "curl {url} \\\n  -H \"Content-Type: application/json\" \\\n  -d '{{\n    \
             \"model\": \"{model}\",\n    \"prompt\": \"{prompt}\",\n    \
             \"max_tokens\": 100\n  }}'"
        )
    };
    let banner = format!(
        "\nrouter-daemon listens on {listen} (dataplane: {dataplane})\n\
         backends: {backends}\n\n\
         Try it:\n\n{first}\n\n{second}\n\n\
         Add -i (curl -i {url} ...) to see the response headers: \
         x-served-by names the instance that answered.\n{control}\
         Ctrl-C stops everything.\n",
        dataplane = args.dataplane,
        backends = backends.join(", "),
        first = request("What is the capital of France?"),
        second = request("What is the capital of France? And what is its population?"),
        control = if args.backends.is_empty() {
            "In another terminal, `cargo xtask sim stop 1` stops sim-1 and \
             `cargo xtask sim start 1` starts it again: the router's log and its \
             /metrics (router_backend_up, router_backend_ejected) follow.\n"
        } else {
            ""
        },
    );
    // A closed stdout must not stop the fleet.
    let _ = writeln!(io::stdout().lock(), "{banner}");
}

/// A child process and the threads that copy its output.
struct Proc {
    /// The log prefix, e.g. `sim-0`.
    name: String,
    child: Child,
    /// Its exit status, once reaped.
    status: Option<ExitStatus>,
    /// Stopped on request (`cargo xtask sim stop`): its exit is expected.
    stopped: bool,
    /// The threads copying its stdout and stderr.
    pumps: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Reaps the child if it has exited.
    fn poll(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// Stops the child: SIGTERM, up to [`STOP_GRACE`], then SIGKILL.
    fn stop_now(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(self.poll(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if self.status.is_none() {
            self.signal(libc::SIGKILL);
            self.status = self.child.wait().ok();
        }
    }

    /// Sends `signal` to the child's process group (it leads its own).
    fn signal(&self, signal: libc::c_int) {
        if self.status.is_some() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped yet, so its pid (and process group id) is still ours.
        unsafe { libc::kill(-pid, signal) };
    }
}

/// The children of `cargo xtask run`. Dropping it stops them.
struct Fleet {
    procs: Vec<Proc>,
    /// Ctrl-C, SIGTERM or SIGHUP to xtask.
    interrupts: mpsc::Receiver<()>,
    /// `cargo xtask sim` commands, when the fleet runs simulators.
    control: Option<mpsc::Receiver<control::Request>>,
    /// The simulators: their index in `procs` and their address, by number.
    sims: Vec<(usize, SocketAddr)>,
    sim_bin: PathBuf,
    model: String,
}

impl Fleet {
    /// Starts `cmd` with its output piped into `[name] `-prefixed lines, and
    /// returns its index. Must run on the main thread: the parent-death
    /// signal fires when the thread that forked the child exits.
    fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<usize> {
        let parent = libc::pid_t::try_from(std::process::id()).context("pid out of range")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // The children see pipes; colour their logs only if we print to a
        // terminal (tracing-subscriber colours unless NO_COLOR is set).
        if !io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
            cmd.env("NO_COLOR", "1");
        }
        // SAFETY: the closure only makes async-signal-safe system calls and
        // does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // xtask may have died before the prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = Path::new(cmd.get_program()).display().to_string();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(name, out, io::stdout));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(name, err, io::stderr));
        }
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            status: None,
            stopped: false,
            pumps,
        });
        Ok(self.procs.len() - 1)
    }

    /// Starts one `vllm-sim` per address, waits until all are healthy and
    /// returns their URLs.
    fn start_sims(&mut self, addrs: &[SocketAddr]) -> Result<Vec<String>> {
        for (n, &addr) in addrs.iter().enumerate() {
            let index = self.spawn_sim(n, addr)?;
            self.sims.push((index, addr));
        }
        for (index, addr) in self.sims.clone() {
            self.wait_healthy(index, addr)?;
        }
        Ok(addrs.iter().map(|addr| format!("http://{addr}")).collect())
    }

    /// Starts simulator `sim-n` on `addr`; returns its index in `procs`.
    fn spawn_sim(&mut self, n: usize, addr: SocketAddr) -> Result<usize> {
        let name = format!("sim-{n}");
        let mut cmd = Command::new(&self.sim_bin);
        cmd.args(["--host", "127.0.0.1", "--port", &addr.port().to_string()])
            .args(["--model", &self.model, "--id", &name]);
        self.spawn(&name, cmd)
    }

    /// Carries out a `cargo xtask sim` command.
    fn steer(&mut self, action: control::Action) -> Result<String, String> {
        let n = match action {
            control::Action::Stop { n } | control::Action::Start { n } => n,
        };
        let Some(&(index, addr)) = self.sims.get(n) else {
            return Err(format!(
                "there is no sim-{n} (sims: 0..{})",
                self.sims.len()
            ));
        };
        let proc = &mut self.procs[index];
        let running = matches!(proc.poll(), Ok(None));
        match action {
            control::Action::Stop { .. } if !running => Err(format!("sim-{n} is not running")),
            control::Action::Stop { .. } => {
                proc.stopped = true;
                proc.stop_now();
                eprintln!("xtask: sim-{n} stopped on request");
                Ok(format!("sim-{n} ({addr}) stopped"))
            }
            control::Action::Start { .. } if running => Err(format!("sim-{n} is running already")),
            control::Action::Start { .. } => {
                let fresh = self.spawn_sim(n, addr).map_err(|err| format!("{err:#}"))?;
                // The new process takes the old one's place.
                let last = self.procs.len() - 1;
                debug_assert_eq!(fresh, last);
                self.procs.swap(index, last);
                self.procs.pop();
                self.wait_healthy(index, addr)
                    .map_err(|err| format!("{err:#}"))?;
                eprintln!("xtask: sim-{n} started on request");
                Ok(format!("sim-{n} ({addr}) started"))
            }
        }
    }

    /// Waits until child `index` answers `GET /health` on `addr`.
    fn wait_healthy(&mut self, index: usize, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.interrupts.try_recv().is_ok() {
                bail!("interrupted during startup");
            }
            for proc in &mut self.procs {
                if let Some(status) = proc.poll()?
                    && !proc.stopped
                {
                    bail!("{} exited during startup ({status})", proc.name);
                }
            }
            if healthy(addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let name = self.procs.get(index).map_or("?", |p| p.name.as_str());
                bail!(
                    "{name} did not answer GET /health on {addr} within {} s",
                    STARTUP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Runs until an interrupt (`Ok`) or a child exits unasked (`Err`),
    /// carrying out `cargo xtask sim` commands meanwhile.
    fn supervise(&mut self) -> Result<()> {
        loop {
            match self.interrupts.recv_timeout(POLL) {
                Ok(()) => {
                    eprintln!("xtask: interrupted, stopping");
                    return Ok(());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => thread::sleep(POLL),
            }
            while let Some(request) = self.control.as_ref().and_then(|c| c.try_recv().ok()) {
                let outcome = self.steer(request.action);
                request.reply(outcome);
            }
            for proc in &mut self.procs {
                if let Some(status) = proc.poll()?
                    && !proc.stopped
                {
                    bail!("{} exited unexpectedly ({status})", proc.name);
                }
            }
        }
    }

    /// Stops every child: SIGTERM, [`STOP_GRACE`], then SIGKILL. Idempotent.
    fn stop(&mut self) {
        for proc in &self.procs {
            proc.signal(libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            let mut running = 0;
            for proc in &mut self.procs {
                if !matches!(proc.poll(), Ok(Some(_))) {
                    running += 1;
                }
            }
            if running == 0 || Instant::now() > deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for proc in &mut self.procs {
            if proc.status.is_none() {
                eprintln!(
                    "xtask: {} did not stop within {} s; killing it",
                    proc.name,
                    STOP_GRACE.as_secs()
                );
                proc.signal(libc::SIGKILL);
                proc.status = proc.child.wait().ok();
            }
        }
        // Let the pumps print the last lines; a grandchild that kept a pipe
        // open must not hold xtask up.
        let deadline = Instant::now() + Duration::from_secs(1);
        for proc in &mut self.procs {
            for pump in proc.pumps.drain(..) {
                while !pump.is_finished() && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(10));
                }
                if pump.is_finished() {
                    let _ = pump.join();
                }
            }
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Copies `from` line by line to `to()`, each line prefixed with `[name] `.
fn pump<W: Write + 'static>(
    name: &str,
    from: impl Read + Send + 'static,
    to: fn() -> W,
) -> JoinHandle<()> {
    let prefix = format!("[{name}] ");
    thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line);
            // Keep draining even if our own output is closed, so the child
            // never blocks on a full pipe.
            let _ = writeln!(to(), "{prefix}{}", line.trim_end_matches('\r'));
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        let probe = |addr: &str| addr.parse().map(probe_addr).map(|a| a.to_string());
        assert_eq!(
            probe("0.0.0.0:30080").ok().as_deref(),
            Some("127.0.0.1:30080")
        );
        assert_eq!(probe("[::]:30080").ok().as_deref(), Some("[::1]:30080"));
        assert_eq!(probe("10.1.2.3:80").ok().as_deref(), Some("10.1.2.3:80"));
    }

    /// Serves one connection with `response`, returning the listener's address.
    fn serve_once(response: &'static str) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        thread::spawn(move || {
            if let Ok((mut stream, _)) = listener.accept() {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(response.as_bytes());
            }
        });
        Ok(addr)
    }

    #[test]
    fn health_probe_reads_the_status_line() -> io::Result<()> {
        assert!(healthy(serve_once(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        )?));
        assert!(!healthy(serve_once(
            "HTTP/1.1 503 Service Unavailable\r\n\r\n"
        )?));
        assert!(!healthy(serve_once("")?));
        Ok(())
    }
}
