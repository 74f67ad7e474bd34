//! One client connection: read a request, answer it or route it, relay the
//! response, and close cleanly.
//!
//! Requests are read and answered in order, each routed on its own prompt,
//! so one kept-alive client connection may be served by several backends
//! over its life. A routed request goes out on a pooled backend connection
//! (or a new one), and that connection goes back to the pool once the
//! response has ended by its framing. A request that meets a pooled
//! connection the backend has meanwhile closed is sent again on a new one:
//! no byte of its response had arrived. `/health` and `/metrics` are served
//! by the daemon itself.
use std::{
    mem,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use smallvec::SmallVec;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::{
    admission::Admitted,
    backend::{Backend, Backends, InFlight, Outcome},
    daemon::Shared,
    dataplane::{Client, Exchanged, Forward, RelayError, Watch},
    error::{ApiError, Fault, Limit, Timeout},
    http::{self, ChunkedDecoder, Framing, Head},
    metrics::{BackendCounters, StatusLabel},
    prompt::{self, Endpoint},
    route::{BackendLoad, Decision, RouteRequest, Walk},
    upstream::{Leg, SendError},
};

/// How long a closing connection waits for the client to stop sending.
const LINGER: Duration = Duration::from_secs(2);
/// Fleets up to this size are weighed without a heap allocation.
const INLINE_BACKENDS: usize = 16;

/// Buffers a connection keeps from one request to the next, so that a
/// routed request allocates nothing once the connection has served one.
#[derive(Default)]
struct Buffers {
    /// Where the next request's [`Head::forward_head`] is built.
    head: Vec<u8>,
    /// Where the next request's body is read.
    body: Vec<u8>,
    /// Where the request sent to the backend is put together.
    outgoing: Vec<u8>,
    /// The backends that may serve the request.
    candidates: Vec<usize>,
    /// Those backends in the order to try them.
    order: Vec<usize>,
    /// The prompt key's hashes, from selection to the index's record.
    walk: Walk,
    /// The backend that answered the connection's previous request, a hint
    /// for placing its next (see `RouteRequest::previous`).
    previous: Option<Arc<Backend>>,
}

/// Buffers larger than this are given back after a request, so that a
/// kept-alive connection holds little memory whatever its last request was
/// (a client could otherwise park up to the body limit per connection).
const KEPT_BUFFER: usize = 64 << 10;

impl Buffers {
    /// Gives back any buffer a large request grew past [`KEPT_BUFFER`].
    fn trim(&mut self) {
        for buffer in [&mut self.head, &mut self.body, &mut self.outgoing] {
            if buffer.capacity() > KEPT_BUFFER {
                *buffer = Vec::new();
            }
        }
        // A walk holds about 36 bytes per 64-byte block of key.
        self.walk.shrink_to(KEPT_BUFFER / 64);
    }

    /// Bytes the buffers hold (for tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.head.capacity() + self.body.capacity() + self.outgoing.capacity()
    }
}

/// One request read off the connection.
struct Request {
    head: Head,
    /// The request body.
    body: Vec<u8>,
}

/// What to do with the connection after a request.
enum Next {
    KeepAlive,
    Close,
}

/// How long a refused connection is drained before it closes (see
/// [`refuse`]): enough for a request already sent to arrive, short enough
/// that refusals hold few descriptors.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);

/// Answers a connection over `--max-connections` with a 503 and closes it.
pub(crate) async fn refuse(stream: TcpStream, shared: Arc<Shared>) {
    let mut client = shared.dataplane.client(stream);
    let err = ApiError::unavailable(format!(
        "the router holds its most client connections ({}, --max-connections); retry shortly",
        shared.admission.max()
    ))
    .over(Limit::Connections);
    warn!(fault = err.fault().as_str(), error = %err.message, "connection refused");
    answer_error(&mut client, &shared, &err).await;
    client.close(REFUSAL_LINGER).await;
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The OpenAI API and the daemon's own endpoints (no `--admin-listen`).
    Both,
    /// The OpenAI API only (the client-facing port under `--admin-listen`).
    Api,
    /// `/metrics`, `/health` and `/ready` only (`--admin-listen`).
    Admin,
}

impl Role {
    fn serves_api(self) -> bool {
        self != Role::Admin
    }

    fn serves_admin(self) -> bool {
        self != Role::Api
    }
}

/// Serves one client connection to its end; `_admitted` holds its place
/// under `--max-connections` until then.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>, _admitted: Admitted, role: Role) {
    // TCP_NODELAY came from the listener (`dataplane::listen`).
    let mut client = shared.dataplane.client(stream);
    let mut buffers = Buffers::default();
    // The last request, read whole, asked for the close.
    let mut asked_close = false;
    loop {
        let next = match read_request(&mut client, &mut buffers, &shared).await {
            Ok(Some(request)) => {
                asked_close = request.head.close;
                let next = handle(&mut client, &request, &mut buffers, &shared, role).await;
                // The request's buffers serve the next one.
                buffers.head = request.head.into_buffer();
                buffers.body = request.body;
                buffers.trim();
                next
            }
            Ok(None) => Next::Close,
            Err(Failure::Api(err)) => {
                warn!(status = err.status, fault = err.fault().as_str(), error = %err.message, "bad request");
                answer_error(&mut client, &shared, &err).await;
                Next::Close
            }
            Err(Failure::Gone) => Next::Close,
        };
        // Draining: a response that began before the signal could not say
        // `connection: close`; the connection closes after it all the same,
        // unless a pipelined request is waiting (its response will say it).
        let drained = shared.drain.is_draining() && client.pending().is_empty();
        if matches!(next, Next::Close) || drained {
            break;
        }
    }
    if asked_close || client.at_eof() {
        client.close_finished(LINGER).await;
    } else {
        client.close(LINGER).await;
    }
}

enum Failure {
    /// Answer with this error, then close.
    Api(ApiError),
    /// The client is gone; just close.
    Gone,
}

impl From<ApiError> for Failure {
    fn from(err: ApiError) -> Self {
        Failure::Api(err)
    }
}

/// Reads the next whole request; `None` when the client closed, or stayed
/// idle past the idle timeout or until the drain closed the listeners,
/// between requests.
async fn read_request(
    client: &mut Client,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Result<Option<Request>, Failure> {
    let config = &shared.config;
    if client.pending().is_empty() && !client.at_eof() {
        tokio::select! {
            filled = tokio::time::timeout(config.idle_timeout(), fill(client)) => match filled {
                Ok(filled) => filled?,
                Err(_) => {
                    shared.metrics.limit_exceeded(Limit::IdleTime);
                    return Ok(None);
                }
            },
            () = shared.drain.closed() => return Ok(None),
        }
    }
    read_started_request(client, buffers, shared).await
}

/// Reads a request whose first bytes may already be in `pending`, within the
/// request timeout.
async fn read_started_request(
    client: &mut Client,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Result<Option<Request>, Failure> {
    let limits = shared.config.limits();
    // Most requests arrive whole with their first bytes: the timer is set
    // only once the request has to wait for more.
    let mut deadline = None;
    let head = loop {
        if let Some(head) = http::parse_head(
            client.pending(),
            &limits,
            &shared.config.session_header,
            &mut buffers.head,
        )? {
            break head;
        }
        if client.at_eof() {
            if client.pending().is_empty() {
                return Ok(None);
            }
            return Err(ApiError::bad_request("connection closed inside a request head").into());
        }
        fill_by(client, shared, &mut deadline).await?;
    };
    let body = match head.body {
        Framing::Length(len) => {
            let total = head.head_len + len;
            if head.expect_continue && client.pending().len() < total {
                client
                    .write(http::CONTINUE)
                    .await
                    .map_err(|_| Failure::Gone)?;
            }
            while client.pending().len() < total {
                if client.at_eof() {
                    return Err(ApiError::bad_request(format!(
                        "connection closed after {} of {len} body bytes",
                        client.pending().len() - head.head_len
                    ))
                    .into());
                }
                fill_by(client, shared, &mut deadline).await?;
            }
            let mut body = mem::take(&mut buffers.body);
            body.clear();
            body.extend_from_slice(&client.pending()[head.head_len..total]);
            client.consume(total);
            body
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::new(limits.chunked(head.head_len));
            let mut continued = false;
            loop {
                if let Some(used) = decoder
                    .decode(&client.pending()[head.head_len..])
                    .map_err(ApiError::from)?
                {
                    client.consume(head.head_len + used);
                    break decoder.into_body();
                }
                if head.expect_continue && !continued {
                    continued = true;
                    client
                        .write(http::CONTINUE)
                        .await
                        .map_err(|_| Failure::Gone)?;
                }
                if client.at_eof() {
                    return Err(
                        ApiError::bad_request("connection closed inside a chunked body").into(),
                    );
                }
                fill_by(client, shared, &mut deadline).await?;
            }
        }
    };
    Ok(Some(Request { head, body }))
}

/// Reads more bytes of a started request, failing with 408 past the
/// request timeout (counted from the first wait).
async fn fill_by(
    client: &mut Client,
    shared: &Shared,
    deadline: &mut Option<tokio::time::Instant>,
) -> Result<(), Failure> {
    let deadline = *deadline
        .get_or_insert_with(|| tokio::time::Instant::now() + shared.config.request_timeout());
    match tokio::time::timeout_at(deadline, fill(client)).await {
        Ok(filled) => filled,
        Err(_) => Err(ApiError::request_timeout(format!(
            "the request did not arrive within {} ms",
            shared.config.request_timeout_ms
        ))
        .over(Limit::RequestTime)
        .into()),
    }
}

/// Reads more bytes from the client (see [`Client::fill`]).
async fn fill(client: &mut Client) -> Result<(), Failure> {
    client.fill().await.map(drop).map_err(|_| Failure::Gone)
}

async fn handle(
    client: &mut Client,
    request: &Request,
    buffers: &mut Buffers,
    shared: &Shared,
    role: Role,
) -> Next {
    let Request { head, body } = request;
    let path = head.path();
    let result = if ADMIN_PATHS.contains(&path) {
        if role.serves_admin() {
            admin(client, head, shared).await
        } else {
            Err(ApiError::not_found(format!(
                "{path} is served on the admin listener (--admin-listen)"
            ))
            .into())
        }
    } else if !role.serves_api() {
        Err(ApiError::not_found(format!(
            "no route for {path}: this listener serves {}",
            ADMIN_PATHS.join(", ")
        ))
        .into())
    } else {
        match (head.method(), path) {
            ("POST", path) if let Some(endpoint) = Endpoint::of_path(path) => {
                proxy(client, head, body, Some(endpoint), buffers, shared).await
            }
            // Other OpenAI endpoints (`/v1/models`, …) carry no prompt: any
            // backend can answer them.
            (_, path) if path.starts_with("/v1/") => {
                proxy(client, head, body, None, buffers, shared).await
            }
            (_, path) => Err(ApiError::not_found(format!("no route for {path}")).into()),
        }
    };
    match result {
        Ok(next) => next,
        Err(Failure::Api(err)) => {
            warn!(path = head.path(), status = err.status, fault = err.fault().as_str(), error = %err.message, "request failed");
            answer_error(client, shared, &err).await;
            Next::Close
        }
        Err(Failure::Gone) => Next::Close,
    }
}

/// The daemon's own endpoints: liveness, readiness, metrics.
const ADMIN_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

/// Answers one of [`ADMIN_PATHS`]: `/health` while the daemon runs,
/// `/ready` while some backend is up and the daemon is not draining (503
/// otherwise), `/metrics` in the OpenMetrics text format.
async fn admin(client: &mut Client, head: &Head, shared: &Shared) -> Result<Next, Failure> {
    if head.method() != "GET" {
        return Err(ApiError::method_not_allowed(format!(
            "{} {} is not supported; use GET",
            head.method(),
            head.path()
        ))
        .into());
    }
    let close = head.close || shared.drain.is_draining();
    let response = match head.path() {
        "/health" => http::ok_response("text/plain", b"ok\n", close),
        "/ready" if shared.drain.is_draining() => {
            return Err(ApiError::unavailable(
                "the router is draining after a shutdown signal; it takes no new requests soon",
            )
            .into());
        }
        "/ready" if shared.backends.snapshot().any_up() => {
            http::ok_response("text/plain", b"ready\n", close)
        }
        "/ready" => return Err(ApiError::unavailable("no backend is up").into()),
        _ => {
            let text = shared.metrics.encode();
            let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            http::ok_response(content_type, text.as_bytes(), close)
        }
    };
    client.write(&response).await.map_err(|_| Failure::Gone)?;
    Ok(if close { Next::Close } else { Next::KeepAlive })
}

/// Routes a request to a backend and relays its response: extract the
/// prompt, select, connect, record, exchange.
async fn proxy(
    client: &mut Client,
    head: &Head,
    body: &[u8],
    endpoint: Option<Endpoint>,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Result<Next, Failure> {
    let request_id = match &head.request_id {
        Some(id) => RequestId::Client(id),
        None => RequestId::Ours(shared.next_id.fetch_add(1, Ordering::Relaxed)),
    };
    let input = routing_input(endpoint, body)?;
    let Routed {
        decision,
        backends,
        mut leg,
        in_flight,
        prefill,
    } = route(head, input.as_ref(), request_id, buffers, shared).await?;
    shared.metrics.decided(decision.reason);
    let routing = Routing {
        head,
        input: input.as_ref(),
        decision: &decision,
        request_id,
    };
    let key_len = input.as_ref().map_or(0, |input| input.key.len());
    let attempts = attempts(&buffers.order, shared);
    let request = outgoing(head, body, request_id, mem::take(&mut buffers.outgoing));
    let mut count = Some((in_flight, prefill));
    // Each turn sends the request to `leg`'s backend; a 503 that reached
    // no client byte, or a backend that closed its pooled connection and
    // refuses a new one, sends it on to the next backend in the order,
    // while the budget lasts.
    let (result, backend) = loop {
        let backend = Arc::clone(&leg.backend);
        sent_to(&backend, routing, buffers, shared);
        // Backends of the order tried so far, this one included.
        let tried = buffers.order[..attempts]
            .iter()
            .position(|&index| index == leg.index)
            .map_or(attempts, |at| at + 1);
        let forward = forward(&request, head, tried < attempts, shared);
        // The first attempt carries the count `route` started; a resend on
        // a fresh connection starts its own.
        let (in_flight, prefill) = count
            .take()
            .unwrap_or_else(|| (backend.start_request(key_len), key_len));
        let mut first_count = Some(in_flight);
        let watch = || Watched {
            in_flight: Some(
                first_count
                    .take()
                    .unwrap_or_else(|| backend.start_request(prefill)),
            ),
            counters: &backend.counters,
        };
        let result = shared.upstream.exchange(client, leg, &forward, watch).await;
        if let Some(outcome) = outcome(&result) {
            backend.record(outcome);
        }
        let Some((why, retries)) = retry(&result, tried < attempts, shared) else {
            break (result, backend);
        };
        retries.inc();
        passed_over(&backend, why, routing, buffers, shared);
        let order = &buffers.order[tried..attempts];
        leg = connect(order, &backends, request_id, shared).await?;
    };
    buffers.outgoing = request;
    count_relayed(&result, shared);
    if client.take_held_back() {
        shared.metrics.limit_exceeded(Limit::Pipelined);
    }
    buffers.previous = result.is_ok().then(|| Arc::clone(&backend));
    match result {
        Ok(exchanged) => Ok(relayed(&exchanged, client, request_id, shared)),
        Err(err) => Err(send_failure(err, &backend, request_id, shared)),
    }
}

/// The model and prompt key of a request to a prompt-carrying `endpoint`;
/// a body they cannot be read from is the client's error.
fn routing_input(
    endpoint: Option<Endpoint>,
    body: &[u8],
) -> Result<Option<prompt::RoutingInput<'_>>, ApiError> {
    endpoint
        .map(|endpoint| prompt::extract(endpoint, body))
        .transpose()
        .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))
}

/// How `request` goes to a backend; `retry_unavailable` while the budget
/// leaves another backend to try.
fn forward<'a>(
    request: &'a [u8],
    head: &Head,
    retry_unavailable: bool,
    shared: &Shared,
) -> Forward<'a> {
    Forward {
        request,
        head_request: head.method() == "HEAD",
        // Draining: tell the client to take its next request elsewhere.
        client_close: head.close || shared.drain.is_draining(),
        retry_unavailable,
    }
}

/// What [`proxy`] knows of the request it routes, for its log lines and
/// the prefix index.
#[derive(Clone, Copy)]
struct Routing<'r> {
    head: &'r Head,
    input: Option<&'r prompt::RoutingInput<'r>>,
    decision: &'r Decision,
    request_id: RequestId<'r>,
}

/// Notes that `backend` took the connection for a request: from now on its
/// cache is where the prompt is, whatever becomes of the response. Logs the
/// decision and counts the request there.
fn sent_to(backend: &Backend, routing: Routing<'_>, buffers: &Buffers, shared: &Shared) {
    backend.chosen();
    if let Some(input) = routing.input {
        shared
            .router
            .record(&buffers.walk, &input.key, &backend.name);
        backend.key_sent(input.key.len());
    }
    let model = routing.input.and_then(|input| input.model.as_deref());
    info!(
        request_id = %routing.request_id,
        model = model.filter(|model| !model.is_empty()).unwrap_or("-"),
        backend = %backend.name,
        matched = routing.decision.matched,
        reason = routing.decision.reason.as_str(),
        "{} {}", routing.head.method(), routing.head.path()
    );
    backend.counters.requests.inc();
}

/// Notes that `backend` did not take the request after all (`why`), which
/// goes on to the next backend: it cached nothing, so the request's
/// siblings should not follow it there.
fn passed_over(
    backend: &Backend,
    why: &str,
    routing: Routing<'_>,
    buffers: &Buffers,
    shared: &Shared,
) {
    if let Some(input) = routing.input {
        shared
            .router
            .forget(&buffers.walk, &input.key, &backend.name);
    }
    warn!(request_id = %routing.request_id, backend = %backend.name, "backend {why}; sending the request to the next one");
}

/// Whether an exchange's failure sends the request on to the next backend
/// (`more` says one is left within the budget): why, and what it counts.
/// Only when nothing of the request reached an engine, nor any response
/// byte the client.
fn retry<'m>(
    result: &Result<Exchanged, SendError>,
    more: bool,
    shared: &'m Shared,
) -> Option<(&'static str, &'m Counter)> {
    match result {
        Err(SendError::Relay(RelayError::Unavailable)) => {
            Some(("answered 503", &shared.metrics.unavailable_retries))
        }
        Err(SendError::Reconnect(_)) if more => Some((
            "closed its pooled connection and refuses new ones",
            &shared.metrics.connect_retries,
        )),
        _ => None,
    }
}

/// How many backends of `order` a request may be sent to: the first and
/// `--retries` more.
fn attempts(order: &[usize], shared: &Shared) -> usize {
    let budget = usize::try_from(shared.config.retries).unwrap_or(usize::MAX);
    order.len().min(budget.saturating_add(1))
}

/// What an exchange says of its backend's health; `None` when the client
/// or the router failed it.
fn outcome(result: &Result<Exchanged, SendError>) -> Option<Outcome> {
    match result {
        Ok(exchanged) if exchanged.status >= 500 => Some(Outcome::Failure),
        Ok(_) => Some(Outcome::Success),
        Err(SendError::Relay(RelayError::Client(_) | RelayError::Sockmap(_))) => None,
        Err(_) => Some(Outcome::Failure),
    }
}

/// Notes a response relayed whole; the client connection stays open if
/// both sides allow it.
fn relayed(exchanged: &Exchanged, client: &Client, request_id: RequestId, shared: &Shared) -> Next {
    shared
        .metrics
        .first_byte
        .observe(exchanged.first_byte.as_secs_f64());
    debug!(request_id = %request_id, status = exchanged.status, relayed = ?exchanged.relayed, "response relayed");
    if exchanged.client_keep_alive && !client.at_eof() {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// A request's way to a backend: why it was chosen, the connection, and
/// its count there.
struct Routed {
    decision: Decision,
    /// The fleet snapshot the request was routed on (`leg.index` and the
    /// connection's `buffers.order` are positions in it).
    backends: Arc<Backends>,
    leg: Leg,
    /// The request in flight on `leg`'s backend.
    in_flight: InFlight,
    /// Key bytes that backend must prefill: the key less what it holds, or
    /// all of it when the chosen backend could not be reached.
    prefill: usize,
}

/// Selects a backend and connects in fallback order, both on one snapshot
/// of the fleet. The request counts on its backend from the moment it is
/// chosen, so requests selected while it connects see it there (a burst of
/// new prompts would otherwise all see the same stale loads); the count
/// moves if another backend takes it.
async fn route(
    head: &Head,
    input: Option<&prompt::RoutingInput<'_>>,
    request_id: RequestId<'_>,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Result<Routed, Failure> {
    let backends = shared.backends.snapshot();
    let key_len = input.map_or(0, |input| input.key.len());
    let mut claimed = None;
    let decision = select(head, input, buffers, &backends, shared, &mut claimed)?;
    let chosen_prefill = key_len.saturating_sub(decision.matched);
    let reserved = claimed.or_else(|| {
        buffers
            .order
            .first()
            .and_then(|&first| backends.get(first))
            .map(|chosen| chosen.start_request(chosen_prefill))
    });
    let attempts = attempts(&buffers.order, shared);
    let leg = connect(&buffers.order[..attempts], &backends, request_id, shared).await?;
    let (in_flight, prefill) = match reserved {
        Some(reserved) if buffers.order.first() == Some(&leg.index) => (reserved, chosen_prefill),
        _ => (leg.backend.start_request(key_len), key_len),
    };
    Ok(Routed {
        decision,
        backends,
        leg,
        in_flight,
        prefill,
    })
}

/// Picks the backend for a request (`input`: its prompt, if its endpoint
/// has one) among those of `backends` that may serve it, and leaves every
/// candidate's position in `backends` in `buffers.order`, in the order to
/// try them. A decision for an idle backend holds only if the request
/// takes it before another does: then the request is started there, in
/// `claimed` (see `Router::select`).
fn select(
    head: &Head,
    input: Option<&prompt::RoutingInput>,
    buffers: &mut Buffers,
    backends: &Backends,
    shared: &Shared,
    claimed: &mut Option<InFlight>,
) -> Result<Decision, Failure> {
    let Buffers {
        candidates,
        order,
        walk,
        previous,
        ..
    } = buffers;
    match input {
        // Only backends serving the model: 404 when none does, 400 when the
        // model is left out of a fleet serving several.
        Some(input) => backends
            .candidates_into(input.model.as_deref(), candidates)
            .map_err(ApiError::from)?,
        None => backends.reachable_into(candidates),
    }
    let loads = loads(backends.all(), candidates, shared.backends.peers().get());
    let request = input.map(|input| RouteRequest {
        model: input.model.as_deref().unwrap_or_default().as_bytes(),
        key: &input.key,
        conversation: input.conversation,
        session: head.session.as_deref(),
        later_turns: input.later_turns,
        previous: previous.as_deref().map(|backend| backend.name.as_str()),
    });
    let key_len = input.map_or(0, |input| input.key.len());
    let candidates = &*candidates;
    let claim = |idle: &Decision| {
        *claimed = candidates
            .get(idle.backend)
            .and_then(|&index| backends.get(index))
            .and_then(|backend| backend.start_if_idle(key_len.saturating_sub(idle.matched)));
        claimed.is_some()
    };
    let decision = shared
        .router
        .select(request.as_ref(), &loads, walk, order, claim)
        .ok_or_else(|| ApiError::unavailable("no backend is available: the fleet is empty"))?;
    // Positions among the candidates → backend indexes.
    for slot in order.iter_mut() {
        *slot = candidates[*slot];
    }
    Ok(decision)
}

/// A connection to the first backend of `order` that takes one (see
/// [`crate::upstream::Upstream::acquire`]); a 502/503 when none does.
async fn connect(
    order: &[usize],
    backends: &Backends,
    request_id: RequestId<'_>,
    shared: &Shared,
) -> Result<Leg, Failure> {
    let acquired = shared.upstream.acquire(order, backends).await;
    if let Ok(leg) = &acquired
        && let Some(skipped) = order.iter().position(|&index| index == leg.index)
    {
        shared.metrics.connect_retries.inc_by(skipped as u64);
    }
    acquired.map_err(|err| {
        warn!(
            request_id = %request_id,
            fault = err.fault().as_str(),
            retry_safe = err.retry_safe(),
            error = %err,
            "no backend took the request"
        );
        ApiError::from(err).into()
    })
}

/// The request as it goes to the backend, built in `buffer` (a buffer the
/// connection keeps): the head as forwarded, our request id if the client
/// sent none, the body's length, the body.
fn outgoing(head: &Head, body: &[u8], request_id: RequestId, mut buffer: Vec<u8>) -> Vec<u8> {
    buffer.clear();
    buffer.extend_from_slice(head.forward_head());
    if let RequestId::Ours(n) = request_id {
        buffer.extend_from_slice(b"x-request-id: rtr-");
        buffer.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        buffer.extend_from_slice(b"\r\n");
    }
    buffer.extend_from_slice(b"content-length: ");
    buffer.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    buffer.extend_from_slice(b"\r\n\r\n");
    buffer.extend_from_slice(body);
    buffer
}

/// Counts the bytes an exchange relayed, by how they moved.
fn count_relayed(result: &Result<Exchanged, SendError>, shared: &Shared) {
    let relayed = match result {
        Ok(exchanged) => exchanged.relayed,
        Err(SendError::Relay(
            RelayError::Backend { relayed, .. }
            | RelayError::BadResponse { relayed, .. }
            | RelayError::TimedOut { relayed, .. },
        )) => *relayed,
        Err(_) => return,
    };
    shared.metrics.head_bytes.inc_by(relayed.head);
    shared.metrics.copied_bytes.inc_by(relayed.copied);
    shared.metrics.piped_bytes.inc_by(relayed.piped);
}

/// What the client gets when an exchange with `backend` failed: a 502 if
/// nothing of the response reached it yet, else the connection closes.
fn send_failure(
    err: SendError,
    backend: &Backend,
    request_id: RequestId,
    shared: &Shared,
) -> Failure {
    let err = match err {
        SendError::Reconnect(err) => {
            shared.metrics.backend_failures.inc();
            return ApiError::bad_gateway(format!("backend {} failed: {err}", backend.name)).into();
        }
        SendError::Relay(err) => err,
    };
    if err.fault() == Fault::Backend {
        shared.metrics.backend_failures.inc();
    }
    match err {
        RelayError::NoResponse(err) | RelayError::BackendWrite(err) => {
            ApiError::bad_gateway(format!(
                "backend {} closed the connection without a response ({err})",
                backend.name
            ))
            .into()
        }
        RelayError::BadResponse { relayed, source } => {
            warn!(request_id = %request_id, backend = %backend.name, %source, "invalid response from the backend");
            if relayed.any() {
                Failure::Gone
            } else {
                ApiError::bad_gateway(format!(
                    "backend {} sent an invalid response: {source}",
                    backend.name
                ))
                .into()
            }
        }
        RelayError::Backend { relayed, source } => {
            if relayed.any() {
                warn!(request_id = %request_id, backend = %backend.name, %source, "backend failed mid-response; closing the client");
                Failure::Gone
            } else {
                ApiError::bad_gateway(format!("backend {} failed: {source}", backend.name)).into()
            }
        }
        RelayError::TimedOut {
            timeout,
            after,
            relayed,
        } => {
            shared.metrics.timeout_counter(timeout).inc();
            timed_out(timeout, after, relayed.any(), backend, request_id)
        }
        // Only returned while another backend may be tried (see `proxy`).
        RelayError::Unavailable => {
            ApiError::unavailable(format!("backend {} answered 503", backend.name)).into()
        }
        RelayError::Client(err) => {
            debug!(request_id = %request_id, %err, "client went away");
            Failure::Gone
        }
        err @ RelayError::Sockmap(_) => {
            // Map operations fail only after the head went out (the body
            // hand-over), so the client cannot get an error response: close.
            warn!(request_id = %request_id, %err, "dataplane failure");
            Failure::Gone
        }
    }
}

/// A backend kept a response waiting past `timeout` (`after`): a 504 if
/// nothing reached the client yet, else its connection closes.
fn timed_out(
    timeout: Timeout,
    after: Duration,
    relayed_any: bool,
    backend: &Backend,
    request_id: RequestId,
) -> Failure {
    let waited = match timeout {
        Timeout::ResponseIdle => "stopped sending its response for",
        _ => "sent no response within",
    };
    let message = format!(
        "backend {} {waited} {} ms ({})",
        backend.name,
        after.as_millis(),
        timeout.flag()
    );
    if relayed_any {
        warn!(request_id = %request_id, "{message}; closing the client");
        Failure::Gone
    } else {
        ApiError::gateway_timeout(message).into()
    }
}

/// A routed request as the backend's counts and histograms see it: in
/// flight until its response ends, prefilling until its body begins.
struct Watched<'a> {
    in_flight: Option<InFlight>,
    counters: &'a BackendCounters,
}

impl Watch for Watched<'_> {
    fn first_body(&mut self, since_sent: Duration) {
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.response_began();
        }
        self.counters.ttft.observe(since_sent.as_secs_f64());
    }

    fn body_gap(&mut self, gap: Duration) {
        self.counters.itl.observe(gap.as_secs_f64());
    }

    fn ended(&mut self) {
        self.in_flight = None;
    }
}

/// A request's id for the backend and the logs: the client's
/// `x-request-id`, else one the router numbers.
#[derive(Clone, Copy)]
enum RequestId<'a> {
    Client(&'a str),
    Ours(u64),
}

impl std::fmt::Display for RequestId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestId::Client(id) => f.write_str(id),
            RequestId::Ours(n) => write!(f, "rtr-{n}"),
        }
    }
}

/// What routing sees of the `candidates`, in their order (on the stack for
/// fleets of up to [`INLINE_BACKENDS`]), who sends to them given the
/// `peers` known ([`crate::route::Clients::given_peers`]).
fn loads<'a>(
    backends: &'a [Arc<Backend>],
    candidates: &[usize],
    peers: Option<usize>,
) -> SmallVec<[BackendLoad<'a>; INLINE_BACKENDS]> {
    let now = crate::backend::health::clock();
    candidates
        .iter()
        .filter_map(|&index| backends.get(index))
        .map(|backend| {
            let view = backend.routing_view(now);
            view.with_clients(view.clients.given_peers(peers))
        })
        .collect()
}

async fn answer_error(client: &mut Client, shared: &Shared, err: &ApiError) {
    shared
        .metrics
        .errors
        .get_or_create(&StatusLabel { status: err.status })
        .inc();
    if let Some(limit) = err.limit {
        shared.metrics.limit_exceeded(limit);
    }
    let _ = client.write(&err.to_response()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_of_a_large_request_are_given_back() {
        let mut buffers = Buffers::default();
        buffers.body.reserve(4 << 20);
        buffers.outgoing.reserve(4 << 20);
        buffers.head.reserve(1024);
        buffers.trim();
        assert!(buffers.held() <= 2 * KEPT_BUFFER, "{}", buffers.held());
        // Small ones are kept for the next request.
        assert!(buffers.head.capacity() >= 1024);
    }
}
