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
    for dataplane in ["auto", "userspace", "splice"] {
        let objects = rendered(
            &helm,
            &["--set", &format!("routerSpec.dataplane={dataplane}")],
        );
        let security = &router_container(&objects)["securityContext"];
        assert_eq!(
            security,
            &json!({
                "readOnlyRootFilesystem": true,
                "allowPrivilegeEscalation": false,
                "runAsUser": 65534,
                "runAsGroup": 65534,
                "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]},
            }),
            "{dataplane}"
        );
    }
    // Root, for the capabilities to be effective, with exactly the three
    // that loading the program takes (router-daemon/tests/privilege.rs
    // loads it under just these); the daemon drops them once it is loaded.
    let objects = rendered(&helm, &["--set", "routerSpec.dataplane=sockmap"]);
    let router = router_container(&objects);
    assert_eq!(
        router["securityContext"],
        json!({
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "runAsUser": 0,
            "runAsNonRoot": false,
            "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]},
        })
    );
    assert_eq!(env(router, "ROUTER_DATAPLANE"), Some("sockmap"));
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
    let role = one(&objects, "Role", None);
    assert_eq!(role["metadata"]["namespace"], "engines");
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = one(&objects, "RoleBinding", None);
    let account = one(&objects, "ServiceAccount", None);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "llm"}])
    );
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert!(!objects.iter().any(|o| o["kind"] == "ClusterRole"));
    let router = router_container(&objects);
    assert_eq!(env(router, "ROUTER_DISCOVERY"), Some("k8s"));
    assert_eq!(env(router, "ROUTER_K8S_NAMESPACE"), Some("engines"));
    assert_eq!(
        router["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|var| var["name"] == "ROUTER_NODE_NAME")
            .map(|var| &var["valueFrom"]),
        Some(&json!({"fieldRef": {"fieldPath": "spec.nodeName"}}))
    );

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
            "use auto, userspace, splice or sockmap",
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
