//! Backend selection: the prefix index (`index`) and the decision policy
//! (`policy`), joined by [`Router`].
//!
//! # Layout
//! - `index`: block-chained prefix hashes → the backends that recently
//!   received them; sharded, bounded in memory, several holders per prefix.
//! - `policy`: the pure decision function (session stickiness, cache
//!   affinity against load, bounded load, rendezvous placement); its module
//!   doc states the rules.
//! - `layout`: a layout of the prefix families this router knows, alike on
//!   every replica that knows them: even under `--placement-epsilon`, or
//!   by room in the KV caches where other clients share the backends.
//! - `pending`: placements still connecting, which their siblings join.
//! - `occupancy`: how much of each backend's KV cache the families this
//!   router sends there keep in use, so a new family goes where it fits.
//! - `reuse`: how often recent requests followed a cached prefix.
//!
//! # A decision
//! `Router::select` hashes the prompt key once, asks the index which
//! backends hold which prefix of it, lets `policy::choose` pick, and lists
//! the other candidates in fallback order; once a backend has accepted the
//! request, `Router::record` writes it into the index with the same
//! hashes. ([`Router::decide`] does both at once.) It costs O(prompt length) hashing and takes each
//! index shard's lock at most twice (plus a probe or two for the prompt's
//! tail), briefly, and, where engines report their cache sizes, the
//! chosen backend's `occupancy` lock once (a placement reads every
//! candidate's); there is no global lock. The occupancy is touched at the decision, before the
//! backend accepted the request: a hint, like the pending placements. It works in buffers its thread
//! keeps (`Scratch`), so it allocates nothing once they are large enough.
//!
//! Backends are named in the index by a hash of their name
//! (`index::backend_id`), so the order of the `backends` slice may change
//! between calls, and a backend missing from it is simply never chosen.
//! `Router::remove_backend` also drops what the index holds for it.
pub(crate) mod index;
mod layout;
mod occupancy;
mod pending;
pub(crate) mod policy;
mod reuse;

use std::{
    cell::RefCell,
    sync::atomic::{AtomicUsize, Ordering},
};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::prompt;

pub use self::{
    index::{MAX_BLOCK, PrefixIndex, Walk},
    policy::{Logic, Policy},
};

/// Seed for hashing session values, apart from prompt hashes.
const SESSION_SEED: u64 = 0x7365_7373_696f_6e21;
/// Salt that keeps placement seeds apart from the index's hashes.
const PLACEMENT_SALT: u64 = 0x706c_6163_656d_656e;

/// What routing needs to know about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRequest<'a> {
    /// The `model` name (empty when the body had none).
    pub model: &'a [u8],
    /// The prompt key (see [`crate::prompt`]).
    pub key: &'a [u8],
    /// Length of the key prefix that identifies the conversation
    /// ([`crate::prompt::RoutingInput::conversation`]); 0 means unknown.
    pub conversation: usize,
    /// The session header's value, if the request carried one.
    pub session: Option<&'a [u8]>,
    /// A later turn of a chat ([`crate::prompt::RoutingInput::later_turns`]):
    /// if nothing matches, it is placed by rendezvous alone, where a replica
    /// that saw its first turn most likely placed it.
    pub later_turns: bool,
    /// The backend that served the previous request on the same client
    /// connection, by name, if any: a client that finished there and now
    /// starts something new has left it (see `policy`, an idle engine
    /// first).
    pub previous: Option<&'a str>,
}

/// Why a backend was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request continues a prefix this backend holds (the longest known).
    PrefixMatch,
    /// Load outweighed a longer match elsewhere, or a request with no
    /// prompt went to the least busy backend.
    LeastLoaded,
    /// The backend holding the prefix was over the load bound; another (one
    /// holding the prefix if possible) took it.
    Spread,
    /// A new conversation, placed by rendezvous hashing.
    Placed,
    /// Sticky to the request's session (rendezvous hash of its value).
    Session,
    /// The rendezvous choice (placement or session), or the family's place
    /// in the layout, was over the load bound; the next in rendezvous order
    /// took it.
    Overloaded,
    /// Its turn (`--routing-logic roundrobin`).
    RoundRobin,
    /// A sibling sent to its family's place in the layout (by room, or
    /// even under `--placement-epsilon`), which changed since the index
    /// learned the family elsewhere: the family moves there once.
    Moved,
    /// A new prompt whose rendezvous backend's KV cache is full of
    /// families in use, placed on the next in rendezvous order with room.
    CacheFull,
    /// A new prompt sent by a router alone, among backends about as cheap
    /// and all prefilling, to the one whose prefill began longest ago
    /// (`--recency-margin`, see `policy`).
    OldestPrefill,
    /// A new prompt sent by a router alone to an engine with nothing in
    /// flight instead of one already answering (`--idle-below-reuse`, see
    /// `policy`).
    Idle,
}

impl Reason {
    /// Every reason, for metrics that pre-create their labels.
    pub(crate) const ALL: [Reason; 11] = [
        Reason::PrefixMatch,
        Reason::LeastLoaded,
        Reason::Spread,
        Reason::Placed,
        Reason::Session,
        Reason::Overloaded,
        Reason::RoundRobin,
        Reason::Moved,
        Reason::CacheFull,
        Reason::OldestPrefill,
        Reason::Idle,
    ];

    /// Short name for logs and metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reason::PrefixMatch => "prefix-match",
            Reason::LeastLoaded => "least-loaded",
            Reason::Spread => "spread",
            Reason::Placed => "placed",
            Reason::Session => "session",
            Reason::Overloaded => "overloaded",
            Reason::RoundRobin => "round-robin",
            Reason::Moved => "moved",
            Reason::CacheFull => "cache-full",
            Reason::OldestPrefill => "oldest-prefill",
            Reason::Idle => "idle",
        }
    }
}

/// A routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Index of the chosen backend in the slice passed in.
    pub backend: usize,
    /// Bytes of the prompt key that backend holds per the index (0 if
    /// none), plus the reply it generated when it served the chat's
    /// previous turn.
    pub matched: usize,
    /// Why this backend.
    pub reason: Reason,
}

/// What routing sees of one backend: its name and its load.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackendLoad<'a> {
    /// Stable name (the URL), for rendezvous hashing and the index.
    pub name: &'a str,
    /// Requests this router has in flight there.
    pub in_flight: usize,
    /// Requests queued in vLLM (`vllm:num_requests_waiting`), 0 when unknown.
    pub waiting: usize,
    /// Key bytes of this router's requests there that the backend has not
    /// begun to answer: prefill queued ahead of a new request.
    pub prefill: usize,
    /// On the router's own node: wins when costs are close (see
    /// `policy::LOCAL_MARGIN`).
    pub local: bool,
    /// Whether other clients (another router replica) send requests there
    /// too: a new prompt goes where every replica would place it unless the
    /// router knows it is alone (see `policy`, placement patience).
    pub(crate) clients: Clients,
    /// Tokens its KV cache holds (`vllm:cache_config_info`), 0 when
    /// unknown: a new prompt family is placed where it fits (see `policy`).
    pub(crate) cache_tokens: usize,
    /// Key bytes per token of this router's requests there, as the engine
    /// counted them; 0 when not known (the policy's own ratio then).
    pub(crate) bytes_per_token: f64,
    /// When this router last started a request there, in milliseconds on
    /// a clock of its own (0: never): the one started longest ago has had
    /// its prefill under way longest (see `policy`).
    pub(crate) last_start: u64,
}

/// Who sends requests to a backend, as far as the router knows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clients {
    /// Not known yet.
    #[default]
    Unknown,
    /// Only this router, as its recent scrapes showed.
    Ours,
    /// Others too (another router replica, or clients calling the engine
    /// directly), as a recent scrape showed.
    Others,
}

impl Clients {
    /// Who sends requests to a backend whose scrapes say `self`, when the
    /// router knows of `peers` other routers sending to its backends (or
    /// does not, `None`): with peers, [`Clients::Others`], whatever the
    /// scrapes saw while those peers happened to be idle; with none, the
    /// scrapes' answer, or [`Clients::Ours`] before they have one (a cold
    /// start: nobody else routes here, and a client calling the engine
    /// directly shows in the next scrape).
    #[must_use]
    pub(crate) fn given_peers(self, peers: Option<usize>) -> Self {
        match (peers, self) {
            (Some(0), Clients::Unknown) => Clients::Ours,
            (Some(0) | None, scraped) => scraped,
            (Some(_), _) => Clients::Others,
        }
    }
}

impl<'a> BackendLoad<'a> {
    /// A view with nothing known to be waiting.
    pub fn new(name: &'a str, in_flight: usize) -> Self {
        Self {
            name,
            in_flight,
            waiting: 0,
            prefill: 0,
            local: false,
            clients: Clients::Unknown,
            cache_tokens: 0,
            bytes_per_token: 0.0,
            last_start: 0,
        }
    }

    /// The same view, last sent a request at start `last_start` (0: never).
    #[must_use]
    pub(crate) fn with_last_start(self, last_start: u64) -> Self {
        Self { last_start, ..self }
    }

    /// The same view, with `bytes_per_token` key bytes per token learned
    /// (0: not known).
    #[must_use]
    pub(crate) fn with_bytes_per_token(self, bytes_per_token: f64) -> Self {
        Self {
            bytes_per_token,
            ..self
        }
    }

    /// The same view, with a KV cache of `cache_tokens` tokens (0: unknown).
    #[must_use]
    pub(crate) fn with_cache_tokens(self, cache_tokens: usize) -> Self {
        Self {
            cache_tokens,
            ..self
        }
    }

    /// The same view, on the router's own node or not.
    #[must_use]
    pub(crate) fn with_local(self, local: bool) -> Self {
        Self { local, ..self }
    }

    /// The same view, with who else sends requests there.
    #[must_use]
    pub(crate) fn with_clients(self, clients: Clients) -> Self {
        Self { clients, ..self }
    }

    /// The same view with `waiting` queued requests.
    #[must_use]
    pub fn with_waiting(self, waiting: usize) -> Self {
        Self { waiting, ..self }
    }

    /// The same view with `prefill` key bytes not yet answered.
    #[must_use]
    pub(crate) fn with_prefill(self, prefill: usize) -> Self {
        Self { prefill, ..self }
    }

    /// In flight plus waiting.
    pub fn load(&self) -> usize {
        self.in_flight.saturating_add(self.waiting)
    }
}

/// Every candidate in the order to try them: `first`, then the others from
/// least to most loaded (ties in their order).
fn fallback_order(first: usize, backends: &[BackendLoad], order: &mut Vec<usize>) {
    order.clear();
    order.push(first);
    order.extend((0..backends.len()).filter(|&i| i != first));
    order[1..].sort_by_key(|&i| backends[i].load());
}

/// Buffers a decision works in, kept per thread: a decision never waits,
/// so it has its thread's buffers to itself, and allocates nothing once they
/// are large enough.
#[derive(Default)]
struct Scratch {
    walk: Walk,
    /// Matched key bytes per backend, in the order of `backends`.
    matched: Vec<usize>,
    /// Bytes of other families in use per backend, in the order of
    /// `backends` (see `occupancy`).
    held: Vec<usize>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

/// The routing policy and its state; shared by every connection.
#[derive(Debug)]
pub struct Router {
    index: PrefixIndex,
    policy: Policy,
    /// The family layout: by counts under `--placement-epsilon`, otherwise
    /// by room in the KV caches where other clients share the backends
    /// (see [`Router::lays_out`]).
    layout: Option<std::sync::Mutex<layout::Layout>>,
    reuse: reuse::ReuseRate,
    /// Recent placements the index has not learned yet, by seed.
    pending: std::sync::Mutex<pending::Pending>,
    /// The families in use on each backend.
    occupancy: occupancy::Occupancy,
    /// Decisions taken under [`Logic::RoundRobin`], whose count picks the next.
    turns: AtomicUsize,
}

impl Router {
    /// A router with an empty index and the default [`Policy`].
    pub fn new(block: usize, capacity: usize) -> Self {
        Self::with_policy(block, capacity, Policy::default())
    }

    /// A router with an empty index of `block`-byte blocks and at most
    /// `capacity` entries, deciding by `policy`.
    pub(crate) fn with_policy(block: usize, capacity: usize, policy: Policy) -> Self {
        Self {
            index: PrefixIndex::new(block, capacity),
            policy,
            layout: match policy.placement_epsilon {
                Some(epsilon) => Some(layout::Bound::Even(epsilon)),
                None if policy.bytes_per_token > 0.0 => {
                    Some(layout::Bound::Room(policy.bytes_per_token))
                }
                None => None,
            }
            .map(|bound| std::sync::Mutex::new(layout::Layout::new(bound))),
            reuse: reuse::ReuseRate::default(),
            pending: std::sync::Mutex::default(),
            occupancy: occupancy::Occupancy::default(),
            turns: AtomicUsize::new(0),
        }
    }

    /// Picks a backend for `request` and records the choice in the index
    /// at once (for a caller with nothing to wait for; the daemon uses
    /// `Router::select` and `Router::record`).
    ///
    /// Returns `None` only when `backends` is empty.
    pub fn decide(&self, request: &RouteRequest, backends: &[BackendLoad]) -> Option<Decision> {
        if backends.is_empty() {
            return None;
        }
        if let Some(turn) = self.round_robin(backends) {
            return Some(turn);
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch {
                walk,
                matched,
                held,
            } = scratch;
            let decision = self.decide_with(request, backends, walk, matched, held, |_| true);
            if let Some(chosen) = decision.and_then(|d| backends.get(d.backend)) {
                self.index
                    .record(walk, request.key, index::backend_id(chosen.name));
            }
            walk.shrink();
            decision
        })
    }

    /// Picks a backend for `request`, or for a request without a prompt
    /// (`None`: `GET /v1/models`, …, which any backend can answer, goes to
    /// the least loaded), and fills `order` with every candidate in the
    /// order to try them: the choice first, then the others from least to
    /// most loaded. Positions are into `backends`.
    ///
    /// A decision for a backend that `backends` shows idle holds only if
    /// `claim` can still take it for the request (it starts the request
    /// there, see `Backend::start_if_idle`); when another request took it
    /// first, the router decides again with that backend busy (see
    /// `Router::claimed`), and the caller starts the request on a backend
    /// that was not idle itself.
    ///
    /// The index is left alone: once a backend has accepted the request,
    /// [`Router::record`] writes it there with the hashes left in `walk`
    /// (the caller's, kept with the request across the connect), so the
    /// index never points at a backend the request did not reach.
    /// Returns `None` only when `backends` is empty.
    pub(crate) fn select(
        &self,
        request: Option<&RouteRequest>,
        backends: &[BackendLoad],
        walk: &mut Walk,
        order: &mut Vec<usize>,
        claim: impl FnMut(&Decision) -> bool,
    ) -> Option<Decision> {
        order.clear();
        if backends.is_empty() {
            return None;
        }
        let decision = match request {
            _ if self.policy.logic == Logic::RoundRobin => self.round_robin(backends)?,
            Some(request) => SCRATCH.with_borrow_mut(|scratch| {
                let Scratch { matched, held, .. } = scratch;
                self.decide_with(request, backends, walk, matched, held, claim)
            })?,
            None => Decision {
                backend: policy::least_loaded(backends),
                matched: 0,
                reason: Reason::LeastLoaded,
            },
        };
        fallback_order(decision.backend, backends, order);
        Some(decision)
    }

    /// Records that the backend called `name` now holds `key`, the key of
    /// the request whose [`Router::select`] left its hashes in `walk` (the
    /// caller gives back a long prompt's buffers once done with the request:
    /// a retry records the same walk again).
    pub(crate) fn record(&self, walk: &Walk, key: &[u8], name: &str) {
        if self.policy.logic == Logic::PrefixAware {
            self.index.record(walk, key, index::backend_id(name));
        }
    }

    /// Undoes [`Router::record`] of `key` on the backend called `name`,
    /// which took the request but cached nothing of it (it answered 503).
    pub(crate) fn forget(&self, walk: &Walk, key: &[u8], name: &str) {
        if self.policy.logic == Logic::PrefixAware {
            self.index.forget(walk, key, index::backend_id(name));
        }
    }

    /// Under [`Logic::RoundRobin`], the next backend in turn; None under
    /// prefix-aware routing (or with no backends).
    fn round_robin(&self, backends: &[BackendLoad]) -> Option<Decision> {
        if self.policy.logic != Logic::RoundRobin || backends.is_empty() {
            return None;
        }
        let turn = self.turns.fetch_add(1, Ordering::Relaxed);
        Some(Decision {
            backend: turn % backends.len(),
            matched: 0,
            reason: Reason::RoundRobin,
        })
    }

    /// Whether new prompts are placed by the family layout among
    /// `backends`: always under `--placement-epsilon`; otherwise where some
    /// engine reports its cache size and some candidate is known to serve
    /// other clients. A router alone weighs each cache by the families it
    /// sent in the order they came (see `policy`, room in the cache), but
    /// replicas each see them in another order, and so would each move
    /// other families off a crowded cache: laid out by rank, they all move
    /// the same ones.
    fn lays_out(&self, backends: &[BackendLoad]) -> bool {
        self.policy.placement_epsilon.is_some()
            || (backends.iter().any(|b| b.cache_tokens > 0)
                && backends.iter().any(|b| b.clients == Clients::Others))
    }

    /// The decision for `request`, hashing its key into `walk`, an idle
    /// backend's only if `claim` takes it (see [`Router::select`]); records
    /// nothing in the index.
    fn decide_with(
        &self,
        request: &RouteRequest,
        backends: &[BackendLoad],
        walk: &mut Walk,
        matched: &mut Vec<usize>,
        held: &mut Vec<usize>,
        claim: impl FnMut(&Decision) -> bool,
    ) -> Option<Decision> {
        let key = request.key;
        let extends = self.matched_lengths(request, backends, walk, matched);
        let leading = self.placement_len(key, request.conversation);
        let mut inputs = policy::Inputs {
            backends,
            matched,
            key_len: key.len(),
            conversation: request.conversation,
            extends,
            later_turns: request.later_turns,
            placement: walk.prefix_hash(key, leading, PLACEMENT_SALT),
            reuse: self.reuse.get(),
            session: request.session.map(|s| xxh3_64_with_seed(s, SESSION_SEED)),
            pending: None,
            layout: None,
            held: &[],
            previous: request
                .previous
                .and_then(|name| backends.iter().position(|b| b.name == name)),
        };
        let seed = inputs.placement;
        // Sessions are placed by their own value, not by family. A panic
        // while holding the lock leaves at worst a stale layout.
        let mut layout = match &self.layout {
            Some(layout) if inputs.session.is_none() && self.lays_out(backends) => Some(
                layout
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            _ => None,
        };
        if let Some(layout) = layout.as_mut() {
            inputs.layout = layout.place(seed, key.len(), backends);
        }
        let placement = self.policy.is_placement(&inputs);
        // Caches are weighed only where some engine reports its size; the
        // occupancy is kept only then (it costs a lock and a clock read).
        let weighs =
            self.policy.bytes_per_token > 0.0 && backends.iter().any(|b| b.cache_tokens > 0);
        let now = (placement || weighs).then(std::time::Instant::now);
        // Where a new family fits: what each backend's cache keeps in use.
        held.clear();
        if let Some(now) = now.filter(|_| placement && weighs) {
            held.extend(backends.iter().map(|b| {
                let id = index::backend_id(b.name);
                self.occupancy.in_use(id, seed, now, inputs.reuse)
            }));
        }
        inputs.held = held;
        // A sibling placed moments ago, still connecting: its backend is
        // where the family goes (see `pending`).
        if let Some(now) = now.filter(|_| placement) {
            let sibling = self.pending_placements().get(inputs.placement, now);
            inputs.pending = sibling.and_then(|id| {
                backends
                    .iter()
                    .position(|b| index::backend_id(b.name) == id)
            });
        }
        // A request joining a sibling still connecting reuses its prefix as
        // surely as one that follows the index.
        if inputs.session.is_none() {
            self.reuse.observe(!placement || inputs.pending.is_some());
        }
        // A request following its family's prefix without extending a
        // whole earlier prompt, or joining a pending sibling, is a sibling:
        // it proves its seed a family.
        if let Some(layout) = layout.as_mut() {
            let sibling = (!placement && !extends) || inputs.pending.is_some();
            // What the family shares: the prefix the sibling followed, or,
            // joining a sibling still connecting, its whole key.
            let shared = match inputs.longest() {
                longest if sibling && longest > 0 => longest,
                _ => key.len(),
            };
            layout.observe(seed, sibling, shared);
        }
        drop(layout);
        let decision = Self::claimed(&self.policy, &inputs, claim)?;
        if let (Some(chosen), Some(now)) = (backends.get(decision.backend), now) {
            let id = index::backend_id(chosen.name);
            if placement {
                self.pending_placements().put(seed, id, now);
            }
            if weighs {
                self.occupancy.touch(id, seed, key.len(), now);
            }
        }
        Some(decision)
    }

    /// The decision for `inputs` whose backend `claim` took, if it was
    /// idle: the policy's, or an idle backend instead of a busy one
    /// ([`policy::idle_instead`]). Idle is what `inputs` showed a moment
    /// ago, and decisions taken at once on two threads see the same idle
    /// backend: when another request took it first, the policy decides
    /// again, that backend counted busy with a request like this one (or,
    /// for an idle backend instead of a busy one, keeps its own choice).
    /// Each refusal makes one more backend busy, so this ends.
    fn claimed(
        policy: &Policy,
        first: &policy::Inputs,
        mut claim: impl FnMut(&Decision) -> bool,
    ) -> Option<Decision> {
        // Allocated only when a claim is refused, which is rare.
        let mut taken: Option<Vec<BackendLoad>> = None;
        loop {
            let inputs = policy::Inputs {
                backends: taken.as_deref().unwrap_or(first.backends),
                ..*first
            };
            let decision = policy::choose(policy, &inputs)?;
            let instead = policy::idle_instead(policy, &inputs, &decision);
            let pick = instead.unwrap_or(decision);
            if inputs.backends.get(pick.backend)?.load() > 0 || claim(&pick) {
                return Some(pick);
            }
            if instead.is_some() {
                return Some(decision);
            }
            let views = taken.get_or_insert_with(|| first.backends.to_vec());
            let busy = views.get_mut(pick.backend)?;
            busy.in_flight += 1;
            busy.prefill = busy.prefill.saturating_add(first.key_len);
        }
    }

    /// Fills `matched` with the prefix of the request's key each backend
    /// holds, as far as the index knows (plus the reply a backend generated
    /// for the turn it served); true when the key extends a whole earlier
    /// prompt.
    fn matched_lengths(
        &self,
        request: &RouteRequest,
        backends: &[BackendLoad],
        walk: &mut Walk,
        matched: &mut Vec<usize>,
    ) -> bool {
        let key = request.key;
        self.index.walk_into(walk, request.model, key);
        let found = self.index.longest_matches(walk, key);
        matched.clear();
        matched.extend(
            backends
                .iter()
                .map(|b| found.get(index::backend_id(b.name))),
        );
        // A backend that served an earlier turn of this chat as a whole
        // also cached the reply it generated, which the index never saw.
        let reply = prompt::opening_reply_len(&key[found.whole.min(key.len())..]);
        if found.whole > 0 && reply > 0 {
            for m in matched.iter_mut().filter(|m| **m == found.whole) {
                *m += reply;
            }
        }
        found.whole > 0
    }

    /// How much of `key` placement hashes: the conversation prefix (the
    /// whole key outside a conversation), cut to `placement_prefix`, so a
    /// prefix family shares one seed.
    fn placement_len(&self, key: &[u8], conversation: usize) -> usize {
        let named = match conversation {
            0 => key.len(),
            n => n.min(key.len()),
        };
        match prompt::preamble_len(&key[..named]) {
            // A chat whose system part is most of its conversation prefix
            // belongs to that system prompt's family, which rule 2 follows:
            // every replica places the family, and so each of its
            // conversations, by the system part alone.
            Some(system) if system as f64 >= self.policy.follow_fraction * named as f64 => system,
            _ => named.min(self.policy.placement_prefix.max(1)),
        }
    }

    /// The table of pending placements; a panic while holding its lock
    /// leaves at worst a stale entry, which expires.
    fn pending_placements(&self) -> std::sync::MutexGuard<'_, pending::Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets everything the index holds for the backend called `name`
    /// (O(index entries); for a backend leaving the fleet).
    pub(crate) fn remove_backend(&self, name: &str) {
        self.index.remove_backend(index::backend_id(name));
        self.occupancy.remove_backend(index::backend_id(name));
    }

    /// Entries held by the prefix index.
    pub fn index_len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    /// A decision with the conversation unknown and no session.
    fn route(
        router: &Router,
        model: &[u8],
        key: &[u8],
        backends: &[BackendLoad],
    ) -> Option<Decision> {
        let request = RouteRequest {
            model,
            key,
            conversation: 0,
            session: None,
            later_turns: false,
            previous: None,
        };
        router.decide(&request, backends)
    }

    const MODEL: &[u8] = b"meta-llama/Llama-3.2-1B-Instruct";
    const NAMES: [&str; 4] = ["http://a:1", "http://b:1", "http://c:1", "http://d:1"];

    fn idle(n: usize) -> Vec<BackendLoad<'static>> {
        NAMES[..n]
            .iter()
            .map(|name| BackendLoad::new(name, 0))
            .collect()
    }

    /// A request; a key longer than a non-zero conversation prefix is taken
    /// for a later chat turn.
    fn request<'a>(key: &'a [u8], conversation: usize) -> RouteRequest<'a> {
        RouteRequest {
            model: MODEL,
            key,
            conversation,
            session: None,
            later_turns: conversation != 0 && conversation < key.len(),
            previous: None,
        }
    }

    /// A chat key: a system prompt, then alternating user/assistant turns.
    fn chat(system: &str, turns: &[&str]) -> (Vec<u8>, usize) {
        let mut key = format!("system\x1f{system}\x1e").into_bytes();
        let mut conversation = 0;
        for (i, turn) in turns.iter().enumerate() {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            key.extend_from_slice(format!("{role}\x1f{turn}\x1e").as_bytes());
            if i == 0 {
                conversation = key.len();
            }
        }
        (key, conversation)
    }

    /// A first user message that is most of its conversation prefix: a
    /// question about a document of its own.
    fn question(asked: &str) -> String {
        format!(
            "{asked}: {}",
            "words of this conversation's document ".repeat(20)
        )
    }

    #[test]
    fn one_off_prompts_of_a_cold_start_do_not_fill_a_cache() {
        // Four backends whose caches hold ten of these 4.8 KB prompts each
        // (at 4 bytes per token), and a router alone sending 64 prompts
        // that share nothing, faster than a young family grows up. Counted
        // whole, the young one-offs fill a cache in the router's view by
        // the 37th, and prompts are then moved off it.
        let sized: Vec<BackendLoad> = idle(4)
            .into_iter()
            .map(|b| b.with_cache_tokens(12_500).with_clients(Clients::Ours))
            .collect();
        let router = Router::new(64, 1 << 16);
        let mut reasons = Vec::new();
        for n in 0..64 {
            let own = format!("{n:03} {}", "a prompt that shares nothing. ".repeat(160));
            let d = route(&router, MODEL, own.as_bytes(), &sized).unwrap();
            reasons.push(d.reason);
        }
        // Traffic that shares nothing leaves the caches free for whatever
        // comes: no prompt is moved off its backend as if one were full.
        assert!(!reasons.contains(&Reason::CacheFull), "{reasons:?}");
    }

    #[test]
    fn families_in_use_keep_their_cache_and_a_new_one_goes_where_it_fits() {
        // Two backends whose caches hold three 4.8 KB templates each (at 4
        // bytes per token), and templates whose rendezvous backend is known.
        let sized: Vec<BackendLoad> = idle(2)
            .into_iter()
            .map(|b| b.with_cache_tokens(3_650))
            .collect();
        let ask = |family: usize, question: usize| {
            format!(
                "{}Question {question}?",
                format!("Template of tenant {family:03}. ").repeat(200)
            )
        };
        let plain = Router::new(64, 1 << 16);
        let mut by_rendezvous = [Vec::new(), Vec::new()];
        for family in 0..64 {
            let d = route(&plain, MODEL, ask(family, 0).as_bytes(), &idle(2)).unwrap();
            by_rendezvous[d.backend].push(family);
        }
        // Four families hash onto backend 0, then two onto backend 1: by
        // hashing alone backend 0 would hold four and evict.
        let families: Vec<usize> = by_rendezvous[0][..4]
            .iter()
            .chain(&by_rendezvous[1][..2])
            .copied()
            .collect();
        let router = Router::new(64, 1 << 16);
        let mut held = [0, 0];
        for (n, &family) in families.iter().enumerate() {
            let first = route(&router, MODEL, ask(family, 0).as_bytes(), &sized).unwrap();
            let expected = if n == 3 {
                (1, Reason::CacheFull)
            } else {
                (usize::from(n >= 4), Reason::Placed)
            };
            assert_eq!((first.backend, first.reason), expected, "family {n}");
            // Its sibling follows it there, which proves it a family.
            let sibling = route(&router, MODEL, ask(family, 1).as_bytes(), &sized).unwrap();
            assert_eq!(
                (sibling.backend, sibling.reason),
                (first.backend, Reason::PrefixMatch)
            );
            held[first.backend] += 1;
        }
        assert_eq!(held, [3, 3]);
        // With both caches full, a new family goes by rendezvous alone.
        let last = by_rendezvous[0][4];
        let d = route(&router, MODEL, ask(last, 0).as_bytes(), &sized).unwrap();
        assert_eq!((d.backend, d.reason), (0, Reason::Placed));
    }

    #[test]
    fn conversations_never_followed_as_siblings_are_placed_as_without_a_layout() {
        let policy = Policy {
            placement_epsilon: Some(0.25),
            ..Policy::default()
        };
        let bounded = Router::with_policy(32, 1 << 16, policy);
        let unbounded = Router::new(32, 1 << 16);
        // A system prompt too short to be worth following.
        let system = "You are a helpful assistant. ".repeat(4);
        for i in 0..64 {
            // First turns, and a later turn of each: one-offs as families
            // go, which the layout leaves to rendezvous.
            let (first, conv) = chat(&system, &[&question(&format!("first {i}"))]);
            let d = bounded.decide(&request(&first, conv), &idle(4)).unwrap();
            let u = unbounded.decide(&request(&first, conv), &idle(4)).unwrap();
            assert_eq!((d.backend, d.reason), (u.backend, Reason::Placed), "{i}");
            let (next, conv) = chat(&system, &[&question(&format!("first {i}")), "ok", "and?"]);
            let d = bounded.decide(&request(&next, conv), &idle(4)).unwrap();
            assert_eq!(
                (d.backend, d.reason),
                (u.backend, Reason::PrefixMatch),
                "{i}"
            );
            // A later turn of a conversation this router never saw goes
            // where a replica without the layout would have placed it.
            let asked = question(&format!("elsewhere {i}"));
            let (later, conv) = chat(&system, &[&asked, "an answer", "more"]);
            let db = bounded.decide(&request(&later, conv), &idle(4)).unwrap();
            let du = unbounded.decide(&request(&later, conv), &idle(4)).unwrap();
            assert_eq!((db.backend, db.reason), (du.backend, Reason::Placed), "{i}");
        }
    }

    #[test]
    fn families_lie_evenly_and_replicas_agree_on_them_under_the_layout() {
        // Three replicas, each seeing 8 families' requests (a 3 KiB
        // template, then a question) in its own order, on idle backends.
        let policy = Policy {
            placement_epsilon: Some(0.0),
            ..Policy::default()
        };
        let mut homes = Vec::new();
        for replica in 0..3 {
            let router = Router::with_policy(64, 1 << 16, policy);
            let home = homes_after(&router, &replica_order(replica), &idle(4));
            assert_eq!(per_backend(&home), [2; 4], "replica {replica}: {home:?}");
            homes.push(home);
        }
        assert!(homes.windows(2).all(|w| w[0] == w[1]), "{homes:?}");
        // Rendezvous alone would not have been even.
        assert_ne!(
            per_backend(&hashed()),
            [2; 4],
            "pick families that hash lumpily"
        );
    }

    /// Eight families in the layout tests: a 3 KiB template, then a
    /// question.
    const FAMILIES: usize = 8;

    fn template(family: usize, question: usize) -> String {
        format!(
            "{}Question {question}?",
            format!("Template of tenant {family}. ").repeat(120)
        )
    }

    /// Questions 0 to 5 of each of the [`FAMILIES`], in an order of
    /// replica `replica`'s own (an LCG shuffle).
    fn replica_order(replica: u64) -> Vec<(usize, usize)> {
        let mut requests: Vec<(usize, usize)> = (0..FAMILIES)
            .flat_map(|f| (0..6).map(move |q| (f, q)))
            .collect();
        let mut state = replica * 7919 + 1;
        for i in (1..requests.len()).rev() {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            requests.swap(i, (state >> 33) as usize % (i + 1));
        }
        requests
    }

    /// Where each family's next sibling goes through `router` over
    /// `views`, once it routed the questions `order`; each follows its
    /// family's prefix (or moves it).
    fn homes_after(router: &Router, order: &[(usize, usize)], views: &[BackendLoad]) -> Vec<usize> {
        for &(f, q) in order {
            route(router, MODEL, template(f, q).as_bytes(), views).unwrap();
        }
        (0..FAMILIES)
            .map(|f| route(router, MODEL, template(f, 99).as_bytes(), views).unwrap())
            .map(|d| {
                assert!(
                    matches!(d.reason, Reason::PrefixMatch | Reason::Moved),
                    "{d:?}"
                );
                d.backend
            })
            .collect()
    }

    /// Where each family's first question goes through a fresh router:
    /// its rendezvous winner.
    fn hashed() -> Vec<usize> {
        (0..FAMILIES)
            .map(|f| {
                let fresh = Router::new(64, 1 << 16);
                route(&fresh, MODEL, template(f, 0).as_bytes(), &idle(4))
                    .unwrap()
                    .backend
            })
            .collect()
    }

    /// Families per backend of `home`.
    fn per_backend(home: &[usize]) -> [usize; 4] {
        let mut per = [0; 4];
        for &b in home {
            per[b] += 1;
        }
        per
    }

    #[test]
    fn replicas_lay_families_out_by_room_and_agree_on_the_ones_they_move() {
        // The eight families hash lumpily onto four engines whose caches
        // hold two templates each, at the policy's 4 key bytes per token.
        // Three replicas with the default policy, each seeing the families
        // in its own order, and each knowing that other clients share the
        // engines.
        let views = |cache_tokens: usize, clients: Clients| -> Vec<BackendLoad<'static>> {
            idle(4)
                .into_iter()
                .map(|b| BackendLoad {
                    clients,
                    ..b.with_cache_tokens(cache_tokens)
                })
                .collect()
        };
        let shared = views(1536, Clients::Others);
        let mut homes = Vec::new();
        for replica in 0..3 {
            let home = homes_after(&Router::new(64, 1 << 16), &replica_order(replica), &shared);
            assert_eq!(per_backend(&home), [2; 4], "replica {replica}: {home:?}");
            homes.push(home);
        }
        assert!(homes.windows(2).all(|w| w[0] == w[1]), "{homes:?}");
        // Where they hash: lumpy, and so is where a replica puts them when
        // no cache size is known, or a router alone that weighs caches by
        // what it sent puts them when the caches are large.
        let hashed = hashed();
        assert_ne!(
            per_backend(&hashed),
            [2; 4],
            "pick families that hash lumpily"
        );
        for unweighed in [views(0, Clients::Others), views(1 << 20, Clients::Ours)] {
            let router = Router::new(64, 1 << 16);
            assert_eq!(homes_after(&router, &replica_order(0), &unweighed), hashed);
        }
    }

    #[test]
    fn tutorial_second_prompt_follows_the_first() {
        let router = Router::new(16, 1 << 16);
        let views: Vec<BackendLoad> = NAMES[..2].iter().map(|n| BackendLoad::new(n, 0)).collect();
        let first = route(&router, MODEL, b"What is the capital of France?", &views).unwrap();
        assert_eq!(first.reason, Reason::Placed);
        let second = route(
            &router,
            MODEL,
            b"What is the capital of France? And what is its population?",
            &views,
        )
        .unwrap();
        assert_eq!(second.backend, first.backend);
        assert_eq!(second.reason, Reason::PrefixMatch);
        assert_eq!(second.matched, 30);
    }

    #[test]
    fn a_completion_that_extends_a_whole_prompt_follows_it() {
        // Flat prompts name themselves entirely (conversation = key length),
        // yet the follow-up extends the first prompt as a whole.
        let router = Router::new(32, 1 << 16);
        let first: &[u8] = b"What is the capital of France?";
        let a = router
            .decide(&request(first, first.len()), &idle(4))
            .unwrap();
        assert_eq!(a.reason, Reason::Placed);
        let second: &[u8] = b"What is the capital of France? And what is its population?";
        for _ in 0..2 {
            let b = router
                .decide(&request(second, second.len()), &idle(4))
                .unwrap();
            assert_eq!((b.backend, b.reason), (a.backend, Reason::PrefixMatch));
        }
        // A prompt that only shares a block with it is placed on its own.
        let other: &[u8] = b"What is the capital of Spain?";
        let c = router
            .decide(&request(other, other.len()), &idle(4))
            .unwrap();
        assert_eq!(c.reason, Reason::Placed);
    }

    #[test]
    fn a_long_match_outweighs_a_little_load() {
        let router = Router::new(32, 1 << 16);
        let (turn1, conv) = chat(&"s".repeat(4000), &["hello"]);
        let first = router.decide(&request(&turn1, conv), &idle(4)).unwrap();
        let (turn2, conv2) = chat(&"s".repeat(4000), &["hello", "hi!", "how are you?"]);
        assert_eq!(conv, conv2);
        // Every backend but one is busy with one request; the holder stays
        // within the load bound, and 4 KiB cached outweighs one request.
        let mut busy = idle(4);
        for (i, b) in busy.iter_mut().enumerate() {
            b.in_flight = usize::from(i != (first.backend + 1) % 4);
        }
        let second = router.decide(&request(&turn2, conv2), &busy).unwrap();
        assert_eq!(
            (second.backend, second.reason),
            (first.backend, Reason::PrefixMatch)
        );
        assert!(second.matched >= turn1.len());
    }

    #[test]
    fn selection_lists_every_candidate_chosen_first_then_by_load() {
        let router = Router::new(64, 1 << 16);
        let loads: Vec<BackendLoad> = NAMES
            .iter()
            .zip([5, 0, 9, 2])
            .map(|(name, load)| BackendLoad::new(name, load))
            .collect();
        let (mut walk, mut order) = (Walk::default(), Vec::new());
        // No prompt: the least loaded, then the rest by load.
        let d = router
            .select(None, &loads, &mut walk, &mut order, |_| true)
            .unwrap();
        assert_eq!(
            (d.backend, d.reason, d.matched),
            (1, Reason::LeastLoaded, 0)
        );
        assert_eq!(order, [1, 3, 0, 2]);
        // A prompt: its choice first, whatever its load.
        let key = b"Summarise this report for the board.";
        let d = router
            .select(
                Some(&request(key, 0)),
                &loads,
                &mut walk,
                &mut order,
                |_| true,
            )
            .unwrap();
        assert_eq!(order[0], d.backend);
        let mut rest = order[1..].to_vec();
        rest.sort_by_key(|&i| loads[i].load());
        assert_eq!(rest, order[1..]);
        assert_eq!(order.len(), 4);
        // No candidates, no selection.
        assert!(
            router
                .select(None, &[], &mut walk, &mut order, |_| true)
                .is_none()
        );
        assert!(order.is_empty());
    }

    #[test]
    fn a_selection_is_learned_only_where_it_is_recorded() {
        let router = Router::new(64, 1 << 16);
        let backends = idle(4);
        let first = "You are a careful assistant. ".repeat(40);
        let second = format!("{first}And a follow-up.");
        let (mut walk, mut order) = (Walk::default(), Vec::new());
        let chosen = router
            .select(
                Some(&request(first.as_bytes(), 0)),
                &backends,
                &mut walk,
                &mut order,
                |_| true,
            )
            .unwrap();
        // The chosen backend could not be reached; the request went to the
        // last in the fallback order, and only that is recorded.
        let took = *order.last().unwrap();
        assert_ne!(took, chosen.backend);
        assert_eq!(router.index_len(), 0, "select alone records nothing");
        router.record(&walk, first.as_bytes(), backends[took].name);
        let d = route(&router, MODEL, second.as_bytes(), &backends).unwrap();
        assert_eq!((d.backend, d.reason), (took, Reason::PrefixMatch));
        assert_eq!(d.matched, first.len());
    }

    #[test]
    fn siblings_of_a_pending_placement_stay_together_under_the_placement_bound() {
        // A fresh router: the family's first placement is all the bound has
        // seen, so counting a sibling again would put that backend over it.
        let router = Router::with_policy(
            64,
            1 << 16,
            Policy {
                placement_epsilon: Some(0.25),
                ..Policy::default()
            },
        );
        let mut views = idle(4);
        let chosen = select_a_burst_of_siblings(&router, &mut views);
        assert_eq!(chosen.len(), 1, "the family was copied to {chosen:?}");
    }

    /// Selects three requests of one new family (a 3 KiB template,
    /// different questions) in a burst, each before the index could learn
    /// of the ones before; each counts on its backend from its selection
    /// on (one more in flight, its whole prompt queued for prefill), as in
    /// the daemon. Returns the backends chosen.
    fn select_a_burst_of_siblings(router: &Router, views: &mut [BackendLoad]) -> HashSet<usize> {
        let template = "Answer from the attached contract only. ".repeat(80);
        let (mut walk, mut order) = (Walk::default(), Vec::new());
        let mut chosen = HashSet::new();
        for question in ["Who signs?", "When does it end?", "What does it cost?"] {
            let key = format!("{template}{question}");
            let d = router
                .select(
                    Some(&request(key.as_bytes(), 0)),
                    views,
                    &mut walk,
                    &mut order,
                    |_| true,
                )
                .unwrap();
            let there = &mut views[d.backend];
            there.in_flight += 1;
            there.prefill += key.len();
            chosen.insert(d.backend);
        }
        chosen
    }

    #[test]
    fn siblings_selected_before_the_first_is_recorded_stay_together() {
        let router = Router::new(64, 1 << 16);
        // Recent traffic shared nothing, so a new prompt alone is free to
        // spread by load.
        for i in 0..256 {
            let own = format!("{i}: a prompt of its own {}", "words ".repeat(300));
            route(&router, MODEL, own.as_bytes(), &idle(4)).unwrap();
        }
        let mut views = idle(4);
        let chosen = select_a_burst_of_siblings(&router, &mut views);
        assert_eq!(chosen.len(), 1, "the family was copied to {chosen:?}");
        // A prompt of another family still spreads away from that prefill.
        let (mut walk, mut order) = (Walk::default(), Vec::new());
        let other = format!("{}Next?", "A different template altogether. ".repeat(80));
        let d = router
            .select(
                Some(&request(other.as_bytes(), 0)),
                &views,
                &mut walk,
                &mut order,
                |_| true,
            )
            .unwrap();
        assert!(!chosen.contains(&d.backend), "{d:?}");
    }

    #[test]
    fn an_idle_engine_goes_to_the_request_that_claims_it_and_its_siblings_follow() {
        // A router alone whose recent traffic shared little: its reuse rate
        // fell from its cold start's 1 to 2 in 12, where a new prompt's
        // family lead still holds it to its rendezvous backend.
        let router = Router::new(64, 1 << 16);
        let alone = |views: Vec<BackendLoad<'static>>| -> Vec<BackendLoad<'static>> {
            views
                .into_iter()
                .map(|b| b.with_clients(Clients::Ours))
                .collect()
        };
        for i in 0..10 {
            let own = format!("{i}: a prompt of its own {}", "words ".repeat(300));
            route(&router, MODEL, own.as_bytes(), &alone(idle(4))).unwrap();
        }
        // Three engines answer a request each; the last is idle. Templates
        // whose rendezvous backend is busy.
        let views = alone(idle(4));
        let mut busy = views.clone();
        for b in &mut busy[..3] {
            b.in_flight = 1;
        }
        let template = |n: usize| {
            format!(
                "{n:04} Answer from this contract. {}",
                "Clause. ".repeat(400)
            )
        };
        let on_busy = (0..64)
            .map(template)
            .filter(|t| {
                route(&Router::new(64, 1 << 16), MODEL, t.as_bytes(), &views)
                    .is_some_and(|d| d.backend != 3)
            })
            .take(2)
            .collect::<Vec<_>>();
        assert_eq!(on_busy.len(), 2, "templates that hash onto a busy engine");
        let select =
            |key: &str, views: &[BackendLoad], claim: &mut dyn FnMut(&Decision) -> bool| {
                let (mut walk, mut order) = (Walk::default(), Vec::new());
                router
                    .select(
                        Some(&request(key.as_bytes(), 0)),
                        views,
                        &mut walk,
                        &mut order,
                        claim,
                    )
                    .unwrap()
            };
        let sibling = |template: &str| format!("{template} Who signs?");
        // Claimed: the idle engine takes it, and a sibling selected before
        // the index learns of it joins it there.
        let mut offered = Vec::new();
        let d = select(&on_busy[0], &busy, &mut |d| {
            offered.push(d.backend);
            true
        });
        assert_eq!((d.backend, d.reason), (3, Reason::Idle));
        assert_eq!(offered, [3]);
        let mut now = busy.clone();
        now[3].in_flight = 1;
        let next = select(&sibling(&on_busy[0]), &now, &mut |_| panic!("none is idle"));
        assert_eq!(next.backend, 3);
        // Taken by another request first: the choice without the idle
        // engine stands, and the sibling joins it there, not the engine
        // the first never reached.
        let d = select(&on_busy[1], &busy, &mut |_| false);
        assert_ne!(d.backend, 3);
        assert_ne!(d.reason, Reason::Idle);
        let next = select(&sibling(&on_busy[1]), &now, &mut |_| panic!("none is idle"));
        assert_eq!(next.backend, d.backend);
    }

    #[test]
    fn a_decision_for_an_idle_backend_another_request_took_is_taken_again() {
        // A router alone whose traffic shares nothing: a new prompt goes
        // where it waits least.
        let router = Router::new(64, 1 << 16);
        let views: Vec<_> = idle(4)
            .into_iter()
            .map(|b| b.with_clients(Clients::Ours))
            .collect();
        for i in 0..64 {
            let own = format!("{i}: a prompt of its own {}", "words ".repeat(300));
            route(&router, MODEL, own.as_bytes(), &views).unwrap();
        }
        let (mut walk, mut order) = (Walk::default(), Vec::new());
        let mut select = |n: usize, claim: &mut dyn FnMut(&Decision) -> bool| {
            let prompt = format!("{n}: a new prompt. {}", "words ".repeat(300));
            router
                .select(
                    Some(&request(prompt.as_bytes(), 0)),
                    &views,
                    &mut walk,
                    &mut order,
                    claim,
                )
                .unwrap()
        };
        // Every backend is idle: the first offered is taken.
        let mut offered = Vec::new();
        let d = select(1, &mut |d| {
            offered.push(d.backend);
            true
        });
        assert_eq!(offered, [d.backend]);
        // Another request took it: the router decides again, that one
        // counted busy, and offers the next.
        let mut offered = Vec::new();
        let again = select(2, &mut |d| {
            offered.push(d.backend);
            offered.len() == 2
        });
        assert_eq!(offered.len(), 2);
        assert_eq!(again.backend, offered[1]);
        assert_ne!(offered[1], offered[0]);
        // Each taken in turn: every backend is offered once, and the
        // decision is then among busy ones.
        let mut offered = Vec::new();
        select(3, &mut |d| {
            offered.push(d.backend);
            false
        });
        offered.sort_unstable();
        assert_eq!(offered, [0, 1, 2, 3]);
    }

    #[test]
    fn replicas_agree_on_a_new_family_where_traffic_shares_prefixes() {
        let family = format!(
            "{}Which plan fits me?",
            "A tenant's RAG template. ".repeat(80)
        );
        let probe = Router::new(64, 1 << 16);
        let home = route(&probe, MODEL, family.as_bytes(), &idle(4))
            .unwrap()
            .backend;
        // A replica that sees the family's first request while its home
        // is busy: 10 in flight there, 1 elsewhere (bound 5).
        let busy: Vec<BackendLoad> = NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| BackendLoad::new(name, if i == home { 10 } else { 1 }))
            .collect();
        let warmed = |shares: bool| {
            let router = Router::new(64, 1 << 16);
            let system = "You are the support agent of a shop. ".repeat(60);
            for i in 0..256 {
                let key = if shares {
                    format!("{system}Question {i}?")
                } else {
                    format!("{i}: a prompt of its own {}", "words ".repeat(300))
                };
                route(&router, MODEL, key.as_bytes(), &idle(4)).unwrap();
            }
            router
        };
        // Its recent traffic followed cached prefixes: the new prompt likely
        // starts a family, and it goes where the idle replica put it.
        let d = route(&warmed(true), MODEL, family.as_bytes(), &busy).unwrap();
        assert_eq!((d.backend, d.reason), (home, Reason::Placed));
        // Its recent traffic shared nothing: load spreads it.
        let d = route(&warmed(false), MODEL, family.as_bytes(), &busy).unwrap();
        assert_ne!(d.backend, home);
    }

    #[test]
    fn replicas_agree_on_conversations_behind_a_long_system_prompt() {
        // The system prompt is most of each first turn: its conversations
        // follow it, and a replica that never saw one of them sends its
        // later turns to the same backend.
        let system = "You are a helpful assistant. ".repeat(40);
        let seen = Router::new(32, 1 << 16);
        for i in 0..16 {
            let (first, conv) = chat(&system, &[&format!("question {i}")]);
            let home = seen.decide(&request(&first, conv), &idle(4)).unwrap();
            let (later, conv) = chat(&system, &[&format!("question {i}"), "an answer", "more"]);
            let fresh = Router::new(32, 1 << 16);
            let there = fresh.decide(&request(&later, conv), &idle(4)).unwrap();
            assert_eq!(there.backend, home.backend, "conversation {i}");
        }
    }

    #[test]
    fn the_backend_that_wrote_a_reply_is_credited_with_it() {
        // A shared system prompt that every backend holds, a short question,
        // then a long reply: only the backend that generated the reply has it
        // cached, though the index never saw it.
        let router = Router::new(32, 1 << 16);
        let system = "You are a helpful assistant. ".repeat(40);
        let (turn1, conv) = chat(&system, &["hi"]);
        let home = router.decide(&request(&turn1, conv), &idle(4)).unwrap();
        for (i, other) in NAMES.iter().enumerate().filter(|&(i, _)| i != home.backend) {
            let (elsewhere, conv) = chat(&system, &[&format!("another {i}")]);
            let pin = [BackendLoad::new(other, 0)];
            router.decide(&request(&elsewhere, conv), &pin).unwrap();
        }
        let reply = "Here is a long and careful answer. ".repeat(120);
        let (turn2, conv2) = chat(&system, &["hi", &reply, "thanks!"]);
        // The home backend is busier by three requests.
        let mut busy = idle(4);
        busy[home.backend].in_flight = 3;
        let d = router.decide(&request(&turn2, conv2), &busy).unwrap();
        assert_eq!((d.backend, d.reason), (home.backend, Reason::PrefixMatch));
        assert!(d.matched > turn1.len() + reply.len(), "{d:?}");
    }

    #[test]
    fn hot_prefix_spreads_under_load() {
        let router = Router::new(32, 1 << 16);
        let prompt = "the same long few-shot prompt, sent over and over ".repeat(40);
        let mut views = idle(4);
        let mut used = HashSet::new();
        let mut reasons = HashSet::new();
        let mut reused = 0;
        let sent = 160;
        for _ in 0..sent {
            let d = router
                .decide(&request(prompt.as_bytes(), 0), &views)
                .unwrap();
            // Nothing finishes: every choice adds load.
            views[d.backend].in_flight += 1;
            used.insert(d.backend);
            reasons.insert(d.reason);
            reused += usize::from(d.matched == prompt.len());
        }
        assert_eq!(used.len(), 4, "{used:?}");
        assert!(
            reasons.contains(&Reason::Spread) || reasons.contains(&Reason::LeastLoaded),
            "{reasons:?}"
        );
        // Each backend computed it once; every other request reused it.
        assert_eq!(reused, sent - used.len());
        // The prefix is now recorded on several backends, and once the load
        // evens out the holders share it.
        let found = router.index.lookup(MODEL, prompt.as_bytes());
        assert!(found.as_slice().len() > 1, "{found:?}");
    }

    #[test]
    fn independent_routers_place_conversations_alike() {
        // With the family layout on; off (the default), they agree always.
        let policy = Policy {
            placement_epsilon: Some(0.25),
            ..Policy::default()
        };
        let a = Router::with_policy(32, 1 << 16, policy);
        let b = Router::with_policy(32, 1 << 16, policy);
        // A system prompt too short to be worth following.
        let system = "You are a helpful assistant. ".repeat(4);
        let mut used = HashSet::new();
        let mut agree = 0;
        for i in 0..64 {
            let asked = question(&format!("question number {i}"));
            let (key, conv) = chat(&system, &[&asked]);
            let da = a.decide(&request(&key, conv), &idle(4)).unwrap();
            let db = b.decide(&request(&key, conv), &idle(4)).unwrap();
            assert_eq!(da.backend, db.backend, "conversation {i}");
            used.insert(da.backend);
            // Later turns of the conversation stay put on its router, and a
            // router that never saw it places it by rendezvous alone: where
            // the first turn went unless the layout moved it.
            let (later, conv2) = chat(&system, &[&asked, "an answer", "a follow-up"]);
            let fresh = Router::with_policy(32, 1 << 16, policy);
            let dl = a.decide(&request(&later, conv2), &idle(4)).unwrap();
            let df = fresh.decide(&request(&later, conv2), &idle(4)).unwrap();
            assert_eq!((dl.backend, dl.reason), (da.backend, Reason::PrefixMatch));
            assert_eq!(df.reason, Reason::Placed);
            if da.reason == Reason::Placed {
                assert_eq!(df.backend, da.backend, "conversation {i}");
            }
            agree += usize::from(df.backend == da.backend);
        }
        assert!(used.len() == 4, "64 conversations used only {used:?}");
        eprintln!("a router that never saw them agrees on {agree} of 64 conversations");
        assert!(agree >= 48, "a fresh router agrees on only {agree} of 64");
    }

    #[test]
    fn round_robin_ignores_prefixes_and_learns_nothing() {
        let router = Router::with_policy(
            32,
            1 << 16,
            Policy {
                logic: Logic::RoundRobin,
                ..Policy::default()
            },
        );
        let key = "the same long prompt, sent again and again".repeat(8);
        let chosen: Vec<usize> = (0..8)
            .map(|_| {
                let d = router
                    .decide(&request(key.as_bytes(), key.len()), &idle(4))
                    .unwrap();
                assert_eq!((d.reason, d.matched), (Reason::RoundRobin, 0));
                d.backend
            })
            .collect();
        assert_eq!(chosen, [0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(router.index_len(), 0);
    }

    #[test]
    fn sessions_stick() {
        let router = Router::new(32, 1 << 16);
        let mut first = None;
        for i in 0..20 {
            let key = format!("unrelated prompt {i}");
            let d = router
                .decide(
                    &RouteRequest {
                        session: Some(b"session-42"),
                        ..request(key.as_bytes(), key.len())
                    },
                    &idle(4),
                )
                .unwrap();
            assert_eq!(d.reason, Reason::Session);
            assert_eq!(*first.get_or_insert(d.backend), d.backend);
        }
    }

    #[test]
    fn removed_backend_is_never_chosen() {
        let router = Router::new(16, 1 << 16);
        let all = idle(4);
        let prompt = b"a conversation placed somewhere, then its backend leaves";
        let d = router.decide(&request(prompt, 0), &all).unwrap();
        let gone = all[d.backend].name;
        router.remove_backend(gone);
        let rest: Vec<BackendLoad> = all.iter().copied().filter(|b| b.name != gone).collect();
        for i in 0..50 {
            let key = format!("{}{i}", String::from_utf8_lossy(prompt));
            for conversation in [0, key.len()] {
                let d = router
                    .decide(&request(key.as_bytes(), conversation), &rest)
                    .unwrap();
                assert_ne!(rest[d.backend].name, gone);
            }
        }
        // And its old entries do not resolve even if it came back.
        assert_eq!(
            router
                .index
                .lookup(MODEL, prompt)
                .get(index::backend_id(gone)),
            0
        );
    }

    #[test]
    fn reasons_have_distinct_names() {
        let names: HashSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    proptest! {
        /// Any prompt that extends an earlier one routes to where it went.
        #[test]
        fn extension_follows_its_prefix(
            first in proptest::collection::vec(any::<u8>(), 1..200),
            more in proptest::collection::vec(any::<u8>(), 0..200),
            block in 1usize..=64,
        ) {
            let router = Router::new(block, 1 << 16);
            let views: Vec<BackendLoad> = NAMES.iter().map(|n| BackendLoad::new(n, 0)).collect();
            let a = route(&router, MODEL, &first, &views).unwrap();
            let extended = [first.as_slice(), &more].concat();
            let b = route(&router, MODEL, &extended, &views).unwrap();
            prop_assert_eq!(b.backend, a.backend);
            prop_assert!(b.matched >= first.len());
        }

        /// Placement is stable as backends come and go: a conversation moves
        /// only when its backend leaves (rendezvous property).
        #[test]
        fn placement_moves_only_when_its_backend_leaves(
            keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..64), 1..20),
            leave in 0usize..4,
        ) {
            let all = idle(4);
            let rest: Vec<BackendLoad> = all.iter().copied().enumerate()
                .filter(|&(i, _)| i != leave).map(|(_, b)| b).collect();
            for key in &keys {
                let before = Router::new(16, 1024).decide(&request(key, key.len()), &all).unwrap();
                let after = Router::new(16, 1024).decide(&request(key, key.len()), &rest).unwrap();
                if before.backend != leave {
                    prop_assert_eq!(rest[after.backend].name, all[before.backend].name);
                }
            }
        }
    }
}
