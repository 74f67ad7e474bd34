//! Placements whose backend the index has not learned yet: the requests
//! of a new prefix family that arrive together.
//!
//! The index learns where a request went only once that backend has
//! accepted it ([`super::Router::record`], after the connect). A burst of
//! siblings (a system prompt's first few questions, sent at once) is
//! selected before the first of them is recorded, so each would be placed
//! on its own and the family copied onto several backends, each copy
//! taking cache space the others need. This table remembers, for a short
//! while, which backend each recent placement seed went to, so a sibling
//! placed meanwhile joins it (see [`super::policy::Inputs::pending`]).
//!
//! It is a small direct-mapped table: a seed whose slot another seed took
//! is simply forgotten, and the request is placed as if the table were not
//! there.
use std::time::{Duration, Instant};

use super::index::BackendId;

/// Slots in the table; a burst larger than this shares slots.
const SLOTS: usize = 256;

/// How long a placement stays pending: longer than a connect to a healthy
/// backend takes, after which the index knows where it went.
pub(crate) const PENDING_FOR: Duration = Duration::from_secs(2);

/// One remembered placement.
#[derive(Clone, Copy, Debug)]
struct Slot {
    seed: u64,
    backend: BackendId,
    at: Instant,
}

/// Recent placements by seed; see the module doc.
#[derive(Debug)]
pub(crate) struct Pending {
    slots: Box<[Option<Slot>]>,
}

impl Default for Pending {
    fn default() -> Self {
        Self {
            slots: vec![None; SLOTS].into_boxed_slice(),
        }
    }
}

impl Pending {
    /// The backend the placement `seed` went to, if that was less than
    /// [`PENDING_FOR`] before `now`.
    pub(crate) fn get(&self, seed: u64, now: Instant) -> Option<BackendId> {
        let slot = self.slots[slot_of(seed)]?;
        (slot.seed == seed && now.saturating_duration_since(slot.at) < PENDING_FOR)
            .then_some(slot.backend)
    }

    /// Remembers that the placement `seed` went to `backend` at `now`.
    pub(crate) fn put(&mut self, seed: u64, backend: BackendId, now: Instant) {
        self.slots[slot_of(seed)] = Some(Slot {
            seed,
            backend,
            at: now,
        });
    }
}

/// The slot of `seed` (seeds are hashes, so their low bits spread).
fn slot_of(seed: u64) -> usize {
    // The modulus keeps the value below SLOTS, which fits in usize.
    (seed % SLOTS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::index::backend_id;

    #[test]
    fn a_placement_is_remembered_for_a_while() {
        let mut pending = Pending::default();
        let start = Instant::now();
        let a = backend_id("http://a:1");
        assert_eq!(pending.get(7, start), None);
        pending.put(7, a, start);
        assert_eq!(pending.get(7, start + Duration::from_millis(500)), Some(a));
        assert_eq!(pending.get(8, start), None, "another seed");
        assert_eq!(pending.get(7, start + PENDING_FOR), None, "expired");
    }

    #[test]
    fn a_seed_that_takes_the_slot_replaces_the_older_one() {
        let mut pending = Pending::default();
        let now = Instant::now();
        let (a, b) = (backend_id("http://a:1"), backend_id("http://b:1"));
        pending.put(1, a, now);
        pending.put(1 + SLOTS as u64, b, now);
        assert_eq!(pending.get(1, now), None);
        assert_eq!(pending.get(1 + SLOTS as u64, now), Some(b));
        pending.put(1, b, now);
        assert_eq!(pending.get(1, now), Some(b), "a seed placed again moves");
    }
}
