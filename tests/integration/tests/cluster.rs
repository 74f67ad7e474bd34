//! The seed tutorial on a real single-node Kubernetes (kubelet, containerd,
//! CNI bridge, kube-proxy), as a user runs it: `helm install` the chart with
//! the example values and the default dataplane, `auto`, which loads
//! `sockmap-send` there (with only the capabilities and the host cgroup
//! mount the chart grants), two vllm-sim
//! engine pods, wait for Ready, the tutorial's two requests through the
//! node port 30080 and through `kubectl port-forward`, an engine pod deleted
//! while it streams, the kernel counters (the engines' own sockets, in
//! their pods' network namespaces, redirected body bytes to the router's
//! clients), `helm uninstall`.
//!
//! `cargo xtask test` brings the cluster up after the other tests (see
//! `xtask/src/cluster.rs`), imports the router, simulator and pause images
//! into its containerd, runs this file with `ROUTER_TEST_CLUSTER` set to
//! the admin's kubeconfig, and tears it all down. Elsewhere it skips.
use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::post_json;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(180);
const MODEL: &str = "meta-llama/Llama-3.2-1B-Instruct";
/// The tutorial's two prompts: the second extends the first.
const TUTORIAL: [&str; 2] = [
    "Hello, how are you?",
    "Hello, how are you? What is the capital of France?",
];

/// What the cluster stage passes in.
struct Env {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    helm: PathBuf,
    node: SocketAddr,
    /// The components' logs, when the stage says where they are.
    logs: Option<PathBuf>,
}

/// The cluster's settings, or `None` (with a message) outside the stage.
fn env() -> Option<Env> {
    let kubeconfig = std::env::var_os("ROUTER_TEST_CLUSTER")?;
    let var = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{name} is set with ROUTER_TEST_CLUSTER"))
    };
    let node: std::net::IpAddr = std::env::var("ROUTER_TEST_NODE_IP")
        .expect("ROUTER_TEST_NODE_IP")
        .parse()
        .expect("an IP address");
    Some(Env {
        kubeconfig: kubeconfig.into(),
        kubectl: var("ROUTER_TEST_KUBECTL"),
        helm: var("ROUTER_TEST_HELM"),
        node: SocketAddr::new(node, 30080),
        logs: std::env::var_os("ROUTER_TEST_CLUSTER_LOGS").map(PathBuf::from),
    })
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// Runs `program args` with the kubeconfig; its standard output, or a
/// panic with its standard error.
fn run(env: &Env, program: &Path, args: &[&str]) -> String {
    let out = Command::new(program)
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(args)
        .output()
        .expect("run a cluster tool");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// On a failure, prints why the cluster may not have done what the test
/// waited for: the node's conditions and taints, every pod, the events,
/// and the last errors the kubelet and containerd logged.
struct ShowClusterOnFailure<'a>(&'a Env);

impl Drop for ShowClusterOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let env = self.0;
        let node = "jsonpath={range .items[*]}{.metadata.name}: \
                    {range .status.conditions[*]}{.type}={.status} {end}\
                    taints={.spec.taints}{\"\\n\"}{end}";
        for args in [
            &["get", "nodes", "-o", node][..],
            &["get", "pods", "--all-namespaces", "-o", "wide"],
            &[
                "get",
                "events",
                "--all-namespaces",
                "--sort-by=.lastTimestamp",
            ],
        ] {
            let out = Command::new(&env.kubectl)
                .arg("--kubeconfig")
                .arg(&env.kubeconfig)
                .args(args)
                .output();
            match out {
                Ok(out) => eprintln!(
                    "--- kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(err) => eprintln!("--- kubectl {}: {err}", args.join(" ")),
            }
        }
        let Some(logs) = &env.logs else { return };
        for name in ["kubelet", "containerd"] {
            let path = logs.join(format!("{name}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // klog's error lines start `E<month><day>`; containerd's say
            // `level=error`.
            let errors: Vec<&str> = text
                .lines()
                .filter(|line| {
                    let klog = line.starts_with('E')
                        && line[1..].starts_with(|c: char| c.is_ascii_digit());
                    klog || line.contains("level=error")
                })
                .collect();
            eprintln!("--- last errors in {}", path.display());
            for line in &errors[errors.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// `kubectl port-forward TARGET PORT:REMOTE` on a free loopback port:
/// the child (kill it when done) and the local address.
fn port_forward(env: &Env, target: &str, remote: u16) -> (std::process::Child, SocketAddr) {
    let port = integration_tests::free_loopback_addr().port();
    let mut forward = Command::new(&env.kubectl)
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .args(["port-forward", target, &format!("{port}:{remote}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward");
    // Its output is read to the end: kubectl writes a line per connection,
    // and would die of a closed pipe.
    let stdout = forward.stdout.take().expect("port-forward's output");
    let (said, first) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = said.send(line);
        }
    });
    let first = first
        .recv_timeout(WAIT)
        .expect("port-forward says where it forwards");
    assert!(first.contains("Forwarding from"), "{first}");
    (forward, ([127, 0, 0, 1], port).into())
}

/// The tutorial's two completions through `router`: the engine (pod name)
/// that served each.
async fn tutorial(router: SocketAddr) -> Vec<String> {
    let mut served = Vec::new();
    for prompt in TUTORIAL {
        let response = post_json(
            router,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": prompt, "max_tokens": 10}),
        )
        .await;
        assert_eq!(response.status, 200, "{router}: {}", response.text());
        served.push(
            response
                .header("x-served-by")
                .expect("x-served-by")
                .to_owned(),
        );
    }
    served
}

/// Waits until `router` answers `GET /v1/models` with a 200: a Ready pod
/// reaches kube-proxy's rules a moment after the rollout says so.
async fn until_serving(router: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut response = Vec::new();
        if let Ok(mut stream) = TcpStream::connect(router).await {
            let sent = stream
                .write_all(b"GET /v1/models HTTP/1.1\r\nhost: router\r\nconnection: close\r\n\r\n")
                .await;
            if sent.is_ok() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
                        .await;
            }
        }
        if response.starts_with(b"HTTP/1.1 200") {
            return;
        }
        assert!(Instant::now() < deadline, "{router} never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tutorial_runs_on_a_real_cluster() {
    let Some(env) = env() else {
        eprintln!("SKIPPED: ROUTER_TEST_CLUSTER is not set; cargo xtask test runs this");
        return;
    };
    let _show = ShowClusterOnFailure(&env);
    let kubectl = env.kubectl.clone();
    let helm = env.helm.clone();
    // A GPU node, as NVIDIA's feature discovery labels one.
    run(
        &env,
        &kubectl,
        &[
            "label",
            "node",
            "--all",
            "nvidia.com/gpu.present=true",
            "--overwrite",
        ],
    );
    let engines = repo("tests/integration/k8s/vllm-sim-engines.yaml");
    run(
        &env,
        &kubectl,
        &["apply", "-f", engines.to_str().expect("UTF-8")],
    );
    let chart = repo("deploy/helm/prefix-router");
    let values = repo("deploy/examples/values-prefix-aware.yaml");
    run(
        &env,
        &helm,
        &[
            "install",
            "vllm",
            chart.to_str().expect("UTF-8"),
            "-f",
            values.to_str().expect("UTF-8"),
            "--set",
            "routerSpec.imagePullPolicy=Never",
        ],
    );
    let timeout = format!("--timeout={}s", WAIT.as_secs());
    for workload in [
        "deployment/vllm-sim-a",
        "deployment/vllm-sim-b",
        "daemonset/vllm-router",
    ] {
        run(&env, &kubectl, &["rollout", "status", workload, &timeout]);
    }
    let logs = run(&env, &kubectl, &["logs", "daemonset/vllm-router"]);
    assert!(
        logs.contains("mode=\"sockmap-send\"") && logs.contains("auto: sockmap-send"),
        "the chart's default runs the sockmap-send dataplane: {logs}"
    );

    // The tutorial through the node port: the second request lands on the
    // first one's engine.
    until_serving(env.node).await;
    let served = tutorial(env.node).await;
    assert_eq!(served[0], served[1], "through the node port");

    // And through `kubectl port-forward svc/<router> PORT:80`.
    let (mut forward, forwarded) = port_forward(&env, "svc/vllm-router-service", 80);
    let through_forward = tutorial(forwarded).await;
    let _ = forward.kill();
    let _ = forward.wait();
    assert_eq!(
        through_forward[0], through_forward[1],
        "through port-forward"
    );

    // An engine pod deleted while it streams: the stream completes, and
    // the router follows the Deployment's new pod; no request fails.
    let body = json!({"model": MODEL, "prompt": "Hello, how are you? Tell me a long story.",
                      "max_tokens": 400, "stream": true})
    .to_string();
    let mut stream = TcpStream::connect(env.node).await.expect("connect");
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: router\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("the head in time")
            .expect("read");
        assert!(n > 0, "closed before the head ended");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let streaming_on = head
        .lines()
        .find_map(|line| line.strip_prefix("x-served-by: "))
        .unwrap_or_else(|| panic!("no x-served-by in {head}"))
        .trim()
        .to_owned();
    run(
        &env,
        &kubectl,
        &["delete", "pod", &streaming_on, "--wait=false"],
    );
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .expect("the stream ends")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&rest).contains("data: [DONE]"),
        "the stream on the deleted pod completed"
    );
    let app = if streaming_on.starts_with("vllm-sim-a") {
        "deployment/vllm-sim-a"
    } else {
        "deployment/vllm-sim-b"
    };
    run(&env, &kubectl, &["rollout", "status", app, &timeout]);
    let deadline = Instant::now() + WAIT;
    let logs = loop {
        // Every request succeeds meanwhile (`tutorial` asserts 200).
        let served = tutorial(env.node).await;
        assert!(
            served.iter().all(|pod| *pod != streaming_on),
            "sent to the deleted pod"
        );
        let logs = run(&env, &kubectl, &["logs", "daemonset/vllm-router"]);
        if logs.contains("backend removed") && logs.matches("backend added").count() >= 3 {
            break logs;
        }
        assert!(
            Instant::now() < deadline,
            "the router never saw the new pod: {logs}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        logs.contains("its requests in flight finish there"),
        "{logs}"
    );

    // The engines run on the router's node, each in its pod's network
    // namespace: their own sockets were found, and body bytes went from
    // them straight to the router's clients.
    let (mut forward, admin) = port_forward(&env, "daemonset/vllm-router", 9090);
    let metrics = integration_tests::get(admin, "/metrics").await.text();
    let _ = forward.kill();
    let _ = forward.wait();
    for counter in [
        "router_sockmap_peers_added_total",
        "router_sockmap_redirected_bytes_total",
    ] {
        let value = integration_tests::metric(&metrics, counter).unwrap_or(0.0);
        assert!(value > 0.0, "{counter} is {value}\n{metrics}");
    }

    // helm uninstall removes the router.
    run(&env, &helm, &["uninstall", "vllm", "--wait", &timeout]);
    let deadline = Instant::now() + WAIT;
    loop {
        let left = run(&env, &kubectl, &["get", "pods", "-o", "name"]);
        if !left.contains("vllm-router") {
            break;
        }
        assert!(Instant::now() < deadline, "router pods left: {left}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    run(
        &env,
        &kubectl,
        &["delete", "-f", engines.to_str().expect("UTF-8")],
    );
}
