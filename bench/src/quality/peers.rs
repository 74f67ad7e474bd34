//! The peer routers `router-bench quality` starts by itself when they are
//! installed: vllm-router and sglang-router (PyPI `vllm-router==0.1.17`,
//! `sglang-router==0.3.2`; `cargo xtask bench quality` installs them into
//! `target/peers-venv`), each under the policies asked for.
//!
//! Both take `--host H --port P --policy POLICY --worker-urls URL...`
//! (sglang-router after `launch`); their log level is lowered to warnings,
//! as their INFO lines cost two writes per request. What they call on a
//! backend is in `/work/shared/bench/README.md`; vllm-sim answers it.
use std::path::{Path, PathBuf};

/// A peer router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// vLLM's Rust router, `vllm-router`.
    VllmRouter,
    /// SGLang's router, `sglang-router launch`.
    SglangRouter,
}

/// Every peer, in report order.
pub const ALL: [Peer; 2] = [Peer::VllmRouter, Peer::SglangRouter];

/// What `pip install` brings every peer in (xtask pins the same).
pub const PIP_SPECS: &str = "vllm-router==0.1.17 sglang-router==0.3.2";

impl Peer {
    /// Its executable, and its name in the report.
    pub fn program(self) -> &'static str {
        match self {
            Peer::VllmRouter => "vllm-router",
            Peer::SglangRouter => "sglang-router",
        }
    }

    /// The `bash -c` line that starts it on `$PORT` in front of
    /// `$BACKEND_URLS` (comma-separated), with its Prometheus listener on
    /// `$METRICS_PORT`: both default to port 29000, so a second router (or
    /// one left running) would otherwise fail to start.
    pub fn command(self, bin: &Path, policy: Policy) -> String {
        let bin = shell_quote(&bin.display().to_string());
        let (sub, level) = match self {
            Peer::VllmRouter => ("", "warning"),
            Peer::SglangRouter => (" launch", "warn"),
        };
        format!(
            "exec {bin}{sub} --host 127.0.0.1 --port $PORT --policy {} \
             --worker-urls ${{BACKEND_URLS//,/ }} --log-level {level} \
             --prometheus-port $METRICS_PORT",
            policy.as_str()
        )
    }
}

/// A peer's routing policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Prefix-tree affinity, balanced past a load threshold.
    #[value(name = "cache_aware")]
    CacheAware,
    /// The next worker in turn.
    #[value(name = "round_robin")]
    RoundRobin,
}

impl Policy {
    /// The name both peers take after `--policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::CacheAware => "cache_aware",
            Policy::RoundRobin => "round_robin",
        }
    }
}

/// Where `program` is: in `dir` when given, else on `PATH`.
pub fn find(program: &str, dir: Option<&Path>) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = match dir {
        Some(dir) => vec![dir.to_path_buf()],
        None => std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default(),
    };
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `s` in single quotes for bash.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_quote_the_binary_and_lower_the_log_level() {
        let vllm =
            Peer::VllmRouter.command(Path::new("/v env/bin/vllm-router"), Policy::CacheAware);
        assert_eq!(
            vllm,
            "exec '/v env/bin/vllm-router' --host 127.0.0.1 --port $PORT --policy cache_aware \
             --worker-urls ${BACKEND_URLS//,/ } --log-level warning --prometheus-port $METRICS_PORT"
        );
        let sglang = Peer::SglangRouter.command(Path::new("/b/it's"), Policy::RoundRobin);
        assert!(sglang.starts_with(r"exec '/b/it'\''s' launch --host"));
        assert!(sglang.ends_with(
            "--policy round_robin --worker-urls ${BACKEND_URLS//,/ } --log-level warn \
                 --prometheus-port $METRICS_PORT"
        ));
    }

    #[test]
    fn a_missing_directory_finds_nothing() {
        assert_eq!(
            find("vllm-router", Some(Path::new("/nonexistent/bin"))),
            None
        );
        assert!(find("sh", Some(Path::new("/bin"))).is_some());
    }
}
