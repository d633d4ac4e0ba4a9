//! Local testbed for the interceptor (DESIGN.md §8): a "node" network namespace holding
//! the bridge and no route out, pods as network namespaces made by the real CNI chain,
//! a cgroup for the agent and the pods' processes, and cleanup on every exit path,
//! including leftovers of runs that were killed.
//!
//! Everything a testbed creates carries its id `<pid>-<n>`: netns `itb-<id>-*`, cgroup
//! and bpffs dirs `interceptor-tb-<id>`, state dir `/run/interceptor-tb/<id>`.
//!
//! A testbed starts with one node, "a" ([`NodeId::A`]); [`Testbed::add_node`] adds more,
//! each with its own node netns, bridge, pod subnet, conflist, cgroup, bpffs and state
//! dirs (`itb-<id>-node-<name>`, `interceptor-tb-<id>-<name>`, `<state>/nodes/<name>`),
//! routed to node a over a veth pair (see the `node` module). Functions without `_on`
//! work on node a.

mod cgroup;
mod cni;
pub mod fsm_docs;
mod http;
pub mod kube_api;
mod leftovers;
mod names;
mod netns;
mod node;
mod procs;

use std::fs::{self, File};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub use cni::{
    CniError, CniOutput, BRIDGE, CLUSTER_POD_CIDR, CNI_VERSION, IFNAME, NETWORK_NAME, POD_SUBNET,
};
pub use netns::{connect_in_netns, netns_path, with_netns};
pub use node::{ip_forward, link_addrs, link_name, NodeId, PodSubnets, TestbedNode};
pub use procs::{proc_status, AgentProcess, ClientReport, ProcStatus, ServerProcess, TbPodRun};

use names::{BPFFS_ROOT, DIR_PREFIX, NETNS_PREFIX, STATE_ROOT};
use procs::Owned;

/// Where the agent's admin endpoint listens, inside the node netns.
pub const ADMIN_ADDR: &str = "127.0.0.1:15000";
/// The agent's metrics port (`--metrics-addr`, default `0.0.0.0:15020`). The testbed keeps
/// the default: the agent runs in its node's netns, so every node has its own 15020, and
/// the two agents of a hand-over share it with `SO_REUSEPORT`, as in a cluster.
pub const METRICS_PORT: u16 = 15020;
/// The gateway address the bridge plugin gives the bridge in node a's netns (node `k`
/// has `10.244.<k>.1` with the default /24 subnets, see [`TestbedNode::gateway`]).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(20);
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(10);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Shorter in Drop: a plugin stuck on a dead agent must not hold up the test run.
const DROP_PLUGIN_TIMEOUT: Duration = Duration::from_secs(10);
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
/// Where distributions put the reference plugins (Debian first).
const STANDARD_CNI_DIRS: &[&str] = &["/usr/lib/cni", "/opt/cni/bin"];

static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

/// Finds a workspace binary (`interceptor`, `interceptor-cni`, `tb-pod`):
/// `$INTERCEPTOR_BIN_DIR/<name>` if that variable is set and the file is there, else
/// `<target>/<profile>/<name>` of the profile this crate was built with, else the other
/// profile's, where `<target>` is `$CARGO_TARGET_DIR` or `<workspace>/target`. When none
/// exists, the debug path is returned (whatever the profile) so the caller's error names
/// where it looked.
pub fn bin_path(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("INTERCEPTOR_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"))
        .to_path_buf();
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => workspace.join(t),
        None => workspace.join("target"),
    };
    // The profile this crate was built with, first: `cargo test --release` runs against
    // release binaries even when a newer debug build (say, one made without the eBPF
    // object for clippy) sits beside them.
    let (debug, release) = (
        target.join("debug").join(name),
        target.join("release").join(name),
    );
    let (own, other) = if cfg!(debug_assertions) {
        (&debug, &release)
    } else {
        (&release, &debug)
    };
    let found = [own, other]
        .into_iter()
        .find(|path| path.is_file())
        .cloned();
    found.unwrap_or(debug)
}

/// Options for a [`Testbed`]; start with [`Testbed::builder`].
#[derive(Clone, Debug)]
pub struct TestbedBuilder {
    label: String,
    interceptor_cni: bool,
    failure_policy: String,
    tb_pod_bin: Option<PathBuf>,
    pod_prefix_len: u8,
    dual_stack: bool,
}

impl TestbedBuilder {
    /// Leaves interceptor-cni out of the chain (bridge + host-local only), for testing
    /// the testbed itself or traffic without the agent.
    pub fn without_interceptor_cni(mut self) -> Self {
        self.interceptor_cni = false;
        self
    }

    /// `failurePolicy` of the interceptor-cni entry (default `fail-closed`).
    pub fn cni_failure_policy(mut self, policy: &str) -> Self {
        self.failure_policy = policy.to_owned();
        self
    }

    /// The `tb-pod` binary to run in pods (default [`bin_path`]`("tb-pod")`; integration
    /// tests can pass `env!("CARGO_BIN_EXE_tb-pod")`).
    pub fn tb_pod_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.tb_pod_bin = Some(path.into());
        self
    }

    /// Every node's pod subnet is a `/prefix_len` block of `10.244.0.0/16` instead of a
    /// /24, for more pods per node (a bench enrolling 1,000 pods on one node): see
    /// [`PodSubnets`]. Node a keeps gateway `10.244.0.1` and its first pods their
    /// addresses; fewer nodes fit. 16 to 24; `build` fails on anything else.
    pub fn pod_subnet_prefix(mut self, prefix_len: u8) -> Self {
        self.pod_prefix_len = prefix_len;
        self
    }

    /// Dual-stack pods: an IPv6 address from the node's `fd00:10:244:<k>::/64` besides the
    /// IPv4 one ([`Pod::ipv6`]), IPv6 routes between the nodes, DAD off in every netns.
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    pub fn build(self) -> Result<Testbed> {
        Testbed::create(self)
    }
}

/// A pod: a network namespace that went through the CNI chain of its node.
#[derive(Clone, Debug, PartialEq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Name of the pod's network namespace.
    pub netns: String,
    /// `/var/run/netns/<netns>`, what the runtime passed as `CNI_NETNS`.
    pub netns_path: PathBuf,
    pub container_id: String,
    /// The IPv4 address of the chain's final result.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on dual-stack testbeds.
    pub ipv6: Option<Ipv6Addr>,
    /// The chain's final ADD result (what a runtime caches for DEL).
    pub cni_result: Value,
    /// The node whose chain made the pod (and whose cgroup its processes join).
    pub node: NodeId,
}

/// Local nodes (node a, plus any [`Testbed::add_node`] made). Dropping it kills its
/// processes and removes everything it created.
#[derive(Debug)]
pub struct Testbed {
    id: String,
    label: String,
    /// `nodes[0]` is node a; `nodes[k].id == NodeId(k)`.
    nodes: Vec<TestbedNode>,
    state_dir: PathBuf,
    cni_bin_dir: PathBuf,
    failure_policy: String,
    tb_pod_bin: PathBuf,
    tracker: Arc<procs::Tracker>,
    pods: Vec<Pod>,
    next_pod: u32,
    next_log: AtomicU32,
    /// How long each plugin of the last chain ADD took, in chain order.
    last_add_timings: std::sync::Mutex<Vec<(String, Duration)>>,
}

impl Testbed {
    /// A testbed with the full chain (bridge + host-local + interceptor-cni, fail-closed).
    pub fn new(label: &str) -> Result<Testbed> {
        Self::builder(label).build()
    }

    pub fn builder(label: &str) -> TestbedBuilder {
        TestbedBuilder {
            label: label.to_owned(),
            interceptor_cni: true,
            failure_policy: "fail-closed".to_owned(),
            tb_pod_bin: None,
            pod_prefix_len: PodSubnets::default().prefix_len(),
            dual_stack: false,
        }
    }

    fn create(opts: TestbedBuilder) -> Result<Testbed> {
        if !rustix::process::geteuid().is_root() {
            bail!("privileged testbed requires root");
        }
        let std_cni_dir = STANDARD_CNI_DIRS
            .iter()
            .map(Path::new)
            .find(|d| d.join("bridge").is_file() && d.join("host-local").is_file())
            .context("bridge and host-local CNI plugins not found in /usr/lib/cni or /opt/cni/bin (install containernetworking-plugins)")?;
        let subnets = PodSubnets::new(opts.pod_prefix_len)?.with_ipv6(opts.dual_stack);

        fs::create_dir_all(STATE_ROOT).with_context(|| format!("creating {STATE_ROOT}"))?;
        // Serializes leftover cleanup and creation across processes, so one run never
        // takes another's half-made testbed for a leftover.
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(STATE_ROOT).join(".lock"))
            .context("opening the testbed lock")?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .context("locking the testbed lock")?;

        let cgroup_root = cgroup::cgroup2_root()?;
        leftovers::clean(&cgroup_root);
        ensure_bpffs()?;

        let pid = std::process::id();
        let id = loop {
            let id = format!("{pid}-{}", NEXT_TESTBED.fetch_add(1, Ordering::Relaxed));
            let taken = netns::list()
                .iter()
                .any(|n| n.starts_with(&format!("{NETNS_PREFIX}{id}-")))
                || cgroup_root.join(format!("{DIR_PREFIX}{id}")).exists()
                || Path::new(STATE_ROOT).join(&id).exists();
            if !taken {
                break id;
            }
        };
        names::register(&id);
        let state_dir = Path::new(STATE_ROOT).join(&id);
        let node_a = TestbedNode {
            id: NodeId::A,
            name: "a".to_owned(),
            netns: format!("{NETNS_PREFIX}{id}-node"),
            cgroup_path: cgroup_root.join(format!("{DIR_PREFIX}{id}")),
            bpffs_dir: Path::new(BPFFS_ROOT).join(format!("{DIR_PREFIX}{id}")),
            conflist_path: state_dir.join("itb.conflist"),
            state_dir: state_dir.clone(),
            conflist: Value::Null,
            plugin_types: Vec::new(),
            subnets,
        };
        let mut tb = Testbed {
            label: opts.label.clone(),
            nodes: vec![node_a],
            cni_bin_dir: state_dir.join("cni-bin"),
            state_dir,
            id,
            failure_policy: opts.failure_policy.clone(),
            tb_pod_bin: opts
                .tb_pod_bin
                .clone()
                .unwrap_or_else(|| bin_path("tb-pod")),
            tracker: Arc::default(),
            pods: Vec::new(),
            next_pod: 0,
            next_log: AtomicU32::new(0),
            last_add_timings: std::sync::Mutex::default(),
        };
        // On error `tb` is dropped here, which removes whatever was made so far.
        tb.setup(&opts, std_cni_dir)
            .with_context(|| format!("setting up testbed {} ({})", tb.id, tb.label))?;
        drop(lock);
        Ok(tb)
    }

    fn setup(&mut self, opts: &TestbedBuilder, std_cni_dir: &Path) -> Result<()> {
        fs::create_dir(&self.state_dir)
            .with_context(|| format!("creating {}", self.state_dir.display()))?;
        fs::write(self.state_dir.join("label"), format!("{}\n", self.label))?;
        fs::create_dir(self.state_dir.join("logs"))?;
        // The runtime finds plugins by `type` in CNI_PATH; links keep the real binaries
        // where they are installed.
        fs::create_dir(&self.cni_bin_dir)?;
        for plugin in ["bridge", "host-local"] {
            std::os::unix::fs::symlink(std_cni_dir.join(plugin), self.cni_bin_dir.join(plugin))?;
        }
        let conflist = self.make_node(&self.nodes[0], opts.interceptor_cni)?;
        let a = &mut self.nodes[0];
        a.plugin_types = cni::plugin_types(&conflist);
        a.conflist = conflist;
        Ok(())
    }

    /// Makes what every node has (state and agent dirs, netns, cgroup, conflist file)
    /// and returns the conflist. What it made is removed by [`Testbed::remove_node`].
    fn make_node(&self, node: &TestbedNode, with_interceptor_cni: bool) -> Result<Value> {
        fs::create_dir_all(&node.state_dir)
            .with_context(|| format!("creating {}", node.state_dir.display()))?;
        fs::create_dir(node.agent_state_dir())?;
        netns::create(&node.netns)?;
        if node.subnets.ipv6() {
            node::no_dad(&node.netns)?;
        }
        fs::create_dir(&node.cgroup_path)
            .with_context(|| format!("creating cgroup {}", node.cgroup_path.display()))?;
        let interceptor = if with_interceptor_cni {
            self.link_interceptor_cni()?;
            Some(cni::InterceptorCni {
                agent_socket: node.agent_socket().display().to_string(),
                failure_policy: self.failure_policy.clone(),
            })
        } else {
            None
        };
        let ipam_dir = node.state_dir.join("ipam");
        let conflist = cni::conflist_with_subnet(
            &ipam_dir.display().to_string(),
            &node.pod_subnet(),
            node.pod_subnet6().as_deref(),
            interceptor.as_ref(),
        );
        fs::write(&node.conflist_path, serde_json::to_vec_pretty(&conflist)?)?;
        Ok(conflist)
    }

    /// Links `interceptor-cni` into CNI_PATH (once; the nodes share the directory).
    fn link_interceptor_cni(&self) -> Result<()> {
        let link = self.cni_bin_dir.join("interceptor-cni");
        if link.symlink_metadata().is_ok() {
            return Ok(());
        }
        let bin = bin_path("interceptor-cni");
        if !bin.is_file() {
            bail!(
                "interceptor-cni binary not found at {} (build it, or set INTERCEPTOR_BIN_DIR)",
                bin.display()
            );
        }
        std::os::unix::fs::symlink(fs::canonicalize(bin)?, link)?;
        Ok(())
    }

    /// Adds node `name` (1 to 8 of `[a-z0-9-]`, unique): netns `itb-<id>-node-<name>`
    /// with forwarding on, a veth pair to node a (`itbl<k>` there, `itbl0` here;
    /// 192.168.255.<4k+1>/30 and <4k+2>/30), pod subnet `10.244.<k>.0/24` (the `k`-th
    /// block of the builder's [`PodSubnets`]) on its own
    /// bridge `itb0` (made by the first pod's ADD), routes between every node's pod
    /// subnet (through node a), and its own conflist, host-local data, cgroup
    /// `interceptor-tb-<id>-<name>`, bpffs dir and state dir `<state>/nodes/<name>`.
    /// The chain is bridge + host-local, plus interceptor-cni (calling this node's agent
    /// socket, the builder's failure policy) when `with_interceptor_cni`. On error,
    /// whatever was made is removed again.
    pub fn add_node(&mut self, name: &str, with_interceptor_cni: bool) -> Result<NodeId> {
        let a = &self.nodes[0];
        node::validate_name(name, &self.nodes, a.subnets.max_nodes())?;
        let id = NodeId(self.nodes.len());
        let cgroup_root = a
            .cgroup_path
            .parent()
            .context("node a's cgroup has no parent")?;
        let state_dir = self.state_dir.join("nodes").join(name);
        let mut node = TestbedNode {
            id,
            name: name.to_owned(),
            netns: format!("{}-{name}", a.netns),
            cgroup_path: cgroup_root.join(format!("{DIR_PREFIX}{}-{name}", self.id)),
            bpffs_dir: Path::new(BPFFS_ROOT).join(format!("{DIR_PREFIX}{}-{name}", self.id)),
            conflist_path: state_dir.join("itb.conflist"),
            state_dir,
            conflist: Value::Null,
            plugin_types: Vec::new(),
            subnets: a.subnets,
        };
        let others: Vec<&TestbedNode> = self.nodes[1..].iter().collect();
        let made = self
            .make_node(&node, with_interceptor_cni)
            .and_then(|conflist| {
                node::wire(&self.nodes[0], &node, &others)?;
                Ok(conflist)
            });
        match made {
            Ok(conflist) => {
                node.plugin_types = cni::plugin_types(&conflist);
                node.conflist = conflist;
            }
            Err(e) => {
                node::unroute(&node, &others);
                self.remove_node(&node);
                return Err(e.context(format!("adding node {name} to testbed {}", self.id)));
            }
        }
        self.nodes.push(node);
        Ok(id)
    }

    /// Removes what [`Testbed::make_node`] made (best effort, warnings on stderr). The
    /// node's processes must be gone or in its cgroup.
    fn remove_node(&self, node: &TestbedNode) {
        let warn = |what: &str, e: anyhow::Error| {
            eprintln!(
                "interceptor-testbed {}: cleanup node {} {what}: {e:#}",
                self.id, node.name
            );
        };
        if let Err(e) = netns::delete(&node.netns) {
            warn("netns", e);
        }
        if let Err(e) = cgroup::remove(&node.cgroup_path, Duration::from_secs(5)) {
            warn("cgroup", e);
        }
        for dir in [&node.bpffs_dir, &node.state_dir] {
            if dir.exists() {
                if let Err(e) = fs::remove_dir_all(dir) {
                    warn(&dir.display().to_string(), e.into());
                }
            }
        }
    }

    /// `<pid>-<n>`, unique on this machine while this process lives.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    /// The testbed's nodes, node a first (`nodes()[k].id() == NodeId` of index `k`).
    pub fn nodes(&self) -> &[TestbedNode] {
        &self.nodes
    }

    /// One node. Panics on a `NodeId` from another testbed that has more nodes.
    pub fn node(&self, node: NodeId) -> &TestbedNode {
        &self.nodes[node.0]
    }

    fn node_a(&self) -> &TestbedNode {
        &self.nodes[0]
    }

    /// [`Testbed::node`] as an error instead of a panic.
    fn get_node(&self, node: NodeId) -> Result<&TestbedNode> {
        self.nodes
            .get(node.0)
            .with_context(|| format!("testbed {} has no node {}", self.id, node.0))
    }

    /// Name of node a's network namespace (bridge, gateway, agent).
    pub fn node_netns(&self) -> &str {
        &self.node_a().netns
    }

    /// Node a's cgroup v2 directory, what its agent gets as `--cgroup`.
    pub fn cgroup_path(&self) -> &Path {
        &self.node_a().cgroup_path
    }

    /// `/run/interceptor-tb/<id>`: node a's state, and the other nodes' below `nodes/`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `/sys/fs/bpf/interceptor-tb-<id>`, node a's agent's `--bpffs` (the agent creates it).
    pub fn bpffs_dir(&self) -> &Path {
        &self.node_a().bpffs_dir
    }

    /// Node a's agent state dir, `<state>/agent`.
    pub fn agent_state_dir(&self) -> PathBuf {
        self.node_a().agent_state_dir()
    }

    /// The socket node a's interceptor-cni is configured to call.
    pub fn agent_socket(&self) -> PathBuf {
        self.node_a().agent_socket()
    }

    /// Directory used as CNI_PATH (all nodes): links named after each plugin `type`.
    pub fn cni_bin_dir(&self) -> &Path {
        &self.cni_bin_dir
    }

    /// Node a's conflist file.
    pub fn conflist_path(&self) -> &Path {
        &self.node_a().conflist_path
    }

    /// Node a's conflist as written to [`Testbed::conflist_path`].
    pub fn conflist(&self) -> &Value {
        &self.node_a().conflist
    }

    /// Node a's plugin `type`s in chain order.
    pub fn plugin_types(&self) -> &[String] {
        &self.node_a().plugin_types
    }

    /// Pods added and not deleted yet, on all nodes.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn tb_pod_bin(&self) -> &Path {
        &self.tb_pod_bin
    }

    /// [`Testbed::spawn_on`] node a.
    pub fn spawn_in(&self, netns: &str, in_cgroup: bool, cmd: Command) -> Result<Child> {
        self.spawn_on(NodeId::A, netns, in_cgroup, cmd)
    }

    /// Spawns `cmd` in network namespace `netns` and, if `in_cgroup`, in `node`'s cgroup
    /// (joined before the namespace switch, from fds opened here, so the child needs
    /// neither /sys nor `ip netns exec`). The child is killed when the testbed is
    /// dropped; if the caller reaps it first, that kill is a no-op (pidfd).
    pub fn spawn_on(
        &self,
        node: NodeId,
        netns: &str,
        in_cgroup: bool,
        cmd: Command,
    ) -> Result<Child> {
        let cgroup = match in_cgroup {
            true => Some(self.get_node(node)?.cgroup_path.clone()),
            false => None,
        };
        self.spawn_into(netns, cgroup.as_deref(), cmd)
    }

    /// Spawns `cmd` in network namespace `netns` and in a pod's cgroup below `node`'s, as
    /// kubelet's cgroupfs driver names it: `<node cgroup>/kubepods/besteffort/pod<uid>/
    /// <container>` (made here if missing; removed with the node's cgroup, with whatever
    /// runs in it, when the testbed goes). For an agent that finds the pods that ran
    /// before it by the UID in their processes' cgroups; `netns` may be the node's own (a
    /// hostNetwork pod). `uid` and `container` are single path components.
    pub fn spawn_in_pod_cgroup(
        &self,
        node: NodeId,
        netns: &str,
        uid: &str,
        container: &str,
        cmd: Command,
    ) -> Result<Child> {
        for part in [uid, container] {
            if part.is_empty() || part.contains('/') || part.starts_with('.') {
                bail!("{part:?} is not a cgroup name");
            }
        }
        let dir = self
            .get_node(node)?
            .cgroup_path
            .join("kubepods/besteffort")
            .join(format!("pod{uid}"))
            .join(container);
        fs::create_dir_all(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        self.spawn_into(netns, Some(&dir), cmd)
    }

    /// Spawns `cmd` in `netns` and, if given, cgroup directory `cgroup` (one of the
    /// testbed's, so its removal kills what is left there).
    fn spawn_into(&self, netns: &str, cgroup: Option<&Path>, mut cmd: Command) -> Result<Child> {
        let ns = netns::open(netns)?;
        let procs = match cgroup {
            Some(dir) => {
                let path = dir.join("cgroup.procs");
                Some(
                    File::options()
                        .write(true)
                        .open(&path)
                        .with_context(|| format!("opening {}", path.display()))?,
                )
            }
            None => None,
        };
        // SAFETY: the hook runs in the forked child before exec, where only
        // async-signal-safe work is allowed. It makes two raw syscalls (write, setns)
        // on descriptors opened before the fork, allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // "0" moves the writing process itself.
                    rustix::io::write(procs, b"0")?;
                }
                move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))?;
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {program} in {netns}"))?;
        if let Err(e) = self.tracker.track(child.id()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(child)
    }

    /// Spawns `cmd` in the pod's netns and the cgroup of the pod's node.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: Command) -> Result<Child> {
        self.spawn_on(pod.node, &pod.netns, true, cmd)
    }

    /// [`Testbed::start_agent_on`] node a.
    pub fn start_agent(&mut self, manifests: &Path, extra_args: &[&str]) -> Result<AgentProcess> {
        self.start_agent_on(NodeId::A, manifests, extra_args)
    }

    /// Starts `interceptor agent` in `node`'s netns and cgroup, with that node's bpffs
    /// and state dirs (output appended to [`TestbedNode::agent_log_path`]), and waits
    /// up to 20 s for `/readyz` on 127.0.0.1:15000 in that netns to answer 200.
    pub fn start_agent_on(
        &mut self,
        node: NodeId,
        manifests: &Path,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        self.start_agent_at(node, manifests, ADMIN_ADDR, extra_args)
    }

    /// [`Testbed::start_agent_on`] with the admin endpoint at `admin_addr` (a second agent
    /// beside the first: a hand-over).
    pub fn start_agent_at(
        &self,
        node: NodeId,
        manifests: &Path,
        admin_addr: &str,
        extra_args: &[&str],
    ) -> Result<AgentProcess> {
        let bin = bin_path("interceptor");
        if !bin.is_file() {
            bail!("interceptor binary not found at {}", bin.display());
        }
        let n = self.get_node(node)?;
        let log_path = n.agent_log_path();
        let log = procs::log_file(&log_path)?;
        let mut cmd = Command::new(&bin);
        cmd.arg("agent")
            .arg("--cgroup")
            .arg(&n.cgroup_path)
            .arg("--bpffs")
            .arg(&n.bpffs_dir)
            .arg("--state-dir")
            .arg(n.agent_state_dir())
            .arg("--manifests")
            .arg(manifests)
            .arg("--admin-addr")
            .arg(admin_addr)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = self.spawn_on(node, &n.netns, true, cmd)?;
        let mut agent = AgentProcess {
            proc: Owned::new(child, Arc::clone(&self.tracker))?,
            log_path,
        };
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        let mut last = String::from("no attempt");
        loop {
            if let Some(status) = agent.try_wait()? {
                bail!(
                    "agent on node {} exited ({status}) before it was ready; last /readyz: {last}\nagent.log tail:\n{}",
                    self.node(node).name,
                    procs::tail(&agent.log_path, 40)
                );
            }
            match self.admin_get_at(node, admin_addr, "/readyz") {
                Ok((200, _)) => return Ok(agent),
                Ok((code, body)) => last = format!("{code} {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                let log_path = agent.log_path.clone();
                agent.kill();
                bail!(
                    "agent on node {} not ready within {AGENT_READY_TIMEOUT:?}; last /readyz: {last}\nagent.log tail:\n{}",
                    self.node(node).name,
                    procs::tail(&log_path, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `GET path` on node a's admin endpoint: status code and body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        self.admin_get_on(NodeId::A, path)
    }

    /// `GET path` on `node`'s admin endpoint (127.0.0.1:15000 in that node's netns):
    /// status code and body.
    pub fn admin_get_on(&self, node: NodeId, path: &str) -> Result<(u16, String)> {
        self.admin_get_at(node, ADMIN_ADDR, path)
    }

    /// `GET path` on an admin endpoint at `admin_addr` in `node`'s netns.
    pub fn admin_get_at(
        &self,
        node: NodeId,
        admin_addr: &str,
        path: &str,
    ) -> Result<(u16, String)> {
        let addr: SocketAddr = admin_addr.parse()?;
        let stream = connect_in_netns(&self.get_node(node)?.netns, addr)?;
        http::get(stream, admin_addr, path).with_context(|| format!("GET {path}"))
    }

    /// `GET path` on `node`'s metrics port at the node's own address (the bridge's
    /// gateway, [`TestbedNode::gateway`]), from that node's netns: what a scraper on the
    /// network reaches, not loopback.
    pub fn metrics_get_on(&self, node: NodeId, path: &str) -> Result<(u16, String)> {
        let n = self.get_node(node)?;
        let addr = SocketAddr::from((n.gateway(), METRICS_PORT));
        let stream = connect_in_netns(&n.netns, addr)?;
        http::get(stream, &addr.to_string(), path).with_context(|| format!("GET {path} on {addr}"))
    }

    /// `GET path` from an HTTP endpoint listening at `addr` inside the pod's netns (a
    /// gateway's admin port).
    pub fn http_get_in_pod(
        &self,
        pod: &Pod,
        addr: SocketAddr,
        path: &str,
    ) -> Result<(u16, String)> {
        let stream = connect_in_netns(&pod.netns, addr)?;
        http::get(stream, &addr.to_string(), path)
            .with_context(|| format!("GET {path} in {}", pod.name))
    }

    /// A TCP connection from node a's netns (where the bridge's gateway address lives).
    pub fn connect_from_node(&self, addr: SocketAddr) -> Result<TcpStream> {
        self.connect_from_node_on(NodeId::A, addr)
    }

    /// A TCP connection from `node`'s netns.
    pub fn connect_from_node_on(&self, node: NodeId, addr: SocketAddr) -> Result<TcpStream> {
        connect_in_netns(&self.get_node(node)?.netns, addr)
    }

    /// [`Testbed::add_pod_on`] node a.
    pub fn add_pod(&mut self, namespace: &str, name: &str) -> Result<Pod> {
        self.add_pod_on(NodeId::A, namespace, name)
    }

    /// Creates netns `itb-<id>-p<k>-<name>`, brings `lo` up and runs `node`'s chain ADD
    /// the way a runtime does. On a plugin failure the plugins attempted so far get a
    /// DEL (reverse order, no prevResult), the netns is deleted, and the error
    /// (downcastable to [`CniError`]) is returned.
    pub fn add_pod_on(&mut self, node: NodeId, namespace: &str, name: &str) -> Result<Pod> {
        self.add_prepared_pod_on(node, namespace, name, |_| Ok(()))
    }

    /// Like [`Testbed::add_pod_on`], with `prepare` run on the new netns (by name) before
    /// the chain ADD: what a runtime or an earlier tenant may have left in it.
    pub fn add_prepared_pod_on(
        &mut self,
        node: NodeId,
        namespace: &str,
        name: &str,
        prepare: impl FnOnce(&str) -> Result<()>,
    ) -> Result<Pod> {
        self.get_node(node)?;
        let k = self.next_pod;
        self.next_pod += 1;
        let short = names::short_name(name);
        let netns = if short.is_empty() {
            format!("{NETNS_PREFIX}{}-p{k}", self.id)
        } else {
            format!("{NETNS_PREFIX}{}-p{k}-{short}", self.id)
        };
        let container_id = self.container_id(&format!("pod-{k}"));
        netns::create(&netns)?;
        let dual_stack = self.node(node).subnets.ipv6();
        let prepared = match dual_stack {
            true => node::no_dad(&netns),
            false => Ok(()),
        };
        if let Err(e) = prepared.and_then(|()| prepare(&netns)) {
            if let Err(de) = netns::delete(&netns) {
                eprintln!("interceptor-testbed {}: {de:#}", self.id);
            }
            return Err(e.context(format!("preparing the netns of {namespace}/{name}")));
        }
        let mut pod = Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            netns_path: netns_path(&netns),
            netns,
            container_id,
            ip: Ipv4Addr::UNSPECIFIED,
            ipv6: None,
            cni_result: Value::Null,
            node,
        };
        let added = self.chain_add(&pod).and_then(|result| {
            let (ip, ipv6) = result_ips(&result)?;
            if dual_stack && ipv6.is_none() {
                bail!("a dual-stack testbed's CNI result without an IPv6 address: {result}");
            }
            Ok((result, ip, ipv6))
        });
        match added {
            Ok((result, ip, ipv6)) => {
                pod.cni_result = result;
                pod.ip = ip;
                pod.ipv6 = ipv6;
                self.pods.push(pod.clone());
                Ok(pod)
            }
            Err(e) => {
                if let Err(de) = netns::delete(&pod.netns) {
                    eprintln!("interceptor-testbed {}: {de:#}", self.id);
                }
                Err(e.context(format!("adding pod {namespace}/{name}")))
            }
        }
    }

    /// CNI DEL (with the chain of the pod's node) for every plugin in reverse order with
    /// the cached ADD result as `prevResult`, then deletes the netns. Every plugin gets
    /// its DEL even if an earlier one failed; the first failure is returned. A pod
    /// already deleted is a no-op.
    pub fn del_pod(&mut self, pod: &Pod) -> Result<()> {
        let Some(pos) = self
            .pods
            .iter()
            .position(|p| p.container_id == pod.container_id)
        else {
            return Ok(());
        };
        let pod = self.pods.remove(pos);
        self.teardown_pod(&pod, PLUGIN_TIMEOUT)
    }

    fn teardown_pod(&self, pod: &Pod, timeout: Duration) -> Result<()> {
        let node = self.node(pod.node);
        let last = node.plugin_types.len().saturating_sub(1);
        let del = self.chain_del(node, last, pod, Some(&pod.cni_result), timeout);
        let ns = netns::delete(&pod.netns);
        del.and(ns)
            .with_context(|| format!("deleting pod {}/{}", pod.namespace, pod.name))
    }

    /// Runs one plugin of node a's chain (`plugin_index` into the conflist) in node a's
    /// netns with arbitrary stdin. Defaults: CNI_COMMAND=`command`, CNI_PATH,
    /// CNI_IFNAME=eth0 and a fresh CNI_CONTAINERID; `env_overrides` then set (`Some`) or
    /// remove (`None`) variables. A non-zero exit is not an error here.
    pub fn cni_raw(
        &self,
        command: &str,
        plugin_index: usize,
        env_overrides: &[(&str, Option<&str>)],
        stdin: &[u8],
    ) -> Result<CniOutput> {
        let container_id = self.container_id("raw");
        let mut env: Vec<(&str, Option<&str>)> = vec![
            ("CNI_IFNAME", Some(IFNAME)),
            ("CNI_CONTAINERID", Some(&container_id)),
        ];
        env.extend_from_slice(env_overrides);
        self.run_plugin(
            self.node_a(),
            plugin_index,
            command,
            &env,
            stdin,
            PLUGIN_TIMEOUT,
        )
    }

    /// The stdin a runtime would give plugin `index` of node a's chain: its conflist
    /// entry with `cniVersion` and `name` injected, plus `prevResult` if given.
    pub fn plugin_config(&self, index: usize, prev_result: Option<&Value>) -> Value {
        cni::plugin_config(&self.node_a().conflist, index, prev_result)
    }

    /// The runtime's environment for `pod` (without CNI_COMMAND and CNI_PATH).
    pub fn pod_cni_env(&self, pod: &Pod) -> Vec<(String, String)> {
        vec![
            ("CNI_CONTAINERID".into(), pod.container_id.clone()),
            ("CNI_NETNS".into(), pod.netns_path.display().to_string()),
            ("CNI_IFNAME".into(), IFNAME.into()),
            (
                "CNI_ARGS".into(),
                cni::cni_args(&pod.namespace, &pod.name, &pod.container_id),
            ),
        ]
    }

    fn chain_add(&self, pod: &Pod) -> Result<Value> {
        let node = self.node(pod.node);
        let env = self.pod_cni_env(pod);
        let env: Vec<(&str, Option<&str>)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect();
        let mut prev: Option<Value> = None;
        let mut timings = Vec::new();
        for (i, ty) in node.plugin_types.iter().enumerate() {
            let conf = cni::plugin_config(&node.conflist, i, prev.as_ref());
            let started = std::time::Instant::now();
            let outcome = self
                .run_plugin(
                    node,
                    i,
                    "ADD",
                    &env,
                    &serde_json::to_vec(&conf)?,
                    PLUGIN_TIMEOUT,
                )
                .and_then(|out| {
                    if !out.status.success() {
                        return Err(CniError::from_output(ty, "ADD", &out).into());
                    }
                    serde_json::from_str::<Value>(&out.stdout).with_context(|| {
                        format!("plugin {ty} ADD printed no JSON result: {:?}", out.stdout)
                    })
                });
            timings.push((ty.clone(), started.elapsed()));
            match outcome {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    // A runtime tears down what it attempted; the failing plugin too,
                    // since it may have done part of its work.
                    if let Err(de) = self.chain_del(node, i, pod, None, PLUGIN_TIMEOUT) {
                        eprintln!(
                            "interceptor-testbed {}: DEL after failed ADD: {de:#}",
                            self.id
                        );
                    }
                    return Err(e);
                }
            }
        }
        *self
            .last_add_timings
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = timings;
        prev.ok_or_else(|| anyhow!("the CNI chain is empty"))
    }

    /// How long each plugin (by type) of the last chain ADD took, in chain order: the
    /// scale bench reads interceptor-cni's share.
    pub fn last_add_timings(&self) -> Vec<(String, Duration)> {
        self.last_add_timings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn chain_del(
        &self,
        node: &TestbedNode,
        last: usize,
        pod: &Pod,
        cached: Option<&Value>,
        timeout: Duration,
    ) -> Result<()> {
        let env = self.pod_cni_env(pod);
        let env: Vec<(&str, Option<&str>)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), Some(v.as_str())))
            .collect();
        let mut first_err: Option<anyhow::Error> = None;
        for i in (0..=last.min(node.plugin_types.len().saturating_sub(1))).rev() {
            let conf = cni::plugin_config(&node.conflist, i, cached);
            let stdin = serde_json::to_vec(&conf)?;
            let err = match self.run_plugin(node, i, "DEL", &env, &stdin, timeout) {
                Ok(out) if out.status.success() => continue,
                Ok(out) => CniError::from_output(&node.plugin_types[i], "DEL", &out).into(),
                Err(e) => e,
            };
            first_err.get_or_insert(err);
        }
        first_err.map_or(Ok(()), Err)
    }

    fn run_plugin(
        &self,
        node: &TestbedNode,
        index: usize,
        command: &str,
        env: &[(&str, Option<&str>)],
        stdin: &[u8],
        timeout: Duration,
    ) -> Result<CniOutput> {
        let ty = node
            .plugin_types
            .get(index)
            .with_context(|| format!("no plugin {index} in the chain {:?}", node.plugin_types))?;
        let mut cmd = Command::new(self.cni_bin_dir.join(ty));
        for var in cni::CNI_VARS {
            cmd.env_remove(var);
        }
        cmd.env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_bin_dir);
        for (k, v) in env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_on(node.id, &node.netns, false, cmd)?;
        let collected = procs::collect(
            Owned::new(child, Arc::clone(&self.tracker))?,
            stdin,
            timeout,
        )
        .with_context(|| format!("running CNI plugin {ty} {command} on node {}", node.name))?;
        Ok(CniOutput {
            status: collected.status,
            stdout: String::from_utf8_lossy(&collected.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&collected.stderr).into_owned(),
        })
    }

    /// 64 hex digits, like a runtime's sandbox id, unique per call.
    fn container_id(&self, what: &str) -> String {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = self.next_log.fetch_add(1, Ordering::Relaxed);
        let digest = Sha256::digest(format!("{}/{what}/{n}/{nanos}", self.id));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn tb_pod_command(&self, args: &[&str]) -> Result<Command> {
        if !self.tb_pod_bin.is_file() {
            bail!("tb-pod binary not found at {}", self.tb_pod_bin.display());
        }
        let mut cmd = Command::new(&self.tb_pod_bin);
        cmd.args(args);
        Ok(cmd)
    }

    /// Runs `tb-pod <args>` in the pod (e.g. `["echo", "--listen", "0.0.0.0:9000"]`) and
    /// waits up to 10 s for its READY line. Stderr goes to `<state>/logs/`.
    pub fn spawn_server(&self, pod: &Pod, args: &[&str]) -> Result<ServerProcess> {
        let mut cmd = self.tb_pod_command(args)?;
        let n = self.next_log.fetch_add(1, Ordering::Relaxed);
        let stderr_path = self
            .state_dir
            .join("logs")
            .join(format!("{}-server-{n}.stderr", pod.name));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(procs::log_file(&stderr_path)?);
        let child = self.spawn_in_pod(pod, cmd)?;
        let proc = Owned::new(child, Arc::clone(&self.tracker))?;
        ServerProcess::start(proc, stderr_path, SERVER_READY_TIMEOUT)
            .with_context(|| format!("starting tb-pod {args:?} in pod {}", pod.name))
    }

    /// Runs `tb-pod client <args>` in the pod, waits up to 60 s and parses its report.
    /// Connection errors are in the report; a non-zero exit is an error.
    pub fn run_client(&self, pod: &Pod, args: &[&str]) -> Result<ClientReport> {
        let mut full = vec!["client"];
        full.extend_from_slice(args);
        let line = self.run_tb_pod_line(pod, &full, CLIENT_TIMEOUT)?;
        serde_json::from_str(&line).with_context(|| format!("parsing client report {line:?}"))
    }

    /// Runs `tb-pod <args>` in the pod to completion (killed after `timeout`) and parses
    /// the last line it printed as JSON: for `connrate` and `rr`, e.g.
    /// `["rr", "--connect", "10.244.1.2:9000", "--size", "64", "--duration-ms", "2000"]`.
    /// A non-zero exit is an error.
    pub fn run_tb_pod(&self, pod: &Pod, args: &[&str], timeout: Duration) -> Result<Value> {
        let line = self.run_tb_pod_line(pod, args, timeout)?;
        serde_json::from_str(&line).with_context(|| format!("parsing tb-pod output {line:?}"))
    }

    /// Starts `tb-pod <args>` in the pod and returns at once; [`TbPodRun::finish`] waits
    /// for its JSON report. Unlike [`Testbed::run_tb_pod`] the run borrows nothing, so
    /// long runs can overlap pods being added and deleted (the soak).
    pub fn spawn_tb_pod(&self, pod: &Pod, args: &[&str]) -> Result<TbPodRun> {
        let mut cmd = self.tb_pod_command(args)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_in_pod(pod, cmd)?;
        Ok(TbPodRun {
            proc: Owned::new(child, Arc::clone(&self.tracker))?,
            what: format!("{args:?} in pod {}", pod.name),
        })
    }

    /// The last non-empty stdout line of `tb-pod <args>` run in the pod.
    fn run_tb_pod_line(&self, pod: &Pod, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = self.tb_pod_command(args)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = self.spawn_in_pod(pod, cmd)?;
        let out = procs::collect(Owned::new(child, Arc::clone(&self.tracker))?, &[], timeout)
            .with_context(|| format!("tb-pod {args:?} in pod {}", pod.name))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "tb-pod {args:?} exited with {}: {}",
                out.status,
                stderr.trim()
            );
        }
        let line = stdout
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .with_context(|| format!("tb-pod {args:?} printed nothing; stderr: {stderr}"))?;
        Ok(line.to_owned())
    }

    fn cleanup(&mut self) {
        let id = self.id.clone();
        let warn = |what: &str, e: anyhow::Error| {
            eprintln!("interceptor-testbed {id}: cleanup {what}: {e:#}");
        };
        self.tracker.kill_all(Duration::from_secs(5));
        // Descendants the tracker never saw (the agents' helpers, daemonized children).
        for node in &self.nodes {
            cgroup::kill_all(&node.cgroup_path);
        }
        let pods: Vec<Pod> = self.pods.drain(..).rev().collect();
        for pod in &pods {
            if let Err(e) = self.teardown_pod(pod, DROP_PLUGIN_TIMEOUT) {
                warn("pod", e);
            }
        }
        // The extra nodes first (their veth pairs go with their netns), node a last.
        for node in self.nodes.iter().rev() {
            self.remove_node(node);
        }
        if self.state_dir.exists() {
            if let Err(e) = fs::remove_dir_all(&self.state_dir) {
                warn(&self.state_dir.display().to_string(), e.into());
            }
        }
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.cleanup();
        names::unregister(&self.id);
    }
}

/// The IPv4 address (required) and the IPv6 one (if any) of a CNI result's `ips`, e.g.
/// "10.244.0.2/24" and "fd00:10:244::2/64".
fn result_ips(result: &Value) -> Result<(Ipv4Addr, Option<Ipv6Addr>)> {
    let mut ipv4 = None;
    let mut ipv6 = None;
    for entry in result["ips"].as_array().into_iter().flatten() {
        let addr = entry["address"]
            .as_str()
            .with_context(|| format!("CNI result ips entry without address: {result}"))?;
        let ip: std::net::IpAddr = addr
            .split('/')
            .next()
            .unwrap_or_default()
            .parse()
            .with_context(|| format!("CNI result address {addr:?} is not an IP address"))?;
        match ip {
            std::net::IpAddr::V4(v4) => ipv4 = ipv4.or(Some(v4)),
            std::net::IpAddr::V6(v6) => ipv6 = ipv6.or(Some(v6)),
        }
    }
    let ipv4 = ipv4.with_context(|| format!("CNI result without an IPv4 address: {result}"))?;
    Ok((ipv4, ipv6))
}

/// Mounts bpffs at /sys/fs/bpf unless one is there already (the agent pins below it).
fn ensure_bpffs() -> Result<()> {
    let root = Path::new(BPFFS_ROOT);
    let is_bpffs = |p: &Path| {
        // f_type is a signed long; the magic only fits when read back as u32.
        rustix::fs::statfs(p).is_ok_and(|st| st.f_type as u32 == BPF_FS_MAGIC)
    };
    if is_bpffs(root) {
        return Ok(());
    }
    fs::create_dir_all(root).with_context(|| format!("creating {BPFFS_ROOT}"))?;
    rustix::mount::mount("bpf", root, "bpf", rustix::mount::MountFlags::empty(), None)
        .with_context(|| format!("mounting bpffs at {BPFFS_ROOT}"))?;
    if !is_bpffs(root) {
        bail!("{BPFFS_ROOT} is not bpffs after mounting it");
    }
    Ok(())
}

/// `text` without its ANSI escape sequences (CSI: ESC [ params final-byte), such as the
/// colours tracing puts around field names and values in a log written to a file.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ip_from_result() {
        let r = json!({"cniVersion":"1.0.0","ips":[{"address":"10.244.0.7/24","gateway":"10.244.0.1"}]});
        assert_eq!(
            result_ips(&r).unwrap(),
            (Ipv4Addr::new(10, 244, 0, 7), None)
        );
        assert!(result_ips(&json!({"ips":[]})).is_err());
        assert!(result_ips(&json!({"ips":[{"address":"fd00::2/64"}]})).is_err());
        let dual = json!({"ips":[{"address":"fd00:10:244::2/64"},{"address":"10.244.0.2/24"}]});
        assert_eq!(
            result_ips(&dual).unwrap(),
            (
                Ipv4Addr::new(10, 244, 0, 2),
                Some("fd00:10:244::2".parse().unwrap())
            )
        );
    }

    #[test]
    fn missing_binary_names_the_debug_path() {
        assert!(bin_path("no-such-binary").ends_with("debug/no-such-binary"));
    }
}
