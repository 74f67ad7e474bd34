//! The other routers that send requests to the same backends (replicas,
//! one per GPU node), as far as this router knows: from `--peers`, or the
//! ready pods `--peer-selector` picks, followed through the API server.
//!
//! A backend's scrapes tell who sends there only once requests have run
//! (see [`super::Backend::clients`]); before that, in a cold start, the
//! peers stand in ([`crate::route::Clients::given_peers`]). With none, the router is alone, so placement patience
//! may spread a cold start's first prompts by its own view of load; with
//! some, each new prompt goes where every replica places it (see
//! `route::policy`). Unknown peers leave the scrapes to decide, as before.
use std::sync::atomic::{AtomicI64, Ordering};

/// How many other routers send requests to the backends.
#[derive(Debug)]
pub(crate) struct Peers(AtomicI64);

/// What `Peers` holds while nothing is known.
const UNKNOWN: i64 = -1;

impl Peers {
    /// `known` other routers, or unknown (`None`).
    pub(crate) fn new(known: Option<usize>) -> Self {
        Self(AtomicI64::new(known.map_or(UNKNOWN, count)))
    }

    /// Now `n` other routers are known.
    pub(crate) fn set(&self, n: usize) {
        self.0.store(count(n), Ordering::Relaxed);
    }

    /// How many other routers are known, if that is known.
    pub(crate) fn get(&self) -> Option<usize> {
        usize::try_from(self.0.load(Ordering::Relaxed)).ok()
    }
}

/// `n` as stored.
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::Clients;

    #[test]
    fn peers_are_unknown_until_told() {
        let peers = Peers::new(None);
        assert_eq!(peers.get(), None);
        peers.set(0);
        assert_eq!(peers.get(), Some(0));
        peers.set(2);
        assert_eq!(peers.get(), Some(2));
        assert_eq!(Peers::new(Some(1)).get(), Some(1));
    }

    #[test]
    fn known_peers_stand_in_for_the_scrapes() {
        use Clients::{Others, Ours, Unknown};
        // Unknown peers: the scrapes decide.
        for scraped in [Unknown, Ours, Others] {
            assert_eq!(scraped.given_peers(None), scraped);
        }
        // None: only ours until a scrape shows another client.
        assert_eq!(Unknown.given_peers(Some(0)), Ours);
        assert_eq!(Ours.given_peers(Some(0)), Ours);
        assert_eq!(Others.given_peers(Some(0)), Others);
        // Some: others too, even while the peers are idle.
        for scraped in [Unknown, Ours, Others] {
            assert_eq!(scraped.given_peers(Some(2)), Others);
        }
    }
}
