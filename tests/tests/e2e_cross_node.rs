//! Inbound interception across nodes: a client on node b dials an enrolled pod on node a;
//! tc on the pod's interface steers the flow to the pod's inbound listener (15003) and
//! restores the source port of the replies. The wire in between is the testbed's
//! node-to-node link, so packets really are parsed, rewritten and checksummed by tc.
//! Run in eBPF and iptables mode (`ebpf::`/`iptables::`).
#[macro_use]
mod common;

use common::{inbound_records, wait_for, Mode, Node, ECHO_TARGET_PORT, MANIFESTS};

in_both_modes!(
    client_on_another_node_reaches_enrolled_pod_through_inbound_listener,
    cross_node_inbound_with_ip_options,
    enrolled_pods_on_two_nodes_go_through_both_proxies,
);
use interceptor_testbed::{AgentProcess, NodeId, Pod};

const MIB: u64 = 1024 * 1024;

/// Node a with the agent (from [`Node`]) and node b with the plain chain, no agent.
fn two_nodes(label: &str, agent_args: &[&str]) -> (Node, NodeId) {
    let mut node = Node::start(label, agent_args);
    let b = node.tb.add_node("b", false).expect("node b");
    (node, b)
}

fn transfer(
    node: &Node,
    client: &Pod,
    server: &Pod,
    extra: &[&str],
) -> interceptor_testbed::ClientReport {
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let bytes = (64 * MIB).to_string();
    let mut args = vec!["--connect", &target, "--send-bytes", &bytes, "--seed", "5"];
    args.extend_from_slice(extra);
    let report = node.tb.run_client(client, &args).expect("client");
    assert_eq!(
        report.error,
        None,
        "{report:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(report.received, 64 * MIB, "{report:?}");
    assert_eq!(
        report.sent_sha256, report.received_sha256,
        "bytes changed in flight"
    );
    assert_eq!(
        report.peer.as_deref(),
        Some(target.as_str()),
        "egress must restore the port"
    );
    report
}

fn client_on_b_reaches_server_on_a(agent_args: &[&str], client_args: &[&str]) {
    if !common::privileged() {
        return;
    }
    let (mut node, b) = two_nodes("xnode", agent_args);
    let server = node.pod("demo", "server");
    let outsider = node
        .tb
        .add_pod_on(b, "legacy", "outsider")
        .expect("pod on b");
    assert_eq!(
        outsider.ip.octets()[2],
        1,
        "the client lives in node b's subnet"
    );
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");

    let report = transfer(&node, &outsider, &server, client_args);
    if client_args.contains(&"--ip-options") {
        assert!(report.ip_options, "{report:?}");
    }
    let local = report.local.expect("local");
    let record = wait_for("the inbound record", || {
        inbound_records(&node.config_dump(), "demo/server", None)
            .into_iter()
            .find(|r| r["client"] == local.as_str())
    });
    assert_eq!(
        record["original_dst"],
        format!("{}:{ECHO_TARGET_PORT}", server.ip)
    );
    assert_eq!(record["upstream_bytes"], 64 * MIB);
    // The application sees the client on node b, its address and port, through the
    // inbound proxy's transparent socket.
    let accepts = echo
        .wait_for_events("accept", 1, std::time::Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts[0]["peer"], local.as_str(), "{}", accepts[0]);
    assert_eq!(
        accepts[0]["mark"],
        common::TRANSPARENT_MARK,
        "{}",
        accepts[0]
    );
    if agent_args.contains(&"iptables") {
        return;
    }
    let dump = node.config_dump();
    assert!(dump["datapath_counters"]["inbound_redirected"].as_u64() >= Some(1));
    wait_for("INBOUND_FLOWS to empty", || {
        (node.config_dump()["datapath_records"]["inbound_flows"] == 0).then_some(())
    });
}

fn client_on_another_node_reaches_enrolled_pod_through_inbound_listener(mode: Mode) {
    client_on_b_reaches_server_on_a(&mode.args(&[]), &[]);
}

fn cross_node_inbound_with_ip_options(mode: Mode) {
    client_on_b_reaches_server_on_a(&mode.args(&[]), &["--ip-options"]);
}

#[test]
fn cross_node_inbound_with_sockmap() {
    client_on_b_reaches_server_on_a(&Mode::Ebpf.args(&["--sockmap"]), &[]);
}

/// Agents on both nodes: the enrolled client's outbound proxy on b dials the enrolled
/// server on a, whose tc (or PREROUTING chain) steers the flow to its inbound proxy.
fn enrolled_pods_on_two_nodes_go_through_both_proxies(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("xagents", &mode.args(&[]));
    let b = node.tb.add_node("b", true).expect("node b");
    let manifests_b = node.tb.node(b).state_dir().join("manifests");
    std::fs::create_dir_all(&manifests_b).expect("dir");
    std::fs::write(manifests_b.join("mesh.yaml"), MANIFESTS).expect("manifests");
    let agent_b: AgentProcess = node
        .tb
        .start_agent_on(b, &manifests_b, &mode.args(&[]))
        .expect("agent on b");
    let server = node.pod("demo", "server");
    let client = node
        .tb
        .add_pod_on(b, "demo", "client")
        .expect("client on b");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");

    let report = transfer(&node, &client, &server, &[]);
    let local = report.local.expect("local");

    let (_, body) = node.tb.admin_get_on(b, "/config_dump").expect("dump b");
    let dump_b: serde_json::Value = serde_json::from_str(&body).expect("json");
    let outbound = dump_b["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["direction"] == "outbound" && r["client"] == local.as_str())
        .unwrap_or_else(|| {
            panic!(
                "no outbound record on b: {}\n{}",
                dump_b["connections"],
                agent_b.log()
            )
        })
        .clone();
    assert_eq!(
        outbound["original_dst"],
        format!("{}:{ECHO_TARGET_PORT}", server.ip)
    );
    assert_eq!(outbound["target"]["kind"], "passthrough");
    // On a, the connection arrives from b's proxy, which dials from the client pod's IP.
    let client_ip = client.ip.to_string();
    let inbound = wait_for("the inbound record on a", || {
        inbound_records(&node.config_dump(), "demo/server", None)
            .into_iter()
            .find(|r| {
                r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{client_ip}:")))
            })
    });
    assert_eq!(inbound["upstream_bytes"], 64 * MIB, "{inbound}");
    drop(agent_b);
}
