//! Graceful drain: what the daemon does between a shutdown signal and its
//! exit, so that a rolling restart or a node drain loses no request.
//!
//! The sequence (the README's "Stopping" section):
//! 1. **Draining.** `/ready` answers 503, so Kubernetes takes the pod out of
//!    its Service's endpoints; the listeners still accept (load balancers
//!    and kube-proxy keep sending new connections for a few seconds), and
//!    every response that starts from now on says `connection: close`.
//!    A connection whose response was already under way closes once it ends.
//! 2. **Closed**, `--drain-delay-ms` after the signal: the listeners close
//!    (new connections are refused), and connections idle between requests
//!    close.
//! 3. In-flight requests and streams finish; the daemon exits once none is
//!    left, or at `--drain-timeout-ms` after the signal, whichever is first.
use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

/// Where the daemon is in its drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No shutdown signal yet.
    Serving,
    /// Signalled: not ready, still accepting.
    Draining,
    /// The listeners are closed; idle connections close.
    Closed,
}

/// The drain's state, shared by every connection.
#[derive(Debug)]
pub(crate) struct Drain {
    /// Read on every response (Relaxed: a response that misses the flip by
    /// a moment is one that started before the signal).
    draining: AtomicBool,
    /// The phase, one channel per worker: every idle connection waits on
    /// its own worker's, so waiting costs no cache line the other workers
    /// write (a first version with one shared channel and a timer reset per
    /// response measured 4-12% more CPU per kept-alive request; the two
    /// were fixed together, so the share of each is not known).
    phases: Vec<watch::Sender<Phase>>,
}

impl Default for Drain {
    /// A drain for one worker.
    fn default() -> Self {
        Self::new(1)
    }
}

impl Drain {
    /// A drain for `workers` workers (see `crate::worker`).
    pub(crate) fn new(workers: usize) -> Self {
        Self {
            draining: AtomicBool::new(false),
            phases: (0..workers.max(1))
                .map(|_| watch::Sender::new(Phase::Serving))
                .collect(),
        }
    }

    /// Whether a shutdown signal came: responses tell clients to close, and
    /// `/ready` answers 503.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Step 1: stop being ready.
    fn begin(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.set(Phase::Draining);
    }

    /// Step 2: close the listeners and idle connections.
    fn close(&self) {
        self.set(Phase::Closed);
    }

    fn set(&self, phase: Phase) {
        for worker in &self.phases {
            worker.send_replace(phase);
        }
    }

    /// Completes once the listeners are to close (step 2); waits on this
    /// thread's worker's channel.
    pub(crate) async fn closed(&self) {
        let shard = crate::worker::current().min(self.phases.len() - 1);
        let mut phase = self.phases[shard].subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = phase.wait_for(|phase| *phase == Phase::Closed).await;
    }
}

/// The drain's timing (`--drain-delay-ms`, `--drain-timeout-ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DrainTiming {
    /// From the signal to closing the listeners.
    pub(crate) delay: Duration,
    /// From the signal to the exit, whatever is still open.
    pub(crate) timeout: Duration,
}

impl Drain {
    /// Waits for `signal`, then runs steps 1 and 2: returns once the
    /// listeners are to close, with the deadline of step 3.
    pub(crate) async fn on(
        &self,
        signal: impl Future<Output = ()>,
        timing: DrainTiming,
    ) -> Instant {
        signal.await;
        let signalled = Instant::now();
        let delay = timing.delay.min(timing.timeout);
        self.begin();
        tracing::info!(
            delay_ms = delay.as_millis(),
            timeout_ms = timing.timeout.as_millis(),
            "draining: /ready answers 503 and responses say connection: close; \
             the listener closes after the delay, and in-flight requests have until the timeout"
        );
        tokio::time::sleep(delay).await;
        self.close();
        signalled + timing.timeout
    }
}

/// Step 3: waits until `open()` (the open client connections) is zero or
/// `deadline` passes; returns how many were still open.
pub(crate) async fn settle(open: impl Fn() -> usize, deadline: Instant) -> usize {
    /// How often the count is looked at: the drain's precision, not a cost.
    const POLL: Duration = Duration::from_millis(20);
    loop {
        let left = open();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + POLL)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_sequence_follows_the_signal_and_the_delay() {
        let drain = Arc::new(Drain::default());
        let (signal, signalled) = tokio::sync::oneshot::channel::<()>();
        let timing = DrainTiming {
            delay: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
        };
        let running = {
            let drain = Arc::clone(&drain);
            tokio::spawn(async move {
                drain
                    .on(
                        async move {
                            let _ = signalled.await;
                        },
                        timing,
                    )
                    .await
            })
        };
        let closed = {
            let drain = Arc::clone(&drain);
            tokio::spawn(async move { drain.closed().await })
        };
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!drain.is_draining(), "nothing happens before the signal");
        assert!(!closed.is_finished());

        signal.send(()).expect("the drain waits");
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(drain.is_draining(), "draining starts at the signal");
        assert!(
            !closed.is_finished(),
            "the listeners stay open for the delay"
        );

        let deadline = running.await.expect("the drain ran");
        closed.await.expect("closed completes");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(deadline - start, Duration::from_secs(30));
        // A connection that becomes idle after the close sees it at once.
        tokio::time::timeout(Duration::from_millis(1), drain.closed())
            .await
            .expect("closed stays closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delay_past_the_timeout_is_cut_to_it() {
        let drain = Drain::default();
        let timing = DrainTiming {
            delay: Duration::from_secs(50),
            timeout: Duration::from_secs(10),
        };
        let start = Instant::now();
        let deadline = drain.on(async {}, timing).await;
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        assert_eq!(deadline, start + Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn settling_ends_when_connections_end_or_at_the_deadline() {
        let open = Arc::new(AtomicUsize::new(3));
        let start = Instant::now();
        let closer = {
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                for _ in 0..3 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    open.fetch_sub(1, Ordering::Relaxed);
                }
            })
        };
        let left = settle(
            || open.load(Ordering::Relaxed),
            start + Duration::from_secs(10),
        )
        .await;
        assert_eq!(left, 0);
        assert!(
            start.elapsed() < Duration::from_secs(4),
            "{:?}",
            start.elapsed()
        );
        closer.await.expect("closer");

        open.store(2, Ordering::Relaxed);
        let start = Instant::now();
        let left = settle(
            || open.load(Ordering::Relaxed),
            start + Duration::from_secs(10),
        )
        .await;
        assert_eq!(left, 2, "two never ended");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
