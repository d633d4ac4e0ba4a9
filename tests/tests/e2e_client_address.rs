//! The client's address preserved inbound (`--preserve-client-ip`, on by default): the
//! inbound proxy dials the application from the client's own address and port, and the
//! pod's return route (fwmark rule, local route, `tcp_fwmark_accept`, `fwmark_reflect`;
//! iptables mode also raw-table notrack) brings the replies back to it. The application's `tb-pod echo`
//! reports the peer it accepted and the accepted socket's mark (the SYN's: 0x1501 from
//! the proxy's transparent socket, 0x1500 from its ordinary one, 0 from anyone else).
//! Cross node and IPv6 are asserted in `e2e_cross_node` and `e2e_ipv6`; same node with
//! both pods enrolled in `e2e_outbound`.
#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    finished_record, inbound_records, wait_for, Mode, Node, ECHO_TARGET_PORT, PROXY_MARK,
    PY_EXCHANGE, TRANSPARENT_MARK,
};
use interceptor_testbed::Pod;

in_both_modes!(
    the_application_sees_the_clients_address_and_port,
    with_preserve_client_ip_false_it_sees_the_pods_own_address,
    a_taken_client_port_falls_back_to_the_pods_own_address,
    a_pod_reaches_itself_through_its_own_ip,
);

/// `ip <args>` inside the netns of the process `pid` (the pod's netns, even once its
/// name is gone).
fn ip_in(pid: u32, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("ip")
        .args(args)
        .output()
        .expect("nsenter ip");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A table no route was ever added to is not there to show: nothing in it.
    assert!(
        out.status.success() || stderr.contains("table does not exist"),
        "ip {args:?}: {out:?}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sysctl_in(pid: u32, name: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["cat", &format!("/proc/sys/{}", name.replace('.', "/"))])
        .output()
        .expect("nsenter cat");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether the pod's netns (held by `pid`) has the return route, all of it or none.
fn return_route(pid: u32) -> Option<bool> {
    let rule = ip_in(pid, &["rule", "show"]).contains("fwmark 0x1501 lookup 5377");
    let route = ip_in(pid, &["route", "show", "table", "5377"]).contains("local default dev lo");
    let sysctl = sysctl_in(pid, "net.ipv4.tcp_fwmark_accept") == "1";
    let reflect = sysctl_in(pid, "net.ipv4.fwmark_reflect") == "1";
    (rule == route && route == sysctl && sysctl == reflect).then_some(rule)
}

fn metric(node: &Node, source: &str) -> u64 {
    let (_, text) = node.tb.admin_get("/metrics").expect("GET /metrics");
    let prefix = format!("interceptor_inbound_client_address_total{{source=\"{source}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn the_application_sees_the_clients_address_and_port(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("clientip", &mode.args(&[]));
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    assert_eq!(return_route(echo.pid()), Some(true), "{}", node.agent_log());

    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let report = node
        .tb
        .run_client(&outsider, &["--connect", &target, "--send-bytes", "100000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert!(report.echoed_all(), "{report:?}");
    assert_eq!(report.peer.as_deref(), Some(target.as_str()));
    let local = report.local.clone().expect("local");
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts[0]["peer"], local.as_str(), "{}", accepts[0]);
    assert_eq!(accepts[0]["mark"], TRANSPARENT_MARK, "{}", accepts[0]);
    // It went through the proxy, which keyed it on the client it accepted.
    let record = wait_for("the inbound record", || {
        finished_record(&node, "inbound", "demo/server", &local)
    });
    assert_eq!(record["client_address"], "preserved", "{record}");
    assert_eq!(record["upstream_bytes"], 100000, "{record}");
    assert!(metric(&node, "preserved") >= 1);
    if mode == Mode::Iptables {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", echo.pid()))
            .args(["iptables-save", "-t", "raw"])
            .output()
            .expect("iptables-save");
        let raw = String::from_utf8_lossy(&out.stdout);
        assert!(
            raw.contains("-A PROXY_TRANSPARENT -m mark --mark 0x1501 -j CT --notrack"),
            "{raw}"
        );
    }

    // CNI DEL removes the return route with the rest (the echo server keeps the netns).
    let pid = echo.pid();
    node.tb.del_pod(&server).expect("DEL");
    assert_eq!(return_route(pid), Some(false), "{}", node.agent_log());
    if mode == Mode::Iptables {
        let out = Command::new("nsenter")
            .arg(format!("--net=/proc/{pid}/ns/net"))
            .args(["iptables-save", "-t", "raw"])
            .output()
            .expect("iptables-save");
        let raw = String::from_utf8_lossy(&out.stdout);
        assert!(!raw.contains("PROXY_TRANSPARENT"), "{raw}");
    }
}

fn with_preserve_client_ip_false_it_sees_the_pods_own_address(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("noclientip", &mode.args(&["--preserve-client-ip", "false"]));
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    assert_eq!(return_route(echo.pid()), Some(false));
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let report = node
        .tb
        .run_client(&outsider, &["--connect", &target, "--send-bytes", "1000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}");
    assert!(report.echoed_all());
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert!(
        accepts[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{}:", server.ip))),
        "{}",
        accepts[0]
    );
    let local = report.local.expect("local");
    let record = wait_for("the inbound record", || {
        inbound_records(&node.config_dump(), "demo/server", None)
            .into_iter()
            .find(|r| r["client"] == local.as_str())
    });
    assert!(record.get("client_address").is_none(), "{record}");
}

/// The client's port is one the application listens on in the server pod: the
/// transparent socket cannot bind it, so the proxy dials from the pod's own address
/// (its ordinary mark) and counts it. The connection works.
fn a_taken_client_port_falls_back_to_the_pods_own_address(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("clientip-fb", &mode.args(&[]));
    let server = node.pod("demo", "server");
    let outsider = node.pod("legacy", "outsider");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    let _taken = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9001"])
        .expect("echo on 9001");
    let script = format!(
        "{PY_EXCHANGE}s=socket.socket()\n\
         s.bind(('0.0.0.0',9001))\n\
         s.settimeout(5)\n\
         s.connect(('{ip}',9000))\n\
         print(json.dumps(dict(ok=exchange(s,b'taken port'))))\n",
        ip = server.ip
    );
    let report = common::python_in_pod(&node, &outsider, &script, Duration::from_secs(30));
    assert_eq!(report["ok"], true, "{report}\n{}", node.agent_log());
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(accepts[0]["mark"], PROXY_MARK, "{}", accepts[0]);
    assert!(
        accepts[0]["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with(&format!("{}:", server.ip))),
        "{}",
        accepts[0]
    );
    let client = format!("{}:9001", outsider.ip);
    let record = wait_for("the inbound record", || {
        inbound_records(&node.config_dump(), "demo/server", None)
            .into_iter()
            .find(|r| r["client"] == client.as_str())
    });
    assert_eq!(record["client_address"], "fallback", "{record}");
    assert!(metric(&node, "fallback") >= 1);
}

/// A pod dialling its own IP is not the mesh's (loopback inside the pod, in both
/// modes), and keeps working with the return route in place.
fn a_pod_reaches_itself_through_its_own_ip(mode: Mode) {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("clientip-self", &mode.args(&[]));
    let server: Pod = node.pod("demo", "server");
    let echo = node
        .tb
        .spawn_server(&server, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo");
    assert_eq!(return_route(echo.pid()), Some(true));
    let target = format!("{}:{ECHO_TARGET_PORT}", server.ip);
    let report = node
        .tb
        .run_client(&server, &["--connect", &target, "--send-bytes", "1000"])
        .expect("client");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert!(report.echoed_all());
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept");
    assert_eq!(
        accepts[0]["peer"].as_str(),
        report.local.as_deref(),
        "{}",
        accepts[0]
    );
}
