//! Exclusions and inclusions (FSM semantics), in eBPF and iptables mode alike
//! (`ebpf::`/`iptables::`): global rules from the mesh config file, per-pod rules from
//! annotations; in eBPF mode enforced in the kernel before any record is written, in
//! iptables mode as RETURN rules ahead of the REDIRECT. "Intercepted" is read off the server: a proxied connection arrives from
//! the proxy's socket, a direct one from the client's own.
#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{MeshConfigFile, Mode, Node};

in_both_modes!(
    global_outbound_ip_range_exclusion,
    global_inclusion_list_means_only_those_ranges,
    global_outbound_port_exclusion,
    global_inbound_port_exclusion,
    pod_annotations_add_to_global_rules_and_bad_values_are_reported,
    rules_removed_while_the_agent_was_away_are_gone_after_a_restart,
);
use interceptor_testbed::{Pod, ServerProcess, Testbed};

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata:
  name: annotated
  namespace: demo
  annotations:
    flomesh.io/outbound-port-exclusion-list: "9001"
    traffic.sidecar.istio.io/excludeOutboundPorts: "9002,notaport"
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: legacy}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: legacy}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy}
spec: {containers: [{name: c, image: x}]}
"#;

fn start(label: &str, mode: Mode) -> (Node, MeshConfigFile) {
    let mesh_config = MeshConfigFile::new(
        &format!("{label}-{}", mode.name()),
        "outboundIPRangeExclusionList: []\n",
    );
    let config_arg = mesh_config.arg();
    let node = Node::start_with_manifests(
        label,
        &mode.args(&["--mesh-config", &config_arg]),
        MANIFESTS,
    );
    (node, mesh_config)
}

/// Echo servers on 9000, 9001 and 9002 in `pod`.
fn servers(tb: &Testbed, pod: &Pod) -> Vec<ServerProcess> {
    ["9000", "9001", "9002"]
        .iter()
        .map(|port| {
            tb.spawn_server(pod, &["echo", "--listen", &format!("0.0.0.0:{port}")])
                .expect("echo")
        })
        .collect()
}

/// Connect from `client` to `server:port`; whether the proxy was in the way.
fn intercepted(node: &Node, client: &Pod, server: &Pod, echo: &ServerProcess, port: u16) -> bool {
    let before = echo
        .events()
        .iter()
        .filter(|e| e["event"] == "accept")
        .count();
    let target = format!("{}:{port}", server.ip);
    let report = node
        .tb
        .run_client(client, &["--connect", &target, "--send-bytes", "10"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    let local = report.local.expect("local");
    let accepts = echo
        .wait_for_events("accept", before + 1, Duration::from_secs(5))
        .expect("accept");
    let accept = accepts.last().expect("accept");
    // An outbound proxy dials from its own port; the inbound proxy keeps the client's
    // address and port, but its connection carries its mark.
    accept["peer"].as_str().unwrap_or_default() != local || common::from_inbound_proxy(accept)
}

/// Poll until the agent applied a rewritten mesh config.
fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out: {what}");
}

fn global_outbound_ip_range_exclusion(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut node, config) = start("exclip", mode);
    let a = node.pod("legacy", "a");
    let b = node.pod("legacy", "b");
    let client = node.pod("demo", "client");
    let echo_a = servers(&node.tb, &a);
    let echo_b = servers(&node.tb, &b);
    assert!(intercepted(&node, &client, &a, &echo_a[0], 9000));
    std::fs::write(
        &*config,
        format!("outboundIPRangeExclusionList: [\"{}/32\"]\n", a.ip),
    )
    .unwrap();
    until("a excluded", || {
        !intercepted(&node, &client, &a, &echo_a[0], 9000)
    });
    assert!(
        intercepted(&node, &client, &b, &echo_b[0], 9000),
        "b is not excluded"
    );
}

fn global_inclusion_list_means_only_those_ranges(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut node, config) = start("inclip", mode);
    let a = node.pod("legacy", "a");
    let b = node.pod("legacy", "b");
    let client = node.pod("demo", "client");
    let echo_a = servers(&node.tb, &a);
    let echo_b = servers(&node.tb, &b);
    std::fs::write(
        &*config,
        format!(
            "outboundIPRangeInclusionList: [\"{}/32\"]\noutboundIPRangeExclusionList: []\n",
            b.ip
        ),
    )
    .unwrap();
    until("only b included", || {
        !intercepted(&node, &client, &a, &echo_a[0], 9000)
    });
    assert!(
        intercepted(&node, &client, &b, &echo_b[0], 9000),
        "b is included"
    );
    // Exclusions win over inclusions.
    std::fs::write(
        &*config,
        format!(
            "outboundIPRangeInclusionList: [\"{0}/32\"]\noutboundIPRangeExclusionList: [\"{0}/32\"]\n",
            b.ip
        ),
    )
    .unwrap();
    until("b excluded though included", || {
        !intercepted(&node, &client, &b, &echo_b[0], 9000)
    });
}

fn global_outbound_port_exclusion(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut node, config) = start("exclport", mode);
    let a = node.pod("legacy", "a");
    let client = node.pod("demo", "client");
    let echo = servers(&node.tb, &a);
    std::fs::write(&*config, "outboundPortExclusionList: [9000]\n").unwrap();
    until("9000 excluded", || {
        !intercepted(&node, &client, &a, &echo[0], 9000)
    });
    assert!(
        intercepted(&node, &client, &a, &echo[1], 9001),
        "9001 is not excluded"
    );
}

fn global_inbound_port_exclusion(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut node, config) = start("inport", mode);
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let echo = servers(&node.tb, &server);
    assert!(
        intercepted(&node, &outsider, &server, &echo[0], 9000),
        "tc steers 9000"
    );
    std::fs::write(&*config, "inboundPortExclusionList: [9000]\n").unwrap();
    until("9000 excluded inbound", || {
        !intercepted(&node, &outsider, &server, &echo[0], 9000)
    });
    assert!(
        intercepted(&node, &outsider, &server, &echo[1], 9001),
        "9001 still steered"
    );
}

fn pod_annotations_add_to_global_rules_and_bad_values_are_reported(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let (mut node, config) = start("annot", mode);
    let a = node.pod("legacy", "a");
    let annotated = node.pod("demo", "annotated");
    let plain = node.pod("demo", "client");
    let echo = servers(&node.tb, &a);
    std::fs::write(&*config, "outboundPortExclusionList: [9000]\n").unwrap();
    until("global 9000 excluded", || {
        !intercepted(&node, &plain, &a, &echo[0], 9000)
    });
    // The annotated pod: global 9000 plus its own 9001 and 9002; the plain pod: 9000 only.
    // (iptables mode re-applies the pods one after the other: wait for this one too.)
    until("global 9000 excluded for the annotated pod", || {
        !intercepted(&node, &annotated, &a, &echo[0], 9000)
    });
    assert!(!intercepted(&node, &annotated, &a, &echo[1], 9001));
    assert!(
        !intercepted(&node, &annotated, &a, &echo[2], 9002),
        "the valid entry of a half-bad list holds"
    );
    assert!(
        intercepted(&node, &plain, &a, &echo[1], 9001),
        "annotations are per pod"
    );
    let dump = node.config_dump();
    let row = dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pod"] == "demo/annotated")
        .cloned()
        .expect("row");
    assert_eq!(
        row["enrolled"], true,
        "a bad annotation does not stop enrollment: {row}"
    );
    let warnings = row["rule_warnings"].to_string();
    assert!(
        warnings.contains("demo/annotated")
            && warnings.contains("excludeOutboundPorts")
            && warnings.contains("notaport"),
        "{warnings}"
    );
    assert!(
        node.agent_log().contains("notaport"),
        "the bad value is logged"
    );
}

/// Issue 13's measurement: a global exclusion (and an inclusion list) removed from the
/// mesh config while no agent ran survived the restart in the reused maps, so the client
/// kept going direct. The new agent removes every rule it did not write again before it
/// reports ready.
fn rules_removed_while_the_agent_was_away_are_gone_after_a_restart(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mesh_config = MeshConfigFile::new(
        &format!("awayrules-{}", mode.name()),
        "outboundIPRangeExclusionList: []\n",
    );
    let config_arg = mesh_config.arg();
    let args = mode.args(&["--mesh-config", &config_arg, "--on-exit", "keep"]);
    let mut node = Node::start_with_manifests("awayrules", &args, MANIFESTS);
    let a = node.pod("legacy", "a");
    let b = node.pod("legacy", "b");
    let client = node.pod("demo", "client");
    let echo_a = servers(&node.tb, &a);
    let echo_b = servers(&node.tb, &b);
    std::fs::write(
        &*mesh_config,
        format!(
            "outboundIPRangeExclusionList: [\"{}/32\"]\noutboundPortExclusionList: [9001]\n\
             outboundIPRangeInclusionList: [\"{}/32\", \"{}/32\"]\n",
            a.ip, a.ip, b.ip
        ),
    )
    .unwrap();
    until("a excluded", || {
        !intercepted(&node, &client, &a, &echo_a[0], 9000)
    });
    assert!(
        !intercepted(&node, &client, &b, &echo_b[1], 9001),
        "port 9001 excluded"
    );

    node.stop_agent();
    std::fs::write(&*mesh_config, "outboundIPRangeExclusionList: []\n").unwrap();
    let manifests = node.manifests.clone();
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &args)
            .expect("second agent"),
    );
    // Ready means reconciled: no waiting for the rules to go.
    assert!(
        intercepted(&node, &client, &a, &echo_a[0], 9000),
        "the exclusion of a survived the restart\n{}",
        node.agent_log()
    );
    assert!(
        intercepted(&node, &client, &b, &echo_b[1], 9001),
        "the port exclusion survived the restart"
    );
    let outsider = node.pod("legacy", "outsider");
    let echo_outsider = servers(&node.tb, &outsider);
    assert!(
        intercepted(&node, &client, &outsider, &echo_outsider[0], 9000),
        "the inclusion list survived the restart"
    );
    if mode == Mode::Ebpf {
        assert!(
            node.agent_log()
                .contains("removed exclusion rules a previous agent left"),
            "{}",
            node.agent_log()
        );
    }
}
