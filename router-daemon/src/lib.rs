//! Prefix-aware router for vLLM fleets.
//!
//! # Layout
//! - [`config`]: flags and their environment twins.
//! - `conn`: one client connection's life: read a request, answer it
//!   locally or route it, relay the response.
//! - [`http`]: HTTP/1.1 framing (httparse): client requests and the head
//!   sent on, backend response heads and where each body ends.
//! - [`prompt`]: the model and prompt key, scanned out of the JSON body.
//! - [`route`]: the prefix index and the selection policy.
//! - [`backend`]: the backend set, each backend's in-flight count, and what
//!   discovery learns of it: models, health, engine queue.
//! - `upstream`: getting a request to a backend: the connection pool,
//!   connecting in fallback order, resending on a stale pooled connection.
//! - [`dataplane`]: the sockets: listening ones (`dataplane::listen`),
//!   the client's, exchanges on kept-alive backend connections; moving
//!   response bytes in the kernel (sockmap), through a pipe (splice) or
//!   through the daemon (userspace); discovery's one-shot GETs.
//! - `worker`: one event loop per CPU, each with its own listening socket.
//! - `drain`: the graceful drain after a shutdown signal.
//! - `admission`: how many client connections are open, against
//!   `--max-connections`.
//! - [`fd_limit`]: the open-file limit, raised at start.
//! - [`privilege`]: dropping capabilities (and root, with `--user`) once
//!   start-up is done.
//! - [`metrics`]: Prometheus metrics.
//! - [`error`]: errors as clients see them.
//!
//! - `daemon`: the shared state, [`run`] and the upkeep beside it.
//!
//! [`run`] serves a listener until a shutdown signal; `main` is a thin shell
//! around it, and tests call it in-process. This file only lays out the
//! modules.
mod admission;
pub mod backend;
pub mod config;
mod conn;
mod daemon;
pub mod dataplane;
mod drain;
pub mod error;
pub mod fd_limit;
pub mod http;
pub mod metrics;
pub mod privilege;
pub mod prompt;
pub mod route;
mod upstream;
mod worker;

pub use crate::{
    config::Config,
    daemon::{RunError, run},
    dataplane::Dataplane,
    dataplane::listen::{LISTEN_BACKLOG, listener},
};
