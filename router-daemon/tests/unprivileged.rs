//! Without privilege the daemon still serves, through the userspace
//! dataplane, and says so in its log.
//!
//! This runs the real binary. As root it drops to `nobody` with `setpriv`
//! (no capabilities), so the sockmap program cannot load; as any other user
//! it is unprivileged already. It starts with a soft open-file limit of
//! 256, which the daemon raises to its hard limit.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// A backend that answers every connection with `hello` and closes.
fn hello_backend() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
            );
        }
    });
    format!("http://{addr}")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exchange(addr: &str, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to the daemon");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}

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
    let daemon = env!("CARGO_BIN_EXE_router-daemon");
    let backend = hello_backend();
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--backend",
        backend.as_str(),
        "--dataplane",
        "auto",
    ];
    // Started with a low soft open-file limit, which the daemon raises.
    let mut command = Command::new("sh");
    command.args(["-c", "ulimit -S -n 256 && exec \"$@\"", "sh"]);
    if is_root() {
        command
            .arg("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(["--inh-caps=-all", "--bounding-set=-all", "--"]);
    }
    command.arg(daemon);
    let child = command
        .args(args)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start router-daemon (setpriv is in util-linux)");
    let mut daemon = Daemon(child);

    // Read log lines until the daemon says where it listens.
    let stdout = daemon.0.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let listen = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("daemon did not start; log so far: {log:#?}"));
        log.push(line.clone());
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest.split_whitespace().next().expect("address").to_owned();
        }
    };
    let fallback = log
        .iter()
        .find(|line| line.contains("dataplane:"))
        .expect("a dataplane log line");
    assert!(
        fallback.contains("sockmap unavailable") && fallback.contains("auto: userspace"),
        "{fallback}"
    );

    let (soft, hard) = open_file_limits(daemon.0.id());
    assert!(
        hard > 256,
        "the hard limit ({hard}) leaves nothing to raise"
    );
    assert_eq!(soft, hard, "the daemon raises its soft open-file limit");
    assert!(
        log.iter()
            .any(|line| line.contains("open-file limit raised")),
        "{log:#?}"
    );

    let response = exchange(
        &listen,
        b"POST /v1/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: 15\r\n\r\n{\"prompt\":\"hi\"}",
    );
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(response.ends_with("hello"), "{response}");

    let metrics = exchange(
        &listen,
        b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains("router_dataplane_info{mode=\"userspace\"} 1"),
        "{metrics}"
    );
}
