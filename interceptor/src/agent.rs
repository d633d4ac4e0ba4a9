//! The node agent's state: which pods the CNI plugin handed us, which are enrolled, the
//! routing snapshot, and the enrollment logic the CNI server calls into; pods that ran
//! before the agent (no CNI ADD) are found in `/proc` and enrolled the same way.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync::{lock, read, write};
use std::time::Duration;

use interceptor_cni::protocol::{codes, AgentResponse, PodSandbox};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::datapath::{Datapath, DatapathError, PodDatapath};
use crate::inpod::discover::{FoundNetns, ProcScanner};
use crate::inpod::{InPodSockets, PodNetns};
use crate::model::{Model, PodAddrs, PodKey};
use crate::proxy::listener::{self, ListenerContext};
use crate::proxy::routes::LastValid;
use crate::proxy::socket::{HostSockets, SocketFactory};
use crate::proxy::{ConnectionLog, Direction, RouteTable, Upstreams};
use crate::source::manifests::ManifestState;

/// A pod the CNI plugin told us about, or one found running in `/proc`.
struct PodEntry {
    /// The CNI request that added the pod, kept to re-adopt it after a restart (for a pod
    /// found in `/proc`, one made up from what was found).
    sandbox: PodSandbox,
    origin: Origin,
    container_id: String,
    netns_path: PathBuf,
    ipv4: Option<Ipv4Addr>,
    /// The pod's IPv6 address from the CNI result (a dual-stack pod).
    ipv6: Option<Ipv6Addr>,
    reason: String,
    enrolled: Option<EnrolledPod>,
    /// Listeners of an enrollment the pod left while running, finishing the connections
    /// they had open; aborted when the pod goes.
    leaving: Vec<AbortOnDrop>,
}

/// How the agent came to know a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Origin {
    /// A CNI ADD (or its record, adopted after a restart).
    Cni,
    /// Found running in `/proc` by its UID: the pod predates every agent on the node.
    Discovered {
        uid: String,
        /// The containers of its processes (cgroup names): the sandbox's, which a CNI DEL
        /// for the pod names, is among them.
        container_ids: BTreeSet<String>,
    },
}

impl Origin {
    fn name(&self) -> &'static str {
        match self {
            Origin::Cni => "cni",
            Origin::Discovered { .. } => "discovered",
        }
    }

    fn uid(&self) -> Option<&str> {
        match self {
            Origin::Cni => None,
            Origin::Discovered { uid, .. } => Some(uid),
        }
    }
}

/// One entry of the state dir's pod list: the CNI request that added the pod or, for a
/// pod found in `/proc`, one made up from what was found, with the pod's UID. The netns
/// path of a found pod (`/proc/<pid>/ns/net`) dies with that process and may name
/// another process's netns later, so the next agent finds the pod again by its UID
/// rather than trusting the path. (Bind-mounting the netns under the state dir would
/// keep the path valid, but also keep a deleted pod's netns alive whenever no CNI DEL
/// comes to unmount it; a scan by UID leaves nothing behind to clean up.)
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct RememberedPod {
    #[serde(flatten)]
    sandbox: PodSandbox,
    /// camelCase, as the sandbox's fields beside it.
    #[serde(
        default,
        rename = "discoveredUid",
        skip_serializing_if = "Option::is_none"
    )]
    discovered_uid: Option<String>,
}

/// A pod the model enrolls on this node, with no CNI ADD record, whose netns was not
/// found: one row of `/config_dump`'s `pods_not_found`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PodNotFound {
    pub pod: String,
    pub uid: String,
    pub reason: String,
}

/// Where a pod found in `/proc` lives: a netns of its processes that holds its IP.
struct Located {
    path: PathBuf,
    cookie: u64,
    ifname: String,
    container_id: String,
    container_ids: BTreeSet<String>,
}

/// The live interception of one pod; dropping it stops the listeners and their
/// connections ([`EnrolledPod::leave`] lets the connections finish instead).
struct EnrolledPod {
    netns: Arc<PodNetns>,
    datapath: PodDatapath,
    listeners: Vec<JoinHandle<()>>,
    /// Tells the listeners the pod left the mesh.
    leave: watch::Sender<bool>,
    /// The pod's own exclusion/inclusion rules, from its annotations.
    rules: crate::config::MeshConfig,
    /// Annotation entries that were invalid and skipped.
    rule_warnings: Vec<String>,
    /// The IPv6 address intercepted too (eBPF mode, IPv6 on), with its own listeners.
    ipv6: Option<Ipv6Addr>,
    /// With `--same-node-direct`: the pod's inbound side, served by other pods' outbound
    /// proxies while this lives.
    _same_node: Option<listener::SameNodeEntry>,
}

impl Drop for EnrolledPod {
    fn drop(&mut self) {
        for listener in &self.listeners {
            listener.abort();
        }
    }
}

impl EnrolledPod {
    /// The pod leaves the mesh while it runs: its listeners stop accepting and end once
    /// their open connections have (returned, to be aborted if the pod goes first).
    fn leave(mut self) -> Vec<AbortOnDrop> {
        self.leave.send_replace(true);
        std::mem::take(&mut self.listeners)
            .into_iter()
            .map(AbortOnDrop)
            .collect()
    }
}

/// One row of `/config_dump`'s pod list.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address from the CNI result, if it has one.
    pub ipv6: Option<Ipv6Addr>,
    /// Whether its IPv6 is intercepted too (eBPF mode, IPv6 on in the node).
    pub ipv6_intercepted: bool,
    pub enrolled: bool,
    pub reason: String,
    pub netns_cookie: Option<u64>,
    /// How the agent came to know the pod: `cni` (an ADD) or `discovered` (running in
    /// `/proc` before the agent started).
    pub origin: &'static str,
    /// The pod's UID, for a discovered pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The pod's own rules (from annotations), added to the global ones.
    pub rules: Option<crate::config::MeshConfig>,
    /// Annotation entries that were invalid and skipped: pod, key, value, why.
    pub rule_warnings: Vec<String>,
}

/// What CNI ADD does for a pod the model still lacks after the wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownPod {
    /// Fail the ADD (code 3): kubelet retries, and the pod never runs unintercepted.
    #[default]
    Reject,
    /// Let the pod start, not intercepted (logged).
    Admit,
}

/// How an [`Agent`] behaves.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// Whether sockmap is on (proxy-to-proxy sockets then need the userspace copy).
    pub sockmap: bool,
    /// Where the pods handed over by CNI are remembered across restarts.
    pub pods_file: Option<PathBuf>,
    /// How long an ADD for a pod the model does not have yet waits for it.
    pub unknown_pod_wait: Duration,
    pub unknown_pod: UnknownPod,
    /// `--access-log`: one JSON line per finished connection on stdout.
    pub access_log: bool,
    /// How long a client of a port routed by server name has to send its ClientHello;
    /// `None`: [`crate::proxy::sni::DEFAULT_CLIENT_HELLO_TIMEOUT`].
    pub client_hello_timeout: Option<Duration>,
    /// Where pods that ran before the agent are looked for; `None`: they are not.
    pub discovery: Option<ProcScanner>,
    /// This node's name, when known: only model pods scheduled here are looked for.
    pub node_name: Option<String>,
    /// `--same-node-direct`: connections between enrolled pods of this node take one
    /// proxy hop (the client's), which does the destination's inbound checks.
    pub same_node_direct: bool,
}

pub struct Agent {
    datapath: Arc<dyn Datapath>,
    model: watch::Receiver<ManifestState>,
    pods: Mutex<HashMap<PodKey, PodEntry>>,
    routes: Arc<RwLock<Arc<RouteTable>>>,
    log: Arc<ConnectionLog>,
    /// Circuit breakers, rate-limit buckets and endpoint health of every pod's listeners.
    upstreams: Arc<Upstreams>,
    /// The inbound sides of this node's enrolled pods (`--same-node-direct`).
    same_node: Option<Arc<listener::SameNodePods>>,
    /// Where the pods handed over by CNI are remembered across restarts.
    pods_file: Option<PathBuf>,
    /// How long an ADD for a pod the model does not have yet waits for it to appear.
    unknown_pod_wait: Duration,
    unknown_pod: UnknownPod,
    /// Whether sockmap is on (proxy-to-proxy sockets then need the userspace copy).
    sockmap: bool,
    client_hello_timeout: Duration,
    /// Finds pods that ran before the agent ([`Agent::discover_running`]).
    discovery: Option<ProcScanner>,
    node_name: Option<String>,
    /// Pods to enroll whose netns was not found, and why (the last attempt).
    not_found: Mutex<BTreeMap<PodKey, PodNotFound>>,
    /// Set once the pods of `pods.json` are adopted for good ([`Agent::restore`] with
    /// `prune`): before that, a pod found in `/proc` may be one a remembered CNI ADD (or a
    /// predecessor still serving) already covers, so nothing is looked for.
    adopted: AtomicBool,
    /// IPv6 is on in the agent's netns: dual-stack pods get their IPv6 intercepted too
    /// where the mode can. Off, nothing IPv6 is attempted (no listener could bind).
    ipv6: bool,
    ready: AtomicBool,
    /// Set when the agent drains: every listener stops accepting (see [`Agent::drain`]).
    draining: watch::Sender<bool>,
    /// Cleared while [`Agent::restore`] adopts pods: listeners hold off accepting until
    /// the route table knows every adopted pod.
    accepting: watch::Sender<bool>,
    /// FSM's permissive traffic policy mode (the default); off is SMI mode.
    permissive: AtomicBool,
    /// FSM's `enableEgress` (the default); off refuses what leaves the mesh.
    egress: AtomicBool,
    /// Held from reading the inputs of a route table to storing it: a build that read an
    /// older mode or model never lands after a newer one. It holds what builds carry
    /// from one to the next: the last valid version of each upstream settings object.
    rebuild: Mutex<LastValid>,
    /// Route table builds asked for (see [`Agent::request_routes`]), coalesced.
    routes_requests: crate::sync::Coalesced,
    /// Bumped each time a route table is stored; listeners of a just-added pod wait on it.
    routes_published: watch::Sender<u64>,
    /// This agent, for the builder task a request starts.
    me: std::sync::Weak<Agent>,
    /// Held by whatever changes a pod's enrollment (CNI ADD and DEL, a model change that
    /// enrolls or unenrolls running pods), so they never interleave on one pod.
    pod_changes: tokio::sync::Mutex<()>,
}

/// How often a drain checks whether every listener is done.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// A task that is aborted when this handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A failed CNI request, with the CNI error code to answer.
#[derive(Debug)]
pub struct CniFailure {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniFailure {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn into_response(self) -> AgentResponse {
        AgentResponse::Error {
            code: self.code,
            msg: self.msg,
            details: self.details,
        }
    }
}

impl Agent {
    pub fn new(
        datapath: Arc<dyn Datapath>,
        model: watch::Receiver<ManifestState>,
        options: AgentOptions,
    ) -> Arc<Self> {
        let metrics = crate::proxy::metrics::ProxyMetrics::with_collector(Box::new(
            crate::datapath::metrics::DatapathCollector(Arc::clone(&datapath)),
        ));
        let access_log = options.access_log.then(crate::proxy::AccessLog::stdout);
        let log = Arc::new(ConnectionLog::new(metrics, access_log));
        let ipv6 = crate::datapath::probe::ipv6_on();
        if !ipv6 {
            tracing::info!("IPv6 is off on this node: pods are intercepted over IPv4 only");
        } else if !datapath.supports_ipv6() {
            tracing::warn!(
                mode = datapath.mode(),
                "IPv6 cannot be intercepted in this mode: pods with an IPv6 address are refused"
            );
        }
        let agent = Arc::new_cyclic(|me| Self {
            datapath,
            model,
            pods: Mutex::new(HashMap::new()),
            routes: Arc::new(RwLock::new(Arc::new(RouteTable::default()))),
            upstreams: Arc::new(Upstreams::new(log.metrics().upstream())),
            same_node: options.same_node_direct.then(Default::default),
            log,
            pods_file: options.pods_file,
            sockmap: options.sockmap,
            client_hello_timeout: options
                .client_hello_timeout
                .unwrap_or(crate::proxy::sni::DEFAULT_CLIENT_HELLO_TIMEOUT),
            ipv6,
            unknown_pod_wait: options.unknown_pod_wait,
            unknown_pod: options.unknown_pod,
            discovery: options.discovery,
            node_name: options.node_name,
            not_found: Mutex::default(),
            adopted: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            draining: watch::Sender::new(false),
            accepting: watch::Sender::new(true),
            permissive: AtomicBool::new(true),
            egress: AtomicBool::new(true),
            rebuild: Mutex::default(),
            routes_requests: crate::sync::Coalesced::default(),
            routes_published: watch::Sender::new(0),
            me: me.clone(),
            pod_changes: tokio::sync::Mutex::new(()),
        });
        agent.rebuild_routes();
        agent
    }

    pub fn datapath(&self) -> &Arc<dyn Datapath> {
        &self.datapath
    }

    pub fn model(&self) -> Arc<Model> {
        self.model.borrow().model.clone()
    }

    /// Generation and last load error of the model source.
    pub fn source_state(&self) -> (u64, Option<String>) {
        let state = self.model.borrow();
        (state.generation, state.last_error.clone())
    }

    /// Switch between permissive and SMI traffic policy mode; new connections follow.
    pub fn set_permissive(&self, permissive: bool) {
        if self.permissive.swap(permissive, Ordering::SeqCst) != permissive {
            tracing::info!(permissive, "traffic policy mode changed");
            self.rebuild_routes();
        }
    }

    /// Let enrolled pods reach destinations outside the mesh, or not (FSM's
    /// `enableEgress`); new connections follow.
    pub fn set_egress(&self, egress: bool) {
        if self.egress.swap(egress, Ordering::SeqCst) != egress {
            tracing::info!(egress, "egress policy changed");
            self.rebuild_routes();
        }
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &crate::proxy::metrics::ProxyMetrics {
        self.log.metrics()
    }

    pub fn connection_log(&self) -> Vec<crate::proxy::ConnectionRecord> {
        self.log.snapshot()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Stop accepting on every pod's listeners at once (they close, so the kernel sends
    /// new connections to the next agent's listeners beside them) and wait until the
    /// connections already accepted end or `timeout` passes. `/readyz` turns 503.
    /// Returns how many connections were still open at the deadline; those end with the
    /// process (closed, or reset when unread data is left).
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.ready.store(false, Ordering::SeqCst);
        self.draining.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let serving = {
                let pods = lock(&self.pods);
                pods.values()
                    .filter_map(|entry| entry.enrolled.as_ref())
                    .flat_map(|enrolled| enrolled.listeners.iter())
                    .any(|listener| !listener.is_finished())
            };
            if !serving || tokio::time::Instant::now() >= deadline {
                return self.log.open_connections();
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Whether another agent has taken this one's place: the pid file in the state dir
    /// names another live agent. A superseded agent answers no CNI request and writes no
    /// pod list (the new agent owns both).
    pub fn superseded(&self) -> Option<i32> {
        let state_dir = self.pods_file.as_ref()?.parent()?;
        crate::cleanup::running_agent(state_dir)
    }

    pub fn service_ports(&self) -> usize {
        read(&self.routes).service_ports()
    }

    /// Every Service VIP:port (IPv4 and IPv6) with its policy and endpoints.
    pub fn service_routes(&self) -> Vec<crate::proxy::routes::ServiceRouteView> {
        read(&self.routes).service_routes()
    }

    /// Whether each routing object is in force, and why not.
    pub fn route_statuses(&self) -> Vec<crate::proxy::RouteStatus> {
        read(&self.routes).statuses().to_vec()
    }

    /// The endpoints to check actively: pods enrolled on this node from inside their
    /// netns, endpoints outside the mesh directly. A mesh pod on another node is checked by
    /// its own node's agent: a check through its inbound listener would meet the mesh's
    /// policies (SMI access, rate limits) as a client from the node's address.
    fn check_targets(&self) -> Vec<crate::proxy::upstream::CheckTarget> {
        let table = read(&self.routes).clone();
        let local: HashMap<IpAddr, Arc<PodNetns>> = lock(&self.pods)
            .values()
            .filter_map(|entry| Some((entry, entry.enrolled.as_ref()?)))
            .flat_map(|(entry, enrolled)| {
                let ips = entry.ipv4.map(IpAddr::V4).into_iter();
                ips.chain(entry.ipv6.map(IpAddr::V6))
                    .map(|ip| (ip, Arc::clone(&enrolled.netns)))
            })
            .collect();
        table
            .checked_endpoints()
            .iter()
            .filter_map(|c| {
                let sockets: Arc<dyn SocketFactory> = match local.get(&c.addr.ip()) {
                    Some(netns) => Arc::new(InPodSockets::new(Arc::clone(netns))),
                    None if !c.in_mesh => Arc::new(HostSockets),
                    None => return None,
                };
                Some(crate::proxy::upstream::CheckTarget {
                    addr: c.addr,
                    settings: Arc::clone(&c.settings),
                    sockets,
                })
            })
            .collect()
    }

    /// The state of every endpoint the proxy has connected to, for `/config_dump`.
    pub fn upstream_endpoints(&self) -> Vec<crate::proxy::upstream::EndpointSnapshot> {
        self.upstreams.snapshot()
    }

    /// Follow model changes (every new model means a new routing snapshot) and run the
    /// active health checks the snapshot asks for.
    pub fn spawn_model_follower(self: &Arc<Self>) -> JoinHandle<()> {
        let agent = Arc::clone(self);
        let mut rx = self.model.clone();
        let follow = async move {
            while rx.changed().await.is_ok() {
                agent.request_routes();
                // Running pods follow label and annotation changes; changes that arrive
                // meanwhile are taken together in the next round.
                if agent.reconcile_enrollment().await {
                    agent.request_routes();
                }
                // Pods new to the model may have been running before the agent.
                agent.discover_running().await;
            }
        };
        let checker = Arc::clone(self);
        let checks =
            crate::proxy::upstream::run_health_checks(Arc::clone(&self.upstreams), move || {
                checker.check_targets()
            });
        // Its own task: whatever happens to the checker, routes keep following the model;
        // it ends with the follower (aborted or not).
        let checks = AbortOnDrop(tokio::spawn(checks));
        tokio::spawn(async move {
            let _checks = checks;
            follow.await;
        })
    }

    fn rebuild_routes(&self) {
        let mut last_valid = lock(&self.rebuild);
        let (pod_ips, enrolled): (HashMap<PodKey, PodAddrs>, HashSet<Ipv4Addr>) = {
            let pods = lock(&self.pods);
            let ips = pods
                .iter()
                .map(|(key, entry)| {
                    let addrs = PodAddrs {
                        v4: entry.ipv4,
                        v6: entry.ipv6,
                    };
                    (key.clone(), addrs)
                })
                .filter(|(_, addrs)| addrs.iter().next().is_some())
                .collect();
            let enrolled = pods
                .values()
                .filter(|entry| entry.enrolled.is_some())
                .filter_map(|entry| entry.ipv4)
                .collect();
            (ips, enrolled)
        };
        let permissive = self.permissive.load(Ordering::SeqCst);
        let model = self.model();
        let mut table = RouteTable::build(&model, &pod_ips, enrolled, permissive, &mut last_valid);
        table.set_egress(&model, self.egress.load(Ordering::SeqCst));
        self.upstreams.retain(|addr| table.is_endpoint(addr));
        self.log
            .metrics()
            .retain_backends(|name| table.names_backend(name));
        *write(&self.routes) = Arc::new(table);
        self.routes_published.send_modify(|n| *n += 1);
    }

    /// Ask for a new route table without waiting for it: built off the caller's path (a
    /// table costs O(cluster), a CNI ADD must not), and requests that arrive while one is
    /// being built are coalesced into the next build. Outside a tokio runtime it builds
    /// in place. Below the CNI path's priority: on a busy node a table of a large cluster
    /// must not hold up the next pod's ADD.
    fn request_routes(&self) {
        crate::sync::request_in_background(
            self,
            &self.me,
            |agent| &agent.routes_requests,
            Agent::rebuild_routes,
        );
    }

    pub fn pod_statuses(&self) -> Vec<PodStatus> {
        let pods = lock(&self.pods);
        let mut statuses: Vec<PodStatus> = pods
            .iter()
            .map(|(key, entry)| PodStatus {
                pod: key.to_string(),
                container_id: entry.container_id.clone(),
                netns: entry.netns_path.clone(),
                ip: entry.ipv4,
                ipv6: entry.ipv6,
                ipv6_intercepted: entry.enrolled.as_ref().is_some_and(|e| e.ipv6.is_some()),
                enrolled: entry.enrolled.is_some(),
                reason: entry.reason.clone(),
                netns_cookie: entry.enrolled.as_ref().map(|e| e.datapath.netns_cookie),
                origin: entry.origin.name(),
                uid: entry.origin.uid().map(str::to_owned),
                rules: entry.enrolled.as_ref().map(|e| e.rules.clone()),
                rule_warnings: entry
                    .enrolled
                    .as_ref()
                    .map(|e| e.rule_warnings.clone())
                    .unwrap_or_default(),
            })
            .collect();
        statuses.sort_by(|a, b| a.pod.cmp(&b.pod));
        statuses
    }

    /// CNI ADD: remember the pod and, when the model enrolls it, intercept it.
    /// All-or-nothing: on error nothing of this pod stays in the data path.
    pub async fn add(&self, sandbox: &PodSandbox) -> Result<AgentResponse, CniFailure> {
        let _changing = self.pod_changes.lock().await;
        self.add_as(sandbox, Origin::Cni, None).await
    }

    /// [`Agent::add`] under `pod_changes`, for a pod known as `origin`; with
    /// `expect_cookie`, the netns must still be the one checked (a `/proc/<pid>/ns/net`
    /// path names another netns once the pid is reused).
    async fn add_as(
        &self,
        sandbox: &PodSandbox,
        origin: Origin,
        expect_cookie: Option<u64>,
    ) -> Result<AgentResponse, CniFailure> {
        let key = pod_key(sandbox)?;
        if sandbox.netns.is_empty() {
            return Err(CniFailure::new(
                codes::INVALID_ENVIRONMENT,
                "CNI_NETNS is empty",
            ));
        }
        let netns_path = PathBuf::from(&sandbox.netns);
        if !netns_path.exists() {
            return Err(CniFailure::new(
                codes::UNKNOWN_CONTAINER,
                format!("network namespace {} does not exist", sandbox.netns),
            ));
        }
        let ipv4 = first_ipv4(&sandbox.ips)?;
        let ipv6 = first_ipv6(&sandbox.ips)?;
        // The watch may lag the runtime: a pod created a moment ago may not be in the
        // model yet.
        if self.model().enrollment(&key).is_none() && !self.unknown_pod_wait.is_zero() {
            let mut rx = self.model.clone();
            let _ = tokio::time::timeout(
                self.unknown_pod_wait,
                rx.wait_for(|state| state.model.enrollment(&key).is_some()),
            )
            .await;
        }
        let enrollment = match (self.model().enrollment(&key), self.unknown_pod) {
            (Some(enrollment), _) => enrollment,
            (None, UnknownPod::Admit) => {
                tracing::warn!(pod = %key, "pod unknown to the model: admitted, not intercepted");
                crate::model::Enrollment {
                    enrolled: false,
                    reason:
                        "pod unknown to the model: admitted, not intercepted (--unknown-pod admit)"
                            .into(),
                }
            }
            (None, UnknownPod::Reject) => {
                return Err(CniFailure::new(
                    codes::UNKNOWN_CONTAINER,
                    format!("pod {key} is not known to the agent"),
                )
                .with_details(format!(
                    "the pod did not appear in the model within {:?}; kubelet will retry",
                    self.unknown_pod_wait
                )));
            }
        };

        // Re-ADD of the same sandbox is idempotent; a new sandbox replaces the old one.
        {
            let pods = lock(&self.pods);
            if let Some(existing) = pods.get(&key) {
                if existing.container_id == sandbox.container_id
                    && existing.netns_path == netns_path
                {
                    return Ok(AgentResponse::Ok {
                        enrolled: existing.enrolled.is_some(),
                        detail: format!("already added: {}", existing.reason),
                    });
                }
            }
        }
        self.remove_pod(&key);

        let enrolled = if enrollment.enrolled {
            let ip = ipv4.ok_or_else(|| {
                CniFailure::new(
                    codes::INVALID_NETWORK_CONFIG,
                    format!("pod {key} has no IPv4 address in prevResult"),
                )
                .with_details("IPv6-only pods are not intercepted yet")
            })?;
            let ifname = if sandbox.ifname.is_empty() {
                "eth0"
            } else {
                &sandbox.ifname
            };
            Some(
                self.enroll(&key, &netns_path, (ip, ipv6), ifname, expect_cookie)
                    .await?,
            )
        } else {
            None
        };
        let is_enrolled = enrolled.is_some();
        match origin {
            Origin::Cni => {
                tracing::info!(pod = %key, enrolled = is_enrolled, reason = %enrollment.reason, ip = ?ipv4, ipv6 = ?ipv6, "CNI ADD");
            }
            Origin::Discovered { ref uid, .. } => {
                tracing::info!(pod = %key, enrolled = is_enrolled, %uid, netns = %netns_path.display(),
                    reason = %enrollment.reason, ip = ?ipv4, ipv6 = ?ipv6, "running pod found in /proc: enrolled");
            }
        }
        lock(&self.pods).insert(
            key,
            PodEntry {
                sandbox: sandbox.clone(),
                origin,
                container_id: sandbox.container_id.clone(),
                netns_path,
                ipv4,
                ipv6,
                reason: enrollment.reason.clone(),
                enrolled,
                leaving: Vec::new(),
            },
        );
        // The table is built off this path; the pod's listeners wait for one that knows it.
        self.request_routes();
        self.persist();
        Ok(AgentResponse::Ok {
            enrolled: is_enrolled,
            detail: enrollment.reason,
        })
    }

    async fn enroll(
        &self,
        key: &PodKey,
        netns_path: &Path,
        (ip, ipv6): (Ipv4Addr, Option<Ipv6Addr>),
        ifname: &str,
        expect_cookie: Option<u64>,
    ) -> Result<EnrolledPod, CniFailure> {
        // IPv6 only where the node has it and the address is one a flow can be steered
        // to (not link-local, which stays inside the link anyway).
        let ipv6 = ipv6.filter(|ip6| {
            self.ipv6
                && !(ip6.is_loopback()
                    || ip6.is_unspecified()
                    || ip6.is_multicast()
                    || ip6.is_unicast_link_local())
        });
        // A mesh fails closed: a pod whose IPv6 this mode cannot intercept (iptables
        // mode without the ip6tables tools) is refused, not enrolled half.
        if let Some(ip6) = ipv6.filter(|_| !self.datapath.supports_ipv6()) {
            return Err(CniFailure::new(
                codes::INVALID_ENVIRONMENT,
                format!(
                    "enrolling pod {key}: its IPv6 address {ip6} cannot be intercepted in {} \
                     mode on this node (no ip6tables tools); refused rather than let its \
                     IPv6 traffic go around the mesh",
                    self.datapath.mode()
                ),
            ));
        }
        let io_failure = |what: &str, e: &dyn std::fmt::Display| {
            CniFailure::new(
                codes::IO_FAILURE,
                format!("enrolling pod {key}: {what}: {e}"),
            )
        };
        let netns = {
            let path = netns_path.to_path_buf();
            tokio::task::spawn_blocking(move || PodNetns::enter(&path))
                .await
                .map_err(|e| io_failure("netns thread", &e))?
                .map_err(|e| io_failure("netns", &e))?
        };
        if expect_cookie.is_some_and(|cookie| cookie != netns.cookie()) {
            return Err(CniFailure::new(
                codes::UNKNOWN_CONTAINER,
                format!(
                    "enrolling pod {key}: {} is no longer the netns found for the pod",
                    netns_path.display()
                ),
            ));
        }
        let netns = Arc::new(netns);
        let sockets: Arc<dyn SocketFactory> = Arc::new(InPodSockets::new(Arc::clone(&netns)));
        let outbound = listener::listen(&*sockets, Direction::Outbound)
            .map_err(|e| io_failure("outbound listener", &e))?;
        let inbound = listener::listen(&*sockets, Direction::Inbound)
            .map_err(|e| io_failure("inbound listener", &e))?;
        let listeners6 = match ipv6 {
            Some(_) => Some((
                listener::listen6(&*sockets, Direction::Outbound)
                    .map_err(|e| io_failure("IPv6 outbound listener", &e))?,
                listener::listen6(&*sockets, Direction::Inbound)
                    .map_err(|e| io_failure("IPv6 inbound listener", &e))?,
            )),
            None => None,
        };
        let netns_cookie = {
            let netns = Arc::clone(&netns);
            self.blocking(move |dp| dp.netns_cookie(&netns))
                .await
                .map_err(|e| io_failure("netns cookie", &e))?
        };
        let datapath = PodDatapath {
            netns_cookie,
            ipv4: ip,
            ifname: ifname.to_string(),
        };
        // The pod's own exclusions are in the kernel before the pod is enrolled, so none
        // of its connections is ever intercepted against them.
        let rules = self
            .model()
            .pod(key)
            .map(|pod| crate::config::pod_rules(&key.to_string(), &pod.annotations))
            .unwrap_or_default();
        for warning in &rules.warnings {
            tracing::warn!(pod = %key, "{warning}");
        }
        let cookie = datapath.netns_cookie;
        let config = rules.config.clone();
        self.blocking(move |dp| dp.set_rules(cookie, &config))
            .await
            .map_err(|e| io_failure("exclusion rules", &e))?;
        // The listeners are up before the pod is in the maps, so no redirected connection
        // can arrive at a port nobody listens on.
        let (pod, pod_netns) = (datapath.clone(), Arc::clone(&netns));
        if let Err(error) = self.blocking(move |dp| dp.enroll(&pod, &pod_netns)).await {
            let _ = self
                .blocking(move |dp| dp.set_rules(cookie, &crate::config::MeshConfig::default()))
                .await;
            return Err(match error {
                DatapathError::MapFull { .. } => CniFailure::new(
                    codes::TRY_AGAIN_LATER,
                    format!("enrolling pod {key}: {error}"),
                ),
                other => io_failure("data path", &other),
            });
        }
        if let Some(ip6) = ipv6 {
            let pod = datapath.clone();
            if let Err(error) = self.blocking(move |dp| dp.enroll_ipv6(&pod, ip6)).await {
                // All-or-nothing: the IPv4 enrollment goes too (it removes any IPv6 entry).
                let (pod, pod_netns) = (datapath.clone(), Arc::clone(&netns));
                let _ = self.blocking(move |dp| dp.unenroll(&pod, &pod_netns)).await;
                let _ = self
                    .blocking(move |dp| dp.set_rules(cookie, &crate::config::MeshConfig::default()))
                    .await;
                return Err(match error {
                    DatapathError::MapFull { .. } => CniFailure::new(
                        codes::TRY_AGAIN_LATER,
                        format!("enrolling pod {key} (IPv6): {error}"),
                    ),
                    other => io_failure("data path (IPv6)", &other),
                });
            }
        }
        let leave = watch::Sender::new(false);
        let mut same_node = None;
        let mut serve = |listener, direction, ipv6| {
            let ctx = ListenerContext {
                pod: key.clone(),
                direction,
                sockets: Arc::clone(&sockets),
                routes: Arc::clone(&self.routes),
                log: Arc::clone(&self.log),
                upstreams: Arc::clone(&self.upstreams),
                sockmap: self.sockmap,
                client_hello_timeout: self.client_hello_timeout,
                draining: self.draining.subscribe(),
                leaving: leave.subscribe(),
                accepting: self.accepting.subscribe(),
                pod_ip: ip,
                preserve_client_ip: self.datapath.preserves_client_ip(cookie, ipv6),
                routes_published: self.routes_published.subscribe(),
                same_node: match direction {
                    Direction::Outbound => self.same_node.clone(),
                    Direction::Inbound | Direction::Gateway => None,
                },
            };
            // The IPv4 inbound side serves same-node connections (the SOCKHASH and the
            // return routes are IPv4 first too; IPv6 ones take both hops).
            if let (Some(pods), Direction::Inbound, false) = (&self.same_node, direction, ipv6) {
                same_node = Some(pods.insert(IpAddr::V4(ip), ctx.clone()));
            }
            tokio::spawn(listener::serve(listener, ctx))
        };
        let mut listeners = vec![
            serve(outbound, Direction::Outbound, false),
            serve(inbound, Direction::Inbound, false),
        ];
        if let Some((outbound6, inbound6)) = listeners6 {
            listeners.push(serve(outbound6, Direction::Outbound, true));
            listeners.push(serve(inbound6, Direction::Inbound, true));
        }
        Ok(EnrolledPod {
            netns,
            datapath,
            listeners,
            leave,
            rules: rules.config,
            rule_warnings: rules.warnings,
            ipv6,
            _same_node: same_node,
        })
    }

    /// Run a data path call off the async workers: it may wait for tools or the kernel.
    async fn blocking<R: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn Datapath) -> Result<R, DatapathError> + Send + 'static,
    ) -> Result<R, DatapathError> {
        let datapath = Arc::clone(&self.datapath);
        tokio::task::spawn_blocking(move || call(datapath.as_ref()))
            .await
            .unwrap_or_else(|e| Err(DatapathError::Interrupted(e.to_string())))
    }

    /// CNI DEL: idempotent; unknown pods and missing netns are fine.
    pub async fn del(&self, sandbox: &PodSandbox) -> AgentResponse {
        let Ok(key) = pod_key(sandbox) else {
            return AgentResponse::Ok {
                enrolled: false,
                detail: "no pod name: nothing to delete".into(),
            };
        };
        let _changing = self.pod_changes.lock().await;
        let same_sandbox = {
            let pods = lock(&self.pods);
            pods.get(&key).map(|entry| {
                sandbox.container_id.is_empty()
                    || entry.container_id == sandbox.container_id
                    || matches!(&entry.origin, Origin::Discovered { container_ids, .. }
                        if container_ids.contains(&sandbox.container_id))
            })
        };
        let detail = match same_sandbox {
            Some(true) => {
                self.remove_pod(&key);
                self.request_routes();
                self.persist();
                format!("pod {key} removed")
            }
            Some(false) => format!("pod {key} belongs to another sandbox: kept"),
            None => format!("pod {key} unknown: nothing to delete"),
        };
        tracing::info!(pod = %key, %detail, "CNI DEL");
        AgentResponse::Ok {
            enrolled: false,
            detail,
        }
    }

    fn remove_pod(&self, key: &PodKey) {
        let entry = lock(&self.pods).remove(key);
        self.log.metrics().forget_pod(&key.to_string());
        if let Some(enrolled) = entry.and_then(|e| e.enrolled) {
            self.unenroll(key, &enrolled);
        }
    }

    /// Take a pod out of the data path, then its rules: never enrolled without them.
    fn unenroll(&self, key: &PodKey, enrolled: &EnrolledPod) {
        if let Err(error) = self.datapath.unenroll(&enrolled.datapath, &enrolled.netns) {
            tracing::error!(pod = %key, %error, "unenrolling pod");
        }
        let cookie = enrolled.datapath.netns_cookie;
        let _ = self
            .datapath
            .set_rules(cookie, &crate::config::MeshConfig::default());
    }

    /// Take a running pod out of the data path so that its connections through the proxy
    /// go on: its listeners stop accepting and drain, and once every one of them has
    /// ended the data path drops what it kept for them ([`Datapath::drained`]). The
    /// returned task is aborted, listeners included, when the pod goes (CNI DEL).
    fn leave_running(&self, key: &PodKey, left: EnrolledPod) -> AbortOnDrop {
        if let Err(error) = self.datapath.unenroll_running(&left.datapath, &left.netns) {
            tracing::error!(pod = %key, %error, "unenrolling running pod");
        }
        let (pod, netns) = (left.datapath.clone(), Arc::clone(&left.netns));
        let _ = self
            .datapath
            .set_rules(pod.netns_cookie, &crate::config::MeshConfig::default());
        let mut listeners = left.leave();
        let datapath = Arc::clone(&self.datapath);
        let key = key.clone();
        AbortOnDrop(tokio::spawn(async move {
            for listener in &mut listeners {
                let _ = (&mut listener.0).await;
            }
            let drained = tokio::task::spawn_blocking(move || datapath.drained(&pod, &netns));
            match drained.await {
                Ok(Ok(())) => {
                    tracing::info!(pod = %key, "the connections it made in the mesh have closed")
                }
                Ok(Err(error)) => {
                    tracing::warn!(pod = %key, %error, "after its last proxied connection")
                }
                Err(error) => {
                    tracing::warn!(pod = %key, %error, "after its last proxied connection")
                }
            }
        }))
    }

    /// Bring running pods in line with the model, without restarting them: a pod whose
    /// enrollment label or annotation (its own or its namespace's) now says yes is
    /// enrolled, one that now says no leaves the mesh (its open proxied connections
    /// finish), and an enrolled pod whose exclusion annotations changed gets the new
    /// rules (an annotation with an invalid entry keeps the previous rules). Returns
    /// whether the set of enrolled pods changed.
    pub async fn reconcile_enrollment(&self) -> bool {
        let _changing = self.pod_changes.lock().await;
        let model = self.model();
        let pods: Vec<(PodKey, bool)> = lock(&self.pods)
            .iter()
            .map(|(key, entry)| (key.clone(), entry.enrolled.is_some()))
            .collect();
        let mut changed = false;
        for (key, enrolled) in pods {
            let Some(enrollment) = model.enrollment(&key) else {
                // Gone from the model: its CNI DEL follows.
                continue;
            };
            match (enrollment.enrolled, enrolled) {
                (true, false) => changed |= self.enroll_running(&key, &enrollment).await,
                (false, true) => {
                    let left = lock(&self.pods).get_mut(&key).and_then(|entry| {
                        entry.reason = enrollment.reason.clone();
                        entry.enrolled.take()
                    });
                    let Some(left) = left else { continue };
                    let draining = self.leave_running(&key, left);
                    if let Some(entry) = lock(&self.pods).get_mut(&key) {
                        entry.leaving.push(draining);
                    }
                    tracing::info!(pod = %key, reason = %enrollment.reason,
                        "pod left the mesh while running; its open connections finish");
                    changed = true;
                }
                (true, true) => self.update_rules(&key, &model),
                (false, false) => {
                    if let Some(entry) = lock(&self.pods).get_mut(&key) {
                        entry.reason = enrollment.reason;
                    }
                }
            }
        }
        changed
    }

    /// Enroll a pod that runs already (CNI ADD left it out): its connections from now on
    /// are intercepted; those it opened before keep going direct.
    async fn enroll_running(&self, key: &PodKey, enrollment: &crate::model::Enrollment) -> bool {
        let Some((mut netns_path, ip, mut ifname, uid)) = lock(&self.pods).get(key).map(|entry| {
            let ifname = match entry.sandbox.ifname.as_str() {
                "" => "eth0".to_owned(),
                name => name.to_owned(),
            };
            let uid = entry.origin.uid().map(str::to_owned);
            (
                entry.netns_path.clone(),
                (entry.ipv4, entry.ipv6),
                ifname,
                uid,
            )
        }) else {
            return false;
        };
        let (Some(ip), ipv6) = ip else {
            tracing::warn!(pod = %key, "not enrolled: the pod has no IPv4 address");
            return false;
        };
        // A found pod's netns path was its process's then: found again by UID.
        let mut expect_cookie = None;
        if let Some(uid) = uid {
            match self.relocate(&uid, ip).await {
                Ok(located) => {
                    netns_path = located.path;
                    ifname = located.ifname;
                    expect_cookie = Some(located.cookie);
                }
                Err(why) => {
                    tracing::warn!(pod = %key, %uid, %why, "enrolling a running pod failed: its netns is not found; retried at the next model change");
                    return false;
                }
            }
        }
        match self
            .enroll(key, &netns_path, (ip, ipv6), &ifname, expect_cookie)
            .await
        {
            Ok(enrolled) => {
                if let Some(entry) = lock(&self.pods).get_mut(key) {
                    entry.enrolled = Some(enrolled);
                    entry.reason = enrollment.reason.clone();
                    entry.sandbox.netns = netns_path.display().to_string();
                    entry.sandbox.ifname = ifname;
                    entry.netns_path = netns_path;
                }
                tracing::info!(pod = %key, reason = %enrollment.reason, "running pod enrolled");
                true
            }
            Err(failure) => {
                tracing::warn!(pod = %key, msg = %failure.msg, "enrolling a running pod failed; retried at the next model change");
                false
            }
        }
    }

    /// Find and enroll the pods the model enrolls on this node that ran before any agent
    /// did (no CNI ADD record): their netns from `/proc` (a process whose cgroup names the
    /// pod's UID, outside the agent's own netns), checked to hold the pod's IP, enrolled
    /// as a CNI ADD would and remembered like one. A pod whose netns is not found is
    /// reported (log, `/config_dump`'s `pods_not_found`) and looked for again at the next
    /// model change. Nothing is looked for before the remembered pods are adopted for
    /// good, nor by a superseded agent. Returns how many were enrolled.
    pub async fn discover_running(&self) -> usize {
        let Some(scanner) = &self.discovery else {
            return 0;
        };
        // A superseded agent adds no pod: its successor owns them (and finds them).
        if !self.adopted.load(Ordering::SeqCst) || self.superseded().is_some() {
            return 0;
        }
        let _changing = self.pod_changes.lock().await;
        let model = self.model();
        let wanted: HashMap<String, (PodKey, Option<Ipv4Addr>)> = {
            let known = lock(&self.pods);
            model
                .pods
                .iter()
                .filter(|(key, pod)| !known.contains_key(key) && self.runs_here(pod))
                .filter(|(key, _)| model.enrollment(key).is_some_and(|e| e.enrolled))
                .filter_map(|(key, pod)| {
                    let uid = pod.uid.as_ref()?.to_ascii_lowercase();
                    Some((uid, (key.clone(), pod.ip)))
                })
                .collect()
        };
        // Reports of pods no longer looked for (enrolled meanwhile, gone, left the mesh).
        lock(&self.not_found).retain(|key, _| wanted.values().any(|(k, _)| k == key));
        if wanted.is_empty() {
            return 0;
        }
        let uids: HashSet<String> = wanted.keys().cloned().collect();
        let found = {
            let scanner = scanner.clone();
            tokio::task::spawn_blocking(move || scanner.find(&uids))
                .await
                .unwrap_or_default()
        };
        let mut enrolled = 0;
        for (uid, (key, ip)) in wanted {
            let located = match (found.get(&uid), ip) {
                // No address and no process: most likely a pod whose sandbox is being
                // made, its CNI ADD still to come (status.podIP is set after it).
                (None, None) => {
                    lock(&self.not_found).remove(&key);
                    continue;
                }
                (None, Some(_)) => Err("no process of the pod in /proc outside the node's own \
                                  netns (a hostNetwork pod is never enrolled)"
                    .to_owned()),
                (Some(_), None) => Err("the model has no IP of the pod (status.podIP) to \
                                        check its netns against"
                    .to_owned()),
                (Some(candidates), Some(ip)) => locate(candidates.clone(), ip).await,
            };
            let outcome = match located {
                Ok(located) => {
                    let sandbox = PodSandbox {
                        container_id: located.container_id.clone(),
                        netns: located.path.display().to_string(),
                        ifname: located.ifname.clone(),
                        pod_namespace: key.namespace.clone(),
                        pod_name: key.name.clone(),
                        ips: ip.map(|ip| format!("{ip}/32")).into_iter().collect(),
                    };
                    let origin = Origin::Discovered {
                        uid: uid.clone(),
                        container_ids: located.container_ids,
                    };
                    self.add_as(&sandbox, origin, Some(located.cookie))
                        .await
                        .map_err(|failure| failure.msg)
                }
                Err(why) => Err(why),
            };
            match outcome {
                Ok(AgentResponse::Ok { enrolled: true, .. }) => {
                    enrolled += 1;
                    lock(&self.not_found).remove(&key);
                }
                Ok(_) => {
                    lock(&self.not_found).remove(&key);
                }
                Err(reason) => {
                    let row = PodNotFound {
                        pod: key.to_string(),
                        uid,
                        reason,
                    };
                    let mut not_found = lock(&self.not_found);
                    // Logged when the reason changes, not at every model change.
                    if not_found.get(&key) != Some(&row) {
                        tracing::warn!(pod = %key, uid = %row.uid, reason = %row.reason,
                            "pod to enroll has no CNI ADD record and its netns was not found; \
                             looked for again at the next model change");
                        not_found.insert(key, row);
                    }
                }
            }
        }
        enrolled
    }

    /// Whether a model pod is scheduled on this node, as far as the agent can tell: with
    /// a node name (the kube source), `spec.nodeName` must be it; without one (the
    /// manifests source, standalone), every pod with a UID is looked for, since only
    /// this node's processes can name it. hostNetwork pods are never enrolled.
    fn runs_here(&self, pod: &crate::model::Pod) -> bool {
        if pod.host_network || pod.uid.is_none() {
            return false;
        }
        match &self.node_name {
            Some(node) => pod.node_name.as_ref() == Some(node),
            None => true,
        }
    }

    /// Pods to enroll whose netns was not found, and why.
    pub fn pods_not_found(&self) -> Vec<PodNotFound> {
        lock(&self.not_found).values().cloned().collect()
    }

    /// The netns of pod `uid` found in `/proc` again, checked to hold `ip`.
    async fn relocate(&self, uid: &str, ip: Ipv4Addr) -> Result<Located, String> {
        let Some(scanner) = self.discovery.clone() else {
            return Err("finding pods in /proc is off".to_owned());
        };
        let uids = HashSet::from([uid.to_owned()]);
        let found = tokio::task::spawn_blocking(move || scanner.find(&uids))
            .await
            .unwrap_or_default();
        match found.into_values().next() {
            Some(candidates) => locate(candidates, ip).await,
            None => Err("no process of the pod in /proc outside the node's own netns".into()),
        }
    }

    /// [`Agent::relocate`] for a remembered pod, by the address it was found with.
    async fn relocate_remembered(
        &self,
        uid: &str,
        sandbox: &PodSandbox,
    ) -> Result<Located, String> {
        match first_ipv4(&sandbox.ips) {
            Ok(Some(ip)) => self.relocate(uid, ip).await,
            Ok(None) => Err("the record has no IPv4 address".into()),
            Err(failure) => Err(failure.msg),
        }
    }

    /// Apply an enrolled pod's changed exclusion annotations, unless one is invalid.
    fn update_rules(&self, key: &PodKey, model: &crate::model::Model) {
        let Some(pod) = model.pods.get(key) else {
            return;
        };
        let rules = crate::config::pod_rules(&key.to_string(), &pod.annotations);
        let cookie = {
            let mut pods = lock(&self.pods);
            let Some(enrolled) = pods.get_mut(key).and_then(|e| e.enrolled.as_mut()) else {
                return;
            };
            if rules.config == enrolled.rules {
                return;
            }
            if !rules.warnings.is_empty() {
                if rules.warnings != enrolled.rule_warnings {
                    for warning in &rules.warnings {
                        tracing::warn!(pod = %key, "{warning}; the previous rules stay");
                    }
                    enrolled.rule_warnings = rules.warnings;
                }
                return;
            }
            enrolled.datapath.netns_cookie
        };
        // Not under the pods lock: in iptables mode this runs iptables-restore in the pod.
        // The reconciler holds `pod_changes`, so the pod cannot go meanwhile.
        if let Err(error) = self.datapath.set_rules(cookie, &rules.config) {
            tracing::error!(pod = %key, %error, "applying changed rules");
            return;
        }
        tracing::info!(pod = %key, "exclusion annotations changed: rules applied");
        if let Some(enrolled) = lock(&self.pods)
            .get_mut(key)
            .and_then(|e| e.enrolled.as_mut())
        {
            enrolled.rules = rules.config;
            enrolled.rule_warnings = Vec::new();
        }
    }

    /// Write the pods handed over by CNI to the state dir (temp file + rename), so a
    /// restarted agent can adopt them again. A failure is logged: interception goes on.
    pub fn persist(&self) {
        let Some(path) = &self.pods_file else { return };
        if let Some(successor) = self.superseded() {
            tracing::debug!(successor, "pod list not written: another agent owns it");
            return;
        }
        let sandboxes: Vec<RememberedPod> = {
            let pods = lock(&self.pods);
            let mut list: Vec<_> = pods
                .values()
                .map(|entry| RememberedPod {
                    sandbox: entry.sandbox.clone(),
                    discovered_uid: entry.origin.uid().map(str::to_owned),
                })
                .collect();
            list.sort_by(|a, b| {
                (&a.sandbox.pod_namespace, &a.sandbox.pod_name)
                    .cmp(&(&b.sandbox.pod_namespace, &b.sandbox.pod_name))
            });
            list
        };
        // Temp file, then rename: an agent that dies mid-write leaves the old list or the
        // new one, never a torn file. No fsync: the list names network namespaces, which
        // die with the kernel, so it must outlive the agent (the page cache does) but not
        // the machine; after a reboot the pods come back through CNI ADDs, and a list
        // that a power loss left unreadable adopts none (see `adopt_remembered`). Two
        // fsyncs cost every ADD and DEL a millisecond and a disk flush on this path.
        let write = || -> std::io::Result<()> {
            use std::io::Write as _;
            let tmp = path.with_extension("json.tmp");
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&serde_json::to_vec_pretty(&sandboxes)?)?;
            std::fs::rename(&tmp, path)?;
            Ok(())
        };
        if let Err(error) = write() {
            tracing::error!(path = %path.display(), %error, "remembering pods");
        }
    }

    /// Adopt the pods a previous agent was handed, as if CNI ADD came again (pods already
    /// adopted are left as they are): pods whose netns is gone or that the model no longer
    /// knows are dropped, with a log line. With `prune`, the data path then forgets every
    /// pod not adopted; a hand-over passes `false` while the previous agent may still be
    /// adding pods, then `true` once it has taken over. Returns how many were adopted.
    pub async fn restore(&self, prune: bool) -> usize {
        // Listeners accept again once the routes know every adopted pod.
        self.accepting.send_replace(false);
        let adopted = self.adopt_remembered(prune).await;
        self.rebuild_routes();
        self.accepting.send_replace(true);
        if prune {
            self.adopted.store(true, Ordering::SeqCst);
        }
        adopted
    }

    async fn adopt_remembered(&self, prune: bool) -> usize {
        let Some(path) = &self.pods_file else {
            return 0;
        };
        // A list that cannot be read adopts no pod; the pods a previous agent enrolled are
        // then removed from the reused maps below (retain_pods), so none stays steered to
        // a listener nobody opens. They start intercepted again at their next CNI ADD.
        let unreadable = |why: String| {
            tracing::error!(path = %path.display(), %why,
                "remembered pods unreadable: adopting none, and removing every pod a \
                 previous agent left in the data path (no listener would answer for them)");
            let _ = std::fs::rename(path, path.with_extension("json.corrupt"));
            Vec::new()
        };
        let sandboxes: Vec<RememberedPod> = match std::fs::read(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => unreadable(error.to_string()),
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(list) => list,
                Err(error) => unreadable(format!("not a pod list: {error}")),
            },
        };
        let mut adopted = 0;
        for remembered in &sandboxes {
            let mut sandbox = remembered.sandbox.clone();
            let pod = format!("{}/{}", sandbox.pod_namespace, sandbox.pod_name);
            let (origin, expect_cookie) = match &remembered.discovered_uid {
                None => (Origin::Cni, None),
                Some(uid) => match self.relocate_remembered(uid, &sandbox).await {
                    Ok(located) => {
                        sandbox.netns = located.path.display().to_string();
                        sandbox.ifname = located.ifname;
                        sandbox.container_id = located.container_id;
                        let origin = Origin::Discovered {
                            uid: uid.clone(),
                            container_ids: located.container_ids,
                        };
                        (origin, Some(located.cookie))
                    }
                    Err(why) => {
                        tracing::warn!(%pod, %uid, %why, "not adopting pod found in /proc earlier");
                        continue;
                    }
                },
            };
            let added = {
                let _changing = self.pod_changes.lock().await;
                self.add_as(&sandbox, origin, expect_cookie).await
            };
            let enrolled = match added {
                Ok(response) => {
                    adopted += 1;
                    matches!(response, AgentResponse::Ok { enrolled: true, .. })
                }
                Err(failure) => {
                    tracing::warn!(%pod, msg = %failure.msg, "not adopting pod");
                    false
                }
            };
            // An earlier agent may have enrolled it: what that agent left inside the
            // pod's netns must not outlive the enrollment.
            let netns = PathBuf::from(&sandbox.netns);
            if !enrolled && netns.exists() {
                if let Err(error) = self.blocking(move |dp| dp.release_netns(&netns)).await {
                    tracing::error!(%pod, %error, "removing what an earlier agent left in the pod");
                }
            }
        }
        self.persist();
        if !prune {
            return adopted;
        }
        let cookies: HashSet<u64> = {
            let pods = lock(&self.pods);
            pods.values()
                .filter_map(|entry| entry.enrolled.as_ref().map(|e| e.datapath.netns_cookie))
                .collect()
        };
        // Entries a previous agent left in the reused maps for pods not adopted now.
        self.datapath.retain_pods(&cookies);
        tracing::info!(
            adopted,
            remembered = sandboxes.len(),
            "pods adopted after restart"
        );
        adopted
    }

    /// CNI CHECK: is the pod's data path in place?
    pub fn check(&self, sandbox: &PodSandbox) -> Result<AgentResponse, CniFailure> {
        let key = pod_key(sandbox)?;
        let pods = lock(&self.pods);
        let entry = pods.get(&key).ok_or_else(|| {
            CniFailure::new(
                codes::UNKNOWN_CONTAINER,
                format!("pod {key} was never added"),
            )
        })?;
        match &entry.enrolled {
            Some(enrolled) if enrolled.listeners.iter().any(JoinHandle::is_finished) => {
                Err(CniFailure::new(
                    codes::IO_FAILURE,
                    format!("pod {key}: a proxy listener has stopped"),
                ))
            }
            Some(_) => Ok(AgentResponse::Ok {
                enrolled: true,
                detail: entry.reason.clone(),
            }),
            None => Ok(AgentResponse::Ok {
                enrolled: false,
                detail: entry.reason.clone(),
            }),
        }
    }

    /// Stop intercepting every pod (graceful shutdown).
    pub fn remove_all(&self) {
        // Node-wide state first, at once: rewritten per pod it took longer than a stop
        // may with 1,000 pods. Probes of pods still enrolled meanwhile keep the node's
        // address, which SMI mode refuses (closed, not open).
        if let Err(error) = self.datapath.remove_node_wide() {
            tracing::error!(%error, "removing the node-wide data path");
        }
        let keys: Vec<PodKey> = {
            let pods = lock(&self.pods);
            pods.keys().cloned().collect()
        };
        for key in keys {
            self.remove_pod(&key);
        }
    }
}

/// The first of `candidates` (a pod's netns found in `/proc`, oldest process first) that
/// holds `ip`, and the interface with it (where the tc programs attach): a cgroup ties a
/// process to a pod, not to a netns, so a netns without the pod's IP is not the pod's.
async fn locate(candidates: Vec<FoundNetns>, ip: Ipv4Addr) -> Result<Located, String> {
    let check = move || {
        let mut tried = Vec::new();
        for candidate in candidates {
            let checked = PodNetns::enter(&candidate.path)
                .map_err(|e| e.to_string())
                .and_then(|netns| {
                    let ifname = netns
                        .run_blocking(|| crate::inpod::discover::interface_with(ip))
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    Ok((netns.cookie(), ifname))
                });
            match checked {
                Ok((cookie, Some(ifname))) => {
                    return Ok(Located {
                        path: candidate.path,
                        cookie,
                        ifname,
                        container_id: candidate.container_id.unwrap_or_default(),
                        container_ids: candidate.container_ids,
                    })
                }
                Ok((_, None)) => tried.push(format!(
                    "{} (pid {}): no interface holds {ip}",
                    candidate.path.display(),
                    candidate.pid
                )),
                Err(error) => tried.push(format!("{}: {error}", candidate.path.display())),
            }
        }
        Err(format!(
            "no netns of the pod's processes is the pod's: {}",
            tried.join("; ")
        ))
    };
    tokio::task::spawn_blocking(check)
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

fn pod_key(sandbox: &PodSandbox) -> Result<PodKey, CniFailure> {
    if sandbox.pod_namespace.is_empty() || sandbox.pod_name.is_empty() {
        return Err(CniFailure::new(
            codes::INVALID_ENVIRONMENT,
            "K8S_POD_NAMESPACE and K8S_POD_NAME must be set in CNI_ARGS",
        ));
    }
    Ok(PodKey::new(&sandbox.pod_namespace, &sandbox.pod_name))
}

/// The first IPv4 address among `prevResult.ips[].address` (CIDR notation).
fn first_ipv4(ips: &[String]) -> Result<Option<Ipv4Addr>, CniFailure> {
    first_of(ips, |ip| match ip {
        std::net::IpAddr::V4(v4) => Some(v4),
        std::net::IpAddr::V6(_) => None,
    })
}

/// The first IPv6 address among `prevResult.ips[].address`: a dual-stack pod's.
fn first_ipv6(ips: &[String]) -> Result<Option<Ipv6Addr>, CniFailure> {
    first_of(ips, |ip| match ip {
        std::net::IpAddr::V6(v6) => Some(v6),
        std::net::IpAddr::V4(_) => None,
    })
}

/// The first address `pick` takes; every entry must be a CIDR.
fn first_of<T>(
    ips: &[String],
    pick: impl Fn(std::net::IpAddr) -> Option<T>,
) -> Result<Option<T>, CniFailure> {
    let mut first = None;
    for raw in ips {
        let net: ipnet::IpNet = raw.parse().map_err(|e| {
            CniFailure::new(
                codes::INVALID_NETWORK_CONFIG,
                format!("prevResult address {raw:?} is not a CIDR: {e}"),
            )
        })?;
        if first.is_none() {
            first = pick(net.addr());
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ipv4_skips_v6_and_rejects_garbage() {
        let ips = vec!["fd00::5/64".to_string(), "10.244.0.7/24".to_string()];
        assert_eq!(
            first_ipv4(&ips).unwrap(),
            Some(Ipv4Addr::new(10, 244, 0, 7))
        );
        assert_eq!(first_ipv4(&[]).unwrap(), None);
        assert_eq!(
            first_ipv6(&ips).unwrap(),
            Some("fd00::5".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(first_ipv6(&["10.0.0.1/24".to_string()]).unwrap(), None);
        let err = first_ipv4(&["10.0.0.300/24".to_string()]).unwrap_err();
        assert_eq!(err.code, codes::INVALID_NETWORK_CONFIG);
        assert!(err.msg.contains("10.0.0.300/24"), "{}", err.msg);
    }

    #[test]
    fn remembered_pods_read_older_lists_and_keep_a_found_pods_uid() {
        let older = r#"[{"containerId": "c", "netns": "/var/run/netns/x", "ifname": "eth0",
            "podNamespace": "demo", "podName": "client", "ips": ["10.244.0.5/24"]}]"#;
        let list: Vec<RememberedPod> = serde_json::from_str(older).unwrap();
        assert_eq!(list[0].discovered_uid, None);
        assert_eq!(list[0].sandbox.pod_name, "client");
        let found = RememberedPod {
            sandbox: list[0].sandbox.clone(),
            discovered_uid: Some("2c48913c-b29f-11e7-9350-020968147796".into()),
        };
        let json = serde_json::to_string(&found).unwrap();
        let back: RememberedPod = serde_json::from_str(&json).unwrap();
        assert_eq!(back.discovered_uid, found.discovered_uid);
        assert_eq!(back.sandbox, found.sandbox);
        // An older agent reads it as the sandbox it knows.
        let plain: PodSandbox = serde_json::from_str(&json).unwrap();
        assert_eq!(plain, found.sandbox);
    }

    #[test]
    fn pod_key_requires_both_names() {
        let mut sandbox = PodSandbox {
            container_id: "c".into(),
            netns: String::new(),
            ifname: "eth0".into(),
            pod_namespace: "demo".into(),
            pod_name: String::new(),
            ips: vec![],
        };
        assert_eq!(
            pod_key(&sandbox).unwrap_err().code,
            codes::INVALID_ENVIRONMENT
        );
        sandbox.pod_name = "client".into();
        assert_eq!(pod_key(&sandbox).unwrap().to_string(), "demo/client");
    }
}
