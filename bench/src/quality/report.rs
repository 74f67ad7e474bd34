//! The routing-quality report: one table per workload (hit rate against
//! the workload's ideal, TTFT against round-robin, load balance,
//! throughput, the router process's CPU time and peak memory), in
//! markdown.
use std::{collections::HashMap, fmt::Write as _, time::Duration};

use super::{load::Samples, run::Outcome, workload::Ideal};

/// One router's numbers on one workload.
#[derive(Clone, Debug)]
pub struct Row {
    /// The router's name.
    pub router: String,
    /// Successful requests.
    pub requests: usize,
    /// Failed requests.
    pub errors: u64,
    /// Σ prompt tokens (from usage).
    pub prompt_tokens: u64,
    /// Σ cached tokens (from usage).
    pub cached_tokens: u64,
    /// Mean TTFT, ms.
    pub ttft_mean_ms: f64,
    /// Median TTFT, ms.
    pub ttft_p50_ms: f64,
    /// 99th percentile TTFT, ms.
    pub ttft_p99_ms: f64,
    /// Mean end-to-end latency, ms.
    pub e2e_mean_ms: f64,
    /// Requests per backend, in fleet order.
    pub loads: Vec<u64>,
    /// Completed requests per second.
    pub req_per_s: f64,
    /// Every TTFT, ms, ascending (for the CDF plot).
    pub ttft_sorted_ms: Vec<f64>,
    /// The router processes' CPU time during the run, s (`None`: not a
    /// process).
    pub cpu_s: Option<f64>,
    /// The router processes' peak resident set, MiB.
    pub peak_rss_mib: Option<f64>,
    /// Each backend's running + waiting requests over the run.
    pub load: Samples,
    /// router-daemon's decisions by reason, most frequent first (empty for
    /// other routers).
    pub decisions: Vec<(String, u64)>,
    /// router-daemon's mean time from a request written to an engine to its
    /// first token, as it saw it, ms (`None` for other routers).
    pub engine_ttft_ms: Option<f64>,
    /// How late the simulators' steps ended on average, ms: what the host
    /// added to the engines' own times (see [`vllm_sim::engine::Lateness`]).
    pub sims_late_ms: f64,
    /// Why the run failed as a whole (no numbers then).
    pub failure: Option<String>,
}

impl Row {
    /// Summarises a run.
    pub fn new(router: &str, outcome: &Outcome) -> Self {
        let records = &outcome.records;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut ttft = records.iter().map(|r| ms(r.ttft)).collect::<Vec<_>>();
        ttft.sort_by(f64::total_cmp);
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let e2e = records.iter().map(|r| ms(r.e2e)).collect::<Vec<_>>();
        let mut by_id: HashMap<&str, u64> = HashMap::new();
        for r in records {
            *by_id.entry(r.served_by.as_str()).or_default() += 1;
        }
        let loads = outcome
            .backend_ids
            .iter()
            .map(|id| by_id.get(id.as_str()).copied().unwrap_or(0))
            .collect();
        let secs = outcome.elapsed.as_secs_f64();
        Row {
            router: router.to_owned(),
            requests: records.len(),
            errors: outcome.errors,
            prompt_tokens: records.iter().map(|r| r.prompt_tokens).sum(),
            cached_tokens: records.iter().map(|r| r.cached_tokens).sum(),
            ttft_mean_ms: mean(&ttft),
            ttft_p50_ms: quantile(&ttft, 0.5),
            ttft_p99_ms: quantile(&ttft, 0.99),
            e2e_mean_ms: mean(&e2e),
            loads,
            req_per_s: if secs > 0.0 {
                records.len() as f64 / secs
            } else {
                0.0
            },
            ttft_sorted_ms: ttft,
            cpu_s: outcome.usage.map(|u| u.cpu.as_secs_f64()),
            peak_rss_mib: outcome
                .usage
                .map(|u| u.peak_rss_bytes as f64 / (1 << 20) as f64),
            load: outcome.load.clone(),
            decisions: outcome.decisions.clone(),
            engine_ttft_ms: outcome.engine_ttft.map(ms),
            sims_late_ms: match outcome.sims_late.steps {
                0 => 0.0,
                steps => ms(outcome.sims_late.late) / steps as f64,
            },
            failure: None,
        }
    }

    /// One row for several runs of a router on the same workload and level
    /// (windows): each figure is the median of the runs' (for an even
    /// count, the lower of the middle two); what cannot be a median (the
    /// per-backend split, the CDF, the load samples, the decisions) is the
    /// run of the median mean TTFT's. Errors add up over the runs, so one
    /// failure in any shows; a run that failed as a whole makes the row
    /// failed.
    ///
    /// # Panics
    /// On no runs: a level runs every router at least once.
    pub fn median(mut runs: Vec<Row>) -> Row {
        assert!(!runs.is_empty(), "a level runs every router at least once");
        if let Some(failed) = runs.iter().position(|r| r.failure.is_some()) {
            return runs.swap_remove(failed);
        }
        let errors = runs.iter().map(|r| r.errors).sum();
        let of = |f: fn(&Row) -> f64| {
            let mut v = runs.iter().map(f).collect::<Vec<_>>();
            v.sort_by(f64::total_cmp);
            v[(v.len() - 1) / 2]
        };
        let opt = |f: fn(&Row) -> Option<f64>| {
            let mut v = runs.iter().filter_map(f).collect::<Vec<_>>();
            v.sort_by(f64::total_cmp);
            v.get(v.len().saturating_sub(1) / 2).copied()
        };
        let ttft_mean_ms = of(|r| r.ttft_mean_ms);
        let ttft_p50_ms = of(|r| r.ttft_p50_ms);
        let ttft_p99_ms = of(|r| r.ttft_p99_ms);
        let e2e_mean_ms = of(|r| r.e2e_mean_ms);
        let req_per_s = of(|r| r.req_per_s);
        let cached_tokens = of(|r| r.cached_tokens as f64) as u64;
        let cpu_s = opt(|r| r.cpu_s);
        let peak_rss_mib = opt(|r| r.peak_rss_mib);
        let engine_ttft_ms = opt(|r| r.engine_ttft_ms);
        let sims_late_ms = of(|r| r.sims_late_ms);
        let middle = runs
            .iter()
            .position(|r| r.ttft_mean_ms == ttft_mean_ms)
            .expect("the median is one of the runs' values");
        Row {
            errors,
            cached_tokens,
            ttft_mean_ms,
            ttft_p50_ms,
            ttft_p99_ms,
            e2e_mean_ms,
            req_per_s,
            cpu_s,
            peak_rss_mib,
            engine_ttft_ms,
            sims_late_ms,
            ..runs.swap_remove(middle)
        }
    }

    /// A router that could not be run on this workload.
    pub fn failed(router: &str, why: String) -> Self {
        Row {
            router: router.to_owned(),
            requests: 0,
            errors: 0,
            prompt_tokens: 0,
            cached_tokens: 0,
            ttft_mean_ms: 0.0,
            ttft_p50_ms: 0.0,
            ttft_p99_ms: 0.0,
            e2e_mean_ms: 0.0,
            loads: Vec::new(),
            req_per_s: 0.0,
            ttft_sorted_ms: Vec::new(),
            cpu_s: None,
            peak_rss_mib: None,
            load: Samples::default(),
            decisions: Vec::new(),
            engine_ttft_ms: None,
            sims_late_ms: 0.0,
            failure: Some(why),
        }
    }

    /// Cached ÷ prompt tokens.
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.cached_tokens as f64 / self.prompt_tokens as f64
        }
    }

    /// The busiest backend's requests ÷ the mean per backend (1 is even).
    pub fn max_over_mean(&self) -> f64 {
        let total: u64 = self.loads.iter().sum();
        let max = self.loads.iter().copied().max().unwrap_or(0);
        if total == 0 {
            0.0
        } else {
            max as f64 * self.loads.len() as f64 / total as f64
        }
    }
}

/// The `q` quantile of sorted values (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One workload's results.
#[derive(Clone, Debug)]
pub struct Section {
    /// The workload's name.
    pub workload: String,
    /// The load level's short name (`c16`, `cap0.9 (…)`), when the run had
    /// several.
    pub level: Option<String>,
    /// Its parameters.
    pub description: String,
    /// Requests it sends.
    pub requests: usize,
    /// Its ideal hit rate.
    pub ideal: Ideal,
    /// KV-cache blocks per simulator.
    pub kv_blocks: usize,
    /// The working-set estimate, in blocks.
    pub working_set_blocks: usize,
    /// The simulators' ids, in fleet order.
    pub backends: Vec<String>,
    /// One row per router.
    pub rows: Vec<Row>,
    /// Failures and remarks.
    pub notes: Vec<String>,
}

/// The whole report.
#[derive(Clone, Debug)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// Machine and build lines.
    pub env: Vec<String>,
    /// Settings lines.
    pub settings: Vec<String>,
    /// Router command lines and how the baselines run.
    pub routers: Vec<String>,
    /// One per workload.
    pub sections: Vec<Section>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
    /// PNG file names (next to the report), or why there are none.
    pub plots: Result<Vec<String>, String>,
}

impl Section {
    /// The heading: the workload, and the level if any.
    pub fn title(&self) -> String {
        match &self.level {
            Some(level) => format!("{} · {level}", self.workload),
            None => self.workload.clone(),
        }
    }

    /// A file-name part: the workload, and the level's short name.
    pub fn slug(&self) -> String {
        match &self.level {
            Some(level) => {
                let short = level.split(' ').next().unwrap_or_default();
                format!("{}-{short}", self.workload)
            }
            None => self.workload.clone(),
        }
    }
}

/// The workloads of `r`, in order of first appearance.
pub fn workloads(r: &Report) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in &r.sections {
        if !out.contains(&s.workload) {
            out.push(s.workload.clone());
        }
    }
    out
}

/// A router's mean TTFT (ms) at each level of a workload, None where it
/// failed or did not run.
pub type LevelSeries = (String, Vec<Option<f64>>);

/// For one workload: its levels in order, and each router's series.
pub fn ttft_by_level(r: &Report, workload: &str) -> (Vec<String>, Vec<LevelSeries>) {
    let sections: Vec<&Section> = r
        .sections
        .iter()
        .filter(|s| s.workload == workload)
        .collect();
    let levels = sections
        .iter()
        .map(|s| s.level.clone().unwrap_or_default())
        .collect();
    let mut series: Vec<LevelSeries> = Vec::new();
    for (i, s) in sections.iter().enumerate() {
        for row in &s.rows {
            let at = match series.iter().position(|(name, _)| *name == row.router) {
                Some(at) => at,
                None => {
                    series.push((row.router.clone(), vec![None; sections.len()]));
                    series.len() - 1
                }
            };
            if row.failure.is_none() {
                series[at].1[i] = Some(row.ttft_mean_ms);
            }
        }
    }
    (levels, series)
}

/// The summary across levels: per workload, each router's mean and p99
/// TTFT and hit rate (% of ideal) at each level.
fn render_levels(out: &mut String, r: &Report) {
    if !r.sections.iter().any(|s| s.level.is_some()) {
        return;
    }
    let _ = writeln!(
        out,
        "## TTFT against load

Mean / p99 TTFT in ms, and hit rate as % of the ideal, at each \
         level; the best mean and the best p99 of each level in bold. Each level's own \
         section below has every column.
"
    );
    for workload in workloads(r) {
        let sections: Vec<&Section> = r
            .sections
            .iter()
            .filter(|s| s.workload == workload)
            .collect();
        let _ = writeln!(
            out,
            "### {workload}
"
        );
        let mut head = "| router |".to_owned();
        let mut rule = "|---|".to_owned();
        for s in &sections {
            let _ = write!(head, " {} |", s.level.as_deref().unwrap_or("-"));
            rule.push_str("---|");
        }
        let _ = writeln!(
            out,
            "{head}
{rule}"
        );
        let mut routers: Vec<&str> = Vec::new();
        for s in &sections {
            for row in &s.rows {
                if !routers.contains(&row.router.as_str()) {
                    routers.push(&row.router);
                }
            }
        }
        for router in routers {
            let mut line = format!("| {router} |");
            for s in &sections {
                let ok = s.rows.iter().filter(|row| row.failure.is_none());
                let best_mean = ok
                    .clone()
                    .map(|row| row.ttft_mean_ms)
                    .fold(f64::INFINITY, f64::min);
                let best_p99 = ok.map(|row| row.ttft_p99_ms).fold(f64::INFINITY, f64::min);
                let cell = match s.rows.iter().find(|row| row.router == router) {
                    Some(row) if row.failure.is_none() => {
                        let bold = |v: f64, best: f64| {
                            if v <= best {
                                format!("**{v:.0}**")
                            } else {
                                format!("{v:.0}")
                            }
                        };
                        let ideal = s.ideal.hit_rate();
                        let hit = if ideal > 0.0 {
                            format!("{:.0}%", row.hit_rate() / ideal * 100.0)
                        } else {
                            "–".to_owned()
                        };
                        format!(
                            "{} / {} ({hit})",
                            bold(row.ttft_mean_ms, best_mean),
                            bold(row.ttft_p99_ms, best_p99)
                        )
                    }
                    Some(_) => "failed".to_owned(),
                    None => "–".to_owned(),
                };
                let _ = write!(line, " {cell} |");
            }
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
}

/// The name of the baseline TTFT ratios are taken against.
pub const BASELINE: &str = "round-robin";

/// Renders the report as markdown.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Routing quality: `router-bench quality`\n");
    let _ = writeln!(out, "`{}`\n", r.command);
    for line in &r.env {
        let _ = writeln!(out, "- {line}");
    }
    for line in &r.settings {
        let _ = writeln!(out, "- {line}");
    }
    let _ = writeln!(
        out,
        "- whole run: {:.1} s\n\n\
         **Columns.** *hit rate*: Σ cached ÷ Σ prompt tokens, from each response's \
         `usage.prompt_tokens_details.cached_tokens`; *% of ideal*: hit rate ÷ the workload's \
         ideal (every request replayed in order into one unbounded cache: the leading whole \
         16-token blocks an earlier request computed, prompt and reply); *TTFT*: request sent to \
         the first streamed token, at the client; *÷ RR*: mean TTFT ÷ round-robin's; *max/mean \
         load*: the busiest backend's requests (`x-served-by`) ÷ the mean per backend; *req/s*: \
         completed requests ÷ the run's wall time (closed loop: this is latency-bound); *router \
         CPU s*: utime + stime of the router's processes from the first request to the last \
         answer (`/proc/<pid>/stat`, 10 ms ticks); *peak RSS*: their `VmHWM`; both summed over \
         replicas, – for the client-side baselines, which have no process.\n",
        r.elapsed.as_secs_f64()
    );
    render_levels(&mut out, r);
    for s in &r.sections {
        let _ = writeln!(out, "## {}\n", s.title());
        let _ = writeln!(
            out,
            "{}. {} requests; ideal hit rate **{:.1}%** ({} of {} prompt tokens); working set \
             ≈ {} blocks, KV cache {} blocks per simulator.\n",
            s.description,
            s.requests,
            s.ideal.hit_rate() * 100.0,
            s.ideal.cached_tokens,
            s.ideal.prompt_tokens,
            s.working_set_blocks,
            s.kv_blocks
        );
        let baseline = s
            .rows
            .iter()
            .find(|row| row.router == BASELINE && row.failure.is_none())
            .map(|row| row.ttft_mean_ms);
        let _ = writeln!(
            out,
            "| router | hit rate | % of ideal | mean TTFT ms | p50 TTFT ms | p99 TTFT ms | TTFT ÷ RR | mean e2e ms | max/mean load | per backend | req/s | router CPU s | peak RSS MiB | ok/failed |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for row in &s.rows {
            if row.failure.is_some() {
                let _ = writeln!(
                    out,
                    "| {} | **failed** | – | – | – | – | – | – | – | – | – | – | – | 0/{} |",
                    row.router, s.requests
                );
                continue;
            }
            let opt = |v: Option<f64>, digits: usize| {
                v.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
            };
            let ideal = s.ideal.hit_rate();
            let of_ideal = if ideal > 0.0 {
                format!("{:.0}%", row.hit_rate() / ideal * 100.0)
            } else {
                "–".into()
            };
            let vs_rr = match baseline {
                Some(b) if b > 0.0 => format!("{:.2}", row.ttft_mean_ms / b),
                _ => "–".into(),
            };
            let loads = row
                .loads
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("/");
            let _ = writeln!(
                out,
                "| {} | {:.1}% | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.2} | {} | {:.1} | {} | {} | {}/{} |",
                row.router,
                row.hit_rate() * 100.0,
                of_ideal,
                row.ttft_mean_ms,
                row.ttft_p50_ms,
                row.ttft_p99_ms,
                vs_rr,
                row.e2e_mean_ms,
                row.max_over_mean(),
                loads,
                row.req_per_s,
                opt(row.cpu_s, 2),
                opt(row.peak_rss_mib, 0),
                row.requests,
                row.errors
            );
        }
        out.push('\n');
        let decided = s.rows.iter().filter(|row| !row.decisions.is_empty());
        let listed = decided.clone().count();
        for row in decided {
            let reasons = row
                .decisions
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect::<Vec<_>>()
                .join(" · ");
            let _ = writeln!(out, "- {} decisions: {reasons}", row.router);
        }
        // What the engines took of the daemon's TTFT, and what the hop did.
        let timed = s
            .rows
            .iter()
            .filter_map(|row| Some((row, row.engine_ttft_ms?)));
        let listed = listed + timed.clone().count();
        for (row, engines) in timed {
            let _ = writeln!(
                out,
                "- {} engines' TTFT as the router saw it: mean {engines:.1} ms (the hop and \
                 the client: {:.1} ms of the {:.1})",
                row.router,
                row.ttft_mean_ms - engines,
                row.ttft_mean_ms
            );
        }
        // What the host's CPUs added to every row's engines.
        let late = s
            .rows
            .iter()
            .filter(|row| row.failure.is_none())
            .map(|row| format!("{} {:.2}", row.router, row.sims_late_ms))
            .collect::<Vec<_>>();
        let listed = listed + usize::from(!late.is_empty());
        if !late.is_empty() {
            let _ = writeln!(
                out,
                "- simulators' steps ended late by, mean ms per step: {}",
                late.join(" · ")
            );
        }
        for note in &s.notes {
            let _ = writeln!(out, "- {note}");
        }
        if listed > 0 || !s.notes.is_empty() {
            out.push('\n');
        }
    }
    match &r.plots {
        Ok(files) if !files.is_empty() => {
            let _ = writeln!(out, "## Plots\n");
            for file in files {
                let _ = writeln!(out, "![{file}]({file})\n");
            }
        }
        Ok(_) => {}
        Err(why) => {
            let _ = writeln!(out, "Plots skipped: {why}.\n");
        }
    }
    let _ = writeln!(out, "## Routers\n");
    for line in &r.routers {
        let _ = writeln!(out, "- {line}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v = (1..=100).map(f64::from).collect::<Vec<_>>();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0], 0.99), 3.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn an_even_split_has_a_load_ratio_of_one() {
        let row = Row {
            router: "x".into(),
            requests: 8,
            errors: 0,
            prompt_tokens: 10,
            cached_tokens: 5,
            ttft_mean_ms: 1.0,
            ttft_p50_ms: 1.0,
            ttft_p99_ms: 1.0,
            e2e_mean_ms: 1.0,
            loads: vec![4, 4],
            req_per_s: 1.0,
            ttft_sorted_ms: vec![1.0],
            cpu_s: None,
            peak_rss_mib: None,
            load: Samples::default(),
            decisions: Vec::new(),
            engine_ttft_ms: None,
            sims_late_ms: 0.0,
            failure: None,
        };
        assert_eq!(row.max_over_mean(), 1.0);
        assert_eq!(row.hit_rate(), 0.5);
        let skewed = Row {
            loads: vec![8, 0],
            ..row
        };
        assert_eq!(skewed.max_over_mean(), 2.0);
    }

    #[test]
    fn several_runs_make_a_row_of_medians() {
        let run = |ttft: f64, p99: f64, cached: u64, errors: u64, loads: Vec<u64>| Row {
            router: "router-daemon".into(),
            requests: 8,
            errors,
            prompt_tokens: 100,
            cached_tokens: cached,
            ttft_mean_ms: ttft,
            ttft_p99_ms: p99,
            engine_ttft_ms: Some(ttft - 1.0),
            cpu_s: Some(ttft / 100.0),
            loads,
            ..Row::failed("router-daemon", String::new())
        };
        let mut runs = vec![
            run(90.0, 300.0, 50, 0, vec![8, 0]),
            run(50.0, 100.0, 70, 1, vec![4, 4]),
            run(60.0, 200.0, 60, 0, vec![5, 3]),
        ];
        for r in &mut runs {
            r.failure = None;
        }
        let row = Row::median(runs.clone());
        // Each figure is its own median: 60 of 50/60/90, 200 of
        // 100/200/300, 60% of 50/60/70, not one run's whole line.
        assert_eq!(row.ttft_mean_ms, 60.0);
        assert_eq!(row.ttft_p99_ms, 200.0);
        assert_eq!(row.hit_rate(), 0.6);
        assert_eq!(row.engine_ttft_ms, Some(59.0));
        assert_eq!(row.cpu_s, Some(0.6));
        // The split is the median run's, and an error in any run shows.
        assert_eq!(row.loads, vec![5, 3]);
        assert_eq!(row.errors, 1);
        // Two runs: the lower of the middle two.
        let two = Row::median(runs[..2].to_vec());
        assert_eq!((two.ttft_mean_ms, two.ttft_p99_ms), (50.0, 100.0));
        // One run is itself.
        assert_eq!(Row::median(runs[2..].to_vec()).loads, vec![5, 3]);
        // A run that failed as a whole fails the row.
        runs[1].failure = Some("exited".into());
        assert_eq!(Row::median(runs).failure.as_deref(), Some("exited"));
    }

    #[test]
    fn a_failed_router_is_a_row_and_baselines_have_no_process_numbers() {
        let ok = Row {
            failure: None,
            requests: 2,
            prompt_tokens: 10,
            loads: vec![1, 1],
            ..Row::failed(BASELINE, String::new())
        };
        let daemon = Row {
            router: "router-daemon".into(),
            cpu_s: Some(0.25),
            peak_rss_mib: Some(7.4),
            decisions: vec![("prefix-match".into(), 30), ("placed".into(), 2)],
            ttft_mean_ms: 45.6,
            engine_ttft_ms: Some(33.3),
            sims_late_ms: 0.5,
            ..ok.clone()
        };
        let report = Report {
            command: "x".into(),
            env: Vec::new(),
            settings: Vec::new(),
            routers: Vec::new(),
            sections: vec![Section {
                workload: "w".into(),
                level: None,
                description: "d".into(),
                requests: 2,
                ideal: Ideal::default(),
                kv_blocks: 1,
                working_set_blocks: 1,
                backends: vec!["sim-0".into(), "sim-1".into()],
                rows: vec![
                    ok,
                    daemon,
                    Row::failed("vllm-router cache_aware", "exited".into()),
                ],
                notes: Vec::new(),
            }],
            elapsed: Duration::from_secs(1),
            plots: Ok(Vec::new()),
        };
        let text = render(&report);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("| {name} |")))
                .unwrap_or_else(|| panic!("no row for {name}"))
                .to_owned()
        };
        assert!(line(BASELINE).ends_with("| – | – | 2/0 |"));
        assert!(line("router-daemon").ends_with("| 0.25 | 7 | 2/0 |"));
        let failed = line("vllm-router cache_aware");
        assert!(failed.contains("| **failed** |") && failed.ends_with("| 0/2 |"));
        // The daemon's decisions are listed under the table, in its order.
        assert!(
            text.contains("- router-daemon decisions: prefix-match 30 · placed 2\n"),
            "{text}"
        );
        assert!(!text.contains(&format!("- {BASELINE} decisions")));
        // And what its engines took of its TTFT.
        assert!(
            text.contains(
                "- router-daemon engines' TTFT as the router saw it: mean 33.3 ms (the hop and \
                 the client: 12.3 ms of the 45.6)\n"
            ),
            "{text}"
        );
        assert!(!text.contains(&format!("- {BASELINE} engines'")));
        // How late the simulators ran, for every row that ran.
        assert!(
            text.contains(&format!(
                "- simulators' steps ended late by, mean ms per step: {BASELINE} 0.00 · \
                 router-daemon 0.50\n"
            )),
            "{text}"
        );
        // Every row has as many cells as the header.
        let cells = |l: &str| l.matches('|').count();
        let header = text
            .lines()
            .find(|l| l.starts_with("| router |"))
            .expect("a header");
        for name in [BASELINE, "router-daemon", "vllm-router cache_aware"] {
            assert_eq!(cells(&line(name)), cells(header), "{name}");
        }
    }

    #[test]
    fn levels_are_summarised_with_the_best_of_each_level_in_bold() {
        let row = |router: &str, mean: f64, p99: f64| Row {
            router: router.into(),
            ttft_mean_ms: mean,
            ttft_p99_ms: p99,
            ..Row::failed(router, String::new())
        };
        let row = |router: &str, mean: f64, p99: f64| Row {
            failure: None,
            ..row(router, mean, p99)
        };
        let section = |level: &str, rows: Vec<Row>| Section {
            workload: "w".into(),
            level: Some(level.into()),
            description: "d".into(),
            requests: 2,
            ideal: Ideal::default(),
            kv_blocks: 1,
            working_set_blocks: 1,
            backends: vec!["sim-0".into()],
            rows,
            notes: Vec::new(),
        };
        let report = Report {
            command: "x".into(),
            env: Vec::new(),
            settings: Vec::new(),
            routers: Vec::new(),
            sections: vec![
                section("c4", vec![row(BASELINE, 50.0, 90.0), row("d", 30.0, 95.0)]),
                section(
                    "c64",
                    vec![
                        row(BASELINE, 200.0, 400.0),
                        Row::failed("d", "exited".into()),
                    ],
                ),
            ],
            elapsed: Duration::from_secs(1),
            plots: Ok(Vec::new()),
        };
        let text = render(&report);
        assert!(text.contains("## TTFT against load"), "{text}");
        assert!(text.contains("| router | c4 | c64 |"), "{text}");
        assert!(
            text.contains(&format!(
                "| {BASELINE} | 50 / **90** (–) | **200** / **400** (–) |"
            )),
            "{text}"
        );
        assert!(text.contains("| d | **30** / 95 (–) | failed |"), "{text}");
        assert!(text.contains("## w · c64"), "{text}");
        let (levels, series) = ttft_by_level(&report, "w");
        assert_eq!(levels, ["c4", "c64"]);
        assert_eq!(
            series,
            [
                (BASELINE.to_owned(), vec![Some(50.0), Some(200.0)]),
                ("d".to_owned(), vec![Some(30.0), None]),
            ]
        );
    }
}
