//! Socket calls tokio does not offer: cookies, send-queue progress and room, peeking,
//! half-closing through a shared reference, reads that note a drained
//! socket, and what tokio's readiness says without a syscall.
use std::{io, mem, os::fd::AsRawFd};

use tokio::{io::Interest, net::TcpStream};

/// Spare room a read is given when the buffer has less than half of it:
/// a typical request in one read (tokio's `read_buf` grows an empty buffer
/// from 64 bytes, one read each).
const MIN_READ: usize = 4096;

/// TCP states from the kernel's `include/net/tcp_states.h`.
const TCP_ESTABLISHED: libc::c_int = 1;
const TCP_CLOSE_WAIT: libc::c_int = 8;

/// `SO_COOKIE` from the kernel's uapi (`asm-generic/socket.h`).
const SO_COOKIE: libc::c_int = 57;

/// The kernel's unique, never reused id of a socket; the key in the sockmaps.
pub(crate) fn cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and `cookie`/`len` describe a writable u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// How far a socket's sending side has got.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendProgress {
    /// Bytes ever written into the send queue: acknowledged plus queued.
    pub(crate) queued: u64,
    /// The socket can still send (ESTABLISHED, or CLOSE_WAIT after the
    /// peer's FIN); false once it was reset or closed.
    pub(crate) open: bool,
}

/// Bytes ever written into the socket's send queue: acknowledged bytes plus
/// bytes still queued, and whether it can still send.
///
/// The two are read in two calls, acknowledged first: an ACK landing in
/// between moves bytes from "queued" to "acknowledged" unseen, so the sum can
/// only be too low, never too high. Callers wait for it to reach a target,
/// so an early answer is impossible and a late one costs a retry.
pub(crate) fn send_progress(socket: &impl AsRawFd) -> io::Result<SendProgress> {
    let fd = socket.as_raw_fd();
    // SAFETY: an all-zero tcp_info is a valid value of a plain C struct.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd, and `info`/`len` describe a writable tcp_info.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut unacked: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int to the pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut unacked) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let state = libc::c_int::from(info.tcpi_state);
    Ok(SendProgress {
        queued: info.tcpi_bytes_acked + u64::try_from(unacked).unwrap_or(0),
        open: state == TCP_ESTABLISHED || state == TCP_CLOSE_WAIT,
    })
}

/// `SO_MEMINFO` and the indexes it fills, from the kernel's uapi
/// (`asm-generic/socket.h`, `linux/sock_diag.h`).
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_SNDBUF: usize = 3;
const SK_MEMINFO_WMEM_QUEUED: usize = 5;
const SK_MEMINFO_VARS: usize = 9;

/// How many more bytes of memory the socket's send queue may take before a
/// send would wait: its send buffer less what is queued, both as the kernel
/// charges them (payload plus per-packet overhead).
pub(crate) fn send_room(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: valid fd, and `info`/`len` describe a writable u32 array.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(
        info[SK_MEMINFO_SNDBUF].saturating_sub(info[SK_MEMINFO_WMEM_QUEUED]),
    ))
}

/// Reads up to `buf.len()` bytes without consuming them (`MSG_PEEK`).
pub(crate) fn peek(socket: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Whether `stream` may have bytes (or a FIN) unread, by tokio's cached
/// readiness alone, without a syscall: epoll reported it readable and no
/// read has drained it since ([`read_draining`] clears it on a short
/// read). False is nginx's `!rev->ready`: bytes may still be landing, but
/// none had arrived when the runtime last asked epoll.
pub(crate) fn may_be_readable(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    stream.poll_read_ready(&mut cx).is_ready()
}

/// Reads what `stream` has into the spare capacity of `buf` (made at least
/// [`MIN_READ`] when it is under half of that) without blocking, like tokio's
/// `try_read_buf`, except that a read that leaves room in `buf` also tells
/// tokio the socket is drained, as nginx does. The next wait then goes
/// straight to epoll instead of first making a read that fails with EAGAIN:
/// one syscall less per response, per streamed event and per request.
///
/// No wake-up is lost: tokio clears readiness only when no readiness event
/// arrived since the one it reported (bytes landing after the read still wake
/// the reader), and it never clears a peer's close.
pub(crate) fn read_draining(stream: &TcpStream, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < MIN_READ / 2 {
        buf.reserve(MIN_READ);
    }
    let mut short = None;
    let read = stream.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        let want = spare.len();
        // SAFETY: `spare` is writable for `want` bytes.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                libc::MSG_DONTWAIT,
            )
        };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        // SAFETY: the kernel wrote `n` bytes into the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        if n > 0 && n < want {
            // Returning WouldBlock is how `try_io` clears readiness.
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => read,
    }
}

/// Shuts down the sending side (`SHUT_WR`): the peer reads EOF.
pub(crate) fn shut_write(socket: &impl AsRawFd) {
    // SAFETY: plain syscall on an open descriptor; failure (already shut or
    // reset) leaves nothing to do.
    let _ = unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_WR) };
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::time::Duration;

    use tokio::{
        io::AsyncWriteExt as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected loopback pair: (writer, reader).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        (writer, reader)
    }

    /// Whether `stream` reports readable within a short wait: with no bytes
    /// sent meanwhile, only a readiness tokio kept from before says yes.
    async fn reports_readable(stream: &TcpStream) -> bool {
        tokio::time::timeout(Duration::from_millis(50), stream.readable())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_short_read_marks_the_socket_drained_and_loses_no_wakeup() {
        let (mut writer, reader) = pair().await;
        let mut buf = Vec::new();
        writer.write_all(b"first").await.unwrap();
        reader.readable().await.unwrap();
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), 5);
        // Drained: the next wait goes to epoll instead of a failing read.
        assert!(!reports_readable(&reader).await);
        // Bytes sent afterwards still wake the reader.
        writer.write_all(b", second").await.unwrap();
        assert!(reports_readable(&reader).await);
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), 8);
        assert_eq!(buf, b"first, second");
        // So does the peer's close, after the short read that drained it.
        writer.shutdown().await.unwrap();
        assert!(reports_readable(&reader).await);
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), 0);
    }

    #[tokio::test]
    async fn send_room_shrinks_by_what_an_unread_peer_leaves_queued() {
        let (mut writer, reader) = pair().await;
        let empty = send_room(&writer).unwrap();
        assert!(empty > 0, "an idle socket has room");
        // Fill the reader's receive buffer first, so the rest stays queued
        // at the writer.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0;
        while let Ok(Ok(())) =
            tokio::time::timeout(Duration::from_millis(200), writer.write_all(&chunk)).await
        {
            sent += chunk.len();
            assert!(sent < 256 << 20, "the unread peer never pushed back");
        }
        let full = send_room(&writer).unwrap();
        assert!(
            full < empty / 2,
            "room {full} of {empty} with {sent} bytes unread"
        );
        drop(reader);
    }

    #[tokio::test]
    async fn a_read_that_fills_the_buffer_keeps_the_socket_readable() {
        let (mut writer, reader) = pair().await;
        writer.write_all(&[7; 3 * MIN_READ]).await.unwrap();
        reader.readable().await.unwrap();
        // Room for exactly MIN_READ bytes, all used: more may be waiting.
        let mut buf = Vec::with_capacity(MIN_READ);
        assert_eq!(read_draining(&reader, &mut buf).unwrap(), MIN_READ);
        assert!(reports_readable(&reader).await);
    }
}
