//! Idle backend connections, kept per backend for the next request.
//!
//! A connection goes back to the pool only after a response that ended
//! cleanly by its framing, so the next request starts on a quiet stream.
//! Connections idle longer than the idle timeout are dropped (vLLM's server
//! closes idle connections after 5 s, so the default stays below that); one
//! idle for more than [`PROBE_AFTER`] is first checked for a FIN or stray
//! bytes. A request that still meets a connection the backend closed in the
//! meantime is sent again on a new one (see `conn.rs`): nothing of it had
//! been answered. Busy connections skip the probe, a syscall per request.
use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::BackendConn;

/// Idle time after which a pooled connection is probed before reuse.
pub const PROBE_AFTER: Duration = Duration::from_millis(500);

/// Idle connections per backend.
#[derive(Debug)]
pub struct Pool {
    idle: Vec<Mutex<Vec<BackendConn>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool for `backends` backends, keeping at most `max_idle` idle
    /// connections to each, for at most `idle_timeout`.
    pub fn new(backends: usize, max_idle: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: (0..backends).map(|_| Mutex::new(Vec::new())).collect(),
            max_idle,
            idle_timeout,
        }
    }

    /// The most recently used idle connection to `backend` that still looks
    /// alive, if any.
    pub fn take(&self, backend: usize) -> Option<BackendConn> {
        let list = self.idle.get(backend)?;
        loop {
            let conn = list.lock().unwrap_or_else(PoisonError::into_inner).pop()?;
            let idle = conn.idle_since.elapsed();
            if idle < self.idle_timeout && (idle < PROBE_AFTER || conn.looks_alive()) {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request to `backend`, or closes it when the
    /// pool is full.
    pub fn put(&self, backend: usize, mut conn: BackendConn) {
        let Some(list) = self.idle.get(backend) else {
            return;
        };
        conn.idle_since = Instant::now();
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
                    .partition(|conn| conn.idle_since.elapsed() < self.idle_timeout);
                *list = keep;
                expired
            };
            // Closed outside the lock.
            drop(expired);
        }
    }

    /// Idle connections held, per backend.
    pub fn idle_counts(&self) -> Vec<usize> {
        self.idle
            .iter()
            .map(|list| list.lock().unwrap_or_else(PoisonError::into_inner).len())
            .collect()
    }

    /// How often [`Pool::reap`] should run.
    pub fn reap_interval(&self) -> Duration {
        (self.idle_timeout / 2).max(Duration::from_millis(10))
    }
}
