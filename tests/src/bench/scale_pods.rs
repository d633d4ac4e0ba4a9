//! Pod start-up at cluster scale: how long interceptor-cni's share of a CNI ADD takes
//! when the agent's model holds 10, 1,000 or 10,000 pods (one Service per ten pods,
//! selecting them by label, the way a Service without EndpointSlices is resolved), and
//! what the agent costs in memory and threads with that model. Each size gets a fresh
//! agent; [`PROBES`] enrolled pods are then added one after another through the real
//! chain (bridge, host-local, interceptor-cni) and each plugin is timed.
//!
//! Then the agent's memory against issue 14's targets: its RSS with [`MEMORY_PROBES`]
//! pods enrolled through the chain on one node (≤ 50 MB + 50 KB per pod), and per idle
//! proxied connection with up to [`IDLE_CONNECTIONS`] of them open at once (≤ 16 KiB).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interceptor_testbed::{NodeId, PodSubnets, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::measure::ECHO_PORT;
use super::scenario::{median, Options};

/// Model sizes (pods; Services are a tenth of that).
pub const POD_COUNTS: [usize; 3] = [10, 1_000, 10_000];
/// Enrolled pods added through the chain per size: 100, so that over 3 rounds the p99
/// (nearest rank) is the 4th-slowest of 300 ADDs. With 20 it was the slowest of 60, one
/// ADD: at 10,000 model pods, a round's first ADD took 39.3, 16.4 and 23.6 ms in
/// `bench/results/2026-12-06-vm-scale-pods`, `2026-12-07-vm-scale-pods` and its `-2`,
/// while the other 57 of each run took at most 16.8, 8.1 and 10.1 ms.
pub const PROBES: usize = 100;
/// Enrolled pods of the memory row, all on one node: its testbed gets a pod subnet
/// larger than the default /24 (253 addresses), see [`subnet_prefix_for`].
pub const MEMORY_PROBES: usize = 1_000;
/// Concurrent idle proxied connections of the memory rows (issue 14), or as many as the
/// agent's open-file limit allows.
pub const IDLE_CONNECTIONS: usize = 10_000;
/// The agent's `--tc-attach` values measured: TCX waits for RCU grace periods per pod.
pub const TC_ATTACH: [&str; 2] = ["netlink", "tcx"];

/// What the part measures. The default is the whole part as issue 14 asks; tb-bench's
/// `--model-pods`, `--probes`, `--tc-attach`, `--memory-pods` and `--no-idle` narrow it,
/// so an A/B of two builds can repeat one row many times (the command line is saved with
/// the results).
#[derive(Clone, Debug)]
pub struct Plan {
    /// Model sizes, each a row per `tc_attach`.
    pub model_pods: Vec<usize>,
    /// Enrolled pods added through the chain per row.
    pub probes: usize,
    /// `--tc-attach` values; the memory row uses the first.
    pub tc_attach: Vec<&'static str>,
    /// Enrolled pods of the memory row (none: no memory row).
    pub memory_pods: Option<usize>,
    /// Whether to measure memory per idle connection.
    pub idle: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            model_pods: POD_COUNTS.to_vec(),
            probes: PROBES,
            tc_attach: TC_ATTACH.to_vec(),
            memory_pods: Some(MEMORY_PROBES),
            idle: true,
        }
    }
}

impl Plan {
    /// The rows, in order, before they are measured.
    fn rows(&self) -> Vec<PodsRow> {
        let row = |tc_attach, pods: usize, enrolled, memory| PodsRow {
            pods,
            enrolled,
            memory,
            tc_attach,
            services: (pods / 10).max(1),
            ..PodsRow::default()
        };
        let sizes = self.tc_attach.iter().flat_map(|&tc_attach| {
            self.model_pods
                .iter()
                .map(move |&pods| row(tc_attach, pods, self.probes, false))
        });
        // Memory per enrolled pod: a small model and many pods enrolled.
        let memory = self
            .memory_pods
            .zip(self.tc_attach.first())
            .map(|(enrolled, &tc_attach)| row(tc_attach, POD_COUNTS[0], enrolled, true));
        sizes.chain(memory).collect()
    }
}

/// One model size over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PodsRow {
    pub pods: usize,
    /// Enrolled pods added through the chain.
    pub enrolled: usize,
    /// The memory row: its RSS is held against the per-enrolled-pod target.
    pub memory: bool,
    /// `--tc-attach` of the agent.
    pub tc_attach: &'static str,
    pub services: usize,
    /// interceptor-cni's ADD, each probe (ms).
    pub plugin_ms: Vec<f64>,
    /// The whole chain's ADD, each probe (ms).
    pub chain_ms: Vec<f64>,
    /// Agent RSS after the probes were enrolled (KiB), per round.
    pub rss_kib: Vec<f64>,
    /// Agent RSS once the model was loaded, before the first probe (KiB), per round.
    pub rss_before_kib: Vec<f64>,
    /// Agent threads after the probes were enrolled, per round.
    pub threads: Vec<f64>,
    /// Seconds the probes' ADDs took one after another, per round.
    pub enroll_s: Vec<f64>,
    /// The node's pod subnet.
    pub pod_subnet: String,
    pub errors: Vec<String>,
}

/// Agent RSS target with `pods` enrolled (issue 14): 50 MB + 50 KB per pod, in KiB
/// (decimal MB and KB, the stricter reading).
pub fn rss_target_kib(pods: usize) -> f64 {
    (50e6 + 50e3 * pods as f64) / 1024.0
}

/// Memory per idle proxied connection target (issue 14), KiB.
pub const IDLE_TARGET_KIB: f64 = 16.0;

/// The longest pod subnet prefix (the default /24 when it is enough) whose addresses
/// hold `pods` pods on one node.
pub fn subnet_prefix_for(pods: usize) -> u8 {
    (PodSubnets::MIN_PREFIX_LEN..=PodSubnets::MAX_PREFIX_LEN)
        .rev()
        .find(|&len| PodSubnets::new(len).is_ok_and(|s| s.pod_capacity() >= pods))
        .unwrap_or(PodSubnets::MIN_PREFIX_LEN)
}

/// The `q` quantile (0..=1) of `values`, nearest rank.
fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn manifests(pods: usize, probes: usize) -> String {
    let services = (pods / 10).max(1);
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: probe\n  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    for i in 0..pods {
        // Remote pods of the cluster: addresses outside the testbed's pod range.
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 200, 0, 1)) + i as u32);
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: w{i}, namespace: fleet, labels: {{app: s{}}}}}\n\
             spec: {{containers: [{{name: main, image: bench, ports: [{{name: tcp, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: {ip}}}\n",
            i % services
        ));
    }
    for j in 0..services {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{j}, namespace: fleet}}\n\
             spec: {{clusterIP: {}, selector: {{app: s{j}}}, ports: [{{name: tcp, port: 80, targetPort: tcp}}]}}\n",
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 97, 0, 1)) + j as u32)
        ));
    }
    for k in 0..probes {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{k}, namespace: probe}}\n\
             spec: {{containers: [{{name: main, image: bench}}]}}\n"
        ));
    }
    yaml
}

fn point(pods: usize, row: &mut PodsRow) -> Result<()> {
    let mut tb = Testbed::builder(&format!("scalepods{pods}{}", row.tc_attach))
        .pod_subnet_prefix(subnet_prefix_for(row.enrolled))
        .build()?;
    row.pod_subnet = tb.node(NodeId::A).pod_subnet();
    let dir = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&dir)?;
    let probes = row.enrolled;
    std::fs::write(dir.join("model.yaml"), manifests(pods, probes))?;
    let agent = tb.start_agent_on(
        NodeId::A,
        &dir,
        &["--mode", "ebpf", "--tc-attach", row.tc_attach],
    )?;
    let result = (|| -> Result<()> {
        // Ready means the first model is loaded; make sure it is the whole one.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (_, body) = tb.admin_get("/config_dump")?;
            let dump: serde_json::Value = serde_json::from_str(&body)?;
            let loaded = dump["model"]["pods"].as_object().map_or(0, |p| p.len());
            if loaded >= pods + probes {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "the model holds {loaded} pods after 120 s, {} expected",
                    pods + probes
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        row.rss_before_kib
            .push(interceptor_testbed::proc_status(agent.pid())?.rss_kib as f64);
        let enrolling = Instant::now();
        for k in 0..probes {
            let started = std::time::Instant::now();
            tb.add_pod_on(NodeId::A, "probe", &format!("p{k}"))?;
            row.chain_ms.push(started.elapsed().as_secs_f64() * 1000.0);
            let plugin = tb
                .last_add_timings()
                .into_iter()
                .find(|(ty, _)| ty == "interceptor-cni")
                .map(|(_, took)| took.as_secs_f64() * 1000.0);
            match plugin {
                Some(ms) => row.plugin_ms.push(ms),
                None => bail!("no interceptor-cni in the chain's timings"),
            }
        }
        row.enroll_s.push(enrolling.elapsed().as_secs_f64());
        let status = interceptor_testbed::proc_status(agent.pid())?;
        row.threads.push(status.threads as f64);
        row.rss_kib.push(status.rss_kib as f64);
        Ok(())
    })();
    let stopped = agent.stop();
    result?;
    stopped?;
    Ok(())
}

/// How the idle connections of a memory row were left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleKind {
    /// Connected through the proxy to the server, and never carried a byte.
    #[default]
    Silent,
    /// Each carried one line each way, then idle: a keep-alive connection between
    /// requests.
    AfterExchange,
}

impl IdleKind {
    pub const ALL: [IdleKind; 2] = [IdleKind::Silent, IdleKind::AfterExchange];

    pub fn describe(self) -> &'static str {
        match self {
            IdleKind::Silent => "idle proxied connections that never carried a byte",
            IdleKind::AfterExchange => "idle proxied connections after one exchange each",
        }
    }

    /// The client pod that holds them.
    fn client(self) -> &'static str {
        match self {
            IdleKind::Silent => "silent",
            IdleKind::AfterExchange => "exchange",
        }
    }
}

/// One kind of idle connections over the rounds; every vector has one entry per round
/// that worked.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleRow {
    pub kind: IdleKind,
    /// [`IDLE_CONNECTIONS`].
    pub wanted: usize,
    /// Connections held open at once.
    pub held: Vec<f64>,
    /// The agent's open-file limit (soft, which it raises to the hard one).
    pub fd_limit: Vec<f64>,
    /// Agent RSS (KiB) after a warm-up, before the connections.
    pub rss_before_kib: Vec<f64>,
    /// Agent RSS (KiB) with every connection open and idle.
    pub rss_kib: Vec<f64>,
    pub fds_before: Vec<f64>,
    pub fds: Vec<f64>,
    /// Seconds until the server had accepted every connection.
    pub open_s: Vec<f64>,
    pub errors: Vec<String>,
    pub evidence: Vec<Value>,
}

impl IdleRow {
    fn new(kind: IdleKind) -> Self {
        IdleRow {
            kind,
            wanted: IDLE_CONNECTIONS,
            ..IdleRow::default()
        }
    }

    /// What each held connection added to a per-round figure (`after` minus `before`),
    /// the median over the rounds.
    fn per_connection(&self, after: &[f64], before: &[f64]) -> Option<f64> {
        let per: Vec<f64> = after
            .iter()
            .zip(before)
            .zip(&self.held)
            .filter(|(_, &held)| held > 0.0)
            .map(|((after, before), held)| (after - before) / held)
            .collect();
        median(&per)
    }

    /// Agent fds per held connection, the median over the rounds.
    pub fn fds_per_connection(&self) -> Option<f64> {
        self.per_connection(&self.fds, &self.fds_before)
    }

    /// Agent RSS per held connection (KiB), the median over the rounds.
    pub fn kib_per_connection(&self) -> Option<f64> {
        self.per_connection(&self.rss_kib, &self.rss_before_kib)
    }
}

/// The scale-pods part: pod start-up rows and the idle-connection memory rows.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScalePods {
    pub rows: Vec<PodsRow>,
    pub idle: Vec<IdleRow>,
}

impl ScalePods {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.idle.is_empty()
    }
}

pub fn run(opts: Options, plan: &Plan) -> ScalePods {
    let rows = plan
        .rows()
        .into_iter()
        .map(|mut row| {
            let (pods, enrolled, tc_attach) = (row.pods, row.enrolled, row.tc_attach);
            eprintln!(
                "tb-bench: pod start-up with a model of {pods} pods, {enrolled} enrolled, \
                 --tc-attach {tc_attach} (round {}/{})",
                opts.round + 1,
                opts.rounds
            );
            if let Err(e) = point(pods, &mut row) {
                row.errors.push(format!("{e:#}"));
            }
            row
        })
        .collect();
    ScalePods {
        rows,
        idle: match plan.idle {
            true => idle_rows(opts),
            false => Vec::new(),
        },
    }
}

/// Connections of the warm-up before the idle baseline: the agent's first connections
/// allocate what later ones reuse (tokio's slabs, the allocator's arenas).
const IDLE_WARM_UP: usize = 200;
/// Agent fds left free when sizing the idle connections: the splice pipe pool (up to 256
/// pipes), admin requests, the health checker.
const FD_MARGIN: usize = 600;
/// Idle connections are opened by `tb-pod hold` processes of this many each, the next
/// started once the server has accepted every earlier one: a client that sends nothing
/// would otherwise outrun the proxy, overflow its listener's backlog (1,024) and wait for
/// SYN retransmissions.
const HOLD_BATCH: usize = 500;
/// How long a batch holds its connections at most; they are killed once measured.
const HOLD_CAP_MS: u64 = 600_000;
/// The Service the idle connections go through (its one endpoint: the echo server).
const IDLE_SERVICE: &str = "10.96.4.10";

const IDLE_MANIFESTS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: idle-plain}\n\
---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: idle-mesh\n  labels: {istio.io/dataplane-mode: ambient}\n\
---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: idle-plain, labels: {app: idle}}\n\
spec: {containers: [{name: main, image: bench, ports: [{containerPort: 9000}]}]}\n\
---\napiVersion: v1\nkind: Service\nmetadata: {name: idle, namespace: idle-plain}\n\
spec: {clusterIP: 10.96.4.10, selector: {app: idle}, ports: [{name: tcp, port: 9000, targetPort: 9000}]}\n";

fn idle_manifests() -> String {
    let mut yaml = IDLE_MANIFESTS.to_owned();
    for kind in IdleKind::ALL {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: idle-mesh}}\nspec: {{containers: [{{name: main, image: bench}}]}}\n",
            kind.client()
        ));
    }
    yaml
}

/// Open fds of process `pid`.
fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("reading {dir}"))?
        .count())
}

/// The soft "Max open files" of process `pid`.
fn open_file_limit(pid: u32) -> Result<usize> {
    let path = format!("/proc/{pid}/limits");
    let limits = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_open_file_limit(&limits).with_context(|| format!("no Max open files in {path}"))
}

fn parse_open_file_limit(limits: &str) -> Option<usize> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether process `pid` still runs (not exited, not a zombie waiting to be reaped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

/// What one kind of idle connections measured.
struct IdleMeasure {
    held: usize,
    fd_limit: usize,
    rss_before_kib: u64,
    rss_kib: u64,
    fds_before: usize,
    fds: usize,
    open_s: f64,
    evidence: Value,
}

fn run_args(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `tb-pod hold` arguments: `count` connections to `target`, kept `hold_ms`.
fn hold_args(kind: IdleKind, target: &str, count: usize, hold_ms: u64) -> Vec<String> {
    let mut args: Vec<String> = [
        "hold",
        "--connect",
        target,
        "--count",
        &count.to_string(),
        "--hold-ms",
        &hold_ms.to_string(),
        "--io-timeout-ms",
        "10000",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    if kind == IdleKind::Silent {
        args.push("--silent".into());
    }
    args
}

/// Connections the agent counts open to Service endpoints (`/config_dump`
/// `upstream_endpoints`).
fn agent_open_upstreams(tb: &Testbed) -> Result<u64> {
    let (_, body) = tb.admin_get("/config_dump")?;
    let dump: Value = serde_json::from_str(&body)?;
    Ok(dump["upstream_endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["open"].as_u64())
        .sum())
}

/// The agent's fd count once it stops moving (two reads 200 ms apart agree), or at
/// `deadline`.
fn settled_fds(pid: u32, deadline: Instant) -> Result<usize> {
    let mut fds = open_fds(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = open_fds(pid)?;
        if now == fds || Instant::now() > deadline {
            return Ok(now);
        }
        fds = now;
    }
}

/// A fresh agent and client of `kind`: after a warm-up, the agent's RSS and fds, then
/// [`IDLE_CONNECTIONS`] connections (or as many as the agent's open-file limit allows)
/// opened through the client's proxy to a Service whose endpoint is the unenrolled echo
/// server, in batches, and held idle; the agent's RSS and fds again once the server
/// accepted them all and the agent counts them all open.
fn idle_point(
    tb: &mut Testbed,
    dir: &Path,
    server: &interceptor_testbed::Pod,
    kind: IdleKind,
) -> Result<IdleMeasure> {
    let agent = tb.start_agent_on(NodeId::A, dir, &["--mode", "ebpf"])?;
    let result = (|| -> Result<IdleMeasure> {
        let client = tb.add_pod_on(NodeId::A, "idle-mesh", kind.client())?;
        let pid = agent.pid();
        let target = format!("{IDLE_SERVICE}:{ECHO_PORT}");
        let warm_args = hold_args(kind, &target, IDLE_WARM_UP, 0);
        let warm = tb.run_tb_pod(&client, &run_args(&warm_args), Duration::from_secs(60))?;
        if warm["errors"] != 0 || warm["open"] != IDLE_WARM_UP {
            bail!("warm-up through the proxy failed: {warm}");
        }
        // The warm-up's connections close (FIN through the proxy).
        let settle = Instant::now() + Duration::from_secs(10);
        while agent_open_upstreams(tb)? > 0 && Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(100));
        }
        let fd_limit = open_file_limit(pid)?;
        let fds_before = settled_fds(pid, settle)?;
        let rss_before_kib = interceptor_testbed::proc_status(pid)?.rss_kib;
        let accepted_before = super::measure::passive_opens(&server.netns)?;
        let accepted = || -> Result<u64> {
            Ok(super::measure::passive_opens(&server.netns)?.saturating_sub(accepted_before))
        };
        let started = Instant::now();
        let deadline =
            started + Duration::from_secs(60) + Duration::from_millis(5 * IDLE_CONNECTIONS as u64);
        let mut runs = Vec::new();
        let mut opened = 0usize;
        let mut fds = fds_before;
        // Fds each connection costs the agent, learned batch by batch (the first ones
        // reuse pooled pipes); until then, the most it can be: two sockets, two pipes.
        let mut fds_each = 6.0;
        let mut batches = Vec::new();
        while opened < IDLE_CONNECTIONS {
            let headroom = fd_limit.saturating_sub(fds + FD_MARGIN);
            let batch = HOLD_BATCH
                .min(IDLE_CONNECTIONS - opened)
                .min((headroom as f64 / fds_each) as usize);
            if batch == 0 {
                break;
            }
            runs.push(tb.spawn_tb_pod(
                &client,
                &run_args(&hold_args(kind, &target, batch, HOLD_CAP_MS)),
            )?);
            opened += batch;
            loop {
                let so_far = accepted()?;
                if so_far >= opened as u64 {
                    break;
                }
                if let Some(ended) = runs.iter().position(|r| !running(r.pid())) {
                    let report = runs
                        .swap_remove(ended)
                        .finish(Duration::from_secs(10), None);
                    bail!(
                        "a batch of connections ended early ({so_far} of {opened} accepted): \
                         {report:?}"
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "the server accepted {so_far} of {opened} connections in {:.0?} \
                         (the agent counts {:?} open, holds {:?} fds)",
                        started.elapsed(),
                        agent_open_upstreams(tb),
                        open_fds(pid)
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let now = settled_fds(pid, deadline)?;
            if now > fds {
                fds_each = ((now - fds) as f64 / batch as f64).max(2.0);
            }
            batches.push(json!({
                "connections": batch,
                "agent_fds": now,
                "agent_rss_kib": interceptor_testbed::proc_status(pid)?.rss_kib,
            }));
            fds = now;
        }
        let open_s = started.elapsed().as_secs_f64();
        // Settled: the agent counts them all open and its fd count stopped moving.
        while agent_open_upstreams(tb)? < opened as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let fds = settled_fds(pid, deadline)?;
        let rss_kib = interceptor_testbed::proc_status(pid)?.rss_kib;
        let agent_open = agent_open_upstreams(tb)?;
        let server_accepted = accepted()?;
        if let Some(ended) = runs.iter().position(|r| !running(r.pid())) {
            let report = runs
                .swap_remove(ended)
                .finish(Duration::from_secs(10), None);
            bail!("a batch of connections ended before the measurement: {report:?}");
        }
        if agent_open != opened as u64 {
            bail!(
                "{opened} connections opened, the agent counts {agent_open} open to the \
                 Service's endpoint"
            );
        }
        // Every batch still holds its connections: measured; they close with the batches.
        drop(runs);
        tb.del_pod(&client)?;
        Ok(IdleMeasure {
            held: opened,
            fd_limit,
            rss_before_kib,
            rss_kib,
            fds_before,
            fds,
            open_s,
            evidence: json!({
                "fd_limit": fd_limit,
                "agent_fds_before": fds_before,
                "agent_fds_with_connections": fds,
                "agent_fds_per_connection": (fds as f64 - fds_before as f64) / opened as f64,
                "agent_open_to_the_endpoint": agent_open,
                "server_accepted": server_accepted,
                "batches": batches,
                "warm_up": warm,
            }),
        })
    })();
    let stopped = agent.stop();
    let out = result?;
    stopped.context("stopping the agent")?;
    Ok(out)
}

/// Both kinds of idle connections, each with a fresh agent, on one testbed whose
/// unenrolled server pod runs `tb-pod echo`.
fn idle_rows(opts: Options) -> Vec<IdleRow> {
    let mut rows: Vec<IdleRow> = IdleKind::ALL.into_iter().map(IdleRow::new).collect();
    let bed = (|| -> Result<_> {
        let mut tb = Testbed::new("scalepodsidle")?;
        let dir = tb.state_dir().join("idle-manifests");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("idle.yaml"), idle_manifests())?;
        let agent = tb.start_agent_on(NodeId::A, &dir, &[])?;
        let server = tb.add_pod_on(NodeId::A, "idle-plain", "server");
        agent.stop()?;
        let server = server?;
        let echo = tb.spawn_server(
            &server,
            &[
                "--quiet",
                "echo",
                "--listen",
                &format!("0.0.0.0:{ECHO_PORT}"),
            ],
        )?;
        Ok((tb, dir, server, echo))
    })();
    let (mut tb, dir, server, echo) = match bed {
        Ok(bed) => bed,
        Err(e) => {
            for row in &mut rows {
                row.errors.push(format!("{e:#}"));
            }
            return rows;
        }
    };
    for row in &mut rows {
        eprintln!(
            "tb-bench: agent memory with up to {IDLE_CONNECTIONS} {} (round {}/{})",
            row.kind.describe(),
            opts.round + 1,
            opts.rounds
        );
        match idle_point(&mut tb, &dir, &server, row.kind) {
            Ok(m) => {
                row.held.push(m.held as f64);
                row.fd_limit.push(m.fd_limit as f64);
                row.rss_before_kib.push(m.rss_before_kib as f64);
                row.rss_kib.push(m.rss_kib as f64);
                row.fds_before.push(m.fds_before as f64);
                row.fds.push(m.fds as f64);
                row.open_s.push(m.open_s);
                row.evidence.push(m.evidence);
            }
            Err(e) => row.errors.push(format!("{e:#}")),
        }
    }
    drop(echo);
    drop(tb);
    rows
}

/// Rounds joined: every probe's time counts.
pub fn merge(rounds: Vec<ScalePods>) -> ScalePods {
    let mut merged = ScalePods::default();
    for round in rounds {
        for row in round.rows {
            match merged.rows.iter_mut().find(|m| {
                m.pods == row.pods
                    && m.tc_attach == row.tc_attach
                    && m.enrolled == row.enrolled
                    && m.memory == row.memory
            }) {
                Some(m) => {
                    m.plugin_ms.extend(row.plugin_ms);
                    m.chain_ms.extend(row.chain_ms);
                    m.rss_kib.extend(row.rss_kib);
                    m.rss_before_kib.extend(row.rss_before_kib);
                    m.threads.extend(row.threads);
                    m.enroll_s.extend(row.enroll_s);
                    m.errors.extend(row.errors);
                }
                None => merged.rows.push(row),
            }
        }
        for row in round.idle {
            match merged.idle.iter_mut().find(|m| m.kind == row.kind) {
                Some(m) => {
                    m.held.extend(row.held);
                    m.fd_limit.extend(row.fd_limit);
                    m.rss_before_kib.extend(row.rss_before_kib);
                    m.rss_kib.extend(row.rss_kib);
                    m.fds_before.extend(row.fds_before);
                    m.fds.extend(row.fds);
                    m.open_s.extend(row.open_s);
                    m.errors.extend(row.errors);
                    m.evidence.extend(row.evidence);
                }
                None => merged.idle.push(row),
            }
        }
    }
    merged
}

fn ms(value: Option<f64>) -> String {
    value.map_or("—".into(), |v| format!("{v:.1}"))
}

/// The markdown table, with the target (interceptor-cni's ADD p99 ≤ 20 ms at every
/// size) per row.
pub fn table(part: &ScalePods) -> String {
    let mut out = String::from(
        "| tc attach | model pods | Services | enrolled | interceptor-cni ADD p50 ms | p99 ms | whole chain p50 ms | p99 ms | agent RSS MiB before → after | KiB per enrolled pod | agent threads | p99 ≤ 20 ms |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in &part.rows {
        let p99 = quantile(&row.plugin_ms, 0.99);
        let verdict = if !row.errors.is_empty() {
            format!("failed: {}", row.errors.join("; "))
        } else {
            match p99 {
                Some(v) if v <= 20.0 => "met".into(),
                Some(v) => format!("**missed** by {:.1} ms", v - 20.0),
                None => "—".into(),
            }
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.tc_attach,
            row.pods,
            row.services,
            row.enrolled,
            ms(quantile(&row.plugin_ms, 0.5)),
            ms(p99),
            ms(quantile(&row.chain_ms, 0.5)),
            ms(quantile(&row.chain_ms, 0.99)),
            match (median(&row.rss_before_kib), median(&row.rss_kib)) {
                (Some(before), Some(after)) =>
                    format!("{:.1} → {:.1}", before / 1024.0, after / 1024.0),
                _ => "—".into(),
            },
            match (median(&row.rss_before_kib), median(&row.rss_kib)) {
                (Some(before), Some(after)) if row.enrolled > 0 =>
                    format!("{:.0}", (after - before) / row.enrolled as f64),
                _ => "—".into(),
            },
            median(&row.threads).map_or("—".into(), |t| format!("{t:.0}")),
            verdict
        ));
    }
    out
}

/// How to read [`memory_table`] (printed under it).
pub const MEMORY_HOW_TO_READ: &str = "Agent RSS (`VmRSS`: the agent's user-space memory; the \
kernel's socket and pipe structures are not in it), the median over the rounds. Enrolled \
pods: a fresh agent whose model already lists them, RSS before the first ADD and after the \
last; the pods are network namespaces made one after another by the real chain (bridge, \
host-local, interceptor-cni) on one node whose pod subnet is larger than the testbed's \
default /24 (a Linux bridge takes at most 1,023 ports, so one node holds about 1,000 pods). \
Idle connections: an enrolled client pod opens them one after another through its proxy to \
a Service whose endpoint is an unenrolled echo server, in batches of up to 500 (the next \
once the server has accepted the previous), and keeps them open; RSS after a warm-up of \
200 connections, and once the server's kernel accepted them all, the agent counted them \
all open and its fd count stopped moving. Each idle proxied connection holds its two \
sockets in the agent (a pipe is taken only by a direction that moves bulk, and goes back \
to the pool when the connection ends; the fds column shows what was measured). So the \
agent's open-file limit (its hard limit, which it raises its soft limit to) bounds how \
many one agent holds; the row opens as many of the 10,000 as fit and says so.";

fn mib(kib: Option<f64>) -> String {
    kib.map_or("—".into(), |k| format!("{:.1}", k / 1024.0))
}

/// Whether the part has a memory row or idle-connection rows to show.
pub fn measured_memory(part: &ScalePods) -> bool {
    part.rows.iter().any(|r| r.memory) || !part.idle.is_empty()
}

/// The agent memory table against issue 14's targets: RSS with the memory row's pods
/// enrolled (≤ 50 MB + 50 KB per pod) and per idle proxied connection (≤ 16 KiB).
pub fn memory_table(part: &ScalePods) -> String {
    let mut out = String::from(
        "| agent memory | count | RSS MiB before | RSS MiB with them | per pod or connection | target | verdict | took s |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let failed = |errors: &[String]| format!("failed: {}", errors.join("; "));
    if let Some(row) = part.rows.iter().find(|r| r.memory) {
        let (before, after) = (median(&row.rss_before_kib), median(&row.rss_kib));
        let target = rss_target_kib(row.enrolled);
        let verdict = match after {
            _ if !row.errors.is_empty() => failed(&row.errors),
            Some(after) if after <= target => "met".into(),
            Some(after) => format!("**missed** by {:.1} MiB", (after - target) / 1024.0),
            None => "—".into(),
        };
        out.push_str(&format!(
            "| enrolled pods (CNI chain, one node, pod subnet {}, --tc-attach {}, model of {} pods) | {} | {} | {} | {} | RSS ≤ 50 MB + 50 KB × {} = {:.1} MiB | {} | {} |\n",
            row.pod_subnet,
            row.tc_attach,
            row.pods,
            row.enrolled,
            mib(before),
            mib(after),
            match (before, after) {
                (Some(b), Some(a)) => format!("{:.1} KiB per pod", (a - b) / row.enrolled as f64),
                _ => "—".into(),
            },
            row.enrolled,
            target / 1024.0,
            verdict,
            median(&row.enroll_s).map_or("—".into(), |s| format!("{s:.0} (enrolling)")),
        ));
    }
    for row in &part.idle {
        let per = row.kib_per_connection();
        let verdict = match per {
            _ if !row.errors.is_empty() => failed(&row.errors),
            Some(per) if per <= IDLE_TARGET_KIB => "met".into(),
            Some(per) => format!("**missed** by {:.1} KiB", per - IDLE_TARGET_KIB),
            None => "—".into(),
        };
        let fds_each = row
            .fds_per_connection()
            .map_or(String::new(), |f| format!(", {f:.1} agent fds each"));
        let count = match (median(&row.held), median(&row.fd_limit)) {
            (Some(held), Some(limit)) if (held as usize) < row.wanted => format!(
                "{held:.0} of {} (the most the agent's open-file limit, {limit:.0}, allows{fds_each})",
                row.wanted,
            ),
            (Some(held), _) => format!("{held:.0}{fds_each}"),
            _ => format!("{} wanted", row.wanted),
        };
        out.push_str(&format!(
            "| {} (client enrolled, server not) | {} | {} | {} | {} | ≤ {IDLE_TARGET_KIB:.0} KiB per connection | {} | {} |\n",
            row.kind.describe(),
            count,
            mib(median(&row.rss_before_kib)),
            mib(median(&row.rss_kib)),
            per.map_or("—".into(), |p| format!("{p:.1} KiB per connection")),
            verdict,
            median(&row.open_s).map_or("—".into(), |s| format!("{s:.1} (opening)")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_row_gets_a_subnet_that_holds_its_pods() {
        assert_eq!(subnet_prefix_for(PROBES), 24);
        assert_eq!(subnet_prefix_for(253), 24);
        assert_eq!(subnet_prefix_for(254), 23);
        assert_eq!(subnet_prefix_for(MEMORY_PROBES), 22);
        assert!(
            PodSubnets::new(subnet_prefix_for(MEMORY_PROBES))
                .unwrap()
                .pod_capacity()
                >= MEMORY_PROBES
        );
    }

    #[test]
    fn targets() {
        // 50 MB + 50 KB per pod, in KiB.
        assert_eq!(rss_target_kib(0), 50e6 / 1024.0);
        assert!((rss_target_kib(1_000) / 1024.0 - 95.37).abs() < 0.01);
    }

    #[test]
    fn reads_the_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95368                95368                processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_file_limit(limits), Some(20_000));
        assert_eq!(parse_open_file_limit("Max processes 1 1\n"), None);
        assert!(running(std::process::id()));
    }

    #[test]
    fn the_default_plan_is_the_whole_part_and_a_narrow_one_keeps_its_rows() {
        let key = |r: &PodsRow| (r.tc_attach, r.pods, r.enrolled, r.memory, r.services);
        let rows: Vec<_> = Plan::default().rows().iter().map(key).collect();
        assert_eq!(
            rows,
            [
                ("netlink", 10, 100, false, 1),
                ("netlink", 1_000, 100, false, 100),
                ("netlink", 10_000, 100, false, 1_000),
                ("tcx", 10, 100, false, 1),
                ("tcx", 1_000, 100, false, 100),
                ("tcx", 10_000, 100, false, 1_000),
                ("netlink", 10, 1_000, true, 1),
            ]
        );
        let narrow = Plan {
            model_pods: vec![10_000],
            probes: 60,
            tc_attach: vec!["netlink"],
            memory_pods: None,
            idle: false,
        };
        let rows: Vec<_> = narrow.rows().iter().map(key).collect();
        assert_eq!(rows, [("netlink", 10_000, 60, false, 1_000)]);
    }

    #[test]
    fn the_memory_table_checks_both_targets() {
        let pods = PodsRow {
            pods: 10,
            enrolled: MEMORY_PROBES,
            memory: true,
            tc_attach: "netlink",
            services: 1,
            rss_before_kib: vec![17_000.0],
            rss_kib: vec![37_480.0],
            enroll_s: vec![31.0],
            pod_subnet: "10.244.0.0/22".into(),
            ..PodsRow::default()
        };
        let mut idle = IdleRow::new(IdleKind::Silent);
        idle.held.push(9_000.0);
        idle.fd_limit.push(20_000.0);
        idle.fds_before.push(100.0);
        idle.fds.push(36_100.0);
        idle.rss_before_kib.push(20_000.0);
        idle.rss_kib.push(47_000.0);
        idle.open_s.push(4.0);
        let mut exchanged = IdleRow::new(IdleKind::AfterExchange);
        exchanged.errors.push("boom".into());
        // A start-up row that enrolled as many pods is not the memory row.
        let start_up = PodsRow {
            pods: 10,
            enrolled: MEMORY_PROBES,
            tc_attach: "netlink",
            rss_before_kib: vec![1.0],
            rss_kib: vec![2.0],
            ..PodsRow::default()
        };
        // Two rounds: the memory row's figures merge with each other only.
        let round = |rss_kib: f64| ScalePods {
            rows: vec![
                start_up.clone(),
                PodsRow {
                    rss_kib: vec![rss_kib],
                    ..pods.clone()
                },
            ],
            idle: Vec::new(),
        };
        let mut merged = merge(vec![round(37_480.0), round(37_480.0)]);
        assert_eq!(merged.rows.len(), 2, "{:?}", merged.rows);
        assert!(measured_memory(&merged));
        assert!(!measured_memory(&ScalePods {
            rows: vec![start_up.clone()],
            idle: Vec::new(),
        }));
        merged.idle = vec![idle, exchanged];
        let table = memory_table(&merged);
        assert!(
            table.contains("| 1000 | 16.6 | 36.6 | 20.5 KiB per pod | RSS ≤ 50 MB + 50 KB × 1000 = 95.4 MiB | met | 31 (enrolling) |"),
            "{table}"
        );
        assert!(
            table.contains("| 9000 of 10000 (the most the agent's open-file limit, 20000, allows, 4.0 agent fds each) | 19.5 | 45.9 | 3.0 KiB per connection | ≤ 16 KiB per connection | met | 4.0 (opening) |"),
            "{table}"
        );
        assert!(table.contains("| failed: boom |"), "{table}");
    }

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.5), Some(10.0));
        assert_eq!(quantile(&values, 0.99), Some(20.0));
        assert_eq!(quantile(&[], 0.5), None);
        // 100 probes over 3 rounds: three ADDs may be slower than the p99.
        let values: Vec<f64> = (1..=300).map(f64::from).collect();
        assert_eq!(quantile(&values, 0.99), Some(297.0));
    }

    #[test]
    fn the_model_has_every_pod_service_and_probe() {
        let yaml = manifests(1_000, PROBES);
        assert_eq!(yaml.matches("kind: Pod\n").count(), 1_000 + PROBES);
        assert_eq!(yaml.matches("kind: Service\n").count(), 100);
        assert!(
            yaml.contains("podIP: 10.200.3.232"),
            "the 1,000th pod's address"
        );
    }
}
