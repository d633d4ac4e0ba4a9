//! podman 4.3 (CNI network backend) confined to a testbed: its storage, run dir, locks,
//! events, runc state, CNI config dir and IPAM data under `<state>/podman`, run in node
//! a's netns and cgroup. Shared by `e2e_podman.rs` and `e2e_podman_node.rs` (see the
//! first for how podman is kept inside the testbed).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use interceptor_testbed::{Testbed, CLUSTER_POD_CIDR};
use serde_json::{json, Value};

pub const NETWORK: &str = "itb-podman";
pub const BRIDGE: &str = "pdm0";
pub const SUBNET: &str = "10.244.250.0/24";
pub const CONTAINER_NS: &str = "podman-demo";
/// The container's name, which podman sends as `K8S_POD_NAME`.
pub const CONTAINER_NAME: &str = "client";
pub const SERVER_NS: &str = "legacy";
pub const SERVER_NAME: &str = "server";
pub const GREETING: &str = "hello-from-server";
pub const PAYLOAD: &str = "hello-from-podman";
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(90);

pub const MANIFESTS: &str = r#"
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
pub fn find_binary(name: &str, candidates: &[&str]) -> Option<PathBuf> {
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
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
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
pub fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            rmdir_tree(&entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

pub struct PodmanOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
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
pub struct Podman<'a> {
    tb: &'a Testbed,
    bin: PathBuf,
    pub dir: PathBuf,
    /// `/interceptor-tb-<id>/podman`, relative to the cgroup roots.
    pub cgroup_parent: String,
    /// A busybox root filesystem for `podman run --rootfs`.
    pub rootfs: PathBuf,
    /// The network's CNI config dir (podman's `--cni-config-dir`).
    pub net_dir: PathBuf,
    /// The network's CNI plugin dir.
    pub cni_bin_dir: PathBuf,
    /// `K8S_POD_NAMESPACE` podman adds to the CNI_ARGS it sends.
    pub cni_namespace: String,
    runs: AtomicU32,
}

/// How [`Podman::new`] sets up its CNI network.
pub struct NetworkSetup {
    /// Chain `interceptor-cni` after `bridge` in the conflist (else the agent's
    /// `--install-cni` is to do it).
    pub chain_interceptor: bool,
    /// A plugin dir of the network's own (links to the testbed's `bridge` and
    /// `host-local`) instead of the testbed's CNI_PATH, for `--install-cni` to copy
    /// `interceptor-cni` into.
    pub own_cni_bin: bool,
}

impl NetworkSetup {
    /// As `e2e_podman.rs` runs it: `interceptor-cni` already chained.
    pub const CHAINED: NetworkSetup = NetworkSetup {
        chain_interceptor: true,
        own_cni_bin: false,
    };
}

impl<'a> Podman<'a> {
    pub fn new(tb: &'a Testbed, setup: NetworkSetup) -> Podman<'a> {
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
        let mut plugins = vec![json!({
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
        })];
        if setup.chain_interceptor {
            plugins.push(json!({
                "type": "interceptor-cni",
                "agentSocket": tb.agent_socket(),
                "failurePolicy": "fail-closed",
            }));
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": plugins,
        });
        let cni_bin_dir = if setup.own_cni_bin {
            let own = dir.join("cni-bin");
            fs::create_dir_all(&own).expect("cni-bin dir");
            for plugin in ["bridge", "host-local"] {
                let target = fs::canonicalize(tb.cni_bin_dir().join(plugin))
                    .unwrap_or_else(|e| panic!("the testbed's {plugin} plugin: {e}"));
                std::os::unix::fs::symlink(target, own.join(plugin)).expect("plugin link");
            }
            own
        } else {
            tb.cni_bin_dir().to_owned()
        };
        fs::write(
            net_dir.join(format!("{NETWORK}.conflist")),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .expect("conflist");

        xtask::image::write_private_conf(
            &dir,
            &dir.join("runroot"),
            &xtask::image::PodmanConfExtra {
                containers: "log_driver = \"k8s-file\"\n".to_owned(),
                engine: "network_backend = \"cni\"\nruntime = \"runc\"\n".to_owned(),
                tables: format!(
                    "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [{:?}]\n\
                     network_config_dir = {:?}\n\n[engine.runtimes]\nrunc = [{:?}]\n",
                    cni_bin_dir.display().to_string(),
                    net_dir.display().to_string(),
                    wrapper.display().to_string(),
                ),
            },
        )
        .expect("podman's containers.conf and storage.conf");

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
            net_dir,
            cni_bin_dir,
            cni_namespace: CONTAINER_NS.to_owned(),
            runs: AtomicU32::new(0),
        }
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            // Appended by podman to the CNI_ARGS it sends (K8S_POD_NAME is the name).
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={}", self.cni_namespace),
            )
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
    pub fn run(&self, args: &[&str], timeout: Duration) -> Result<PodmanOutput, String> {
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

    /// `podman run --detach` of the busybox rootfs as [`CONTAINER_NAME`] on the network,
    /// below the testbed cgroup, running `command`.
    pub fn run_client(&self, command: &[&str], agent_log: &dyn Fn() -> String) -> PodmanOutput {
        let cgroup_parent = format!("--cgroup-parent={}", self.cgroup_parent);
        let rootfs = self.rootfs.display().to_string();
        let mut args = vec![
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
        ];
        args.extend(command);
        self.run_ok(&args, agent_log)
    }

    /// [`Podman::run`] that must succeed; `agent_log` is shown when it does not.
    pub fn run_ok(&self, args: &[&str], agent_log: &dyn Fn() -> String) -> PodmanOutput {
        let out = self
            .run(args, PODMAN_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent_log()));
        assert!(
            out.status.success(),
            "podman {args:?} failed: {out}\nagent log:\n{}",
            agent_log()
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
        // And every image it loaded (its storage is under the state dir either way).
        match self.run(&["rmi", "--force", "--all"], PODMAN_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("podman rmi --all: {out}"),
            Err(e) => eprintln!("podman rmi --all: {e}"),
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

pub fn config_dump(tb: &Testbed) -> Value {
    let (status, body) = tb.admin_get("/config_dump").expect("GET /config_dump");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config_dump JSON")
}

pub fn pod_row(dump: &Value, pod: &str) -> Option<Value> {
    dump["pods"]
        .as_array()?
        .iter()
        .find(|p| p["pod"] == pod)
        .cloned()
}
