//! The Helm chart (`deploy/helm/prefix-router`) as `helm` renders it: it
//! lints strictly, its manifests validate against two Kubernetes versions,
//! and the objects say what the issue and the README promise: the
//! tutorial's Service on node port 30080, only the capabilities each
//! dataplane needs, probes and a grace period that fit the drain, RBAC that
//! reads pods and nothing else, and only environment variables the daemon
//! reads.
//!
//! `cargo xtask test` installs helm (and kubectl) into a machine-wide cache
//! and passes its path as `ROUTER_TEST_HELM`; `kubernetes-validate` comes
//! with the Python test dependencies. Without them (a bare `cargo test`)
//! these tests skip with a message; under `CI=true` they fail instead.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use clap::CommandFactory as _;
use router_daemon::Config;
use serde_json::{Value, json};

/// The chart's directory.
fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/prefix-router")
}

/// The example values the README's tutorial installs.
fn example_values() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples/values-prefix-aware.yaml")
}

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// The helm binary, or `None` (with a message) where the tests may skip.
fn helm() -> Option<PathBuf> {
    match std::env::var_os("ROUTER_TEST_HELM") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            assert!(
                !ci(),
                "CI=true needs ROUTER_TEST_HELM (cargo xtask test sets it)"
            );
            eprintln!("SKIPPED: ROUTER_TEST_HELM is not set; run cargo xtask test");
            None
        }
    }
}

/// `helm template vllm <chart> <args>`: the manifests, or helm's error.
fn render(helm: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm)
        .args(["template", "vllm"])
        .arg(chart())
        .args(["--namespace", "llm"])
        .args(args)
        .output()
        .expect("run helm");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("UTF-8 manifests"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The rendered objects, as JSON values.
fn rendered(helm: &Path, args: &[&str]) -> Vec<Value> {
    let text = render(helm, args).unwrap_or_else(|err| panic!("helm template {args:?}: {err}"));
    serde_saphyr::from_multiple::<Value>(&text).expect("rendered YAML parses")
}

/// The one object of `kind` (named `name`, if given).
fn one<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name:?} in {objects:#?}");
    found[0]
}

/// The router container of the rendered DaemonSet.
fn router_container(objects: &[Value]) -> &Value {
    &one(objects, "DaemonSet", None)["spec"]["template"]["spec"]["containers"][0]
}

/// The value of environment variable `name` in `container`, if set.
fn env<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|var| var["name"] == name)
        .and_then(|var| var["value"].as_str())
}

/// The number of `container`'s port called `name`.
fn port<'a>(container: &'a Value, name: &str) -> &'a Value {
    let port = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|port| port["name"] == name)
        .unwrap_or_else(|| panic!("a port called {name}"));
    &port["containerPort"]
}

/// The value sets the tests render: defaults, the README's example, sockmap
/// with the optional objects, and static backends.
const VALUE_SETS: [&[&str]; 3] = [
    &[],
    &[
        "--set",
        "routerSpec.dataplane=sockmap",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ],
    &[
        "--set",
        "routerSpec.serviceDiscovery=static",
        "--set",
        "routerSpec.staticBackends=http://10.0.0.1:8000\\,http://10.0.0.2:8000",
    ],
];

#[test]
fn the_chart_lints_strictly() {
    let Some(helm) = helm() else { return };
    let out = Command::new(&helm)
        .args(["lint", "--strict"])
        .arg(chart())
        .arg("-f")
        .arg(example_values())
        .output()
        .expect("run helm lint");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rendered_manifests_validate_against_two_kubernetes_versions() {
    let Some(helm) = helm() else { return };
    let importable = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|status| status.success());
    if !importable {
        assert!(!ci(), "CI=true needs kubernetes-validate (python-deps)");
        eprintln!("SKIPPED: kubernetes-validate is not installed; run cargo xtask test");
        return;
    }
    let dir = std::env::temp_dir().join(format!("chart-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let example = example_values();
    let example = ["-f", example.to_str().expect("UTF-8 path")];
    for (i, args) in VALUE_SETS.iter().copied().chain([&example[..]]).enumerate() {
        let file = dir.join(format!("render-{i}.yaml"));
        std::fs::write(&file, render(&helm, args).expect("helm template")).expect("write");
        for version in ["1.29.0", "1.35.0"] {
            let out = Command::new("python3")
                .args([
                    "-m",
                    "kubernetes_validate",
                    "--strict",
                    "--quiet",
                    "-k",
                    version,
                ])
                .arg(&file)
                .output()
                .expect("run kubernetes-validate");
            assert!(
                out.status.success(),
                "values {args:?} against Kubernetes {version}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_service_is_the_one_the_tutorial_curls() {
    let Some(helm) = helm() else { return };
    let example = example_values();
    let objects = rendered(&helm, &["-f", example.to_str().expect("UTF-8 path")]);
    // `kubectl port-forward svc/vllm-router-service 30080:80`.
    let service = one(&objects, "Service", Some("vllm-router-service"));
    assert_eq!(service["spec"]["type"], "NodePort");
    assert_eq!(service["spec"]["externalTrafficPolicy"], "Local");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080}])
    );
    let daemonset = one(&objects, "DaemonSet", Some("vllm-router"));
    assert_eq!(
        service["spec"]["selector"],
        daemonset["spec"]["template"]["metadata"]["labels"]
    );
    let router = router_container(&objects);
    assert_eq!(
        env(router, "ROUTER_LISTEN"),
        Some(format!("0.0.0.0:{}", port(router, "http")).as_str())
    );
    // One router per GPU node, tolerating the GPU taint.
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    assert!(
        pod["tolerations"]
            .as_array()
            .expect("tolerations")
            .iter()
            .any(|t| t["key"] == "nvidia.com/gpu" && t["operator"] == "Exists"),
        "{pod}"
    );
    assert_eq!(daemonset["spec"]["updateStrategy"]["type"], "RollingUpdate");
}

#[test]
fn each_dataplane_gets_only_the_capabilities_it_needs() {
    let Some(helm) = helm() else { return };
    for dataplane in ["userspace", "splice"] {
        let objects = rendered(
            &helm,
            &["--set", &format!("routerSpec.dataplane={dataplane}")],
        );
        let router = router_container(&objects);
        assert_eq!(
            router["securityContext"],
            json!({
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "runAsUser": 65534,
                "runAsGroup": 65534,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            }),
            "{dataplane}"
        );
        assert_eq!(router["volumeMounts"], Value::Null, "{dataplane}");
    }
    // Root, for the capabilities to be effective, with exactly the three
    // that loading the program takes (router-daemon/tests/privilege.rs
    // loads it under just these); the daemon drops them once it is loaded.
    let kernel = json!({
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "runAsUser": 0,
        "runAsNonRoot": false,
        "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]},
    });
    let objects = rendered(&helm, &["--set", "routerSpec.dataplane=sockmap"]);
    let router = router_container(&objects);
    assert_eq!(router["securityContext"], kernel);
    assert_eq!(env(router, "ROUTER_DATAPLANE"), Some("sockmap"));
    assert_eq!(env(router, "ROUTER_SOCKOPS_CGROUP"), None);
    assert_eq!(router["volumeMounts"], Value::Null);
    // The send hook, and `auto` (the default), which loads it where it
    // can: the same capabilities, and the host's cgroup tree, read-only,
    // for the sockops program to attach to.
    for (values, dataplane) in [
        (&[][..], "auto"),
        (
            &["--set", "routerSpec.dataplane=sockmap-send"][..],
            "sockmap-send",
        ),
    ] {
        let objects = rendered(&helm, values);
        let router = router_container(&objects);
        assert_eq!(router["securityContext"], kernel, "{dataplane}");
        assert_eq!(env(router, "ROUTER_DATAPLANE"), Some(dataplane));
        assert_eq!(env(router, "ROUTER_SOCKOPS_CGROUP"), Some("/host/cgroup"));
        assert_eq!(
            router["volumeMounts"],
            json!([{"name": "host-cgroup", "mountPath": "/host/cgroup", "readOnly": true}]),
            "{dataplane}"
        );
        assert_eq!(
            one(&objects, "DaemonSet", None)["spec"]["template"]["spec"]["volumes"],
            json!([{"name": "host-cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}}]),
            "{dataplane}"
        );
    }
    // Privileged only when a value asks for it.
    let objects = rendered(
        &helm,
        &[
            "--set",
            "routerSpec.dataplane=sockmap",
            "--set",
            "routerSpec.privileged=true",
        ],
    );
    assert_eq!(
        router_container(&objects)["securityContext"]["privileged"],
        true
    );
}

#[test]
fn probes_and_grace_period_fit_the_drain() {
    let Some(helm) = helm() else { return };
    let objects = rendered(&helm, &[]);
    let router = router_container(&objects);
    assert_eq!(
        router["livenessProbe"]["httpGet"],
        json!({"path": "/health", "port": "admin"})
    );
    assert_eq!(
        router["readinessProbe"]["httpGet"],
        json!({"path": "/ready", "port": "admin"})
    );
    assert_eq!(
        env(router, "ROUTER_ADMIN_LISTEN"),
        Some(format!("0.0.0.0:{}", port(router, "admin")).as_str())
    );
    let grace = one(&objects, "DaemonSet", None)["spec"]["template"]["spec"]
        ["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("a grace period");
    let drain_ms: u64 = env(router, "ROUTER_DRAIN_TIMEOUT_MS")
        .expect("a drain timeout")
        .parse()
        .expect("milliseconds");
    assert!(
        grace * 1000 > drain_ms,
        "grace {grace} s, drain {drain_ms} ms"
    );
    // A grace period the drain does not fit in is refused, saying why.
    let err = render(
        &helm,
        &["--set", "routerSpec.terminationGracePeriodSeconds=30"],
    )
    .expect_err("a grace period equal to the drain timeout");
    assert!(
        err.contains("must exceed routerSpec.drain.timeoutSeconds"),
        "{err}"
    );
}

#[test]
fn discovery_reads_pods_and_nothing_else() {
    let Some(helm) = helm() else { return };
    let objects = rendered(&helm, &["--set", "routerSpec.k8sNamespace=engines"]);
    let account = one(&objects, "ServiceAccount", None);
    // The engines' pods in their namespace, and the router's own (its
    // peers) in the release's: one Role each, bound to the account.
    let roles: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Role").collect();
    let namespaces: Vec<&Value> = roles.iter().map(|r| &r["metadata"]["namespace"]).collect();
    assert_eq!(namespaces, ["engines", "llm"]);
    for role in roles {
        assert_eq!(
            role["rules"],
            json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
        );
        let name = role["metadata"]["name"].as_str().expect("a role name");
        let binding = one(&objects, "RoleBinding", Some(name));
        assert_eq!(
            binding["metadata"]["namespace"],
            role["metadata"]["namespace"]
        );
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "llm"}])
        );
        assert_eq!(binding["roleRef"]["name"], name);
    }
    assert!(!objects.iter().any(|o| o["kind"] == "ClusterRole"));
    let router = router_container(&objects);
    assert_eq!(env(router, "ROUTER_DISCOVERY"), Some("k8s"));
    assert_eq!(env(router, "ROUTER_K8S_NAMESPACE"), Some("engines"));
    assert_eq!(env(router, "ROUTER_PEER_NAMESPACE"), Some("llm"));
    let field = |name: &str| {
        router["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|var| var["name"] == name)
            .map(|var| var["valueFrom"].clone())
    };
    assert_eq!(
        field("ROUTER_NODE_NAME"),
        Some(json!({"fieldRef": {"fieldPath": "spec.nodeName"}}))
    );
    assert_eq!(
        field("ROUTER_POD_NAME"),
        Some(json!({"fieldRef": {"fieldPath": "metadata.name"}}))
    );
    // Its peers are the pods of its own DaemonSet.
    let selector = &one(&objects, "DaemonSet", None)["spec"]["selector"]["matchLabels"];
    let labels: Vec<String> = selector
        .as_object()
        .expect("matchLabels")
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().expect("a label value")))
        .collect();
    let mut peers: Vec<&str> = env(router, "ROUTER_PEER_SELECTOR")
        .expect("ROUTER_PEER_SELECTOR")
        .split(',')
        .collect();
    peers.sort_unstable();
    assert_eq!(peers, labels);
    // With the engines in the release's namespace, one Role reads both.
    let objects = rendered(&helm, &[]);
    assert_eq!(one(&objects, "Role", None)["metadata"]["namespace"], "llm");

    // Static backends: no Role, no token in the pod.
    let objects = rendered(&helm, VALUE_SETS[2]);
    assert!(!objects.iter().any(|o| o["kind"] == "Role"));
    let daemonset = one(&objects, "DaemonSet", None);
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["automountServiceAccountToken"],
        false
    );
    assert_eq!(
        env(router_container(&objects), "ROUTER_BACKENDS"),
        Some("http://10.0.0.1:8000,http://10.0.0.2:8000")
    );
}

#[test]
fn every_variable_the_chart_sets_is_one_the_daemon_reads() {
    let Some(helm) = helm() else { return };
    let daemon = Config::command();
    let read: Vec<String> = daemon
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .map(|name| name.to_string_lossy().into_owned())
        .chain(["RUST_LOG".to_owned()])
        .collect();
    for args in VALUE_SETS {
        let objects = rendered(&helm, args);
        let router = router_container(&objects);
        for var in router["env"].as_array().expect("env") {
            let name = var["name"].as_str().expect("a name");
            assert!(
                read.iter().any(|r| r == name),
                "{name} is not read by router-daemon"
            );
        }
    }
}

#[test]
fn routing_logic_reaches_the_daemon() {
    let Some(helm) = helm() else { return };
    for (args, logic) in [
        (&[][..], "prefixaware"),
        (
            &["--set", "routerSpec.routingLogic=roundrobin"][..],
            "roundrobin",
        ),
    ] {
        let objects = rendered(&helm, args);
        let router = router_container(&objects);
        assert_eq!(env(router, "ROUTER_ROUTING_LOGIC"), Some(logic), "{args:?}");
    }
}

#[test]
fn values_the_router_cannot_run_with_are_refused() {
    let Some(helm) = helm() else { return };
    for (set, says) in [
        (
            "routerSpec.routingLogic=kvaware",
            "use \"prefixaware\" or \"roundrobin\"",
        ),
        (
            "routerSpec.serviceDiscovery=static",
            "needs routerSpec.staticBackends",
        ),
        (
            "routerSpec.dataplane=xdp",
            "use auto, userspace, splice, sockmap or sockmap-send",
        ),
    ] {
        let err = render(&helm, &["--set", set]).expect_err(set);
        assert!(err.contains(says), "{set}: {err}");
    }
}

#[test]
fn the_dashboard_ships_in_the_chart() {
    let Some(helm) = helm() else { return };
    let objects = rendered(&helm, VALUE_SETS[1]);
    let map = one(&objects, "ConfigMap", Some("vllm-router-dashboard"));
    assert_eq!(map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        map["data"]["prefix-router.json"]
            .as_str()
            .expect("the dashboard"),
    )
    .expect("JSON");
    let file =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/prefix-router.json");
    let on_disk: Value =
        serde_json::from_str(&std::fs::read_to_string(file).expect("read")).expect("JSON");
    assert_eq!(shipped, on_disk);
    let monitor = one(&objects, "ServiceMonitor", None);
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"], "admin",
        "{monitor}"
    );
}

/// The image `cargo xtask test` built (`cargo xtask image --prebuilt
/// --local-base`: this checkout's release binary on a debootstrapped
/// bookworm) and `DOCKER_HOST` for the daemon holding it, or `None` (with a
/// message) where the test may skip.
fn image_under_test() -> Option<String> {
    match std::env::var("ROUTER_TEST_IMAGE") {
        Ok(image) => Some(image),
        Err(_) => {
            assert!(
                !ci(),
                "CI=true needs ROUTER_TEST_IMAGE (cargo xtask test builds it)"
            );
            eprintln!("SKIPPED: ROUTER_TEST_IMAGE is not set; run cargo xtask test");
            None
        }
    }
}

/// `docker run` arguments for `container` as the kubelet would run it:
/// its user, capabilities, read-only root, no privilege escalation, memory
/// limit, environment (`overrides` replace or add variables; a variable set
/// from the downward API must be among them) and arguments. On the host's
/// network, so the test's simulators on loopback are reachable.
fn docker_run_args(container: &Value, name: &str, overrides: &[(&str, String)]) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--detach",
        "--rm",
        "--network",
        "host",
        "--name",
        name,
    ]
    .map(String::from)
    .to_vec();
    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true, "never privileged");
    if let Some(uid) = security["runAsUser"].as_u64() {
        let user = match security["runAsGroup"].as_u64() {
            Some(gid) => format!("{uid}:{gid}"),
            None => uid.to_string(),
        };
        args.extend(["--user".into(), user]);
    }
    if security["readOnlyRootFilesystem"] == true {
        args.push("--read-only".into());
    }
    if security["allowPrivilegeEscalation"] == false {
        args.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    for (flag, key) in [("--cap-drop", "drop"), ("--cap-add", "add")] {
        for cap in security["capabilities"][key]
            .as_array()
            .into_iter()
            .flatten()
        {
            let cap = cap.as_str().expect("a capability name");
            args.extend([flag.to_owned(), cap.to_owned()]);
        }
    }
    if let Some(memory) = container["resources"]["limits"]["memory"].as_str() {
        // Kubernetes' Gi/Mi are docker's g/m.
        args.extend([
            "--memory".into(),
            memory.trim_end_matches('i').to_lowercase(),
        ]);
    }
    for var in container["env"].as_array().expect("env") {
        let key = var["name"].as_str().expect("a name");
        if overrides.iter().any(|(name, _)| *name == key) {
            continue;
        }
        let value = var["value"]
            .as_str()
            .unwrap_or_else(|| panic!("{key} is set from the pod; the test must give it"));
        args.extend(["--env".into(), format!("{key}={value}")]);
    }
    for (key, value) in overrides {
        args.extend(["--env".into(), format!("{key}={value}")]);
    }
    args.push(container["image"].as_str().expect("image").to_owned());
    for arg in container["args"].as_array().into_iter().flatten() {
        args.push(arg.as_str().expect("a string argument").to_owned());
    }
    args
}

/// `docker ARGS`, its standard output, or a panic with its standard error.
fn docker(args: &[String]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("run docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the container when dropped, printing its log first (what a
/// failing test needs to see).
struct Running(String);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("docker").args(["logs", &self.0]).output() {
            eprintln!(
                "container {} log:\n{}{}",
                self.0,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = Command::new("docker")
            .args(["rm", "--force", &self.0])
            .output();
    }
}

/// The image runs as the rendered DaemonSet says (user, capabilities,
/// read-only root, no privilege escalation, memory limit, environment from
/// the example values with static backends): the process has the chart's
/// uid and no capabilities, and serves the tutorial, the second prompt (which
/// extends the first) landing on the same engine.
///
/// It runs with `dataplane: userspace`, not the default `auto`: the kernel
/// dataplanes' values cannot run here, as Debian's Docker 20.10 does not
/// know the BPF and PERFMON capabilities (`invalid CapAdd: unknown
/// capability: "CAP_BPF"`); `router-daemon/tests/privilege.rs` checks that
/// capability set, `auto` included, on the host binary instead, and
/// `cluster.rs` runs the default in a real cluster.
#[test]
fn the_image_serves_the_tutorial_as_the_daemonset_runs_it() {
    let Some(helm) = helm() else { return };
    let Some(image) = image_under_test() else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let (urls, _sims) = runtime.block_on(integration_tests::start_sims(2));
    let backends = urls.join("\\,");
    let example = example_values();
    let example = example.to_str().expect("a UTF-8 path");
    let objects = rendered(
        &helm,
        &[
            "-f",
            example,
            "--set",
            "routerSpec.dataplane=userspace",
            "--set",
            "routerSpec.serviceDiscovery=static",
            "--set",
            &format!("routerSpec.staticBackends={backends}"),
        ],
    );
    let container = router_container(&objects);
    assert_eq!(
        container["image"],
        image.as_str(),
        "the chart's default image"
    );
    let (listen, admin) = (
        integration_tests::free_loopback_addr().port(),
        integration_tests::free_loopback_addr().port(),
    );
    let name = format!("prefix-router-test-{}", std::process::id());
    let args = docker_run_args(
        container,
        &name,
        &[
            ("ROUTER_LISTEN", format!("127.0.0.1:{listen}")),
            ("ROUTER_ADMIN_LISTEN", format!("127.0.0.1:{admin}")),
            ("ROUTER_NODE_NAME", "test-node".to_owned()),
        ],
    );
    docker(&args);
    let _running = Running(name.clone());
    let listen: std::net::SocketAddr = ([127, 0, 0, 1], listen).into();
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    runtime.block_on(async {
        // Ready once an engine answered discovery (bounded: about 60 s).
        let mut ready = false;
        for _ in 0..600 {
            let listening = tokio::net::TcpStream::connect(admin).await.is_ok();
            if listening && integration_tests::get(admin, "/ready").await.status == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(ready, "the container never became ready");
        let mut served = Vec::new();
        for prompt in [
            "Hello, how are you?",
            "Hello, how are you? What is the capital of France?",
        ] {
            let response = integration_tests::post_json(
                listen,
                "/v1/completions",
                &json!({"model": "meta-llama/Llama-3.2-1B-Instruct",
                        "prompt": prompt, "max_tokens": 8}),
            )
            .await;
            assert_eq!(response.status, 200, "{}", response.text());
            served.push(response.header("x-served-by").map(str::to_owned));
        }
        assert!(served[0].is_some(), "no x-served-by");
        assert_eq!(served[0], served[1], "the tutorial's pair split");
    });
    // What the kernel says the process is.
    let pid = docker(&[
        "inspect".into(),
        "--format".into(),
        "{{.State.Pid}}".into(),
        name,
    ]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim()))
        .expect("the container's /proc/PID/status");
    let field = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{key} in {status}"))
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
}
