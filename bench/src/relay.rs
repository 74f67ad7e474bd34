//! `router-bench relay`: the cheapest userspace relay, as a floor for what
//! any proxy that moves each streamed event through userspace must cost.
//!
//! It takes router-daemon's flags (`--listen`, `--backend`, and ignores
//! `--dataplane`), so `router-bench dataplane --router-bin` can run it in
//! the daemon's place (`bench/scripts/relay-floor.sh`). Per client
//! connection it opens one connection to the next backend in turn and
//! copies bytes both ways (`tokio::io::copy_bidirectional`): no HTTP
//! parsing, no routing, no pooling. Like the daemon, it runs one
//! single-threaded event loop per CPU, each with its own listening socket
//! (`SO_REUSEPORT`).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context as _, Result};

/// `router-bench relay` flags (router-daemon's names).
#[derive(clap::Args)]
pub struct Args {
    /// Address to accept clients on.
    #[arg(long)]
    listen: SocketAddr,
    /// Backend URLs (`http://host:port`), used in turn per connection.
    #[arg(long = "backend", required = true)]
    backends: Vec<String>,
    /// Ignored: accepted so the relay takes the daemon's command line.
    #[arg(long)]
    dataplane: Option<String>,
}

/// Runs the relay until killed.
pub fn run(args: Args) -> Result<()> {
    let backends: Vec<SocketAddr> = args
        .backends
        .iter()
        .map(|url| {
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .with_context(|| format!("backend {url}: want http://ip:port"))
        })
        .collect::<Result<_>>()?;
    let backends = Arc::new(backends);
    let next = Arc::new(AtomicUsize::new(0));
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut threads = Vec::new();
    for _ in 0..cpus {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a tokio runtime")?;
        let listener = {
            let _entered = runtime.enter();
            bind(args.listen)?
        };
        let (backends, next) = (Arc::clone(&backends), Arc::clone(&next));
        threads.push(std::thread::spawn(move || {
            runtime.block_on(serve(listener, backends, next));
        }));
    }
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// Relays every connection accepted on `listener` to the next backend in
/// turn, bytes both ways, until accepting fails.
async fn serve(
    listener: tokio::net::TcpListener,
    backends: Arc<Vec<SocketAddr>>,
    next: Arc<AtomicUsize>,
) {
    while let Ok((mut client, _)) = listener.accept().await {
        let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        tokio::spawn(async move {
            let _ = client.set_nodelay(true);
            let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await else {
                return;
            };
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
}

/// A listening socket on `addr` that shares the port with the others, on
/// the runtime entered.
fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(4096)?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A backend that answers everything a connection sends, once the
    /// client has finished sending, with `name:` and those bytes.
    async fn echo(name: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    conn.read_to_end(&mut got).await.unwrap();
                    conn.write_all(format!("{name}:").as_bytes()).await.unwrap();
                    conn.write_all(&got).await.unwrap();
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn connections_go_to_the_backends_in_turn_with_every_byte_and_the_close() {
        let backends = Arc::new(vec![echo("a").await, echo("b").await]);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, backends, Arc::new(AtomicUsize::new(0))));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for name in ["a", "b", "a"] {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(&payload).await.unwrap();
            // The half-close reaches the backend, which then answers.
            conn.shutdown().await.unwrap();
            let mut answer = Vec::new();
            conn.read_to_end(&mut answer).await.unwrap();
            assert_eq!(&answer[..2], format!("{name}:").as_bytes());
            assert!(answer[2..] == payload[..], "bytes lost or changed");
        }
    }
}
