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
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use smallvec::SmallVec;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tracing::{debug, info, warn};

use crate::{
    Shared,
    backend::Backend,
    backend::InFlight,
    dataplane::{BackendConn, Client, Exchanged, Forward, RelayError, Watch},
    error::ApiError,
    http::{self, ChunkedDecoder, Framing, Head},
    metrics::{BackendCounters, StatusLabel},
    prompt::{self, Endpoint},
    route::{BackendLoad, Decision, Reason, RouteRequest},
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

/// Serves one client connection to its end.
pub(crate) async fn serve(stream: TcpStream, shared: Arc<Shared>) {
    // Small responses and errors must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let mut client = shared.dataplane.client(stream);
    let mut buffers = Buffers::default();
    loop {
        let next = match read_request(&mut client, &mut buffers, &shared).await {
            Ok(Some(request)) => {
                let next = handle(&mut client, &request, &mut buffers, &shared).await;
                // The request's buffers serve the next one.
                buffers.head = request.head.into_buffer();
                buffers.body = request.body;
                next
            }
            Ok(None) => Next::Close,
            Err(Failure::Api(err)) => {
                warn!(status = err.status, error = %err.message, "bad request");
                answer_error(&mut client, &shared, &err).await;
                Next::Close
            }
            Err(Failure::Gone) => Next::Close,
        };
        if matches!(next, Next::Close) {
            break;
        }
    }
    close(client).await;
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
/// idle past the idle timeout, between requests.
async fn read_request(
    client: &mut Client,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Result<Option<Request>, Failure> {
    let config = &shared.config;
    if client.pending.is_empty() && !client.eof {
        match tokio::time::timeout(config.idle_timeout(), fill(client)).await {
            Ok(filled) => filled?,
            Err(_) => return Ok(None),
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
            &client.pending,
            &limits,
            &shared.config.session_header,
            &mut buffers.head,
        )? {
            break head;
        }
        if client.eof {
            if client.pending.is_empty() {
                return Ok(None);
            }
            return Err(ApiError::bad_request("connection closed inside a request head").into());
        }
        fill_by(client, shared, &mut deadline).await?;
    };
    let body = match head.body {
        Framing::Length(len) => {
            let total = head.head_len + len;
            if head.expect_continue && client.pending.len() < total {
                client
                    .write(http::CONTINUE)
                    .await
                    .map_err(|_| Failure::Gone)?;
            }
            while client.pending.len() < total {
                if client.eof {
                    return Err(ApiError::bad_request(format!(
                        "connection closed after {} of {len} body bytes",
                        client.pending.len() - head.head_len
                    ))
                    .into());
                }
                fill_by(client, shared, &mut deadline).await?;
            }
            let mut body = std::mem::take(&mut buffers.body);
            body.clear();
            body.extend_from_slice(&client.pending[head.head_len..total]);
            client.pending.drain(..total);
            body
        }
        Framing::Chunked => {
            let mut decoder = ChunkedDecoder::default();
            let mut continued = false;
            loop {
                if let Some(used) = decoder.decode(&client.pending[head.head_len..], &limits)? {
                    client.pending.drain(..head.head_len + used);
                    break decoder.into_body();
                }
                if head.expect_continue && !continued {
                    continued = true;
                    client
                        .write(http::CONTINUE)
                        .await
                        .map_err(|_| Failure::Gone)?;
                }
                if client.eof {
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
        .into()),
    }
}

/// Reads more bytes from the client into `pending`.
async fn fill(client: &mut Client) -> Result<(), Failure> {
    match client.read_more().await {
        Ok(0) => client.eof = true,
        Ok(_) => {}
        Err(_) => return Err(Failure::Gone),
    }
    Ok(())
}

async fn handle(
    client: &mut Client,
    request: &Request,
    buffers: &mut Buffers,
    shared: &Shared,
) -> Next {
    let Request { head, body } = request;
    let result = match (head.method(), head.path()) {
        ("GET", "/health") => {
            local(
                client,
                head,
                http::ok_response("text/plain", b"ok\n", head.close),
            )
            .await
        }
        ("GET", "/metrics") => {
            let text = shared.metrics.encode();
            let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
            let response = http::ok_response(content_type, text.as_bytes(), head.close);
            local(client, head, response).await
        }
        (_, "/health" | "/metrics") => Err(ApiError::method_not_allowed(format!(
            "{} {} is not supported; use GET",
            head.method(),
            head.path()
        ))
        .into()),
        ("POST", "/v1/completions") => {
            proxy(
                client,
                head,
                body,
                Some(Endpoint::Completions),
                buffers,
                shared,
            )
            .await
        }
        ("POST", "/v1/embeddings") => {
            proxy(
                client,
                head,
                body,
                Some(Endpoint::Embeddings),
                buffers,
                shared,
            )
            .await
        }
        ("POST", "/v1/responses") => {
            proxy(
                client,
                head,
                body,
                Some(Endpoint::Responses),
                buffers,
                shared,
            )
            .await
        }
        ("POST", "/v1/chat/completions") => {
            proxy(
                client,
                head,
                body,
                Some(Endpoint::ChatCompletions),
                buffers,
                shared,
            )
            .await
        }
        // Other OpenAI endpoints (`/v1/models`, …) carry no prompt: any
        // backend can answer them.
        (_, path) if path.starts_with("/v1/") => {
            proxy(client, head, body, None, buffers, shared).await
        }
        (_, path) => Err(ApiError::not_found(format!("no route for {path}")).into()),
    };
    match result {
        Ok(next) => next,
        Err(Failure::Api(err)) => {
            warn!(path = head.path(), status = err.status, error = %err.message, "request failed");
            answer_error(client, shared, &err).await;
            Next::Close
        }
        Err(Failure::Gone) => Next::Close,
    }
}

/// Writes a response produced by the daemon; the connection stays open
/// unless the client asked to close it.
async fn local(client: &mut Client, head: &Head, response: Vec<u8>) -> Result<Next, Failure> {
    client.write(&response).await.map_err(|_| Failure::Gone)?;
    Ok(if head.close {
        Next::Close
    } else {
        Next::KeepAlive
    })
}

/// Routes a request to a backend and relays its response.
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
    let backends = shared.backends.all();
    let input = match endpoint {
        Some(endpoint) => Some(
            prompt::extract(endpoint, body)
                .map_err(|err| ApiError::bad_request(format!("invalid request body: {err}")))?,
        ),
        None => None,
    };
    let model = input
        .as_ref()
        .and_then(|input| input.model.as_deref())
        .unwrap_or_default();
    let candidates = &mut buffers.candidates;
    let decision = match &input {
        Some(input) => {
            // Only backends serving the model: 404 when none does, 400 when
            // the model is left out of a fleet serving several.
            shared
                .backends
                .candidates_into(input.model.as_deref(), candidates)
                .map_err(ApiError::from)?;
            let loads = loads(backends, candidates);
            let request = RouteRequest {
                model: model.as_bytes(),
                key: &input.key,
                conversation: input.conversation,
                session: head.session.as_deref(),
                later_turns: input.later_turns,
            };
            shared.router.decide(&request, &loads).and_then(|decision| {
                Some(Decision {
                    backend: *candidates.get(decision.backend)?,
                    ..decision
                })
            })
        }
        None => {
            // No prompt (`GET /v1/models`, …): the least-loaded backend up.
            candidates.clear();
            candidates.extend((0..backends.len()).filter(|&index| backends[index].is_up()));
            if candidates.is_empty() {
                candidates.extend(0..backends.len());
            }
            candidates
                .iter()
                .copied()
                .min_by_key(|&index| load_of(&backends[index]))
                .map(|backend| Decision {
                    backend,
                    matched: 0,
                    reason: Reason::LeastLoaded,
                })
        }
    };
    let decision = decision.ok_or_else(|| ApiError::unavailable("no backends configured"))?;
    let (index, backend, conn) = acquire(decision.backend, candidates, shared).await?;
    info!(
        request_id = %request_id,
        model = if model.is_empty() { "-" } else { model },
        backend = %backend.url,
        matched = decision.matched,
        reason = decision.reason.as_str(),
        "{} {}", head.method(), head.path()
    );
    if let Some(counters) = shared.backend_counters.get(index) {
        counters.requests.inc();
    }
    shared.metrics.decided(decision.reason);
    // What the backend must prefill: the key less what it holds (all of it
    // when the chosen backend could not be reached and another took it).
    let key_len = input.as_ref().map_or(0, |input| input.key.len());
    let prefill = if index == decision.backend {
        key_len.saturating_sub(decision.matched)
    } else {
        key_len
    };

    // The request as it goes out, built in a buffer the connection keeps.
    let mut request = std::mem::take(&mut buffers.outgoing);
    request.clear();
    request.extend_from_slice(head.forward_head());
    if let RequestId::Ours(n) = request_id {
        request.extend_from_slice(b"x-request-id: rtr-");
        request.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"content-length: ");
    request.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    request.extend_from_slice(b"\r\n\r\n");
    request.extend_from_slice(body);
    let forward = Forward {
        request: &request,
        head_request: head.method() == "HEAD",
        client_close: head.close,
    };

    let result = send(client, index, conn, &forward, prefill, shared).await;
    buffers.outgoing = request;
    let relayed = match &result {
        Ok(exchanged) => Some(exchanged.relayed),
        Err(RelayError::Backend { relayed, .. } | RelayError::BadResponse { relayed, .. }) => {
            Some(*relayed)
        }
        Err(_) => None,
    };
    if let Some(relayed) = relayed {
        shared.metrics.head_bytes.inc_by(relayed.head);
        shared.metrics.copied_bytes.inc_by(relayed.copied);
        shared.metrics.piped_bytes.inc_by(relayed.piped);
    }
    match result {
        Ok(exchanged) => {
            shared
                .metrics
                .first_byte
                .observe(exchanged.first_byte.as_secs_f64());
            debug!(request_id = %request_id, status = exchanged.status, relayed = ?exchanged.relayed, "response relayed");
            Ok(if exchanged.client_keep_alive && !client.eof {
                Next::KeepAlive
            } else {
                Next::Close
            })
        }
        Err(RelayError::NoResponse(err) | RelayError::BackendWrite(err)) => {
            shared.metrics.backend_failures.inc();
            Err(ApiError::bad_gateway(format!(
                "backend {} closed the connection without a response ({err})",
                backend.url
            ))
            .into())
        }
        Err(RelayError::BadResponse { relayed, source }) => {
            shared.metrics.backend_failures.inc();
            warn!(request_id = %request_id, backend = %backend.url, %source, "invalid response from the backend");
            if relayed.any() {
                Err(Failure::Gone)
            } else {
                Err(ApiError::bad_gateway(format!(
                    "backend {} sent an invalid response: {source}",
                    backend.url
                ))
                .into())
            }
        }
        Err(RelayError::Backend { relayed, source }) => {
            shared.metrics.backend_failures.inc();
            if relayed.any() {
                warn!(request_id = %request_id, backend = %backend.url, %source, "backend failed mid-response; closing the client");
                Err(Failure::Gone)
            } else {
                Err(
                    ApiError::bad_gateway(format!("backend {} failed: {source}", backend.url))
                        .into(),
                )
            }
        }
        Err(RelayError::Client(err)) => {
            debug!(request_id = %request_id, %err, "client went away");
            Err(Failure::Gone)
        }
        Err(err @ RelayError::Sockmap(_)) => {
            // Map operations fail only after the head went out (the body
            // hand-over), so the client cannot get an error response: close.
            warn!(request_id = %request_id, %err, "dataplane failure");
            Err(Failure::Gone)
        }
    }
}

/// Runs the exchange on `conn`; when a pooled connection turns out to have
/// been closed by the backend before answering, sends the request again on
/// another one (the backend never answered it, and the client saw nothing).
/// A clean connection goes back to the pool.
async fn send(
    client: &mut Client,
    index: usize,
    mut conn: Pooled,
    forward: &Forward<'_>,
    prefill: usize,
    shared: &Shared,
) -> Result<Exchanged, RelayError> {
    loop {
        let watched = Watched {
            in_flight: shared
                .backends
                .get(index)
                .map(|backend| backend.start_request(prefill)),
            counters: shared.backend_counters.get(index),
        };
        let result = shared
            .dataplane
            .exchange(client, &mut conn.conn, forward, watched)
            .await;
        match result {
            Err(RelayError::NoResponse(err) | RelayError::BackendWrite(err)) if conn.reused => {
                debug!(%err, "a pooled backend connection was stale; sending again");
                conn = match shared.pool.take(index) {
                    Some(pooled) => Pooled {
                        conn: pooled,
                        reused: true,
                    },
                    None => {
                        let backend = shared
                            .backends
                            .get(index)
                            .expect("invariant: index came from the backend list");
                        let fresh = open(backend, shared)
                            .await
                            .map_err(|err| RelayError::NoResponse(io_error(err)))?;
                        count_connection(shared, index);
                        Pooled {
                            conn: fresh,
                            reused: false,
                        }
                    }
                };
            }
            Ok(exchanged) => {
                if exchanged.backend_reusable {
                    shared.pool.put(index, conn.conn);
                }
                return Ok(exchanged);
            }
            Err(err) => return Err(err),
        }
    }
}

/// A routed request as the backend's counts and histograms see it: in
/// flight until its response ends, prefilling until its body begins.
struct Watched<'a> {
    in_flight: Option<InFlight>,
    counters: Option<&'a BackendCounters>,
}

impl Watch for Watched<'_> {
    fn first_body(&mut self, since_sent: Duration) {
        if let Some(in_flight) = &mut self.in_flight {
            in_flight.response_began();
        }
        if let Some(counters) = self.counters {
            counters.ttft.observe(since_sent.as_secs_f64());
        }
    }

    fn body_gap(&mut self, gap: Duration) {
        if let Some(counters) = self.counters {
            counters.itl.observe(gap.as_secs_f64());
        }
    }

    fn ended(&mut self) {
        self.in_flight = None;
    }
}

fn io_error(message: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionRefused, message)
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

/// A backend's load as routing sees it: requests in flight from this router
/// plus the requests of others its engine reported waiting.
fn load_of(backend: &Backend) -> usize {
    backend
        .in_flight()
        .saturating_add(usize::try_from(backend.others_waiting()).unwrap_or(usize::MAX))
}

/// What routing sees of the `candidates`, in their order (on the stack for
/// fleets of up to [`INLINE_BACKENDS`]).
fn loads<'a>(
    backends: &'a [Arc<Backend>],
    candidates: &[usize],
) -> SmallVec<[BackendLoad<'a>; INLINE_BACKENDS]> {
    candidates
        .iter()
        .filter_map(|&index| backends.get(index))
        .map(|backend| {
            BackendLoad::new(&backend.url, backend.in_flight())
                .with_waiting(usize::try_from(backend.others_waiting()).unwrap_or(usize::MAX))
                .with_prefill(backend.prefilling())
        })
        .collect()
}

/// A backend connection, and whether it came from the pool.
struct Pooled {
    conn: BackendConn,
    reused: bool,
}

/// A connection to the chosen backend: a pooled one, else a new one; when
/// connecting fails, the next least-loaded backend's (no request byte has
/// left the router yet, so moving on is safe).
async fn acquire<'a>(
    first: usize,
    candidates: &[usize],
    shared: &'a Shared,
) -> Result<(usize, &'a Arc<Backend>, Pooled), ApiError> {
    // The common case: the chosen backend has an idle connection.
    if let (Some(backend), Some(conn)) = (shared.backends.get(first), shared.pool.take(first)) {
        return Ok((first, backend, Pooled { conn, reused: true }));
    }
    let backends = shared.backends.all();
    let mut order: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&index| index != first)
        .collect();
    order.sort_by_key(|&index| backends.get(index).map_or(usize::MAX, |b| load_of(b)));
    order.insert(0, first);
    let mut last_error = String::from("no backends configured");
    for index in order {
        let Some(backend) = shared.backends.get(index) else {
            continue;
        };
        if let Some(conn) = shared.pool.take(index) {
            return Ok((index, backend, Pooled { conn, reused: true }));
        }
        match open(backend, shared).await {
            Ok(conn) => {
                count_connection(shared, index);
                return Ok((
                    index,
                    backend,
                    Pooled {
                        conn,
                        reused: false,
                    },
                ));
            }
            Err(err) => last_error = err,
        }
        warn!(backend = %backend.url, error = %last_error, "backend connect failed; trying the next");
    }
    Err(ApiError::bad_gateway(format!(
        "no backend could be reached (last: {last_error})"
    )))
}

fn count_connection(shared: &Shared, index: usize) {
    if let Some(counters) = shared.backend_counters.get(index) {
        counters.connections.inc();
    }
}

/// Opens a new connection to `backend` within the connect timeout.
async fn open(backend: &Backend, shared: &Shared) -> Result<BackendConn, String> {
    let attempt = tokio::time::timeout(
        shared.config.connect_timeout(),
        shared.dataplane.connect(backend.addr),
    )
    .await;
    match attempt {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(err)) => Err(format!("{}: {err}", backend.url)),
        Err(_) => Err(format!("{}: connect timed out", backend.url)),
    }
}

async fn answer_error(client: &mut Client, shared: &Shared, err: &ApiError) {
    shared
        .metrics
        .errors
        .get_or_create(&StatusLabel { status: err.status })
        .inc();
    let _ = client.write(&err.to_response()).await;
}

/// Closes the connection without losing the last response: shut down our
/// sending side, then read until the client closes too (or [`LINGER`]), so
/// that unread client bytes do not turn our close into a reset.
async fn close(mut client: Client) {
    if client.stream.shutdown().await.is_err() {
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        while !client.eof {
            match client.stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}
