//! The live backend set: an immutable [`Backends`] snapshot that requests
//! read without a lock, replaced whole when the endpoints change.
//!
//! A request takes one snapshot ([`Fleet::snapshot`]) and uses it to the
//! end, so the positions routing returns stay valid for it whatever
//! changes meanwhile. A change ([`Fleet::apply`]) keeps the [`Backend`] of
//! every endpoint still present (its id, in-flight count, load, models and
//! counters), creates one for each new endpoint, and retires the rest: a
//! retired backend is in no later snapshot, so it gets no new request, but
//! the requests and streams already on it hold it and finish.
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use super::{Backend, Backends, Ejection, endpoints::Endpoint, peers::Peers};
use crate::metrics::BackendSeries;

/// The backend set as it changes at runtime.
#[derive(Debug)]
pub(crate) struct Fleet {
    current: ArcSwap<Backends>,
    /// Each backend's counters come from here and leave with it.
    series: BackendSeries,
    /// Serializes changes, so two never build on the same snapshot.
    changing: Mutex<()>,
    /// When passive health ejects a backend.
    ejection: Ejection,
    /// The other routers sending requests to these backends; each backend
    /// holds it too, to learn from its scrapes only what holds with them.
    peers: Arc<Peers>,
}

/// What one [`Fleet::apply`] changed.
#[derive(Debug, Default)]
pub(crate) struct Change {
    /// Backends new in this change.
    pub(crate) added: Vec<Arc<Backend>>,
    /// Backends gone in this change (retired).
    pub(crate) removed: Vec<Arc<Backend>>,
}

impl Change {
    /// Whether nothing changed.
    pub(crate) fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl Fleet {
    /// An empty fleet whose backends count into `series`.
    pub(crate) fn new(series: BackendSeries) -> Self {
        Self {
            current: ArcSwap::from_pointee(Backends::default()),
            series,
            changing: Mutex::new(()),
            ejection: Ejection::DEFAULT,
            peers: Arc::new(Peers::new(None)),
        }
    }

    /// The same fleet, its backends ejected by `ejection`.
    #[must_use]
    pub(crate) fn with_ejection(self, ejection: Ejection) -> Self {
        Self { ejection, ..self }
    }

    /// The same fleet, with `known` other routers sending to it (`None`:
    /// unknown, until [`Self::peers`] is told).
    #[must_use]
    pub(crate) fn with_peers(self, known: Option<usize>) -> Self {
        Self {
            peers: Arc::new(Peers::new(known)),
            ..self
        }
    }

    /// The other routers sending requests to these backends.
    pub(crate) fn peers(&self) -> &Peers {
        &self.peers
    }

    /// The backend set now; hold it for the whole request.
    pub(crate) fn snapshot(&self) -> Arc<Backends> {
        self.current.load_full()
    }

    /// Makes `endpoints` the backend set (see the module doc).
    pub(crate) fn apply(&self, endpoints: &[Endpoint]) -> Change {
        let _one = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current.load_full();
        let mut change = Change::default();
        let list: Vec<Arc<Backend>> = endpoints
            .iter()
            .map(|endpoint| {
                let kept = old
                    .all()
                    .iter()
                    .find(|b| b.name == endpoint.name && b.addr == endpoint.addr);
                match kept {
                    Some(backend) => Arc::clone(backend),
                    None => {
                        let backend = Arc::new(Backend::new(
                            endpoint,
                            self.series.counters(&endpoint.name),
                            self.ejection,
                            Arc::clone(&self.peers),
                        ));
                        change.added.push(Arc::clone(&backend));
                        backend
                    }
                }
            })
            .collect();
        for backend in old.all() {
            if !list.iter().any(|b| Arc::ptr_eq(b, backend)) {
                backend.retire();
                if !list.iter().any(|b| b.name == backend.name) {
                    self.series.remove(&backend.name);
                }
                change.removed.push(Arc::clone(backend));
            }
        }
        if !change.is_empty() {
            self.current.store(Arc::new(Backends { list }));
        }
        change
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn endpoint(last: u8) -> Endpoint {
        let addr = std::net::SocketAddr::from(([127, 0, 0, last], 8000));
        Endpoint {
            name: format!("http://{addr}"),
            authority: "vllm.test:8000".into(),
            addr,
            local: false,
        }
    }

    fn names(backends: &Backends) -> Vec<&str> {
        backends.all().iter().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn a_change_keeps_the_backends_still_present_and_retires_the_rest() {
        let series = BackendSeries::default();
        let fleet = Fleet::new(series.clone());
        let change = fleet.apply(&[endpoint(2), endpoint(3)]);
        assert_eq!(change.added.len(), 2);
        let before = fleet.snapshot();
        let stays = Arc::clone(&before.all()[1]);
        let _in_flight = stays.start_request(0);
        stays.counters.requests.inc();

        let change = fleet.apply(&[endpoint(3), endpoint(4)]);
        assert_eq!(
            change
                .added
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>(),
            ["http://127.0.0.4:8000"]
        );
        assert_eq!(change.removed.len(), 1);
        let after = fleet.snapshot();
        assert_eq!(
            names(&after),
            ["http://127.0.0.3:8000", "http://127.0.0.4:8000"]
        );
        // The same backend, with what it counted; a new one has a new id.
        assert!(Arc::ptr_eq(&after.all()[0], &stays));
        assert_eq!(after.all()[0].in_flight(), 1);
        assert_eq!(after.all()[0].counters.requests.get(), 1);
        assert_ne!(after.all()[1].id, before.all()[0].id);
        // The departed one is retired, and its series is gone; a request
        // that took the old snapshot still has it.
        assert!(change.removed[0].is_retired());
        assert!(!stays.is_retired());
        assert_eq!(
            names(&before),
            ["http://127.0.0.2:8000", "http://127.0.0.3:8000"]
        );
        let text = series.encode_for_test();
        assert!(!text.contains("127.0.0.2"), "{text}");
        assert!(text.contains("127.0.0.3"), "{text}");

        assert!(fleet.apply(&[endpoint(3), endpoint(4)]).is_empty());
    }

    #[test]
    fn a_name_whose_address_changed_is_a_new_backend() {
        let fleet = Fleet::new(BackendSeries::default());
        let mut moved = endpoint(2);
        fleet.apply(std::slice::from_ref(&moved));
        let old = Arc::clone(&fleet.snapshot().all()[0]);
        moved.addr = std::net::SocketAddr::from(([127, 0, 0, 9], 8000));
        let change = fleet.apply(&[moved]);
        assert_eq!((change.added.len(), change.removed.len()), (1, 1));
        assert!(old.is_retired());
        assert_ne!(fleet.snapshot().all()[0].id, old.id);
    }
}
