//! What the benchmark reads from the kernel: CPU time (system-wide from
//! `/proc/stat`, per process tree from `/proc/<pid>/task/*/schedstat` or
//! `/proc/<pid>/stat`), peak memory (`/proc/<pid>/status`), the monotonic
//! clock shared by the backend and the load generator, and the open-file
//! limit.
use std::{collections::HashMap, fs, io};

use anyhow::{Context as _, Result};

/// Nanoseconds on `CLOCK_MONOTONIC`: one clock for every process on this
/// machine, so a timestamp written by the backend process can be compared
/// with the load generator's receive time.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) cannot fail");
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

/// Clock ticks per second of `/proc/stat` and `/proc/<pid>/stat` (USER_HZ).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// The machine's CPU time, summed over CPUs, from the first line of
/// `/proc/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCpu {
    /// Time spent working: user, nice, system, irq and softirq (guest time
    /// is included in user). Kernel work done for the network stack counts.
    pub busy: u64,
    /// Time taken by the hypervisor from this machine (not our work).
    pub steal: u64,
    /// All of it, idle, iowait and steal included.
    pub total: u64,
}

impl HostCpu {
    /// Reads `/proc/stat` now.
    pub fn now() -> Result<Self> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|line| line.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq steal guest guest_nice
        let busy = field(0) + field(1) + field(2) + field(5) + field(6);
        let steal = field(7);
        let total = (0..8).map(field).sum();
        Ok(Self { busy, steal, total })
    }

    /// The CPU time used between `earlier` and `self`.
    pub fn since(self, earlier: HostCpu) -> HostCpuDelta {
        HostCpuDelta {
            busy: self.busy.saturating_sub(earlier.busy),
            steal: self.steal.saturating_sub(earlier.steal),
            total: self.total.saturating_sub(earlier.total),
        }
    }
}

/// CPU time of the whole machine over a window, in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostCpuDelta {
    /// Working time (see [`HostCpu::busy`]).
    pub busy: u64,
    /// Hypervisor steal.
    pub steal: u64,
    /// Everything, idle included.
    pub total: u64,
}

impl HostCpuDelta {
    /// Working time in seconds.
    pub fn busy_secs(&self) -> f64 {
        self.busy as f64 / clock_ticks() as f64
    }

    /// Working time as a share of all CPUs' time (1.0 = every core busy).
    pub fn busy_share(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.busy as f64 / self.total as f64
        }
    }

    /// Steal as a share of all CPUs' time.
    pub fn steal_share(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.steal as f64 / self.total as f64
        }
    }

    /// Adds another window's times.
    pub fn add(&mut self, other: HostCpuDelta) {
        self.busy += other.busy;
        self.steal += other.steal;
        self.total += other.total;
    }
}

/// The pid of `kthreadd`, the parent of every kernel thread.
pub const KTHREADD: u32 = 2;

/// CPU time of a process and all its descendants, in nanoseconds: the sum
/// of `/proc/<pid>/task/*/schedstat` (time on CPU of each live thread),
/// or, where schedstat is not available, utime + stime from
/// `/proc/<pid>/stat`. A process that is gone counts as zero.
pub fn tree_cpu_ns(pid: u32) -> u64 {
    tree(pid).into_iter().map(process_cpu_ns).sum()
}

/// `pid` and its descendants, depth first; bounded, since a process tree
/// on this machine has far fewer members than 4096.
fn tree(pid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    let mut stack = vec![pid];
    while let Some(pid) = stack.pop() {
        if members.len() >= 4096 {
            break;
        }
        members.push(pid);
        stack.extend(children(pid));
    }
    members
}

/// What a process tree has used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// utime + stime of every live member (each process's dead threads
    /// included), in nanoseconds, at clock-tick resolution.
    pub cpu_ns: u64,
    /// The sum of every live member's peak resident set (`VmHWM`), in bytes.
    pub peak_rss_bytes: u64,
}

/// CPU time (`/proc/<pid>/stat` utime + stime) and peak resident set
/// (`/proc/<pid>/status` VmHWM) of a process and its descendants. A process
/// that is gone counts as zero.
pub fn tree_usage(pid: u32) -> Usage {
    tree(pid)
        .into_iter()
        .fold(Usage::default(), |usage, pid| Usage {
            cpu_ns: usage.cpu_ns
                + stat_ticks(pid).map_or(0, |ticks| ticks * 1_000_000_000 / clock_ticks()),
            peak_rss_bytes: usage.peak_rss_bytes + peak_rss_bytes(pid).unwrap_or(0),
        })
}

/// `VmHWM` of `/proc/<pid>/status`, in bytes (absent for kernel threads
/// and zombies).
fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_hwm(&status)
}

/// The `VmHWM:  1234 kB` line of a status file, in bytes.
fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// CPU time (utime + stime, clock-tick resolution) of each process on the
/// machine that is neither one of `ours` (nor their descendants) nor a
/// kernel thread, in nanoseconds, by pid: the other users of the machine.
/// See [`others_since`].
pub fn others_cpu(ours: &[u32]) -> HashMap<u32, u64> {
    let mut excluded = std::collections::HashSet::new();
    let mut stack = ours.to_vec();
    while let Some(pid) = stack.pop() {
        if excluded.len() > 4096 {
            break;
        }
        if excluded.insert(pid) {
            stack.extend(children(pid));
        }
    }
    let mut out = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == KTHREADD || excluded.contains(&pid) {
            continue;
        }
        let Some(stat) = stat_fields(pid) else {
            continue;
        };
        // fields[1] is the parent (field 4 of proc(5)).
        if stat.get(1).and_then(|f| f.parse::<u32>().ok()) == Some(KTHREADD) {
            continue;
        }
        // utime + stime (fields 14 and 15): unlike schedstat, they keep
        // the time of threads that exited, which busy test runners have.
        let ticks = |i: usize| stat.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
        out.insert(pid, (ticks(11) + ticks(12)) * 1_000_000_000 / clock_ticks());
    }
    out
}

/// CPU time the other users' processes used between two [`others_cpu`]
/// readings, in nanoseconds: a process in both counts its difference, a
/// process that started in between counts whole. A process that exited in
/// between is lost (its last moments are not seen), so this errs low.
pub fn others_since(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(pid, &now)| match before.get(pid) {
            // A smaller value is a reused pid: a new process.
            Some(&then) if then <= now => now - then,
            _ => now,
        })
        .sum()
}

/// The fields of `/proc/<pid>/stat` after the command name: `[0]` is the
/// state (field 3 of proc(5)).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields restart after its `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// CPU time of one process (all its threads), in nanoseconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let from_schedstat = schedstat_ns(pid).unwrap_or(0);
    if from_schedstat > 0 {
        return from_schedstat;
    }
    stat_ticks(pid).map_or(0, |ticks| ticks * 1_000_000_000 / clock_ticks())
}

/// The sum of the first field of every thread's schedstat.
fn schedstat_ns(pid: u32) -> io::Result<u64> {
    let mut total = 0;
    for task in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        let Ok(text) = fs::read_to_string(path) else {
            continue;
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// utime + stime of a process (all threads, dead ones included), in ticks.
fn stat_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of proc(5).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The direct children of a process.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// Raises the soft open-file limit to the hard limit (children inherit it),
/// and returns the new soft limit.
pub fn raise_nofile() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: `limit` is a valid rlimit with cur <= max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(limit.rlim_cur)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The 1-minute load average, as `/proc/loadavg` says.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| {
            let parts: Vec<&str> = text.split_whitespace().take(3).collect();
            (parts.len() == 3).then(|| parts.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

/// The CPU model name from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The kernel release.
pub fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|text| text.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t  1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(vm_hwm(status), Some(1234 * 1024));
        assert_eq!(vm_hwm("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn this_process_has_a_peak_and_cpu_time() {
        // Burn a little CPU so at least one tick is counted.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let usage = tree_usage(std::process::id());
        assert!(usage.peak_rss_bytes > 1 << 20, "{usage:?}");
        assert!(usage.cpu_ns > 0, "{usage:?}");
    }
}
