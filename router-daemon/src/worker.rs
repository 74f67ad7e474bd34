//! The daemon's threads: one event loop per CPU, each serving the
//! connections it accepted to their end, as nginx runs one worker process
//! per CPU.
//!
//! Each worker is a single-threaded tokio runtime with its own listening
//! socket on the daemon's port. The first socket is bound exclusively (a
//! second daemon on the same port still fails to start); the workers'
//! sockets then join it with `SO_REUSEPORT`, and the kernel spreads new
//! connections over them by address hash. Nothing about a connection moves
//! between threads, and every worker polls its own sockets. With tokio's
//! work-stealing runtime instead, one I/O driver served both threads, and
//! one CPU often sat idle while the other ran the tasks that driver had
//! woken: measured with 256 kept-alive clients, the host was 90–92% busy
//! against nginx's 96–98%, at the same CPU per request.
//!
//! Worker 0 is the runtime that called [`crate::run`] (the daemon's main
//! thread); it also runs discovery and the pool's upkeep. `run` starts the
//! others on threads of their own. A socket is served by the driver of the
//! runtime that registered it, so backend connections are pooled per worker
//! ([`current`] says which).
use std::{cell::Cell, future::Future, io, sync::Arc};

use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use crate::{
    admission::Admission,
    conn::{self, Role},
    daemon::{RunError, Shared, is_transient},
};

thread_local! {
    /// The worker this thread runs; 0 on every thread `run` did not start.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker running on this thread.
pub(crate) fn current() -> usize {
    INDEX.get()
}

/// Makes this thread worker `index`, before it runs anything.
pub(crate) fn enter(index: usize) {
    INDEX.set(index);
}

/// Starts worker `index` on a thread of its own, serving `listener` until
/// the drain closes the listeners or `stop`'s sender is dropped, then until
/// its connections end.
pub(crate) fn spawn(
    index: usize,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("router-worker-{index}"))
        .spawn(move || {
            enter(index);
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(err) => {
                        tracing::error!(worker = index, %err, "worker cannot listen; it stops");
                        return;
                    }
                };
                let drain = Arc::clone(&shared);
                let stopped = async move {
                    tokio::select! {
                        _ = stop.changed() => {}
                        () = drain.drain.closed() => {}
                    }
                };
                let mut open = JoinSet::new();
                if let Err(err) = serve(&listener, &shared, stopped, &mut open).await {
                    tracing::error!(worker = index, %err, "worker stops accepting");
                }
                // The kernel now sends new connections to the other
                // workers' sockets; this one's are served to their end.
                drop(listener);
                while open.join_next().await.is_some() {}
            });
        })?;
    Ok(())
}

/// Accepts connections on `listener` and serves each on this runtime, in
/// `open`, until `stop` completes or accepting fails.
pub(crate) async fn serve(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    stop: impl Future<Output = ()>,
    open: &mut JoinSet<()>,
) -> Result<(), RunError> {
    let role = if shared.config.admin_listen.is_some() {
        Role::Api
    } else {
        Role::Both
    };
    accept(listener, shared, role, &shared.admission, stop, open).await
}

/// Serves the admin endpoints on `listener` (`--admin-listen`) until `stop`
/// completes, with connections of their own, so a client-facing port at
/// its limit still answers the probes and the scrapes.
pub(crate) async fn serve_admin(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: impl Future<Output = ()>,
) {
    let mut open = JoinSet::new();
    let admission = Admission::new(Default::default(), ADMIN_CONNECTIONS);
    if let Err(err) = accept(&listener, &shared, Role::Admin, &admission, stop, &mut open).await {
        tracing::error!(%err, "the admin listener stops accepting");
    }
}

/// Most connections open at once on the admin listener.
const ADMIN_CONNECTIONS: usize = 64;

/// Accepts connections on `listener` and serves each as `role`, admitted by
/// `admission`, on this runtime, in `open`, until `stop` completes or
/// accepting fails.
async fn accept(
    listener: &TcpListener,
    shared: &Arc<Shared>,
    role: Role,
    admission: &Admission,
    stop: impl Future<Output = ()>,
    open: &mut JoinSet<()>,
) -> Result<(), RunError> {
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => match admission.admit() {
                    Some(admitted) => {
                        open.spawn(conn::serve(stream, Arc::clone(shared), admitted, role));
                    }
                    None => {
                        open.spawn(conn::refuse(stream, Arc::clone(shared)));
                    }
                },
                // Out of fds or a connection reset before accept: keep serving.
                Err(err) if is_transient(&err) => {
                    tracing::warn!(%err, "accept failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(err) => return Err(RunError::Accept(err)),
            },
            // Reaps ended connections, so the set holds only open ones.
            Some(_) = open.join_next(), if !open.is_empty() => {}
            () = &mut stop => return Ok(()),
        }
    }
}
