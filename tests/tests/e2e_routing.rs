//! L4 routing end to end, with the YAML of the reference documents (Alibaba ASM "L4 TCP
//! routing", Istio TCP traffic shifting, FSM traffic split, Gateway API TCPRoute) adapted
//! only in names and addresses: Deployments become Pods, Services get a clusterIP. The
//! echo servers answer like istio/tcp-echo-server ("<prefix> <line>"), so each reply says
//! which backend answered.
mod common;

use std::time::Duration;

use common::{wait_for, MeshConfigFile, Node};
use interceptor_testbed::{Pod, ServerProcess};

/// The ASM document's applications, as Pods, plus the FSM bookstore services.
const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-server, labels: {app: echo-server, version: prod}}
spec:
  serviceAccountName: echo-server
  containers: [{name: server, image: istio/tcp-echo-server:1.2, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: echo-server-gray, labels: {app: echo-server, version: gray}}
spec:
  serviceAccountName: echo-server
  containers: [{name: server, image: istio/tcp-echo-server:1.2, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo-server
  labels: {app: echo-server}
spec:
  clusterIP: 10.96.1.10
  selector: {app: echo-server}
  ports:
  - protocol: TCP
    name: tcp
    port: 19000
    targetPort: 9000
  type: ClusterIP
---
apiVersion: v1
kind: Pod
metadata: {name: echo-server-2, labels: {app: echo-server-2}}
spec:
  serviceAccountName: echo-server-2
  containers: [{name: server, image: istio/tcp-echo-server:1.2, ports: [{containerPort: 9000}]}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo-server-2
  labels: {app: echo-server-2}
spec:
  clusterIP: 10.96.1.11
  selector: {app: echo-server-2}
  ports:
  - protocol: TCP
    name: tcp
    port: 19000
    targetPort: 9000
  type: ClusterIP
---
apiVersion: v1
kind: Pod
metadata: {name: telnet-client, labels: {app: telnet-client}}
spec:
  serviceAccountName: telnet-client
  containers: [{name: client, image: mikesplain/telnet:latest}]
---
apiVersion: v1
kind: Pod
metadata: {name: telnet-client-2, labels: {app: telnet-client-2}}
spec:
  serviceAccountName: telnet-client-2
  containers: [{name: client, image: mikesplain/telnet:latest}]
---
apiVersion: v1
kind: Pod
metadata: {name: telnet-client-foo, namespace: foo, labels: {app: telnet-client-foo}}
spec:
  serviceAccountName: telnet-client-foo
  containers: [{name: client, image: mikesplain/telnet:latest}]
---
apiVersion: v1
kind: Pod
metadata: {name: bookstore-v1, labels: {app: bookstore, version: v1}}
spec: {containers: [{name: bookstore, image: bookstore, ports: [{containerPort: 14001}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: bookstore-v2, labels: {app: bookstore, version: v2}}
spec: {containers: [{name: bookstore, image: bookstore, ports: [{containerPort: 14001}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: bookstore}
spec:
  clusterIP: 10.96.1.20
  selector: {app: bookstore}
  ports: [{name: tcp, port: 14001}]
---
apiVersion: v1
kind: Service
metadata: {name: bookstore-v1}
spec:
  clusterIP: 10.96.1.21
  selector: {app: bookstore, version: v1}
  ports: [{name: tcp, port: 14001}]
---
apiVersion: v1
kind: Service
metadata: {name: bookstore-v2}
spec:
  clusterIP: 10.96.1.22
  selector: {app: bookstore, version: v2}
  ports: [{name: tcp, port: 14001}]
"#;

const ECHO_SERVER: &str = "10.96.1.10:19000";
const BOOKSTORE: &str = "10.96.1.20:14001";

/// The testbed with every pod of [`APPS`] and its server running.
struct Mesh {
    node: Node,
    clients: Vec<Pod>,
    _servers: Vec<ServerProcess>,
}

impl Mesh {
    fn start(label: &str) -> Mesh {
        Self::start_with(label, &[])
    }

    fn start_with(label: &str, agent_args: &[&str]) -> Mesh {
        let mut node = Node::start_with_manifests(label, agent_args, APPS);
        let servers = [
            ("echo-server", "hello", 9000),
            ("echo-server-gray", "hello-gray", 9000),
            ("echo-server-2", "hello-2", 9000),
            ("bookstore-v1", "bookstore-v1", 14001),
            ("bookstore-v2", "bookstore-v2", 14001),
        ]
        .iter()
        .map(|(name, prefix, port)| {
            let pod = node.pod("default", name);
            node.tb
                .spawn_server(
                    &pod,
                    &[
                        "tcp-echo",
                        "--listen",
                        &format!("0.0.0.0:{port}"),
                        "--prefix",
                        prefix,
                    ],
                )
                .expect("tcp-echo")
        })
        .collect();
        let clients = vec![
            node.pod("default", "telnet-client"),
            node.pod("default", "telnet-client-2"),
            node.pod("foo", "telnet-client-foo"),
        ];
        Mesh {
            node,
            clients,
            _servers: servers,
        }
    }

    fn client(&self, name: &str) -> &Pod {
        self.clients
            .iter()
            .find(|p| p.name == name)
            .expect("client")
    }

    /// Write the routing objects and wait until the agent judged `name` (`ns/name`).
    fn apply(&self, yaml: &str, name: &str) -> serde_json::Value {
        std::fs::write(self.node.manifests.join("route.yaml"), yaml).expect("route.yaml");
        wait_for(&format!("the status of {name}"), || {
            let dump = self.node.config_dump();
            dump["routes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == name)
                .cloned()
        })
    }

    /// `count` connections from `client` to `target`; replies by first word.
    fn tally(&self, client: &str, target: &str, count: u32) -> serde_json::Value {
        let report = self
            .node
            .tb
            .run_tb_pod(
                self.client(client),
                &["tally", "--connect", target, "--count", &count.to_string()],
                Duration::from_secs(60),
            )
            .expect("tally");
        report
    }

    /// The one reply word every connection got (panics on a mix or an error).
    fn answer(&self, client: &str, target: &str) -> String {
        let report = self.tally(client, target, 4);
        let replies = report["replies"].as_object().expect("replies");
        assert_eq!(report["errors"], 0, "{report}\n{}", self.node.agent_log());
        assert_eq!(replies.len(), 1, "several backends answered: {report}");
        replies.keys().next().cloned().unwrap_or_default()
    }
}

fn metric(mesh: &Mesh, name: &str, fragments: &[&str]) -> i64 {
    common::metric(&mesh.node, name, fragments)
}

fn count(report: &serde_json::Value, word: &str) -> i64 {
    report["replies"][word].as_i64().unwrap_or(0)
}

/// `n` Bernoulli trials with probability `p` gave `k`: within four standard deviations.
fn assert_share(k: i64, n: i64, p: f64, what: &str) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    assert!(
        (k as f64 - mean).abs() <= 4.0 * sd.max(1.0),
        "{what}: {k} of {n}, expected {mean:.0} ± {:.0}",
        4.0 * sd
    );
}

#[test]
fn destination_subnets_match() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-subnets");
    let status = mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: echo
  namespace: default
spec:
  hosts:
    - echo-server.default.svc.cluster.local
  tcp:
    - match:
        - destinationSubnets:
            - "10.96.1.0/24"
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
"#,
        "default/echo",
    );
    assert_eq!(status["accepted"], true, "{status}");
    assert_eq!(mesh.answer("telnet-client", ECHO_SERVER), "hello-2");
    // A subnet the Service is not in leaves it to its own endpoints.
    mesh.apply(
        &r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: echo
  namespace: default
spec:
  hosts:
    - echo-server.default.svc.cluster.local
  tcp:
    - match:
        - destinationSubnets:
            - "192.168.0.0/16"
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
"#
        .replace("name: echo\n", "name: echo-elsewhere\n"),
        "default/echo-elsewhere",
    );
    let report = mesh.tally("telnet-client", ECHO_SERVER, 4);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(
        count(&report, "hello") + count(&report, "hello-gray"),
        4,
        "{report}"
    );
}

#[test]
fn port_match() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-port");
    mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: echo
  namespace: default
spec:
  hosts:
    - echo-server.default.svc.cluster.local
  tcp:
    - match:
        - port: 19000
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
"#,
        "default/echo",
    );
    assert_eq!(mesh.answer("telnet-client", ECHO_SERVER), "hello-2");
    let record = mesh.node.config_dump()["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|r| r["direction"] == "outbound" && r["pod"] == "default/telnet-client")
        .cloned()
        .expect("a connection record");
    assert_eq!(
        record["target"]["route"], "VirtualService default/echo",
        "{record}"
    );
    assert_eq!(
        record["target"]["backend"], "default/echo-server-2:19000",
        "{record}"
    );
}

#[test]
fn source_labels_match() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-labels");
    mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: echo
  namespace: default
spec:
  hosts:
    - echo-server.default.svc.cluster.local
  tcp:
    - match:
        - sourceLabels:
            app: telnet-client
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
"#,
        "default/echo",
    );
    assert_eq!(mesh.answer("telnet-client", ECHO_SERVER), "hello-2");
    let other = mesh.tally("telnet-client-2", ECHO_SERVER, 4);
    assert_eq!(count(&other, "hello-2"), 0, "{other}");
    assert_eq!(
        count(&other, "hello") + count(&other, "hello-gray"),
        4,
        "{other}"
    );
}

#[test]
fn source_namespace_match_and_a_default_rule() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-ns");
    mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: source-namespace
  namespace: default
spec:
  hosts:
    - echo-server.default.svc.cluster.local
  http: []
  tcp:
    - match:
        - sourceNamespace: foo
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
    - route:
        - destination:
            host: echo-server.default.svc.cluster.local
"#,
        "default/source-namespace",
    );
    assert_eq!(mesh.answer("telnet-client-foo", ECHO_SERVER), "hello-2");
    let default = mesh.tally("telnet-client", ECHO_SERVER, 4);
    assert_eq!(default["errors"], 0, "{default}");
    assert_eq!(
        count(&default, "hello") + count(&default, "hello-gray"),
        4,
        "{default}"
    );
}

#[test]
fn weights_between_subsets_over_1000_connections() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-weight");
    // The ASM document's DestinationRule and VirtualService (its `http:` routes as `tcp:`,
    // and the rule's host spelled as the Service's).
    mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: echo
  namespace: default
spec:
  host: echo-server.default.svc.cluster.local
  subsets:
    - labels:
        version: prod
      name: prod
    - labels:
        version: gray
      name: gray
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts:
  - echo-server.default.svc.cluster.local
  tcp:
    - route:
      - destination:
          host: echo-server.default.svc.cluster.local
          subset: gray
        weight: 20
      - destination:
          host: echo-server.default.svc.cluster.local
          subset: prod
        weight: 80
"#,
        "default/echo",
    );
    let report = mesh.tally("telnet-client", ECHO_SERVER, 1000);
    assert_eq!(report["errors"], 0, "{report}");
    assert_share(count(&report, "hello-gray"), 1000, 0.2, "gray");
    assert_share(count(&report, "hello"), 1000, 0.8, "prod");
    // Per route and backend in /metrics: every connection, and its bytes ("test\n" up).
    let gray = [
        "route=\"VirtualService default/echo\"",
        "backend=\"default/echo-server:19000 subset gray\"",
    ];
    let counted = wait_for("the metrics of every connection", || {
        let n = metric(&mesh, "interceptor_proxy_connections_total", &gray);
        let prod = metric(
            &mesh,
            "interceptor_proxy_connections_total",
            &["backend=\"default/echo-server:19000 subset prod\""],
        );
        (n + prod == 1000).then_some(n)
    });
    assert_eq!(counted, count(&report, "hello-gray"));
    let up = metric(
        &mesh,
        "interceptor_proxy_bytes_total",
        &[gray[0], gray[1], "flow=\"upstream\""],
    );
    assert_eq!(up, counted * 5, "5 bytes per connection");
}

#[test]
fn absent_weights_split_equally() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-equal");
    mesh.apply(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: echo
spec:
  hosts: [echo-server]
  tcp:
  - route:
    - destination: {host: echo-server-2}
    - destination: {host: echo-server, subset: gray}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: echo
spec:
  host: echo-server
  subsets: [{name: gray, labels: {version: gray}}]
"#,
        "default/echo",
    );
    let report = mesh.tally("telnet-client", ECHO_SERVER, 1000);
    assert_eq!(report["errors"], 0, "{report}");
    assert_share(count(&report, "hello-2"), 1000, 0.5, "echo-server-2");
    assert_share(count(&report, "hello-gray"), 1000, 0.5, "gray");
}

#[test]
fn smi_traffic_split_90_10() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-split");
    let status = mesh.apply(
        r#"apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata:
  name: bookstore-split
  namespace: default
spec:
  service: bookstore.default.svc.cluster.local
  backends:
  - service: bookstore-v1
    weight: 90
  - service: bookstore-v2
    weight: 10
"#,
        "default/bookstore-split",
    );
    assert_eq!(status["routes"][0], "default/bookstore:14001", "{status}");
    let report = mesh.tally("telnet-client", BOOKSTORE, 1000);
    assert_eq!(report["errors"], 0, "{report}");
    assert_share(count(&report, "bookstore-v1"), 1000, 0.9, "v1");
    assert_share(count(&report, "bookstore-v2"), 1000, 0.1, "v2");
}

#[test]
fn gamma_tcp_route_with_a_service_parent() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-gamma");
    // The Gateway API document's route, its parent a Service (GAMMA) instead of a Gateway.
    let status = mesh.apply(
        r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-app-1
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: echo-server
    port: 19000
  rules:
  - backendRefs:
    - name: echo-server-2
      port: 19000
"#,
        "default/tcp-app-1",
    );
    assert_eq!(status["accepted"], true, "{status}");
    assert_eq!(mesh.answer("telnet-client", ECHO_SERVER), "hello-2");
}

#[test]
fn bad_routes_are_rejected_with_reasons_and_zero_weights_refuse() {
    if !common::privileged() {
        return;
    }
    let mesh = Mesh::start("rt-bad");
    let status = mesh.apply(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: missing-subset
spec:
  hosts: [echo-server]
  tcp:
  - route: [{destination: {host: echo-server, subset: canary}}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata:
  name: nothing
spec:
  service: bookstore
  backends:
  - service: bookstore-v1
    weight: 0
  - service: bookstore-v2
    weight: 0
"#,
        "default/missing-subset",
    );
    assert_eq!(status["accepted"], false, "{status}");
    assert!(
        status["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("subset \"canary\"")),
        "{status}"
    );
    // The rejected route leaves echo-server on its own endpoints...
    let report = mesh.tally("telnet-client", ECHO_SERVER, 4);
    assert_eq!(report["errors"], 0, "{report}");
    // ...and weights of zero everywhere refuse the connection: no backend answers.
    let refused = mesh.tally("telnet-client", BOOKSTORE, 3);
    assert_eq!(refused["errors"], 3, "{refused}");
    assert!(refused["replies"].as_object().is_some_and(|r| r.is_empty()));
    wait_for("the refusals in /metrics", || {
        let n = metric(
            &mesh,
            "interceptor_proxy_refused_total",
            &["route=\"TrafficSplit default/nothing\""],
        );
        (n == 3).then_some(())
    });
    assert!(mesh.node.agent_log().contains("missing-subset"));
}

#[test]
fn smi_mode_denies_what_no_traffic_target_allows() {
    if !common::privileged() {
        return;
    }
    let config = MeshConfigFile::new("smi", "enablePermissiveTrafficPolicyMode: false\n");
    let config_arg = config.arg();
    let mesh = Mesh::start_with("rt-smi", &["--mesh-config", &config_arg]);
    // The SMI specification's example, with this testbed's ServiceAccounts and port.
    let status = mesh.apply(
        r#"kind: TCPRoute
apiVersion: specs.smi-spec.io/v1alpha4
metadata:
  name: the-routes
spec:
  matches:
    ports:
    - 9000
---
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata:
  name: path-specific
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: echo-server
    namespace: default
  rules:
  - kind: TCPRoute
    name: the-routes
  sources:
  - kind: ServiceAccount
    name: telnet-client
    namespace: default
"#,
        "default/path-specific",
    );
    assert_eq!(status["accepted"], true, "{status}");
    let allowed = mesh.tally("telnet-client", ECHO_SERVER, 4);
    assert_eq!(allowed["errors"], 0, "{allowed}\n{}", mesh.node.agent_log());
    let denied = mesh.tally("telnet-client-2", ECHO_SERVER, 4);
    assert_eq!(denied["errors"], 4, "{denied}");
    // A pod dialled directly is judged the same way (echo-server-2 has its own account).
    let direct = format!(
        "{}:9000",
        mesh.node
            .tb
            .pods()
            .iter()
            .find(|p| p.name == "echo-server-2")
            .expect("pod")
            .ip
    );
    assert_eq!(mesh.tally("telnet-client", &direct, 2)["errors"], 2);
    wait_for("the denials in /metrics", || {
        let n = metric(
            &mesh,
            "interceptor_proxy_refused_total",
            &["route=\"SMI access policy\""],
        );
        (n == 6).then_some(())
    });
    // Permissive mode (FSM's default) lets everyone through again.
    std::fs::write(&*config, "enablePermissiveTrafficPolicyMode: true\n").expect("config");
    wait_for("permissive mode", || {
        (mesh.tally("telnet-client-2", ECHO_SERVER, 1)["errors"] == 0).then_some(())
    });
}
