//! What the upstream policies cost a new connection, and whether they do what they say:
//! an enrolled client dials a Service whose EndpointSlice lists [`ENDPOINTS`] unenrolled
//! echo pods, through its proxy, with no policy (round-robin, the baseline), with FSM's
//! LoadBalancerPolicy for least connections plus an UpstreamTrafficSetting
//! (`maxConnections`, `connectTimeout`) that never refuses, and with source IP hashing.
//! The latency measured is the one to the endpoint: from the start of the client's
//! connect() until a byte it sent comes back echoed, which can only happen once the proxy
//! chose an endpoint and reached it (the connect() alone returns when the local proxy
//! listener accepted). Each endpoint's kernel counts the handshakes it accepted, so the
//! distribution over the endpoints is checked against the policy: round-robin and least
//! connections (one connection at a time: every endpoint equally idle) spread over all,
//! hashing sends the one client address to one endpoint. A point whose distribution is
//! not the policy's fails. Each point is a fresh agent and client.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{NodeId, Pod, ServerProcess, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::{self, ECHO_PORT};
use super::scale::with_ratio;
use super::scenario::{median, Options};

const SERVICE_IP: &str = "10.96.3.10";
/// Echo pods behind the Service, all listed in its EndpointSlice.
pub const ENDPOINTS: usize = 3;

/// The distribution of connections over the endpoints a policy must give.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Spread {
    /// Every endpoint within `tolerance` (a fraction) of an equal share.
    Even { tolerance: f64 },
    /// One endpoint takes every connection (the client has one address).
    One,
}

impl Spread {
    /// Whether `counts` (connections per endpoint) is what the policy gives; why not.
    pub fn check(self, counts: &[u64]) -> std::result::Result<(), String> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Err("no connection reached an endpoint".into());
        }
        match self {
            Spread::Even { tolerance } => {
                let fair = total as f64 / counts.len() as f64;
                for (i, &count) in counts.iter().enumerate() {
                    let share = count as f64 / fair;
                    if (share - 1.0).abs() > tolerance {
                        return Err(format!(
                            "endpoint {i} got {count} of {total} connections ({:.0}% of an \
                             equal share; {:.0}–{:.0}% expected): {counts:?}",
                            share * 100.0,
                            (1.0 - tolerance) * 100.0,
                            (1.0 + tolerance) * 100.0
                        ));
                    }
                }
                Ok(())
            }
            Spread::One => match counts.iter().filter(|&&c| c > 0).count() {
                1 => Ok(()),
                busy => Err(format!(
                    "{busy} endpoints got connections from one client address, one expected: \
                     {counts:?}"
                )),
            },
        }
    }

    fn describe(self) -> String {
        match self {
            Spread::Even { tolerance } => format!(
                "spread over all (each {:.0}–{:.0}% of an equal share)",
                (1.0 - tolerance) * 100.0,
                (1.0 + tolerance) * 100.0
            ),
            Spread::One => "one endpoint (one client address)".into(),
        }
    }
}

/// One policy: its name, the objects that set it, the distribution it must give.
pub struct Variant {
    pub name: &'static str,
    pub objects: &'static str,
    pub spread: Spread,
}

/// The policies measured.
pub const VARIANTS: [Variant; 3] = [
    Variant {
        name: "round-robin, no policy",
        objects: "",
        // In turn: each endpoint's share is a third, give or take one connection.
        spread: Spread::Even { tolerance: 0.1 },
    },
    Variant {
        name: "least connections + maxConnections",
        objects: r#"apiVersion: gateway.flomesh.io/v1alpha1
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
        // Ties go round-robin; whether the previous connection still counts as open when
        // the next is chosen shifts the turns, not the shares, by much.
        spread: Spread::Even { tolerance: 0.5 },
    },
    Variant {
        name: "source IP hashing",
        objects: r#"apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata: {name: echo-lb, namespace: up-plain}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  ports: [{port: 9000, type: HashingLoadBalancer}]
"#,
        spread: Spread::One,
    },
];

/// How to read the table (printed under it).
pub const HOW_TO_READ: &str = "Ratios are to the same path with no policy (round-robin). \
latency to the endpoint: from the start of the client's connect() until the byte it sent \
came back from the echo endpoint, one connection at a time (the proxy's accept, its choice \
of endpoint, its connect to the endpoint and the round trip through it); connect(): when \
the client's connect() returned, which is the handshake with its local proxy listener only. \
conn/s: those exchanges back to back. Connections per endpoint: handshakes each endpoint's \
kernel accepted during the run (`Tcp: PassiveOpens` of its netns), largest first, summed \
over the rounds; a round whose distribution is not the policy's fails.";

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
    /// From connect() until the echoed byte, median of each round (µs).
    pub first_echo_p50_us: Vec<f64>,
    pub first_echo_p99_us: Vec<f64>,
    /// The client's connect() (its local proxy listener), median of each round (µs).
    pub connect_p50_us: Vec<f64>,
    pub conn_per_s: Vec<f64>,
    /// Connections each endpoint accepted, per round, in endpoint order.
    pub per_endpoint: Vec<Vec<u64>>,
    pub errors: Vec<String>,
    /// What shows the policy was in force and the connections went through the Service.
    pub evidence: Vec<Value>,
}

impl UpstreamRow {
    pub fn first_echo_p50(&self) -> Option<f64> {
        median(&self.first_echo_p50_us)
    }
    pub fn first_echo_p99(&self) -> Option<f64> {
        median(&self.first_echo_p99_us)
    }
    pub fn connect_p50(&self) -> Option<f64> {
        median(&self.connect_p50_us)
    }
    pub fn per_s(&self) -> Option<f64> {
        median(&self.conn_per_s)
    }
    fn spread(&self) -> Option<Spread> {
        VARIANTS
            .iter()
            .find(|v| v.name == self.variant)
            .map(|v| v.spread)
    }
}

fn client_name(index: usize) -> String {
    format!("client-{index}")
}

fn endpoint_name(index: usize) -> String {
    format!("echo-{index}")
}

fn manifests() -> String {
    let mut yaml = MANIFESTS.to_owned();
    for index in 0..ENDPOINTS {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: up-plain, labels: {{app: echo}}}}\n\
             spec: {{containers: [{{name: main, image: bench, ports: [{{containerPort: {ECHO_PORT}}}]}}]}}\n",
            endpoint_name(index)
        ));
    }
    for index in 0..VARIANTS.len() {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: up-mesh}}\nspec: {{containers: [{{name: main, image: bench}}]}}\n",
            client_name(index)
        ));
    }
    yaml
}

/// The Service's EndpointSlice: every endpoint pod, ready, by address.
fn endpoint_slice(pods: &[Pod]) -> String {
    let endpoints: String = pods
        .iter()
        .map(|pod| {
            format!(
                "- addresses: [{}]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {}, namespace: {}}}\n",
                pod.ip, pod.name, pod.namespace
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: echo-bench\n  namespace: up-plain\n  labels: {{kubernetes.io/service-name: echo}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: {ECHO_PORT}, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

/// One testbed for every variant: the manifests directory the agents read and the echo
/// endpoints, each pod with its server.
struct Bed {
    tb: Testbed,
    dir: PathBuf,
    endpoints: Vec<(Pod, ServerProcess)>,
}

impl Bed {
    /// The endpoint pods are made while an agent answers CNI, then run unenrolled.
    fn new() -> Result<Bed> {
        let mut tb = Testbed::builder("bench-upstream")
            .build()
            .context("testbed")?;
        let dir = tb.state_dir().join("upstream-manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("upstream.yaml"), manifests())?;
        let agent = tb.start_agent_on(NodeId::A, &dir, &[])?;
        let pods: Result<Vec<Pod>> = (0..ENDPOINTS)
            .map(|i| tb.add_pod_on(NodeId::A, "up-plain", &endpoint_name(i)))
            .collect();
        agent.stop()?;
        let pods = pods?;
        std::fs::write(dir.join("endpoints.yaml"), endpoint_slice(&pods))?;
        let mut endpoints = Vec::new();
        for pod in pods {
            let server = tb
                .spawn_server(
                    &pod,
                    &[
                        "--quiet",
                        "echo",
                        "--listen",
                        &format!("0.0.0.0:{ECHO_PORT}"),
                    ],
                )
                .with_context(|| format!("echo server in {}", pod.name))?;
            endpoints.push((pod, server));
        }
        Ok(Bed { tb, dir, endpoints })
    }

    fn check_alive(&mut self) -> Result<()> {
        for (pod, server) in &mut self.endpoints {
            if let Some(status) = server.try_wait()? {
                bail!(
                    "the echo server in {} exited ({status}): {}",
                    pod.name,
                    server.stderr()
                );
            }
        }
        Ok(())
    }

    fn passive_opens(&self) -> Result<Vec<u64>> {
        self.endpoints
            .iter()
            .map(|(pod, _)| measure::passive_opens(&pod.netns))
            .collect()
    }
}

/// What one point measured.
struct Point {
    rate: measure::ConnRate,
    per_endpoint: Vec<u64>,
    evidence: Value,
}

/// Endpoints of `up-plain/echo` in the agent's model (its EndpointSlices).
fn slice_endpoints(dump: &Value) -> usize {
    dump["model"]["endpoint_slices"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(service, _)| service.as_str() == "up-plain/echo")
        .flat_map(|(_, ports)| ports.as_array().into_iter().flatten())
        .map(|port| port["endpoints"].as_array().map_or(0, Vec::len))
        .sum()
}

/// One point: an agent with variant `index`'s objects, a fresh enrolled client.
fn point(bed: &mut Bed, index: usize, secs: u64) -> Result<Point> {
    let variant = &VARIANTS[index];
    std::fs::write(bed.dir.join("policy.yaml"), variant.objects)?;
    let agent = bed
        .tb
        .start_agent_on(NodeId::A, &bed.dir, &["--mode", "ebpf"])?;
    let result = (|| -> Result<Point> {
        let client = bed
            .tb
            .add_pod_on(NodeId::A, "up-mesh", &client_name(index))?;
        let (_, body) = bed.tb.admin_get("/config_dump")?;
        let dump: Value = serde_json::from_str(&body)?;
        let in_force: Vec<Value> = dump["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["kind"] != "VirtualService")
            .cloned()
            .collect();
        let objects_written = variant.objects.matches("\nkind: ").count();
        if in_force.len() != objects_written || in_force.iter().any(|s| s["accepted"] != true) {
            bail!("{objects_written} policies written, in force: {in_force:?}");
        }
        let listed = slice_endpoints(&dump);
        if listed != ENDPOINTS {
            bail!("the agent's EndpointSlices list {listed} endpoints of up-plain/echo, {ENDPOINTS} written");
        }
        bed.check_alive()?;
        let before = bed.passive_opens()?;
        let ip: std::net::Ipv4Addr = SERVICE_IP.parse().expect("an address");
        let rate = measure::connrate(&bed.tb, &client, ip, secs)?;
        let after = bed.passive_opens()?;
        let per_endpoint: Vec<u64> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        let (_, body) = bed.tb.admin_get("/config_dump")?;
        let dump: Value = serde_json::from_str(&body)?;
        let service = format!("up-plain/echo:{ECHO_PORT}");
        let mut proxy_view: std::collections::BTreeMap<String, u64> = Default::default();
        for record in dump["connections"].as_array().into_iter().flatten() {
            if record["target"]["service"] == service.as_str() {
                let addr = record["target"]["addr"].as_str().unwrap_or("?").to_owned();
                *proxy_view.entry(addr).or_default() += 1;
            }
        }
        if proxy_view.is_empty() {
            bail!("the proxy logged no connection to {service}");
        }
        let accepted: u64 = per_endpoint.iter().sum();
        if accepted < rate.connections {
            bail!(
                "{} exchanges completed but the endpoints accepted only {accepted} connections",
                rate.connections
            );
        }
        variant.spread.check(&per_endpoint).map_err(|why| {
            anyhow::anyhow!(
                "the connections' distribution over the endpoints is not what {} gives: {why}",
                variant.name
            )
        })?;
        let evidence = json!({
            "policies": in_force,
            "endpoints": bed.endpoints.iter().map(|(p, _)| p.ip.to_string()).collect::<Vec<_>>(),
            "accepted_per_endpoint": per_endpoint,
            "proxy_log_by_endpoint": proxy_view,
            "connrate": rate.raw,
        });
        bed.tb.del_pod(&client)?;
        Ok(Point {
            rate,
            per_endpoint,
            evidence,
        })
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
        .map(|v| UpstreamRow {
            variant: v.name,
            ..UpstreamRow::default()
        })
        .collect();
    let mut bed = match Bed::new() {
        Ok(bed) => bed,
        Err(e) => {
            for row in &mut rows {
                row.errors.push(format!("{e:#}"));
            }
            return rows;
        }
    };
    for (index, row) in rows.iter_mut().enumerate() {
        eprintln!("  {}", row.variant);
        match point(&mut bed, index, opts.secs) {
            Ok(p) => {
                row.first_echo_p50_us.push(p.rate.first_echo_p50_us);
                row.first_echo_p99_us.push(p.rate.first_echo_p99_us);
                row.connect_p50_us.push(p.rate.connect_p50_us);
                row.conn_per_s.push(p.rate.per_s);
                row.per_endpoint.push(p.per_endpoint);
                row.evidence.push(p.evidence);
            }
            Err(e) => row.errors.push(format!("{e:#}")),
        }
    }
    drop(bed);
    rows
}

/// Rounds merged variant by variant.
pub fn merge(rounds: Vec<Vec<UpstreamRow>>) -> Vec<UpstreamRow> {
    let mut merged: Vec<UpstreamRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged.iter_mut().find(|m| m.variant == row.variant) {
            Some(m) => {
                m.first_echo_p50_us.extend(row.first_echo_p50_us);
                m.first_echo_p99_us.extend(row.first_echo_p99_us);
                m.connect_p50_us.extend(row.connect_p50_us);
                m.conn_per_s.extend(row.conn_per_s);
                m.per_endpoint.extend(row.per_endpoint);
                m.errors.extend(row.errors);
                m.evidence.extend(row.evidence);
            }
            None => merged.push(row),
        }
    }
    merged
}

/// Each round's connections per endpoint sorted largest first, summed over the rounds,
/// as "n (share%)" cells.
fn distribution(per_endpoint: &[Vec<u64>]) -> String {
    let mut sums: Vec<u64> = Vec::new();
    for round in per_endpoint {
        let mut sorted = round.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        sums.resize(sums.len().max(sorted.len()), 0);
        for (sum, n) in sums.iter_mut().zip(sorted) {
            *sum += n;
        }
    }
    let total: u64 = sums.iter().sum();
    if total == 0 {
        return "—".into();
    }
    sums.iter()
        .map(|n| format!("{n} ({:.0}%)", *n as f64 * 100.0 / total as f64))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The markdown table: each variant's figures, their ratio to no policy, and the
/// distribution over the endpoints.
pub fn table(rows: &[UpstreamRow]) -> String {
    let base = rows.first();
    let mut out = String::from(
        "| policy | latency to the endpoint p50 µs | p99 µs | connect() p50 µs | conn/s | connections per endpoint, largest first | expected |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let expected = match row.spread() {
            Some(spread) if row.errors.is_empty() => format!("{}: met", spread.describe()),
            Some(spread) => format!("{}: **failed**", spread.describe()),
            None => "—".into(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            row.variant,
            with_ratio(
                row.first_echo_p50(),
                base.and_then(UpstreamRow::first_echo_p50),
                1
            ),
            with_ratio(
                row.first_echo_p99(),
                base.and_then(UpstreamRow::first_echo_p99),
                1
            ),
            with_ratio(
                row.connect_p50(),
                base.and_then(UpstreamRow::connect_p50),
                1
            ),
            with_ratio(row.per_s(), base.and_then(UpstreamRow::per_s), 0),
            distribution(&row.per_endpoint),
            expected,
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
    fn the_table_shows_ratios_to_no_policy_and_the_distribution() {
        let row = |variant, per_s: f64, per_endpoint: Vec<Vec<u64>>| UpstreamRow {
            variant,
            first_echo_p50_us: vec![80.0],
            first_echo_p99_us: vec![200.0],
            connect_p50_us: vec![30.0],
            conn_per_s: vec![per_s],
            per_endpoint,
            ..UpstreamRow::default()
        };
        let table = table(&[
            row(VARIANTS[0].name, 1000.0, vec![vec![300, 300, 400]]),
            row(
                VARIANTS[2].name,
                900.0,
                vec![vec![0, 900, 0], vec![0, 0, 100]],
            ),
        ]);
        assert!(
            table.contains(
                "| source IP hashing | 80.0 (1.00×) | 200.0 (1.00×) | 30.0 (1.00×) | 900 (0.90×) \
                 | 1000 (100%) / 0 (0%) / 0 (0%) | one endpoint (one client address): met |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| 400 (40%) / 300 (30%) / 300 (30%) |"),
            "{table}"
        );
    }

    #[test]
    fn a_failed_variant_says_why() {
        let rows = [UpstreamRow {
            variant: VARIANTS[1].name,
            errors: vec!["boom".into()],
            ..UpstreamRow::default()
        }];
        let table = table(&rows);
        assert!(table.contains("| failed | failed |"), "{table}");
        assert!(table.contains(": **failed** |"), "{table}");
        assert!(
            table.contains("least connections + maxConnections: boom"),
            "{table}"
        );
    }

    #[test]
    fn distributions_are_checked_against_the_policy() {
        let even = Spread::Even { tolerance: 0.1 };
        assert!(even.check(&[100, 100, 101]).is_ok());
        assert!(even.check(&[100, 100, 0]).is_err());
        assert!(even.check(&[0, 0, 0]).is_err());
        let loose = Spread::Even { tolerance: 0.5 };
        assert!(loose.check(&[80, 100, 120]).is_ok());
        assert!(loose.check(&[10, 100, 190]).is_err());
        assert!(Spread::One.check(&[0, 500, 0]).is_ok());
        assert!(Spread::One.check(&[1, 500, 0]).is_err());
        assert!(Spread::One.check(&[0, 0, 0]).is_err());
    }

    #[test]
    fn the_slice_lists_every_endpoint_pod() {
        let pod = |i: u8| Pod {
            namespace: "up-plain".into(),
            name: endpoint_name(usize::from(i)),
            netns: String::new(),
            netns_path: PathBuf::new(),
            container_id: String::new(),
            ip: std::net::Ipv4Addr::new(10, 244, 0, 2 + i),
            ipv6: None,
            cni_result: Value::Null,
            node: NodeId::A,
        };
        let yaml = endpoint_slice(&[pod(0), pod(1), pod(2)]);
        assert!(yaml.contains("kubernetes.io/service-name: echo"), "{yaml}");
        assert!(yaml.contains("- addresses: [10.244.0.4]\n  conditions: {ready: true}\n  targetRef: {kind: Pod, name: echo-2, namespace: up-plain}\n"), "{yaml}");
        assert_eq!(yaml.matches("- addresses:").count(), 3);
    }
}
