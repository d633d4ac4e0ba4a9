//! `interceptor gateway` end to end: a gateway process in a gateway pod's netns serves the
//! Gateways of the reference documents (Gateway API TCP routing, FSM Gateway TCP routing,
//! Istio's TCP gateway with 80/20 subsets, ASM's two ingress gateways), with their YAML
//! adapted only in names and addresses (Deployments are Pods; a Pod's `status.podIP` is
//! what the testbed's CNI gave it, since a gateway enrolls nothing and learns endpoints
//! from the manifests). Backends answer like istio/tcp-echo-server ("<prefix> <line>").
mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{
    gateway_dump, gateway_route, gateway_serves, route_condition, spawn_gateway, wait_for, Node,
};
use interceptor_testbed::{Pod, ServerProcess};

/// Namespaces only: no pod is enrolled, the agent just answers CNI for them.
const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
"#;

const ADMIN: &str = "127.0.0.1:15000";

/// A backend pod: its name, labels and the prefix its tcp-echo answers with.
struct App {
    name: &'static str,
    namespace: &'static str,
    labels: &'static str,
    port: u16,
    prefix: &'static str,
}

struct Bed {
    /// The `interceptor gateway` processes, ended (by PID) when the test ends.
    running: std::sync::Mutex<Vec<std::process::Child>>,
    node: Node,
    _servers: Vec<ServerProcess>,
    gateways: Vec<Pod>,
    client: Pod,
    dir: PathBuf,
}

impl Bed {
    /// Backends of `apps` serving, gateway pods named `gateways`, a client pod.
    fn start(label: &str, apps: &[App], gateways: &[(&str, &str)]) -> Bed {
        let mut namespaces: Vec<&str> = apps.iter().map(|a| a.namespace).collect();
        namespaces.extend(gateways.iter().map(|g| g.0));
        namespaces.sort_unstable();
        namespaces.dedup();
        let mut yaml = NAMESPACES.to_owned();
        for ns in namespaces.iter().filter(|ns| **ns != "default") {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"
            ));
        }
        let mut node = Node::start_with_manifests(
            label,
            &["--unknown-pod", "admit", "--unknown-pod-wait-ms", "0"],
            &yaml,
        );
        let mut pods = Vec::new();
        let mut servers = Vec::new();
        for app in apps {
            let pod = node.pod(app.namespace, app.name);
            servers.push(
                node.tb
                    .spawn_server(
                        &pod,
                        &[
                            "tcp-echo",
                            "--listen",
                            &format!("0.0.0.0:{}", app.port),
                            "--prefix",
                            app.prefix,
                        ],
                    )
                    .expect("tcp-echo"),
            );
            pods.push(pod);
        }
        let gateways = gateways
            .iter()
            .map(|(ns, name)| node.pod(ns, name))
            .collect();
        let client = node.pod("default", "client");
        // The gateway's manifests: the namespaces, and each backend pod with its address.
        let dir = node.tb.state_dir().join("gateway-manifests");
        std::fs::create_dir_all(&dir).expect("dir");
        for (app, pod) in apps.iter().zip(&pods) {
            yaml.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\n\
                 spec: {{containers: [{{name: server, image: istio/tcp-echo-server:1.2, ports: [{{containerPort: {}}}]}}]}}\n\
                 status: {{podIP: {}}}\n",
                app.name, app.namespace, app.labels, app.port, pod.ip
            ));
        }
        std::fs::write(dir.join("apps.yaml"), yaml).expect("apps.yaml");
        Bed {
            running: std::sync::Mutex::new(Vec::new()),
            node,
            _servers: servers,
            gateways,
            client,
            dir,
        }
    }

    fn gateway_pod(&self, name: &str) -> &Pod {
        self.gateways
            .iter()
            .find(|p| p.name == name)
            .expect("gateway pod")
    }

    /// Write the routing objects, start `interceptor gateway` in the gateway pod and wait
    /// until it listens on `ports`.
    fn serve(&self, pod: &str, gateway: &str, extra: &[&str], ports: &[u16]) {
        let pod = self.gateway_pod(pod);
        let log = self
            .node
            .tb
            .state_dir()
            .join(format!("gateway-{}.log", pod.name));
        let mut args = vec!["--gateway", gateway];
        args.extend_from_slice(extra);
        let child = spawn_gateway(&self.node.tb, pod, &self.dir, ADMIN, &args, &log);
        self.running.lock().expect("lock").push(child);
        wait_for(&format!("gateway {gateway} listening on {ports:?}"), || {
            gateway_serves(&self.dump(pod)?, ports).then_some(())
        });
    }

    fn dump(&self, gateway_pod: &Pod) -> Option<serde_json::Value> {
        gateway_dump(&self.node.tb, gateway_pod, ADMIN.parse().ok()?)
    }

    fn route(&self, gateway_pod: &str, name: &str) -> serde_json::Value {
        let dump = self
            .dump(self.gateway_pod(gateway_pod))
            .expect("config dump");
        gateway_route(&dump, name)
    }

    fn condition(&self, gateway_pod: &str, name: &str, kind: &str) -> (String, String) {
        let dump = self
            .dump(self.gateway_pod(gateway_pod))
            .expect("config dump");
        route_condition(&dump, name, kind)
    }

    fn tally(&self, gateway_pod: &str, port: u16, count: u32) -> serde_json::Value {
        let target = format!("{}:{port}", self.gateway_pod(gateway_pod).ip);
        self.node
            .tb
            .run_tb_pod(
                &self.client,
                &["tally", "--connect", &target, "--count", &count.to_string()],
                Duration::from_secs(60),
            )
            .expect("tally")
    }

    /// The one reply word every connection through `gateway_pod:port` got.
    fn answer(&self, gateway_pod: &str, port: u16) -> String {
        let report = self.tally(gateway_pod, port, 3);
        assert_eq!(report["errors"], 0, "{report}");
        let replies = report["replies"].as_object().expect("replies");
        assert_eq!(replies.len(), 1, "{report}");
        replies.keys().next().cloned().unwrap_or_default()
    }

    fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.join(file), yaml).expect("write manifests");
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for mut child in self
            .running
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn services(names: &[(&str, &str, u16, u16)]) -> String {
    names
        .iter()
        .map(|(name, selector, port, target)| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
                 spec: {{selector: {{{selector}}}, ports: [{{name: tcp, port: {port}, targetPort: {target}}}]}}\n"
            )
        })
        .collect()
}

#[test]
fn gateway_api_listeners_by_section_name_and_by_port() {
    if !common::privileged() {
        return;
    }
    let apps = [
        App {
            name: "my-foo",
            namespace: "default",
            labels: "app: foo",
            port: 6000,
            prefix: "foo",
        },
        App {
            name: "my-bar",
            namespace: "default",
            labels: "app: bar",
            port: 6000,
            prefix: "bar",
        },
    ];
    let bed = Bed::start("gw-api", &apps, &[("default", "my-tcp-gateway")]);
    bed.write(
        "services.yaml",
        &services(&[
            ("my-foo-service", "app: foo", 6000, 6000),
            ("my-bar-service", "app: bar", 6000, 6000),
        ]),
    );
    // The Gateway API document's example, verbatim.
    bed.write(
        "gateway.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: my-tcp-gateway
spec:
  gatewayClassName: my-tcp-gateway-class
  listeners:
  - name: foo
    protocol: TCP
    port: 8080
    allowedRoutes:
      kinds:
      - kind: TCPRoute
  - name: bar
    protocol: TCP
    port: 8090
    allowedRoutes:
      kinds:
      - kind: TCPRoute
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-app-1
spec:
  parentRefs:
  - name: my-tcp-gateway
    sectionName: foo
  rules:
  - backendRefs:
    - name: my-foo-service
      port: 6000
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-app-2
spec:
  parentRefs:
  - name: my-tcp-gateway
    sectionName: bar
  rules:
  - backendRefs:
    - name: my-bar-service
      port: 6000
"#,
    );
    bed.serve(
        "my-tcp-gateway",
        "default/my-tcp-gateway",
        &["--gateway-class", "my-tcp-gateway-class"],
        &[8080, 8090],
    );
    assert_eq!(bed.answer("my-tcp-gateway", 8080), "foo");
    assert_eq!(bed.answer("my-tcp-gateway", 8090), "bar");
    assert_eq!(
        bed.condition("my-tcp-gateway", "default/tcp-app-1", "Accepted"),
        ("True".into(), "Accepted".into())
    );
    assert_eq!(
        bed.condition("my-tcp-gateway", "default/tcp-app-2", "ResolvedRefs"),
        ("True".into(), "ResolvedRefs".into())
    );

    // "you can achieve this same result by binding the Routes to the Gateway listeners
    // using the port field": the same routes attached by port, followed live.
    let by_port = std::fs::read_to_string(bed.dir.join("gateway.yaml"))
        .expect("read")
        .replace("sectionName: foo", "port: 8090")
        .replace("sectionName: bar", "port: 8080");
    bed.write("gateway.yaml", &by_port);
    // Connections made while the new manifests load may see either table.
    wait_for("the routes swapped by port", || {
        (bed.tally("my-tcp-gateway", 8080, 3)["replies"]["bar"] == 3).then_some(())
    });
    assert_eq!(bed.answer("my-tcp-gateway", 8090), "foo");
}

#[test]
fn fsm_gateway_tcp_routing_and_route_conditions() {
    if !common::privileged() {
        return;
    }
    let apps = [App {
        name: "httpbin",
        namespace: "httpbin",
        labels: "app: httpbin",
        port: 8080,
        prefix: "httpbin",
    }];
    let bed = Bed::start("gw-fsm", &apps, &[("httpbin", "fsm-gateway")]);
    bed.write(
        "services.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: httpbin, namespace: httpbin}\n\
         spec: {selector: {app: httpbin}, ports: [{name: http, port: 8080, targetPort: 8080}]}\n",
    );
    // The FSM document's Gateway listeners and TCPRoute, in namespace httpbin.
    bed.write(
        "gateway.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  name: simple-fsm-gateway
  namespace: httpbin
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
  - protocol: TCP
    port: 8000
    name: foo
    allowedRoutes:
      namespaces:
        from: Same
  - protocol: TCP
    port: 8001
    name: bar
    allowedRoutes:
      namespaces:
        from: Same
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-route-sample
  namespace: httpbin
spec:
  parentRefs:
  - name: simple-fsm-gateway
    port: 8000
  - name: simple-fsm-gateway
    port: 8001
  rules:
  - backendRefs:
    - name: httpbin
      port: 8080
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: newer-on-8000
  namespace: httpbin
spec:
  parentRefs:
  - {name: simple-fsm-gateway, port: 8000}
  rules:
  - backendRefs: [{name: httpbin, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: from-elsewhere
  namespace: default
spec:
  parentRefs:
  - {name: simple-fsm-gateway, namespace: httpbin, port: 8000}
  rules:
  - backendRefs: [{name: httpbin, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: to-nowhere
  namespace: httpbin
spec:
  parentRefs:
  - {name: simple-fsm-gateway, port: 8001}
  rules:
  - backendRefs: [{name: ghost, port: 8080}]
"#,
    );
    bed.serve(
        "fsm-gateway",
        "httpbin/simple-fsm-gateway",
        &[],
        &[8000, 8001],
    );
    assert_eq!(bed.answer("fsm-gateway", 8000), "httpbin");
    assert_eq!(bed.answer("fsm-gateway", 8001), "httpbin");
    // The older route keeps listener foo; the newer one says so.
    let newer = bed.route("fsm-gateway", "httpbin/newer-on-8000");
    assert_eq!(newer["accepted"], false, "{newer}");
    assert!(
        newer["reasons"][0]
            .as_str()
            .is_some_and(|r| r.contains("tcp-route-sample")),
        "{newer}"
    );
    assert_eq!(
        bed.condition("fsm-gateway", "default/from-elsewhere", "Accepted"),
        ("False".into(), "NotAllowedByListeners".into())
    );
    assert_eq!(
        bed.condition("fsm-gateway", "httpbin/to-nowhere", "ResolvedRefs"),
        ("False".into(), "BackendNotFound".into())
    );
}

#[test]
fn istio_tcp_gateway_shifts_80_20_between_subsets() {
    if !common::privileged() {
        return;
    }
    let apps = [
        App {
            name: "tcp-echo-v1",
            namespace: "default",
            labels: "app: tcp-echo, version: v1",
            port: 9000,
            prefix: "one",
        },
        App {
            name: "tcp-echo-v2",
            namespace: "default",
            labels: "app: tcp-echo, version: v2",
            port: 9000,
            prefix: "two",
        },
    ];
    let bed = Bed::start("gw-istio", &apps, &[("default", "istio-ingressgateway")]);
    // The Istio example's Service, Gateway, VirtualService and DestinationRule, verbatim.
    bed.write(
        "tcp-echo.yaml",
        r#"apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
  labels:
    app: tcp-echo
spec:
  ports:
  - name: tcp
    port: 9000
  selector:
    app: tcp-echo
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata:
  name: tcp-echo-gateway
spec:
  selector:
    istio: ingressgateway
  servers:
  - port:
      number: 31400

      name: tcp
      protocol: TCP
    hosts:
    - "*"

---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata:
  name: tcp-echo
spec:
  hosts:
  - "*"
  gateways:
  - tcp-echo-gateway
  tcp:
  - match:
    - port: 31400

    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000

        subset: v1
      weight: 80
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
      weight: 20
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#,
    );
    bed.serve(
        "istio-ingressgateway",
        "default/tcp-echo-gateway",
        &[],
        &[31400],
    );
    let report = bed.tally("istio-ingressgateway", 31400, 1000);
    assert_eq!(report["errors"], 0, "{report}");
    let one = report["replies"]["one"].as_i64().unwrap_or(0);
    let two = report["replies"]["two"].as_i64().unwrap_or(0);
    assert_eq!(one + two, 1000, "{report}");
    // Binomial(1000, 0.2): four standard deviations are ±51.
    assert!((two - 200).abs() <= 51, "v2 got {two} of 1000: {report}");
    assert_eq!(
        bed.route("istio-ingressgateway", "default/tcp-echo")["accepted"],
        true
    );
}

#[test]
fn asm_gateway_match_picks_the_route_per_gateway() {
    if !common::privileged() {
        return;
    }
    let apps = [
        App {
            name: "echo-server",
            namespace: "default",
            labels: "app: echo-server",
            port: 9000,
            prefix: "hello",
        },
        App {
            name: "echo-server-2",
            namespace: "default",
            labels: "app: echo-server-2",
            port: 9000,
            prefix: "hello-2",
        },
    ];
    let bed = Bed::start(
        "gw-asm",
        &apps,
        &[
            ("istio-system", "ingressgateway-1"),
            ("istio-system", "ingressgateway-2"),
        ],
    );
    bed.write(
        "services.yaml",
        &services(&[
            ("echo-server", "app: echo-server", 19000, 9000),
            ("echo-server-2", "app: echo-server-2", 19000, 9000),
        ]),
    );
    // The ASM document's two Gateways and the VirtualService matching on gateways.
    bed.write(
        "gateways.yaml",
        r#"apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: ingressgateway-1
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway-1
  servers:
    - hosts:
        - '*'
      port:
        name: tcp
        number: 19000
        protocol: TCP
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata:
  name: ingressgateway-2
  namespace: istio-system
spec:
  selector:
    istio: ingressgateway-2
  servers:
    - hosts:
        - '*'
      port:
        name: tcp
        number: 19000
        protocol: TCP
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata:
  name: ingressgateway
  namespace: istio-system
spec:
  gateways:
    - ingressgateway-1
    - ingressgateway-2
  hosts:
    - '*'
  tcp:
    - match:
        - gateways:
            - ingressgateway-2
      route:
        - destination:
            host: echo-server-2.default.svc.cluster.local
    - route:
        - destination:
            host: echo-server.default.svc.cluster.local
"#,
    );
    bed.serve(
        "ingressgateway-1",
        "istio-system/ingressgateway-1",
        &[],
        &[19000],
    );
    bed.serve(
        "ingressgateway-2",
        "istio-system/ingressgateway-2",
        &[],
        &[19000],
    );
    assert_eq!(bed.answer("ingressgateway-1", 19000), "hello");
    assert_eq!(bed.answer("ingressgateway-2", 19000), "hello-2");
}

/// The status of the FSM upstream settings object `name` at the gateway, once accepted.
fn upstream_setting(bed: &Bed, gateway_pod: &str, name: &str) -> serde_json::Value {
    wait_for(&format!("{name} in force at the gateway"), || {
        let dump = bed.dump(bed.gateway_pod(gateway_pod))?;
        dump["upstream_settings"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name && s["accepted"] == true)
            .cloned()
    })
}

#[test]
fn fsm_gateway_load_balancing_and_circuit_breaking() {
    if !common::privileged() {
        return;
    }
    // FSM Gateway's load balancing document: Service pipy with two endpoints.
    let apps = [
        App {
            name: "pipy-1",
            namespace: "server",
            labels: "app: pipy",
            port: 8080,
            prefix: "pipy-1",
        },
        App {
            name: "pipy-2",
            namespace: "server",
            labels: "app: pipy",
            port: 8080,
            prefix: "pipy-2",
        },
    ];
    let bed = Bed::start("gw-lb", &apps, &[("server", "fsm-gateway")]);
    bed.write(
        "services.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: pipy, namespace: server}\n\
         spec: {selector: {app: pipy}, ports: [{protocol: TCP, port: 8080, targetPort: 8080}]}\n",
    );
    bed.write(
        "gateway.yaml",
        r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  name: simple-fsm-gateway
  namespace: server
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
  - protocol: TCP
    port: 8000
    name: tcp
    allowedRoutes:
      namespaces:
        from: Same
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata:
  name: tcp-route-sample
  namespace: server
spec:
  parentRefs:
  - name: simple-fsm-gateway
    port: 8000
  rules:
  - backendRefs:
    - name: pipy
      port: 8080
"#,
    );
    bed.serve("fsm-gateway", "server/simple-fsm-gateway", &[], &[8000]);
    // Round-robin by default: an even split.
    let report = bed.tally("fsm-gateway", 8000, 20);
    assert_eq!(report["replies"]["pipy-1"], 10, "{report}");
    assert_eq!(report["replies"]["pipy-2"], 10, "{report}");
    // The document's LoadBalancerPolicy: every connection of this client to one endpoint.
    bed.write(
        "policy.yaml",
        r#"apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata:
  name: lb-policy-sample
  namespace: server
spec:
  targetRef:
    group: ""
    kind: Service
    name: pipy
    namespace: server
  ports:
    - port: 8080
      type: HashingLoadBalancer
"#,
    );
    upstream_setting(&bed, "fsm-gateway", "server/lb-policy-sample");
    let report = bed.tally("fsm-gateway", 8000, 20);
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(
        report["replies"].as_object().map(|r| r.len()),
        Some(1),
        "hashing keeps the client on one endpoint: {report}"
    );
    // Circuit breaking at the gateway: at most 5 open connections to pipy.
    bed.write(
        "settings.yaml",
        r#"apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata:
  name: pipy-circuit-breaking
  namespace: server
spec:
  host: pipy.server.svc.cluster.local
  connectionSettings:
    tcp:
      maxConnections: 5
"#,
    );
    upstream_setting(&bed, "fsm-gateway", "server/pipy-circuit-breaking");
    let target = format!("{}:8000", bed.gateway_pod("fsm-gateway").ip);
    let held = bed
        .node
        .tb
        .run_tb_pod(
            &bed.client,
            &[
                "hold",
                "--connect",
                &target,
                "--count",
                "20",
                "--concurrent",
            ],
            Duration::from_secs(60),
        )
        .expect("hold");
    assert_eq!(held["open"], 5, "{held}");
    assert_eq!(held["errors"], 15, "{held}");
}
