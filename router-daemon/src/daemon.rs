//! The daemon's life: its shared state, starting it ([`run`]), and the
//! upkeep tasks that run beside the connections (following the backend
//! endpoints, pool reaping, forgetting backends that went down).
use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use tokio::net::TcpListener;

use crate::{
    admission::Admission,
    backend::{
        self, BackendId, DiscoveryTask, Endpoint, Fleet, StaticSource, kubernetes::PodWatch,
    },
    config::{Config, Source},
    dataplane::{Dataplane, listen},
    drain::{self, Drain},
    error::Timeout,
    fd_limit,
    metrics::Metrics,
    route::Router,
    upstream::{Pool, Upstream},
    worker,
};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A backend URL is unusable.
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    /// Accepting connections failed.
    #[error("accepting connections: {0}")]
    Accept(std::io::Error),
    /// A worker thread could not be started.
    #[error("starting a worker thread: {0}")]
    Worker(std::io::Error),
    /// The admin listener (`--admin-listen`) could not be bound.
    #[error("binding the admin listener: {0}")]
    Admin(std::io::Error),
    /// `--discovery static` with no `--backend`.
    #[error("no backend given: pass --backend URL, or --discovery k8s")]
    NoBackends,
    /// `--discovery k8s` cannot reach the API server's configuration.
    #[error(transparent)]
    Kube(#[from] backend::kubernetes::KubeError),
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The daemon's configuration.
    pub(crate) config: Config,
    /// The backend set as it changes, and what discovery learns of it.
    pub(crate) backends: Arc<Fleet>,
    /// The prefix index and the policy.
    pub(crate) router: Arc<Router>,
    /// How response bodies move.
    pub(crate) dataplane: Arc<Dataplane>,
    /// Backend connections: the pool, connecting, resending.
    pub(crate) upstream: Upstream,
    /// Prometheus metrics.
    pub(crate) metrics: Metrics,
    /// The next request id the router numbers.
    pub(crate) next_id: AtomicU64,
    /// Open client connections, against `--max-connections`.
    pub(crate) admission: Admission,
    /// Where the daemon is in its drain after a shutdown signal.
    pub(crate) drain: Drain,
}

/// Serves clients on `listener` until `shutdown` completes, then drains
/// (see `drain`): returns once the connections have ended, or at the drain
/// timeout. Runs [`Config::workers`] event loops: this task's runtime is the
/// first, and the others run on threads of their own (see `worker`).
pub async fn run(
    listener: TcpListener,
    config: Config,
    dataplane: Dataplane,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // Accepted sockets inherit it; `listener` may come from elsewhere.
    listen::accept_nodelay(&listener).map_err(RunError::Accept)?;
    let source = endpoints(&config).await?;
    let shared = shared(config, dataplane);
    // Followed while `run` serves: the set's tasks (and the discovery
    // pollers they own) stop when it drops.
    let _upkeep = start_upkeep(&shared, source).await;
    // The other workers stop accepting when the drain closes the listeners,
    // and stop altogether when `_stop` is dropped, as `run` returns.
    let (_stop, stopped) = tokio::sync::watch::channel(());
    let started = start_workers(&listener, &shared, &stopped)?;
    tracing::info!(
        workers = started,
        "serving, one event loop per worker thread"
    );
    if let Some(addr) = shared.config.admin_listen {
        let admin = listen::bind(addr, false).map_err(RunError::Admin)?;
        tracing::info!(admin = %admin.local_addr().unwrap_or(addr), "serving /metrics, /health and /ready there only");
        let mut stop = stopped.clone();
        tokio::spawn(worker::serve_admin(
            admin,
            Arc::clone(&shared),
            async move {
                let _ = stop.changed().await;
            },
        ));
    }
    let mut open = tokio::task::JoinSet::new();
    let draining = shared.drain.on(shutdown, shared.config.drain());
    let serving = worker::serve(&listener, &shared, std::future::pending(), &mut open);
    let deadline = tokio::select! {
        // Serving ends by itself only when accepting failed.
        served = serving => return served,
        // The listeners are to close: this worker's stops accepting as
        // `serving` is dropped, and closes here.
        deadline = draining => deadline,
    };
    drop(listener);
    let left = drain::settle(|| shared.admission.open(), deadline).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "drain timeout (--drain-timeout-ms): closing the connections still open"
        );
    } else {
        tracing::info!("drained: every connection has ended");
    }
    open.abort_all();
    Ok(())
}

/// Where `config` says the backends come from: the static list, or the
/// pods the API server lists.
async fn endpoints(config: &Config) -> Result<Endpoints, RunError> {
    Ok(match config.discovery {
        Source::Static if config.backends.is_empty() => return Err(RunError::NoBackends),
        Source::Static => Endpoints::Static(StaticSource::new(
            &config.backends,
            config.hosts_file.clone(),
        )?),
        Source::K8s => {
            let selector = config.pod_selector();
            tracing::info!(namespace = %selector.namespace, selector = %selector.labels, "watching pods for backends");
            Endpoints::Pods(PodWatch::start(selector).await?)
        }
    })
}

/// The daemon's shared state, with no backend known yet.
fn shared(config: Config, dataplane: Dataplane) -> Arc<Shared> {
    let workers = config.workers();
    let dataplane = Arc::new(
        dataplane
            .with_pipelined_limit(config.max_pipelined_bytes)
            .with_response_timeouts(config.response_timeouts()),
    );
    let mut metrics = Metrics::new(Arc::clone(&dataplane));
    let backends = Arc::new(
        Fleet::new(metrics.backend_series.clone())
            .with_ejection(config.ejection())
            .with_peers(config.peers()),
    );
    metrics.register_backends(Arc::clone(&backends));
    let router = Arc::new(Router::with_policy(
        usize::from(config.block_bytes),
        config.index_entries,
        config.policy(),
    ));
    metrics.register_index(Arc::clone(&router));
    let open_files = fd_limit::current().map_or(1024, |limit| limit.soft);
    let admission = Admission::new(
        metrics.client_connections.clone(),
        config.max_connections(open_files),
    );
    tracing::info!(
        max_connections = admission.max(),
        open_files,
        "client connections past the limit are answered 503"
    );
    Arc::new(Shared {
        router,
        upstream: Upstream::new(
            Pool::new(workers, config.pool_max_idle, config.pool_idle_timeout()),
            Arc::clone(&dataplane),
            config.connect_timeout(),
            metrics.timeout_counter(Timeout::Connect).clone(),
        ),
        metrics,
        backends,
        dataplane,
        config,
        next_id: AtomicU64::new(1),
        admission,
        drain: Drain::new(workers),
    })
}

/// Learns the backend set once before serving, then starts following it,
/// and the pool's and the fleet's upkeep beside it. The set's tasks stop
/// when the returned set drops.
async fn start_upkeep(shared: &Arc<Shared>, source: Endpoints) -> tokio::task::JoinSet<()> {
    let mut discovery = DiscoveryTask::default();
    let mut upkeep = tokio::task::JoinSet::new();
    match source {
        Endpoints::Static(mut source) => {
            if follow(shared, &mut source, &mut discovery).await {
                tracing::warn!("no backend address is known yet; requests are answered 503");
            }
            upkeep.spawn(follow_endpoints(
                Arc::downgrade(shared),
                source,
                discovery,
                Duration::from_millis(shared.config.resolve_interval_ms),
            ));
        }
        Endpoints::Pods(mut pods) => {
            match tokio::time::timeout(FIRST_LIST, pods.next()).await {
                Ok(endpoints) => {
                    if apply(shared, &endpoints, &mut discovery) {
                        tracing::warn!("no pod is ready yet; requests are answered 503");
                    }
                }
                Err(_) => tracing::warn!(
                    "the API server did not list the pods within {} s; requests are answered 503 until it does",
                    FIRST_LIST.as_secs()
                ),
            }
            upkeep.spawn(follow_pods(Arc::downgrade(shared), pods, discovery));
        }
    }
    if let Some((selector, own)) = shared.config.peer_selector() {
        tracing::info!(namespace = %selector.namespace, selector = %selector.labels, pod = %own, "watching pods for this router's peers");
        match PodWatch::start(selector).await {
            Ok(watch) => {
                upkeep.spawn(follow_peers(Arc::downgrade(shared), watch, own));
            }
            Err(err) => tracing::warn!(
                %err,
                "cannot watch for peer routers (--peer-selector); who else sends to the backends is left to their scrapes"
            ),
        }
    } else if let Some(peers) = shared.config.peers() {
        tracing::info!(peers, "other routers sending to these backends (--peers)");
    }
    tokio::spawn(reap_idle(Arc::downgrade(shared)));
    let discovery_interval = shared.config.discovery().interval;
    if !discovery_interval.is_zero() {
        tokio::spawn(forget_down_backends(
            Arc::downgrade(shared),
            discovery_interval,
        ));
    }
    upkeep
}

/// Starts the worker threads beside this one, each on its own socket
/// sharing `listener`'s port; returns how many workers serve, this one
/// included.
fn start_workers(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    stopped: &tokio::sync::watch::Receiver<()>,
) -> Result<usize, RunError> {
    let mut started = 1;
    match listen::share_port(listener, shared.config.workers() - 1) {
        Ok(sockets) => {
            for socket in sockets {
                worker::spawn(started, socket, Arc::clone(shared), stopped.clone())
                    .map_err(RunError::Worker)?;
                started += 1;
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot share the listening port; serving on one worker thread");
        }
    }
    Ok(started)
}

/// Where the backend set comes from.
enum Endpoints {
    Static(StaticSource),
    Pods(PodWatch),
}

/// How long the first pod list may take before the daemon serves anyway.
const FIRST_LIST: Duration = Duration::from_secs(10);

/// Applies each change of the watched pods (see [`apply`]), for as long as
/// the daemon's state lives; owns the discovery pollers.
async fn follow_pods(
    shared: std::sync::Weak<Shared>,
    mut pods: PodWatch,
    mut discovery: DiscoveryTask,
) {
    loop {
        let endpoints = pods.next().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let had_backends = !shared.backends.snapshot().all().is_empty();
        if apply(&shared, &endpoints, &mut discovery) && had_backends {
            tracing::warn!("no pod is ready any more; requests are answered 503");
        }
    }
}

/// Counts the ready pods of the router's replicas other than its own
/// (`own`) as its peers at each change, for as long as the daemon's state
/// lives.
async fn follow_peers(shared: std::sync::Weak<Shared>, mut pods: PodWatch, own: String) {
    let mut known = None;
    loop {
        let ready = pods.next_ready().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let peers = ready.iter().filter(|name| **name != own).count();
        if known != Some(peers) {
            tracing::info!(
                peers,
                "other routers sending to these backends (ready pods of --peer-selector)"
            );
            known = Some(peers);
        }
        shared.backends.peers().set(peers);
    }
}

/// Resolves the endpoints again every `interval` (never when zero) and
/// applies them (see [`follow`]), for as long as the daemon's state lives;
/// owns the discovery pollers.
async fn follow_endpoints(
    shared: std::sync::Weak<Shared>,
    mut source: StaticSource,
    mut discovery: DiscoveryTask,
    interval: Duration,
) {
    if interval.is_zero() {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let had_backends = !shared.backends.snapshot().all().is_empty();
        if follow(&shared, &mut source, &mut discovery).await && had_backends {
            tracing::warn!("every backend address is gone; requests are answered 503");
        }
    }
}

/// Resolves `source` once and makes the result the fleet (see [`apply`]).
/// Returns whether the fleet is empty.
async fn follow(shared: &Shared, source: &mut StaticSource, discovery: &mut DiscoveryTask) -> bool {
    let (endpoints, failures) = source.resolve().await;
    for failure in failures {
        tracing::warn!(error = %failure, "resolving a backend failed; its last addresses stand");
    }
    apply(shared, &endpoints, discovery)
}

/// Makes `endpoints` the fleet: new backends are polled by `discovery`;
/// departed ones lose their prefix index entries (their connections close
/// as the pool meets them). Returns whether the fleet is empty.
fn apply(shared: &Shared, endpoints: &[Endpoint], discovery: &mut DiscoveryTask) -> bool {
    let change = shared.backends.apply(endpoints);
    for backend in &change.added {
        tracing::info!(backend = %backend.name, addr = %backend.addr, "backend added");
        discovery.watch(backend, shared.config.discovery());
    }
    for backend in &change.removed {
        shared.router.remove_backend(&backend.name);
        tracing::info!(
            backend = %backend.name,
            in_flight = backend.in_flight(),
            "backend removed; its requests in flight finish there"
        );
    }
    endpoints.is_empty()
}

/// Closes pooled backend connections idle past their timeout, and those of
/// departed backends, for as long as the daemon's state lives.
async fn reap_idle(shared: std::sync::Weak<Shared>) {
    let Some(interval) = shared
        .upgrade()
        .map(|shared| shared.upstream.pool().reap_interval())
    else {
        return;
    };
    loop {
        tokio::time::sleep(interval).await;
        match shared.upgrade() {
            Some(shared) => shared
                .upstream
                .pool()
                .reap(shared.backends.snapshot().all()),
            None => return,
        }
    }
}

/// Drops what the prefix index holds for a backend when discovery marks it
/// down: its cache is likely gone (a restart), and the index's bounded
/// memory is better spent on live backends. Checks once per discovery
/// interval, for as long as the daemon's state lives.
async fn forget_down_backends(shared: std::sync::Weak<Shared>, interval: Duration) {
    // Compares down counts rather than sampling `is_up`: a backend that came
    // up and went down again between two ticks still has its entries dropped.
    let mut seen: HashMap<BackendId, u32> = HashMap::new();
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let backends = shared.backends.snapshot();
        seen.retain(|id, _| backends.all().iter().any(|backend| backend.id == *id));
        for backend in backends.all() {
            let downs = backend.downs();
            let seen = seen.entry(backend.id).or_default();
            if downs != *seen {
                *seen = downs;
                shared.router.remove_backend(&backend.name);
                tracing::info!(backend = %backend.name, "backend down; its prefix index entries are dropped");
            }
        }
    }
}

/// Whether an accept error passes rather than ending the listener: out of
/// descriptors or buffers, an aborted handshake, or a network error that
/// Linux's accept(2) passes on from the pending connection (its man page
/// lists them and says to retry as after EAGAIN). One such connection
/// must not stop a worker, and on worker 0 the daemon.
pub(crate) fn is_transient(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::ENETDOWN
                | libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    ) || err.kind() == std::io::ErrorKind::ConnectionAborted
}

#[cfg(test)]
mod tests {
    use std::io::Error;

    use super::is_transient;

    #[test]
    fn a_connection_s_network_error_does_not_end_the_listener() {
        for errno in [
            libc::EMFILE,
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EHOSTUNREACH,
        ] {
            assert!(
                is_transient(&Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
        // The listener itself is broken: retrying cannot help.
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(
                !is_transient(&Error::from_raw_os_error(errno)),
                "errno {errno}"
            );
        }
    }
}
