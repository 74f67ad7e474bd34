//! The kernel body mover: a sockmap program (either hook) redirects body
//! bytes to the client socket while it can follow the framing; the daemon
//! publishes the framing, and finishes what the program passes up.
use std::io;

use router_common::{Control, Framing, Progress};

use super::{Relay, Watch};
use crate::{
    dataplane::{
        BackendConn, COPY_BUFFER, Client, MIN_CREDIT, RelayError, SockmapError, sockmap::Hook,
    },
    http::response::{BodyTracker, FramingError},
};

impl<W: Watch> Relay<'_, W> {
    /// Sockmap: publish the framing, let the kernel redirect the body, and
    /// finish what it passes up (hand-over steps 6 to 9 in `sockmap.rs`).
    ///
    /// Bytes passed up are drained to EAGAIN before each publication: the
    /// program adopts a hand-over only if nothing arrived between the
    /// daemon's last read and the publication, so that window is one
    /// syscall, not a write to the client.
    ///
    /// Nothing is handed over before the first body bytes have come
    /// through the daemon (see below).
    ///
    /// Each publication grants credit from the client socket's room, as
    /// `hook` says, and none is published while that is less than
    /// [`MIN_CREDIT`]: the daemon relays what the program passes up until
    /// the client catches up.
    pub(in crate::dataplane) async fn sockmap_body(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        client_cookie: u64,
        hook: &Hook,
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
                    // The first body bytes come through the daemon: they
                    // are the first token, which times the backend's TTFT
                    // and ends the request's prefill in the load routing
                    // sees. Handed over before, both would wait for the
                    // body's end.
                    let began = self.last_body.is_some();
                    if stale
                        && began
                        && let Some(framing) = tracker.to_kernel()
                    {
                        let credit = hook.credit(client.send_room().map_err(RelayError::Client)?);
                        if credit >= MIN_CREDIT {
                            published = Some(backend.publish(client_cookie, framing, credit)?);
                        }
                    }
                    stale = false;
                    self.backend_readable(client, backend).await?;
                    continue;
                }
                Err(err) => return Err(self.backend_error(err)),
            };
            backend.read += n as u64;
            stale = true;
            let progress = self.kernel_progress(client, backend)?;
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
            backend.publish(client_cookie, Framing::default(), 0)?;
        }
        Ok(())
    }

    /// What the kernel did before the bytes just passed up: its redirected
    /// bytes are counted as relayed, and the client waits for them before
    /// the daemon writes.
    fn kernel_progress(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
    ) -> Result<Progress, RelayError> {
        let progress = backend.slot().progress()?;
        let redirected = progress.redirected - backend.redirected_seen;
        backend.redirected_seen = progress.redirected;
        if redirected > 0 {
            self.body_read();
        }
        self.relayed.redirected += redirected;
        client.add_redirected(redirected);
        Ok(progress)
    }
}

impl BackendConn {
    /// Hands the body over to the kernel program from the next byte the
    /// daemon has not read: `framing` is where the body stands, to be
    /// redirected to the client `client_cookie` (a default framing withdraws
    /// the hand-over), at most `credit` bytes of it.
    /// Returns the hand-over's generation.
    fn publish(
        &mut self,
        client_cookie: u64,
        framing: Framing,
        credit: u64,
    ) -> Result<u64, SockmapError> {
        self.generation += 1;
        self.slot().publish(Control {
            client_cookie,
            generation: self.generation,
            fence: self.read,
            framing,
            credit,
        })?;
        Ok(self.generation)
    }
}
