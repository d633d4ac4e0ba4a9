//! eBPF mode with the fallbacks of the optional kernel features, the way kernels 5.10–6.5
//! run it (Debian 11/12, RHEL 9, Ubuntu 22.04, Amazon Linux): tc programs as netlink
//! cls_bpf filters instead of TCX links, no getpeername4, and the netns probe through
//! connect4 instead of `SO_NETNS_COOKIE`. On this machine's kernel the features are
//! present, so the test makes the agent do without them (`--simulate-missing-feature`);
//! `cargo xtask vm-test` runs the same suites on the real older kernels.
#[macro_use]
mod common;

use common::{
    inbound_records, rerun_interceptor_cni, run_in_netns, wait_for, Node, ECHO_TARGET_PORT,
};
use interceptor_testbed::Pod;

const FALLBACKS: [&str; 4] = [
    "bpf_link for tc (TCX)",
    "attach type cgroup/getpeername4",
    "SO_NETNS_COOKIE",
    "%pI4 in bpf_trace_printk",
];

fn agent_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec!["--mode", "ebpf"];
    for feature in FALLBACKS {
        args.extend(["--simulate-missing-feature", feature]);
    }
    args.extend_from_slice(extra);
    args
}

fn service_addr() -> String {
    format!("{}:{}", common::ECHO_CLUSTER_IP, common::ECHO_SERVICE_PORT)
}

/// Our cls_bpf filters on the pod's eth0, per direction (`tc filter show`).
fn our_filters(pod: &Pod, direction: &str) -> usize {
    let shown = run_in_netns(
        &pod.netns,
        &["tc", "filter", "show", "dev", "eth0", direction],
    );
    shown
        .lines()
        .filter(|l| l.contains("intercept_tc_") && l.contains("pref 5376"))
        .count()
}

/// The echo server on 9000 in `server`, greeting as [`echo_through_service`] expects.
fn echo_server(node: &Node, server: &Pod) -> interceptor_testbed::ServerProcess {
    node.tb
        .spawn_server(
            server,
            &[
                "echo",
                "--listen",
                "0.0.0.0:9000",
                "--greeting",
                "hello-fallback",
            ],
        )
        .expect("echo server")
}

fn echo_through_service(node: &Node, client: &Pod) -> interceptor_testbed::ClientReport {
    let report = node
        .tb
        .run_client(
            client,
            &[
                "--connect",
                &service_addr(),
                "--send-bytes",
                "2048",
                "--expect-greeting",
            ],
        )
        .expect("client runs");
    assert_eq!(
        report.error,
        None,
        "{report:?}\nagent log:\n{}",
        node.agent_log()
    );
    assert_eq!(report.greeting.as_deref(), Some("hello-fallback"));
    assert!(report.echoed_all(), "{report:?}");
    report
}

#[test]
fn every_fallback_at_once_intercepts_outbound_and_inbound_and_survives_a_restart() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("fallbacks", &agent_args(&["--on-exit", "keep"]));
    let dump = node.config_dump();
    assert_eq!(dump["mode"], "ebpf");
    let reason = dump["mode_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("4 fallbacks"), "{reason}");
    for feature in FALLBACKS {
        let row = dump["node"]["probe"]["features"]
            .as_array()
            .expect("features")
            .iter()
            .find(|f| f["name"] == feature)
            .cloned()
            .unwrap_or_else(|| panic!("{feature} not in the probe"));
        assert_eq!(row["supported"], false, "{row}");
        assert_eq!(row["required"], false, "{row}");
        assert!(
            row["fallback"].as_str().is_some_and(|f| !f.is_empty()),
            "{row}"
        );
    }

    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let _echo = echo_server(&node, &server);

    // Outbound: the pod's netns cookie came from the netns probe, and connect4 matched it.
    let report = echo_through_service(&node, &client);
    // Without getpeername4 the application sees the proxy as its peer (documented).
    assert_eq!(
        report.peer.as_deref(),
        Some(format!("{}:15001", client.ip).as_str()),
        "{report:?}"
    );
    let dump = node.config_dump();
    assert!(dump["datapath_counters"]["redirected"].as_u64() >= Some(1));

    // Inbound through tc, attached by netlink: an unenrolled client dials the pod IP.
    inbound_from_outside(&node, &outsider, &server);

    // Filters, not pinned links: one per direction per pod, nothing in bpffs for tc, and
    // no getpeername4 link.
    for pod in [&server, &client] {
        assert_eq!(our_filters(pod, "ingress"), 1, "{}", pod.name);
        assert_eq!(our_filters(pod, "egress"), 1, "{}", pod.name);
    }
    assert_eq!(
        our_filters(&outsider, "ingress"),
        0,
        "the outsider is not enrolled"
    );
    let pins: Vec<String> = std::fs::read_dir(node.tb.bpffs_dir())
        .expect("pin dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!pins.iter().any(|p| p.starts_with("link_tc_")), "{pins:?}");
    assert!(
        !pins
            .iter()
            .any(|p| p.contains("getpeername4") && p.starts_with("link_")),
        "{pins:?}"
    );

    // A restart that keeps the data path: the filters stay while no agent runs, the new
    // agent replaces them in place (still one each) and finds the same netns cookies.
    let cookie_before = pod_cookie(&node, "demo/client");
    node.stop_agent();
    assert_eq!(
        our_filters(&server, "ingress"),
        1,
        "the filter outlives the agent"
    );
    let manifests = node.manifests.clone();
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &agent_args(&[]))
            .expect("second agent"),
    );
    for pod in [&server, &client] {
        assert_eq!(
            our_filters(pod, "ingress"),
            1,
            "{} after the restart\n{}",
            pod.name,
            node.agent_log()
        );
        assert_eq!(
            our_filters(pod, "egress"),
            1,
            "{} after the restart",
            pod.name
        );
    }
    assert_eq!(pod_cookie(&node, "demo/client"), cookie_before);
    echo_through_service(&node, &client);

    // DEL takes the pod's filters away.
    rerun_interceptor_cni(&node, &server, "DEL");
    assert_eq!(our_filters(&server, "ingress"), 0);
    assert_eq!(our_filters(&server, "egress"), 0);

    // Stopping with the default `--on-exit remove` takes the remaining pod's filters too:
    // nothing steers inbound traffic to a listener that is gone.
    node.stop_agent();
    assert_eq!(our_filters(&client, "ingress"), 0);
    assert_eq!(our_filters(&client, "egress"), 0);

    // After `--on-exit keep`, `interceptor cleanup` removes the filters it left.
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &agent_args(&["--on-exit", "keep"]))
            .expect("third agent"),
    );
    assert_eq!(our_filters(&client, "ingress"), 1, "{}", node.agent_log());
    node.stop_agent();
    assert_eq!(our_filters(&client, "ingress"), 1, "kept");
    let out = common::run_cleanup(&node.tb);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("2 tc filters in"), "{stdout}");
    assert_eq!(our_filters(&client, "ingress"), 0);
    assert_eq!(our_filters(&client, "egress"), 0);
}

fn pod_cookie(node: &Node, pod: &str) -> u64 {
    node.config_dump()["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["pod"] == pod)
        .and_then(|p| p["netns_cookie"].as_u64())
        .unwrap_or_else(|| panic!("no cookie for {pod}"))
}

/// An agent restarted with the other tc attachment (TCX links before, netlink filters
/// now, as after a probe that changed) leaves exactly one attachment per direction: the
/// old links are unpinned once the filters are in, and interception goes on.
#[test]
fn switching_from_tcx_links_to_filters_leaves_one_attachment() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start(
        "tcxswitch",
        &["--mode", "ebpf", "--on-exit", "keep", "--tc-attach", "tcx"],
    );
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    if !common::agent_has_feature(&node, "bpf_link for tc (TCX)") {
        // Below 6.6 the agent attaches filters on its own: there are no TCX links to
        // switch from, and what it attached is the filters.
        assert_eq!(our_filters(&server, "ingress"), 1, "{}", node.agent_log());
        assert_eq!(our_filters(&server, "egress"), 1);
        return;
    }
    let _echo = echo_server(&node, &server);
    let tc_pins = |node: &Node| {
        std::fs::read_dir(node.tb.bpffs_dir())
            .expect("pin dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("link_tc_"))
            .count()
    };
    assert_eq!(tc_pins(&node), 4);
    assert_eq!(our_filters(&server, "ingress"), 0);
    node.stop_agent();
    let manifests = node.manifests.clone();
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &agent_args(&[]))
            .expect("agent with filters"),
    );
    assert_eq!(tc_pins(&node), 0, "{}", node.agent_log());
    for pod in [&server, &client] {
        assert_eq!(our_filters(pod, "ingress"), 1, "{}", pod.name);
        assert_eq!(our_filters(pod, "egress"), 1, "{}", pod.name);
    }
    echo_through_service(&node, &client);
    let outsider = node.pod("legacy", "outsider");
    inbound_from_outside(&node, &outsider, &server);
}

/// An unenrolled client dials the enrolled server's IP: tc steers the flow to 15003
/// (the inbound record shows it) and restores the port for the client.
fn inbound_from_outside(node: &Node, outsider: &Pod, server: &Pod) {
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let report = node
        .tb
        .run_client(outsider, &["--connect", &target, "--send-bytes", "1000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert_eq!(
        report.peer.as_deref(),
        Some(target.as_str()),
        "egress restored the port"
    );
    let outsider_ip = outsider.ip.to_string();
    let record = wait_for("the inbound record", || {
        inbound_records(&node.config_dump(), "demo/server", Some(&outsider_ip))
            .into_iter()
            .next()
    });
    assert_eq!(record["original_dst"], target, "{record}");
}

/// A kernel (or node) that passes the probe but refuses one step of the attach: here the
/// sock_ops link cannot be pinned (something already holds its name), after connect4 was
/// attached and pinned. Auto mode undoes the whole attach (no program stays on the
/// cgroup, no pin stays) and runs iptables, saying why; forced eBPF mode refuses to start
/// with the same reason.
#[test]
fn a_refused_attach_leaves_nothing_attached_and_auto_falls_back_to_iptables() {
    if !common::privileged() {
        return;
    }
    let (mut tb, manifests) = common::testbed_with_manifests("attachrefused", common::MANIFESTS);
    let blocker = tb.bpffs_dir().join("link_intercept_sock_ops");
    std::fs::create_dir_all(&blocker).expect("a directory where the sock_ops link pin goes");

    let error = match tb.start_agent(&manifests, &["--mode", "ebpf"]) {
        Ok(_) => panic!("eBPF mode started although its sock_ops link could not be pinned"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("link_intercept_sock_ops"), "{error}");
    assert_nothing_attached(&tb);

    std::fs::create_dir_all(&blocker).expect("the blocker again");
    let agent = tb
        .start_agent(&manifests, &["--mode", "auto"])
        .expect("auto mode starts");
    let mut node = Node {
        agent: Some(agent),
        manifests,
        tb,
    };
    let dump = node.config_dump();
    assert_eq!(dump["mode"], "iptables");
    let reason = dump["mode_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("attaching failed") && reason.contains("link_intercept_sock_ops"),
        "{reason}"
    );
    assert_nothing_attached(&node.tb);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = echo_server(&node, &server);
    echo_through_service(&node, &client);
}

/// No program on the testbed's cgroup and none of our pins left.
fn assert_nothing_attached(tb: &interceptor_testbed::Testbed) {
    let attached = common::cgroup_attach_types("bpftool", tb.cgroup_path());
    assert!(
        attached.is_empty(),
        "programs left on the cgroup: {attached:?}"
    );
    let pins: Vec<String> = std::fs::read_dir(tb.bpffs_dir())
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pins left: {pins:?}");
}
