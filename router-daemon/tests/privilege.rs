//! Once started, the daemon holds no capability, and with `--user` no
//! root either, while the sockmap dataplane keeps moving bytes in the
//! kernel through the descriptors it opened while privileged. And root
//! bounded to the three capabilities the Helm chart grants a sockmap pod,
//! with no_new_privs, is enough to load the program.
//!
//! This runs the real binary as root (skipped otherwise; CI runs as root).
mod common;

use std::{process::Command, time::Duration};

use common::{Daemon, backend_streaming, is_root};

/// A body big enough that most of it is redirected in the kernel.
const BODY_BYTES: usize = 1 << 20;

fn start(extra: &[&str]) -> Option<Daemon> {
    start_under(&[], extra)
}

/// The capabilities the Helm chart grants a `dataplane: sockmap` pod
/// (`deploy/helm/prefix-router/templates/daemonset.yaml`; the chart's own
/// test checks it grants exactly these), as `setpriv` names them.
const CHART_SOCKMAP_CAPS: &str = "+bpf,+net_admin,+perfmon";

/// [`start`], run by `setpriv` with `setpriv_args` when there are any.
fn start_under(setpriv_args: &[&str], extra: &[&str]) -> Option<Daemon> {
    if !is_root() {
        eprintln!("skipped: the privilege test needs root to load the sockmap program");
        return None;
    }
    // Streamed in pieces, so the body's path is set up before most of it
    // arrives (bytes already queued when it is go through the daemon).
    let backend = backend_streaming(vec![b'x'; BODY_BYTES], Duration::from_millis(10));
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
        .args(["--dataplane", "sockmap", "--discovery-interval-ms", "0"])
        .args(extra);
    Some(Daemon::start(command))
}

/// Sends a completion and checks the whole body came back.
fn completion_arrives(daemon: &Daemon) {
    let response = daemon.exchange(
        b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}",
    );
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    assert!(response.starts_with(b"HTTP/1.1 200 OK"));
    assert_eq!(response.len() - head_end - 4, BODY_BYTES);
}

/// The daemon's kernel-redirected bytes, from `/metrics`.
fn redirected(daemon: &Daemon) -> f64 {
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("router_dataplane_info{mode=\"sockmap\"} 1"),
        "{metrics}"
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("router_sockmap_redirected_bytes_total "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no redirected bytes in {metrics}"))
}

#[test]
fn after_start_up_the_daemon_holds_no_capability() {
    let Some(daemon) = start(&[]) else {
        return;
    };
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(daemon.status_field(set), "0000000000000000", "{set}");
    }
    assert_eq!(daemon.status_field("NoNewPrivs"), "1");
    completion_arrives(&daemon);
    assert!(redirected(&daemon) > 0.0, "the kernel moved no bytes");
}

#[test]
fn the_chart_s_capabilities_are_enough_for_sockmap() {
    // Root whose capabilities are bounded to the chart's, with
    // no_new_privs (the chart's allowPrivilegeEscalation: false), as the
    // container runtime starts the pod.
    let bounding = format!("-all,{CHART_SOCKMAP_CAPS}");
    let Some(daemon) = start_under(
        &[
            "--no-new-privs",
            "--bounding-set",
            &bounding,
            "--inh-caps=-all",
        ],
        &[],
    ) else {
        return;
    };
    completion_arrives(&daemon);
    assert!(redirected(&daemon) > 0.0, "the kernel moved no bytes");
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
    assert!(redirected(&daemon) > 0.0, "the kernel moved no bytes");
}
