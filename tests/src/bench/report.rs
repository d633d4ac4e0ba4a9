//! The table (markdown), the targets of the issue, and the result files.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::facts::Facts;
use super::scenario::{Cell, Figures, Outcome, Row, Scenario, Topology};

/// Everything one run produced.
pub struct Report<'a> {
    pub facts: &'a Facts,
    pub secs: u64,
    pub rounds: usize,
    pub args: &'a [String],
    pub rows: &'a [Row],
    /// The exclusion scale check (empty when not run).
    pub scale: &'a [super::scale::ScaleRow],
    /// The cost of the upstream policies (empty when not run).
    pub upstream: &'a [super::upstream::UpstreamRow],
    /// Pod start-up at cluster scale (empty when not run).
    pub scale_pods: &'a super::scale_pods::ScalePods,
    /// IPv6 beside IPv4 on one hop (empty when not run).
    pub ipv6: &'a [super::ipv6::FamilyRow],
    /// TLS passthrough and UDP through the gateway (empty when not run).
    pub gateway_l4: &'a [super::gateway_l4::GatewayRow],
    pub wall_s: f64,
    pub loadavg_at_end: String,
    /// The `--note` given on the command line.
    pub note: Option<String>,
}

/// Longest error text put in a table cell (the notes have it whole).
const CELL_ERROR_CHARS: usize = 140;

/// One line, no `|`, at most `max` characters.
fn cell_text(s: &str, max: usize) -> String {
    let one_line: String = s
        .chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => ' ',
            '|' => '/',
            c => c,
        })
        .collect();
    if one_line.chars().count() > max {
        let cut: String = one_line.chars().take(max).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

fn direct_of(rows: &[Row], topology: Topology) -> Option<&Figures> {
    rows.iter()
        .find(|r| r.topology == topology && r.scenario == Scenario::Direct)
        .and_then(Row::figures)
}

fn ratio(cell: &Cell, direct: Option<&Cell>) -> Option<f64> {
    let v = cell.value?;
    let d = direct?.value?;
    (d != 0.0).then(|| v / d)
}

fn format_value(v: f64, decimals: usize) -> String {
    format!("{v:.decimals$}")
}

fn figure(cell: &Cell, direct: Option<&Cell>, decimals: usize) -> String {
    let Some(v) = cell.value else {
        return match cell.errors.first() {
            Some(e) => format!("failed: {}", cell_text(e, CELL_ERROR_CHARS)),
            None => "—".into(),
        };
    };
    let mut s = format_value(v, decimals);
    match ratio(cell, direct) {
        Some(r) => write!(s, " ({r:.2}×)").unwrap_or(()),
        None => s.push_str(" (n/a)"),
    }
    if !cell.errors.is_empty() {
        let runs = cell.errors.len() + cell.samples.len();
        write!(s, " [{}/{runs} runs failed]", cell.errors.len()).unwrap_or(());
    }
    s
}

/// The results table: rows = topology × scenario.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| topology | scenario | p50 µs (ratio) | p99 µs (ratio) | bulk Gbit/s (ratio) | conn/s (ratio) | connect p50 µs (ratio) | CPU s/GB (ratio) |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let direct = direct_of(rows, row.topology);
        let mut name = row.scenario.name().to_owned();
        if !row.warnings.is_empty() {
            name.push_str(" ⚠");
        }
        let cells: [String; 6] = match &row.outcome {
            Outcome::Measured { figures: f } => {
                let rr = f.latency_tools.iter().any(|t| t != "sockperf");
                let tag = if rr { " [rr]" } else { "" };
                let mut conn = figure(&f.conn_per_s, direct.map(|d| &d.conn_per_s), 0);
                if f.connrate_errors > 0 {
                    write!(conn, " [{} failed exchanges]", f.connrate_errors).unwrap_or(());
                }
                [
                    figure(&f.p50_us, direct.map(|d| &d.p50_us), 1) + tag,
                    figure(&f.p99_us, direct.map(|d| &d.p99_us), 1) + tag,
                    figure(&f.bulk_gbit_per_s, direct.map(|d| &d.bulk_gbit_per_s), 2),
                    conn,
                    figure(&f.connect_p50_us, direct.map(|d| &d.connect_p50_us), 1),
                    figure(&f.cpu_s_per_gb, direct.map(|d| &d.cpu_s_per_gb), 2),
                ]
            }
            Outcome::Skipped { reason } => [
                format!("skipped ({})", cell_text(reason, CELL_ERROR_CHARS)),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ],
            Outcome::Failed { error } => [
                format!("failed: {}", cell_text(error, CELL_ERROR_CHARS)),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
                "—".into(),
            ],
        };
        writeln!(
            t,
            "| {} | {} | {} |",
            row.topology.name(),
            name,
            cells.join(" | ")
        )
        .unwrap_or(());
    }
    t
}

/// One target check: `(text, met)`; `met` is `None` when it could not be judged.
fn check(r: Option<f64>, target: f64, at_least: bool) -> (String, Option<bool>) {
    let Some(r) = r else {
        return ("n/a (no figure)".into(), None);
    };
    let met = if at_least { r >= target } else { r <= target };
    if met {
        (format!("{r:.2}× met"), Some(true))
    } else {
        let by = (r - target).abs();
        (format!("{r:.2}× **missed** by {by:.2}×"), Some(false))
    }
}

/// Whether `ours` is ahead of every peer row (HAProxy, ztunnel) measured in the same
/// topology on `cell` (`lower` is better for latency), by the medians; the text also says
/// in how many rounds it was ahead of each peer, since a median of a few rounds can rank
/// two paths whose rounds overlap. `met` is `None` when no peer was measured; `rounds`
/// is, per peer, the rounds ahead and the rounds compared.
fn ahead_of_peers(
    rows: &[Row],
    row: &Row,
    cell: impl Fn(&Figures) -> &Cell,
    lower: bool,
) -> PeerComparison {
    let mut comparison = PeerComparison::default();
    let Some(ours) = row.figures().map(&cell) else {
        return comparison;
    };
    let Some(our_value) = ours.value else {
        return comparison;
    };
    let better = |a: f64, b: f64| if lower { a < b } else { a > b };
    let mut behind = Vec::new();
    let mut compared = 0;
    for peer in rows
        .iter()
        .filter(|r| r.topology == row.topology && r.scenario.is_peer())
    {
        let Some(theirs) = peer.figures().map(&cell) else {
            continue;
        };
        let Some(their_value) = theirs.value else {
            continue;
        };
        compared += 1;
        if !better(our_value, their_value) {
            behind.push(peer.scenario.name());
        }
        if let (Some(key), Some(rounds)) =
            (peer.scenario.peer_key(), rounds_ahead(ours, theirs, better))
        {
            comparison.rounds.push((key, rounds));
        }
    }
    (comparison.text, comparison.met) = match (compared, behind.is_empty()) {
        (0, _) => (", no peer measured".into(), None),
        (_, true) => (", ahead of every peer".into(), Some(true)),
        (_, false) => (
            format!(", **behind** {}", behind.join(" and ")),
            Some(false),
        ),
    };
    if !comparison.rounds.is_empty() {
        let per_peer: Vec<String> = comparison
            .rounds
            .iter()
            .map(|(peer, (ahead, of))| format!("{peer} {ahead} of {of}"))
            .collect();
        write!(comparison.text, "; rounds ahead: {}", per_peer.join(", ")).unwrap_or(());
    }
    comparison
}

/// How one of our rows compares with the peers on one figure.
#[derive(Default)]
struct PeerComparison {
    text: String,
    met: Option<bool>,
    /// Per peer: (rounds ours was ahead, rounds compared).
    rounds: Vec<(&'static str, (usize, usize))>,
}

/// In how many rounds `ours` was `better` than `theirs`, of how many: only when both
/// have a figure from the same rounds (samples are kept per round, in order, so a failed
/// run would pair figures of different rounds) and there is more than one.
fn rounds_ahead(
    ours: &Cell,
    theirs: &Cell,
    better: impl Fn(f64, f64) -> bool,
) -> Option<(usize, usize)> {
    let paired = ours.errors.is_empty()
        && theirs.errors.is_empty()
        && ours.samples.len() == theirs.samples.len()
        && ours.samples.len() > 1;
    paired.then(|| {
        let ahead = ours
            .samples
            .iter()
            .zip(&theirs.samples)
            .filter(|(o, t)| better(**o, **t))
            .count();
        (ahead, ours.samples.len())
    })
}

/// Both parts of a target must hold; a part that could not be judged does not count.
fn both(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a && b),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Target results of our rows, as JSON (for the result file) and markdown. Issue 14's
/// targets: bulk ≥ 0.9× direct with one hop and ≥ 0.8× with two; 64-byte p50 ≤ 1.8×
/// (≤ 1.5× with sockmap) and, with one hop, ahead of the peers; with one hop, conn/s
/// ≥ 0.6× direct and ahead of the peers, and `connect()` at most 60 µs above direct.
pub fn targets(rows: &[Row]) -> (Value, String) {
    let mut md = String::from(
        "| topology | scenario | bulk (≥ 0.9× one hop, ≥ 0.8× two) | p50 (≤ 1.8×, ≤ 1.5× sockmap; one hop ahead of peers) | conn/s (one hop ≥ 0.6×, ahead of peers) | connect added (one hop ≤ 60 µs) |\n|---|---|---|---|---|---|\n",
    );
    let mut out = Vec::new();
    for row in rows.iter().filter(|r| r.scenario.is_ours()) {
        let direct = direct_of(rows, row.topology);
        let figures = row.figures();
        let of =
            |pick: fn(&Figures) -> &Cell| figures.and_then(|f| ratio(pick(f), direct.map(pick)));
        let bulk = of(|f| &f.bulk_gbit_per_s);
        let p50 = of(|f| &f.p50_us);
        let conn = of(|f| &f.conn_per_s);
        let connect_added = figures
            .and_then(|f| f.connect_p50_us.value)
            .zip(direct.and_then(|d| d.connect_p50_us.value))
            .map(|(ours, direct)| ours - direct);
        let bulk_target = row.scenario.bulk_target().unwrap_or(0.8);
        let p50_target = row.scenario.p50_target().unwrap_or(1.8);
        let (bulk_text, bulk_met) = check(bulk, bulk_target, true);
        let (mut p50_text, mut p50_met) = check(p50, p50_target, false);
        let (mut conn_text, mut conn_met) = match row.scenario.conn_target() {
            Some(target) => check(conn, target, true),
            None => ("—".into(), None),
        };
        // Per figure and peer, [rounds ahead, rounds compared]; null for a row that does
        // not race the peers.
        let mut rounds_ahead = Value::Null;
        if row.scenario.races_peers() {
            let mut per_figure = serde_json::Map::new();
            let p50_peers = ahead_of_peers(rows, row, |f| &f.p50_us, true);
            p50_text.push_str(&p50_peers.text);
            p50_met = both(p50_met, p50_peers.met);
            let conn_peers = ahead_of_peers(rows, row, |f| &f.conn_per_s, false);
            conn_text.push_str(&conn_peers.text);
            conn_met = both(conn_met, conn_peers.met);
            for (figure, comparison) in [("p50", p50_peers), ("conn", conn_peers)] {
                let per_peer: serde_json::Map<String, Value> = comparison
                    .rounds
                    .iter()
                    .map(|(peer, (ahead, of))| ((*peer).to_owned(), json!([ahead, of])))
                    .collect();
                per_figure.insert(figure.to_owned(), Value::Object(per_peer));
            }
            rounds_ahead = Value::Object(per_figure);
        }
        let (connect_text, connect_met) =
            match (row.scenario.connect_added_target_us(), connect_added) {
                (None, _) => ("—".into(), None),
                (Some(_), None) => ("n/a (no figure)".into(), None),
                (Some(target), Some(added)) if added <= target => {
                    (format!("{added:.1} µs met"), Some(true))
                }
                (Some(target), Some(added)) => (
                    format!("{added:.1} µs **missed** by {:.1} µs", added - target),
                    Some(false),
                ),
            };
        writeln!(
            md,
            "| {} | {} | {bulk_text} (target ≥ {bulk_target}×) | {p50_text} (target ≤ {p50_target}×) | {conn_text} | {connect_text} |",
            row.topology.name(),
            row.scenario.name()
        )
        .unwrap_or(());
        out.push(json!({
            "topology": row.topology,
            "scenario": row.scenario,
            "bulk_ratio": bulk,
            "bulk_target": bulk_target,
            "bulk_met": bulk_met,
            "p50_ratio": p50,
            "p50_target": p50_target,
            "p50_met": p50_met,
            "conn_ratio": conn,
            "conn_target": row.scenario.conn_target(),
            "conn_met": conn_met,
            "connect_added_us": connect_added,
            "connect_added_target_us": row.scenario.connect_added_target_us(),
            "connect_added_met": connect_met,
            "rounds_ahead_of_peers": rounds_ahead,
        }));
    }
    (Value::Array(out), md)
}

/// Full errors, warnings and fallbacks, one bullet each.
pub fn notes(rows: &[Row]) -> String {
    let mut n = String::new();
    for row in rows {
        let who = format!("{} / {}", row.topology.name(), row.scenario.name());
        match &row.outcome {
            Outcome::Failed { error } => writeln!(n, "- {who}: failed: {}", cell_text(error, 4000)),
            Outcome::Skipped { reason } => writeln!(n, "- {who}: skipped: {reason}"),
            Outcome::Measured { figures } => {
                let mut r = Ok(());
                for (what, cell) in [
                    ("latency", &figures.p50_us),
                    ("bulk", &figures.bulk_gbit_per_s),
                    ("connection rate", &figures.conn_per_s),
                ] {
                    for e in &cell.errors {
                        r = r.and(writeln!(
                            n,
                            "- {who}: {what} run failed: {}",
                            cell_text(e, 4000)
                        ));
                    }
                }
                if figures.latency_tools.iter().any(|t| t != "sockperf") {
                    let why: Vec<&str> = figures
                        .raw
                        .iter()
                        .filter_map(|r| r["latency"]["sockperf_error"].as_str())
                        .collect();
                    r = r.and(writeln!(
                        n,
                        "- {who}: latency from {} (sockperf failed: {})",
                        figures.latency_tools.join(", "),
                        cell_text(&why.join("; "), 4000)
                    ));
                }
                if figures.connrate_errors > 0 {
                    r = r.and(writeln!(
                        n,
                        "- {who}: {} connection-rate exchanges failed (counted out of conn/s)",
                        figures.connrate_errors
                    ));
                }
                r
            }
        }
        .unwrap_or(());
        for w in &row.warnings {
            writeln!(n, "- {who}: ⚠ {w}").unwrap_or(());
        }
    }
    n
}

fn machine(f: &Facts, loadavg_at_end: &str) -> String {
    format!(
        "- host: {} · kernel {} · {} × {} · memory {}\n\
         - load average at start: {} · at end: {loadavg_at_end}\n\
         - CPU idle: {}\n\
         - tools: {} · {} · {}\n\
         - workspace: commit {}{}\n",
        f.hostname,
        f.kernel,
        f.cpus,
        f.cpu_model,
        f.memory,
        f.loadavg_at_start,
        f.cpu_idle,
        f.sockperf,
        f.iperf3,
        f.haproxy,
        f.git_commit,
        match f.git_dirty {
            Some(true) => " (with uncommitted changes)",
            _ => "",
        }
    )
}

fn raw_numbers(rows: &[Row]) -> String {
    let mut s = String::new();
    for row in rows {
        let Some(f) = row.figures() else { continue };
        writeln!(s, "- {} / {}:", row.topology.name(), row.scenario.name()).unwrap_or(());
        for run in &f.raw {
            let round = run["run"].as_u64().unwrap_or(0) + 1;
            if let Some(e) = run["scenario_error"].as_str() {
                writeln!(
                    s,
                    "  - round {round}: scenario failed: {}",
                    cell_text(e, 600)
                )
                .unwrap_or(());
                continue;
            }
            let l = &run["latency"];
            let lat = if l["error"].is_string() {
                format!("error {}", l["error"])
            } else if l["tool"] == "sockperf" {
                format!(
                    "sockperf p50 {} µs p99 {} µs over {} round trips",
                    l["p50_us"], l["p99_us"], l["observations"]
                )
            } else {
                let r = &l["report"];
                format!(
                    "tb-pod rr p50 {} µs p99 {} µs over {} round trips",
                    r["p50_us"], r["p99_us"], r["round_trips"]
                )
            };
            let b = &run["bulk"];
            let bulk = if b["error"].is_string() {
                format!("error {}", b["error"])
            } else {
                let machine = b["machine_cpu_s"]
                    .as_f64()
                    .map(|m| format!(" (whole machine {m:.2} CPU s)"))
                    .unwrap_or_default();
                format!(
                    "iperf3 {:.3} Gbit/s, {} bytes received, {:.3} CPU s in the node cgroups{machine}",
                    b["gbit_per_s"].as_f64().unwrap_or(0.0),
                    b["bytes"],
                    b["cpu_s"].as_f64().unwrap_or(0.0)
                )
            };
            let c = &run["connrate"];
            let conn = if c["error"].is_string() {
                format!("error {}", c["error"])
            } else {
                let r = &c["report"];
                format!(
                    "connrate {} connections, {} errors in {} ms",
                    r["connections"], r["errors"], r["elapsed_ms"]
                )
            };
            writeln!(
                s,
                "  - round {round}: {} · {} · {}",
                cell_text(&lat, 300),
                cell_text(&bulk, 300),
                cell_text(&conn, 300)
            )
            .unwrap_or(());
        }
        if !row.evidence.is_null() {
            writeln!(s, "  - evidence per round: `{}`", row.evidence).unwrap_or(());
        }
    }
    s
}

const HOW_TO_READ: &str =
    "Ratios are to `direct` of the same topology in this run. Latency is the \
round trip of a 64-byte request and its 64-byte response on one persistent connection (sockperf \
ping-pong `--full-rtt`; `[rr]` marks `tb-pod rr` used as the fallback); bulk is one iperf3 stream; \
conn/s is `tb-pod connrate` (connect, 1 byte each way, RST close, one thread); CPU s/GB is the busy \
CPU time of the whole machine (`/proc/stat`: user, nice, system, irq, softirq, steal) during the \
iperf3 run per 10^9 bytes received, so nothing a path costs is left out of it. \
Lower is better for latency and CPU, higher for bulk and conn/s. See bench/README.md.";

/// The summary printed on stdout: table, targets, notes.
pub fn summary(report: &Report<'_>) -> String {
    let (_, targets_md) = targets(report.rows);
    let notes = notes(report.rows);
    let mut s = String::new();
    if !report.rows.is_empty() {
        writeln!(
            s,
            "## Results ({} s per figure, median of {} round{})\n\n{}\n{HOW_TO_READ}\n\n\
             CPU idle: {}.\n\n\
         ## Targets (ours vs direct, same topology)\n\n{targets_md}",
            report.secs,
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            table(report.rows),
            report.facts.cpu_idle
        )
        .unwrap_or(());
    }
    if !notes.is_empty() {
        writeln!(s, "\n## Notes\n\n{notes}").unwrap_or(());
    }
    if !report.scale.is_empty() {
        writeln!(
            s,
            "\n## Exclusion scale (enrolled client to an unexcluded pod; median of {} round{})\n\n{}\n\n\
             {SCALE_HOW_TO_READ}",
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            super::scale::table(report.scale)
        )
        .unwrap_or(());
    }
    if !report.scale_pods.is_empty() {
        writeln!(
            s,
            "\n## Pod start-up at cluster scale (enrolled pods added one by one through the chain)\n\n{}\n\n\
             interceptor-cni ADD: the plugin's own run (the agent's work for the pod: listeners, \
             maps or chains, and the answer); whole chain: bridge + host-local + interceptor-cni. \
             The model's Services select their pods by label (no EndpointSlices). RSS and threads: \
             the agent after the probes were enrolled. tc attach: the agent's `--tc-attach`, `netlink` \
             (clsact + cls_bpf, the default) or `tcx` (bpf_link on kernels ≥ 6.6: an RCU grace \
             period under the rtnl lock per direction).",
            super::scale_pods::table(report.scale_pods),
        )
        .unwrap_or(());
        // A narrowed run (`--memory-pods 0 --no-idle`) measured no memory.
        if super::scale_pods::measured_memory(report.scale_pods) {
            writeln!(
                s,
                "\n### Agent memory\n\n{}\n\n{}",
                super::scale_pods::memory_table(report.scale_pods),
                super::scale_pods::MEMORY_HOW_TO_READ
            )
            .unwrap_or(());
        }
    }
    if !report.ipv6.is_empty() {
        writeln!(
            s,
            "\n## IPv6 beside IPv4 (dual-stack pods, one node; median of {} round{})\n\n{}\n\n{}",
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            super::ipv6::table(report.ipv6),
            super::ipv6::HOW_TO_READ
        )
        .unwrap_or(());
    }
    if !report.gateway_l4.is_empty() {
        writeln!(
            s,
            "\n## TLS passthrough and UDP through the gateway (one node; median of {} round{})\n\n{}\n\n{}",
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            super::gateway_l4::table(report.gateway_l4),
            super::gateway_l4::HOW_TO_READ
        )
        .unwrap_or(());
    }
    if !report.upstream.is_empty() {
        writeln!(
            s,
            "\n## Upstream policies (enrolled client to a Service with {} endpoints; median of {} round{})\n\n{}\n\n{}",
            super::upstream::ENDPOINTS,
            report.rounds,
            if report.rounds == 1 { "" } else { "s" },
            super::upstream::table(report.upstream),
            super::upstream::HOW_TO_READ
        )
        .unwrap_or(());
    }
    s
}

const SCALE_HOW_TO_READ: &str = "Ratios are to the same mode with one CIDR. \
connect p50: how long the client's connect() takes (the handshake with the local proxy, \
after every exclusion was consulted). conn/s: one connection at a time, one byte each way, \
through the proxy to the server. ADD ms: the client's whole CNI chain ADD, which installs \
the rules in iptables mode. eBPF mode looks exclusions up in LPM tries; iptables mode \
walks one RETURN rule per CIDR for the first packet of every connection.";

pub fn markdown(report: &Report<'_>) -> String {
    let f = report.facts;
    format!(
        "# interceptor bench, {} on {}\n\n\
         `tb-bench {}` started {}, took {:.0} s.{}\n\n{}\n## Machine\n\n{}\n\
         ## Raw numbers\n\nEvery round of every figure (the JSON file beside this one has each tool's \
         full figures).\n\n{}",
        f.date_utc,
        f.hostname,
        report.args.join(" "),
        f.started_utc,
        report.wall_s,
        report
            .note
            .as_ref()
            .map(|n| format!("\n\nNote: {n}"))
            .unwrap_or_default(),
        summary(report),
        machine(f, &report.loadavg_at_end),
        raw_numbers(report.rows)
    )
}

pub fn json(report: &Report<'_>, markdown: &str) -> Value {
    let (targets, _) = targets(report.rows);
    json!({
        "facts": report.facts,
        "args": report.args,
        "seconds_per_figure": report.secs,
        "rounds": report.rounds,
        "wall_s": report.wall_s,
        "loadavg_at_end": report.loadavg_at_end,
        "note": report.note,
        "rows": report.rows,
        "targets": targets,
        "table_markdown": table(report.rows),
        "scale": report.scale,
        "upstream": report.upstream,
        "scale_pods": report.scale_pods,
        "ipv6": report.ipv6,
        "gateway_l4": report.gateway_l4,
        "markdown": markdown,
    })
}

/// Writes `<dir>/<stem>.md` and `<dir>/<stem>.json`.
/// Result files are evidence that notes and READMEs quote: a second run of a day never
/// overwrites the first, it is saved as `<stem>-2`, `<stem>-3`, … Both files are created
/// exclusively (`O_EXCL`), so two runs saving at once take different names too.
pub fn save(dir: &Path, stem: &str, markdown: &str, json: &Value) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut text = serde_json::to_string_pretty(json)?;
    text.push('\n');
    let stems =
        std::iter::once(stem.to_owned()).chain((2..MAX_RUNS_A_DAY).map(|n| format!("{stem}-{n}")));
    for stem in stems {
        let (md, js) = (
            dir.join(format!("{stem}.md")),
            dir.join(format!("{stem}.json")),
        );
        let Some(mut md_file) = create_new(&md)? else {
            continue;
        };
        let Some(mut js_file) = create_new(&js)? else {
            // A JSON file without its markdown: leave it, and the name, alone.
            drop(md_file);
            std::fs::remove_file(&md).with_context(|| format!("removing {}", md.display()))?;
            continue;
        };
        md_file
            .write_all(markdown.as_bytes())
            .with_context(|| format!("writing {}", md.display()))?;
        js_file
            .write_all(text.as_bytes())
            .with_context(|| format!("writing {}", js.display()))?;
        return Ok((md, js));
    }
    anyhow::bail!(
        "{stem}: {MAX_RUNS_A_DAY} runs of the day already in {}",
        dir.display()
    )
}

/// How many result files of one kind a day may have (`<stem>` to `<stem>-999`).
const MAX_RUNS_A_DAY: usize = 1_000;

/// A new file at `path`, or `None` when one is there already.
fn create_new(path: &Path) -> Result<Option<std::fs::File>> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(error) => Err(error).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(v: f64) -> Cell {
        Cell {
            value: Some(v),
            samples: vec![v],
            errors: Vec::new(),
        }
    }

    #[test]
    fn figure_shows_value_and_ratio() {
        assert_eq!(figure(&cell(20.0), Some(&cell(10.0)), 1), "20.0 (2.00×)");
        assert_eq!(figure(&cell(20.0), None, 1), "20.0 (n/a)");
        let failed = Cell {
            value: None,
            samples: Vec::new(),
            errors: vec!["a | b\nc".into()],
        };
        assert_eq!(figure(&failed, Some(&cell(1.0)), 1), "failed: a / b c");
    }

    #[test]
    fn checks_say_by_how_much_a_target_is_missed() {
        assert_eq!(check(Some(0.9), 0.8, true).0, "0.90× met");
        assert_eq!(check(Some(0.5), 0.8, true).0, "0.50× **missed** by 0.30×");
        assert_eq!(check(Some(2.0), 1.8, false).1, Some(false));
        assert_eq!(check(None, 1.8, false).1, None);
    }

    fn row(scenario: Scenario, p50: f64, conn: f64, connect: f64) -> Row {
        let figures = Figures {
            p50_us: cell(p50),
            bulk_gbit_per_s: cell(10.0),
            conn_per_s: cell(conn),
            connect_p50_us: cell(connect),
            ..Figures::default()
        };
        Row::new(
            Topology::SameNode,
            scenario,
            Outcome::Measured {
                figures: Box::new(figures),
            },
        )
    }

    /// The one-hop row must beat every peer measured in the same run, besides its ratios.
    #[test]
    fn the_one_hop_row_must_be_ahead_of_the_peers() {
        let rows = [
            row(Scenario::Direct, 40.0, 10_000.0, 30.0),
            row(Scenario::Haproxy, 60.0, 7_000.0, 60.0),
            row(Scenario::OursClient, 50.0, 6_500.0, 100.0),
        ];
        let (json, md) = targets(&rows);
        let ours = &json[0];
        assert_eq!(ours["p50_met"], true, "{md}");
        assert_eq!(ours["conn_met"], false, "0.65× but behind HAProxy: {md}");
        assert!(md.contains("**behind** haproxy"), "{md}");
        assert_eq!(ours["connect_added_us"], 70.0);
        assert_eq!(ours["connect_added_met"], false, "{md}");
        assert_eq!(ours["bulk_target"], 0.9);
    }

    fn rounds(samples: &[f64]) -> Cell {
        Cell {
            value: crate::bench::scenario::median(samples),
            samples: samples.to_vec(),
            errors: Vec::new(),
        }
    }

    /// The medians rank; the text and the JSON also say in how many rounds ours was
    /// ahead of each peer, and a failed run (figures no longer paired by round) says
    /// nothing rather than compare different rounds.
    #[test]
    fn the_ranking_says_in_how_many_rounds_ours_was_ahead() {
        let mut rows = [
            row(Scenario::Direct, 10.0, 10_000.0, 30.0),
            row(Scenario::Haproxy, 0.0, 0.0, 60.0),
            row(Scenario::OursClient, 0.0, 0.0, 70.0),
        ];
        let set = |row: &mut Row, p50: &[f64], conn: &[f64]| {
            if let Outcome::Measured { figures } = &mut row.outcome {
                figures.p50_us = rounds(p50);
                figures.conn_per_s = rounds(conn);
            }
        };
        set(
            &mut rows[1],
            &[30.0, 32.0, 31.0],
            &[6_000.0, 6_100.0, 6_200.0],
        );
        set(
            &mut rows[2],
            &[29.0, 39.0, 30.0],
            &[6_500.0, 6_050.0, 6_000.0],
        );
        let (json, md) = targets(&rows);
        assert_eq!(json[0]["p50_met"], false, "3.0× of direct: {md}");
        assert!(
            md.contains("ahead of every peer; rounds ahead: haproxy 2 of 3 (target"),
            "{md}"
        );
        assert_eq!(
            json[0]["rounds_ahead_of_peers"]["p50"]["haproxy"],
            json!([2, 3])
        );
        assert_eq!(
            json[0]["rounds_ahead_of_peers"]["conn"]["haproxy"],
            json!([1, 3])
        );
        let (both, _) = targets(&[
            rows[0].clone(),
            row(Scenario::OursBoth, 40.0, 5_000.0, 70.0),
        ]);
        assert_eq!(both[0]["rounds_ahead_of_peers"], Value::Null);
        assert!(
            md.contains("**behind** haproxy (iptables REDIRECT); rounds ahead: haproxy 1 of 3"),
            "{md}"
        );

        // Both failed once, in different rounds: as many figures each, of different rounds.
        let mut ours_failed = rounds(&[31.0, 30.0]);
        ours_failed.errors.push("round 1: sockperf exited".into());
        let mut theirs_failed = rounds(&[32.0, 33.0]);
        theirs_failed.errors.push("round 3: sockperf exited".into());
        assert_eq!(
            rounds_ahead(&ours_failed, &theirs_failed, |a, b| a < b),
            None
        );
        assert_eq!(
            rounds_ahead(&ours_failed, &rounds(&[32.0, 33.0, 34.0]), |a, b| a < b),
            None
        );
        assert_eq!(
            rounds_ahead(&rounds(&[31.0]), &rounds(&[32.0]), |a, b| a < b),
            None
        );
    }

    #[test]
    fn a_second_run_of_the_day_is_saved_beside_the_first() {
        let dir = std::env::temp_dir().join(format!("tb-bench-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = save(&dir, "2026-12-07-vm", "first", &json!(1)).unwrap();
        let second = save(&dir, "2026-12-07-vm", "second", &json!(2)).unwrap();
        let third = save(&dir, "2026-12-07-vm", "third", &json!(3)).unwrap();
        assert_eq!(first.0, dir.join("2026-12-07-vm.md"));
        assert_eq!(
            second,
            (
                dir.join("2026-12-07-vm-2.md"),
                dir.join("2026-12-07-vm-2.json")
            )
        );
        assert_eq!(third.0, dir.join("2026-12-07-vm-3.md"));
        assert_eq!(std::fs::read_to_string(&first.0).unwrap(), "first");
        assert_eq!(std::fs::read_to_string(&second.0).unwrap(), "second");
        // A JSON file left without its markdown keeps its name: the next run skips it.
        std::fs::write(dir.join("2026-12-07-vm-4.json"), "left").unwrap();
        let fifth = save(&dir, "2026-12-07-vm", "fifth", &json!(5)).unwrap();
        assert_eq!(fifth.0, dir.join("2026-12-07-vm-5.md"));
        assert!(!dir.join("2026-12-07-vm-4.md").exists());
        assert_eq!(
            std::fs::read_to_string(dir.join("2026-12-07-vm-4.json")).unwrap(),
            "left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_errors_are_cut_for_cells() {
        let s = cell_text(&"x".repeat(200), 10);
        assert_eq!(s.chars().count(), 11);
    }
}
