//! The in-kernel response path: a sockmap `stream_verdict` program.
//!
//! It judges every skb a backend socket receives. Data for a backend with a
//! [`Flow`] goes straight to that flow's client socket (egress redirect), so
//! response bytes never cross into userspace. Everything else is passed to
//! the backend socket's own receive queue, where the daemon reads it:
//! - a zero-length skb is the backend's FIN; redirecting it would set EPIPE on
//!   the client and disable its sending side, so userspace must see it and
//!   propagate the close itself;
//! - an skb from a backend with no flow entry has nowhere to go.
//!
//! Policy (which backend, which client) lives in userspace; this program only
//! looks up, redirects or passes, and counts.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use router_common::{Flow, MAX_SOCKETS, Stat};

#[map]
static BACKENDS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static CLIENTS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static FLOWS: HashMap<u64, Flow> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

#[stream_verdict]
pub fn splice_response(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        count(Stat::PassedFin, 1);
        return SK_PASS;
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(flow) = FLOWS.get_ptr_mut(&cookie) else {
        count(Stat::PassedUnmapped, 1);
        return SK_PASS;
    };
    // SAFETY: `flow` points into a live map value for the duration of the
    // program.
    let mut client = unsafe { (*flow).client_cookie };
    if CLIENTS.redirect_skb(&ctx, &mut client, 0) != i64::from(SK_PASS) {
        count(Stat::RedirectFailed, 1);
        return SK_DROP;
    }
    // SAFETY: `flow` points into a live map value. Verdicts for one socket
    // run one at a time (the kernel holds the socket's lock around
    // `read_skb`), and only this socket's verdicts write this entry, so a
    // plain add loses nothing; the aligned 8-byte store cannot tear for the
    // daemon reading it.
    unsafe { (*flow).spliced_bytes += u64::from(len) };
    count(Stat::SplicedSkbs, 1);
    count(Stat::SplicedBytes, u64::from(len));
    SK_PASS
}

#[inline(always)]
fn count(stat: Stat, by: u64) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot; BPF programs are not preempted on one CPU.
        unsafe { *slot += by };
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
