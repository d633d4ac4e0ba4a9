//! Issue 13's hand-over: a second agent started on the same state dir and bpffs while the
//! first serves adopts every pod, opens its listeners beside the first one's
//! (`SO_REUSEPORT`) and takes the CNI socket; the first drains on SIGTERM. Measured under
//! load: no new connection fails and no long-lived connection breaks before the first
//! agent's drain deadline. Before this, the second agent refused to start, and a restart
//! cost failed connections, a gap, and every long-lived connection. The metrics port
//! (15020, SO_REUSEPORT) answers throughout.
#[macro_use]
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{Mode, Node, ECHO_CLUSTER_IP, ECHO_SERVICE_PORT, MANIFESTS};
use interceptor_testbed::NodeId;

/// The second agent's admin endpoint (the first one has the testbed's default).
const SECOND_ADMIN: &str = "127.0.0.1:15010";
const DRAIN_MS: u64 = 4_000;
/// How early a long-lived connection may break before the drain deadline and still count
/// as broken by it: the deadline is measured from when the test sent SIGTERM.
const DEADLINE_SLACK_MS: u64 = 150;

/// A pod of the enrolled namespace added only after the hand-over.
const LATE_POD: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: demo}
spec:
  containers: [{name: main, image: busybox}]
";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn a_second_agent_takes_over_without_losing_a_connection(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let drain = format!("{DRAIN_MS}ms");
    let args = mode.args(&["--drain-timeout", &drain]);
    let mut node = Node::start_with_manifests(
        &format!("handover-{}", mode.name()),
        &args,
        &format!("{MANIFESTS}{LATE_POD}"),
    );
    let client = node.pod("demo", "client");
    let server = node.pod("demo", "server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let service = format!("{ECHO_CLUSTER_IP}:{ECHO_SERVICE_PORT}");
    let manifests = node.manifests.clone();
    let first = node.agent.take().expect("first agent");
    let first_pid = first.pid();

    let (report, sigterm_at, first_exited_at, second, overlap_scrapes) =
        std::thread::scope(|scope| {
            let tb = &node.tb;
            let load = scope.spawn(|| {
                tb.run_tb_pod(
                    &client,
                    &[
                        "load",
                        "--connect",
                        &service,
                        "--duration-ms",
                        "14000",
                        "--long-lived",
                        "20",
                        "--interval-ms",
                        "100",
                    ],
                    Duration::from_secs(60),
                )
            });
            std::thread::sleep(Duration::from_millis(1500));
            // Waits for the second agent's /readyz: it has adopted both pods by then.
            let second = node
                .tb
                .start_agent_at(NodeId::A, &manifests, SECOND_ADMIN, &args);
            // Both agents listen on the metrics port (SO_REUSEPORT): each scrape is answered
            // by one of them.
            let overlap_scrapes: Vec<String> = (0..4)
                .map(|_| match tb.metrics_get_on(NodeId::A, "/metrics") {
                    Ok((code, _)) => code.to_string(),
                    Err(error) => format!("{error:#}"),
                })
                .collect();
            std::thread::sleep(Duration::from_millis(1000));
            let sigterm_at = unix_ms();
            let stopped = first.stop();
            let first_exited_at = unix_ms();
            let report = load.join().expect("load thread");
            (
                report,
                sigterm_at,
                first_exited_at,
                (second, stopped),
                overlap_scrapes,
            )
        });
    let (second, stopped) = second;
    let second = second.expect("the second agent starts beside the first and gets ready");
    node.agent = Some(second);
    let status = stopped.expect("the first agent exits on SIGTERM");
    assert!(
        status.success(),
        "first agent: {status}\n{}",
        node.agent_log()
    );
    let report = report.expect("load report");
    let log = node.agent_log();
    assert!(
        overlap_scrapes.iter().all(|code| code == "200"),
        "metrics port while both agents ran: {overlap_scrapes:?}\n{log}"
    );
    let (code, _) = node
        .tb
        .metrics_get_on(NodeId::A, "/metrics")
        .expect("the metrics port after the hand-over");
    assert_eq!(code, 200, "the second agent serves the metrics port alone");

    assert_eq!(
        report["new"]["failed"], 0,
        "new connections failed during the hand-over: {}\n{log}",
        report["new"]
    );
    assert!(
        report["new"]["ok"].as_u64().unwrap_or(0) > 100,
        "{}",
        report["new"]
    );
    assert!(
        report["new"]["last_ok_unix_ms"].as_u64().unwrap_or(0) > first_exited_at,
        "no new connection after the first agent exited (at {first_exited_at}): {}",
        report["new"]
    );
    let deadline = sigterm_at + DRAIN_MS;
    let broken: Vec<u64> = report["long_lived"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["broken_at_unix_ms"].as_u64())
        .collect();
    // The figures the README quotes.
    eprintln!(
        "hand-over ({}): new connections ok {} failed {} max gap {} ms; long-lived broken \
         {} of 20, earliest {} ms after SIGTERM (drain deadline {DRAIN_MS} ms)",
        mode.name(),
        report["new"]["ok"],
        report["new"]["failed"],
        report["new"]["max_gap_ms"],
        broken.len(),
        broken
            .iter()
            .min()
            .map_or(-1, |b| *b as i64 - sigterm_at as i64),
    );
    let long_lived = report["long_lived"].as_array().expect("long_lived");
    assert_eq!(long_lived.len(), 20);
    for connection in long_lived {
        assert!(
            connection["exchanges"].as_u64().unwrap_or(0) > 20,
            "{connection}"
        );
        if let Some(broken_at) = connection["broken_at_unix_ms"].as_u64() {
            assert!(
                broken_at + DEADLINE_SLACK_MS >= deadline,
                "a long-lived connection broke {} ms before the drain deadline: {connection}\n{log}",
                deadline - broken_at
            );
        }
    }
    // The first agent drained: it said so, and it counted the long-lived connections
    // (client side and server side of each) still open at the deadline.
    assert!(
        log.contains("took over the state dir"),
        "second agent log:\n{log}"
    );
    assert!(
        log.contains("handed over"),
        "first agent (pid {first_pid}) log:\n{log}"
    );

    // The second agent serves alone now: its pods, its CNI socket, its listeners.
    let (code, body) = node
        .tb
        .admin_get_at(NodeId::A, SECOND_ADMIN, "/config_dump")
        .expect("second agent's /config_dump");
    assert_eq!(code, 200, "{body}");
    let dump: serde_json::Value = serde_json::from_str(&body).expect("config_dump JSON");
    let enrolled: Vec<&str> = dump["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter(|p| p["enrolled"] == true)
        .filter_map(|p| p["pod"].as_str())
        .collect();
    assert_eq!(enrolled, ["demo/client", "demo/server"], "{body}");
    let pid_file = node.tb.agent_state_dir().join("agent.pid");
    let owner = std::fs::read_to_string(&pid_file).expect("pid file");
    assert_eq!(
        owner.trim(),
        node.agent.as_ref().expect("second agent").pid().to_string()
    );
    let late = node.pod("demo", "late");
    let reply = node
        .tb
        .run_tb_pod(
            &late,
            &["tally", "--connect", &service, "--count", "3"],
            Duration::from_secs(20),
        )
        .expect("tally");
    assert_eq!(reply["errors"], 0, "{reply}");
    let (code, body) = node
        .tb
        .admin_get_at(NodeId::A, SECOND_ADMIN, "/config_dump")
        .expect("second agent's /config_dump");
    assert_eq!(code, 200);
    assert!(
        body.contains("demo/late"),
        "the pod added after the hand-over went to the second agent: {body}"
    );
}

in_both_modes!(a_second_agent_takes_over_without_losing_a_connection);
