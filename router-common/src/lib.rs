//! The contract between the kernel program (`router-ebpf`) and the daemon.
//!
//! Both sides compile this crate: the eBPF object for `bpfel-unknown-none`
//! (`no_std`), the daemon with the `user` feature, which adds aya's `Pod`
//! impls. Everything here is `#[repr(C)]` with no implicit padding, and the
//! names below are the symbols the daemon looks up in the loaded object.
//!
//! # Maps
//! - [`MAP_BACKENDS`]: sockhash of backend sockets, keyed by socket cookie.
//!   The stream-verdict program [`PROG_SPLICE`] is attached to it, so every
//!   byte a backend sends is judged by the kernel program.
//! - [`MAP_CLIENTS`]: sockhash of client sockets, keyed by socket cookie, with
//!   no program attached: clients are pure redirect targets, and their own
//!   ingress (requests) stays an ordinary socket that the daemon reads.
//! - [`MAP_FLOWS`]: hash map from a backend socket cookie to its [`Flow`]:
//!   which client receives its bytes, and how many bytes were spliced.
//! - [`MAP_STATS`]: per-CPU array of counters indexed by [`Stat`].
#![no_std]

/// Name of the stream-verdict program in the object file.
pub const PROG_SPLICE: &str = "splice_response";
/// Name of the sockhash holding backend sockets (the verdict program's map).
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Name of the sockhash holding client sockets (redirect targets only).
pub const MAP_CLIENTS: &str = "CLIENTS";
/// Name of the hash map from backend socket cookie to [`Flow`].
pub const MAP_FLOWS: &str = "FLOWS";
/// Name of the per-CPU counter array indexed by [`Stat`].
pub const MAP_STATS: &str = "STATS";

/// Every map name the daemon resolves in the object, for the load test.
pub const MAP_NAMES: [&str; 4] = [MAP_BACKENDS, MAP_CLIENTS, MAP_FLOWS, MAP_STATS];

/// Capacity of each socket map and of [`MAP_FLOWS`]: concurrent spliced
/// responses (and client connections) per daemon.
pub const MAX_SOCKETS: u32 = 65_536;

/// Where a backend socket's bytes go, and how many went there.
///
/// Written by the daemon before the request is forwarded; `spliced_bytes` is
/// incremented by the kernel program for every byte it redirects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Socket cookie of the client socket (key in [`MAP_CLIENTS`]).
    pub client_cookie: u64,
    /// Bytes redirected from the backend socket to the client so far.
    pub spliced_bytes: u64,
}

const _: () = assert!(size_of::<Flow>() == 16);
const _: () = assert!(align_of::<Flow>() == 8);

/// Index of a counter in [`MAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Backend skbs redirected to a client socket.
    SplicedSkbs = 0,
    /// Payload bytes redirected to a client socket.
    SplicedBytes = 1,
    /// Zero-length skbs (FIN) passed to userspace, never redirected.
    PassedFin = 2,
    /// Skbs from a backend socket with no flow entry, passed to userspace.
    PassedUnmapped = 3,
    /// Redirects that failed (client socket gone); the skb is dropped.
    RedirectFailed = 4,
}

impl Stat {
    /// Number of counters; the length of [`MAP_STATS`].
    pub const COUNT: u32 = 5;
    /// Every counter, in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::SplicedSkbs,
        Stat::SplicedBytes,
        Stat::PassedFin,
        Stat::PassedUnmapped,
        Stat::RedirectFailed,
    ];

    /// The counter's name as exported in `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::SplicedSkbs => "spliced_skbs",
            Stat::SplicedBytes => "spliced_bytes",
            Stat::PassedFin => "passed_fin",
            Stat::PassedUnmapped => "passed_unmapped",
            Stat::RedirectFailed => "redirect_failed",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `Flow` is `repr(C)`, made of two `u64`s with no padding
    // (asserted above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::Flow {}
}
