//! `cargo xtask test`: what CI runs (through `.ci/run`). Setup, then
//! `cargo fmt --check`, `cargo clippy -D warnings`, `cargo doc` (warnings
//! denied) and `cargo test`, all in
//! release mode so they reuse setup's build (the tests get the Kubernetes
//! API server and helm that the `kube` and `helm` stages cache per
//! machine, and the router image the `image` stage builds), then each fuzz
//! target for
//! [`fuzz::SECONDS_IN_TEST`] seconds, and a closing line naming each
//! stage's result. Under `CI=true` the tests get `ROUTER_REQUIRE_SOCKMAP=1`,
//! so they fail instead of skipping when the eBPF dataplane cannot load.
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::{
    cluster, fuzz, helm, image, kube,
    setup::{self, Toolchain},
};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test --workspace --release`, after `--`.
    #[arg(last = true, value_name = "CARGO_TEST_ARGS")]
    cargo_test_args: Vec<String>,
}

/// Runs every stage; fails if any did. A failed setup skips the rest.
pub fn run(args: Args) -> Result<()> {
    let mut stages = Stages::default();
    let toolchain = match setup::run() {
        Ok(toolchain) => {
            stages.record("setup", Ok(()));
            toolchain
        }
        Err(err) => {
            stages.record("setup", Err(err));
            return stages.finish(&[
                "fmt",
                "clippy",
                "doc",
                "python-deps",
                "kube",
                "helm",
                "image",
                "test",
                "cluster-up",
                "cluster",
                "fuzz",
            ]);
        }
    };

    let mut fmt = toolchain.cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    stages.run("fmt", &mut fmt);

    let mut clippy = toolchain.cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--release"]);
    clippy.args(["--", "-D", "warnings"]);
    stages.run("clippy", &mut clippy);

    // Broken or private intra-doc links fail the run. router-ebpf is a BPF
    // object with an empty host binary: nothing to document.
    let mut doc = toolchain.cargo();
    doc.args([
        "doc",
        "--workspace",
        "--no-deps",
        "--exclude",
        "router-ebpf",
    ])
    .env("RUSTDOCFLAGS", "-D warnings");
    stages.run("doc", &mut doc);

    // Stages that prepare other test dependencies (e.g. Python packages for
    // SDK tests) go here, before `test`.
    stages.record("python-deps", python_test_deps());

    // The Kubernetes discovery tests' API server, built once per machine.
    let control_plane = stages.optional(
        "kube",
        kube::ensure(),
        "the Kubernetes discovery tests will skip",
    );
    // helm for the chart's tests, unpacked once per machine.
    let helm = stages.optional("helm", helm::ensure(), "the chart tests will skip");
    // nginx, the quality benchmark's hop baseline, from Debian.
    let nginx = stages.optional(
        "nginx",
        crate::bench::ensure_nginx().context("nginx is missing and could not be installed"),
        "the quality benchmark's smoke test will leave out its nginx row",
    );

    // The router image from this checkout's release binary on a local
    // bookworm base, in a Docker daemon kept up until the tests are done.
    let image = stages.optional(
        "image",
        toolchain
            .release_bin("router-daemon")
            .and_then(image::for_tests),
        "the image test will skip",
    );

    let mut test = test_command(&toolchain, &args);
    if let Some(control_plane) = &control_plane {
        test.env("ROUTER_TEST_KUBE_APISERVER", &control_plane.apiserver)
            .env("ROUTER_TEST_ETCD", &control_plane.etcd);
    }
    if let Some(helm) = &helm {
        test.env("ROUTER_TEST_HELM", &helm.helm);
    }
    if let Some(nginx) = &nginx {
        test.env("ROUTER_BENCH_TEST_NGINX", nginx);
    }
    if let Some(image) = &image {
        test.env("ROUTER_TEST_IMAGE", &image.tag);
        if let Some(host) = image.docker.host() {
            test.env("DOCKER_HOST", host);
        }
    }
    stages.run("test", &mut test);

    // The seed tutorial on a whole single-node cluster, after the other
    // tests (it takes the node port and a bridge): its programs built once
    // per machine, the images imported from the image stage's daemon.
    let cluster = match &image {
        Some(image) => stages.optional(
            "cluster-up",
            start_cluster(&toolchain, image),
            "the single-node cluster test will skip",
        ),
        None => None,
    };
    // Stops the Docker daemon the image stage started, if it did.
    drop(image);
    if let Some(cluster) = &cluster {
        match test_executable(&toolchain, "cluster") {
            Ok(executable) => {
                let mut test = Command::new(executable);
                test.current_dir(toolchain.root().join("tests/integration"))
                    .env("ROUTER_TEST_CLUSTER", cluster.kubeconfig())
                    .env("ROUTER_TEST_KUBECTL", cluster.bins().join("kubectl"))
                    .env("ROUTER_TEST_NODE_IP", cluster::NODE_IP)
                    .env("ROUTER_TEST_CLUSTER_LOGS", cluster.logs())
                    // The test is one script: its panic message says where
                    // it stopped, and the cluster's state it prints then
                    // says why; a backtrace would only push that away.
                    .env("RUST_BACKTRACE", "0");
                if let Some(helm) = &helm {
                    test.env("ROUTER_TEST_HELM", &helm.helm);
                }
                stages.run("cluster", &mut test);
            }
            Err(err) => stages.record("cluster", Err(err)),
        }
    }
    // Tears the cluster down.
    drop(cluster);

    // Each fuzz target for a bounded time: a crash fails the run.
    stages.record(
        "fuzz",
        fuzz::run_targets(&toolchain, &fuzz::TARGETS, fuzz::SECONDS_IN_TEST),
    );

    stages.finish(&[])
}

/// The executable of test target `name`, as the test stage built it
/// (`cargo test --workspace --release`: the same features, so nothing is
/// rebuilt; `-p integration-tests` alone would unify features differently
/// and recompile dozens of crates).
fn test_executable(toolchain: &Toolchain, name: &str) -> Result<std::path::PathBuf> {
    let out = toolchain
        .cargo()
        .args(["test", "--workspace", "--release", "--no-run"])
        .arg("--message-format=json")
        .stderr(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|msg| {
            msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == name
                && msg["target"]["kind"][0] == "test"
        })
        .and_then(|msg| msg["executable"].as_str().map(Into::into))
        .ok_or_else(|| anyhow::anyhow!("cargo test built no test target `{name}`"))
}

/// Builds the cluster's programs (once per machine), writes the images it
/// runs as docker-archives under `target/cluster-images`, and starts it.
fn start_cluster(toolchain: &Toolchain, image: &image::ForTests) -> Result<cluster::Cluster> {
    let bins = kube::ensure_node()?;
    let images = image.archives(
        toolchain.release_bin("vllm-sim")?,
        &bins.join("pause"),
        &toolchain.root().join("target/cluster-images"),
    )?;
    cluster::Cluster::start(&bins, &images)
}

/// The Python packages tests drive, relative to the workspace root:
/// vllm-sim's OpenAI SDK test, h11 for the framing comparison, and
/// kubernetes-validate for the chart's manifests.
const PYTHON_REQUIREMENTS: [&str; 3] = [
    "tests/vllm-sim/tests/sdk/requirements.txt",
    "router-daemon/tests/framing/requirements.txt",
    "deploy/requirements.txt",
];

/// Installs the Python packages the tests drive (the OpenAI SDK, h11,
/// kubernetes-validate), unless importing them all already works. Under CI a failed install
/// fails the stage; elsewhere it is reported and those tests skip with a
/// message.
fn python_test_deps() -> Result<()> {
    let importable = Command::new("python3")
        .args(["-c", "import openai, h11, kubernetes_validate"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if importable {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut pip = Command::new("python3");
    pip.args(["-m", "pip", "install", "--quiet", "--no-input"])
        .args(["--disable-pip-version-check", "--root-user-action=ignore"])
        .args(
            PYTHON_REQUIREMENTS
                .iter()
                .flat_map(|file| [std::ffi::OsString::from("-r"), root.join(file).into()]),
        );
    eprintln!("xtask test: python-deps: {}", setup::describe(&pip));
    match setup::check_status(&mut pip) {
        Ok(()) => Ok(()),
        Err(err) if setup::is_ci() => Err(err.context(
            "CI=true needs the OpenAI Python SDK, h11 and kubernetes-validate for the tests",
        )),
        Err(err) => {
            eprintln!(
                "xtask test: python-deps: {err:#}\n       vllm-sim's SDK test, the h11 \
                 framing comparison and the chart validation will skip; fix: python3 -m pip \
                 install -r {}",
                PYTHON_REQUIREMENTS.join(" -r ")
            );
            Ok(())
        }
    }
}

/// `cargo test --workspace --release --no-fail-fast` with the caller's
/// extra arguments: a failing test binary does not hide the others'
/// results.
fn test_command(toolchain: &Toolchain, args: &Args) -> Command {
    let mut test = toolchain.cargo();
    test.args(["test", "--workspace", "--release", "--no-fail-fast"])
        .args(&args.cargo_test_args);
    // The quality benchmark's smoke test runs the real router too.
    if let Ok(daemon) = toolchain.release_bin("router-daemon") {
        test.env("ROUTER_BENCH_TEST_DAEMON", daemon);
    }
    if setup::is_ci() {
        test.env("ROUTER_REQUIRE_SOCKMAP", "1");
    }
    test
}

/// Each stage's result, in order.
#[derive(Default)]
struct Stages {
    results: Vec<(&'static str, bool)>,
}

impl Stages {
    /// Runs a stage's command, announcing it, and records the result.
    fn run(&mut self, name: &'static str, cmd: &mut Command) {
        eprintln!("xtask test: {name}: {}", setup::describe(cmd));
        self.record(name, setup::check_status(cmd));
    }

    fn record(&mut self, name: &'static str, result: Result<()>) {
        if let Err(err) = &result {
            eprintln!("xtask test: {name} failed: {err:#}");
        }
        self.results.push((name, result.is_ok()));
    }

    /// A stage that prepares tools some tests need: under CI its failure
    /// is the stage's; elsewhere it is reported, the stage counts as done,
    /// and those tests skip (`without` says which).
    fn optional<T>(&mut self, name: &'static str, result: Result<T>, without: &str) -> Option<T> {
        match result {
            Ok(tools) => {
                self.record(name, Ok(()));
                Some(tools)
            }
            Err(err) if setup::is_ci() => {
                self.record(name, Err(err));
                None
            }
            Err(err) => {
                eprintln!("xtask test: {name}: {err:#}\n       {without}");
                None
            }
        }
    }

    /// Prints the closing line (`skipped` stages last) and fails if a stage did.
    fn finish(&self, skipped: &[&str]) -> Result<()> {
        let ran = self
            .results
            .iter()
            .map(|(name, ok)| format!("{name} {}", if *ok { "ok" } else { "FAILED" }));
        let skipped = skipped.iter().map(|name| format!("{name} skipped"));
        let summary: Vec<String> = ran.chain(skipped).collect();
        eprintln!("xtask test: {}", summary.join(", "));
        let failed: Vec<&str> = self
            .results
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| *name)
            .collect();
        if !failed.is_empty() {
            bail!("failed stages: {}", failed.join(", "));
        }
        Ok(())
    }
}
