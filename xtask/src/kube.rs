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
        build(&dir, &apiserver)?;
    }
    Ok(ControlPlane { apiserver, etcd })
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

/// Downloads the source package into `dir/src`, builds kube-apiserver,
/// keeps the binary as `apiserver` and removes the tree.
fn build(dir: &Path, apiserver: &Path) -> Result<()> {
    eprintln!(
        "xtask: building kube-apiserver {VERSION} from Debian's source package, once \
         (about 9 minutes on two cores) into {}",
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
    setup::run_announced(
        Command::new("make")
            .arg("WHAT=cmd/kube-apiserver")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "-p=1")
            .current_dir(&tree),
    )?;
    let built = tree.join("_output/bin/kube-apiserver");
    let staged = dir.join("kube-apiserver.partial");
    fs::copy(&built, &staged).with_context(|| format!("copying {}", built.display()))?;
    // Renamed into place last: a build cut short leaves no binary behind.
    fs::rename(&staged, apiserver)?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    Ok(())
}
