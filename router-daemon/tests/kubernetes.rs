//! `--discovery k8s` against a real API server: etcd and kube-apiserver
//! (built by `cargo xtask test`, see `xtask/src/kube.rs`), no kubelet. The
//! test creates pods and patches their status as a kubelet would (Ready or
//! not, a pod IP of 127.0.0.x, where a vllm-sim listens), and runs the
//! router binary with a kubeconfig for that API server.
//!
//! One control plane serves the whole scenario (it takes seconds to start):
//! pods appear and become ready; the selector and the namespace filter;
//! readiness lost and regained; a pod terminating while its stream runs
//! (the stream completes); the API server restarted after a pod was deleted
//! behind its back (straight from etcd), so only a new list can show it;
//! scale to zero (503 with Retry-After) and back. Three routers follow it
//! at once, one per dataplane (sockmap only as root), each stream and
//! request checked on each.
//!
//! A second control plane checks the Helm chart's RBAC (rendered by the
//! helm `cargo xtask test` installs): with a token for the chart's
//! ServiceAccount, pods can be listed and watched in the engines'
//! namespace, and nothing else (secrets, writes, other namespaces) is
//! allowed; the router, with that token, finds a Ready pod and serves, and
//! with the chart's peer selector counts the other ready router pods.
mod common;

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::Daemon;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Bound on every wait, so a hang fails instead of stalling CI.
const WAIT: Duration = Duration::from_secs(60);
const MODEL: &str = "org/model";
const TOKEN: &str = "router-test-token";
const NAMESPACE: &str = "vllm";
const LABELS: [(&str, &str); 2] = [("environment", "test"), ("release", "test")];

/// The control plane's binaries, from `cargo xtask test`; `None` (the test
/// skips) when run otherwise, unless CI requires it.
fn binaries() -> Option<(PathBuf, PathBuf)> {
    let apiserver = std::env::var_os("ROUTER_TEST_KUBE_APISERVER").map(PathBuf::from);
    let etcd = std::env::var_os("ROUTER_TEST_ETCD").map(PathBuf::from);
    match (apiserver, etcd) {
        (Some(apiserver), Some(etcd)) => Some((apiserver, etcd)),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true: the Kubernetes tests need ROUTER_TEST_KUBE_APISERVER and ROUTER_TEST_ETCD (cargo xtask test sets them)"
            );
            eprintln!(
                "skipped: run through `cargo xtask test`, which builds kube-apiserver and sets ROUTER_TEST_KUBE_APISERVER"
            );
            None
        }
    }
}

/// A free port on 127.0.0.1 (bound and released: the processes take it
/// by number).
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// etcd and kube-apiserver in a temporary directory.
struct ControlPlane {
    dir: PathBuf,
    apiserver_bin: PathBuf,
    etcd_port: u16,
    port: u16,
    _etcd: Proc,
    apiserver: Option<Proc>,
    kubeconfig: PathBuf,
}

impl ControlPlane {
    fn start(apiserver_bin: PathBuf, etcd_bin: &Path) -> Self {
        // One directory per control plane: a test binary may start two.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("router-kube-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).expect("temp dir");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stderr(Stdio::null())
                .status()
                .expect("openssl");
            assert!(status.success(), "openssl {args:?}");
        };
        openssl(&["genrsa", "-out", "sa.key", "2048"]);
        openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{TOKEN},admin,admin,system:masters\n"),
        )
        .expect("tokens");
        let (etcd_port, peer_port, port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Command::new(etcd_bin)
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args(["--listen-client-urls", &etcd_url])
            .args(["--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n"
            ),
        )
        .expect("kubeconfig");
        let mut plane = Self {
            dir,
            apiserver_bin,
            etcd_port,
            port,
            _etcd: Proc(etcd),
            apiserver: None,
            kubeconfig,
        };
        plane.start_apiserver();
        plane
    }

    fn start_apiserver(&mut self) {
        let dir = &self.dir;
        let child = Command::new(&self.apiserver_bin)
            .arg(format!(
                "--etcd-servers=http://127.0.0.1:{}",
                self.etcd_port
            ))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={}", self.port))
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .args(["--authorization-mode=RBAC", "--allow-privileged=true"])
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ))
            .args([
                "--service-cluster-ip-range=10.96.0.0/16",
                "--insecure-port=0",
            ])
            .arg("--disable-admission-plugins=ServiceAccount")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start kube-apiserver");
        self.apiserver = Some(Proc(child));
    }

    fn stop_apiserver(&mut self) {
        self.apiserver = None;
    }

    /// A kubeconfig for this API server that authenticates with `token`.
    fn kubeconfig_with(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    insecure-skip-tls-verify: true\n\
                 users:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: {name}\ncurrent-context: test\n",
                self.port
            ),
        )
        .expect("kubeconfig");
        path
    }

    async fn client(&self) -> Client {
        client_of(&self.kubeconfig).await
    }

    /// Waits until the API server answers a namespace list.
    async fn ready(&self) -> Client {
        let deadline = Instant::now() + WAIT;
        loop {
            let client = self.client().await;
            let namespaces: Api<Namespace> = Api::all(client.clone());
            if namespaces.list(&Default::default()).await.is_ok() {
                return client;
            }
            assert!(Instant::now() < deadline, "the API server did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes a pod straight from etcd (its v3 JSON gateway), as if it
    /// went while nobody watched.
    async fn delete_behind_the_back(&self, name: &str) {
        use base64_like::encode;
        let key = encode(format!("/registry/pods/{NAMESPACE}/{name}").as_bytes());
        let body = json!({ "key": key }).to_string();
        let mut stream = TcpStream::connect(("127.0.0.1", self.etcd_port))
            .await
            .expect("connect etcd");
        let request = format!(
            "POST /v3/kv/deleterange HTTP/1.1\r\nhost: etcd\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("\"deleted\":\"1\""), "{response}");
    }
}

/// A client of the API server and user `kubeconfig` names.
async fn client_of(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.apiserver = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Standard base64, for etcd's JSON gateway (keys are bytes).
mod base64_like {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// A vllm-sim on `ip:port`, named `id`; with `paced`, in real time at
/// 20 ms a token (else as fast as it can).
async fn sim(id: &str, ip: Ipv4Addr, port: u16, paced: bool) {
    let mut config = vllm_sim::Config::for_tests(id);
    config.model = MODEL.to_owned();
    if paced {
        config.time_scale = 1.0;
        config.itl_ms = 20.0;
    }
    let listener = tokio::net::TcpListener::bind((ip, port))
        .await
        .expect("bind sim");
    tokio::spawn(async move {
        let _ = vllm_sim::serve(listener, config, std::future::pending()).await;
    });
}

/// A pod `name` in `namespace` with `labels`, bound to a node no kubelet
/// runs (so a graceful delete leaves it terminating).
fn pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels },
        "spec": {
            "nodeName": "no-kubelet",
            "containers": [{ "name": "vllm", "image": "vllm/vllm-openai" }]
        }
    }))
    .expect("pod")
}

/// Patches a pod's status as a kubelet would.
async fn set_status(pods: &Api<Pod>, name: &str, ip: Ipv4Addr, ready: bool) {
    let status = json!({
        "status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }]
        }
    });
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch status");
}

/// The router binary on `dataplane`, watching `NAMESPACE`'s pods as
/// `kubeconfig`'s user, sending to their `port`.
fn start_router(kubeconfig: &Path, port: u16, dataplane: &str) -> Daemon {
    let command = router_command(kubeconfig, port, dataplane);
    tokio::task::block_in_place(|| Daemon::start(command))
}

/// The command [`start_router`] runs.
fn router_command(kubeconfig: &Path, port: u16, dataplane: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_router-daemon"));
    command
        .env("KUBECONFIG", kubeconfig)
        .args(["--listen", "127.0.0.1:0", "--discovery", "k8s"])
        .args(["--k8s-namespace", NAMESPACE])
        .args(["--k8s-port", &port.to_string()])
        .args(["--discovery-interval-ms", "200", "--dataplane", dataplane]);
    command
}

/// The dataplanes the scenario runs on: all three as root; without root,
/// sockmap is left out (unless `ROUTER_REQUIRE_SOCKMAP` says it must run).
fn dataplanes() -> Vec<&'static str> {
    if common::is_root() {
        return vec!["userspace", "splice", "sockmap"];
    }
    assert!(
        std::env::var_os("ROUTER_REQUIRE_SOCKMAP").is_none(),
        "ROUTER_REQUIRE_SOCKMAP is set, but the sockmap dataplane needs root"
    );
    eprintln!("sockmap skipped: it needs root");
    vec!["userspace", "splice"]
}

/// A completion with prompt number `i`: the status and who served it.
async fn complete(router: &str, i: usize) -> (u16, String, String) {
    let body = json!({"model": MODEL, "prompt": format!("Pod question {i}: why is the sky blue?"), "max_tokens": 4})
        .to_string();
    let mut stream = TcpStream::connect(router).await.expect("connect router");
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let served_by = text
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("x-served-by:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, served_by, text)
}

/// Who serves 16 prompts never sent before (a prompt sent before stays
/// where its prefix is cached), sorted and deduplicated. Every answer must
/// be a 200: while the router knows a Ready pod, no request fails.
async fn serving(router: &str) -> Vec<String> {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1000);
    let mut who = Vec::new();
    for _ in 0..16 {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (status, by, text) = complete(router, i).await;
        assert_eq!(status, 200, "{router}: {text}");
        who.push(by);
    }
    who.sort();
    who.dedup();
    who
}

/// Waits until 16 prompts are served by exactly `expected`.
async fn until_served_by(router: &str, expected: &[&str]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let who = serving(router).await;
        if who == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{router}: served by {who:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until each of `routers` knows a Ready pod (`/ready` answers 200):
/// from an empty fleet (just started, or scaled to zero), the pod's watch
/// event takes a moment to arrive, more on a busy machine.
async fn until_ready(routers: &[String]) {
    for router in routers {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut stream = TcpStream::connect(router).await.expect("connect router");
            stream
                .write_all(b"GET /ready HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n")
                .await
                .expect("send");
            let mut response = Vec::new();
            tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
                .await
                .expect("answered in time")
                .expect("read");
            if response.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "{router} never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// [`until_served_by`] for each of `routers`.
async fn all_served_by(routers: &[String], expected: &[&str]) {
    for router in routers {
        until_served_by(router, expected).await;
    }
}

/// A streamed completion sent through `router` whose response head says
/// pod `pod` serves it (new prompts are tried until one lands there; the
/// others are dropped after their head); returns the stream, head read.
async fn stream_on(router: &str, pod: &str) -> TcpStream {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(5000);
    for _ in 0..64 {
        let i = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = json!({"model": MODEL, "prompt": format!("Pod question {i}: why is the sky blue?"), "max_tokens": 200, "stream": true}).to_string();
        let mut stream = TcpStream::connect(router).await.expect("connect");
        let request = format!(
            "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        // The whole response head, however the reads split it.
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
                .await
                .expect("the head in time")
                .expect("read");
            assert!(n > 0, "closed before the head ended");
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 200"), "{router}: {head}");
        if head.contains(&format!("x-served-by: {pod}")) {
            return stream;
        }
    }
    panic!("{router}: no stream served by {pod}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_come_and_go_and_the_router_follows() {
    let Some((apiserver, etcd)) = binaries() else {
        return;
    };
    let mut plane = ControlPlane::start(apiserver, &etcd);
    let client = plane.ready().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for namespace in [NAMESPACE, "elsewhere"] {
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": namespace}})).expect("namespace");
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    // Simulators on 127.0.0.2-5, one port.
    let port = free_port();
    let ip = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    for (id, last) in [
        ("a", 2),
        ("b", 3),
        ("other-labels", 4),
        ("other-namespace", 5),
    ] {
        sim(id, ip(last), port, id == "b").await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "elsewhere");
    let create = PostParams::default();
    pods.create(&create, &pod("a", &LABELS))
        .await
        .expect("pod a");
    pods.create(&create, &pod("b", &LABELS))
        .await
        .expect("pod b");
    pods.create(&create, &pod("other-labels", &[("app", "else")]))
        .await
        .expect("pod other-labels");
    elsewhere
        .create(&create, &pod("other-namespace", &LABELS))
        .await
        .expect("pod other-namespace");
    set_status(&pods, "a", ip(2), true).await;
    set_status(&pods, "b", ip(3), false).await;
    set_status(&pods, "other-labels", ip(4), true).await;
    set_status(&elsewhere, "other-namespace", ip(5), true).await;

    // One router per dataplane, all watching the same pods.
    let mut daemons: Vec<Daemon> = dataplanes()
        .into_iter()
        .map(|dataplane| start_router(&plane.kubeconfig, port, dataplane))
        .collect();
    let routers: Vec<String> = daemons.iter().map(|d| d.listen.clone()).collect();

    // Only the ready pod that matches, in the namespace.
    until_ready(&routers).await;
    all_served_by(&routers, &["a"]).await;
    // b becomes ready; the other two never count.
    set_status(&pods, "b", ip(3), true).await;
    all_served_by(&routers, &["a", "b"]).await;
    // b loses readiness, and gets it back.
    set_status(&pods, "b", ip(3), false).await;
    all_served_by(&routers, &["a"]).await;
    set_status(&pods, "b", ip(3), true).await;
    all_served_by(&routers, &["a", "b"]).await;

    // b terminates while a stream runs on it through each router: every
    // stream completes.
    let mut streams = Vec::new();
    for router in &routers {
        streams.push(stream_on(router, "b").await);
    }
    pods.delete("b", &DeleteParams::default())
        .await
        .expect("graceful delete");
    all_served_by(&routers, &["a"]).await;
    for (router, mut stream) in routers.iter().zip(streams) {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("the stream ends")
            .expect("read");
        assert!(
            String::from_utf8_lossy(&rest).contains("data: [DONE]"),
            "{router}: the stream on the terminating pod completed"
        );
    }
    pods.delete(
        "b",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete");

    // The API server goes away; a pod is deleted behind its back; it comes
    // back. Only a new list shows the deletion.
    pods.create(&create, &pod("c", &LABELS))
        .await
        .expect("pod c");
    sim("c", ip(6), port, false).await;
    set_status(&pods, "c", ip(6), true).await;
    all_served_by(&routers, &["a", "c"]).await;
    plane.stop_apiserver();
    plane.delete_behind_the_back("c").await;
    plane.start_apiserver();
    plane.ready().await;
    all_served_by(&routers, &["a"]).await;

    // Scale to zero: 503 with Retry-After; then back.
    pods.delete(
        "a",
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        },
    )
    .await
    .expect("delete a");
    for router in &routers {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _, text) = complete(router, 0).await;
            if status == 503 {
                assert!(
                    text.to_ascii_lowercase().contains("retry-after: 1"),
                    "{router}: {text}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{router}: still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    pods.create(&create, &pod("a", &LABELS))
        .await
        .expect("pod a again");
    set_status(&pods, "a", ip(2), true).await;
    until_ready(&routers).await;
    all_served_by(&routers, &["a"]).await;
    for daemon in &mut daemons {
        assert!(daemon.try_wait().is_none(), "the router kept running");
    }
}

/// The helm binary from `cargo xtask test`; `None` (the test skips) when
/// run otherwise, unless CI requires it.
fn helm() -> Option<PathBuf> {
    let helm = std::env::var_os("ROUTER_TEST_HELM").map(PathBuf::from);
    if helm.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the chart's RBAC test needs ROUTER_TEST_HELM (cargo xtask test sets it)"
        );
        eprintln!("skipped: run through `cargo xtask test`, which installs helm");
    }
    helm
}

/// The chart's `templates` for a release `vllm` in `NAMESPACE`, as `helm
/// template` renders them.
fn chart(helm: &Path, templates: &[&str]) -> Vec<serde_json::Value> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/prefix-router");
    let mut command = Command::new(helm);
    command
        .args(["template", "vllm"])
        .arg(chart)
        .args(["--namespace", NAMESPACE]);
    for template in templates {
        command.args(["--show-only", &format!("templates/{template}")]);
    }
    let out = command.output().expect("run helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    serde_saphyr::from_multiple(&text).expect("YAML")
}

/// The chart's ServiceAccount, Role and RoleBinding for a release `vllm`
/// in `NAMESPACE` watching that namespace's pods.
fn chart_rbac(helm: &Path) -> Vec<serde_json::Value> {
    let objects = chart(helm, &["serviceaccount.yaml", "rbac.yaml"]);
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(kinds, ["ServiceAccount", "Role", "RoleBinding"]);
    objects
}

/// An environment variable's name and value (or downward API field).
type EnvVar = (String, String);

/// The environment the chart's DaemonSet gives its router to find its
/// peers, for a release `vllm` in `NAMESPACE`: the literal values, by name, and the downward API field of
/// each variable that has one.
fn chart_peer_env(helm: &Path) -> (Vec<EnvVar>, Vec<EnvVar>) {
    let objects = chart(helm, &["daemonset.yaml"]);
    let daemonset = &objects[0];
    let env = daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("the router container's env")
        .iter()
        .filter(|var| {
            var["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("ROUTER_P"))
        });
    let (mut values, mut fields) = (Vec::new(), Vec::new());
    for var in env {
        let name = var["name"].as_str().expect("a name").to_owned();
        match (
            var["value"].as_str(),
            var["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
        ) {
            (Some(value), _) => values.push((name, value.to_owned())),
            (None, Some(field)) => fields.push((name, field.to_owned())),
            (None, None) => panic!("{var}: neither a value nor a field"),
        }
    }
    (values, fields)
}

/// Waits (bounded) until `daemon`'s `/metrics` has the line `line`.
async fn until_metric(daemon: &Daemon, line: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = tokio::task::block_in_place(|| daemon.metrics());
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "never read {line:?}:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HTTP status of a failed API call (0 if it did not fail that way).
fn status_of<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> u16 {
    match result {
        Err(kube::Error::Api(status)) => status.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_s_service_account_reads_pods_and_nothing_else() {
    use k8s_openapi::api::{
        authentication::v1::TokenRequest,
        core::v1::{Secret, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    };
    let Some((apiserver, etcd)) = binaries() else {
        return;
    };
    let Some(helm) = helm() else {
        return;
    };
    let objects = chart_rbac(&helm);
    let plane = ControlPlane::start(apiserver, &etcd);
    let admin = plane.ready().await;
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("namespace");
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
    let create = PostParams::default();
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), NAMESPACE);
    let account: ServiceAccount = serde_json::from_value(objects[0].clone()).expect("account");
    accounts.create(&create, &account).await.expect("account");
    let role: Role = serde_json::from_value(objects[1].clone()).expect("role");
    Api::<Role>::namespaced(admin.clone(), NAMESPACE)
        .create(&create, &role)
        .await
        .expect("role");
    let binding: RoleBinding = serde_json::from_value(objects[2].clone()).expect("binding");
    Api::<RoleBinding>::namespaced(admin.clone(), NAMESPACE)
        .create(&create, &binding)
        .await
        .expect("binding");

    // A token for the chart's account, as a pod of the DaemonSet gets.
    let name = account.metadata.name.clone().expect("an account name");
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 600}
    }))
    .expect("token request");
    let token = accounts
        .create_token_request(&name, &create, &request)
        .await
        .expect("token")
        .status
        .expect("a token status")
        .token;
    let kubeconfig = plane.kubeconfig_with("router", &token);
    let router = client_of(&kubeconfig).await;

    // What discovery needs: list and watch pods in its namespace.
    let pods: Api<Pod> = Api::namespaced(router.clone(), NAMESPACE);
    pods.list(&Default::default()).await.expect("list pods");
    let _events = pods
        .watch(&Default::default(), "0")
        .await
        .expect("watch pods");
    // Nothing else: no secrets, no writes, no other namespace.
    let secrets: Api<Secret> = Api::namespaced(router.clone(), NAMESPACE);
    assert_eq!(status_of(secrets.list(&Default::default()).await), 403);
    assert_eq!(
        status_of(pods.create(&create, &pod("x", &LABELS)).await),
        403
    );
    assert_eq!(
        status_of(pods.delete("anything", &DeleteParams::default()).await),
        403
    );
    let elsewhere: Api<Pod> = Api::namespaced(router.clone(), "default");
    assert_eq!(status_of(elsewhere.list(&Default::default()).await), 403);

    // And that is enough: the router, with that token, finds a Ready pod
    // and sends it a request.
    let port = free_port();
    let ip = Ipv4Addr::new(127, 0, 0, 7);
    sim("rbac", ip, port, false).await;
    let admin_pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    admin_pods
        .create(&create, &pod("rbac", &LABELS))
        .await
        .expect("pod");
    set_status(&admin_pods, "rbac", ip, true).await;
    let daemon = start_router(&kubeconfig, port, "userspace");
    until_served_by(&daemon.listen, &["rbac"]).await;

    // The chart's router also counts its peers: the other ready pods with
    // its own labels. Its pod name comes from the downward API.
    let (values, fields) = chart_peer_env(&helm);
    assert_eq!(
        fields,
        [("ROUTER_POD_NAME".to_owned(), "metadata.name".to_owned())]
    );
    let selector = values
        .iter()
        .find(|(name, _)| name == "ROUTER_PEER_SELECTOR")
        .map(|(_, value)| value.clone())
        .expect("ROUTER_PEER_SELECTOR");
    let router_labels: Vec<(&str, &str)> = selector
        .split(',')
        .map(|pair| pair.split_once('=').expect("key=value"))
        .collect();
    let mut command = router_command(&kubeconfig, port, "userspace");
    command
        .envs(values.clone())
        .env("ROUTER_POD_NAME", "router-self");
    let peered = tokio::task::block_in_place(|| Daemon::start(command));
    let backend = format!("router_backend_shared{{backend=\"http://{ip}:{port}\"}}");
    for (name, last) in [("router-self", 8), ("router-other", 9)] {
        admin_pods
            .create(&create, &pod(name, &router_labels))
            .await
            .expect("router pod");
        set_status(&admin_pods, name, Ipv4Addr::new(127, 0, 0, last), true).await;
    }
    // Another node's router is ready: every engine has other clients, from
    // the start.
    until_metric(&peered, "router_peers 1").await;
    until_metric(&peered, &format!("{backend} 1")).await;
    // Its node is drained: this router is alone (its own pod is not its
    // peer), and knows it before any request.
    set_status(
        &admin_pods,
        "router-other",
        Ipv4Addr::new(127, 0, 0, 9),
        false,
    )
    .await;
    until_metric(&peered, "router_peers 0").await;
    until_metric(&peered, &format!("{backend} 0")).await;
    assert_eq!(serving(&peered.listen).await, ["rbac"]);
    // The router without a selector knows nothing of peers.
    until_metric(&daemon, "router_peers -1").await;
}
