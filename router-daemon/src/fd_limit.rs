//! The process's open-file limit (`RLIMIT_NOFILE`): raised to its hard
//! ceiling at start, since every client and backend connection is a file
//! descriptor, and the soft default (often 1024) would cap the daemon far
//! below what the machine allows.
use std::io;

/// The soft and hard open-file limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFiles {
    /// The limit in force.
    pub soft: u64,
    /// The most the soft limit may be raised to without privilege.
    pub hard: u64,
}

/// The current limits.
pub(crate) fn current() -> io::Result<OpenFiles> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OpenFiles {
        soft: limit.rlim_cur,
        hard: limit.rlim_max,
    })
}

/// Raises the soft limit to the hard one; returns the limits before and
/// after.
pub fn raise() -> io::Result<(OpenFiles, OpenFiles)> {
    let before = current()?;
    if before.soft < before.hard {
        let limit = libc::rlimit {
            rlim_cur: before.hard,
            rlim_max: before.hard,
        };
        // SAFETY: setrlimit reads one rlimit, which `limit` is.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, current()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let (before, after) = raise().expect("raise");
        assert_eq!(after.soft, after.hard);
        assert_eq!(after.hard, before.hard);
        assert!(after.soft >= before.soft);
    }
}
