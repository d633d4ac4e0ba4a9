//! ztunnel as a sidecar-style peer: inside the client pod, iptables `nat OUTPUT`
//! REDIRECTs the client's connections to the server pod into ztunnel's outbound listener
//! (15001), skipping ztunnel's own connections by their packet mark. ztunnel (the binary
//! `ZTUNNEL_BIN` names, built by the user from its source) runs in that pod as
//! `ztunnel proxy` in dedicated mode for the client workload: one worker thread, a local
//! workload file instead of XDS, a fake CA, both workloads `protocol: TCP` (plaintext, no
//! HBONE), no DNS proxy. Every address it binds is in the pod netns and it is given no
//! address to dial except the server's (XDS and CA addresses are empty).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interceptor_testbed::{Pod, Testbed};
use serde_json::{json, Value};

use super::measure::strings;
use super::proc::Background;
use super::sidecar::Sidecar;

/// The environment variable naming the ztunnel binary.
pub const BIN_ENV: &str = "ZTUNNEL_BIN";
/// ztunnel's outbound listener (fixed in its source).
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's Prometheus endpoint (`/metrics`), on the pod's addresses.
pub const STATS_PORT: u16 = 15020;
/// ztunnel's readiness endpoint (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// ztunnel marks its own sockets with this (`PACKET_MARK`); the REDIRECT rule skips them.
pub const PACKET_MARK: u32 = 1337;
const SERVICE_ACCOUNT: &str = "default";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The ztunnel binary from `ZTUNNEL_BIN`, or why the row is skipped.
pub fn binary() -> std::result::Result<PathBuf, String> {
    let Some(path) = std::env::var_os(BIN_ENV) else {
        return Err(format!("{BIN_ENV} not set"));
    };
    let p = PathBuf::from(path);
    let executable = std::fs::metadata(&p).is_ok_and(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.is_file() && m.permissions().mode() & 0o111 != 0
    });
    if executable {
        Ok(p)
    } else {
        Err(format!(
            "{BIN_ENV}={} is not an executable file",
            p.display()
        ))
    }
}

/// A pod as ztunnel's workload file names it, with the testbed node it runs on.
pub struct Workload<'a> {
    pub pod: &'a Pod,
    pub node: &'a str,
}

/// ztunnel's local workload file (`LOCAL_XDS_PATH`): both pods as plaintext (`TCP`)
/// workloads, no services, no policies.
pub fn workloads(client: &Workload, server: &Workload) -> String {
    let mut out = String::from("workloads:\n");
    for w in [client, server] {
        let (ns, name, ip) = (&w.pod.namespace, &w.pod.name, w.pod.ip);
        out.push_str(&format!(
            "- uid: Kubernetes//Pod/{ns}/{name}\n  name: {name}\n  workloadName: {name}\n  \
             namespace: {ns}\n  serviceAccount: {SERVICE_ACCOUNT}\n  workloadIps: [\"{ip}\"]\n  \
             protocol: TCP\n  node: {node}\n  network: \"\"\n  services: {{}}\n",
            node = w.node
        ));
    }
    out.push_str("policies: []\nservices: []\n");
    out
}

/// ztunnel's whole environment (it starts with an empty one).
pub fn environment(workloads_path: &Path, client: &Workload) -> Vec<(String, String)> {
    let pod = client.pod;
    [
        // Dedicated (single-workload, sidecar-like) mode for the client pod.
        ("PROXY_MODE", "dedicated".to_owned()),
        (
            "PROXY_WORKLOAD_INFO",
            format!("{}/{}/{SERVICE_ACCOUNT}", pod.namespace, pod.name),
        ),
        ("NODE_NAME", client.node.to_owned()),
        // No control plane: workloads from a file, no XDS or CA address, self-signed certs.
        ("LOCAL_XDS_PATH", workloads_path.display().to_string()),
        ("XDS_ADDRESS", String::new()),
        ("CA_ADDRESS", String::new()),
        ("FAKE_CA", "true".to_owned()),
        // Its upstream sockets carry this mark; the REDIRECT rule skips them.
        ("PACKET_MARK", PACKET_MARK.to_string()),
        ("ZTUNNEL_WORKER_THREADS", "1".to_owned()),
        // No DNS proxy (it would forward to the machine's resolvers); IPv4 only.
        ("ISTIO_META_DNS_CAPTURE", "false".to_owned()),
        ("IPV6_ENABLED", "false".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The `nat OUTPUT` rule (without `-A`/`-D`) steering the client's TCP connections to
/// `server` into ztunnel's outbound listener, except ztunnel's own (marked) ones.
fn rule(server: Ipv4Addr) -> Vec<String> {
    strings(&[
        "-p",
        "tcp",
        "-d",
        &format!("{server}/32"),
        "-m",
        "mark",
        "!",
        "--mark",
        &PACKET_MARK.to_string(),
        "-j",
        "REDIRECT",
        "--to-ports",
        &OUTBOUND_PORT.to_string(),
    ])
}

/// ztunnel's connection counters (the `reporter="source"` series: its outbound side).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub opened: u64,
    pub closed: u64,
    pub failed: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

impl Stats {
    /// Sums each counter over its outbound series in a Prometheus text exposition.
    pub fn parse(text: &str) -> Stats {
        let mut s = Stats::default();
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !series.contains("reporter=\"source\"") {
                continue;
            }
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or_default();
            let slot = match name {
                "istio_tcp_connections_opened_total" => &mut s.opened,
                "istio_tcp_connections_closed_total" => &mut s.closed,
                "istio_tcp_connections_failed_total" => &mut s.failed,
                "istio_tcp_received_bytes_total" => &mut s.received_bytes,
                "istio_tcp_sent_bytes_total" => &mut s.sent_bytes,
                _ => continue,
            };
            // Counters are integers printed as such; the cast only drops a ".0".
            *slot += v as u64;
        }
        s
    }

    pub fn delta(&self, before: &Stats) -> Stats {
        Stats {
            opened: self.opened.saturating_sub(before.opened),
            closed: self.closed.saturating_sub(before.closed),
            failed: self.failed.saturating_sub(before.failed),
            received_bytes: self.received_bytes.saturating_sub(before.received_bytes),
            sent_bytes: self.sent_bytes.saturating_sub(before.sent_bytes),
        }
    }

    pub fn to_json(self) -> Value {
        json!({
            "connections_opened": self.opened,
            "connections_closed": self.closed,
            "connections_failed": self.failed,
            "received_bytes": self.received_bytes,
            "sent_bytes": self.sent_bytes,
        })
    }
}

/// What the measuring tools did through the client, from a row's raw numbers: the
/// connection-rate run's completed connections and the bytes iperf3 received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expected {
    pub connections: u64,
    pub bulk_bytes: u64,
}

impl Expected {
    pub fn from_raw(raw: &[Value]) -> Expected {
        let mut e = Expected::default();
        for run in raw {
            e.connections += run["connrate"]["report"]["connections"]
                .as_u64()
                .unwrap_or(0);
            e.bulk_bytes += run["bulk"]["bytes"].as_u64().unwrap_or(0);
        }
        e
    }
}

/// Fails unless the traffic the tools made went through ztunnel: the REDIRECT rule
/// matched at least every completed connection, ztunnel opened at least as many
/// outbound connections as the rule redirected, and it carried at least the bytes
/// iperf3 received.
pub fn verify(redirected: u64, through: &Stats, expected: &Expected) -> Result<()> {
    if redirected == 0 || through.opened == 0 {
        bail!(
            "traffic bypassed ztunnel: the REDIRECT rule matched {redirected} connections, \
             ztunnel opened {}",
            through.opened
        );
    }
    if redirected < expected.connections {
        bail!(
            "traffic bypassed ztunnel: the REDIRECT rule matched {redirected} connections, \
             fewer than the {} the connection-rate run completed",
            expected.connections
        );
    }
    if through.opened < redirected {
        bail!(
            "ztunnel opened {} outbound connections, fewer than the {redirected} the \
             REDIRECT rule steered to it",
            through.opened
        );
    }
    let bytes = through.received_bytes + through.sent_bytes;
    if bytes < expected.bulk_bytes {
        bail!(
            "traffic bypassed ztunnel: it carried {bytes} bytes, fewer than the {} iperf3 \
             received",
            expected.bulk_bytes
        );
    }
    Ok(())
}

/// ztunnel running in the client pod with the REDIRECT rule installed (dropping
/// `sidecar` removes the rule, then kills ztunnel), and how it was configured.
pub struct Ztunnel {
    pub sidecar: Sidecar,
    pub version: String,
    pub env: Vec<(String, String)>,
    pub workloads: String,
}

impl Ztunnel {
    /// Starts `bin` in `client`'s pod as the client's proxy towards `server`, waits until
    /// it is ready, then installs the REDIRECT rule. Its files go under `dir`.
    pub fn start(
        tb: &Testbed,
        bin: &Path,
        client: &Workload,
        server: &Workload,
        dir: &Path,
    ) -> Result<Ztunnel> {
        let version = Command::new(bin)
            .arg("version")
            .env_clear()
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .with_context(|| format!("running {} version", bin.display()))?;
        // Its working directory: ztunnel reads `./etc/istio/...` and `./var/run/secrets/...`
        // relative to it, and none of those exist here.
        let cwd = dir.join(format!("ztunnel-{}", client.pod.name));
        std::fs::create_dir_all(&cwd).with_context(|| format!("creating {}", cwd.display()))?;
        let workloads_path = cwd.join("workloads.yaml");
        let workloads = workloads(client, server);
        std::fs::write(&workloads_path, &workloads)
            .with_context(|| format!("writing {}", workloads_path.display()))?;
        let env = environment(&workloads_path, client);
        // `env` execs ztunnel in place (same pid) with exactly this environment.
        let mut args = strings(&["-i", "-C", &cwd.display().to_string()]);
        args.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
        args.push(bin.display().to_string());
        args.push("proxy".into());
        let log = dir.join(format!("ztunnel-{}.log", client.pod.name));
        let mut proc = Background::spawn(tb, client.pod, "/usr/bin/env", &args, &log)?;
        proc.wait_listening(&[OUTBOUND_PORT, READINESS_PORT], READY_TIMEOUT)?;
        let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, READINESS_PORT));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match tb.http_get_in_pod(client.pod, ready, "/healthz/ready") {
                Ok((200, _)) => break,
                other if Instant::now() >= deadline => bail!(
                    "ztunnel not ready within {READY_TIMEOUT:?} ({}); log: {}",
                    match other {
                        Ok((code, body)) => format!("{code}: {}", body.trim()),
                        Err(e) => format!("{e:#}"),
                    },
                    proc.log_tail(8)
                ),
                _ => {
                    proc.check_alive()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        let mut sidecar = Sidecar::new("ztunnel", &client.pod.netns, proc);
        sidecar.redirect(rule(server.pod.ip))?;
        Ok(Ztunnel {
            sidecar,
            version,
            env,
            workloads,
        })
    }

    /// ztunnel's outbound counters, from its `/metrics` in the pod.
    pub fn stats(&self, tb: &Testbed, client: &Pod) -> Result<Stats> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, STATS_PORT));
        match tb.http_get_in_pod(client, addr, "/metrics")? {
            (200, body) => Ok(Stats::parse(&body)),
            (code, body) => bail!("ztunnel /metrics: {code}: {}", body.trim()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use interceptor_testbed::NodeId;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            namespace: "bench-plain".into(),
            name: name.into(),
            netns: format!("ns-{name}"),
            netns_path: PathBuf::from(format!("/var/run/netns/ns-{name}")),
            container_id: name.into(),
            ip: Ipv4Addr::from(ip),
            ipv6: None,
            cni_result: Value::Null,
            node: NodeId::A,
        }
    }

    #[test]
    fn workload_file_lists_both_pods_as_plaintext() {
        let (c, s) = (
            pod("client", [10, 244, 1, 2]),
            pod("server", [10, 244, 0, 3]),
        );
        let yaml = workloads(
            &Workload { pod: &c, node: "b" },
            &Workload { pod: &s, node: "a" },
        );
        assert!(yaml.contains("uid: Kubernetes//Pod/bench-plain/client\n"));
        assert!(yaml.contains("workloadIps: [\"10.244.1.2\"]"));
        assert!(yaml.contains("workloadIps: [\"10.244.0.3\"]"));
        assert_eq!(yaml.matches("protocol: TCP").count(), 2);
        assert_eq!(yaml.matches("services: {}").count(), 2);
        assert!(!yaml.contains("HBONE"));
    }

    #[test]
    fn environment_has_no_control_plane_and_one_thread() {
        let c = pod("client", [10, 244, 0, 2]);
        let env = environment(Path::new("/tmp/w.yaml"), &Workload { pod: &c, node: "a" });
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("XDS_ADDRESS"), Some(""));
        assert_eq!(get("CA_ADDRESS"), Some(""));
        assert_eq!(get("FAKE_CA"), Some("true"));
        assert_eq!(get("PROXY_MODE"), Some("dedicated"));
        assert_eq!(
            get("PROXY_WORKLOAD_INFO"),
            Some("bench-plain/client/default")
        );
        assert_eq!(get("PACKET_MARK"), Some("1337"));
        assert_eq!(get("ZTUNNEL_WORKER_THREADS"), Some("1"));
        assert_eq!(get("LOCAL_XDS_PATH"), Some("/tmp/w.yaml"));
    }

    #[test]
    fn rule_skips_the_packet_mark() {
        assert_eq!(
            rule(Ipv4Addr::new(10, 244, 0, 3)).join(" "),
            "-p tcp -d 10.244.0.3/32 -m mark ! --mark 1337 -j REDIRECT --to-ports 15001"
        );
    }

    const METRICS: &str = r#"# HELP istio_tcp_connections_opened The total number of TCP connections opened.
# TYPE istio_tcp_connections_opened counter
istio_tcp_connections_opened_total{reporter="source",source_workload="client",destination_workload="server"} 1200
istio_tcp_connections_opened_total{reporter="destination",source_workload="x"} 7
istio_tcp_connections_opened_total{reporter="source",source_workload="client",destination_workload="other"} 3
istio_tcp_connections_closed_total{reporter="source",source_workload="client"} 1199
istio_tcp_received_bytes_total{reporter="source",source_workload="client"} 5000000000
istio_tcp_sent_bytes_total{reporter="source",source_workload="client"} 1300
istio_tcp_sockets_open{reporter="source"} 1
"#;

    #[test]
    fn stats_sum_the_outbound_series() {
        let s = Stats::parse(METRICS);
        assert_eq!(
            s,
            Stats {
                opened: 1203,
                closed: 1199,
                failed: 0,
                received_bytes: 5_000_000_000,
                sent_bytes: 1300,
            }
        );
        let d = s.delta(&Stats {
            opened: 3,
            ..Stats::default()
        });
        assert_eq!(d.opened, 1200);
    }

    #[test]
    fn expected_from_raw_rounds() {
        let raw = vec![json!({
            "connrate": {"report": {"connections": 900}},
            "bulk": {"bytes": 4_000_000_000_u64},
        })];
        assert_eq!(
            Expected::from_raw(&raw),
            Expected {
                connections: 900,
                bulk_bytes: 4_000_000_000
            }
        );
    }

    #[test]
    fn verify_fails_when_traffic_bypassed_ztunnel() {
        let through = Stats {
            opened: 1000,
            received_bytes: 4_100_000_000,
            ..Stats::default()
        };
        let expected = Expected {
            connections: 990,
            bulk_bytes: 4_000_000_000,
        };
        assert!(verify(1000, &through, &expected).is_ok());
        // Nothing redirected, or ztunnel saw nothing.
        assert!(verify(0, &through, &expected).is_err());
        assert!(verify(1000, &Stats::default(), &expected).is_err());
        // Some connections went around the rule.
        assert!(verify(500, &through, &expected).is_err());
        // Redirected connections that ztunnel never opened.
        assert!(verify(2000, &through, &expected).is_err());
        // The bulk bytes did not pass through it.
        let few_bytes = Stats {
            received_bytes: 10,
            ..through
        };
        assert!(verify(1000, &few_bytes, &expected).is_err());
    }
}
