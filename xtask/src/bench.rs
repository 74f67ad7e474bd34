//! `cargo xtask bench`: setup, then `cargo bench --workspace` with the
//! caller's arguments.
use anyhow::Result;

use crate::setup;

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo bench --workspace`, after `--`.
    #[arg(last = true, value_name = "CARGO_BENCH_ARGS")]
    cargo_bench_args: Vec<String>,
}

/// Builds, then runs every benchmark in the workspace.
pub fn run(args: Args) -> Result<()> {
    let toolchain = setup::run()?;
    let mut bench = toolchain.cargo();
    bench
        .args(["bench", "--workspace"])
        .args(&args.cargo_bench_args);
    setup::check_status(&mut bench)
}
