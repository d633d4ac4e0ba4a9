//! IPv6 on a dual-stack testbed, in eBPF and iptables mode alike (`ebpf::`/`iptables::`):
//! an enrolled pod's IPv6 connect goes through the proxy (eBPF: connect6 to
//! `[pod IPv6]:15001`; iptables: ip6tables REDIRECT to `[::1]:15001`) to the original
//! IPv6 destination (a pod's address is passed through; an IPv6 ClusterIP goes to the
//! Service's IPv6 endpoints with its policies), an IPv6 client's SYN to an enrolled pod
//! is steered to the pod's IPv6 15003 listener (tc, or ip6tables PREROUTING) and
//! delivered to the app once SMI access policy admits the client by its IPv6 address,
//! `::1` stays inside the pod, an IPv6 range in the mesh config's exclusion list is left
//! alone, the pod row in `/config_dump` shows the IPv6 address, and the IPv4 path of the
//! same pods still works. The kernel counters are checked in eBPF mode only.
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
    ipv6_cluster_ip_services,
    ipv6_clients_under_smi_access_policy,
);

const BYTES: u64 = 1024 * 1024;

/// A dual-stack testbed with an agent in `mode` on [`MANIFESTS`], started with `extra`
/// arguments.
fn dual_stack_node(label: &str, mode: Mode, extra: &[&str]) -> Node {
    dual_stack_node_with(label, mode, MANIFESTS, extra)
}

/// A dual-stack testbed with an agent in `mode` on `manifests_yaml`, with `args`.
fn dual_stack_node_with(label: &str, mode: Mode, manifests_yaml: &str, args: &[&str]) -> Node {
    let tb = Testbed::builder(&format!("{label}-{}", mode.name()))
        .dual_stack()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("dual-stack testbed");
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(manifests.join("mesh.yaml"), manifests_yaml).expect("manifests");
    let mut tb = tb;
    let agent = tb
        .start_agent(&manifests, &mode.args(args))
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
    let echo = node
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
    // The application sees the client pod's IPv6 (with b's proxy's port), through the
    // inbound proxy's transparent IPv6 socket.
    let accepts = echo
        .wait_for_events("accept", 1, std::time::Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts[0]["peer"], inbound["client"], "{}", accepts[0]);
    assert_eq!(
        accepts[0]["mark"],
        common::TRANSPARENT_MARK,
        "{}",
        accepts[0]
    );
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
    let server_echo = node
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
    // The application sees the IPv6 client's own address and port.
    let accepts = server_echo
        .wait_for_events("accept", 1, std::time::Duration::from_secs(5))
        .expect("accept");
    assert_eq!(
        accepts[0]["peer"].as_str(),
        report.local.as_deref(),
        "{}",
        accepts[0]
    );
    assert_eq!(
        accepts[0]["mark"],
        common::TRANSPARENT_MARK,
        "{}",
        accepts[0]
    );
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
    let inbound = inbound_from(&node, &target, &client);
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

/// [`MANIFESTS`] plus a second echo server (`server-2`, version v2; `server` is v1) and
/// dual-stack Services: `echo-dual` over both servers, `echo-split` split by a
/// TrafficSplit to `echo-v2` only, and per-version Services for the split.
fn dual_stack_services() -> String {
    // server-2: the server pod of MANIFESTS under another name, as version v2.
    let server = "metadata: {name: server, namespace: demo, labels: {app: echo}}";
    let pod_start = MANIFESTS.find(server).expect("the server pod");
    let pod_end = pod_start + MANIFESTS[pod_start..].find("---").expect("its end");
    let server_2 = MANIFESTS[pod_start..pod_end].replace(
        "{name: server, namespace: demo, labels: {app: echo}}",
        "{name: server-2, namespace: demo, labels: {app: echo, version: v2}}",
    );
    let service = |name: &str, ips: &str, families: &str, selector: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec:\n  clusterIPs: [{ips}]\n  ipFamilies: [{families}]\n  \
             selector: {{{selector}}}\n  ports: [{{name: tcp, port: 80, targetPort: tcp-echo}}]\n"
        )
    };
    let six = |name: &str, ip: &str, selector: &str| service(name, ip, "IPv6", selector);
    MANIFESTS.replace("labels: {app: echo}}", "labels: {app: echo, version: v1}}")
        + "---\napiVersion: v1\nkind: Pod\n"
        + &server_2
        + &service(
            "echo-dual",
            "10.96.0.20, 'fd00:10:96::20'",
            "IPv4, IPv6",
            "app: echo",
        )
        + &six("echo-split", "'fd00:10:96::21'", "app: echo")
        + &six("echo-v1", "'fd00:10:96::22'", "app: echo, version: v1")
        + &six("echo-v2", "'fd00:10:96::23'", "app: echo, version: v2")
        + r#"---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: split, namespace: demo}
spec:
  service: echo-split
  backends: [{service: echo-v1, weight: 0}, {service: echo-v2, weight: 100}]
"#
}

/// The first finished inbound record of demo/server to `target` from `client`'s IPv6.
fn inbound_from(node: &Node, target: &str, client: &Pod) -> serde_json::Value {
    let client_prefix = format!("[{}]:", v6(client));
    wait_for(&format!("an inbound record from {}", client.name), || {
        records_to(node, "demo/server", "inbound", target)
            .into_iter()
            .find(|r| {
                r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&client_prefix))
                    && r["outcome"] != "open"
            })
    })
}

/// The outbound records of `pod` to `dst` that have ended.
fn finished_records(node: &Node, pod: &str, dst: &str, n: usize) -> Vec<serde_json::Value> {
    wait_for(&format!("{n} finished records of {pod} to {dst}"), || {
        let done: Vec<_> = records_to(node, pod, "outbound", dst)
            .into_iter()
            .filter(|r| r["outcome"] != "open")
            .collect();
        (done.len() >= n).then_some(done)
    })
}

/// An enrolled client reaches an IPv6 ClusterIP: its connections go to the Service's two
/// IPv6 endpoints (both get some), `/config_dump` lists the IPv6 VIP with them, and a
/// TrafficSplit's weights apply to an IPv6 VIP as to an IPv4 one.
fn ipv6_cluster_ip_services(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = dual_stack_node_with("ipv6-svc", mode, &dual_stack_services(), &[]);
    let client = node.pod("demo", "client");
    let servers = [node.pod("demo", "server"), node.pod("demo", "server-2")];
    let _echoes: Vec<_> = servers
        .iter()
        .map(|s| {
            node.tb
                .spawn_server(s, &["echo", "--listen", "[::]:9000"])
                .expect("echo")
        })
        .collect();
    let endpoints: Vec<String> = servers
        .iter()
        .map(|s| format!("[{}]:{ECHO_TARGET_PORT}", v6(s)))
        .collect();

    let vip = "[fd00:10:96::20]:80";
    wait_for("the IPv6 VIP in service_routes", || {
        let dump = node.config_dump();
        let route = dump["service_routes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["vip"] == vip)
            .cloned()?;
        let mut got: Vec<String> = route["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
        got.sort();
        let mut want = endpoints.clone();
        want.sort();
        assert_eq!(route["service"], "demo/echo-dual:80", "{route}");
        (got == want).then_some(())
    });
    for _ in 0..6 {
        exchange(&node, &client, vip);
    }
    let records = finished_records(&node, "demo/client", vip, 6);
    for record in &records {
        assert_eq!(record["target"]["kind"], "endpoint", "{record}");
        assert_eq!(record["upstream_bytes"], BYTES, "{record}");
    }
    for endpoint in &endpoints {
        assert!(
            records
                .iter()
                .any(|r| r["target"]["addr"] == endpoint.as_str()),
            "no connection went to {endpoint}: {records:?}"
        );
    }

    // The TrafficSplit sends every connection to echo-v2 (server-2) over IPv6.
    let split_vip = "[fd00:10:96::21]:80";
    for _ in 0..4 {
        exchange(&node, &client, split_vip);
    }
    for record in finished_records(&node, "demo/client", split_vip, 4) {
        assert_eq!(
            record["target"]["route"], "TrafficSplit demo/split",
            "{record}"
        );
        assert_eq!(record["target"]["addr"], endpoints[1].as_str(), "{record}");
        assert_eq!(record["upstream_bytes"], BYTES, "{record}");
    }
}

/// SMI mode over IPv6: the TrafficTarget lets `client`'s ServiceAccount reach the
/// server; the server's inbound admits the enrolled client by its IPv6 address, and
/// refuses the unenrolled outsider (a known pod whose account no TrafficTarget lists).
fn ipv6_clients_under_smi_access_policy(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let manifests = dual_stack_services().replace(
        "metadata: {name: client, namespace: demo, labels: {app: client}}\nspec:\n",
        "metadata: {name: client, namespace: demo, labels: {app: client}}\nspec:\n  serviceAccountName: client\n",
    ) + r#"
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: echo-port, namespace: demo}
spec: {matches: {ports: [9000]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-echo, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: default, namespace: demo}
  rules: [{kind: TCPRoute, name: echo-port}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
"#;
    assert!(manifests.contains("serviceAccountName: client"));
    let config =
        common::MeshConfigFile::new("ipv6-smi", "enablePermissiveTrafficPolicyMode: false\n");
    let config_arg = config.arg();
    let mut node = dual_stack_node_with(
        "ipv6-smi",
        mode,
        &manifests,
        &["--mesh-config", &config_arg],
    );
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let server = node.pod("demo", "server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "[::]:9000"])
        .expect("echo");

    // Allowed: through the client's outbound proxy (IPv6 VIP of echo-v1) and the
    // server's inbound, which knows the client by its IPv6 address.
    let vip = "[fd00:10:96::22]:80";
    exchange(&node, &client, vip);
    let target = format!("[{}]:{ECHO_TARGET_PORT}", v6(&server));
    let admitted = inbound_from(&node, &target, &client);
    assert_eq!(admitted["target"]["kind"], "local", "{admitted}");
    assert_eq!(admitted["upstream_bytes"], BYTES, "{admitted}");

    // Refused: the outsider's IPv6 is a known pod (legacy/outsider, account default),
    // and no TrafficTarget lets it in.
    let report = node
        .tb
        .run_client(&outsider, &["--connect", &target, "--send-bytes", "1024"])
        .expect("client");
    assert!(
        report.error.is_some(),
        "the outsider got through: {report:?}"
    );
    let refused = wait_for("the refused IPv6 inbound record", || {
        records_to(&node, "demo/server", "inbound", &target)
            .into_iter()
            .find(|r| r["target"]["kind"] == "refused")
    });
    let reason = refused["target"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no TrafficTarget lets ServiceAccount legacy/default"),
        "{refused}"
    );
    assert_eq!(refused["upstream_bytes"], 0, "{refused}");
}
