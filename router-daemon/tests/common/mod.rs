//! Running the real `router-daemon` binary in tests: a backend to put
//! behind it, starting it and reading its log until it listens, one-shot
//! HTTP exchanges, and what `/proc` says of the process.
#![allow(dead_code, reason = "each test binary uses its own subset")]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

/// A backend that answers every connection with a 200 of `body` and closes.
pub fn backend_answering(body: Vec<u8>) -> String {
    backend(body, Duration::ZERO, false)
}

/// The same, writing the body in 64 KiB pieces `pause` apart after a
/// `pause` behind the head, as a streaming engine would: the router has
/// read the head and set up the body's path before most of it arrives.
pub fn backend_streaming(body: Vec<u8>, pause: Duration) -> String {
    backend(body, pause, false)
}

/// [`backend_streaming`] with a chunked body, a chunk per piece, as vLLM
/// streams its server-sent events.
pub fn backend_streaming_chunked(body: Vec<u8>, pause: Duration) -> String {
    backend(body, pause, true)
}

fn backend(body: Vec<u8>, pause: Duration, chunked: bool) -> String {
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
            let framing = if chunked {
                "transfer-encoding: chunked".to_owned()
            } else {
                format!("content-length: {}", body.len())
            };
            let head = format!("HTTP/1.1 200 OK\r\n{framing}\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(head.as_bytes());
            for piece in body.chunks(if pause.is_zero() {
                body.len().max(1)
            } else {
                64 << 10
            }) {
                thread::sleep(pause);
                let mut send = Vec::with_capacity(piece.len() + 16);
                if chunked {
                    send.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                }
                send.extend_from_slice(piece);
                if chunked {
                    send.extend_from_slice(b"\r\n");
                }
                if stream.write_all(&send).is_err() {
                    break;
                }
            }
            if chunked {
                let _ = stream.write_all(b"0\r\n\r\n");
            }
        }
    });
    format!("http://{addr}")
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A running daemon, killed when dropped.
pub struct Daemon {
    child: Child,
    /// Where it listens.
    pub listen: String,
    /// Its log lines up to the one saying where it listens.
    pub log: Vec<String>,
    /// Its later log lines, as it writes them.
    lines: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `command` (the daemon, perhaps behind a wrapper) with
    /// `RUST_LOG=info` and waits until it logs where it listens.
    pub fn start(mut command: Command) -> Self {
        let mut child = command
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start router-daemon");
        let stdout = child.stdout.take().expect("stdout");
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
        Self {
            child,
            listen,
            log,
            lines: lines_rx,
        }
    }

    /// Waits up to `wait` for a log line containing `needle`, keeping the
    /// lines read on the way in [`Self::log`].
    pub fn wait_for_log(&mut self, needle: &str, wait: Duration) -> String {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let line = self.lines.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "no log line with {needle:?} within {wait:?}; log: {:#?}",
                    self.log
                )
            });
            self.log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill has no memory-safety preconditions.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill");
    }

    /// The exit status, if it has exited.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of `field` in `/proc/<pid>/status` (e.g. `CapEff`).
    pub fn status_field(&self, field: &str) -> String {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("read status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in {status}"))
            .trim()
            .to_owned()
    }

    /// Sends `request` on a new connection and reads until the daemon
    /// closes it.
    pub fn exchange(&self, request: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(&self.listen).expect("connect to the daemon");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.write_all(request).expect("send");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).expect("read");
        response
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        String::from_utf8_lossy(
            &self.exchange(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n"),
        )
        .into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
