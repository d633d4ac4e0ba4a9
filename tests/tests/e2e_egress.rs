//! FSM's `enableEgress` (mesh config, default true), in both modes: with it off, an
//! enrolled pod's connection to a destination outside the mesh (neither a Service address
//! nor a mesh pod: here an unenrolled pod of namespace `legacy`) is reset, counted in
//! `interceptor_proxy_refused_total{route="enableEgress"}`, recorded with its reason and
//! logged with the pod and the destination, while a Service and a mesh pod stay
//! reachable; turned on again, live, the same destination passes through.
#[macro_use]
mod common;

use common::{metric, wait_for, MeshConfigFile, Mode, Node, ECHO_TARGET_PORT};

in_both_modes!(egress_off_refuses_what_leaves_the_mesh_and_on_lets_it_through);

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
