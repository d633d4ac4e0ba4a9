//! IPv6 in eBPF mode on a dual-stack testbed: an enrolled pod's IPv6 connect goes
//! through its `[pod IPv6]:15001` listener to the original IPv6 destination
//! (passthrough: no IPv6 Services yet), an IPv6 client's SYN to an enrolled pod is
//! steered to the pod's IPv6 15003 listener and delivered to the app, `::1` stays
//! inside the pod, the pod row in `/config_dump` shows the IPv6 address, and the IPv4
//! path of the same pods still works. iptables mode has no IPv6 interception (not here).
mod common;

use std::net::Ipv6Addr;

use common::{inbound_records, wait_for, Mode, Node, ECHO_TARGET_PORT, MANIFESTS};
use interceptor_testbed::{Pod, Testbed};

const BYTES: u64 = 1024 * 1024;

/// A dual-stack testbed with an agent in eBPF mode on [`MANIFESTS`].
fn dual_stack_node(label: &str) -> Node {
    let tb = Testbed::builder(label)
        .dual_stack()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("dual-stack testbed");
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(manifests.join("mesh.yaml"), MANIFESTS).expect("manifests");
    let mut tb = tb;
    let agent = tb
        .start_agent(&manifests, &Mode::Ebpf.args(&[]))
        .expect("agent starts");
    Node {
        agent: Some(agent),
        manifests,
        tb,
    }
}

fn v6(pod: &Pod) -> Ipv6Addr {
    pod.ipv6
        .unwrap_or_else(|| panic!("{} has no IPv6 address", pod.name))
}

/// Run tb-pod's client in `pod` against `target`; its report must say every byte came
/// back.
fn exchange(node: &Node, pod: &Pod, target: &str) -> interceptor_testbed::ClientReport {
    let bytes = BYTES.to_string();
    let report = node
        .tb
        .run_client(pod, &["--connect", target, "--send-bytes", &bytes])
        .expect("client");
    assert_eq!(
        report.error,
        None,
        "{} -> {target}: {report:?}\nagent log:\n{}",
        pod.name,
        node.agent_log()
    );
    assert_eq!(report.received, BYTES, "{report:?}");
    report
}

/// Connection records of `pod` in `direction` whose original destination is `dst`.
fn records_to(node: &Node, pod: &str, direction: &str, dst: &str) -> Vec<serde_json::Value> {
    node.config_dump()["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["pod"] == pod && r["direction"] == direction && r["original_dst"] == dst)
        .cloned()
        .collect()
}

#[test]
fn ipv6_outbound_passthrough_and_inbound_on_one_node() {
    if !common::privileged() {
        return;
    }
    let mut node = dual_stack_node("ipv6-one");
    let client = node.pod("demo", "client");
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let _outsider_echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", "[::]:9000"])
        .expect("echo in the outsider");
    let _server_echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "[::]:9000"])
        .expect("echo in the server");

    // The pod rows carry the IPv6 address; the enrolled ones have it intercepted.
    let pods = node.config_dump()["pods"].clone();
    let row = |name: &str| {
        pods.as_array()
            .into_iter()
            .flatten()
            .find(|p| p["pod"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no pod row {name}: {pods}"))
    };
    assert_eq!(
        row("demo/client")["ipv6"],
        v6(&client).to_string(),
        "{pods}"
    );
    assert_eq!(row("demo/client")["ipv6_intercepted"], true, "{pods}");
    assert_eq!(row("legacy/outsider")["ipv6"], v6(&outsider).to_string());
    assert_eq!(row("legacy/outsider")["ipv6_intercepted"], false);

    // Outbound: enrolled client -> unenrolled server's IPv6, through the client's
    // [pod IPv6]:15001 listener and passed through to where it was going.
    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&outsider));
    let report = exchange(&node, &client, &target);
    assert_eq!(
        report.peer.as_deref(),
        Some(target.as_str()),
        "getpeername6"
    );
    let record = wait_for("the IPv6 outbound record", || {
        records_to(&node, "demo/client", "outbound", &target)
            .into_iter()
            .find(|r| r["outcome"] != "open")
    });
    assert_eq!(record["target"]["kind"], "passthrough", "{record}");
    assert_eq!(record["target"]["addr"], target, "{record}");
    assert_eq!(record["upstream_bytes"], BYTES, "{record}");
    assert_eq!(
        record["client"],
        report.local.clone().expect("local"),
        "{record}"
    );

    // Inbound: unenrolled client -> enrolled server's IPv6, steered by tc to 15003.
    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&server));
    let report = exchange(&node, &outsider, &target);
    assert_eq!(report.peer.as_deref(), Some(target.as_str()));
    let record = wait_for("the IPv6 inbound record", || {
        records_to(&node, "demo/server", "inbound", &target)
            .into_iter()
            .find(|r| r["outcome"] != "open")
    });
    assert_eq!(record["target"]["kind"], "local", "{record}");
    assert_eq!(record["upstream_bytes"], BYTES, "{record}");
    assert_eq!(record["client"], report.local.clone().expect("local"));
    let counters6 = &node.config_dump()["datapath_counters"]["ipv6"];
    assert!(
        counters6["inbound_redirected"].as_u64() >= Some(1),
        "{counters6}"
    );

    // ::1 stays inside the pod: no record, nothing steered.
    let _loopback_echo = node
        .tb
        .spawn_server(&client, &["echo", "--listen", "[::1]:9100"])
        .expect("echo on ::1 in the client");
    exchange(&node, &client, "[::1]:9100");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        records_to(&node, "demo/client", "outbound", "[::1]:9100").is_empty(),
        "a loopback connect was intercepted: {}",
        node.config_dump()["connections"]
    );

    // The IPv4 path of the same pods still works, both ways.
    let target4 = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    exchange(&node, &client, &target4);
    wait_for("the IPv4 outbound record", || {
        records_to(&node, "demo/client", "outbound", &target4)
            .into_iter()
            .next()
    });
    let target4 = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    exchange(&node, &outsider, &target4);
    let outsider_ip = outsider.ip.to_string();
    wait_for("the IPv4 inbound record", || {
        inbound_records(&node.config_dump(), "demo/server", Some(&outsider_ip))
            .into_iter()
            .next()
    });
}
