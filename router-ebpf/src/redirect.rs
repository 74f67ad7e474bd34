//! The in-kernel response path: a sockmap `stream_verdict` program.
//!
//! It judges every skb a backend socket receives. While the daemon's
//! [`Control`] for the socket says where the response goes and how its body
//! is framed, body bytes go straight to the client socket (egress redirect)
//! and never cross into userspace. Everything else is passed to the backend
//! socket's own receive queue, where the daemon reads it:
//! - response heads (no control adopted yet: the daemon parses them);
//! - the skb that holds the end of a body, so the daemon sees the end;
//! - bytes the program cannot frame (a chunk-size line split across skbs,
//!   chunk extensions, more than [`MAX_CHUNKS_PER_SKB`] chunks in one skb);
//! - a zero-length skb, the backend's FIN: redirecting it would set EPIPE on
//!   the client and disable its sending side;
//! - an skb from a backend with no entries.
//!
//! Framing is followed, not policed: the program only counts lengths and
//! reads chunk-size lines. Policy (which backend, which client, when to hand
//! over) lives in the daemon; see `router-common` for the hand-over rules.
use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use router_common::{Control, Framing, MAX_CHUNKS_PER_SKB, MAX_SOCKETS, Progress, Stat};

#[map]
static BACKENDS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static CLIENTS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PROGRESS: HashMap<u64, Progress> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

/// Longest chunk-size line the program reads (hex digits and CRLF).
const SIZE_LINE: usize = 16;

#[stream_verdict]
pub fn redirect_response(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        count(Stat::PassedFin, 1);
        return SK_PASS;
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // SAFETY: the value is only read, and the daemon replaces (never edits
    // in place) control values, so the fields read are consistent.
    let (Some(control), Some(progress)) = (
        unsafe { CONTROL.get(&cookie) },
        PROGRESS.get_ptr_mut(&cookie),
    ) else {
        count(Stat::PassedUnmapped, 1);
        return SK_PASS;
    };
    // SAFETY: `progress` points into a live map value that only this
    // program writes. Verdicts for one socket run one at a time (the kernel
    // holds the socket's lock around `read_skb`), so plain updates lose
    // nothing; aligned 8-byte stores cannot tear for the daemon reading them.
    let progress = unsafe { &mut *progress };
    if progress.splicing == 0 {
        // Adopt a new hand-over only when every byte passed before it has
        // been read by the daemon: otherwise redirected bytes would overtake
        // bytes still waiting in the daemon's queue.
        let adoptable = control.generation != progress.generation
            && control.fence == progress.passed
            && control.framing.kind != Framing::KIND_NONE;
        if !adoptable {
            return pass_up(progress, len);
        }
        progress.generation = control.generation;
        progress.framing = control.framing;
        progress.splicing = 1;
    }
    let Some(framing) = advance(&ctx, progress.framing, len) else {
        progress.splicing = 0;
        return pass_up(progress, len);
    };
    let mut client = control.client_cookie;
    if CLIENTS.redirect_skb(&ctx, &mut client, 0) != i64::from(SK_PASS) {
        // The client is gone; the daemon sees that on the client socket and
        // closes this backend connection, whose stream is now incomplete.
        progress.splicing = 0;
        count(Stat::RedirectFailed, 1);
        return SK_DROP;
    }
    progress.framing = framing;
    progress.redirected += u64::from(len);
    count(Stat::RedirectedSkbs, 1);
    count(Stat::RedirectedBytes, u64::from(len));
    SK_PASS
}

/// Passes the skb to the backend socket's own queue for the daemon.
#[inline(always)]
fn pass_up(progress: &mut Progress, len: u32) -> u32 {
    progress.passed += u64::from(len);
    count(Stat::PassedToDaemon, 1);
    SK_PASS
}

/// The framing after `len` more body bytes, or `None` when this skb holds
/// the end of the body or something the program does not follow.
#[inline(always)]
fn advance(ctx: &SkBuffContext, mut framing: Framing, len: u32) -> Option<Framing> {
    let len = u64::from(len);
    match framing.kind {
        Framing::KIND_UNTIL_CLOSE => Some(framing),
        Framing::KIND_LENGTH if framing.remaining > len => {
            framing.remaining -= len;
            Some(framing)
        }
        Framing::KIND_CHUNKED => advance_chunked(ctx, framing, len),
        _ => None,
    }
}

/// Follows chunks through `len` bytes: data is counted, size lines are read.
#[inline(always)]
fn advance_chunked(ctx: &SkBuffContext, mut framing: Framing, len: u64) -> Option<Framing> {
    let mut at: u64 = 0;
    for _ in 0..MAX_CHUNKS_PER_SKB {
        if framing.phase == Framing::PHASE_DATA {
            let left = len - at;
            if framing.remaining >= left {
                framing.remaining -= left;
                if framing.remaining == 0 {
                    framing.phase = Framing::PHASE_SIZE;
                }
                return Some(framing);
            }
            at += framing.remaining;
            framing.remaining = 0;
            framing.phase = Framing::PHASE_SIZE;
        }
        // A chunk-size line starts at `at`, inside this skb.
        let (size, line_len) = size_line(ctx, at, len - at)?;
        if size == 0 {
            // The last chunk: the body ends in this skb.
            return None;
        }
        framing.phase = Framing::PHASE_DATA;
        framing.remaining = size + 2;
        at += line_len;
        if at == len {
            return Some(framing);
        }
    }
    None
}

/// Reads a chunk-size line (`hex digits CRLF`, nothing else) at `at`:
/// returns the size and the line's length, or `None` when the line is not
/// wholly in this skb or has extensions.
#[inline(always)]
fn size_line(ctx: &SkBuffContext, at: u64, left: u64) -> Option<(u64, u64)> {
    if left < 3 {
        return None;
    }
    // Constant-size loads only: the verifier rejects a length it cannot
    // prove non-zero.
    let mut line = [0u8; SIZE_LINE];
    let read = if left >= SIZE_LINE as u64 {
        line = ctx.load::<[u8; SIZE_LINE]>(at as usize).ok()?;
        SIZE_LINE
    } else {
        let mut read = 0;
        for (i, byte) in line.iter_mut().enumerate() {
            if i as u64 >= left {
                break;
            }
            *byte = ctx.load::<u8>(at as usize + i).ok()?;
            read = i + 1;
        }
        read
    };
    let mut size: u64 = 0;
    let mut i = 0;
    while i + 1 < SIZE_LINE {
        if i + 1 >= read {
            return None;
        }
        let byte = line[i];
        let digit = match byte {
            b'0'..=b'9' => byte - b'0',
            b'a'..=b'f' => byte - b'a' + 10,
            b'A'..=b'F' => byte - b'A' + 10,
            b'\r' if i > 0 && line[i + 1] == b'\n' => return Some((size, i as u64 + 2)),
            _ => return None,
        };
        size = (size << 4) | u64::from(digit);
        i += 1;
    }
    None
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
