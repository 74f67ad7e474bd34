//! The backend set: where each vLLM instance is, what it serves, whether
//! it is up, and its live load.
//!
//! Backends are given as URLs (`http://host:port`), resolved to every
//! address and followed as they change (`endpoints`); the set in use is a
//! snapshot a request holds to its end (`fleet`). Each backend has a
//! stable `BackendId`, its own counters, and an exact in-flight count, maintained by
//! `InFlight` guards that the connection code holds for the life of a
//! forwarded request, and what the `discovery` poller last learned from
//! it: its models (`GET /v1/models`), whether it answers, and its engine
//! queue (`vllm:num_requests_waiting` and `vllm:num_requests_running` from
//! `GET /metrics`).
//!
//! # Which backends may take a request
//! [`Backends::candidates`] filters by model, then by health:
//! - A backend that never answered `/v1/models` may serve any model while
//!   it is up: a fleet whose discovery is unreachable still routes. Once it
//!   is down and has never answered, it serves nothing.
//! - A backend that answered serves the models of its last good answer,
//!   even while down (it is expected back with the same models).
//! - With no model named, the fleet's model is used when it serves exactly
//!   one ([`ModelError::Required`] when several); when nothing is known yet,
//!   every backend is a candidate.
//! - A model that no backend serves is [`ModelError::Unknown`], unless no
//!   backend has ever answered (then every backend is a candidate and the
//!   backend says 404 itself).
//! - Of the backends serving the model, only those up are candidates,
//!   unless all of them are down: then all of them are, so the request is
//!   still tried and fails with the backend's own error.
//!
//! Health and load are advisory: they come from a poll every
//! `--discovery-interval-ms`, so the request path still handles connect
//! failures itself.
pub(crate) mod discovery;
pub(crate) mod endpoints;
pub(crate) mod fleet;
pub(crate) mod health;
pub(crate) mod kubernetes;
pub(crate) mod peers;
pub(crate) mod probe;

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
};

use crate::{
    error::ApiError,
    metrics::BackendCounters,
    route::{BackendLoad, Clients},
};
pub use discovery::Discovery;
pub(crate) use discovery::DiscoveryTask;
pub(crate) use endpoints::{Endpoint, StaticSource};
pub(crate) use fleet::Fleet;
pub(crate) use health::{Ejection, Outcome};

/// How long, in milliseconds, a scrape showing other clients' requests on a
/// backend keeps [other clients](Backend::clients) on it: a dozen scrapes at the
/// default interval, so a replica that is idle for a moment still counts.
pub(crate) const SHARED_MEMORY_MS: u64 = 60_000;

/// How many scrapes that find traffic on a backend discovery takes early,
/// [`EARLY_SCRAPE_GAP`] apart, once requests start going there.
pub(crate) const EARLY_SCRAPES: u32 = 4;

/// At most this many early scrapes, found traffic or not: a backend whose
/// `/metrics` fails, or whose requests end before each scrape, is read at
/// the discovery interval after that, never 40 times a second.
pub(crate) const EARLY_SCRAPE_LIMIT: u32 = 3 * EARLY_SCRAPES;

/// The time between early scrapes: long enough for requests sent together
/// (this router's and other replicas') to reach the engine.
pub(crate) const EARLY_SCRAPE_GAP: std::time::Duration = std::time::Duration::from_millis(25);

/// A backend URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Only plain `http://` backends are supported.
    #[error("backend `{0}`: only http:// URLs are supported")]
    Scheme(String),
    /// The URL has no `host:port`.
    #[error("backend `{0}`: expected http://host:port")]
    Malformed(String),
    /// The host did not resolve.
    #[error("backend `{url}`: cannot resolve: {source}")]
    Resolve {
        /// The URL as given.
        url: String,
        /// Why resolution failed.
        source: std::io::Error,
    },
    /// `--hosts-file` could not be read.
    #[error("hosts file {}: {source}", path.display())]
    HostsFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why reading it failed.
        source: std::io::Error,
    },
}

/// A backend's identity for the daemon's life: never reused, unlike a
/// position in the set or an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct BackendId(u64);

impl BackendId {
    fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// One backend instance.
#[derive(Debug)]
pub struct Backend {
    /// Its identity.
    pub(crate) id: BackendId,
    /// Its name in logs, metrics and placement: the URL as given, or
    /// `http://ADDRESS:PORT` for one address of a host name, or for a pod
    /// (see [`endpoints`]).
    pub(crate) name: String,
    /// The resolved address the router connects to.
    pub(crate) addr: SocketAddr,
    /// On the router's own node: preferred when costs are close.
    pub(crate) local: bool,
    /// `host:port`, sent as the `Host` header of probes.
    authority: String,
    in_flight: AtomicUsize,
    /// Prompt key bytes of requests in flight whose response body has not
    /// begun: prefill the engine has queued or is computing.
    prefilling: AtomicUsize,
    /// Requests ever started here (monotonic), so a scrape can tell which of
    /// ours may be in the queue it read.
    started: AtomicU64,
    /// When the last request here started ([`health::clock`]); 0: none yet.
    last_start: AtomicU64,
    /// False once discovery failed `down_after` times in a row.
    up: AtomicBool,
    /// Discovery failures since the last answer.
    failures: AtomicU32,
    /// Times discovery has marked the backend down.
    downs: AtomicU32,
    waiting: AtomicU64,
    /// Of `waiting`, those that were not this router's requests.
    others_waiting: AtomicU64,
    /// [`health::clock`] of the last scrape that showed requests this
    /// router did not send; 0: none yet.
    others_seen: AtomicU64,
    /// Scrapes that found requests in the engine or in flight from here.
    busy_scrapes: AtomicU32,
    /// Early scrapes taken, whatever they found.
    early_scrapes: AtomicU32,
    /// Woken by a request while an early scrape is wanted
    /// ([`Self::wants_early_scrape`]): discovery then reads the load at
    /// once (see `discovery`), so a router learns within a moment of its
    /// first requests whether it shares the backend, not an interval later.
    traffic: Arc<tokio::sync::Notify>,
    running: AtomicU64,
    /// Tokens its KV cache holds (`vllm:cache_config_info`); 0: unknown.
    cache_tokens: AtomicU64,
    /// Prompt key bytes of the requests sent here (monotonic).
    key_bytes: AtomicU64,
    /// `vllm:prompt_tokens_total` and [`Self::key_bytes`] over the
    /// current window of scrapes.
    counted: std::sync::Mutex<discovery::PromptCount>,
    /// Key bytes per prompt token, learned from scrapes while only this
    /// router sends requests here (`f64` bits; 0: not yet).
    bytes_per_token: AtomicU64,
    /// The models of the last good `/v1/models` answer; `None` until one.
    models: RwLock<Option<Arc<[String]>>>,
    /// Whether the last `/v1/models` and `/metrics` answers were usable, so
    /// that problems are logged once per change, not once per poll.
    models_ok: AtomicBool,
    load_ok: AtomicBool,
    /// Gone from the endpoints: no new request comes here.
    retired: AtomicBool,
    /// What requests have learned of it (see [`health`]).
    health: health::Health,
    /// When its health ejects it.
    ejection: Ejection,
    /// Its request, connection and latency series.
    pub(crate) counters: BackendCounters,
    /// The other routers sending requests to the fleet, as far as known:
    /// with some, a scrape that shows only this router's requests shows
    /// an idle moment of theirs, not a backend of its own.
    peers: Arc<peers::Peers>,
}

impl Backend {
    fn new(
        endpoint: &Endpoint,
        counters: BackendCounters,
        ejection: Ejection,
        peers: Arc<peers::Peers>,
    ) -> Self {
        Self {
            id: BackendId::next(),
            name: endpoint.name.clone(),
            addr: endpoint.addr,
            local: endpoint.local,
            authority: endpoint.authority.clone(),
            in_flight: AtomicUsize::new(0),
            prefilling: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            last_start: AtomicU64::new(0),
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            downs: AtomicU32::new(0),
            waiting: AtomicU64::new(0),
            others_waiting: AtomicU64::new(0),
            others_seen: AtomicU64::new(0),
            busy_scrapes: AtomicU32::new(0),
            early_scrapes: AtomicU32::new(0),
            traffic: Arc::default(),
            running: AtomicU64::new(0),
            cache_tokens: AtomicU64::new(0),
            key_bytes: AtomicU64::new(0),
            counted: std::sync::Mutex::default(),
            bytes_per_token: AtomicU64::new(0),
            models: RwLock::new(None),
            models_ok: AtomicBool::new(true),
            load_ok: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            health: health::Health::default(),
            ejection,
            counters,
            peers,
        }
    }

    /// Whether passive health lets the backend take a new request: not
    /// ejected, or on trial with none in flight. `now` is read from
    /// [`health::clock`] the first time some backend needs it.
    fn admits(&self, now: &mut Option<u64>) -> bool {
        if self.health.is_clear() {
            return true;
        }
        let now = *now.get_or_insert_with(health::clock);
        self.health.admits(now, &self.ejection)
    }

    /// Whether passive health has ejected the backend now.
    pub(crate) fn is_ejected(&self) -> bool {
        self.health.is_ejected(health::clock())
    }

    /// A request was sent here: on trial, it is the one trial request.
    pub(crate) fn chosen(&self) {
        if !self.health.is_clear() {
            self.health.chosen(health::clock());
        }
    }

    /// Records what a request learned of the backend, and logs an
    /// ejection or a readmission.
    pub(crate) fn record(&self, outcome: Outcome) {
        if outcome == Outcome::Success && self.health.is_healthy() {
            return;
        }
        match self.health.record(outcome, health::clock(), &self.ejection) {
            health::Change::None => {}
            health::Change::Ejected { period } => tracing::warn!(
                backend = %self.name,
                period_ms = period.as_millis(),
                "backend ejected: its requests keep failing; it gets no new request for the period, then one to try it"
            ),
            health::Change::Readmitted => {
                tracing::info!(backend = %self.name, "backend readmitted: its trial request succeeded");
            }
        }
    }

    /// Whether the backend left the endpoints (see [`Fleet`]): the requests
    /// already on it finish, its idle connections are closed.
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    /// False when discovery has failed `--down-after-failures` times in a
    /// row; true again once the backend answers. Backends start up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How many times discovery has marked the backend down. Unlike
    /// [`Self::is_up`] sampled now and then, a change here cannot be missed
    /// however briefly the backend was up in between.
    pub(crate) fn downs(&self) -> u32 {
        self.downs.load(Ordering::Acquire)
    }

    /// Requests queued in the backend's engine (`vllm:num_requests_waiting`)
    /// at the last scrape; 0 when unknown.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Tokens the backend's KV cache holds, as its last scrape said
    /// (`vllm:cache_config_info`); 0 when unknown.
    pub(crate) fn cache_tokens(&self) -> u64 {
        self.cache_tokens.load(Ordering::Relaxed)
    }

    /// Key bytes per prompt token of the requests this router sent here,
    /// as the engine counted them (see `discovery`); 0 until known.
    pub(crate) fn bytes_per_token(&self) -> f64 {
        f64::from_bits(self.bytes_per_token.load(Ordering::Relaxed))
    }

    /// What routing sees of this backend at `now` ([`health::clock`]): its
    /// load, who else sends there, and its cache.
    pub(crate) fn routing_view(&self, now: u64) -> BackendLoad<'_> {
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        BackendLoad::new(&self.name, self.in_flight())
            .with_waiting(count(self.others_waiting()))
            .with_prefill(self.prefilling())
            .with_local(self.local)
            .with_clients(self.clients(now))
            .with_cache_tokens(count(self.cache_tokens()))
            .with_bytes_per_token(self.bytes_per_token())
            .with_last_start(self.last_start.load(Ordering::Relaxed))
    }

    /// Counts `bytes` of prompt key sent here (once per attempt).
    pub(crate) fn key_sent(&self, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.key_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Of [`Self::waiting`], the requests that cannot have been this
    /// router's own: the queue less this router's requests in flight at
    /// the scrape, which [`Self::in_flight`] counts exactly already. So a
    /// queue scraped while a request of ours waited stops counting when
    /// that request ends, instead of at the next scrape (it pushed the
    /// tutorial's second request off its first one's backend). With one
    /// router per backend, as deployed, it is 0; other routers' requests
    /// still count.
    pub(crate) fn others_waiting(&self) -> u64 {
        self.others_waiting.load(Ordering::Relaxed)
    }

    /// Who sends requests here, as far as the router can tell at
    /// [`health::clock`] time `now`: [`Clients::Others`] when a scrape in
    /// the last [`SHARED_MEMORY_MS`] counted more requests running and
    /// waiting than this router could have had there (another replica's,
    /// or a client calling the engine directly); [`Clients::Ours`] once
    /// [`EARLY_SCRAPES`] scrapes have found traffic and none of it was
    /// another's; [`Clients::Unknown`] before (discovery off, no
    /// `/metrics`, or no requests yet: replicas that start together all see
    /// an idle engine first). Routing spreads a new prompt by its own view
    /// of load only where it sees all of it (see `route::policy`).
    pub(crate) fn clients(&self, now: u64) -> Clients {
        let seen = self.others_seen.load(Ordering::Relaxed);
        if seen != 0 && now.saturating_sub(seen) < SHARED_MEMORY_MS {
            Clients::Others
        } else if self.busy_scrapes.load(Ordering::Relaxed) < EARLY_SCRAPES {
            Clients::Unknown
        } else {
            Clients::Ours
        }
    }

    /// Whether discovery should read the load soon rather than at its
    /// interval: fewer than [`EARLY_SCRAPES`] scrapes have found traffic,
    /// and fewer than [`EARLY_SCRAPE_LIMIT`] early ones were taken.
    fn wants_early_scrape(&self) -> bool {
        self.busy_scrapes.load(Ordering::Relaxed) < EARLY_SCRAPES
            && self.early_scrapes.load(Ordering::Relaxed) < EARLY_SCRAPE_LIMIT
    }

    /// Requests running in the backend's engine (`vllm:num_requests_running`)
    /// at the last scrape; 0 when unknown.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// The models of the backend's last good `/v1/models` answer, sorted;
    /// `None` if it has never given one.
    pub fn models(&self) -> Option<Arc<[String]>> {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether the backend may serve `model` (any model when `None`): known
    /// models are checked, unknown ones count as a match while the backend
    /// is up.
    fn may_serve(&self, model: Option<&str>) -> bool {
        let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
        match (models.as_deref(), model) {
            (None, _) => self.is_up(),
            (Some(_), None) => true,
            (Some(models), Some(model)) => models.iter().any(|served| served == model),
        }
    }

    /// Whether the backend has ever listed its models.
    fn models_known(&self) -> bool {
        self.models
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Requests forwarded to this backend whose response has not ended.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests ever started here.
    pub(crate) fn started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Prompt key bytes sent here that the backend has not begun to answer
    /// (see [`InFlight::response_began`]).
    pub(crate) fn prefilling(&self) -> usize {
        self.prefilling.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops, and its
    /// `prefill` uncached key bytes as prefilling until it is answered.
    pub(crate) fn start_request(self: &Arc<Self>, prefill: usize) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.begin(prefill)
    }

    /// [`Self::start_request`], but only while this router has no request
    /// in flight here: None when another request took the backend since
    /// routing saw it idle (two decisions taken at once, each blind to the
    /// other's, would otherwise both send their prompts to the one idle
    /// engine, to be prefilled in one step; see `Router::select`).
    pub(crate) fn start_if_idle(self: &Arc<Self>, prefill: usize) -> Option<InFlight> {
        self.in_flight
            .compare_exchange(0, 1, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.begin(prefill))
    }

    /// The rest of starting a request counted in `in_flight` already.
    fn begin(self: &Arc<Self>, prefill: usize) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.last_start.store(health::clock(), Ordering::Relaxed);
        if self.wants_early_scrape() {
            self.traffic.notify_one();
        }
        self.prefilling.fetch_add(prefill, Ordering::Relaxed);
        InFlight {
            backend: Arc::clone(self),
            prefill,
        }
    }
}

/// Holds one unit of a backend's in-flight count, and the request's share
/// of its prefilling bytes until [`InFlight::response_began`].
#[derive(Debug)]
pub(crate) struct InFlight {
    backend: Arc<Backend>,
    /// Bytes still counted in `prefilling`.
    prefill: usize,
}

impl InFlight {
    /// The response body has begun: the request's prompt is prefilled.
    pub(crate) fn response_began(&mut self) {
        let prefill = std::mem::take(&mut self.prefill);
        if prefill > 0 {
            self.backend
                .prefilling
                .fetch_sub(prefill, Ordering::Relaxed);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.response_began();
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One snapshot of the backend set (see `Fleet`), in URL order.
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
}

impl Backends {
    /// Parses and resolves backend URLs once, every address counting, with
    /// counters that no registry exports: a fixed set, for tools and tests.
    /// The daemon keeps a `Fleet` instead.
    pub async fn resolve(urls: &[String]) -> Result<Self, BackendError> {
        let (endpoints, failures) = StaticSource::new(urls, None)?.resolve().await;
        if let Some(failure) = failures.into_iter().next() {
            return Err(failure);
        }
        let series = crate::metrics::BackendSeries::default();
        let list = endpoints
            .iter()
            .map(|endpoint| {
                Arc::new(Backend::new(
                    endpoint,
                    series.counters(&endpoint.name),
                    Ejection::DEFAULT,
                    Arc::new(peers::Peers::new(None)),
                ))
            })
            .collect();
        Ok(Self { list })
    }

    /// All backends.
    pub(crate) fn all(&self) -> &[Arc<Backend>] {
        &self.list
    }

    /// The backend at `index`, as returned by routing.
    pub fn get(&self, index: usize) -> Option<&Arc<Backend>> {
        self.list.get(index)
    }

    /// Indexes of the backends that may take a request for `model`, in
    /// backend order (see the module doc for the rules).
    pub fn candidates(&self, model: Option<&str>) -> Result<Vec<usize>, ModelError> {
        let mut out = Vec::with_capacity(self.list.len());
        self.candidates_into(model, &mut out)?;
        Ok(out)
    }

    /// [`Self::candidates`] into a reused buffer (cleared first); it does
    /// not allocate unless `out` must grow or the answer is an error.
    pub(crate) fn candidates_into(
        &self,
        model: Option<&str>,
        out: &mut Vec<usize>,
    ) -> Result<(), ModelError> {
        out.clear();
        let sole;
        let model = match model {
            Some(model) => Some(model),
            None => {
                sole = self.sole_model()?;
                sole.as_ref().map(ModelRef::as_str)
            }
        };
        let mut any_up = false;
        for (index, backend) in self.list.iter().enumerate() {
            if backend.may_serve(model) {
                out.push(index);
                any_up |= backend.is_up();
            }
        }
        if out.is_empty() {
            if self.list.iter().any(|backend| backend.models_known()) {
                return Err(ModelError::Unknown {
                    model: model.unwrap_or_default().to_owned(),
                    served: self.served_models(),
                });
            }
            // Nothing learned yet and every backend down: try them all.
            out.extend(0..self.list.len());
        } else if any_up {
            out.retain(|&index| self.list[index].is_up());
        }
        self.drop_ejected(out);
        Ok(())
    }

    /// Drops ejected backends from `out`, unless every one of them is:
    /// passive health is advisory, and trying an ejected backend beats
    /// refusing the request.
    fn drop_ejected(&self, out: &mut Vec<usize>) {
        let mut now = None;
        if out.iter().all(|&index| self.list[index].admits(&mut now)) {
            return;
        }
        if out.iter().any(|&index| self.list[index].admits(&mut now)) {
            out.retain(|&index| self.list[index].admits(&mut now));
        }
    }

    /// Whether some backend is up (discovery's last word on it).
    pub(crate) fn any_up(&self) -> bool {
        self.list.iter().any(|backend| backend.is_up())
    }

    /// The backends that may answer a request with no model (`GET
    /// /v1/models`, …) into a reused buffer: those up, or all of them when
    /// none is.
    pub(crate) fn reachable_into(&self, out: &mut Vec<usize>) {
        out.clear();
        out.extend((0..self.list.len()).filter(|&index| self.list[index].is_up()));
        if out.is_empty() {
            out.extend(0..self.list.len());
        }
        self.drop_ejected(out);
    }

    /// Every model some backend listed, sorted and deduplicated.
    pub(crate) fn served_models(&self) -> Vec<String> {
        let mut served: Vec<String> = self
            .list
            .iter()
            .filter_map(|backend| backend.models())
            .flat_map(|models| models.to_vec())
            .collect();
        served.sort_unstable();
        served.dedup();
        served
    }

    /// The one model the fleet serves, `None` when none is known, or
    /// [`ModelError::Required`] when several are.
    fn sole_model(&self) -> Result<Option<ModelRef>, ModelError> {
        let mut sole: Option<ModelRef> = None;
        for backend in &self.list {
            let Some(models) = backend.models() else {
                continue;
            };
            for (index, model) in models.iter().enumerate() {
                match &sole {
                    None => {
                        sole = Some(ModelRef {
                            list: Arc::clone(&models),
                            index,
                        });
                    }
                    Some(seen) if seen.as_str() == model => {}
                    Some(_) => {
                        return Err(ModelError::Required {
                            served: self.served_models(),
                        });
                    }
                }
            }
        }
        Ok(sole)
    }
}

/// A model name borrowed from a backend's list without copying it.
struct ModelRef {
    list: Arc<[String]>,
    index: usize,
}

impl ModelRef {
    fn as_str(&self) -> &str {
        &self.list[self.index]
    }
}

/// Why no backend can take a request for the model it names; the client's
/// fault, so never retried.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The request names no model and the fleet serves several: 400.
    #[error("model is required when the fleet serves several models: {}", List(.served))]
    Required {
        /// Every model served, sorted.
        served: Vec<String>,
    },
    /// No backend serves the model named: 404.
    #[error("the model `{model}` does not exist; served models: {}", List(.served))]
    Unknown {
        /// The model the request named.
        model: String,
        /// Every model served, sorted.
        served: Vec<String>,
    },
}

impl ModelError {
    /// The HTTP status to answer with: 400 or 404.
    pub fn status(&self) -> u16 {
        match self {
            Self::Required { .. } => 400,
            Self::Unknown { .. } => 404,
        }
    }
}

impl From<ModelError> for ApiError {
    fn from(err: ModelError) -> Self {
        match err {
            ModelError::Required { .. } => ApiError::bad_request(&err),
            ModelError::Unknown { .. } => ApiError::not_found(&err),
        }
    }
}

/// A comma-separated list of models, or `none` when empty.
struct List<'a>(&'a [String]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (index, model) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(", ")?;
            }
            f.write_str(model)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Backends on unused loopback ports; nothing is contacted.
    async fn fleet(n: usize) -> Backends {
        let urls: Vec<String> = (1..=n)
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        Backends::resolve(&urls).await.unwrap()
    }

    fn serves(backends: &Backends, index: usize, models: &[&str]) {
        let models = models.iter().map(|&model| model.to_owned()).collect();
        backends.get(index).unwrap().set_models(models);
    }

    fn down(backends: &Backends, index: usize) {
        backends.get(index).unwrap().failed(1, &"test");
    }

    #[tokio::test]
    async fn unknown_backends_serve_any_model() {
        let backends = fleet(3).await;
        assert_eq!(backends.candidates(Some("m")).unwrap(), [0, 1, 2]);
        assert_eq!(backends.candidates(None).unwrap(), [0, 1, 2]);
        // All down and nothing learned: still try everyone.
        for index in 0..3 {
            down(&backends, index);
        }
        assert_eq!(backends.candidates(Some("m")).unwrap(), [0, 1, 2]);
        assert_eq!(backends.candidates(None).unwrap(), [0, 1, 2]);
    }

    #[tokio::test]
    async fn candidates_follow_models() {
        let backends = fleet(4).await;
        serves(&backends, 0, &["a"]);
        serves(&backends, 1, &["b", "a-lora"]);
        serves(&backends, 2, &["a"]);
        assert_eq!(backends.candidates(Some("a")).unwrap(), [0, 2, 3]);
        assert_eq!(backends.candidates(Some("a-lora")).unwrap(), [1, 3]);
        // The unknown backend, once down, no longer serves anything.
        down(&backends, 3);
        assert_eq!(backends.candidates(Some("a")).unwrap(), [0, 2]);
        let unknown = backends.candidates(Some("c")).unwrap_err();
        assert_eq!(
            unknown,
            ModelError::Unknown {
                model: "c".into(),
                served: vec!["a".into(), "a-lora".into(), "b".into()],
            }
        );
        assert_eq!(unknown.status(), 404);
        assert_eq!(
            unknown.to_string(),
            "the model `c` does not exist; served models: a, a-lora, b"
        );
        let required = backends.candidates(None).unwrap_err();
        assert_eq!(required.status(), 400);
        assert_eq!(
            required.to_string(),
            "model is required when the fleet serves several models: a, a-lora, b"
        );
        let api = ApiError::from(required);
        assert_eq!(
            (api.status, api.message.contains("a, a-lora, b")),
            (400, true)
        );
    }

    #[tokio::test]
    async fn no_model_named_uses_the_sole_model() {
        let backends = fleet(3).await;
        serves(&backends, 0, &["a"]);
        serves(&backends, 2, &["a"]);
        // Backend 1 is unknown but up: a candidate too.
        assert_eq!(backends.candidates(None).unwrap(), [0, 1, 2]);
        down(&backends, 1);
        assert_eq!(backends.candidates(None).unwrap(), [0, 2]);
    }

    #[tokio::test]
    async fn down_backends_only_when_all_serving_are_down() {
        let backends = fleet(3).await;
        serves(&backends, 0, &["a"]);
        serves(&backends, 1, &["a"]);
        serves(&backends, 2, &["b"]);
        down(&backends, 0);
        assert_eq!(backends.candidates(Some("a")).unwrap(), [1]);
        down(&backends, 1);
        // Both servers of `a` down (while `b`'s is up): try them anyway.
        assert_eq!(backends.candidates(Some("a")).unwrap(), [0, 1]);
        backends.get(0).unwrap().answered();
        assert_eq!(backends.candidates(Some("a")).unwrap(), [0]);
    }

    #[tokio::test]
    async fn candidates_into_reuses_the_buffer() {
        let backends = fleet(2).await;
        serves(&backends, 0, &["a"]);
        serves(&backends, 1, &["b"]);
        let mut out = vec![7, 7, 7];
        backends.candidates_into(Some("b"), &mut out).unwrap();
        assert_eq!(out, [1]);
        assert!(backends.candidates_into(Some("z"), &mut out).is_err());
        assert!(out.is_empty());
        assert!(
            Backends::default()
                .candidates(Some("a"))
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn in_flight_guard_counts_exactly() {
        let backends = Backends::resolve(&["http://127.0.0.1:1".into()])
            .await
            .unwrap();
        let backend = backends.get(0).unwrap();
        let mut first = backend.start_request(100);
        let second = backend.start_request(20);
        assert_eq!((backend.in_flight(), backend.prefilling()), (2, 120));
        first.response_began();
        first.response_began();
        assert_eq!((backend.in_flight(), backend.prefilling()), (2, 20));
        drop(first);
        assert_eq!((backend.in_flight(), backend.prefilling()), (1, 20));
        drop(second);
        assert_eq!((backend.in_flight(), backend.prefilling()), (0, 0));
    }

    #[tokio::test]
    async fn only_one_request_takes_an_idle_backend() {
        let backends = Backends::resolve(&["http://127.0.0.1:1".into()])
            .await
            .unwrap();
        let backend = backends.get(0).unwrap();
        let first = backend.start_if_idle(100).expect("idle");
        assert_eq!((backend.in_flight(), backend.prefilling()), (1, 100));
        assert!(backend.start_if_idle(20).is_none());
        assert_eq!((backend.in_flight(), backend.prefilling()), (1, 100));
        drop(first);
        let again = backend.start_if_idle(20).expect("idle again");
        let queued = backend.start_request(30);
        assert_eq!((backend.in_flight(), backend.prefilling()), (2, 50));
        drop((again, queued));
        assert_eq!((backend.in_flight(), backend.prefilling()), (0, 0));
    }
}
