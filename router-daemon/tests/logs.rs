//! The real binary as a pod runs it, its output on a pipe and without
//! `NO_COLOR`: log lines as `kubectl logs` and log pipelines get them, and
//! the memory it keeps once started.
use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// A daemon with its standard output on a pipe; killed when dropped.
struct Piped {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Piped {
    /// Starts the daemon with `args` and `env` (plus `RUST_LOG=info`, and no
    /// `NO_COLOR`), in front of a backend nobody listens on.
    fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_router-daemon"));
        command
            .args(["--listen", "127.0.0.1:0", "--backend", "http://127.0.0.1:9"])
            .args(["--discovery-interval-ms", "0"])
            .args(args)
            .env_remove("NO_COLOR")
            .env_remove("ROUTER_LOG_FORMAT")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("start router-daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// Every line up to and including the one saying the daemon is ready.
    fn until_ready(&self) -> Vec<String> {
        let mut log = Vec::new();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no ready line; log so far: {log:#?}"));
            let ready = line.contains("router-daemon ready");
            log.push(line);
            if ready {
                return log;
            }
        }
    }
}

impl Drop for Piped {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn text_logs_on_a_pipe_carry_no_colour_escapes() {
    let daemon = Piped::start(&[], &[]);
    let log = daemon.until_ready();
    for line in &log {
        assert!(!line.contains('\x1b'), "an escape in {line:?}");
    }
    let ready = log.last().expect("the ready line");
    assert!(ready.contains(" INFO "), "{ready}");
    assert!(ready.contains("listen=127.0.0.1:"), "{ready}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    // As the Helm chart sets it: through the environment.
    let daemon = Piped::start(&[], &[("ROUTER_LOG_FORMAT", "json")]);
    let log = daemon.until_ready();
    for line in &log {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        assert!(event["fields"]["message"].is_string(), "{line}");
    }
    let ready: serde_json::Value =
        serde_json::from_str(log.last().expect("the ready line")).expect("JSON");
    assert_eq!(ready["level"], "INFO");
    let listen = ready["fields"]["listen"].as_str().expect("a listen field");
    assert!(listen.starts_with("127.0.0.1:"), "{ready}");
    // The dataplane line says which one runs, as a field.
    let dataplane = log
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| {
            event["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("dataplane:"))
        })
        .expect("a dataplane line");
    assert!(dataplane["fields"]["mode"].is_string(), "{dataplane}");
}

#[test]
fn an_unknown_log_format_is_refused_with_the_choices() {
    let out = Command::new(env!("CARGO_BIN_EXE_router-daemon"))
        .args(["--backend", "http://127.0.0.1:9", "--log-format", "xml"])
        .output()
        .expect("run router-daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "{err}");
}

/// The daemon's resident memory (`VmRSS`), in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

#[test]
fn the_start_up_probe_s_heap_is_given_back() {
    // `auto` loads the sockmap-send programs where it can, parsing the
    // kernel's BTF: tens of MiB of heap, freed once they are loaded (or
    // failed to), which the binary's allocator keeps resident unless told
    // to give it back (54 MiB resident without, when `auto` probed the
    // receive hook; 13.5 MiB with, as with --dataplane userspace).
    let daemon = Piped::start(&["--dataplane", "auto"], &[]);
    let log = daemon.until_ready();
    let resident = resident_kib(daemon.child.id());
    assert!(
        resident < 32 * 1024,
        "{resident} KiB resident after start; log: {log:#?}"
    );
}
