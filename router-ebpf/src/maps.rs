//! The maps both kernel dataplanes share, and their counters.
//!
//! Per-backend entries are keyed by the cookie of the daemon's backend
//! socket; see `router-common` for who writes what.
use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::map,
    maps::{HashMap, PerCpuArray, SockHash},
};
use router_common::{Control, Framing, MAX_SOCKETS, Progress, Stat};

/// Client sockets: redirect targets only, with no program attached.
#[map]
pub(crate) static CLIENTS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// The daemon's instruction per backend connection.
#[map]
pub(crate) static CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// What the program did per backend connection.
#[map]
pub(crate) static PROGRESS: HashMap<u64, Progress> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Adds `by` to a counter.
#[inline(always)]
pub(crate) fn count(stat: Stat, by: u64) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; BPF programs are not preempted on one CPU.
        unsafe { *slot += by };
    }
}

/// The entries of the daemon's backend socket `cookie`: its control and
/// its progress, or `None` (counted) when the daemon has none.
#[inline(always)]
pub(crate) fn entries(cookie: u64) -> Option<(&'static Control, &'static mut Progress)> {
    // SAFETY: the control value is only read, and the daemon replaces
    // (never edits in place) control values, so the fields read are
    // consistent.
    let control = unsafe { CONTROL.get(&cookie) };
    let progress = PROGRESS.get_ptr_mut(&cookie);
    let (Some(control), Some(progress)) = (control, progress) else {
        count(Stat::PassedUnmapped, 1);
        return None;
    };
    // SAFETY: `progress` points into a live map value that only the kernel
    // programs write. Their runs for one socket come one at a time (the
    // kernel holds the socket's lock around a verdict and a send), so plain
    // updates lose nothing; aligned 8-byte stores cannot tear for the
    // daemon reading them.
    Some((control, unsafe { &mut *progress }))
}

/// Whether the program redirects now: it already does, or it adopts the
/// daemon's latest hand-over, which it may only when every byte passed
/// before has been read by the daemon (otherwise redirected bytes would
/// overtake bytes still waiting in the daemon's queue).
#[inline(always)]
pub(crate) fn adopt(control: &Control, progress: &mut Progress) -> bool {
    if progress.splicing == 1 {
        return true;
    }
    let adoptable = control.generation != progress.generation
        && control.fence == progress.passed
        && control.framing.kind != Framing::KIND_NONE;
    if adoptable {
        progress.generation = control.generation;
        progress.framing = control.framing;
        progress.credit_end = progress.redirected + control.credit;
        progress.splicing = 1;
    }
    adoptable
}

/// Passes `len` bytes up to the daemon's socket.
#[inline(always)]
pub(crate) fn pass_up(progress: &mut Progress, len: u64) -> u32 {
    progress.passed += len;
    count(Stat::PassedToDaemon, 1);
    SK_PASS
}
