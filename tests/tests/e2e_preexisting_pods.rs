//! Pods that were running before the agent started (the mesh installed into a running
//! cluster): no CNI ADD ever reached an agent for them, so the agent finds them in
//! `/proc` by the pod UID in their processes' cgroups (kubelet's cgroupfs naming,
//! `kubepods/besteffort/pod<uid>/<container>`), enrolls those the model enrolls, and
//! leaves alone a hostNetwork pod (its process is in the node's netns) and a pod of a
//! namespace outside the mesh. The pods are made by the real CNI chain without
//! interceptor-cni, before any agent runs; both modes (`ebpf::`/`iptables::`).
#[macro_use]
mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Command};
use std::time::Instant;

use common::{wait_for, Mode, Node, ECHO_TARGET_PORT};
use interceptor_testbed::{NodeId, Pod, Testbed};

in_both_modes!(pods_running_before_the_agent_are_found_and_enrolled);

/// The UIDs of the pods in [`mesh_yaml`] (as the API server writes them: lowercase),
/// unique per testbed: every agent on this machine scans the same `/proc`, and the two
/// modes' tests run side by side, so shared UIDs would let one test's agent find the
/// other test's pods (a cluster's UIDs are unique; a testbed's must be made so).
struct Uids {
    client: String,
    hostnet: String,
    outsider: String,
}

impl Uids {
    fn for_testbed(tb: &Testbed) -> Uids {
        let tail: u64 = tb.id().bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        }) & 0xffff_ffff_ffff;
        let uid = |head: &str| format!("{head}-{tail:012x}");
        Uids {
            client: uid("7f3c2a10-4b5d-4e6f-8a9b"),
            hostnet: uid("1a2b3c4d-5e6f-4a7b-8c9d"),
            outsider: uid("9e8d7c6b-5a4f-4e3d-8c2b"),
        }
    }
}

/// `demo` is in the mesh, `legacy` is not. `demo/client` and `legacy/outsider` carry the
/// addresses the chain gave their netns; `demo/hostnet` runs in the node's netns with the
/// node's address (its manifest does not say `hostNetwork`, so only the agent's own check
/// keeps it out).
fn mesh_yaml(
    uids: &Uids,
    client: &Pod,
    outsider: &Pod,
    server: &Pod,
    node_ip: Ipv4Addr,
    legacy_labels: &str,
) -> String {
    let Uids {
        client: client_uid,
        hostnet: hostnet_uid,
        outsider: outsider_uid,
    } = uids;
    format!(
        r#"
apiVersion: v1
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
{legacy_labels}---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: demo, uid: {client_uid}}}
spec:
  containers: [{{name: main, image: busybox}}]
status: {{podIP: "{}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hostnet, namespace: demo, uid: {hostnet_uid}}}
spec:
  containers: [{{name: main, image: busybox}}]
status: {{podIP: "{node_ip}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: outsider, namespace: legacy, uid: {outsider_uid}}}
spec:
  containers: [{{name: main, image: busybox}}]
status: {{podIP: "{}"}}
---
apiVersion: v1
kind: Pod
metadata: {{name: legacy-server, namespace: legacy}}
spec:
  containers: [{{name: main, image: busybox}}]
status: {{podIP: "{}"}}
"#,
        client.ip, outsider.ip, server.ip
    )
}

/// A pod's long-running process, killed and reaped when dropped.
struct Sandbox(Child);

impl Sandbox {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A long-running process for a pod: in the pod's cgroup (UID `uid`) and netns `netns`,
/// the way a runtime runs the pod's sandbox. Checks the cgroup the process landed in.
fn sandbox(tb: &Testbed, netns: &str, uid: &str) -> Sandbox {
    let mut sleep = Command::new("sleep");
    sleep.arg("600");
    let child = tb
        .spawn_in_pod_cgroup(NodeId::A, netns, uid, "sandbox", sleep)
        .expect("a process in the pod's cgroup");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).expect("cgroup");
    assert!(
        cgroup.contains(&format!("/kubepods/besteffort/pod{uid}/sandbox")),
        "{cgroup}"
    );
    Sandbox(child)
}

/// The `/config_dump` pod row of `pod`.
fn row(node: &Node, pod: &str) -> Option<serde_json::Value> {
    node.config_dump()["pods"]
        .as_array()?
        .iter()
        .find(|row| row["pod"] == pod)
        .cloned()
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

fn pods_running_before_the_agent_are_found_and_enrolled(mode: Mode) {
    if !common::privileged() {
        return;
    }
    // The chain without interceptor-cni: the pods start with no agent to tell.
    let mut tb = Testbed::builder("preexist")
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .without_interceptor_cni()
        .build()
        .expect("testbed");
    let uids = Uids::for_testbed(&tb);
    let client = tb.add_pod("demo", "client").expect("client pod");
    let outsider = tb.add_pod("legacy", "outsider").expect("outsider pod");
    let server = tb.add_pod("legacy", "legacy-server").expect("server pod");
    let _echo = tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let client_sandbox = sandbox(&tb, &client.netns, &uids.client);
    let _hostnet_sandbox = sandbox(&tb, tb.node_netns(), &uids.hostnet);
    let outsider_sandbox = sandbox(&tb, &outsider.netns, &uids.outsider);
    let node_ip = tb.nodes()[0].gateway();
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(
        manifests.join("mesh.yaml"),
        mesh_yaml(&uids, &client, &outsider, &server, node_ip, ""),
    )
    .expect("manifests");

    let started = Instant::now();
    let agent = tb
        .start_agent(&manifests, &mode.args(&["--on-exit", "keep"]))
        .expect("agent starts");
    let mut node = Node {
        agent: Some(agent),
        manifests,
        tb,
    };
    // Found before the agent says it is ready.
    let client_row = row(&node, "demo/client").unwrap_or_else(|| {
        panic!(
            "demo/client not found\n{}\n{}",
            node.config_dump()["pods_not_found"],
            node.agent_log()
        )
    });
    eprintln!("enrolled {:?} after the agent started", started.elapsed());
    assert_eq!(client_row["enrolled"], true, "{client_row}");
    assert_eq!(client_row["origin"], "discovered", "{client_row}");
    assert_eq!(client_row["uid"], uids.client.as_str(), "{client_row}");
    assert_eq!(
        client_row["netns"],
        format!("/proc/{}/ns/net", client_sandbox.pid()),
        "the netns of the pod's process"
    );
    assert_eq!(client_row["ip"], client.ip.to_string(), "{client_row}");
    let log = node.agent_log();
    assert!(
        log.contains("running pod found in /proc: enrolled"),
        "{log}"
    );
    if mode == Mode::Iptables {
        common::assert_pod_rules(&client, Mode::Iptables);
        // Outside the mesh: no chains.
        common::assert_pod_rules(&outsider, Mode::Ebpf);
    }

    // Its new connection goes through the proxy; the outsider's goes direct.
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    dial(&node, &client, &target);
    wait_for("the client's connection through the proxy", || {
        (outbound_records(&node, "demo/client") == 1).then_some(())
    });
    dial(&node, &outsider, &target);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(outbound_records(&node, "legacy/outsider"), 0);

    // The outsider is not the agent's (its namespace is not in the mesh), and the
    // hostNetwork pod is never enrolled: reported, since the model says enroll it.
    assert_eq!(row(&node, "legacy/outsider"), None);
    assert_eq!(row(&node, "demo/hostnet"), None);
    let not_found = node.config_dump()["pods_not_found"].clone();
    let rows = not_found.as_array().expect("pods_not_found");
    assert_eq!(rows.len(), 1, "{not_found}");
    assert_eq!(rows[0]["pod"], "demo/hostnet", "{not_found}");
    assert_eq!(rows[0]["uid"], uids.hostnet.as_str(), "{not_found}");
    assert!(
        rows[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("node's own netns")),
        "{not_found}"
    );
    // The node's netns is untouched: no chains there in iptables mode either.
    let node_nat = common::run_in_netns(node.tb.node_netns(), &["iptables-nft-save", "-t", "nat"]);
    assert!(!node_nat.contains("PROXY_"), "{node_nat}");

    // Remembered like an ADD, by UID: the path dies with the process.
    let remembered: serde_json::Value = serde_json::from_slice(
        &std::fs::read(node.tb.agent_state_dir().join("pods.json")).expect("pods.json"),
    )
    .expect("pods.json JSON");
    let list = remembered.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{remembered}");
    assert_eq!(
        list[0]["discoveredUid"],
        uids.client.as_str(),
        "{remembered}"
    );

    // The next agent adopts it, though the process it was found by is gone: it finds the
    // pod again by its UID (another process of the pod now).
    assert!(node.stop_agent().success());
    drop(client_sandbox);
    let second = sandbox(&node.tb, &client.netns, &uids.client);
    let agent = node
        .tb
        .start_agent(&node.manifests, &mode.args(&[]))
        .expect("second agent starts");
    node.agent = Some(agent);
    let client_row = row(&node, "demo/client").expect("adopted");
    assert_eq!(client_row["enrolled"], true, "{client_row}");
    assert_eq!(client_row["origin"], "discovered", "{client_row}");
    assert_eq!(
        client_row["netns"],
        format!("/proc/{}/ns/net", second.pid()),
        "found again by UID"
    );
    let log = interceptor_testbed::strip_ansi(&node.agent_log());
    assert!(
        log.contains("pods adopted after restart adopted=1 remembered=1"),
        "{log}"
    );
    dial(&node, &client, &target);
    wait_for("a connection through the second agent", || {
        (outbound_records(&node, "demo/client") == 1).then_some(())
    });
    if mode == Mode::Iptables {
        common::assert_pod_rules(&client, Mode::Iptables);
    }

    // `legacy` labelled into the mesh: its pod that ran all along is found then.
    let generation = node.config_dump()["source"]["generation"].as_u64();
    let labelled = mesh_yaml(
        &uids,
        &client,
        &outsider,
        &server,
        node_ip,
        "  labels: {istio.io/dataplane-mode: ambient}\n",
    );
    std::fs::write(node.manifests.join("mesh.yaml"), labelled).expect("manifests");
    wait_for("the new model", || {
        (node.config_dump()["source"]["generation"].as_u64() > generation).then_some(())
    });
    let outsider_row = wait_for("legacy/outsider found", || row(&node, "legacy/outsider"));
    assert_eq!(outsider_row["enrolled"], true, "{outsider_row}");
    assert_eq!(outsider_row["origin"], "discovered", "{outsider_row}");
    dial(&node, &outsider, &target);
    wait_for("the outsider's connection through the proxy", || {
        (outbound_records(&node, "legacy/outsider") == 1).then_some(())
    });
    if mode == Mode::Iptables {
        common::assert_pod_rules(&outsider, Mode::Iptables);
    }
    // Out of the mesh and back while it runs: the found pod is found again by its UID.
    let relabel = |labels: &str| {
        let generation = node.config_dump()["source"]["generation"].as_u64();
        let yaml = mesh_yaml(&uids, &client, &outsider, &server, node_ip, labels);
        std::fs::write(node.manifests.join("mesh.yaml"), yaml).expect("manifests");
        wait_for("the new model", || {
            (node.config_dump()["source"]["generation"].as_u64() > generation).then_some(())
        });
    };
    relabel("");
    wait_for("legacy/outsider unenrolled", || {
        (row(&node, "legacy/outsider")?["enrolled"] == false).then_some(())
    });
    if mode == Mode::Iptables {
        // The row says unenrolled as the chains are being removed (one iptables-restore
        // in the pod), not after.
        wait_for("the outsider's chains removed", || {
            (!common::nat_rules(&outsider.netns, "nft").contains("PROXY_")).then_some(())
        });
        common::assert_pod_rules(&outsider, Mode::Ebpf);
    }
    relabel("  labels: {istio.io/dataplane-mode: ambient}\n");
    let outsider_row = wait_for("legacy/outsider enrolled again", || {
        row(&node, "legacy/outsider").filter(|row| row["enrolled"] == true)
    });
    assert_eq!(
        outsider_row["netns"],
        format!("/proc/{}/ns/net", outsider_sandbox.pid()),
        "{outsider_row}"
    );
    dial(&node, &outsider, &target);
    wait_for("the outsider's second connection through the proxy", || {
        (outbound_records(&node, "legacy/outsider") == 2).then_some(())
    });

    // legacy-server has no UID in its manifest: nothing to look for, nothing reported.
    assert_eq!(row(&node, "legacy/legacy-server"), None);
    let not_found = node.config_dump()["pods_not_found"].clone();
    assert_eq!(not_found.as_array().map(Vec::len), Some(1), "{not_found}");
}
