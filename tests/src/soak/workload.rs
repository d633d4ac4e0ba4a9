//! The soak's workload: workers that each run `tb-pod` in rounds of 10-20 s until their
//! phase ends (connection churn closed by RST or FIN, request/reply connections, hits on a
//! reset server, long-lived connections), pod churn (add a pod, a few connections from
//! and to it, delete it) and the agent hand-over. Every run leaves a [`RunRecord`]; the
//! report sorts them into hand-over windows and the rest afterwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use interceptor_testbed::{AgentProcess, NodeId, Pod, Testbed};
use serde_json::Value;

use super::{unix_ms, Rng, INTERRUPTED};

/// ClusterIP:port of the `echo` Service (server-0 and server-1, port 9000).
pub const ECHO_SERVICE: &str = "10.96.0.10:80";
/// ClusterIP:port of the `reset` Service (server-0's reset server, port 9001).
pub const RESET_SERVICE: &str = "10.96.0.11:81";
pub const ECHO_PORT: u16 = 9000;
pub const RESET_PORT: u16 = 9001;

/// The agents' admin endpoints: each hand-over starts the next agent at the other one.
pub const ADMIN_ADDRS: [&str; 2] = ["127.0.0.1:15000", "127.0.0.1:15010"];

/// What a worker's rounds run.
#[derive(Clone, Debug)]
pub enum Job {
    /// `tb-pod connrate`, each round closing by RST (`--linger-zero`) or FIN at random.
    Connrate { target: String, concurrency: u32 },
    /// `tb-pod tally`: one line each way per connection, closed by FIN.
    Tally { target: String },
    /// `tb-pod tally` against a reset server: every connection should end in a reset.
    Resets { target: String },
    /// `tb-pod load`: new connections back to back plus long-lived ones.
    Load { target: String, long_lived: u32 },
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub name: String,
    pub pod: Pod,
    pub job: Job,
    pub seed: u64,
}

/// One `tb-pod` run (or one step of a pod churn).
#[derive(Clone, Debug, Default)]
pub struct RunRecord {
    pub phase: &'static str,
    pub worker: String,
    pub kind: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Connections that did what they should (echoed, replied).
    pub ok: u64,
    /// Connections that failed (a reset server's resets are not failures).
    pub errors: u64,
    /// The failures by kind. tb-pod reports only the first error of a connrate or tally
    /// run, so all of that run's failures count under it; `load` lists each one.
    pub error_kinds: BTreeMap<String, u64>,
    /// When each failure of a `load` run happened (at most 50 are listed).
    pub failure_times: Vec<(u64, String)>,
    /// Connections a reset server reset, as it should.
    pub resets: u64,
    /// Long-lived connections opened, and when and how those that broke did.
    pub long_lived: u64,
    pub long_broken: Vec<(u64, String)>,
    /// The run itself failed (spawn, timeout, bad output): not a connection figure.
    pub harness_error: Option<String>,
}

impl RunRecord {
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "phase": self.phase,
            "worker": self.worker,
            "kind": self.kind,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "ok": self.ok,
            "errors": self.errors,
            "error_kinds": self.error_kinds,
            "failure_times": self.failure_times,
            "resets": self.resets,
            "long_lived": self.long_lived,
            "long_broken": self.long_broken,
            "harness_error": self.harness_error,
        })
    }
}

/// One hand-over: when the next agent was launched and was ready, when the old one got
/// SIGTERM and when it had exited (after draining).
#[derive(Clone, Debug)]
pub struct Handover {
    pub launched_ms: u64,
    pub ready_ms: u64,
    pub sigterm_ms: u64,
    pub exited_ms: u64,
    pub old_pid: u32,
    pub new_pid: u32,
    pub old_status: String,
    /// The old agent's own figures right before SIGTERM (under load).
    pub old_fds: usize,
    pub old_threads: u64,
    pub old_rss_kib: u64,
    pub old_age_s: u64,
    pub old_proxy_connections: u64,
    pub old_proxy_errors: u64,
    pub old_metrics_series: usize,
}

/// What the threads share: the testbed (written only by the main thread, to add and
/// delete churn pods; everyone else takes it briefly to spawn), the records, and the
/// flag that ends the current phase.
pub struct Ctx {
    pub tb: RwLock<Testbed>,
    pub manifests: PathBuf,
    pub agent_args: Vec<String>,
    pub records: Mutex<Vec<RunRecord>>,
    pub handovers: Mutex<Vec<Handover>>,
    pub phase_over: AtomicBool,
}

impl Ctx {
    pub fn tb(&self) -> std::sync::RwLockReadGuard<'_, Testbed> {
        // A worker that panicked must not stop the cleanup or the report.
        self.tb.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn tb_mut(&self) -> std::sync::RwLockWriteGuard<'_, Testbed> {
        self.tb.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record(&self, r: RunRecord) {
        self.records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(r);
    }

    pub fn stopping(&self) -> bool {
        self.phase_over.load(Ordering::Relaxed) || INTERRUPTED.load(Ordering::Relaxed)
    }
}

/// Runs `tb-pod <args>` in `pod` to completion (killed after `timeout`, or at once on
/// Ctrl-C). Holds the testbed only while spawning.
fn run(ctx: &Ctx, pod: &Pod, args: &[String], timeout: Duration) -> Result<Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = ctx.tb().spawn_tb_pod(pod, &args)?;
    started.finish(timeout, Some(&INTERRUPTED))
}

/// A worker's loop: rounds of 10-20 s until the phase ends.
pub fn work(ctx: &Ctx, w: &Worker, phase: &'static str) {
    let mut rng = Rng::new(w.seed);
    while !ctx.stopping() {
        let round_ms = rng.range(10_000, 20_000);
        let (kind, args, timeout) = round(&w.job, round_ms, &mut rng);
        let mut rec = RunRecord {
            phase,
            worker: w.name.clone(),
            kind: kind.clone(),
            start_ms: unix_ms(),
            ..RunRecord::default()
        };
        let outcome = run(ctx, &w.pod, &args, timeout);
        rec.end_ms = unix_ms();
        match outcome {
            Ok(report) => parse_report(&w.job, &report, &mut rec),
            Err(e) => {
                rec.harness_error = Some(format!("{e:#}"));
                // A harness failure (say, a spawn refused) must not spin.
                if !ctx.stopping() {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        ctx.record(rec);
    }
}

/// The kind, the tb-pod arguments and the timeout of one round.
fn round(job: &Job, round_ms: u64, rng: &mut Rng) -> (String, Vec<String>, Duration) {
    let s = |v: &str| v.to_owned();
    let slack = Duration::from_millis(round_ms) + Duration::from_secs(30);
    match job {
        Job::Connrate {
            target,
            concurrency,
        } => {
            let rst = rng.coin();
            // A FIN-closed connection leaves the inbound proxy's socket to the app in
            // TIME_WAIT (60 s) in the server pod, and all of them share one address pair:
            // 28,232 ephemeral ports per minute for a server pod. Full-length FIN rounds
            // ran server-1 out of them (seen: 21,000 TIME_WAIT there, connects failing
            // with no port, the endpoint ejected), so FIN rounds last a fifth as long.
            let round_ms = if rst { round_ms } else { (round_ms / 5).max(1) };
            let mut args = vec![
                s("connrate"),
                s("--connect"),
                target.clone(),
                s("--duration-ms"),
                round_ms.to_string(),
                s("--connect-timeout-ms"),
                s("3000"),
                s("--io-timeout-ms"),
                s("3000"),
            ];
            // FIN closes leave TIME_WAIT sockets in the client pod too: one thread.
            let concurrency = if rst { *concurrency } else { 1 };
            args.extend([s("--concurrency"), concurrency.to_string()]);
            if rst {
                args.push(s("--linger-zero"));
            }
            let kind = if rst { "connrate-rst" } else { "connrate-fin" };
            (s(kind), args, slack)
        }
        Job::Tally { target } => {
            // About one connection per 30 ms (20 ms pause plus the exchange).
            let count = (round_ms / 30).max(1);
            let args = vec![
                s("tally"),
                s("--connect"),
                target.clone(),
                s("--count"),
                count.to_string(),
                s("--pause-ms"),
                s("20"),
                s("--connect-timeout-ms"),
                s("3000"),
                s("--io-timeout-ms"),
                s("3000"),
            ];
            (s("tally"), args, slack + Duration::from_secs(60))
        }
        Job::Resets { target } => {
            let count = (round_ms / 100).max(1);
            let args = vec![
                s("tally"),
                s("--connect"),
                target.clone(),
                s("--count"),
                count.to_string(),
                s("--pause-ms"),
                s("80"),
                s("--message"),
                s("reset-me"),
                s("--connect-timeout-ms"),
                s("3000"),
                s("--io-timeout-ms"),
                s("3000"),
            ];
            (s("resets"), args, slack + Duration::from_secs(60))
        }
        Job::Load { target, long_lived } => {
            let args = vec![
                s("load"),
                s("--connect"),
                target.clone(),
                s("--duration-ms"),
                round_ms.to_string(),
                s("--long-lived"),
                long_lived.to_string(),
                s("--interval-ms"),
                s("250"),
            ];
            (s("load"), args, slack)
        }
    }
}

/// Errors a reset server's connection may end with, as the client sees it: the RST
/// itself, or the proxy's close of a connection whose other side was reset.
fn is_reset(kind: &str) -> bool {
    matches!(
        kind,
        "connection reset" | "unexpected eof" | "broken pipe" | "connection aborted"
    )
}

fn parse_report(job: &Job, report: &Value, rec: &mut RunRecord) {
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let first_error = report["first_error"].as_str().unwrap_or("?").to_owned();
    match job {
        Job::Connrate { .. } => {
            rec.ok = u(&report["connections"]);
            rec.errors = u(&report["errors"]);
            if rec.errors > 0 {
                rec.error_kinds.insert(first_error, rec.errors);
            }
        }
        Job::Tally { .. } => {
            rec.ok = report["replies"]
                .as_object()
                .map_or(0, |m| m.values().map(u).sum());
            rec.errors = u(&report["errors"]);
            if rec.errors > 0 {
                rec.error_kinds.insert(first_error, rec.errors);
            }
        }
        Job::Resets { .. } => {
            let replies: u64 = report["replies"]
                .as_object()
                .map_or(0, |m| m.values().map(u).sum());
            let errors = u(&report["errors"]);
            if errors > 0 && is_reset(&first_error) {
                rec.resets = errors;
            } else if errors > 0 {
                rec.errors = errors;
                rec.error_kinds.insert(first_error, errors);
            }
            // A reset server never answers: a reply would mean the wrong server.
            if replies > 0 {
                rec.errors += replies;
                *rec.error_kinds
                    .entry("reply from the reset server".into())
                    .or_default() += replies;
            }
        }
        Job::Load { .. } => {
            let new = &report["new"];
            rec.ok = u(&new["ok"]);
            rec.errors = u(&new["failed"]);
            let mut listed = 0;
            for f in new["failures"].as_array().into_iter().flatten() {
                let kind = f["error"].as_str().unwrap_or("?").to_owned();
                rec.failure_times.push((u(&f["at_unix_ms"]), kind.clone()));
                *rec.error_kinds.entry(kind).or_default() += 1;
                listed += 1;
            }
            if rec.errors > listed {
                *rec.error_kinds
                    .entry("(not listed by tb-pod)".into())
                    .or_default() += rec.errors - listed;
            }
            for c in report["long_lived"].as_array().into_iter().flatten() {
                rec.long_lived += 1;
                if let Some(at) = c["broken_at_unix_ms"].as_u64() {
                    let kind = c["error"].as_str().unwrap_or("?").to_owned();
                    rec.long_broken.push((at, kind));
                }
            }
        }
    }
}

/// One pod churn: add `churn-<k>` (CNI ADD through the agent), run an echo server in it,
/// a few connections from it (FIN and RST closes) and to it (from an enrolled pod, and
/// from the unenrolled `outsider` through the tc path), then delete it (CNI DEL).
/// Returns whether the pod was added and deleted.
pub fn churn_pod(
    ctx: &Ctx,
    name: &str,
    from_enrolled: &Pod,
    outsider: &Pod,
    phase: &'static str,
) -> bool {
    let step = |kind: &str, start_ms: u64, err: Option<String>| RunRecord {
        phase,
        worker: "pod-churn".into(),
        kind: kind.into(),
        start_ms,
        end_ms: unix_ms(),
        harness_error: err,
        ..RunRecord::default()
    };
    let t0 = unix_ms();
    let pod = match ctx.tb_mut().add_pod("demo", name) {
        Ok(pod) => pod,
        Err(e) => {
            ctx.record(step("churn-add", t0, Some(format!("{e:#}"))));
            return false;
        }
    };
    ctx.record(step("churn-add", t0, None));
    let listen = format!("0.0.0.0:{ECHO_PORT}");
    let server = ctx
        .tb()
        .spawn_server(&pod, &["echo", "--quiet", "--listen", &listen]);
    match server {
        Ok(server) => {
            let to_pod = format!("{}:{ECHO_PORT}", pod.ip);
            let tally = |target: &str| -> Vec<String> {
                ["tally", "--connect", target, "--count", "5"]
                    .map(str::to_owned)
                    .to_vec()
            };
            let connrate_rst: Vec<String> = [
                "connrate",
                "--connect",
                ECHO_SERVICE,
                "--duration-ms",
                "1000",
                "--linger-zero",
            ]
            .map(str::to_owned)
            .to_vec();
            let steps: [(&str, &Pod, Vec<String>, Job); 4] = [
                (
                    "churn-out",
                    &pod,
                    tally(ECHO_SERVICE),
                    Job::Tally {
                        target: ECHO_SERVICE.into(),
                    },
                ),
                (
                    "churn-out-rst",
                    &pod,
                    connrate_rst,
                    Job::Connrate {
                        target: ECHO_SERVICE.into(),
                        concurrency: 1,
                    },
                ),
                (
                    "churn-in-local",
                    from_enrolled,
                    tally(&to_pod),
                    Job::Tally {
                        target: to_pod.clone(),
                    },
                ),
                (
                    "churn-in-tc",
                    outsider,
                    tally(&to_pod),
                    Job::Tally {
                        target: to_pod.clone(),
                    },
                ),
            ];
            for (kind, from, args, job) in steps {
                if INTERRUPTED.load(Ordering::Relaxed) {
                    break;
                }
                let mut rec = step(kind, unix_ms(), None);
                rec.start_ms = unix_ms();
                match run(ctx, from, &args, Duration::from_secs(30)) {
                    Ok(report) => parse_report(&job, &report, &mut rec),
                    Err(e) => rec.harness_error = Some(format!("{e:#}")),
                }
                rec.end_ms = unix_ms();
                ctx.record(rec);
            }
            server.kill();
        }
        Err(e) => ctx.record(step("churn-server", unix_ms(), Some(format!("{e:#}")))),
    }
    let t1 = unix_ms();
    let deleted = ctx.tb_mut().del_pod(&pod);
    let ok = deleted.is_ok();
    ctx.record(step(
        "churn-del",
        t1,
        deleted.err().map(|e| format!("{e:#}")),
    ));
    ok
}

/// Starts the next agent at the other admin address, waits until it is ready, then
/// stops `current` (SIGTERM: it drains for --drain-timeout) and records the hand-over.
/// Returns the new agent and its admin address.
pub fn hand_over(
    ctx: &Ctx,
    current: AgentProcess,
    current_addr: &'static str,
    current_started_ms: u64,
) -> Result<(AgentProcess, &'static str)> {
    let next_addr = if current_addr == ADMIN_ADDRS[0] {
        ADMIN_ADDRS[1]
    } else {
        ADMIN_ADDRS[0]
    };
    let args: Vec<&str> = ctx.agent_args.iter().map(String::as_str).collect();
    let launched_ms = unix_ms();
    let next = ctx
        .tb()
        .start_agent_at(NodeId::A, &ctx.manifests, next_addr, &args)
        .context("starting the next agent")?;
    let ready_ms = unix_ms();
    let old_pid = current.pid();
    let figures = super::snapshot::process(old_pid).ok();
    let counters = super::snapshot::proxy_counters(&ctx.tb(), current_addr).ok();
    let sigterm_ms = unix_ms();
    let status = current.stop();
    let exited_ms = unix_ms();
    let old_status = match &status {
        Ok(s) => s.to_string(),
        Err(e) => format!("{e:#}"),
    };
    ctx.handovers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Handover {
            launched_ms,
            ready_ms,
            sigterm_ms,
            exited_ms,
            old_pid,
            new_pid: next.pid(),
            old_status,
            old_fds: figures.as_ref().map_or(0, |f| f.fds),
            old_threads: figures.as_ref().map_or(0, |f| f.threads),
            old_rss_kib: figures.as_ref().map_or(0, |f| f.rss_kib),
            old_age_s: sigterm_ms.saturating_sub(current_started_ms) / 1000,
            old_proxy_connections: counters.map_or(0, |c| c.0),
            old_proxy_errors: counters.map_or(0, |c| c.1),
            old_metrics_series: counters.map_or(0, |c| c.2),
        });
    status.context("stopping the old agent")?;
    Ok((next, next_addr))
}
