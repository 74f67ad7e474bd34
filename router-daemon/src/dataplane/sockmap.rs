//! The sockmap dataplane: loading the kernel program and handing sockets to it.
//!
//! # Hand-over protocol, per response
//! The order matters; each step says why it is where it is.
//! 1. **Client registered** ([`Sockmap::add_client`], once per client
//!    connection): the client socket goes into `CLIENTS`, a map with no
//!    program. That makes it a valid redirect target while its own ingress
//!    (the next request) stays an ordinary socket the daemon reads.
//! 2. **Backend connected, nothing queued**: the backend socket is fresh and
//!    a backend never speaks first, so its receive queue is empty. (Bytes
//!    queued before insertion would stall or be duplicated; a fresh socket
//!    per response rules that out, where a reused one would need draining to
//!    EAGAIN first.)
//! 3. **Flow entry written** ([`Sockmap::add_backend`]): `FLOWS[backend] =
//!    client` before the backend can be judged, so no byte meets a missing
//!    entry and falls back to userspace out of order.
//! 4. **Backend inserted into `BACKENDS`**, the verdict program's map, still
//!    before the request is written: from its first byte, the response is
//!    judged in the kernel.
//! 5. **Request written** by the caller.
//! 6. **FIN passed up**: the program passes zero-length skbs, so the daemon
//!    reads EOF on the backend and knows the response ended; redirecting the
//!    FIN would set EPIPE on the client.
//! 7. **Flushed before anything else touches the client**: the kernel worker
//!    sends redirected skbs asynchronously, so the daemon waits until the
//!    client's send queue has taken every spliced byte before writing its own
//!    bytes or closing (see `Client::flushed`).
//! 8. **Flow entry removed** when the [`Flow`] guard drops; the socket maps
//!    drop their entries when the sockets close.
//!
//! `SO_RCVLOWAT` stays at its default of 1: a higher mark delays verdicts.
use std::{
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::SkSkb,
};
use router_common::{
    Flow as FlowValue, MAP_BACKENDS, MAP_CLIENTS, MAP_FLOWS, MAP_STATS, PROG_SPLICE, Stat,
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
    #[error("loading the eBPF program failed (needs root or CAP_BPF+CAP_NET_ADMIN): {0}")]
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

/// The loaded program and its maps.
pub(super) struct Sockmap {
    /// Keeps the program loaded and attached.
    _ebpf: Ebpf,
    backends: Mutex<SockHash<MapData, u64>>,
    clients: Arc<Mutex<SockHash<MapData, u64>>>,
    flows: Arc<Mutex<HashMap<MapData, u64, FlowValue>>>,
    stats: PerCpuArray<MapData, u64>,
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

impl Sockmap {
    /// Loads the embedded object and attaches the verdict program.
    pub(super) fn load() -> Result<Self, SockmapError> {
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
        let flows = HashMap::<_, u64, FlowValue>::try_from(take(MAP_FLOWS)?).map_err(load_err)?;
        let stats = PerCpuArray::<_, u64>::try_from(take(MAP_STATS)?).map_err(load_err)?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROG_SPLICE)
            .ok_or_else(|| load_err(format!("program {PROG_SPLICE} missing from the object")))?
            .try_into()
            .map_err(load_err)?;
        program.load().map_err(load_err)?;
        program.attach(backends.fd()).map_err(load_err)?;
        Ok(Self {
            _ebpf: ebpf,
            backends: Mutex::new(backends),
            clients: Arc::new(Mutex::new(clients)),
            flows: Arc::new(Mutex::new(flows)),
            stats,
        })
    }

    /// Step 1: makes a client socket a redirect target.
    pub(super) fn add_client(&self, stream: &impl AsRawFd) -> Result<ClientSlot, SockmapError> {
        let cookie = tcp::cookie(stream).map_err(SockmapError::Cookie)?;
        lock(&self.clients)
            .insert(cookie, stream.as_raw_fd(), 0)
            .map_err(|source| SockmapError::Map {
                what: "inserting the client socket",
                source,
            })?;
        Ok(ClientSlot {
            cookie,
            clients: Arc::clone(&self.clients),
        })
    }

    /// Steps 3 and 4: points a fresh backend socket at a client and hands it
    /// to the verdict program.
    pub(super) fn add_backend(
        &self,
        stream: &impl AsRawFd,
        client: &ClientSlot,
    ) -> Result<Flow, SockmapError> {
        let cookie = tcp::cookie(stream).map_err(SockmapError::Cookie)?;
        let value = FlowValue {
            client_cookie: client.cookie,
            spliced_bytes: 0,
        };
        lock(&self.flows)
            .insert(cookie, value, 0)
            .map_err(|source| SockmapError::Map {
                what: "writing the flow entry",
                source,
            })?;
        let flow = Flow {
            cookie,
            flows: Arc::clone(&self.flows),
            accounted: AtomicU64::new(0),
        };
        lock(&self.backends)
            .insert(cookie, stream.as_raw_fd(), 0)
            .map_err(|source| SockmapError::Map {
                what: "inserting the backend socket",
                source,
            })?;
        Ok(flow)
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

    /// Entries in the flow map.
    pub(super) fn flows_len(&self) -> usize {
        lock(&self.flows).keys().count()
    }

    /// Sockets in the client map and in the backend map.
    pub(super) fn sockets_len(&self) -> (usize, usize) {
        let clients = lock(&self.clients).keys().count();
        let backends = lock(&self.backends).keys().count();
        (clients, backends)
    }
}

/// A client socket registered as a redirect target; unregistered on drop.
pub(super) struct ClientSlot {
    cookie: u64,
    clients: Arc<Mutex<SockHash<MapData, u64>>>,
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
        let _ = lock(&self.clients).remove(&self.cookie);
    }
}

/// One backend socket spliced to a client; its flow entry goes on drop.
pub(crate) struct Flow {
    cookie: u64,
    flows: Arc<Mutex<HashMap<MapData, u64, FlowValue>>>,
    /// Spliced bytes already reported by [`Flow::spliced_since_last`].
    accounted: AtomicU64,
}

impl Flow {
    /// Bytes the program has spliced for this flow.
    pub(super) fn spliced(&self) -> Result<u64, SockmapError> {
        lock(&self.flows)
            .get(&self.cookie, 0)
            .map(|value| value.spliced_bytes)
            .map_err(|source| SockmapError::Map {
                what: "reading the flow entry",
                source,
            })
    }

    /// Bytes spliced since the previous call.
    pub(super) fn spliced_since_last(&self) -> Result<u64, SockmapError> {
        let total = self.spliced()?;
        let before = self.accounted.swap(total, Ordering::Relaxed);
        Ok(total.saturating_sub(before))
    }
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("cookie", &self.cookie)
            .finish()
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        let _ = lock(&self.flows).remove(&self.cookie);
    }
}

#[cfg(test)]
mod tests {
    use router_common::{MAP_NAMES, PROG_SPLICE};

    use super::OBJECT;

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
        assert!(
            object.programs.contains_key(PROG_SPLICE),
            "program {PROG_SPLICE} missing; have {:?}",
            object.programs.keys().collect::<Vec<_>>()
        );
    }
}
