//! One response on its way from a backend to a client: the request
//! written, the head read and relayed, timeouts, and what the caller's
//! [`Watch`] hears. The body is moved by one of three movers: `copy`
//! (userspace), `splice` (splice(2) through a pipe) and `redirect` (the
//! sockmap program).
mod copy;
mod redirect;
mod splice;

use std::{
    io::{self, IoSlice},
    pin::Pin,
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt as _, time::Sleep};

use super::{
    BackendConn, COPY_BUFFER, Client, NEVER, RelayError, Relayed, ResponseTimeouts,
    sockmap::BackendSlot, tcp,
};
use crate::{
    error::Timeout,
    http::response::{self, BodyTracker, FramingError, ResponseHead},
};

/// What the caller of [`super::Dataplane::exchange`] hears of a response while it
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

/// The exchange's one timer, moved only when it fires (see
/// `Relay::on_timer`), not per read: it first fires at the nearer of the
/// first-byte and idle bounds, so no move is needed when the response
/// begins.
pub(super) fn timer(timeouts: ResponseTimeouts, writing: Instant) -> Sleep {
    let idle = timeouts.idle.unwrap_or(NEVER);
    tokio::time::sleep_until(timeouts.first_byte_due(writing).min(writing + idle).into())
}

/// The state of one response on its way.
pub(super) struct Relay<'t, W: Watch> {
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

impl<'t, W: Watch> Relay<'t, W> {
    /// A response about to be asked of `backend`, the request being
    /// written from `writing` on; `timer` is [`timer`]'s, pinned.
    pub(super) fn new(
        watch: W,
        timer: Pin<&'t mut Sleep>,
        timeouts: ResponseTimeouts,
        writing: Instant,
        backend: &BackendConn,
    ) -> Self {
        Self {
            relayed: Relayed::default(),
            reusable: true,
            watch,
            ended: false,
            sent: writing,
            last_body: None,
            gaps: true,
            timer,
            timeouts,
            first_byte_due: timeouts.first_byte_due(writing),
            responding: false,
            waiting_since: writing,
            kernel_mark: backend.redirected_seen,
        }
    }
}

impl<W: Watch> Relay<'_, W> {
    /// What reached the client so far.
    pub(super) fn relayed(&self) -> Relayed {
        self.relayed
    }

    /// Whether the backend connection can carry another request.
    pub(super) fn reusable(&self) -> bool {
        self.reusable
    }

    /// Writes the request to the backend, within the first-byte timeout;
    /// the response's times count from the end of the write.
    pub(super) async fn send(
        &mut self,
        backend: &mut BackendConn,
        request: &[u8],
    ) -> Result<(), RelayError> {
        let write = backend.stream.write_all(request);
        tokio::pin!(write);
        loop {
            tokio::select! {
                biased;
                written = &mut write => {
                    written.map_err(RelayError::BackendWrite)?;
                    self.sent = Instant::now();
                    return Ok(());
                }
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
    /// responses on to the client; returns it with the time from the
    /// request's end to its first byte.
    pub(super) async fn read_head(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        head_request: bool,
        buf: &mut Vec<u8>,
    ) -> Result<(ResponseHead, Duration), RelayError> {
        let sent = self.sent;
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
    pub(super) async fn write_head(
        &mut self,
        client: &mut Client,
        head: &ResponseHead,
        client_close: bool,
        buf: &[u8],
    ) -> Result<BodyTracker, RelayError> {
        if !head.keep_alive {
            self.reusable = false;
        }
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
    pub(super) fn half_close(&mut self, backend: &BackendConn) {
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
            let watch_client = client.may_read_ahead();
            tokio::select! {
                // The backend first: a timer that fires along with its
                // bytes is not a timeout.
                biased;
                ready = backend.stream.readable() => {
                    return ready.map_err(|source| self.backend_error(source));
                }
                read = client.fill(), if watch_client => match read {
                    Ok(0) => self.half_close(backend),
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
}
