//! `cargo xtask bench`: setup, then either `cargo bench --workspace` with
//! the caller's arguments, or, with `dataplane`, the dataplane benchmark,
//! or, with `quality`, the routing-quality benchmark.
//!
//! `cargo xtask bench dataplane [ARGS]` makes sure nginx is installed (it
//! is the classic L7 proxy the router is compared with: `apt-get install
//! nginx` when it is missing and we are root; otherwise it says what is
//! missing and the run goes on without nginx), then runs the release
//! `router-bench dataplane` with the release `router-daemon`. `ARGS` go to
//! `router-bench` unchanged (`cargo xtask bench dataplane --help` lists
//! them); the report is printed and written to
//! `target/bench/dataplane-<timestamp>.md`.
//!
//! `cargo xtask bench quality [ARGS]` makes sure the peer routers are
//! installed (vllm-router and sglang-router, pip-installed into
//! `target/peers-venv` once by [`crate::peers`]; on failure one line and
//! the run goes on without them), then runs the release
//! `router-bench quality` with the release `router-daemon`: prefix-cache
//! hit rate, TTFT, load balance and router CPU per router on in-process
//! vllm-sim fleets, written to `target/bench/quality-<timestamp>.md`.
//! `--no-peers` skips the peers and their install.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

use crate::{peers, setup};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// A benchmark of its own; without one, `cargo bench --workspace`.
    #[command(subcommand)]
    command: Option<Bench>,
    /// Extra arguments for `cargo bench --workspace`, after `--`.
    #[arg(last = true, value_name = "CARGO_BENCH_ARGS")]
    cargo_bench_args: Vec<String>,
}

/// The benchmarks that are not `cargo bench` targets.
#[derive(clap::Subcommand)]
enum Bench {
    /// Every dataplane side by side with direct and nginx (`--help` lists
    /// the options).
    ///
    /// Cases: small requests, 1,000 SSE streams, one 100 MB response; about
    /// 4 minutes, `--quick` about 1. The arguments go to `router-bench
    /// dataplane`.
    #[command(disable_help_flag = true)]
    Dataplane {
        /// Arguments for `router-bench dataplane`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Routing quality: router-daemon against round-robin, least-loaded,
    /// vllm-router and sglang-router on vllm-sim fleets (`--help` lists the
    /// options).
    ///
    /// Workloads: shared-prefix, multi-turn, prefix-repetition, no-sharing,
    /// mooncake, each at four load levels (`--levels`); about 15 minutes,
    /// `--quick` about 3. Installs the peers
    /// into target/peers-venv first (`--no-peers`: not). The arguments go
    /// to `router-bench quality`.
    #[command(disable_help_flag = true)]
    Quality {
        /// Arguments for `router-bench quality`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// A soak: 10,000 kept-alive connections (a few streaming, with client
    /// aborts) against one router-daemon for 10 minutes, a backend
    /// restarted half-way; memory, descriptors and counts over time
    /// (`--help` lists the options). The arguments go to `router-bench
    /// soak`.
    #[command(disable_help_flag = true)]
    Soak {
        /// Arguments for `router-bench soak`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
}

/// The Debian package and binary of the comparison proxy.
const NGINX: &str = "nginx";

/// Runs `cargo xtask bench`.
pub fn run(args: Args) -> Result<()> {
    match args.command {
        None => cargo_bench(&args.cargo_bench_args),
        Some(Bench::Dataplane { args }) => dataplane(&args),
        Some(Bench::Quality { args }) => quality(&args),
        Some(Bench::Soak { args }) => router_bench("soak", &args, |_, _| {}),
    }
}

/// Builds, then runs every benchmark in the workspace.
fn cargo_bench(extra: &[String]) -> Result<()> {
    let toolchain = setup::run()?;
    let mut bench = toolchain.cargo();
    bench.args(["bench", "--workspace"]).args(extra);
    setup::check_status(&mut bench)
}

/// Builds, then runs `router-bench dataplane` with the release router-daemon,
/// and nginx when it is (or can be) installed.
fn dataplane(args: &[String]) -> Result<()> {
    router_bench("dataplane", args, |cmd, _| {
        let wants_nginx = !args
            .iter()
            .any(|a| a == "--no-nginx" || a.starts_with("--nginx-bin"));
        if wants_nginx {
            match ensure_nginx() {
                Some(nginx) => {
                    cmd.arg("--nginx-bin").arg(nginx);
                }
                None => {
                    cmd.arg("--no-nginx");
                }
            }
        }
    })
}

/// Builds, installs the peers unless told not to (or given them) and nginx
/// where its row runs, then runs `router-bench quality` with the release
/// router-daemon.
fn quality(args: &[String]) -> Result<()> {
    router_bench("quality", args, |cmd, target_dir| {
        if quality_runs_nginx(args)
            && let Some(nginx) = ensure_nginx()
        {
            cmd.arg("--nginx-bin").arg(nginx);
        }
        let wants_peers = !args
            .iter()
            .any(|a| a == "--no-peers" || a.starts_with("--peers-dir"));
        if wants_peers {
            match peers::ensure(target_dir) {
                Some(bin) => {
                    cmd.arg("--peers-dir").arg(bin);
                }
                None => {
                    cmd.arg("--no-peers");
                }
            }
        }
    })
}

/// Whether `router-bench quality` with `args` runs the nginx row and
/// needs to be told where nginx is: its default routers include it, and
/// `--routers` may name it.
fn quality_runs_nginx(args: &[String]) -> bool {
    if args.iter().any(|a| a.starts_with("--nginx-bin")) {
        return false;
    }
    let routers = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--routers") {
            Some("") => args.get(i + 1).map(String::as_str),
            Some(value) => value.strip_prefix('='),
            None => None,
        });
    routers.is_none_or(|list| list.split(',').any(|r| r == "nginx"))
}

/// Runs `router-bench <name>` in the workspace root after setup: with the
/// release router-daemon, the report folder `target/bench` and the command
/// as invoked (unless asking for help), plus what `extra` adds (given the
/// target directory), then the caller's arguments last, so they override
/// the ones above.
fn router_bench(
    name: &str,
    args: &[String],
    extra: impl FnOnce(&mut Command, &Path),
) -> Result<()> {
    let toolchain = setup::run()?;
    let bench_bin = toolchain.release_bin("router-bench")?;
    // target/release/router-bench: the target directory is two up.
    let target_dir = bench_bin
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("router-bench is not in a target directory")?;
    let router_bin = toolchain.release_bin("router-daemon")?;
    let root = toolchain
        .cargo()
        .get_current_dir()
        .map(Path::to_path_buf)
        .context("the workspace root is unknown")?;
    let mut cmd = Command::new(bench_bin);
    cmd.arg(name).current_dir(&root);
    if !args.iter().any(|a| a == "--help" || a == "-h") {
        let invoked = std::iter::once(format!("cargo xtask bench {name}"))
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        cmd.arg("--router-bin")
            .arg(router_bin)
            .arg("--out-dir")
            .arg(root.join("target").join("bench"))
            .arg("--invoked-as")
            .arg(invoked);
        extra(&mut cmd, &target_dir);
    }
    cmd.args(args);
    setup::check_status(&mut cmd)
}

/// nginx's path, installed with apt-get first when it is missing and this
/// is root; `None` (with a message saying what is missing) otherwise.
pub(crate) fn ensure_nginx() -> Option<PathBuf> {
    if let Some(found) = find_nginx() {
        return Some(found);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let is_root = unsafe { libc::geteuid() } == 0;
    let has_apt = Command::new("apt-get")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !is_root || !has_apt {
        let sudo = if is_root { "" } else { "sudo " };
        eprintln!(
            "bench: missing {NGINX}, the L7 proxy the router is compared with\n       \
             fix: {sudo}apt-get update && {sudo}apt-get install -y {NGINX}\n       \
             running without the nginx rows"
        );
        return None;
    }
    eprintln!("bench: installing {NGINX} (apt-get)");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    };
    let installed =
        apt(&["update", "-qq"]) && apt(&["install", "-y", "-qq", "--no-install-recommends", NGINX]);
    match find_nginx() {
        Some(found) if installed => Some(found),
        _ => {
            eprintln!(
                "bench: could not install {NGINX}\n       fix: apt-get update && apt-get \
                 install -y {NGINX}\n       running without the nginx rows"
            );
            None
        }
    }
}

/// nginx on `PATH`, else where Debian puts it (`/usr/sbin` is not on every
/// user's `PATH`).
fn find_nginx() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(NGINX))
            .find(|candidate| candidate.is_file())
    });
    on_path.or_else(|| {
        let sbin = Path::new("/usr/sbin").join(NGINX);
        sbin.is_file().then_some(sbin)
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn quality_passes_every_argument_through() {
        let cli = Cli::try_parse_from(["bench", "quality", "--quick", "--rate", "20", "--help"])
            .expect("valid arguments");
        match cli.args.command {
            Some(Bench::Quality { args }) => {
                assert_eq!(args, ["--quick", "--rate", "20", "--help"])
            }
            _ => panic!("not the quality benchmark"),
        }
    }

    #[test]
    fn nginx_is_found_for_the_quality_rows_that_run_it() {
        let args = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        assert!(
            quality_runs_nginx(&args(&["--quick"])),
            "the default routers"
        );
        assert!(quality_runs_nginx(&args(&[
            "--routers",
            "round-robin,nginx"
        ])));
        assert!(quality_runs_nginx(&args(&["--routers=nginx"])));
        assert!(!quality_runs_nginx(&args(&[
            "--routers",
            "round-robin,router-daemon"
        ])));
        assert!(!quality_runs_nginx(&args(&["--routers=router-daemon"])));
        assert!(
            !quality_runs_nginx(&args(&["--nginx-bin", "/opt/nginx"])),
            "told where it is"
        );
    }
}
