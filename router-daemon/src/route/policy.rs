//! The decision policy: a pure function of what the index matched, the
//! request's placement hashes and the backends' load.
//!
//! # Cost
//! Backends are compared by an estimate of what the request would wait for
//! there, in units of KiB of prefill:
//!
//! - following a cached prefix (rule 2): `affinity_weight × uncached +
//!   load_weight × load`, where `uncached` is the KiB of key the backend
//!   would have to prefill (the key less what the index says it holds) and
//!   `load` is its requests in flight or waiting ([`BackendLoad::load`]);
//! - placing a new request (rule 3), which every backend must prefill
//!   whole: `prefilling_weight × prefilling + load_weight × load`, where
//!   `prefilling` is the KiB of key of this router's requests there whose
//!   response has not begun ([`BackendLoad::prefill`]): an engine prefills
//!   what arrives together in one step, so a newcomer waits for all of it,
//!   and a burst of new prompts spreads instead of queueing on one backend.
//!
//! A request following a cached prefix is weighed without `prefilling`:
//! waiting behind another request's prefill is cheaper than copying the
//! prefix to another backend, where it also evicts what that backend held
//! (in one `--quick` run of `cargo xtask bench quality` while this policy
//! was written, counting it there dropped shared-prefix from 77% to 51% of
//! the ideal hit rate and raised the mean TTFT; that variant is not kept as
//! a flag).
//!
//! # Load bound
//! With `n` candidates and total load `L` (counting the new request), the
//! bound is `ceil((1 + ε) · L / n)`, and never below `ceil(L / n)`. A backend
//! whose load would exceed it is never chosen for a session or a new
//! conversation; since the least-loaded backend is always within
//! `ceil(L / n)`, some backend always qualifies ("consistent hashing with
//! bounded loads", Mirrokni et al.). A request that follows a cached prefix
//! may stretch it by what the prefix is worth (rule 2).
//!
//! # Order of rules
//! 1. **Session.** A request with a session value goes to the backend with the
//!    highest rendezvous score for that value ([`Reason::Session`]), or, when
//!    that one is over the bound, to the next in rendezvous order
//!    ([`Reason::Overloaded`]).
//! 2. **Follow a cached prefix.** When some backend holds a prefix worth
//!    following, the request goes to the cheapest backend (following cost),
//!    among those whose load is below `bound + ⌊affinity_weight × matched
//!    KiB / load_weight⌋` (the prefix's worth in requests); ties go by
//!    rendezvous score. A prefix is worth following when the request
//!    extends an earlier prompt as a whole (`extends`: the tutorial's
//!    second completion), when it covers the request's conversation prefix
//!    (a later turn, see
//!    [`RouteRequest::conversation`](super::RouteRequest::conversation)), or
//!    when it covers at least [`Policy::follow_fraction`] of that
//!    conversation prefix: a sibling, such as a long system prompt or
//!    few-shot block followed by a different question. The reason is
//!    [`Reason::PrefixMatch`] when the winner holds the longest match,
//!    [`Reason::Spread`] when the backends holding it are past their bound
//!    (a hot prefix spills, and the index then records it on the new
//!    backend too, so it spreads over as many backends as its load needs),
//!    and [`Reason::LeastLoaded`] when the cost outweighed a longer match.
//! 3. **Placement.** Otherwise the request starts something new to the
//!    fleet, and what it shares (a short common preamble) is not worth
//!    moving it for: it goes by rendezvous hashing of a hash of the model
//!    and its *leading part* (`key[..min(conversation, placement_prefix)]`,
//!    or for a chat whose messages before the first user message are at
//!    least [`Policy::follow_fraction`] of its conversation prefix, those
//!    alone; see [`super::Router`]), so router replicas with no shared state
//!    place a new prefix family, or a new conversation, alike. The rendezvous
//!    winner (or the request's place in the family layout, if on) among
//!    backends within the load bound keeps the request ([`Reason::Placed`])
//!    unless another backend is cheaper by more than
//!    [`Policy::rendezvous_weight`] cost units
//!    ([`Reason::LeastLoaded`]: a burst of new prompts does not queue
//!    behind one prefill), or it is over the bound ([`Reason::Overloaded`]);
//!    both margins grow with what the prompt is worth as a family (below).
//!    A later chat turn of a conversation this router never saw is placed
//!    by rendezvous alone (within the load bound): that is where a replica
//!    that saw its first turn most likely placed it. A sibling of a request
//!    placed moments ago, which the index has not learned yet because that
//!    request is still connecting ([`Inputs::pending`]), takes the
//!    rendezvous winner's part: a burst of one family's first requests
//!    lands on one backend instead of being copied onto several. A new
//!    prompt whose rendezvous backend has no room left in its KV cache
//!    takes the next in rendezvous order with room instead
//!    ([`Reason::CacheFull`], below). Where the router is alone, a new
//!    prompt that this sends to a busy backend goes to an idle one
//!    instead ([`Reason::Idle`], below).
//!
//! # Room in the cache
//! Hashing a dozen families onto four backends is lumpy, and a backend
//! given more families than its KV cache holds evicts them in turn: each
//! request of each family there prefills it again, while another backend
//! holds half of what it could. The router knows each engine's cache size
//! (`vllm:cache_config_info`: `num_gpu_blocks × block_size` tokens,
//! [`BackendLoad::cache_tokens`]) and which families it keeps in use there
//! (`super::occupancy`: families a second request proved, touched in the
//! last minute, and new ones weighed by how often new ones were proven, at
//! most by the reuse rate where that is low),
//! in key bytes ([`Inputs::held`]). A new prompt *fits* a backend when
//! those bytes and its own key are within its cache, at the key bytes per
//! token the engine's own prompt-token counter showed for this router's
//! requests ([`BackendLoad::bytes_per_token`]), or until it has, at
//! [`Policy::bytes_per_token`] (`--bytes-per-token`, 4: English text with
//! Llama-3's tokenizer). When its rendezvous backend has no room and some
//! backend within the load bound has, rule 3 places it on the next in
//! rendezvous order with room and considers only backends with room; where
//! none has room (the working set is larger than the fleet's caches), or
//! no cache size is known, placement is as before. Rule 2 is untouched: a
//! family already placed stays where it is.
//!
//! Replicas each know only the families they sent, so their views of which
//! caches are full differ, and a family moved by one replica's view is
//! copied where the others place it: in one `router-bench quality --quick
//! --daemon-replicas 3` run, three replicas weighing caches fell from
//! 90% / 85% of the ideal hit rate (shared-prefix / prefix-repetition at
//! 2 sessions) to 77% / 80%. So caches are weighed only while no candidate
//! is known to serve [other clients](super::Clients::Others) (numbers in
//! the README).
//!
//! Replicas weigh caches another way: where some engine reports its cache
//! size and some candidate is known to serve other clients, the router
//! lays the families it knows out by room ([`super::layout`], `Room`):
//! ranked by placement seed, each on the first backend in its rendezvous
//! order whose cache holds it beside the families ranked above it, at
//! [`Policy::bytes_per_token`]. Replicas that know the same families
//! agree on every place whatever order they saw them in, and a family
//! that fits where it hashes stays there, so only what a lumpy hash piled
//! beyond a cache moves, once ([`Reason::Moved`]), and the same family on
//! every replica. Rule 3 places a new prompt at its place ([`Inputs::layout`])
//! and rule 2 sends a sibling there, as under the opt-in family layout
//! (below). Three replicas (`router-bench quality --no-peers --routers
//! router-daemon --daemon-replicas 3 --workloads
//! prefix-repetition,shared-prefix,multi-turn --levels c4,c16,c64 --seed N`,
//! N of 1–3, 2026-12-07) went from 77–100% of the ideal hit rate on
//! prefix-repetition to 92–99%, and from 92–100% on shared-prefix to
//! 94–99%; seeds 2 and 3 hash the twelve prefix-repetition families 7 or 6
//! to one backend whose cache holds four. One router is unchanged.
//!
//! # A new prompt's family
//! A new prompt's first request cannot tell a one-off from the first of a
//! family (a system prompt, a template, a conversation's later turns), but
//! the router sees how its recent traffic behaved: [`Inputs::reuse`] is the
//! fraction of recent requests that followed a cached prefix. Moving a
//! family's first request off its rendezvous backend puts the family where
//! other replicas will not look for it, and they then prefill it again
//! elsewhere. So rule 3 treats the prompt's conversation prefix, weighed by
//! `reuse` × [`Policy::family_weight`], like a cached prefix of that size on
//! the rendezvous backend: it may pass the load bound by what that is worth
//! in requests, and another backend must be cheaper by that much more than
//! the rendezvous weight. Where nothing is reused, `reuse` falls to 0 and
//! placement spreads by load as before. In `router-bench quality --levels
//! c16 --daemon-replicas 3` (three runs each) family weight 1 raised three
//! replicas' hit rate from 71–74% to 82–86% of the ideal on shared-prefix
//! and from 75–81% to 87–93% on prefix-repetition, one router staying at
//! 98–99%. The defaults (family weight 10, load weight 0.1) come from
//! `router-bench quality --no-peers --routers router-daemon --levels
//! c4,c16,c64 --daemon-replicas 3 --workloads
//! shared-prefix,prefix-repetition,no-sharing,multi-turn`, run with and
//! without them: at 64 sessions one router went from 93% / 88% of the ideal
//! (shared-prefix / prefix-repetition) to 97% / 98%, three replicas from
//! 78% / 76% to 98% / 98%, and the mean TTFT from 148–269 ms to 97–112 ms;
//! at 16 sessions three replicas went from 86% / 90% to 99% / 99%. Load
//! weight 0.25 made a holder of a long prefix copy it elsewhere once it
//! had 30 more requests in flight, which at 64 sessions happened to every
//! family's busiest holder, and each copy evicted other families. The cost
//! is a cold start on traffic that shares nothing: `reuse` starts at 1, so
//! the first no-sharing requests are held to their rendezvous backends. The
//! start counts as two observations and the rate is a plain average until
//! it has seen 64 (see `reuse`), and a request that joins a pending sibling
//! counts as reuse, so the rate falls within a few dozen unshared requests
//! while a shared cold start keeps it high. Same run, old and new binary
//! (`router-bench quality --no-peers --routers round-robin,router-daemon
//! --levels c4,c16,c64 --daemon-replicas 3 --workloads
//! no-sharing,shared-prefix,prefix-repetition --router-bin ...`): one router's
//! no-sharing mean TTFT against round-robin went from 1.21× / 1.18× / 1.04×
//! to 1.04× / 0.98× / 1.08× at 4 / 16 / 64 sessions, three replicas' from
//! 1.32× / 1.50× / 1.18× to 1.22× / 1.32× / 0.94× (each replica sees a
//! third of the traffic); hit rates on the sharing workloads moved by
//! −4.5 to +1.3 points, within run-to-run noise.
//!
//! That hold has a price near capacity: in a cold start, new families whose
//! first prompts hash onto one backend queue behind each other's prefill.
//! [`Policy::placement_patience`] (`--placement-patience`, half a prompt) caps
//! the family's worth in the lead, not in the load bound, at that many
//! prompts of the prompt's own size, unless a pending sibling proved the
//! family. For one router, which sees every request's prefill, 1 cut the
//! p99 TTFT near capacity by a third, and 0.5, which also moves the second
//! of two colliding first prompts, cut it further at light load; with
//! replicas, each spreads by its own view and copies families the others
//! place on their rendezvous backend. So it holds only while the router
//! knows it is alone: no candidate has [other
//! clients](super::Clients::Others), and some are known to have [only
//! ours](super::Clients::Ours), as the backends' scraped queues show or,
//! before they do, the router's known peers (`--peers`, `--peer-selector`,
//! see [`super::Clients::given_peers`]); numbers in the README. With
//! [`PatienceHolds::UntilShared`] (`--placement-patience-when
//! until-shared`) it holds from the start until another client is seen: a
//! router alone in front of its backends, but not told so, then spreads a
//! cold start's burst of new prompts, which replicas started together would
//! each spread their own way.
//!
//! # Near-ties where the router is alone
//! An engine prefills what arrived together in one step, so a new prompt
//! waits for the step under way and then for its own. Where every
//! candidate is prefilling about as much, the cheapest by cost is a coin
//! toss, and the toss often lands on a backend whose prefill began a moment
//! ago while another's is nearly done. Round-robin never does: each
//! backend gets its next request as late as it can. So where the router
//! knows it is alone (as placement patience, above), a new prompt that no
//! pending sibling proved a family and no layout places goes to the
//! rendezvous winner only when that wins by more than
//! [`Policy::recency_margin`] prompts of its own size (`--recency-margin`,
//! a quarter); otherwise, when every backend within that margin of the
//! cheapest is prefilling, to the one of them sent a request least
//! recently ([`BackendLoad::last_start`]), and when one of them prefills
//! nothing, to the cheapest as before. Alone, the rendezvous weight in the
//! lead is weighed by the reuse rate: it keeps families where replicas
//! would look for them, and there are none. In per-request records of
//! `router-bench quality --workloads no-sharing --levels c64,cap0.9`
//! (seeds 1–3, 2026-12-07), whenever every backend had one prompt queued
//! for prefill, round-robin's request always went behind the oldest, the
//! cheapest-cost choice in 39–46 of 61–79 such cases behind a younger one
//! (about 100 against 90 ms to first token). With the rule, no-sharing's
//! mean TTFT near capacity went from 1.07–1.11× round-robin's to
//! 1.02–1.04×, and at 16 sessions from 1.07–1.21× to 1.03–1.11×, the
//! sharing workloads unchanged (numbers and commands in the README).
//!
//! # An idle engine first
//! Sharing nothing at light load, a new prompt's family lead (the reuse
//! rate never falls quite to 0, and 10 × a few percent of a 4 KiB prompt
//! outweighs a request of load) kept about one new prompt in five on an
//! engine decoding another request while another engine idled; a prefill
//! in the same engine step holds that decode up for as long as it lasts.
//! So where the router knows it is alone, a new prompt that no pending
//! sibling proved a family and no layout places, and that rule 3 sends to
//! a backend with requests in flight, goes to a candidate with none
//! instead ([`idle_instead`], [`Reason::Idle`]);
//! [`Policy::idle_below_reuse`] (`--idle-below-reuse`, 1: at any reuse
//! rate) can keep the rule to traffic where fewer recent requests followed
//! a cached prefix. Idle is a moment's view, and two
//! decisions taken at once on the daemon's two threads see the same idle
//! engine: alone, that sent two prompts into one prefill step and doubled
//! the p99 TTFT at 4 sessions (63 to 113–120 ms). So a decision for an
//! idle backend, by this rule or any other, holds only if the request
//! takes that backend from 0 requests in flight to 1 at once; otherwise
//! the router decides again with it busy (`Router::select`). In
//! `bench/scripts/quality-variants.sh "--no-plots --workloads no-sharing
//! --seed N" "off=--peers 0 --idle-below-reuse 0"` (N of 1–3,
//! `quality-20261207-152235.md` to `-152433.md`), no-sharing's mean
//! end-to-end time at 4 sessions went from 1.11–1.15× round-robin's to
//! 1.00–1.01×, with the same TTFT (60 ms, p99 61–69 against round-robin's
//! 61–62); the other levels moved within run-to-run noise, and the
//! sharing workloads were unchanged (`-152533`).
//!
//! The rule first held only where fewer than half of recent requests
//! followed a cached prefix. On chat traffic a conversation's first turn
//! is a new prompt too, and its family lead kept it on its rendezvous
//! engine: in per-request records of `router-bench quality --workloads
//! multi-turn --levels c4 --records DIR` (32 conversations, four at a
//! time on four engines; `bench/scripts/first-turns.py` counts them), 14
//! of 32 first turns went to an engine serving another conversation while
//! one served none, and that conversation's next turn then waited for the
//! first turn's prefill (about 75 ms to first token against 13–16). Where
//! the router is alone the lead keeps nothing for a family that the index
//! would not find anyway, so the rule now holds at any reuse rate. It then met a race of its own: conversations
//! whose turns end together leave several engines idle for the moment a
//! client takes to send its next turn, and a new conversation took one
//! of those in one case in two. The client that starts a new conversation
//! has just finished its last on some engine, which is then truly free;
//! so of several idle candidates the rule takes the one that answered the
//! request's client connection last ([`Inputs::previous`]), otherwise the
//! highest rendezvous score for the prompt. Side by side
//! (`bench/scripts/quality-variants.sh "--no-plots --workloads multi-turn
//! --levels c4,cap0.9 --windows 3 --records DIR" "idle=--peers 0
//! --idle-below-reuse 2"`, 2026-12-07): the rule at any reuse rate
//! without the connection's hint placed 1–3 first turns of 32 beside
//! another conversation, and its p99 TTFT at 4 sessions was 64–75 ms
//! (`quality-20261207-213656.md`, a build of 329f277); with the hint none
//! in six windows, and 64–65 ms at 4 sessions and 65–68 near capacity
//! against 74–75 and 75–76 with the threshold at a half (`-214452`). On
//! shared-prefix, prefix-repetition, mooncake and no-sharing the two
//! thresholds were within run-to-run noise of each other at every level
//! (`-214748`, medians of three windows; commands in the README).
//!
//! # Family layout (opt-in)
//! Hashing a dozen families (system prompts, templates) onto four
//! backends is lumpy: one backend easily gets twice its share, evicts what
//! its cache cannot hold and queues, while another idles. With
//! [`Policy::placement_epsilon`] set, the router lays the families it knows
//! out evenly, the same way on every replica that knows them
//! ([`super::layout`]), and hands the policy each request's place there
//! ([`Inputs::layout`]): rule 3 places a new prompt there instead of on its
//! rendezvous winner, and rule 2 sends a sibling there, within its load
//! bound, even when the index knows its prefix elsewhere. A family whose
//! place changed (a family ranked above it became known) so moves once
//! ([`Reason::Moved`]), and its old copy ages out of the other cache. A
//! request extending a whole earlier prompt (a chat's later turn, the
//! tutorial's pair) never moves. Measured on 2026-12-05 with
//! `router-bench quality --no-peers --routers round-robin,router-daemon
//! --daemon-replicas 3 --workloads shared-prefix,prefix-repetition
//! --levels c16,cap0.9 --sp-prompts 128 --pr-suffixes 160` (2,048 and
//! 1,920 requests), off and with `ROUTER_PLACEMENT_EPSILON=0.25`
//! (`quality-20261205-233210.md`, `-232420.md`): hashing put the 12
//! prefix-repetition prefixes 3/1/2/6 on the backends, and one router
//! reached 85% of the ideal hit rate near capacity with a p99 TTFT of 432
//! ms (round-robin's: 283); with the layout, 100% and 89 ms. Three
//! replicas went from 81–86% of the ideal to 96–98%, and from 370–920 ms
//! to 125–319 ms at the p99; one router's p99 on shared-prefix at 16
//! sessions rose from 143 to 220 ms (its hit rate was 100% either way).
//! The cost is the moves while families become
//! known: on the default 512-request workloads (`-231253`) one router kept
//! 91–98% of the ideal against 97–100% off, and three replicas 87–96%
//! against 87–100%. Off by default until that is measured on every
//! workload.
//!
//! A conversation length of 0 means "unknown": the whole key is the
//! conversation prefix.
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::{BackendLoad, Clients, Decision, Reason};

/// How the router picks a backend (`--routing-logic`; the production-stack
/// chart's `routingLogic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Logic {
    /// By prefix affinity weighed against load: this module's rules.
    #[value(name = "prefixaware")]
    PrefixAware,
    /// Each backend in turn, ignoring prompts and load: the baseline that
    /// shows what prefix awareness is worth, and for fleets without a
    /// prefix cache. Keeps no prefix index.
    #[value(name = "roundrobin")]
    RoundRobin,
}

/// The policy's tunables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// Prefix-aware (the rules above) or round-robin.
    pub(crate) logic: Logic,
    /// ε of the load bound `ceil((1 + ε) · mean load)`; 0 or more.
    pub(crate) epsilon: f64,
    /// Cost per KiB of prompt a backend must prefill for the request
    /// (uncached, or queued ahead of it).
    pub(crate) affinity_weight: f64,
    /// Cost per request in flight or waiting on a backend.
    pub(crate) load_weight: f64,
    /// Cost per KiB of other requests' prompts a backend is still
    /// prefilling.
    pub(crate) prefilling_weight: f64,
    /// ε of the family layout (see the module doc); None: no layout, so
    /// replicas place every new conversation alike.
    pub(crate) placement_epsilon: Option<f64>,
    /// A shared prefix covering at least this fraction of the request's
    /// conversation prefix is followed (rule 2).
    pub(crate) follow_fraction: f64,
    /// How much cheaper, in cost units, another backend must be for a new
    /// conversation to leave its rendezvous winner (rule 3).
    pub(crate) rendezvous_weight: f64,
    /// Placement hashes at most this many leading key bytes (rule 3), so
    /// prompts that share that much are placed alike by every replica.
    pub(crate) placement_prefix: usize,
    /// How much a new prompt's leading part, weighed by how often recent
    /// requests reused a cached prefix ([`Inputs::reuse`]), holds it to its
    /// rendezvous backend (rule 3); 0: not at all.
    pub(crate) family_weight: f64,
    /// How many prompts of its own size a new prompt that no sibling has
    /// proved a family yet waits behind on its rendezvous backend before a
    /// backend prefilling less takes it (rule 3): what its family is worth
    /// counts up to that much in its lead, where [`Policy::patience_holds`]
    /// says. None: no limit, so a new prompt goes where every replica
    /// places it (see the module doc).
    pub(crate) placement_patience: Option<f64>,
    /// Where placement patience holds, by what the router knows of who
    /// else sends requests to the candidates.
    pub(crate) patience_holds: PatienceHolds,
    /// Key bytes per token, to weigh prompt families against the tokens a
    /// backend's KV cache holds ([`BackendLoad::cache_tokens`]): a new
    /// family is placed where it fits beside the families in use
    /// ([`Inputs::held`]). 0: caches are not weighed.
    pub(crate) bytes_per_token: f64,
    /// Where the router knows it is alone, placement counts backends whose
    /// cost is within this many prompts of the request's size of the
    /// cheapest as equal, and sends the new prompt to the one that was sent
    /// a request least recently ([`BackendLoad::last_start`]); the
    /// rendezvous lead of a prompt no sibling proved a family shrinks with
    /// [`Inputs::reuse`]. 0: off.
    pub(crate) recency_margin: f64,
    /// Where the router knows it is alone, while fewer than this fraction
    /// of recent requests followed a cached prefix ([`Inputs::reuse`]), a
    /// new prompt whose chosen backend has requests in flight goes to one
    /// with none, if the caller can still take it ([`idle_instead`]). 0:
    /// off; 1 or more: at any reuse rate.
    pub(crate) idle_below_reuse: f64,
}

impl Policy {
    /// The defaults, which the daemon's flags also default to (see
    /// `Config`): the measured choices the module doc explains.
    pub(crate) const DEFAULT: Self = Self {
        logic: Logic::PrefixAware,
        epsilon: 0.25,
        affinity_weight: 1.0,
        load_weight: 0.1,
        prefilling_weight: 1.0,
        placement_epsilon: None,
        follow_fraction: 0.5,
        rendezvous_weight: 2.0,
        placement_prefix: 2048,
        family_weight: 10.0,
        placement_patience: Some(0.5),
        patience_holds: PatienceHolds::Alone,
        bytes_per_token: 4.0,
        recency_margin: 0.25,
        idle_below_reuse: 1.0,
    };
}

impl Default for Policy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Policy {
    /// True when `input` starts something new (rule 3): no session, and no
    /// cached prefix worth following.
    pub(crate) fn is_placement(&self, input: &Inputs) -> bool {
        input.session.is_none() && !self.follows(input)
    }

    /// Whether the longest match of `input` is worth following (rule 2).
    fn follows(&self, input: &Inputs) -> bool {
        let longest = input.longest();
        let conversation = input.conversation_len();
        longest > 0
            && (input.extends
                || longest >= conversation
                || longest as f64 >= self.follow_fraction * conversation as f64)
    }

    /// The cost of following a cached prefix to backend `i` (rule 2):
    /// what it must prefill for the request, and its load.
    fn follow_cost(&self, input: &Inputs, i: usize) -> f64 {
        let uncached = input.key_len.saturating_sub(input.matched(i)) as f64 / 1024.0;
        self.affinity_weight * uncached + self.load_weight * input.backends[i].load() as f64
    }

    /// What keeping a new request on its rendezvous backend is worth, in
    /// cost units (rule 3): its conversation prefix, which later requests
    /// of its family (siblings, later turns, other replicas' requests) will
    /// find there, weighed by how likely it is to have a family.
    fn family_worth(&self, input: &Inputs) -> f64 {
        // A sibling already placed proves the family.
        let reuse = if input.pending.is_some() {
            1.0
        } else {
            input.reuse.clamp(0.0, 1.0)
        };
        self.family_weight * reuse * self.affinity_weight * input.conversation_len() as f64 / 1024.0
    }

    /// What of `worth` holds a new prompt that no sibling proved a family
    /// to its rendezvous backend: at most [`Policy::placement_patience`]
    /// prompts of its size of prefill.
    fn patient(&self, worth: f64, input: &Inputs) -> f64 {
        match self.placement_patience {
            Some(prompts) if self.patience_holds(input) => {
                worth.min(prompts * self.affinity_weight * input.conversation_len() as f64 / 1024.0)
            }
            _ => worth,
        }
    }

    /// Whether the router may place `input` by its own view of load
    /// ([`Policy::patience_holds`]): as far as it knows, no replica places
    /// the same families elsewhere.
    fn patience_holds(&self, input: &Inputs) -> bool {
        let mut clients = input.backends.iter().map(|b| b.clients);
        let shared = clients.clone().any(|c| c == Clients::Others);
        match self.patience_holds {
            PatienceHolds::Alone => !shared && clients.any(|c| c == Clients::Ours),
            PatienceHolds::UntilShared => !shared,
            PatienceHolds::Always => true,
        }
    }

    /// `worth` cost units in requests of load (what a backend may pass the
    /// load bound by to keep something worth that much).
    fn in_requests(&self, worth: f64) -> f64 {
        if self.load_weight > 0.0 {
            (worth / self.load_weight).floor()
        } else {
            f64::INFINITY
        }
    }

    /// Whether caches are weighed for `input` (rule 3): the router has
    /// the bytes-per-token ratio, and no candidate is known to serve other
    /// clients too. A replica's view holds only the families it sent, so
    /// replicas would disagree on which caches are full, and a family one
    /// of them moved would be copied where the others place it.
    fn weighs_caches(&self, input: &Inputs) -> bool {
        self.bytes_per_token > 0.0 && !input.backends.iter().any(|b| b.clients == Clients::Others)
    }

    /// Whether backend `i`'s KV cache holds the request's key beside the
    /// other families in use there (true when its size is unknown).
    fn fits(&self, input: &Inputs, i: usize) -> bool {
        let tokens = input.backends[i].cache_tokens;
        if tokens == 0 {
            return true;
        }
        let held = input.held.get(i).copied().unwrap_or(0);
        let learned = input.backends[i].bytes_per_token;
        let ratio = if learned > 0.0 {
            learned
        } else {
            self.bytes_per_token
        };
        (held.saturating_add(input.key_len) as f64) <= tokens as f64 * ratio
    }

    /// The cost of placing a new request on backend `i` (rule 3): what it
    /// is still prefilling for others, and its load.
    fn placement_cost(&self, input: &Inputs, i: usize) -> f64 {
        let b = &input.backends[i];
        self.prefilling_weight * b.prefill as f64 / 1024.0 + self.load_weight * b.load() as f64
    }
}

/// Where placement patience holds ([`Policy::placement_patience`]), by
/// what the backends' scrapes show of who sends requests to them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatienceHolds {
    /// While the router knows it is alone: no candidate has [other
    /// clients](super::Clients::Others) and some are known to have [only
    /// ours](super::Clients::Ours).
    Alone,
    /// Until a candidate is seen to have other clients, so also before
    /// anything is known (a cold start): right for a router alone in front
    /// of its backends, which then spreads the first burst of new prompts;
    /// wrong for replicas, which then each spread it their own way.
    UntilShared,
    /// Whoever else sends requests to the candidates.
    Always,
}

/// Everything a decision depends on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Inputs<'a> {
    /// The candidates, in the caller's order.
    pub(crate) backends: &'a [BackendLoad<'a>],
    /// Key bytes matched in the index, per backend (same order, same length).
    pub(crate) matched: &'a [usize],
    /// Length of the whole key.
    pub(crate) key_len: usize,
    /// Length of the key prefix naming the conversation (0: the whole key).
    pub(crate) conversation: usize,
    /// The key extends (or equals) an earlier prompt as a whole.
    pub(crate) extends: bool,
    /// A later chat turn: when nothing cached is worth following, it is
    /// placed by rendezvous alone (rule 3).
    pub(crate) later_turns: bool,
    /// Rendezvous seed of the request's leading part.
    pub(crate) placement: u64,
    /// Fraction of recent requests that followed a cached prefix, 0 to 1
    /// (see [`Policy::family_weight`]).
    pub(crate) reuse: f64,
    /// Rendezvous seed of the session value, if the request has one.
    pub(crate) session: Option<u64>,
    /// A backend (position in `backends`) that a request with the same
    /// placement seed, a sibling, was placed on moments ago, before the
    /// index could learn it (see [`super::Router`]). Rule 3 prefers it to
    /// the rendezvous winner, as the family's backend.
    pub(crate) pending: Option<usize>,
    /// Where the request's family lies in the layout (`--placement-epsilon`,
    /// see [`super::layout`]): a position in `backends`, or None for its
    /// rendezvous winner. Rule 3 places a new prompt there, and rule 2
    /// moves a sibling there.
    pub(crate) layout: Option<usize>,
    /// Key bytes of the families in use on each backend but the request's
    /// own, as far as this router knows (same order as `backends`; empty
    /// when no backend's cache size is known). Rule 3 places a new prompt
    /// where it fits beside them ([`Policy::bytes_per_token`]).
    pub(crate) held: &'a [usize],
    /// The backend (position in `backends`) that served the previous
    /// request on the request's client connection, if it is a candidate:
    /// [`idle_instead`] prefers it among idle engines.
    pub(crate) previous: Option<usize>,
}

impl Inputs<'_> {
    /// Key bytes backend `i` holds.
    fn matched(&self, i: usize) -> usize {
        self.matched.get(i).copied().unwrap_or(0)
    }

    /// Length of the conversation prefix (the whole key when unknown).
    fn conversation_len(&self) -> usize {
        match self.conversation {
            0 => self.key_len,
            n => n.min(self.key_len),
        }
    }

    /// The longest match on any backend.
    pub(crate) fn longest(&self) -> usize {
        self.matched.iter().copied().max().unwrap_or(0)
    }
}

/// The highest load a backend may reach by taking one more request, given the
/// loads of all `backends`.
pub(crate) fn load_bound(epsilon: f64, backends: &[BackendLoad]) -> usize {
    let n = backends.len().max(1);
    let total = backends
        .iter()
        .fold(1usize, |sum, b| sum.saturating_add(b.load()));
    let even = total.div_ceil(n);
    // Float rounding can only lower this below `even`, which `max` undoes.
    let relaxed = ((1.0 + epsilon.max(0.0)) * total as f64 / n as f64).ceil();
    if relaxed >= usize::MAX as f64 {
        usize::MAX
    } else {
        (relaxed as usize).max(even)
    }
}

/// The rendezvous (highest random weight) score of backend `name` for `seed`.
pub(crate) fn rendezvous(name: &str, seed: u64) -> u64 {
    xxh3_64_with_seed(name.as_bytes(), seed)
}

/// Picks a backend; None only when there are no backends.
pub(crate) fn choose(policy: &Policy, input: &Inputs) -> Option<Decision> {
    let backends = input.backends;
    let bound = load_bound(policy.epsilon, backends);
    let within = |i: usize| backends[i].load() < bound;
    let decide = |backend: usize, reason| Decision {
        backend,
        matched: input.matched(backend),
        reason,
    };
    if let Some(seed) = input.session {
        let (first, pick) = rendezvous_pick(backends, seed, within)?;
        let reason = if first == pick {
            Reason::Session
        } else {
            Reason::Overloaded
        };
        return Some(decide(pick, reason));
    }
    if policy.is_placement(input) {
        return place(policy, input, bound).map(|(pick, reason)| decide(pick, reason));
    }
    // A backend may pass the bound by what its cached prefix is worth in
    // load units: recomputing a long prefix elsewhere costs more than
    // queueing behind a few more requests.
    let slack =
        |i: usize| policy.in_requests(policy.affinity_weight * input.matched(i) as f64 / 1024.0);
    let keeps = |i: usize| (backends[i].load() as f64) < bound as f64 + slack(i);
    let candidates = (0..backends.len()).filter(|&i| keeps(i));
    let pick = cheapest(
        backends,
        input.placement,
        policy.load_weight,
        candidates,
        |i| policy.follow_cost(input, i),
    )
    .unwrap_or_else(|| least_loaded(backends));
    let longest = input.longest();
    let holds_longest = |i: usize| input.matched(i) == longest;
    // A sibling goes to its family's place in the layout whenever that is
    // within its bound, so a family whose place changed moves there once:
    // following its old copy too would keep two copies of every moved
    // family, and the index would go on sending siblings to the old one
    // after the engine evicted it. A request extending a whole earlier
    // prompt (a chat's later turn, the tutorial's pair) stays: it would
    // re-prefill its own history, not a family's prefix.
    if let Some(home) = input
        .layout
        .filter(|&home| home != pick && home < backends.len() && keeps(home) && !input.extends)
    {
        let reason = if holds_longest(home) {
            Reason::PrefixMatch
        } else {
            Reason::Moved
        };
        return Some(decide(home, reason));
    }
    let reason = if holds_longest(pick) {
        Reason::PrefixMatch
    } else if (0..backends.len()).any(|i| holds_longest(i) && !keeps(i)) {
        Reason::Spread
    } else {
        Reason::LeastLoaded
    };
    Some(decide(pick, reason))
}

/// Rule 3: the rendezvous winner within the bounds, unless another backend
/// within them is cheaper by more than the rendezvous weight. What the
/// request's leading part is worth as a family ([`Policy::family_worth`])
/// stretches both for the first in rendezvous order: its load bound, as a
/// cached prefix stretches it in rule 2, and its lead in cost.
fn place(policy: &Policy, input: &Inputs, bound: usize) -> Option<(usize, Reason)> {
    let backends = input.backends;
    // Where the prompt fits beside the families in use, if it fits
    // anywhere within the load bound: placed elsewhere, it would evict a
    // family that its next request then prefills again.
    let weigh = policy.weighs_caches(input);
    let fits = |i: usize| !weigh || policy.fits(input, i);
    let room_within = (0..backends.len()).any(|i| fits(i) && backends[i].load() < bound);
    let roomy = |i: usize| !room_within || fits(i);
    let mut full = false;
    let first = match (input.pending, input.layout) {
        (Some(sibling), _) if sibling < backends.len() => sibling,
        (_, Some(home)) if home < backends.len() => home,
        _ => {
            let first = rendezvous_first(backends, input.placement)?;
            if roomy(first) {
                first
            } else {
                full = true;
                rendezvous_pick(backends, input.placement, roomy)?.1
            }
        }
    };
    let worth = policy.family_worth(input);
    let stretch = policy.in_requests(worth);
    let qualifies = |i: usize| {
        let limit = if i == first {
            bound as f64 + stretch
        } else {
            bound as f64
        };
        (backends[i].load() as f64) < limit && (i == first || roomy(i))
    };
    let winner = if qualifies(first) {
        first
    } else {
        rendezvous_pick(backends, input.placement, qualifies)?.1
    };
    let on_rendezvous = |pick: usize| match pick == first {
        true if full => Reason::CacheFull,
        true => Reason::Placed,
        false => Reason::Overloaded,
    };
    if input.later_turns {
        return Some((winner, on_rendezvous(winner)));
    }
    // By recency only where the router knows it is alone, and for a
    // prompt that no pending sibling proved a family and no layout places.
    let recency = policy.recency_margin > 0.0
        && input.pending.is_none()
        && input.layout.is_none()
        && policy.patience_holds(input);
    let rendezvous_lead = if recency {
        policy.rendezvous_weight * input.reuse.clamp(0.0, 1.0)
    } else {
        policy.rendezvous_weight
    };
    let lead = rendezvous_lead
        + if winner != first {
            0.0
        } else if input.pending.is_some() {
            worth
        } else {
            policy.patient(worth, input)
        };
    let favoured = |i: usize| {
        let bonus = if i == winner { lead } else { 0.0 };
        policy.placement_cost(input, i) - bonus
    };
    let candidates = (0..backends.len()).filter(|&i| qualifies(i));
    let recent = || least_recent(policy, input, winner, lead, qualifies);
    if let Some(by_recency) = recency.then(recent).flatten() {
        return Some(by_recency);
    }
    let pick = cheapest(
        backends,
        input.placement,
        policy.load_weight,
        candidates,
        favoured,
    )
    .unwrap_or(winner);
    let reason = if pick == winner {
        on_rendezvous(pick)
    } else {
        Reason::LeastLoaded
    };
    Some((pick, reason))
}

/// Rule 3 under [`Policy::recency_margin`] (where the router is alone, for
/// a prompt that neither a pending sibling nor the layout places): of the
/// candidates whose cost is within the margin of the cheapest, the one
/// sent a request least recently ([`Reason::OldestPrefill`]; starts within
/// [`RECENCY_WINDOW_MS`] of each other tie, and ties go by rendezvous
/// score). An engine prefills what arrived together in one step, so a
/// newcomer waits for the step under way and then for its own: behind a
/// prefill that began long ago it waits least. Round-robin gets that for
/// free, by sending each backend its next request as late as it can; the
/// cheapest alone breaks near-ties at random.
///
/// None leaves the choice to the cheapest by cost: when the rendezvous
/// `winner`, its cost less its `lead`, beats every other candidate by more
/// than the margin; when none qualifies; or when one of the near-cheapest
/// prefills nothing (recency tells nothing then, and decisions taken at
/// the same moment on two threads, each blind to the other's, would all
/// pick the same one, where the rendezvous order of their own prompts
/// spreads them).
fn least_recent(
    policy: &Policy,
    input: &Inputs,
    winner: usize,
    lead: f64,
    qualifies: impl Fn(usize) -> bool,
) -> Option<(usize, Reason)> {
    let backends = input.backends;
    let margin = policy.recency_margin * policy.prefilling_weight * input.key_len as f64 / 1024.0;
    let cost = |i: usize| {
        let cost = policy.placement_cost(input, i);
        weighed(backends, policy.load_weight, i, cost)
    };
    let candidates = || (0..backends.len()).filter(|&i| qualifies(i));
    let others = candidates()
        .filter(|&i| i != winner)
        .map(cost)
        .min_by(f64::total_cmp);
    if qualifies(winner) && others.is_none_or(|other| cost(winner) - lead + margin < other) {
        return None;
    }
    let floor = candidates().map(cost).min_by(f64::total_cmp)?;
    let near = || candidates().filter(|&i| cost(i) <= floor + margin);
    if near().any(|i| backends[i].prefill == 0) {
        return None;
    }
    let oldest = near().map(|i| backends[i].last_start).min()?;
    near()
        .filter(|&i| backends[i].last_start <= oldest.saturating_add(RECENCY_WINDOW_MS))
        .max_by_key(|&i| rendezvous(backends[i].name, input.placement))
        .map(|pick| (pick, Reason::OldestPrefill))
}

/// An idle engine first (see the module doc): where the router knows it is
/// alone and fewer than [`Policy::idle_below_reuse`] of recent requests
/// reused a cached prefix (at any rate from 1 up), a new prompt (rule 3)
/// that `decision` sends to a backend with requests in flight goes instead
/// to a candidate with none ([`Reason::Idle`]; the one that answered the
/// client connection's previous request, [`Inputs::previous`], if it is
/// one of them, else the highest rendezvous score for the prompt among
/// them; one its cache holds where caches are weighed). None where the
/// rule does not apply, or no candidate is idle.
///
/// Idle is what the caller saw a moment ago, and two decisions taken at
/// once on two threads see the same idle backend: the caller takes it only
/// if it is still idle (`Backend::start_if_idle`), and keeps `decision`
/// otherwise.
pub(crate) fn idle_instead(
    policy: &Policy,
    input: &Inputs,
    decision: &Decision,
) -> Option<Decision> {
    let backends = input.backends;
    let applies = (policy.idle_below_reuse >= 1.0
        || input.reuse.clamp(0.0, 1.0) < policy.idle_below_reuse)
        && input.session.is_none()
        && !input.later_turns
        && input.pending.is_none()
        && input.layout.is_none()
        && policy.is_placement(input)
        && policy.patience_holds(input)
        && backends.get(decision.backend).is_some_and(|b| b.load() > 0);
    if !applies {
        return None;
    }
    let weigh = policy.weighs_caches(input);
    let idle = |i: usize| backends[i].load() == 0 && (!weigh || policy.fits(input, i));
    input
        .previous
        .filter(|&i| i < backends.len() && idle(i))
        .or_else(|| {
            (0..backends.len())
                .filter(|&i| idle(i))
                .max_by_key(|&i| rendezvous(backends[i].name, input.placement))
        })
        .map(|backend| Decision {
            backend,
            matched: input.matched(backend),
            reason: Reason::Idle,
        })
}

/// Starts closer than this, in milliseconds, count as one moment for
/// [`least_recent`]: an engine's prefill step lasts tens of milliseconds,
/// so they end about together, and a burst of decisions (some taken on two
/// threads at once, each blind to the other's) spreads by the rendezvous
/// order of their own prompts instead of all taking the same backend.
const RECENCY_WINDOW_MS: u64 = 5;

/// `cost` of backend `i`, less [`LOCAL_MARGIN`] requests of `load_weight`
/// when it is on the router's node.
fn weighed(backends: &[BackendLoad], load_weight: f64, i: usize, cost: f64) -> f64 {
    if backends[i].local {
        cost - LOCAL_MARGIN * load_weight
    } else {
        cost
    }
}

/// How much cheaper, in load units, a backend on the router's own node
/// counts ([`BackendLoad::local`], `--node-name`): half a request. So a
/// local backend wins a tie, or against a remote one that is cheaper by
/// less than half a request of load, but never against one with a whole
/// request less, nor against the rendezvous lead that keeps a prefix's
/// family together (worth more than a network hop across nodes).
pub(crate) const LOCAL_MARGIN: f64 = 0.5;

/// The cheapest of `candidates` by `cost` (a backend on the router's node
/// cheaper by [`LOCAL_MARGIN`] requests of `load_weight`), ties going to
/// the higher rendezvous score for `seed`; None when there are none.
fn cheapest(
    backends: &[BackendLoad],
    seed: u64,
    load_weight: f64,
    candidates: impl Iterator<Item = usize>,
    cost: impl Fn(usize) -> f64,
) -> Option<usize> {
    let weighed = |i: usize| weighed(backends, load_weight, i, cost(i));
    candidates.min_by(|&a, &b| {
        weighed(a).total_cmp(&weighed(b)).then_with(|| {
            rendezvous(backends[b].name, seed).cmp(&rendezvous(backends[a].name, seed))
        })
    })
}

/// The backend with the highest rendezvous score for `seed`; None when
/// there are none.
fn rendezvous_first(backends: &[BackendLoad], seed: u64) -> Option<usize> {
    (0..backends.len()).max_by_key(|&i| rendezvous(backends[i].name, seed))
}

/// The rendezvous winner for `seed` and the best-scored backend that passes
/// `within`.
fn rendezvous_pick(
    backends: &[BackendLoad],
    seed: u64,
    within: impl Fn(usize) -> bool,
) -> Option<(usize, usize)> {
    let score = |i: usize| rendezvous(backends[i].name, seed);
    let first = rendezvous_first(backends, seed)?;
    if within(first) {
        return Some((first, first));
    }
    let pick = (0..backends.len())
        .filter(|&i| within(i))
        .max_by_key(|&i| score(i))
        .unwrap_or_else(|| least_loaded(backends));
    Some((first, pick))
}

/// The least-loaded backend (first among equals). The load bound always
/// admits it, except when loads near `usize::MAX` saturate the sum; this is
/// the answer then rather than a panic on the request path.
pub(crate) fn least_loaded(backends: &[BackendLoad]) -> usize {
    (0..backends.len())
        .min_by_key(|&i| backends[i].load())
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 8] = [
        "http://a:1",
        "http://b:1",
        "http://c:1",
        "http://d:1",
        "http://e:1",
        "http://f:1",
        "http://g:1",
        "http://h:1",
    ];

    fn views(loads: &[(usize, usize)]) -> Vec<BackendLoad<'static>> {
        loads
            .iter()
            .zip(NAMES)
            .map(|(&(in_flight, waiting), name)| BackendLoad {
                name,
                in_flight,
                waiting,
                prefill: 0,
                local: false,
                clients: Clients::Ours,
                cache_tokens: 0,
                bytes_per_token: 0.0,
                last_start: 0,
            })
            .collect()
    }

    /// A request with no session and no placement bound; placement seed 7;
    /// its key as long as the longest match or the conversation prefix.
    fn inputs<'a>(
        backends: &'a [BackendLoad<'a>],
        matched: &'a [usize],
        conversation: usize,
    ) -> Inputs<'a> {
        Inputs {
            backends,
            matched,
            key_len: matched.iter().copied().fold(conversation, usize::max),
            conversation,
            extends: false,
            later_turns: false,
            placement: 7,
            reuse: 0.0,
            session: None,
            pending: None,
            layout: None,
            held: &[],
            previous: None,
        }
    }

    /// The rendezvous winner of `seed` over `v`.
    fn winner(v: &[BackendLoad], seed: u64) -> usize {
        rendezvous_pick(v, seed, |_| true).unwrap().0
    }

    #[test]
    fn a_departed_backend_moves_only_its_own_conversations() {
        // Idle backends, new conversations placed by rendezvous alone.
        let policy = Policy {
            rendezvous_weight: f64::INFINITY,
            ..Policy::default()
        };
        let all = views(&[(0, 0); 4]);
        let without_2: Vec<_> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 2)
            .map(|(_, b)| *b)
            .collect();
        let mut moved = 0;
        for seed in 0..2_000u64 {
            let place = |backends: &[BackendLoad<'static>]| -> &'static str {
                let matched = vec![0; backends.len()];
                let input = Inputs {
                    placement: seed,
                    ..inputs(backends, &matched, 4096)
                };
                backends[choose(&policy, &input).unwrap().backend].name
            };
            let before = place(&all);
            let after = place(&without_2);
            if before == all[2].name {
                moved += 1;
            } else {
                assert_eq!(before, after, "seed {seed} moved off a backend that stayed");
            }
        }
        // About a quarter lived on the departed backend.
        assert!((400..600).contains(&moved), "{moved}");
    }

    #[test]
    fn bound_is_ceil_of_relaxed_mean() {
        let v = views(&[(3, 0), (1, 0), (0, 0), (0, 0)]);
        // 5 requests over 4 backends: mean 1.25, × 1.25 = 1.5625 → 2.
        assert_eq!(load_bound(0.25, &v), 2);
        assert_eq!(load_bound(0.0, &v), 2);
        assert_eq!(load_bound(3.0, &v), 5);
        assert_eq!(load_bound(0.25, &views(&[(0, 0), (0, 0)])), 1);
        assert_eq!(
            load_bound(0.25, &views(&[(1, 0), (0, 0), (0, 0), (0, 0)])),
            1
        );
    }

    #[test]
    fn no_backends_no_decision() {
        let input = Inputs {
            session: Some(2),
            ..inputs(&[], &[], 0)
        };
        assert_eq!(choose(&Policy::default(), &input), None);
    }

    #[test]
    fn a_new_family_passes_a_rendezvous_backend_whose_cache_is_full() {
        // Four idle backends whose caches hold 10,000 tokens (40,000 bytes
        // at the default 4 bytes per token), and a new 6,000-byte family.
        let v: Vec<BackendLoad> = views(&[(0, 0); 4])
            .into_iter()
            .map(|b| b.with_cache_tokens(10_000))
            .collect();
        let mut order: Vec<usize> = (0..4).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rendezvous(v[i].name, 7)));
        let matched = [0; 4];
        let pick = |held: &[usize], v: &[BackendLoad], policy: &Policy| {
            let d = choose(
                policy,
                &Inputs {
                    held,
                    ..inputs(v, &matched, 6_000)
                },
            )
            .unwrap();
            (d.backend, d.reason)
        };
        let policy = Policy::default();
        // Families in use leave 4,000 bytes on its rendezvous backend: the
        // next in rendezvous order with room takes it.
        let mut held = [0; 4];
        held[order[0]] = 36_000;
        assert_eq!(pick(&held, &v, &policy), (order[1], Reason::CacheFull));
        held[order[1]] = 34_001;
        assert_eq!(pick(&held, &v, &policy), (order[2], Reason::CacheFull));
        // Room for it, exactly: it stays.
        held[order[0]] = 34_000;
        assert_eq!(pick(&held, &v, &policy), (order[0], Reason::Placed));
        // No room anywhere, caches unknown, or not weighed: rendezvous.
        assert_eq!(pick(&[36_000; 4], &v, &policy), (order[0], Reason::Placed));
        held[order[0]] = 36_000;
        assert_eq!(
            pick(&held, &views(&[(0, 0); 4]), &policy),
            (order[0], Reason::Placed)
        );
        let unweighed = Policy {
            bytes_per_token: 0.0,
            ..policy
        };
        assert_eq!(pick(&held, &v, &unweighed), (order[0], Reason::Placed));
        // Another client (a replica) sends requests to one of them: this
        // router's view of the caches is partial, so it places as they do.
        let mut shared = v.clone();
        shared[order[3]].clients = Clients::Others;
        assert_eq!(pick(&held, &shared, &policy), (order[0], Reason::Placed));
        shared[order[3]].clients = Clients::Unknown;
        assert_eq!(pick(&held, &shared, &policy), (order[2], Reason::CacheFull));
        // A ratio learned from the engine's counter comes first: at 5
        // bytes per token its cache holds 50,000 bytes, room enough.
        let mut learned = v.clone();
        learned[order[0]].bytes_per_token = 5.0;
        assert_eq!(pick(&held, &learned, &policy), (order[0], Reason::Placed));
        // Room only on a backend past the load bound: as if none had room.
        let mut busy = v.clone();
        for &i in &order[1..] {
            busy[i].in_flight = 10;
        }
        let mut full = [36_000; 4];
        full[order[3]] = 0;
        assert_eq!(pick(&full, &busy, &policy).0, order[0]);
        // A pending sibling keeps the family together, full or not.
        let d = choose(
            &policy,
            &Inputs {
                held: &held,
                pending: Some(order[0]),
                ..inputs(&v, &matched, 6_000)
            },
        )
        .unwrap();
        assert_eq!((d.backend, d.reason), (order[0], Reason::Placed));
    }

    #[test]
    fn continuation_follows_the_longest_match_when_loads_allow() {
        let v = views(&[(1, 0), (1, 0), (0, 0)]);
        let matched = [0, 8192, 4096];
        let input = inputs(&v, &matched, 100);
        let d = choose(&Policy::default(), &input).unwrap();
        // Nothing to prefill and 1 request beats 4 KiB and none.
        assert_eq!(
            (d.backend, d.matched, d.reason),
            (1, 8192, Reason::PrefixMatch)
        );
        // With load weighed 5×, the idle backend holding half wins.
        let heavy = Policy {
            load_weight: 5.0,
            ..Policy::default()
        };
        let d = choose(&heavy, &input).unwrap();
        assert_eq!((d.backend, d.reason), (2, Reason::LeastLoaded));
    }

    #[test]
    fn a_backend_on_the_router_s_node_wins_only_when_costs_are_close() {
        // Two backends hold the prefix; equal loads: rendezvous decides.
        let matched = [4096, 4096, 0];
        let mut v = views(&[(1, 0), (1, 0), (0, 0)]);
        let by_rendezvous = choose(&Policy::default(), &inputs(&v, &matched, 100))
            .unwrap()
            .backend;
        let other = 1 - by_rendezvous;
        // The other one is on the router's node: the tie goes to it.
        v[other].local = true;
        let d = choose(&Policy::default(), &inputs(&v, &matched, 100)).unwrap();
        assert_eq!(d.backend, other);
        // One more request there is more than the margin.
        v[other].in_flight = 2;
        let d = choose(&Policy::default(), &inputs(&v, &matched, 100)).unwrap();
        assert_eq!(d.backend, by_rendezvous);
        // And a cached prefix elsewhere beats being local.
        v[other].in_flight = 1;
        let only_one = [4096, 0, 0];
        v[0].local = false;
        v[1].local = false;
        v[2].local = true;
        let d = choose(&Policy::default(), &inputs(&v, &only_one, 100)).unwrap();
        assert_eq!(d.backend, 0);
    }

    #[test]
    fn over_the_bound_the_prefix_spills_to_another_holder() {
        // Bound 6; at a load weight of 0.5, 4 KiB is worth 8 requests, and
        // 16 is past 6 + 8.
        let v = views(&[(14, 2), (1, 0), (1, 0), (0, 0)]);
        let matched = [4096, 2048, 0, 0];
        let input = inputs(&v, &matched, 64);
        let policy = Policy {
            load_weight: 0.5,
            ..Policy::default()
        };
        let d = choose(&policy, &input).unwrap();
        assert_eq!((d.backend, d.reason), (1, Reason::Spread));
    }

    #[test]
    fn a_continuation_may_pass_the_bound_by_what_its_match_is_worth() {
        // 4 requests over 4 backends (counting this one): bound 2.
        let v = views(&[(3, 0), (0, 0), (0, 0), (0, 0)]);
        let input = |matched: &'static [usize]| inputs(&v, matched, 100);
        // At a load weight of 0.5, 4 KiB cached is worth 8 requests: 3 in
        // flight is within 2 + 8.
        let policy = Policy {
            load_weight: 0.5,
            ..Policy::default()
        };
        let d = choose(&policy, &input(&[4096, 0, 0, 0])).unwrap();
        assert_eq!((d.backend, d.reason), (0, Reason::PrefixMatch));
        // Half a KiB is worth 1: 3 is not within 2 + 1, so the prefix spills.
        let d = choose(&policy, &input(&[512, 0, 0, 0])).unwrap();
        assert_ne!(d.backend, 0);
        assert_eq!(d.reason, Reason::Spread);
    }

    /// The default policy's choice for `input`: backend and reason.
    fn chosen(input: &Inputs) -> (usize, Reason) {
        let d = choose(&Policy::default(), input).unwrap();
        (d.backend, d.reason)
    }

    #[test]
    fn a_new_prompt_goes_to_its_family_s_place_in_the_layout() {
        let v = views(&[(0, 0); 4]);
        let seed = 11;
        let home = (winner(&v, seed) + 1) % 4;
        let input = Inputs {
            placement: seed,
            layout: Some(home),
            ..inputs(&v, &[0; 4], 4096)
        };
        assert_eq!(chosen(&input), (home, Reason::Placed));
        // Over the load bound there, the next in rendezvous order takes it.
        let mut busy = views(&[(1, 0); 4]);
        busy[home].in_flight = 9;
        let (elsewhere, _) = chosen(&Inputs {
            backends: &busy,
            ..input
        });
        assert_ne!(elsewhere, home);
    }

    #[test]
    fn a_sibling_moves_to_its_family_s_new_place_once() {
        // A 6 KiB family prefix cached on `held`, a 7 KiB sibling of it,
        // and the layout now placing the family on `home`.
        let v = views(&[(1, 0); 4]);
        let (held, home) = (0, 2);
        let mut matched = [0; 4];
        matched[held] = 6 * 1024;
        let input = Inputs {
            layout: Some(home),
            ..inputs(&v, &matched, 7 * 1024)
        };
        assert_eq!(chosen(&input), (home, Reason::Moved));
        // Once it holds the prefix too, siblings stay there.
        let mut both = matched;
        both[home] = 6 * 1024;
        let stays = Inputs {
            matched: &both,
            ..input
        };
        assert_eq!(chosen(&stays), (home, Reason::PrefixMatch));
        // A busier home takes it while within its load bound (7 here)...
        let with_home_at = |load: usize| {
            let mut busy = views(&[(4, 0); 4]);
            busy[home].in_flight = load;
            busy
        };
        let busier = with_home_at(5);
        let input_busier = Inputs {
            backends: &busier,
            ..input
        };
        assert_eq!(chosen(&input_busier), (home, Reason::Moved));
        // ... but not past it.
        let over = with_home_at(9);
        let input_over = Inputs {
            backends: &over,
            ..input
        };
        assert_eq!(chosen(&input_over), (held, Reason::PrefixMatch));
        // A request extending a whole earlier prompt never moves.
        let extends = Inputs {
            extends: true,
            ..input
        };
        assert_eq!(chosen(&extends), (held, Reason::PrefixMatch));
    }

    #[test]
    fn where_prefixes_are_reused_a_new_prompt_keeps_its_rendezvous_backend() {
        // The rendezvous winner of seed 5 has 6 requests in flight, the
        // others 1: over the bound of ceil(1.25 × 10 / 4) = 4.
        let seed = 5;
        // Weights that keep the arithmetic below small.
        let policy = Policy {
            load_weight: 0.25,
            family_weight: 1.0,
            ..Policy::default()
        };
        let idle = views(&[(0, 0); 4]);
        let first = winner(&idle, seed);
        let mut loads = [(1, 0); 4];
        loads[first] = (6, 0);
        let v = views(&loads);
        // A new 4 KiB prompt, when recent traffic reused nothing: spread.
        let input = |reuse: f64| Inputs {
            placement: seed,
            reuse,
            ..inputs(&v, &[0; 4], 4096)
        };
        let d = choose(&policy, &input(0.0)).unwrap();
        assert_ne!(d.backend, first);
        assert_eq!(d.reason, Reason::Overloaded);
        // When most of it followed a cached prefix, the prompt likely starts
        // a family, which every replica places on `first`: 4 KiB × 0.9 at
        // load weight 0.25 is worth 14 requests, and 6 is within 4 + 14.
        let d = choose(&policy, &input(0.9)).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
        // Family weight 0 turns that off.
        let off = Policy {
            family_weight: 0.0,
            ..policy
        };
        let d = choose(&off, &input(0.9)).unwrap();
        assert_ne!(d.backend, first);
        // The stretch is bounded: with 30 in flight there the bound is 11,
        // and 30 is past 11 + 14.
        loads[first] = (30, 0);
        let v = views(&loads);
        let d = choose(
            &policy,
            &Inputs {
                backends: &v,
                ..input(0.9)
            },
        )
        .unwrap();
        assert_ne!(d.backend, first);
    }

    #[test]
    fn where_prefixes_are_reused_queued_prefill_moves_a_new_prompt_less() {
        // 3 KiB of other prompts queued for prefill at the rendezvous
        // winner, nothing elsewhere.
        let seed = 9;
        let idle = views(&[(0, 0); 4]);
        let first = winner(&idle, seed);
        let mut v = idle.clone();
        v[first] = v[first].with_prefill(3072);
        let input = |reuse: f64| Inputs {
            placement: seed,
            reuse,
            ..inputs(&v, &[0; 4], 4096)
        };
        // Reusing nothing: 3 KiB + 0 is past the rendezvous weight of 2.
        let d = choose(&Policy::default(), &input(0.0)).unwrap();
        assert_ne!(d.backend, first);
        assert_eq!(d.reason, Reason::LeastLoaded);
        // Reusing most: the prompt's 4 KiB × 0.75 = 3 more cost units keep
        // it there.
        let d = choose(&Policy::default(), &input(0.75)).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
    }

    #[test]
    fn with_patience_a_new_prompt_leaves_a_winner_busy_prefilling_others() {
        // Two other 4 KiB prompts queued for prefill at the rendezvous
        // winner of a new 4 KiB prompt, nothing elsewhere; prefixes are
        // reused, so what its family is worth (4 KiB × 10) holds it there.
        let seed = 9;
        let idle = views(&[(0, 0); 4]);
        let first = winner(&idle, seed);
        let mut v = idle.clone();
        v[first] = v[first].with_prefill(8192);
        let input = Inputs {
            placement: seed,
            reuse: 1.0,
            ..inputs(&v, &[0; 4], 4096)
        };
        let patient = |prompts| Policy {
            placement_patience: prompts,
            ..Policy::default()
        };
        let d = choose(&patient(None), &input).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
        // Waiting behind one prompt of its size at most: 4 + 2 < 8.
        let d = choose(&patient(Some(1.0)), &input).unwrap();
        assert_ne!(d.backend, first);
        assert_eq!(d.reason, Reason::LeastLoaded);
        // Behind two: 8 + 2 > 8, it stays.
        let d = choose(&patient(Some(2.0)), &input).unwrap();
        assert_eq!(d.backend, first);
        // A sibling of a request placed there moments ago proves the family:
        // it joins it whatever the patience.
        let sibling = Inputs {
            pending: Some(first),
            ..input
        };
        let d = choose(&patient(Some(1.0)), &sibling).unwrap();
        assert_eq!(d.backend, first);
        // Another replica sends to one of the backends: the prompt stays
        // where every replica places it, unless patience holds there too.
        let mut shared = v.clone();
        let other = (first + 1) % shared.len();
        shared[other] = shared[other].with_clients(Clients::Others);
        let input = Inputs {
            backends: &shared,
            ..input
        };
        let d = choose(&patient(Some(1.0)), &input).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
        let always = Policy {
            patience_holds: PatienceHolds::Always,
            ..patient(Some(1.0))
        };
        let d = choose(&always, &input).unwrap();
        assert_ne!(d.backend, first);
        // Nothing known yet of who else sends there: the same.
        let unknown: Vec<_> = v.iter().map(|b| b.with_clients(Clients::Unknown)).collect();
        let input = Inputs {
            backends: &unknown,
            ..input
        };
        let d = choose(&patient(Some(1.0)), &input).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
        // Unless patience holds until others are seen: a cold start spreads.
        let until_shared = Policy {
            patience_holds: PatienceHolds::UntilShared,
            ..patient(Some(1.0))
        };
        let d = choose(&until_shared, &input).unwrap();
        assert_ne!(d.backend, first);
        assert_eq!(d.reason, Reason::LeastLoaded);
        // Once one backend shows another client's requests, it stays again.
        let mut seen = unknown.clone();
        seen[other] = seen[other].with_clients(Clients::Others);
        let input = Inputs {
            backends: &seen,
            ..input
        };
        let d = choose(&until_shared, &input).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
    }

    #[test]
    fn alone_a_new_prompt_goes_where_the_prefill_ahead_began_longest_ago() {
        // Every backend prefills one 4 KiB prompt; the one at index 2 was
        // sent longest ago, so its step ends first. Loads differ by a
        // request or two, within a quarter prompt of cost.
        let seed = 11;
        let started = [40, 30, 10, 20];
        let loads = [(3, 0), (4, 0), (4, 0), (3, 0)];
        let v: Vec<_> = views(&loads)
            .into_iter()
            .zip(started)
            .map(|(b, at)| b.with_prefill(4096).with_last_start(at))
            .collect();
        let input = Inputs {
            placement: seed,
            ..inputs(&v, &[0; 4], 4096)
        };
        assert_ne!(winner(&v, seed), 2, "a seed whose winner is another");
        let recency = Policy::default();
        let d = choose(&recency, &input).unwrap();
        assert_eq!((d.backend, d.reason), (2, Reason::OldestPrefill));
        // Starts within a few milliseconds of each other are one moment:
        // the rendezvous order breaks the tie.
        let close: Vec<_> = v
            .iter()
            .map(|b| b.with_last_start(100 + b.last_start / 10))
            .collect();
        let d = choose(
            &recency,
            &Inputs {
                backends: &close,
                ..input
            },
        )
        .unwrap();
        assert_eq!(d.backend, winner(&v, seed));
        // Off, the rendezvous winner keeps it (its lead beats a tie).
        let off = Policy {
            recency_margin: 0.0,
            ..Policy::default()
        };
        let d = choose(&off, &input).unwrap();
        assert_eq!((d.backend, d.reason), (winner(&v, seed), Reason::Placed));
        // A backend with nothing to prefill still wins, however recently
        // it was sent a request.
        let mut idle = v.clone();
        idle[0] = idle[0].with_prefill(0).with_last_start(50);
        let input = Inputs {
            backends: &idle,
            ..input
        };
        assert_eq!(choose(&recency, &input).unwrap().backend, 0);
        // A prompt whose family the traffic's reuse vouches for keeps its
        // rendezvous lead when that beats the others by more than the margin.
        let first = winner(&v, seed);
        let input = Inputs {
            backends: &v,
            reuse: 1.0,
            ..input
        };
        let d = choose(&recency, &input).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
        // With a replica sending there too, placement is as without it.
        let shared: Vec<_> = v.iter().map(|b| b.with_clients(Clients::Others)).collect();
        let input = Inputs {
            backends: &shared,
            reuse: 0.0,
            ..input
        };
        assert_eq!(
            choose(&recency, &input).unwrap(),
            choose(&off, &input).unwrap()
        );
    }

    #[test]
    fn alone_a_new_prompt_takes_an_idle_engine_over_a_busy_one() {
        // Three engines answer a request each (their prefill is done); the
        // fourth is idle. A 4 KiB new prompt whose rendezvous winner is busy,
        // with a few percent of recent requests reusing a prefix: its
        // family's lead keeps it on that winner.
        let v = views(&[(1, 0), (1, 0), (1, 0), (1, 0)]);
        let seed = (0..64u64)
            .find(|&seed| winner(&v, seed) != 3)
            .expect("some seed's winner is not the last backend");
        let mut v = v;
        v[3].in_flight = 0;
        let input = Inputs {
            placement: seed,
            reuse: 0.05,
            ..inputs(&v, &[0; 4], 4096)
        };
        let policy = Policy::default();
        let d = choose(&policy, &input).unwrap();
        assert_eq!((d.backend, d.reason), (winner(&v, seed), Reason::Placed));
        let idle = idle_instead(&policy, &input, &d).expect("an idle engine");
        assert_eq!((idle.backend, idle.reason), (3, Reason::Idle));
        // Of two idle engines, the prompt's own rendezvous order picks, so
        // simultaneous decisions for different prompts spread.
        let mut two = v.clone();
        let other = (0..3).find(|&i| i != d.backend).expect("a third backend");
        two[other].in_flight = 0;
        let both = Inputs {
            backends: &two,
            ..input
        };
        let by_rendezvous = [other, 3]
            .into_iter()
            .max_by_key(|&i| rendezvous(two[i].name, seed))
            .expect("two");
        let idle = idle_instead(&policy, &both, &d).expect("an idle engine");
        assert_eq!(idle.backend, by_rendezvous);
        // Unless the request's client connection was last answered by one
        // of them: its own request there has ended, while the other may be
        // between two turns of another client's conversation.
        let other_one = if by_rendezvous == 3 { other } else { 3 };
        let idle = idle_instead(
            &policy,
            &Inputs {
                previous: Some(other_one),
                ..both
            },
            &d,
        )
        .expect("an idle engine");
        assert_eq!((idle.backend, idle.reason), (other_one, Reason::Idle));
        // A previous engine that is busy now is no hint.
        let idle = idle_instead(
            &policy,
            &Inputs {
                previous: Some(d.backend),
                ..both
            },
            &d,
        )
        .expect("an idle engine");
        assert_eq!(idle.backend, by_rendezvous);
        // It does not apply where:
        let none = |policy: &Policy, input: &Inputs, d: &Decision| {
            assert_eq!(idle_instead(policy, input, d), None, "{input:?}");
        };
        // the traffic shares, under a threshold below 1 (reuse at it or
        // above; by default the rule holds at any reuse rate);
        let sharing = Inputs {
            reuse: 0.95,
            ..input
        };
        let idle = idle_instead(&policy, &sharing, &d).expect("an idle engine");
        assert_eq!(idle.backend, 3);
        let below_half = Policy {
            idle_below_reuse: 0.5,
            ..policy
        };
        none(
            &below_half,
            &Inputs {
                reuse: 0.5,
                ..input
            },
            &d,
        );
        // the rule is off;
        let off = Policy {
            idle_below_reuse: 0.0,
            ..policy
        };
        none(&off, &input, &d);
        // the choice is idle already;
        none(&policy, &input, &Decision { backend: 3, ..d });
        // no engine is idle;
        let busy_all = views(&[(1, 0), (1, 0), (1, 0), (0, 1)]);
        none(
            &policy,
            &Inputs {
                backends: &busy_all,
                ..input
            },
            &d,
        );
        // a replica may send there too (the family goes where it hashes);
        let shared: Vec<_> = v.iter().map(|b| b.with_clients(Clients::Others)).collect();
        none(
            &policy,
            &Inputs {
                backends: &shared,
                ..input
            },
            &d,
        );
        // a sibling still connecting proved the family, or the layout
        // places it;
        none(
            &policy,
            &Inputs {
                pending: Some(d.backend),
                ..input
            },
            &d,
        );
        none(
            &policy,
            &Inputs {
                layout: Some(d.backend),
                ..input
            },
            &d,
        );
        // a later chat turn, a session, or a prefix worth following.
        none(
            &policy,
            &Inputs {
                later_turns: true,
                ..input
            },
            &d,
        );
        none(
            &policy,
            &Inputs {
                session: Some(1),
                ..input
            },
            &d,
        );
        let matched = [4096, 0, 0, 0];
        none(
            &policy,
            &Inputs {
                matched: &matched,
                ..input
            },
            &d,
        );
        // Where caches are weighed, only an idle engine whose cache holds
        // the prompt beside its families in use takes it.
        let sized: Vec<_> = v.iter().map(|b| b.with_cache_tokens(2048)).collect();
        let held = [0, 0, 0, 8 * 1024];
        let full = Inputs {
            backends: &sized,
            held: &held,
            ..input
        };
        none(&policy, &full, &d);
        let roomy = [0; 4];
        let idle = idle_instead(
            &policy,
            &Inputs {
                held: &roomy,
                ..full
            },
            &d,
        );
        assert_eq!(idle.map(|d| d.backend), Some(3));
    }

    #[test]
    fn a_short_shared_preamble_is_not_followed() {
        // 512 bytes shared of a 2,100-byte conversation prefix: placed.
        let v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let matched = [512, 0, 0, 0];
        let mut placed = [0; 4];
        for placement in 0..64u64 {
            let input = Inputs {
                placement,
                ..inputs(&v, &matched, 2100)
            };
            let d = choose(&Policy::default(), &input).unwrap();
            assert_eq!(
                (d.backend, d.reason),
                (winner(&v, placement), Reason::Placed)
            );
            placed[d.backend] += 1;
        }
        assert!(placed.iter().all(|&n| n > 0), "{placed:?}");
    }

    #[test]
    fn a_long_shared_prefix_is_followed_until_load_spreads_it() {
        // Siblings: 6 KiB of system prompt shared, a 300-byte question each.
        let matched = [6144, 0, 0, 0];
        let mut v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let mut holders = [false, false, false, false];
        holders[0] = true;
        let mut followed = 0;
        let sent = 400;
        for placement in 0..sent {
            let held: Vec<usize> = (0..4)
                .map(|i| if holders[i] { matched[0] } else { 0 })
                .collect();
            let input = Inputs {
                placement,
                ..inputs(&v, &held, 6144 + 300)
            };
            let d = choose(&Policy::default(), &input).unwrap();
            if placement < 8 {
                // At low load every sibling goes to the holder.
                assert_eq!((d.backend, d.reason), (0, Reason::PrefixMatch));
            }
            followed += usize::from(d.matched > 0);
            // Nothing finishes: each sibling adds load where it went, and
            // the backend it went to now holds the prefix too.
            v[d.backend].in_flight += 1;
            holders[d.backend] = true;
        }
        // Under load the prefix spread to every backend (each copy once the
        // holders were busier by the 6 KiB's worth, 61 requests), every
        // other request reused it, and the load evened out.
        assert!(holders.iter().all(|&h| h), "{holders:?}");
        assert_eq!(
            followed,
            sent as usize - 3,
            "{followed} of {sent} reused the prefix"
        );
        let loads: Vec<usize> = v.iter().map(BackendLoad::load).collect();
        assert!(
            loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 2,
            "{loads:?}"
        );
    }

    #[test]
    fn a_backend_busy_prefilling_loses_a_new_conversation() {
        let mut v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let seed = 5;
        let first = winner(&v, seed);
        // The rendezvous weight as it holds for replicas, or with recency
        // off: a lone router weighs it by the reuse rate (0 here).
        let policy = Policy {
            recency_margin: 0.0,
            ..Policy::default()
        };
        let input = |v: &[BackendLoad]| {
            choose(
                &policy,
                &Inputs {
                    placement: seed,
                    ..inputs(v, &[0; 4], 4096)
                },
            )
            .unwrap()
        };
        // 1 KiB queued for prefill is within the rendezvous weight.
        v[first].prefill = 1024;
        assert_eq!(input(&v).backend, first);
        // 4 KiB queued: a burst does not wait behind it.
        v[first].prefill = 4096;
        let d = input(&v);
        assert_ne!(d.backend, first);
        assert_eq!(d.reason, Reason::LeastLoaded);
        // A later turn of an unknown conversation goes where its first turn
        // most likely went, whatever is queued there.
        let later = Inputs {
            placement: seed,
            later_turns: true,
            ..inputs(&v, &[0; 4], 4096)
        };
        let d = choose(&Policy::default(), &later).unwrap();
        assert_eq!((d.backend, d.reason), (first, Reason::Placed));
    }

    #[test]
    fn session_wins_over_affinity_but_not_over_the_bound() {
        let v = views(&[(0, 0), (0, 0), (0, 0), (0, 0)]);
        let matched = [9000, 0, 0, 0];
        let seed = (0..).find(|&s| winner(&v, s) != 0).unwrap();
        let input = Inputs {
            placement: 0,
            session: Some(seed),
            ..inputs(&v, &matched, 10)
        };
        let d = choose(&Policy::default(), &input).unwrap();
        assert_eq!(d.reason, Reason::Session);
        assert_ne!(d.backend, 0);
        let mut busy = v.clone();
        busy[d.backend].waiting = 10;
        let input = Inputs {
            backends: &busy,
            ..input
        };
        let again = choose(&Policy::default(), &input).unwrap();
        assert_eq!(again.reason, Reason::Overloaded);
        assert_ne!(again.backend, d.backend);
    }

    proptest! {
        /// Whatever the loads, matches and seeds, the choice respects the bound.
        #[test]
        fn bounded_load_holds(
            loads in prop::collection::vec((0usize..50, 0usize..50, 0usize..100_000, any::<bool>()), 1..=8),
            matched in prop::collection::vec(0usize..200_000, 8),
            extra in 0usize..10_000,
            conversation in 0usize..200_000,
            extends in any::<bool>(),
            later_turns in any::<bool>(),
            placement in any::<u64>(),
            session in any::<Option<u64>>(),
            epsilon in 0.0f64..2.0,
            affinity_weight in 0.0f64..100.0,
            load_weight in 0.0f64..10.0,
            prefilling_weight in 0.0f64..10.0,
            follow_fraction in 0.0f64..=1.0,
            rendezvous_weight in 0.0f64..10.0,
            layout in any::<Option<usize>>(),
            family_weight in 0.0f64..4.0,
            placement_patience in any::<Option<u8>>(),
            patience_holds in prop::sample::select(vec![
                PatienceHolds::Alone,
                PatienceHolds::UntilShared,
                PatienceHolds::Always,
            ]),
            clients in prop::sample::select(vec![Clients::Unknown, Clients::Ours, Clients::Others]),
            reuse in 0.0f64..=1.0,
            pending in any::<Option<usize>>(),
            previous in any::<Option<usize>>(),
            caches in prop::collection::vec(0usize..20_000, 8),
            held in prop::collection::vec(0usize..80_000, 8),
            bytes_per_token in 0.0f64..8.0,
            recency_margin in prop::sample::select(vec![0.0, 0.25, 1.0]),
            idle_below_reuse in prop::sample::select(vec![0.0, 0.5, 1.0]),
            starts in prop::collection::vec(any::<u64>(), 8),
        ) {
            let v: Vec<BackendLoad> = loads
                .iter()
                .zip(NAMES)
                .zip(&caches)
                .zip(&starts)
                .map(|(((&(in_flight, waiting, prefill, others), name), &cache_tokens), &last_start)| BackendLoad { name, in_flight, waiting, prefill, local: false, clients: if others { Clients::Others } else { clients }, cache_tokens, bytes_per_token: 0.0, last_start })
                .collect();
            let policy = Policy {
                logic: Logic::PrefixAware,
                epsilon,
                affinity_weight,
                load_weight,
                prefilling_weight,
                placement_epsilon: Some(epsilon),
                follow_fraction,
                rendezvous_weight,
                placement_prefix: 2048,
                family_weight,
                placement_patience: placement_patience.map(f64::from),
                patience_holds,
                bytes_per_token,
                recency_margin,
                idle_below_reuse,
            };
            let matched = &matched[..v.len()];
            let input = Inputs {
                backends: &v,
                matched,
                key_len: matched.iter().copied().max().unwrap_or(0) + extra,
                conversation,
                extends,
                later_turns,
                placement,
                reuse,
                session,
                pending: pending.map(|p| p % (v.len() + 1)),
                layout: layout.map(|l| l % (v.len() + 1)),
                held: &held[..v.len()],
                previous: previous.map(|p| p % (v.len() + 1)),
            };
            let d = choose(&policy, &input).unwrap();
            let total: usize = v.iter().map(BackendLoad::load).sum::<usize>() + 1;
            prop_assert!(v.iter().any(|b| b.load() < load_bound(epsilon, &v)));
            let bound = ((1.0 + epsilon) * total as f64 / v.len() as f64)
                .ceil()
                .max(total.div_ceil(v.len()) as f64);
            // Only a request following a prefix may pass the bound, by its
            // match's worth, or a new one placed on its rendezvous winner, by
            // its conversation prefix's worth as a family.
            let follows = !policy.is_placement(&input) && session.is_none();
            let first = input.pending.filter(|&p| p < v.len())
                .or(input.layout.filter(|&l| l < v.len()))
                .unwrap_or_else(|| {
                    (0..v.len()).max_by_key(|&i| rendezvous(v[i].name, placement)).unwrap()
                });
            // A family its rendezvous backend has no room for is placed on
            // the next in rendezvous order with room, which it stretches
            // alike.
            let placed_first = policy.is_placement(&input) && session.is_none()
                && (d.backend == first || d.reason == Reason::CacheFull);
            let reuse = if input.pending.is_some() { 1.0 } else { reuse };
            let conversation_len = if conversation == 0 { input.key_len } else { conversation.min(input.key_len) };
            let worth = if follows {
                affinity_weight * matched[d.backend] as f64 / 1024.0
            } else if placed_first {
                family_weight * reuse * affinity_weight * conversation_len as f64 / 1024.0
            } else {
                0.0
            };
            let slack = match (worth > 0.0, load_weight > 0.0) {
                (false, _) => 0.0,
                (true, true) => (worth / load_weight).floor(),
                (true, false) => f64::INFINITY,
            };
            prop_assert!((v[d.backend].load() as f64) < bound + slack,
                "{:?} chose load {} with bound {} + {}", d, v[d.backend].load(), bound, slack);
            prop_assert_eq!(d.matched, matched[d.backend]);
            // A pure function: the same inputs give the same answer.
            prop_assert_eq!(choose(&policy, &input), Some(d));
            // An idle engine first only replaces a busy choice of rule 3
            // with an idle backend, which is always within the bound.
            if let Some(idle) = idle_instead(&policy, &input, &d) {
                prop_assert!(policy.is_placement(&input) && session.is_none() && !later_turns);
                prop_assert!(v[d.backend].load() > 0 && v[idle.backend].load() == 0);
                prop_assert_eq!((idle.matched, idle.reason), (matched[idle.backend], Reason::Idle));
                prop_assert!(reuse < idle_below_reuse || idle_below_reuse >= 1.0);
            }
        }
    }
}
