//! Once started, the daemon holds no capability, and with `--user` no
//! root either, while the kernel dataplanes keep moving bytes through the
//! descriptors it opened while privileged. And root bounded to the three
//! capabilities the Helm chart grants a kernel-dataplane pod, with
//! no_new_privs, is enough to load either program: `sockmap`, and
//! `sockmap-send`, which the chart's default `auto` picks.
//!
//! This runs the real binary as root (skipped otherwise; CI runs as root).
mod common;

use std::{process::Command, time::Duration};

use common::{Daemon, backend_streaming, backend_streaming_chunked, is_root};

/// A body big enough that most of it is redirected in the kernel.
const BODY_BYTES: usize = 1 << 20;

/// The capabilities the Helm chart grants a kernel-dataplane pod
/// (`deploy/helm/prefix-router/templates/daemonset.yaml`; the chart's own
/// test checks it grants exactly these), as `setpriv` names them.
const CHART_SOCKMAP_CAPS: &str = "+bpf,+net_admin,+perfmon";

/// The `--dataplane` a test starts the daemon with, and so the backend it
/// puts behind it.
#[derive(Clone, Copy)]
enum Requested {
    /// `sockmap`: the receive hook, for any body.
    Sockmap,
    /// `auto`: as root, `sockmap-send`, which redirects chunked bodies in
    /// the (local) backend's own send.
    Auto,
}

impl Requested {
    fn arg(self) -> &'static str {
        match self {
            Requested::Sockmap => "sockmap",
            Requested::Auto => "auto",
        }
    }

    /// The mode `/metrics` must report.
    fn mode(self) -> &'static str {
        match self {
            Requested::Sockmap => "sockmap",
            Requested::Auto => "sockmap-send",
        }
    }
}

fn start(extra: &[&str]) -> Option<Daemon> {
    start_under(&[], Requested::Sockmap, extra)
}

/// The daemon with `requested`, run by `setpriv` with `setpriv_args` when
/// there are any.
fn start_under(setpriv_args: &[&str], requested: Requested, extra: &[&str]) -> Option<Daemon> {
    if !is_root() {
        eprintln!("skipped: the privilege test needs root to load the sockmap program");
        return None;
    }
    // Streamed in pieces, so the body's path is set up before most of it
    // arrives (bytes already queued when it is go through the daemon).
    let body = vec![b'x'; BODY_BYTES];
    let pause = Duration::from_millis(10);
    let backend = match requested {
        Requested::Sockmap => backend_streaming(body, pause),
        Requested::Auto => backend_streaming_chunked(body, pause),
    };
    let daemon = env!("CARGO_BIN_EXE_router-daemon");
    let mut command = if setpriv_args.is_empty() {
        Command::new(daemon)
    } else {
        let mut setpriv = Command::new("setpriv");
        setpriv.args(setpriv_args).arg("--").arg(daemon);
        setpriv
    };
    command
        .args(["--listen", "127.0.0.1:0", "--backend", &backend])
        .args([
            "--dataplane",
            requested.arg(),
            "--discovery-interval-ms",
            "0",
        ])
        .args(extra);
    Some(Daemon::start(command))
}

/// The daemon with `requested`, as the container runtime starts the
/// chart's pod: root whose capabilities are bounded to the chart's, with
/// no_new_privs (the chart's allowPrivilegeEscalation: false).
fn start_as_the_chart(requested: Requested) -> Option<Daemon> {
    let bounding = format!("-all,{CHART_SOCKMAP_CAPS}");
    start_under(
        &[
            "--no-new-privs",
            "--bounding-set",
            &bounding,
            "--inh-caps=-all",
        ],
        requested,
        &[],
    )
}

/// Sends a completion and checks the whole body came back (decoded, for a
/// chunked one).
fn completion_arrives(daemon: &Daemon) {
    let response = daemon.exchange(
        b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}",
    );
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    let head = String::from_utf8_lossy(&response[..head_end]).to_ascii_lowercase();
    let mut body = &response[head_end + 4..];
    if !head.contains("transfer-encoding: chunked") {
        assert_eq!(body.len(), BODY_BYTES);
        return;
    }
    let mut decoded = 0;
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("a chunk-size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).expect("ascii"), 16)
                .expect("a hex chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "the last chunk ends the body");
            break;
        }
        assert!(body[..size].iter().all(|&b| b == b'x'), "body bytes");
        assert_eq!(&body[size..size + 2], b"\r\n", "a chunk's CRLF");
        decoded += size;
        body = &body[size + 2..];
    }
    assert_eq!(decoded, BODY_BYTES);
}

/// The daemon's kernel-redirected bytes, from `/metrics`, which must show
/// `requested`'s mode.
fn redirected(daemon: &Daemon, requested: Requested) -> f64 {
    let metrics = daemon.metrics();
    let info = format!("router_dataplane_info{{mode=\"{}\"}} 1", requested.mode());
    assert!(metrics.contains(&info), "{metrics}");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("router_sockmap_redirected_bytes_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no redirected bytes in {metrics}"))
}

/// Every capability set of the daemon is empty, and it cannot regain any.
fn holds_no_capability(daemon: &Daemon) {
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(daemon.status_field(set), "0000000000000000", "{set}");
    }
    assert_eq!(daemon.status_field("NoNewPrivs"), "1");
}

#[test]
fn after_start_up_the_daemon_holds_no_capability() {
    let Some(daemon) = start(&[]) else {
        return;
    };
    holds_no_capability(&daemon);
    completion_arrives(&daemon);
    assert!(
        redirected(&daemon, Requested::Sockmap) > 0.0,
        "the kernel moved no bytes"
    );
}

#[test]
fn the_chart_s_capabilities_are_enough_for_sockmap() {
    let Some(daemon) = start_as_the_chart(Requested::Sockmap) else {
        return;
    };
    completion_arrives(&daemon);
    assert!(
        redirected(&daemon, Requested::Sockmap) > 0.0,
        "the kernel moved no bytes"
    );
}

#[test]
fn the_chart_s_default_redirects_in_the_engine_s_send() {
    // `auto` under the chart's capabilities: sockmap-send, its sockops
    // program attached to this host's cgroup v2 root, so the backend's
    // accepted socket (this process's) is found and its stream redirected.
    let Some(daemon) = start_as_the_chart(Requested::Auto) else {
        return;
    };
    let line = daemon
        .log
        .iter()
        .find(|line| line.contains("dataplane:"))
        .expect("a dataplane log line");
    assert!(line.contains("auto: sockmap-send"), "{line}");
    holds_no_capability(&daemon);
    completion_arrives(&daemon);
    assert!(
        redirected(&daemon, Requested::Auto) > 0.0,
        "the kernel moved no bytes"
    );
}

#[test]
fn with_user_the_daemon_runs_as_that_user() {
    let Some(daemon) = start(&["--user", "nobody"]) else {
        return;
    };
    let uids = daemon.status_field("Uid");
    assert!(
        uids.split_whitespace().all(|uid| uid == "65534"),
        "real, effective, saved and fs uid: {uids}"
    );
    assert_eq!(daemon.status_field("CapEff"), "0000000000000000");
    completion_arrives(&daemon);
    assert!(
        redirected(&daemon, Requested::Sockmap) > 0.0,
        "the kernel moved no bytes"
    );
}
