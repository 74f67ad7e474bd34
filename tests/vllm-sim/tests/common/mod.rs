//! Test harness: an in-process simulator and a minimal HTTP/1.1 client that
//! shows exactly what went over the wire.

#![allow(dead_code, reason = "each test binary uses its own subset")]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vllm_sim::Config;

/// Upper bound for any single network wait; tests never get near it.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A simulator serving on loopback until dropped or [`Sim::stop`]ped.
pub struct Sim {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), vllm_sim::Error>>>,
}

impl Sim {
    pub async fn start(config: Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(vllm_sim::serve(listener, config, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub async fn connect(&self) -> Conn {
        Conn::connect(self.addr).await
    }

    /// One request on a fresh connection.
    pub async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        let mut conn = self.connect().await;
        conn.send(method, path, &[], body).await;
        conn.response().await
    }

    pub async fn post(&self, path: &str, body: &str) -> Response {
        self.request("POST", path, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request("GET", path, None).await
    }

    /// The value of one `/metrics` series (name and labels, exactly).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.get("/metrics").await.text().to_owned();
        metric(&text, series)
    }

    /// Waits for the server to end on its own (a simulated crash) and
    /// returns how it ended.
    pub async fn join(mut self) -> Result<(), vllm_sim::Error> {
        let task = self.task.take().expect("not joined yet");
        tokio::time::timeout(TIMEOUT, task)
            .await
            .expect("the server ended in time")
            .expect("task ran")
    }

    /// Stops the server and checks it shut down cleanly.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(TIMEOUT, task).await;
            result
                .expect("shutdown in time")
                .expect("task ran")
                .expect("served cleanly");
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// The value of `series` (name and labels, exactly) in a `/metrics` text.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("JSON body expected ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<&str> {
        self.text()
            .split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .expect("every event is `data: …`")
            })
            .collect()
    }
}

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) {
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: sim\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        request.push_str(body.unwrap_or(""));
        self.stream
            .write_all(request.as_bytes())
            .await
            .expect("write request");
    }

    /// Reads more bytes; false at end of stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
            .await
            .expect("server answered in time")
            .expect("read");
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Takes exactly `n` buffered-or-read bytes.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    async fn take_line(&mut self) -> String {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..at + 2).collect();
                return String::from_utf8(line[..at].to_vec()).expect("ASCII line");
            }
            assert!(self.fill().await, "connection closed mid-line");
        }
    }

    /// Reads one response (content-length or chunked body).
    pub async fn response(&mut self) -> Response {
        let (status, headers, head_len) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut parsed);
            if let httparse::Status::Complete(len) = response.parse(&self.buf).expect("valid head")
            {
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (response.code.expect("status"), headers, len);
            }
            assert!(self.fill().await, "connection closed before a response");
        };
        self.buf.drain(..head_len);
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            let mut body = Vec::new();
            loop {
                let size_line = self.take_line().await;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .expect("hex chunk size");
                if size == 0 {
                    // No trailers are sent: the final empty line.
                    assert_eq!(self.take_line().await, "");
                    break body;
                }
                body.extend(self.take(size).await);
                assert_eq!(self.take_line().await, "");
            }
        } else {
            let len = header("content-length").map_or(0, |v| v.parse().expect("numeric length"));
            self.take(len).await
        };
        Response {
            status,
            headers,
            body,
        }
    }

    /// Whether the server closed the connection (reads EOF with nothing
    /// left over).
    pub async fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }

    /// Sends a request and drops the connection after the first body bytes.
    pub async fn read_some(&mut self) {
        assert!(self.fill().await, "some response expected");
    }

    /// Reads until the bytes received so far contain `needle` (they stay
    /// buffered for [`Self::response`]).
    pub async fn wait_for(&mut self, needle: &[u8]) {
        while !self.buf.windows(needle.len()).any(|w| w == needle) {
            assert!(
                self.fill().await,
                "connection closed before {:?}",
                String::from_utf8_lossy(needle)
            );
        }
    }

    /// Reads until the server closes the connection (FIN or RST); returns
    /// everything received.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut chunk = [0u8; 8192];
        loop {
            let read = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("the server closed the connection in time");
            match read {
                Ok(0) => return std::mem::take(&mut self.buf),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {
                    return std::mem::take(&mut self.buf);
                }
                Err(error) => panic!("read: {error}"),
            }
        }
    }
}
