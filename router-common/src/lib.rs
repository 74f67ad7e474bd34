//! The contract between the kernel program (`router-ebpf`) and the daemon.
//!
//! Both sides compile this crate: the eBPF object for `bpfel-unknown-none`
//! (`no_std`), the daemon with the `user` feature, which adds aya's `Pod`
//! impls. Everything here is `#[repr(C)]` with no implicit padding, and the
//! names below are the symbols the daemon looks up in the loaded object.
//!
//! # Maps
//! - [`MAP_BACKENDS`]: sockhash of backend sockets, keyed by socket cookie.
//!   The stream-verdict program [`PROG_REDIRECT`] is attached to it, so every
//!   byte a backend sends is judged by the kernel program. A pooled backend
//!   connection stays in it for its whole life.
//! - [`MAP_CLIENTS`]: sockhash of client sockets, keyed by socket cookie, with
//!   no program attached: clients are pure redirect targets, and their own
//!   ingress (requests) stays an ordinary socket that the daemon reads.
//! - [`MAP_CONTROL`]: backend cookie → [`Control`], written only by the
//!   daemon: which client the backend's response goes to, and from where.
//! - [`MAP_PROGRESS`]: backend cookie → [`Progress`], written only by the
//!   kernel program (the daemon creates and deletes the entry): what it did
//!   with the backend's bytes.
//! - [`MAP_STATS`]: per-CPU array of counters indexed by [`Stat`].
//!
//! The send-side dataplane (`sockmap-send`) uses `CLIENTS`, `CONTROL`,
//! `PROGRESS` and `STATS` the same way, keyed by the daemon's backend socket
//! cookie, and three maps of its own:
//! - [`MAP_WATCH`]: daemon backend socket cookie → 1, written by the daemon
//!   before it connects: the sockops program [`PROG_WATCH`] records only
//!   these connections.
//! - [`MAP_TUPLES`]: [`Tuple`] → [`Watched`], written by [`PROG_WATCH`]
//!   when a watched connect completes (the daemon removes it): how the
//!   backend's end of the connection is recognised, and finds its entries.
//! - [`MAP_PEERS`]: sockhash of the *backend's* end of those connections,
//!   where the backend process runs on this host, keyed by that socket's
//!   own cookie. [`PROG_WATCH`] inserts it when the backend accepts; the
//!   sk_msg program [`PROG_SEND`] is attached to it, so it judges every
//!   `sendmsg` of the backend on that connection, in the backend's context.
//!
//! One writer per map value: a hash-map update from userspace replaces the
//! element, so a field the kernel increments in the same value could be lost.
//!
//! # Hand-over
//! The daemon reads each response head itself (bytes the program passes up).
//! Once it knows the body's framing, it publishes a [`Control`] with a new
//! `generation` and `fence` = every byte it has read from the backend so far.
//! The program adopts it on the next skb only if it has passed up exactly
//! `fence` bytes, i.e. the daemon holds no unread bytes that would otherwise
//! be overtaken; then it redirects body bytes while it can follow the
//! framing, and passes up the skb that holds the end of the response (or
//! anything it cannot follow), freezing [`Progress::framing`] at that skb's
//! first byte so the daemon continues from exactly there.
#![no_std]

/// Name of the stream-verdict program in the object file.
pub const PROG_REDIRECT: &str = "redirect_response";
/// Name of the sockhash holding backend sockets (the verdict program's map).
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Name of the sockhash holding client sockets (redirect targets only).
pub const MAP_CLIENTS: &str = "CLIENTS";
/// Name of the hash map from backend socket cookie to [`Control`].
pub const MAP_CONTROL: &str = "CONTROL";
/// Name of the hash map from backend socket cookie to [`Progress`].
pub const MAP_PROGRESS: &str = "PROGRESS";
/// Name of the per-CPU counter array indexed by [`Stat`].
pub const MAP_STATS: &str = "STATS";

/// Name of the sockops program of the send-side dataplane.
pub const PROG_WATCH: &str = "watch_connections";
/// Name of the sk_msg program of the send-side dataplane.
pub const PROG_SEND: &str = "redirect_send";
/// Name of the hash map of daemon backend sockets to watch (cookie → 1).
pub const MAP_WATCH: &str = "WATCH";
/// Name of the hash map from [`Tuple`] to daemon backend socket cookie.
pub const MAP_TUPLES: &str = "TUPLES";
/// Name of the sockhash of backends' own sockets ([`PROG_SEND`]'s map).
pub const MAP_PEERS: &str = "PEERS";

/// Every map name the daemon resolves in the object, for the load test.
pub const MAP_NAMES: [&str; 8] = [
    MAP_BACKENDS,
    MAP_CLIENTS,
    MAP_CONTROL,
    MAP_PROGRESS,
    MAP_STATS,
    MAP_WATCH,
    MAP_TUPLES,
    MAP_PEERS,
];

/// Every program name the daemon resolves in the object.
pub const PROG_NAMES: [&str; 3] = [PROG_REDIRECT, PROG_WATCH, PROG_SEND];

/// Capacity of each socket map and of the per-backend maps: concurrent
/// client connections, and backend connections, per daemon.
pub const MAX_SOCKETS: u32 = 65_536;

/// Most chunks the program follows in one skb before passing it to the
/// daemon; bounds the verifier's work. Measured on kernel 6.18: at 32 the
/// program loads in about 0.1 s more than at 16, at 64 in seconds; 32
/// keeps more coalesced token-stream skbs in the kernel under load.
pub const MAX_CHUNKS_PER_SKB: u32 = 32;

/// Most chunks the send-side program follows in one backend `sendmsg`
/// before passing it to the daemon. Each chunk-size line there is pulled
/// into view with a helper that invalidates the verifier's pointer bounds,
/// which costs far more verifier work per chunk than on the receive side;
/// a streaming server writes one chunk per send, or a few when its writes
/// coalesce.
pub const MAX_CHUNKS_PER_SEND: u32 = 2;

/// Where a response body stands: how it is delimited, and how much of the
/// current piece is left. The daemon's `response::BodyTracker` and the kernel
/// program share this state at a hand-over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// One of the `KIND_*` constants.
    pub kind: u32,
    /// For [`Framing::KIND_CHUNKED`]: one of the `PHASE_*` constants.
    pub phase: u32,
    /// [`Framing::KIND_LENGTH`]: body bytes left. [`Framing::KIND_CHUNKED`]
    /// in [`Framing::PHASE_DATA`]: bytes left in the current chunk, its
    /// closing CRLF included.
    pub remaining: u64,
}

impl Framing {
    /// No response in progress: the program passes every byte up.
    pub const KIND_NONE: u32 = 0;
    /// `Content-Length`: the body ends after `remaining` more bytes.
    pub const KIND_LENGTH: u32 = 1;
    /// `Transfer-Encoding: chunked`.
    pub const KIND_CHUNKED: u32 = 2;
    /// No length: the body ends when the backend closes.
    pub const KIND_UNTIL_CLOSE: u32 = 3;
    /// Inside a chunk's data (or its closing CRLF).
    pub const PHASE_DATA: u32 = 0;
    /// At the first byte of a chunk-size line.
    pub const PHASE_SIZE: u32 = 1;
}

/// The daemon's instruction for one backend socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// Socket cookie of the client socket (key in [`MAP_CLIENTS`]) that
    /// receives this backend's response.
    pub client_cookie: u64,
    /// Bumped by every publication; the program adopts each one once.
    pub generation: u64,
    /// Bytes the daemon had read from the backend socket when it published:
    /// the program adopts only when it has passed up exactly this many.
    pub fence: u64,
    /// The body's framing at the fence.
    pub framing: Framing,
    /// Most body bytes the program may redirect under this generation. The
    /// daemon grants what the client socket can queue without blocking:
    /// on the send side a redirect then never stalls or fails in the
    /// backend's `sendmsg`; on the receive side the kernel worker never
    /// queues more for a client that does not read (it would, without
    /// bound, while the backend's socket kept taking more). Once spent, the
    /// program passes bytes up and the daemon, which can wait for the
    /// client, relays them.
    pub credit: u64,
}

/// What the kernel program did with one backend socket's bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The last [`Control::generation`] adopted.
    pub generation: u64,
    /// Bytes passed up to the backend socket's own receive queue, for the
    /// daemon to read.
    pub passed: u64,
    /// Bytes redirected to clients.
    pub redirected: u64,
    /// The body's framing after the last redirected byte; frozen when the
    /// program stops splicing, so it is the framing at the first byte the
    /// daemon reads next.
    pub framing: Framing,
    /// 1 while the program redirects under the adopted generation, 0 once it
    /// passes bytes up again.
    pub splicing: u32,
    /// Send side: 1 once the sockops program put the backend's own socket in
    /// [`MAP_PEERS`] (the backend runs on this host), so its sends are
    /// judged; 0 otherwise. Always 0 on the receive side.
    pub peer: u32,
    /// The `redirected` count up to which the adopted generation's credit
    /// lasts.
    pub credit_end: u64,
}

const _: () = assert!(size_of::<Framing>() == 16);
const _: () = assert!(size_of::<Control>() == 48);
const _: () = assert!(size_of::<Progress>() == 56);
const _: () = assert!(size_of::<Tuple>() == 12);
const _: () = assert!(size_of::<Watched>() == 16);
const _: () = assert!(align_of::<Control>() == 8);
const _: () = assert!(align_of::<Progress>() == 8);

/// One router→backend TCP connection over IPv4, as both of its ends see
/// it: the key of [`MAP_TUPLES`]. Addresses are in network byte order (as
/// the kernel's context fields give them), ports in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// The router's address.
    pub router_ip4: u32,
    /// The backend's address.
    pub backend_ip4: u32,
    /// The router's port.
    pub router_port: u16,
    /// The backend's port.
    pub backend_port: u16,
}

impl Tuple {
    /// A port from a context field the kernel stores in network byte order
    /// in the upper 16 bits (`bpf_sock_ops.remote_port`,
    /// `sk_msg_md.remote_port`), in host byte order.
    pub const fn port_from_network_field(field: u32) -> u16 {
        u16::from_be((field >> 16) as u16)
    }

    /// A port from a context field in host byte order (`local_port`).
    pub const fn port_from_host_field(field: u32) -> u16 {
        field as u16
    }

    /// The connection as the router's end names it: its own address
    /// (`router`) and the backend's (`backend`).
    pub const fn from_router_end(
        router: core::net::SocketAddrV4,
        backend: core::net::SocketAddrV4,
    ) -> Self {
        Self {
            router_ip4: u32::from_ne_bytes(router.ip().octets()),
            backend_ip4: u32::from_ne_bytes(backend.ip().octets()),
            router_port: router.port(),
            backend_port: backend.port(),
        }
    }
}

/// A watched connection, as its router end saw it established: the value
/// of [`MAP_TUPLES`].
///
/// A 4-tuple names a connection only within one network namespace: two
/// routers, each talking to an engine over its own pod's loopback, can use
/// the same one. Every router's sockops program sees every accepted socket
/// under its cgroup, so the backend's end must prove it is this connection
/// before it is put in [`MAP_PEERS`]: its next sequence numbers must be the
/// router end's, crossed (each side's initial sequence number is random).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    /// The daemon's backend socket cookie: the key of its entries.
    pub cookie: u64,
    /// The router end's next sequence number to send, when established.
    pub router_next: u32,
    /// The router end's next sequence number to receive, when established.
    pub backend_next: u32,
}

/// Index of a counter in [`MAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Backend skbs redirected to a client socket.
    RedirectedSkbs = 0,
    /// Payload bytes redirected to a client socket.
    RedirectedBytes = 1,
    /// Zero-length skbs (FIN) passed to userspace, never redirected.
    PassedFin = 2,
    /// Skbs from a backend socket with no map entries, passed to userspace.
    PassedUnmapped = 3,
    /// Redirects that failed (client socket gone); the skb is dropped.
    RedirectFailed = 4,
    /// Skbs passed to the daemon: response heads, response ends, bytes the
    /// program could not frame, and bytes before a fence was reached.
    PassedToDaemon = 5,
    /// Send side: messages passed to the daemon because the generation's
    /// credit was spent (the client socket may be full).
    CreditSpent = 6,
    /// Send side: backend sockets the sockops program put in the peer map.
    PeersAdded = 7,
    /// Send side: accepted sockets whose 4-tuple matched a watched
    /// connection but whose sequence numbers did not (another network
    /// namespace's connection), left alone.
    PeersRefused = 8,
}

impl Stat {
    /// Number of counters; the length of [`MAP_STATS`].
    pub const COUNT: u32 = 9;
    /// Every counter, in index order.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::RedirectedSkbs,
        Stat::RedirectedBytes,
        Stat::PassedFin,
        Stat::PassedUnmapped,
        Stat::RedirectFailed,
        Stat::PassedToDaemon,
        Stat::CreditSpent,
        Stat::PeersAdded,
        Stat::PeersRefused,
    ];

    /// The counter's name as exported in `/metrics`.
    pub const fn name(self) -> &'static str {
        match self {
            Stat::RedirectedSkbs => "redirected_skbs",
            Stat::RedirectedBytes => "redirected_bytes",
            Stat::PassedFin => "passed_fin",
            Stat::PassedUnmapped => "passed_unmapped",
            Stat::RedirectFailed => "redirect_failed",
            Stat::PassedToDaemon => "passed_to_daemon",
            Stat::CreditSpent => "credit_spent",
            Stat::PeersAdded => "peers_added",
            Stat::PeersRefused => "peers_refused",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `Control` and `Progress` are `repr(C)`, made of integers with
    // no padding (sizes asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for super::Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Progress {}
    // SAFETY: `repr(C)`, integers only, no padding (size asserted above).
    unsafe impl aya::Pod for super::Tuple {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Watched {}
}
