//! The exclusion scale check: how a new connection's cost grows with the number of
//! exclusion CIDRs, in eBPF mode (LPM trie lookups) and in iptables mode (one RETURN rule
//! per CIDR, walked by the first packet of every connection). An enrolled client dials a
//! server pod whose address none of the CIDRs covers, so every connection is intercepted
//! after all the rules were consulted.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{NodeId, Pod, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::{self, Servers};
use super::scenario::{median, Options};

/// Exclusion list sizes measured.
pub const CIDR_COUNTS: [usize; 4] = [1, 100, 1_000, 10_000];
pub const MODES: [&str; 2] = ["ebpf", "iptables"];

const MANIFESTS_HEAD: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: scale-plain}
---
apiVersion: v1
kind: Namespace
metadata:
  name: scale-mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: scale-plain}
spec: {containers: [{name: main, image: bench}]}
"#;

/// One (mode, CIDR count) point over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleRow {
    pub mode: &'static str,
    pub cidrs: usize,
    pub connect_p50_us: Vec<f64>,
    pub conn_per_s: Vec<f64>,
    /// CNI ADD of the client, which installs the rules (ms).
    pub add_ms: Vec<f64>,
    pub errors: Vec<String>,
    /// What shows the rules were in place and the traffic intercepted.
    pub evidence: Vec<Value>,
}

impl ScaleRow {
    pub fn connect_p50(&self) -> Option<f64> {
        median(&self.connect_p50_us)
    }
    pub fn per_s(&self) -> Option<f64> {
        median(&self.conn_per_s)
    }
    pub fn add(&self) -> Option<f64> {
        median(&self.add_ms)
    }
}

/// `count` distinct /32s in 100.64.0.0/10, none of them a testbed address.
fn exclusion_cidrs(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let n = u32::try_from(i).unwrap_or(u32::MAX);
            let ip =
                std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + n);
            format!("{ip}/32")
        })
        .collect()
}

fn client_name(mode: &str, cidrs: usize) -> String {
    format!("client-{mode}-{cidrs}")
}

fn manifests() -> String {
    let mut yaml = MANIFESTS_HEAD.to_owned();
    for mode in MODES {
        for cidrs in CIDR_COUNTS {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: scale-mesh}}\nspec: {{containers: [{{name: main, image: bench}}]}}\n",
                client_name(mode, cidrs)
            ));
        }
    }
    yaml
}

/// Entries of the pinned map `name` under `dir` (bpftool's JSON dump).
fn pinned_map_entries(dir: &Path, name: &str) -> Result<usize> {
    let path = find_file(dir, name)
        .with_context(|| format!("no pinned {name} under {}", dir.display()))?;
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .context("bpftool")?;
    if !out.status.success() {
        bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
    }
    let entries: Value = serde_json::from_slice(&out.stdout).context("bpftool JSON")?;
    Ok(entries.as_array().map_or(0, Vec::len))
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// Exclusion RETURN rules for 100.64.0.0/10 addresses in the pod's nat table.
fn iptables_exclusions(tb: &Testbed, pod: &Pod, backend: &str) -> Result<usize> {
    let mut cmd = std::process::Command::new(format!("iptables-{backend}-save"));
    cmd.args(["-t", "nat"]).stdout(std::process::Stdio::piped());
    let out = tb.spawn_in_pod(pod, cmd)?.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("-A PROXY_OUTPUT -d 100.") && l.ends_with("-j RETURN"))
        .count())
}

/// One point: agent in `mode` with `cidrs` global exclusions, a fresh enrolled client.
fn point(
    tb: &mut Testbed,
    manifests: &Path,
    servers: &mut Servers,
    mode: &'static str,
    cidrs: usize,
    secs: u64,
) -> Result<(f64, f64, f64, Value)> {
    let config = tb.state_dir().join(format!("scale-{mode}-{cidrs}.yaml"));
    let list: Vec<String> = exclusion_cidrs(cidrs)
        .into_iter()
        .map(|c| format!("  - {c}\n"))
        .collect();
    std::fs::write(
        &config,
        format!("outboundIPRangeExclusionList:\n{}", list.concat()),
    )?;
    let config_arg = config.display().to_string();
    let agent = tb.start_agent_on(
        NodeId::A,
        manifests,
        &["--mode", mode, "--mesh-config", &config_arg],
    )?;
    let result = (|| -> Result<(f64, f64, f64, Value)> {
        let t0 = Instant::now();
        let client = tb.add_pod_on(NodeId::A, "scale-mesh", &client_name(mode, cidrs))?;
        let add_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let installed = match mode {
            "iptables" => iptables_exclusions(tb, &client, "nft")?,
            _ => pinned_map_entries(tb.bpffs_dir(), "OUT_EXCLUDED_CIDRS")?,
        };
        if installed != cidrs {
            bail!("{installed} exclusion entries in place, {cidrs} configured");
        }
        servers.check_alive()?;
        let rate = measure::connrate(tb, &client, servers.ip(), secs)?;
        let (_, body) = tb.admin_get("/config_dump")?;
        let dump: Value = serde_json::from_str(&body)?;
        let prefix = format!("{}:", client.ip);
        let intercepted = dump["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["direction"] == "outbound"
                    && r["client"].as_str().is_some_and(|c| c.starts_with(&prefix))
            })
            .count();
        if intercepted == 0 {
            bail!(
                "the proxy logged no connection from {}: not intercepted",
                client.ip
            );
        }
        let evidence = json!({
            "exclusions_installed": installed,
            "proxy_records_seen": intercepted,
            "connrate": rate.raw,
        });
        tb.del_pod(&client)?;
        Ok((rate.connect_p50_us, rate.per_s, add_ms, evidence))
    })();
    let stopped = agent.stop();
    let _ = std::fs::remove_file(&config);
    let out = result?;
    stopped.context("stopping the agent")?;
    Ok(out)
}

/// A fresh one-node testbed `bench-<name>` whose agents read `manifests` (written to the
/// returned directory), with the benchmark servers running in pod `server` of
/// `namespace`. The server pod is made while an agent answers CNI, then runs unenrolled.
pub(super) fn bed_with_server(
    name: &str,
    manifests: &str,
    namespace: &str,
) -> Result<(Testbed, PathBuf, Servers)> {
    let mut tb = Testbed::builder(&format!("bench-{name}"))
        .build()
        .context("testbed")?;
    let dir = tb.state_dir().join(format!("{name}-manifests"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.yaml")), manifests)?;
    let logs = tb.state_dir().join(format!("{name}-logs"));
    std::fs::create_dir_all(&logs)?;
    let agent = tb.start_agent_on(NodeId::A, &dir, &[])?;
    let server = tb.add_pod_on(NodeId::A, namespace, "server");
    agent.stop()?;
    let servers = Servers::start(&tb, &server?, &logs)?;
    Ok((tb, dir, servers))
}

/// Every (mode, count) point once, on one fresh testbed.
pub fn run(opts: Options) -> Vec<ScaleRow> {
    eprintln!(
        "== exclusion scale (round {}/{})",
        opts.round + 1,
        opts.rounds
    );
    let mut rows: Vec<ScaleRow> = MODES
        .iter()
        .flat_map(|&mode| {
            CIDR_COUNTS.iter().map(move |&cidrs| ScaleRow {
                mode,
                cidrs,
                ..ScaleRow::default()
            })
        })
        .collect();
    let (mut tb, dir, mut servers) = match bed_with_server("scale", &manifests(), "scale-plain") {
        Ok(s) => s,
        Err(e) => {
            for row in &mut rows {
                row.errors.push(format!("{e:#}"));
            }
            return rows;
        }
    };
    for row in &mut rows {
        eprintln!("  {} with {} exclusion CIDRs", row.mode, row.cidrs);
        match point(&mut tb, &dir, &mut servers, row.mode, row.cidrs, opts.secs) {
            Ok((connect, per_s, add_ms, evidence)) => {
                row.connect_p50_us.push(connect);
                row.conn_per_s.push(per_s);
                row.add_ms.push(add_ms);
                row.evidence.push(evidence);
            }
            Err(e) => row.errors.push(format!("{e:#}")),
        }
    }
    drop(servers);
    drop(tb);
    rows
}

/// Rounds merged point by point.
pub fn merge(rounds: Vec<Vec<ScaleRow>>) -> Vec<ScaleRow> {
    let mut merged: Vec<ScaleRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged
            .iter_mut()
            .find(|m| m.mode == row.mode && m.cidrs == row.cidrs)
        {
            Some(m) => {
                m.connect_p50_us.extend(row.connect_p50_us);
                m.conn_per_s.extend(row.conn_per_s);
                m.add_ms.extend(row.add_ms);
                m.errors.extend(row.errors);
                m.evidence.extend(row.evidence);
            }
            None => merged.push(row),
        }
    }
    merged
}

/// A figure with its ratio to `base`, or `failed` when there is none.
pub(super) fn with_ratio(value: Option<f64>, base: Option<f64>, decimals: usize) -> String {
    match (value, base) {
        (Some(v), Some(b)) if b > 0.0 => format!("{v:.decimals$} ({:.2}×)", v / b),
        (Some(v), _) => format!("{v:.decimals$}"),
        (None, _) => "failed".into(),
    }
}

/// The markdown table: one line per CIDR count, eBPF and iptables side by side, each
/// count's figures also as a ratio to the same mode with one CIDR.
pub fn table(rows: &[ScaleRow]) -> String {
    let get = |mode: &str, cidrs: usize| rows.iter().find(|r| r.mode == mode && r.cidrs == cidrs);
    let mut out = String::from(
        "| exclusion CIDRs | eBPF connect p50 µs | iptables connect p50 µs | eBPF conn/s | iptables conn/s | eBPF ADD ms | iptables ADD ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for cidrs in CIDR_COUNTS {
        let cells: Vec<String> = [
            |r: &ScaleRow| r.connect_p50(),
            |r: &ScaleRow| r.per_s(),
            |r: &ScaleRow| r.add(),
        ]
        .iter()
        .zip([1usize, 0, 1])
        .flat_map(|(figure, decimals)| {
            MODES.map(|mode| {
                let value = get(mode, cidrs).and_then(figure);
                let base = get(mode, CIDR_COUNTS[0]).and_then(figure);
                with_ratio(value, base, decimals)
            })
        })
        .collect();
        out.push_str(&format!("| {cidrs} | {} |\n", cells.join(" | ")));
    }
    for row in rows.iter().filter(|r| !r.errors.is_empty()) {
        out.push_str(&format!(
            "\n{} with {} CIDRs: {}",
            row.mode,
            row.cidrs,
            row.errors.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_are_distinct_and_outside_the_testbed() {
        let cidrs = exclusion_cidrs(10_000);
        assert_eq!(cidrs.len(), 10_000);
        assert_eq!(cidrs[0], "100.64.0.0/32");
        assert_eq!(cidrs[9_999], "100.64.39.15/32");
        let unique: std::collections::HashSet<_> = cidrs.iter().collect();
        assert_eq!(unique.len(), cidrs.len());
    }

    #[test]
    fn table_shows_ratios_to_one_cidr_and_failures() {
        let row = |mode, cidrs, connect: f64| ScaleRow {
            mode,
            cidrs,
            connect_p50_us: vec![connect],
            conn_per_s: vec![1000.0],
            add_ms: vec![10.0],
            ..ScaleRow::default()
        };
        let mut rows = vec![
            row("ebpf", 1, 10.0),
            row("iptables", 1, 10.0),
            row("iptables", 10_000, 40.0),
        ];
        rows.push(ScaleRow {
            mode: "ebpf",
            cidrs: 10_000,
            errors: vec!["boom".into()],
            ..ScaleRow::default()
        });
        let table = table(&rows);
        assert!(
            table.contains("| 10000 | failed | 40.0 (4.00×) |"),
            "{table}"
        );
        assert!(table.contains("ebpf with 10000 CIDRs: boom"), "{table}");
    }
}
