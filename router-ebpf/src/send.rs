//! The send-side response path: a sockops program that finds the backend's
//! own end of each router→backend connection on this host, and an sk_msg
//! program that judges every `sendmsg` the backend makes on it.
//!
//! The sk_msg program runs in the backend's `sendmsg`, before its bytes
//! enter TCP. While the daemon's [`Control`](router_common::Control) says
//! where the response goes, body bytes are redirected straight onto the
//! client socket's send queue (synchronously, in the backend's context):
//! they never cross loopback to the router, and the daemon never wakes for
//! them. Everything else is passed on to the router's socket, where the
//! daemon reads it: response heads, the message that holds the end of a
//! body, bytes the program cannot frame, and bytes past the generation's
//! credit (the client socket may be full; the daemon can wait for it, the
//! backend must not).
//!
//! The sockops program is attached to a cgroup (the cgroup v2 root by
//! default), so it sees sockets of every process below it, in any network
//! namespace; it touches only connections the daemon asked it to watch.
use aya_ebpf::{
    bindings::{
        BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        sk_action::SK_PASS,
    },
    helpers::{bpf_get_socket_cookie, bpf_msg_apply_bytes, bpf_msg_pull_data},
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};
use router_common::{MAX_CHUNKS_PER_SEND, MAX_SOCKETS, Stat, Tuple, Watched};

use crate::{
    framing::{Bytes, SIZE_LINE, advance},
    maps::{CLIENTS, PROGRESS, adopt, count, entries, pass_up},
};

/// `AF_INET`: only IPv4 connections are watched.
const AF_INET: u32 = 2;

#[map]
static WATCH: HashMap<u64, u32> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static TUPLES: HashMap<Tuple, Watched> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PEERS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Records a watched connect as it completes (the daemon's end), and puts
/// the backend's end of it, when accepted on this host, in the peer map.
///
/// The daemon's end is established first: the backend's end needs the
/// final ACK of the handshake, which the daemon's end sends once it is.
/// The backend's end is taken only if its sequence numbers are the daemon
/// end's, crossed ([`Watched`]): another namespace's connection with the
/// same 4-tuple is not this one.
#[sock_ops]
pub fn watch_connections(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the helper only reads the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: the value is only tested for presence.
            if unsafe { WATCH.get(&cookie) }.is_some() {
                let tuple = Tuple {
                    router_ip4: ctx.local_ip4(),
                    backend_ip4: ctx.remote_ip4(),
                    router_port: Tuple::port_from_host_field(ctx.local_port()),
                    backend_port: Tuple::port_from_network_field(ctx.remote_port()),
                };
                // SAFETY: plain reads of the live context.
                let watched = unsafe {
                    Watched {
                        cookie,
                        router_next: (*ctx.ops).snd_nxt,
                        backend_next: (*ctx.ops).rcv_nxt,
                    }
                };
                let _ = TUPLES.insert(&tuple, &watched, 0);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let tuple = Tuple {
                router_ip4: ctx.remote_ip4(),
                backend_ip4: ctx.local_ip4(),
                router_port: Tuple::port_from_network_field(ctx.remote_port()),
                backend_port: Tuple::port_from_host_field(ctx.local_port()),
            };
            // SAFETY: a plain copy of the value.
            let Some(&watched) = (unsafe { TUPLES.get(&tuple) }) else {
                return 1;
            };
            // SAFETY: plain reads of the live context.
            let (next, expected) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).rcv_nxt) };
            if next != watched.backend_next || expected != watched.router_next {
                count(Stat::PeersRefused, 1);
                return 1;
            }
            let daemon = watched.cookie;
            // SAFETY: the helper only reads the context's socket.
            let mut own = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            // SAFETY: `ctx.ops` is the live context of this run.
            if PEERS
                .update(&mut own, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                count(Stat::PeersAdded, 1);
                if let Some(progress) = PROGRESS.get_ptr_mut(&daemon) {
                    // SAFETY: a live map value; only kernel programs write it,
                    // and this connection's sends cannot run before it is
                    // accepted.
                    unsafe { (*progress).peer = 1 };
                }
            }
        }
        _ => {}
    }
    1
}

/// Judges one `sendmsg` of a backend on a watched connection.
#[sk_msg]
pub fn redirect_send(ctx: SkMsgContext) -> u32 {
    // A verdict applies to the whole message: `apply_bytes` would otherwise
    // persist from an earlier run of this `sendmsg`.
    // SAFETY: the helper only sets a field of the live message.
    unsafe { bpf_msg_apply_bytes(ctx.msg, 0) };
    let len = u64::from(ctx.size());
    // SAFETY: plain reads of the live context.
    let tuple = unsafe {
        let msg = &*ctx.msg;
        Tuple {
            router_ip4: msg.remote_ip4,
            backend_ip4: msg.local_ip4,
            router_port: Tuple::port_from_network_field(msg.remote_port),
            backend_port: Tuple::port_from_host_field(msg.local_port),
        }
    };
    // SAFETY: a plain copy of the value.
    let Some(&Watched { cookie: daemon, .. }) = (unsafe { TUPLES.get(&tuple) }) else {
        count(Stat::PassedUnmapped, 1);
        return SK_PASS;
    };
    let Some((control, progress)) = entries(daemon) else {
        return SK_PASS;
    };
    if !adopt(control, progress) {
        return pass_up(progress, len);
    }
    if progress.redirected + len > progress.credit_end {
        progress.splicing = 0;
        count(Stat::CreditSpent, 1);
        return pass_up(progress, len);
    }
    let Some(framing) = advance::<MAX_CHUNKS_PER_SEND>(&Msg(&ctx), progress.framing, len) else {
        progress.splicing = 0;
        return pass_up(progress, len);
    };
    let mut client = control.client_cookie;
    if CLIENTS.redirect_msg(&ctx, &mut client, 0) != i64::from(SK_PASS) {
        // The client socket is gone: the daemon reads these bytes, finds the
        // client closed, and closes this connection. The backend sees an
        // ordinary close, never an error for a client it does not know.
        progress.splicing = 0;
        count(Stat::RedirectFailed, 1);
        return pass_up(progress, len);
    }
    progress.framing = framing;
    progress.redirected += len;
    count(Stat::RedirectedSkbs, 1);
    count(Stat::RedirectedBytes, len);
    SK_PASS
}

/// A message's bytes, pulled into view with `bpf_msg_pull_data`.
struct Msg<'a>(&'a SkMsgContext);

impl Bytes for Msg<'_> {
    #[inline(always)]
    fn line(&self, at: u64, left: u64) -> Option<([u8; SIZE_LINE], usize)> {
        let want = if left >= SIZE_LINE as u64 {
            SIZE_LINE as u64
        } else {
            left
        };
        // SAFETY: the helper bounds-checks the range against the message.
        if unsafe { bpf_msg_pull_data(self.0.msg, at as u32, (at + want) as u32, 0) } != 0 {
            return None;
        }
        let data = self.0.data();
        let data_end = self.0.data_end();
        if want == SIZE_LINE as u64 {
            // One bounds check for the whole line keeps the verifier's work
            // small; the loop below runs only at a message's tail.
            if data + SIZE_LINE > data_end {
                return None;
            }
            // SAFETY: checked against `data_end` just above.
            let line = unsafe { core::ptr::read_unaligned(data as *const [u8; SIZE_LINE]) };
            return Some((line, SIZE_LINE));
        }
        let mut line = [0u8; SIZE_LINE];
        let mut read = 0;
        for (i, byte) in line.iter_mut().enumerate() {
            if i as u64 >= want || data + i + 1 > data_end {
                break;
            }
            // SAFETY: checked against `data_end` just above.
            *byte = unsafe { *((data + i) as *const u8) };
            read = i + 1;
        }
        Some((line, read))
    }
}
