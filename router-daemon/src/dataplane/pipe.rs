//! The splice dataplane's mechanics: a kernel pipe between two sockets.
//!
//! `splice(2)` moves pages from the backend socket into a pipe and from the
//! pipe into the client socket; the bytes never enter the daemon's memory,
//! and no privilege is needed.
use std::{
    io,
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
    ptr,
};

/// Pipe capacity asked for (the default is 64 KiB; unprivileged processes
/// may go up to `/proc/sys/fs/pipe-max-size`, 1 MiB by default).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// A non-blocking pipe; both ends close on drop.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Largest amount moved in one splice: the pipe's capacity.
    capacity: usize,
}

impl Pipe {
    /// A new pipe, enlarged where the system allows.
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ on our own pipe; failure leaves the default.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        let capacity = usize::try_from(size).unwrap_or(64 * 1024);
        Ok(Self {
            read,
            write,
            capacity,
        })
    }

    /// Moves up to `max` bytes (at most the pipe's capacity) from `socket`
    /// into the pipe. `Ok(0)` is end of stream.
    pub(crate) fn fill_from(&self, socket: &impl AsRawFd, max: u64) -> io::Result<usize> {
        let len = usize::try_from(max).map_or(self.capacity, |max| max.min(self.capacity));
        splice(socket.as_raw_fd(), self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into `socket`.
    pub(crate) fn drain_into(&self, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), socket.as_raw_fd(), len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are open descriptors; null offsets mean "current
    // position", required for sockets and pipes.
    let moved = unsafe {
        libc::splice(
            from,
            ptr::null_mut(),
            to,
            ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(moved).map_err(|_| io::Error::last_os_error())
}
