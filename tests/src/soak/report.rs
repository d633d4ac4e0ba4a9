//! The soak's verdict: the end snapshot against the baseline (the pass criteria), and the
//! connection figures sorted into hand-over windows and steady load. Printed as a table
//! for people and as one JSON line for quoting.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::snapshot::{Snapshot, FLOW_MAPS};
use super::workload::{Handover, RunRecord};

/// fds and threads may end this far above the baseline. The agent's tokio runtime keeps
/// idle blocking-pool threads for 10 s (the settle period outlasts that, but a sweep or
/// a file read just before the snapshot starts one anew), and each such thread or
/// in-flight admin request may hold a socket or an fd for a moment.
pub const FD_THREAD_SLACK: u64 = 4;
/// RSS may end 20 % or 16 MiB above the baseline, whichever is larger: the allocator
/// keeps freed pages mapped for reuse (glibc's arenas, one per thread that allocated),
/// so RSS after a burst stays near its high-water mark without anything being leaked.
pub const RSS_SLACK_RATIO: f64 = 0.20;
pub const RSS_SLACK_KIB: u64 = 16 * 1024;
/// A run that failed while a hand-over was going on, or up to this long after the old
/// agent exited, is counted in the hand-over window.
pub const WINDOW_TAIL_MS: u64 = 1_000;
/// A long-lived connection that broke at most this long before its old agent's drain
/// deadline (measured from the SIGTERM the soak sent) counts as ended by that deadline.
pub const DEADLINE_SLACK_MS: u64 = 150;

#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub baseline: String,
    pub end: String,
    pub limit: String,
    pub pass: bool,
}

fn check(name: &str, baseline: String, end: String, limit: &str, pass: bool) -> Check {
    Check {
        name: name.to_owned(),
        baseline,
        end,
        limit: limit.to_owned(),
        pass,
    }
}

fn show(v: Option<u64>) -> String {
    v.map_or("n/a".into(), |v| v.to_string())
}

/// The pass criteria: per-flow map entries back to the baseline exactly, the other maps,
/// the pins, the live records and the enrolled pods equal, fds and threads within
/// [`FD_THREAD_SLACK`], RSS within [`RSS_SLACK_RATIO`] or [`RSS_SLACK_KIB`], and every
/// old agent exited cleanly after its drain.
pub fn checks(base: &Snapshot, end: &Snapshot, handovers: &[Handover]) -> Vec<Check> {
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        base.maps.keys().chain(end.maps.keys()).collect();
    for name in names {
        let b = base.maps.get(name).copied().flatten();
        let e = end.maps.get(name).copied().flatten();
        let (what, limit) = if FLOW_MAPS.contains(&name.as_str()) {
            ("per-flow map", "= baseline")
        } else {
            ("pod/rule map", "= baseline (same pods)")
        };
        out.push(check(
            &format!("{what} {name} entries"),
            show(b),
            show(e),
            limit,
            b == e,
        ));
    }
    out.push(check(
        "bpffs pins",
        base.pins.len().to_string(),
        end.pins.len().to_string(),
        "same names",
        base.pins == end.pins,
    ));
    out.push(check(
        "config_dump datapath_records",
        base.datapath_records.to_string(),
        end.datapath_records.to_string(),
        "= baseline",
        base.datapath_records == end.datapath_records,
    ));
    out.push(check(
        "enrolled pods",
        base.enrolled_pods.len().to_string(),
        end.enrolled_pods.len().to_string(),
        "same pods",
        base.enrolled_pods == end.enrolled_pods,
    ));
    let fd_limit = base.fds as u64 + FD_THREAD_SLACK;
    out.push(check(
        "agent open fds",
        base.fds.to_string(),
        end.fds.to_string(),
        &format!("<= {fd_limit}"),
        end.fds as u64 <= fd_limit,
    ));
    let thread_limit = base.threads + FD_THREAD_SLACK;
    out.push(check(
        "agent threads",
        base.threads.to_string(),
        end.threads.to_string(),
        &format!("<= {thread_limit}"),
        end.threads <= thread_limit,
    ));
    let rss_limit = rss_limit_kib(base.rss_kib);
    out.push(check(
        "agent RSS (KiB)",
        base.rss_kib.to_string(),
        end.rss_kib.to_string(),
        &format!("<= {rss_limit}"),
        end.rss_kib <= rss_limit,
    ));
    let unclean: Vec<&Handover> = handovers
        .iter()
        .filter(|h| h.old_status != "exit status: 0")
        .collect();
    out.push(check(
        "old agents exited 0 after draining",
        "-".into(),
        format!("{} of {}", handovers.len() - unclean.len(), handovers.len()),
        "all",
        unclean.is_empty(),
    ));
    out
}

pub fn rss_limit_kib(base: u64) -> u64 {
    let ratio = (base as f64 * (1.0 + RSS_SLACK_RATIO)) as u64;
    ratio.max(base + RSS_SLACK_KIB)
}

/// Connection figures of one phase, split into hand-over windows and the rest.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub runs: u64,
    pub connections_ok: u64,
    pub resets: u64,
    pub errors_in_handover: u64,
    pub errors_outside: u64,
    pub error_kinds_in_handover: BTreeMap<String, u64>,
    pub error_kinds_outside: BTreeMap<String, u64>,
    pub long_lived: u64,
    /// Broken at their old agent's drain deadline: what a hand-over promises.
    pub long_ended_at_deadline: u64,
    pub long_broken_in_handover_early: u64,
    pub long_broken_outside: u64,
    pub long_broken_kinds: BTreeMap<String, u64>,
    pub harness_errors: u64,
    pub harness_examples: Vec<String>,
    pub pod_churns_ok: u64,
    pub pod_churns_failed: u64,
}

struct Window {
    from: u64,
    to: u64,
    deadline: u64,
}

fn windows(handovers: &[Handover], drain_ms: u64) -> Vec<Window> {
    handovers
        .iter()
        .map(|h| Window {
            from: h.launched_ms,
            to: h.exited_ms + WINDOW_TAIL_MS,
            deadline: h.sigterm_ms + drain_ms,
        })
        .collect()
}

/// Sums the records of `phase`. A failure with a time (`load` lists them) is in a window
/// when its time is; other runs' failures are when the run overlapped one.
pub fn totals(records: &[RunRecord], handovers: &[Handover], drain_ms: u64, phase: &str) -> Totals {
    let ws = windows(handovers, drain_ms);
    let at = |t: u64| ws.iter().any(|w| t >= w.from && t <= w.to);
    let overlaps = |a: u64, b: u64| ws.iter().any(|w| a <= w.to && b >= w.from);
    let mut t = Totals::default();
    for r in records.iter().filter(|r| r.phase == phase) {
        t.runs += 1;
        if r.kind == "churn-del" {
            if r.harness_error.is_none() {
                t.pod_churns_ok += 1;
            }
        } else if r.kind == "churn-add" && r.harness_error.is_some() {
            t.pod_churns_failed += 1;
        }
        if let Some(e) = &r.harness_error {
            t.harness_errors += 1;
            if t.harness_examples.len() < 5 {
                t.harness_examples
                    .push(format!("{} {}: {}", r.worker, r.kind, first_line(e)));
            }
        }
        t.connections_ok += r.ok;
        t.resets += r.resets;
        if !r.failure_times.is_empty() {
            for (when, kind) in &r.failure_times {
                t.add_error(at(*when), kind, 1);
            }
            let rest = r.errors.saturating_sub(r.failure_times.len() as u64);
            if rest > 0 {
                t.add_error(
                    overlaps(r.start_ms, r.end_ms),
                    "(not listed by tb-pod)",
                    rest,
                );
            }
        } else {
            for (kind, n) in &r.error_kinds {
                t.add_error(overlaps(r.start_ms, r.end_ms), kind, *n);
            }
        }
        t.long_lived += r.long_lived;
        for (when, kind) in &r.long_broken {
            *t.long_broken_kinds.entry(kind.clone()).or_default() += 1;
            match ws.iter().find(|w| *when >= w.from && *when <= w.to) {
                Some(w) if *when + DEADLINE_SLACK_MS >= w.deadline => t.long_ended_at_deadline += 1,
                Some(_) => t.long_broken_in_handover_early += 1,
                None => t.long_broken_outside += 1,
            }
        }
    }
    t
}

impl Totals {
    fn add_error(&mut self, in_window: bool, kind: &str, n: u64) {
        let (count, kinds) = if in_window {
            (
                &mut self.errors_in_handover,
                &mut self.error_kinds_in_handover,
            )
        } else {
            (&mut self.errors_outside, &mut self.error_kinds_outside)
        };
        *count += n;
        *kinds.entry(kind.to_owned()).or_default() += n;
    }

    pub fn to_json(&self) -> Value {
        json!({
            "runs": self.runs,
            "connections_ok": self.connections_ok,
            "resets_by_reset_server": self.resets,
            "errors_in_handover_windows": self.errors_in_handover,
            "errors_outside_handover_windows": self.errors_outside,
            "error_kinds_in_handover_windows": self.error_kinds_in_handover,
            "error_kinds_outside_handover_windows": self.error_kinds_outside,
            "long_lived": self.long_lived,
            "long_lived_ended_at_drain_deadline": self.long_ended_at_deadline,
            "long_lived_broken_in_handover_before_deadline": self.long_broken_in_handover_early,
            "long_lived_broken_outside_handover": self.long_broken_outside,
            "long_lived_broken_kinds": self.long_broken_kinds,
            "harness_errors": self.harness_errors,
            "harness_examples": self.harness_examples,
            "pod_churns_ok": self.pod_churns_ok,
            "pod_churns_failed": self.pod_churns_failed,
        })
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

fn kinds(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The human table: checks, then the connection figures, then the hand-overs.
pub fn table(
    checks: &[Check],
    soak: &Totals,
    warmup: &Totals,
    handovers: &[Handover],
    samples: &[Snapshot],
) -> String {
    let mut s = String::new();
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(10);
    s.push_str(&format!(
        "\n{:<w$}  {:>14}  {:>14}  {:<24}  result\n",
        "check", "baseline", "end", "limit"
    ));
    for c in checks {
        s.push_str(&format!(
            "{:<w$}  {:>14}  {:>14}  {:<24}  {}\n",
            c.name,
            c.baseline,
            c.end,
            c.limit,
            if c.pass { "ok" } else { "FAIL" }
        ));
    }
    s.push_str("\nconnections                               warm-up        soak\n");
    let row = |s: &mut String, name: &str, a: String, b: String| {
        s.push_str(&format!("{name:<40} {a:>8} {b:>11}\n"));
    };
    row(
        &mut s,
        "tb-pod runs",
        warmup.runs.to_string(),
        soak.runs.to_string(),
    );
    row(
        &mut s,
        "connections ok",
        warmup.connections_ok.to_string(),
        soak.connections_ok.to_string(),
    );
    row(
        &mut s,
        "resets by the reset server (expected)",
        warmup.resets.to_string(),
        soak.resets.to_string(),
    );
    row(
        &mut s,
        "errors in hand-over windows",
        warmup.errors_in_handover.to_string(),
        soak.errors_in_handover.to_string(),
    );
    row(
        &mut s,
        "errors outside hand-over windows",
        warmup.errors_outside.to_string(),
        soak.errors_outside.to_string(),
    );
    row(
        &mut s,
        "long-lived connections",
        warmup.long_lived.to_string(),
        soak.long_lived.to_string(),
    );
    row(
        &mut s,
        "  ended at a drain deadline (expected)",
        warmup.long_ended_at_deadline.to_string(),
        soak.long_ended_at_deadline.to_string(),
    );
    row(
        &mut s,
        "  broke in a hand-over before deadline",
        warmup.long_broken_in_handover_early.to_string(),
        soak.long_broken_in_handover_early.to_string(),
    );
    row(
        &mut s,
        "  broke outside hand-overs",
        warmup.long_broken_outside.to_string(),
        soak.long_broken_outside.to_string(),
    );
    row(
        &mut s,
        "pod churns ok / failed",
        format!("{}/{}", warmup.pod_churns_ok, warmup.pod_churns_failed),
        format!("{}/{}", soak.pod_churns_ok, soak.pod_churns_failed),
    );
    row(
        &mut s,
        "harness errors",
        warmup.harness_errors.to_string(),
        soak.harness_errors.to_string(),
    );
    s.push_str(&format!(
        "soak error kinds, hand-over windows: {}\n",
        kinds(&soak.error_kinds_in_handover)
    ));
    s.push_str(&format!(
        "soak error kinds, outside:           {}\n",
        kinds(&soak.error_kinds_outside)
    ));
    s.push_str(&format!(
        "soak long-lived broken by kind:      {}\n",
        kinds(&soak.long_broken_kinds)
    ));
    for e in soak.harness_examples.iter().chain(&warmup.harness_examples) {
        s.push_str(&format!("harness error: {e}\n"));
    }
    s.push_str(
        "\nhand-over  old pid  new pid  ready after  old age  old fds  old threads  old RSS KiB  old proxy conns  old series  old exit\n",
    );
    for (i, h) in handovers.iter().enumerate() {
        s.push_str(&format!(
            "{:>9}  {:>7}  {:>7}  {:>9} ms  {:>5} s  {:>7}  {:>11}  {:>11}  {:>15}  {:>10}  {}\n",
            i + 1,
            h.old_pid,
            h.new_pid,
            h.ready_ms - h.launched_ms,
            h.old_age_s,
            h.old_fds,
            h.old_threads,
            h.old_rss_kib,
            h.old_proxy_connections,
            h.old_metrics_series,
            h.old_status
        ));
    }
    if !samples.is_empty() {
        s.push_str("\nbaseline, every minute under load, end (current agent and kernel maps):\n");
        s.push_str(
            "    t s      pid  fds  threads  RSS KiB  COOKIE    FLOW  INBOUND  enrolled  series\n",
        );
        let t0 = samples[0].at_unix_ms;
        for p in samples {
            let m = |n: &str| show(p.maps.get(n).copied().flatten());
            s.push_str(&format!(
                "{:>7}  {:>7}  {:>3}  {:>7}  {:>7}  {:>6}  {:>6}  {:>7}  {:>8}  {:>6}\n",
                (p.at_unix_ms - t0) / 1000,
                p.agent_pid,
                p.fds,
                p.threads,
                p.rss_kib,
                m("ORIG_DST_BY_COOKIE"),
                m("ORIG_DST_BY_FLOW"),
                m("INBOUND_FLOWS"),
                p.enrolled_pods.len(),
                p.metrics_series
            ));
        }
    }
    s
}

pub fn handover_json(h: &Handover) -> Value {
    json!({
        "old_pid": h.old_pid,
        "new_pid": h.new_pid,
        "ready_after_ms": h.ready_ms - h.launched_ms,
        "drained_ms": h.exited_ms - h.sigterm_ms,
        "old_age_s": h.old_age_s,
        "old_fds": h.old_fds,
        "old_threads": h.old_threads,
        "old_rss_kib": h.old_rss_kib,
        "old_proxy_connections": h.old_proxy_connections,
        "old_proxy_errors": h.old_proxy_errors,
        "old_metrics_series": h.old_metrics_series,
        "old_exit": h.old_status,
    })
}

pub fn checks_json(checks: &[Check]) -> Value {
    Value::Array(
        checks
            .iter()
            .map(|c| {
                json!({"check": c.name, "baseline": c.baseline, "end": c.end,
                    "limit": c.limit, "pass": c.pass})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handover(launched: u64, sigterm: u64, exited: u64) -> Handover {
        Handover {
            launched_ms: launched,
            ready_ms: launched + 500,
            sigterm_ms: sigterm,
            exited_ms: exited,
            old_pid: 1,
            new_pid: 2,
            old_status: "exit status: 0".into(),
            old_fds: 0,
            old_threads: 0,
            old_rss_kib: 0,
            old_age_s: 0,
            old_proxy_connections: 0,
            old_proxy_errors: 0,
            old_metrics_series: 0,
        }
    }

    #[test]
    fn rss_limit_takes_the_larger_slack() {
        assert_eq!(rss_limit_kib(10_000), 10_000 + 16 * 1024);
        assert_eq!(rss_limit_kib(200_000), 240_000);
    }

    #[test]
    fn failures_are_sorted_into_handover_windows() {
        let hs = [handover(10_000, 11_000, 16_000)];
        let load = RunRecord {
            phase: "soak",
            kind: "load".into(),
            start_ms: 0,
            end_ms: 30_000,
            errors: 2,
            failure_times: vec![(12_000, "connection refused".into()), (25_000, "x".into())],
            long_lived: 3,
            long_broken: vec![
                (16_000, "a".into()),
                (12_000, "b".into()),
                (28_000, "c".into()),
            ],
            ..RunRecord::default()
        };
        let tally = RunRecord {
            phase: "soak",
            kind: "tally".into(),
            start_ms: 20_000,
            end_ms: 22_000,
            errors: 3,
            error_kinds: [("timed out".to_owned(), 3)].into(),
            ..RunRecord::default()
        };
        let t = totals(&[load, tally], &hs, 5_000, "soak");
        assert_eq!(t.errors_in_handover, 1);
        assert_eq!(t.errors_outside, 4);
        assert_eq!(t.error_kinds_outside["timed out"], 3);
        assert_eq!(t.long_ended_at_deadline, 1);
        assert_eq!(t.long_broken_in_handover_early, 1);
        assert_eq!(t.long_broken_outside, 1);
        assert_eq!(totals(&[], &hs, 5_000, "soak").runs, 0);
    }
}
