//! Without privilege the daemon still serves, through the userspace
//! dataplane, and says so in its log.
//!
//! This runs the real binary. As root it drops to `nobody` with `setpriv`
//! (no capabilities), so the sockmap program cannot load; as any other user
//! it is unprivileged already. It starts with a soft open-file limit of
//! 256, which the daemon raises to its hard limit.
mod common;

use std::process::Command;

use common::{Daemon, backend_answering, is_root};

/// The soft and hard "Max open files" of process `pid`, from
/// `/proc/<pid>/limits`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut numbers = line
        .split_whitespace()
        .filter_map(|word| word.parse::<u64>().ok());
    let soft = numbers.next().expect("soft limit");
    let hard = numbers.next().expect("hard limit");
    (soft, hard)
}

#[test]
fn unprivileged_daemon_serves_through_userspace_and_says_why() {
    let backend = backend_answering(b"hello".to_vec());
    // Started with a low soft open-file limit, which the daemon raises.
    let mut command = Command::new("sh");
    command.args(["-c", "ulimit -S -n 256 && exec \"$@\"", "sh"]);
    if is_root() {
        command
            .arg("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"]);
    }
    command
        .arg(env!("CARGO_BIN_EXE_router-daemon"))
        .args(["--listen", "127.0.0.1:0", "--backend", &backend])
        .args(["--dataplane", "auto"]);
    let daemon = Daemon::start(command);
    let fallback = daemon
        .log
        .iter()
        .find(|line| line.contains("dataplane:"))
        .expect("a dataplane log line");
    assert!(
        fallback.contains("auto: userspace")
            && fallback.contains("sockmap-send is unavailable here"),
        "{fallback}"
    );

    let (soft, hard) = open_file_limits(daemon.pid());
    assert!(
        hard > 256,
        "the hard limit ({hard}) leaves nothing to raise"
    );
    assert_eq!(soft, hard, "the daemon raises its soft open-file limit");
    assert!(
        daemon
            .log
            .iter()
            .any(|line| line.contains("open-file limit raised")),
        "{:#?}",
        daemon.log
    );

    let response = String::from_utf8_lossy(&daemon.exchange(
        b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}",
    ))
    .into_owned();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("router_dataplane_info{mode=\"userspace\"} 1"),
        "{metrics}"
    );
}
