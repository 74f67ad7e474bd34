//! Moving responses from backends to clients over kept-alive connections.
//!
//! `Dataplane::exchange` runs one request on a backend connection: it
//! writes the request, reads the response head itself (the router needs the
//! status and the body's framing), writes the head to the client, then moves
//! the body until `BodyTracker` says it has ended, so the backend
//! connection can go back to the pool (`upstream`) for the next request, whichever
//! client sends it. Three modes move the body:
//! - [`Mode::Sockmap`]: the kernel program in `router-ebpf` redirects body
//!   bytes from the backend socket to the client socket while it can follow
//!   the framing; the daemon sees the head, the skb that ends the body, and
//!   anything the program passed up (see `sockmap.rs` for the hand-over
//!   protocol). Needs privilege.
//! - [`Mode::Splice`]: `splice(2)` moves length-delimited runs through a
//!   pipe without copying them into the daemon; chunk-size lines are peeked
//!   (`MSG_PEEK`) to find the next run. Unprivileged.
//! - [`Mode::Userspace`]: a read/write loop in the daemon. Works everywhere.
//!
//! While a response is relayed the daemon keeps reading the client: bytes of
//! a pipelined request wait in `Client::pending` (so responses go out in
//! request order), and the client's FIN is passed on to the backend as a
//! half-close, which makes vLLM abort a generation nobody will read.
mod copy_buffer;
pub(crate) mod listen;
mod pipe;
mod sockmap;
mod tcp;

use std::{
    io::{self, IoSlice},
    net::SocketAddr,
    pin::Pin,
    time::{Duration, Instant},
};

use router_common::{Control, Framing, Stat};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
    time::Sleep,
};

pub use self::sockmap::SockmapError;
use self::{
    pipe::Pipe,
    sockmap::{BackendSlot, ClientSlot, Sockmap},
};
use crate::{
    error::Timeout,
    http::response::{self, BodyFraming, BodyTracker, FramingError, ResponseHead},
};

/// How long to wait for the kernel to hand redirected bytes to a client socket
/// before giving up on the connection.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffer for response bytes that pass through the daemon.
const COPY_BUFFER: usize = copy_buffer::SIZE;
/// Default of [`Dataplane::with_pipelined_limit`] (`--max-pipelined-bytes`).
pub(crate) const PIPELINED_LIMIT: usize = 1 << 20;
/// Window peeked at to read chunk-size lines in splice mode.
const PEEK_WINDOW: usize = 4 * 1024;
/// A deadline that never comes, for a timeout turned off.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long a backend may keep a response waiting; `None` waits forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseTimeouts {
    /// From the request's first byte sent to the response's first byte
    /// (`--first-byte-timeout-ms`). Queueing and prefill come before it,
    /// and for a request that does not stream, the whole generation.
    pub(crate) first_byte: Option<Duration>,
    /// The longest silence between response bytes once the response began
    /// (`--response-idle-timeout-ms`): a stream's gap between tokens.
    pub(crate) idle: Option<Duration>,
}

impl ResponseTimeouts {
    /// Defaults of the flags: 5 minutes to the first byte, 1 minute idle.
    pub(crate) const DEFAULT: Self = Self {
        first_byte: Some(Duration::from_secs(300)),
        idle: Some(Duration::from_secs(60)),
    };
}

/// A dataplane mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Body bytes are redirected to the client by the sockmap program.
    Sockmap,
    /// Body bytes move through a pipe with splice(2).
    Splice,
    /// Body bytes are copied through the daemon.
    Userspace,
}

impl Mode {
    /// The mode's name, as used by `--dataplane` and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Sockmap => "sockmap",
            Mode::Splice => "splice",
            Mode::Userspace => "userspace",
        }
    }
}

/// The `--dataplane` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Requested {
    /// The measured default: `userspace` (see the README's dataplane
    /// numbers: lowest CPU per streamed token on this class of machine).
    Auto,
    /// The sockmap dataplane, or fail to start.
    Sockmap,
    /// The splice(2) dataplane.
    Splice,
    /// The userspace dataplane.
    #[value(alias = "copy")]
    Userspace,
}

/// The dataplane in use; shared by all connections.
#[derive(Debug)]
pub struct Dataplane {
    engine: Engine,
    /// Most bytes of pipelined requests read ahead per client while a
    /// response is relayed.
    pipelined_limit: usize,
    /// How long a backend may keep a response waiting.
    timeouts: ResponseTimeouts,
}

#[derive(Debug)]
enum Engine {
    Userspace,
    Splice,
    /// Boxed: it holds the loaded object, and exists once per daemon.
    Sockmap(Box<Sockmap>),
}

/// How the bytes of one response reached the client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Relayed {
    /// Response head bytes, written by the daemon.
    pub(crate) head: u64,
    /// Body bytes the sockmap program redirected to the client.
    pub(crate) redirected: u64,
    /// Body bytes moved through a pipe with splice(2).
    pub(crate) piped: u64,
    /// Body bytes the daemon copied to the client.
    pub(crate) copied: u64,
}

impl Relayed {
    /// Whether any response byte reached the client.
    pub(crate) fn any(&self) -> bool {
        self.head + self.redirected + self.piped + self.copied > 0
    }
}

/// One request to send on a backend connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Forward<'a> {
    /// The whole request: head and body.
    pub(crate) request: &'a [u8],
    /// The request is `HEAD`: its response has no body.
    pub(crate) head_request: bool,
    /// The client asked to close after this response; the head relayed to
    /// it says `connection: close`.
    pub(crate) client_close: bool,
    /// A 503 head is not relayed but returned as
    /// [`RelayError::Unavailable`], so the request can go to another
    /// backend.
    pub(crate) retry_unavailable: bool,
}

/// How one exchange went.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exchanged {
    /// Where the response bytes went.
    pub(crate) relayed: Relayed,
    /// The response status.
    pub(crate) status: u16,
    /// From the request written to the response's first byte.
    pub(crate) first_byte: Duration,
    /// The backend connection is clean and can carry another request.
    pub(crate) backend_reusable: bool,
    /// The client can send another request on its connection.
    pub(crate) client_keep_alive: bool,
}

/// Why an exchange stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RelayError {
    /// Writing the request to the backend failed; nothing reached the client.
    #[error("sending the request to the backend: {0}")]
    BackendWrite(io::Error),
    /// The backend closed or reset before any response byte; nothing
    /// reached the client. On a reused connection this is a stale keep-alive
    /// and the request may be sent again.
    #[error("the backend closed the connection without a response: {0}")]
    NoResponse(io::Error),
    /// The backend sent bytes that are not a valid HTTP/1.1 response.
    #[error("invalid response from the backend: {source}")]
    BadResponse {
        /// What reached the client before.
        relayed: Relayed,
        /// What was wrong.
        source: FramingError,
    },
    /// The backend failed mid-response.
    #[error("backend failed mid-response after {relayed:?}: {source}")]
    Backend {
        /// What reached the client before the failure.
        relayed: Relayed,
        /// The backend's error.
        source: io::Error,
    },
    /// The backend kept the response waiting past `timeout`.
    #[error("the backend sent nothing for {} ms ({})", after.as_millis(), timeout.flag())]
    TimedOut {
        /// Which wait passed its bound.
        timeout: Timeout,
        /// The bound.
        after: Duration,
        /// What reached the client before.
        relayed: Relayed,
    },
    /// The backend answered 503 and [`Forward::retry_unavailable`] was set:
    /// nothing reached the client, and the backend connection is not
    /// reused (its body was not read).
    #[error("the backend answered 503")]
    Unavailable,
    /// The client connection failed or was reset.
    #[error("client went away: {0}")]
    Client(io::Error),
    /// A kernel map operation failed.
    #[error("sockmap: {0}")]
    Sockmap(#[from] SockmapError),
}

impl RelayError {
    /// True when the backend answered nothing and nothing reached the
    /// client: the request may be sent again if the connection was a reused
    /// one (a keep-alive the backend closed while it was idle).
    pub(crate) fn unanswered(&self) -> bool {
        matches!(
            self,
            RelayError::NoResponse(_) | RelayError::BackendWrite(_)
        )
    }

    /// Whose fault the failure is.
    pub(crate) fn fault(&self) -> crate::error::Fault {
        match self {
            RelayError::Client(_) => crate::error::Fault::Client,
            RelayError::Sockmap(_) => crate::error::Fault::Internal,
            _ => crate::error::Fault::Backend,
        }
    }
}

impl Dataplane {
    /// The userspace dataplane.
    pub fn userspace() -> Self {
        Self {
            engine: Engine::Userspace,
            pipelined_limit: PIPELINED_LIMIT,
            timeouts: ResponseTimeouts::DEFAULT,
        }
    }

    /// The splice(2) dataplane.
    pub fn splice() -> Self {
        Self {
            engine: Engine::Splice,
            pipelined_limit: PIPELINED_LIMIT,
            timeouts: ResponseTimeouts::DEFAULT,
        }
    }

    /// The sockmap dataplane: loads and attaches the embedded program.
    pub fn sockmap() -> Result<Self, SockmapError> {
        Ok(Self {
            engine: Engine::Sockmap(Box::new(Sockmap::load()?)),
            pipelined_limit: PIPELINED_LIMIT,
            timeouts: ResponseTimeouts::DEFAULT,
        })
    }

    fn sockmap_engine(&self) -> Option<&Sockmap> {
        match &self.engine {
            Engine::Sockmap(sockmap) => Some(sockmap),
            Engine::Splice | Engine::Userspace => None,
        }
    }

    /// The dataplane for a `--dataplane` choice, and a sentence saying why.
    ///
    /// `auto` is `userspace`: measured on this class of machine, it costs
    /// the least CPU per streamed token (the README has the numbers). It
    /// still reports whether the kernel path would load, so the log says
    /// what `--dataplane sockmap` would do here.
    pub fn select(requested: Requested) -> Result<(Self, String), SockmapError> {
        match requested {
            Requested::Userspace => Ok((Self::userspace(), "requested with --dataplane".into())),
            Requested::Splice => Ok((Self::splice(), "requested with --dataplane".into())),
            Requested::Sockmap => Ok((Self::sockmap()?, "requested with --dataplane".into())),
            Requested::Auto => {
                let kernel = match sockmap::supported_kernel().and_then(|()| Sockmap::load()) {
                    Ok(_) => "the sockmap program would load here (--dataplane sockmap)".into(),
                    Err(err) => format!("sockmap unavailable here: {err}"),
                };
                release_freed_heap();
                Ok((
                    Self::userspace(),
                    format!(
                        "auto: userspace, the measured default (least CPU per streamed token); {kernel}"
                    ),
                ))
            }
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        match self.engine {
            Engine::Sockmap(_) => Mode::Sockmap,
            Engine::Splice => Mode::Splice,
            Engine::Userspace => Mode::Userspace,
        }
    }

    /// The kernel program's counters, summed over CPUs (sockmap only).
    pub(crate) fn kernel_stats(&self) -> Option<Vec<(Stat, u64)>> {
        self.sockmap_engine().map(Sockmap::stats)
    }

    /// Sockets registered with the kernel program (sockmap only): clients
    /// and backends.
    pub(crate) fn sockets_in_maps(&self) -> Option<(usize, usize)> {
        self.sockmap_engine().map(Sockmap::sockets_len)
    }

    /// Backend connections with kernel map entries (sockmap only): pooled
    /// or carrying a response.
    pub(crate) fn backend_entries(&self) -> Option<usize> {
        self.sockmap_engine().map(Sockmap::backend_entries)
    }

    /// The same dataplane, reading at most `bytes` of pipelined requests
    /// ahead per client while a response is relayed: past it the client is
    /// not read until the response ends (TCP then pushes back on it).
    #[must_use]
    pub(crate) fn with_pipelined_limit(self, bytes: usize) -> Self {
        Self {
            pipelined_limit: bytes,
            ..self
        }
    }

    /// The same dataplane, cutting responses short by `timeouts`: with a
    /// 504 when nothing reached the client yet, else by closing its
    /// connection. Either way the backend connection closes, which makes
    /// vLLM abort the request.
    #[must_use]
    pub(crate) fn with_response_timeouts(self, timeouts: ResponseTimeouts) -> Self {
        Self { timeouts, ..self }
    }

    /// Prepares a client connection for exchanges.
    pub(crate) fn client(&self, stream: TcpStream) -> Client {
        Client {
            pipelined_limit: self.pipelined_limit,
            held_back: false,
            slot: None,
            pipe: None,
            stream,
            delivered: 0,
            unflushed: false,
            pending: Vec::new(),
            eof: false,
        }
    }

    /// Opens a connection to a backend; with sockmap, hands it to the kernel
    /// program before any byte is sent (hand-over steps 2 and 3).
    pub(crate) async fn connect(&self, addr: SocketAddr) -> io::Result<BackendConn> {
        let stream = TcpStream::connect(addr).await?;
        // Requests are written whole; they must not wait for Nagle.
        stream.set_nodelay(true)?;
        let slot = match self.sockmap_engine() {
            Some(sockmap) => match sockmap.add_backend(&stream) {
                Ok(slot) => Some(slot),
                Err(err) => {
                    tracing::debug!(%err, "sockmap refused a backend socket; copying its responses");
                    None
                }
            },
            None => None,
        };
        Ok(BackendConn {
            slot,
            stream,
            read: 0,
            generation: 0,
            redirected_seen: 0,
            idle_since: Instant::now(),
        })
    }

    /// Sends `forward.request` on `backend` and relays the response to
    /// `client`, up to the end of its body.
    ///
    /// `watch` hears of the response's body as it arrives
    /// ([`Watch::first_body`], [`Watch::body_gap`]) and of its end ([`Watch::ended`]), which comes
    /// once the backend has sent its last byte, before that byte reaches the
    /// client: a client that sends its next request as soon as it has the
    /// answer never finds the previous one still counted.
    ///
    /// On return every relayed byte has been handed to the client socket, so
    /// the caller may write to it or close it.
    pub(crate) async fn exchange<W: Watch>(
        &self,
        client: &mut Client,
        backend: &mut BackendConn,
        forward: &Forward<'_>,
        watch: W,
    ) -> Result<Exchanged, RelayError> {
        let mut buf = copy_buffer::take();
        let result = self
            .exchange_with(client, backend, forward, &mut buf, watch)
            .await;
        copy_buffer::give(buf);
        result
    }

    async fn exchange_with<W: Watch>(
        &self,
        client: &mut Client,
        backend: &mut BackendConn,
        forward: &Forward<'_>,
        buf: &mut Vec<u8>,
        watch: W,
    ) -> Result<Exchanged, RelayError> {
        let writing = Instant::now();
        let first_byte_due = writing + self.timeouts.first_byte.unwrap_or(NEVER);
        // One timer per exchange, moved only when it fires (see
        // `Relay::on_timer`), not per read: it first fires at the nearer
        // bound, so no move is needed when the response begins.
        let idle = self.timeouts.idle.unwrap_or(NEVER);
        let timer = tokio::time::sleep_until(first_byte_due.min(writing + idle).into());
        tokio::pin!(timer);
        let mut relay = Relay {
            relayed: Relayed::default(),
            reusable: true,
            watch,
            ended: false,
            sent: writing,
            last_body: None,
            gaps: true,
            timer,
            timeouts: self.timeouts,
            first_byte_due,
            responding: false,
            waiting_since: writing,
            kernel_mark: backend.redirected_seen,
        };
        relay.send(backend, forward.request).await?;
        let started = Instant::now();
        relay.sent = started;
        if client.eof {
            relay.half_close(backend);
        }

        let (head, first_byte) = relay
            .read_head(client, backend, forward.head_request, buf, started)
            .await?;
        if forward.retry_unavailable && head.status == 503 && !relay.relayed.any() {
            return Err(RelayError::Unavailable);
        }
        if !head.keep_alive {
            relay.reusable = false;
        }
        let client_keep_alive =
            !forward.client_close && !head.says_close && head.body != BodyFraming::UntilClose;
        let tracker = relay
            .write_head(client, &head, forward.client_close, buf)
            .await?;
        if !tracker.is_done() {
            self.move_body(&mut relay, client, backend, tracker, buf)
                .await?;
        }
        client.flushed().await?;
        Ok(Exchanged {
            relayed: relay.relayed,
            status: head.status,
            first_byte,
            backend_reusable: relay.reusable && !client.eof,
            client_keep_alive,
        })
    }

    /// Moves the rest of a body by this dataplane's engine (sockmap falls
    /// back to copying for a socket the kernel map refused).
    async fn move_body<W: Watch>(
        &self,
        relay: &mut Relay<'_, W>,
        client: &mut Client,
        backend: &mut BackendConn,
        tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        let sockmap = match &self.engine {
            Engine::Userspace => return relay.copy_body(client, backend, tracker, buf).await,
            Engine::Splice => return relay.splice_body(client, backend, tracker, buf).await,
            Engine::Sockmap(sockmap) => sockmap,
        };
        if client.slot.is_none() {
            match sockmap.add_client(&client.stream) {
                Ok(slot) => client.slot = Some(slot),
                Err(err) => tracing::debug!(%err, "sockmap refused the client socket"),
            }
        }
        match (
            backend.slot.is_some(),
            client.slot.as_ref().map(ClientSlot::cookie),
        ) {
            (true, Some(cookie)) => {
                relay
                    .sockmap_body(client, backend, cookie, tracker, buf)
                    .await
            }
            _ => relay.copy_body(client, backend, tracker, buf).await,
        }
    }
}

/// What the caller of [`Dataplane::exchange`] hears of a response while it
/// arrives from the backend: for its in-flight counts and latency
/// histograms. Calls are cheap and never block.
pub(crate) trait Watch: Send {
    /// The response body's first bytes arrived from the backend (a
    /// stream's first token), `since_sent` after the request was written.
    /// On the sockmap dataplane the kernel moves body bytes unseen, so this
    /// is when the daemon first learns of them.
    fn first_body(&mut self, since_sent: Duration);
    /// Later body bytes arrived, `gap` after the read before (streamed
    /// tokens); not called for bytes the kernel redirects.
    fn body_gap(&mut self, gap: Duration);
    /// The backend has sent the whole response; called at most once, and
    /// not when the exchange fails.
    fn ended(&mut self);
}

/// The state of one response on its way.
struct Relay<'t, W: Watch> {
    relayed: Relayed,
    /// The backend connection can carry another request afterwards.
    reusable: bool,
    watch: W,
    /// `watch` has heard of the end.
    ended: bool,
    /// When the request was written.
    sent: Instant,
    /// When body bytes were last read; None before the first.
    last_body: Option<Instant>,
    /// Gaps between reads are the stream's own (false while the kernel
    /// redirects the body, whose reads the daemon does not see).
    gaps: bool,
    /// Fires at the first-byte deadline, then at the idle one; waits for
    /// the backend select on it.
    timer: Pin<&'t mut Sleep>,
    timeouts: ResponseTimeouts,
    /// When the first response byte is due.
    first_byte_due: Instant,
    /// Some response byte has arrived: the idle timeout applies.
    responding: bool,
    /// When the current wait for the backend began.
    waiting_since: Instant,
    /// The kernel program's redirected count when last looked at for the
    /// idle timeout (sockmap: redirected bytes are activity too).
    kernel_mark: u64,
}

impl<W: Watch> Relay<'_, W> {
    /// Writes the request to the backend, within the first-byte timeout.
    async fn send(&mut self, backend: &mut BackendConn, request: &[u8]) -> Result<(), RelayError> {
        let write = backend.stream.write_all(request);
        tokio::pin!(write);
        loop {
            tokio::select! {
                biased;
                written = &mut write => return written.map_err(RelayError::BackendWrite),
                () = self.timer.as_mut() => self.on_timer(None)?,
            }
        }
    }

    /// The timer fired while the daemon waited for the backend: a timeout
    /// if the wait really passed its bound, else the timer moves to the
    /// bound (it is left behind as bytes arrive, to keep reads free of
    /// timer updates).
    /// `slot` is the backend's registration with the kernel program, whose
    /// progress counts as the response's (sockmap).
    fn on_timer(&mut self, slot: Option<&BackendSlot>) -> Result<(), RelayError> {
        let now = Instant::now();
        let idle = self.timeouts.idle.unwrap_or(NEVER);
        let due = if self.responding {
            if !self.gaps
                && let Some(slot) = slot
                && let Ok(progress) = slot.progress()
                && progress.redirected != self.kernel_mark
            {
                // The kernel moved body bytes the daemon did not see.
                self.kernel_mark = progress.redirected;
                self.waiting_since = now;
            }
            self.waiting_since + idle
        } else {
            self.first_byte_due
        };
        if now < due {
            // Before the first byte, the timer still wakes every idle
            // bound, so it never sits past a response's idle deadline.
            let next = if self.responding {
                due
            } else {
                due.min(now + idle)
            };
            self.timer.as_mut().reset(next.into());
            return Ok(());
        }
        Err(self.timed_out(if self.responding {
            Timeout::ResponseIdle
        } else {
            Timeout::FirstByte
        }))
    }

    fn timed_out(&self, timeout: Timeout) -> RelayError {
        let after = match timeout {
            Timeout::ResponseIdle => self.timeouts.idle,
            _ => self.timeouts.first_byte,
        };
        RelayError::TimedOut {
            timeout,
            after: after.unwrap_or(NEVER),
            relayed: self.relayed,
        }
    }

    /// Reads the response head into `buf`, passing any interim (1xx)
    /// responses on to the client; returns it with the time from `sent` to
    /// its first byte.
    async fn read_head(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        head_request: bool,
        buf: &mut Vec<u8>,
        sent: Instant,
    ) -> Result<(ResponseHead, Duration), RelayError> {
        buf.clear();
        let mut first_byte = None;
        loop {
            match response::parse_head(buf, head_request) {
                Ok(Some(head)) if head.interim => {
                    client.write(&buf[..head.len]).await?;
                    self.relayed.head += head.len as u64;
                    buf.drain(..head.len);
                    continue;
                }
                Ok(Some(head)) => {
                    return Ok((head, first_byte.unwrap_or_default()));
                }
                Ok(None) => {}
                Err(source) => return Err(self.bad_response(source)),
            }
            buf.reserve(COPY_BUFFER);
            let n = self.read(client, backend, buf).await?;
            if first_byte.is_none() && n > 0 {
                first_byte = Some(sent.elapsed());
                // From now on silences are bounded by the idle timeout.
                self.responding = true;
            }
            if n == 0 {
                let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before a response");
                return Err(if self.relayed.any() {
                    self.backend_error(eof)
                } else {
                    RelayError::NoResponse(eof)
                });
            }
        }
    }

    /// Writes `head` (in `buf`, with the body bytes that came after it) to
    /// the client, in one write when it goes out as it came, and returns
    /// the tracker of the rest of the body. With `client_close`, the client
    /// is told the connection ends, as it asked.
    async fn write_head(
        &mut self,
        client: &mut Client,
        head: &ResponseHead,
        client_close: bool,
        buf: &[u8],
    ) -> Result<BodyTracker, RelayError> {
        let mut tracker = BodyTracker::new(head.body);
        let with_head = buf.len() - head.len;
        let used = tracker
            .advance(&buf[head.len..])
            .map_err(|source| self.bad_response(source))?;
        if used < with_head {
            // Bytes past the end of the response: the backend is out of step.
            self.reusable = false;
        }
        if used > 0 {
            self.body_read();
        }
        self.ended_if(&tracker);
        if client_close && !head.says_close {
            // One write, as for a kept-alive client: every extra write is
            // another loopback delivery and wake-up of the client.
            let blank = head.len - 2;
            client
                .write_parts(&mut [
                    IoSlice::new(&buf[..blank]),
                    IoSlice::new(b"connection: close\r\n\r\n"),
                    IoSlice::new(&buf[head.len..head.len + used]),
                ])
                .await?;
            self.relayed.head += head.len as u64 + 19;
        } else {
            client.write(&buf[..head.len + used]).await?;
            self.relayed.head += head.len as u64;
        }
        self.relayed.copied += used as u64;
        Ok(tracker)
    }

    /// Tells the watch once the body has ended.
    fn ended_if(&mut self, tracker: &BodyTracker) {
        if tracker.is_done() {
            self.end();
        }
    }

    fn end(&mut self) {
        if !std::mem::replace(&mut self.ended, true) {
            self.watch.ended();
        }
    }

    /// Body bytes arrived now.
    fn body_read(&mut self) {
        let now = Instant::now();
        match self.last_body.replace(now) {
            None => self.watch.first_body(now.duration_since(self.sent)),
            Some(last) if self.gaps => self.watch.body_gap(now.duration_since(last)),
            Some(_) => {}
        }
    }

    fn backend_error(&self, source: io::Error) -> RelayError {
        RelayError::Backend {
            relayed: self.relayed,
            source,
        }
    }

    fn bad_response(&self, source: FramingError) -> RelayError {
        RelayError::BadResponse {
            relayed: self.relayed,
            source,
        }
    }

    /// The body's end came before the framing said: an error unless the
    /// body is delimited by close.
    fn end_of_stream(&mut self, tracker: &BodyTracker) -> Result<(), RelayError> {
        self.reusable = false;
        self.end();
        if tracker.until_close() {
            Ok(())
        } else {
            Err(self.backend_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the backend closed mid-response",
            )))
        }
    }

    /// Passes the client's half-close on to the backend; that connection
    /// cannot carry another request.
    fn half_close(&mut self, backend: &BackendConn) {
        tcp::shut_write(&backend.stream);
        self.reusable = false;
    }

    /// Waits until the backend socket is readable, reading the client
    /// meanwhile: pipelined bytes are kept, and its FIN is passed on.
    async fn backend_readable(
        &mut self,
        client: &mut Client,
        backend: &BackendConn,
    ) -> Result<(), RelayError> {
        self.waiting_since = Instant::now();
        loop {
            let full = client.pending.len() >= client.pipelined_limit;
            client.held_back |= full && !client.eof;
            let watch_client = !client.eof && !full;
            tokio::select! {
                // The backend first: a timer that fires along with its
                // bytes is not a timeout.
                biased;
                ready = backend.stream.readable() => {
                    return ready.map_err(|source| self.backend_error(source));
                }
                read = client.read_more(), if watch_client => match read {
                    Ok(0) => {
                        client.eof = true;
                        self.half_close(backend);
                    }
                    Ok(_) => {}
                    Err(err) => return Err(RelayError::Client(err)),
                },
                () = self.timer.as_mut() => self.on_timer(backend.slot.as_ref())?,
            }
        }
    }

    /// Reads what the backend has into the spare capacity of `buf`; `Ok(0)`
    /// at end of stream.
    async fn read(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        buf: &mut Vec<u8>,
    ) -> Result<usize, RelayError> {
        loop {
            self.backend_readable(client, backend).await?;
            match tcp::read_draining(&backend.stream, buf) {
                Ok(n) => {
                    backend.read += n as u64;
                    return Ok(n);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => {
                    return Err(if self.relayed.any() {
                        self.backend_error(err)
                    } else {
                        RelayError::NoResponse(err)
                    });
                }
            }
        }
    }

    /// Feeds `bytes` (read from the backend) to the tracker and writes the
    /// part that belongs to this response.
    async fn copy_out(
        &mut self,
        client: &mut Client,
        tracker: &mut BodyTracker,
        bytes: &[u8],
    ) -> Result<(), RelayError> {
        let used = tracker
            .advance(bytes)
            .map_err(|source| self.bad_response(source))?;
        if used > 0 {
            self.body_read();
        }
        self.ended_if(tracker);
        client.write(&bytes[..used]).await?;
        self.relayed.copied += used as u64;
        if used < bytes.len() {
            self.reusable = false;
        }
        Ok(())
    }

    /// Userspace: read, follow the framing, write.
    async fn copy_body(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        mut tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        while !tracker.is_done() {
            buf.clear();
            buf.reserve(COPY_BUFFER);
            if self.read(client, backend, buf).await? == 0 {
                return self.end_of_stream(&tracker);
            }
            let bytes = std::mem::take(buf);
            let copied = self.copy_out(client, &mut tracker, &bytes).await;
            *buf = bytes;
            copied?;
        }
        Ok(())
    }

    /// Splice: length-delimited runs go through the pipe unseen; framing
    /// lines are peeked, then the peeked bytes are spliced too.
    async fn splice_body(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        // The pipe lives with the client connection; it is lent out here.
        let pipe = match client.pipe.take() {
            Some(pipe) => pipe,
            None => Pipe::new().map_err(RelayError::Client)?,
        };
        let result = self
            .splice_through(client, backend, &pipe, tracker, buf)
            .await;
        client.pipe = Some(pipe);
        result
    }

    async fn splice_through(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        pipe: &Pipe,
        mut tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        buf.resize(PEEK_WINDOW, 0);
        while !tracker.is_done() {
            self.backend_readable(client, backend).await?;
            let (run, looked) = match tracker.opaque_run() {
                Some(run) => (run, false),
                None => {
                    let peeked = backend
                        .stream
                        .try_io(Interest::READABLE, || tcp::peek(&backend.stream, buf));
                    match peeked {
                        Ok(0) => return self.end_of_stream(&tracker),
                        Ok(n) => {
                            let used = tracker
                                .advance(&buf[..n])
                                .map_err(|source| self.bad_response(source))?;
                            if used < n {
                                self.reusable = false;
                            }
                            (used as u64, true)
                        }
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(err) => return Err(self.backend_error(err)),
                    }
                }
            };
            // Move `run` bytes (or what is there, for an opaque run).
            let mut left = run;
            while left > 0 {
                let moved = backend
                    .stream
                    .try_io(Interest::READABLE, || pipe.fill_from(&backend.stream, left));
                match moved {
                    Ok(0) => return self.end_of_stream(&tracker),
                    Ok(n) => {
                        backend.read += n as u64;
                        self.body_read();
                        if !looked {
                            tracker.skip(n as u64);
                        }
                        // Peeked bytes were framed already: the body has
                        // ended only once the last of them has moved.
                        if !looked || left == n as u64 {
                            self.ended_if(&tracker);
                        }
                        client.drain_pipe(pipe, n).await?;
                        self.relayed.piped += n as u64;
                        left -= n as u64;
                        if !looked {
                            break;
                        }
                    }
                    // Peeked bytes are queued already; an opaque run waits.
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock && !looked => break,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        self.backend_readable(client, backend).await?;
                    }
                    Err(err) => return Err(self.backend_error(err)),
                }
            }
        }
        Ok(())
    }

    /// Sockmap: publish the framing, let the kernel redirect the body, and
    /// finish what it passes up (hand-over steps 6 to 9 in `sockmap.rs`).
    ///
    /// Bytes passed up are drained to EAGAIN before each publication: the
    /// program adopts a hand-over only if nothing arrived between the
    /// daemon's last read and the publication, so that window is one
    /// syscall, not a write to the client.
    async fn sockmap_body(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        client_cookie: u64,
        mut tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        // The kernel moves body bytes unseen: gaps between the daemon's
        // reads here are not the stream's.
        self.gaps = false;
        // The generation published and not yet seen stopped by the kernel.
        let mut published = None;
        let mut stale = true;
        while !tracker.is_done() {
            buf.clear();
            buf.reserve(COPY_BUFFER);
            let n = match backend.stream.try_read_buf(buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if stale && let Some(framing) = tracker.to_kernel() {
                        backend.generation += 1;
                        backend.slot().publish(Control {
                            client_cookie,
                            generation: backend.generation,
                            fence: backend.read,
                            framing,
                        })?;
                        published = Some(backend.generation);
                    }
                    stale = false;
                    self.backend_readable(client, backend).await?;
                    continue;
                }
                Err(err) => return Err(self.backend_error(err)),
            };
            backend.read += n as u64;
            stale = true;
            // What the kernel did before these bytes were passed up.
            let progress = backend.slot().progress()?;
            let redirected = progress.redirected - backend.redirected_seen;
            backend.redirected_seen = progress.redirected;
            if redirected > 0 {
                self.body_read();
            }
            self.relayed.redirected += redirected;
            client.add_redirected(redirected);
            if published.is_some_and(|generation| generation == progress.generation)
                && progress.splicing == 0
            {
                // The kernel adopted the hand-over and stopped at the first
                // byte just read: continue from its framing.
                tracker = BodyTracker::from_kernel(progress.framing).ok_or_else(|| {
                    self.bad_response(FramingError::Head(format!(
                        "the kernel stopped at an unknown framing {:?}",
                        progress.framing
                    )))
                })?;
                published = None;
            }
            if n == 0 {
                client.flushed().await?;
                return self.end_of_stream(&tracker);
            }
            let bytes = std::mem::take(buf);
            let copied = self.copy_out(client, &mut tracker, &bytes).await;
            *buf = bytes;
            copied?;
        }
        if published.is_some() {
            // Never leave an unadopted hand-over behind: the next response on
            // this connection would be adopted by it, head and all.
            backend.generation += 1;
            backend.slot().publish(Control {
                client_cookie,
                generation: backend.generation,
                fence: backend.read,
                framing: Framing::default(),
            })?;
        }
        Ok(())
    }
}

/// Gives freed heap back to the system. Loading the sockmap program parses
/// the kernel's BTF: about 35 MiB of heap that is freed when the probe's
/// program is dropped, but that glibc would otherwise keep resident for the
/// daemon's life (measured: 22 MiB resident after an `auto` start against
/// 5 MiB with `--dataplane userspace`).
fn release_freed_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system; it has no
    // preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A connection to a backend, kept alive across requests.
#[derive(Debug)]
pub(crate) struct BackendConn {
    /// Registration with the kernel program (sockmap only). Declared before
    /// `stream` so its entries go before the socket closes.
    slot: Option<BackendSlot>,
    stream: TcpStream,
    /// Bytes the daemon has read from the socket (with sockmap: what the
    /// program passed up).
    read: u64,
    /// The last control generation published (sockmap).
    generation: u64,
    /// The program's redirected count when last looked at (sockmap).
    redirected_seen: u64,
    /// When the connection last went back to the pool.
    idle_since: Instant,
}

impl BackendConn {
    fn slot(&self) -> &BackendSlot {
        self.slot
            .as_ref()
            .expect("invariant: the sockmap body path is taken only for a backend with a slot")
    }

    /// How long since the connection last went idle ([`Self::mark_idle`]).
    pub(crate) fn idle_for(&self) -> Duration {
        self.idle_since.elapsed()
    }

    /// Notes that the connection goes idle now (back to a pool).
    pub(crate) fn mark_idle(&mut self) {
        self.idle_since = Instant::now();
    }

    /// Whether the idle connection still looks usable: nothing to read (a
    /// FIN or stray bytes mean the backend closed or is out of step).
    pub(crate) fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A client connection as the dataplane sees it.
#[derive(Debug)]
pub(crate) struct Client {
    /// Registration as a redirect target (sockmap only). Declared before
    /// `stream` so it is removed from the map before the socket closes.
    slot: Option<ClientSlot>,
    /// The pipe responses travel through (splice only), kept for the
    /// connection's life.
    pipe: Option<Pipe>,
    /// The client socket.
    stream: TcpStream,
    /// Bytes that should have entered the client socket's send queue: what
    /// the daemon wrote plus what the kernel redirected.
    delivered: u64,
    /// Redirected bytes were added to `delivered` since the last flush.
    unflushed: bool,
    /// Bytes read from the client and not yet consumed.
    pending: Vec<u8>,
    /// The client has shut down its sending side.
    eof: bool,
    /// Most pipelined bytes read ahead (see [`Dataplane::with_pipelined_limit`]).
    pipelined_limit: usize,
    /// Reading ahead stopped at the limit since [`Client::take_held_back`].
    held_back: bool,
}

impl Client {
    /// Whether reading pipelined requests ahead stopped at the limit since
    /// the last call.
    pub(crate) fn take_held_back(&mut self) -> bool {
        std::mem::take(&mut self.held_back)
    }

    /// Bytes read from the client and not yet consumed: the start of the
    /// next request, or a pipelined one read while a response was relayed.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Drops the first `n` pending bytes (a request that has been read).
    pub(crate) fn consume(&mut self, n: usize) {
        self.pending.drain(..n.min(self.pending.len()));
    }

    /// Whether the client has shut down its sending side.
    pub(crate) fn at_eof(&self) -> bool {
        self.eof
    }

    /// Waits for the client to send and appends what it sent to the pending
    /// bytes; `Ok(0)`, and [`Client::at_eof`] from then on, at end of
    /// stream.
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        let n = self.read_more().await?;
        if n == 0 {
            self.eof = true;
        }
        Ok(n)
    }

    /// Closes the connection without losing the last response: shuts down
    /// the sending side, then reads until the client closes too (or
    /// `linger` passes), so that unread client bytes do not turn the close
    /// into a reset.
    pub(crate) async fn close(mut self, linger: Duration) {
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let drain = async {
            let mut sink = [0u8; 4096];
            while !self.eof {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(linger, drain).await;
    }

    /// Closes a connection whose client sends nothing more: its last
    /// request, read whole, asked for the close, or it shut down its side.
    /// When nothing it sent is left unread, the socket closes at once and
    /// the kernel sends the response, then a FIN; only a client that sends
    /// anyway, against its own `connection: close`, could see a reset, as
    /// with nginx, which lingers only when bytes may be unread. That saves
    /// [`Client::close`]'s wait for the client's own FIN (a wake-up, a read
    /// and a timer per connection), which it falls back to otherwise.
    pub(crate) async fn close_finished(self, linger: Duration) {
        let mut probe = [0u8; 1];
        let unread = !self.pending.is_empty()
            || matches!(tcp::peek(&self.stream, &mut probe), Ok(n) if n > 0);
        if unread {
            self.close(linger).await;
        }
    }

    /// Waits for the client to send and appends what it sent to `pending`;
    /// `Ok(0)` at end of stream.
    async fn read_more(&mut self) -> io::Result<usize> {
        loop {
            self.stream.readable().await?;
            match tcp::read_draining(&self.stream, &mut self.pending) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                read => return read,
            }
        }
    }

    /// Writes bytes produced or read by the daemon, after any redirected bytes
    /// still on their way.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.flushed().await?;
        self.stream
            .write_all(bytes)
            .await
            .map_err(RelayError::Client)?;
        self.delivered += bytes.len() as u64;
        Ok(())
    }

    /// Writes `parts` in order, in as few writes as the socket takes
    /// (`writev`), after any redirected bytes still on their way.
    async fn write_parts(&mut self, mut parts: &mut [IoSlice<'_>]) -> Result<(), RelayError> {
        self.flushed().await?;
        let total: usize = parts.iter().map(|part| part.len()).sum();
        while !parts.is_empty() {
            let written = self
                .stream
                .write_vectored(parts)
                .await
                .map_err(RelayError::Client)?;
            if written == 0 {
                return Err(RelayError::Client(io::ErrorKind::WriteZero.into()));
            }
            IoSlice::advance_slices(&mut parts, written);
        }
        self.delivered += total as u64;
        Ok(())
    }

    fn add_redirected(&mut self, bytes: u64) {
        if bytes > 0 {
            self.delivered += bytes;
            self.unflushed = true;
        }
    }

    /// Moves `len` bytes from the pipe into the client socket.
    async fn drain_pipe(&mut self, pipe: &Pipe, mut len: usize) -> Result<(), RelayError> {
        while len > 0 {
            self.stream.writable().await.map_err(RelayError::Client)?;
            match self
                .stream
                .try_io(Interest::WRITABLE, || pipe.drain_into(&self.stream, len))
            {
                Ok(moved) => {
                    len -= moved;
                    self.delivered += moved as u64;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(RelayError::Client(err)),
            }
        }
        Ok(())
    }

    /// Waits until every byte redirected so far sits in the client socket's send
    /// queue (or was already acknowledged).
    ///
    /// The kernel program hands redirected skbs to a kernel worker that sends
    /// them on the client socket asynchronously; the skbs passed up to the
    /// daemon do not wait for that worker. Writing our own bytes, or closing
    /// the socket, before the worker is done would reorder or drop response
    /// bytes.
    pub(crate) async fn flushed(&mut self) -> Result<(), RelayError> {
        if !self.unflushed {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        let mut pause = Duration::from_micros(20);
        loop {
            let progress = tcp::send_progress(&self.stream).map_err(RelayError::Client)?;
            if progress.queued >= self.delivered {
                self.unflushed = false;
                return Ok(());
            }
            // A client that reset or closed makes the kernel drop what was
            // redirected to it: those bytes will never be queued.
            if !progress.open {
                return Err(RelayError::Client(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the client closed before the response was delivered",
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RelayError::Client(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the kernel handed {} of {} redirected bytes to the client",
                        progress.queued, self.delivered
                    ),
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}
