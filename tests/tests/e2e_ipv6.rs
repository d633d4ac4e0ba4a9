//! IPv6 on a dual-stack testbed, in eBPF and iptables mode alike (`ebpf::`/`iptables::`):
//! an enrolled pod's IPv6 connect goes through the proxy (eBPF: connect6 to
//! `[pod IPv6]:15001`; iptables: ip6tables REDIRECT to `[::1]:15001`) to the original
//! IPv6 destination (passthrough: no IPv6 Services yet), an IPv6 client's SYN to an
//! enrolled pod is steered to the pod's IPv6 15003 listener (tc, or ip6tables PREROUTING)
//! and delivered to the app, `::1` stays inside the pod, an IPv6 range in the mesh
//! config's exclusion list is left alone, the pod row in `/config_dump` shows the IPv6
//! address, and the IPv4 path of the same pods still works. The kernel counters are
//! checked in eBPF mode only.
#[macro_use]
mod common;

use std::net::Ipv6Addr;

use common::{inbound_records, wait_for, MeshConfigFile, Mode, Node, ECHO_TARGET_PORT, MANIFESTS};
use interceptor_testbed::{AgentProcess, Pod, Testbed};

in_both_modes!(
    ipv6_outbound_passthrough_and_inbound_on_one_node,
    ipv6_between_enrolled_pods_on_two_nodes,
    a_second_agent_adopts_the_ipv6_of_dual_stack_pods,
    an_ipv6_range_in_the_exclusion_list_goes_direct,
);

const BYTES: u64 = 1024 * 1024;

/// A dual-stack testbed with an agent in `mode` on [`MANIFESTS`], started with `extra`
/// arguments.
fn dual_stack_node(label: &str, mode: Mode, extra: &[&str]) -> Node {
    let tb = Testbed::builder(&format!("{label}-{}", mode.name()))
        .dual_stack()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("dual-stack testbed");
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(manifests.join("mesh.yaml"), MANIFESTS).expect("manifests");
    let mut tb = tb;
    let agent = tb
        .start_agent(&manifests, &mode.args(extra))
        .expect("agent starts");
    Node {
        agent: Some(agent),
        manifests,
        tb,
    }
}

/// Agents on both nodes of a dual-stack testbed: the enrolled client on b dials the
/// enrolled server on a over IPv6; b's outbound proxy passes it through, a's tc steers it
/// to the server's IPv6 15003 listener.
fn ipv6_between_enrolled_pods_on_two_nodes(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = dual_stack_node("ipv6-two", mode, &[]);
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
    assert_eq!(
        v6(&client).segments()[3],
        1,
        "the client lives in b's subnet"
    );
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "[::]:9000"])
        .expect("echo");

    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&server));
    let report = exchange(&node, &client, &target);
    let local = report.local.expect("local");
    let dump_b = || -> serde_json::Value {
        let (_, body) = node.tb.admin_get_on(b, "/config_dump").expect("dump b");
        serde_json::from_str(&body).expect("json")
    };
    let outbound = wait_for("the outbound record on b", || {
        dump_b()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["direction"] == "outbound" && r["client"] == local.as_str())
            .cloned()
    });
    assert_eq!(outbound["original_dst"], target, "{outbound}");
    assert_eq!(outbound["target"]["kind"], "passthrough", "{outbound}");
    // On a, it arrives from b's proxy, which dials from the client pod's IPv6.
    let client_prefix = format!("[{}]:", v6(&client));
    let inbound = wait_for("the inbound record on a", || {
        inbound_records(&node.config_dump(), "demo/server", None)
            .into_iter()
            .find(|r| {
                r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&client_prefix))
            })
    });
    assert_eq!(inbound["original_dst"], target, "{inbound}");
    assert_eq!(inbound["upstream_bytes"], BYTES, "{inbound}");
    if mode == Mode::Ebpf {
        assert!(
            node.config_dump()["datapath_counters"]["ipv6"]["inbound_redirected"].as_u64()
                >= Some(1)
        );
    }
    drop(agent_b);
}

/// IPv6 off in the agent's netns (the node's): the agent says so at start-up and the
/// IPv4 path works. The testbed is IPv4-only here: its node bridge cannot take the
/// pods' IPv6 gateway address with IPv6 off, so a dual-stack pod cannot be made on such
/// a node (that the agent then skips IPv6 is `Agent::enroll`'s `self.ipv6` filter).
#[test]
fn a_node_with_ipv6_off_says_so_and_intercepts_ipv4() {
    if !common::privileged() {
        return;
    }
    let (mut tb, manifests) = common::testbed_with_manifests("ipv6-off", MANIFESTS);
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", tb.node_netns()])
        .args(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
        .status()
        .expect("ip netns exec sysctl");
    assert!(status.success(), "disabling IPv6 in the node netns");
    let agent = tb
        .start_agent(&manifests, &Mode::Ebpf.args(&[]))
        .expect("agent starts");
    let mut node = Node {
        agent: Some(agent),
        manifests,
        tb,
    };
    assert!(
        node.agent_log().contains("IPv6 is off"),
        "{}",
        node.agent_log()
    );
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let _echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let target4 = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    exchange(&node, &client, &target4);
    wait_for("the IPv4 outbound record", || {
        records_to(&node, "demo/client", "outbound", &target4)
            .into_iter()
            .next()
    });
}

/// A hand-over: a second agent adopts the dual-stack pods from `pods.json` (the CNI
/// result keeps their IPv6 addresses), opens IPv6 listeners beside the first's, and once
/// the first has gone the IPv6 path goes through the second.
fn a_second_agent_adopts_the_ipv6_of_dual_stack_pods(mode: Mode) {
    if !common::privileged() {
        return;
    }
    const SECOND_ADMIN: &str = "127.0.0.1:15010";
    let mut node = dual_stack_node("ipv6-handover", mode, &[]);
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let _echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", "[::]:9000"])
        .expect("echo");
    let second = node
        .tb
        .start_agent_at(
            interceptor_testbed::NodeId::A,
            &node.manifests,
            SECOND_ADMIN,
            &mode.args(&[]),
        )
        .expect("the second agent starts beside the first");
    let status = node.agent.take().expect("first").stop().expect("stops");
    assert!(status.success(), "first agent: {status}");
    node.agent = Some(second);
    let dump = || -> serde_json::Value {
        let (_, body) = node
            .tb
            .admin_get_at(interceptor_testbed::NodeId::A, SECOND_ADMIN, "/config_dump")
            .expect("second dump");
        serde_json::from_str(&body).expect("json")
    };
    let row = dump()["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pod"] == "demo/client")
        .cloned()
        .expect("client row");
    assert_eq!(row["ipv6"], v6(&client).to_string(), "{row}");
    assert_eq!(row["ipv6_intercepted"], true, "{row}");

    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&outsider));
    let report = exchange(&node, &client, &target);
    let local = report.local.expect("local");
    let record = wait_for("the second agent's IPv6 outbound record", || {
        dump()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["client"] == local.as_str() && r["direction"] == "outbound")
            .cloned()
    });
    assert_eq!(record["original_dst"], target, "{record}");
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

fn ipv6_outbound_passthrough_and_inbound_on_one_node(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = dual_stack_node("ipv6-one", mode, &[]);
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
    if mode == Mode::Ebpf {
        let counters6 = &node.config_dump()["datapath_counters"]["ipv6"];
        assert!(
            counters6["inbound_redirected"].as_u64() >= Some(1),
            "{counters6}"
        );
    }

    // Both enrolled, same node: the client's outbound proxy dials the server's IPv6 with
    // a marked socket, which connect6 hands to the server's 15003 (iptables: it leaves
    // the client pod unredirected and the server pod's PREROUTING steers it).
    let report = exchange(&node, &client, &target);
    let local = report.local.expect("local");
    let outbound = wait_for("the enrolled-to-enrolled outbound record", || {
        records_to(&node, "demo/client", "outbound", &target)
            .into_iter()
            .find(|r| r["client"] == local.as_str() && r["outcome"] != "open")
    });
    assert_eq!(outbound["target"]["kind"], "passthrough", "{outbound}");
    let client_prefix = format!("[{}]:", v6(&client));
    let inbound = wait_for("the enrolled-to-enrolled inbound record", || {
        records_to(&node, "demo/server", "inbound", &target)
            .into_iter()
            .find(|r| {
                r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&client_prefix))
            })
    });
    assert_eq!(inbound["target"]["kind"], "local", "{inbound}");
    if mode == Mode::Ebpf {
        assert!(
            node.config_dump()["datapath_counters"]["ipv6"]["same_node_inbound"].as_u64()
                >= Some(1)
        );
    }

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

    // iptables: the IPv6 chains sit beside the IPv4 ones, once, and a DEL removes both
    // families together.
    if mode == Mode::Iptables {
        let nat6 = || common::run_in_netns(&client.netns, &["ip6tables-nft-save", "-t", "nat"]);
        let before = nat6();
        assert_eq!(
            before.matches("-A OUTPUT -p tcp -j PROXY_OUTPUT").count(),
            1,
            "{before}"
        );
        assert!(before.contains("-d fe80::/10 -j RETURN"), "{before}");
        common::rerun_interceptor_cni(&node, &client, "DEL");
        common::assert_pod_rules(&client, Mode::Ebpf);
        let after = nat6();
        assert!(!after.contains("PROXY_"), "{after}");
    }
}

/// An IPv6 range in the mesh config's exclusion list: the enrolled client's connects to
/// it go direct (the server sees the client's own address), those to another IPv6 pod
/// still go through the proxy, and IPv4 is untouched by the IPv6 range.
fn an_ipv6_range_in_the_exclusion_list_goes_direct(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mesh_config = MeshConfigFile::new(
        &format!("ipv6-excl-{}", mode.name()),
        "outboundIPRangeExclusionList: []\n",
    );
    let config_arg = mesh_config.arg();
    let mut node = dual_stack_node("ipv6-excl", mode, &["--mesh-config", &config_arg]);
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let server = node.pod("demo", "server");
    let outsider_echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", "[::]:9000"])
        .expect("echo in the outsider");
    let _server_echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "[::]:9000"])
        .expect("echo in the server");
    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&outsider));
    // Whether the last connection to the outsider came from the proxy: a direct one
    // arrives from the client's own address and port.
    let proxied = |report: &interceptor_testbed::ClientReport| {
        let accepts = outsider_echo
            .wait_for_events("accept", 1, std::time::Duration::from_secs(5))
            .expect("accept");
        accepts.last().expect("accept")["peer"].as_str() != report.local.as_deref()
    };
    assert!(
        proxied(&exchange(&node, &client, &target)),
        "before the exclusion"
    );

    std::fs::write(
        &*mesh_config,
        format!(
            "outboundIPRangeExclusionList: [\"{}/128\", 10.255.0.0/16]\n",
            v6(&outsider)
        ),
    )
    .expect("mesh config");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while proxied(&exchange(&node, &client, &target)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the IPv6 exclusion never applied\n{}",
            node.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // Another IPv6 destination is still intercepted, and so is IPv4 to the excluded pod.
    let server_target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&server));
    let report = exchange(&node, &client, &server_target);
    let local = report.local.expect("local");
    wait_for("the outbound record to the server's IPv6", || {
        records_to(&node, "demo/client", "outbound", &server_target)
            .into_iter()
            .find(|r| r["client"] == local.as_str())
    });
    // (The echo's `[::]` listener takes IPv4 too.)
    let target4 = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    let report = exchange(&node, &client, &target4);
    let local = report.local.expect("local");
    wait_for("the IPv4 outbound record", || {
        records_to(&node, "demo/client", "outbound", &target4)
            .into_iter()
            .find(|r| r["client"] == local.as_str())
    });
}
