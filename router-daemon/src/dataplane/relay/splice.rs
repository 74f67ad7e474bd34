//! The splice(2) body mover: length-delimited runs go from the backend
//! socket through a pipe to the client socket without entering the
//! daemon; chunk-size lines are peeked to find the next run.
use std::io;

use tokio::io::Interest;

use super::{Relay, Watch};
use crate::{
    dataplane::{BackendConn, Client, PEEK_WINDOW, RelayError, pipe::Pipe, tcp},
    http::response::BodyTracker,
};

impl<W: Watch> Relay<'_, W> {
    /// Splice: length-delimited runs go through the pipe unseen; framing
    /// lines are peeked, then the peeked bytes are spliced too.
    pub(in crate::dataplane) async fn splice_body(
        &mut self,
        client: &mut Client,
        backend: &mut BackendConn,
        tracker: BodyTracker,
        buf: &mut Vec<u8>,
    ) -> Result<(), RelayError> {
        // The pipe lives with the client connection; it is lent out here.
        let pipe = client.lend_pipe().map_err(RelayError::Client)?;
        let result = self
            .splice_through(client, backend, &pipe, tracker, buf)
            .await;
        client.return_pipe(pipe);
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
}
