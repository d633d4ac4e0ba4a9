//! IPv6 beside IPv4 on one proxied path (`--part ipv6`): on a one-node dual-stack
//! testbed, an unenrolled client (direct) and an enrolled one (one proxy hop, eBPF and
//! iptables mode) reach an unenrolled server at its IPv4 and at its IPv6 address, the two
//! families one after the other in the same round. The 64-byte request/response figure
//! is `tb-pod rr` for both families (the sockperf server of the topology table listens
//! on IPv4 only), so each family is measured with the same tools.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use interceptor_testbed::{NodeId, Pod, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::{self, Servers};
use super::scale::with_ratio;
use super::scenario::{median, Options};

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: v6-plain}
---
apiVersion: v1
kind: Namespace
metadata:
  name: v6-mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: v6-plain}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: v6-plain}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-ebpf, namespace: v6-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-iptables, namespace: v6-mesh}
spec: {containers: [{name: main, image: bench}]}
"#;

/// The paths measured: direct (no agent running), then one hop in each mode.
pub const PATHS: [&str; 3] = ["direct", "ebpf", "iptables"];
pub const FAMILIES: [&str; 2] = ["IPv4", "IPv6"];

/// One (path, family) over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FamilyRow {
    pub path: &'static str,
    pub family: &'static str,
    pub gbit_per_s: Vec<f64>,
    pub conn_per_s: Vec<f64>,
    pub connect_p50_us: Vec<f64>,
    pub first_echo_p50_us: Vec<f64>,
    pub rr_p50_us: Vec<f64>,
    pub errors: Vec<String>,
    /// What shows the path was the one claimed (proxy records per family).
    pub evidence: Vec<Value>,
}

/// The address of `family` of `pod`.
fn address(pod: &Pod, family: &str) -> Result<IpAddr> {
    match family {
        "IPv4" => Ok(pod.ip.into()),
        _ => pod
            .ipv6
            .map(IpAddr::from)
            .context("the server pod has no IPv6 address"),
    }
}

/// The figures of one family from `client`, each failing on its own into `row.errors`.
fn measure_family(
    tb: &Testbed,
    client: &Pod,
    servers: &mut Servers,
    cgroups: &[PathBuf],
    secs: u64,
    row: &mut FamilyRow,
) {
    let ip = match address(&servers.pod, row.family) {
        Ok(ip) => ip,
        Err(e) => return row.errors.push(format!("{e:#}")),
    };
    let label = format!("{} {}", row.path, row.family);
    let failed = |what: &str, e: anyhow::Error| row_error(&label, what, e);
    eprintln!("  {label}: bulk");
    match servers
        .check_alive()
        .and_then(|()| measure::bulk(tb, client, ip, secs, cgroups))
    {
        Ok(b) => row.gbit_per_s.push(b.gbit_per_s),
        Err(e) => row.errors.push(failed("bulk", e)),
    }
    eprintln!("  {label}: new connections");
    match servers
        .check_alive()
        .and_then(|()| measure::connrate(tb, client, ip, secs))
    {
        Ok(c) => {
            row.conn_per_s.push(c.per_s);
            row.connect_p50_us.push(c.connect_p50_us);
            row.first_echo_p50_us.push(c.first_echo_p50_us);
        }
        Err(e) => row.errors.push(failed("conn/s", e)),
    }
    eprintln!("  {label}: 64 B request/response");
    match servers
        .check_alive()
        .and_then(|()| measure::rr(tb, client, ip, secs))
    {
        Ok(l) => row.rr_p50_us.push(l.p50_us),
        Err(e) => row.errors.push(failed("rr", e)),
    }
}

fn row_error(label: &str, what: &str, e: anyhow::Error) -> String {
    format!("{label} {what}: {e:#}")
}

/// Outbound proxy records from `client` per family, from the agent's `/config_dump`.
fn proxied(tb: &Testbed, client: &Pod) -> Result<(usize, usize)> {
    let (_, body) = tb.admin_get("/config_dump")?;
    let dump: Value = serde_json::from_str(&body).context("/config_dump")?;
    let from = |prefix: &str| {
        dump["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| {
                r["direction"] == "outbound"
                    && r["client"].as_str().is_some_and(|c| c.starts_with(prefix))
            })
            .count()
    };
    let v6 = client.ipv6.map(|ip| from(&format!("[{ip}]:"))).unwrap_or(0);
    Ok((from(&format!("{}:", client.ip)), v6))
}

/// Every (path, family) once, on one fresh dual-stack testbed.
pub fn run(opts: Options) -> Vec<FamilyRow> {
    eprintln!(
        "== IPv6 and IPv4 (round {}/{})",
        opts.round + 1,
        opts.rounds
    );
    let mut rows: Vec<FamilyRow> = PATHS
        .iter()
        .flat_map(|&path| {
            FAMILIES.iter().map(move |&family| FamilyRow {
                path,
                family,
                ..FamilyRow::default()
            })
        })
        .collect();
    if let Err(e) = run_into(&mut rows, opts.secs) {
        for row in &mut rows {
            if row.gbit_per_s.is_empty() && row.conn_per_s.is_empty() {
                row.errors.push(format!("{e:#}"));
            }
        }
    }
    rows
}

fn run_into(rows: &mut [FamilyRow], secs: u64) -> Result<()> {
    let mut tb = Testbed::builder("bench-ipv6")
        .dual_stack()
        .build()
        .context("dual-stack testbed")?;
    let dir = tb.state_dir().join("ipv6-manifests");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ipv6.yaml"), MANIFESTS)?;
    let logs = tb.state_dir().join("ipv6-logs");
    std::fs::create_dir_all(&logs)?;
    let cgroups = vec![tb.node(NodeId::A).cgroup_path().to_owned()];

    // The unenrolled pods are made while an agent answers CNI; then no agent runs.
    let agent = tb.start_agent_on(NodeId::A, &dir, &[])?;
    let pods = (|| -> Result<(Pod, Pod)> {
        Ok((
            tb.add_pod_on(NodeId::A, "v6-plain", "server")?,
            tb.add_pod_on(NodeId::A, "v6-plain", "client")?,
        ))
    })();
    agent.stop()?;
    let (server, plain_client) = pods?;
    let mut servers = Servers::start_dual_stack(&tb, &server, &logs)?;

    for row in rows.iter_mut().filter(|r| r.path == "direct") {
        measure_family(&tb, &plain_client, &mut servers, &cgroups, secs, row);
    }
    for mode in ["ebpf", "iptables"] {
        eprintln!("  one hop, {mode} mode");
        let agent = tb.start_agent_on(NodeId::A, &dir, &["--mode", mode])?;
        let result = (|| -> Result<()> {
            let client = tb.add_pod_on(NodeId::A, "v6-mesh", &format!("client-{mode}"))?;
            for row in rows.iter_mut().filter(|r| r.path == mode) {
                measure_family(&tb, &client, &mut servers, &cgroups, secs, row);
                // Right away: the agent keeps only the latest connection records, and
                // the next family's thousands would push these out.
                let (v4, v6) = proxied(&tb, &client)?;
                let seen = if row.family == "IPv4" { v4 } else { v6 };
                row.evidence.push(json!({ "proxy_records_seen": seen }));
                if seen == 0 {
                    row.errors.push(format!(
                        "{mode} {}: the proxy logged no connection from the client: not intercepted",
                        row.family
                    ));
                }
            }
            tb.del_pod(&client)?;
            Ok(())
        })();
        let stopped = agent.stop();
        result?;
        stopped.context("stopping the agent")?;
    }
    drop(servers);
    Ok(())
}

/// Rounds merged row by row.
pub fn merge(rounds: Vec<Vec<FamilyRow>>) -> Vec<FamilyRow> {
    let mut merged: Vec<FamilyRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged
            .iter_mut()
            .find(|m| m.path == row.path && m.family == row.family)
        {
            Some(m) => {
                m.gbit_per_s.extend(row.gbit_per_s);
                m.conn_per_s.extend(row.conn_per_s);
                m.connect_p50_us.extend(row.connect_p50_us);
                m.first_echo_p50_us.extend(row.first_echo_p50_us);
                m.rr_p50_us.extend(row.rr_p50_us);
                m.errors.extend(row.errors);
                m.evidence.extend(row.evidence);
            }
            None => merged.push(row),
        }
    }
    merged
}

pub const HOW_TO_READ: &str = "Ratios in brackets are to direct of the same family; \
the last column is the row's IPv6 figure over its IPv4 one (bulk, conn/s, rr p50). \
One node, an enrolled client to an unenrolled server (one proxy hop). connect p50: \
the handshake the client sees (through the proxy, with its local listener); first echo \
p50: connect until one echoed byte is back, the latency to the server itself. rr: 64-byte \
request/response round trips on one connection (`tb-pod rr`, both families).";

/// The markdown table: one line per (path, family).
pub fn table(rows: &[FamilyRow]) -> String {
    let get = |path: &str, family: &str| rows.iter().find(|r| r.path == path && r.family == family);
    let mut out = String::from(
        "| path | family | bulk Gbit/s | conn/s | connect p50 µs | first echo p50 µs | 64 B rr p50 µs | IPv6/IPv4 |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let direct = get("direct", row.family);
        let base = |f: fn(&FamilyRow) -> &Vec<f64>| direct.and_then(|d| median(f(d)));
        let bulk = with_ratio(median(&row.gbit_per_s), base(|r| &r.gbit_per_s), 2);
        let conn = with_ratio(median(&row.conn_per_s), base(|r| &r.conn_per_s), 0);
        let connect = with_ratio(median(&row.connect_p50_us), None, 0);
        let echo = with_ratio(median(&row.first_echo_p50_us), None, 0);
        let rr = with_ratio(median(&row.rr_p50_us), base(|r| &r.rr_p50_us), 0);
        let family_ratio = if row.family == "IPv6" {
            let v4 = get(row.path, "IPv4");
            let ratio = |f: fn(&FamilyRow) -> &Vec<f64>| match (
                median(f(row)),
                v4.and_then(|r| median(f(r))),
            ) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                _ => "–".into(),
            };
            format!(
                "{} / {} / {}",
                ratio(|r| &r.gbit_per_s),
                ratio(|r| &r.conn_per_s),
                ratio(|r| &r.rr_p50_us)
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {} | {} | {bulk} | {conn} | {connect} | {echo} | {rr} | {family_ratio} |\n",
            row.path, row.family
        ));
    }
    for row in rows.iter().filter(|r| !r.errors.is_empty()) {
        out.push_str(&format!(
            "\n{} {}: {}",
            row.path,
            row.family,
            row.errors.join("; ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_ratios_to_direct_and_ipv6_over_ipv4() {
        let row = |path, family, gbit: f64, conn: f64, rr: f64| FamilyRow {
            path,
            family,
            gbit_per_s: vec![gbit],
            conn_per_s: vec![conn],
            connect_p50_us: vec![50.0],
            first_echo_p50_us: vec![100.0],
            rr_p50_us: vec![rr],
            ..FamilyRow::default()
        };
        let mut rows = vec![
            row("direct", "IPv4", 10.0, 1000.0, 20.0),
            row("direct", "IPv6", 8.0, 900.0, 22.0),
            row("ebpf", "IPv4", 8.0, 500.0, 40.0),
            row("ebpf", "IPv6", 6.0, 400.0, 44.0),
        ];
        rows.push(FamilyRow {
            path: "iptables",
            family: "IPv6",
            errors: vec!["boom".into()],
            ..FamilyRow::default()
        });
        let table = table(&rows);
        assert!(
            table.contains(
                "| ebpf | IPv6 | 6.00 (0.75×) | 400 (0.44×) | 50 | 100 | 44 (2.00×) | 0.75× / 0.80× / 1.10× |"
            ),
            "{table}"
        );
        assert!(table.contains("| iptables | IPv6 | failed |"), "{table}");
        assert!(table.contains("iptables IPv6: boom"), "{table}");
    }
}
