//! What only the iptables mode has: the chains in the pod netns (installed once however
//! often ADD comes, removed on DEL), the legacy/nft backend choice, and a failing
//! `iptables-restore` that must leave nothing behind and fail the ADD with its text.
mod common;

use common::{assert_pod_rules, nat_rules, rerun_interceptor_cni, run_in_netns, Mode, Node};

fn echo_through_service(node: &Node, client: &interceptor_testbed::Pod) {
    let report = node
        .tb
        .run_client(
            client,
            &[
                "--connect",
                &format!("{}:{}", common::ECHO_CLUSTER_IP, common::ECHO_SERVICE_PORT),
                "--send-bytes",
                "1000",
                "--expect-greeting",
            ],
        )
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert_eq!(report.greeting.as_deref(), Some("hi"));
    assert!(report.echoed_all(), "{report:?}");
}

#[test]
fn chains_are_installed_once_and_removed_on_del() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("iptonce", &Mode::Iptables.args(&["--on-exit", "keep"]));
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = node
        .tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hi"],
        )
        .expect("echo");
    assert_pod_rules(&client, Mode::Iptables);
    let before = nat_rules(&client.netns, "nft");
    assert!(
        before.contains("-A PROXY_OUTPUT -m mark --mark 0x1500/0xfffffffe -j RETURN"),
        "{before}"
    );
    echo_through_service(&node, &client);

    // An agent restart that keeps the data path, while the client opted out of the mesh:
    // the new agent re-applies the server's chains in place (no second jump), and removes
    // what the old agent left in the client, which it no longer enrolls.
    node.stop_agent();
    assert_pod_rules(&client, Mode::Iptables);
    let opted_out = common::MANIFESTS.replace(
        "labels: {app: client}",
        "labels: {app: client, istio.io/dataplane-mode: none}",
    );
    assert_ne!(opted_out, common::MANIFESTS);
    std::fs::write(node.manifests.join("mesh.yaml"), opted_out).expect("manifests");
    let manifests = node.manifests.clone();
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &Mode::Iptables.args(&[]))
            .expect("second agent"),
    );
    assert_pod_rules(&server, Mode::Iptables);
    assert_pod_rules(&client, Mode::Ebpf);
    // The client now dials the server directly; the server's chains steer it inbound.
    let target = format!("{}:{}", server.ip, common::ECHO_TARGET_PORT);
    let report = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "10"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    common::wait_for("the inbound record", || {
        common::inbound_records(
            &node.config_dump(),
            "demo/server",
            Some(&client.ip.to_string()),
        )
        .into_iter()
        .next()
    });

    // DEL removes every chain and jump.
    rerun_interceptor_cni(&node, &server, "DEL");
    assert_pod_rules(&server, Mode::Ebpf);
}

/// `interceptor cleanup` after an agent stopped with `--on-exit keep` takes the chains out
/// of the pods it had enrolled: nothing is left failing closed.
#[test]
fn cleanup_removes_the_chains_a_kept_data_path_left() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("iptclean", &Mode::Iptables.args(&["--on-exit", "keep"]));
    let client = node.pod("demo", "client");
    node.stop_agent();
    assert_pod_rules(&client, Mode::Iptables);
    let out = common::run_cleanup(&node.tb);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("iptables-nft chains in"), "{stdout}");
    assert_pod_rules(&client, Mode::Ebpf);
}

#[test]
fn a_forced_legacy_backend_writes_legacy_tables_only() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start(
        "iptlegacy",
        &Mode::Iptables.args(&["--iptables-backend", "legacy"]),
    );
    assert_eq!(node.config_dump()["node"]["iptables_backend"], "legacy");
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = node
        .tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hi"],
        )
        .expect("echo");
    let legacy = nat_rules(&client.netns, "legacy");
    assert!(
        legacy.contains("-A OUTPUT -p tcp -j PROXY_OUTPUT"),
        "{legacy}"
    );
    assert!(!nat_rules(&client.netns, "nft").contains("PROXY_"));
    echo_through_service(&node, &client);
    // DEL cleans the legacy tables; the other pod keeps its chains.
    rerun_interceptor_cni(&node, &client, "DEL");
    let legacy_client = nat_rules(&client.netns, "legacy");
    assert!(!legacy_client.contains("PROXY_"), "{legacy_client}");
    let legacy_server = nat_rules(&server.netns, "legacy");
    assert!(legacy_server.contains(":PROXY_INBOUND"), "{legacy_server}");
}

#[test]
fn auto_backend_follows_the_tables_the_node_already_uses() {
    if !common::privileged() {
        return;
    }
    let mut tb = interceptor_testbed::Testbed::builder("iptdetect")
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    // The node's own rules live in the legacy tables (an older kube-proxy, say).
    run_in_netns(
        tb.node_netns(),
        &[
            "iptables-legacy",
            "-t",
            "filter",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "1",
            "-j",
            "ACCEPT",
        ],
    );
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("dir");
    std::fs::write(manifests.join("mesh.yaml"), common::MANIFESTS).expect("manifests");
    let agent = tb
        .start_agent(&manifests, &Mode::Iptables.args(&[]))
        .expect("agent");
    let (_, body) = tb.admin_get("/config_dump").expect("dump");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        dump["node"]["iptables_backend"], "legacy",
        "{}",
        dump["mode_reason"]
    );
    let reason = dump["mode_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("1 iptables-legacy rules and 0 iptables-nft rules"),
        "{reason}"
    );
    let client = tb.add_pod("demo", "client").expect("client");
    assert!(nat_rules(&client.netns, "legacy").contains(":PROXY_OUTPUT"));

    // The node's legacy rule goes (0 to 0 would now say nft), and the agent restarts: it
    // keeps the backend it wrote the pods' chains with, and finds them again.
    agent.stop().expect("agent stops");
    run_in_netns(
        tb.node_netns(),
        &["iptables-legacy", "-t", "filter", "-F", "INPUT"],
    );
    let _agent = tb
        .start_agent(&manifests, &Mode::Iptables.args(&[]))
        .expect("second agent");
    let (_, body) = tb.admin_get("/config_dump").expect("dump");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(dump["node"]["iptables_backend"], "legacy");
    let reason = dump["mode_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the previous agent used it"), "{reason}");
    let legacy = nat_rules(&client.netns, "legacy");
    assert_eq!(
        legacy.matches("-A OUTPUT -p tcp -j PROXY_OUTPUT").count(),
        1,
        "{legacy}"
    );
    assert!(!nat_rules(&client.netns, "nft").contains("PROXY_"));
}

#[test]
fn a_failing_restore_leaves_no_rules_and_fails_the_add_with_its_text() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("iptfail", &Mode::Iptables.args(&[]));
    // Something else in the pod netns owns an nft base chain named like one of ours:
    // iptables-nft-restore cannot create PROXY_OUTPUT and rejects the whole transaction.
    let a = node.tb.nodes()[0].id();
    let mut holder = None;
    let error = node
        .tb
        .add_prepared_pod_on(a, "demo", "client", |netns| {
            run_in_netns(netns, &["nft", "add", "table", "ip", "nat"]);
            run_in_netns(
                netns,
                &[
                    "nft",
                    "add",
                    "chain",
                    "ip",
                    "nat",
                    "PROXY_OUTPUT",
                    "{ type nat hook output priority 0; }",
                ],
            );
            // Keeps the netns alive after the failed ADD deletes its name, to look inside.
            holder = Some(
                std::process::Command::new("ip")
                    .args(["netns", "exec", netns, "sleep", "60"])
                    .spawn()?,
            );
            Ok(())
        })
        .map(|pod| format!("ADD succeeded: {}", pod.netns))
        .unwrap_or_else(|e| format!("{e:#}"));
    let mut holder = holder.expect("netns holder");
    let ruleset = std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", holder.id()))
        .args(["nft", "list", "ruleset"])
        .output();
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(
        error.contains("iptables") && error.contains("PROXY_OUTPUT"),
        "{error}"
    );
    let ruleset = String::from_utf8_lossy(&ruleset.expect("nsenter nft").stdout).into_owned();
    // Nothing of the transaction landed: only the foreign chain is there.
    assert!(ruleset.contains("chain PROXY_OUTPUT"), "{ruleset}");
    for ours in [
        "PROXY_INBOUND",
        "PROXY_IN_REDIRECT",
        "PROXY_REDIRECT",
        "jump",
    ] {
        assert!(!ruleset.contains(ours), "{ours} left behind:\n{ruleset}");
    }
    let dump = node.config_dump();
    let enrolled: Vec<_> = dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["pod"] == "demo/client" && p["enrolled"] == true)
        .collect();
    assert!(enrolled.is_empty(), "{enrolled:?}");
    assert_eq!(dump["datapath_records"]["enrolled_netns"], 0);
    // The rest keeps working.
    let server = node.pod("demo", "server");
    assert_pod_rules(&server, Mode::Iptables);
}
