//! Outbound interception end to end: an enrolled pod's connect to a Service ClusterIP is
//! redirected in the kernel to the proxy in its netns, which recovers the original
//! destination and forwards to an endpoint; unenrolled pods are left alone. The same
//! tests run in eBPF mode and in iptables mode (`ebpf::` and `iptables::`).
#[macro_use]
mod common;

use std::time::Duration;

use common::{
    assert_pod_rules, inbound_records, wait_with_timeout, Mode, Node, ECHO_CLUSTER_IP,
    ECHO_SERVICE_PORT, ECHO_TARGET_PORT, PY_EXCHANGE,
};

in_both_modes!(
    enrolled_client_reaches_service_endpoint_through_proxy,
    unenrolled_pod_is_not_touched,
    bulk_transfer_both_ways_with_checksum_and_half_close,
    reset_is_propagated,
);

const MIB: u64 = 1024 * 1024;

fn service_addr() -> String {
    format!("{ECHO_CLUSTER_IP}:{ECHO_SERVICE_PORT}")
}

/// Retry briefly: the proxy writes its connection record after the client sees EOF.
fn wait_for_record(node: &Node, client: &str) -> serde_json::Value {
    for _ in 0..50 {
        if let Some(record) = node.connections_from(client).into_iter().next() {
            return record;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no connection record for {client}; agent log:\n{}",
        node.agent_log()
    );
}

/// The inbound record in `pod`'s listener for a connection from `client_ip`.
fn wait_for_inbound(node: &Node, pod: &str, client_ip: &str) -> serde_json::Value {
    for _ in 0..50 {
        if let Some(record) = inbound_records(&node.config_dump(), pod, Some(client_ip))
            .into_iter()
            .next()
        {
            return record;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no inbound record in {pod} from {client_ip}; agent log:\n{}",
        node.agent_log()
    );
}

fn enrolled_client_reaches_service_endpoint_through_proxy(mode: Mode) {
    enrolled_client_reaches_service_endpoint_through_proxy_with(mode, &[]);
}

#[test]
fn enrolled_client_reaches_service_endpoint_through_proxy_with_sockmap() {
    enrolled_client_reaches_service_endpoint_through_proxy_with(Mode::Ebpf, &["--sockmap"]);
}

fn enrolled_client_reaches_service_endpoint_through_proxy_with(mode: Mode, agent_args: &[&str]) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("outbound", &mode.args(agent_args));
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let echo = node
        .tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-v1"],
        )
        .expect("echo server");

    let report = node
        .tb
        .run_client(
            &client,
            &[
                "--connect",
                &service_addr(),
                "--send-bytes",
                "4096",
                "--expect-greeting",
            ],
        )
        .expect("client runs");
    assert_eq!(
        report.error,
        None,
        "client failed: {report:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(report.greeting.as_deref(), Some("hello-v1"));
    assert!(report.echoed_all(), "{report:?}");
    // The application still believes it talks to the Service: getpeername4 (eBPF) or
    // conntrack's reverse NAT (iptables) shows the original destination, not the proxy.
    assert_eq!(
        report.peer.as_deref(),
        Some(service_addr().as_str()),
        "{report:?}"
    );
    let local = report.local.clone().expect("local address");

    let record = wait_for_record(&node, &local);
    assert_eq!(record["original_dst"], service_addr(), "{record}");
    assert_eq!(record["target"]["kind"], "endpoint", "{record}");
    assert_eq!(record["target"]["pod"], "demo/server", "{record}");
    assert_eq!(
        record["target"]["addr"],
        format!("{}:{ECHO_TARGET_PORT}", server.ip),
        "{record}"
    );
    assert_eq!(record["upstream_bytes"], 4096, "{record}");

    // Same node, both pods enrolled: the client's proxy dial was steered (by connect4 in
    // eBPF mode, by the server pod's PREROUTING chain in iptables mode) to the server
    // pod's inbound listener (15003), which recovered the original port and delivered to
    // the application from inside the server pod, from the address it accepted: the
    // client pod's IP with its outbound proxy's port (as with ztunnel).
    let inbound = wait_for_inbound(&node, "demo/server", &client.ip.to_string());
    assert_eq!(
        inbound["original_dst"],
        format!("{}:{ECHO_TARGET_PORT}", server.ip),
        "{inbound}"
    );
    assert_eq!(inbound["target"]["kind"], "local", "{inbound}");
    assert_eq!(inbound["upstream_bytes"], 4096, "{inbound}");
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept event");
    assert!(common::from_inbound_proxy(&accepts[0]), "{}", accepts[0]);
    assert_eq!(
        accepts[0]["peer"], inbound["client"],
        "the inbound proxy dials from the client pod's address it accepted"
    );
    assert!(
        inbound["client"]
            .as_str()
            .is_some_and(|c| c.starts_with(&format!("{}:", client.ip))),
        "{inbound}"
    );

    let dump = node.config_dump();
    assert_eq!(dump["mode"], mode.name());
    assert_pod_rules(&client, mode);
    assert_pod_rules(&server, mode);
    let pods = dump["pods"].as_array().expect("pods");
    let client_row = pods
        .iter()
        .find(|p| p["pod"] == "demo/client")
        .expect("client row");
    assert_eq!(client_row["enrolled"], true);
    assert!(client_row["netns_cookie"].as_u64().is_some());
    if mode == Mode::Iptables {
        assert_eq!(dump["datapath_counters"], serde_json::Value::Null);
        return;
    }
    assert!(
        dump["datapath_counters"]["redirected"].as_u64() >= Some(1),
        "{}",
        dump["datapath_counters"]
    );
    assert!(dump["datapath_counters"]["orig_dst_answered"].as_u64() >= Some(2));
    assert!(dump["datapath_counters"]["same_node_inbound"].as_u64() >= Some(1));
    let sockmap_redirected = dump["datapath_counters"]["sockmap_redirected"].as_u64();
    if agent_args.contains(&"--sockmap") {
        // app <-> outbound proxy, proxy <-> inbound listener, inbound proxy <-> app: all
        // local pairs, so sends were handed straight to the peer socket.
        assert!(
            sockmap_redirected >= Some(3),
            "{}",
            dump["datapath_counters"]
        );
    } else {
        assert_eq!(
            sockmap_redirected,
            Some(0),
            "sockmap must stay off unless asked for"
        );
    }
}

fn unenrolled_pod_is_not_touched(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("unenrolled", &mode.args(&[]));
    let server = node.pod("legacy", "legacy-server");
    let outsider = node.pod("legacy", "outsider");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");

    // Direct pod-to-pod works and the server sees the outsider's own socket.
    let direct = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_client(&outsider, &["--connect", &direct, "--send-bytes", "1000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed_all());
    let local = report.local.clone().expect("local");
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(
        accepts[0]["peer"].as_str(),
        Some(local.as_str()),
        "server saw a different peer"
    );
    assert!(
        node.connections_from(&local).is_empty(),
        "proxy saw an unenrolled pod's connection"
    );

    // A ClusterIP means nothing without the mesh: the node has no route for it.
    let report = node
        .tb
        .run_client(
            &outsider,
            &["--connect", &service_addr(), "--connect-timeout-ms", "1000"],
        )
        .expect("client");
    assert!(
        report.error.is_some(),
        "unenrolled pod reached a ClusterIP: {report:?}"
    );

    let dump = node.config_dump();
    let pods = dump["pods"].as_array().expect("pods");
    let row = pods
        .iter()
        .find(|p| p["pod"] == "legacy/outsider")
        .expect("outsider row");
    assert_eq!(row["enrolled"], false);
    // Neither mode touched the unenrolled pods' nat tables.
    assert_pod_rules(&outsider, Mode::Ebpf);
    assert_pod_rules(&server, Mode::Ebpf);
    if mode == Mode::Ebpf {
        assert_eq!(dump["datapath_counters"]["redirected"], 0);
    }
}

fn bulk_transfer_both_ways_with_checksum_and_half_close(mode: Mode) {
    bulk_transfer_both_ways_with_checksum_and_half_close_with(&mode.args(&[]));
}

#[test]
fn bulk_transfer_both_ways_with_checksum_and_half_close_with_sockmap() {
    bulk_transfer_both_ways_with_checksum_and_half_close_with(&Mode::Ebpf.args(&["--sockmap"]));
}

fn bulk_transfer_both_ways_with_checksum_and_half_close_with(agent_args: &[&str]) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("bulk", agent_args);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");

    let bytes = (64 * MIB).to_string();
    let report = node
        .tb
        .run_client(
            &client,
            &[
                "--connect",
                &service_addr(),
                "--send-bytes",
                &bytes,
                "--half-close",
                "--seed",
                "7",
            ],
        )
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.sent, 64 * MIB);
    assert_eq!(report.received, 64 * MIB);
    assert_eq!(
        report.sent_sha256, report.received_sha256,
        "bytes changed in flight"
    );

    // Half-close: the client's FIN reaches the server through the proxy while the
    // server-to-client direction stays open for the answer.
    drop(_echo);
    let _hc = node
        .tb
        .spawn_server(&server, &["half-close-server", "--listen", "0.0.0.0:9000"])
        .expect("half-close server");
    let report = node
        .tb
        .run_client(
            &client,
            &[
                "--connect",
                &service_addr(),
                "--send-bytes",
                "12345",
                "--half-close",
            ],
        )
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.sent, 12345);
    let answer = b"got 12345 bytes after your FIN\n";
    assert_eq!(report.received, answer.len() as u64, "{report:?}");
}

fn reset_is_propagated(mode: Mode) {
    reset_is_propagated_with(&mode.args(&[]));
}

#[test]
fn reset_is_propagated_with_sockmap() {
    reset_is_propagated_with(&Mode::Ebpf.args(&["--sockmap"]));
}

fn reset_is_propagated_with(agent_args: &[&str]) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("reset", agent_args);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _rst = node
        .tb
        .spawn_server(&server, &["reset-server", "--listen", "0.0.0.0:9000"])
        .expect("reset server");
    let report = node
        .tb
        .run_client(
            &client,
            &["--connect", &service_addr(), "--send-bytes", "100000"],
        )
        .expect("client");
    assert_eq!(
        report.error.as_deref(),
        Some("connection reset"),
        "{report:?}"
    );
}

#[test]
fn trace_shows_the_redirect_of_one_pod() {
    trace_shows_the_redirect_of_one_pod_with(&[]);
}

/// Kernels before 5.13 have no `%pI4`: the programs print addresses as hex there, and
/// `interceptor trace` shows the same dotted lines.
#[test]
fn trace_shows_the_redirect_of_one_pod_without_printk_address_formats() {
    trace_shows_the_redirect_of_one_pod_with(&[
        "--simulate-missing-feature",
        "%pI4 in bpf_trace_printk",
    ]);
}

/// trace_pipe is one consuming reader per line for the whole kernel: two tests following
/// it at once would each lose the lines the other read.
static TRACE_PIPE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn trace_shows_the_redirect_of_one_pod_with(extra: &[&str]) {
    if !common::privileged() {
        return;
    }
    let _pipe = TRACE_PIPE.lock().unwrap_or_else(|e| e.into_inner());
    let mut args = vec!["--bpf-debug"];
    args.extend_from_slice(extra);
    let mut node = Node::start("trace", &args);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");

    let mut trace = std::process::Command::new(interceptor_testbed::bin_path("interceptor"));
    trace
        .args(["trace", "--pod", "demo/client", "--max-lines", "2"])
        .args(["--admin-addr", interceptor_testbed::ADMIN_ADDR])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let trace = node
        .tb
        .spawn_in(node.tb.node_netns(), false, trace)
        .expect("interceptor trace");
    std::thread::sleep(Duration::from_millis(300));
    // Lines written before trace opened the pipe wait in the ring buffer, so the sleep
    // above is not needed for correctness, only to show the pipe being followed live.
    let report = node
        .tb
        .run_client(
            &client,
            &["--connect", &service_addr(), "--send-bytes", "10"],
        )
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    let output = wait_with_timeout(trace, Duration::from_secs(10));
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 2, "trace output: {output}");
    assert!(
        lines[0].contains("icpt: connect4") && lines[0].contains("orig=10.96.0.10:80"),
        "{output}"
    );
    let local = report.local.expect("local");
    let port = local.rsplit(':').next().expect("port");
    assert!(
        lines[1].contains("icpt: established")
            && lines[1].contains(&format!("port={port} "))
            && lines[1].contains("orig=10.96.0.10"),
        "{output}"
    );
}

/// Wait for a child that should end by itself; kill it and fail if it does not.

#[test]
fn the_mode_is_probed_and_explained() {
    if !common::privileged() {
        return;
    }
    let node = Node::start("mode", &["--mode", "auto"]);
    let dump = node.config_dump();
    assert_eq!(dump["mode"], "ebpf");
    assert!(
        dump["mode_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("auto")),
        "{}",
        dump["mode_reason"]
    );
    let features = dump["node"]["probe"]["features"]
        .as_array()
        .expect("features");
    assert!(features.len() >= 15, "{features:?}");
    // Every required feature is there (or the agent would not be in eBPF mode); every
    // optional one missing names its fallback, and the reason lists them.
    let missing: Vec<_> = features
        .iter()
        .filter(|f| f["supported"] != true && f["required"] == true)
        .collect();
    assert!(missing.is_empty(), "required features missing: {missing:?}");
    for feature in features.iter().filter(|f| f["supported"] == false) {
        let name = feature["name"].as_str().expect("name");
        assert!(feature["fallback"].is_string(), "{feature}");
        assert!(
            dump["mode_reason"]
                .as_str()
                .is_some_and(|r| r.contains(name)),
            "{}",
            dump["mode_reason"]
        );
    }
}

/// `--mode auto` on a kernel that lacks one probed feature (simulated) falls back to
/// iptables, says which feature decided, and intercepts.
#[test]
fn auto_falls_back_to_iptables_when_a_feature_is_missing() {
    if !common::privileged() {
        return;
    }
    let missing = "helper get_netns_cookie in sock_addr";
    let mut node = Node::start(
        "fallback",
        &["--mode", "auto", "--simulate-missing-feature", missing],
    );
    let dump = node.config_dump();
    assert_eq!(dump["mode"], "iptables");
    let reason = dump["mode_reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("auto") && reason.contains(missing) && reason.contains("5.7"),
        "{reason}"
    );
    assert_eq!(dump["node"]["iptables_backend"], "nft", "{}", dump["node"]);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    assert_pod_rules(&client, Mode::Iptables);
    let _echo = node
        .tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-v1"],
        )
        .expect("echo server");
    let report = node
        .tb
        .run_client(
            &client,
            &["--connect", &service_addr(), "--expect-greeting"],
        )
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert_eq!(report.greeting.as_deref(), Some("hello-v1"));
    let record = wait_for_record(&node, &report.local.expect("local"));
    assert_eq!(record["target"]["pod"], "demo/server", "{record}");
}

#[test]
fn forcing_ebpf_on_a_kernel_without_a_feature_is_refused_with_the_reason() {
    if !common::privileged() {
        return;
    }
    let (mut tb, manifests) = common::testbed_with_manifests("ebpfrefused", common::MANIFESTS);
    let args = [
        "--mode",
        "ebpf",
        "--simulate-missing-feature",
        "program sk_msg",
    ];
    let error = match tb.start_agent(&manifests, &args) {
        Ok(_) => panic!("the agent started in eBPF mode without a feature it needs"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("eBPF mode needs program sk_msg (kernel 4.17)"),
        "{error}"
    );
}

/// The outbound flow map is never evicted (issue 13, item 5): it was LRU, so connections
/// past its capacity pushed out live records and the first connection's `getpeername`
/// turned into the proxy's `<pod IP>:15001` in the middle of the connection. Now a full
/// map refuses new connections (the proxy finds no original destination and resets;
/// counted in `record_failed`), the live connection keeps its peer and its bytes, and the
/// slots come back when the connections close.
#[test]
fn a_full_outbound_flow_map_refuses_new_connections_and_never_changes_a_live_peer() {
    if !common::privileged() {
        return;
    }
    const CAPACITY: usize = 4;
    let mut node = Node::start(
        "outfull",
        &["--mode", "ebpf", "--outbound-flow-capacity", "4"],
    );
    let client = node.pod("demo", "client");
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let script = format!(
        "{PY_EXCHANGE}target=('{ip}',9000)\n\
         first=socket.create_connection(target,timeout=5)\n\
         before=list(first.getpeername())\n\
         first_ok=exchange(first,b'one')\n\
         held=[]; refused=0\n\
         for i in range({tries}):\n\
         \x20   try:\n\
         \x20       s=socket.create_connection(target,timeout=3)\n\
         \x20       if exchange(s,b'x'): held.append(s)\n\
         \x20       else: refused+=1\n\
         \x20   except OSError: refused+=1\n\
         after=list(first.getpeername())\n\
         still=exchange(first,b'two')\n\
         for s in held: s.close()\n\
         first.close()\n\
         print(json.dumps(dict(before=before,after=after,first_ok=first_ok,still=still,held=len(held),refused=refused)))\n",
        ip = server.ip,
        tries = 3 * CAPACITY,
    );
    let report = common::python_in_pod(&node, &client, &script, Duration::from_secs(60));
    let expected = serde_json::json!([server.ip.to_string(), 9000]);
    assert_eq!(report["before"], expected, "{report}");
    assert_eq!(
        report["after"], expected,
        "a live connection's peer changed: {report}"
    );
    assert_eq!(report["first_ok"], true, "{report}");
    assert_eq!(
        report["still"], true,
        "the first connection broke: {report}"
    );
    // The first connection holds one slot; the others fill the rest, then are refused.
    assert_eq!(report["held"], CAPACITY - 1, "{report}");
    assert_eq!(report["refused"], 2 * CAPACITY + 1, "{report}");
    let dump = node.config_dump();
    assert!(
        dump["datapath_counters"]["record_failed"].as_u64() >= Some(2 * CAPACITY as u64 + 1),
        "{}",
        dump["datapath_counters"]
    );
    common::wait_for("the outbound records to go with their sockets", || {
        (node.config_dump()["datapath_records"]["orig_dst_by_flow"] == 0).then_some(())
    });
    common::wait_for("the warning in the agent log", || {
        node.agent_log()
            .contains("a kernel map was full")
            .then_some(())
    });
    // The slots are free again: a new connection goes through the proxy.
    let direct = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_client(&client, &["--connect", &direct, "--send-bytes", "1000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert!(report.echoed_all());
    let local = report.local.clone().expect("local");
    wait_for_record(&node, &local);
}

/// The agent's threads do not grow with the pods it enrolls (issue 14: it ran a thread
/// per pod netns, 105 threads with 100 pods). Sockets are made in a pod's netns by the
/// calling thread entering it and coming back, and every pod still works.
#[test]
fn enrolling_pods_adds_no_thread_per_pod() {
    if !common::privileged() {
        return;
    }
    const PODS: usize = 12;
    let mut manifests = String::from(common::MANIFESTS);
    for i in 0..PODS {
        manifests.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: demo, labels: {{app: many}}}}\nspec:\n  containers: [{{name: main, image: busybox}}]\n"
        ));
    }
    let mut node = Node::start_with_manifests("threads", &["--mode", "ebpf"], &manifests);
    let server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let threads = |node: &Node| -> u64 {
        let pid = node.agent.as_ref().expect("agent").pid();
        interceptor_testbed::proc_status(pid)
            .expect("agent status")
            .threads
    };
    let first = node.pod("demo", "p0");
    let direct = format!("{}:9000", server.ip);
    let check = |node: &Node, pod: &interceptor_testbed::Pod| {
        let report = node
            .tb
            .run_client(pod, &["--connect", &direct, "--send-bytes", "1000"])
            .expect("client");
        assert_eq!(report.error, None, "{}: {report:?}", pod.name);
        let local = report.local.clone().expect("local");
        wait_for_record(node, &local);
    };
    check(&node, &first);
    let before = threads(&node);
    let pods: Vec<_> = (1..PODS)
        .map(|i| node.pod("demo", &format!("p{i}")))
        .collect();
    for pod in &pods {
        check(&node, pod);
    }
    let after = threads(&node);
    assert!(
        after < before + PODS as u64 / 2,
        "{} more pods took the agent from {before} to {after} threads",
        PODS - 1
    );
}
