//! `--discovery k8s`: the backends are the pods of one namespace that match
//! a label selector, are Ready and are not terminating, watched through the
//! Kubernetes API server.
//!
//! kube-rs's watcher lists the pods, then watches for changes; after a
//! watch error, or a `410 Gone` when the API server no longer has the
//! version the watch resumed from, it lists them all again (with a
//! back-off) and the list replaces what was known. So a pod deleted while
//! the router could not watch is dropped at the next list, instead of
//! getting traffic for as long as the router runs.
//!
//! The same watch follows the router's own replicas (`--peer-selector`),
//! whose ready pods are counted (see `peers`).
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::Endpoint;

/// The labels production-stack's Helm chart puts on its vLLM engine pods
/// (`servingEngineSpec.labels`), which its own router selects.
pub(crate) const DEFAULT_SELECTOR: &str = "environment=test,release=test";

/// Which pods are backends, and where they listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSelector {
    /// The namespace watched.
    pub(crate) namespace: String,
    /// A label selector (`key=value,...`, as `kubectl -l` takes).
    pub(crate) labels: String,
    /// The port of the vLLM server in each pod, unless `port_name` names
    /// one of its container ports.
    pub(crate) port: u16,
    /// A container port name whose number is used where a pod has it.
    pub(crate) port_name: Option<String>,
    /// The router's own node (`--node-name`): its pods are preferred when
    /// costs are close.
    pub(crate) node: Option<String>,
}

/// Why pods cannot be watched.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Neither an in-cluster service account nor a kubeconfig was found.
    #[error("no Kubernetes client configuration (in-cluster service account or KUBECONFIG): {0}")]
    Config(#[source] kube::Error),
}

type Events = Pin<Box<dyn Stream<Item = Result<watcher::Event<Pod>, watcher::Error>> + Send>>;

/// The pods matching a [`PodSelector`], as they change.
pub(crate) struct PodWatch {
    selector: PodSelector,
    events: Events,
    /// Each matching pod's endpoint, by pod name; `None` while it is not
    /// ready, or terminating.
    pods: BTreeMap<String, Option<Endpoint>>,
    /// A list in progress (after the first watch, or a watch error): it
    /// replaces `pods` whole once complete.
    listing: Option<BTreeMap<String, Option<Endpoint>>>,
}

impl std::fmt::Debug for PodWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatch")
            .field("selector", &self.selector)
            .field("pods", &self.pods)
            .finish_non_exhaustive()
    }
}

impl PodWatch {
    /// Watches the pods `selector` picks, with the client configuration the
    /// environment gives (in-cluster, or `KUBECONFIG`).
    pub(crate) async fn start(selector: PodSelector) -> Result<Self, KubeError> {
        let client = Client::try_default().await.map_err(KubeError::Config)?;
        let pods: Api<Pod> = Api::namespaced(client, &selector.namespace);
        let config = watcher::Config::default().labels(&selector.labels);
        let events = watcher(pods, config).default_backoff().boxed();
        Ok(Self {
            selector,
            events,
            pods: BTreeMap::new(),
            listing: None,
        })
    }

    /// Waits for the next change and returns every ready pod's endpoint,
    /// sorted by name. Watch errors are logged; the watcher lists again.
    pub(crate) async fn next(&mut self) -> Vec<Endpoint> {
        self.changed().await;
        self.endpoints()
    }

    /// Waits for the next change and returns the names of the ready pods,
    /// sorted.
    pub(crate) async fn next_ready(&mut self) -> Vec<String> {
        self.changed().await;
        self.pods
            .iter()
            .filter(|(_, endpoint)| endpoint.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Waits until the pods known change: a complete list, or one pod
    /// added, changed or deleted.
    async fn changed(&mut self) {
        loop {
            let Some(event) = self.events.next().await else {
                // The watcher with a back-off does not end; if it did, the
                // last set stands.
                return std::future::pending().await;
            };
            match event {
                Ok(watcher::Event::Init) => self.listing = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    let entry = self.entry(&pod);
                    if let (Some(listing), Some((name, endpoint))) = (&mut self.listing, entry) {
                        listing.insert(name, endpoint);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(listing) = self.listing.take() {
                        self.pods = listing;
                    }
                    return;
                }
                Ok(watcher::Event::Apply(pod)) => {
                    if let Some((name, endpoint)) = self.entry(&pod) {
                        self.pods.insert(name, endpoint);
                    }
                    return;
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(name) = &pod.metadata.name {
                        self.pods.remove(name);
                    }
                    return;
                }
                Err(err) => tracing::warn!(
                    error = %err,
                    "watching pods failed; they are listed again after a back-off"
                ),
            }
        }
    }

    fn entry(&self, pod: &Pod) -> Option<(String, Option<Endpoint>)> {
        let name = pod.metadata.name.clone()?;
        Some((name, endpoint(pod, &self.selector)))
    }

    fn endpoints(&self) -> Vec<Endpoint> {
        self.pods.values().flatten().cloned().collect()
    }
}

/// The pod's backend endpoint, if it may take requests: it has an IP, is
/// not terminating, and its `Ready` condition is true.
pub(crate) fn endpoint(pod: &Pod, selector: &PodSelector) -> Option<Endpoint> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|condition| condition.type_ == "Ready" && condition.status == "True");
    if !ready {
        return None;
    }
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let port = selector
        .port_name
        .as_deref()
        .and_then(|name| named_port(pod, name))
        .unwrap_or(selector.port);
    let addr = SocketAddr::new(ip, port);
    let node = pod.spec.as_ref().and_then(|spec| spec.node_name.as_deref());
    Some(Endpoint {
        name: format!("http://{addr}"),
        authority: addr.to_string(),
        addr,
        local: node.is_some() && node == selector.node.as_deref(),
    })
}

/// The number of the container port called `name`, in any container.
fn named_port(pod: &Pod, name: &str) -> Option<u16> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|container| container.ports.iter().flatten())
        .find(|port| port.name.as_deref() == Some(name))
        .and_then(|port| u16::try_from(port.container_port).ok())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{Container, ContainerPort, PodCondition, PodSpec, PodStatus},
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    };

    use super::*;

    fn selector(port_name: Option<&str>) -> PodSelector {
        PodSelector {
            namespace: "ns".into(),
            labels: DEFAULT_SELECTOR.into(),
            port: 8000,
            port_name: port_name.map(str::to_owned),
            node: Some("gpu-1".into()),
        }
    }

    fn pod(ip: Option<&str>, ready: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("vllm-0".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "vllm".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: 8100,
                        ..ContainerPort::default()
                    }]),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_owned),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn only_ready_pods_with_an_ip_that_are_not_terminating_are_backends() {
        let ready = endpoint(&pod(Some("10.1.2.3"), "True"), &selector(None)).expect("ready");
        assert_eq!(ready.name, "http://10.1.2.3:8000");
        assert_eq!(ready.addr, "10.1.2.3:8000".parse().expect("addr"));
        assert!(endpoint(&pod(Some("10.1.2.3"), "False"), &selector(None)).is_none());
        assert!(endpoint(&pod(None, "True"), &selector(None)).is_none());
        let mut terminating = pod(Some("10.1.2.3"), "True");
        terminating.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(endpoint(&terminating, &selector(None)).is_none());
    }

    #[test]
    fn pods_on_the_router_s_node_are_local() {
        let mut on_node = pod(Some("10.1.2.3"), "True");
        let elsewhere = endpoint(&on_node, &selector(None)).expect("ready");
        assert!(!elsewhere.local, "no node name: not local");
        if let Some(spec) = on_node.spec.as_mut() {
            spec.node_name = Some("gpu-1".into());
        }
        assert!(endpoint(&on_node, &selector(None)).expect("ready").local);
        let mut unnamed = selector(None);
        unnamed.node = None;
        assert!(!endpoint(&on_node, &unnamed).expect("ready").local);
    }

    #[test]
    fn a_named_container_port_wins_over_the_number() {
        let named = endpoint(&pod(Some("10.1.2.3"), "True"), &selector(Some("http")));
        assert_eq!(named.expect("ready").addr.port(), 8100);
        let unknown = endpoint(&pod(Some("10.1.2.3"), "True"), &selector(Some("grpc")));
        assert_eq!(unknown.expect("ready").addr.port(), 8000);
    }
}
