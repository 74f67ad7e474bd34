//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (request framing,
//! response framing, prompt extraction), each started from the seed corpus
//! committed in `fuzz/seeds/<target>`.
//!
//! `cargo xtask test` runs every target for [`SECONDS_IN_TEST`] seconds, so
//! a crash fails CI; `cargo xtask fuzz NAME --seconds N` runs one longer.
//! cargo-fuzz [`CARGO_FUZZ_VERSION`] is installed with `cargo install` when
//! missing (into `$CARGO_HOME/bin`, which outlives any clone), and the fuzz
//! build lives in `target/fuzz`. New inputs the fuzzer finds go to
//! `target/fuzz/corpus/<target>`, not into the committed seeds; a crash
//! leaves its input in `fuzz/artifacts/<target>`. Each run's output goes to
//! `target/fuzz/logs/<target>.log`; a failing one prints its end.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::setup::{self, Toolchain};

/// The fuzz targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["http_request", "http_response", "prompt"];

/// How long `cargo xtask test` runs each target.
pub const SECONDS_IN_TEST: u64 = 30;

/// The cargo-fuzz release the targets are run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct Args {
    /// The target to run (one of `fuzz/fuzz_targets/*.rs`); all when left
    /// out.
    target: Option<String>,
    /// How long to run each target, in seconds.
    #[arg(long, default_value_t = 300)]
    seconds: u64,
}

/// Runs the chosen targets.
pub fn run(args: Args) -> Result<()> {
    let toolchain = setup::run()?;
    let targets: Vec<&str> = match &args.target {
        Some(name) => {
            let Some(&target) = TARGETS.iter().find(|&&t| t == name) else {
                bail!("no fuzz target `{name}`; there are {}", TARGETS.join(", "));
            };
            vec![target]
        }
        None => TARGETS.to_vec(),
    };
    run_targets(&toolchain, &targets, args.seconds)
}

/// Installs cargo-fuzz if needed, then runs each of `targets` for
/// `seconds`; fails on the first crash.
pub fn run_targets(toolchain: &Toolchain, targets: &[&str], seconds: u64) -> Result<()> {
    install_cargo_fuzz(toolchain)?;
    for target in targets {
        let corpus = toolchain.root().join("target/fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = Path::new("fuzz/seeds").join(target);
        let mut fuzz = nightly_cargo(toolchain);
        fuzz.args([
            "fuzz",
            "run",
            "--fuzz-dir",
            "fuzz",
            "--target-dir",
            "target/fuzz",
        ])
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=4096");
        // libFuzzer prints a line per new input: that goes to a log, and
        // only its end to the terminal when the target fails.
        let log_path = toolchain
            .root()
            .join("target/fuzz/logs")
            .join(format!("{target}.log"));
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        fuzz.stdout(log.try_clone()?).stderr(log);
        eprintln!(
            "xtask fuzz: {target} for {seconds} s (log: {}): {}",
            log_path.display(),
            setup::describe(&fuzz)
        );
        let result = setup::check_status(&mut fuzz);
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Err(err) = result {
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
            return Err(err.context(format!("fuzz target {target}")));
        }
        if let Some(done) = text.lines().rev().find(|line| line.starts_with("Done ")) {
            eprintln!("xtask fuzz: {target}: {done}, no crash");
        }
    }
    Ok(())
}

/// `cargo` on the nightly toolchain, which cargo-fuzz's sanitizer flags
/// need, in the workspace root.
fn nightly_cargo(toolchain: &Toolchain) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(toolchain.root())
        .env("PATH", toolchain.path())
        // The stable cargo that runs xtask would otherwise build the targets.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Installs cargo-fuzz [`CARGO_FUZZ_VERSION`] unless `cargo fuzz --version`
/// already reports it.
fn install_cargo_fuzz(toolchain: &Toolchain) -> Result<()> {
    let version = nightly_cargo(toolchain)
        .args(["fuzz", "--version"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default();
    if version.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} with cargo install");
    let mut install = toolchain.cargo();
    install.args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
        "--locked",
    ]);
    setup::check_status(&mut install)
}
