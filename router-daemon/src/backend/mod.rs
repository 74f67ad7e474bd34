//! The backend set: where each vLLM instance is, and its live load.
//!
//! Backends are given as URLs (`http://host:port`) and resolved once at
//! start. Each carries an exact in-flight count, maintained by
//! [`InFlight`] guards that the connection code holds for the life of a
//! forwarded request.
pub mod probe;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

/// A backend URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Only plain `http://` backends are supported.
    #[error("backend `{0}`: only http:// URLs are supported")]
    Scheme(String),
    /// The URL has no `host:port`.
    #[error("backend `{0}`: expected http://host:port")]
    Malformed(String),
    /// The host did not resolve.
    #[error("backend `{url}`: cannot resolve: {source}")]
    Resolve {
        /// The URL as given.
        url: String,
        /// Why resolution failed.
        source: std::io::Error,
    },
}

/// One backend instance.
#[derive(Debug)]
pub struct Backend {
    /// The URL as given on the command line, used as its name in logs and metrics.
    pub url: String,
    /// The resolved address the router connects to.
    pub addr: SocketAddr,
    in_flight: AtomicUsize,
}

impl Backend {
    /// Requests forwarded to this backend whose response has not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one request in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// Holds one unit of a backend's in-flight count.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The backends, in the order given.
#[derive(Debug, Default)]
pub struct Backends {
    list: Vec<Arc<Backend>>,
}

impl Backends {
    /// Parses and resolves backend URLs.
    pub async fn resolve(urls: &[String]) -> Result<Self, BackendError> {
        let mut list = Vec::with_capacity(urls.len());
        for url in urls {
            let authority = authority(url)?;
            let addr = tokio::net::lookup_host(authority)
                .await
                .and_then(|mut addrs| {
                    addrs
                        .next()
                        .ok_or_else(|| std::io::Error::other("no addresses"))
                })
                .map_err(|source| BackendError::Resolve {
                    url: url.clone(),
                    source,
                })?;
            list.push(Arc::new(Backend {
                url: url.trim_end_matches('/').to_owned(),
                addr,
                in_flight: AtomicUsize::new(0),
            }));
        }
        Ok(Self { list })
    }

    /// All backends.
    pub fn all(&self) -> &[Arc<Backend>] {
        &self.list
    }

    /// The backend at `index`, as returned by routing.
    pub fn get(&self, index: usize) -> Option<&Arc<Backend>> {
        self.list.get(index)
    }
}

/// The `host:port` of an `http://` URL (port 80 when absent).
fn authority(url: &str) -> Result<String, BackendError> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => return Err(BackendError::Scheme(url.to_owned())),
        None => url,
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(BackendError::Malformed(url.to_owned()));
    }
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.contains(']') && !port.is_empty());
    Ok(if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn authority_of_urls() {
        assert_eq!(
            authority("http://127.0.0.1:8001").unwrap(),
            "127.0.0.1:8001"
        );
        assert_eq!(authority("http://sim:8001/").unwrap(), "sim:8001");
        assert_eq!(authority("localhost:9").unwrap(), "localhost:9");
        assert_eq!(authority("http://vllm").unwrap(), "vllm:80");
        assert_eq!(authority("http://[::1]:8001").unwrap(), "[::1]:8001");
        assert!(matches!(
            authority("https://x:1"),
            Err(BackendError::Scheme(_))
        ));
        assert!(matches!(
            authority("http:///v1"),
            Err(BackendError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn in_flight_guard_counts_exactly() {
        let backends = Backends::resolve(&["http://127.0.0.1:1".into()])
            .await
            .unwrap();
        let backend = backends.get(0).unwrap();
        let first = backend.start_request();
        let second = backend.start_request();
        assert_eq!(backend.in_flight(), 2);
        drop(first);
        assert_eq!(backend.in_flight(), 1);
        drop(second);
        assert_eq!(backend.in_flight(), 0);
    }
}
