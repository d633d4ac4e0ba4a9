//! Installing the CNI plugin for real: `interceptor install-cni` wraps a node's bridge
//! `.conf` into a conflist chaining `interceptor-cni` and copies the plugin into a bin
//! dir; that conflist, run from that bin dir the way a runtime runs it, enrolls a pod
//! with the running agent (its traffic goes through the proxy); `uninstall-cni` takes it
//! all out again. And `agent --install-cni` installs at start, puts the entry back when
//! another tool rewrites the conflist, and leaves the file as it found it on SIGTERM.
mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::{Node, ECHO_CLUSTER_IP, ECHO_SERVICE_PORT, MANIFESTS};
use interceptor_testbed::{
    bin_path, netns_path, NodeId, Pod, Testbed, BRIDGE, CLUSTER_POD_CIDR, IFNAME, POD_SUBNET,
};
use serde_json::{json, Value};

/// The plugin's `type` and file name.
const PLUGIN: &str = "interceptor-cni";

/// A CNI bin dir and conf dir below the testbed's state dir (removed with it).
struct CniDirs {
    root: PathBuf,
    bin: PathBuf,
    conf: PathBuf,
}

impl CniDirs {
    /// The bin dir gets the reference plugins the testbed uses (links), as a node has.
    fn new(tb: &Testbed, name: &str) -> CniDirs {
        let root = tb.state_dir().join(name);
        let bin = root.join("bin");
        let conf = root.join("net.d");
        fs::create_dir_all(&bin).expect("bin dir");
        fs::create_dir_all(&conf).expect("conf dir");
        for plugin in ["bridge", "host-local"] {
            let real = fs::canonicalize(tb.cni_bin_dir().join(plugin)).expect(plugin);
            std::os::unix::fs::symlink(real, bin.join(plugin)).expect("link plugin");
        }
        CniDirs { root, bin, conf }
    }

    /// A bridge + host-local config on the testbed's bridge and subnet, with its own
    /// IPAM store handing out addresses from .200 up (the testbed's own store starts at
    /// .2), so its pods can talk to the testbed's.
    fn bridge_plugin(&self) -> Value {
        json!({
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": POD_SUBNET,
                "rangeStart": "10.244.0.200",
                "dataDir": self.root.join("ipam").display().to_string(),
                "routes": [{"dst": CLUSTER_POD_CIDR}],
            },
        })
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--cni-bin-dir".into(),
            self.bin.display().to_string(),
            "--cni-conf-dir".into(),
            self.conf.display().to_string(),
        ]
    }

    fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = [&self.conf, &self.bin]
            .iter()
            .flat_map(|d| fs::read_dir(d).expect("list dir"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn interceptor(args: &[String]) -> Output {
    let out = Command::new(bin_path("interceptor"))
        .args(args)
        .output()
        .expect("running interceptor");
    eprintln!(
        "interceptor {}: {}\nstdout:\n{}stderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

fn our_entries(conflist: &Value) -> Vec<Value> {
    conflist["plugins"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["type"] == PLUGIN).cloned().collect())
        .unwrap_or_default()
}

/// A pod netns made and removed by the test (named like the testbed's, so a killed run's
/// leftover is cleaned by the next testbed).
struct PodNetns(String);

impl PodNetns {
    fn create(tb: &Testbed) -> PodNetns {
        let name = format!("itb-{}-inst", tb.id());
        ip(&["netns", "add", &name]);
        let ns = PodNetns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// One plugin of `conflist` run from `bin_dir` in the node netns, with the stdin a
/// runtime builds (the plugin object, the list's `cniVersion` and `name`, `prevResult`).
fn run_plugin(
    tb: &Testbed,
    bin_dir: &Path,
    conflist: &Value,
    index: usize,
    command: &str,
    env: &[(&str, String)],
    prev_result: Option<&Value>,
) -> Output {
    let mut conf = conflist["plugins"][index].clone();
    conf["cniVersion"] = conflist["cniVersion"].clone();
    conf["name"] = conflist["name"].clone();
    if let Some(prev) = prev_result {
        conf["prevResult"] = prev.clone();
    }
    let ty = conf["type"].as_str().expect("plugin type").to_owned();
    let mut cmd = Command::new(bin_dir.join(&ty));
    for var in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_PATH", bin_dir)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = tb
        .spawn_in(tb.node_netns(), false, cmd)
        .expect("spawning plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&serde_json::to_vec(&conf).expect("config JSON"))
        .expect("writing the plugin's stdin");
    let out = child.wait_with_output().expect("plugin output");
    eprintln!(
        "{ty} {command}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn install_cni_wraps_the_node_conf_and_the_installed_chain_enrolls_a_pod() {
    if !common::privileged() {
        return;
    }
    let mut node = Node::start("install-cni", &[]);
    let dirs = CniDirs::new(&node.tb, "install");
    let socket = node.tb.agent_socket().display().to_string();

    // The node's network plugin config: a single-plugin .conf, and another config that
    // sorts after it (not the one runtimes use, so never touched).
    let mut bridge_conf = dirs.bridge_plugin();
    bridge_conf["cniVersion"] = json!("1.0.0");
    bridge_conf["name"] = json!("itb-installed");
    let conf_path = dirs.conf.join("10-itb.conf");
    fs::write(
        &conf_path,
        serde_json::to_string_pretty(&bridge_conf).unwrap(),
    )
    .unwrap();
    let other_path = dirs.conf.join("20-other.conflist");
    let other = r#"{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}"#;
    fs::write(&other_path, other).unwrap();

    let mut install = vec!["install-cni".to_owned()];
    install.extend(dirs.args());
    install.extend([
        "--plugin-binary".into(),
        bin_path(PLUGIN).display().to_string(),
        "--agent-socket".into(),
        socket.clone(),
        "--failure-policy".into(),
        "fail-closed".into(),
    ]);
    let out = interceptor(&install);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrapped"));

    // The .conf became 10-itb.conflist: its plugin, then ours.
    let conflist_path = dirs.conf.join("10-itb.conflist");
    assert!(!conf_path.exists(), "the wrapped .conf is removed");
    eprintln!(
        "{}:\n{}",
        conflist_path.display(),
        fs::read_to_string(&conflist_path).unwrap()
    );
    let conflist = read_json(&conflist_path);
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["name"], "itb-installed");
    assert_eq!(
        conflist["plugins"],
        json!([
            dirs.bridge_plugin(),
            {"type": PLUGIN, "agentSocket": socket, "failurePolicy": "fail-closed"},
        ])
    );
    assert_eq!(fs::read_to_string(&other_path).unwrap(), other);
    let installed = dirs.bin.join(PLUGIN);
    let mode = fs::metadata(&installed).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        fs::read(&installed).unwrap(),
        fs::read(bin_path(PLUGIN)).unwrap()
    );
    assert_eq!(
        dirs.files(),
        [
            "10-itb.conflist",
            "20-other.conflist",
            "bridge",
            "host-local",
            PLUGIN
        ],
        "no temp files left"
    );

    // Again: nothing to do, the file is not rewritten.
    let before = fs::read(&conflist_path).unwrap();
    let out = interceptor(&install);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("already chains"));
    assert_eq!(fs::read(&conflist_path).unwrap(), before);

    // The installed binary runs.
    let version = Command::new(&installed)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .expect("running the installed plugin");
    assert!(version.status.success(), "{version:?}");
    let answer: Value = serde_json::from_slice(&version.stdout).expect("VERSION JSON");
    assert!(
        answer["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&json!("1.0.0"))),
        "{answer}"
    );

    // The chain as installed makes a pod the agent enrolls: demo/client reaches the echo
    // Service through its proxy, to a server pod the testbed's own chain made.
    let server = node.pod("demo", "server");
    let _echo = node
        .tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", "hi"],
        )
        .expect("echo server");
    let netns = PodNetns::create(&node.tb);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let container_id = format!("{:032x}{nanos:032x}", std::process::id());
    let env = [
        ("CNI_CONTAINERID", container_id.clone()),
        ("CNI_NETNS", netns_path(&netns.0).display().to_string()),
        ("CNI_IFNAME", IFNAME.to_owned()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=client;\
                 K8S_POD_INFRA_CONTAINER_ID={container_id}"
            ),
        ),
    ];
    let mut result: Option<Value> = None;
    for i in 0..2 {
        let out = run_plugin(
            &node.tb,
            &dirs.bin,
            &conflist,
            i,
            "ADD",
            &env,
            result.as_ref(),
        );
        assert!(
            out.status.success(),
            "ADD of plugin {i} failed\nagent log:\n{}",
            node.agent_log()
        );
        result = Some(serde_json::from_slice(&out.stdout).expect("ADD result"));
    }
    let result = result.unwrap();
    let address = result["ips"][0]["address"].as_str().expect("pod address");
    let client = Pod {
        namespace: "demo".into(),
        name: "client".into(),
        netns: netns.0.clone(),
        netns_path: netns_path(&netns.0),
        container_id: container_id.clone(),
        ip: address.split('/').next().unwrap().parse().expect("IPv4"),
        ipv6: None,
        cni_result: result.clone(),
        node: NodeId::A,
    };
    let report = node
        .tb
        .run_client(
            &client,
            &[
                "--connect",
                &format!("{ECHO_CLUSTER_IP}:{ECHO_SERVICE_PORT}"),
                "--send-bytes",
                "1024",
                "--expect-greeting",
            ],
        )
        .expect("client runs");
    assert_eq!(report.error, None, "{report:?}\n{}", node.agent_log());
    assert_eq!(report.greeting.as_deref(), Some("hi"));
    let local = report.local.clone().expect("local address");
    let mut record = None;
    wait_until(
        "the proxy's connection record",
        Duration::from_secs(5),
        || {
            record = node.connections_from(&local).into_iter().next();
            record.is_some()
        },
    );
    let record = record.unwrap();
    assert_eq!(record["target"]["pod"], "demo/server", "{record}");

    // DEL through the same chain, in reverse, with the cached result.
    for i in (0..2).rev() {
        let out = run_plugin(
            &node.tb,
            &dirs.bin,
            &conflist,
            i,
            "DEL",
            &env,
            Some(&result),
        );
        assert!(out.status.success(), "DEL of plugin {i} failed");
    }
    drop(netns);

    // Uninstall: the conflist keeps the bridge plugin alone, the binary goes.
    let mut uninstall = vec!["uninstall-cni".to_owned()];
    uninstall.extend(dirs.args());
    let out = interceptor(&uninstall);
    assert!(out.status.success());
    let conflist = read_json(&conflist_path);
    assert_eq!(conflist["plugins"], json!([dirs.bridge_plugin()]));
    assert!(!installed.exists());
    assert_eq!(fs::read_to_string(&other_path).unwrap(), other);
    let out = interceptor(&uninstall);
    assert!(out.status.success(), "uninstalling twice is fine");
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to do"));
    assert_eq!(
        dirs.files(),
        [
            "10-itb.conflist",
            "20-other.conflist",
            "bridge",
            "host-local"
        ]
    );
}

#[test]
fn install_cni_refuses_a_primary_config_that_is_not_json() {
    if !common::privileged() {
        return;
    }
    let tb = Testbed::builder("install-cni-bad")
        .without_interceptor_cni()
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    let dirs = CniDirs::new(&tb, "install");
    let broken = dirs.conf.join("10-broken.conflist");
    let garbage = "{\"cniVersion\": \"1.0.0\", \"plugins\": [ {\"type\": \"bridge\"";
    fs::write(&broken, garbage).unwrap();

    let mut install = vec!["install-cni".to_owned()];
    install.extend(dirs.args());
    install.extend([
        "--plugin-binary".into(),
        bin_path(PLUGIN).display().to_string(),
        "--agent-socket".into(),
        tb.agent_socket().display().to_string(),
    ]);
    let out = interceptor(&install);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&broken.display().to_string()) && stderr.contains("not valid JSON"),
        "{stderr}"
    );
    assert_eq!(fs::read_to_string(&broken).unwrap(), garbage);
    assert_eq!(
        dirs.files(),
        ["10-broken.conflist", "bridge", "host-local"],
        "nothing installed, no temp files"
    );
}

#[test]
fn agent_installs_at_start_keeps_it_installed_and_uninstalls_on_sigterm() {
    if !common::privileged() {
        return;
    }
    let mut tb = Testbed::builder("agent-install-cni")
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .build()
        .expect("testbed");
    let dirs = CniDirs::new(&tb, "install");
    let conflist_path = dirs.conf.join("10-itb.conflist");
    let original = format!(
        "{{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"itb-installed\",\n  \"plugins\": [\n    {}\n  ]\n}}\n",
        dirs.bridge_plugin()
    );
    fs::write(&conflist_path, &original).unwrap();
    let manifests = tb.state_dir().join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    fs::write(manifests.join("mesh.yaml"), MANIFESTS).unwrap();

    let mut args = vec!["--install-cni".to_owned()];
    args.extend(dirs.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = tb.start_agent(&manifests, &args).expect("agent starts");
    let mut node = Node {
        agent: Some(agent),
        manifests,
        tb,
    };

    // Installed before the agent reported ready.
    let conflist = read_json(&conflist_path);
    assert_eq!(
        our_entries(&conflist),
        [json!({
            "type": PLUGIN,
            "agentSocket": node.tb.agent_socket().display().to_string(),
            "failurePolicy": "fail-closed",
        })],
        "{conflist}\n{}",
        node.agent_log()
    );
    assert!(dirs.bin.join(PLUGIN).is_file());

    // Another tool rewrites the conflist without our entry (temp file + rename).
    let tmp = dirs.conf.join(".rewrite");
    fs::write(&tmp, &original).unwrap();
    fs::rename(&tmp, &conflist_path).unwrap();
    wait_until("the entry to be put back", Duration::from_secs(10), || {
        our_entries(&read_json(&conflist_path)).len() == 1
    });
    // The agent logs after it wrote the file back: the line may trail the file.
    wait_until("the re-apply to be logged", Duration::from_secs(5), || {
        node.agent_log().contains("CNI config re-applied")
    });

    let status = node.stop_agent();
    assert!(status.success(), "{status}\n{}", node.agent_log());
    // Back to what the other tool wrote, byte for byte; the binary is gone.
    assert_eq!(fs::read_to_string(&conflist_path).unwrap(), original);
    assert!(!dirs.bin.join(PLUGIN).exists());
    assert_eq!(
        dirs.files(),
        ["10-itb.conflist", "bridge", "host-local"],
        "no temp files left"
    );
}
