//! Issue 17's figure (`--part gateway-l4`): TLS passthrough and UDP through `interceptor
//! gateway` against direct, on one node. A TLS server pod (`tb-pod tls-server`, rustls,
//! TLS 1.3, a certificate from `openssl req` signed by a CA made for the run) and a UDP
//! echo pod (`tb-pod udp-echo`, the FSM document's "fortio" on 8078); a client pod
//! dials them directly, then through a gateway pod running `interceptor gateway`: the
//! FSM document's TLS Passthrough Gateway (listener 8000, a TLSRoute by hostname, as
//! e2e_tls) and its UDP Gateway (listener 8000, a UDPRoute to fortio:8078). Every pod is
//! unenrolled and no agent runs while measuring. A gateway row counts only when the
//! gateway's own counters show the client's traffic went through it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interceptor_testbed::{bin_path, fsm_docs, NodeId, Pod, ServerProcess, Testbed};
use serde::Serialize;
use serde_json::{json, Value};

use super::proc::Background;
use super::scale::with_ratio;
use super::scenario::{median, Options};

/// The TLS server's port, and the Service port in front of it.
const TLS_PORT: u16 = 8443;
/// The name the client asks for and the certificate holds; the TLSRoute's hostname.
const SERVER_NAME: &str = "bench.example.com";
/// The UDP echo's port (the FSM document's fortio), and its Service port.
const UDP_PORT: u16 = 8078;
/// Both Gateways' listener port (the FSM documents').
const GATEWAY_PORT: u16 = 8000;
const GATEWAY_ADMIN: &str = "127.0.0.1:15000";
/// Datagrams in flight for the datagrams/s figure; the round trip is taken with one.
pub const UDP_WINDOW: usize = 16;
const UDP_SIZE: usize = 64;
/// Added to a figure's duration before a tool is killed as hung.
const GRACE: Duration = Duration::from_secs(30);

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
apiVersion: v1\nkind: Namespace\nmetadata: {name: httpbin}\n---\n\
apiVersion: v1\nkind: Namespace\nmetadata: {name: server}\n";

/// One TLSRoute by hostname on the FSM document's TLS Passthrough Gateway (as e2e_tls).
const TLS_ROUTE_YAML: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata:
  name: bench-tls
  namespace: httpbin
spec:
  parentRefs:
  - name: simple-fsm-gateway
    port: 8000
  hostnames:
  - bench.example.com
  rules:
  - backendRefs:
    - name: tls-server
      port: 443
"#;

/// The backends as the gateway learns them: pods with their addresses, and Services.
fn backends_yaml(tls: &Pod, udp: &Pod) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: tls-server, namespace: httpbin, labels: {{app: tls-server}}}}\n\
         spec: {{containers: [{{name: s, image: x, ports: [{{containerPort: {TLS_PORT}}}]}}]}}\n\
         status: {{podIP: {}}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: tls-server, namespace: httpbin}}\n\
         spec: {{clusterIP: 10.96.2.11, selector: {{app: tls-server}}, ports: [{{name: tls, port: 443, targetPort: {TLS_PORT}}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: fortio, namespace: server, labels: {{app: fortio}}}}\n\
         spec: {{containers: [{{name: fortio, image: fortio/fortio:latest_release, ports: [{{containerPort: {UDP_PORT}, name: http}}]}}]}}\n\
         status: {{podIP: {}}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: fortio, namespace: server, labels: {{app: fortio, service: fortio}}}}\n\
         spec: {{clusterIP: 10.96.2.12, selector: {{app: fortio}}, ports: [{{port: {UDP_PORT}, name: udp-{UDP_PORT}, protocol: UDP}}]}}\n",
        tls.ip, udp.ip
    )
}

/// The paths measured.
pub const PATHS: [&str; 2] = ["direct", "gateway"];

/// One path over the rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayRow {
    pub path: &'static str,
    pub tls_gbit_per_s: Vec<f64>,
    pub tls_handshakes_per_s: Vec<f64>,
    pub tls_handshake_p50_us: Vec<f64>,
    pub udp_per_s: Vec<f64>,
    pub udp_rtt_p50_us: Vec<f64>,
    pub errors: Vec<String>,
    /// Why the UDP figures were not taken on this path (not a failure of the bench).
    pub udp_skipped: Vec<String>,
    /// Per round: what shows the traffic took the path claimed (the gateway's counters).
    pub evidence: Vec<Value>,
    /// Per round: the tools' reports.
    pub raw: Vec<Value>,
}

/// A self-signed CA and a certificate for [`SERVER_NAME`] it signed, in `dir`: the
/// server's chain (`server.crt`, `server.key`) and the client's trust (`ca.crt`).
fn certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = dir.join("openssl.cnf");
    std::fs::write(
        &config,
        format!(
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {SERVER_NAME}\n\
             [leaf]\nbasicConstraints = critical, CA:FALSE\nsubjectAltName = DNS:{SERVER_NAME}\n\
             keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n\
             [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign\n"
        ),
    )?;
    let req = |name: &str, extensions: &str, signer: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509", "-config", "openssl.cnf", "-extensions"])
            .arg(extensions)
            .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-days", "2", "-keyout"])
            .arg(format!("{name}.key"))
            .arg("-out")
            .arg(format!("{name}.crt"))
            .args(signer)
            .output()
            .context("openssl req")?;
        if !out.status.success() {
            bail!(
                "openssl req for {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    req("ca", "ca", &["-subj", "/CN=bench-ca"])?;
    req("server", "leaf", &["-CA", "ca.crt", "-CAkey", "ca.key"])
}

/// `interceptor gateway` serving `gateway` from `manifests` in `pod`, killed when dropped.
struct Gateway<'a> {
    tb: &'a Testbed,
    pod: &'a Pod,
    process: Background,
}

impl<'a> Gateway<'a> {
    fn start(
        tb: &'a Testbed,
        pod: &'a Pod,
        gateway: &str,
        manifests: &Path,
        log: &Path,
    ) -> Result<Gateway<'a>> {
        let bin = bin_path("interceptor");
        let args: Vec<String> = [
            "gateway",
            "--gateway",
            gateway,
            "--manifests",
            &manifests.display().to_string(),
            "--admin-addr",
            GATEWAY_ADMIN,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let process = Background::spawn(tb, pod, &bin.display().to_string(), &args, log)?;
        Ok(Gateway { tb, pod, process })
    }

    fn get(&self, path: &str) -> Result<String> {
        let addr: SocketAddr = GATEWAY_ADMIN.parse()?;
        let (status, body) = self.tb.http_get_in_pod(self.pod, addr, path)?;
        if status != 200 {
            bail!("gateway {path}: {status} {body}");
        }
        Ok(body)
    }

    /// Waits until the listener on [`GATEWAY_PORT`] is open and `route` accepted; fails
    /// with the gateway's own account (listener and route status) when it never is.
    fn wait_serving(&mut self, route: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = Value::Null;
        loop {
            self.process.check_alive()?;
            if let Ok(dump) = self
                .get("/config_dump")
                .and_then(|b| Ok(serde_json::from_str::<Value>(&b)?))
            {
                let listener = dump["listeners"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|l| l["port"] == GATEWAY_PORT)
                    .cloned();
                let route_status = dump["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["name"] == route)
                    .cloned();
                let open = listener.as_ref().is_some_and(|l| l["accepted"] == true);
                let bound = dump["bind_errors"]
                    .as_object()
                    .is_none_or(serde_json::Map::is_empty);
                let accepted = route_status.as_ref().is_some_and(|r| r["accepted"] == true);
                if open && bound && accepted {
                    return Ok(());
                }
                last = json!({
                    "listener": listener,
                    "route": route_status,
                    "bind_errors": dump["bind_errors"],
                    "gateway": dump["gateway"],
                });
            }
            if Instant::now() >= deadline && last.is_null() {
                bail!(
                    "the gateway's /config_dump did not answer; log: {}",
                    self.process.log_tail(6)
                );
            }
            if Instant::now() >= deadline {
                bail!("the gateway does not serve {route} on {GATEWAY_PORT}: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The gateway's counters whose series mention `fragment` (e.g. the route), summed
    /// by metric name (and byte flow).
    fn counters(&self, fragment: &str) -> Result<Value> {
        let metrics = self.get("/metrics")?;
        let mut sums = serde_json::Map::new();
        for line in metrics.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            if !series.contains(fragment) {
                continue;
            }
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            // The way bytes or datagrams went: `flow` (TCP), `direction` (UDP; a TCP
            // series' `direction` is the proxy's, "gateway").
            let way = ["flow", "direction"].iter().find_map(|label| {
                let value = series.split(&format!("{label}=\"")).nth(1)?;
                let value = value.split('"').next()?;
                ["upstream", "downstream"].contains(&value).then_some(value)
            });
            let key = match way {
                Some(way) => format!("{name}/{way}"),
                None => name.to_owned(),
            };
            let sum = sums.get(&key).and_then(Value::as_f64).unwrap_or(0.0) + value;
            sums.insert(key, json!(sum));
        }
        Ok(Value::Object(sums))
    }

    /// The gateway's metric lines that mention `fragment`, for an error.
    fn series_of(&self, fragment: &str) -> String {
        match self.get("/metrics") {
            Ok(m) => m
                .lines()
                .filter(|l| l.contains(fragment))
                .collect::<Vec<_>>()
                .join(" / "),
            Err(e) => format!("{e:#}"),
        }
    }

    /// Polls [`Gateway::counters`] until `done` holds for the growth since `before` (the
    /// gateway counts a connection when it ends) or 3 s passed; the growth either way.
    fn growth(&self, fragment: &str, before: &Value, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let grown = match self.counters(fragment) {
                Ok(after) => delta(before, &after),
                Err(e) => json!({ "error": format!("{e:#}") }),
            };
            if done(&grown) || Instant::now() >= deadline {
                return grown;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn delta(before: &Value, after: &Value) -> Value {
    let mut out = serde_json::Map::new();
    for (k, v) in after.as_object().into_iter().flatten() {
        let b = before[k].as_f64().unwrap_or(0.0);
        out.insert(k.clone(), json!(v.as_f64().unwrap_or(0.0) - b));
    }
    Value::Object(out)
}

/// What the client pod runs the figures with, and where the gateway runs.
struct Bench<'a> {
    tb: &'a Testbed,
    client: &'a Pod,
    ca: PathBuf,
    secs: u64,
    gateway_pod: &'a Pod,
    /// The gateway pod's listener.
    via: SocketAddr,
    state: &'a Path,
}

impl Bench<'_> {
    /// `interceptor gateway` serving `gateway` (`namespace/name`) from the manifest
    /// directory `<state>/<dir>`, logging to `<state>/<dir>.log`.
    fn gateway(&self, gateway: &str, dir: &str) -> Result<Gateway<'_>> {
        Gateway::start(
            self.tb,
            self.gateway_pod,
            gateway,
            &self.state.join(dir),
            &self.state.join(format!("{dir}.log")),
        )
    }

    fn tb_pod(&self, args: &[&str]) -> Result<Value> {
        let ms = (self.secs * 1000).to_string();
        let mut full = args.to_vec();
        full.extend(["--duration-ms", &ms]);
        self.tb
            .run_tb_pod(self.client, &full, Duration::from_secs(self.secs) + GRACE)
    }

    fn tls(&self, what: &str, target: SocketAddr) -> Result<Value> {
        let ca = self.ca.display().to_string();
        let report = self.tb_pod(&[
            what,
            "--connect",
            &target.to_string(),
            "--server-name",
            SERVER_NAME,
            "--ca",
            &ca,
        ])?;
        if let Some(e) = report["error"].as_str() {
            bail!("tb-pod {what}: {e} ({report})");
        }
        Ok(report)
    }

    fn udp(&self, target: SocketAddr, window: usize) -> Result<Value> {
        let report = self.tb_pod(&[
            "udp-load",
            "--connect",
            &target.to_string(),
            "--size",
            &UDP_SIZE.to_string(),
            "--window",
            &window.to_string(),
        ])?;
        if let Some(e) = report["error"].as_str() {
            bail!("tb-pod udp-load: {e} ({report})");
        }
        if report["received"].as_u64().unwrap_or(0) == 0 {
            bail!("tb-pod udp-load: no echo came back ({report})");
        }
        Ok(report)
    }

    /// TLS bulk and handshakes/s against `target`, into `row`; the reports.
    fn tls_figures(&self, target: SocketAddr, row: &mut GatewayRow) -> Value {
        eprintln!("  {}: TLS bulk", row.path);
        let bulk = self.tls("tls-bulk", target);
        eprintln!("  {}: TLS handshakes", row.path);
        let handshakes = self.tls("tls-handshakes", target).and_then(|r| {
            if r["handshakes"].as_u64().unwrap_or(0) == 0 {
                bail!("no handshake completed ({})", r["first_error"]);
            }
            Ok(r)
        });
        let mut raw = json!({});
        match bulk {
            Ok(r) => {
                row.tls_gbit_per_s.extend(r["gbit_per_s"].as_f64());
                raw["tls_bulk"] = r;
            }
            Err(e) => row.errors.push(format!("{} TLS bulk: {e:#}", row.path)),
        }
        match handshakes {
            Ok(r) => {
                row.tls_handshakes_per_s.extend(r["per_second"].as_f64());
                row.tls_handshake_p50_us
                    .extend(r["handshake_p50_us"].as_f64());
                raw["tls_handshakes"] = r;
            }
            Err(e) => row
                .errors
                .push(format!("{} TLS handshakes: {e:#}", row.path)),
        }
        raw
    }

    /// Datagrams/s with [`UDP_WINDOW`] in flight, and the round trip of one at a time.
    fn udp_figures(&self, target: SocketAddr, row: &mut GatewayRow) -> Value {
        eprintln!("  {}: UDP datagrams/s", row.path);
        let mut raw = json!({});
        match self.udp(target, UDP_WINDOW) {
            Ok(r) => {
                row.udp_per_s.extend(r["per_second"].as_f64());
                raw["udp_window"] = r;
            }
            Err(e) => row
                .errors
                .push(format!("{} UDP datagrams/s: {e:#}", row.path)),
        }
        eprintln!("  {}: UDP round trip", row.path);
        match self.udp(target, 1) {
            Ok(r) => {
                row.udp_rtt_p50_us.extend(r["rtt_p50_us"].as_f64());
                raw["udp_one"] = r;
            }
            Err(e) => row
                .errors
                .push(format!("{} UDP round trip: {e:#}", row.path)),
        }
        raw
    }
}

/// Both paths once, on one fresh testbed.
pub fn run(opts: Options) -> Vec<GatewayRow> {
    eprintln!(
        "== TLS passthrough and UDP through the gateway (round {}/{})",
        opts.round + 1,
        opts.rounds
    );
    let mut rows: Vec<GatewayRow> = PATHS
        .iter()
        .map(|&path| GatewayRow {
            path,
            ..GatewayRow::default()
        })
        .collect();
    if let Err(e) = run_into(&mut rows, opts.secs) {
        for row in &mut rows {
            row.errors.push(format!("{e:#}"));
        }
    }
    rows
}

fn run_into(rows: &mut [GatewayRow], secs: u64) -> Result<()> {
    let mut tb = Testbed::builder("bench-gwl4").build().context("testbed")?;
    let state = tb.state_dir().to_owned();
    let cni_dir = state.join("cni-manifests");
    std::fs::create_dir_all(&cni_dir)?;
    let pods: String = [
        ("httpbin", "tls-server"),
        ("server", "fortio"),
        ("httpbin", "gateway"),
        ("default", "client"),
    ]
    .iter()
    .map(|(ns, name)| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{containers: [{{name: main, image: bench}}]}}\n"
        )
    })
    .collect();
    std::fs::write(cni_dir.join("pods.yaml"), format!("{NAMESPACES}{pods}"))?;
    let certs = state.join("certs");
    certificates(&certs)?;

    // The pods are made while an agent answers CNI (none enrolled); then no agent runs.
    let agent = tb.start_agent_on(NodeId::A, &cni_dir, &[])?;
    let pods = (|| -> Result<[Pod; 4]> {
        Ok([
            tb.add_pod_on(NodeId::A, "httpbin", "tls-server")?,
            tb.add_pod_on(NodeId::A, "server", "fortio")?,
            tb.add_pod_on(NodeId::A, "httpbin", "gateway")?,
            tb.add_pod_on(NodeId::A, "default", "client")?,
        ])
    })();
    agent.stop()?;
    let [tls_pod, udp_pod, gateway_pod, client] = pods?;

    let cert = certs.join("server.crt").display().to_string();
    let key = certs.join("server.key").display().to_string();
    let _servers: [ServerProcess; 2] = [
        tb.spawn_server(
            &tls_pod,
            &[
                "--quiet",
                "tls-server",
                "--listen",
                &format!("0.0.0.0:{TLS_PORT}"),
                "--cert",
                &cert,
                "--key",
                &key,
            ],
        )?,
        tb.spawn_server(
            &udp_pod,
            &[
                "--quiet",
                "udp-echo",
                "--listen",
                &format!("0.0.0.0:{UDP_PORT}"),
            ],
        )?,
    ];

    // Each Gateway in a directory of its own, with the namespaces and the backends.
    let backends = backends_yaml(&tls_pod, &udp_pod);
    let manifests = |name: &str, gateway: &str| -> Result<PathBuf> {
        let dir = state.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("objects.yaml"),
            format!("{NAMESPACES}{backends}{gateway}"),
        )?;
        Ok(dir)
    };
    manifests(
        "tls-gateway",
        &format!("{}{TLS_ROUTE_YAML}", fsm_docs::TLS_PASSTHROUGH_GATEWAY),
    )?;
    manifests("udp-gateway", &format!("---\n{}", fsm_docs::UDP_GATEWAY))?;

    let bench = Bench {
        tb: &tb,
        client: &client,
        ca: certs.join("ca.crt"),
        secs,
        gateway_pod: &gateway_pod,
        via: SocketAddr::from((gateway_pod.ip, GATEWAY_PORT)),
        state: &state,
    };
    let [direct, through] = rows else {
        bail!("two rows expected");
    };

    let mut raw = bench.tls_figures(SocketAddr::from((tls_pod.ip, TLS_PORT)), direct);
    raw["udp"] = bench.udp_figures(SocketAddr::from((udp_pod.ip, UDP_PORT)), direct);
    direct.raw.push(raw);

    let mut evidence = json!({});
    let mut raw = json!({});
    eprintln!("  gateway: TLS passthrough");
    match through_tls(&bench, through) {
        Ok((e, r)) => {
            evidence["tls"] = e;
            raw["tls"] = r;
        }
        Err(e) => through.errors.push(format!("gateway TLS: {e:#}")),
    }
    eprintln!("  gateway: UDP");
    match through_udp(&bench, through) {
        Ok((e, r)) => {
            evidence["udp"] = e;
            raw["udp"] = r;
        }
        Err(e) => through.errors.push(format!("gateway UDP: {e:#}")),
    }
    through.evidence.push(evidence);
    through.raw.push(raw);
    Ok(())
}

const TLS_ROUTE: &str = "httpbin/bench-tls";
const UDP_ROUTE: &str = "server/udp-route-sample";
/// The gateway's counter of the datagrams it relayed from the backend to the client.
const UDP_REPLIES: &str = "interceptor_gateway_udp_datagrams_total/downstream";

/// The TLS figures through the TLS Passthrough Gateway, checked against its counters of
/// the TLSRoute: a connection for every handshake and the bulk one, and at least the
/// bulk's application bytes towards the server.
fn through_tls(bench: &Bench<'_>, row: &mut GatewayRow) -> Result<(Value, Value)> {
    let mut gateway = bench.gateway("httpbin/simple-fsm-gateway", "tls-gateway")?;
    gateway.wait_serving(TLS_ROUTE)?;
    let series = format!("route=\"TLSRoute {TLS_ROUTE}\"");
    let before = gateway.counters(&series)?;
    let kept = row.clone();
    let raw = bench.tls_figures(bench.via, row);
    let connections = raw["tls_handshakes"]["handshakes"].as_u64().unwrap_or(0)
        + u64::from(raw["tls_bulk"].is_object());
    let bytes = raw["tls_bulk"]["bytes_counted"].as_u64().unwrap_or(0);
    let grown = gateway.growth(&series, &before, |g| {
        g["interceptor_proxy_connections_total"]
            .as_f64()
            .unwrap_or(0.0)
            >= connections as f64
    });
    let seen_connections = grown["interceptor_proxy_connections_total"]
        .as_f64()
        .unwrap_or(0.0);
    let seen_bytes = grown["interceptor_proxy_bytes_total/upstream"]
        .as_f64()
        .unwrap_or(0.0);
    let evidence = json!({
        "route": format!("TLSRoute {TLS_ROUTE}"),
        "counter_growth": grown,
        "client_connections": connections,
        "client_bulk_bytes": bytes,
    });
    if seen_connections < connections as f64 || seen_bytes < bytes as f64 {
        // Not through the gateway: no figure of this round stands.
        *row = kept;
        row.errors.push(format!(
            "gateway TLS: the gateway counted {seen_connections} connections and \
             {seen_bytes} bytes upstream on the TLSRoute, the client made {connections} \
             and sent {bytes}: not through the gateway; its series: {}",
            gateway.series_of(TLS_ROUTE)
        ));
    }
    Ok((evidence, raw))
}

/// The UDP figures through the UDP Gateway, when this build's gateway serves one;
/// otherwise the reason goes to `row.udp_skipped` and no figure is taken.
fn through_udp(bench: &Bench<'_>, row: &mut GatewayRow) -> Result<(Value, Value)> {
    let mut gateway = bench.gateway("server/simple-fsm-gateway", "udp-gateway")?;
    if let Err(e) = gateway.wait_serving(UDP_ROUTE) {
        row.udp_skipped.push(format!(
            "this build's `interceptor gateway` does not serve the FSM document's UDP \
             Gateway and UDPRoute (a build from before UDP listeners): {e:#}"
        ));
        return Ok((Value::Null, Value::Null));
    }
    let series = format!("UDPRoute {UDP_ROUTE}");
    let before = gateway.counters(&series)?;
    let kept = row.clone();
    let raw = bench.udp_figures(bench.via, row);
    let datagrams: u64 = ["udp_window", "udp_one"]
        .iter()
        .map(|k| raw[k]["received"].as_u64().unwrap_or(0))
        .sum();
    // The replies the gateway relayed to the client must cover the echoes it got.
    let relayed = |g: &Value| g[UDP_REPLIES].as_f64().unwrap_or(0.0);
    let grown = gateway.growth(&series, &before, |g| relayed(g) >= datagrams as f64);
    let most = relayed(&grown);
    let evidence = json!({
        "route": series,
        "counter_growth": grown,
        "client_echoes": datagrams,
    });
    if most < datagrams as f64 {
        *row = kept;
        row.errors.push(format!(
            "gateway UDP: {UDP_REPLIES} of the UDPRoute grew by {most}, the client got \
             {datagrams} echoes ({grown}): not through the gateway"
        ));
    }
    Ok((evidence, raw))
}

/// Rounds merged path by path.
pub fn merge(rounds: Vec<Vec<GatewayRow>>) -> Vec<GatewayRow> {
    let mut merged: Vec<GatewayRow> = Vec::new();
    for row in rounds.into_iter().flatten() {
        match merged.iter_mut().find(|m| m.path == row.path) {
            Some(m) => {
                m.tls_gbit_per_s.extend(row.tls_gbit_per_s);
                m.tls_handshakes_per_s.extend(row.tls_handshakes_per_s);
                m.tls_handshake_p50_us.extend(row.tls_handshake_p50_us);
                m.udp_per_s.extend(row.udp_per_s);
                m.udp_rtt_p50_us.extend(row.udp_rtt_p50_us);
                m.errors.extend(row.errors);
                m.udp_skipped.extend(row.udp_skipped);
                m.evidence.extend(row.evidence);
                m.raw.extend(row.raw);
            }
            None => merged.push(row),
        }
    }
    merged
}

pub const HOW_TO_READ: &str = "Ratios in brackets are to direct. One node; every pod \
unenrolled, no agent running. direct: the client dials the TLS server pod and the UDP \
echo pod; gateway: the client dials the gateway pod's listener 8000 and `interceptor \
gateway` forwards (TLS: the FSM document's Passthrough listener, the ClientHello peeked \
for the TLSRoute's hostname, then the bytes spliced untouched; UDP: the FSM document's \
UDP listener and UDPRoute). TLS (rustls with ring, TLS 1.3, ECDSA P-256, the client \
verifying chain and name): bulk is application data over one connection, the bytes the \
server counted over the time until it answered; handshakes/s are new connections back \
to back, each a full handshake (no resumption), one byte and close_notify, and p50 is \
connect + handshake. Both TLS endpoints encrypt on the same 2 CPUs as the gateway, so \
the bulk figure is bounded by their crypto (AES-256-GCM) well below what the TCP path \
carries in the topology table, and handshakes/s by their ECDHE and ECDSA: the ratios \
show what the gateway adds on top of that, not its own ceiling. UDP: 64-byte \
datagrams from one socket to an echo; datagrams/s keeps 16 in flight (echoes received \
per second), the round trip p50 is one at a time (on a quiet VM that one is bound by \
idle vCPUs waking for each datagram, see bench/README.md). A gateway row counts only when the \
gateway's counters of the route grew by at least what the client did (the result files \
have every round's counter growth).";

fn cell(values: &[f64], base: Option<f64>, decimals: usize, skipped: bool) -> String {
    if values.is_empty() && skipped {
        "not run (see below)".into()
    } else {
        with_ratio(median(values), base, decimals)
    }
}

/// The markdown table: one line per path, then errors, skips and the gateway's evidence.
pub fn table(rows: &[GatewayRow]) -> String {
    let direct = rows.iter().find(|r| r.path == "direct");
    let base = |f: fn(&GatewayRow) -> &Vec<f64>| direct.and_then(|d| median(f(d)));
    let mut out = String::from(
        "| path | TLS bulk Gbit/s | TLS handshakes/s | TLS handshake p50 µs | UDP datagrams/s (16 in flight) | UDP 64 B round trip p50 µs |\n\
         |---|---|---|---|---|---|\n",
    );
    for row in rows {
        let skipped = !row.udp_skipped.is_empty();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.path,
            cell(&row.tls_gbit_per_s, base(|r| &r.tls_gbit_per_s), 2, false),
            cell(
                &row.tls_handshakes_per_s,
                base(|r| &r.tls_handshakes_per_s),
                0,
                false
            ),
            cell(
                &row.tls_handshake_p50_us,
                base(|r| &r.tls_handshake_p50_us),
                0,
                false
            ),
            cell(&row.udp_per_s, base(|r| &r.udp_per_s), 0, skipped),
            cell(&row.udp_rtt_p50_us, base(|r| &r.udp_rtt_p50_us), 1, skipped),
        ));
    }
    for row in rows {
        if let Some(why) = row.udp_skipped.first() {
            out.push_str(&format!(
                "\n{} UDP not run ({} round{}): {why}",
                row.path,
                row.udp_skipped.len(),
                if row.udp_skipped.len() == 1 { "" } else { "s" }
            ));
        }
        if !row.errors.is_empty() {
            out.push_str(&format!("\n{}: {}", row.path, row.errors.join("; ")));
        }
    }
    for (round, evidence) in rows
        .iter()
        .filter(|r| r.path == "gateway")
        .flat_map(|r| r.evidence.iter())
        .enumerate()
    {
        out.push_str(&format!(
            "\n\nGateway evidence, round {}: {}",
            round + 1,
            evidence_line(evidence)
        ));
    }
    out
}

/// One round's evidence in words.
fn evidence_line(e: &Value) -> String {
    let tls = &e["tls"];
    let mut line = match tls["counter_growth"].as_object() {
        Some(g) => format!(
            "TLSRoute connections +{} (client: {}), bytes towards the server +{} (client's bulk: {})",
            g.get("interceptor_proxy_connections_total").cloned().unwrap_or(Value::Null),
            tls["client_connections"],
            g.get("interceptor_proxy_bytes_total/upstream").cloned().unwrap_or(Value::Null),
            tls["client_bulk_bytes"]
        ),
        None => "TLS: no counters".into(),
    };
    let udp = &e["udp"];
    if udp.is_object() {
        line.push_str(&format!(
            "; UDPRoute counters {} (client's echoes: {})",
            udp["counter_growth"], udp["client_echoes"]
        ));
    } else {
        line.push_str("; UDP: not run");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_ratios_and_why_udp_did_not_run() {
        let direct = GatewayRow {
            path: "direct",
            tls_gbit_per_s: vec![4.0, 5.0, 6.0],
            tls_handshakes_per_s: vec![1000.0],
            tls_handshake_p50_us: vec![500.0],
            udp_per_s: vec![100_000.0],
            udp_rtt_p50_us: vec![10.0],
            ..GatewayRow::default()
        };
        let gateway = GatewayRow {
            path: "gateway",
            tls_gbit_per_s: vec![4.0],
            tls_handshakes_per_s: vec![800.0],
            tls_handshake_p50_us: vec![600.0],
            udp_skipped: vec!["no UDP listener".into()],
            evidence: vec![json!({"tls": {"counter_growth": {
                "interceptor_proxy_connections_total": 801.0,
                "interceptor_proxy_bytes_total/upstream": 2e9},
                "client_connections": 801, "client_bulk_bytes": 1_999_000_000u64}})],
            ..GatewayRow::default()
        };
        let table = table(&[direct, gateway]);
        assert!(
            table.contains("| gateway | 4.00 (0.80×) | 800 (0.80×) | 600 (1.20×) | not run (see below) | not run (see below) |"),
            "{table}"
        );
        assert!(
            table.contains("gateway UDP not run (1 round): no UDP listener"),
            "{table}"
        );
        assert!(
            table.contains("TLSRoute connections +801.0 (client: 801)"),
            "{table}"
        );
    }

    #[test]
    fn counter_growth_per_name() {
        let before = json!({"a": 1.0, "b/upstream": 10.0});
        let after = json!({"a": 4.0, "b/upstream": 15.0, "c": 2.0});
        assert_eq!(
            delta(&before, &after),
            json!({"a": 3.0, "b/upstream": 5.0, "c": 2.0})
        );
    }
}
