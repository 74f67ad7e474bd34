//! `router-bench`: the dataplane benchmark of `cargo xtask bench dataplane`.
//!
//! - `router-bench dataplane [options]` runs the benchmark: it starts the
//!   fake backend (this binary's `serve`), nginx as the classic L7 proxy,
//!   and router-daemon once per dataplane, all on 127.0.0.1, and measures
//!   three cases against each of them and against the backend directly:
//!   (a) small requests, (b) 1,000 concurrent SSE streams, (c) one 100 MB
//!   response. It prints a markdown report and writes it to
//!   `target/bench/dataplane-<timestamp>.md`.
//! - `router-bench serve --listen ADDR...` is the fake backend alone.
//! - `router-bench relay --listen ADDR --backend URL...` is the cheapest
//!   userspace relay (see [`relay`]), a floor for case (b).
//! - `router-bench quality [options]` measures routing quality instead:
//!   prefix-cache hit rate, TTFT and load balance of router-daemon against
//!   client-side round-robin and least-loaded, on in-process vllm-sim
//!   fleets (see [`quality`]); its report goes to
//!   `target/bench/quality-<timestamp>.md`.
//! - `router-bench soak [options]` holds many kept-alive connections
//!   against one router for a long while and samples its memory,
//!   descriptors and counts (see [`soak`]); its report goes to
//!   `target/bench/soak-<timestamp>.md`.
//!
//! Modules: [`run`] orchestrates, [`client`] generates load, [`backend`]
//! serves, [`relay`] is the floor relay, [`report`] writes the report,
//! [`nginx`] configures nginx, [`procs`] manages child processes,
//! [`procfs`] reads CPU times and the clock, [`http`] is the little
//! HTTP/1.1 they share.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backend;
mod client;
mod http;
mod nginx;
mod procfs;
mod procs;
mod quality;
mod relay;
mod report;
mod run;
mod soak;

/// Dataplane benchmark for router-daemon.
#[derive(Parser)]
#[command(
    name = "router-bench",
    version,
    arg_required_else_help = true,
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the benchmark: every dataplane, direct and nginx, cases (a)-(c).
    Dataplane(Box<run::Args>),
    /// Serve as the fake backend on the given addresses.
    Serve(backend::Args),
    /// Routing quality: hit rate, TTFT and load per router, per workload.
    Quality(Box<quality::Args>),
    /// The cheapest userspace relay (no HTTP), run with router-daemon's
    /// flags in its place: a floor for case (b).
    Relay(relay::Args),
    /// Many kept-alive connections against one router for a long while:
    /// memory, descriptors and counts over time.
    Soak(Box<soak::Args>),
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Dataplane(args) => run::run(*args),
        Command::Serve(args) => backend::run(args),
        Command::Quality(args) => quality::run(*args).map(drop),
        Command::Relay(args) => relay::run(args),
        Command::Soak(args) => soak::run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("router-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
