//! The markdown report: absolute numbers per case, ratios against nginx and
//! against direct, the issue's targets checked, and the dataplane the
//! numbers suggest as the default.
use std::fmt::Write as _;

use crate::{
    backend::EVENT_BYTES,
    run::{Dataplane, Kind, Results, RowA, RowB, RowC, WindowA, WindowB},
};

/// Microseconds as milliseconds, with precision that suits the size.
pub fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 1.0 {
        format!("{ms:.3}")
    } else if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

/// A signed difference of microseconds, as milliseconds.
fn ms_diff(us: f64) -> String {
    let ms = us / 1000.0;
    if ms.abs() < 10.0 {
        format!("{ms:+.3}")
    } else {
        format!("{ms:+.1}")
    }
}

/// The median of sorted values.
pub fn median(sorted: &[f64]) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let mid = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    })
}

/// `a / b` as `0.93×`, or `–` when either is missing or `b` is 0.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.decimals$}"))
}

/// The window of a row with the median req/s.
fn median_a(row: &RowA) -> Option<&WindowA> {
    if row.failed.is_some() {
        return None;
    }
    let mut windows: Vec<&WindowA> = row.windows.iter().collect();
    windows.sort_by(|x, y| x.rps.total_cmp(&y.rps));
    windows.get(windows.len().saturating_sub(1) / 2).copied()
}

/// The run of a row with the median system CPU per event.
fn median_b(row: &RowB) -> Option<&WindowB> {
    if row.failed.is_some() {
        return None;
    }
    let mut windows: Vec<&WindowB> = row.windows.iter().collect();
    windows.sort_by(|x, y| x.host_us_per_event().total_cmp(&y.host_us_per_event()));
    windows.get(windows.len().saturating_sub(1) / 2).copied()
}

/// The medians of a row's per-window p50 and p99 event latency, µs; None
/// for a failed row.
fn median_latency(row: &RowB) -> Option<(f64, f64)> {
    if row.failed.is_some() {
        return None;
    }
    let sorted_median = |pick: fn(&WindowB) -> u64| {
        let mut values: Vec<f64> = row.windows.iter().map(|w| pick(w) as f64).collect();
        values.sort_by(f64::total_cmp);
        median(&values)
    };
    Some((sorted_median(|w| w.p50_us)?, sorted_median(|w| w.p99_us)?))
}

/// CPU per 1,000 requests of a window, ms.
struct PerK {
    proxy: f64,
    system: f64,
    bench: f64,
    backend: f64,
    loadgen: f64,
    kernel: f64,
}

fn per_k(w: &WindowA) -> PerK {
    let k = w.ok as f64 / 1000.0;
    let f = |x: f64| if k > 0.0 { x / k } else { 0.0 };
    PerK {
        proxy: f(w.cpu.proxy_ns as f64 / 1e6),
        system: f(w.cpu.host.busy_secs() * 1e3),
        bench: f(w.cpu.bench_secs() * 1e3),
        backend: f(w.cpu.backend_ns as f64 / 1e6),
        loadgen: f(w.cpu.loadgen_ns as f64 / 1e6),
        kernel: f(w.cpu.kernel_ns as f64 / 1e6),
    }
}

/// `busy (others, steal)` in percent of all CPUs.
fn busy(cpu: &crate::run::Cpu) -> String {
    format!(
        "{:.0} ({:.0}, {:.0})",
        100.0 * cpu.host.busy_share(),
        100.0 * cpu.other_share(),
        100.0 * cpu.host.steal_share()
    )
}

/// Look-ups over the results.
struct View<'a> {
    r: &'a Results,
}

impl<'a> View<'a> {
    fn a(&self, kind: Kind, keep_alive: bool, conns: usize) -> Option<&'a WindowA> {
        self.r
            .a
            .iter()
            .find(|row| row.kind == kind && row.keep_alive == keep_alive && row.conns == conns)
            .and_then(median_a)
    }

    /// A system's row of (a) as it is normally used: keep-alive.
    fn a_used(&self, kind: Kind, conns: usize) -> Option<&'a WindowA> {
        self.a(kind, true, conns)
    }

    fn b(&self, kind: Kind) -> Option<&'a WindowB> {
        self.r
            .b
            .iter()
            .find(|row| row.kind == kind)
            .and_then(median_b)
    }

    fn c(&self, kind: Kind) -> Option<&'a RowC> {
        self.r
            .c
            .iter()
            .find(|row| row.kind == kind && !row.mb_per_sec.is_empty())
    }

    fn routers(&self) -> Vec<Dataplane> {
        let mut out: Vec<Dataplane> = self
            .r
            .a
            .iter()
            .map(|row| row.kind)
            .chain(self.r.b.iter().map(|row| row.kind))
            .chain(self.r.c.iter().map(|row| row.kind))
            .filter_map(|kind| match kind {
                Kind::Router(dp) => Some(dp),
                Kind::Direct | Kind::Nginx | Kind::NginxUnbuffered => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Added latency over direct keep-alive, µs: (p50, p99).
    fn added_a(&self, kind: Kind, conns: usize) -> Option<(f64, f64)> {
        let w = self.a_used(kind, conns)?;
        let d = self.a(Kind::Direct, true, conns)?;
        Some((
            w.p50_us as f64 - d.p50_us as f64,
            w.p99_us as f64 - d.p99_us as f64,
        ))
    }

    /// Added event latency over direct, µs: (p50, p99), each the median
    /// over a system's windows less direct's. A tail moves far more from
    /// window to window than CPU does, so the window with the median CPU
    /// (the table's other columns) says little about it.
    fn added_b(&self, kind: Kind) -> Option<(f64, f64)> {
        let (p50, p99) = self.latency_b(kind)?;
        let (direct_p50, direct_p99) = self.latency_b(Kind::Direct)?;
        Some((p50 - direct_p50, p99 - direct_p99))
    }

    /// The medians of a system's per-window p50 and p99 event latency, µs.
    fn latency_b(&self, kind: Kind) -> Option<(f64, f64)> {
        median_latency(self.r.b.iter().find(|row| row.kind == kind)?)
    }

    /// System CPU per event over direct's, µs.
    fn extra_cpu_b(&self, kind: Kind) -> Option<f64> {
        Some(self.b(kind)?.host_us_per_event() - self.b(Kind::Direct)?.host_us_per_event())
    }

    /// Median MB/s of case (c).
    fn mbps(&self, kind: Kind) -> Option<f64> {
        let mut v = self.c(kind)?.mb_per_sec.clone();
        v.sort_by(f64::total_cmp);
        median(&v)
    }

    /// System CPU per response of case (c), ms.
    fn cpu_c(&self, kind: Kind) -> Option<f64> {
        let row = self.c(kind)?;
        let responses = row.bytes as f64 / self.r.plan.bulk_bytes as f64;
        (responses > 0.0).then(|| row.cpu.host.busy_secs() * 1e3 / responses)
    }
}

/// Renders the whole report.
pub fn render(r: &Results) -> String {
    let v = View { r };
    let mut out = String::new();
    let plan = &r.plan;
    let _ = writeln!(
        out,
        "# Dataplane benchmark: router-daemon vs nginx vs direct\n"
    );
    let _ = writeln!(
        out,
        "Command: `{}` ({:.0} s)\n",
        plan.command,
        r.elapsed.as_secs_f64()
    );
    for line in &r.env {
        let _ = writeln!(out, "- {line}");
    }
    let others: Vec<f64> =
        r.a.iter()
            .flat_map(|row| row.windows.iter().map(|w| w.cpu.other_share()))
            .chain(
                r.b.iter()
                    .flat_map(|row| row.windows.iter().map(|w| w.cpu.other_share())),
            )
            .chain(r.c.iter().map(|row| row.cpu.other_share()))
            .collect();
    if !others.is_empty() {
        let mean = others.iter().sum::<f64>() / others.len() as f64;
        let max = others.iter().copied().fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "- other users of the machine during the measured windows: {:.0}% of all CPUs on \
             average, {:.0}% at most{}",
            100.0 * mean,
            100.0 * max,
            if mean > 0.05 {
                " — **the numbers are disturbed by them; compare ratios, and prefer the \
                 \"bench CPU\" columns, which leave them out**"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "\nEverything shares this machine's CPUs: load generator and backend (router-bench, \
         tokio), the proxy under test, and the kernel. All traffic is on 127.0.0.1. \
         \"system CPU\" is all CPUs' busy time from /proc/stat (user, nice, system, irq, \
         softirq; not idle, iowait or steal), so kernel work counts wherever it runs: \
         sockmap's redirects run in softirq context, mostly charged to the *sending* \
         process (the backend), so a proxy's own CPU alone would flatter it. \"proxy CPU\" \
         is the proxy's process tree (nginx master and workers, or router-daemon), from \
         /proc/<pid>/task/*/schedstat."
    );
    let _ = writeln!(
        out,
        "\nEvery system is measured with kept-alive client connections (how clients use \
         them; the router routes each request of such a connection on its own prompt and \
         reuses pooled backend connections, as nginx does) and, to separate connection \
         set-up from proxying, also with a new connection per request. Ratios use the \
         keep-alive rows. Added latency is over direct keep-alive unless said otherwise.\n"
    );

    summary(&mut out, &v);
    targets(&mut out, &v);
    default_choice(&mut out, &v);
    case_a(&mut out, &v);
    case_b(&mut out, &v);
    case_c(&mut out, &v);

    if !r.notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n");
        for note in &r.notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    let _ = writeln!(out, "\n## Processes\n");
    for cmd in &r.commands {
        let _ = writeln!(out, "- {cmd}");
    }
    if let Some(config) = &r.nginx_config {
        let _ = writeln!(
            out,
            "\n<details><summary>nginx configuration</summary>\n\n```nginx\n{}\n```\n</details>",
            config.trim_end()
        );
    }
    out
}

fn summary(out: &mut String, v: &View<'_>) {
    let plan = &v.r.plan;
    let routers = v.routers();
    let mut kinds: Vec<Kind> = routers.iter().map(|&dp| Kind::Router(dp)).collect();
    kinds.push(Kind::Nginx);
    kinds.push(Kind::Direct);
    let _ = writeln!(out, "## Ratios\n");
    let _ = write!(out, "| metric |");
    for kind in &kinds {
        let _ = write!(out, " {} |", kind.label());
    }
    let _ = write!(out, "\n|---|");
    for _ in &kinds {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out);
    let mut row = |name: String, cell: &dyn Fn(Kind) -> String| {
        let _ = write!(out, "| {name} |");
        for &kind in &kinds {
            let _ = write!(out, " {} |", cell(kind));
        }
        let _ = writeln!(out);
    };
    if !v.r.a.is_empty() {
        for &c in &plan.levels {
            let nginx = v.a_used(Kind::Nginx, c);
            row(format!("(a) req/s ÷ nginx, {c} conns"), &|k| {
                ratio(v.a_used(k, c).map(|w| w.rps), nginx.map(|w| w.rps))
            });
        }
        for &c in &plan.levels {
            let nginx = v.a_used(Kind::Nginx, c).map(|w| per_k(w).proxy);
            row(
                format!("(a) proxy CPU per request ÷ nginx, {c} conns"),
                &|k| {
                    if k == Kind::Direct {
                        "–".into()
                    } else {
                        ratio(v.a_used(k, c).map(|w| per_k(w).proxy), nginx)
                    }
                },
            );
        }
        for &c in &plan.levels {
            let nginx = v.a_used(Kind::Nginx, c).map(|w| per_k(w).system);
            row(
                format!("(a) system CPU per request ÷ nginx, {c} conns"),
                &|k| ratio(v.a_used(k, c).map(|w| per_k(w).system), nginx),
            );
        }
        for &c in &plan.levels {
            row(
                format!("(a) added p50 / p99 over direct, ms, {c} conns"),
                &|k| {
                    v.added_a(k, c).map_or_else(
                        || "–".into(),
                        |(p50, p99)| format!("{} / {}", ms_diff(p50), ms_diff(p99)),
                    )
                },
            );
        }
    }
    if !v.r.b.is_empty() {
        let nginx = v.b(Kind::Nginx).map(WindowB::host_us_per_event);
        row("(b) system CPU per event ÷ nginx".into(), &|k| {
            ratio(v.b(k).map(WindowB::host_us_per_event), nginx)
        });
        let nginx_extra = v.extra_cpu_b(Kind::Nginx);
        row(
            "(b) CPU per event added over direct ÷ nginx's".into(),
            &|k| {
                if k == Kind::Direct {
                    "–".into()
                } else {
                    ratio(v.extra_cpu_b(k), nginx_extra)
                }
            },
        );
        let nginx_bench = v.b(Kind::Nginx).map(WindowB::bench_us_per_event);
        row(
            "(b) bench CPU per event ÷ nginx (other users of the machine left out)".into(),
            &|k| ratio(v.b(k).map(WindowB::bench_us_per_event), nginx_bench),
        );
        row("(b) added p99 event latency over direct, ms".into(), &|k| {
            v.added_b(k)
                .map_or_else(|| "–".into(), |(_, p99)| ms_diff(p99))
        });
    }
    if !v.r.c.is_empty() {
        let nginx = v.mbps(Kind::Nginx);
        row(
            format!(
                "(c) {} MB throughput ÷ nginx (buffered)",
                plan.bulk_bytes / 1_000_000
            ),
            &|k| ratio(v.mbps(k), nginx),
        );
        let nginx_cpu = v.cpu_c(Kind::Nginx);
        row(
            "(c) system CPU per response ÷ nginx (buffered)".into(),
            &|k| ratio(v.cpu_c(k), nginx_cpu),
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn targets(out: &mut String, v: &View<'_>) {
    let plan = &v.r.plan;
    let _ = writeln!(out, "\n## Targets (from the benchmarks issue)\n");
    let nginx_missing = v.r.a.iter().all(|row| row.kind != Kind::Nginx)
        && v.r.b.iter().all(|row| row.kind != Kind::Nginx);
    if nginx_missing {
        let _ = writeln!(out, "nginx did not run: no target can be checked.");
        return;
    }
    for dp in v.routers() {
        let kind = Kind::Router(dp);
        let _ = writeln!(out, "**{}**", kind.label());
        if !v.r.a.is_empty() {
            for &c in &plan.levels {
                let (Some(w), Some(n)) = (v.a_used(kind, c), v.a_used(Kind::Nginx, c)) else {
                    let _ = writeln!(out, "- (a) {c} conns: no numbers");
                    continue;
                };
                let rps = w.rps / n.rps.max(f64::MIN_POSITIVE);
                let cpu = per_k(w).proxy;
                let ncpu = per_k(n).proxy;
                let _ = writeln!(
                    out,
                    "- (a) {c} conns: throughput {rps:.2}× nginx (≥ 1.0): {}; proxy CPU \
                     {cpu:.1} vs nginx {ncpu:.1} ms/1k req (≤): {}",
                    verdict(rps >= 1.0),
                    verdict(cpu <= ncpu)
                );
                if let (Some((p50, p99)), Some((n50, n99))) =
                    (v.added_a(kind, c), v.added_a(Kind::Nginx, c))
                {
                    let _ = writeln!(
                        out,
                        "- (a) {c} conns: added latency p50 {} / p99 {} ms vs nginx's {} / {} \
                         (no worse): {}",
                        ms_diff(p50),
                        ms_diff(p99),
                        ms_diff(n50),
                        ms_diff(n99),
                        verdict(p50 <= n50 && p99 <= n99)
                    );
                }
            }
        }
        if !v.r.b.is_empty() {
            if let (Some(w), Some(n)) = (v.b(kind), v.b(Kind::Nginx)) {
                let x = w.host_us_per_event() / n.host_us_per_event().max(f64::MIN_POSITIVE);
                let y = w.bench_us_per_event() / n.bench_us_per_event().max(f64::MIN_POSITIVE);
                let _ = writeln!(
                    out,
                    "- (b) system CPU per event {:.1} vs nginx {:.1} µs = {x:.2}× (≤ 0.7× for \
                     the default): {}; without other users of the machine {:.1} vs {:.1} µs = \
                     {y:.2}×: {}",
                    w.host_us_per_event(),
                    n.host_us_per_event(),
                    verdict(x <= 0.7),
                    w.bench_us_per_event(),
                    n.bench_us_per_event(),
                    verdict(y <= 0.7)
                );
            } else {
                let _ = writeln!(out, "- (b): no numbers");
            }
        }
        let _ = writeln!(out);
    }
    // Each kernel dataplane against the userspace dataplanes on (b).
    let measures: [(&str, Measure); 2] = [
        ("system", WindowB::host_us_per_event),
        ("bench (no other users)", WindowB::bench_us_per_event),
    ];
    for kernel in [Dataplane::Sockmap, Dataplane::SockmapSend] {
        kernel_vs_userspace(out, v, kernel, &measures);
    }
}

/// One line per measure: `kernel`'s CPU per event on (b) against the best
/// userspace dataplane's.
fn kernel_vs_userspace(
    out: &mut String,
    v: &View<'_>,
    kernel: Dataplane,
    measures: &[(&str, Measure)],
) {
    for &(name, measure) in measures {
        let Some(s) = v.b(Kind::Router(kernel)).map(measure) else {
            break;
        };
        let others: Vec<(Dataplane, f64)> = [Dataplane::Splice, Dataplane::Userspace]
            .into_iter()
            .filter_map(|dp| v.b(Kind::Router(dp)).map(|w| (dp, measure(w))))
            .collect();
        if others.is_empty() {
            break;
        }
        let best = others.iter().map(|(_, x)| *x).fold(f64::INFINITY, f64::min);
        let parts: Vec<String> = others
            .iter()
            .map(|(dp, x)| format!("{} {x:.1}", dp.as_str()))
            .collect();
        let kernel = kernel.as_str();
        let _ = writeln!(
            out,
            "- {kernel} vs the userspace dataplanes on (b), {name} CPU per event: {kernel} \
             {s:.1} µs, {} → {kernel} {} ({:+.0}% vs the best of them).",
            parts.join(", "),
            if s < best {
                "is cheaper"
            } else {
                "does NOT beat them"
            },
            100.0 * (s / best - 1.0)
        );
    }
}

/// A CPU-per-event measure of a case (b) run.
type Measure = fn(&WindowB) -> f64;

/// A ranking of dataplanes: the pick, every score (lowest first), and
/// those tied with the lowest.
type Ranking = (Dataplane, Vec<(Dataplane, f64)>, Vec<Dataplane>);

fn default_choice(out: &mut String, v: &View<'_>) {
    let _ = writeln!(out, "\n## Default dataplane suggested by these numbers\n");
    let top = v.r.a.iter().map(|row| row.conns).max();
    let rps = |dp: Dataplane| {
        top.and_then(|c| v.a_used(Kind::Router(dp), c))
            .map(|w| w.rps)
    };
    // Ranks by a CPU-per-event measure: the lowest wins, and within 5% of
    // it the best case (a) throughput at the highest level.
    let rank = |measure: Measure| -> Option<Ranking> {
        let mut scored: Vec<(Dataplane, f64)> = v
            .routers()
            .into_iter()
            .filter_map(|dp| v.b(Kind::Router(dp)).map(|w| (dp, measure(w))))
            .collect();
        scored.sort_by(|x, y| x.1.total_cmp(&y.1));
        let &(best, best_cpu) = scored.first()?;
        let close: Vec<Dataplane> = scored
            .iter()
            .filter(|(_, cpu)| *cpu <= best_cpu * 1.05)
            .map(|(dp, _)| *dp)
            .collect();
        // `close` is sorted by CPU: without (a) numbers the lowest stays.
        let pick = close
            .iter()
            .copied()
            .filter(|dp| rps(*dp).is_some())
            .max_by(|x, y| rps(*x).unwrap_or(0.0).total_cmp(&rps(*y).unwrap_or(0.0)))
            .unwrap_or(best);
        Some((pick, scored, close))
    };
    let (Some(system), Some(bench)) = (
        rank(WindowB::host_us_per_event),
        rank(WindowB::bench_us_per_event),
    ) else {
        let _ = writeln!(
            out,
            "Case (b) did not run for any dataplane: no suggestion."
        );
        return;
    };
    let listing = |scored: &[(Dataplane, f64)]| {
        scored
            .iter()
            .map(|(dp, cpu)| format!("{} {cpu:.1} µs", dp.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "**{}**. Rule: the lowest CPU per SSE event in case (b) (streaming is the router's \
         main load), dataplanes within 5% of the lowest counted as tied and the tie broken by \
         case (a) throughput at {} connections. System CPU per event: {}; without other users \
         of the machine: {}.",
        bench.0.as_str(),
        top.map_or_else(|| "the highest".into(), |c| c.to_string()),
        listing(&system.1),
        listing(&bench.1),
    );
    if system.0 != bench.0 {
        let _ = writeln!(
            out,
            "\nSystem-wide CPU alone would pick {}: other users of the machine were busy \
             during the windows (see \"others\" in case b), so the pick uses system CPU less \
             their processes.",
            system.0.as_str()
        );
    }
    if bench.2.len() > 1 {
        let tied: Vec<String> = bench
            .2
            .iter()
            .map(|dp| match rps(*dp) {
                Some(rps) => format!("{} ({rps:.0} req/s in case a)", dp.as_str()),
                None => dp.as_str().to_owned(),
            })
            .collect();
        let after = if bench.2.iter().any(|dp| rps(*dp).is_some()) {
            ""
        } else {
            "; case (a) did not run, so the lowest CPU per event stays"
        };
        let _ = writeln!(out, "\nTied on (b): {}{after}.", tied.join(", "));
    }
}

fn case_a(out: &mut String, v: &View<'_>) {
    if v.r.a.is_empty() {
        return;
    }
    let plan = &v.r.plan;
    let _ = writeln!(
        out,
        "\n## (a) Small requests\n\nPOST /v1/completions, ~2.1 KB body (a 1,500-character prompt \
         prefix shared by all requests plus one of 64 500-character suffixes), fixed ~330-byte \
         JSON answer. Closed loop: each connection sends its next request when the previous \
         answer is complete. {:.1} s warm-up, then {} window(s) of {:.1} s per row{}. Latency: \
         from the request's start (its connect, for new connections) to the answer's last byte. \
         CPU columns: ms of CPU per 1,000 requests.\n",
        plan.warmup.as_secs_f64(),
        plan.repeat,
        plan.window.as_secs_f64(),
        if plan.repeat > 1 {
            " (the window with the median req/s is shown, min–max in brackets)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| system | client conn | conns | req/s | ÷ nginx | p50 ms | p99 ms | added p50 / p99 ms \
         | proxy CPU | system CPU | bench CPU | backend | load-gen | kernel threads | host busy % \
         (others, steal) | split | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for row in &v.r.a {
        let mode = if row.keep_alive { "keep-alive" } else { "new" };
        let Some(w) = median_a(row) else {
            let _ = writeln!(
                out,
                "| {} | {mode} | {} | FAILED: {} |||||||||||||",
                row.kind.label(),
                row.conns,
                row.failed
                    .as_deref()
                    .unwrap_or("no window")
                    .replace('|', "/")
            );
            continue;
        };
        let range = if row.windows.len() > 1 {
            let min = row
                .windows
                .iter()
                .map(|w| w.rps)
                .fold(f64::INFINITY, f64::min);
            let max = row.windows.iter().map(|w| w.rps).fold(0.0, f64::max);
            format!(" ({min:.0}–{max:.0})")
        } else {
            String::new()
        };
        let nginx = v.a_used(Kind::Nginx, row.conns).map(|w| w.rps);
        let direct = v.a(Kind::Direct, true, row.conns);
        let added = direct.map_or_else(
            || "–".into(),
            |d| {
                format!(
                    "{} / {}",
                    ms_diff(w.p50_us as f64 - d.p50_us as f64),
                    ms_diff(w.p99_us as f64 - d.p99_us as f64)
                )
            },
        );
        let k = per_k(w);
        let proxy = if row.kind == Kind::Direct {
            "–".into()
        } else {
            format!("{:.1}", k.proxy)
        };
        let _ = writeln!(
            out,
            "| {} | {mode} | {} | {:.0}{range} | {} | {} | {} | {added} | {proxy} | {:.1} | {:.1} \
             | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            row.kind.label(),
            row.conns,
            w.rps,
            ratio(Some(w.rps), nginx),
            ms(w.p50_us),
            ms(w.p99_us),
            k.system,
            k.bench,
            k.backend,
            k.loadgen,
            k.kernel,
            busy(&w.cpu),
            row.split,
            if w.slow_connects > 0 {
                format!(
                    "{}; {} connects ≥ 1 s (SYN retransmitted)",
                    w.errors.describe(),
                    w.slow_connects
                )
            } else {
                w.errors.describe()
            }
        );
    }
    let _ = writeln!(
        out,
        "\nCPU columns are ms per 1,000 requests: proxy = the proxy's processes; system = all \
         CPUs' busy time (/proc/stat); bench = system less other users' processes \
         (so: proxy, backend, load generator and all kernel work). host busy: share of all \
         CPUs busy, of which other users' processes and hypervisor steal.\n\n\
         split: each backend's share of the completions it answered during the row (the \
         router routes by prefix, and every request shares one, so one backend takes them \
         all; nginx round-robins)."
    );
}

fn case_b(out: &mut String, v: &View<'_>) {
    if v.r.b.is_empty() {
        return;
    }
    let plan = &v.r.plan;
    let _ = writeln!(
        out,
        "\n## (b) Concurrent SSE streams\n\n{} streams on their own connections, started evenly \
         over {:.0} s; each is {} events of {EVENT_BYTES} bytes (one chunk and one write each) \
         at {} per second. Measured over a {:.0} s window once all run. Event latency: receive \
         time − the send time the backend wrote into the event (CLOCK_MONOTONIC, one machine). \
         nginx: the `proxy_buffering off` listener.{}\n",
        plan.streams,
        plan.ramp.as_secs_f64(),
        plan.stream_events(),
        plan.chunk_rate,
        plan.stream_window.as_secs_f64(),
        if plan.repeat > 1 {
            " The run with the median system CPU per event is shown, min–max in brackets; \
             *added p50 / p99* are the medians over all runs of each system, less direct's, \
             and *p99 per run* lists every run's."
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "| system | events/s | p50 ms | p99 ms | p99.9 ms | added p50 / p99 ms | p99 per run ms \
         | system CPU µs/event | ÷ nginx | added over direct | bench CPU µs/event | ÷ nginx | proxy \
         | backend | load-gen | kernel threads | host busy % (others, steal) | complete streams \
         | errors |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let nginx_bench = v.b(Kind::Nginx).map(WindowB::bench_us_per_event);
    let nginx = v.b(Kind::Nginx).map(WindowB::host_us_per_event);
    for row in &v.r.b {
        let Some(w) = median_b(row) else {
            let _ = writeln!(
                out,
                "| {} | FAILED: {} |||||||||||||||||",
                row.kind.label(),
                row.failed.as_deref().unwrap_or("no run").replace('|', "/")
            );
            continue;
        };
        let range = if row.windows.len() > 1 {
            let xs: Vec<f64> = row.windows.iter().map(WindowB::host_us_per_event).collect();
            let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = xs.iter().copied().fold(0.0, f64::max);
            format!(" ({min:.1}–{max:.1})")
        } else {
            String::new()
        };
        let added = v.added_b(row.kind).map_or_else(
            || "–".into(),
            |(p50, p99)| format!("{} / {}", ms_diff(p50), ms_diff(p99)),
        );
        let per_run = row
            .windows
            .iter()
            .map(|w| format!("{:.1}", w.p99_us as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(" ");
        let extra = if row.kind == Kind::Direct {
            "–".into()
        } else {
            opt(v.extra_cpu_b(row.kind), 1)
        };
        let proxy = if row.kind == Kind::Direct {
            "–".into()
        } else {
            format!("{:.1}", w.proxy_us_per_event())
        };
        let each = |ns: u64| per_event(ns, w.events);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {} | {added} | {per_run} | {:.1}{range} | {} | {extra} | \
             {:.1} | {} | {proxy} | {:.1} | {:.1} | {:.1} | {} | {} / {} | {} |",
            row.kind.label(),
            w.events_per_sec,
            ms(w.p50_us),
            ms(w.p99_us),
            ms(w.p999_us),
            w.host_us_per_event(),
            ratio(Some(w.host_us_per_event()), nginx),
            w.bench_us_per_event(),
            ratio(Some(w.bench_us_per_event()), nginx_bench),
            each(w.cpu.backend_ns),
            each(w.cpu.loadgen_ns),
            each(w.cpu.kernel_ns),
            busy(&w.cpu),
            w.complete,
            plan.streams,
            w.errors.describe()
        );
    }
    let _ = writeln!(
        out,
        "\nCPU columns are µs per event. system CPU: all CPUs' busy time in the window ÷ events \
         received in it (backend and load generator included: they are the same work for every \
         system, see \"added over direct\"). bench CPU: the same less other users' processes \
         (so: proxy, backend, load generator and all kernel work, softirq included)."
    );
}

fn case_c(out: &mut String, v: &View<'_>) {
    if v.r.c.is_empty() {
        return;
    }
    let plan = &v.r.plan;
    let mb = plan.bulk_bytes / 1_000_000;
    let _ = writeln!(
        out,
        "\n## (c) One {mb} MB response\n\nOne request at a time on a new connection, timed from \
         connect to the last byte; 1 warm-up and {} measured transfers per system, the systems \
         taking turns. MB = 10^6 bytes. CPU: ms per {mb} MB response, summed over the measured \
         transfers. nginx runs twice: with its default response buffering (the baseline of the \
         ratios) and with `proxy_buffering off` (as for streaming, case b).\n",
        plan.bulk_reps
    );
    let _ = writeln!(
        out,
        "| system | MB/s (median) | min–max | ÷ nginx | ÷ direct | system CPU ms | ÷ nginx | bench \
         CPU ms | proxy | backend | load-gen | kernel threads | host busy % (others, steal) | \
         errors |"
    );
    let _ = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    );
    let nginx = v.mbps(Kind::Nginx);
    let direct = v.mbps(Kind::Direct);
    let nginx_cpu = v.cpu_c(Kind::Nginx);
    for row in &v.r.c {
        let errors = match &row.first_error {
            Some(err) => format!("{} ({})", row.errors, err.replace('|', "/")),
            None => row.errors.to_string(),
        };
        let Some(rate) = v.mbps(row.kind) else {
            let _ = writeln!(
                out,
                "| {} | FAILED |||||||||||| {errors} |",
                row.kind.label()
            );
            continue;
        };
        let min = row.mb_per_sec.iter().copied().fold(f64::INFINITY, f64::min);
        let max = row.mb_per_sec.iter().copied().fold(0.0, f64::max);
        let responses = (row.bytes as f64 / plan.bulk_bytes as f64).max(f64::MIN_POSITIVE);
        let each = |ns: u64| ns as f64 / 1e6 / responses;
        let proxy = if row.kind == Kind::Direct {
            "–".into()
        } else {
            format!("{:.1}", each(row.cpu.proxy_ns))
        };
        let _ = writeln!(
            out,
            "| {} | {rate:.0} | {min:.0}–{max:.0} | {} | {} | {} | {} | {:.1} | {proxy} | {:.1} | \
             {:.1} | {:.1} | {} | {errors} |",
            row.kind.label(),
            ratio(Some(rate), nginx),
            ratio(Some(rate), direct),
            opt(v.cpu_c(row.kind), 1),
            ratio(v.cpu_c(row.kind), nginx_cpu),
            row.cpu.bench_secs() * 1e3 / responses,
            each(row.cpu.backend_ns),
            each(row.cpu.loadgen_ns),
            each(row.cpu.kernel_ns),
            busy(&row.cpu),
        );
    }
}

/// `ns` per event, in µs.
fn per_event(ns: u64, events: u64) -> f64 {
    if events == 0 {
        0.0
    } else {
        ns as f64 / 1e3 / events as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(ms(250), "0.250");
        assert_eq!(ms(2500), "2.50");
        assert_eq!(ms(25_000), "25.0");
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50×");
        assert_eq!(ratio(Some(1.0), None), "–");
        assert_eq!(median(&[1.0, 2.0, 10.0]), Some(2.0));
        assert_eq!(median(&[1.0, 3.0]), Some(2.0));
        assert_eq!(median(&[]), None);
    }

    /// A case (b) window with these latencies and `events` events.
    fn window_b(p50_us: u64, p99_us: u64) -> WindowB {
        WindowB {
            events_per_sec: 0.0,
            events: 1000,
            p50_us,
            p99_us,
            p999_us: p99_us,
            complete: 0,
            errors: crate::client::Errors::default(),
            cpu: crate::run::Cpu::default(),
        }
    }

    #[test]
    fn added_latency_is_the_median_of_every_window_not_the_median_cpu_one() {
        let row = RowB {
            kind: Kind::Nginx,
            windows: vec![window_b(500, 8000), window_b(900, 400), window_b(700, 2600)],
            failed: None,
        };
        assert_eq!(median_latency(&row), Some((700.0, 2600.0)));
        let failed = RowB {
            failed: Some("no run".into()),
            ..row
        };
        assert_eq!(median_latency(&failed), None);
    }
}
