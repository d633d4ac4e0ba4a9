//! What the upstream policies cost a new connection: an enrolled client dials a Service
//! (one unenrolled echo endpoint) through the proxy with no policy (round-robin, the
//! baseline), with FSM's LoadBalancerPolicy for least connections plus an
//! UpstreamTrafficSetting (`maxConnections`, `connectTimeout`) that never refuses, and with
//! source IP hashing. Each point is a fresh agent and client.

use std::path::Path;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{NodeId, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::{self, Servers, ECHO_PORT};
use super::scale::{bed_with_server, with_ratio};
use super::scenario::{median, Options};

const SERVICE_IP: &str = "10.96.3.10";

/// The policies measured, by name, with the objects that set them.
pub const VARIANTS: [(&str, &str); 3] = [
    ("round-robin, no policy", ""),
    (
        "least connections + maxConnections",
        r#"apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata: {name: echo-lb, namespace: up-plain}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  ports: [{port: 9000, type: LeastConnectionLoadBalancer}]
---
apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata: {name: echo-limits, namespace: up-plain}
spec:
  host: echo.up-plain.svc.cluster.local
  connectionSettings:
    tcp: {maxConnections: 100000, connectTimeout: 5s}
"#,
    ),
    (
        "source IP hashing",
        r#"apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata: {name: echo-lb, namespace: up-plain}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  ports: [{port: 9000, type: HashingLoadBalancer}]
"#,
    ),
];

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: up-plain}
---
apiVersion: v1
kind: Namespace
metadata:
  name: up-mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: up-plain, labels: {app: echo}}
spec: {containers: [{name: main, image: bench, ports: [{containerPort: 9000}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: up-plain}
spec:
  clusterIP: 10.96.3.10
  selector: {app: echo}
  ports: [{name: tcp, port: 9000, targetPort: 9000}]
"#;

/// One policy variant over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UpstreamRow {
    pub variant: &'static str,
    pub connect_p50_us: Vec<f64>,
    pub conn_per_s: Vec<f64>,
    pub errors: Vec<String>,
    /// What shows the policy was in force and the connections went through the Service.
    pub evidence: Vec<Value>,
}

impl UpstreamRow {
    pub fn connect_p50(&self) -> Option<f64> {
        median(&self.connect_p50_us)
    }
    pub fn per_s(&self) -> Option<f64> {
        median(&self.conn_per_s)
    }
}

fn client_name(index: usize) -> String {
    format!("client-{index}")
}

fn manifests() -> String {
    let mut yaml = MANIFESTS.to_owned();
    for index in 0..VARIANTS.len() {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: up-mesh}}\nspec: {{containers: [{{name: main, image: bench}}]}}\n",
            client_name(index)
        ));
    }
    yaml
}

/// One point: an agent with variant `index`'s objects, a fresh enrolled client.
fn point(
    tb: &mut Testbed,
    dir: &Path,
    servers: &mut Servers,
    index: usize,
    secs: u64,
) -> Result<(f64, f64, Value)> {
    let (_, objects) = VARIANTS[index];
    std::fs::write(dir.join("policy.yaml"), objects)?;
    let agent = tb.start_agent_on(NodeId::A, dir, &["--mode", "ebpf"])?;
    let result = (|| -> Result<(f64, f64, Value)> {
        let client = tb.add_pod_on(NodeId::A, "up-mesh", &client_name(index))?;
        let (_, body) = tb.admin_get("/config_dump")?;
        let dump: Value = serde_json::from_str(&body)?;
        let in_force: Vec<Value> = dump["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["kind"] != "VirtualService")
            .cloned()
            .collect();
        let objects_written = objects.matches("\nkind: ").count();
        if in_force.len() != objects_written || in_force.iter().any(|s| s["accepted"] != true) {
            bail!("{objects_written} policies written, in force: {in_force:?}");
        }
        servers.check_alive()?;
        let ip = SERVICE_IP.parse().expect("an address");
        let rate = measure::connrate(tb, &client, ip, secs)?;
        let (_, body) = tb.admin_get("/config_dump")?;
        let dump: Value = serde_json::from_str(&body)?;
        let service = format!("up-plain/echo:{ECHO_PORT}");
        let through_service = dump["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["target"]["service"] == service.as_str())
            .count();
        if through_service == 0 {
            bail!("the proxy logged no connection to {service}");
        }
        let evidence = json!({
            "policies": in_force,
            "proxy_records_to_the_service": through_service,
            "connrate": rate.raw,
        });
        tb.del_pod(&client)?;
        Ok((rate.connect_p50_us, rate.per_s, evidence))
    })();
    let stopped = agent.stop();
    let out = result?;
    stopped.context("stopping the agent")?;
    Ok(out)
}

/// Every variant once, on one fresh testbed.
pub fn run(opts: Options) -> Vec<UpstreamRow> {
    eprintln!(
        "== upstream policies (round {}/{})",
        opts.round + 1,
        opts.rounds
    );
    let mut rows: Vec<UpstreamRow> = VARIANTS
        .iter()
        .map(|(variant, _)| UpstreamRow {
            variant,
            ..UpstreamRow::default()
        })
        .collect();
    let (mut tb, dir, mut servers) = match bed_with_server("upstream", &manifests(), "up-plain") {
        Ok(s) => s,
        Err(e) => {
            for row in &mut rows {
                row.errors.push(format!("{e:#}"));
            }
            return rows;
        }
    };
    for (index, row) in rows.iter_mut().enumerate() {
        eprintln!("  {}", row.variant);
        match point(&mut tb, &dir, &mut servers, index, opts.secs) {
            Ok((connect, per_s, evidence)) => {
                row.connect_p50_us.push(connect);
                row.conn_per_s.push(per_s);
                row.evidence.push(evidence);
            }
            Err(e) => row.errors.push(format!("{e:#}")),
        }
    }
    drop(servers);
    drop(tb);
    rows
}

/// Rounds merged variant by variant.
pub fn merge(rounds: Vec<Vec<UpstreamRow>>) -> Vec<UpstreamRow> {
    let mut merged: Vec<UpstreamRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged.iter_mut().find(|m| m.variant == row.variant) {
            Some(m) => {
                m.connect_p50_us.extend(row.connect_p50_us);
                m.conn_per_s.extend(row.conn_per_s);
                m.errors.extend(row.errors);
                m.evidence.extend(row.evidence);
            }
            None => merged.push(row),
        }
    }
    merged
}

/// The markdown table: each variant's figures and their ratio to no policy.
pub fn table(rows: &[UpstreamRow]) -> String {
    let base = rows.first();
    let mut out = String::from("| policy | connect p50 µs | conn/s |\n|---|---|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} |\n",
            row.variant,
            with_ratio(
                row.connect_p50(),
                base.and_then(UpstreamRow::connect_p50),
                1
            ),
            with_ratio(row.per_s(), base.and_then(UpstreamRow::per_s), 0),
        ));
    }
    for row in rows.iter().filter(|r| !r.errors.is_empty()) {
        out.push_str(&format!("\n{}: {}", row.variant, row.errors.join("; ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_ratios_to_no_policy() {
        let row = |variant, per_s: f64| UpstreamRow {
            variant,
            connect_p50_us: vec![30.0],
            conn_per_s: vec![per_s],
            ..UpstreamRow::default()
        };
        let table = table(&[row("a", 1000.0), row("b", 900.0)]);
        assert!(
            table.contains("| b | 30.0 (1.00×) | 900 (0.90×) |"),
            "{table}"
        );
    }
}
