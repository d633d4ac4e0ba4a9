//! A real CNI client end to end: podman 4.3 (CNI network backend) creates a container on
//! a network whose conflist chains `interceptor-cni` after `bridge` + `host-local`, and
//! the container's outbound connection is intercepted by the agent.
//!
//! How podman is kept inside the testbed:
//! - podman runs in node a's netns and cgroup (`spawn_in`), so `bridge` makes its bridge
//!   `pdm0` there, next to the testbed's `itb0`; the node netns has no route out.
//! - Its storage (`vfs`, no mounts), run dir, tmp dir, locks (`lock_type = "file"`), events
//!   log, runc state (a `runc` wrapper with `--root`), CNI config dir and IPAM data all
//!   live under `<state>/podman` (`CONTAINERS_CONF` and `CONTAINERS_STORAGE_CONF` point at
//!   files written there). The plugins come from the testbed's CNI_PATH.
//! - `--cgroup-parent=/<testbed cgroup>/podman --cgroupns=host` puts the container below
//!   the testbed cgroup (where the agent's programs are attached); runc refuses
//!   `--cgroups=disabled`. On hybrid hosts podman's cgroupfs manager also makes that path
//!   in the v1 hierarchies; the test removes those directories again.
//! - Outside the state dir, while the container exists (podman 4.3 offers root no option
//!   to move them; `podman rm` removes both): the container netns
//!   `/run/netns/netns-<uuid>` and libcni's result cache
//!   `/var/lib/cni/results/<net>-<id>-eth0`.
//!
//! Pod identity: podman sends `CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>`
//! and appends whatever `CNI_ARGS` it finds in its own environment (also for the DEL that
//! `podman rm` or conmon's cleanup runs), so the test sets `CNI_ARGS=K8S_POD_NAMESPACE=..`
//! and names the container after the Pod in the manifests.
//!
//! The podman network is `10.244.250.0/24`, inside the testbed's cluster pod CIDR
//! (`10.244.0.0/16`): testbed pods route only that CIDR (via `10.244.0.1`), so the server's
//! answers reach the container through the node netns without extra routes.
mod common;
#[path = "common/podman.rs"]
mod podman;

use std::fs;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use interceptor_testbed::Testbed;
use podman::*;

#[test]
fn podman_container_on_a_cni_network_is_intercepted() {
    if !common::privileged() {
        return;
    }
    let mut tb = Testbed::builder("podman")
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    let manifests = tb.state_dir().join("manifests");
    fs::create_dir_all(&manifests).expect("manifests dir");
    fs::write(manifests.join("mesh.yaml"), MANIFESTS).expect("manifests");
    let agent = tb.start_agent(&manifests, &[]).expect("agent starts");
    let server = tb
        .add_pod(SERVER_NS, SERVER_NAME)
        .unwrap_or_else(|e| panic!("server pod: {e:#}\nagent log:\n{}", agent.log()));
    let echo = tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", GREETING],
        )
        .expect("echo server");

    let podman = Podman::new(&tb, NetworkSetup::CHAINED);
    let server_addr = format!("{}:9000", server.ip);
    let script = format!(
        "grep '^0::' /proc/self/cgroup; \
         echo {PAYLOAD} | timeout 10 nc -w 5 {} 9000; \
         echo nc-exit=$?; \
         exec sleep 600",
        server.ip
    );
    let out = podman.run_client(&["sh", "-c", &script], &|| agent.log());
    let container_id = out.stdout.trim().to_owned();
    assert_eq!(container_id.len(), 64, "podman run printed: {out}");

    // The container's output, once nc is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = podman.run_ok(&["logs", CONTAINER_NAME], &|| agent.log());
        if logs.stdout.contains("nc-exit=") {
            break logs.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not finish nc: {logs}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("container output:\n{logs}");
    assert!(
        logs.contains(GREETING) && logs.contains(PAYLOAD) && logs.contains("nc-exit=0"),
        "the container did not get the greeting and its echo: {logs}\nagent log:\n{}",
        agent.log()
    );

    // The container runs below the testbed cgroup, where the programs are attached.
    let cgroup_prefix = format!("0::{}/", podman.cgroup_parent);
    assert!(
        logs.lines().any(|l| l.starts_with(&cgroup_prefix)),
        "container not below {}: {logs}",
        podman.cgroup_parent
    );
    let inspect = podman.run_ok(
        &["inspect", "--format", "{{.State.Pid}}", CONTAINER_NAME],
        &|| agent.log(),
    );
    let pid: u32 = inspect.stdout.trim().parse().expect("container pid");
    let host_view = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of pid");
    assert!(
        host_view.lines().any(|l| l.starts_with(&cgroup_prefix)),
        "container process {pid} not below {}: {host_view}",
        podman.cgroup_parent
    );

    // The agent learnt the container from podman's CNI ADD, and enrolled it.
    let dump = config_dump(&tb);
    let pod_key = format!("{CONTAINER_NS}/{CONTAINER_NAME}");
    let row = pod_row(&dump, &pod_key)
        .unwrap_or_else(|| panic!("no {pod_key} in /config_dump: {}", dump["pods"]));
    assert_eq!(row["enrolled"], true, "{row}");
    assert_eq!(row["container_id"], container_id.as_str(), "{row}");
    assert!(row["netns_cookie"].as_u64().is_some(), "{row}");
    let netns = row["netns"].as_str().expect("netns path");
    assert!(
        netns.starts_with("/run/netns/netns-"),
        "not podman's netns: {row}"
    );
    let ip: Ipv4Addr = row["ip"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no ip in {row}"));
    assert!(
        ip.octets()[..3] == [10, 244, 250],
        "{ip} is not on {SUBNET}"
    );
    let server_row = pod_row(&dump, &format!("{SERVER_NS}/{SERVER_NAME}")).expect("server row");
    assert_eq!(server_row["enrolled"], false, "{server_row}");

    // The proxy in the container's netns took the connection and passed it through to
    // where nc was going.
    let record = dump["connections"]
        .as_array()
        .and_then(|records| {
            records
                .iter()
                .find(|r| {
                    r["direction"] == "outbound"
                        && r["client"]
                            .as_str()
                            .is_some_and(|c| c.starts_with(&format!("{ip}:")))
                })
                .cloned()
        })
        .unwrap_or_else(|| {
            panic!(
                "no outbound record from {ip}: {}\nagent log:\n{}",
                dump["connections"],
                agent.log()
            )
        });
    assert_eq!(record["pod"], pod_key.as_str(), "{record}");
    assert_eq!(record["original_dst"], server_addr.as_str(), "{record}");
    assert_eq!(record["target"]["kind"], "passthrough", "{record}");
    assert_eq!(record["target"]["addr"], server_addr.as_str(), "{record}");
    assert!(
        dump["datapath_counters"]["redirected"].as_u64() >= Some(1),
        "{}",
        dump["datapath_counters"]
    );
    assert!(
        dump["datapath_counters"]["orig_dst_answered"].as_u64() >= Some(1),
        "{}",
        dump["datapath_counters"]
    );
    // The server saw the proxy's socket, from the container's address.
    let accepts = echo
        .wait_for_events("accept", 1, Duration::from_secs(5))
        .expect("accept event");
    let peer = accepts[0]["peer"].as_str().expect("peer");
    assert!(peer.starts_with(&format!("{ip}:")), "server saw {peer}");
    assert_ne!(
        Some(peer),
        record["client"].as_str(),
        "the server saw nc's own socket, not the proxy's"
    );

    // The bridge plugin ran in the node netns and turned forwarding on there.
    assert!(interceptor_testbed::ip_forward(tb.node_netns()).expect("ip_forward"));
    let addrs = Command::new("ip")
        .args([
            "-n",
            tb.node_netns(),
            "-4",
            "-brief",
            "addr",
            "show",
            "dev",
            BRIDGE,
        ])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        addrs.contains("10.244.250.1/24"),
        "{BRIDGE} with the gateway address is not in the node netns: {addrs:?}"
    );

    // podman rm runs the chain's DEL with the same CNI_ARGS: the agent forgets the pod.
    podman.run_ok(&["rm", "--force", "--time", "0", CONTAINER_NAME], &|| {
        agent.log()
    });
    let dump = config_dump(&tb);
    assert!(
        pod_row(&dump, &pod_key).is_none(),
        "{pod_key} still listed after podman rm: {}",
        dump["pods"]
    );
    assert!(
        !Path::new(netns).exists(),
        "podman left its netns {netns} behind"
    );
    drop(podman);
    drop(agent);
}
