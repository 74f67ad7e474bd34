//! Giving up privilege once start-up no longer needs it.
//!
//! Root (or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON) is needed only to load and attach the
//! sockmap program, and CAP_NET_BIND_SERVICE only to bind a port below
//! 1024. Both happen before the daemon serves; afterwards the maps are used
//! through the descriptors it already holds, which needs no capability. So
//! [`drop_all`] clears every capability set (and sets `no_new_privs`), and
//! with `--user` the daemon first becomes that user. The daemon runs no
//! other program, so nothing can regain them.
//!
//! Capabilities belong to threads: this runs on the main thread before the
//! daemon starts any other, and every later thread inherits the empty sets.
use std::{ffi::CString, io};

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`, one 32-bit half of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Clears the effective, permitted and inheritable capability sets of the
/// calling thread (and so of threads it starts later), the ambient set, and
/// forbids gaining privilege again (`PR_SET_NO_NEW_PRIVS`).
pub fn drop_all() -> io::Result<()> {
    // SAFETY: prctl with these constant arguments reads no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; clearing the ambient set needs no privilege.
    let cleared = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if cleared != 0 {
        return Err(io::Error::last_os_error());
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads one header and, for version 3, two data structs,
    // which `header` and `data` are.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Becomes `user` (a name from the password database): its group, no
/// supplementary groups, then its uid. Dropping root this way also clears
/// the capability sets.
pub fn switch_user(user: &str) -> io::Result<(libc::uid_t, libc::gid_t)> {
    let name = CString::new(user)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name with a NUL byte"))?;
    // SAFETY: an all-zero passwd is a valid value to be overwritten.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `entry` and `buf` (whose length it is
    // told) and sets `found` to `&entry` or null.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &raw mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user named {user}"),
        ));
    }
    let (uid, gid) = (entry.pw_uid, entry.pw_gid);
    // SAFETY: setgroups reads 0 entries; setgid and setuid take plain ids.
    // glibc applies each to every thread of the process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((uid, gid))
}
