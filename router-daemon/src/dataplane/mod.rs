//! Moving response bytes from a backend to a client.
//!
//! A [`Dataplane`] relays one response: it writes the request to the backend,
//! then moves the backend's bytes to the client until the backend closes
//! (the router asks backends for `connection: close`, so their FIN ends the
//! response). Three modes sit behind it:
//! - [`Mode::Sockmap`]: the kernel program in `router-ebpf` redirects the
//!   backend's bytes to the client socket; userspace sees only the FIN (see
//!   `sockmap.rs` for the hand-over protocol). Needs privilege.
//! - [`Mode::Splice`]: `splice(2)` moves the bytes through a pipe without
//!   copying them into the daemon. Unprivileged.
//! - [`Mode::Userspace`]: a read/write loop in the daemon. Works everywhere.
//!
//! All three share one relay loop ([`Dataplane::relay`]); they differ only
//! in how a step moves bytes that reach the daemon's side of the backend
//! socket (with sockmap, only what the kernel program passed up).
mod pipe;
mod sockmap;
mod tcp;

use std::{io, time::Duration};

use router_common::Stat;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
};

pub use self::sockmap::SockmapError;
use self::{
    pipe::Pipe,
    sockmap::{ClientSlot, Sockmap},
};

/// How long to wait for the kernel to hand spliced bytes to a client socket
/// before giving up on the connection.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// Userspace relay buffer size.
const COPY_BUFFER: usize = 64 * 1024;
/// Buffer for what the sockmap program passes up: normally only the FIN.
const PASSED_UP_BUFFER: usize = 4 * 1024;

/// A dataplane mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Backend bytes are spliced to the client by the sockmap program.
    Sockmap,
    /// Backend bytes move through a pipe with splice(2).
    Splice,
    /// Backend bytes are copied through the daemon.
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
    /// The sockmap dataplane where it works here, else userspace.
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
}

#[derive(Debug)]
enum Engine {
    Userspace,
    Splice,
    /// Boxed: it holds the loaded object, and exists once per daemon.
    Sockmap(Box<Sockmap>),
}

/// How one relayed response went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Response bytes the sockmap program redirected to the client.
    pub spliced: u64,
    /// Response bytes moved through a pipe with splice(2).
    pub piped: u64,
    /// Response bytes the daemon copied to the client.
    pub copied: u64,
}

impl Relayed {
    /// Whether any response byte reached the client.
    pub fn any(&self) -> bool {
        self.spliced + self.piped + self.copied > 0
    }
}

/// Why a relay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Writing the request to the backend failed; nothing reached the client.
    #[error("sending the request to the backend: {0}")]
    BackendWrite(io::Error),
    /// The backend failed mid-response.
    #[error("backend failed mid-response after {relayed:?}: {source}")]
    Backend {
        /// What reached the client before the failure.
        relayed: Relayed,
        /// The backend's error.
        source: io::Error,
    },
    /// The client connection failed or was reset.
    #[error("client went away: {0}")]
    Client(io::Error),
    /// Reading the kernel's byte count for this response failed. (A socket
    /// the kernel refuses at hand-over is not an error: that response is
    /// copied through userspace.)
    #[error("sockmap: {0}")]
    Sockmap(#[from] SockmapError),
}

impl Dataplane {
    /// The userspace dataplane.
    pub fn userspace() -> Self {
        Self {
            engine: Engine::Userspace,
        }
    }

    /// The splice(2) dataplane.
    pub fn splice() -> Self {
        Self {
            engine: Engine::Splice,
        }
    }

    /// The sockmap dataplane: loads and attaches the embedded program.
    pub fn sockmap() -> Result<Self, SockmapError> {
        Ok(Self {
            engine: Engine::Sockmap(Box::new(Sockmap::load()?)),
        })
    }

    /// The dataplane of `mode`.
    pub fn of_mode(mode: Mode) -> Result<Self, SockmapError> {
        match mode {
            Mode::Sockmap => Self::sockmap(),
            Mode::Splice => Ok(Self::splice()),
            Mode::Userspace => Ok(Self::userspace()),
        }
    }

    fn sockmap_engine(&self) -> Option<&Sockmap> {
        match &self.engine {
            Engine::Sockmap(sockmap) => Some(sockmap),
            Engine::Splice | Engine::Userspace => None,
        }
    }

    /// The dataplane for a `--dataplane` choice, and a sentence saying why.
    pub fn select(requested: Requested) -> Result<(Self, String), SockmapError> {
        match requested {
            Requested::Userspace => Ok((Self::userspace(), "requested with --dataplane".into())),
            Requested::Splice => Ok((Self::splice(), "requested with --dataplane".into())),
            Requested::Sockmap => Ok((Self::sockmap()?, "requested with --dataplane".into())),
            Requested::Auto => match sockmap::supported_kernel().and_then(|()| Self::sockmap()) {
                Ok(dataplane) => Ok((
                    dataplane,
                    "auto: the sockmap program loaded and attached".into(),
                )),
                Err(err) => Ok((
                    Self::userspace(),
                    format!("auto: sockmap unavailable ({err}); using the userspace dataplane"),
                )),
            },
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
    pub fn kernel_stats(&self) -> Option<Vec<(Stat, u64)>> {
        self.sockmap_engine().map(Sockmap::stats)
    }

    /// Sockets registered with the kernel program (sockmap only): clients
    /// and backends.
    pub fn sockets_in_maps(&self) -> Option<(usize, usize)> {
        self.sockmap_engine().map(Sockmap::sockets_len)
    }

    /// Entries in the flow map (sockmap only): responses being spliced now.
    pub fn flows_in_use(&self) -> Option<usize> {
        self.sockmap_engine().map(Sockmap::flows_len)
    }

    /// Prepares a client connection for relays.
    pub fn client(&self, stream: TcpStream) -> Client {
        Client {
            slot: None,
            pipe: None,
            stream,
            delivered: 0,
            pending: Vec::new(),
            eof: false,
        }
    }

    /// Writes `request` to `backend` and relays the response to `client`
    /// until the backend closes.
    ///
    /// Half-closes travel both ways: the client's FIN is passed on to the
    /// backend, and the backend's FIN ends the response (the caller then
    /// closes the client). A reset on either side ends the relay with an
    /// error, and dropping the backend socket closes it.
    ///
    /// Bytes the client sends meanwhile (a pipelined request) are kept in
    /// [`Client::pending`]. On return every relayed byte has been handed to
    /// the client socket, so the caller may write to it or close it.
    pub async fn relay(
        &self,
        client: &mut Client,
        mut backend: TcpStream,
        request: &[u8],
    ) -> Result<Relayed, RelayError> {
        // The kernel refuses sockets that are not ESTABLISHED (a client that
        // half-closed before its first request, a backend that closed at
        // once); such a response is copied through userspace instead.
        let flow = match self.sockmap_engine() {
            Some(sockmap) => match splice_to_client(sockmap, client, &backend) {
                Ok(flow) => Some(flow),
                Err(err) => {
                    tracing::debug!(%err, "sockmap hand-over refused; copying this response");
                    None
                }
            },
            None => None,
        };
        if matches!(self.engine, Engine::Splice) && client.pipe.is_none() {
            client.pipe = Some(Pipe::new().map_err(RelayError::Client)?);
        }
        backend
            .write_all(request)
            .await
            .map_err(RelayError::BackendWrite)?;
        if client.eof {
            let _ = backend.shutdown().await;
        }

        let mut relayed = Relayed::default();
        let mut buf = match self.engine {
            Engine::Splice => Vec::new(),
            Engine::Sockmap(_) => vec![0u8; PASSED_UP_BUFFER],
            Engine::Userspace => vec![0u8; COPY_BUFFER],
        };
        loop {
            tokio::select! {
                step = backend_step(&backend, client.pipe.as_ref(), &mut buf) => match step {
                    Ok(Step::End) => break,
                    Ok(Step::Read(n)) => {
                        // Bytes on the daemon's side of the backend socket
                        // (with sockmap, only what the kernel passed up):
                        // everything spliced before them must reach the
                        // client first.
                        if let Some(flow) = &flow {
                            client.delivered += flow.spliced_since_last()?;
                            client.flushed().await?;
                        }
                        client.stream.write_all(&buf[..n]).await.map_err(RelayError::Client)?;
                        client.delivered += n as u64;
                        relayed.copied += n as u64;
                    }
                    Ok(Step::Piped(n)) => {
                        client.drain_pipe(n).await?;
                        client.delivered += n as u64;
                        relayed.piped += n as u64;
                    }
                    Err(source) => {
                        if let Some(flow) = &flow {
                            relayed.spliced += flow.spliced()?;
                        }
                        return Err(RelayError::Backend { relayed, source });
                    }
                },
                read = client.stream.read_buf(&mut client.pending), if !client.eof => match read {
                    // The client closed its sending side: pass the half-close
                    // on. A backend that cannot answer a half-closed peer
                    // (vLLM's server aborts the generation) closes at once,
                    // so a client that went away frees its GPU slot now
                    // rather than at the end of the generation.
                    Ok(0) => {
                        client.eof = true;
                        let _ = backend.shutdown().await;
                    }
                    Ok(_) => {}
                    Err(err) => return Err(RelayError::Client(err)),
                },
            }
        }
        if let Some(flow) = &flow {
            relayed.spliced = flow.spliced()?;
            client.delivered += flow.spliced_since_last()?;
            client.flushed().await?;
        }
        Ok(relayed)
    }
}

/// What one step of reading the backend did.
enum Step {
    /// The backend closed: the response is complete.
    End,
    /// This many bytes were read into the buffer.
    Read(usize),
    /// This many bytes were moved into the pipe.
    Piped(usize),
}

/// Waits for the backend and moves what it has: into the pipe when there is
/// one, else into `buf`. Cancel-safe: nothing moves until the step returns.
async fn backend_step(
    backend: &TcpStream,
    pipe: Option<&Pipe>,
    buf: &mut [u8],
) -> io::Result<Step> {
    loop {
        backend.readable().await?;
        let moved = match pipe {
            Some(pipe) => backend
                .try_io(Interest::READABLE, || pipe.fill_from(backend))
                .map(|n| if n == 0 { Step::End } else { Step::Piped(n) }),
            None => backend
                .try_read(buf)
                .map(|n| if n == 0 { Step::End } else { Step::Read(n) }),
        };
        match moved {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Registers the client (once) and hands the backend socket to the kernel.
fn splice_to_client(
    sockmap: &Sockmap,
    client: &mut Client,
    backend: &TcpStream,
) -> Result<sockmap::Flow, SockmapError> {
    if client.slot.is_none() {
        client.slot = Some(sockmap.add_client(&client.stream)?);
    }
    let slot = client.slot.as_ref().expect("invariant: set just above");
    sockmap.add_backend(backend, slot)
}

/// A client connection as the dataplane sees it.
#[derive(Debug)]
pub struct Client {
    /// Registration as a redirect target (sockmap only). Declared before
    /// `stream` so it is removed from the map before the socket closes.
    slot: Option<ClientSlot>,
    /// The pipe responses travel through (splice only), kept for the
    /// connection's life.
    pipe: Option<Pipe>,
    /// The client socket.
    pub stream: TcpStream,
    /// Bytes that should have entered the client socket's send queue: what
    /// the daemon wrote plus what the kernel spliced.
    delivered: u64,
    /// Bytes read from the client and not yet consumed.
    pub pending: Vec<u8>,
    /// The client has shut down its sending side.
    pub eof: bool,
}

impl Client {
    /// Writes bytes produced by the daemon itself (an error or a local
    /// response), after any spliced bytes still on their way.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<(), RelayError> {
        self.flushed().await?;
        self.stream
            .write_all(bytes)
            .await
            .map_err(RelayError::Client)?;
        self.delivered += bytes.len() as u64;
        Ok(())
    }

    /// Moves `len` bytes from the pipe into the client socket.
    async fn drain_pipe(&mut self, mut len: usize) -> Result<(), RelayError> {
        let pipe = self
            .pipe
            .as_ref()
            .expect("invariant: Step::Piped comes only from a client's pipe");
        while len > 0 {
            self.stream.writable().await.map_err(RelayError::Client)?;
            match self
                .stream
                .try_io(Interest::WRITABLE, || pipe.drain_into(&self.stream, len))
            {
                Ok(moved) => len -= moved,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(RelayError::Client(err)),
            }
        }
        Ok(())
    }

    /// Waits until every byte relayed so far sits in the client socket's send
    /// queue (or was already acknowledged).
    ///
    /// The kernel program hands redirected skbs to a kernel worker that sends
    /// them on the client socket asynchronously; the backend's FIN reaches
    /// userspace without waiting for that worker. Writing our own bytes, or
    /// closing the socket, before the worker is done would reorder or drop
    /// response bytes.
    async fn flushed(&self) -> Result<(), RelayError> {
        if self.slot.is_none() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
        let mut pause = Duration::from_micros(50);
        loop {
            let progress = tcp::send_progress(&self.stream).map_err(RelayError::Client)?;
            if progress.queued >= self.delivered {
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
                        "the kernel handed {} of {} spliced bytes to the client",
                        progress.queued, self.delivered
                    ),
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}
