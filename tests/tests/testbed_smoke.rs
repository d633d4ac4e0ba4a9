//! Privileged smoke tests of the testbed itself, with a chain of bridge + host-local only
//! (no agent, no interceptor-cni): pods get addresses, talk over the bridge, and nothing
//! is left behind. Not root: fails under CI=true, otherwise skips with a message.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use interceptor_testbed::{netns_path, Testbed, POD_SUBNET};

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

fn testbed(label: &str) -> Testbed {
    Testbed::builder(label)
        .without_interceptor_cni()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed")
}

fn in_pod_subnet(ip: Ipv4Addr) -> bool {
    assert_eq!(POD_SUBNET, "10.244.0.0/24");
    ip.octets()[..3] == [10, 244, 0] && ip.octets()[3] > 1
}

/// What a testbed made, to check after it is dropped.
struct Footprint {
    netns: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Footprint {
    fn of(tb: &Testbed) -> Footprint {
        let mut netns = vec![tb.node_netns().to_owned()];
        netns.extend(tb.pods().iter().map(|p| p.netns.clone()));
        Footprint {
            netns,
            dirs: vec![
                tb.cgroup_path().to_owned(),
                tb.state_dir().to_owned(),
                tb.bpffs_dir().to_owned(),
            ],
        }
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

fn ip_output(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_pods_exchange_a_mebibyte_over_the_bridge() {
    if !privileged() {
        return;
    }
    let footprint;
    {
        let mut tb = testbed("smoke-bridge");
        assert_eq!(tb.plugin_types(), ["bridge"]);
        let server_pod = tb.add_pod("default", "server").expect("add server pod");
        let client_pod = tb.add_pod("default", "client").expect("add client pod");
        assert!(in_pod_subnet(server_pod.ip), "{server_pod:?}");
        assert!(in_pod_subnet(client_pod.ip), "{client_pod:?}");
        assert_ne!(server_pod.ip, client_pod.ip);
        assert_eq!(server_pod.netns_path, netns_path(&server_pod.netns));
        assert_eq!(server_pod.container_id.len(), 64);

        // The node netns reaches the pods and nothing else.
        let routes = ip_output(&["-4", "-n", tb.node_netns(), "route", "show"]);
        assert!(routes.contains("10.244.0.0/24 dev itb0"), "{routes}");
        assert!(
            !routes.contains("default"),
            "node netns must have no way out: {routes}"
        );
        let links = ip_output(&["-n", tb.node_netns(), "-o", "link", "show"]);
        assert!(links.contains(": itb0:"), "{links}");

        let server = tb
            .spawn_server(
                &server_pod,
                &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hello-v1"],
            )
            .expect("echo server");
        assert_eq!(server.addr(), "0.0.0.0:9000");
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", server.pid())).unwrap();
        let cg_name = tb.cgroup_path().file_name().unwrap().to_str().unwrap();
        assert!(
            cgroup
                .lines()
                .any(|l| l.starts_with("0::/") && l.ends_with(cg_name)),
            "server not in the testbed cgroup: {cgroup}"
        );

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
                    "42",
                    "--half-close",
                    "--expect-greeting",
                ],
            )
            .expect("client");
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(report.greeting.as_deref(), Some("hello-v1"));
        assert_eq!((report.sent, report.received), (MIB, MIB));
        assert_eq!(report.sent_sha256, report.received_sha256);
        assert!(report.echoed_all());
        assert_eq!(report.local_ip(), Some(IpAddr::V4(client_pod.ip)));
        assert_eq!(report.peer.as_deref(), Some(target.as_str()));

        let accepts = server
            .wait_for_events("accept", 1, Duration::from_secs(5))
            .expect("accept event");
        assert_eq!(accepts[0]["peer"], report.local.clone().unwrap().as_str());
        assert_eq!(accepts[0]["local"], target.as_str());
        let closes = server
            .wait_for_events("close", 1, Duration::from_secs(5))
            .expect("close event");
        assert_eq!(closes[0]["bytes"], MIB);

        // lo is up in pods, as a runtime leaves it.
        let local = tb
            .run_client(
                &server_pod,
                &[
                    "--connect",
                    "127.0.0.1:9000",
                    "--send-bytes",
                    "10",
                    "--expect-greeting",
                ],
            )
            .expect("loopback client");
        assert!(local.echoed_all(), "{local:?}");

        // The same seed gives the same bytes.
        let again = tb
            .run_client(
                &client_pod,
                &[
                    "--connect",
                    &target,
                    "--send-bytes",
                    &MIB.to_string(),
                    "--seed",
                    "42",
                    "--expect-greeting",
                ],
            )
            .expect("client again");
        assert_eq!(again.sent_sha256, report.sent_sha256);

        footprint = Footprint::of(&tb);
        tb.del_pod(&client_pod).expect("del client pod");
        assert!(!client_pod.netns_path.exists());
        tb.del_pod(&client_pod).expect("del is idempotent");
        assert_eq!(tb.pods().len(), 1);
        // The server pod and the running server are left for Drop.
    }
    footprint.assert_gone();
}

#[test]
fn clients_report_refused_reset_and_half_close() {
    if !privileged() {
        return;
    }
    let footprint;
    {
        let mut tb = testbed("smoke-errors");
        let a = tb.add_pod("default", "a").expect("pod a");
        let b = tb.add_pod("other", "b").expect("pod b");

        let refused = tb
            .run_client(
                &b,
                &["--connect", &format!("{}:9999", a.ip), "--send-bytes", "10"],
            )
            .expect("refused client");
        assert_eq!(refused.error.as_deref(), Some("connection refused"));
        assert_eq!(refused.local, None);

        let reset_server = tb
            .spawn_server(&a, &["reset-server", "--listen", "0.0.0.0:9001"])
            .expect("reset server");
        let reset = tb
            .run_client(
                &b,
                &[
                    "--connect",
                    &format!("{}:9001", a.ip),
                    "--send-bytes",
                    "100000",
                ],
            )
            .expect("reset client");
        assert_eq!(
            reset.error.as_deref(),
            Some("connection reset"),
            "{reset:?}"
        );
        reset_server
            .wait_for_events("reset", 1, Duration::from_secs(5))
            .expect("reset event");

        let _half = tb
            .spawn_server(&a, &["half-close-server", "--listen", "0.0.0.0:9002"])
            .expect("half-close server");
        let half = tb
            .run_client(
                &b,
                &[
                    "--connect",
                    &format!("{}:9002", a.ip),
                    "--send-bytes",
                    "12345",
                    "--half-close",
                ],
            )
            .expect("half-close client");
        assert_eq!(half.error, None, "{half:?}");
        assert_eq!(half.sent, 12345);
        assert_eq!(
            half.received,
            "got 12345 bytes after your FIN\n".len() as u64
        );

        // A raw plugin run with bad input: the bridge plugin's CNI error comes back.
        let out = tb
            .cni_raw(
                "ADD",
                0,
                &[("CNI_NETNS", Some("/nonexistent"))],
                b"{not json",
            )
            .expect("raw bridge run");
        assert!(!out.status.success());
        let json = out.json().expect("CNI error JSON on stdout");
        assert!(json["code"].as_u64().is_some(), "{json}");
        let version = tb.cni_raw("VERSION", 0, &[], b"").expect("bridge VERSION");
        assert!(version.status.success());
        assert!(version.json().unwrap()["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "1.0.0"));
        assert!(tb.cni_raw("ADD", 5, &[], b"{}").is_err());
        footprint = Footprint::of(&tb);
    }
    footprint.assert_gone();
}

#[test]
fn leftovers_of_dead_runs_are_removed() {
    if !privileged() {
        return;
    }
    // A pid that surely belonged to a process that is gone now.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();

    let cg_root = {
        let tb = testbed("smoke-probe");
        tb.cgroup_path().parent().unwrap().to_owned()
    };
    let id = format!("{dead}-0");
    let netns = format!("itb-{id}-node");
    let cgroup = cg_root.join(format!("interceptor-tb-{id}"));
    let state = Path::new("/run/interceptor-tb").join(&id);
    let bpffs = Path::new("/sys/fs/bpf").join(format!("interceptor-tb-{id}"));
    // Other tests in this binary build testbeds meanwhile; holding the testbed lock
    // keeps their leftover sweep from seeing this half-made leftover.
    let lock = std::fs::File::open("/run/interceptor-tb/.lock").unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    ip_output(&["netns", "add", &netns]);
    std::fs::create_dir(&cgroup).unwrap();
    std::fs::create_dir_all(state.join("agent")).unwrap();
    std::fs::create_dir_all(&bpffs).unwrap();
    // A process still in the leftover cgroup, as a killed run leaves its pods' apps.
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    drop(lock);

    let tb = testbed("smoke-leftovers");
    assert!(!netns_path(&netns).exists(), "leftover netns survived");
    assert!(!cgroup.exists(), "leftover cgroup survived");
    assert!(!state.exists(), "leftover state dir survived");
    assert!(!bpffs.exists(), "leftover bpffs dir survived");
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "the leftover process was killed");
    // Our own live testbed is not a leftover.
    assert!(tb.state_dir().exists());
}

/// A testbed with a wider pod subnet (the scale bench enrolls 1,000 pods on one node):
/// node a keeps its gateway and its first pods' addresses, and a pod past the first /24
/// talks to one inside it over the same bridge.
#[test]
fn a_wider_pod_subnet_holds_pods_past_the_first_slash_24() {
    if !privileged() {
        return;
    }
    let footprint;
    {
        let mut tb = Testbed::builder("smoke-wide")
            .without_interceptor_cni()
            .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
            .pod_subnet_prefix(22)
            .build()
            .expect("testbed");
        let node = tb.node(interceptor_testbed::NodeId::A);
        assert_eq!(node.pod_subnet(), "10.244.0.0/22");
        assert_eq!(node.gateway(), interceptor_testbed::GATEWAY);
        assert_eq!(node.pod_capacity(), 1_021);
        let first = tb.add_pod("default", "first").expect("first pod");
        assert_eq!(
            first.ip,
            Ipv4Addr::new(10, 244, 0, 2),
            "the default's first address"
        );
        // 10.244.0.2 to .255 and 10.244.1.0: the 256th pod is past the first /24.
        let mut last = first.clone();
        for k in 1..256 {
            last = tb.add_pod("default", &format!("p{k}")).expect("pod");
        }
        assert_eq!(last.ip, Ipv4Addr::new(10, 244, 1, 1), "{last:?}");
        assert_eq!(last.cni_result["ips"][0]["address"], "10.244.1.1/22");
        assert_eq!(last.cni_result["ips"][0]["gateway"], "10.244.0.1");
        let routes = ip_output(&["-4", "-n", tb.node_netns(), "route", "show"]);
        assert!(routes.contains("10.244.0.0/22 dev itb0"), "{routes}");

        let _server = tb
            .spawn_server(&first, &["echo", "--listen", "0.0.0.0:9000"])
            .expect("echo server");
        let target = format!("{}:9000", first.ip);
        let report = tb
            .run_client(&last, &["--connect", &target, "--send-bytes", "4096"])
            .expect("client");
        assert_eq!(report.error, None, "{report:?}");
        assert!(report.echoed_all(), "{report:?}");
        assert_eq!(report.local_ip(), Some(IpAddr::V4(last.ip)));
        footprint = Footprint::of(&tb);
    }
    footprint.assert_gone();
}

#[test]
fn pod_subnet_prefixes_outside_10_244_0_0_16_are_refused() {
    if !privileged() {
        return;
    }
    for prefix in [15, 25] {
        let err = Testbed::builder("smoke-badprefix")
            .without_interceptor_cni()
            .pod_subnet_prefix(prefix)
            .build()
            .expect_err("refused");
        assert!(
            format!("{err:#}").contains(&format!("/{prefix}")),
            "{err:#}"
        );
    }
}
