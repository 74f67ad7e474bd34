//! Where the backends are: the `--backend` URLs resolved to addresses, every
//! address of a host name counting, and resolved again while the daemon
//! serves so that a host name whose addresses change (a headless Service,
//! a DNS failover) is followed.
//!
//! Owner decisions:
//! - A URL whose host is a literal IP address is one backend, named by the
//!   URL as given. A host name is as many backends as it has addresses,
//!   each named `http://ADDRESS:PORT`: a name is the identity replicas
//!   agree on and the key of a backend's cache, so it must change when the
//!   server behind it does.
//! - IPv4 addresses are preferred: when a name has some, its IPv6 ones are
//!   left out (`localhost` resolves to both, and a server usually listens
//!   on one), as Envoy's `V4_PREFERRED` does.
//! - A name that fails to resolve keeps the addresses it last resolved to:
//!   a DNS hiccup does not empty the fleet. At start it simply has none yet,
//!   and the router answers 503 until it resolves.
//! - `--hosts-file` names addresses for host names ahead of DNS, in
//!   `/etc/hosts` form, and is read again at each resolution, so a test (or
//!   an operator) can move a name without a DNS server.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use super::BackendError;

/// Longest wait for one name's DNS answer; past it the name keeps its last
/// addresses until the next resolution.
const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One backend address and how to name it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Endpoint {
    /// The backend's name in logs, metrics and rendezvous placement.
    pub(crate) name: String,
    /// `host:port`, sent as the `Host` header of probes.
    pub(crate) authority: String,
    /// The address the router connects to.
    pub(crate) addr: SocketAddr,
    /// On the router's own node (`--discovery k8s` with `--node-name`):
    /// preferred when costs are close.
    pub(crate) local: bool,
}

/// A `--backend` URL, checked once, resolved as often as asked.
#[derive(Clone, Debug)]
pub(crate) struct StaticSource {
    urls: Vec<Url>,
    hosts_file: Option<PathBuf>,
    /// Per URL, the endpoints of its last successful resolution.
    last: Vec<Vec<Endpoint>>,
}

/// A parsed `http://host:port` URL.
#[derive(Clone, Debug)]
struct Url {
    /// The URL as given, without a trailing slash.
    given: String,
    /// `host:port`.
    authority: String,
    /// The host, without brackets.
    host: String,
    port: u16,
}

impl StaticSource {
    /// Checks every URL (scheme, `host:port`); resolves nothing yet.
    pub(crate) fn new(urls: &[String], hosts_file: Option<PathBuf>) -> Result<Self, BackendError> {
        let urls = urls
            .iter()
            .map(|url| Url::parse(url))
            .collect::<Result<Vec<_>, _>>()?;
        let last = vec![Vec::new(); urls.len()];
        Ok(Self {
            urls,
            hosts_file,
            last,
        })
    }

    /// Resolves every URL again and returns the whole endpoint set, in URL
    /// order (a name's addresses sorted), without duplicate addresses. A URL that fails keeps its last
    /// endpoints; the failures are returned beside the set, to be logged.
    pub(crate) async fn resolve(&mut self) -> (Vec<Endpoint>, Vec<BackendError>) {
        let hosts = match &self.hosts_file {
            Some(path) => read_hosts(path),
            None => Ok(String::new()),
        };
        let mut failures = Vec::new();
        let hosts = hosts.unwrap_or_else(|err| {
            failures.push(err);
            String::new()
        });
        for (url, last) in self.urls.iter().zip(self.last.iter_mut()) {
            match url.resolve(&hosts).await {
                Ok(endpoints) => *last = endpoints,
                Err(err) => failures.push(err),
            }
        }
        let mut seen = BTreeSet::new();
        let all = self
            .last
            .iter()
            .flatten()
            .filter(|endpoint| seen.insert(endpoint.addr))
            .cloned()
            .collect();
        (all, failures)
    }
}

impl Url {
    fn parse(url: &str) -> Result<Self, BackendError> {
        let given = url.trim_end_matches('/').to_owned();
        let authority = authority(url)?;
        let malformed = || BackendError::Malformed(url.to_owned());
        let (host, port) = authority.rsplit_once(':').ok_or_else(malformed)?;
        let port = port.parse().map_err(|_| malformed())?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(malformed());
        }
        Ok(Self {
            given,
            authority,
            host,
            port,
        })
    }

    /// This URL's endpoints now: itself when its host is an address, else
    /// one per address of the host (`hosts` first, then DNS).
    async fn resolve(&self, hosts: &str) -> Result<Vec<Endpoint>, BackendError> {
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![Endpoint {
                name: self.given.clone(),
                authority: self.authority.clone(),
                addr: SocketAddr::new(ip, self.port),
                local: false,
            }]);
        }
        let mut ips = lookup_hosts(hosts, &self.host);
        if ips.is_empty() {
            let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
            let found = match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
                Ok(found) => found,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "DNS lookup timed out",
                )),
            };
            ips = found
                .map_err(|source| BackendError::Resolve {
                    url: self.given.clone(),
                    source,
                })?
                .map(|addr| addr.ip())
                .collect();
        }
        if ips.iter().any(IpAddr::is_ipv4) {
            ips.retain(IpAddr::is_ipv4);
        }
        ips.sort_unstable();
        ips.dedup();
        if ips.is_empty() {
            return Err(BackendError::Resolve {
                url: self.given.clone(),
                source: std::io::Error::other("no addresses"),
            });
        }
        Ok(ips
            .into_iter()
            .map(|ip| {
                let addr = SocketAddr::new(ip, self.port);
                Endpoint {
                    name: format!("http://{addr}"),
                    authority: self.authority.clone(),
                    addr,
                    local: false,
                }
            })
            .collect())
    }
}

/// The hosts file's text.
fn read_hosts(path: &Path) -> Result<String, BackendError> {
    std::fs::read_to_string(path).map_err(|source| BackendError::HostsFile {
        path: path.to_owned(),
        source,
    })
}

/// The addresses `hosts` (in `/etc/hosts` form: an address, then names;
/// `#` starts a comment) gives `name`, in file order.
fn lookup_hosts(hosts: &str, name: &str) -> Vec<IpAddr> {
    hosts
        .lines()
        .filter_map(|line| {
            let line = line.split('#').next().unwrap_or_default();
            let mut words = line.split_whitespace();
            let ip = words.next()?.parse().ok()?;
            words
                .any(|word| word.eq_ignore_ascii_case(name))
                .then_some(ip)
        })
        .collect()
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

    fn names(endpoints: &[Endpoint]) -> Vec<&str> {
        endpoints.iter().map(|e| e.name.as_str()).collect()
    }

    #[test]
    fn authority_defaults_the_port_and_rejects_other_schemes() {
        assert_eq!(authority("http://a:1/").unwrap(), "a:1");
        assert_eq!(authority("http://a").unwrap(), "a:80");
        assert_eq!(authority("localhost:9").unwrap(), "localhost:9");
        assert_eq!(authority("http://[::1]:8001").unwrap(), "[::1]:8001");
        assert!(matches!(
            authority("http:///v1"),
            Err(BackendError::Malformed(_))
        ));
        assert!(matches!(
            authority("https://a:1"),
            Err(BackendError::Scheme(_))
        ));
        assert!(matches!(
            authority("http://"),
            Err(BackendError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn a_literal_address_is_one_backend_named_as_given() {
        let mut source = StaticSource::new(
            &["http://127.0.0.1:9/".into(), "http://[::1]:8".into()],
            None,
        )
        .unwrap();
        let (endpoints, failures) = source.resolve().await;
        assert!(failures.is_empty());
        assert_eq!(names(&endpoints), ["http://127.0.0.1:9", "http://[::1]:8"]);
    }

    #[tokio::test]
    async fn every_address_of_a_name_counts_and_a_failure_keeps_the_last() {
        let dir = std::env::temp_dir().join(format!("hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(
            &hosts,
            "127.0.0.3 vllm.test # two pods\n127.0.0.2 other vllm.test\n::1 vllm.test\n",
        )
        .unwrap();
        let mut source =
            StaticSource::new(&["http://vllm.test:8000".into()], Some(hosts.clone())).unwrap();
        let (endpoints, _) = source.resolve().await;
        // IPv4 preferred, sorted, each its own backend with the URL's Host.
        assert_eq!(
            names(&endpoints),
            ["http://127.0.0.2:8000", "http://127.0.0.3:8000"]
        );
        assert!(endpoints.iter().all(|e| e.authority == "vllm.test:8000"));

        std::fs::write(&hosts, "127.0.0.4 vllm.test\n").unwrap();
        assert_eq!(names(&source.resolve().await.0), ["http://127.0.0.4:8000"]);

        // Gone from the file and unknown to DNS: the last answer stands.
        std::fs::write(&hosts, "").unwrap();
        let mut gone = StaticSource::new(
            &["http://vllm.test.invalid:8000".into()],
            Some(hosts.clone()),
        )
        .unwrap();
        let (endpoints, failures) = gone.resolve().await;
        assert!(endpoints.is_empty());
        assert_eq!(failures.len(), 1, "{failures:?}");
        std::fs::write(&hosts, "127.0.0.5 vllm.test.invalid\n").unwrap();
        assert_eq!(gone.resolve().await.0.len(), 1);
        std::fs::write(&hosts, "").unwrap();
        let (endpoints, failures) = gone.resolve().await;
        assert_eq!(names(&endpoints), ["http://127.0.0.5:8000"]);
        assert_eq!(failures.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_same_address_twice_is_one_backend() {
        let mut source = StaticSource::new(
            &["http://127.0.0.1:9".into(), "http://127.0.0.1:9/".into()],
            None,
        )
        .unwrap();
        assert_eq!(source.resolve().await.0.len(), 1);
    }
}
