//! Issue 15 item 5, the operator surface: the metrics port (`--metrics-addr`, default
//! `0.0.0.0:15020`) scraped from the node's address rather than loopback serves the
//! proxy's metrics and the data path's kernel counters, and nothing else of the admin
//! port; the opt-in access log writes one JSON line per proxied connection. eBPF mode runs
//! with `--access-log`, iptables mode without it (no line may appear there).
#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{metric_in, Mode, Node, ECHO_CLUSTER_IP, ECHO_SERVICE_PORT};
use interceptor_testbed::NodeId;

in_both_modes!(metrics_port_serves_proxy_and_datapath_metrics_only);

/// GET `path` on node a's metrics port (its bridge address, from the node netns).
fn scrape(node: &Node, path: &str) -> (u16, String) {
    node.tb.metrics_get_on(NodeId::A, path).unwrap_or_else(|e| {
        panic!(
            "GET {path} on the metrics port: {e:#}\n{}",
            node.agent_log()
        )
    })
}

/// The metric families a metrics text declares (`# TYPE name kind`).
fn families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(str::to_owned)
        .collect()
}

/// Lines of the agent's output that are access log lines (JSON objects; the agent's own
/// log lines are tracing's text).
fn access_lines(node: &Node) -> Vec<serde_json::Value> {
    node.agent_log()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn metrics_port_serves_proxy_and_datapath_metrics_only(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let access_log = mode == Mode::Ebpf;
    let extra: &[&str] = if access_log { &["--access-log"] } else { &[] };
    let mut node = Node::start(&format!("metrics-{}", mode.name()), &mode.args(extra));
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");

    let (status, before) = scrape(&node, "/metrics");
    assert_eq!(status, 200, "{before}");
    let mode_line = format!("interceptor_datapath_mode{{mode=\"{}\"}} 1", mode.name());
    assert!(before.lines().any(|l| l == mode_line), "{before}");
    let redirected = "interceptor_datapath_redirected_total";
    let redirected_before = metric_in(&before, redirected, &["mode=\"ebpf\""]);

    let service = format!("{ECHO_CLUSTER_IP}:{ECHO_SERVICE_PORT}");
    let report = node
        .tb
        .run_client(&client, &["--connect", &service, "--send-bytes", "4096"])
        .expect("client runs");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert!(report.echoed_all(), "{report:?}");
    let local = report.local.clone().expect("client address");

    // The record (and its metrics) is written once the proxy sees both sides close.
    let connections = "interceptor_proxy_connections_total";
    let outbound = ["direction=\"outbound\"", "backend=\"demo/echo:80\""];
    let mut after = String::new();
    for _ in 0..50 {
        let (status, body) = scrape(&node, "/metrics");
        assert_eq!(status, 200, "{body}");
        after = body;
        if metric_in(&after, connections, &outbound) >= 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metric_in(&after, connections, &outbound) >= 1,
        "no outbound connection counted on the metrics port:\n{after}"
    );
    assert!(
        metric_in(
            &after,
            "interceptor_proxy_bytes_total",
            &["direction=\"outbound\"", "flow=\"upstream\""]
        ) >= 4096,
        "{after}"
    );
    match mode {
        Mode::Ebpf => {
            let redirected_after = metric_in(&after, redirected, &["mode=\"ebpf\""]);
            assert!(
                redirected_after > redirected_before,
                "{redirected} did not grow ({redirected_before} -> {redirected_after}):\n{after}"
            );
            assert!(
                metric_in(&after, "interceptor_datapath_orig_dst_answered_total", &[]) >= 1,
                "{after}"
            );
            for name in [
                "interceptor_datapath_record_failed_total",
                "interceptor_datapath_inbound_tuple_busy_total",
                "interceptor_datapath_sockmap_redirected_total",
            ] {
                assert!(
                    after
                        .lines()
                        .any(|l| l.starts_with(&format!("{name}{{mode=\"ebpf\"}} "))),
                    "{name} missing:\n{after}"
                );
            }
        }
        // No program counters in iptables mode: only the mode gauge.
        Mode::Iptables => assert!(
            !after.contains("interceptor_datapath_redirected"),
            "{after}"
        ),
    }

    // The same families as the admin port's /metrics.
    let (status, admin) = node.tb.admin_get("/metrics").expect("admin /metrics");
    assert_eq!(status, 200, "{admin}");
    assert_eq!(families(&admin), families(&after));

    // Readiness, the config dump and the debug switch stay on the loopback admin port.
    for path in ["/readyz", "/healthz", "/config_dump", "/bpf_debug/on", "/"] {
        let (status, body) = scrape(&node, path);
        assert_eq!(status, 404, "GET {path} on the metrics port: {body}");
    }
    assert_eq!(node.tb.admin_get("/readyz").expect("admin /readyz").0, 200);

    // The access log: one line for the client's connection with its fields, or none.
    if access_log {
        let mut line = None;
        for _ in 0..50 {
            line = access_lines(&node)
                .into_iter()
                .find(|l| l["client"] == local.as_str());
            if line.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let line =
            line.unwrap_or_else(|| panic!("no access log line for {local}:\n{}", node.agent_log()));
        assert_eq!(line["direction"], "outbound", "{line}");
        assert_eq!(line["source_pod"], "demo/client", "{line}");
        assert_eq!(line["original_dst"], service.as_str(), "{line}");
        assert_eq!(line["target"], format!("{}:9000", server.ip), "{line}");
        assert_eq!(line["destination_pod"], "demo/server", "{line}");
        assert_eq!(line["route"], "service", "{line}");
        assert_eq!(line["backend"], "demo/echo:80", "{line}");
        assert_eq!(line["upstream_bytes"], 4096, "{line}");
        assert_eq!(line["downstream_bytes"], 4096, "{line}");
        assert_eq!(line["outcome"], "closed", "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
        assert!(line["start_unix_ms"].as_u64().unwrap_or(0) > 0, "{line}");
    } else {
        let lines = access_lines(&node);
        assert!(
            lines.is_empty(),
            "access log lines without --access-log: {lines:?}"
        );
    }
}

/// A metrics port another process holds (without `SO_REUSEPORT`) fails the start with an
/// error naming the address; `--metrics-addr none` starts without it.
#[test]
fn a_taken_metrics_port_fails_the_start_naming_it() {
    if !common::privileged() {
        return;
    }
    let (mut tb, manifests) = common::testbed_with_manifests("metrics-taken", common::MANIFESTS);
    let taken = interceptor_testbed::with_netns(tb.node_netns(), || {
        std::net::TcpListener::bind(("0.0.0.0", interceptor_testbed::METRICS_PORT))
    })
    .expect("holding 15020 in the node netns");
    let error = match tb.start_agent(&manifests, &[]) {
        Ok(_) => panic!("the agent started although 0.0.0.0:15020 was taken"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("metrics endpoint on 0.0.0.0:15020") && error.contains("in use"),
        "{error}"
    );
    let agent = tb
        .start_agent(&manifests, &["--metrics-addr", "none"])
        .expect("the agent starts without a metrics port");
    drop(taken);
    assert!(
        tb.metrics_get_on(NodeId::A, "/metrics").is_err(),
        "nothing listens on 15020 with --metrics-addr none"
    );
    assert_eq!(tb.admin_get("/metrics").expect("admin /metrics").0, 200);
    drop(agent);
}
