//! The userspace body mover: the daemon reads the body and writes it to
//! the client, following its framing. Works everywhere.
use super::{Relay, Watch};
use crate::{
    dataplane::{BackendConn, COPY_BUFFER, Client, RelayError},
    http::response::BodyTracker,
};

impl<W: Watch> Relay<'_, W> {
    /// Userspace: read, follow the framing, write.
    pub(in crate::dataplane) async fn copy_body(
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
}
