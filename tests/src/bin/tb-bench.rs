//! `tb-bench` (`cargo xtask bench`): the interceptor against the direct path and the
//! classic sidecar on the local testbed. Same-node and cross-node; direct, HAProxy behind
//! iptables REDIRECT, ztunnel (when `ZTUNNEL_BIN` is set), our agent with the client
//! enrolled, with both enrolled, and with sockmap. For each: 64-byte request/response
//! latency (p50, p99), bulk throughput, new connections per second and CPU seconds per
//! GB, all measured in the same run and shown as ratios to direct. Then the exclusion
//! scale check: connect p50 and connections per second with 1 to 10,000 exclusion CIDRs,
//! eBPF vs iptables mode. TLS passthrough and UDP through `interceptor gateway` against
//! direct. Prints markdown tables and saves them with the raw numbers and
//! machine facts under `bench/results/`.
//! Needs root. See bench/README.md for how to read the table.

#[path = "../bench/mod.rs"]
mod bench;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use bench::report::{self, Report};
use bench::scenario::{self, Options, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Both,
    SameNode,
    CrossNode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Every part: the topology table, the exclusion scale check, the upstream
    /// policies, pod start-up at scale, IPv6 beside IPv4, and TLS passthrough and UDP
    /// through the gateway.
    All,
    /// Only the topology table.
    Topologies,
    /// Only the exclusion scale check.
    Scale,
    /// Only the cost of the upstream policies.
    Upstream,
    /// Only pod start-up (CNI ADD) and agent memory with models of 10 to 10,000 pods.
    ScalePods,
    /// Only IPv6 beside IPv4 on one proxy hop (dual-stack pods), both modes.
    Ipv6,
    /// Only TLS passthrough and UDP through `interceptor gateway` against direct.
    GatewayL4,
}

#[derive(Parser, Debug)]
#[command(
    name = "tb-bench",
    about = "Benchmark the interceptor against direct, HAProxy and ztunnel on the local testbed"
)]
struct Cli {
    /// A smoke run: 2 s per figure instead of 5, one run instead of 3 (its result files
    /// get a `-quick` suffix).
    #[arg(long)]
    quick: bool,
    /// Seconds per figure [default: 5, or 2 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: Option<u64>,
    /// Rounds: each measures every scenario once (fresh testbeds), and the table shows
    /// each figure's median over the rounds [default: 3, or 1 with --quick].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=50))]
    repeat: Option<u64>,
    /// Which topologies to measure.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    topology: Which,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Part::All)]
    part: Part,
    /// Where the result files go [default: <workspace>/bench/results].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Print the table only; write no result files.
    #[arg(long)]
    no_save: bool,
    /// Free text saved with the results, e.g. what build was measured.
    #[arg(long)]
    note: Option<String>,
    /// How idle CPUs wait during the run: `poll` holds a 0 µs PM QoS request on
    /// /dev/cpu_dma_latency (as tuned's latency-performance profile does), so a wake-up
    /// costs no exit from a halted VM CPU; `system` leaves the machine's idle states.
    #[arg(long, value_enum, default_value_t = CpuIdle::Poll)]
    cpu_idle: CpuIdle,
    /// Pod start-up: the model sizes (pods) measured [default: 10,1000,10000].
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u64).range(1..=100_000))]
    model_pods: Vec<u64>,
    /// Pod start-up: enrolled pods added through the chain per model size [default: 100]
    /// (a node's bridge takes at most 1,023 ports).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000))]
    probes: Option<u64>,
    /// Pod start-up: the agent's --tc-attach values measured [default: netlink,tcx].
    #[arg(long, value_delimiter = ',', value_enum)]
    tc_attach: Vec<TcAttach>,
    /// Pod start-up: enrolled pods of the memory row, 0 for none [default: 1000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1_000))]
    memory_pods: Option<u64>,
    /// Pod start-up: leave out memory per idle connection.
    #[arg(long)]
    no_idle: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CpuIdle {
    Poll,
    System,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TcAttach {
    Netlink,
    Tcx,
}

impl Cli {
    /// The pod start-up part's plan: the whole part unless narrowed. A value given twice
    /// counts once (rows with the same key merge, so it would be measured twice a round).
    fn scale_pods_plan(&self) -> Result<bench::scale_pods::Plan> {
        let mut plan = bench::scale_pods::Plan::default();
        if !self.model_pods.is_empty() {
            plan.model_pods = Vec::new();
            for &n in &self.model_pods {
                let n = usize::try_from(n)?;
                if !plan.model_pods.contains(&n) {
                    plan.model_pods.push(n);
                }
            }
        }
        if let Some(probes) = self.probes {
            plan.probes = usize::try_from(probes)?;
        }
        if !self.tc_attach.is_empty() {
            plan.tc_attach = Vec::new();
            for t in &self.tc_attach {
                let name = match t {
                    TcAttach::Netlink => "netlink",
                    TcAttach::Tcx => "tcx",
                };
                if !plan.tc_attach.contains(&name) {
                    plan.tc_attach.push(name);
                }
            }
        }
        match self.memory_pods {
            Some(0) => plan.memory_pods = None,
            Some(n) => plan.memory_pods = Some(usize::try_from(n)?),
            None => {}
        }
        plan.idle = !self.no_idle;
        Ok(plan)
    }
}

fn workspace() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if !rustix::process::geteuid().is_root() {
        bail!("tb-bench builds network namespaces and attaches eBPF programs: run it as root");
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs = cli.seconds.unwrap_or(if cli.quick { 2 } else { 5 });
    let rounds = usize::try_from(cli.repeat.unwrap_or(if cli.quick { 1 } else { 3 }))?;
    let scale_pods_plan = cli.scale_pods_plan()?;
    let topologies: Vec<Topology> = match cli.topology {
        Which::Both => vec![Topology::SameNode, Topology::CrossNode],
        Which::SameNode => vec![Topology::SameNode],
        Which::CrossNode => vec![Topology::CrossNode],
    };
    // Held until main returns; the kernel drops it with the descriptor however we exit.
    let idle_hold = match cli.cpu_idle {
        CpuIdle::Poll => Some(
            bench::cpu_idle::LatencyHold::hold(0)
                .context("holding idle CPUs to polling (--cpu-idle system measures without)")?,
        ),
        CpuIdle::System => None,
    };
    let facts = bench::facts::collect(&workspace(), bench::cpu_idle::describe(idle_hold.as_ref()));
    eprintln!(
        "tb-bench: {} s per figure, {} run(s) each, topologies {:?}; kernel {}, {} CPUs, load {}; {}",
        secs,
        rounds,
        topologies.iter().map(|t| t.name()).collect::<Vec<_>>(),
        facts.kernel,
        facts.cpus,
        facts.loadavg_at_start,
        facts.cpu_idle
    );
    let start = Instant::now();
    // Round-robin: every round measures every scenario once, so load from elsewhere on
    // the machine falls on all of them alike; the table takes the median over rounds.
    let mut rounds_rows = Vec::new();
    let mut rounds_scale = Vec::new();
    let mut rounds_upstream = Vec::new();
    let mut rounds_scale_pods = Vec::new();
    let mut rounds_ipv6 = Vec::new();
    let mut rounds_gateway_l4 = Vec::new();
    for round in 0..rounds {
        let opts = Options {
            secs,
            round,
            rounds,
        };
        if matches!(cli.part, Part::All | Part::Topologies) {
            let mut rows = Vec::new();
            for &topology in &topologies {
                rows.extend(scenario::run(topology, opts));
            }
            rounds_rows.push(rows);
        }
        if matches!(cli.part, Part::All | Part::Scale) {
            rounds_scale.push(bench::scale::run(opts));
        }
        if matches!(cli.part, Part::All | Part::Upstream) {
            rounds_upstream.push(bench::upstream::run(opts));
        }
        if matches!(cli.part, Part::All | Part::ScalePods) {
            rounds_scale_pods.push(bench::scale_pods::run(opts, &scale_pods_plan));
        }
        if matches!(cli.part, Part::All | Part::Ipv6) {
            rounds_ipv6.push(bench::ipv6::run(opts));
        }
        if matches!(cli.part, Part::All | Part::GatewayL4) {
            rounds_gateway_l4.push(bench::gateway_l4::run(opts));
        }
    }
    let rows = scenario::merge(rounds_rows);
    let scale = bench::scale::merge(rounds_scale);
    let upstream = bench::upstream::merge(rounds_upstream);
    let scale_pods = bench::scale_pods::merge(rounds_scale_pods);
    let ipv6 = bench::ipv6::merge(rounds_ipv6);
    let gateway_l4 = bench::gateway_l4::merge(rounds_gateway_l4);
    let report = Report {
        facts: &facts,
        secs,
        rounds,
        args: &args,
        rows: &rows,
        scale: &scale,
        upstream: &upstream,
        scale_pods: &scale_pods,
        ipv6: &ipv6,
        gateway_l4: &gateway_l4,
        wall_s: start.elapsed().as_secs_f64(),
        loadavg_at_end: bench::facts::loadavg(),
        note: cli.note.clone(),
    };
    println!("{}", report::summary(&report));
    if !cli.no_save {
        let markdown = report::markdown(&report);
        let json = report::json(&report, &markdown);
        let mut stem = format!("{}-{}", facts.date_utc, facts.hostname);
        if cli.quick {
            stem.push_str("-quick");
        }
        if cli.part == Part::Scale {
            stem.push_str("-scale");
        } else if cli.part == Part::Upstream {
            stem.push_str("-upstream");
        } else if cli.part == Part::ScalePods {
            stem.push_str("-scale-pods");
        } else if cli.part == Part::Ipv6 {
            stem.push_str("-ipv6");
        } else if cli.part == Part::GatewayL4 {
            stem.push_str("-gateway-l4");
        } else if cli.topology != Which::Both {
            stem.push_str(if cli.topology == Which::SameNode {
                "-same-node"
            } else {
                "-cross-node"
            });
        }
        let dir = cli
            .out_dir
            .unwrap_or_else(|| workspace().join("bench").join("results"));
        let (md, js) = report::save(&dir, &stem, &markdown, &json)?;
        println!("Saved {} and {}", md.display(), js.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;
    use crate::bench::scale_pods::Plan;

    fn plan(args: &[&str]) -> Plan {
        let cli = Cli::try_parse_from([&["tb-bench"], args].concat()).expect("valid options");
        cli.scale_pods_plan().expect("a plan")
    }

    #[test]
    fn the_pod_start_up_options_narrow_the_plan() {
        let whole = plan(&[]);
        assert_eq!(whole.model_pods, [10, 1_000, 10_000]);
        assert_eq!(whole.tc_attach, ["netlink", "tcx"]);
        assert_eq!(whole.memory_pods, Some(1_000));
        assert!(whole.idle);
        let narrow = plan(&[
            "--model-pods",
            "10000,10,10000",
            "--probes",
            "60",
            "--tc-attach",
            "tcx,netlink,tcx",
            "--memory-pods",
            "0",
            "--no-idle",
        ]);
        assert_eq!(
            narrow.model_pods,
            [10_000, 10],
            "a size given twice counts once"
        );
        assert_eq!(narrow.probes, 60);
        assert_eq!(narrow.tc_attach, ["tcx", "netlink"]);
        assert_eq!(narrow.memory_pods, None, "0 means no memory row");
        assert!(!narrow.idle);
        assert_eq!(plan(&["--memory-pods", "200"]).memory_pods, Some(200));
        for bad in [
            ["--probes", "1001"],
            ["--memory-pods", "1001"],
            ["--model-pods", "0"],
        ] {
            assert!(
                Cli::try_parse_from([&["tb-bench"], &bad[..]].concat()).is_err(),
                "{bad:?} must be refused"
            );
        }
    }
}
