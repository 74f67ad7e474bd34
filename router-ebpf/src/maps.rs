//! The maps both kernel dataplanes share, and their counters.
//!
//! Per-backend entries are keyed by the cookie of the daemon's backend
//! socket; see `router-common` for who writes what.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, SockHash},
};
use router_common::{Control, MAX_SOCKETS, Progress, Stat};

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
