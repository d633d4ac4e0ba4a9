//! Privileged tests of a testbed with a second node: node b gets its own netns, bridge,
//! pod subnet (10.244.1.0/24), conflist, cgroup and dirs, joined to node a by a veth pair
//! with routes both ways. Pods on the two nodes talk with their real addresses, an agent
//! can run on each node, and nothing is left after drop. Also `tb-pod client
//! --ip-options` (checked on the wire), `connrate` and `rr`. Not root: fails under
//! CI=true, otherwise skips with a message.
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use interceptor_testbed::{
    ip_forward, netns_path, with_netns, NodeId, Pod, Testbed, TestbedNode, GATEWAY,
};

const MIB: u64 = 1024 * 1024;

fn privileged() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged testbed tests need root, and CI=true forbids skipping them");
    }
    eprintln!("skipping privileged testbed test: not root");
    false
}

/// Node a and node b, bridge + host-local only on both.
fn two_nodes(label: &str) -> (Testbed, NodeId) {
    let mut tb = Testbed::builder(label)
        .without_interceptor_cni()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    let b = tb.add_node("b", false).expect("node b");
    (tb, b)
}

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host ip_forward")
}

/// The cgroup v2 path of a process, relative to the cgroup2 root.
fn cgroup_of(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("proc cgroup");
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_owned()
}

fn in_cgroup_of(pid: u32, node: &TestbedNode) -> bool {
    let name = node.cgroup_path().file_name().unwrap().to_str().unwrap();
    cgroup_of(pid) == format!("/{name}")
}

/// What a testbed made, to check after it is dropped.
struct Footprint {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Footprint {
    fn of(tb: &Testbed) -> Footprint {
        let mut netns: Vec<String> = tb.nodes().iter().map(|n| n.netns().to_owned()).collect();
        netns.extend(tb.pods().iter().map(|p| p.netns.clone()));
        let mut dirs = vec![tb.state_dir().to_owned()];
        for n in tb.nodes() {
            dirs.extend([
                n.cgroup_path().to_owned(),
                n.bpffs_dir().to_owned(),
                n.state_dir().to_owned(),
            ]);
        }
        Footprint { netns, dirs }
    }

    fn assert_gone(&self) {
        for n in &self.netns {
            assert!(!netns_path(n).exists(), "netns {n} left behind");
        }
        for d in &self.dirs {
            assert!(!d.exists(), "{} left behind", d.display());
        }
    }
}

#[test]
fn pods_on_two_nodes_exchange_a_mebibyte_with_real_addresses() {
    if !privileged() {
        return;
    }
    let host_forward = host_ip_forward();
    let footprint;
    {
        let (mut tb, b) = two_nodes("two-nodes");
        assert_eq!(b.index(), 1);
        assert_eq!(tb.nodes().len(), 2);
        let (na, nb) = (tb.node(NodeId::A), tb.node(b));
        assert_eq!(na.netns(), tb.node_netns());
        assert_eq!(na.cgroup_path(), tb.cgroup_path());
        assert_eq!(nb.name(), "b");
        assert_eq!(nb.netns(), format!("itb-{}-node-b", tb.id()));
        assert_eq!(
            nb.cgroup_path(),
            tb.cgroup_path()
                .parent()
                .unwrap()
                .join(format!("interceptor-tb-{}-b", tb.id()))
        );
        assert!(nb.cgroup_path().is_dir());
        assert_eq!(
            nb.bpffs_dir(),
            Path::new(&format!("/sys/fs/bpf/interceptor-tb-{}-b", tb.id()))
        );
        assert_eq!(nb.state_dir(), tb.state_dir().join("nodes/b"));
        assert_eq!(nb.pod_subnet(), "10.244.1.0/24");
        assert_eq!(nb.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(na.gateway(), GATEWAY);
        assert_eq!(nb.plugin_types(), ["bridge"]);
        assert_eq!(tb.plugin_types(), ["bridge"]);
        assert_eq!(
            nb.conflist()["plugins"][0]["ipam"]["subnet"],
            "10.244.1.0/24"
        );
        assert_eq!(
            tb.conflist()["plugins"][0]["ipam"]["subnet"],
            "10.244.0.0/24"
        );
        assert!(nb.conflist_path().is_file());

        // Forwarding on in both node netns, and the host's setting untouched.
        assert!(ip_forward(na.netns()).unwrap());
        assert!(ip_forward(nb.netns()).unwrap());
        assert_eq!(host_ip_forward(), host_forward);

        let routes_a = ip_output(&["-4", "-n", na.netns(), "route", "show"]);
        let routes_b = ip_output(&["-4", "-n", nb.netns(), "route", "show"]);
        assert!(
            routes_a.contains("10.244.1.0/24 via 192.168.255.6 dev itbl1"),
            "{routes_a}"
        );
        assert!(
            routes_b.contains("10.244.0.0/24 via 192.168.255.5 dev itbl0"),
            "{routes_b}"
        );
        for routes in [&routes_a, &routes_b] {
            assert!(!routes.contains("default"), "no way out: {routes}");
        }

        let server_pod = tb.add_pod("default", "server").expect("server pod on a");
        let client_pod = tb
            .add_pod_on(b, "default", "client")
            .expect("client pod on b");
        assert_eq!(server_pod.node, NodeId::A);
        assert_eq!(client_pod.node, b);
        assert_eq!(server_pod.ip.octets()[..3], [10, 244, 0]);
        assert_eq!(client_pod.ip.octets()[..3], [10, 244, 1]);
        // The first ADD on node b made its bridge, with b's gateway address.
        let routes_b = ip_output(&["-4", "-n", tb.node(b).netns(), "route", "show"]);
        assert!(routes_b.contains("10.244.1.0/24 dev itb0"), "{routes_b}");

        let server = tb
            .spawn_server(
                &server_pod,
                &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-a"],
            )
            .expect("echo server on a");
        assert!(in_cgroup_of(server.pid(), tb.node(NodeId::A)));
        let target = format!("{}:9000", server_pod.ip);
        let report = tb
            .run_client(
                &client_pod,
                &[
                    "--connect",
                    &target,
                    "--send-bytes",
                    &MIB.to_string(),
                    "--seed",
                    "7",
                    "--expect-greeting",
                ],
            )
            .expect("client on b");
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(report.greeting.as_deref(), Some("hello-a"));
        assert_eq!((report.sent, report.received), (MIB, MIB));
        assert_eq!(report.sent_sha256, report.received_sha256);
        assert!(report.echoed_all());
        assert!(!report.ip_options);
        assert_eq!(report.local_ip(), Some(IpAddr::V4(client_pod.ip)));
        // No NAT anywhere: the server on node a sees the client's pod address on node b.
        let accepts = server
            .wait_for_events("accept", 1, Duration::from_secs(5))
            .expect("accept");
        assert_eq!(accepts[0]["peer"], report.local.clone().unwrap().as_str());
        let closes = server
            .wait_for_events("close", 1, Duration::from_secs(5))
            .expect("close");
        assert_eq!(closes[0]["bytes"], MIB);

        // The other way round, with the server in node b's cgroup.
        let server_b = tb
            .spawn_server(&client_pod, &["echo", "--listen", "0.0.0.0:9001"])
            .expect("echo server on b");
        assert!(in_cgroup_of(server_b.pid(), tb.node(b)));
        let back = tb
            .run_client(
                &server_pod,
                &[
                    "--connect",
                    &format!("{}:9001", client_pod.ip),
                    "--send-bytes",
                    "10000",
                ],
            )
            .expect("client on a");
        assert!(back.echoed_all(), "{back:?}");
        let accepts = server_b
            .wait_for_events("accept", 1, Duration::from_secs(5))
            .expect("accept on b");
        assert_eq!(accepts[0]["peer"], back.local.clone().unwrap().as_str());

        // DEL goes through node b's chain: its host-local reservation is released.
        let reservation = tb
            .node(b)
            .state_dir()
            .join("ipam/itb")
            .join(client_pod.ip.to_string());
        assert!(reservation.exists(), "{}", reservation.display());
        drop(server_b);
        tb.del_pod(&client_pod).expect("del client pod on b");
        assert!(!reservation.exists());
        assert!(!client_pod.netns_path.exists());
        // A new pod on b gets node b's subnet again; left for Drop with the server pod.
        let again = tb.add_pod_on(b, "default", "again").expect("pod on b");
        assert_eq!(again.ip.octets()[..3], [10, 244, 1]);
        footprint = Footprint::of(&tb);
        assert_eq!(footprint.netns.len(), 4, "{:?}", footprint.netns);
    }
    footprint.assert_gone();
    assert_eq!(host_ip_forward(), host_forward);
}

/// IPv4 TCP packets seen by an AF_PACKET socket in a pod netns, read on a thread until
/// [`Capture::finish`].
struct Capture {
    stop: Arc<AtomicBool>,
    reader: std::thread::JoinHandle<Vec<Vec<u8>>>,
}

impl Capture {
    /// Every IPv4 packet in or out of `pod`'s interfaces (cooked: IP header first).
    fn start(pod: &Pod) -> Capture {
        use rustix::net::{eth, socket, sockopt, AddressFamily, SocketType};
        let fd: OwnedFd = with_netns(&pod.netns, || {
            Ok(socket(
                AddressFamily::PACKET,
                SocketType::DGRAM,
                Some(eth::IP),
            )?)
        })
        .expect("AF_PACKET socket in the pod netns");
        sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut packets = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !flag.load(Ordering::Relaxed) {
                match rustix::net::recv(&fd, &mut buf[..], rustix::net::RecvFlags::empty()) {
                    Ok((n, _)) => packets.push(buf[..n].to_vec()),
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => panic!("recv on the capture socket: {e}"),
                }
            }
            packets
        });
        Capture { stop, reader }
    }

    /// Stops reading; returns the TCP packets to `dst` (IP header first).
    fn finish(self, dst: std::net::SocketAddrV4) -> Vec<Vec<u8>> {
        // Let the last packets of the exchange arrive.
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        let packets = self.reader.join().expect("capture thread");
        packets
            .into_iter()
            .filter(|p| {
                if p.len() < 20 || p[0] >> 4 != 4 || p[9] != 6 {
                    return false;
                }
                let ihl = usize::from(p[0] & 0x0f) * 4;
                p.len() >= ihl + 4
                    && p[16..20] == dst.ip().octets()
                    && u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]) == dst.port()
            })
            .collect()
    }
}

/// (IHL, the option bytes) of each packet.
fn ihls(packets: &[Vec<u8>]) -> Vec<(u8, Vec<u8>)> {
    packets
        .iter()
        .map(|p| {
            let ihl = p[0] & 0x0f;
            (ihl, p[20..usize::from(ihl) * 4].to_vec())
        })
        .collect()
}

#[test]
fn ip_options_are_on_every_packet_and_survive_the_route_between_nodes() {
    if !privileged() {
        return;
    }
    let (mut tb, b) = two_nodes("two-nodes-ipopt");
    let server_pod = tb.add_pod("default", "server").expect("server pod on a");
    let client_pod = tb.add_pod_on(b, "default", "client").expect("client on b");
    let _server = tb
        .spawn_server(&server_pod, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let dst = std::net::SocketAddrV4::new(server_pod.ip, 9000);

    for with_options in [true, false] {
        let capture = Capture::start(&server_pod);
        let mut args = vec!["--connect", "", "--send-bytes", "100000"];
        let target = dst.to_string();
        args[1] = &target;
        if with_options {
            args.push("--ip-options");
        }
        let report = tb.run_client(&client_pod, &args).expect("client");
        assert!(report.echoed_all(), "{report:?}");
        assert_eq!(report.ip_options, with_options);
        let packets = capture.finish(dst);
        let seen = ihls(&packets);
        // SYN, the handshake's ACK, data and the FIN at least.
        assert!(seen.len() >= 4, "captured {} packets to {dst}", seen.len());
        let syns = packets
            .iter()
            .filter(|p| p[usize::from(p[0] & 0x0f) * 4 + 13] & 0x02 != 0)
            .count();
        assert_eq!(syns, 1, "one SYN among {} packets", seen.len());
        let expected = if with_options {
            (6, vec![1, 1, 1, 0])
        } else {
            (5, vec![])
        };
        assert!(
            seen.iter().all(|s| *s == expected),
            "with_options={with_options}: expected {expected:?} on all {} packets, saw {:?}",
            seen.len(),
            seen.iter()
                .filter(|s| **s != expected)
                .take(5)
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn connrate_and_rr_run_against_an_echo_server_on_the_other_node() {
    if !privileged() {
        return;
    }
    let (mut tb, b) = two_nodes("two-nodes-tools");
    let server_pod = tb.add_pod("default", "server").expect("server pod on a");
    let client_pod = tb.add_pod_on(b, "default", "client").expect("client on b");
    let server = tb
        .spawn_server(&server_pod, &["echo", "--listen", "0.0.0.0:9000"])
        .expect("echo server");
    let target = format!("{}:9000", server_pod.ip);
    let timeout = Duration::from_secs(30);

    let rate = tb
        .run_tb_pod(
            &client_pod,
            &[
                "connrate",
                "--connect",
                &target,
                "--duration-ms",
                "500",
                "--concurrency",
                "2",
            ],
            timeout,
        )
        .expect("connrate");
    let connections = rate["connections"].as_u64().expect("connections");
    assert!(connections >= 10, "{rate}");
    assert_eq!(rate["errors"], 0, "{rate}");
    assert!(rate["per_second"].as_f64().unwrap() > 0.0, "{rate}");
    assert!(rate["elapsed_ms"].as_u64().unwrap() >= 500, "{rate}");
    server
        .wait_for_events("close", 5, Duration::from_secs(5))
        .expect("the server saw the connections");

    let rr = tb
        .run_tb_pod(
            &client_pod,
            &[
                "rr",
                "--connect",
                &target,
                "--size",
                "64",
                "--duration-ms",
                "500",
            ],
            timeout,
        )
        .expect("rr");
    assert_eq!(rr["error"], serde_json::Value::Null, "{rr}");
    let round_trips = rr["round_trips"].as_u64().expect("round_trips");
    assert!(round_trips >= 10, "{rr}");
    let (p50, p99, mean) = (
        rr["p50_us"].as_f64().unwrap(),
        rr["p99_us"].as_f64().unwrap(),
        rr["mean_us"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= p99 && mean > 0.0, "{rr}");

    // Errors are counted, not fatal: nothing listens on 9999.
    let refused = tb
        .run_tb_pod(
            &client_pod,
            &[
                "connrate",
                "--connect",
                &format!("{}:9999", server_pod.ip),
                "--duration-ms",
                "100",
            ],
            timeout,
        )
        .expect("connrate against a closed port");
    assert_eq!(refused["connections"], 0, "{refused}");
    assert!(refused["errors"].as_u64().unwrap() >= 1, "{refused}");
    assert_eq!(refused["first_error"], "connection refused", "{refused}");
}

#[test]
fn an_agent_runs_on_each_node_with_its_own_cgroup_socket_and_pins() {
    if !privileged() {
        return;
    }
    let footprint;
    {
        let mut tb = Testbed::builder("two-nodes-agents")
            .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
            .build()
            .expect("testbed");
        let b = tb.add_node("b", true).expect("node b with interceptor-cni");
        assert_eq!(
            tb.node(b).plugin_types(),
            ["bridge", "interceptor-cni"],
            "{}",
            tb.node(b).conflist()
        );
        assert_eq!(
            tb.node(b).conflist()["plugins"][1]["agentSocket"],
            tb.node(b).agent_socket().display().to_string()
        );
        assert_ne!(tb.node(b).agent_socket(), tb.agent_socket());
        let manifests = tb.state_dir().join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        std::fs::write(manifests.join("mesh.yaml"), common::MANIFESTS).unwrap();

        let agent_a = tb.start_agent(&manifests, &[]).expect("agent on a");
        let agent_b = tb.start_agent_on(b, &manifests, &[]).expect("agent on b");
        assert!(in_cgroup_of(agent_a.pid(), tb.node(NodeId::A)));
        assert!(in_cgroup_of(agent_b.pid(), tb.node(b)));
        assert_eq!(agent_b.log_path(), tb.node(b).agent_log_path());
        for node in [NodeId::A, b] {
            let (code, _) = tb.admin_get_on(node, "/readyz").expect("readyz");
            assert_eq!(code, 200);
            assert!(tb.node(node).agent_socket().exists());
            assert!(tb.node(node).bpffs_dir().is_dir());
        }

        // Each pod's ADD went through its own node's interceptor-cni and agent.
        let server = tb.add_pod("demo", "server").expect("server on a");
        let client = tb.add_pod_on(b, "demo", "client").expect("client on b");
        let rows = |node: NodeId| -> Vec<String> {
            let (code, body) = tb.admin_get_on(node, "/config_dump").expect("dump");
            assert_eq!(code, 200, "{body}");
            let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
            dump["pods"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|p| p["netns_cookie"].as_u64().is_some())
                .map(|p| p["pod"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        assert_eq!(rows(NodeId::A), ["demo/server"]);
        assert_eq!(rows(b), ["demo/client"]);
        assert_eq!(server.node, NodeId::A);
        assert_eq!(client.node, b);
        footprint = Footprint::of(&tb);
        // The agents are left running for Drop.
        drop((agent_a, agent_b));
    }
    footprint.assert_gone();
}

#[test]
fn leftovers_of_a_dead_runs_extra_node_are_removed() {
    if !privileged() {
        return;
    }
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();

    let cg_root = {
        let (tb, _) = two_nodes("two-nodes-probe");
        tb.cgroup_path().parent().unwrap().to_owned()
    };
    let id = format!("{dead}-0");
    let netns = format!("itb-{id}-node-b");
    let cgroup = cg_root.join(format!("interceptor-tb-{id}-b"));
    let bpffs = Path::new("/sys/fs/bpf").join(format!("interceptor-tb-{id}-b"));
    let state = Path::new("/run/interceptor-tb").join(&id);
    // Holding the testbed lock keeps other tests' leftover sweeps from racing this setup.
    let lock = std::fs::File::open("/run/interceptor-tb/.lock").unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    ip_output(&["netns", "add", &netns]);
    std::fs::create_dir(&cgroup).unwrap();
    std::fs::create_dir_all(state.join("nodes/b/agent")).unwrap();
    std::fs::create_dir_all(&bpffs).unwrap();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    drop(lock);

    let _tb = two_nodes("two-nodes-leftovers");
    assert!(!netns_path(&netns).exists(), "leftover netns survived");
    assert!(!cgroup.exists(), "leftover node cgroup survived");
    assert!(!bpffs.exists(), "leftover node bpffs dir survived");
    assert!(!state.exists(), "leftover state dir survived");
    assert!(!sleeper.wait().unwrap().success());
}

#[test]
fn a_third_node_reaches_node_b_through_node_a() {
    if !privileged() {
        return;
    }
    let footprint;
    {
        let (mut tb, b) = two_nodes("three-nodes");
        let c = tb.add_node("c", false).expect("node c");
        assert_eq!(c.index(), 2);
        assert!(tb.add_node("c", false).is_err(), "names are unique");
        assert!(tb.add_node("a", false).is_err(), "a is taken");
        assert!(tb.add_node("Bad/Name", false).is_err());
        assert_eq!(tb.nodes().len(), 3, "failed adds leave no node behind");
        let routes_b = ip_output(&["-4", "-n", tb.node(b).netns(), "route", "show"]);
        assert!(
            routes_b.contains("10.244.2.0/24 via 192.168.255.5 dev itbl0"),
            "{routes_b}"
        );
        let server_pod = tb.add_pod_on(b, "default", "server").expect("pod on b");
        let client_pod = tb.add_pod_on(c, "default", "client").expect("pod on c");
        assert_eq!(client_pod.ip.octets()[..3], [10, 244, 2]);
        let _server = tb
            .spawn_server(&server_pod, &["echo", "--listen", "0.0.0.0:9000"])
            .expect("echo server on b");
        let report = tb
            .run_client(
                &client_pod,
                &[
                    "--connect",
                    &format!("{}:9000", server_pod.ip),
                    "--send-bytes",
                    "100000",
                ],
            )
            .expect("client on c");
        assert!(report.echoed_all(), "{report:?}");
        assert_eq!(report.local_ip(), Some(IpAddr::V4(client_pod.ip)));
        footprint = Footprint::of(&tb);
    }
    footprint.assert_gone();
}

/// A dual-stack testbed: every pod gets an IPv4 and an IPv6 address (host-local with two
/// ranges), the same node and the other node answer over both families, each node routes
/// the other's IPv6 pod subnet, and the IPv6 addresses are usable at once (no DAD).
#[test]
fn dual_stack_pods_talk_over_both_families_on_one_node_and_across_nodes() {
    if !privileged() {
        return;
    }
    let mut tb = Testbed::builder("dualstack")
        .without_interceptor_cni()
        .dual_stack()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("dual-stack testbed");
    let b = tb.add_node("b", false).expect("node b");
    let server = tb.add_pod("demo", "server").expect("server on a");
    let near = tb.add_pod("demo", "near").expect("client on a");
    let far = tb.add_pod_on(b, "demo", "far").expect("client on b");
    let v6 = |pod: &Pod| {
        pod.ipv6
            .unwrap_or_else(|| panic!("{} has no IPv6", pod.name))
    };
    assert_eq!(v6(&server).segments()[..4], [0xfd00, 0x10, 0x244, 0]);
    assert_eq!(v6(&far).segments()[..4], [0xfd00, 0x10, 0x244, 1]);
    assert_eq!(
        tb.node(b).gateway6(),
        Some("fd00:10:244:1::1".parse().unwrap())
    );
    let routes6 = ip_output(&["-6", "-n", tb.node(b).netns(), "route", "show"]);
    assert!(
        routes6.contains("fd00:10:244::/64 via fd00:ffff:1::1"),
        "{routes6}"
    );

    let _echo = tb
        .spawn_server(
            &server,
            &["echo", "--listen", "[::]:9000", "--greeting", "hello-6"],
        )
        .expect("echo server on [::]");
    for client in [&near, &far] {
        for target in [
            format!("[{}]:9000", v6(&server)),
            format!("{}:9000", server.ip),
        ] {
            let report = tb
                .run_client(
                    client,
                    &[
                        "--connect",
                        &target,
                        "--send-bytes",
                        "4096",
                        "--expect-greeting",
                    ],
                )
                .expect("client");
            assert_eq!(
                report.error, None,
                "{} -> {target}: {report:?}",
                client.name
            );
            assert_eq!(report.greeting.as_deref(), Some("hello-6"));
            assert_eq!(report.received, 4096);
            let family_ok = match target.starts_with('[') {
                true => report
                    .local
                    .as_deref()
                    .is_some_and(|l| l.starts_with("[fd00:10:244:")),
                false => report
                    .local
                    .as_deref()
                    .is_some_and(|l| l.starts_with("10.244.")),
            };
            assert!(family_ok, "{} -> {target}: {report:?}", client.name);
        }
    }
}
