//! A client that stops reading never makes the backend spin, on every
//! dataplane: the backend's sends wait, as they would on a direct
//! connection (so nothing queues the stream for the client without bound),
//! and the client later gets every byte.
//!
//! The backend here is what vLLM's asyncio server is: a non-blocking socket
//! whose writes, on EAGAIN, wait for the socket to say it is writable. A
//! redirect at the backend's own send (`sockmap-send`) that failed for lack
//! of room on the client would return EAGAIN while the backend's socket
//! still says writable, and such a backend would retry at once, forever.
use std::{
    io::{self, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    thread,
    time::Duration,
};

use integration_tests::{dataplane_or_skip, dechunk, each_mode, start_router};
use router_daemon::dataplane::Mode;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Body bytes the backend streams: more than every buffer between it and
/// the stalled client holds (socket buffers on loopback grow to a few MiB
/// each), so its sends must wait.
const TOTAL: usize = 48 << 20;
/// One SSE event's payload; one chunk and one write each.
const EVENT: usize = 1000;
/// How long the client reads nothing after the response head.
const STALL: Duration = Duration::from_secs(1);

/// What the backend saw while streaming.
#[derive(Debug, Default)]
struct Sends {
    /// Writes that returned EAGAIN: the backend waited for room.
    would_block: u64,
    /// Writes that returned EAGAIN right after the socket said it was
    /// writable: a backend that trusts its socket retries these at once.
    spins: u64,
    /// A write that failed otherwise (EPIPE for a client it never saw).
    error: Option<String>,
}

/// Waits (bounded) until `stream` is writable; false on timeout.
fn wait_writable(stream: &TcpStream) -> bool {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
    ready == 1
}

/// Writes all of `bytes` the way an asyncio server does, counting waits.
fn send_all(stream: &mut TcpStream, mut bytes: &[u8], sends: &mut Sends) -> io::Result<()> {
    let mut just_woke = false;
    while !bytes.is_empty() {
        match stream.write(bytes) {
            Ok(n) => {
                bytes = &bytes[n..];
                just_woke = false;
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                sends.would_block += 1;
                if just_woke {
                    sends.spins += 1;
                    assert!(sends.spins < 1_000_000, "the backend spun on EAGAIN");
                }
                if !wait_writable(stream) {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "never writable"));
                }
                just_woke = true;
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Reads one request head and its `Content-Length` body; the request line,
/// or `None` when the peer closed.
fn read_request(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let body = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|len| len.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut rest = vec![0u8; body];
    stream.read_exact(&mut rest).ok()?;
    head.lines().next().map(str::to_owned)
}

/// The chunked SSE body the backend streams.
fn events() -> Vec<Vec<u8>> {
    (0..TOTAL / EVENT)
        .map(|i| {
            let mut event = format!("data: {i:010} ").into_bytes();
            event.resize(EVENT - 2, b'x');
            event.extend_from_slice(b"\n\n");
            let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
            chunk.extend_from_slice(&event);
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect()
}

/// Serves one connection: small answers to probes, the stream to a POST.
fn serve(mut stream: TcpStream, report: mpsc::Sender<Sends>) {
    while let Some(line) = read_request(&mut stream) {
        if !line.starts_with("post") {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
            continue;
        }
        stream.set_nonblocking(true).expect("a non-blocking socket");
        let mut sends = Sends::default();
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut result = send_all(&mut stream, head, &mut sends);
        for chunk in events() {
            if result.is_err() {
                break;
            }
            result = send_all(&mut stream, &chunk, &mut sends);
        }
        if result.is_ok() {
            result = send_all(&mut stream, b"0\r\n\r\n", &mut sends);
        }
        sends.error = result.err().map(|err| err.to_string());
        let _ = report.send(sends);
        return;
    }
}

/// A backend on a plain thread per connection, non-blocking while it
/// streams; reports what its stream's sends saw.
fn stream_backend() -> (String, mpsc::Receiver<Sends>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let addr = listener.local_addr().expect("its address");
    let (report, reports) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let report = report.clone();
            thread::spawn(move || serve(stream, report));
        }
    });
    (format!("http://{addr}"), reports)
}

async fn a_stalled_client_does_not_make_the_backend_spin(mode: Mode) {
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    let (backend, reports) = stream_backend();
    let (router, _stop) = start_router(vec![backend], dataplane).await;
    let mut client = tokio::net::TcpStream::connect(router)
        .await
        .expect("connect to the router");
    let body = br#"{"model":"m","prompt":"stream a lot","stream":true}"#;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: router\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    client.write_all(request.as_bytes()).await.expect("send");
    client.write_all(body).await.expect("send the body");
    let mut received = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf).await.expect("read the head");
        assert!(n > 0, "the router closed before the head");
        received.extend_from_slice(&buf[..n]);
    }
    tokio::time::sleep(STALL).await;
    let read_all = async {
        while !received.ends_with(b"0\r\n\r\n") {
            let n = client.read(&mut buf).await.expect("read the body");
            assert!(n > 0, "the router closed after {} bytes", received.len());
            received.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the stream finished within a minute");
    let sends = tokio::task::spawn_blocking(move || {
        reports
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend's report")
    })
    .await
    .expect("the report thread");
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let body = dechunk(&received[head_end..]);
    let expected: Vec<u8> = events()
        .iter()
        .flat_map(|chunk| dechunk_one(chunk).to_vec())
        .collect();
    assert!(
        body == expected,
        "the client's body differs from the stream"
    );
    assert_eq!(sends.error, None, "a backend send failed: {sends:?}");
    // On the receive hook this is the credit's work: without it the
    // kernel worker queued all 48 MiB for the stalled client, and the
    // backend never waited.
    assert!(
        sends.would_block > 0,
        "the backend never had to wait, so the client's stall tested nothing: {sends:?}"
    );
    // A wake-up can race with a reader that took the room first; a spin is
    // thousands of them.
    assert!(
        sends.spins <= 20,
        "the backend's socket said writable and its send then failed {} times: {sends:?}",
        sends.spins
    );
}

/// The data of one `size CRLF data CRLF` chunk.
fn dechunk_one(chunk: &[u8]) -> &[u8] {
    let start = chunk
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a size line")
        + 2;
    &chunk[start..chunk.len() - 2]
}

each_mode!(a_stalled_client_does_not_make_the_backend_spin);
