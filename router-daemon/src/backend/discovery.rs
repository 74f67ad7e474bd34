//! The discovery poller: asks every backend for its models and load, and
//! keeps its health.
//!
//! Each backend gets its own task (so a slow backend delays no other) that
//! probes at start and then every [`Discovery::interval`]: `GET /v1/models`,
//! then, if that got an HTTP answer, `GET /metrics`. The tasks hold only a
//! `Weak` reference to their backend and end when it is dropped, or when
//! the [`DiscoveryTask`] guard is dropped, whichever comes first. Once
//! requests start going to a backend, its task also reads `/metrics` a
//! moment after each, until [`EARLY_SCRAPES`](super::EARLY_SCRAPES) scrapes
//! have found traffic: whether other clients share the backend
//! ([`Backend::clients`]) is then known within a fraction of a second of
//! the first requests, not an interval later.
//!
//! Owner decisions:
//! - Health follows `/v1/models` only. A failure is no HTTP answer at all
//!   (refused, timed out, malformed) or a 5xx (vLLM still loading, or a
//!   proxy in front of a dead one). Any other answer counts as alive, even a
//!   404 or a body that is not a model list: such a backend keeps its last
//!   known models (or stays "unknown", a candidate for any model).
//! - After [`Discovery::down_after`] failures in a row the backend is down;
//!   one answer brings it back up.
//! - A failed `/metrics` scrape keeps the last values rather than zeroing
//!   them: an overloaded backend that scrapes slowly must not look idle. A
//!   backend going down has its load reset to 0 (it is not a candidate).
//! - Problems are logged once per change of state, not once per poll.
use std::{fmt, sync::Arc, time::Duration};

use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::{
    Backend, Backends,
    probe::{self, Load},
};
use crate::{
    dataplane::probe::{Target, get},
    route::Clients,
};
use std::sync::atomic::Ordering;

/// Fewest prompt tokens a window needs to teach the bytes-per-token ratio.
pub(super) const RATIO_MIN_TOKENS: u64 = 512;

/// Past this many tokens a window's sums are halved, so the ratio follows
/// a change of workload (English to code, say) within a few windows' worth.
const RATIO_WINDOW_TOKENS: u64 = 1 << 18;

/// The key bytes this router sent to an engine and the prompt tokens the
/// engine counted, since a window began. Both counters run ahead of each
/// other by whatever is in flight (sent, not yet counted) at each scrape;
/// summed over the window those differences cancel but for the first
/// scrape's and the last one's, so the ratio only gets better as the
/// window grows. (A ratio per pair of scrapes did not: the first window
/// of a cold start began while two prompts were sent and not yet counted,
/// saw their tokens and none of their bytes, and put the ratio at its
/// floor, so the router thought that engine's cache a ninth of its size.)
#[derive(Debug, Default)]
pub(super) struct PromptCount {
    /// The engine's counter and this router's key bytes at the last scrape.
    last: Option<(u64, u64)>,
    /// Tokens counted since the window began.
    tokens: u64,
    /// Key bytes sent since the window began.
    bytes: u64,
}

/// How often and how patiently backends are probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discovery {
    /// Time between a backend's probes; zero disables the poller.
    pub interval: Duration,
    /// Bound on one GET, connect included.
    pub timeout: Duration,
    /// Bound on the TCP connect of one GET.
    pub connect_timeout: Duration,
    /// Failures in a row that mark a backend down (at least 1).
    pub down_after: u32,
}

/// Stops the discovery tasks when dropped.
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops discovery"]
pub(crate) struct DiscoveryTask {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DiscoveryTask {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DiscoveryTask {
    /// Starts polling `backend` every `discovery.interval` until the
    /// backend or this guard is dropped; nothing with a zero interval (the
    /// backend then stays up with unknown models).
    pub(crate) fn watch(&mut self, backend: &Arc<Backend>, discovery: Discovery) {
        if discovery.interval.is_zero() {
            return;
        }
        self.tasks.retain(|task| !task.is_finished());
        let traffic = Arc::clone(&backend.traffic);
        let backend = Arc::downgrade(backend);
        self.tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(discovery.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let early = tokio::select! {
                    _ = ticks.tick() => false,
                    () = traffic.notified() => true,
                };
                if early {
                    tokio::time::sleep(super::EARLY_SCRAPE_GAP).await;
                }
                let Some(backend) = backend.upgrade() else {
                    return;
                };
                if !early {
                    backend.probe(&discovery).await;
                } else if backend.wants_early_scrape() {
                    backend.early_scrapes.fetch_add(1, Ordering::Relaxed);
                    backend.scrape_load(&discovery).await;
                    // While one is still wanted, the next comes a gap later
                    // if requests are in flight here.
                    if backend.wants_early_scrape() && backend.in_flight() > 0 {
                        traffic.notify_one();
                    }
                }
            }
        }));
    }
}

impl Backends {
    /// Probes every backend once, concurrently, and returns when all are
    /// done: what one round of the poller does.
    pub async fn probe_all(&self, discovery: &Discovery) {
        let mut probes = JoinSet::new();
        for backend in self.all() {
            let backend = Arc::clone(backend);
            let discovery = *discovery;
            probes.spawn(async move { backend.probe(&discovery).await });
        }
        while let Some(done) = probes.join_next().await {
            if let Err(err) = done {
                warn!(%err, "a discovery probe panicked");
            }
        }
    }
}

/// Why a `/v1/models` answer leaves the models unknown or unchanged.
enum Unlisted {
    Status(u16),
    Body(probe::ModelsParseError),
}

impl fmt::Display for Unlisted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Status(status) => write!(f, "HTTP {status}"),
            Self::Body(err) => err.fmt(f),
        }
    }
}

impl Backend {
    /// Where discovery's GETs go, within its timeouts.
    fn target(&self, discovery: &Discovery) -> Target<'_> {
        Target {
            addr: self.addr,
            host: &self.authority,
            connect_timeout: discovery.connect_timeout,
            timeout: discovery.timeout,
        }
    }

    /// Probes the backend once: its models, health and load.
    pub(crate) async fn probe(&self, discovery: &Discovery) {
        let target = self.target(discovery);
        match get(target, "/v1/models").await {
            Err(err) => return self.failed(discovery.down_after, &err),
            Ok(response) if response.status >= 500 => {
                return self.failed(
                    discovery.down_after,
                    &format_args!("/v1/models answered HTTP {}", response.status),
                );
            }
            Ok(response) => {
                self.answered();
                let listed = if (200..300).contains(&response.status) {
                    probe::parse_models(&response.body).map_err(Unlisted::Body)
                } else {
                    Err(Unlisted::Status(response.status))
                };
                match listed {
                    Ok(models) => {
                        if !self.models_ok.swap(true, Ordering::Relaxed) {
                            info!(backend = %self.name, "/v1/models is readable again");
                        }
                        self.set_models(models);
                    }
                    Err(why) => {
                        if self.models_ok.swap(false, Ordering::Relaxed) {
                            warn!(backend = %self.name, %why,
                                "/v1/models gives no model list; keeping the last known models");
                        }
                    }
                }
            }
        }
        self.scrape_load(discovery).await;
    }

    /// Reads the backend's load from `/metrics` (see [`Self::probe`]).
    async fn scrape_load(&self, discovery: &Discovery) {
        let target = self.target(discovery);
        // The engine reads its queue at some moment of the scrape; any of
        // our requests in it was in flight when the scrape began or started
        // during it (one that ended before the scrape returned included).
        let ours_before = self.in_flight();
        let started_before = self.started();
        let scraped = match get(target, "/metrics").await {
            Ok(response) if (200..300).contains(&response.status) => {
                Ok(probe::parse_load(&String::from_utf8_lossy(&response.body)))
            }
            Ok(response) => Err(Unlisted::Status(response.status).to_string()),
            Err(err) => Err(err.to_string()),
        };
        match scraped {
            Ok(load) => {
                if !self.load_ok.swap(true, Ordering::Relaxed) {
                    info!(backend = %self.name, "/metrics is readable again");
                }
                let started_during = self.started().saturating_sub(started_before);
                let started_during = usize::try_from(started_during).unwrap_or(usize::MAX);
                let ours = ours_before.saturating_add(started_during);
                let now = super::health::clock();
                self.observe_clients(&load, ours, now);
                self.learn_bytes_per_token(&load, self.scraped_clients(now));
                self.set_load(load, ours);
            }
            Err(why) => {
                if self.load_ok.swap(false, Ordering::Relaxed) {
                    warn!(backend = %self.name, %why,
                        "scraping /metrics failed; keeping the last load values");
                }
            }
        }
    }

    /// Records a probe without an answer; marks the backend down at the
    /// `down_after`th in a row.
    pub(super) fn failed(&self, down_after: u32, why: &dyn fmt::Display) {
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures >= down_after.max(1) && self.up.swap(false, Ordering::Relaxed) {
            warn!(backend = %self.name, failures, %why, "backend down: discovery gets no answer");
            self.set_load(Load::default(), 0);
            self.downs.fetch_add(1, Ordering::Release);
        } else {
            debug!(backend = %self.name, failures, %why, "discovery got no answer");
        }
    }

    /// Records an HTTP answer: the backend is up.
    pub(super) fn answered(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(backend = %self.name, "backend up: discovery answered again");
        }
    }

    /// Replaces the known models (sorted, deduplicated) if they changed.
    pub(super) fn set_models(&self, models: Vec<String>) {
        let mut known = self
            .models
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.as_deref() != Some(models.as_slice()) {
            info!(backend = %self.name, ?models, "models discovered");
            *known = Some(models.into());
        }
    }

    /// Notes whether a scrape at `now`, taken while `ours` of this
    /// router's requests were in flight, shows other clients' requests
    /// (see [`Backend::clients`]); logs when that changes.
    pub(super) fn observe_clients(&self, load: &Load, ours: usize, now: u64) {
        let engine = load
            .waiting
            .unwrap_or(0)
            .saturating_add(load.running.unwrap_or(0));
        let others = engine.saturating_sub(u64::try_from(ours).unwrap_or(u64::MAX));
        let before = self.clients(now);
        if engine > 0 || ours > 0 {
            self.busy_scrapes.fetch_add(1, Ordering::Relaxed);
        }
        if others > 0 {
            self.others_seen.store(now, Ordering::Relaxed);
        }
        match (before, self.clients(now)) {
            (before, Clients::Others) if before != Clients::Others => {
                info!(backend = %self.name, others,
                "the backend also serves requests this router did not send (another replica's, or direct clients')")
            }
            (before, Clients::Ours) if before != Clients::Ours => info!(backend = %self.name,
                "the backend serves only this router's requests"),
            _ => {}
        }
    }

    /// Who sends requests here as far as the scrapes and the known peers
    /// tell: with peers, a scrape that shows only this router's requests
    /// shows an idle moment of theirs, and the engine's counters hold
    /// their tokens too.
    fn scraped_clients(&self, now: u64) -> Clients {
        self.clients(now).given_peers(self.peers.get())
    }

    /// Learns key bytes per prompt token from a scrape's
    /// `vllm:prompt_tokens_total`: the key bytes this router sent over the
    /// tokens the engine counted, summed over a window of scrapes (see
    /// [`PromptCount`]), once the window holds at least
    /// [`RATIO_MIN_TOKENS`] and only this router's requests reach the
    /// engine ([`Clients::Ours`]). Scrapes while that is not known yet
    /// extend the window and teach nothing; a scrape that shows another
    /// client's requests, or a counter that went back (the engine
    /// restarted), starts a new one.
    pub(super) fn learn_bytes_per_token(&self, load: &Load, clients: Clients) {
        let Some(tokens) = load.prompt_tokens else {
            return;
        };
        let bytes = self.key_bytes.load(Ordering::Relaxed);
        let mut count = self
            .counted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((tokens_before, bytes_before)) = count.last.replace((tokens, bytes)) else {
            return;
        };
        if tokens < tokens_before || clients == Clients::Others {
            (count.tokens, count.bytes) = (0, 0);
            return;
        }
        count.tokens = count.tokens.saturating_add(tokens - tokens_before);
        count.bytes = count
            .bytes
            .saturating_add(bytes.saturating_sub(bytes_before));
        while count.tokens > RATIO_WINDOW_TOKENS {
            (count.tokens, count.bytes) = (count.tokens / 2, count.bytes / 2);
        }
        if clients != Clients::Ours || count.tokens < RATIO_MIN_TOKENS {
            return;
        }
        // A ratio outside these bounds is not text.
        #[allow(clippy::cast_precision_loss, reason = "a ratio of counts")]
        let ratio = (count.bytes as f64 / count.tokens as f64).clamp(0.5, 16.0);
        if self.bytes_per_token() == 0.0 {
            info!(backend = %self.name, bytes_per_token = ratio,
                "learned key bytes per prompt token from the engine's counter");
        }
        self.bytes_per_token
            .store(ratio.to_bits(), Ordering::Relaxed);
    }

    /// Stores a scrape's load, taken while `ours` of this router's
    /// requests were in flight; absent metrics count as 0.
    pub(super) fn set_load(&self, load: Load, ours: usize) {
        let waiting = load.waiting.unwrap_or(0);
        self.waiting.store(waiting, Ordering::Relaxed);
        let ours = u64::try_from(ours).unwrap_or(u64::MAX);
        self.others_waiting
            .store(waiting.saturating_sub(ours), Ordering::Relaxed);
        self.running
            .store(load.running.unwrap_or(0), Ordering::Relaxed);
        let tokens = load.cache_tokens.unwrap_or(0);
        if self.cache_tokens.swap(tokens, Ordering::Relaxed) != tokens {
            info!(backend = %self.name, tokens, "KV cache size (vllm:cache_config_info; 0: unknown)");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::backend::{EARLY_SCRAPES, SHARED_MEMORY_MS};

    /// A set of one backend that nothing listens for.
    async fn one_backend() -> Backends {
        Backends::resolve(&["http://127.0.0.1:1".into()])
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn our_own_requests_in_a_scraped_queue_are_not_counted_twice() {
        let backends = one_backend().await;
        let backend = backends.get(0).unwrap();
        let queued = |waiting| Load {
            waiting: Some(waiting),
            running: Some(1),
            ..Load::default()
        };
        // Our one request was queued when the engine was scraped: once it
        // ends, the backend is idle for routing.
        backend.set_load(queued(1), 1);
        assert_eq!((backend.waiting(), backend.others_waiting()), (1, 0));
        // Two more than ours were queued: another router's.
        backend.set_load(queued(3), 1);
        assert_eq!((backend.waiting(), backend.others_waiting()), (3, 2));
        backend.set_load(queued(2), 0);
        assert_eq!(backend.others_waiting(), 2);
    }

    #[tokio::test]
    async fn scrapes_tell_whether_other_clients_send_requests_to_a_backend() {
        let backends = one_backend().await;
        let backend = backends.get(0).unwrap();
        let engine = |running, waiting| Load {
            waiting: Some(waiting),
            running: Some(running),
            ..Load::default()
        };
        // Nothing read yet, or only an idle engine: nothing says whether
        // the router is alone.
        assert_eq!(backend.clients(1), Clients::Unknown);
        backend.observe_clients(&engine(0, 0), 0, 1);
        assert_eq!(backend.clients(1), Clients::Unknown);
        // Everything the engine holds may be ours, a few scrapes running.
        for _ in 0..EARLY_SCRAPES {
            assert_eq!(backend.clients(1_000), Clients::Unknown);
            backend.observe_clients(&engine(2, 1), 3, 1_000);
        }
        assert_eq!(backend.clients(1_000), Clients::Ours);
        // One more than ours: another client's, remembered for a while.
        backend.observe_clients(&engine(3, 1), 3, 2_000);
        assert_eq!(backend.clients(2_000), Clients::Others);
        backend.observe_clients(&engine(0, 0), 0, 7_000);
        assert_eq!(
            backend.clients(2_000 + SHARED_MEMORY_MS - 1),
            Clients::Others
        );
        assert_eq!(backend.clients(2_000 + SHARED_MEMORY_MS), Clients::Ours);
    }

    #[tokio::test]
    async fn key_bytes_per_token_are_learned_while_alone() {
        let backends = one_backend().await;
        let backend = backends.get(0).unwrap();
        let counted = |tokens| Load {
            prompt_tokens: Some(tokens),
            ..Load::default()
        };
        // The first scrape only starts a window.
        backend.learn_bytes_per_token(&counted(100), Clients::Unknown);
        assert_eq!(backend.bytes_per_token(), 0.0);
        // A cold start: two prompts of 4,500 bytes sent, not yet counted
        // when a scrape finds the engine busy (whose requests, not known
        // yet); the next scrape finds them counted, and only ours there.
        backend.key_sent(9_000);
        backend.learn_bytes_per_token(&counted(100), Clients::Unknown);
        assert_eq!(backend.bytes_per_token(), 0.0);
        backend.learn_bytes_per_token(&counted(2_100), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 4.5);
        // Too few tokens in a new window: nothing learned from it yet.
        backend.key_sent(1_000);
        backend.learn_bytes_per_token(&counted(4_100), Clients::Others);
        assert_eq!(backend.bytes_per_token(), 4.5);
        backend.key_sent(300);
        backend.learn_bytes_per_token(&counted(4_200), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 4.5);
        // 300 + 2,700 bytes over 100 + 900 tokens.
        backend.key_sent(2_700);
        backend.learn_bytes_per_token(&counted(5_100), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 3.0);
        // The engine restarted (its counter went back): a new window.
        backend.key_sent(5_000);
        backend.learn_bytes_per_token(&counted(50), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 3.0);
        backend.key_sent(16_000);
        backend.learn_bytes_per_token(&counted(1_050), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 16.0);
        // A long window is halved, so newer tokens weigh more.
        backend.key_sent(4 * 299_000);
        backend.learn_bytes_per_token(&counted(300_050), Clients::Ours);
        assert_eq!(backend.bytes_per_token(), 4.04);
        backend.key_sent(16_000);
        backend.learn_bytes_per_token(&counted(301_050), Clients::Ours);
        let halved = (606_000.0 + 16_000.0) / (150_000.0 + 1_000.0);
        assert!((backend.bytes_per_token() - halved).abs() < 1e-9);
        // Routing sees it, with the cache's size.
        backend.set_load(
            Load {
                cache_tokens: Some(4_800),
                ..Load::default()
            },
            0,
        );
        let view = backend.routing_view(0);
        assert_eq!((view.cache_tokens, view.bytes_per_token), (4_800, halved));
    }

    #[tokio::test]
    async fn down_after_threshold_and_up_on_answer() {
        let backends = one_backend().await;
        let backend = backends.get(0).unwrap();
        backend.set_load(
            Load {
                waiting: Some(4),
                running: Some(2),
                cache_tokens: Some(2304),
                prompt_tokens: None,
            },
            0,
        );
        backend.failed(3, &"refused");
        backend.failed(3, &"refused");
        assert!(backend.is_up());
        assert_eq!((backend.waiting(), backend.cache_tokens()), (4, 2304));
        backend.failed(3, &"refused");
        assert!(!backend.is_up());
        assert_eq!((backend.waiting(), backend.running()), (0, 0));
        assert_eq!(backend.cache_tokens(), 0, "a backend down is unknown");
        backend.answered();
        assert!(backend.is_up());
        // The count restarted: one failure is not enough again.
        backend.failed(3, &"refused");
        assert!(backend.is_up());
        assert_eq!(backend.downs(), 1);
        // Down again, however short the time up was: counted again, once.
        backend.failed(3, &"refused");
        backend.failed(3, &"refused");
        backend.failed(3, &"refused");
        assert_eq!((backend.is_up(), backend.downs()), (false, 2));
    }

    #[tokio::test]
    async fn a_router_with_peers_learns_no_ratio_from_scrapes_that_look_alone() {
        let (endpoints, _) =
            super::super::endpoints::StaticSource::new(&["http://127.0.0.1:1".into()], None)
                .unwrap()
                .resolve()
                .await;
        // Scrapes that find the engine running exactly this router's one
        // request, its prompt counter up 1,000 tokens for 4,500 key bytes
        // sent each time: alone, that is 4.5 bytes per token; with two
        // peers, their requests came and went between the scrapes, and
        // their tokens are in the counter.
        for (peers, learned) in [(Some(0), 4.5), (None, 4.5), (Some(2), 0.0)] {
            let fleet = super::super::fleet::Fleet::new(crate::metrics::BackendSeries::default())
                .with_peers(peers);
            fleet.apply(&endpoints);
            let backends = fleet.snapshot();
            let backend = backends.get(0).unwrap();
            for scrape in 0..=EARLY_SCRAPES as u64 {
                let load = Load {
                    running: Some(1),
                    prompt_tokens: Some(1_000 * scrape),
                    ..Load::default()
                };
                let now = 1_000 + scrape;
                backend.observe_clients(&load, 1, now);
                backend.learn_bytes_per_token(&load, backend.scraped_clients(now));
                backend.key_sent(4_500);
            }
            assert_eq!(backend.bytes_per_token(), learned, "peers {peers:?}");
        }
    }

    /// Discovery that probes when asked, and marks a backend down at its
    /// first failure.
    fn one_shot() -> Discovery {
        Discovery {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            down_after: 1,
        }
    }

    #[tokio::test]
    async fn a_refused_probe_counts_as_a_failure() {
        // A port nobody listens on, held bound (never listening) so that
        // no other process takes it and answers.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
        let addr = socket.local_addr().unwrap();
        let backends = Backends::resolve(&[format!("http://{addr}")])
            .await
            .unwrap();
        let discovery = one_shot();
        backends.probe_all(&discovery).await;
        assert!(!backends.get(0).unwrap().is_up());
    }

    /// A request of ours that starts and ends while the engine answers a
    /// scrape is in the queue it reports, though it was in flight neither
    /// before nor after the scrape: it must not count as another router's.
    #[tokio::test]
    async fn a_request_that_came_and_went_during_a_scrape_is_ours() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = Arc::new(
            Backends::resolve(&[format!("http://{addr}")])
                .await
                .unwrap(),
        );
        let engine = {
            let backends = Arc::clone(&backends);
            tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    let mut head = vec![0u8; 4096];
                    let n = stream.read(&mut head).await.unwrap_or(0);
                    let body = if head[..n].starts_with(b"GET /metrics") {
                        // Our request arrives, is queued, and is answered,
                        // all before this scrape's answer goes out.
                        drop(backends.get(0).unwrap().start_request(0));
                        "vllm:num_requests_waiting 1\nvllm:num_requests_running 0\n".to_owned()
                    } else {
                        r#"{"object":"list","data":[{"id":"m","object":"model"}]}"#.to_owned()
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                }
            })
        };
        let discovery = one_shot();
        backends.probe_all(&discovery).await;
        let backend = backends.get(0).unwrap();
        assert_eq!((backend.waiting(), backend.others_waiting()), (1, 0));
        engine.abort();
    }
}
