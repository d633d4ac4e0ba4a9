//! UDP routes at `interceptor gateway` end to end (FSM 7.4.11): a gateway process in a
//! gateway pod's netns serves the document's UDP Gateway and UDPRoute, as written (the
//! Service port without `protocol`, a Deployment turned into a Pod whose `status.podIP` is
//! the testbed's), to `tb-pod udp-echo` backends that stand in for fortio's UDP echo. Real
//! datagrams from `tb-pod udp-client` in a client pod: the document's echo, replies from
//! the gateway's address, a session's stickiness, an 80/20 split over 200 client ports, a
//! route of the wrong transport refused while the valid one works, live route changes, idle
//! sessions ending, and a full flow table evicting its longest idle session.
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use common::{
    gateway_dump, gateway_serves, metric_in, route_condition, spawn_gateway, wait_for, Node,
};
use interceptor_testbed::{Pod, ServerProcess};

const NAMESPACES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n---\n\
                          apiVersion: v1\nkind: Namespace\nmetadata: {name: server}\n";

/// The document's Service, as written: its port has no `protocol` (TCP by default).
const FORTIO_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: fortio
  namespace: server
  labels:
    app: fortio
    service: fortio
spec:
  ports:
  - port: 8078
    name: udp-8078
  selector:
    app: fortio
"#;

/// The document's Gateway, and its UDPRoute verbatim.
const FSM_GATEWAY: &str = interceptor_testbed::fsm_docs::UDP_GATEWAY;

/// The echo backends: (pod, `app` label, prefix of its replies; none: a plain echo).
const BACKENDS: [(&str, &str, Option<&str>); 3] = [
    ("fortio", "fortio", None),
    ("echo-a", "echo-a", Some("a")),
    ("echo-b", "echo-b", Some("b")),
];

struct Bed {
    gateway_process: Option<Child>,
    /// The running gateway's admin address (each gateway process of a test its own).
    admin: SocketAddr,
    node: Node,
    _servers: Vec<ServerProcess>,
    gateway: Pod,
    client: Pod,
    dir: PathBuf,
}

impl Bed {
    /// The backends answering on 8078, the gateway pod and a client pod; the gateway's
    /// manifests hold the namespaces, the backend pods with their addresses and their
    /// Services (`echo-a`, `echo-b` with `protocol: UDP`, and the document's `fortio`).
    fn start(label: &str) -> Bed {
        let mut node = Node::start_with_manifests(
            label,
            &["--unknown-pod", "admit", "--unknown-pod-wait-ms", "0"],
            NAMESPACES,
        );
        let mut yaml = format!("{NAMESPACES}---{FORTIO_SERVICE}");
        let mut servers = Vec::new();
        for (name, app, prefix) in BACKENDS {
            let pod = node.pod("server", name);
            let mut args = vec!["udp-echo", "--listen", "0.0.0.0:8078"];
            if let Some(prefix) = prefix {
                args.extend(["--prefix", prefix]);
            }
            servers.push(node.tb.spawn_server(&pod, &args).expect("udp-echo"));
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: server, labels: {{app: {app}}}}}\n\
                 spec: {{containers: [{{name: echo, image: fortio/fortio:latest_release, ports: [{{containerPort: 8078, name: http}}]}}]}}\n\
                 status: {{podIP: {}}}\n",
                pod.ip
            ));
            if name != "fortio" {
                yaml.push_str(&format!(
                    "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: server}}\n\
                     spec: {{selector: {{app: {app}}}, ports: [{{name: udp, port: 8078, protocol: UDP}}]}}\n"
                ));
            }
        }
        let gateway = node.pod("server", "fsm-gateway");
        let client = node.pod("default", "client");
        let dir = node.tb.state_dir().join("gateway-manifests");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("apps.yaml"), yaml).expect("apps.yaml");
        Bed {
            gateway_process: None,
            admin: SocketAddr::from(([127, 0, 0, 1], 15_000)),
            node,
            _servers: servers,
            gateway,
            client,
            dir,
        }
    }

    fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.join(file), yaml).expect("write manifests");
    }

    /// Start `interceptor gateway` for the document's Gateway (ending the one running, if
    /// any) and wait until its UDP listeners on `ports` are open.
    fn serve(&mut self, extra: &[&str], ports: &[u16]) {
        if let Some(mut running) = self.gateway_process.take() {
            let _ = running.kill();
            let _ = running.wait();
            self.admin.set_port(self.admin.port() + 1);
        }
        let log = self
            .node
            .tb
            .state_dir()
            .join(format!("gateway-{}.log", self.admin.port()));
        let mut args = vec![
            "--gateway",
            "server/simple-fsm-gateway",
            "--gateway-class",
            "fsm-gateway-cls",
        ];
        args.extend_from_slice(extra);
        let admin = self.admin.to_string();
        let tb = &self.node.tb;
        let child = spawn_gateway(tb, &self.gateway, &self.dir, &admin, &args, &log);
        self.gateway_process = Some(child);
        wait_for(&format!("UDP listeners on {ports:?}"), || {
            gateway_serves(&self.dump()?, ports).then_some(())
        });
    }

    fn dump(&self) -> Option<serde_json::Value> {
        gateway_dump(&self.node.tb, &self.gateway, self.admin)
    }

    fn metrics(&self) -> String {
        let (status, body) = self
            .node
            .tb
            .http_get_in_pod(&self.gateway, self.admin, "/metrics")
            .expect("gateway /metrics");
        assert_eq!(status, 200, "{body}");
        body
    }

    fn metric(&self, name: &str, fragments: &[&str]) -> i64 {
        metric_in(&self.metrics(), name, fragments)
    }

    /// `(status, reason)` of route `name`'s condition `kind` in `/config_dump`.
    fn condition(&self, name: &str, kind: &str) -> (String, String) {
        route_condition(&self.dump().expect("config dump"), name, kind)
    }

    /// `tb-pod udp-client` in the client pod against the gateway's `port`.
    fn send(&self, port: u16, args: &[&str]) -> serde_json::Value {
        let target = format!("{}:{port}", self.gateway.ip);
        let mut full = vec!["udp-client", "--connect", target.as_str()];
        full.extend_from_slice(args);
        self.node
            .tb
            .run_tb_pod(&self.client, &full, Duration::from_secs(60))
            .expect("udp-client")
    }

    /// The one reply word a single datagram from client port `port` gets on `listener`.
    fn answer_from(&self, listener: u16, port: u16) -> String {
        let report = self.send(listener, &["--local-port-base", &port.to_string()]);
        assert_eq!(report["received"], 1, "{report}");
        report["first_reply"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    fn flows(&self, listener: &str) -> i64 {
        self.metric(
            "interceptor_gateway_udp_flows",
            &[&format!("listener=\"{listener}\"")],
        )
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The gateways' logs, for a failure's reader: the state dir goes with the bed.
            for port in 15_000..=self.admin.port() {
                let log = self.node.tb.state_dir().join(format!("gateway-{port}.err"));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                eprintln!("--- {}:\n{text}", log.display());
            }
        }
        // Ended by its PID, before the netns go.
        if let Some(mut child) = self.gateway_process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UDPRoute on `parent` splitting over `backends` (`(service, weight)`).
fn udp_route(name: &str, parent: &str, backends: &[(&str, u32)]) -> String {
    let refs: Vec<String> = backends
        .iter()
        .map(|(svc, w)| format!("{{name: {svc}, port: 8078, weight: {w}}}"))
        .collect();
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: UDPRoute\n\
         metadata: {{name: {name}, namespace: server}}\n\
         spec: {{parentRefs: [{parent}], rules: [{{backendRefs: [{}]}}]}}\n",
        refs.join(", ")
    )
}

/// The document's Gateway with two more listeners: UDP 8001 with the UDPRoute `split`
/// over `split` (`(service, weight)`; none: no route there), and TCP 8002 with a UDPRoute.
fn gateway_with_split(split: Option<&[(&str, u32)]>) -> String {
    let gateway = FSM_GATEWAY.replace(
        "      name: udp\n",
        "      name: udp\n    - {protocol: UDP, port: 8001, name: split}\n    - {protocol: TCP, port: 8002, name: tcp}\n",
    );
    let split = split
        .map(|backends| {
            udp_route(
                "split",
                "{name: simple-fsm-gateway, sectionName: split}",
                backends,
            )
        })
        .unwrap_or_default();
    format!(
        "{gateway}{split}{}",
        // A UDPRoute on the TCP listener: refused, harming nothing.
        udp_route(
            "udp-on-tcp",
            "{name: simple-fsm-gateway, sectionName: tcp}",
            &[("echo-a", 1)]
        ),
    )
}

#[test]
fn fsm_udp_route_echo_sessions_weights_and_refusals() {
    if !common::privileged() {
        return;
    }
    let mut bed = Bed::start("udp-fsm");
    bed.write(
        "gateway.yaml",
        &gateway_with_split(Some(&[("echo-a", 80), ("echo-b", 20)])),
    );
    bed.serve(&[], &[8000, 8001]);

    // The document's test: `echo 'fsm' | nc -4u -w1 $GATEWAY_IP 8000` answers `fsm`,
    // from the gateway's address and the listener's port.
    let seed = bed.send(8000, &["--message", "fsm"]);
    assert_eq!(seed["first_reply"], "fsm", "{seed}");
    assert_eq!(
        seed["from"],
        serde_json::json!([format!("{}:8000", bed.gateway.ip)]),
        "{seed}"
    );
    assert_eq!(
        bed.condition("server/udp-route-sample", "Accepted"),
        ("True".into(), "Accepted".into())
    );
    assert_eq!(
        bed.condition("server/udp-route-sample", "ResolvedRefs"),
        ("True".into(), "ResolvedRefs".into())
    );
    assert_eq!(
        bed.condition("server/udp-on-tcp", "Accepted"),
        ("False".into(), "NotAllowedByListeners".into())
    );

    // A session sticks to its backend: 5 client ports, 20 datagrams each. Client ports
    // are chosen, never ephemeral: a port the kernel hands out again would find the
    // session of an earlier run.
    let sticky = bed.send(
        8001,
        &[
            "--clients",
            "5",
            "--count",
            "20",
            "--local-port-base",
            "41000",
        ],
    );
    assert_eq!(sticky["received"], 100, "{sticky}");
    for client in sticky["clients"].as_array().expect("clients") {
        assert_eq!(
            client["words"].as_array().map(Vec::len),
            Some(1),
            "{sticky}"
        );
    }

    // 80/20 over 200 client ports, one datagram each.
    let split = bed.send(8001, &["--clients", "200", "--local-port-base", "42000"]);
    assert_eq!(split["received"], 200, "{split}");
    let a = split["replies"]["a"].as_i64().unwrap_or_default();
    let b = split["replies"]["b"].as_i64().unwrap_or_default();
    assert_eq!(a + b, 200, "{split}");
    assert!(
        (150..=170).contains(&a),
        "80/20 split gave a={a} b={b}: {split}"
    );

    // Counted per route and direction, and per backend as sessions open.
    let metrics = bed.metrics();
    let route = "route=\"UDPRoute server/split\"";
    for direction in ["upstream", "downstream"] {
        let datagrams = metric_in(
            &metrics,
            "interceptor_gateway_udp_datagrams_total",
            &[route, &format!("direction=\"{direction}\"")],
        );
        assert_eq!(datagrams, 300, "{direction}: {metrics}");
    }
    let opened = |backend: &str| {
        metric_in(
            &metrics,
            "interceptor_gateway_udp_flows_opened_total",
            &[route, &format!("backend=\"server/{backend}:8078\"")],
        )
    };
    let sticky_a = sticky["replies"]["a"].as_i64().unwrap_or_default() / 20;
    assert_eq!(opened("echo-a"), a + sticky_a, "{metrics}");
    assert_eq!(opened("echo-b"), b + 5 - sticky_a, "{metrics}");
    assert_eq!(
        metric_in(
            &metrics,
            "interceptor_gateway_udp_flows",
            &["listener=\"split\""]
        ),
        205,
        "{metrics}"
    );

    // Live: the split moves wholly to echo-b. New sessions take the new weights; the
    // sessions of the removed backend end (their route no longer serves it).
    bed.write("gateway.yaml", &gateway_with_split(Some(&[("echo-b", 1)])));
    wait_for("sessions of echo-a ended after the route change", || {
        let m = bed.metrics();
        let ended = metric_in(
            &m,
            "interceptor_gateway_udp_flows_ended_total",
            &["listener=\"split\"", "reason=\"route_changed\""],
        );
        (ended >= a).then_some(())
    });
    let moved = bed.send(8001, &["--clients", "20", "--local-port-base", "43000"]);
    assert_eq!(moved["replies"]["b"], 20, "{moved}");

    // The split route removed, its listener kept: every session of it ends, and
    // datagrams there are dropped, counted, never answered.
    bed.write("gateway.yaml", &gateway_with_split(None));
    wait_for("the split listener's sessions ended", || {
        (bed.flows("split") == 0).then_some(())
    });
    let unrouted = bed.send(8001, &["--clients", "3", "--timeout-ms", "300"]);
    assert_eq!(unrouted["received"], 0, "{unrouted}");
    assert_eq!(
        bed.metric(
            "interceptor_gateway_udp_dropped_total",
            &["listener=\"split\"", "reason=\"no_route\""]
        ),
        3
    );

    // Listener removed: its port closes, the other keeps serving.
    bed.write(
        "gateway.yaml",
        &format!(
            "{FSM_GATEWAY}{}",
            udp_route(
                "udp-on-tcp",
                "{name: simple-fsm-gateway, sectionName: tcp}",
                &[("echo-a", 1)]
            )
        ),
    );
    wait_for("the split listener gone", || {
        let dump = bed.dump()?;
        let gone = !dump["listeners"]
            .as_array()?
            .iter()
            .any(|l| l["name"] == "split");
        gone.then_some(())
    });
    // Closed, not merely unrouted: datagrams to 8001 no longer reach the gateway.
    let closed = bed.send(8001, &["--clients", "2", "--timeout-ms", "300"]);
    assert_eq!(closed["received"], 0, "{closed}");
    assert_eq!(
        bed.metric(
            "interceptor_gateway_udp_dropped_total",
            &["listener=\"split\""]
        ),
        3
    );
    assert_eq!(bed.send(8000, &["--message", "fsm"])["first_reply"], "fsm");
    assert_eq!(
        bed.condition("server/udp-on-tcp", "Accepted"),
        ("False".into(), "NoMatchingParent".into())
    );
}

#[test]
fn idle_sessions_end_and_a_full_table_evicts_the_longest_idle() {
    if !common::privileged() {
        return;
    }
    let mut bed = Bed::start("udp-idle");
    let halves = udp_route(
        "halves",
        "{name: simple-fsm-gateway, port: 8000}",
        &[("echo-a", 1), ("echo-b", 1)],
    );
    bed.write(
        "gateway.yaml",
        &format!(
            "{}{halves}",
            FSM_GATEWAY.split("---").next().expect("the Gateway")
        ),
    );
    bed.serve(
        &["--udp-idle-timeout", "2s", "--udp-max-flows", "3"],
        &[8000],
    );
    let opened = |bed: &Bed| {
        bed.metric(
            "interceptor_gateway_udp_flows_opened_total",
            &["listener=\"udp\""],
        )
    };

    // One client port: the same backend while the session lives, the other after it
    // ended idle (1:1 weights alternate new sessions, and no other session opens here).
    let first = bed.answer_from(8000, 40_000);
    for _ in 0..3 {
        assert_eq!(bed.answer_from(8000, 40_000), first);
    }
    assert_eq!(opened(&bed), 1);
    assert_eq!(bed.flows("udp"), 1);
    wait_for("the idle session ended", || {
        (bed.flows("udp") == 0).then_some(())
    });
    assert_eq!(
        bed.metric(
            "interceptor_gateway_udp_flows_ended_total",
            &["listener=\"udp\"", "reason=\"idle\""]
        ),
        1
    );
    assert_ne!(
        bed.answer_from(8000, 40_000),
        first,
        "a new session picks again"
    );
    assert_eq!(opened(&bed), 2);

    // A table of 3, with sessions that do not expire during the test: a fresh gateway.
    bed.serve(&["--udp-max-flows", "3"], &[8000]);
    // Ports 40000..40002 open sessions, 40000 is used again, so the fourth new port
    // evicts 40001 (idle longest), not 40000 (opened first).
    for port in [40_000, 40_001, 40_002, 40_000] {
        bed.answer_from(8000, port);
    }
    assert_eq!(opened(&bed), 3);
    let evicted = |bed: &Bed| {
        bed.metric(
            "interceptor_gateway_udp_flows_evicted_total",
            &["listener=\"udp\""],
        )
    };
    assert_eq!(evicted(&bed), 0);
    bed.answer_from(8000, 40_003);
    assert_eq!(evicted(&bed), 1);
    assert_eq!(opened(&bed), 4);
    // 40000 and 40002 kept their sessions; 40001 opens a new one, evicting 40003 (the
    // sessions' last activity: 40002, 40000, 40003, then 40000 and 40002 again).
    bed.answer_from(8000, 40_000);
    bed.answer_from(8000, 40_002);
    assert_eq!(opened(&bed), 4, "40000 and 40002 still had sessions");
    bed.answer_from(8000, 40_001);
    assert_eq!(opened(&bed), 5);
    assert_eq!(evicted(&bed), 2);
    assert_eq!(bed.flows("udp"), 3);
    bed.answer_from(8000, 40_003);
    assert_eq!(opened(&bed), 6, "40003 had been evicted");
    assert_eq!(evicted(&bed), 3);
}
