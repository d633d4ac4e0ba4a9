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

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use interceptor_testbed::{AgentProcess, Testbed, CLUSTER_POD_CIDR};
use serde_json::{json, Value};

const NETWORK: &str = "itb-podman";
const BRIDGE: &str = "pdm0";
const SUBNET: &str = "10.244.250.0/24";
const CONTAINER_NS: &str = "podman-demo";
/// The container's name, which podman sends as `K8S_POD_NAME`.
const CONTAINER_NAME: &str = "client";
const SERVER_NS: &str = "legacy";
const SERVER_NAME: &str = "server";
const GREETING: &str = "hello-from-server";
const PAYLOAD: &str = "hello-from-podman";
const PODMAN_TIMEOUT: Duration = Duration::from_secs(90);

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: podman-demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: podman-demo, labels: {app: client}}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: legacy, labels: {app: echo}}
spec:
  containers: [{name: main, image: busybox}]
"#;

/// The first existing file among `candidates`, else `name` found in `$PATH`.
fn find_binary(name: &str, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(name))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file())
}

/// Mount points of the cgroup v1 hierarchies (none on a pure cgroup v2 host).
fn cgroup_v1_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (front, back) = line.split_once(" - ")?;
            if back.split_whitespace().next()? != "cgroup" {
                return None;
            }
            Some(PathBuf::from(front.split_whitespace().nth(4)?))
        })
        .collect()
}

/// Removes the cgroup directory `dir` and everything below it, children first.
fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            rmdir_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

struct PodmanOutput {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for PodmanOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// podman confined to a directory of the testbed's state dir, run in node a's netns and
/// cgroup. Dropping it removes every container and the v1 cgroup dirs podman made.
struct Podman<'a> {
    tb: &'a Testbed,
    bin: PathBuf,
    dir: PathBuf,
    /// `/interceptor-tb-<id>/podman`, relative to the cgroup roots.
    cgroup_parent: String,
    rootfs: PathBuf,
    runs: AtomicU32,
}

impl<'a> Podman<'a> {
    fn new(tb: &'a Testbed) -> Podman<'a> {
        let podman = find_binary("podman", &["/usr/bin/podman"]).expect(
            "podman not found: install it (`cargo xtask setup`, or apt-get install podman)",
        );
        let runc = find_binary("runc", &["/usr/sbin/runc", "/usr/bin/runc"])
            .expect("runc not found: install it (`cargo xtask setup`, or apt-get install runc)");
        let busybox = find_binary("busybox", &["/bin/busybox", "/usr/bin/busybox"])
            .expect("busybox not found: install busybox-static (`cargo xtask setup`)");
        eprintln!(
            "using {}, {}, {}",
            podman.display(),
            runc.display(),
            busybox.display()
        );

        let dir = tb.state_dir().join("podman");
        let rootfs = dir.join("rootfs");
        let bin = rootfs.join("bin");
        fs::create_dir_all(&bin).expect("rootfs/bin");
        for d in ["proc", "sys", "dev", "etc", "tmp"] {
            fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
        }
        fs::copy(&busybox, bin.join("busybox")).expect("copy busybox");
        for applet in ["sh", "nc", "echo", "sleep", "grep", "cat", "timeout"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }

        // "runc" resolves to this wrapper everywhere (podman, and the cleanup command
        // conmon runs), so runc's state goes to the state dir instead of /run/runc.
        let wrapper_dir = dir.join("runtime");
        fs::create_dir_all(&wrapper_dir).expect("runtime dir");
        let wrapper = wrapper_dir.join("runc");
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec {} --root {} \"$@\"\n",
                runc.display(),
                dir.join("runc-state").display()
            ),
        )
        .expect("runc wrapper");
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
                .expect("chmod wrapper");
        }

        let net_dir = dir.join("net.d");
        fs::create_dir_all(&net_dir).expect("net.d");
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "subnet": SUBNET,
                        "routes": [{"dst": CLUSTER_POD_CIDR}],
                        "dataDir": dir.join("ipam"),
                    },
                },
                {
                    "type": "interceptor-cni",
                    "agentSocket": tb.agent_socket(),
                    "failurePolicy": "fail-closed",
                },
            ],
        });
        fs::write(
            net_dir.join(format!("{NETWORK}.conflist")),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .expect("conflist");

        let tmp = dir.join("tmp");
        fs::create_dir_all(&tmp).expect("tmp dir");
        // default_ulimits = []: this machine forbids raising rlimits.
        let containers_conf = format!(
            r#"[containers]
default_ulimits = []
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = [{cni_bin:?}]
network_config_dir = {net_dir:?}

[engine]
network_backend = "cni"
cgroup_manager = "cgroupfs"
lock_type = "file"
events_logger = "file"
events_logfile_path = {events:?}
tmp_dir = {tmp:?}
static_dir = {static_dir:?}
volume_path = {volumes:?}
runtime = "runc"

[engine.runtimes]
runc = [{wrapper:?}]
"#,
            cni_bin = tb.cni_bin_dir().display().to_string(),
            net_dir = net_dir.display().to_string(),
            events = tmp.join("events.log").display().to_string(),
            tmp = tmp.display().to_string(),
            static_dir = dir.join("root/libpod").display().to_string(),
            volumes = dir.join("root/volumes").display().to_string(),
            wrapper = wrapper.display().to_string(),
        );
        fs::write(dir.join("containers.conf"), containers_conf).expect("containers.conf");
        // vfs: no overlay mounts under the state dir.
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
            dir.join("root").display().to_string(),
            dir.join("runroot").display().to_string(),
        );
        fs::write(dir.join("storage.conf"), storage_conf).expect("storage.conf");

        let cgroup_name = tb
            .cgroup_path()
            .file_name()
            .expect("testbed cgroup name")
            .to_string_lossy()
            .into_owned();
        Podman {
            tb,
            bin: podman,
            cgroup_parent: format!("/{cgroup_name}/podman"),
            dir,
            rootfs,
            runs: AtomicU32::new(0),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            // Appended by podman to the CNI_ARGS it sends (K8S_POD_NAME is the name).
            .env("CNI_ARGS", format!("K8S_POD_NAMESPACE={CONTAINER_NS}"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .arg("--cni-config-dir")
            .arg(self.dir.join("net.d"))
            .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs podman in node a's netns and cgroup to completion; killed after `timeout`.
    /// Errors (rather than panics) so that `Drop` can use it while unwinding.
    fn run(&self, args: &[&str], timeout: Duration) -> Result<PodmanOutput, String> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        // Files, not pipes: conmon inherits podman's stdio and outlives it.
        let out_path = self.dir.join(format!("podman-{n}.stdout"));
        let err_path = self.dir.join(format!("podman-{n}.stderr"));
        let mut cmd = self.command(args);
        let file = |path: &Path| {
            fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))
        };
        cmd.stdout(file(&out_path)?).stderr(file(&err_path)?);
        let mut child = self
            .tb
            .spawn_in(self.tb.node_netns(), true, cmd)
            .map_err(|e| format!("spawning podman {args:?}: {e:#}"))?;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => return Err(format!("waiting for podman {args:?}: {e}")),
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "podman {args:?} did not finish within {timeout:?}; stderr:\n{}",
                    fs::read_to_string(&err_path).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(PodmanOutput {
            status,
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        })
    }

    fn run_ok(&self, args: &[&str], agent: &AgentProcess) -> PodmanOutput {
        let out = self
            .run(args, PODMAN_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log()));
        assert!(
            out.status.success(),
            "podman {args:?} failed: {out}\nagent log:\n{}",
            agent.log()
        );
        out
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        // Every container of this podman root (the test's own), with its CNI DEL.
        match self.run(&["rm", "--force", "--all", "--time", "0"], PODMAN_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("podman rm --all: {out}"),
            Err(e) => eprintln!("podman rm --all: {e}"),
        }
        // What is left below the testbed cgroup is podman's; the testbed removes the
        // cgroup2 tree, the v1 directories podman made are removed here.
        let unified = self.tb.cgroup_path().join("podman");
        let _ = fs::write(unified.join("cgroup.kill"), "1");
        let relative = self.cgroup_parent.trim_start_matches('/');
        let top = relative.split('/').next().unwrap_or(relative).to_owned();
        for mount in cgroup_v1_mounts() {
            let dir = mount.join(&top);
            if !dir.is_dir() {
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match rmdir_tree(&dir) {
                    Ok(()) => break,
                    Err(e) if Instant::now() > deadline => {
                        eprintln!("removing cgroup {}: {e}", dir.display());
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

fn config_dump(tb: &Testbed) -> Value {
    let (status, body) = tb.admin_get("/config_dump").expect("GET /config_dump");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump JSON")
}

fn pod_row(dump: &Value, pod: &str) -> Option<Value> {
    dump["pods"]
        .as_array()?
        .iter()
        .find(|p| p["pod"] == pod)
        .cloned()
}

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

    let podman = Podman::new(&tb);
    let server_addr = format!("{}:9000", server.ip);
    let script = format!(
        "grep '^0::' /proc/self/cgroup; \
         echo {PAYLOAD} | timeout 10 nc -w 5 {} 9000; \
         echo nc-exit=$?; \
         exec sleep 600",
        server.ip
    );
    let cgroup_parent = format!("--cgroup-parent={}", podman.cgroup_parent);
    let rootfs = podman.rootfs.display().to_string();
    let out = podman.run_ok(
        &[
            "run",
            "--detach",
            "--name",
            CONTAINER_NAME,
            "--network",
            NETWORK,
            "--cgroupns=host",
            &cgroup_parent,
            "--rootfs",
            &rootfs,
            "sh",
            "-c",
            &script,
        ],
        &agent,
    );
    let container_id = out.stdout.trim().to_owned();
    assert_eq!(container_id.len(), 64, "podman run printed: {out}");

    // The container's output, once nc is done.
    let deadline = Instant::now() + Duration::from_secs(30);
    let logs = loop {
        let logs = podman.run_ok(&["logs", CONTAINER_NAME], &agent);
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
        &agent,
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
    podman.run_ok(&["rm", "--force", "--time", "0", CONTAINER_NAME], &agent);
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
