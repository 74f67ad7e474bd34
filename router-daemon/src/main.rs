//! `router-daemon`: parses flags, sets up logging, picks the dataplane and
//! serves until SIGINT or SIGTERM, then drains (see the README's
//! "Stopping" section) and exits 0.
use anyhow::Context as _;
use clap::Parser as _;
use router_daemon::config::{LogFormat, Source};
use router_daemon::{Config, Dataplane};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc's malloc: every connection allocates its task,
/// buffers and routing scratch, and glibc's malloc and free were 7% of the
/// daemon's CPU with a new connection per request (`perf`, dataplane case
/// a). The library, and so every in-process test, keeps the system
/// allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives the heap freed so far back to the system: the sockmap probe of
/// `Dataplane::select` parses the kernel's BTF, tens of MiB that mimalloc
/// would otherwise keep resident on this thread (measured: 54 MiB resident
/// after an `auto` start without this).
fn release_freed_heap() {
    // SAFETY: mi_collect only purges free memory of mimalloc's heaps; it has
    // no preconditions and touches no live allocation.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Sets up logging: `RUST_LOG`'s level (default `info`), in `format`.
/// Colour only on a terminal, so `kubectl logs` and log files get plain
/// text.
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init();
        }
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

// The main thread is worker 0; `run` starts the other workers' threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_format);
    // Every connection is a descriptor: the soft default would cap the
    // daemon long before the machine does.
    match router_daemon::fd_limit::raise() {
        Ok((before, after)) => {
            tracing::info!(
                before = before.soft,
                now = after.soft,
                "open-file limit raised to its hard ceiling"
            );
        }
        Err(err) => tracing::warn!(%err, "cannot raise the open-file limit"),
    }
    let cgroup = config.sockops_cgroup.as_deref().map_or_else(
        router_daemon::dataplane::default_cgroup,
        router_daemon::dataplane::cgroup2_root,
    );
    let (dataplane, why) = Dataplane::select(config.dataplane, &cgroup).context("dataplane")?;
    release_freed_heap();
    tracing::info!(mode = dataplane.mode().as_str(), "dataplane: {why}");
    let listener = router_daemon::listener(config.listen)
        .with_context(|| format!("binding {}", config.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    // Start-up is done with privilege: the port is bound, the program
    // loaded. Nothing after needs it.
    if let Some(user) = &config.user {
        let (uid, gid) = router_daemon::privilege::switch_user(user)
            .with_context(|| format!("switching to user {user}"))?;
        tracing::info!(user, uid, gid, "running as an unprivileged user");
    }
    router_daemon::privilege::drop_all().context("dropping capabilities")?;
    tracing::info!("capabilities dropped: the daemon holds none from here on");
    match config.discovery {
        Source::Static => {
            tracing::info!(listen = %bound, backends = ?config.backends, "router-daemon ready");
        }
        Source::K8s => tracing::info!(
            listen = %bound,
            selector = %config.k8s_selector,
            namespace = config.k8s_namespace.as_deref().unwrap_or("(its own)"),
            "router-daemon ready; backends are the Ready pods the selector picks"
        ),
    }
    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (signalled, shutdown) = tokio::sync::oneshot::channel::<()>();
    // The first signal starts the drain; a second one ends the daemon at once.
    tokio::spawn(async move {
        let mut signalled = Some(signalled);
        loop {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            match signalled.take() {
                Some(signalled) => {
                    tracing::info!(
                        signal = name,
                        "shutting down; a second signal exits at once"
                    );
                    let _ = signalled.send(());
                }
                None => {
                    tracing::warn!(
                        signal = name,
                        "second signal: exiting without waiting for open connections"
                    );
                    std::process::exit(1);
                }
            }
        }
    });
    let shutdown = async move {
        let _ = shutdown.await;
    };
    router_daemon::run(listener, config, dataplane, shutdown).await?;
    Ok(())
}
