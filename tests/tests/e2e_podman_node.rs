//! The DaemonSet's container on a real runtime: the image `cargo xtask image` builds
//! (built here through the same code, `xtask::image`), loaded into podman and run the way
//! `deploy/daemonset.yaml` runs it — read from that file: its command and args,
//! `privileged`, `hostNetwork`, `hostPID`, its volume mounts with their propagation and
//! read-only flags, its env, its readiness probe and its grace period — with podman
//! standing in for kubelet.
//!
//! What differs from a cluster, and why:
//! - Paths the testbed owns replace the host's: `--cgroup` is the testbed's cgroup (where
//!   the test's containers run), `--bpffs` its pin dir, the state dir the testbed's agent
//!   dir (mounted at the same path, as the DaemonSet does, so the CNI plugin on the "host"
//!   dials the same socket path), and the CNI bin and conf dirs are those of a podman CNI
//!   network under the testbed's state dir, never the host's `/opt/cni/bin` or
//!   `/etc/cni/net.d`.
//! - `--source kube` becomes `--source manifests` (no API server runs here); the
//!   ConfigMap's `config.yaml` is mounted where the ConfigMap volume would be.
//! - `--on-exit auto` reads the DaemonSet from a fake API server in the node netns
//!   (`interceptor_testbed::kube_api`, serving the object of `deploy/daemonset.yaml`),
//!   named by a mounted kubeconfig instead of the service account's in-cluster config.
//! - `mountPropagation: Bidirectional` (bpffs) needs a shared host mount; this machine's
//!   `/sys/fs/bpf` is private, so it is mounted `rbind` there (bpffs is mounted already,
//!   the agent has nothing to propagate back).
//! - The agent container also gets `--cgroupns=host --cgroup-parent=<testbed cgroup>`, as
//!   every podman container of the testbed does (see `e2e_podman.rs`).
//!
//! Then: the agent's `--install-cni` chains `interceptor-cni` (copied out of the image)
//! into the network's conflist, a `podman run` container on that network is enrolled by
//! that ADD and its connection to a server pod is intercepted, the readiness probe's
//! command answers inside the container, and `podman stop` (SIGTERM, the grace period)
//! takes the rolling-update path (the DaemonSet is still there): the conflist entry, the
//! plugin and the pins stay, the container's new connections fail closed while no agent
//! runs, and a second agent container adopts the container and intercepts again. Last, the
//! uninstall: the DaemonSet is deleted from the API server and the second agent stopped:
//! the conflist entry, the plugin and the pins go, the container's connections go direct,
//! and a new container starts and connects. Twice: with the DaemonSet's args as
//! they are (`--mode auto`, eBPF here), and with `--mode iptables` added (the image's
//! iptables, run by the agent in the container's netns).
mod common;
#[path = "common/podman.rs"]
mod podman;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use interceptor_testbed::kube_api::{self, FakeApiServer};
use interceptor_testbed::{bin_path, with_netns, Testbed};
use podman::*;
use serde_json::Value;

const AGENT_CONTAINER: &str = "interceptor-node";
const SUCCESSOR_CONTAINER: &str = "interceptor-node-2";
/// `spec.nodeName` for the DaemonSet's `NODE_NAME` fieldRef.
const NODE_NAME: &str = "node-a";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The agent container of `deploy/daemonset.yaml`, as far as podman can run it.
struct DaemonSetContainer {
    command: Vec<String>,
    args: Vec<String>,
    privileged: bool,
    host_network: bool,
    host_pid: bool,
    env: Vec<(String, String)>,
    /// (source on the host, path in the container, options).
    mounts: Vec<(PathBuf, PathBuf, Vec<&'static str>)>,
    readiness: Vec<String>,
    grace_seconds: u64,
    image: String,
    /// The ConfigMap's `config.yaml`, for the ConfigMap volume.
    mesh_config: String,
    /// The DaemonSet object itself, as the fake API server serves it to `--on-exit auto`.
    object: Value,
}

impl DaemonSetContainer {
    /// Its path in the API server.
    fn api_path(&self) -> String {
        let meta = &self.object["metadata"];
        kube_api::daemonset_path(
            meta["namespace"].as_str().expect("namespace"),
            meta["name"].as_str().expect("name"),
        )
    }
}

fn strings(value: &serde_yaml::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Reads the DaemonSet and the ConfigMap; `redirect` maps a host path the DaemonSet
/// names to the testbed's (identity for the rest).
fn daemonset_container(redirect: &dyn Fn(&str) -> Option<PathBuf>) -> DaemonSetContainer {
    let text = fs::read_to_string(workspace().join("deploy/daemonset.yaml")).expect("daemonset");
    let ds: serde_yaml::Value = serde_yaml::from_str(&text).expect("daemonset YAML");
    let spec = &ds["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let configmap: serde_yaml::Value = serde_yaml::from_str(
        &fs::read_to_string(workspace().join("deploy/configmap.yaml")).expect("configmap"),
    )
    .expect("configmap YAML");
    let mesh_config = configmap["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml in the ConfigMap")
        .to_owned();

    let mut mounts = Vec::new();
    for mount in container["volumeMounts"]
        .as_sequence()
        .expect("volumeMounts")
    {
        let name = mount["name"].as_str().expect("mount name");
        let volume = spec["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        let mount_path = mount["mountPath"].as_str().expect("mountPath");
        let host = match volume["hostPath"]["path"].as_str() {
            Some(path) => redirect(path).unwrap_or_else(|| PathBuf::from(path)),
            // The ConfigMap volume: filled in by the caller (`config` below).
            None => PathBuf::from("configmap:"),
        };
        let target = redirect(mount_path).unwrap_or_else(|| PathBuf::from(mount_path));
        let mut options = Vec::new();
        if mount["readOnly"].as_bool() == Some(true) {
            options.push("ro");
        }
        match mount["mountPropagation"].as_str() {
            Some("HostToContainer") => options.push("rslave"),
            Some("Bidirectional") if mount_is_shared(&host) => options.push("rshared"),
            Some("Bidirectional") => eprintln!(
                "{}: Bidirectional needs a shared host mount, this one is private: rbind",
                host.display()
            ),
            _ => {}
        }
        mounts.push((host, target, options));
    }
    let env = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.to_owned(),
                None => match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => NODE_NAME.to_owned(),
                    Some("metadata.namespace") => ds["metadata"]["namespace"]
                        .as_str()
                        .expect("the DaemonSet's namespace")
                        .to_owned(),
                    _ => panic!("an env the test cannot fill in: {e:?}"),
                },
            };
            (name, value)
        })
        .collect();
    DaemonSetContainer {
        command: strings(&container["command"]),
        args: strings(&container["args"]),
        privileged: container["securityContext"]["privileged"].as_bool() == Some(true),
        host_network: spec["hostNetwork"].as_bool() == Some(true),
        host_pid: spec["hostPID"].as_bool() == Some(true),
        env,
        mounts,
        readiness: strings(&container["readinessProbe"]["exec"]["command"]),
        grace_seconds: spec["terminationGracePeriodSeconds"]
            .as_u64()
            .expect("terminationGracePeriodSeconds"),
        image: container["image"].as_str().expect("image").to_owned(),
        mesh_config,
        object: serde_json::to_value(&ds).expect("the DaemonSet as JSON"),
    }
}

/// Whether the mount holding `path` propagates (`shared:N` in mountinfo).
fn mount_is_shared(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (front, _) = line.split_once(" - ")?;
            let fields: Vec<&str> = front.split_whitespace().collect();
            let point = Path::new(fields.get(4)?);
            path.starts_with(point).then(|| {
                (
                    point.as_os_str().len(),
                    fields[6..].iter().any(|f| f.starts_with("shared:")),
                )
            })
        })
        .max_by_key(|(len, _)| *len)
        .is_some_and(|(_, shared)| shared)
}

/// The DaemonSet's args with the testbed's paths, and `--source manifests`.
fn agent_args(
    ds: &DaemonSetContainer,
    tb: &Testbed,
    manifests: &Path,
    redirect: &dyn Fn(&str) -> Option<PathBuf>,
) -> Vec<String> {
    let mut args = Vec::new();
    let mut it = ds.args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--source" => {
                assert_eq!(it.next().map(String::as_str), Some("kube"));
                args.extend(["--source".to_owned(), "manifests".to_owned()]);
                args.extend(["--manifests".to_owned(), manifests.display().to_string()]);
            }
            "--cgroup" => {
                it.next();
                args.extend([
                    "--cgroup".to_owned(),
                    tb.cgroup_path().display().to_string(),
                ]);
            }
            "--bpffs" => {
                it.next();
                args.extend(["--bpffs".to_owned(), tb.bpffs_dir().display().to_string()]);
            }
            other => args.push(
                redirect(other)
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| other.to_owned()),
            ),
        }
    }
    args
}

/// What the test puts on the "host" for the agent container besides the DaemonSet's
/// hostPath volumes.
struct NodeFiles {
    /// Stands in for the ConfigMap volume.
    config_dir: PathBuf,
    /// The manifests source's directory (`--source kube` is replaced, see above).
    manifests: PathBuf,
    /// Names the fake API server `--on-exit auto` asks.
    kubeconfig: PathBuf,
}

fn run_agent_container(
    podman: &Podman,
    ds: &DaemonSetContainer,
    name: &str,
    image: &str,
    args: &[String],
    files: &NodeFiles,
) {
    let NodeFiles {
        config_dir,
        manifests,
        kubeconfig,
    } = files;
    let mut run: Vec<String> = vec![
        "run".into(),
        "--detach".into(),
        "--name".into(),
        name.into(),
    ];
    assert!(ds.privileged && ds.host_network && ds.host_pid);
    run.push("--privileged".into());
    // podman's "host" is the netns podman runs in: node a's.
    run.extend([
        "--network".into(),
        "host".into(),
        "--pid".into(),
        "host".into(),
    ]);
    run.push("--cgroupns=host".into());
    run.push(format!("--cgroup-parent={}", podman.cgroup_parent));
    for (host, target, options) in &ds.mounts {
        let host = if host == Path::new("configmap:") {
            config_dir
        } else {
            host.as_path()
        };
        let mut volume = format!("{}:{}", host.display(), target.display());
        if !options.is_empty() {
            volume.push(':');
            volume.push_str(&options.join(","));
        }
        run.extend(["--volume".into(), volume]);
    }
    run.extend([
        "--volume".into(),
        format!("{}:{}:ro", manifests.display(), manifests.display()),
    ]);
    // The service account's in-cluster config in a cluster; a kubeconfig naming the fake
    // API server here (kube-rs reads either).
    run.extend([
        "--volume".into(),
        format!("{}:{}:ro", kubeconfig.display(), kubeconfig.display()),
        "--env".into(),
        format!("KUBECONFIG={}", kubeconfig.display()),
    ]);
    for (key, value) in &ds.env {
        run.extend(["--env".into(), format!("{key}={value}")]);
    }
    run.push(format!(
        "--entrypoint={}",
        serde_json::to_string(&ds.command).unwrap()
    ));
    run.push(image.into());
    run.extend(args.iter().cloned());
    let run: Vec<&str> = run.iter().map(String::as_str).collect();
    let logs = || container_logs(podman, name);
    podman.run_ok(&run, &logs);
}

fn container_logs(podman: &Podman, name: &str) -> String {
    match podman.run(&["logs", name], PODMAN_TIMEOUT) {
        Ok(out) => format!("{}{}", out.stdout, out.stderr),
        Err(e) => e,
    }
}

/// Runs the DaemonSet's readiness probe command in the container until it succeeds.
fn wait_ready(podman: &Podman, ds: &DaemonSetContainer, name: &str) -> Duration {
    let started = Instant::now();
    let mut exec = vec!["exec", name];
    exec.extend(ds.readiness.iter().map(String::as_str));
    loop {
        let out = podman.run(&exec, PODMAN_TIMEOUT).expect("podman exec");
        if out.status.success() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{name} not ready within 60 s: {out}\nlogs:\n{}",
            container_logs(podman, name)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn conflist_types(path: &Path) -> Vec<String> {
    let conflist: Value =
        serde_json::from_slice(&fs::read(path).expect("conflist")).expect("conflist JSON");
    conflist["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Outbound records from `ip` to `server_addr` in the dump.
fn outbound_records(dump: &Value, ip: &str, server_addr: &str) -> Vec<Value> {
    dump["connections"]
        .as_array()
        .map(|records| {
            records
                .iter()
                .filter(|r| {
                    r["direction"] == "outbound"
                        && r["original_dst"] == server_addr
                        && r["client"]
                            .as_str()
                            .is_some_and(|c| c.starts_with(&format!("{ip}:")))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// `nc` from the client container to the server, in the container (`podman exec`).
fn nc_from_client(podman: &Podman, server_ip: &str, payload: &str) -> String {
    let script = format!("echo {payload} | timeout 10 nc -w 3 {server_ip} 9000; echo nc-exit=$?");
    let out = podman
        .run(
            &["exec", CONTAINER_NAME, "sh", "-c", &script],
            PODMAN_TIMEOUT,
        )
        .expect("podman exec nc");
    format!("{}{}", out.stdout, out.stderr)
}

/// The DaemonSet's args as they are: `--mode auto`, eBPF on this kernel.
#[test]
fn the_daemonset_container_runs_on_podman_and_intercepts() {
    daemonset_on_podman("podnode", &[]);
}

/// The same with `--mode iptables` added: the agent runs the image's iptables in the
/// container's netns.
#[test]
fn the_daemonset_container_runs_on_podman_in_iptables_mode() {
    daemonset_on_podman("podnode-ipt", &["--mode", "iptables"]);
}

fn daemonset_on_podman(label: &str, extra_args: &[&str]) {
    if !common::privileged() {
        return;
    }
    let iptables_mode = extra_args.contains(&"iptables");
    let mut tb = Testbed::builder(label)
        .tb_pod_bin(env!("CARGO_BIN_EXE_tb-pod"))
        .without_interceptor_cni()
        .build()
        .expect("testbed");

    // The image, through `cargo xtask image`'s code, from the binaries under test.
    let built = xtask::image::build(&xtask::image::ImageSpec {
        interceptor: bin_path("interceptor"),
        cni: bin_path("interceptor-cni"),
        work_dir: tb.state_dir().join("image-build"),
        archive: tb.state_dir().join(xtask::image::ARCHIVE_NAME),
        reference: xtask::image::image_ref(),
    })
    .expect("cargo xtask image");
    eprintln!(
        "image {} built in {:.1} s, archive {:.1} MB",
        built.reference,
        built.seconds,
        built.archive_bytes as f64 / 1e6
    );

    // The server: a pod of the testbed's own chain (bridge + host-local only: it is not
    // enrolled, and exists before any agent runs).
    let server = tb.add_pod(SERVER_NS, SERVER_NAME).expect("server pod");
    let _echo = tb
        .spawn_server(
            &server,
            &["echo", "--listen", "0.0.0.0:9000", "--greeting", GREETING],
        )
        .expect("echo server");
    let server_ip = server.ip.to_string();
    let server_addr = format!("{server_ip}:9000");

    let manifests = tb.state_dir().join("manifests");
    fs::create_dir_all(&manifests).expect("manifests dir");
    fs::write(manifests.join("mesh.yaml"), MANIFESTS).expect("manifests");
    let config_dir = tb.state_dir().join("configmap");
    fs::create_dir_all(&config_dir).expect("configmap dir");

    let podman = Podman::new(
        &tb,
        NetworkSetup {
            chain_interceptor: false,
            own_cni_bin: true,
        },
    );
    let conflist_path = podman.net_dir.join(format!("{NETWORK}.conflist"));
    assert_eq!(conflist_types(&conflist_path), ["bridge"]);

    // What an operator does: load the archive (`ctr images import` in a cluster).
    let archive = built.archive.display().to_string();
    let load = podman.run_ok(&["load", "--input", &archive], &String::new);
    assert!(
        load.stdout.contains(&built.reference),
        "podman load did not name {}: {load}",
        built.reference
    );

    let state_dir = tb.agent_state_dir();
    let (net_dir, cni_bin) = (podman.net_dir.clone(), podman.cni_bin_dir.clone());
    let redirect = move |path: &str| -> Option<PathBuf> {
        match path {
            "/var/run/interceptor" => Some(state_dir.clone()),
            "/opt/cni/bin" => Some(cni_bin.clone()),
            "/etc/cni/net.d" => Some(net_dir.clone()),
            _ => None,
        }
    };
    let ds = daemonset_container(&redirect);
    assert_eq!(
        ds.image, built.reference,
        "deploy/daemonset.yaml does not run the image `cargo xtask image` builds"
    );
    fs::write(config_dir.join("config.yaml"), &ds.mesh_config).expect("config.yaml");
    let mut args = agent_args(&ds, &tb, &manifests, &redirect);
    args.extend(extra_args.iter().map(|a| a.to_string()));
    eprintln!("agent args: {args:?}");

    // `--on-exit auto` asks the API server about the DaemonSet when it stops: a fake one
    // in the node netns (the container's host network) serves the DaemonSet itself.
    let listener = with_netns(tb.node_netns(), || TcpListener::bind("127.0.0.1:0"))
        .expect("fake API server listener");
    let api = FakeApiServer::start(listener).expect("fake API server");
    api.set(&ds.api_path(), &ds.object);
    let kubeconfig = tb.state_dir().join("kubeconfig");
    kube_api::kubeconfig(&kubeconfig, api.addr()).expect("kubeconfig");

    let files = NodeFiles {
        config_dir: config_dir.clone(),
        manifests: manifests.clone(),
        kubeconfig,
    };
    let started = Instant::now();
    run_agent_container(&podman, &ds, AGENT_CONTAINER, &ds.image, &args, &files);
    let ready_after = wait_ready(&podman, &ds, AGENT_CONTAINER);
    eprintln!("agent container ready (readiness probe) after {ready_after:?}");
    let agent_log = || container_logs(&podman, AGENT_CONTAINER);
    let (status, body) = tb.admin_get("/readyz").expect("/readyz");
    assert_eq!(status, 200, "{body}");

    // What the agent executes in iptables mode (and an operator through `kubectl exec`)
    // runs in the image: both iptables backends, with their dlopen'ed extensions, and nft.
    // Read-only, in the node netns (the container's host network).
    for tool in [
        &["iptables-legacy-save", "-t", "nat"][..],
        &["iptables-nft-save", "-t", "nat"],
        &["ip6tables-legacy-save", "-t", "nat"],
        &["iptables", "-t", "nat", "-L", "-n"],
        &["iptables-legacy", "-m", "owner", "--help"],
        &["nft", "list", "tables"],
    ] {
        let mut exec = vec!["exec", AGENT_CONTAINER];
        exec.extend(tool);
        podman.run_ok(&exec, &agent_log);
    }

    // --install-cni chained the plugin into the network's conflist and copied it out of
    // the image into the network's plugin dir.
    let deadline = Instant::now() + Duration::from_secs(20);
    while conflist_types(&conflist_path) != ["bridge", "interceptor-cni"] {
        assert!(
            Instant::now() < deadline,
            "not chained: {:?}\n{}",
            conflist_types(&conflist_path),
            agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let plugin = podman.cni_bin_dir.join("interceptor-cni");
    let meta = fs::symlink_metadata(&plugin).expect("interceptor-cni installed");
    assert!(meta.is_file(), "{} is not a copied file", plugin.display());
    eprintln!("chained after {:?}", started.elapsed());

    // podman (kubelet's stand-in) starts a container on the network: the chained
    // plugin's ADD enrolls it.
    podman.run_client(&["sleep", "600"], &agent_log);
    let out = nc_from_client(&podman, &server_ip, PAYLOAD);
    assert!(
        out.contains(GREETING) && out.contains(PAYLOAD) && out.contains("nc-exit=0"),
        "the container did not reach the server: {out}\nagent log:\n{}",
        agent_log()
    );
    let dump = config_dump(&tb);
    let pod_key = format!("{CONTAINER_NS}/{CONTAINER_NAME}");
    let row = pod_row(&dump, &pod_key)
        .unwrap_or_else(|| panic!("no {pod_key} in /config_dump: {}", dump["pods"]));
    assert_eq!(row["enrolled"], true, "{row}");
    let ip = row["ip"].as_str().expect("ip").to_owned();
    let records = outbound_records(&dump, &ip, &server_addr);
    assert!(
        !records.is_empty(),
        "no outbound record from {ip} to {server_addr}: {}\nagent log:\n{}",
        dump["connections"],
        agent_log()
    );
    assert_eq!(records[0]["pod"], pod_key.as_str(), "{}", records[0]);
    assert_eq!(
        records[0]["target"]["kind"], "passthrough",
        "{}",
        records[0]
    );

    // A rolling update's end for this pod: SIGTERM, up to the grace period.
    let grace = ds.grace_seconds.to_string();
    let stop_started = Instant::now();
    podman.run_ok(&["stop", "--time", &grace, AGENT_CONTAINER], &agent_log);
    let stopped_after = stop_started.elapsed();
    eprintln!("podman stop took {stopped_after:?}");
    let exit = podman.run_ok(
        &[
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            AGENT_CONTAINER,
        ],
        &agent_log,
    );
    let log = agent_log();
    assert_eq!(exit.stdout.trim(), "0", "agent exit code; log:\n{log}");
    assert!(
        log.contains("SIGTERM: stopping")
            && log.contains("the DaemonSet is still there")
            && log.contains("keeping the data path"),
        "the agent did not take the keep path:\n{log}"
    );
    assert!(
        api.requests().contains(&format!("GET {}", ds.api_path())),
        "the agent did not ask about its DaemonSet: {:?}",
        api.requests()
    );
    assert!(
        stopped_after < Duration::from_secs(ds.grace_seconds),
        "the agent needed the SIGKILL ({stopped_after:?})"
    );
    // --on-exit keep: entry, plugin and pins stay.
    assert_eq!(
        conflist_types(&conflist_path),
        ["bridge", "interceptor-cni"],
        "the conflist entry went with the agent"
    );
    assert!(plugin.is_file(), "the plugin went with the agent");
    if !iptables_mode {
        let pins = fs::read_dir(tb.bpffs_dir()).map(|d| d.count()).unwrap_or(0);
        assert!(pins > 0, "no pins left in {}", tb.bpffs_dir().display());
    }

    // Meanwhile the container's connections fail closed: no bypass of the mesh.
    let out = nc_from_client(&podman, &server_ip, "while-no-agent");
    assert!(
        !out.contains(GREETING),
        "a connection went around the stopped agent: {out}"
    );

    // The next agent (the rolling update's new pod) adopts the container from the state
    // dir and intercepts its connections again.
    run_agent_container(&podman, &ds, SUCCESSOR_CONTAINER, &ds.image, &args, &files);
    wait_ready(&podman, &ds, SUCCESSOR_CONTAINER);
    let successor_log = || container_logs(&podman, SUCCESSOR_CONTAINER);
    let out = nc_from_client(&podman, &server_ip, "after-the-update");
    assert!(
        out.contains(GREETING) && out.contains("after-the-update") && out.contains("nc-exit=0"),
        "no connection through the next agent: {out}\nlog:\n{}",
        successor_log()
    );
    let dump = config_dump(&tb);
    let row = pod_row(&dump, &pod_key).expect("adopted pod row");
    assert_eq!(row["enrolled"], true, "{row}");
    assert!(
        !outbound_records(&dump, &ip, &server_addr).is_empty(),
        "the next agent did not intercept: {}\nlog:\n{}",
        dump["connections"],
        successor_log()
    );

    // The uninstall: `kubectl delete -k deploy/` removes the DaemonSet (background
    // propagation: the object is gone before its pods get SIGTERM), then its pods stop.
    api.delete(&ds.api_path());
    podman.run_ok(
        &["stop", "--time", &grace, SUCCESSOR_CONTAINER],
        &successor_log,
    );
    let log = successor_log();
    assert!(
        log.contains("uninstalling (CNI entry, plugin, data path)")
            && log.contains("CNI plugin uninstalled"),
        "the agent did not take the uninstall path:\n{log}"
    );
    // The node is as it was: the conflist has the bridge alone, the plugin is gone, and
    // so are the pins (eBPF) or the container's chains (iptables).
    assert_eq!(
        conflist_types(&conflist_path),
        ["bridge"],
        "the conflist entry stayed:\n{log}"
    );
    assert!(!plugin.exists(), "the plugin stayed:\n{log}");
    let pins = fs::read_dir(tb.bpffs_dir()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pins, 0, "pins left in {}:\n{log}", tb.bpffs_dir().display());
    // Nor the node's probe SNAT chain (SMI-mode kubelet probes), in either backend.
    for save in ["iptables-legacy-save", "iptables-nft-save"] {
        let nat = common::run_in_netns(tb.node_netns(), &[save, "-t", "nat"]);
        assert!(
            !nat.contains("INTERCEPTOR_PROBES"),
            "{save} in the node netns after the uninstall:\n{nat}\n{log}"
        );
    }
    // The enrolled container is left alone: its connections go direct.
    let out = nc_from_client(&podman, &server_ip, "after-the-uninstall");
    assert!(
        out.contains(GREETING) && out.contains("after-the-uninstall") && out.contains("nc-exit=0"),
        "the uninstalled node still intercepts (or refuses): {out}"
    );
    // And new pods start: the runtime's ADD no longer runs a plugin with no agent behind it.
    podman.run_ok(
        &["rm", "--force", "--time", "0", CONTAINER_NAME],
        &successor_log,
    );
    podman.run_client(&["sleep", "600"], &successor_log);
    let out = nc_from_client(&podman, &server_ip, "a-new-pod");
    assert!(
        out.contains(GREETING) && out.contains("a-new-pod") && out.contains("nc-exit=0"),
        "a pod started after the uninstall cannot connect: {out}"
    );

    podman.run_ok(
        &["rm", "--force", "--time", "0", CONTAINER_NAME],
        &successor_log,
    );
    drop(podman);
}
