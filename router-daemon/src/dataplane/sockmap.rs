//! The sockmap dataplanes: loading the kernel programs and handing sockets
//! to them.
//!
//! Two hooks judge a backend's response bytes ([`Hook`]):
//! - **receive** (`--dataplane sockmap`): a `stream_verdict` program on the
//!   daemon's backend sockets redirects body skbs to the client's egress,
//!   through the kernel's psock worker;
//! - **send** (`--dataplane sockmap-send`): where the backend runs on this
//!   host, a sockops program at a cgroup puts the *backend's* end of each
//!   connection in a map whose sk_msg program redirects body bytes inside
//!   the backend's own `sendmsg`, straight onto the client socket. Only
//!   connections the daemon watches are touched; a remote backend's
//!   responses are copied by the daemon.
//!
//! Both follow the protocol below; the send hook differs in steps 3 and 8
//! (see *Send hook*).
//!
//! # Hand-over protocol
//! The order matters; each step says why it is where it is. (The hazards it
//! avoids were seen on this kernel: bytes queued before insertion stall or
//! are duplicated; a redirected FIN poisons the target; `SO_RCVLOWAT` above 1
//! delays verdicts, so it stays at 1.)
//!
//! Per client connection, once:
//! 1. **Client registered** ([`Sockmap::add_client`]): the client socket goes
//!    into `CLIENTS`, a map with no program. That makes it a valid redirect
//!    target while its own ingress (the next request) stays an ordinary
//!    socket the daemon reads.
//!
//! Per backend connection, once, right after connect ([`Sockmap::add_backend`]):
//! 2. **Entries before the socket**: `PROGRESS` (zeroed) and `CONTROL`
//!    (framing `NONE`: pass everything up) are written first, so the program
//!    never meets a socket without them and every byte passed up is counted.
//! 3. **Backend inserted into `BACKENDS`** before any request is written: a
//!    backend never speaks first, so its receive queue is empty and nothing
//!    can be queued ahead of the verdict program (such bytes would stall or
//!    be duplicated). The socket stays in the map while pooled, so reusing it
//!    costs no map insertion and no kick.
//!
//! Per response (driven by `Dataplane::exchange`):
//! 4. **Request written**; the program passes the response head up, because
//!    no new control has been published.
//! 5. **Head read and written by the daemon**, with whatever body bytes came
//!    with it, counted in `read`; and at least the body's first bytes,
//!    which the daemon waits for if they did not come with the head: they
//!    are the first token, which times the backend's TTFT and ends the
//!    request's prefill in the load routing sees.
//! 6. **Control published** ([`BackendSlot::publish`]): the client's cookie,
//!    a new generation, the body's framing after the bytes already read, and
//!    `fence = read`. The program adopts it only when it has passed up exactly
//!    `fence` bytes, so bytes still waiting in the daemon's queue are never
//!    overtaken by redirected ones; if it had passed more, the daemon reads
//!    them, writes them and publishes again.
//! 7. **Body redirected in the kernel** while the program can follow the
//!    framing and the publication's credit lasts; the skb holding the end
//!    of the body (or anything it cannot frame, or the skb past the credit)
//!    is passed up with [`Progress::framing`] frozen at its first byte.
//!    **Credit**: each publication grants [`Control::credit`], from what
//!    the client socket's send queue can still take ([`tcp::send_room`];
//!    [`Hook::credit`] says how much), none under `MIN_CREDIT`: the kernel
//!    worker that sends redirected skbs would queue them without bound for
//!    a client that stops reading, as the backend's socket keeps taking
//!    more. Past it the daemon relays what the program passes up, waiting
//!    for the client, and publishes again once the client has room.
//! 8. **Flushed before the daemon writes**: the kernel worker sends
//!    redirected skbs asynchronously, so before writing passed-up bytes, or
//!    closing, the daemon waits until the client's send queue has taken every
//!    redirected byte (see `Client::flushed`).
//! 9. **FIN passed up**: zero-length skbs are never redirected; the daemon
//!    reads EOF on the backend and passes the half-close on itself.
//! 10. **Entries removed** when the [`BackendSlot`] drops (the connection
//!     closes); the socket maps also drop sockets as they close.
//!
//! # Send hook
//! 3. **Watched before connecting** ([`Sockmap::watch`]): the daemon's
//!    socket is created, its cookie put in `WATCH`, and only then connected.
//!    The sockops program records the connection's 4-tuple in `TUPLES` when
//!    the daemon's end is established, with its sequence numbers, and when
//!    the backend's end is (it needs the handshake's last ACK, so it comes
//!    second) and its sequence numbers match, crossed (a 4-tuple is unique
//!    only within a network namespace; see [`Watched`]), puts that socket
//!    in `PEERS` and sets [`Progress::peer`]. A backend never speaks first,
//!    so it is in the map before its first send.
//! 7. **Credit** is what keeps the backend's `sendmsg`, where the redirect
//!    runs, from ever waiting for, or failing on, a slow client (an asyncio
//!    backend would spin on EAGAIN).
//!    The daemon hands over streamed (chunked) bodies only; bodies with a
//!    length it copies (`Dataplane::move_body` says why).
//! 8. **Nothing to flush**: a redirect has put its bytes on the client's
//!    send queue before the backend's `sendmsg` returns, so before any
//!    later byte reaches the daemon.
use std::{
    fs::File,
    net::SocketAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, SkMsg, SkSkb, SockOps},
};
use router_common::{
    Control, MAP_BACKENDS, MAP_CLIENTS, MAP_CONTROL, MAP_PEERS, MAP_PROGRESS, MAP_STATS,
    MAP_TUPLES, MAP_WATCH, PROG_REDIRECT, PROG_SEND, PROG_WATCH, Progress, Stat, Tuple, Watched,
};

use super::tcp;

/// The eBPF object built by `build.rs`; empty when built without the toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router-ebpf"));

/// Oldest kernel `auto` trusts: sockmap FIN and wake-up fixes landed in 6.4,
/// later redirect and strparser fixes are in the 6.12 long-term kernels.
const MIN_KERNEL: (u32, u32) = (6, 12);

/// Why the sockmap dataplane cannot run, or failed on one socket.
#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    /// The daemon was built without the eBPF toolchain.
    #[error(
        "this binary was built without the eBPF object (bpf-linker or nightly rust-src missing at build time)"
    )]
    NotBuilt,
    /// The kernel is older than the sockmap fixes this dataplane relies on.
    #[error("kernel {0} is older than {major}.{minor}", major = MIN_KERNEL.0, minor = MIN_KERNEL.1)]
    OldKernel(String),
    /// Loading or attaching failed (often: not privileged).
    #[error(
        "loading the eBPF program failed (needs root or CAP_BPF+CAP_NET_ADMIN+CAP_PERFMON): {0}"
    )]
    Load(String),
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        /// Which operation.
        what: &'static str,
        /// The error from aya.
        source: aya::maps::MapError,
    },
    /// Reading a socket's cookie failed.
    #[error("reading the socket cookie: {0}")]
    Cookie(std::io::Error),
    /// The send hook's sockops program could not be attached to the cgroup
    /// (`--sockops-cgroup`).
    #[error(
        "attaching sockops to the cgroup {}: {reason} (--sockops-cgroup names a cgroup v2 directory)",
        dir.display()
    )]
    Cgroup {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Where the kernel judges a backend's response bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    /// As they arrive on the daemon's backend socket (`stream_verdict`).
    Receive,
    /// In the backend's own `sendmsg`, for backends on this host: sockops
    /// attached to the cgroup v2 directory `cgroup` (it must contain the
    /// backends' processes) finds their sockets, sk_msg judges their sends.
    Send {
        /// A cgroup v2 directory.
        cgroup: PathBuf,
    },
}

/// What the receive hook may redirect past the client socket's room: its
/// kernel worker waits for the client, so it can take more than the socket
/// holds now (a reader that keeps up then rarely runs out), but never
/// without bound.
const RECEIVE_SLACK: u64 = 1 << 20;

impl Hook {
    /// The credit to grant a hand-over when the client socket has `room`
    /// bytes free. The send hook redirects inside the backend's `sendmsg`,
    /// which must find the room there: half of it, since the client's
    /// queue also takes the daemon's writes. The receive hook gets the room
    /// and [`RECEIVE_SLACK`].
    pub(super) fn credit(&self, room: u64) -> u64 {
        match self {
            Hook::Receive => room + RECEIVE_SLACK,
            Hook::Send { .. } => room / 2,
        }
    }
}

/// The cgroup v2 directory for the sockops program under `mount`, a cgroup
/// mount such as `/sys/fs/cgroup` (or the host's, mounted into a pod): its
/// `unified/` directory on a hybrid host, where v2 is mounted there, else
/// `mount` itself.
pub fn cgroup2_root(mount: &Path) -> PathBuf {
    let unified = mount.join("unified");
    if unified.join("cgroup.controllers").exists() {
        unified
    } else {
        mount.to_owned()
    }
}

/// This host's cgroup v2 root: [`cgroup2_root`] of `/sys/fs/cgroup`.
pub fn default_cgroup() -> PathBuf {
    cgroup2_root(Path::new("/sys/fs/cgroup"))
}

/// Fails unless the running kernel is at least [`MIN_KERNEL`].
pub(super) fn supported_kernel() -> Result<(), SockmapError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    if version >= MIN_KERNEL {
        Ok(())
    } else {
        Err(SockmapError::OldKernel(release.to_owned()))
    }
}

/// The program's maps, shared by the slots that remove their entries.
struct Maps {
    backends: Mutex<SockHash<MapData, u64>>,
    clients: Mutex<SockHash<MapData, u64>>,
    control: Mutex<HashMap<MapData, u64, Control>>,
    progress: Mutex<HashMap<MapData, u64, Progress>>,
    watch: Mutex<HashMap<MapData, u64, u32>>,
    tuples: Mutex<HashMap<MapData, Tuple, Watched>>,
    peers: Mutex<SockHash<MapData, u64>>,
}

/// The loaded programs and their maps.
pub(super) struct Sockmap {
    /// Keeps the programs loaded and attached (the sockops link detaches
    /// when it drops, so a daemon that exits leaves nothing attached).
    _ebpf: Ebpf,
    maps: Arc<Maps>,
    stats: PerCpuArray<MapData, u64>,
    hook: Hook,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap").finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn load_err(err: impl std::fmt::Display) -> SockmapError {
    SockmapError::Load(err.to_string())
}

/// An error and its sources, for a message that says what the kernel said.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// A program of the object, by name and type.
fn program_of<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, SockmapError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
    <&'a mut T as TryFrom<&'a mut aya::programs::Program>>::Error: std::fmt::Display,
{
    ebpf.program_mut(name)
        .ok_or_else(|| load_err(format!("program {name} missing from the object")))?
        .try_into()
        .map_err(load_err)
}

fn map_err(what: &'static str) -> impl FnOnce(aya::maps::MapError) -> SockmapError {
    move |source| SockmapError::Map { what, source }
}

impl Sockmap {
    /// Loads the embedded object and attaches the programs of `hook`.
    pub(super) fn load(hook: Hook) -> Result<Self, SockmapError> {
        if OBJECT.is_empty() {
            return Err(SockmapError::NotBuilt);
        }
        let mut ebpf = Ebpf::load(OBJECT).map_err(load_err)?;
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| load_err(format!("map {name} missing from the object")))
        };
        let backends = SockHash::<_, u64>::try_from(take(MAP_BACKENDS)?).map_err(load_err)?;
        let clients = SockHash::<_, u64>::try_from(take(MAP_CLIENTS)?).map_err(load_err)?;
        let control = HashMap::<_, u64, Control>::try_from(take(MAP_CONTROL)?).map_err(load_err)?;
        let progress =
            HashMap::<_, u64, Progress>::try_from(take(MAP_PROGRESS)?).map_err(load_err)?;
        let stats = PerCpuArray::<_, u64>::try_from(take(MAP_STATS)?).map_err(load_err)?;
        let watch = HashMap::<_, u64, u32>::try_from(take(MAP_WATCH)?).map_err(load_err)?;
        let tuples = HashMap::<_, Tuple, Watched>::try_from(take(MAP_TUPLES)?).map_err(load_err)?;
        let peers = SockHash::<_, u64>::try_from(take(MAP_PEERS)?).map_err(load_err)?;
        match &hook {
            Hook::Receive => {
                let program: &mut SkSkb = program_of(&mut ebpf, PROG_REDIRECT)?;
                program.load().map_err(load_err)?;
                program.attach(backends.fd()).map_err(load_err)?;
            }
            Hook::Send { cgroup } => {
                let program: &mut SkMsg = program_of(&mut ebpf, PROG_SEND)?;
                program.load().map_err(load_err)?;
                program.attach(peers.fd()).map_err(load_err)?;
                let dir = File::open(cgroup).map_err(|err| SockmapError::Cgroup {
                    dir: cgroup.clone(),
                    reason: err.to_string(),
                })?;
                let program: &mut SockOps = program_of(&mut ebpf, PROG_WATCH)?;
                program.load().map_err(load_err)?;
                // A link (kernel 5.7+) takes no attach flags: links on one
                // cgroup always run side by side, so other programs there,
                // and other daemons', keep running.
                program
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|err| SockmapError::Cgroup {
                        dir: cgroup.clone(),
                        reason: error_chain(&err),
                    })?;
            }
        }
        Ok(Self {
            _ebpf: ebpf,
            maps: Arc::new(Maps {
                backends: Mutex::new(backends),
                clients: Mutex::new(clients),
                control: Mutex::new(control),
                progress: Mutex::new(progress),
                watch: Mutex::new(watch),
                tuples: Mutex::new(tuples),
                peers: Mutex::new(peers),
            }),
            stats,
            hook,
        })
    }

    /// Which hook judges backend bytes.
    pub(super) fn hook(&self) -> &Hook {
        &self.hook
    }

    /// Step 1: makes a client socket a redirect target.
    pub(super) fn add_client(&self, stream: &impl AsRawFd) -> Result<ClientSlot, SockmapError> {
        let cookie = tcp::cookie(stream).map_err(SockmapError::Cookie)?;
        lock(&self.maps.clients)
            .insert(cookie, stream.as_raw_fd(), 0)
            .map_err(map_err("inserting the client socket"))?;
        Ok(ClientSlot {
            cookie,
            maps: Arc::clone(&self.maps),
        })
    }

    /// Step 2: the entries a backend socket needs before the program can
    /// meet it; the slot removes them when it drops.
    fn entries(&self, socket: &impl AsRawFd) -> Result<BackendSlot, SockmapError> {
        let cookie = tcp::cookie(socket).map_err(SockmapError::Cookie)?;
        lock(&self.maps.progress)
            .insert(cookie, Progress::default(), 0)
            .map_err(map_err("writing the progress entry"))?;
        // From here on the slot removes whatever was written.
        let slot = BackendSlot {
            cookie,
            tuple: None,
            maps: Arc::clone(&self.maps),
        };
        lock(&self.maps.control)
            .insert(cookie, Control::default(), 0)
            .map_err(map_err("writing the control entry"))?;
        Ok(slot)
    }

    /// Steps 2 and 3, receive hook: hands a freshly connected backend socket
    /// to the verdict program, passing everything up until a control is
    /// published.
    pub(super) fn add_backend(&self, stream: &impl AsRawFd) -> Result<BackendSlot, SockmapError> {
        let slot = self.entries(stream)?;
        lock(&self.maps.backends)
            .insert(slot.cookie, stream.as_raw_fd(), 0)
            .map_err(map_err("inserting the backend socket"))?;
        Ok(slot)
    }

    /// Steps 2 and 3, send hook: asks the sockops program to watch a socket
    /// that is about to connect. Call [`BackendSlot::connected`] once it is.
    pub(super) fn watch(&self, socket: &impl AsRawFd) -> Result<BackendSlot, SockmapError> {
        let slot = self.entries(socket)?;
        lock(&self.maps.watch)
            .insert(slot.cookie, 1, 0)
            .map_err(map_err("writing the watch entry"))?;
        Ok(slot)
    }

    /// The program's counters, summed over CPUs.
    pub(super) fn stats(&self) -> Vec<(Stat, u64)> {
        Stat::ALL
            .iter()
            .map(|&stat| {
                let total = self
                    .stats
                    .get(&(stat as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (stat, total)
            })
            .collect()
    }

    /// Backend sockets with per-backend entries (pooled or in use).
    pub(super) fn backend_entries(&self) -> usize {
        lock(&self.maps.progress).keys().count()
    }

    /// Sockets in the client map and in the backend map (the backends' own
    /// sockets, with the send hook).
    pub(super) fn sockets_len(&self) -> (usize, usize) {
        let clients = lock(&self.maps.clients).keys().count();
        let backends = match self.hook {
            Hook::Receive => lock(&self.maps.backends).keys().count(),
            Hook::Send { .. } => lock(&self.maps.peers).keys().count(),
        };
        (clients, backends)
    }
}

/// A client socket registered as a redirect target; unregistered on drop.
pub(super) struct ClientSlot {
    cookie: u64,
    maps: Arc<Maps>,
}

impl ClientSlot {
    /// The client socket's cookie, for [`Control::client_cookie`].
    pub(super) fn cookie(&self) -> u64 {
        self.cookie
    }
}

impl std::fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSlot")
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        // Closing the socket would remove it too; removing first keeps the
        // map exact while the connection winds down.
        let _ = lock(&self.maps.clients).remove(&self.cookie);
    }
}

/// A backend socket handed to a kernel program; its entries go on drop.
pub(crate) struct BackendSlot {
    cookie: u64,
    /// Send hook: the connection's key in `TUPLES`, once connected.
    tuple: Option<Tuple>,
    maps: Arc<Maps>,
}

impl BackendSlot {
    /// Send hook: notes the connection the watched socket made, so the
    /// sockops program's `TUPLES` entry goes with the slot. Only IPv4
    /// connections are watched.
    pub(super) fn connected(&mut self, local: SocketAddr, peer: SocketAddr) {
        if let (SocketAddr::V4(local), SocketAddr::V4(peer)) = (local, peer) {
            self.tuple = Some(Tuple::from_router_end(local, peer));
        }
    }

    /// Step 6: tells the program where the response goes from `fence` on.
    pub(super) fn publish(&self, control: Control) -> Result<(), SockmapError> {
        lock(&self.maps.control)
            .insert(self.cookie, control, 0)
            .map_err(map_err("publishing the control entry"))
    }

    /// What the program has done with this socket's bytes.
    pub(super) fn progress(&self) -> Result<Progress, SockmapError> {
        lock(&self.maps.progress)
            .get(&self.cookie, 0)
            .map_err(map_err("reading the progress entry"))
    }
}

impl std::fmt::Debug for BackendSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSlot")
            .field("cookie", &self.cookie)
            .field("tuple", &self.tuple)
            .finish()
    }
}

impl Drop for BackendSlot {
    fn drop(&mut self) {
        // The 4-tuple first: once the socket closes, another connection may
        // reuse it, and must not find this one's entries.
        if let Some(tuple) = self.tuple {
            let _ = lock(&self.maps.tuples).remove(&tuple);
        }
        let _ = lock(&self.maps.watch).remove(&self.cookie);
        let _ = lock(&self.maps.backends).remove(&self.cookie);
        let _ = lock(&self.maps.control).remove(&self.cookie);
        let _ = lock(&self.maps.progress).remove(&self.cookie);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use router_common::{MAP_NAMES, PROG_NAMES, Stat, Tuple, Watched};

    use super::{Hook, OBJECT, Sockmap, default_cgroup, lock};

    /// The send hook loaded, or `None` (with a message) where it cannot
    /// load and skipping is allowed; CI runs as root, so there it must.
    fn send_hook() -> Option<Sockmap> {
        match Sockmap::load(Hook::Send {
            cgroup: default_cgroup(),
        }) {
            Ok(sockmap) => Some(sockmap),
            Err(err) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "the send hook must load in CI: {err}"
                );
                eprintln!("SKIPPED: the send hook does not load here ({err})");
                None
            }
        }
    }

    fn stat(sockmap: &Sockmap, which: Stat) -> u64 {
        sockmap
            .stats()
            .into_iter()
            .find_map(|(stat, n)| (stat == which).then_some(n))
            .unwrap()
    }

    /// Waits (bounded) until `which` reaches `n`. The sockops callback for
    /// an accepted socket runs in the softirq that completed its handshake,
    /// which on a busy machine may still be running when `accept` returns.
    async fn until_stat(sockmap: &Sockmap, which: Stat, n: u64) {
        for _ in 0..500 {
            if stat(sockmap, which) >= n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// An accepted socket whose 4-tuple is a watched connection's but whose
    /// sequence numbers are not (as another network namespace's connection
    /// with the same addresses would be) stays out of the peer map, so the
    /// program never sends its bytes to this daemon's clients; a watched
    /// socket's own connection is found.
    #[tokio::test]
    async fn only_the_watched_connection_itself_becomes_a_peer() {
        let Some(sockmap) = send_hook() else { return };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let backend = listener.local_addr().unwrap();
        let v4 = |addr: std::net::SocketAddr| match addr {
            std::net::SocketAddr::V4(v4) => v4,
            std::net::SocketAddr::V6(_) => unreachable!("IPv4 loopback"),
        };
        // A stranger: its port is known before it connects, and an entry
        // for its 4-tuple with other sequence numbers is planted.
        let stranger = tokio::net::TcpSocket::new_v4().unwrap();
        stranger.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = stranger.local_addr().unwrap();
        let tuple = Tuple::from_router_end(v4(local), v4(backend));
        let planted = Watched {
            cookie: 7,
            router_next: 1,
            backend_next: 2,
        };
        lock(&sockmap.maps.tuples)
            .insert(tuple, planted, 0)
            .unwrap();
        let _stranger = stranger.connect(backend).await.unwrap();
        let _accepted = listener.accept().unwrap();
        until_stat(&sockmap, Stat::PeersRefused, 1).await;
        assert_eq!(stat(&sockmap, Stat::PeersRefused), 1);
        assert_eq!(stat(&sockmap, Stat::PeersAdded), 0);
        assert_eq!(sockmap.sockets_len().1, 0, "the stranger became a peer");
        // The daemon's own, watched connection.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let mut slot = sockmap.watch(&socket).unwrap();
        let stream = socket.connect(backend).await.unwrap();
        slot.connected(stream.local_addr().unwrap(), stream.peer_addr().unwrap());
        let _accepted = listener.accept().unwrap();
        until_stat(&sockmap, Stat::PeersAdded, 1).await;
        assert_eq!(stat(&sockmap, Stat::PeersAdded), 1);
        assert_eq!(sockmap.sockets_len().1, 1);
        // The callback marks the slot's progress right after counting.
        for _ in 0..500 {
            if slot.progress().unwrap().peer == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(slot.progress().unwrap().peer, 1);
    }

    /// Every name the daemon resolves exists in the embedded object. Parsing
    /// needs no privilege, so this runs everywhere the object was built.
    #[test]
    fn object_has_every_name_the_daemon_uses() {
        if OBJECT.is_empty() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must build the eBPF object"
            );
            eprintln!("SKIPPED: built without the eBPF object");
            return;
        }
        let object = aya_obj::Object::parse(OBJECT).expect("a valid BPF object");
        for map in MAP_NAMES {
            assert!(object.maps.contains_key(map), "map {map} missing");
        }
        for program in PROG_NAMES {
            assert!(
                object.programs.contains_key(program),
                "program {program} missing; have {:?}",
                object.programs.keys().collect::<Vec<_>>()
            );
        }
    }
}
