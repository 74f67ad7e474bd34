//! Moving responses from backends to clients over kept-alive connections.
//!
//! `Dataplane::exchange` runs one request on a backend connection: it
//! writes the request, reads the response head itself (the router needs the
//! status and the body's framing), writes the head to the client, then moves
//! the body until `BodyTracker` says it has ended, so the backend
//! connection can go back to the pool (`upstream`) for the next request,
//! whichever client sends it. Three modes move the body:
//! - [`Mode::Sockmap`]: the kernel program in `router-ebpf` redirects body
//!   bytes from the backend socket to the client socket while it can follow
//!   the framing; the daemon sees the head, the skb that ends the body, and
//!   anything the program passed up (see `sockmap.rs` for the hand-over
//!   protocol). Needs privilege.
//! - [`Mode::SockmapSend`]: for backends on this host, an sk_msg program
//!   redirects the bytes of streamed (chunked) bodies inside the backend's
//!   own `sendmsg`, so they never reach the router's socket; the same
//!   hand-over as sockmap, with credit so a slow client never stalls the
//!   backend (`sockmap.rs`, *Send hook*). Bodies with a length, and every
//!   response of a backend elsewhere, are copied. Needs privilege.
//! - [`Mode::Splice`]: `splice(2)` moves length-delimited runs through a
//!   pipe without copying them into the daemon; chunk-size lines are peeked
//!   (`MSG_PEEK`) to find the next run. Unprivileged.
//! - [`Mode::Userspace`]: a read/write loop in the daemon. Works everywhere.
//!
//! While a response is relayed the daemon keeps reading the client: bytes of
//! a pipelined request wait in the client's pending bytes (so responses go
//! out in request order), and the client's FIN is passed on to the backend
//! as a half-close, which makes vLLM abort a generation nobody will read.
//!
//! # Layout
//! - this file: the dataplane chosen at start, one exchange, its errors,
//!   and the backend connection;
//! - `client`: the client socket (pending bytes, ordered writes, closing);
//! - `relay`: one response's state (request sent, head, timeouts), with one
//!   file per body mover: `relay/copy.rs`, `relay/splice.rs`,
//!   `relay/redirect.rs`;
//! - `pipe` (splice(2)'s pipe), `sockmap` (the kernel program and its
//!   maps), `tcp` (socket calls tokio does not offer), `copy_buffer`,
//!   `listen` (listening sockets), `probe` (discovery's one-shot GETs).
mod client;
mod copy_buffer;
pub(crate) mod listen;
mod pipe;
pub(crate) mod probe;
mod relay;
mod sockmap;
mod tcp;

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use router_common::Stat;
use tokio::net::TcpStream;

pub use self::sockmap::SockmapError;
pub use self::sockmap::{cgroup2_root, default_cgroup};
pub(crate) use self::{client::Client, relay::Watch};
use self::{
    relay::Relay,
    sockmap::{BackendSlot, Hook, Sockmap},
};
use crate::{
    error::Timeout,
    http::response::{BodyFraming, BodyTracker, FramingError},
};

/// How long to wait for the kernel to hand redirected bytes to a client socket
/// before giving up on the connection.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Buffer for response bytes that pass through the daemon.
const COPY_BUFFER: usize = copy_buffer::SIZE;
/// Default of [`Dataplane::with_pipelined_limit`] (`--max-pipelined-bytes`).
pub(crate) const PIPELINED_LIMIT: usize = 1 << 20;
/// Least credit worth publishing to a kernel program: with less room on the
/// client socket, the daemon keeps relaying (and waiting for the client).
const MIN_CREDIT: u64 = 8 * 1024;
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

    /// When the first response byte is due for a request written from
    /// `writing` on.
    fn first_byte_due(&self, writing: Instant) -> Instant {
        writing + self.first_byte.unwrap_or(NEVER)
    }
}

/// A dataplane mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Body bytes are redirected to the client by the sockmap program.
    Sockmap,
    /// Body bytes are redirected to the client in a co-located backend's
    /// own send (sk_msg); other backends' are copied.
    SockmapSend,
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
            Mode::SockmapSend => "sockmap-send",
            Mode::Splice => "splice",
            Mode::Userspace => "userspace",
        }
    }

    /// Whether a kernel program redirects body bytes (either sockmap hook).
    pub fn redirects_in_kernel(self) -> bool {
        matches!(self, Mode::Sockmap | Mode::SockmapSend)
    }
}

/// The `--dataplane` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Requested {
    /// The measured default: `sockmap-send` where it loads, else
    /// `userspace` (see the README's dataplane numbers: lowest CPU per
    /// streamed token on this class of machine).
    Auto,
    /// The sockmap dataplane, or fail to start.
    Sockmap,
    /// The send-side sockmap dataplane (sk_msg on co-located backends), or
    /// fail to start.
    SockmapSend,
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
            engine: Engine::Sockmap(Box::new(Sockmap::load(Hook::Receive)?)),
            pipelined_limit: PIPELINED_LIMIT,
            timeouts: ResponseTimeouts::DEFAULT,
        })
    }

    /// The send-side sockmap dataplane: loads the sk_msg program and
    /// attaches the sockops program to the cgroup v2 directory `cgroup`,
    /// which must hold the co-located backends' processes.
    pub fn sockmap_send(cgroup: &std::path::Path) -> Result<Self, SockmapError> {
        let hook = Hook::Send {
            cgroup: cgroup.to_owned(),
        };
        Ok(Self {
            engine: Engine::Sockmap(Box::new(Sockmap::load(hook)?)),
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
    /// `auto` is `sockmap-send` where it loads (root or the BPF, NET_ADMIN
    /// and PERFMON capabilities, a recent kernel, a cgroup v2 root at
    /// `cgroup`): measured on this class of machine, it costs the least CPU
    /// per streamed token (the README has the numbers). Elsewhere it is
    /// `userspace`, and the sentence says why.
    pub fn select(
        requested: Requested,
        cgroup: &std::path::Path,
    ) -> Result<(Self, String), SockmapError> {
        match requested {
            Requested::Userspace => Ok((Self::userspace(), "requested with --dataplane".into())),
            Requested::Splice => Ok((Self::splice(), "requested with --dataplane".into())),
            Requested::Sockmap => Ok((Self::sockmap()?, "requested with --dataplane".into())),
            Requested::SockmapSend => Ok((
                Self::sockmap_send(cgroup)?,
                format!(
                    "requested with --dataplane; sockops attached to {}",
                    cgroup.display()
                ),
            )),
            Requested::Auto => {
                match sockmap::supported_kernel().and_then(|()| Self::sockmap_send(cgroup)) {
                    Ok(dataplane) => Ok((
                        dataplane,
                        format!(
                            "auto: sockmap-send, the measured default (least CPU per streamed \
                             token); sockops attached to {}; backends on other hosts are copied",
                            cgroup.display()
                        ),
                    )),
                    Err(err) => {
                        // The failed load's object is freed; give its
                        // pages back before serving.
                        release_freed_heap();
                        Ok((
                            Self::userspace(),
                            format!(
                                "auto: userspace, because sockmap-send is unavailable here \
                                 ({err}); responses are copied through the daemon"
                            ),
                        ))
                    }
                }
            }
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        match &self.engine {
            Engine::Sockmap(sockmap) if *sockmap.hook() == Hook::Receive => Mode::Sockmap,
            Engine::Sockmap(_) => Mode::SockmapSend,
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
        Client::new(stream, self.pipelined_limit)
    }

    /// Opens a connection to a backend; with sockmap, hands it to the kernel
    /// program before any byte is sent (hand-over steps 2 and 3).
    pub(crate) async fn connect(&self, addr: SocketAddr) -> io::Result<BackendConn> {
        let refused = |err: SockmapError| {
            tracing::debug!(%err, "sockmap refused a backend socket; copying its responses");
        };
        let (stream, slot) = match self.sockmap_engine() {
            Some(sockmap) if *sockmap.hook() != Hook::Receive => {
                let socket = match addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                let mut slot = sockmap.watch(&socket).map_err(refused).ok();
                let stream = socket.connect(addr).await?;
                if let Some(slot) = &mut slot {
                    slot.connected(stream.local_addr()?, stream.peer_addr()?);
                }
                (stream, slot)
            }
            Some(sockmap) => {
                let stream = TcpStream::connect(addr).await?;
                let slot = sockmap.add_backend(&stream).map_err(refused).ok();
                (stream, slot)
            }
            None => (TcpStream::connect(addr).await?, None),
        };
        // Requests are written whole; they must not wait for Nagle.
        stream.set_nodelay(true)?;
        Ok(BackendConn {
            slot,
            stream,
            read: 0,
            generation: 0,
            redirected_seen: 0,
            peer: None,
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
        let timer = relay::timer(self.timeouts, writing);
        tokio::pin!(timer);
        let mut relay = Relay::new(watch, timer, self.timeouts, writing, backend);
        relay.send(backend, forward.request).await?;
        if client.at_eof() {
            relay.half_close(backend);
        }
        let (head, first_byte) = relay
            .read_head(client, backend, forward.head_request, buf)
            .await?;
        if forward.retry_unavailable && head.status == 503 && !relay.relayed().any() {
            return Err(RelayError::Unavailable);
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
            relayed: relay.relayed(),
            status: head.status,
            first_byte,
            backend_reusable: relay.reusable() && !client.at_eof(),
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
        // The send hook takes streams (chunked bodies) only: a body with a
        // length is one JSON answer, or a bulk transfer that a client reads
        // more slowly than a local backend writes, where credit would run
        // out on every window and hand it back (measured: 0.6× userspace's
        // throughput on one 100 MB response). The daemon copies those.
        let send = *sockmap.hook() != Hook::Receive;
        if backend.slot.is_none() || (send && !(tracker.is_chunked() && backend.is_peer()?)) {
            return relay.copy_body(client, backend, tracker, buf).await;
        }
        match client.redirect_target(sockmap) {
            Some(cookie) => {
                relay
                    .sockmap_body(client, backend, cookie, sockmap.hook(), tracker, buf)
                    .await
            }
            None => relay.copy_body(client, backend, tracker, buf).await,
        }
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
    /// Send hook: whether the backend's own socket was found on this host
    /// (known once a response began; it cannot change after).
    peer: Option<bool>,
    /// When the connection last went back to the pool.
    idle_since: Instant,
}

impl BackendConn {
    fn slot(&self) -> &BackendSlot {
        self.slot
            .as_ref()
            .expect("invariant: the sockmap body path is taken only for a backend with a slot")
    }

    /// Send hook: whether the sockops program found the backend's own socket
    /// (it runs on this host), so the sk_msg program judges its sends. Read
    /// once a response began: the backend's socket was accepted by then.
    fn is_peer(&mut self) -> Result<bool, SockmapError> {
        if let Some(peer) = self.peer {
            return Ok(peer);
        }
        let peer = self.slot().progress()?.peer == 1;
        self.peer = Some(peer);
        Ok(peer)
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
