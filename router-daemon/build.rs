//! Builds the `router-ebpf` object and leaves it in `OUT_DIR` for embedding.
//!
//! When the eBPF toolchain is missing (no `bpf-linker`, no nightly with
//! `rust-src`), this writes an empty object instead and says what is missing:
//! the daemon still builds, and at run time it reports that the sockmap
//! dataplane is unavailable and uses a userspace one. `cargo xtask setup`
//! installs the toolchain.
use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

const EBPF_PACKAGE: &str = "router-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join(EBPF_PACKAGE);

    if let Some(missing) = missing_toolchain() {
        println!(
            "cargo:warning=building without the eBPF object ({missing}); \
             the sockmap dataplane will be unavailable. `cargo xtask setup` installs it."
        );
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
        return Ok(());
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest")?);
    let root_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("router-daemon has no parent directory"))?
        .join(EBPF_PACKAGE);
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: EBPF_PACKAGE,
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    // `AYA_BUILD_SKIP` makes aya-build return without an object.
    if !object.exists() {
        fs::write(&object, []).with_context(|| format!("writing {}", object.display()))?;
    }
    Ok(())
}

/// Names the first missing piece of the eBPF toolchain, if any.
fn missing_toolchain() -> Option<String> {
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|out| out.status.success()) {
        return Some("bpf-linker is not on PATH".into());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let core = PathBuf::from(sysroot).join("lib/rustlib/src/rust/library/core");
            (!core.exists()).then(|| "the nightly toolchain has no rust-src component".into())
        }
        _ => Some("no nightly toolchain (rustup run nightly rustc failed)".into()),
    }
}
