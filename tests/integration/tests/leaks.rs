//! No leaks: after many requests from many kept-alive clients that close at
//! random points, the router holds no kernel map entries, its open
//! descriptors are back to where they started, and its memory is flat.
//!
//! Each client sends its requests one after another on one connection and,
//! at random, closes mid-request, right after a request or mid-response, then
//! reconnects. Pooled backend connections are reaped after a short idle
//! timeout, so once the load stops nothing of it may remain.
//!
//! Memory is measured as live heap bytes, counted by this binary's global
//! allocator, not as RSS: under glibc, RSS after connection churn follows
//! arena fragmentation (it drifted up by 10–40% in sockmap runs here while
//! valgrind's massif showed the live heap returning to its baseline after
//! every burst). RSS is still reported in the failure message.
//!
//! Sized by `LEAK_TEST_REQUESTS` (default 100,000, over 1,000 concurrent
//! clients); CI runs the full size, about 20 s per dataplane here.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use integration_tests::{
    EXCHANGE_TIMEOUT, dataplane_or_skip, each_mode, get, metric, response_len, scripted_backend,
    start_router_with,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use router_daemon::dataplane::Mode;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Counts live heap bytes: what a leak would grow.
struct CountingAllocator;

static LIVE_HEAP: AtomicUsize = AtomicUsize::new(0);

/// Live heap bytes by allocation size class (log2 of the size), so a
/// failure names the sizes that grew.
static LIVE_BY_CLASS: [AtomicUsize; 48] = [const { AtomicUsize::new(0) }; 48];

fn class(size: usize) -> usize {
    (usize::BITS - size.leading_zeros()) as usize % LIVE_BY_CLASS.len()
}

fn count(size: usize, live: bool) {
    if live {
        LIVE_HEAP.fetch_add(size, Ordering::Relaxed);
        LIVE_BY_CLASS[class(size)].fetch_add(size, Ordering::Relaxed);
    } else {
        LIVE_HEAP.fetch_sub(size, Ordering::Relaxed);
        LIVE_BY_CLASS[class(size)].fetch_sub(size, Ordering::Relaxed);
    }
}

/// Live bytes per size class now.
fn by_class() -> Vec<usize> {
    LIVE_BY_CLASS
        .iter()
        .map(|bytes| bytes.load(Ordering::Relaxed))
        .collect()
}

/// The size classes whose live bytes changed from `before` to `after`.
fn class_changes(before: &[usize], after: &[usize]) -> String {
    before
        .iter()
        .zip(after)
        .enumerate()
        .filter(|(_, (b, a))| b != a)
        .map(|(class, (b, a))| {
            let low = (1usize << class) >> 1;
            format!("  sizes {low}..{}: {b} -> {a}\n", 1usize << class)
        })
        .collect()
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            count(layout.size(), true);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) };
        count(layout.size(), false);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            count(new_size, true);
            count(layout.size(), false);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const CLIENTS: usize = 1_000;
/// The router's gauges of kernel map entries, all 0 once traffic is done.
const SOCKMAP_GAUGES: [&str; 3] = [
    "router_sockmap_backend_entries",
    "router_sockmap_client_sockets",
    "router_sockmap_backend_sockets",
];
/// Longer than the router's lingering close (2 s), after which a finished
/// connection's descriptor is gone.
const LINGER_WINDOW: Duration = Duration::from_secs(3);
const BODY: &str = r#"{"model":"m","prompt":"leak test"}"#;
/// The router's pool idle timeout here: pooled backend connections are
/// closed well within [`LINGER_WINDOW`] once the load stops.
const POOL_IDLE_MS: u64 = 500;

fn request() -> Vec<u8> {
    format!(
        "POST /v1/completions HTTP/1.1\r\nHost: r\r\nContent-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
    .into_bytes()
}

fn total_requests() -> usize {
    std::env::var("LEAK_TEST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

/// How a client ends one exchange.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// Reads the whole response.
    Complete,
    /// Closes right after sending the request.
    AfterRequest,
    /// Reads part of the response, then closes.
    MidResponse,
    /// Sends half a request, then closes.
    MidRequest,
}

/// One exchange on `conn` (a new connection when `None`); returns whether
/// it succeeded, and the connection when it stays usable.
async fn one_exchange(
    router: SocketAddr,
    conn: Option<TcpStream>,
    ending: Ending,
) -> (bool, Option<TcpStream>) {
    let request = request();
    let mut stream = match conn {
        Some(stream) => stream,
        None => match TcpStream::connect(router).await {
            Ok(stream) => stream,
            Err(_) => return (false, None),
        },
    };
    match ending {
        Ending::MidRequest => {
            let _ = stream.write_all(&request[..request.len() / 2]).await;
            return (true, None);
        }
        _ => {
            if stream.write_all(&request).await.is_err() {
                return (false, None);
            }
        }
    }
    match ending {
        Ending::AfterRequest | Ending::MidRequest => (true, None),
        Ending::MidResponse => {
            let mut some = [0u8; 1024];
            (stream.read(&mut some).await.is_ok(), None)
        }
        Ending::Complete => {
            let mut received = Vec::new();
            let mut buf = [0u8; 16 * 1024];
            loop {
                if let Some(len) = response_len(&received) {
                    let ok = len == received.len() && received.starts_with(b"HTTP/1.1 200 OK");
                    return (ok, ok.then_some(stream));
                }
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return (false, None),
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                }
            }
        }
    }
}

/// Runs `requests` exchanges over [`CLIENTS`] concurrent kept-alive clients;
/// returns how many complete exchanges succeeded and how many were
/// attempted complete.
async fn load(router: SocketAddr, requests: usize, seed: u64) -> (usize, usize) {
    let per_client = requests.div_ceil(CLIENTS);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ client as u64);
                let (mut ok, mut complete) = (0, 0);
                let mut conn = None;
                for _ in 0..per_client {
                    let ending = match rng.random_range(0..10) {
                        0 => Ending::AfterRequest,
                        1 => Ending::MidResponse,
                        2 => Ending::MidRequest,
                        _ => Ending::Complete,
                    };
                    let (succeeded, kept) = tokio::time::timeout(
                        EXCHANGE_TIMEOUT,
                        one_exchange(router, conn.take(), ending),
                    )
                    .await
                    .unwrap_or_else(|_| panic!("a {ending:?} exchange hung"));
                    conn = kept;
                    if matches!(ending, Ending::Complete) {
                        complete += 1;
                        ok += usize::from(succeeded);
                    }
                }
                (ok, complete)
            })
        })
        .collect();
    let mut totals = (0, 0);
    for task in tasks {
        let (ok, complete) = task.await.expect("client task");
        totals.0 += ok;
        totals.1 += complete;
    }
    totals
}

/// This process's TCP sockets as `ss` shows them, for failure messages.
fn sockets() -> String {
    let me = format!("pid={},", std::process::id());
    std::process::Command::new("ss")
        .args(["-tanpo"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|line| line.contains(&me))
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|err| format!("(ss failed: {err})"))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// Resident memory after glibc returns its free pages to the system, so the
/// figure follows live allocations rather than the allocator's high-water
/// mark under connection churn.
fn rss_bytes() -> u64 {
    // SAFETY: malloc_trim only releases free memory held by the allocator.
    unsafe { libc::malloc_trim(0) };
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).expect("a positive page size")
}

/// Waits (bounded) until the router has finished with every connection: no
/// flow entries and no registered sockets with sockmap, and the process's
/// descriptors back to `baseline`.
async fn settled(router: SocketAddr, mode: Mode, baseline: usize) -> (usize, String) {
    let mut fds = open_fds();
    let mut metrics = String::new();
    for _ in 0..100 {
        metrics = get(router, "/metrics").await.text();
        fds = open_fds();
        let maps_empty = !mode.redirects_in_kernel()
            || SOCKMAP_GAUGES
                .iter()
                .all(|name| metric(&metrics, name) == Some(0.0));
        if fds <= baseline && maps_empty {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (fds, metrics)
}

/// How long [`quiet_heap`] watches the heap, sampling every [`SAMPLE_EVERY`].
const SAMPLE_WINDOW: Duration = Duration::from_secs(1);
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// Live heap bytes, in total and by size class, once the last exchange's
/// buffers are gone: the router frees a finished connection's buffers when
/// its lingering close ends, and `settled`'s last `/metrics` fetch is one
/// (about 10 KB, half the margin, measured right after it).
///
/// The smallest of many samples over [`SAMPLE_WINDOW`]: the router's
/// discovery probes (every 5 s, about 55 KB live for the few milliseconds
/// one takes) come and go while traffic is quiet, and one caught in flight
/// once failed this test in CI with exactly a probe's size classes. A leak
/// stays in every sample.
async fn quiet_heap() -> (usize, Vec<usize>) {
    tokio::time::sleep(LINGER_WINDOW).await;
    let mut quietest = (usize::MAX, Vec::new());
    let samples = SAMPLE_WINDOW.as_millis() / SAMPLE_EVERY.as_millis();
    for _ in 0..samples {
        let live = LIVE_HEAP.load(Ordering::Relaxed);
        if live < quietest.0 {
            quietest = (live, by_class());
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    quietest
}

/// The modes run one at a time: each brings 1,000 concurrent clients, and
/// the memory check reads the whole test process.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn no_leaks_after_many_random_closes(mode: Mode) {
    let _alone = ONE_AT_A_TIME.lock().await;
    let Some(dataplane) = dataplane_or_skip(mode) else {
        return;
    };
    // A 16 KiB response in 4 KiB writes, so clients can leave mid-response.
    let body = vec![b'x'; 16 * 1024];
    let mut response =
        format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
    response.extend_from_slice(&body);
    let backend = scripted_backend(response, 4096).await;
    let (router, _stop) = start_router_with(vec![backend], dataplane, |config| {
        config.pool_idle_timeout_ms = POOL_IDLE_MS;
    })
    .await;
    let requests = total_requests();

    // Warm up with a fifth of the load, so the allocator's pools and the
    // runtime's threads reach their working size, then let the warm-up's
    // connections finish their lingering close.
    load(router, requests / 5, 1).await;
    tokio::time::sleep(LINGER_WINDOW).await;
    let (baseline_fds, _) = settled(router, mode, usize::MAX).await;

    let metrics = leak_free_round(router, mode, requests / 2, 2, baseline_fds).await;
    let (heap_half, classes_half) = quiet_heap().await;
    let rss_half = rss_bytes();
    let metrics_half = metrics;

    let metrics = leak_free_round(router, mode, requests - requests / 2, 3, baseline_fds).await;
    // Both rounds' /metrics texts are alive now, only one was at the half:
    // the one kept for the message is not the router's.
    let (heap_end, classes_end) = quiet_heap().await;
    let heap_end = heap_end.saturating_sub(metrics_half.capacity());
    let rss_end = rss_bytes();
    let changes = class_changes(&classes_half, &classes_end);
    assert!(
        heap_end * 10 <= heap_half * 11,
        "live heap grew from {heap_half} to {heap_end} bytes over the second half \
         (RSS {rss_half} -> {rss_end}), by size:\n{changes}\n{metrics_half}\n{metrics}"
    );
}

/// Runs `requests` exchanges, then checks that (nearly) every complete one
/// succeeded, that the process is back to `baseline_fds` descriptors, and,
/// with sockmap, that no map holds an entry. Returns the final `/metrics`.
async fn leak_free_round(
    router: SocketAddr,
    mode: Mode,
    requests: usize,
    seed: u64,
    baseline_fds: usize,
) -> String {
    let (ok, complete) = load(router, requests, seed).await;
    assert!(
        ok * 100 >= complete * 99,
        "only {ok} of {complete} complete exchanges succeeded"
    );
    let (fds, metrics) = settled(router, mode, baseline_fds).await;
    assert!(
        fds <= baseline_fds,
        "{fds} descriptors open, {baseline_fds} before\n{}\n{metrics}",
        sockets()
    );
    if mode.redirects_in_kernel() {
        for name in SOCKMAP_GAUGES {
            assert_eq!(metric(&metrics, name), Some(0.0), "{name}\n{metrics}");
        }
    }
    metrics
}

each_mode!(no_leaks_after_many_random_closes);
