//! `cargo xtask test`: what CI runs (through `.ci/run`). Setup, then
//! `cargo fmt --check`, `cargo clippy -D warnings` and `cargo test`, all in
//! release mode so they reuse setup's build, and a closing line naming each
//! stage's result. Under `CI=true` the tests get `ROUTER_REQUIRE_SOCKMAP=1`,
//! so they fail instead of skipping when the eBPF dataplane cannot load.
use std::process::Command;

use anyhow::{Result, bail};

use crate::setup::{self, Toolchain};

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
            return stages.finish(&["fmt", "clippy", "test"]);
        }
    };

    let mut fmt = toolchain.cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    stages.run("fmt", &mut fmt);

    let mut clippy = toolchain.cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--release"]);
    clippy.args(["--", "-D", "warnings"]);
    stages.run("clippy", &mut clippy);

    // Stages that prepare other test dependencies (e.g. Python packages for
    // SDK tests) go here, before `test`.

    let mut test = test_command(&toolchain, &args);
    stages.run("test", &mut test);

    stages.finish(&[])
}

/// `cargo test --workspace --release` with the caller's extra arguments.
fn test_command(toolchain: &Toolchain, args: &Args) -> Command {
    let mut test = toolchain.cargo();
    test.args(["test", "--workspace", "--release"])
        .args(&args.cargo_test_args);
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
