//! TLS passthrough by server name end to end, with real TLS: two backends run
//! `openssl s_server` with their own certificate (made by `openssl req` for the test),
//! and a Python `ssl` client (OpenSSL underneath) dials with a server name and verifies
//! the certificate it gets against the one backend that should answer, so a completed
//! handshake proves the bytes went, untouched, to the right backend. At a gateway: the
//! FSM document's TLS Passthrough Gateway (7.4.9) with one TLSRoute per name; in the mesh
//! (both interception modes): a VirtualService `tls` rule per `sniHosts`. An unknown
//! name, a client that speaks no TLS, a silent client, and a ClientHello sent in pieces.
#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{metric_in, python_in_pod, wait_for, Mode, Node};
use interceptor_testbed::{bin_path, Pod};

/// Where each backend listens.
const BACKEND_PORT: u16 = 8443;
const GATEWAY_ADMIN: &str = "127.0.0.1:15000";

/// A self-signed certificate and key for `name` in `dir` (`<name>.crt`, `<name>.key`).
fn certificate(dir: &Path, name: &str) -> PathBuf {
    let crt = dir.join(format!("{name}.crt"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args([
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-keyout",
        ])
        .arg(dir.join(format!("{name}.key")))
        .arg("-out")
        .arg(&crt)
        .args(["-subj", &format!("/CN={name}")])
        .args(["-addext", &format!("subjectAltName=DNS:{name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(status.success(), "openssl req for {name}");
    crt
}

/// `openssl s_server` for `name` in `pod`, answering each connection with its status page.
fn s_server(node: &Node, pod: &Pod, dir: &Path, name: &str) -> Child {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_server",
        "-accept",
        &BACKEND_PORT.to_string(),
        "-www",
        "-quiet",
    ])
    .arg("-cert")
    .arg(dir.join(format!("{name}.crt")))
    .arg("-key")
    .arg(dir.join(format!("{name}.key")))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    node.tb.spawn_in_pod(pod, cmd).expect("openssl s_server")
}

/// The client's helpers: `hello(addr, port, sni, ca, pieces)` completes a handshake with
/// server name `sni` (the ClientHello sent in `pieces` segments 50 ms apart when more
/// than 1), verifies the certificate chain against `ca` (one backend's), fetches the status page and reports
/// the certificate's CN; `plain(addr, port, data)` sends bytes that are not TLS and
/// reports how the connection ended.
const PY_TLS: &str = r#"
import socket, ssl, json, time
def ctx(ca):
    # The chain must verify against the one backend's certificate; the name is not
    # checked, so that a wildcard route's names reach it too.
    c = ssl.create_default_context(cafile=ca)
    c.check_hostname = False
    c.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    return c
def cn_of(cert):
    return dict(x[0] for x in cert["subject"])["commonName"]
def hello(addr, port, sni, ca, pieces=1):
    try:
        s = socket.create_connection((addr, port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx(ca).wrap_bio(inc, out, server_hostname=sni)
        first = True
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                data = out.read()
                if first and pieces > 1:
                    step = max(1, len(data) // pieces + 1)
                    for i in range(0, len(data), step):
                        s.sendall(data[i:i + step])
                        time.sleep(0.05)
                elif data:
                    s.sendall(data)
                first = False
                got = s.recv(65536)
                if not got:
                    raise OSError("closed during the handshake")
                inc.write(got)
        s.sendall(out.read())
        cn = cn_of(obj.getpeercert())
        obj.write(b"GET / HTTP/1.0\r\n\r\n")
        s.sendall(out.read())
        # Until the server's close_notify: s_server -www sends the page and its
        # close_notify, then waits for the client to close before it closes. One recv
        # may carry several records, and each read takes at most one: drain them all.
        page, done = b"", False
        while not done:
            got = s.recv(65536)
            if not got:
                break
            inc.write(got)
            while True:
                try:
                    chunk = obj.read(65536)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    done = True
                    break
                if not chunk:
                    done = True
                    break
                page += chunk
        s.close()
        return {"ok": True, "cn": cn, "status": page.split(b"\r\n")[0].decode()}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__ + ": " + str(e)}
def plain(addr, port, data, wait=5):
    s = socket.create_connection((addr, port), timeout=wait)
    try:
        if data:
            s.sendall(data)
        got = s.recv(100)
        return {"ended": "eof" if not got else "data"}
    except ConnectionResetError:
        return {"ended": "reset"}
    except socket.timeout:
        return {"ended": "timeout"}
"#;

fn run(node: &Node, client: &Pod, call: &str) -> serde_json::Value {
    let script = format!("{PY_TLS}\nprint(json.dumps({call}))\n");
    python_in_pod(node, client, &script, Duration::from_secs(30))
}

fn hello(
    node: &Node,
    client: &Pod,
    addr: &str,
    port: u16,
    sni: &str,
    ca: &Path,
) -> serde_json::Value {
    run(
        node,
        client,
        &format!(
            "hello({addr:?}, {port}, {sni:?}, {:?})",
            ca.display().to_string()
        ),
    )
}

/// Asserts a handshake completed with the certificate of backend `name`.
fn assert_reaches(result: &serde_json::Value, name: &str) {
    assert_eq!(result["ok"], true, "{name}: {result}");
    assert_eq!(result["cn"], name, "{result}");
    assert!(
        result["status"]
            .as_str()
            .unwrap_or_default()
            .contains("200"),
        "{result}"
    );
}

/// The two backends of `namespace`, each running `openssl s_server` with its own new
/// certificate, and the certificates a client verifies them by.
struct Backends {
    a: Pod,
    b: Pod,
    ca_a: PathBuf,
    ca_b: PathBuf,
    /// The `s_server` processes, ended when the backends go (or with the testbed).
    servers: Vec<Child>,
}

impl Drop for Backends {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Backends {
    fn start(node: &mut Node, namespace: &str) -> Backends {
        let certs = node.tb.state_dir().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let ca_a = certificate(&certs, "a.example.com");
        let ca_b = certificate(&certs, "b.example.com");
        let a = node.pod(namespace, "backend-a");
        let b = node.pod(namespace, "backend-b");
        let servers = vec![
            s_server(node, &a, &certs, "a.example.com"),
            s_server(node, &b, &certs, "b.example.com"),
        ];
        Backends {
            a,
            b,
            ca_a,
            ca_b,
            servers,
        }
    }

    /// Waits until each backend completes a handshake with `client` dialling it directly.
    fn wait_answering(&self, node: &Node, client: &Pod) {
        for (pod, ca, name) in [
            (&self.a, &self.ca_a, "a.example.com"),
            (&self.b, &self.ca_b, "b.example.com"),
        ] {
            wait_for("the backends' s_server", || {
                let direct = hello(node, client, &pod.ip.to_string(), BACKEND_PORT, name, ca);
                (direct["ok"] == true).then_some(())
            });
        }
    }
}

/// Dialling `addr:port` with a name no rule holds (`c.example.com`), or with bytes that
/// are not TLS, is refused: reset, never forwarded, so the handshake fails.
fn assert_refuses(node: &Node, client: &Pod, addr: &str, port: u16, ca: &Path) {
    let unknown = hello(node, client, addr, port, "c.example.com", ca);
    assert_eq!(unknown["ok"], false, "{unknown}");
    let plain = run(
        node,
        client,
        &format!("plain({addr:?}, {port}, b'hello\\n')"),
    );
    assert_eq!(plain["ended"], "reset", "{plain}");
}

/// `metrics` counts at least one refusal of `direction` for each of `reasons`.
fn assert_refusals(metrics: &str, direction: &str, reasons: &[&str]) {
    for reason in reasons {
        assert!(
            metric_in(
                metrics,
                "interceptor_proxy_tls_refused_total",
                &[
                    &format!("direction=\"{direction}\""),
                    &format!("reason=\"{reason}\"")
                ]
            ) >= 1,
            "{reason}: {metrics}"
        );
    }
}

fn backends_yaml(namespace: &str, with_status: Option<(&Pod, &Pod)>) -> String {
    let mut yaml = String::new();
    for (name, host, svc_ip) in [
        ("backend-a", "a", "10.96.2.11"),
        ("backend-b", "b", "10.96.2.12"),
    ] {
        let status = match with_status {
            Some((a, b)) => format!(
                "status: {{podIP: {}}}\n",
                if host == "a" { &a.ip } else { &b.ip }
            ),
            None => String::new(),
        };
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: s, image: x, ports: [{{containerPort: {BACKEND_PORT}}}]}}]}}\n{status}\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{host}, namespace: {namespace}}}\n\
             spec: {{clusterIP: {svc_ip}, selector: {{app: {name}}}, ports: [{{name: tls, port: 443, targetPort: {BACKEND_PORT}}}]}}\n"
        ));
    }
    yaml
}

/// The FSM document's Gateway, verbatim.
const GATEWAY: &str = interceptor_testbed::fsm_docs::TLS_PASSTHROUGH_GATEWAY;

/// A TLSRoute in the FSM document's shape, on the Gateway's port 8000, created on
/// 2024-01-0`day`, taking `hostnames` to Service `backend`:443.
fn tls_route(name: &str, day: u8, hostnames: &[&str], backend: &str) -> String {
    let hostnames: String = hostnames.iter().map(|h| format!("  - {h:?}\n")).collect();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\nmetadata:\n  \
         name: {name}\n  namespace: httpbin\n  creationTimestamp: \"2024-01-0{day}T00:00:00Z\"\n\
         spec:\n  parentRefs:\n  - name: simple-fsm-gateway\n    port: 8000\n  hostnames:\n\
         {hostnames}  rules:\n  - backendRefs:\n    - name: {backend}\n      port: 443\n"
    )
}

/// The Gateway and its TLSRoutes: one per name, and a younger one claiming a held name.
fn gateway_routes() -> String {
    [
        GATEWAY.to_owned(),
        tls_route("tls-route-a", 1, &["a.example.com"], "svc-a"),
        tls_route(
            "tls-route-b",
            2,
            &["*.b.example.com", "b.example.com"],
            "svc-b",
        ),
        tls_route("tls-route-late", 3, &["a.example.com"], "svc-b"),
    ]
    .concat()
}

fn gateway_dump(node: &Node, gateway: &Pod) -> Option<serde_json::Value> {
    common::gateway_dump(&node.tb, gateway, GATEWAY_ADMIN.parse().ok()?)
}

fn gateway_metrics(node: &Node, gateway: &Pod) -> String {
    let addr: SocketAddr = GATEWAY_ADMIN.parse().unwrap();
    node.tb
        .http_get_in_pod(gateway, addr, "/metrics")
        .expect("gateway /metrics")
        .1
}

#[test]
fn gateway_tls_passthrough_routes_by_server_name_and_refuses_the_rest() {
    if !common::privileged() {
        return;
    }
    let namespaces = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
                      apiVersion: v1\nkind: Namespace\nmetadata: {name: httpbin}\n";
    let mut node = Node::start_with_manifests(
        "tls-gw",
        &["--unknown-pod", "admit", "--unknown-pod-wait-ms", "0"],
        namespaces,
    );
    let backends = Backends::start(&mut node, "httpbin");
    let gateway = node.pod("httpbin", "gateway");
    let client = node.pod("default", "client");
    backends.wait_answering(&node, &client);
    let Backends {
        a, b, ca_a, ca_b, ..
    } = &backends;

    let dir = node.tb.state_dir().join("gateway-manifests");
    std::fs::create_dir_all(&dir).unwrap();
    let objects = format!(
        "{namespaces}{}{}",
        backends_yaml("httpbin", Some((a, b))),
        gateway_routes()
    );
    std::fs::write(dir.join("objects.yaml"), objects).unwrap();
    let log = node.tb.state_dir().join("gateway.log");
    let mut cmd = Command::new(bin_path("interceptor"));
    cmd.args([
        "gateway",
        "--gateway",
        "httpbin/simple-fsm-gateway",
        "--manifests",
    ])
    .arg(&dir)
    .args([
        "--admin-addr",
        GATEWAY_ADMIN,
        "--client-hello-timeout",
        "1s",
    ])
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&log).unwrap())
    .stderr(std::fs::File::create(log.with_extension("err")).unwrap());
    let mut process = node
        .tb
        .spawn_in_pod(&gateway, cmd)
        .expect("interceptor gateway");
    let dump = wait_for("the gateway's TLS listener", || {
        let dump = gateway_dump(&node, &gateway)?;
        let open = dump["listeners"]
            .as_array()?
            .iter()
            .any(|l| l["port"] == 8000 && l["accepted"] == true);
        open.then_some(dump)
    });

    // The older route holds a.example.com; the younger one says why it is not in force.
    let late = dump["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "httpbin/tls-route-late")
        .cloned()
        .unwrap_or_else(|| panic!("{dump}"));
    assert_eq!(late["accepted"], false, "{late}");
    assert_eq!(
        late["conditions"][0]["reason"], "HostnameConflict",
        "{late}"
    );

    let gw = gateway.ip.to_string();
    assert_reaches(
        &hello(&node, &client, &gw, 8000, "a.example.com", ca_a),
        "a.example.com",
    );
    assert_reaches(
        &hello(&node, &client, &gw, 8000, "b.example.com", ca_b),
        "b.example.com",
    );
    // A ClientHello in six segments, 50 ms apart: peeked until complete, then forwarded.
    let pieces = run(
        &node,
        &client,
        &format!(
            "hello({gw:?}, 8000, \"a.example.com\", {:?}, pieces=6)",
            ca_a.display().to_string()
        ),
    );
    assert_reaches(&pieces, "a.example.com");

    // No route for the name, or not TLS at all: reset at once, never forwarded.
    assert_refuses(&node, &client, &gw, 8000, ca_a);
    // Silent: reset when the 1 s ClientHello timeout ends, well before the client's 5 s.
    let silent = run(&node, &client, &format!("plain({gw:?}, 8000, b'')"));
    assert_eq!(silent["ended"], "reset", "{silent}");

    let metrics = gateway_metrics(&node, &gateway);
    assert_refusals(&metrics, "gateway", &["no_route", "not_tls", "timeout"]);
    assert!(
        metric_in(
            &metrics,
            "interceptor_proxy_connections_total",
            &["route=\"TLSRoute httpbin/tls-route-a\""]
        ) >= 2,
        "{metrics}"
    );
    let dump = gateway_dump(&node, &gateway).expect("dump");
    let snis: Vec<&str> = dump["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["sni"].as_str())
        .collect();
    assert!(
        snis.contains(&"b.example.com") && snis.contains(&"c.example.com"),
        "{dump}"
    );
    let _ = process.kill();
    let _ = process.wait();
}

/// The mesh: `tls-svc:443` routed by server name to `svc-a` or `svc-b`.
const MESH_VS: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: tls-svc, namespace: default}
spec:
  clusterIP: 10.96.2.10
  selector: {app: backend-a}
  ports: [{name: tls, port: 443, targetPort: 8443}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: tls-by-sni
  namespace: default
spec:
  hosts:
  - tls-svc
  tls:
  - match:
    - port: 443
      sniHosts:
      - a.example.com
    route:
    - destination:
        host: svc-a
  - match:
    - port: 443
      sniHosts:
      - "*.b.example.com"
      - b.example.com
      destinationSubnets: [10.96.2.0/24]
      sourceLabels: {app: client}
    route:
    - destination:
        host: svc-b
        port:
          number: 443
"#;

fn mesh_virtual_service_tls_routes_by_server_name(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default, labels: {{app: client}}}}\n\
         spec: {{containers: [{{name: c, image: x}}]}}\n{}{MESH_VS}",
        backends_yaml("default", None)
    );
    let mut node = Node::start_with_manifests(
        &format!("tls-mesh-{}", mode.name()),
        &mode.args(&["--client-hello-timeout", "1s"]),
        &manifests,
    );
    let backends = Backends::start(&mut node, "default");
    let client = node.pod("default", "client");
    wait_for("the VirtualService in force", || {
        let dump = node.config_dump();
        dump["routes"]
            .as_array()?
            .iter()
            .any(|r| r["name"] == "default/tls-by-sni" && r["accepted"] == true)
            .then_some(())
    });
    // The backends answer (directly, through the proxy's passthrough) before routing.
    backends.wait_answering(&node, &client);

    let svc = "10.96.2.10";
    assert_reaches(
        &hello(&node, &client, svc, 443, "a.example.com", &backends.ca_a),
        "a.example.com",
    );
    assert_reaches(
        &hello(&node, &client, svc, 443, "x.b.example.com", &backends.ca_b),
        "b.example.com",
    );
    assert_refuses(&node, &client, svc, 443, &backends.ca_a);

    let (_, metrics) = node.tb.admin_get("/metrics").expect("metrics");
    assert_refusals(&metrics, "outbound", &["no_route", "not_tls"]);
    assert!(
        metric_in(
            &metrics,
            "interceptor_proxy_connections_total",
            &[
                "route=\"VirtualService default/tls-by-sni\"",
                "backend=\"default/svc-b:443\""
            ]
        ) >= 1,
        "{metrics}"
    );
}

/// FSM's Egress policy for HTTPS (8.1) with `enableEgress: false`: ServiceAccount
/// `default/curl` may reach port 8443 of any address when its ClientHello names
/// `a.example.com`. The backends are outside the mesh (namespace `ext`, not enrolled).
const EGRESS_HTTPS: &str = r#"---
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata:
  name: a-example-https
  namespace: default
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: default
  hosts:
  - a.example.com
  ports:
  - number: 8443
    protocol: https
"#;

fn mesh_egress_https_policy_opens_by_server_name(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let config = common::MeshConfigFile::new(
        &format!("egress-https-{}", mode.name()),
        "enableEgress: false\n",
    );
    let config_arg = config.arg();
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n\
         ---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ext}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: default, labels: {{app: client}}}}\n\
         spec: {{serviceAccountName: curl, containers: [{{name: c, image: x}}]}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: other, namespace: default, labels: {{app: other}}}}\n\
         spec: {{containers: [{{name: c, image: x}}]}}\n{}{EGRESS_HTTPS}",
        backends_yaml("ext", None)
    );
    let mut node = Node::start_with_manifests(
        &format!("tls-egress-{}", mode.name()),
        &mode.args(&["--client-hello-timeout", "1s", "--mesh-config", &config_arg]),
        &manifests,
    );
    let backends = Backends::start(&mut node, "ext");
    let client = node.pod("default", "client");
    let other = node.pod("default", "other");
    let a = backends.a.ip.to_string();
    // The policy's name opens the backend; the handshake completes with its certificate.
    let to_a = |from: &Pod, sni: &str| hello(&node, from, &a, BACKEND_PORT, sni, &backends.ca_a);
    let result = wait_for("the Egress lets a.example.com out", || {
        let result = to_a(&client, "a.example.com");
        (result["ok"] == true).then_some(result)
    });
    assert_reaches(&result, "a.example.com");
    // Another name, no TLS at all, or another ServiceAccount: refused.
    assert_refuses(&node, &client, &a, BACKEND_PORT, &backends.ca_a);
    let other_sa = to_a(&other, "a.example.com");
    assert_eq!(other_sa["ok"], false, "{other_sa}");

    let dump = node.config_dump();
    let records: Vec<&serde_json::Value> = dump["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["original_dst"] == format!("{a}:{BACKEND_PORT}").as_str())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["target"]["route"] == "Egress default/a-example-https"
                && r["sni"] == "a.example.com"),
        "{records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["target"]["route"] == "enableEgress"
                && r["target"]["reason"]
                    .as_str()
                    .is_some_and(|x| x.contains("as \"c.example.com\""))),
        "{records:?}"
    );
    let (_, metrics) = node.tb.admin_get("/metrics").expect("metrics");
    assert_refusals(&metrics, "outbound", &["not_tls"]);
    assert!(
        metric_in(
            &metrics,
            "interceptor_proxy_connections_total",
            &["route=\"Egress default/a-example-https\""]
        ) >= 1,
        "{metrics}"
    );
    assert!(
        metric_in(
            &metrics,
            "interceptor_proxy_refused_total",
            &["route=\"enableEgress\""]
        ) >= 2,
        "{metrics}"
    );
}

in_both_modes!(
    mesh_virtual_service_tls_routes_by_server_name,
    mesh_egress_https_policy_opens_by_server_name,
);
