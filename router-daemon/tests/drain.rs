//! SIGTERM while 100 streams run, on the real binary and every dataplane:
//! `/ready` turns 503 at once while `/health` stays 200, a kept-alive client
//! is told `connection: close` on its next response, new connections are
//! refused once the drain delay has passed, idle connections are closed,
//! every stream still completes byte for byte, and the daemon exits 0.
//!
//! The streams are held by a gated backend until the listener has closed,
//! so "in flight across the whole drain" does not depend on timing. The
//! one timed step is the request sent inside the drain delay, which is
//! long (5 s) next to what it has to cover.
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{Daemon, is_root};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// Streams running when the signal comes.
const STREAMS: usize = 100;
/// `--drain-delay-ms` of the daemon under test.
const DELAY: Duration = Duration::from_secs(5);
/// Bound on every wait, so a hang fails instead of stalling CI.
const WAIT: Duration = Duration::from_secs(30);
/// Events of each stream after the first.
const EVENTS: usize = 20;

/// The chunked body the backend sends for a request: a first event, then,
/// once the gate opens, [`EVENTS`] more and `[DONE]`.
fn stream_body() -> (Vec<u8>, Vec<u8>) {
    let chunk = |data: &str| {
        let event = format!("data: {data}\n\n");
        format!("{:x}\r\n{event}\r\n", event.len()).into_bytes()
    };
    let first = chunk("first");
    let mut rest = Vec::new();
    for i in 0..EVENTS {
        rest.extend(chunk(&format!("{{\"token\":{i}}}")));
    }
    rest.extend(chunk("[DONE]"));
    rest.extend_from_slice(b"0\r\n\r\n");
    (first, rest)
}

/// A kept-alive backend: a request whose body says `"wait"` gets its first
/// event at once and the rest when `gate` opens; any other is answered
/// whole at once.
async fn gated_backend(gate: watch::Receiver<bool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_backend(stream, gate.clone()));
        }
    });
    format!("http://{addr}")
}

async fn serve_backend(mut stream: TcpStream, mut gate: watch::Receiver<bool>) {
    let (first, rest) = stream_body();
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // One request: a head with a content-length, then that many bytes.
        let (head_len, body_len) = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |len| len.trim().parse::<usize>().expect("length"));
                break (end + 4, len);
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        while pending.len() < head_len + body_len {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        let waits = pending[head_len..head_len + body_len]
            .windows(4)
            .any(|w| w == b"wait");
        pending.drain(..head_len + body_len);
        let head: &[u8] =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if stream.write_all(&[head, &first].concat()).await.is_err() {
            return;
        }
        if waits && gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        if stream.write_all(&rest).await.is_err() {
            return;
        }
    }
}

fn completion(prompt: &str) -> Vec<u8> {
    let body = format!(r#"{{"model":"m","prompt":"{prompt}","stream":true}}"#);
    format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One response read off `stream`: its head (lowercase) and its chunked
/// body as sent, up to the last chunk.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> (String, Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n")
            && let Some(last) = pending[end..]
                .windows(5)
                .position(|w| w == b"0\r\n\r\n")
                .filter(|&at| pending[end + at - 2..end + at] == *b"\r\n")
        {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let body = pending[end + 4..end + last + 5].to_vec();
            pending.drain(..end + last + 5);
            return (head, body);
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the response continues within the bound")
            .expect("read");
        assert!(
            n > 0,
            "closed inside a response: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Reads until the first event of a stream has arrived.
async fn read_first_event(stream: &mut TcpStream, pending: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    while !pending.windows(11).any(|w| w == b"data: first") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the first event within the bound")
            .expect("read");
        assert!(n > 0, "closed before the first event");
        pending.extend_from_slice(&buf[..n]);
    }
}

/// A GET on a new connection: the status and head.
async fn get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("answered within the bound")
        .expect("read");
    String::from_utf8_lossy(&response).into_owned()
}

/// The daemon's requests in flight to its backends, from its `/metrics`.
async fn in_flight(admin: &str) -> usize {
    let metrics = get(admin, "/metrics").await;
    metrics
        .lines()
        .filter(|line| line.starts_with("router_backend_in_flight{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

/// Reads the rest of the body of a stream whose head is in `pending`.
async fn finish_stream(
    mut stream: TcpStream,
    mut pending: Vec<u8>,
) -> (String, Vec<u8>, TcpStream) {
    let (head, body) = read_response(&mut stream, &mut pending).await;
    (head, body, stream)
}

fn sigterm_while_streams_run(dataplane: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(drain_scenario(dataplane));
}

async fn drain_scenario(dataplane: &str) {
    let (gate, gated) = watch::channel(false);
    let backend = gated_backend(gated).await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_router-daemon"));
    command
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--backend", &backend, "--dataplane", dataplane])
        .args(["--discovery-interval-ms", "0", "--resolve-interval-ms", "0"])
        .args(["--drain-delay-ms", &DELAY.as_millis().to_string()])
        .args(["--drain-timeout-ms", "120000"]);
    let mut daemon = tokio::task::block_in_place(|| Daemon::start(command));
    let admin_line = tokio::task::block_in_place(|| daemon.wait_for_log("admin=", WAIT));
    let admin = admin_line
        .split("admin=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("admin address")
        .to_owned();
    let api = daemon.listen.clone();
    assert!(get(&admin, "/ready").await.starts_with("HTTP/1.1 200"));

    // The streams, each on its own kept-alive connection, all past their
    // first event.
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut stream = TcpStream::connect(&api).await.expect("connect");
        stream
            .write_all(&completion(&format!("wait {i}")))
            .await
            .expect("send");
        streams.push(stream);
    }
    let mut started = Vec::new();
    for mut stream in streams {
        let mut pending = Vec::new();
        read_first_event(&mut stream, &mut pending).await;
        started.push((stream, pending));
    }
    // A client with a second request pipelined behind its stream.
    let mut pipelined = TcpStream::connect(&api).await.expect("connect");
    pipelined
        .write_all(&[completion("wait pipelined"), completion("second")].concat())
        .await
        .expect("send");
    let mut pipelined_pending = Vec::new();
    read_first_event(&mut pipelined, &mut pipelined_pending).await;
    // Two kept-alive clients between requests: one sends again inside the
    // delay, one never does.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&api).await.expect("connect");
        stream.write_all(&completion("quick")).await.expect("send");
        let mut pending = Vec::new();
        let (head, _) = read_response(&mut stream, &mut pending).await;
        assert!(!head.contains("connection: close"), "{head}");
        idle.push(stream);
    }
    let (mut silent, mut returning) = (idle.pop().expect("two"), idle.pop().expect("two"));
    // The clients have read their whole responses, but the daemon may not
    // have finished with them yet on a starved machine, and a response it
    // is still finishing at the signal closes its connection after it (by
    // design: it could not say `connection: close`). Signal once its count
    // of requests in flight is down to the streams.
    let deadline = Instant::now() + WAIT;
    loop {
        let in_flight = in_flight(&admin).await;
        if in_flight == STREAMS + 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{in_flight} requests in flight, not the {STREAMS} streams and the pipelined one"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    // Readiness goes at once; liveness stays.
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = get(&admin, "/ready").await;
        if ready.starts_with("HTTP/1.1 503") {
            assert!(ready.contains("draining"), "{ready}");
            break;
        }
        assert!(Instant::now() < deadline, "/ready still says {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(get(&admin, "/health").await.starts_with("HTTP/1.1 200"));

    // Inside the delay: a kept-alive client is served and told to close.
    // When this fails, the time tells whether the delay had passed (a
    // starved machine) or the daemon closed the connection inside it.
    println!(
        "the returning client sends {:?} after the signal (delay {DELAY:?})",
        signalled.elapsed()
    );
    returning
        .write_all(&completion("quick"))
        .await
        .expect("send");
    let mut pending = Vec::new();
    let (head, _) = read_response(&mut returning, &mut pending).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, returning.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "closed after its response: {read:?}"
    );

    // After the delay new connections are refused, and idle ones closed.
    loop {
        match TcpStream::connect(&api).await {
            // A handshake that completed into the backlog just as the
            // listener closed is reset: ask again, the next is refused.
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => {
                assert!(
                    signalled.elapsed() < WAIT,
                    "connections are reset, not refused"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => {
                assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
                break;
            }
            Ok(_) => {
                assert!(signalled.elapsed() < WAIT, "the listener stays open");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        signalled.elapsed() >= DELAY,
        "the listener closed {:?} after the signal, before the delay",
        signalled.elapsed()
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, silent.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "an idle connection is closed: {read:?}"
    );
    assert!(
        daemon.try_wait().is_none(),
        "the daemon waits for its streams"
    );

    // The streams finish, byte for byte.
    gate.send_replace(true);
    let (first, tail) = stream_body();
    let expected = [first, tail].concat();
    let finishing: Vec<_> = started
        .into_iter()
        .map(|(stream, pending)| tokio::spawn(finish_stream(stream, pending)))
        .collect();
    for finished in finishing {
        let (head, body, mut stream) = finished.await.expect("stream task");
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert_eq!(body, expected, "a stream's bytes");
        // Its head went out before the signal; the connection closes after.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "closed after the stream: {read:?}"
        );
    }
    let (head, body) = read_response(&mut pipelined, &mut pipelined_pending).await;
    assert!(head.starts_with("http/1.1 200") && !head.contains("connection: close"));
    assert_eq!(body, expected);
    let (head, _) = read_response(&mut pipelined, &mut pipelined_pending).await;
    assert!(
        head.contains("connection: close"),
        "the pipelined request's response, begun in the drain: {head}"
    );

    // Then the daemon exits 0, having drained.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = daemon.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the daemon did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{status}");
    tokio::task::block_in_place(|| daemon.wait_for_log("drained", WAIT));
}

#[test]
fn sigterm_drains_userspace() {
    sigterm_while_streams_run("userspace");
}

#[test]
fn sigterm_drains_splice() {
    sigterm_while_streams_run("splice");
}

/// Whether the kernel dataplanes can run here: as root, or else skipped
/// (a failure where `ROUTER_REQUIRE_SOCKMAP` says they must run).
fn kernel_dataplanes_run() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("ROUTER_REQUIRE_SOCKMAP").is_none(),
        "ROUTER_REQUIRE_SOCKMAP is set, but the sockmap dataplanes need root"
    );
    eprintln!("skipped: the sockmap dataplanes need root");
    false
}

#[test]
fn sigterm_drains_sockmap() {
    if kernel_dataplanes_run() {
        sigterm_while_streams_run("sockmap");
    }
}

/// The default (`auto`) where it loads: the streams' bodies go from the
/// backend's send straight to the clients while the daemon drains.
#[test]
fn sigterm_drains_sockmap_send() {
    if kernel_dataplanes_run() {
        sigterm_while_streams_run("sockmap-send");
    }
}
