//! Listening sockets: the client-facing one (bound alone, so a second
//! daemon on the port fails), the workers' that share its port, and the
//! admin one.
use std::{io, net::SocketAddr};

use tokio::net::TcpListener;

/// Listen backlog for [`listener`]: bursts of new clients wait in the
/// kernel's accept queue instead of being refused (capped by
/// `net.core.somaxconn`, 4096 by default).
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`;
/// bound without `SO_REUSEPORT`, so it fails while another process
/// listens there ([`crate::run`] opens its workers' sockets on the port
/// after, sharing its port).
pub fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    bind(addr, false)
}

/// A listener on `addr` with [`LISTEN_BACKLOG`], `SO_REUSEADDR` and
/// `TCP_NODELAY` (see [`accept_nodelay`]), and `SO_REUSEPORT` when
/// `share_port`.
pub(crate) fn bind(addr: SocketAddr, share_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(share_port)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Sets `TCP_NODELAY` on a listening socket. Linux copies it to every
/// socket the listener accepts, so small responses and errors never wait
/// for Nagle, without a `setsockopt` per connection (one syscall of the
/// dozen a `connection: close` request costs).
pub(crate) fn accept_nodelay(listener: &TcpListener) -> io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_nodelay(true)
}

/// Opens `count` more listening sockets on `listener`'s address, sharing
/// its port: `SO_REUSEPORT` is set on `listener` (bound without it, so no
/// other process could join) and on each new socket.
///
/// The sockets come back deregistered from this runtime, ready to be
/// handed to the workers' own.
pub(crate) fn share_port(
    listener: &TcpListener,
    count: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    if count == 0 {
        return Ok(Vec::new());
    }
    socket2::SockRef::from(listener).set_reuse_port(true)?;
    let addr = listener.local_addr()?;
    (0..count).map(|_| bind(addr, true)?.into_std()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Whether a socket accepted by `listener` has `TCP_NODELAY`.
    async fn accepted_nodelay(listener: &TcpListener) -> bool {
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        accepted.nodelay().unwrap()
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let bound = bind(([127, 0, 0, 1], 0).into(), false).unwrap();
        assert!(accepted_nodelay(&bound).await);
        let shared = share_port(&bound, 1).unwrap().pop().unwrap();
        // Alone on the port, so the connection cannot land on `bound`.
        drop(bound);
        shared.set_nonblocking(true).unwrap();
        assert!(accepted_nodelay(&TcpListener::from_std(shared).unwrap()).await);
        // A listener made elsewhere, as `run` may be given.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        assert!(!accepted_nodelay(&plain).await, "the kernel's default");
        accept_nodelay(&plain).unwrap();
        assert!(accepted_nodelay(&plain).await);
    }
}
