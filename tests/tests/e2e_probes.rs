//! Kubelet's probes in SMI mode (`enablePermissiveTrafficPolicyMode: false`): a prober in
//! the node netns (kubelet's place) reaches an enrolled pod that no TrafficTarget opens,
//! over TCP and HTTP, because the agent SNATs the node's own connections to enrolled pods
//! to 169.254.7.127 and the inbound proxy admits exactly that source. Other pods, enrolled
//! or not, stay refused. Both modes (`ebpf::`/`iptables::`).
#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use common::{inbound_records, metric, wait_for, MeshConfigFile, Mode, Node, MANIFESTS};

in_both_modes!(node_probes_reach_an_enrolled_pod_that_smi_mode_closes_to_pods);

/// The source the agent gives node-originated connections to enrolled pods.
const PROBE_SOURCE: &str = "169.254.7.127";
const HTTP_PORT: u16 = 8080;
/// A pod outside the mesh, on a second node.
const REMOTE_POD: &str = "---
apiVersion: v1
kind: Pod
metadata: {name: remote, namespace: legacy, labels: {app: remote}}
spec:
  containers: [{name: main, image: busybox}]
";
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What kubelet's TCP probe does, and a little more: connect, and see the application
/// answer (the echo server returns the line), so a connection the proxy accepts and then
/// resets counts as a failure.
fn tcp_probe(node: &Node, addr: SocketAddr) -> Result<String, String> {
    let mut stream = node
        .tb
        .connect_from_node(addr)
        .map_err(|e| format!("connect: {e:#}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(b"probe\n")
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    Ok(reply)
}

/// What kubelet's HTTP probe does: one GET; the status line.
fn http_probe(node: &Node, addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut stream = node
        .tb
        .connect_from_node(addr)
        .map_err(|e| format!("connect: {e:#}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// A server the test started: killed and reaped however the test ends (the testbed
/// would kill it too, but only when it goes).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The node netns's nat rules in both backends (the agent uses the one it detected; the
/// other prints nothing of ours).
fn probe_rules(node: &Node) -> String {
    let mut rules = String::new();
    for backend in ["legacy", "nft"] {
        let output = std::process::Command::new("ip")
            .args(["netns", "exec", node.tb.node_netns()])
            .args([&format!("iptables-{backend}-save"), "-t", "nat"])
            .output()
            .expect("ip netns exec");
        rules.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    rules
}

fn node_probes_reach_an_enrolled_pod_that_smi_mode_closes_to_pods(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let config = MeshConfigFile::new(
        &format!("probes-{}", mode.name()),
        "enablePermissiveTrafficPolicyMode: false\n",
    );
    let config_arg = config.arg();
    let manifests = format!("{MANIFESTS}{REMOTE_POD}");
    let mut node = Node::start_with_manifests(
        "probes",
        &mode.args(&["--mesh-config", &config_arg]),
        &manifests,
    );
    // demo is enrolled, legacy is not; no TrafficTarget exists, so in SMI mode no pod may
    // reach demo/server.
    let server = node.pod("demo", "server");
    let client = node.pod("demo", "client");
    let outsider = node.pod("legacy", "outsider");
    let legacy_server = node.pod("legacy", "legacy-server");
    let _echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let docroot = node.tb.state_dir().join("probe-docroot");
    std::fs::create_dir_all(&docroot).expect("docroot");
    std::fs::write(docroot.join("healthz"), "ok\n").expect("healthz");
    let mut httpd = std::process::Command::new("busybox");
    httpd
        .args(["httpd", "-f", "-p"])
        .arg(format!("0.0.0.0:{HTTP_PORT}"))
        .arg("-h")
        .arg(&docroot);
    let _httpd = KillOnDrop(node.tb.spawn_in_pod(&server, httpd).expect("busybox httpd"));

    let echo_addr = SocketAddr::from((server.ip, 9000));
    let http_addr = SocketAddr::from((server.ip, HTTP_PORT));

    // The TCP probe: the application answers. The first waits for the server to listen.
    let mut last = String::new();
    // Until a deadline rather than a count: a probe that times out takes seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let reply = std::iter::from_fn(|| (std::time::Instant::now() < deadline).then_some(()))
        .find_map(|()| match tcp_probe(&node, echo_addr) {
            Ok(reply) if !reply.is_empty() => Some(reply),
            Ok(_) => {
                last = "closed without a reply".into();
                std::thread::sleep(Duration::from_millis(100));
                None
            }
            Err(error) => {
                last = error;
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "the TCP probe failed: {last}\nserver's inbound records: {:#?}",
                inbound_records(&node.config_dump(), "demo/server", None)
            )
        });
    assert_eq!(reply, "probe\n");
    // The HTTP probe, to a second application port.
    let status = wait_for("the HTTP probe", || {
        http_probe(&node, http_addr, "/healthz")
            .ok()
            .filter(|s| !s.is_empty())
    });
    assert!(
        status.starts_with("HTTP/1.") && status.contains(" 200"),
        "{status}"
    );

    // The node's own connections to the enrolled pod are SNATed in the node netns.
    let rules = probe_rules(&node);
    let server_rule = format!("-A INTERCEPTOR_PROBES -d {}/32", server.ip);
    assert!(rules.contains(&server_rule), "{rules}");
    assert!(
        rules.contains("-A POSTROUTING -j INTERCEPTOR_PROBES"),
        "{rules}"
    );
    // Only enrolled pods: an unenrolled pod's probes keep the node's address.
    assert!(
        !rules.contains(&format!("-d {}/32", legacy_server.ip)),
        "{rules}"
    );
    // The config dump says the same: the enrolled pods, and no error.
    let status = node.config_dump()["node_probes"].clone();
    assert_eq!(status["source"], PROBE_SOURCE, "{status}");
    assert_eq!(status["last_error"], serde_json::Value::Null, "{status}");
    let mut pods: Vec<String> = status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    pods.sort();
    let mut enrolled = vec![server.ip.to_string(), client.ip.to_string()];
    enrolled.sort();
    assert_eq!(pods, enrolled, "{status}");

    // Both were admitted as probes, from the probe address, and say so.
    let probes = wait_for("the probe records", || {
        let records = inbound_records(&node.config_dump(), "demo/server", Some(PROBE_SOURCE));
        (records.len() >= 2).then_some(records)
    });
    for record in &probes {
        assert_eq!(record["target"]["kind"], "local", "{record}");
        assert_eq!(record["target"]["node_probe"], true, "{record}");
    }
    let admitted = metric(
        &node,
        "interceptor_proxy_connections_total",
        &["route=\"node probe\"", "backend=\"demo/server\""],
    );
    assert!(admitted >= 2, "probes counted: {admitted}");

    // Pods are still judged by SMI: an enrolled pod with no grant is refused...
    let target = echo_addr.to_string();
    let denied = node
        .tb
        .run_client(&client, &["--connect", &target, "--send-bytes", "16"])
        .expect("client");
    assert!(
        denied.error.is_some(),
        "enrolled pod got through: {denied:?}"
    );
    // ...and so is a pod outside the mesh.
    let denied = node
        .tb
        .run_client(&outsider, &["--connect", &target, "--send-bytes", "16"])
        .expect("client");
    assert!(
        denied.error.is_some(),
        "unenrolled pod got through: {denied:?}"
    );
    let outsider_ip = outsider.ip.to_string();
    let refused = wait_for("the outsider's refusal", || {
        inbound_records(&node.config_dump(), "demo/server", Some(&outsider_ip))
            .into_iter()
            .find(|r| r["target"]["kind"] == "refused")
    });
    // Judged by its ServiceAccount like any known pod, and no TrafficTarget names it.
    assert!(
        refused["outcome"]
            .as_str()
            .is_some_and(|o| o.contains("no TrafficTarget lets ServiceAccount legacy/default")),
        "{refused}"
    );
    // Forwarded traffic to the pod is not the node's own, even though it leaves through
    // the same POSTROUTING: a pod on another node keeps its address (no SNAT without a
    // local socket) and is refused, since no agent on this node knows it.
    let b = node.tb.add_node("b", false).expect("node b");
    let remote = node
        .tb
        .add_pod_on(b, "legacy", "remote")
        .expect("pod on node b");
    let denied = node
        .tb
        .run_client(&remote, &["--connect", &target, "--send-bytes", "16"])
        .expect("client");
    assert!(
        denied.error.is_some(),
        "a pod on node b got through: {denied:?}"
    );
    let remote_ip = remote.ip.to_string();
    let refused = wait_for("the remote pod's refusal", || {
        inbound_records(&node.config_dump(), "demo/server", Some(&remote_ip))
            .into_iter()
            .find(|r| r["target"]["kind"] == "refused")
    });
    assert!(
        refused["outcome"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("{remote_ip} is not a mesh workload"))),
        "{refused}"
    );
    // Nothing else was counted as a probe.
    assert_eq!(
        metric(
            &node,
            "interceptor_proxy_connections_total",
            &["route=\"node probe\"", "backend=\"demo/server\""],
        ),
        admitted
    );

    // Rules taken away behind the agent's back (another tool, say): the next change,
    // written as a difference, fails on them, and the agent writes the chain whole.
    let backend = node.config_dump()["node_probes"]["backend"]
        .as_str()
        .expect("the backend")
        .to_owned();
    let client_rule = format!("-A INTERCEPTOR_PROBES -d {}/32", client.ip);
    let before = probe_rules(&node);
    for pod_rule in [&server_rule, &client_rule] {
        let full = before
            .lines()
            .find(|l| l.starts_with(pod_rule.as_str()))
            .expect("the pod's rule")
            .to_owned();
        let mut delete = vec!["netns", "exec", node.tb.node_netns()];
        let tool = format!("iptables-{backend}");
        delete.extend([tool.as_str(), "-t", "nat", "-D"]);
        delete.extend(full.split_whitespace().skip(1));
        let status = std::process::Command::new("ip")
            .args(&delete)
            .status()
            .expect("iptables -D");
        assert!(status.success(), "{delete:?}");
    }
    assert!(!probe_rules(&node).contains(&client_rule));

    // The pod's rule goes with the pod, and the chain with the agent (--on-exit remove).
    node.tb.del_pod(&server).expect("CNI DEL");
    let rules = wait_for("the deleted pod's rule to go", || {
        let rules = probe_rules(&node);
        (!rules.contains(&server_rule)).then_some(rules)
    });
    assert!(
        rules.contains(&client_rule),
        "the whole chain was not written again: {rules}"
    );
    let log = node.agent_log();
    assert!(log.contains("changed behind our back"), "{log}");
    assert!(
        rules.contains("-A POSTROUTING -j INTERCEPTOR_PROBES"),
        "{rules}"
    );
    let status = node.stop_agent();
    assert!(status.success(), "{status}");
    let rules = probe_rules(&node);
    assert!(!rules.contains("INTERCEPTOR_PROBES"), "{rules}");
}

/// The node's chain outlives an agent stopped with `--on-exit keep`, so the pods' probes
/// keep their address while the next agent adopts them; that agent takes the rules over
/// without doubling them, and `interceptor cleanup`, run in the node's netns as it is on
/// a node, removes the chain. The chain is the same in both modes: eBPF mode here.
#[test]
fn a_kept_chain_passes_to_the_next_agent_and_cleanup_removes_it() {
    if !common::privileged() {
        return;
    }
    let args = Mode::Ebpf.args(&["--on-exit", "keep"]);
    let mut node = Node::start("probekeep", &args);
    let server = node.pod("demo", "server");
    let server_rule = format!("-A INTERCEPTOR_PROBES -d {}/32", server.ip);
    // Written off the ADD's path: it lands after the ADD has answered.
    wait_for("the server's probe rule", || {
        probe_rules(&node).contains(&server_rule).then_some(())
    });
    let status = node.stop_agent();
    assert!(status.success(), "{status}");
    let rules = probe_rules(&node);
    assert!(rules.contains(&server_rule), "kept: {rules}");

    let manifests = node.manifests.clone();
    node.agent = Some(
        node.tb
            .start_agent(&manifests, &args)
            .expect("second agent"),
    );
    wait_for("the pod adopted", || {
        node.config_dump()["pods"]
            .as_array()
            .is_some_and(|pods| !pods.is_empty())
            .then_some(())
    });
    let rules = probe_rules(&node);
    assert_eq!(rules.matches(&server_rule).count(), 1, "{rules}");
    assert_eq!(
        rules.matches("-j INTERCEPTOR_PROBES").count(),
        1,
        "one jump: {rules}"
    );
    let status = node.stop_agent();
    assert!(status.success(), "{status}");

    let mut cleanup = std::process::Command::new(interceptor_testbed::bin_path("interceptor"));
    cleanup
        .arg("cleanup")
        .arg("--bpffs")
        .arg(node.tb.bpffs_dir())
        .arg("--state-dir")
        .arg(node.tb.agent_state_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = node
        .tb
        .spawn_in(node.tb.node_netns(), false, cleanup)
        .expect("interceptor cleanup")
        .wait_with_output()
        .expect("cleanup ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("chain INTERCEPTOR_PROBES"), "{stdout}");
    let rules = probe_rules(&node);
    assert!(!rules.contains("INTERCEPTOR_PROBES"), "{rules}");
}
