//! The child processes of a run (the backend, nginx, one router per
//! dataplane): started in their own process group with a parent-death
//! signal, logged to a file, and stopped by pid (SIGTERM, then SIGKILL to
//! their group) when dropped.
use std::{
    fs::{self, File},
    io,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// How long a child may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started child process.
#[derive(Debug)]
pub struct Proc {
    /// A short name for messages.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
    /// Where this process's output begins in `log` (earlier processes'
    /// output comes before it).
    log_start: u64,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`, so a process
    /// started again under the same name (the next workload's router)
    /// leaves the earlier one's output in place.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log_start = out
            .metadata()
            .with_context(|| format!("reading {}", log.display()))?
            .len();
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let parent = std::process::id();
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure only makes async-signal-safe system calls and
        // does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the prctl took effect.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
            log: log.to_owned(),
            log_start,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has exited (reaps it).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// The last `lines` lines this process wrote to its log, for error
    /// messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read(&self.log).unwrap_or_default();
        let start = usize::try_from(self.log_start).map_or(log.len(), |s| s.min(log.len()));
        tail(&String::from_utf8_lossy(&log[start..]), lines)
    }

    /// Sends `signal` to the process, or to its whole group.
    fn signal(&self, signal: libc::c_int, group: bool) {
        if self.status.is_some() {
            return;
        }
        let Ok(pid) = libc::pid_t::try_from(self.child.id()) else {
            return;
        };
        let target = if group { -pid } else { pid };
        // SAFETY: kill has no memory-safety preconditions; the child is not
        // reaped yet, so its pid (and group id) still names it.
        unsafe { libc::kill(target, signal) };
    }

    /// Stops the process: SIGTERM, [`STOP_GRACE`], then SIGKILL to its
    /// group. Idempotent.
    pub fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.signal(libc::SIGTERM, false);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "router-bench: {} did not stop within {} s; killing its process group",
            self.name,
            STOP_GRACE.as_secs()
        );
        self.signal(libc::SIGKILL, true);
        self.status = self.child.wait().ok();
    }
}

/// The environment every benchmark starts router-daemon with: warnings
/// only, no colour, and no drain delay (a benchmark stops the router once
/// its clients are done, so the delay that lets a load balancer notice a
/// draining pod would only hold up each stop).
pub fn router_env(cmd: &mut Command) -> &mut Command {
    cmd.env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("ROUTER_DRAIN_DELAY_MS", "0")
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `lines` non-empty lines of `log` before any backtrace
/// (RUST_BACKTRACE; "Stack backtrace:" after an error, "stack backtrace:"
/// after a panic), which would push out what failed.
fn tail(log: &str, lines: usize) -> String {
    let log = match log.rfind("tack backtrace:") {
        Some(at) => &log[..log[..at].rfind('\n').unwrap_or(0)],
        None => log,
    };
    let all: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_shows_the_error_not_its_backtrace() {
        let log = "INFO ready\nError: binding 127.0.0.1:4000\n\nCaused by:\n    Address in use\n\n\
                   Stack backtrace:\n   0: anyhow::error\n   1: router_daemon::main\n";
        assert_eq!(tail(log, 2), "Caused by:\n    Address in use");
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
    }

    #[test]
    fn a_process_s_tail_is_its_own_output_in_a_shared_log() {
        let log = std::env::temp_dir().join(format!("procs-tail-{}.log", std::process::id()));
        let run = |script: &str| {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(script);
            let mut proc = Proc::spawn("sh", cmd, &log).expect("sh starts");
            // Bounded: sh exits at once, however busy the machine.
            for _ in 0..3000 {
                if proc.exited().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(proc.exited().is_some(), "sh did not exit in 30 s");
            proc
        };
        let first = run("echo 'Error: the first'; echo 'Stack backtrace:'; echo '  0: main'");
        let second = run("echo 'the second'");
        assert_eq!(first.log_tail(1), "Error: the first");
        assert_eq!(second.log_tail(5), "the second");
        fs::remove_file(&log).expect("just written");
    }
}
