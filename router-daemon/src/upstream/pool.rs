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
use std::{
    sync::{Mutex, PoisonError},
    time::Duration,
};

use crate::{dataplane::BackendConn, worker};

/// Idle time after which a pooled connection is probed before reuse.
pub const PROBE_AFTER: Duration = Duration::from_millis(500);

/// Idle connections per worker and backend.
#[derive(Debug)]
pub struct Pool {
    /// Worker `w`'s idle connections to backend `b` are at `w * backends + b`.
    idle: Vec<Mutex<Vec<BackendConn>>>,
    backends: usize,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool for `backends` backends and `workers` worker threads, keeping
    /// at most `max_idle` idle connections to each backend (split evenly
    /// among the workers), for at most `idle_timeout`.
    pub fn new(backends: usize, workers: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        let workers = workers.max(1);
        Self {
            idle: (0..backends * workers)
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            backends,
            max_idle: max_idle.div_ceil(workers),
            idle_timeout,
        }
    }

    /// This worker's idle connections to `backend`.
    fn list(&self, backend: usize) -> Option<&Mutex<Vec<BackendConn>>> {
        if backend >= self.backends {
            return None;
        }
        let workers = self.idle.len() / self.backends;
        let worker = worker::current().min(workers - 1);
        self.idle.get(worker * self.backends + backend)
    }

    /// This worker's most recently used idle connection to `backend` that
    /// still looks alive, if any.
    pub fn take(&self, backend: usize) -> Option<BackendConn> {
        let list = self.list(backend)?;
        loop {
            let conn = list.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
            let idle = conn.idle_for();
            if idle < self.idle_timeout && (idle < PROBE_AFTER || conn.looks_alive()) {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request to `backend`, or closes it when the
    /// pool is full.
    pub fn put(&self, backend: usize, mut conn: BackendConn) {
        let Some(list) = self.list(backend) else {
            return;
        };
        conn.mark_idle();
        let mut list = list.lock().unwrap_or_else(PoisonError::into_inner);
        if list.len() < self.max_idle {
            list.push(conn);
        }
    }

    /// Closes connections idle past the timeout.
    pub fn reap(&self) {
        for list in &self.idle {
            let expired: Vec<BackendConn> = {
                let mut list = list.lock().unwrap_or_else(PoisonError::into_inner);
                let (keep, expired) = std::mem::take(&mut *list)
                    .into_iter()
                    .partition(|conn| conn.idle_for() < self.idle_timeout);
                *list = keep;
                expired
            };
            // Closed outside the lock.
            drop(expired);
        }
    }

    /// Idle connections held, per backend (all workers').
    #[cfg(test)]
    pub fn idle_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.backends];
        for (slot, list) in self.idle.iter().enumerate() {
            counts[slot % self.backends] +=
                list.lock().unwrap_or_else(PoisonError::into_inner).len();
        }
        counts
    }

    /// How often [`Pool::reap`] should run.
    pub fn reap_interval(&self) -> Duration {
        (self.idle_timeout / 2).max(Duration::from_millis(10))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use crate::dataplane::Dataplane;

    #[tokio::test]
    async fn a_connection_is_reused_only_by_the_worker_that_opened_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conn = Dataplane::userspace().connect(addr).await.unwrap();
        let _accepted = listener.accept().await.unwrap();
        let pool = Pool::new(2, 2, 8, Duration::from_secs(60));
        pool.put(1, conn);
        assert_eq!(pool.idle_counts(), [0, 1]);
        std::thread::scope(|s| {
            s.spawn(|| {
                worker::enter(1);
                assert!(pool.take(1).is_none(), "worker 1 took worker 0's socket");
            });
        });
        assert!(pool.take(1).is_some());
        assert_eq!(pool.idle_counts(), [0, 0]);
    }

    #[tokio::test]
    async fn the_idle_limit_is_split_among_the_workers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // 10 per backend over 4 workers: 3 each.
        let pool = Pool::new(1, 4, 10, Duration::from_secs(60));
        let mut accepted = Vec::new();
        for _ in 0..4 {
            pool.put(0, Dataplane::userspace().connect(addr).await.unwrap());
            accepted.push(listener.accept().await.unwrap());
        }
        assert_eq!(pool.idle_counts(), [3]);
    }
}
