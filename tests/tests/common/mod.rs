//! Shared helpers for the privileged end-to-end tests: the root guard, the manifests
//! the tests run the agent on, and a testbed with a running agent.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use interceptor_testbed::{AgentProcess, Pod, Testbed};

/// ClusterIP of the `echo` Service in [`MANIFESTS`].
pub const ECHO_CLUSTER_IP: &str = "10.96.0.10";
pub const ECHO_SERVICE_PORT: u16 = 80;
pub const ECHO_TARGET_PORT: u16 = 9000;

/// `demo` is enrolled (ambient label), `legacy` is not.
pub const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: demo, labels: {app: client}}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: demo, labels: {app: echo}}
spec:
  containers:
  - name: main
    image: busybox
    ports: [{name: tcp-echo, containerPort: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: outsider, namespace: legacy, labels: {app: outsider}}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: legacy-server, namespace: legacy, labels: {app: legacy-echo}}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{name: tcp, port: 80, targetPort: tcp-echo}]
"#;

/// True when the test may run; under `CI=true` a non-root run is a failure, never a skip.
pub fn privileged() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("privileged end-to-end tests need root, and CI=true forbids skipping them");
    }
    eprintln!("skipping privileged end-to-end test: not root");
    false
}

/// A testbed with no agent yet, and a manifests directory holding `manifests_yaml`, for
/// tests that start the agent themselves.
pub fn testbed_with_manifests(label: &str, manifests_yaml: &str) -> (Testbed, PathBuf) {
    let tb = Testbed::builder(label)
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    let manifests = tb.state_dir().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests dir");
    std::fs::write(manifests.join("mesh.yaml"), manifests_yaml).expect("manifests");
    (tb, manifests)
}

/// A testbed with the full CNI chain and a running agent on [`MANIFESTS`].
pub struct Node {
    pub agent: Option<AgentProcess>,
    pub manifests: PathBuf,
    // Declared last: dropped after the agent, so the agent stops before the netns go.
    pub tb: Testbed,
}

impl Node {
    pub fn start(label: &str, agent_args: &[&str]) -> Node {
        Self::start_with_manifests(label, agent_args, MANIFESTS)
    }

    /// Like [`Node::start`], with other manifests.
    pub fn start_with_manifests(label: &str, agent_args: &[&str], manifests_yaml: &str) -> Node {
        let (mut tb, manifests) = testbed_with_manifests(label, manifests_yaml);
        let agent = tb
            .start_agent(&manifests, agent_args)
            .expect("agent starts");
        Node {
            agent: Some(agent),
            manifests,
            tb,
        }
    }

    pub fn pod(&mut self, namespace: &str, name: &str) -> Pod {
        self.tb.add_pod(namespace, name).unwrap_or_else(|e| {
            panic!(
                "adding pod {namespace}/{name}: {e:#}\nagent log:\n{}",
                self.agent_log()
            )
        })
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }

    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self.tb.admin_get("/config_dump").expect("GET /config_dump");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }

    /// Connection records the proxy logged for `client` (ip:port).
    pub fn connections_from(&self, client: &str) -> Vec<serde_json::Value> {
        let dump = self.config_dump();
        dump["connections"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter(|r| r["client"] == client)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        self.agent
            .take()
            .expect("agent running")
            .stop()
            .expect("agent stops on SIGTERM")
    }
}

pub fn manifests_path(node: &Node) -> &Path {
    &node.manifests
}

/// The sum of the samples of metric `name` on the agent's `/metrics` whose labels contain
/// every fragment.
pub fn metric(node: &Node, name: &str, fragments: &[&str]) -> i64 {
    let (status, body) = node.tb.admin_get("/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    metric_in(&body, name, fragments)
}

/// The sum of the samples of metric `name` in the metrics text `body` whose labels contain
/// every fragment.
pub fn metric_in(body: &str, name: &str, fragments: &[&str]) -> i64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| fragments.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .sum()
}

/// Waits for `child` to exit and returns its stdout; kills it and panics past `timeout`.
pub fn wait_with_timeout(mut child: std::process::Child, timeout: Duration) -> String {
    use std::io::Read;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out)
                .expect("read");
            return out;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Python helper for [`python_in_pod`] scripts: `exchange(sock, data)` sends `data` to an
/// echo server and reports whether all of it came back (`OSError` if the peer closed).
pub const PY_EXCHANGE: &str = "import socket,json,time\n\
def exchange(s,data):\n\
\x20   s.sendall(data)\n\
\x20   got=b''\n\
\x20   while len(got)<len(data):\n\
\x20       chunk=s.recv(len(data)-len(got))\n\
\x20       if not chunk: raise OSError('closed')\n\
\x20       got+=chunk\n\
\x20   return got==data\n";

/// Runs a Python script inside `pod` and returns the JSON object its last stdout line
/// prints; panics past `timeout`.
pub fn python_in_pod(node: &Node, pod: &Pod, script: &str, timeout: Duration) -> serde_json::Value {
    let mut command = std::process::Command::new("python3");
    command
        .args(["-c", script])
        .stdout(std::process::Stdio::piped());
    let child = node
        .tb
        .spawn_in_pod(pod, command)
        .expect("python3 in the pod");
    let out = wait_with_timeout(child, timeout);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| {
        panic!(
            "script printed {out:?}: {e}\ncounters: {}\nconnections: {}\nagent log:\n{}",
            node.config_dump()["datapath_counters"],
            node.config_dump()["connections"],
            node.agent_log()
        )
    })
}

/// `interceptor gateway --manifests dir --admin-addr admin args…` started in `pod`, its
/// stdout in `log` and its stderr beside it (`.err`); the caller ends it by its PID.
pub fn spawn_gateway(
    tb: &Testbed,
    pod: &Pod,
    dir: &Path,
    admin: &str,
    args: &[&str],
    log: &Path,
) -> std::process::Child {
    let mut cmd = std::process::Command::new(interceptor_testbed::bin_path("interceptor"));
    cmd.arg("gateway")
        .arg("--manifests")
        .arg(dir)
        .args(["--admin-addr", admin])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(log).expect("gateway log"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("gateway log"));
    tb.spawn_in_pod(pod, cmd).expect("interceptor gateway")
}

/// Whether a gateway's `/config_dump` shows listeners accepted on every one of `ports`
/// and no port it failed to bind.
pub fn gateway_serves(dump: &serde_json::Value, ports: &[u16]) -> bool {
    let open: Vec<u64> = dump["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["accepted"] == true)
        .filter_map(|l| l["port"].as_u64())
        .collect();
    let bound = dump["bind_errors"]
        .as_object()
        .is_some_and(|e| e.is_empty());
    bound && ports.iter().all(|p| open.contains(&u64::from(*p)))
}

/// `/config_dump` of the `interceptor gateway` in `pod` whose admin port is `admin`; `None`
/// until it answers.
pub fn gateway_dump(
    tb: &Testbed,
    pod: &Pod,
    admin: std::net::SocketAddr,
) -> Option<serde_json::Value> {
    let (status, body) = tb.http_get_in_pod(pod, admin, "/config_dump").ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok())?
}

/// The status of route `name` (`namespace/name`) in a gateway's `/config_dump`.
pub fn gateway_route(dump: &serde_json::Value, name: &str) -> serde_json::Value {
    dump["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no status of {name}: {}", dump["routes"]))
}

/// `(status, reason)` of condition `kind` of route `name` in a gateway's `/config_dump`.
pub fn route_condition(dump: &serde_json::Value, name: &str, kind: &str) -> (String, String) {
    let route = gateway_route(dump, name);
    let c = route["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} condition: {route}"));
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Poll `probe` every 50 ms for up to 5 s; panics naming `what` when it never answers.
pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(value) = probe() {
            return value;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// The inbound proxy's transparent socket's mark, and the proxy's other one.
pub const TRANSPARENT_MARK: u64 = 0x1501;
pub const PROXY_MARK: u64 = 0x1500;

/// Whether a `tb-pod` server's accept event is a connection from the inbound proxy: the
/// mark of the application's accepted socket is the proxy's (`tcp_fwmark_accept`, on in
/// an enrolled pod while client addresses are preserved, the default), whatever the peer
/// address, which is the client's own when preserved.
pub fn from_inbound_proxy(accept: &serde_json::Value) -> bool {
    matches!(accept["mark"].as_u64(), Some(TRANSPARENT_MARK | PROXY_MARK))
}

/// Inbound connection records of `pod` in a `/config_dump`, optionally only those from a
/// client at `client_ip`.
pub fn inbound_records(
    dump: &serde_json::Value,
    pod: &str,
    client_ip: Option<&str>,
) -> Vec<serde_json::Value> {
    dump["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["direction"] == "inbound" && r["pod"] == pod)
        .filter(|r| {
            client_ip.is_none_or(|ip| {
                r["client"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&format!("{ip}:")))
            })
        })
        .cloned()
        .collect()
}

/// The finished (no longer open) `direction` record of `pod` whose client is `client`
/// (ip:port), once the proxy has logged it.
pub fn finished_record(
    node: &Node,
    direction: &str,
    pod: &str,
    client: &str,
) -> Option<serde_json::Value> {
    node.connections_from(client)
        .into_iter()
        .find(|r| r["direction"] == direction && r["pod"] == pod && r["outcome"] != "open")
}

/// `interceptor cleanup` for the testbed's (only) node, as an operator runs it.
pub fn run_cleanup(tb: &interceptor_testbed::Testbed) -> std::process::Output {
    std::process::Command::new(interceptor_testbed::bin_path("interceptor"))
        .arg("cleanup")
        .arg("--bpffs")
        .arg(tb.bpffs_dir())
        .arg("--state-dir")
        .arg(tb.agent_state_dir())
        .output()
        .expect("running interceptor cleanup")
}

/// Attach types of the programs attached directly to `cgroup`, sorted. bpftool's
/// `cgroup show` answers on most kernels, but on 5.10 (Debian 12's bpftool) it prints
/// `[]` and exits non-zero even while programs are attached (seen in vm-test): then the
/// links are asked instead, which hold every cgroup program the agent attaches on a
/// kernel that runs eBPF mode (≥ 5.7 attaches with bpf_link).
pub fn cgroup_attach_types(bpftool: &str, cgroup: &Path) -> Vec<String> {
    let bpftool_json = |args: &[&str]| -> Option<serde_json::Value> {
        let out = std::process::Command::new(bpftool)
            .arg("-j")
            .args(args)
            .output()
            .expect("running bpftool");
        if !out.status.success() {
            return None;
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.trim().is_empty() {
            return Some(serde_json::Value::Array(Vec::new()));
        }
        Some(
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("bpftool {args:?} output ({e}): {stdout}")),
        )
    };
    let path = cgroup.to_str().expect("utf-8 cgroup path");
    let attach_types = |entries: serde_json::Value| -> Vec<String> {
        entries
            .as_array()
            .expect("bpftool: an array")
            .iter()
            .map(|p| p["attach_type"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    let mut types = match bpftool_json(&["cgroup", "show", path]) {
        Some(programs) => attach_types(programs),
        None => {
            use std::os::unix::fs::MetadataExt;
            let id = std::fs::metadata(cgroup).expect("cgroup").ino();
            let links = bpftool_json(&["link", "show"]).expect("bpftool link show");
            attach_types(serde_json::Value::Array(
                links
                    .as_array()
                    .expect("bpftool link show: an array")
                    .iter()
                    .filter(|l| l["cgroup_id"].as_u64() == Some(id))
                    .cloned()
                    .collect(),
            ))
        }
    };
    types.sort();
    types
}

/// Whether the running agent's probe found `feature` (a name from
/// `node.probe.features` of `/config_dump`): tests whose expectations differ between
/// a feature and its fallback ask the agent, so they hold on every kernel.
pub fn agent_has_feature(node: &Node, feature: &str) -> bool {
    let dump = node.config_dump();
    dump["node"]["probe"]["features"]
        .as_array()
        .expect("probe features")
        .iter()
        .find(|f| f["name"] == feature)
        .unwrap_or_else(|| panic!("{feature} is not probed"))["supported"]
        == true
}

/// The interception mode a test runs the agent in; the e2e suites run in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    /// The agent arguments that select this mode, followed by `extra`.
    pub fn args<'a>(self, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = match self {
            Mode::Ebpf => vec!["--mode", "ebpf"],
            Mode::Iptables => vec!["--mode", "iptables"],
        };
        args.extend_from_slice(extra);
        args
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }
}

/// `#[test]` wrappers `ebpf::<name>` and `iptables::<name>` for each `fn <name>(Mode)`.
#[allow(
    unused_macros,
    reason = "only the suites that run in both modes use it"
)]
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { super::$name(super::common::Mode::Ebpf) } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name(super::common::Mode::Iptables) } )*
        }
    };
}

/// Run `cmd` inside the named netns; its stdout (panics when it fails).
pub fn run_in_netns(netns: &str, cmd: &[&str]) -> String {
    let output = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .args(cmd)
        .output()
        .expect("ip netns exec");
    assert!(
        output.status.success(),
        "{cmd:?} in {netns}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The nat table of `netns` as `iptables-<backend>-save` prints it.
pub fn nat_rules(netns: &str, backend: &str) -> String {
    run_in_netns(netns, &[&format!("iptables-{backend}-save"), "-t", "nat"])
}

/// Whether the pod's netns holds the interception chains: `Mode::Iptables` expects them
/// once in the nft tables (the backend the testbed's nodes get), `Mode::Ebpf` expects no
/// trace of them in either backend (what eBPF mode, unenrolled pods and removed pods
/// must look like).
pub fn assert_pod_rules(pod: &Pod, mode: Mode) {
    match mode {
        Mode::Iptables => {
            let nat = nat_rules(&pod.netns, "nft");
            for chain in [
                "PROXY_INBOUND",
                "PROXY_IN_REDIRECT",
                "PROXY_OUTPUT",
                "PROXY_REDIRECT",
            ] {
                assert!(
                    nat.contains(&format!(":{chain} ")),
                    "pod {}: no {chain}:\n{nat}",
                    pod.name
                );
            }
            assert_eq!(
                nat.matches("-A PREROUTING -p tcp -j PROXY_INBOUND").count(),
                1,
                "{nat}"
            );
            assert_eq!(
                nat.matches("-A OUTPUT -p tcp -j PROXY_OUTPUT").count(),
                1,
                "{nat}"
            );
        }
        Mode::Ebpf => {
            for backend in ["nft", "legacy"] {
                let nat = nat_rules(&pod.netns, backend);
                assert!(
                    !nat.contains("PROXY_"),
                    "pod {}: {backend} nat has our chains:\n{nat}",
                    pod.name
                );
            }
        }
    }
}

/// Run CNI `command` (ADD/DEL) for `pod` through interceptor-cni alone (plugin 1 of the
/// chain), the way a runtime re-runs a chain; panics when the plugin fails.
pub fn rerun_interceptor_cni(node: &Node, pod: &Pod, command: &str) {
    let env = node.tb.pod_cni_env(pod);
    let mut vars: Vec<(&str, Option<&str>)> = env
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_str())))
        .collect();
    vars.push(("CNI_COMMAND", Some(command)));
    let config = node.tb.plugin_config(1, Some(&pod.cni_result));
    let out = node
        .tb
        .cni_raw(command, 1, &vars, config.to_string().as_bytes())
        .expect("plugin runs");
    assert!(
        out.status.success(),
        "{command}: {}{}",
        out.stdout,
        out.stderr
    );
}

/// A mesh config file (`--mesh-config`) of one test under the testbeds' run directory,
/// removed however the test ends.
pub struct MeshConfigFile(PathBuf);

impl MeshConfigFile {
    /// `/run/interceptor-tb/mesh-config-<pid>-<label>.yaml`, holding `contents`.
    pub fn new(label: &str, contents: &str) -> Self {
        let file = MeshConfigFile(PathBuf::from(format!(
            "/run/interceptor-tb/mesh-config-{}-{label}.yaml",
            std::process::id()
        )));
        std::fs::write(&file.0, contents).expect("mesh config");
        file
    }

    /// The `--mesh-config` argument.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for MeshConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl std::ops::Deref for MeshConfigFile {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}
