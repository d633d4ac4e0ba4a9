//! `tb-soak` (`cargo xtask soak --minutes N`): issue 13's soak on the local testbed. One
//! node, the agent in eBPF mode (or iptables), and for N minutes: connection churn closed
//! by FIN and by RST, request/reply connections, hits on a reset server, long-lived
//! connections, a pod added and deleted every 20-30 s, and an agent hand-over every few
//! minutes. A warm-up of the same workload (with one hand-over) comes first; after it and
//! after the soak, the load stops and settles, and the two snapshots are compared: kernel
//! map entries and pins, the live records and enrolled pods, the agent's fds, threads and
//! RSS must be back to the baseline (see `soak::report` for the limits and why). Prints a
//! table and one JSON line; exits 1 when a criterion fails, 130 when interrupted.
//! Needs root.

#[path = "../soak/mod.rs"]
mod soak;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use interceptor_testbed::{AgentProcess, NodeId, Pod, ServerProcess, Testbed};
use serde_json::json;

use soak::workload::{
    self, Ctx, Job, Worker, ADMIN_ADDRS, ECHO_PORT, ECHO_SERVICE, RESET_PORT, RESET_SERVICE,
};
use soak::{report, snapshot, unix_ms, Rng, INTERRUPTED};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "tb-soak",
    about = "Soak the agent: connection and pod churn with hand-overs, then check for leaks"
)]
struct Cli {
    /// Length of the soak proper (after the warm-up).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=1440))]
    minutes: u64,
    /// Interception mode of the agent.
    #[arg(long, value_enum, default_value_t = Mode::Ebpf)]
    mode: Mode,
    /// An agent hand-over every this many minutes of the soak.
    #[arg(long, default_value_t = 3.0)]
    handover_every_minutes: f64,
    /// Warm-up with the same workload and one hand-over (at half time) before the
    /// baseline, so the baseline agent is a post-hand-over agent with warm caches.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(10..))]
    warmup_seconds: u64,
    /// Idle time between the load's end and each snapshot; longer than the half-open
    /// timeout and tokio's 10 s idle-thread keep-alive.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    settle_seconds: u64,
    /// The agent's --inbound-half-open-timeout-ms: half-open inbound records age out
    /// within the settle period.
    #[arg(long, default_value_t = 5_000)]
    half_open_timeout_ms: u64,
    /// The agent's --drain-timeout in seconds.
    #[arg(long, default_value_t = 5)]
    drain_seconds: u64,
    /// Pods `churn-0..churn-<K-1>` known to the manifests, added and deleted in turn.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    churn_pods: u32,
    /// A pod churn every 20-30 s (random in this range, seconds).
    #[arg(long, default_value_t = 20)]
    churn_min_seconds: u64,
    #[arg(long, default_value_t = 30)]
    churn_max_seconds: u64,
    /// Seed of the random choices (printed; default from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the agents' log is copied at the end [default: <workspace>/target/soak].
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

fn workspace() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The enrolled namespace `demo` (client, server and churn pods), `legacy` with the
/// unenrolled `outsider`, the `echo` Service on both servers' 9000 and the `reset`
/// Service on server-0's reset server (9001).
fn manifests(churn_pods: u32) -> String {
    let mut y = String::from(
        "apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: reset, namespace: demo}
spec:
  clusterIP: 10.96.0.11
  selector: {role: reset}
  ports: [{name: tcp, port: 81, targetPort: 9001}]
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy}
spec:
  containers: [{name: main, image: busybox}]
",
    );
    let pod = |name: &str, labels: &str| {
        format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo, labels: {{{labels}}}}}
spec:
  containers: [{{name: main, image: busybox}}]
"
        )
    };
    y.push_str(&pod("server-0", "app: echo, role: reset"));
    y.push_str(&pod("server-1", "app: echo"));
    for i in 0..4 {
        y.push_str(&pod(&format!("client-{i}"), "app: client"));
    }
    for i in 0..churn_pods {
        y.push_str(&pod(&format!("churn-{i}"), "app: churn"));
    }
    y
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !rustix::process::geteuid().is_root() {
        eprintln!("tb-soak builds network namespaces and attaches eBPF programs: run it as root");
        return ExitCode::from(2);
    }
    // Ctrl-C and SIGTERM only raise a flag: every loop ends, every tb-pod is killed, and
    // run() returns, so the testbed is dropped and removes what it made.
    for signal in [rustix::process::Signal::INT, rustix::process::Signal::TERM] {
        // SAFETY: the action only stores to an atomic, which is async-signal-safe.
        let registered = unsafe {
            signal_hook_registry::register(signal.as_raw(), || {
                INTERRUPTED.store(true, Ordering::SeqCst)
            })
        };
        if let Err(e) = registered {
            eprintln!("tb-soak: cannot handle signal {}: {e}", signal.as_raw());
            return ExitCode::from(2);
        }
    }
    match run(&cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => {
            eprintln!("tb-soak: interrupted ({e:#}); the testbed was removed");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("tb-soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The running agent and what the hand-overs need to know about it.
struct Current {
    agent: Option<AgentProcess>,
    addr: &'static str,
    started_ms: u64,
}

impl Current {
    fn pid(&self) -> u32 {
        self.agent.as_ref().map_or(0, AgentProcess::pid)
    }

    /// Fails when the agent has exited on its own.
    fn check_alive(&mut self) -> Result<()> {
        if let Some(agent) = self.agent.as_mut() {
            if let Some(status) = agent.try_wait()? {
                let log = std::fs::read_to_string(agent.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the agent exited ({status}); log tail:\n{}",
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }
}

fn sleep_unless_interrupted(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if INTERRUPTED.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct PhasePlan<'a> {
    name: &'static str,
    length: Duration,
    /// Offsets from the phase's start at which a hand-over begins.
    handovers_at: Vec<Duration>,
    churn: (u64, u64),
    churn_names: Vec<String>,
    churn_from: &'a Pod,
    outsider: &'a Pod,
    /// Snapshot under load every this long (the soak's trend table).
    sample_every: Option<Duration>,
}

/// One phase: the workers run their rounds while this thread does the hand-overs, the pod
/// churn and the samples; at the end the workers finish their current round.
fn run_phase(
    ctx: &Ctx,
    workers: &[Worker],
    plan: &PhasePlan<'_>,
    cur: &mut Current,
    rng: &mut Rng,
    churn_counter: &mut usize,
    samples: &mut Vec<snapshot::Snapshot>,
) -> Result<()> {
    ctx.phase_over.store(false, Ordering::SeqCst);
    std::thread::scope(|scope| {
        for w in workers {
            scope.spawn(move || workload::work(ctx, w, plan.name));
        }
        let result = (|| -> Result<()> {
            let start = Instant::now();
            let end = start + plan.length;
            let mut handovers = plan.handovers_at.iter().map(|d| start + *d).peekable();
            let mut next_churn = start + Duration::from_secs(rng.range(plan.churn.0, plan.churn.1));
            let mut next_sample = plan.sample_every.map(|d| start + d);
            while Instant::now() < end {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                cur.check_alive()?;
                let now = Instant::now();
                if handovers.peek().is_some_and(|at| now >= *at) {
                    handovers.next();
                    let old = cur.agent.take().context("no agent")?;
                    let (next, addr) = workload::hand_over(ctx, old, cur.addr, cur.started_ms)?;
                    eprintln!(
                        "tb-soak: [{}] hand-over: agent {} now serves at {addr}",
                        plan.name,
                        next.pid()
                    );
                    cur.agent = Some(next);
                    cur.addr = addr;
                    cur.started_ms = unix_ms();
                    continue;
                }
                if now >= next_churn {
                    let name = &plan.churn_names[*churn_counter % plan.churn_names.len()];
                    *churn_counter += 1;
                    if !workload::churn_pod(ctx, name, plan.churn_from, plan.outsider, plan.name) {
                        eprintln!("tb-soak: [{}] pod churn of {name} failed", plan.name);
                    }
                    next_churn =
                        Instant::now() + Duration::from_secs(rng.range(plan.churn.0, plan.churn.1));
                    continue;
                }
                if let Some(at) = next_sample {
                    if now >= at {
                        match snapshot::take(&ctx.tb(), cur.addr, cur.pid()) {
                            Ok(s) => samples.push(s),
                            Err(e) => eprintln!("tb-soak: sample: {e:#}"),
                        }
                        next_sample = plan.sample_every.map(|d| at + d);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })();
        ctx.phase_over.store(true, Ordering::SeqCst);
        result
    })
}

fn run(cli: &Cli) -> Result<bool> {
    let seed = cli.seed.unwrap_or_else(unix_ms);
    let mut rng = Rng::new(seed);
    let drain = format!("{}s", cli.drain_seconds);
    let agent_args: Vec<String> = [
        "--mode",
        cli.mode.name(),
        "--drain-timeout",
        &drain,
        "--inbound-half-open-timeout-ms",
        &cli.half_open_timeout_ms.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    eprintln!(
        "tb-soak: {} min soak ({} mode, kernel {kernel}), warm-up {} s, hand-over every {} min, \
         settle {} s, seed {seed}",
        cli.minutes,
        cli.mode.name(),
        cli.warmup_seconds,
        cli.handover_every_minutes,
        cli.settle_seconds
    );

    let tb = Testbed::builder("soak")
        .build()
        .context("building the testbed")?;
    let manifests_dir = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests_dir)?;
    std::fs::write(manifests_dir.join("mesh.yaml"), manifests(cli.churn_pods))?;
    let log_src = tb.node(NodeId::A).agent_log_path();
    // Declared first, dropped last: the agent and the servers below go before the
    // testbed removes their namespaces.
    let ctx = Ctx {
        tb: std::sync::RwLock::new(tb),
        manifests: manifests_dir,
        agent_args,
        records: Mutex::new(Vec::new()),
        handovers: Mutex::new(Vec::new()),
        phase_over: AtomicBool::new(false),
    };
    let result = soak(cli, &ctx, &mut rng, seed, &kernel);
    // Kept for a look afterwards: the testbed's state dir goes with it.
    let log_dir = cli
        .log_dir
        .clone()
        .unwrap_or_else(|| workspace().join("target").join("soak"));
    if let Err(e) = keep_logs(&ctx, &log_src, &log_dir, seed) {
        eprintln!("tb-soak: keeping the logs: {e:#}");
    }
    result
}

/// The agents' log and every run's record (one JSON line each, with the hand-overs), for
/// a look at what went wrong when and where.
fn keep_logs(ctx: &Ctx, src: &Path, dir: &Path, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let dst = dir.join(format!("agent-{seed}.log"));
    std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
    let mut lines = String::new();
    for h in ctx
        .handovers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let mut j = report::handover_json(h);
        j["handover"] = json!({"launched_ms": h.launched_ms, "sigterm_ms": h.sigterm_ms,
            "exited_ms": h.exited_ms});
        lines.push_str(&format!("{j}\n"));
    }
    for r in ctx.records.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        lines.push_str(&format!("{}\n", r.to_json()));
    }
    let runs = dir.join(format!("runs-{seed}.jsonl"));
    std::fs::write(&runs, lines)?;
    eprintln!(
        "tb-soak: agent log and run records kept at {} and {}",
        dst.display(),
        runs.display()
    );
    Ok(())
}

fn soak(cli: &Cli, ctx: &Ctx, rng: &mut Rng, seed: u64, kernel: &str) -> Result<bool> {
    let args: Vec<&str> = ctx.agent_args.iter().map(String::as_str).collect();
    let first = ctx
        .tb_mut()
        .start_agent(&ctx.manifests, &args)
        .context("starting the agent")?;
    let mut cur = Current {
        agent: Some(first),
        addr: ADMIN_ADDRS[0],
        started_ms: unix_ms(),
    };
    let mut pods: BTreeMap<&str, Pod> = BTreeMap::new();
    for name in [
        "server-0", "server-1", "client-0", "client-1", "client-2", "client-3",
    ] {
        let pod = ctx.tb_mut().add_pod("demo", name)?;
        pods.insert(name, pod);
    }
    pods.insert("outsider", ctx.tb_mut().add_pod("legacy", "outsider")?);
    let echo = format!("0.0.0.0:{ECHO_PORT}");
    let reset = format!("0.0.0.0:{RESET_PORT}");
    // --quiet: no line per connection (millions of them would pile up here, and a
    // server whose stdout pipe is full stops accepting).
    let servers: Vec<ServerProcess> = [
        ("server-0", vec!["echo", "--quiet", "--listen", &echo]),
        ("server-1", vec!["echo", "--quiet", "--listen", &echo]),
        (
            "server-0",
            vec!["reset-server", "--quiet", "--listen", &reset],
        ),
    ]
    .into_iter()
    .map(|(pod, args)| ctx.tb().spawn_server(&pods[pod], &args))
    .collect::<Result<_>>()?;
    let server_1 = format!("{}:{ECHO_PORT}", pods["server-1"].ip);
    let mut seeds = Rng::new(seed ^ 0x5eed);
    let worker = |name: &str, pod: &str, job: Job, seeds: &mut Rng| Worker {
        name: name.to_owned(),
        pod: pods[pod].clone(),
        job,
        seed: seeds.next_u64(),
    };
    let workers = vec![
        worker(
            "connrate-0",
            "client-0",
            Job::Connrate {
                target: ECHO_SERVICE.into(),
                concurrency: 2,
            },
            &mut seeds,
        ),
        worker(
            "connrate-1",
            "client-1",
            Job::Connrate {
                target: ECHO_SERVICE.into(),
                concurrency: 2,
            },
            &mut seeds,
        ),
        worker(
            "tally",
            "client-2",
            Job::Tally {
                target: ECHO_SERVICE.into(),
            },
            &mut seeds,
        ),
        worker(
            "resets",
            "client-2",
            Job::Resets {
                target: RESET_SERVICE.into(),
            },
            &mut seeds,
        ),
        worker(
            "load",
            "client-3",
            Job::Load {
                target: ECHO_SERVICE.into(),
                long_lived: 8,
            },
            &mut seeds,
        ),
        // Unenrolled to enrolled: the tc path and its INBOUND_FLOWS records.
        worker(
            "inbound",
            "outsider",
            Job::Connrate {
                target: server_1,
                concurrency: 1,
            },
            &mut seeds,
        ),
    ];
    let churn_names: Vec<String> = (0..cli.churn_pods).map(|i| format!("churn-{i}")).collect();
    let churn = (
        cli.churn_min_seconds,
        cli.churn_max_seconds.max(cli.churn_min_seconds),
    );
    let mut churn_counter = 0;
    let mut samples = Vec::new();

    let warmup = PhasePlan {
        name: "warmup",
        length: Duration::from_secs(cli.warmup_seconds),
        handovers_at: vec![Duration::from_secs(cli.warmup_seconds / 2)],
        churn,
        churn_names: churn_names.clone(),
        churn_from: &pods["client-0"],
        outsider: &pods["outsider"],
        sample_every: None,
    };
    eprintln!("tb-soak: warm-up, {} s", cli.warmup_seconds);
    run_phase(
        ctx,
        &workers,
        &warmup,
        &mut cur,
        rng,
        &mut churn_counter,
        &mut samples,
    )?;
    eprintln!(
        "tb-soak: settling {} s for the baseline",
        cli.settle_seconds
    );
    sleep_unless_interrupted(Duration::from_secs(cli.settle_seconds))?;
    cur.check_alive()?;
    let baseline = snapshot::take(&ctx.tb(), cur.addr, cur.pid()).context("baseline")?;
    eprintln!("tb-soak: baseline {}", baseline.to_json());

    let soak_start_ms = unix_ms();
    let length = Duration::from_secs(cli.minutes * 60);
    let every = Duration::from_secs_f64((cli.handover_every_minutes * 60.0).max(10.0));
    let handovers_at: Vec<Duration> = (1..)
        .map(|k| every * k)
        .take_while(|d| *d < length)
        .collect();
    let plan = PhasePlan {
        name: "soak",
        length,
        handovers_at,
        churn,
        churn_names,
        churn_from: &pods["client-0"],
        outsider: &pods["outsider"],
        sample_every: Some(Duration::from_secs(60)),
    };
    eprintln!(
        "tb-soak: soak, {} min, {} hand-over(s)",
        cli.minutes,
        plan.handovers_at.len()
    );
    samples.push(baseline.clone());
    run_phase(
        ctx,
        &workers,
        &plan,
        &mut cur,
        rng,
        &mut churn_counter,
        &mut samples,
    )?;
    let soak_end_ms = unix_ms();
    eprintln!("tb-soak: load stopped; settling {} s", cli.settle_seconds);
    sleep_unless_interrupted(Duration::from_secs(cli.settle_seconds))?;
    cur.check_alive()?;
    let end = snapshot::take(&ctx.tb(), cur.addr, cur.pid()).context("end snapshot")?;
    // The trend table ends with the settled end, as it starts with the settled baseline.
    samples.push(end.clone());

    let records = ctx
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let handovers = ctx
        .handovers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let drain_ms = cli.drain_seconds * 1000;
    let checks = report::checks(&baseline, &end, &handovers);
    let pass = checks.iter().all(|c| c.pass);
    let warm = report::totals(&records, &handovers, drain_ms, "warmup");
    let main = report::totals(&records, &handovers, drain_ms, "soak");
    let soak_handovers = handovers
        .iter()
        .filter(|h| h.launched_ms >= soak_start_ms)
        .count();
    println!(
        "{}",
        report::table(&checks, &main, &warm, &handovers, &samples)
    );
    println!(
        "soak {} min ({} mode): {} hand-overs ({} in the soak), {} pod churns, {} connections ok, \
         {} expected resets, {} errors in hand-over windows, {} outside: {}",
        cli.minutes,
        cli.mode.name(),
        handovers.len(),
        soak_handovers,
        warm.pod_churns_ok + main.pod_churns_ok,
        main.connections_ok,
        main.resets,
        main.errors_in_handover,
        main.errors_outside,
        if pass { "PASS" } else { "FAIL" }
    );
    let line = json!({
        "soak": {
            "minutes": cli.minutes,
            "mode": cli.mode.name(),
            "kernel": kernel,
            "seed": seed,
            "warmup_s": cli.warmup_seconds,
            "settle_s": cli.settle_seconds,
            "handover_every_minutes": cli.handover_every_minutes,
            "drain_timeout_s": cli.drain_seconds,
            "half_open_timeout_ms": cli.half_open_timeout_ms,
            "soak_wall_s": (soak_end_ms - soak_start_ms) / 1000,
            "handovers_total": handovers.len(),
            "handovers_in_soak": soak_handovers,
            "pass": pass,
            "checks": report::checks_json(&checks),
            "warmup": warm.to_json(),
            "soak": main.to_json(),
            "baseline": baseline.to_json(),
            "end": end.to_json(),
            "handovers": handovers.iter().map(report::handover_json).collect::<Vec<_>>(),
        }
    });
    println!("{line}");
    // A clean stop: SIGTERM, drain (nothing left), pins removed by --on-exit remove.
    if let Some(agent) = cur.agent.take() {
        if let Err(e) = agent.stop() {
            eprintln!("tb-soak: stopping the last agent: {e:#}");
        }
    }
    drop(servers);
    Ok(pass)
}
