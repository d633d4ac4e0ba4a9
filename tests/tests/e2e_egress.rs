//! FSM's `enableEgress` (mesh config, default true), in both modes: with it off, an
//! enrolled pod's connection to a destination outside the mesh (neither a Service address
//! nor a mesh pod: here an unenrolled pod of namespace `legacy`) is reset, counted in
//! `interceptor_proxy_refused_total{route="enableEgress"}`, recorded with its reason and
//! logged with the pod and the destination, while a Service and a mesh pod stay
//! reachable; turned on again, live, the same destination passes through. FSM Egress
//! policies (`policy.flomesh.io`) open chosen destinations to chosen ServiceAccounts while
//! egress is off (the `https` ones, by server name, are in `e2e_tls`). FSM's
//! EgressGateway sends egress through `interceptor egress-gateway` (SOCKS5) in a gateway
//! pod, counted on the gateway's own `/metrics`, and never direct when the gateway is
//! gone.
#[macro_use]
mod common;

use common::{
    metric, metric_in, wait_for, MeshConfigFile, Mode, Node, ECHO_TARGET_PORT, MANIFESTS,
};

in_both_modes!(
    egress_off_refuses_what_leaves_the_mesh_and_on_lets_it_through,
    an_egress_policy_opens_a_destination_to_its_service_account_only,
    egress_leaves_through_the_egress_gateway_and_fails_closed_without_it,
);

fn egress_off_refuses_what_leaves_the_mesh_and_on_lets_it_through(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let config = MeshConfigFile::new(&format!("egress-{}", mode.name()), "enableEgress: false\n");
    let config_arg = config.arg();
    let mut node = Node::start("egress", &mode.args(&["--mesh-config", &config_arg]));
    let client = node.pod("demo", "client");
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let listen = format!("0.0.0.0:{ECHO_TARGET_PORT}");
    let _echoes: Vec<_> = [&server, &outsider]
        .into_iter()
        .map(|pod| {
            node.tb
                .spawn_server(pod, &["echo", "--listen", &listen])
                .expect("echo")
        })
        .collect();
    let exchange = |target: &str| {
        node.tb
            .run_client(&client, &["--connect", target, "--send-bytes", "10"])
            .expect("client runs")
    };

    // Off: the unenrolled pod is outside the mesh.
    let outside = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    let record_to_outside = |kind: &str| {
        wait_for(&format!("a {kind} record to {outside}"), || {
            node.config_dump()["connections"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|r| r["original_dst"] == outside.as_str() && r["target"]["kind"] == kind)
                .cloned()
        })
    };
    let report = exchange(&outside);
    assert!(
        report.error.is_some() && report.received == 0,
        "egress went out: {report:?}"
    );
    let record = record_to_outside("refused");
    assert_eq!(record["target"]["route"], "enableEgress", "{record}");
    assert!(
        record["target"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("egress is off (enableEgress: false)")),
        "{record}"
    );
    assert!(
        metric(
            &node,
            "interceptor_proxy_refused_total",
            &["route=\"enableEgress\""]
        ) >= 1
    );
    let log = node.agent_log();
    assert!(
        log.lines().any(|l| l.contains("egress refused")
            && l.contains("demo/client")
            && l.contains(&outside)),
        "{log}"
    );

    // The mesh's own destinations: a Service, and a mesh pod dialled directly.
    for target in [
        "10.96.0.10:80".to_owned(),
        format!("{}:{ECHO_TARGET_PORT}", server.ip),
    ] {
        let report = exchange(&target);
        assert_eq!(report.error, None, "{target}: {report:?}");
    }

    // On again, live: the same destination passes through the proxy.
    std::fs::write(&*config, "enableEgress: true\n").expect("mesh config");
    wait_for("egress on again", || {
        exchange(&outside).error.is_none().then_some(())
    });
    let passed = record_to_outside("passthrough");
    assert_eq!(passed["upstream_bytes"], 10, "{passed}");
}

/// FSM's Egress policy for plain TCP: ServiceAccount `demo/curl` (the client) may reach
/// the outsider's address on the echo port; `range` is its `ipAddresses` entry.
fn egress_policy(range: &str) -> String {
    format!(
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: Egress\n\
         metadata: {{name: outsider-echo, namespace: demo}}\n\
         spec:\n  sources:\n  - kind: ServiceAccount\n    name: curl\n    namespace: demo\n\
         \x20 ipAddresses: [\"{range}\"]\n\
         \x20 ports:\n  - number: {ECHO_TARGET_PORT}\n    protocol: tcp\n"
    )
}

fn an_egress_policy_opens_a_destination_to_its_service_account_only(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let config = MeshConfigFile::new(
        &format!("egress-policy-{}", mode.name()),
        "enableEgress: false\n",
    );
    let config_arg = config.arg();
    let client_pod = "metadata: {name: client, namespace: demo, labels: {app: client}}\nspec:\n";
    assert!(MANIFESTS.contains(client_pod));
    let manifests = MANIFESTS.replace(
        client_pod,
        &format!("{client_pod}  serviceAccountName: curl\n"),
    );
    let mut node = Node::start_with_manifests(
        "egress-policy",
        &mode.args(&["--mesh-config", &config_arg]),
        &manifests,
    );
    let client = node.pod("demo", "client");
    // Enrolled too, with ServiceAccount `default`: the policy does not name it.
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let listen = format!("0.0.0.0:{ECHO_TARGET_PORT}");
    let _echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", &listen])
        .expect("echo");
    let outside = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    let exchange = |from: &interceptor_testbed::Pod| {
        node.tb
            .run_client(from, &["--connect", &outside, "--send-bytes", "10"])
            .expect("client runs")
    };
    let latest_record = |from: &interceptor_testbed::Pod| {
        node.config_dump()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|r| {
                r["original_dst"] == outside.as_str()
                    && r["client"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(&format!("{}:", from.ip)))
            })
            .cloned()
    };
    let policy_status = || {
        node.config_dump()["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["kind"] == "Egress" && r["name"] == "demo/outsider-echo")
            .cloned()
    };
    let egress_file = node.manifests.join("egress.yaml");

    // No policy yet: refused.
    let report = exchange(&client);
    assert!(report.error.is_some(), "{report:?}");

    // The policy, live: the client's ServiceAccount reaches the outsider.
    std::fs::write(&egress_file, egress_policy(&format!("{}/32", outsider.ip))).unwrap();
    wait_for("the Egress in force", || {
        policy_status().filter(|s| s["accepted"] == true)
    });
    let report = exchange(&client);
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.received, 10, "{report:?}");
    let record = wait_for("the client's record", || latest_record(&client));
    assert_eq!(record["target"]["kind"], "passthrough", "{record}");
    assert_eq!(
        record["target"]["route"], "Egress demo/outsider-echo",
        "{record}"
    );
    assert!(
        metric(
            &node,
            "interceptor_proxy_connections_total",
            &["route=\"Egress demo/outsider-echo\""]
        ) >= 1
    );
    // Another enrolled pod, another ServiceAccount: still refused.
    let report = exchange(&server);
    assert!(report.error.is_some() && report.received == 0, "{report:?}");
    let record = wait_for("the server pod's record", || latest_record(&server));
    assert_eq!(record["target"]["kind"], "refused", "{record}");
    assert!(
        record["target"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no Egress policy lets this pod reach it")),
        "{record}"
    );

    // A bad range: rejected with its reason, and the previous version stays in force.
    std::fs::write(&egress_file, egress_policy(&format!("{}/33", outsider.ip))).unwrap();
    let status = wait_for("the bad range judged", || {
        policy_status().filter(|s| {
            s["reasons"].as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.contains("/33")))
            })
        })
    });
    let reasons = status["reasons"].to_string();
    assert!(reasons.contains("is not a CIDR"), "{status}");
    assert!(
        reasons.contains("the previous valid version stays in force"),
        "{status}"
    );
    let report = exchange(&client);
    assert_eq!(report.error, None, "the previous version stays: {report:?}");

    // Gone: refused again.
    std::fs::remove_file(&egress_file).unwrap();
    wait_for("the Egress gone", || {
        policy_status().is_none().then_some(())
    });
    let report = exchange(&client);
    assert!(report.error.is_some(), "{report:?}");
}

/// FSM 8.2's global egress gateway: Service `fsm/fsm-egress-gateway` (port 1080) over
/// one gateway pod (namespace `fsm`, not enrolled) and the document's EgressGateway.
const EGRESS_GATEWAY: &str = r#"---
apiVersion: v1
kind: Namespace
metadata: {name: fsm}
---
apiVersion: v1
kind: Pod
metadata: {name: egress-gateway, namespace: fsm, labels: {app: fsm-egress-gateway}}
spec: {containers: [{name: g, image: x, ports: [{containerPort: 1080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: fsm-egress-gateway, namespace: fsm}
spec:
  clusterIP: 10.96.0.50
  selector: {app: fsm-egress-gateway}
  ports: [{name: socks, port: 1080, targetPort: 1080}]
---
kind: EgressGateway
apiVersion: policy.flomesh.io/v1alpha1
metadata:
  name: global-egress-gateway
  namespace: fsm
spec:
  global:
    - service: fsm-egress-gateway
      namespace: fsm
"#;

fn egress_leaves_through_the_egress_gateway_and_fails_closed_without_it(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start_with_manifests(
        "egress-gateway",
        &mode.args(&[]),
        &format!("{MANIFESTS}{EGRESS_GATEWAY}"),
    );
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let gateway_pod = node.pod("fsm", "egress-gateway");
    let listen = format!("0.0.0.0:{ECHO_TARGET_PORT}");
    let _echo = node
        .tb
        .spawn_server(&outsider, &["echo", "--listen", &listen])
        .expect("echo");
    let log = node.tb.state_dir().join("egress-gateway.log");
    let mut cmd = std::process::Command::new(interceptor_testbed::bin_path("interceptor"));
    cmd.args(["egress-gateway", "--listen", "0.0.0.0:1080"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let mut gateway = node
        .tb
        .spawn_in_pod(&gateway_pod, cmd)
        .expect("egress gateway");
    let gateway_log =
        || interceptor_testbed::strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
    wait_for("the egress gateway listening", || {
        gateway_log().contains("egress gateway ready").then_some(())
    });
    let outside = format!("{}:{ECHO_TARGET_PORT}", outsider.ip);
    let exchange = || {
        node.tb
            .run_client(&client, &["--connect", &outside, "--send-bytes", "10"])
            .expect("client runs")
    };
    let latest_record = || {
        node.config_dump()["connections"]
            .as_array()
            .into_iter()
            .flatten()
            .rev()
            .find(|r| r["original_dst"] == outside.as_str())
            .cloned()
    };

    let report = exchange();
    assert_eq!(report.error, None, "{report:?}");
    assert_eq!(report.received, 10, "{report:?}");
    let record = wait_for("the record", latest_record);
    let target = &record["target"];
    assert_eq!(target["kind"], "endpoint", "{record}");
    assert_eq!(
        target["route"], "EgressGateway fsm/global-egress-gateway",
        "{record}"
    );
    assert_eq!(target["tunnel_to"], outside.as_str(), "{record}");
    assert_eq!(
        target["addr"],
        format!("{}:1080", gateway_pod.ip).as_str(),
        "{record}"
    );
    // The gateway connected to the destination for the client pod.
    let logged = wait_for("the gateway's line", || {
        gateway_log()
            .lines()
            .find(|l| l.contains("forwarded") && l.contains(&outside))
            .map(str::to_owned)
    });
    assert!(logged.contains(&client.ip.to_string()), "{logged}");
    assert!(logged.contains("upstream_bytes=10"), "{logged}");
    // The gateway's own admin port counts it, in OpenMetrics text like every admin port's.
    let gateway_admin = "127.0.0.1:15000".parse().expect("address");
    let (status, body) = node
        .tb
        .http_get_in_pod(&gateway_pod, gateway_admin, "/metrics")
        .expect("the gateway's /metrics");
    assert_eq!(status, 200, "{body}");
    let forwarded = metric_in(
        &body,
        "interceptor_egress_gateway_connections_total",
        &["outcome=\"forwarded\""],
    );
    assert!(forwarded >= 1, "{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    assert!(
        metric(
            &node,
            "interceptor_proxy_connections_total",
            &["route=\"EgressGateway fsm/global-egress-gateway\""]
        ) >= 1
    );

    // The gateway gone: refused, never sent direct (the outsider is reachable directly).
    gateway.kill().expect("kill the gateway");
    gateway.wait().expect("reap the gateway");
    let report = exchange();
    assert!(
        report.error.is_some() && report.received == 0,
        "egress went around the gateway: {report:?}"
    );
}
