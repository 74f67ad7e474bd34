//! The Kubernetes control plane the discovery tests run against: etcd from
//! Debian, and kube-apiserver built once from Debian bookworm's
//! `kubernetes` source package (1.20.2, its Go dependencies vendored, so it
//! builds offline) and cached in a machine-wide directory, since CI's clone
//! starts with an empty `target/`. The first build takes about 9 minutes on
//! two cores; later runs find the binary.
//!
//! The recipe is `../shared/notes/kubernetes-offline.md`'s, done here in
//! steps that are each skipped when their result is there.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::setup;

/// The `kubernetes` source package's upstream version.
const VERSION: &str = "1.20.2";

/// apt source of bookworm's source packages.
const DEB_SRC: &str = "/etc/apt/sources.list.d/prefix-router-src.sources";

/// The binaries the tests start.
#[derive(Debug)]
pub struct ControlPlane {
    /// `kube-apiserver`.
    pub apiserver: PathBuf,
    /// `etcd`.
    pub etcd: PathBuf,
}

/// Installs etcd and builds kube-apiserver if they are missing.
pub fn ensure() -> Result<ControlPlane> {
    let dir = setup::cache_dir()?.join(format!("kubernetes-{VERSION}"));
    let apiserver = dir.join("kube-apiserver");
    let etcd = PathBuf::from("/usr/bin/etcd");
    // The tests make the API server's service-account key with openssl.
    let openssl = Path::new("/usr/bin/openssl");
    if apiserver.is_file() && etcd.is_file() && openssl.is_file() {
        return Ok(ControlPlane { apiserver, etcd });
    }
    apt_packages()?;
    if !apiserver.is_file() {
        build(&dir, &["kube-apiserver"])?;
    }
    Ok(ControlPlane { apiserver, etcd })
}

/// The programs of a whole single-node cluster, besides the API server
/// (`../shared/notes/k8s-cluster/`), built from the same source package.
pub const NODE_PROGRAMS: [&str; 5] = [
    "kubelet",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubectl",
];

/// Builds the API server, [`NODE_PROGRAMS`] and the pause container's
/// program (`pause`, static) into the machine-wide cache unless they are
/// there (about 8 minutes on two cores the first time), and installs the
/// Debian packages a node runs on (containerd, the CNI plugins, conntrack,
/// iptables); returns the directory holding the binaries.
pub fn ensure_node() -> Result<PathBuf> {
    let plane = ensure()?;
    let dir = plane
        .apiserver
        .parent()
        .context("the API server has no directory")?
        .to_path_buf();
    let missing: Vec<&str> = NODE_PROGRAMS
        .into_iter()
        .chain(["pause"])
        .filter(|program| !dir.join(program).is_file())
        .collect();
    let node_packages = [
        "containerd",
        "containernetworking-plugins",
        "conntrack",
        "iptables",
        "gcc",
        "libc6-dev",
    ];
    if !missing.is_empty() || !Path::new("/usr/lib/cni/bridge").is_file() {
        setup::apt_install(&node_packages)?;
    }
    if !missing.is_empty() {
        // The API server may have come from the cache without the build's
        // tools (Go, the deb-src line): make sure of them.
        apt_packages()?;
        build(&dir, &NODE_PROGRAMS)?;
    }
    Ok(dir)
}

/// etcd and openssl for the tests, Go and rsync for the build, from
/// Debian.
fn apt_packages() -> Result<()> {
    if !Path::new(DEB_SRC).is_file() {
        fs::write(
            DEB_SRC,
            "Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n\
             Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        )
        .with_context(|| format!("writing {DEB_SRC} (needs root)"))?;
    }
    setup::apt_install(&["golang-go", "rsync", "etcd-server", "openssl"])
}

/// Downloads the source package into `dir/src`, builds `programs`
/// (`cmd/<program>`; with the node's programs also the pause container's
/// static `pause`), keeps the binaries in `dir` and removes the tree.
fn build(dir: &Path, programs: &[&str]) -> Result<()> {
    eprintln!(
        "xtask: building {} {VERSION} from Debian's source package, once \
         (about 8 minutes on two cores) into {}",
        programs.join(", "),
        dir.display()
    );
    let src = dir.join("src");
    fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let orig = |src: &Path| -> Result<Option<PathBuf>> {
        Ok(fs::read_dir(src)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.to_string_lossy().ends_with(".orig.tar.gz")))
    };
    if orig(&src)?.is_none() {
        setup::run_announced(
            Command::new("apt-get")
                .args(["source", "--download-only", "kubernetes"])
                .current_dir(&src),
        )?;
    }
    let tarball = orig(&src)?.context("apt-get source left no .orig.tar.gz")?;
    let tree = src.join(format!("kubernetes-{VERSION}"));
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    setup::run_announced(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .current_dir(&src),
    )?;
    let what: Vec<String> = programs.iter().map(|p| format!("cmd/{p}")).collect();
    setup::run_announced(
        Command::new("make")
            .arg(format!("WHAT={}", what.join(" ")))
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-p=1")
            .current_dir(&tree),
    )?;
    let mut built: Vec<(PathBuf, &str)> = programs
        .iter()
        .map(|program| (tree.join("_output/bin").join(program), *program))
        .collect();
    if programs.contains(&"kubelet") {
        let pause = tree.join("_output/pause");
        setup::run_announced(
            Command::new("gcc")
                .args(["-Os", "-static", "-o"])
                .arg(&pause)
                .arg(tree.join("build/pause/linux/pause.c")),
        )?;
        built.push((pause, "pause"));
    }
    for (binary, name) in built {
        let staged = dir.join(format!("{name}.partial"));
        fs::copy(&binary, &staged).with_context(|| format!("copying {}", binary.display()))?;
        // Renamed into place last: a build cut short leaves no binary behind.
        fs::rename(&staged, dir.join(name))?;
    }
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    Ok(())
}
