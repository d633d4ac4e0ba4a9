//! The scenarios of one topology, measured on one testbed: baselines first with no agent
//! running (no program attached anywhere), then our agent(s) without and with sockmap,
//! each with fresh pods (an agent forgets its pods when it stops).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use interceptor_testbed::{AgentProcess, NodeId, Pod, Testbed};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::haproxy;
use super::measure::{self, Servers};
use super::ztunnel::{self, Ztunnel};

/// Unlabelled: its pods are never enrolled.
const PLAIN_NS: &str = "bench-plain";
/// `istio.io/dataplane-mode: ambient`: its pods are enrolled.
const MESH_NS: &str = "bench-mesh";

const MANIFESTS: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: bench-plain}
---
apiVersion: v1
kind: Namespace
metadata:
  name: bench-mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-plain}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-plain}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-sm, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-sm, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-d, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server-d, namespace: bench-mesh}
spec: {containers: [{name: main, image: bench}]}
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Topology {
    /// Client and server pod on node a.
    SameNode,
    /// Client pod on node b, server pod on node a.
    CrossNode,
}

impl Topology {
    pub fn name(self) -> &'static str {
        match self {
            Topology::SameNode => "same-node",
            Topology::CrossNode => "cross-node",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    Direct,
    Haproxy,
    Ztunnel,
    OursClient,
    OursBoth,
    OursSockmap,
    /// Both enrolled on one node, the agents run with `--same-node-direct`: one hop.
    OursDirect,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::Direct,
        Scenario::Haproxy,
        Scenario::Ztunnel,
        Scenario::OursClient,
        Scenario::OursBoth,
        Scenario::OursSockmap,
        Scenario::OursDirect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Haproxy => "haproxy (iptables REDIRECT)",
            Scenario::Ztunnel => "ztunnel (iptables REDIRECT)",
            Scenario::OursClient => "ours (client enrolled)",
            Scenario::OursBoth => "ours (both enrolled)",
            Scenario::OursSockmap => "ours + sockmap (both enrolled)",
            Scenario::OursDirect => "ours, --same-node-direct (both enrolled)",
        }
    }

    /// Whether the scenario has a row on `topology`: `--same-node-direct` changes nothing
    /// across nodes, so it has none there.
    pub fn measured_on(self, topology: Topology) -> bool {
        self != Scenario::OursDirect || topology == Topology::SameNode
    }

    pub fn is_ours(self) -> bool {
        matches!(
            self,
            Scenario::OursClient
                | Scenario::OursBoth
                | Scenario::OursSockmap
                | Scenario::OursDirect
        )
    }

    /// The issue's p50 target for our rows, as a ratio to direct.
    pub fn p50_target(self) -> Option<f64> {
        match self {
            Scenario::OursClient | Scenario::OursBoth | Scenario::OursDirect => Some(1.8),
            Scenario::OursSockmap => Some(1.5),
            _ => None,
        }
    }

    /// The issue's bulk target for our rows, as a ratio to direct: 0.9× with one proxy
    /// hop, 0.8× with two.
    pub fn bulk_target(self) -> Option<f64> {
        match self {
            Scenario::OursClient => Some(0.9),
            // Both pods enrolled: the issue's two-hop target, however many hops it takes.
            Scenario::OursBoth | Scenario::OursSockmap | Scenario::OursDirect => Some(0.8),
            _ => None,
        }
    }

    /// The issue's connection-rate target (one hop), as a ratio to direct.
    pub fn conn_target(self) -> Option<f64> {
        (self == Scenario::OursClient).then_some(0.6)
    }

    /// The most `connect()` latency one hop may add to direct's, in µs.
    pub fn connect_added_target_us(self) -> Option<f64> {
        (self == Scenario::OursClient).then_some(60.0)
    }

    /// Whether this row must also be ahead of the peers (HAProxy, ztunnel) measured in
    /// the same run: the one-hop row, the one comparable with a sidecar-style peer.
    pub fn races_peers(self) -> bool {
        self == Scenario::OursClient
    }

    /// The peers a one-hop row is compared with.
    pub fn is_peer(self) -> bool {
        self.peer_key().is_some()
    }

    /// A peer's short name ("haproxy", "ztunnel"; [`Scenario::name`] also says how it
    /// intercepts), the key of the targets' `rounds_ahead_of_peers`; `None` for direct
    /// and our rows, which are no peers.
    pub fn peer_key(self) -> Option<&'static str> {
        match self {
            Scenario::Haproxy => Some("haproxy"),
            Scenario::Ztunnel => Some("ztunnel"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Seconds per figure (latency, bulk, connection rate).
    pub secs: u64,
    /// This round (0-based) and how many there are: each round builds the testbeds and
    /// measures every scenario once, and [`merge`] takes the median over the rounds, so
    /// whatever else loads the machine is spread over all scenarios alike.
    pub round: usize,
    pub rounds: usize,
}

/// One figure over the runs: the median of the runs that worked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Cell {
    pub value: Option<f64>,
    /// Every run's value, in order.
    pub samples: Vec<f64>,
    /// Errors of the runs that failed.
    pub errors: Vec<String>,
}

impl Cell {
    fn push(&mut self, r: std::result::Result<f64, String>) {
        match r {
            Ok(v) => self.samples.push(v),
            Err(e) => self.errors.push(e),
        }
        self.value = median(&self.samples);
    }

    fn absorb(&mut self, other: Cell) {
        self.samples.extend(other.samples);
        self.errors.extend(other.errors);
        self.value = median(&self.samples);
    }
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub p50_us: Cell,
    pub p99_us: Cell,
    pub bulk_gbit_per_s: Cell,
    pub conn_per_s: Cell,
    /// `connect()` p50 of the connection-rate runs, in µs.
    pub connect_p50_us: Cell,
    pub cpu_s_per_gb: Cell,
    /// Tools that produced the latency runs ("sockperf", or "tb-pod rr" as fallback).
    pub latency_tools: Vec<String>,
    /// Failed exchanges inside connection-rate runs that otherwise worked.
    pub connrate_errors: u64,
    /// Each tool's raw numbers, per run.
    pub raw: Vec<Value>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Outcome {
    Measured { figures: Box<Figures> },
    Skipped { reason: String },
    Failed { error: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub topology: Topology,
    pub scenario: Scenario,
    pub scenario_name: &'static str,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// What shows the traffic took the path the row claims (rule and counter deltas).
    pub evidence: Value,
    /// Things a reader must know about this row (interception not observed, ...).
    pub warnings: Vec<String>,
    pub wall_s: f64,
}

impl Row {
    pub(super) fn new(topology: Topology, scenario: Scenario, outcome: Outcome) -> Row {
        Row {
            topology,
            scenario,
            scenario_name: scenario.name(),
            outcome,
            evidence: Value::Null,
            warnings: Vec::new(),
            wall_s: 0.0,
        }
    }

    fn failed(topology: Topology, scenario: Scenario, error: &anyhow::Error) -> Row {
        Row::new(
            topology,
            scenario,
            Outcome::Failed {
                error: format!("{error:#}"),
            },
        )
    }

    pub fn figures(&self) -> Option<&Figures> {
        match &self.outcome {
            Outcome::Measured { figures } => Some(figures),
            _ => None,
        }
    }
}

/// Measures every figure once from `client` to `servers`. Each figure fails on its own;
/// `check` runs before each (a dead proxy or server names itself).
fn measure_all(
    tb: &Testbed,
    client: &Pod,
    servers: &mut Servers,
    cgroups: &[PathBuf],
    opts: Options,
    label: &str,
    mut check: impl FnMut() -> Result<()>,
) -> Figures {
    let mut f = Figures::default();
    let ip = servers.ip();
    let alive = |servers: &mut Servers, check: &mut dyn FnMut() -> Result<()>| {
        servers
            .check_alive()
            .and_then(|()| check())
            .map_err(|e| format!("{e:#}"))
    };
    let run = opts.round;
    let label = format!("{label} (round {}/{})", run + 1, opts.rounds);
    {
        let mut raw = Map::new();
        raw.insert("run".into(), json!(run));

        eprintln!("  {label}: latency");
        match alive(servers, &mut check).and_then(|()| {
            measure::latency(tb, client, ip, opts.secs).map_err(|e| format!("{e:#}"))
        }) {
            Ok(l) => {
                f.p50_us.push(Ok(l.p50_us));
                f.p99_us.push(Ok(l.p99_us));
                if !f.latency_tools.contains(&l.tool) {
                    f.latency_tools.push(l.tool.clone());
                }
                raw.insert("latency".into(), l.raw);
            }
            Err(e) => {
                f.p50_us.push(Err(e.clone()));
                f.p99_us.push(Err(e.clone()));
                raw.insert("latency".into(), json!({ "error": e }));
            }
        }

        eprintln!("  {label}: bulk");
        match alive(servers, &mut check).and_then(|()| {
            measure::bulk(tb, client, ip, opts.secs, cgroups).map_err(|e| format!("{e:#}"))
        }) {
            Ok(b) => {
                f.bulk_gbit_per_s.push(Ok(b.gbit_per_s));
                f.cpu_s_per_gb.push(Ok(b.cpu_s_per_gb));
                raw.insert(
                    "bulk".into(),
                    json!({
                        "gbit_per_s": b.gbit_per_s,
                        "bytes": b.bytes,
                        "cpu_s": b.cpu_s,
                        "cpu_s_per_gb": b.cpu_s_per_gb,
                        "machine_cpu_s": b.machine_cpu_s,
                        "iperf3": b.raw,
                    }),
                );
            }
            Err(e) => {
                f.bulk_gbit_per_s.push(Err(e.clone()));
                f.cpu_s_per_gb.push(Err(e.clone()));
                raw.insert("bulk".into(), json!({ "error": e }));
            }
        }

        eprintln!("  {label}: connection rate");
        match alive(servers, &mut check).and_then(|()| {
            measure::connrate(tb, client, ip, opts.secs).map_err(|e| format!("{e:#}"))
        }) {
            Ok(c) => {
                f.conn_per_s.push(Ok(c.per_s));
                f.connect_p50_us.push(Ok(c.connect_p50_us));
                f.connrate_errors += c.errors;
                raw.insert("connrate".into(), c.raw);
            }
            Err(e) => {
                f.conn_per_s.push(Err(e.clone()));
                f.connect_p50_us.push(Err(e.clone()));
                raw.insert("connrate".into(), json!({ "error": e }));
            }
        }
        f.raw.push(Value::Object(raw));
    }
    f
}

/// One topology's testbed, its agents and where its logs go.
struct Bed {
    topology: Topology,
    client_node: NodeId,
    server_node: NodeId,
    manifests: PathBuf,
    logs: PathBuf,
    agents: Vec<(NodeId, AgentProcess)>,
    // Last: dropped after the agents were stopped.
    tb: Testbed,
}

impl Bed {
    fn new(topology: Topology) -> Result<Bed> {
        let mut tb = Testbed::builder(&format!("bench-{}", topology.name()))
            .build()
            .context("building the testbed")?;
        let (client_node, server_node) = match topology {
            Topology::SameNode => (NodeId::A, NodeId::A),
            Topology::CrossNode => (tb.add_node("b", true).context("adding node b")?, NodeId::A),
        };
        let manifests = tb.state_dir().join("bench-manifests");
        std::fs::create_dir_all(&manifests)?;
        std::fs::write(manifests.join("bench.yaml"), MANIFESTS)?;
        let logs = tb.state_dir().join("bench-logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Bed {
            topology,
            client_node,
            server_node,
            manifests,
            logs,
            agents: Vec::new(),
            tb,
        })
    }

    /// The nodes the pods of this topology live on (server node first).
    fn nodes(&self) -> Vec<NodeId> {
        let mut nodes = vec![self.server_node];
        if self.client_node != self.server_node {
            nodes.push(self.client_node);
        }
        nodes
    }

    /// The node cgroups: every pod process, HAProxy and the agents run inside them.
    fn cgroups(&self) -> Vec<PathBuf> {
        self.nodes()
            .into_iter()
            .map(|n| self.tb.node(n).cgroup_path().to_owned())
            .collect()
    }

    fn start_agents(&mut self, args: &[&str]) -> Result<()> {
        for node in self.nodes() {
            let agent = self
                .tb
                .start_agent_on(node, &self.manifests, args)
                .with_context(|| {
                    format!("starting the agent on node {}", self.tb.node(node).name())
                })?;
            self.agents.push((node, agent));
        }
        Ok(())
    }

    fn stop_agents(&mut self) -> Result<()> {
        let mut first = None;
        for (node, agent) in self.agents.drain(..) {
            if let Err(e) = agent.stop() {
                first.get_or_insert(
                    e.context(format!("stopping the agent on node {}", node.index())),
                );
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn pod(&mut self, node: NodeId, namespace: &str, name: &str) -> Result<Pod> {
        self.tb.add_pod_on(node, namespace, name).with_context(|| {
            let logs: Vec<String> = self
                .agents
                .iter()
                .map(|(n, a)| {
                    format!(
                        "agent on node {}: {}",
                        n.index(),
                        super::proc::tail(&a.log(), 5)
                    )
                })
                .collect();
            format!("adding pod {namespace}/{name}; {}", logs.join("; "))
        })
    }

    /// `datapath_counters` of each running agent, by node name.
    fn counters(&self) -> Value {
        let mut out = Map::new();
        for (node, _) in &self.agents {
            let name = self.tb.node(*node).name().to_owned();
            let value = match self.tb.admin_get_on(*node, "/config_dump") {
                Ok((200, body)) => serde_json::from_str::<Value>(&body)
                    .map(|d| d["datapath_counters"].clone())
                    .unwrap_or_else(|e| json!({ "error": e.to_string() })),
                Ok((code, body)) => json!({ "error": format!("{code}: {body}") }),
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            out.insert(name, value);
        }
        Value::Object(out)
    }

    fn measure(
        &self,
        scenario: Scenario,
        client: &Pod,
        servers: &mut Servers,
        opts: Options,
        check: impl FnMut() -> Result<()>,
    ) -> Row {
        let label = format!("[{}] {}", self.topology.name(), scenario.name());
        let figures = measure_all(
            &self.tb,
            client,
            servers,
            &self.cgroups(),
            opts,
            &label,
            check,
        );
        Row::new(
            self.topology,
            scenario,
            Outcome::Measured {
                figures: Box::new(figures),
            },
        )
    }

    /// A scenario of ours: measures with counter snapshots around it and checks that the
    /// counters show the path the scenario claims.
    fn measure_ours(
        &self,
        scenario: Scenario,
        client: &Pod,
        servers: &mut Servers,
        opts: Options,
    ) -> Row {
        let before = self.counters();
        let mut row = self.measure(scenario, client, servers, opts, || Ok(()));
        let after = self.counters();
        let delta = counter_delta(&before, &after);
        let client_node = self.tb.node(self.client_node).name().to_owned();
        let server_node = self.tb.node(self.server_node).name().to_owned();
        let moved = |node: &str, counter: &str| delta[node][counter].as_u64().unwrap_or(0) > 0;
        let mut expect = vec![(client_node.clone(), "redirected")];
        match (scenario, self.topology) {
            (Scenario::OursClient, _) => {}
            // The client's proxy connects to the server's application in its netns: no
            // packet reaches the server's tc program.
            (Scenario::OursDirect, Topology::SameNode) => {}
            (_, Topology::SameNode) => expect.push((server_node.clone(), "same_node_inbound")),
            (_, Topology::CrossNode) => expect.push((server_node.clone(), "inbound_redirected")),
        }
        if scenario == Scenario::OursSockmap && self.topology == Topology::SameNode {
            expect.push((server_node.clone(), "sockmap_redirected"));
        }
        for (node, counter) in &expect {
            if !moved(node, counter) {
                row.warnings.push(format!(
                    "interception not observed: counter {counter} on node {node} did not move"
                ));
            }
        }
        row.evidence = json!({
            "datapath_counters_delta": delta,
            "expected_to_move": expect.iter().map(|(n, c)| format!("{n}:{c}")).collect::<Vec<_>>(),
        });
        row
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Err(e) = self.stop_agents() {
            eprintln!("tb-bench: {e:#}");
        }
    }
}

/// `after - before` for every numeric counter of every node.
fn counter_delta(before: &Value, after: &Value) -> Value {
    let mut out = Map::new();
    for (node, counters) in after.as_object().into_iter().flatten() {
        let mut d = Map::new();
        for (k, v) in counters.as_object().into_iter().flatten() {
            if let (Some(a), Some(b)) = (v.as_u64(), before[node][k].as_u64()) {
                d.insert(k.clone(), json!(a.saturating_sub(b)));
            } else {
                d.insert(k.clone(), v.clone());
            }
        }
        out.insert(node.clone(), Value::Object(d));
    }
    Value::Object(out)
}

impl Figures {
    fn absorb(&mut self, other: Figures) {
        self.p50_us.absorb(other.p50_us);
        self.p99_us.absorb(other.p99_us);
        self.bulk_gbit_per_s.absorb(other.bulk_gbit_per_s);
        self.conn_per_s.absorb(other.conn_per_s);
        self.connect_p50_us.absorb(other.connect_p50_us);
        self.cpu_s_per_gb.absorb(other.cpu_s_per_gb);
        for tool in other.latency_tools {
            if !self.latency_tools.contains(&tool) {
                self.latency_tools.push(tool);
            }
        }
        self.connrate_errors += other.connrate_errors;
        self.raw.extend(other.raw);
    }

    /// A round in which the whole scenario failed counts as a failed run of each figure.
    fn absorb_failure(&mut self, round: usize, error: &str) {
        let e = format!("round {}: {error}", round + 1);
        for cell in [
            &mut self.p50_us,
            &mut self.p99_us,
            &mut self.bulk_gbit_per_s,
            &mut self.conn_per_s,
            &mut self.connect_p50_us,
            &mut self.cpu_s_per_gb,
        ] {
            cell.errors.push(e.clone());
        }
        self.raw
            .push(json!({ "run": round, "scenario_error": error }));
    }
}

/// Folds the rows of each round (`rounds[r]` from [`run`] with `round == r`) into one
/// row per topology and scenario: each figure is the median over the rounds in which it
/// worked; a scenario that failed in some rounds shows them as failed runs, one that
/// failed in every round shows the first error.
pub fn merge(rounds: Vec<Vec<Row>>) -> Vec<Row> {
    let mut merged: Vec<Row> = Vec::new();
    // (row index in `merged`, rounds it failed in with the error)
    let mut failures: Vec<Vec<(usize, String)>> = Vec::new();
    for (round, rows) in rounds.into_iter().enumerate() {
        for row in rows {
            let i = match merged
                .iter()
                .position(|m| m.topology == row.topology && m.scenario == row.scenario)
            {
                Some(i) => i,
                None => {
                    let mut first = Row::new(
                        row.topology,
                        row.scenario,
                        Outcome::Skipped {
                            reason: String::new(),
                        },
                    );
                    first.evidence = json!([]);
                    merged.push(first);
                    failures.push(Vec::new());
                    merged.len() - 1
                }
            };
            let m = &mut merged[i];
            m.wall_s += row.wall_s;
            if let Value::Array(ev) = &mut m.evidence {
                ev.push(json!({ "round": round, "evidence": row.evidence }));
            }
            m.warnings.extend(
                row.warnings
                    .into_iter()
                    .map(|w| format!("round {}: {w}", round + 1)),
            );
            match row.outcome {
                Outcome::Measured { figures } => match &mut m.outcome {
                    Outcome::Measured { figures: all } => all.absorb(*figures),
                    _ => m.outcome = Outcome::Measured { figures },
                },
                Outcome::Failed { error } => failures[i].push((round, error)),
                Outcome::Skipped { reason } => {
                    if !matches!(m.outcome, Outcome::Measured { .. }) {
                        m.outcome = Outcome::Skipped { reason };
                    }
                }
            }
        }
    }
    for (m, failed) in merged.iter_mut().zip(failures) {
        if failed.is_empty() {
            continue;
        }
        match &mut m.outcome {
            Outcome::Measured { figures } => {
                for (round, error) in &failed {
                    figures.absorb_failure(*round, error);
                }
            }
            _ => {
                let (_, first) = &failed[0];
                let error = if failed.len() > 1 {
                    format!("{first} (failed in all {} rounds)", failed.len())
                } else {
                    first.clone()
                };
                m.outcome = Outcome::Failed { error };
            }
        }
    }
    merged
}

fn timed(f: impl FnOnce() -> Row) -> Row {
    let start = Instant::now();
    let mut row = f();
    row.wall_s = start.elapsed().as_secs_f64();
    row
}

/// Runs every scenario of `topology`; a scenario that fails gets its error in its row.
pub fn run(topology: Topology, opts: Options) -> Vec<Row> {
    eprintln!(
        "== {} (round {}/{}): building the testbed",
        topology.name(),
        opts.round + 1,
        opts.rounds
    );
    let mut bed = match Bed::new(topology) {
        Ok(bed) => bed,
        Err(e) => {
            return Scenario::ALL
                .iter()
                .filter(|s| s.measured_on(topology))
                .map(|s| Row::failed(topology, *s, &e))
                .collect()
        }
    };
    let mut rows = Vec::new();

    // Baselines: pods made while the agents run (the CNI chain asks them), then the
    // agents stop, which detaches every program: nothing intercepts.
    let plain = (|| -> Result<(Pod, Servers)> {
        bed.start_agents(&[])?;
        let server = bed.pod(bed.server_node, PLAIN_NS, "server")?;
        let client = bed.pod(bed.client_node, PLAIN_NS, "client")?;
        bed.stop_agents()?;
        let servers = Servers::start(&bed.tb, &server, &bed.logs)?;
        Ok((client, servers))
    })();
    let ztunnel_bin = ztunnel::binary();
    let mut plain = match plain {
        Ok(p) => Some(p),
        Err(e) => {
            let e = e.context("setting up the unenrolled pods");
            rows.push(Row::failed(topology, Scenario::Direct, &e));
            rows.push(Row::failed(topology, Scenario::Haproxy, &e));
            if ztunnel_bin.is_ok() {
                rows.push(Row::failed(topology, Scenario::Ztunnel, &e));
            }
            None
        }
    };
    if let Some((client, servers)) = plain.as_mut() {
        rows.push(timed(|| {
            let mut row = bed.measure(Scenario::Direct, client, servers, opts, || Ok(()));
            row.evidence = json!({ "agents_running": 0 });
            row
        }));
        rows.push(timed(|| haproxy_row(&bed, client, servers, opts)));
        if let Ok(bin) = &ztunnel_bin {
            rows.push(timed(|| ztunnel_row(&bed, bin, client, servers, opts)));
        }
    }
    if let Err(reason) = ztunnel_bin {
        rows.push(Row::new(
            topology,
            Scenario::Ztunnel,
            Outcome::Skipped { reason },
        ));
    }

    // Ours without sockmap: the enrolled client first against the unenrolled server
    // (one proxy hop, a sidecar on the client only), then against an enrolled server.
    rows.extend(ours_rows(&mut bed, plain.as_mut(), opts, Agents::Default));
    // Ours with sockmap, fresh agents and pods.
    rows.extend(ours_rows(&mut bed, None, opts, Agents::Sockmap));
    if Scenario::OursDirect.measured_on(topology) {
        rows.extend(ours_rows(&mut bed, None, opts, Agents::SameNodeDirect));
    }
    drop(plain);
    rows
}

fn haproxy_row(bed: &Bed, client: &Pod, servers: &mut Servers, opts: Options) -> Row {
    let mut h = match haproxy::start(&bed.tb, client, servers.ip(), &bed.logs) {
        Ok(h) => h,
        Err(e) => {
            return Row::failed(
                bed.topology,
                Scenario::Haproxy,
                &e.context("starting haproxy"),
            )
        }
    };
    let rules = h.rules().unwrap_or_else(|e| format!("{e:#}"));
    let mut row = bed.measure(Scenario::Haproxy, client, servers, opts, || h.check_alive());
    let redirected = h.redirected_connections();
    row.evidence = json!({
        "iptables_rules": rules.lines().collect::<Vec<_>>(),
        "redirected_connections": redirected.as_ref().map_err(|e| format!("{e:#}")).ok(),
    });
    match redirected {
        Ok(0) => row
            .warnings
            .push("interception not observed: the REDIRECT rules matched no connection".into()),
        Ok(_) => {}
        Err(e) => row.warnings.push(format!(
            "could not read the REDIRECT rules' counters: {e:#}"
        )),
    }
    row
}

/// ztunnel as the client's sidecar-style proxy (see [`ztunnel`]). The row fails, with
/// its figures in the evidence, when the counters show that the tools' traffic did not
/// all go through ztunnel.
fn ztunnel_row(
    bed: &Bed,
    bin: &std::path::Path,
    client: &Pod,
    servers: &mut Servers,
    opts: Options,
) -> Row {
    let client_node = bed.tb.node(bed.client_node).name().to_owned();
    let server_node = bed.tb.node(bed.server_node).name().to_owned();
    let server_pod = servers.pod.clone();
    let mut z = match Ztunnel::start(
        &bed.tb,
        bin,
        &ztunnel::Workload {
            pod: client,
            node: &client_node,
        },
        &ztunnel::Workload {
            pod: &server_pod,
            node: &server_node,
        },
        &bed.logs,
    ) {
        Ok(z) => z,
        Err(e) => {
            return Row::failed(
                bed.topology,
                Scenario::Ztunnel,
                &e.context("starting ztunnel"),
            )
        }
    };
    let rules = z.sidecar.rules().unwrap_or_else(|e| format!("{e:#}"));
    let before = z.stats(&bed.tb, client);
    let mut row = bed.measure(Scenario::Ztunnel, client, servers, opts, || {
        z.sidecar.check_alive()
    });
    let after = z.stats(&bed.tb, client);
    let redirected = z.sidecar.redirected_connections();
    let expected = ztunnel::Expected::from_raw(row.figures().map_or(&[], |f| &f.raw));
    let through = before.and_then(|b| Ok(after?.delta(&b)));
    let checked = match (&redirected, &through) {
        (Ok(n), Ok(through)) => ztunnel::verify(*n, through, &expected),
        (Err(e), _) | (_, Err(e)) => Err(anyhow::anyhow!("{e:#}")),
    };
    row.evidence = json!({
        "ztunnel_version": z.version,
        "ztunnel_env": z.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "ztunnel_workloads": z.workloads,
        "iptables_rules": rules.lines().collect::<Vec<_>>(),
        "redirected_connections": redirected.as_ref().ok(),
        "ztunnel_outbound_delta": through.as_ref().ok().map(|s| s.to_json()),
        "tools_connections": expected.connections,
        "tools_bulk_bytes": expected.bulk_bytes,
    });
    drop(z);
    if let Err(e) = checked {
        let measured = match &row.outcome {
            Outcome::Measured { figures } => json!({
                "p50_us": figures.p50_us.value,
                "bulk_gbit_per_s": figures.bulk_gbit_per_s.value,
                "conn_per_s": figures.conn_per_s.value,
            }),
            _ => Value::Null,
        };
        row.evidence["discarded_figures"] = measured;
        row.outcome = Outcome::Failed {
            error: format!(
                "{:#}",
                e.context("checking the traffic went through ztunnel")
            ),
        };
    }
    row
}

/// How the agents of one batch of our rows run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Agents {
    Default,
    Sockmap,
    SameNodeDirect,
}

/// The enrolled scenarios of one agent configuration: with the default agents, "client
/// enrolled" against the unenrolled server (when there is one) and "both enrolled"; with
/// `--sockmap` or `--same-node-direct`, only "both enrolled" (on fresh pods).
fn ours_rows(
    bed: &mut Bed,
    plain: Option<&mut (Pod, Servers)>,
    opts: Options,
    agents: Agents,
) -> Vec<Row> {
    let topology = bed.topology;
    let (both, args, suffix): (Scenario, &[&str], &str) = match agents {
        Agents::Sockmap => (Scenario::OursSockmap, &["--sockmap"], "-sm"),
        Agents::SameNodeDirect => (Scenario::OursDirect, &["--same-node-direct"], "-d"),
        Agents::Default => (Scenario::OursBoth, &[], ""),
    };
    let client_row = agents == Agents::Default;
    let scenarios = match client_row {
        true => vec![Scenario::OursClient, both],
        false => vec![both],
    };
    let mut rows = Vec::new();
    if let Err(e) = bed.start_agents(args) {
        return scenarios
            .iter()
            .map(|s| Row::failed(topology, *s, &e))
            .collect();
    }
    let client = match bed.pod(bed.client_node, MESH_NS, &format!("client{suffix}")) {
        Ok(p) => p,
        Err(e) => {
            let _ = bed.stop_agents();
            return scenarios
                .iter()
                .map(|s| Row::failed(topology, *s, &e))
                .collect();
        }
    };
    if client_row {
        match plain {
            Some((_, servers)) => {
                rows.push(timed(|| {
                    bed.measure_ours(Scenario::OursClient, &client, servers, opts)
                }));
            }
            None => rows.push(Row::failed(
                topology,
                Scenario::OursClient,
                &anyhow::anyhow!("no unenrolled server (its setup failed, see direct)"),
            )),
        }
    }
    let server = bed
        .pod(bed.server_node, MESH_NS, &format!("server{suffix}"))
        .and_then(|pod| Ok((Servers::start(&bed.tb, &pod, &bed.logs)?, pod)));
    match server {
        Ok((mut servers, server_pod)) => {
            rows.push(timed(|| {
                bed.measure_ours(both, &client, &mut servers, opts)
            }));
            drop(servers);
            if let Err(e) = bed.tb.del_pod(&server_pod) {
                eprintln!("tb-bench: {e:#}");
            }
        }
        Err(e) => rows.push(Row::failed(
            topology,
            both,
            &e.context("setting up the enrolled server"),
        )),
    }
    if let Err(e) = bed.tb.del_pod(&client) {
        eprintln!("tb-bench: {e:#}");
    }
    if let Err(e) = bed.stop_agents() {
        for row in &mut rows {
            row.warnings.push(format!("after the run: {e:#}"));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn cell_keeps_errors_and_the_median_of_successes() {
        let mut c = Cell::default();
        c.push(Ok(5.0));
        c.push(Err("boom".into()));
        c.push(Ok(7.0));
        assert_eq!(c.value, Some(6.0));
        assert_eq!(c.errors, ["boom"]);
    }

    #[test]
    fn counter_delta_subtracts_per_node() {
        let before = json!({"a": {"redirected": 3, "x": 1}});
        let after = json!({"a": {"redirected": 10, "x": 1}, "b": {"redirected": 2}});
        let d = counter_delta(&before, &after);
        assert_eq!(d["a"]["redirected"], 7);
        assert_eq!(d["a"]["x"], 0);
        // No earlier snapshot: the raw value stays.
        assert_eq!(d["b"]["redirected"], 2);
    }

    fn measured(p50: f64) -> Row {
        let mut f = Figures::default();
        f.p50_us.push(Ok(p50));
        Row::new(
            Topology::SameNode,
            Scenario::Direct,
            Outcome::Measured {
                figures: Box::new(f),
            },
        )
    }

    #[test]
    fn merge_takes_medians_over_rounds_and_counts_failed_rounds() {
        let failed = Row::new(
            Topology::SameNode,
            Scenario::Direct,
            Outcome::Failed {
                error: "boom".into(),
            },
        );
        let skipped = || {
            Row::new(
                Topology::SameNode,
                Scenario::Ztunnel,
                Outcome::Skipped {
                    reason: "ZTUNNEL_BIN not set".into(),
                },
            )
        };
        let rows = merge(vec![
            vec![measured(10.0), skipped()],
            vec![failed.clone(), skipped()],
            vec![measured(30.0), skipped()],
        ]);
        assert_eq!(rows.len(), 2);
        let f = rows[0].figures().unwrap();
        assert_eq!(f.p50_us.value, Some(20.0));
        assert_eq!(f.p50_us.errors, ["round 2: boom"]);
        assert!(matches!(rows[1].outcome, Outcome::Skipped { .. }));

        let rows = merge(vec![vec![failed.clone()], vec![failed]]);
        match &rows[0].outcome {
            Outcome::Failed { error } => assert_eq!(error, "boom (failed in all 2 rounds)"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn targets_only_for_our_rows() {
        assert_eq!(Scenario::Direct.p50_target(), None);
        assert_eq!(Scenario::OursBoth.p50_target(), Some(1.8));
        assert_eq!(Scenario::OursSockmap.p50_target(), Some(1.5));
        assert_eq!(Scenario::OursClient.bulk_target(), Some(0.9));
        assert_eq!(Scenario::OursBoth.bulk_target(), Some(0.8));
        assert_eq!(Scenario::OursClient.conn_target(), Some(0.6));
        assert_eq!(Scenario::OursBoth.conn_target(), None);
        assert_eq!(Scenario::Haproxy.bulk_target(), None);
    }
}
