//! The peer routers of `cargo xtask bench quality`: PyPI `vllm-router`
//! 0.1.17 and `sglang-router` 0.3.2, installed with pip into a venv under
//! the target directory (`<target>/peers-venv`), never system-wide.
//!
//! Idempotent: a stamp file in the venv records the pinned versions, so a
//! second run only checks that it and both executables are there. When the
//! install fails (no `python3`, no network), one line says so and the
//! benchmark runs without the peers. `cargo xtask test` never installs
//! them; CI does not need them.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

/// What pip installs (router-bench's `quality::peers` starts these).
pub const SPECS: [&str; 2] = ["vllm-router==0.1.17", "sglang-router==0.3.2"];

/// The executables the packages provide.
const PROGRAMS: [&str; 2] = ["vllm-router", "sglang-router"];

/// The venv's directory name under the target directory.
const VENV: &str = "peers-venv";

/// The stamp file, in the venv, holding [`SPECS`] once installed.
const STAMP: &str = "router-bench-peers";

/// The venv's `bin` with both peers in it, installing them first when they
/// are missing; `None` (after one line saying why) when that fails.
pub fn ensure(target_dir: &Path) -> Option<PathBuf> {
    let venv = target_dir.join(VENV);
    let bin = venv.join("bin");
    if installed(&venv) {
        return Some(bin);
    }
    let log = target_dir.join(format!("{VENV}.log"));
    eprintln!(
        "bench: installing the peer routers ({}) into {} with pip",
        SPECS.join(", "),
        venv.display()
    );
    let started = Instant::now();
    match install(&venv, &log) {
        Ok(()) if installed(&venv) => {
            eprintln!(
                "bench: peer routers installed ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
            Some(bin)
        }
        Ok(()) => {
            fail("pip succeeded but the executables are missing", &log);
            None
        }
        Err(why) => {
            fail(&why, &log);
            None
        }
    }
}

/// The one line of a failed install.
fn fail(why: &str, log: &Path) {
    eprintln!(
        "bench: could not install the peer routers ({why}; pip's output is in {}); running \
         without vllm-router and sglang-router",
        log.display()
    );
}

/// Whether the stamp says [`SPECS`] and both executables are there.
fn installed(venv: &Path) -> bool {
    let stamp = fs::read_to_string(venv.join(STAMP)).unwrap_or_default();
    stamp.trim() == SPECS.join(" ")
        && PROGRAMS.iter().all(|p| {
            fs::metadata(venv.join("bin").join(p))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Creates the venv if needed, pip-installs [`SPECS`] into it (output to
/// `log`), then writes the stamp.
fn install(venv: &Path, log: &Path) -> Result<(), String> {
    let out = fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let err = out.try_clone().map_err(|e| format!("{what}: {e}"))?;
        let out = out.try_clone().map_err(|e| format!("{what}: {e}"))?;
        let status = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .map_err(|e| format!("{what}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed ({status})"))
        }
    };
    let python = venv.join("bin").join("python3");
    if !python.is_file() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(venv),
            "python3 -m venv",
        )?;
    }
    run(
        Command::new(venv.join("bin").join("pip"))
            .args([
                "install",
                "--disable-pip-version-check",
                "--retries",
                "2",
                "--timeout",
                "30",
            ])
            .args(SPECS),
        "pip install",
    )?;
    fs::write(venv.join(STAMP), SPECS.join(" "))
        .map_err(|e| format!("writing the stamp in {}: {e}", venv.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_venv_counts_as_installed_only_with_the_stamp_and_both_programs() {
        let venv = std::env::temp_dir().join(format!("xtask-peers-test-{}", std::process::id()));
        let bin = venv.join("bin");
        fs::create_dir_all(&bin).expect("a temporary directory");
        assert!(!installed(&venv));
        for p in PROGRAMS {
            fs::write(bin.join(p), "#!/bin/sh\n").expect("writable");
            fs::set_permissions(bin.join(p), fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        assert!(!installed(&venv), "no stamp yet");
        fs::write(venv.join(STAMP), "vllm-router==0.1.16 sglang-router==0.3.2").expect("writable");
        assert!(!installed(&venv), "another version");
        fs::write(venv.join(STAMP), SPECS.join(" ")).expect("writable");
        assert!(installed(&venv));
        fs::remove_file(bin.join("sglang-router")).expect("removable");
        assert!(!installed(&venv), "a program is missing");
        let _ = fs::remove_dir_all(&venv);
    }
}
