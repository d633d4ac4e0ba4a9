//! `--same-node-direct`: a connection between two enrolled pods of one node takes one
//! proxy hop. The client's outbound proxy does the server pod's inbound work itself: the
//! SMI admission, and the connect to the application from the client's own address and
//! port inside the server's netns. Nothing reaches the server's inbound listener, yet
//! both pods keep their records.
#[macro_use]
mod common;

use std::time::Duration;

use common::{
    finished_record, inbound_records, wait_for, MeshConfigFile, Mode, Node, MANIFESTS,
    TRANSPARENT_MARK,
};
use interceptor_testbed::{Pod, ServerProcess};

in_both_modes!(
    one_hop_between_enrolled_pods_of_a_node_the_app_sees_the_client_itself,
    smi_mode_still_refuses_a_client_no_traffic_target_lets_in,
    the_servers_inbound_rate_limit_holds_in_the_clients_proxy,
);

/// A node whose agent runs with `--same-node-direct` and `args`, on `manifests`, the
/// enrolled demo/server (an echo server on 9000) and demo/client.
struct Bed {
    node: Node,
    server: Pod,
    client: Pod,
    echo: ServerProcess,
}

fn bed(label: &str, mode: Mode, args: &[&str], manifests: &str) -> Bed {
    let args: Vec<&str> = ["--same-node-direct"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    let mut node = Node::start_with_manifests(label, &mode.args(&args), manifests);
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    Bed {
        node,
        server,
        client,
        echo,
    }
}

fn one_hop_between_enrolled_pods_of_a_node_the_app_sees_the_client_itself(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let Bed {
        node,
        server,
        client,
        echo,
    } = bed("samenode", mode, &[], MANIFESTS);
    let before = node.config_dump()["datapath_counters"].clone();

    let target = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "100000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert!(report.echoed_all(), "{report:?}");
    let local = report.local.clone().expect("local");

    // The application accepted the client's own address and port, from the proxy's
    // transparent socket: one hop. Through the server's inbound proxy it would see the
    // client pod's address with the port of the outbound proxy's socket, never the
    // application's own port (both are bound in the client's netns).
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts[0]["peer"], local.as_str(), "{}", accepts[0]);
    assert_eq!(accepts[0]["mark"], TRANSPARENT_MARK, "{}", accepts[0]);

    // Both pods have their record, with the same bytes.
    let outbound = wait_for("the client's outbound record", || {
        finished_record(&node, "outbound", "demo/client", &local)
    });
    let inbound = wait_for("the server's inbound record", || {
        finished_record(&node, "inbound", "demo/server", &local)
    });
    for record in [&outbound, &inbound] {
        assert_eq!(record["upstream_bytes"], 100000, "{record}");
        assert_eq!(record["downstream_bytes"], 100000, "{record}");
    }
    assert_eq!(inbound["target"]["kind"], "local", "{inbound}");
    assert_eq!(inbound["client_address"], "preserved", "{inbound}");
    // Nothing was steered to the server's inbound listener.
    if mode == Mode::Ebpf {
        let after = node.config_dump()["datapath_counters"].clone();
        assert_eq!(
            after["inbound_redirected"], before["inbound_redirected"],
            "before {before}\nafter {after}"
        );
    }
    // Only the server's own connections: none was accepted by its inbound listener.
    let accepted_inbound = inbound_records(&node.config_dump(), "demo/server", None)
        .into_iter()
        .filter(|r| r["client"] != local.as_str())
        .count();
    assert_eq!(accepted_inbound, 0, "{}", node.config_dump()["connections"]);
}

fn smi_mode_still_refuses_a_client_no_traffic_target_lets_in(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let config = MeshConfigFile::new(
        &format!("samenode-smi-{}", mode.name()),
        "enablePermissiveTrafficPolicyMode: false\n",
    );
    let config_arg = config.arg();
    let Bed {
        node,
        server,
        client,
        echo,
    } = bed(
        "samenodesmi",
        mode,
        &["--mesh-config", &config_arg],
        MANIFESTS,
    );

    // No TrafficTarget: the client's proxy refuses demo/default before any hop, as it
    // does without the flag.
    let target = format!("{}:9000", server.ip);
    let report = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "16"])
        .expect("client");
    assert!(report.error.is_some(), "got through: {report:?}");
    let refused = wait_for("the client's refusal", || {
        node.config_dump()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["pod"] == "demo/client" && r["target"]["kind"] == "refused")
            .cloned()
    });
    assert!(
        refused["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("no TrafficTarget lets ServiceAccount demo/default")),
        "{refused}"
    );
    assert!(
        echo.wait_for_events("accept", 1, Duration::from_millis(500))
            .is_err(),
        "the application accepted a refused client"
    );
}

/// The server's inbound rate limit, which only its inbound side applies: the client's
/// proxy takes the token in the server's place, and refuses once there is none.
fn the_servers_inbound_rate_limit_holds_in_the_clients_proxy(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let limit = r#"---
apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata: {name: echo-limit, namespace: demo}
spec:
  host: echo.demo.svc.cluster.local
  rateLimit:
    local:
      tcp: {connections: 1, unit: minute}
"#;
    let Bed {
        node, client, echo, ..
    } = bed("samenoderl", mode, &[], &format!("{MANIFESTS}{limit}"));
    let service = format!("{}:{}", common::ECHO_CLUSTER_IP, common::ECHO_SERVICE_PORT);
    let first = node
        .tb
        .run_client(&client, &["--connect", &service, "--send-bytes", "16"])
        .expect("client");
    assert_eq!(first.error, None, "{first:?}\n{}", node.agent_log());
    let second = node
        .tb
        .run_client(&client, &["--connect", &service, "--send-bytes", "16"])
        .expect("client");
    assert!(second.error.is_some(), "no token, yet through: {second:?}");
    let client_ip = client.ip.to_string();
    let refused = wait_for("the server's rate-limit refusal", || {
        inbound_records(&node.config_dump(), "demo/server", Some(&client_ip))
            .into_iter()
            .find(|r| r["target"]["kind"] == "refused")
    });
    assert_eq!(refused["target"]["route"], "rate limit", "{refused}");
    // Taken in the client's proxy: the record's client is the application's own socket,
    // which the client's outbound record names too.
    wait_for("the client's outbound record", || {
        finished_record(
            &node,
            "outbound",
            "demo/client",
            refused["client"].as_str()?,
        )
    });
    // The application saw the first connection only.
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts.len(), 1, "{accepts:?}");
    assert!(
        echo.wait_for_events("accept", 2, Duration::from_millis(500))
            .is_err(),
        "the application accepted a second connection"
    );
}
