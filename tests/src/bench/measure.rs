//! The figures of one scenario: 64-byte request/response latency (sockperf ping-pong,
//! `tb-pod rr` as the fallback), bulk throughput with the CPU it cost (iperf3 and the
//! testbed cgroups' `cpu.stat`), and new connections per second (`tb-pod connrate`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{Pod, ServerProcess, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::proc::{run_in_pod, tail, Background};

pub const SOCKPERF: &str = "/usr/bin/sockperf";
pub const IPERF3: &str = "iperf3";
pub const SOCKPERF_PORT: u16 = 11111;
pub const IPERF_PORT: u16 = 5201;
pub const ECHO_PORT: u16 = 9000;
/// Request and response size of the latency figure.
pub const MESSAGE_SIZE: usize = 64;

const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to a figure's duration before a tool is killed as hung.
const GRACE: Duration = Duration::from_secs(30);

/// The servers of one server pod: sockperf, iperf3 and the `tb-pod` echo server.
pub struct Servers {
    pub pod: Pod,
    sockperf: Background,
    iperf: Background,
    echo: ServerProcess,
}

impl Servers {
    pub fn start(tb: &Testbed, pod: &Pod, log_dir: &Path) -> Result<Servers> {
        Self::start_with_echo(tb, pod, log_dir, &format!("0.0.0.0:{ECHO_PORT}"))
    }

    /// [`Servers::start`] with the echo server on `[::]`, where it takes both families
    /// (IPv4 as mapped addresses): for a dual-stack pod. sockperf stays on IPv4.
    pub fn start_dual_stack(tb: &Testbed, pod: &Pod, log_dir: &Path) -> Result<Servers> {
        Self::start_with_echo(tb, pod, log_dir, &format!("[::]:{ECHO_PORT}"))
    }

    fn start_with_echo(
        tb: &Testbed,
        pod: &Pod,
        log_dir: &Path,
        echo_listen: &str,
    ) -> Result<Servers> {
        let log = |what: &str| log_dir.join(format!("{}-{what}.log", pod.name));
        let mut sockperf = Background::spawn(
            tb,
            pod,
            SOCKPERF,
            &strings(&[
                "sr",
                "--tcp",
                "-i",
                "0.0.0.0",
                "-p",
                &SOCKPERF_PORT.to_string(),
            ]),
            &log("sockperf"),
        )?;
        let mut iperf = Background::spawn(
            tb,
            pod,
            IPERF3,
            &strings(&["-s", "-p", &IPERF_PORT.to_string()]),
            &log("iperf3"),
        )?;
        let echo = tb
            .spawn_server(pod, &["echo", "--listen", echo_listen])
            .context("tb-pod echo server")?;
        sockperf.wait_listening(&[SOCKPERF_PORT], READY_TIMEOUT)?;
        iperf.wait_listening(&[IPERF_PORT], READY_TIMEOUT)?;
        Ok(Servers {
            pod: pod.clone(),
            sockperf,
            iperf,
            echo,
        })
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.pod.ip
    }

    /// Fails when a server has died (so a figure's error names the real cause).
    pub fn check_alive(&mut self) -> Result<()> {
        self.sockperf.check_alive()?;
        self.iperf.check_alive()?;
        if let Some(status) = self.echo.try_wait()? {
            bail!(
                "tb-pod echo server exited ({status}): {}",
                self.echo.stderr()
            );
        }
        Ok(())
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// One latency measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    /// "sockperf", or "tb-pod rr" when sockperf failed (why is in `raw`).
    pub tool: String,
    pub raw: Value,
}

/// One bulk measurement.
#[derive(Clone, Debug, Serialize)]
pub struct Bulk {
    pub gbit_per_s: f64,
    pub bytes: u64,
    /// CPU time of the cgroups involved while iperf3 ran.
    pub cpu_s: f64,
    pub cpu_s_per_gb: f64,
    /// Busy CPU time of the whole machine over the same span (10 ms resolution).
    pub machine_cpu_s: Option<f64>,
    pub raw: Value,
}

/// One connection-rate measurement.
#[derive(Clone, Debug, Serialize)]
pub struct ConnRate {
    pub per_s: f64,
    /// Median time `connect` took (the handshake the client sees; through a proxy, the
    /// handshake with its local listener).
    pub connect_p50_us: f64,
    /// From the start of `connect` until the echoed byte was back: the latency to the
    /// server itself (through a proxy, including its choice of endpoint and its connect).
    pub first_echo_p50_us: f64,
    pub first_echo_p99_us: f64,
    pub connections: u64,
    pub errors: u64,
    pub raw: Value,
}

/// sockperf ping-pong with 64-byte messages on one connection, round-trip times; falls
/// back to `tb-pod rr` against the echo server if sockperf fails.
pub fn latency(tb: &Testbed, client: &Pod, ip: Ipv4Addr, secs: u64) -> Result<Latency> {
    match sockperf(tb, client, ip, secs) {
        Ok(l) => Ok(l),
        Err(sockperf_error) => {
            let sockperf_error = format!("{sockperf_error:#}");
            let mut l = rr(tb, client, ip, secs).with_context(|| {
                format!("sockperf failed ({sockperf_error}) and so did the tb-pod rr fallback")
            })?;
            l.raw["sockperf_error"] = json!(sockperf_error);
            Ok(l)
        }
    }
}

fn sockperf(tb: &Testbed, client: &Pod, ip: Ipv4Addr, secs: u64) -> Result<Latency> {
    let args = strings(&[
        "pp",
        "--tcp",
        "-i",
        &ip.to_string(),
        "-p",
        &SOCKPERF_PORT.to_string(),
        "-m",
        &MESSAGE_SIZE.to_string(),
        "-t",
        &secs.to_string(),
        "--full-rtt",
    ]);
    let out = run_in_pod(
        tb,
        client,
        SOCKPERF,
        &args,
        Duration::from_secs(secs) + GRACE,
    )?;
    let text = format!("{}\n{}", out.stdout, out.stderr);
    if !out.status.success() {
        bail!("sockperf exited with {}: {}", out.status, tail(&text, 4));
    }
    let parsed = parse_sockperf(&text)
        .with_context(|| format!("parsing sockperf output: {}", tail(&text, 6)))?;
    Ok(Latency {
        p50_us: parsed.p50_us,
        p99_us: parsed.p99_us,
        tool: "sockperf".into(),
        raw: json!({
            "tool": "sockperf",
            "args": args,
            "p50_us": parsed.p50_us,
            "p99_us": parsed.p99_us,
            "observations": parsed.observations,
            "summary": parsed.summary,
        }),
    })
}

#[derive(Debug, PartialEq)]
struct SockperfResult {
    p50_us: f64,
    p99_us: f64,
    observations: Option<u64>,
    /// The statistics lines, escapes removed.
    summary: Vec<String>,
}

fn parse_sockperf(text: &str) -> Result<SockperfResult> {
    let mut p50 = None;
    let mut p99 = None;
    let mut observations = None;
    let mut summary = Vec::new();
    for line in text.lines().map(interceptor_testbed::strip_ansi) {
        let line = line.trim();
        let value = |key: &str| -> Option<f64> {
            let rest = line.split(key).nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        };
        if line.contains("percentile 50.000 =") {
            p50 = value("percentile 50.000 =");
        } else if line.contains("percentile 99.000 =") {
            p99 = value("percentile 99.000 =");
        } else if let Some(rest) = line.strip_prefix("sockperf: Total ") {
            observations = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        }
        if line.contains("--->")
            || line.contains("[Valid Duration]")
            || line.contains("[Total Run]")
            || line.contains("Summary:")
            || line.contains("dropped messages")
            || line.contains("avg-rtt")
        {
            summary.push(line.trim_start_matches("sockperf: ").to_owned());
        }
    }
    match (p50, p99) {
        (Some(p50_us), Some(p99_us)) => Ok(SockperfResult {
            p50_us,
            p99_us,
            observations,
            summary,
        }),
        _ => bail!("no \"percentile 50.000\" and \"percentile 99.000\" lines"),
    }
}

/// `tb-pod rr`: 64-byte round trips on one connection to the echo server at `ip`.
pub fn rr(tb: &Testbed, client: &Pod, ip: impl Into<IpAddr>, secs: u64) -> Result<Latency> {
    let report = tb.run_tb_pod(
        client,
        &[
            "rr",
            "--connect",
            &SocketAddr::new(ip.into(), ECHO_PORT).to_string(),
            "--size",
            &MESSAGE_SIZE.to_string(),
            "--duration-ms",
            &(secs * 1000).to_string(),
        ],
        Duration::from_secs(secs) + GRACE,
    )?;
    if let Some(e) = report["error"].as_str() {
        bail!("tb-pod rr: {e} ({report})");
    }
    let (Some(p50_us), Some(p99_us)) = (report["p50_us"].as_f64(), report["p99_us"].as_f64())
    else {
        bail!("tb-pod rr report without p50_us/p99_us: {report}");
    };
    if report["round_trips"].as_u64().unwrap_or(0) == 0 {
        bail!("tb-pod rr made no round trip: {report}");
    }
    Ok(Latency {
        p50_us,
        p99_us,
        tool: "tb-pod rr".into(),
        raw: json!({ "tool": "tb-pod rr", "report": report }),
    })
}

/// `usage_usec` of a cgroup v2 directory's `cpu.stat` (includes its descendants).
pub fn cpu_usage_usec(cgroup: &Path) -> Result<u64> {
    let path = cgroup.join("cpu.stat");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

fn cpu_total(cgroups: &[PathBuf]) -> Result<u64> {
    cgroups.iter().map(|c| cpu_usage_usec(c)).sum()
}

/// Busy CPU seconds of the whole machine so far (`/proc/stat` "cpu": user, nice,
/// system, irq, softirq, steal), in clock ticks of 10 ms; `None` if unreadable.
fn machine_busy_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum::<u64>();
    Some(busy as f64 / 100.0)
}

/// iperf3 from the client pod for `secs`, one stream; CPU of `cgroups` summed over the
/// client's run.
pub fn bulk(
    tb: &Testbed,
    client: &Pod,
    ip: impl Into<IpAddr>,
    secs: u64,
    cgroups: &[PathBuf],
) -> Result<Bulk> {
    let args = strings(&[
        "-c",
        &ip.into().to_string(),
        "-p",
        &IPERF_PORT.to_string(),
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    let machine_before = machine_busy_s();
    let before = cpu_total(cgroups)?;
    let out = run_in_pod(tb, client, IPERF3, &args, Duration::from_secs(secs) + GRACE)?;
    let after = cpu_total(cgroups)?;
    let machine_after = machine_busy_s();
    let report: Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "iperf3 ({}) printed no JSON: {} {}",
            out.status,
            tail(&out.stdout, 4),
            tail(&out.stderr, 4)
        )
    })?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3: {e}");
    }
    if !out.status.success() {
        bail!(
            "iperf3 exited with {}: {}",
            out.status,
            tail(&out.stderr, 4)
        );
    }
    let received = &report["end"]["sum_received"];
    let (Some(bps), Some(bytes)) = (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_u64(),
    ) else {
        bail!("iperf3 JSON without end.sum_received: {}", report["end"]);
    };
    if bytes == 0 {
        bail!("iperf3 moved no bytes");
    }
    let cpu_s = after.saturating_sub(before) as f64 / 1e6;
    // Everything the machine did meanwhile: our cgroups, softirq charged elsewhere,
    // kernel threads, and whatever else runs on the machine (noise).
    let machine_cpu_s = machine_before
        .zip(machine_after)
        .map(|(b, a)| (a - b).max(0.0));
    // The whole machine, so CPU spent outside the node cgroups (softirq charged to other
    // tasks, kernel threads, an agent or a peer proxy outside them) is not left out; the
    // cgroup figure stays in the raw numbers. Noise from elsewhere counts too: it falls
    // on every scenario alike over the rounds.
    let cpu_s_per_gb = machine_cpu_s.unwrap_or(cpu_s) / (bytes as f64 / 1e9);
    let intervals: Vec<Value> = report["intervals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["sum"]["bits_per_second"].clone())
        .collect();
    Ok(Bulk {
        gbit_per_s: bps / 1e9,
        bytes,
        cpu_s,
        cpu_s_per_gb,
        machine_cpu_s,
        raw: json!({
            "tool": "iperf3",
            "args": args,
            "sum_sent": report["end"]["sum_sent"],
            "sum_received": received,
            "cpu_utilization_percent": report["end"]["cpu_utilization_percent"],
            "interval_bits_per_second": intervals,
            "cgroups": cgroups,
            "cgroup_usage_usec_before": before,
            "cgroup_usage_usec_after": after,
        }),
    })
}

/// `tb-pod connrate`, one thread, 1-byte exchange per connection, RST on close.
pub fn connrate(tb: &Testbed, client: &Pod, ip: impl Into<IpAddr>, secs: u64) -> Result<ConnRate> {
    let report = tb.run_tb_pod(
        client,
        &[
            "connrate",
            "--connect",
            &SocketAddr::new(ip.into(), ECHO_PORT).to_string(),
            "--duration-ms",
            &(secs * 1000).to_string(),
            "--concurrency",
            "1",
            "--linger-zero",
        ],
        Duration::from_secs(secs) + GRACE,
    )?;
    let connections = report["connections"].as_u64().unwrap_or(0);
    let errors = report["errors"].as_u64().unwrap_or(0);
    if connections == 0 {
        bail!(
            "no connection completed ({errors} errors, first: {})",
            report["first_error"]
        );
    }
    let per_s = report["per_second"]
        .as_f64()
        .with_context(|| format!("connrate report without per_second: {report}"))?;
    let figure = |key: &str| {
        report[key]
            .as_f64()
            .with_context(|| format!("connrate report without {key}: {report}"))
    };
    let connect_p50_us = figure("connect_p50_us")?;
    let first_echo_p50_us = figure("first_echo_p50_us")?;
    let first_echo_p99_us = figure("first_echo_p99_us")?;
    Ok(ConnRate {
        per_s,
        connect_p50_us,
        first_echo_p50_us,
        first_echo_p99_us,
        connections,
        errors,
        raw: json!({ "tool": "tb-pod connrate", "report": report }),
    })
}

/// Handshakes completed towards listeners in network namespace `netns` so far (the
/// kernel's `Tcp: PassiveOpens`, which counts per netns): how many connections a server
/// pod accepted, as the server's own kernel saw them.
pub fn passive_opens(netns: &str) -> Result<u64> {
    let snmp = interceptor_testbed::with_netns(netns, || {
        // thread-self: the netns of this thread, the one with_netns entered.
        std::fs::read_to_string("/proc/thread-self/net/snmp")
    })?;
    parse_passive_opens(&snmp).context("no Tcp PassiveOpens in /proc/net/snmp")
}

fn parse_passive_opens(snmp: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let column = names.split_whitespace().position(|n| n == "PassiveOpens")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_passive_opens_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails\n\
                    Tcp: 1 200 120000 -1 12 345 0\n\
                    Udp: InDatagrams\nUdp: 0\n";
        assert_eq!(parse_passive_opens(snmp), Some(345));
        assert_eq!(parse_passive_opens("Ip: a\nIp: 1\n"), None);
    }

    const SOCKPERF_OUT: &str = "sockperf: \u{1b}[2;35m== version #3.7-no.git == \u{1b}[0m
sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=115577; ReceivedMessages=115576
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=91203; ReceivedMessages=91203
sockperf: \u{1b}[2;35m====> avg-rtt=16.967 (std-dev=48.756)\u{1b}[0m
sockperf: # dropped messages = 0; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 16.967 usec
sockperf: \u{1b}[2;35mTotal 91203 observations\u{1b}[0m; each percentile contains 912.03 observations
sockperf: ---> <MAX> observation = 5284.430
sockperf: ---> percentile 99.999 = 5211.940
sockperf: ---> percentile 99.000 =   32.039
sockperf: ---> percentile 90.000 =   18.630
sockperf: ---> percentile 50.000 =   14.770
sockperf: ---> <MIN> observation =   13.979
";

    #[test]
    fn parses_sockperf_percentiles() {
        let r = parse_sockperf(SOCKPERF_OUT).unwrap();
        assert_eq!(r.p50_us, 14.770);
        assert_eq!(r.p99_us, 32.039);
        assert_eq!(r.observations, Some(91203));
        assert!(r
            .summary
            .iter()
            .any(|l| l == "====> avg-rtt=16.967 (std-dev=48.756)"));
        assert!(r.summary.iter().any(|l| l.starts_with("[Valid Duration]")));
    }

    #[test]
    fn sockperf_without_percentiles_is_an_error() {
        assert!(parse_sockperf("sockperf: ERROR: connect failed\n").is_err());
    }
}
