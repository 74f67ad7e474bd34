//! `cargo xtask`: the project's automation, one module per task.
//!
//! - [`setup`]: installs the eBPF toolchain when it is missing and builds the
//!   release binaries; every other task runs it first.
//! - [`run`]: starts `vllm-sim` instances and `router-daemon` in front of them.
//! - [`control`]: `cargo xtask sim stop|start N`, steering a running `run`.
//! - [`test`](mod@test): fmt, clippy and the workspace tests, as CI runs them.
//! - [`bench`](mod@bench): the workspace benchmarks.
//! - [`fuzz`]: the cargo-fuzz targets, run for a while each.
//! - [`kube`]: etcd and kube-apiserver for the Kubernetes discovery tests.
//! - [`peers`]: installs the peer routers the quality benchmark compares with.
//!
//! This file only parses the command line and dispatches.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod cluster;
mod control;
mod fuzz;
mod helm;
mod image;
mod kube;
mod peers;
mod run;
mod setup;
mod test;

/// Project automation for the router workspace.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    arg_required_else_help = true
)]
struct Cli {
    /// The task to run.
    #[command(subcommand)]
    command: Command,
}

/// The tasks `cargo xtask` knows.
#[derive(Subcommand)]
enum Command {
    /// Install the eBPF toolchain if missing, then `cargo build --release --workspace`.
    Setup,
    /// Start vllm-sim instances and router-daemon in front of them; Ctrl-C stops all.
    Run(run::Args),
    /// Stop or start one simulator of a running `cargo xtask run`, from another terminal.
    Sim(control::Args),
    /// Setup, then `cargo fmt --check`, `cargo clippy` and `cargo test`, as CI does.
    Test(test::Args),
    /// Setup, then `cargo bench --workspace`; `bench dataplane` and `bench quality` run
    /// the dataplane and routing-quality benchmarks (quality installs its peer routers
    /// into target/peers-venv first).
    Bench(bench::Args),
    /// Setup, then run the fuzz targets (one, or all) from their seed corpora.
    Fuzz(fuzz::Args),
    /// Build the router's container image from deploy/Dockerfile (`--prebuilt
    /// --local-base` needs no registry).
    Image(image::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Setup => setup::run().map(drop),
        Command::Run(args) => run::run(args),
        Command::Sim(args) => setup::workspace_root().and_then(|root| control::run(args, &root)),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Image(args) => image::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
