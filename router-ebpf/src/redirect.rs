//! The in-kernel response path: a sockmap `stream_verdict` program.
//!
//! It judges every skb a backend socket receives. While the daemon's
//! [`Control`] for the socket says where the response goes and how its body
//! is framed, body bytes go straight to the client socket (egress redirect)
//! and never cross into userspace. Everything else is passed to the backend
//! socket's own receive queue, where the daemon reads it:
//! - response heads (no control adopted yet: the daemon parses them);
//! - the skb that holds the end of a body, so the daemon sees the end;
//! - bytes past the hand-over's credit: the kernel worker that sends
//!   redirected skbs queues them, without bound, for a client that does
//!   not read, while the backend's socket keeps taking more; the daemon
//!   relays what the client cannot take yet, waiting for it;
//! - bytes the program cannot frame (a chunk-size line split across skbs,
//!   chunk extensions, more than `MAX_CHUNKS_PER_SKB` chunks in one skb);
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
    maps::SockHash,
    programs::SkBuffContext,
};
use router_common::{MAX_CHUNKS_PER_SKB, MAX_SOCKETS, Stat};

use crate::{
    framing::{Bytes, SIZE_LINE, advance},
    maps::{CLIENTS, adopt, count, entries, pass_up},
};

#[map]
static BACKENDS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[stream_verdict]
pub fn redirect_response(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    if len == 0 {
        count(Stat::PassedFin, 1);
        return SK_PASS;
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some((control, progress)) = entries(cookie) else {
        return SK_PASS;
    };
    if !adopt(control, progress) {
        return pass_up(progress, u64::from(len));
    }
    if progress.redirected + u64::from(len) > progress.credit_end {
        progress.splicing = 0;
        count(Stat::CreditSpent, 1);
        return pass_up(progress, u64::from(len));
    }
    let Some(framing) = advance::<MAX_CHUNKS_PER_SKB>(&Skb(&ctx), progress.framing, u64::from(len))
    else {
        progress.splicing = 0;
        return pass_up(progress, u64::from(len));
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

/// An skb's bytes, read with `bpf_skb_load_bytes`.
struct Skb<'a>(&'a SkBuffContext);

impl Bytes for Skb<'_> {
    #[inline(always)]
    fn line(&self, at: u64, left: u64) -> Option<([u8; SIZE_LINE], usize)> {
        // Constant-size loads only: the verifier rejects a length it cannot
        // prove non-zero.
        if left >= SIZE_LINE as u64 {
            return Some((self.0.load::<[u8; SIZE_LINE]>(at as usize).ok()?, SIZE_LINE));
        }
        let mut line = [0u8; SIZE_LINE];
        let mut read = 0;
        for (i, byte) in line.iter_mut().enumerate() {
            if i as u64 >= left {
                break;
            }
            *byte = self.0.load::<u8>(at as usize + i).ok()?;
            read = i + 1;
        }
        Some((line, read))
    }
}
