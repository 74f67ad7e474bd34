//! The client socket as the dataplane sees it: bytes read ahead of the
//! request being answered, writes that keep order with bytes the kernel
//! redirected, and closing without losing the last response.
use std::{
    io::{self, IoSlice},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, Interest},
    net::TcpStream,
};

use super::{
    FLUSH_TIMEOUT, RelayError,
    pipe::Pipe,
    sockmap::{ClientSlot, Sockmap},
    tcp,
};

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
    /// Most pipelined bytes read ahead (see [`super::Dataplane::with_pipelined_limit`]).
    pipelined_limit: usize,
    /// Reading ahead stopped at the limit since [`Client::take_held_back`].
    held_back: bool,
}

impl Client {
    /// A client connection reading at most `pipelined_limit` bytes of
    /// pipelined requests ahead.
    pub(super) fn new(stream: TcpStream, pipelined_limit: usize) -> Self {
        Self {
            slot: None,
            pipe: None,
            stream,
            delivered: 0,
            unflushed: false,
            pending: Vec::new(),
            eof: false,
            pipelined_limit,
            held_back: false,
        }
    }

    /// Whether the client may be read while a response is relayed: it has
    /// not shut down its side and less than the limit is read ahead. A
    /// client stopped at the limit is noted for [`Client::take_held_back`].
    pub(super) fn may_read_ahead(&mut self) -> bool {
        let full = self.pending.len() >= self.pipelined_limit;
        self.held_back |= full && !self.eof;
        !self.eof && !full
    }

    /// The socket's cookie as a target of the kernel program's redirects,
    /// registering it on first use; `None` if the map refused it (its
    /// responses are then copied).
    pub(super) fn redirect_target(&mut self, sockmap: &Sockmap) -> Option<u64> {
        if self.slot.is_none() {
            match sockmap.add_client(&self.stream) {
                Ok(slot) => self.slot = Some(slot),
                Err(err) => tracing::debug!(%err, "sockmap refused the client socket"),
            }
        }
        self.slot.as_ref().map(ClientSlot::cookie)
    }

    /// The connection's pipe (splice), created on first use; give it back
    /// with [`Client::return_pipe`], so it lives as long as the connection.
    pub(super) fn lend_pipe(&mut self) -> io::Result<Pipe> {
        match self.pipe.take() {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Takes back the pipe lent by [`Client::lend_pipe`].
    pub(super) fn return_pipe(&mut self, pipe: Pipe) {
        self.pipe = Some(pipe);
    }

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
    ///
    /// Like nginx, it asks the kernel only when epoll said bytes arrived
    /// since the last read drained the socket ([`tcp::may_be_readable`]);
    /// usually nothing did, and the close costs no syscall but `close`.
    pub(crate) async fn close_finished(self, linger: Duration) {
        let mut probe = [0u8; 1];
        let unread = !self.pending.is_empty()
            || (!self.eof
                && tcp::may_be_readable(&self.stream)
                && matches!(tcp::peek(&self.stream, &mut probe), Ok(n) if n > 0));
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
    pub(super) async fn write_parts(
        &mut self,
        mut parts: &mut [IoSlice<'_>],
    ) -> Result<(), RelayError> {
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

    /// How much more the client socket's send queue can take before a send
    /// would wait, in the kernel's accounting.
    pub(super) fn send_room(&self) -> io::Result<u64> {
        tcp::send_room(&self.stream)
    }

    /// Counts `bytes` the kernel redirected to this socket: later writes
    /// and the close wait until they are queued ([`Client::flushed`]).
    pub(super) fn add_redirected(&mut self, bytes: u64) {
        if bytes > 0 {
            self.delivered += bytes;
            self.unflushed = true;
        }
    }

    /// Moves `len` bytes from the pipe into the client socket.
    pub(super) async fn drain_pipe(
        &mut self,
        pipe: &Pipe,
        mut len: usize,
    ) -> Result<(), RelayError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Longer than any test waits: a close that lingers this long shows as
    /// a test timing out.
    const FOREVER: Duration = Duration::from_secs(3600);
    /// Bound on waits that end at once when the code is right; generous,
    /// for a loaded machine.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A client connection as the daemon holds it, which has sent
    /// `request`, read whole and answered with `response`; and the
    /// client's own end.
    async fn answered(request: &[u8], response: &[u8]) -> (Client, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut client = Client::new(accepted, 1 << 20);
        peer.write_all(request).await.unwrap();
        while client.pending().len() < request.len() {
            client.fill().await.unwrap();
        }
        client.consume(request.len());
        client.write(response).await.unwrap();
        (client, peer)
    }

    #[tokio::test]
    async fn a_finished_client_with_nothing_unread_is_closed_at_once() {
        let (client, mut peer) = answered(b"request", b"response").await;
        // The client holds its end open: only a close that does not wait
        // for it returns.
        tokio::time::timeout(PATIENCE, client.close_finished(FOREVER))
            .await
            .expect("the close waited for the client");
        let mut received = Vec::new();
        peer.read_to_end(&mut received)
            .await
            .expect("a clean close, not a reset");
        assert_eq!(received, b"response");
    }

    #[tokio::test]
    async fn a_finished_client_that_sent_more_is_drained_before_the_close() {
        let (client, mut peer) = answered(b"request", b"response").await;
        // Bytes sent after the last read (against the client's own close),
        // which the runtime has seen arrive: closing over them unread would
        // reset the connection, and the client could lose the response.
        peer.write_all(b"more").await.unwrap();
        client.stream.readable().await.unwrap();
        let closing = tokio::spawn(client.close_finished(FOREVER));
        let mut received = Vec::new();
        tokio::time::timeout(PATIENCE, peer.read_to_end(&mut received))
            .await
            .expect("no FIN after the response")
            .expect("a clean close, not a reset");
        assert_eq!(received, b"response");
        assert!(
            !closing.is_finished(),
            "the close did not wait for the client"
        );
        drop(peer);
        tokio::time::timeout(PATIENCE, closing)
            .await
            .expect("the close outlived the client's")
            .unwrap();
    }
}
