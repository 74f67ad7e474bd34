//! Idle backend connections, kept per backend for the next request.
//!
//! They are kept per worker thread, too: a socket is served by the event
//! loop of the worker that opened it, so only that worker's connections
//! may reuse it.
//!
//! A connection goes back to the pool only after a response that ended
//! cleanly by its framing, so the next request starts on a quiet stream.
//! Connections idle longer than the idle timeout are dropped (vLLM's server
//! closes idle connections after 5 s, so the default stays below that); one
//! idle for more than [`PROBE_AFTER`] is first checked for a FIN or stray
//! bytes. A request that still meets a connection the backend closed in the
//! meantime is sent again on a new one (see [`super`]): nothing of it had
//! been answered. Busy connections skip the probe, a syscall per request.
//!
//! Connections are keyed by [`BackendId`], not position, so the pool follows
//! the fleet as it changes: a retired backend's connections are closed when
//! they come back from their last request or at the next reaping.
use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use crate::{
    backend::{Backend, BackendId},
    dataplane::BackendConn,
    worker,
};

/// Idle time after which a pooled connection is probed before reuse.
pub(crate) const PROBE_AFTER: Duration = Duration::from_millis(500);

/// One worker's idle connections, by backend.
type Idle = HashMap<BackendId, Vec<BackendConn>>;

/// Idle connections per worker and backend.
#[derive(Debug)]
pub(crate) struct Pool {
    /// Worker `w`'s idle connections are at `w`; only `w` and the reaper
    /// take its lock.
    idle: Vec<Mutex<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool for `workers` worker threads, keeping at most `max_idle` idle
    /// connections to each backend (split evenly among the workers), for at
    /// most `idle_timeout`.
    pub(crate) fn new(workers: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        let workers = workers.max(1);
        Self {
            idle: (0..workers).map(|_| Mutex::new(HashMap::new())).collect(),
            max_idle: max_idle.div_ceil(workers),
            idle_timeout,
        }
    }

    /// This worker's idle connections.
    fn mine(&self) -> &Mutex<Idle> {
        let worker = worker::current().min(self.idle.len() - 1);
        &self.idle[worker]
    }

    /// This worker's most recently used idle connection to `backend` that
    /// still looks alive, if any.
    pub(crate) fn take(&self, backend: &Backend) -> Option<BackendConn> {
        let mut idle = self.mine().lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&backend.id)?;
        while let Some(conn) = list.pop() {
            let age = conn.idle_for();
            if age < self.idle_timeout && (age < PROBE_AFTER || conn.looks_alive()) {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request to `backend`, or closes it when the
    /// pool is full or the backend retired.
    pub(crate) fn put(&self, backend: &Backend, mut conn: BackendConn) {
        if backend.is_retired() {
            return;
        }
        conn.mark_idle();
        let mut idle = self.mine().lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(backend.id).or_default();
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// Closes connections idle past the timeout, and every connection to a
    /// backend not in `live` (retired).
    pub(crate) fn reap(&self, live: &[std::sync::Arc<Backend>]) {
        for idle in &self.idle {
            let expired: Vec<BackendConn> = {
                let mut idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
                let mut expired = Vec::new();
                idle.retain(|id, list| {
                    if !live.iter().any(|backend| backend.id == *id) {
                        expired.append(list);
                        return false;
                    }
                    let (keep, old) = std::mem::take(list)
                        .into_iter()
                        .partition(|conn| conn.idle_for() < self.idle_timeout);
                    *list = keep;
                    expired.extend::<Vec<BackendConn>>(old);
                    !list.is_empty()
                });
                expired
            };
            // Closed outside the lock.
            drop(expired);
        }
    }

    /// Idle connections held to `backend`, all workers'.
    #[cfg(test)]
    pub(crate) fn idle_count(&self, backend: &Backend) -> usize {
        self.idle
            .iter()
            .map(|idle| {
                let idle = idle.lock().unwrap_or_else(PoisonError::into_inner);
                idle.get(&backend.id).map_or(0, Vec::len)
            })
            .sum()
    }

    /// How often [`Pool::reap`] should run.
    pub(crate) fn reap_interval(&self) -> Duration {
        (self.idle_timeout / 2).max(Duration::from_millis(10))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::sync::Arc;

    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::{backend::Backends, dataplane::Dataplane};

    /// Two backends on unused ports (nothing connects to them).
    async fn two() -> Vec<Arc<Backend>> {
        let urls = [
            "http://127.0.0.1:1".to_owned(),
            "http://127.0.0.1:2".to_owned(),
        ];
        Backends::resolve(&urls).await.unwrap().all().to_vec()
    }

    #[tokio::test]
    async fn a_connection_is_reused_only_by_the_worker_that_opened_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = Dataplane::userspace().connect(addr).await.unwrap();
        let _accepted = listener.accept().await.unwrap();
        let backends = two().await;
        let pool = Pool::new(2, 8, Duration::from_secs(60));
        pool.put(&backends[1], conn);
        assert_eq!(
            (pool.idle_count(&backends[0]), pool.idle_count(&backends[1])),
            (0, 1)
        );
        std::thread::scope(|s| {
            s.spawn(|| {
                worker::enter(1);
                assert!(
                    pool.take(&backends[1]).is_none(),
                    "worker 1 took worker 0's socket"
                );
            });
        });
        assert!(pool.take(&backends[0]).is_none());
        assert!(pool.take(&backends[1]).is_some());
        assert_eq!(pool.idle_count(&backends[1]), 0);
    }

    #[tokio::test]
    async fn the_idle_limit_is_split_among_the_workers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backends = two().await;
        // 10 per backend over 4 workers: 3 each.
        let pool = Pool::new(4, 10, Duration::from_secs(60));
        let mut accepted = Vec::new();
        for _ in 0..4 {
            pool.put(
                &backends[0],
                Dataplane::userspace().connect(addr).await.unwrap(),
            );
            accepted.push(listener.accept().await.unwrap());
        }
        assert_eq!(pool.idle_count(&backends[0]), 3);
    }

    #[tokio::test]
    async fn a_departed_backends_connections_are_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fleet = crate::backend::Fleet::new(crate::metrics::BackendSeries::default());
        let endpoint = |port| crate::backend::Endpoint {
            name: format!("http://127.0.0.1:{port}"),
            authority: format!("127.0.0.1:{port}"),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            local: false,
        };
        fleet.apply(&[endpoint(1), endpoint(2)]);
        let backends = fleet.snapshot().all().to_vec();
        let pool = Pool::new(1, 8, Duration::from_secs(60));
        let mut accepted = Vec::new();
        for backend in &backends {
            pool.put(backend, Dataplane::userspace().connect(addr).await.unwrap());
            accepted.push(listener.accept().await.unwrap().0);
        }
        // Backend 0 leaves: the reaper closes its pooled connection, and one
        // coming back from a request is not kept.
        fleet.apply(&[endpoint(2)]);
        pool.reap(fleet.snapshot().all());
        assert_eq!(pool.idle_count(&backends[0]), 0);
        assert_eq!(pool.idle_count(&backends[1]), 1);
        pool.put(
            &backends[0],
            Dataplane::userspace().connect(addr).await.unwrap(),
        );
        accepted.push(listener.accept().await.unwrap().0);
        assert_eq!(pool.idle_count(&backends[0]), 0);
        // The backend side of the reaped connection sees it closed.
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(20), accepted[0].read(&mut byte))
            .await
            .expect("the reaped connection closes");
        assert_eq!(read.unwrap(), 0);
    }
}
