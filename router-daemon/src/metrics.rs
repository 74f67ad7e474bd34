//! Prometheus metrics served at `GET /metrics`.
//!
//! Request counters live here; the kernel program's counters are read from
//! its map at scrape time, so a scrape shows what the kernel really redirected.
//! Likewise each backend's health, engine queue and models are read from the
//! backend set at scrape time (`router_backend_*`).
use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::MetricType,
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::Histogram,
        info::Info,
    },
    registry::Registry,
};

use crate::{
    backend::{Backend, Fleet},
    dataplane::Dataplane,
    error::{Limit, Timeout},
    route::{Clients, Reason, Router},
};

/// A new metric of type `M`, registered as `name` with `help`; the caller
/// keeps a handle to it.
fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: Default + Clone + prometheus_client::registry::Metric,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// A counter family registered as `name` with `help`, and its counter for
/// each of `labels`, created up front so every label shows from the start.
fn labelled<L, const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    labels: [L; N],
) -> (Family<L, Counter>, [Counter; N])
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family: Family<L, Counter> = registered(registry, name, help);
    let counters = labels.map(|label| family.get_or_create(&label).clone());
    (family, counters)
}

/// Label set naming a backend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendLabel {
    /// The backend URL.
    pub(crate) backend: String,
}

/// Label set naming a backend and a model it serves.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackendModelLabel {
    /// The backend URL.
    pub(crate) backend: String,
    /// A model id from the backend's `/v1/models`.
    pub(crate) model: String,
}

/// Label set naming a routing reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// [`crate::route::Reason::as_str`].
    pub(crate) reason: &'static str,
}

/// Label set naming a limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LimitLabel {
    /// [`crate::error::Limit::as_str`].
    pub(crate) limit: &'static str,
}

/// Label set naming a backend timeout.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TimeoutLabel {
    /// [`crate::error::Timeout::as_str`].
    pub(crate) timeout: &'static str,
}

/// Label set naming an error status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StatusLabel {
    /// HTTP status sent to the client.
    pub(crate) status: u16,
}

/// One backend's request and connection counters, resolved once so the
/// request path does not build a label per request.
#[derive(Clone, Debug)]
pub(crate) struct BackendCounters {
    /// Requests forwarded to the backend.
    pub(crate) requests: Counter,
    /// Connections opened to the backend.
    pub(crate) connections: Counter,
    /// Time to the first response body byte (the first streamed token).
    pub(crate) ttft: Histogram,
    /// Gaps between later reads of response body bytes (streamed tokens).
    pub(crate) itl: Histogram,
}

/// The daemon's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// The per-backend series, each backend's taken as it joins the fleet.
    pub(crate) backend_series: BackendSeries,
    /// The routing decisions' counters (`router_route_decisions`), in [`Reason::ALL`]'s order, looked up
    /// once instead of per request.
    decision_counters: [Counter; Reason::ALL.len()],
    /// `router_limit_exceeded_total`'s counters, in [`Limit::ALL`] order.
    limit_counters: [Counter; Limit::ALL.len()],
    /// `router_backend_timeouts_total`'s counters, in [`Timeout::ALL`] order.
    timeout_counters: [Counter; Timeout::ALL.len()],
    /// Client connections open now (`router_client_connections`).
    pub(crate) client_connections: Gauge,
    /// Requests answered with an error by the router, per status.
    pub(crate) errors: Family<StatusLabel, Counter>,
    /// Response bytes copied through userspace.
    pub(crate) copied_bytes: Counter,
    /// Response bytes moved through a pipe with splice(2).
    pub(crate) piped_bytes: Counter,
    /// Responses cut short by a backend failure.
    pub(crate) backend_failures: Counter,
    /// Requests sent to another backend after one refused or timed out
    /// the connection (`router_retries_total{reason="connect"}`).
    pub(crate) connect_retries: Counter,
    /// Requests sent to another backend after one answered 503
    /// (`router_retries_total{reason="unavailable"}`).
    pub(crate) unavailable_retries: Counter,
    /// Response head bytes written by the daemon.
    pub(crate) head_bytes: Counter,
    /// Time from a request written to its response's first byte.
    pub(crate) first_byte: Histogram,
}

/// The series labelled by backend: each backend's [`BackendCounters`] come
/// from here when it joins the fleet, and its series leave with it.
#[derive(Clone, Debug)]
pub(crate) struct BackendSeries {
    /// Requests forwarded, per backend.
    requests: Family<BackendLabel, Counter>,
    /// Backend connections opened, per backend (the rest were reused).
    connections: Family<BackendLabel, Counter>,
    /// Per backend: time from a request written to its response body's
    /// first byte.
    ttft: Family<BackendLabel, Histogram>,
    /// Per backend: gaps between reads of response body bytes.
    itl: Family<BackendLabel, Histogram>,
}

impl Default for BackendSeries {
    /// Empty series, in no registry until [`Metrics::new`] registers them.
    fn default() -> Self {
        Self {
            requests: Family::default(),
            connections: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram as fn() -> Histogram),
            itl: Family::new_with_constructor(itl_histogram as fn() -> Histogram),
        }
    }
}

impl BackendSeries {
    /// The counters of the backend named `name`, created if new.
    pub(crate) fn counters(&self, name: &str) -> BackendCounters {
        let label = BackendLabel {
            backend: name.to_owned(),
        };
        BackendCounters {
            requests: self.requests.get_or_create(&label).clone(),
            connections: self.connections.get_or_create(&label).clone(),
            ttft: self.ttft.get_or_create(&label).clone(),
            itl: self.itl.get_or_create(&label).clone(),
        }
    }

    /// Drops the series of the backend named `name`, gone from the fleet.
    pub(crate) fn remove(&self, name: &str) {
        let label = BackendLabel {
            backend: name.to_owned(),
        };
        self.requests.remove(&label);
        self.connections.remove(&label);
        self.ttft.remove(&label);
        self.itl.remove(&label);
    }

    /// The series' exposition text, for tests.
    #[cfg(test)]
    pub(crate) fn encode_for_test(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("invariant: writing to a String cannot fail");
        text
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "router_requests",
            "Requests forwarded, by backend",
            self.requests.clone(),
        );
        registry.register(
            "router_backend_connections_opened",
            "Backend connections opened, by backend; other requests reused a pooled one",
            self.connections.clone(),
        );
        registry.register(
            "router_backend_time_to_first_token_seconds",
            "Time from a request written to the backend to the first byte of its response body \
             (a stream's first token), as the router sees it, by backend",
            self.ttft.clone(),
        );
        registry.register(
            "router_backend_inter_token_seconds",
            "Gaps between reads of a response body's later bytes (streamed tokens), as the \
             router sees them, by backend; none on the sockmap dataplane's redirected bytes",
            self.itl.clone(),
        );
    }
}

/// Buckets of `router_backend_time_to_first_token_seconds`: 1 ms to 33 s.
fn ttft_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 16,
    ))
}

/// Buckets of `router_backend_inter_token_seconds`: 0.25 ms to 8 s.
fn itl_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00025, 2.0, 16,
    ))
}

impl Metrics {
    /// Registers every metric; `dataplane` supplies the mode and kernel counters.
    pub(crate) fn new(dataplane: Arc<Dataplane>) -> Self {
        let mut registry = Registry::default();
        let info = Info::new(vec![("mode", dataplane.mode().as_str())]);
        registry.register("router_dataplane", "The dataplane in use", info);
        registry.register_collector(Box::new(KernelCounters(dataplane)));
        let backend_series = BackendSeries::default();
        backend_series.register(&mut registry);
        let r = &mut registry;
        let reasons = Reason::ALL.map(|reason| ReasonLabel {
            reason: reason.as_str(),
        });
        let (_, decision_counters) = labelled(
            r,
            "router_route_decisions",
            "Routing decisions, by reason",
            reasons,
        );
        let (_, [connect_retries, unavailable_retries]) = labelled(
            r,
            "router_retries",
            "Requests sent to another backend after one took nothing of them (--retries), by \
             reason: connect (refused or timed out) or unavailable (a 503 before any byte reached \
             the client)",
            ["connect", "unavailable"].map(|reason| ReasonLabel { reason }),
        );
        let (_, limit_counters) = labelled(
            r,
            "router_limit_exceeded",
            "Requests refused and connections closed for passing a limit, by limit",
            Limit::ALL.map(|limit| LimitLabel {
                limit: limit.as_str(),
            }),
        );
        let (_, timeout_counters) = labelled(
            r,
            "router_backend_timeouts",
            "Waits for a backend cut short by a timeout, by timeout: connect (the next backend \
             is tried), first_byte (504) and response_idle (504, or the client connection closes)",
            Timeout::ALL.map(|timeout| TimeoutLabel {
                timeout: timeout.as_str(),
            }),
        );
        let first_byte = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        r.register(
            "router_backend_first_byte_seconds",
            "Time from a request written to the backend to its response's first byte",
            first_byte.clone(),
        );
        Self {
            decision_counters,
            limit_counters,
            timeout_counters,
            client_connections: registered(
                r,
                "router_client_connections",
                "Client connections open (see --max-connections)",
            ),
            errors: registered(
                r,
                "router_errors",
                "Requests the router answered with an error, by status",
            ),
            copied_bytes: registered(
                r,
                "router_userspace_copied_bytes",
                "Response bytes copied through the daemon",
            ),
            piped_bytes: registered(
                r,
                "router_splice_piped_bytes",
                "Response bytes moved through a pipe with splice(2)",
            ),
            backend_failures: registered(
                r,
                "router_backend_failures",
                "Responses cut short by a backend failure",
            ),
            connect_retries,
            unavailable_retries,
            head_bytes: registered(
                r,
                "router_response_head_bytes",
                "Response head bytes written by the daemon (every dataplane)",
            ),
            first_byte,
            backend_series,
            registry,
        }
    }

    /// Counts a request refused, or a connection closed, for passing
    /// `limit`.
    pub(crate) fn limit_exceeded(&self, limit: Limit) {
        if let Some(at) = Limit::ALL.iter().position(|&l| l == limit) {
            self.limit_counters[at].inc();
        }
    }

    /// The counter of `timeout` passing.
    pub(crate) fn timeout_counter(&self, timeout: Timeout) -> &Counter {
        let at = Timeout::ALL
            .iter()
            .position(|&t| t == timeout)
            .expect("invariant: Timeout::ALL lists every timeout");
        &self.timeout_counters[at]
    }

    /// Counts a routing decision made for `reason`.
    pub(crate) fn decided(&self, reason: Reason) {
        // Reason::ALL lists every reason (a test in `route` checks it).
        if let Some(at) = Reason::ALL.iter().position(|&r| r == reason) {
            self.decision_counters[at].inc();
        }
    }

    /// Adds `router_prefix_index_entries`, read from `router` at scrape time.
    pub(crate) fn register_index(&mut self, router: Arc<Router>) {
        self.registry
            .register_collector(Box::new(IndexEntries(router)));
    }

    /// Adds the per-backend gauges (`router_backend_in_flight`, `_up`,
    /// `_waiting`, `_running`, `_kv_cache_tokens`, `_key_bytes_per_token`,
    /// `_models`, ...), read from the fleet's backends at scrape time.
    pub(crate) fn register_backends(&mut self, fleet: Arc<Fleet>) {
        self.registry
            .register_collector(Box::new(BackendGauges(fleet)));
    }

    /// The OpenMetrics text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("invariant: writing to a String cannot fail");
        text
    }
}

/// The prefix index's entry count, read at scrape time.
#[derive(Debug)]
struct IndexEntries(Arc<Router>);

impl Collector for IndexEntries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = ConstGauge::new(i64::try_from(self.0.index_len()).unwrap_or(i64::MAX));
        let metric = encoder.encode_descriptor(
            "router_prefix_index_entries",
            "Entries held by the prefix index (bounded by --index-entries)",
            None,
            MetricType::Gauge,
        )?;
        gauge.encode(metric)
    }
}

/// Each backend's discovery state, read at scrape time.
#[derive(Debug)]
struct BackendGauges(Arc<Fleet>);

impl Collector for BackendGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        type Reading = fn(&Backend) -> i64;
        let per_backend: [(&str, &str, Reading); 6] = [
            (
                "router_backend_in_flight",
                "Requests forwarded to the backend whose response has not ended (exact)",
                |backend| i64::try_from(backend.in_flight()).unwrap_or(i64::MAX),
            ),
            (
                "router_backend_up",
                "Whether the backend answers discovery (1) or is marked down (0)",
                |backend| i64::from(backend.is_up()),
            ),
            (
                "router_backend_ejected",
                "Whether passive health has ejected the backend (1): its requests kept failing \
                 (--eject-after-failures)",
                |backend| i64::from(backend.is_ejected()),
            ),
            (
                "router_backend_waiting",
                "Requests waiting in the backend's engine at the last scrape",
                |backend| i64::try_from(backend.waiting()).unwrap_or(i64::MAX),
            ),
            (
                "router_backend_running",
                "Requests running in the backend's engine at the last scrape",
                |backend| i64::try_from(backend.running()).unwrap_or(i64::MAX),
            ),
            (
                "router_backend_kv_cache_tokens",
                "Tokens the backend's KV cache holds (its vllm:cache_config_info at the last \
                 scrape), 0 when unknown. A new prompt family is placed where it fits beside the \
                 families in use there (--bytes-per-token)",
                |backend| i64::try_from(backend.cache_tokens()).unwrap_or(i64::MAX),
            ),
        ];
        let backends = self.0.snapshot();
        for (name, help, value) in per_backend {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for backend in backends.all() {
                let label = BackendLabel {
                    backend: backend.name.clone(),
                };
                ConstGauge::new(value(backend)).encode(family.encode_family(&label)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "router_backend_key_bytes_per_token",
            "Prompt key bytes per token the backend's engine counted for this router's requests \
             (its vllm:prompt_tokens_total while only this router sent there), 0 until learned \
             and where peers are known; \
             sizes prompt families against router_backend_kv_cache_tokens",
            None,
            MetricType::Gauge,
        )?;
        for backend in backends.all() {
            let label = BackendLabel {
                backend: backend.name.clone(),
            };
            ConstGauge::new(backend.bytes_per_token()).encode(family.encode_family(&label)?)?;
        }
        let peers = self.0.peers().get();
        let mut family = encoder.encode_descriptor(
            "router_backend_shared",
            "Whether the backend also serves requests this router did not send: 1 (another \
             router's, as a scrape in the last minute showed or router_peers says), 0 (only this \
             router's), -1 (not known yet). New prompts spread by this router's view of load only \
             while none is 1 and some is 0 (--placement-patience-when)",
            None,
            MetricType::Gauge,
        )?;
        let now = crate::backend::health::clock();
        for backend in backends.all() {
            let label = BackendLabel {
                backend: backend.name.clone(),
            };
            let shared: i64 = match backend.clients(now).given_peers(peers) {
                Clients::Unknown => -1,
                Clients::Ours => 0,
                Clients::Others => 1,
            };
            ConstGauge::new(shared).encode(family.encode_family(&label)?)?;
        }
        let known = peers.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
        ConstGauge::new(known).encode(encoder.encode_descriptor(
            "router_peers",
            "Other routers known to send requests to these backends (--peers, or the ready pods \
             --peer-selector picks), -1 while unknown. With 0, a cold start's first prompts \
             spread by this router's view of load; with more, they go where every replica \
             places them",
            None,
            MetricType::Gauge,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "router_backend_models",
            "Models each backend listed at its last good /v1/models answer (always 1)",
            None,
            MetricType::Gauge,
        )?;
        for backend in backends.all() {
            for model in backend.models().iter().flat_map(|models| models.iter()) {
                let label = BackendModelLabel {
                    backend: backend.name.clone(),
                    model: model.clone(),
                };
                ConstGauge::new(1i64).encode(family.encode_family(&label)?)?;
            }
        }
        Ok(())
    }
}

/// The sockmap program's counters, read from its map at scrape time.
#[derive(Debug)]
struct KernelCounters(Arc<Dataplane>);

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some((clients, backends)) = self.0.sockets_in_maps() {
            for (name, help, count) in [
                (
                    "router_sockmap_client_sockets",
                    "Client sockets registered as redirect targets",
                    clients,
                ),
                (
                    "router_sockmap_backend_sockets",
                    "Backend sockets handed to the verdict program",
                    backends,
                ),
            ] {
                let gauge = ConstGauge::new(count as i64);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        if let Some(entries) = self.0.backend_entries() {
            let gauge = ConstGauge::new(entries as i64);
            let metric = encoder.encode_descriptor(
                "router_sockmap_backend_entries",
                "Backend connections with kernel map entries (pooled or busy)",
                None,
                gauge.metric_type(),
            )?;
            gauge.encode(metric)?;
        }
        for (stat, value) in self.0.kernel_stats().unwrap_or_default() {
            let counter = ConstCounter::new(value);
            let name = format!("router_sockmap_{}", stat.name());
            let metric = encoder.encode_descriptor(
                &name,
                "Counter of the in-kernel sockmap program",
                None,
                counter.metric_type(),
            )?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
