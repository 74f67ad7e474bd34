//! Accepting connections that a simulated crash can drop: the
//! `--die-after-tokens` fault.
//!
//! [`DyingListener`] wraps the server's [`TcpListener`] for `axum::serve`.
//! Each accepted stream is wrapped in a [`DyingStream`] that watches the
//! engine's death signal: once the engine dies, every read or write fails
//! with `ConnectionAborted`, which makes hyper drop the connection (closing
//! the socket) whether it is idle, reading a request, or streaming a
//! response; and the listener stops accepting.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A future that completes when the engine dies (never, if the engine is
/// dropped alive).
type Death = Pin<Box<dyn Future<Output = ()> + Send>>;

fn death(mut dead: watch::Receiver<bool>) -> Death {
    Box::pin(async move {
        if dead.wait_for(|dead| *dead).await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

/// A TCP listener whose connections end when the engine dies.
pub struct DyingListener {
    inner: TcpListener,
    dead: watch::Receiver<bool>,
}

impl DyingListener {
    /// Wraps `inner`; `dead` turns true when the engine dies.
    pub fn new(inner: TcpListener, dead: watch::Receiver<bool>) -> Self {
        Self { inner, dead }
    }
}

impl axum::serve::Listener for DyingListener {
    type Io = DyingStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let mut dead = death(self.dead.clone());
        loop {
            tokio::select! {
                accepted = self.inner.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let _ = stream.set_nodelay(true);
                        return (DyingStream::new(stream, self.dead.clone()), addr);
                    }
                    Err(error) => {
                        // Like axum's own listener: out of descriptors and
                        // such are transient; back off a little.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                () = &mut dead => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that fails every operation once the engine died.
pub struct DyingStream {
    inner: TcpStream,
    death: Death,
    dead: bool,
}

impl DyingStream {
    fn new(inner: TcpStream, dead: watch::Receiver<bool>) -> Self {
        let dead_now = *dead.borrow();
        Self {
            inner,
            death: death(dead),
            dead: dead_now,
        }
    }

    /// `Err` once the engine died; registers the task for the death signal
    /// otherwise.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.dead && self.death.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "simulated crash (--die-after-tokens)",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for DyingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DyingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
