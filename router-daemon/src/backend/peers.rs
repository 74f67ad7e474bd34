//! The other routers that send requests to the same backends (replicas,
//! one per GPU node), as far as this router knows: from `--peers`, or the
//! ready pods `--peer-selector` picks, followed through the API server.
//!
//! A backend's scrapes tell who sends there only once requests have run
//! (see [`super::Backend::clients`]); before that, in a cold start, the
//! peers stand in. With none, the router is alone, so placement patience
//! may spread a cold start's first prompts by its own view of load; with
//! some, each new prompt goes where every replica places it (see
//! `route::policy`). Unknown peers leave the scrapes to decide, as before.
use std::sync::atomic::{AtomicI64, Ordering};

use crate::route::Clients;

/// How many other routers send requests to the backends.
#[derive(Debug)]
pub(crate) struct Peers(AtomicI64);

/// What `Peers` holds while nothing is known.
const UNKNOWN: i64 = -1;

impl Peers {
    /// `known` other routers, or unknown (`None`).
    pub(crate) fn new(known: Option<usize>) -> Self {
        let peers = Self(AtomicI64::new(UNKNOWN));
        if let Some(n) = known {
            peers.set(n);
        }
        peers
    }

    /// Now `n` other routers are known.
    pub(crate) fn set(&self, n: usize) {
        self.0
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// How many other routers are known, if that is known.
    pub(crate) fn get(&self) -> Option<usize> {
        usize::try_from(self.0.load(Ordering::Relaxed)).ok()
    }

    /// Who sends requests to a backend whose scrapes say `scraped`:
    /// see [`Clients::given_peers`].
    pub(crate) fn clients(&self, scraped: Clients) -> Clients {
        scraped.given_peers(self.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_unknown_until_told() {
        let peers = Peers::new(None);
        assert_eq!(peers.get(), None);
        assert_eq!(peers.clients(Clients::Unknown), Clients::Unknown);
        peers.set(0);
        assert_eq!(peers.get(), Some(0));
        assert_eq!(peers.clients(Clients::Unknown), Clients::Ours);
        assert_eq!(peers.clients(Clients::Others), Clients::Others);
        peers.set(2);
        assert_eq!(peers.clients(Clients::Unknown), Clients::Others);
        assert_eq!(peers.clients(Clients::Ours), Clients::Others);
        assert_eq!(Peers::new(Some(1)).get(), Some(1));
    }
}
