//! Live enrollment: labelling a namespace into the mesh (Istio's
//! `istio.io/dataplane-mode: ambient`) while its pod runs enrolls the pod at once, without
//! a restart or a new CNI ADD, and removing the label takes it out again; a running
//! pod's exclusion annotations apply when they change. Connections opened before a change
//! keep working (`ebpf::`/`iptables::`). With the manifests source, and with the kube
//! source against the testbed's fake API server (`interceptor_testbed::kube_api`), where
//! the label arrives as a watch event, as `kubectl label namespace` makes it.
#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Mode, Node, ECHO_TARGET_PORT};
use interceptor_testbed::kube_api::{self, FakeApiServer};
use interceptor_testbed::{with_netns, Pod};
use serde::Deserialize;

in_both_modes!(
    a_namespace_label_enrolls_and_unenrolls_its_running_pod,
    changed_exclusion_annotations_apply_to_the_running_pod,
    a_namespace_label_from_the_api_server_enrolls_and_unenrolls_its_running_pod,
);

/// The common manifests plus namespace `late` (labelled as given) and its pod `app`.
fn with_late_namespace(labels: &str, pod_annotations: &str) -> String {
    format!(
        "{}\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: late\n{labels}---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  namespace: late\n{pod_annotations}\
         spec:\n  containers: [{{name: main, image: busybox}}]\n",
        common::MANIFESTS
    )
}

/// Whether `/config_dump` lists `pod` as enrolled.
fn enrolled(node: &Node, pod: &str) -> Option<bool> {
    node.config_dump()["pods"]
        .as_array()?
        .iter()
        .find(|row| row["pod"] == pod)?["enrolled"]
        .as_bool()
}

/// Outbound connection records of `pod`.
fn outbound_records(node: &Node, pod: &str) -> usize {
    node.config_dump()["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["direction"] == "outbound" && r["pod"] == pod)
        .count()
}

/// One connection from `pod` to `target` with a few bytes each way, which must succeed.
fn dial(node: &Node, pod: &Pod, target: &str) {
    let report = node
        .tb
        .run_client(pod, &["--connect", target, "--send-bytes", "100"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
}

/// Wait until a pod that left the mesh has no proxied connection left (the agent has
/// then removed what it kept for them).
fn wait_drained(node: &Node) {
    wait_for("the drain to end", || {
        node.agent_log()
            .contains("the connections it made in the mesh have closed")
            .then_some(())
    });
}

/// Write the manifests and wait until the agent's model has the new generation.
fn rewrite(node: &Node, yaml: &str) {
    let generation = node.config_dump()["source"]["generation"].as_u64();
    std::fs::write(node.manifests.join("mesh.yaml"), yaml).expect("manifests");
    wait_for("the new model", || {
        (node.config_dump()["source"]["generation"].as_u64() > generation).then_some(())
    });
}

/// A connection from `pod` to `target` that stays open: it answers `ping` with what the
/// echo server sends back, once per line on stdin.
struct Held {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Held {
    fn open(node: &Node, pod: &Pod, target: &str) -> Held {
        let (ip, port) = target.split_once(':').expect("ip:port");
        let script = format!(
            "import socket,sys\n\
             s=socket.create_connection(('{ip}',{port}))\n\
             print('up',flush=True)\n\
             for line in sys.stdin:\n\
             \x20   s.sendall(b'ping')\n\
             \x20   got=b''\n\
             \x20   while len(got)<4:\n\
             \x20       chunk=s.recv(4-len(got))\n\
             \x20       if not chunk: break\n\
             \x20       got+=chunk\n\
             \x20   print(got.decode() or 'closed',flush=True)\n"
        );
        let mut command = Command::new("python3");
        command
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = node.tb.spawn_in_pod(pod, command).expect("python3");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("held connection up");
        assert_eq!(line.trim(), "up", "{}", node.agent_log());
        Held { child, out }
    }

    /// One exchange on the held connection: what came back.
    fn ping(&mut self) -> String {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").expect("write");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_owned()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn a_namespace_label_enrolls_and_unenrolls_its_running_pod(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("live", &mode.args(&[]));
    rewrite(&node, &with_late_namespace("", ""));
    let app = node.pod("late", "app");
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    assert_eq!(enrolled(&node, "late/app"), Some(false));
    let mut before = Held::open(&node, &app, &target);
    assert_eq!(before.ping(), "ping");

    // A value that neither enrolls nor excludes: ignored, with a warning naming it.
    rewrite(
        &node,
        &with_late_namespace("  labels: {istio.io/dataplane-mode: sidecar}\n", ""),
    );
    wait_for("the warning about the label", || {
        node.agent_log()
            .contains("ignored namespace late label istio.io/dataplane-mode=\"sidecar\"")
            .then_some(())
    });
    assert_eq!(enrolled(&node, "late/app"), Some(false));

    // Labelled into the mesh while it runs: enrolled with no new CNI ADD.
    let labelled = Instant::now();
    rewrite(
        &node,
        &with_late_namespace("  labels: {istio.io/dataplane-mode: ambient}\n", ""),
    );
    wait_for("late/app enrolled", || {
        enrolled(&node, "late/app").filter(|e| *e).map(|_| ())
    });
    let took = labelled.elapsed();
    eprintln!("enrolled {took:?} after the label was written");
    if mode == Mode::Iptables {
        common::assert_pod_rules(&app, Mode::Iptables);
    }
    dial(&node, &app, &target);
    wait_for("the new connection through the proxy", || {
        (outbound_records(&node, "late/app") == 1).then_some(())
    });
    assert_eq!(
        before.ping(),
        "ping",
        "a connection opened before enrollment keeps working"
    );
    let mut during = Held::open(&node, &app, &target);
    assert_eq!(during.ping(), "ping");

    // The label removed: out of the mesh; connections go direct again, and the one the
    // proxy carries keeps working until it closes.
    rewrite(&node, &with_late_namespace("", ""));
    wait_for("late/app unenrolled", || {
        enrolled(&node, "late/app").filter(|e| !*e).map(|_| ())
    });
    if mode == Mode::Iptables {
        // No interception left, only the drain chain that keeps conntrack (and with it
        // the NAT of the proxied connection) on while that connection lasts.
        // (The config dump says unenrolled just before the rules are rewritten.)
        let nat = wait_for("the drain chain in place of the pod's chains", || {
            let nat = common::nat_rules(&app.netns, "nft");
            nat.contains(":PROXY_DRAIN ").then_some(nat)
        });
        assert!(
            !nat.contains("PROXY_OUTPUT") && !nat.contains("REDIRECT"),
            "{nat}\n{}",
            node.agent_log()
        );
    }
    dial(&node, &app, &target);
    assert_eq!(
        during.ping(),
        "ping",
        "a proxied connection outlives the unenrollment\n{}",
        node.config_dump()["connections"]
    );
    assert_eq!(before.ping(), "ping");
    drop(during);
    // Its last proxied connection closed: nothing of the mesh is left in the pod.
    wait_drained(&node);
    common::assert_pod_rules(&app, Mode::Ebpf);
    // Only the connections made while enrolled went through the proxy.
    wait_for("both proxied connections recorded", || {
        (outbound_records(&node, "late/app") == 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outbound_records(&node, "late/app"),
        2,
        "{}",
        node.config_dump()["connections"]
    );
    let log = node.agent_log();
    assert!(log.contains("running pod enrolled"), "{log}");
    assert!(log.contains("pod left the mesh while running"), "{log}");
}

fn changed_exclusion_annotations_apply_to_the_running_pod(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("liverules", &mode.args(&[]));
    let labels = "  labels: {istio.io/dataplane-mode: ambient}\n";
    rewrite(&node, &with_late_namespace(labels, ""));
    let app = node.pod("late", "app");
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    dial(&node, &app, &target);
    wait_for("a proxied connection", || {
        (outbound_records(&node, "late/app") == 1).then_some(())
    });

    // Port 9000 excluded while the pod runs: its connections there go direct.
    let excluded = "  annotations: {flomesh.io/outbound-port-exclusion-list: \"9000\"}\n";
    rewrite(&node, &with_late_namespace(labels, excluded));
    wait_for("the pod's new rules", || {
        let dump = node.config_dump();
        let row = dump["pods"]
            .as_array()?
            .iter()
            .find(|row| row["pod"] == "late/app")?
            .clone();
        row["rules"].to_string().contains("9000").then_some(())
    });
    dial(&node, &app, &target);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outbound_records(&node, "late/app"),
        1,
        "9000 is excluded now"
    );

    // An invalid entry: the previous rules stay in force, and the log says why.
    let invalid = "  annotations: {flomesh.io/outbound-port-exclusion-list: \"banana\"}\n";
    rewrite(&node, &with_late_namespace(labels, invalid));
    wait_for("the warning", || {
        node.agent_log()
            .contains("the previous rules stay")
            .then_some(())
    });
    dial(&node, &app, &target);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outbound_records(&node, "late/app"),
        1,
        "9000 stays excluded\n{}",
        node.agent_log()
    );

    // The annotation removed: 9000 goes through the proxy again.
    rewrite(&node, &with_late_namespace(labels, ""));
    wait_for("the rules cleared", || {
        dial(&node, &app, &target);
        (outbound_records(&node, "late/app") >= 2).then_some(())
    });
}

const NAMESPACES: &str = "/api/v1/namespaces";

/// The collections the kube source lists and watches, by the `kind` of their items.
fn collection_of(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "Namespace" => (NAMESPACES, "NamespaceList"),
        "Pod" => ("/api/v1/pods", "PodList"),
        "Service" => ("/api/v1/services", "ServiceList"),
        "EndpointSlice" => (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSliceList",
        ),
        other => panic!("no collection for {other}"),
    }
}

/// A fake API server in the testbed's node netns serving the objects of `yaml` (the
/// routing CRDs and FSM's MeshConfig are absent: 404, as in a cluster without them).
fn api_server_with(node_netns: &str, yaml: &str) -> FakeApiServer {
    let listener = with_netns(node_netns, || TcpListener::bind("127.0.0.1:0"))
        .expect("fake API server listener");
    let api = FakeApiServer::start(listener).expect("fake API server");
    let mut items: std::collections::HashMap<&str, Vec<serde_json::Value>> = Default::default();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let object = serde_json::Value::deserialize(document).expect("manifest YAML");
        if object.is_null() {
            continue;
        }
        let (path, _) = collection_of(object["kind"].as_str().expect("kind"));
        items.entry(path).or_default().push(object);
    }
    for kind in ["Namespace", "Pod", "Service", "EndpointSlice"] {
        let (path, list_kind) = collection_of(kind);
        api.collection(path, list_kind, items.remove(path).unwrap_or_default());
    }
    api
}

/// Namespace `late` with `labels`, as the API server has it.
fn late_namespace(labels: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "late", "uid": "5a6b7c8d-0000-4000-8000-00000000000a", "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"},
    })
}

fn a_namespace_label_from_the_api_server_enrolls_and_unenrolls_its_running_pod(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut tb, manifests) = common::testbed_with_manifests("livekube", "");
    let api = api_server_with(tb.node_netns(), &with_late_namespace("", ""));
    let kubeconfig = tb.state_dir().join("kubeconfig");
    kube_api::kubeconfig(&kubeconfig, api.addr()).expect("kubeconfig");
    let kubeconfig = kubeconfig.display().to_string();
    let agent = tb
        .start_agent(
            &manifests,
            &mode.args(&[
                "--source",
                "kube",
                "--node-name",
                "node-a",
                "--kubeconfig",
                &kubeconfig,
            ]),
        )
        .expect("agent starts on the fake API server");
    let mut node = Node {
        agent: Some(agent),
        manifests,
        tb,
    };
    assert_eq!(node.config_dump()["source"]["kind"], "kube");
    wait_for("the namespace watch", || {
        (api.watches(NAMESPACES) > 0).then_some(())
    });

    let app = node.pod("late", "app");
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    assert_eq!(enrolled(&node, "late/app"), Some(false));
    let mut before = Held::open(&node, &app, &target);
    assert_eq!(before.ping(), "ping");

    // `kubectl label namespace late istio.io/dataplane-mode=ambient`: a MODIFIED event.
    let labelled = Instant::now();
    api.apply(
        NAMESPACES,
        late_namespace(serde_json::json!({
            "kubernetes.io/metadata.name": "late",
            "istio.io/dataplane-mode": "ambient",
        })),
    );
    wait_for("late/app enrolled", || {
        enrolled(&node, "late/app").filter(|e| *e).map(|_| ())
    });
    eprintln!(
        "enrolled {:?} after the watch event was sent",
        labelled.elapsed()
    );
    if mode == Mode::Iptables {
        common::assert_pod_rules(&app, Mode::Iptables);
    }
    dial(&node, &app, &target);
    wait_for("the new connection through the proxy", || {
        (outbound_records(&node, "late/app") == 1).then_some(())
    });
    assert_eq!(
        before.ping(),
        "ping",
        "a connection opened before enrollment keeps working"
    );

    // `kubectl label namespace late istio.io/dataplane-mode-`: out of the mesh again.
    api.apply(
        NAMESPACES,
        late_namespace(serde_json::json!({"kubernetes.io/metadata.name": "late"})),
    );
    wait_for("late/app unenrolled", || {
        enrolled(&node, "late/app").filter(|e| !*e).map(|_| ())
    });
    wait_drained(&node);
    common::assert_pod_rules(&app, Mode::Ebpf);
    dial(&node, &app, &target);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outbound_records(&node, "late/app"),
        1,
        "the connection after the unenrollment went direct\n{}",
        node.config_dump()["connections"]
    );
    assert_eq!(before.ping(), "ping");
    let log = node.agent_log();
    assert!(log.contains("running pod enrolled"), "{log}");
    assert!(log.contains("pod left the mesh while running"), "{log}");
    drop(node);
    drop(api);
}
