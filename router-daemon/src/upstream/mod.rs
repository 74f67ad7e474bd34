//! Getting a routed request to a backend: a pooled connection or a new one,
//! in the fallback order routing gave, and sending it again when a pooled
//! connection turns out to have been closed by the backend.
//!
//! # Retries
//! A request moves to the next backend in the order only while no byte of
//! it has left the router (connecting failed or timed out), or when the
//! backend answered 503 before any byte reached the client (`conn`), and
//! only to `--retries` more backends. Every attempt's outcome goes to the
//! backend's passive health (`backend::health`). Once it was
//! written, it is sent again only when it went out on a *reused*
//! connection and the backend answered nothing at all: a keep-alive
//! connection the backend closed while it sat in the pool, which never
//! reached the engine. A fresh connection that fails the same way is not
//! retried, since the engine may have started on the request.
//!
//! Connections go back to the [`Pool`] only after a response that ended
//! cleanly by its framing.
mod pool;

use std::{io, sync::Arc, time::Duration};

use prometheus_client::metrics::counter::Counter;
use tracing::{debug, warn};

pub(crate) use self::pool::Pool;
use crate::{
    backend::{Backend, Backends, Outcome},
    dataplane::{BackendConn, Client, Dataplane, Exchanged, Forward, RelayError, Watch},
    error::{ApiError, Fault},
};

/// Connections to the backends: the idle pool, and how to open new ones.
#[derive(Debug)]
pub(crate) struct Upstream {
    pool: Pool,
    dataplane: Arc<Dataplane>,
    connect_timeout: Duration,
    /// Counts connects that passed `connect_timeout`.
    connect_timeouts: Counter,
}

/// The backend a request is going to, and the connection it goes out on.
#[derive(Debug)]
pub(crate) struct Leg {
    /// The backend's index in the snapshot the request was routed on.
    pub(crate) index: usize,
    /// The backend, held until the request ends even if it leaves the
    /// fleet meanwhile.
    pub(crate) backend: Arc<Backend>,
    conn: BackendConn,
    /// The connection came from the pool (it may have gone stale there).
    reused: bool,
}

/// Why no backend connection could be had; nothing was sent anywhere, so
/// the request may be retried as a whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The fallback order was empty.
    #[error("no backend is available: the fleet is empty")]
    NoBackends,
    /// Every backend in the order failed to connect.
    #[error("no backend could be reached (last: {last})")]
    Unreachable {
        /// The last backend's failure.
        last: ConnectError,
    },
}

impl UpstreamError {
    /// Whose fault it is: the backends'.
    pub(crate) fn fault(&self) -> Fault {
        Fault::Backend
    }

    /// Whether the client may send the request again: yes, no byte of it
    /// left the router.
    pub(crate) fn retry_safe(&self) -> bool {
        true
    }
}

impl From<UpstreamError> for ApiError {
    fn from(err: UpstreamError) -> Self {
        match err {
            UpstreamError::NoBackends => ApiError::unavailable(err),
            UpstreamError::Unreachable { .. } => ApiError::bad_gateway(err),
        }
    }
}

/// Why connecting to one backend failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The connection was refused, reset or could not be set up.
    #[error("{backend}: {source}")]
    Failed {
        /// The backend's name ([`Backend::name`](crate::backend::Backend::name)).
        backend: String,
        /// What the socket layer said.
        source: io::Error,
    },
    /// No connection within the connect timeout.
    #[error("{backend}: connect timed out")]
    TimedOut {
        /// The backend's name.
        backend: String,
    },
}

/// Why a request sent to a backend got no complete response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The exchange failed (see [`RelayError`] for what reached the client).
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A pooled connection was stale and a new one could not be opened to
    /// the same backend; nothing reached the client.
    #[error("reconnecting after a stale pooled connection: {0}")]
    Reconnect(#[from] ConnectError),
}

impl Upstream {
    /// Connections through `dataplane`, opened within `connect_timeout`
    /// (each one past it counted in `connect_timeouts`) and kept idle in
    /// `pool`.
    pub(crate) fn new(
        pool: Pool,
        dataplane: Arc<Dataplane>,
        connect_timeout: Duration,
        connect_timeouts: Counter,
    ) -> Self {
        Self {
            pool,
            dataplane,
            connect_timeout,
            connect_timeouts,
        }
    }

    /// The idle connections (for their upkeep).
    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A connection to the first backend of `order` (positions in
    /// `backends`) that has an idle one or accepts a new one, trying them in
    /// turn; each new connection is counted on its backend.
    pub(crate) async fn acquire(
        &self,
        order: &[usize],
        backends: &Backends,
    ) -> Result<Leg, UpstreamError> {
        let mut last = None;
        for &index in order {
            let Some(backend) = backends.get(index) else {
                continue;
            };
            if let Some(conn) = self.pool.take(backend) {
                return Ok(Leg {
                    index,
                    backend: Arc::clone(backend),
                    conn,
                    reused: true,
                });
            }
            match self.open(backend).await {
                Ok(conn) => {
                    backend.counters.connections.inc();
                    return Ok(Leg {
                        index,
                        backend: Arc::clone(backend),
                        conn,
                        reused: false,
                    });
                }
                Err(err) => {
                    warn!(backend = %backend.name, error = %err, "backend connect failed; trying the next");
                    backend.record(Outcome::Failure);
                    last = Some(err);
                }
            }
        }
        Err(match last {
            Some(last) => UpstreamError::Unreachable { last },
            None => UpstreamError::NoBackends,
        })
    }

    /// Sends `forward` on `leg` and relays the response to `client`; sends
    /// it again on another connection to the same backend when a pooled one
    /// was stale (see the module doc). `watch` is called for each attempt.
    /// A connection whose response ended cleanly goes back to the pool.
    pub(crate) async fn exchange<W: Watch>(
        &self,
        client: &mut Client,
        mut leg: Leg,
        forward: &Forward<'_>,
        mut watch: impl FnMut() -> W,
    ) -> Result<Exchanged, SendError> {
        loop {
            let result = self
                .dataplane
                .exchange(client, &mut leg.conn, forward, watch())
                .await;
            match result {
                Err(err) if leg.reused && err.unanswered() => {
                    debug!(%err, "a pooled backend connection was stale; sending again");
                    (leg.conn, leg.reused) = match self.pool.take(&leg.backend) {
                        Some(pooled) => (pooled, true),
                        None => {
                            let fresh = self.open(&leg.backend).await?;
                            leg.backend.counters.connections.inc();
                            (fresh, false)
                        }
                    };
                }
                Ok(exchanged) => {
                    if exchanged.backend_reusable {
                        self.pool.put(&leg.backend, leg.conn);
                    }
                    return Ok(exchanged);
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Opens a new connection to `backend` within the connect timeout.
    async fn open(&self, backend: &Backend) -> Result<BackendConn, ConnectError> {
        match tokio::time::timeout(self.connect_timeout, self.dataplane.connect(backend.addr)).await
        {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(source)) => Err(ConnectError::Failed {
                backend: backend.name.clone(),
                source,
            }),
            Err(_) => {
                self.connect_timeouts.inc();
                Err(ConnectError::TimedOut {
                    backend: backend.name.clone(),
                })
            }
        }
    }
}
