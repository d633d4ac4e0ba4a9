//! Start-up and shutdown of `interceptor agent`: attach the data path, load the model,
//! serve the CNI socket and the admin endpoint, and undo all of it on SIGTERM/SIGINT.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::admin::{self, StaticInfo};
use crate::agent::{Agent, AgentOptions, UnknownPod};
use crate::cleanup::{self, PID_FILE, PODS_FILE};
use crate::daemonset::{DaemonSetRef, CHECK_TIMEOUT};
use crate::datapath::ebpf::{EbpfDatapath, EbpfOptions, KernelSupport};
use crate::datapath::iptables::IptablesDatapath;
use crate::datapath::probe::Chosen;
use crate::datapath::Datapath;
use crate::source::kube;
use crate::source::manifests::{self, ManifestState};

/// How often the manifests directory is polled for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(500);
/// How long start-up waits for the first model before giving up.
const FIRST_MODEL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the agent's model (pods, namespaces, services) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory of Kubernetes YAML, polled (standalone).
    Manifests(PathBuf),
    /// The Kubernetes API (in-cluster config or KUBECONFIG), Pods of this node only, and
    /// FSM's MeshConfig object `mesh_config` (laid over the mesh config file).
    Kube {
        node_name: String,
        mesh_config: crate::config::MeshConfigName,
    },
}

impl ModelSource {
    fn kind(&self) -> &'static str {
        match self {
            ModelSource::Manifests(_) => "manifests",
            ModelSource::Kube { .. } => "kube",
        }
    }
}

/// What a stopping agent does with the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// Unenroll every pod and remove programs, links and pins: pods are left alone.
    #[default]
    Remove,
    /// Keep pinned links and maps: enrolled pods' new connections fail closed (nobody
    /// listens on 15001/15003) until the next agent adopts them. For rolling updates.
    Keep,
    /// `remove` when the agent's DaemonSet is gone or being deleted (an uninstall),
    /// `keep` otherwise (a rolling update, a drain, a deleted pod) or when the API server
    /// does not answer: see [`crate::daemonset`].
    Auto,
}

/// Everything `interceptor agent` needs, already validated by the CLI layer.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub cni_socket: PathBuf,
    /// Where the model comes from.
    pub source: ModelSource,
    /// The kubeconfig for the API server (`--source kube`, `--on-exit auto`); `None`:
    /// `KUBECONFIG`, `~/.kube/config` or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub admin_addr: SocketAddr,
    /// `/metrics` alone, for Prometheus (`--metrics-addr`); `None`: not served beyond the
    /// admin port.
    pub metrics_addr: Option<SocketAddr>,
    /// One JSON line per finished proxied connection on stdout (`--access-log`).
    pub access_log: bool,
    pub bpf_debug: bool,
    /// Short-circuit local connection pairs with sockmap + sk_msg.
    pub sockmap: bool,
    /// Inbound, dial applications from the client's address (`--preserve-client-ip`).
    pub preserve_client_ip: bool,
    /// Size of the inbound flow map, when not the default.
    pub inbound_flow_capacity: Option<u32>,
    /// Size of the outbound original-destination map, when not the default.
    pub outbound_flow_capacity: Option<u32>,
    /// Age at which a half-open inbound flow record is removed.
    pub inbound_half_open_timeout: Duration,
    /// What to do with the data path on SIGTERM/SIGINT.
    pub on_exit: OnExit,
    /// The DaemonSet `OnExit::Auto` asks about (required with it).
    pub daemonset: Option<DaemonSetRef>,
    /// How long open connections may go on after SIGTERM/SIGINT.
    pub drain_timeout: Duration,
    /// How long a client of a port routed by server name has to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// `--same-node-direct`: one proxy hop between enrolled pods of this node.
    pub same_node_direct: bool,
    /// Created when ready, removed on exit (an exec readiness probe of this agent alone).
    pub ready_file: Option<PathBuf>,
    /// `--mode`: auto picks eBPF when the kernel has what it needs.
    pub mode: crate::datapath::probe::Mode,
    /// Probed features to treat as missing (exercises the fallback).
    pub simulate_missing_features: Vec<String>,
    /// `--iptables-backend` for the iptables mode.
    pub iptables_backend: crate::datapath::iptables::BackendChoice,
    /// How tc programs attach in eBPF mode.
    pub tc_attach: crate::datapath::ebpf::TcAttach,
    /// The global mesh config file (FSM MeshConfig names), watched.
    pub mesh_config: Option<PathBuf>,
    /// How long CNI ADD waits for a pod the model does not have yet.
    pub unknown_pod_wait: Duration,
    /// What CNI ADD does for a pod still unknown after the wait.
    pub unknown_pod: UnknownPod,
    /// Install the CNI plugin at start and keep it installed; uninstalled on exit with
    /// `OnExit::Remove` (with `Keep`, new pods keep failing closed until the next agent;
    /// with `Auto`, as the DaemonSet's state says).
    pub install_cni: Option<crate::cni::install::InstallConfig>,
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    // A running agent on the same state dir is not an error but a hand-over: this agent
    // opens its listeners beside that one's, takes the pid file and the CNI socket once
    // it has adopted every pod, and the other one drains on its SIGTERM.
    let predecessor = cleanup::running_agent(&config.state_dir);
    match predecessor {
        Some(pid) => tracing::info!(
            pid,
            "agent pid {pid} serves this state dir: taking over from it"
        ),
        // Pins a previous agent left are not removed here: the data path reuses its maps
        // and replaces its links (see EbpfDatapath::attach).
        None => write_own_pid(&config.state_dir.join(PID_FILE))?,
    }
    let result = serve(&config, predecessor).await;
    if let Some(path) = &config.ready_file {
        let _ = std::fs::remove_file(path);
    }
    // Until this agent has taken over, the state dir (pid file, CNI socket) is the
    // running agent's; after handing over, it is the next agent's.
    if let Some(owner) = cleanup::running_agent(&config.state_dir) {
        tracing::info!(owner, "state dir left to agent pid {owner}");
        return result;
    }
    let cleaned = cleanup::cleanup(
        &config.bpffs,
        &config.state_dir,
        &config.cni_socket,
        cleanup::Scope::Shutdown,
    );
    match (&result, cleaned) {
        (_, Ok(removed)) => tracing::info!(?removed, "cleaned up"),
        (Ok(()), Err(error)) => return Err(error.context("cleaning up")),
        (Err(_), Err(error)) => tracing::error!(%error, "cleaning up after a failure"),
    }
    result
}

/// Write this process's pid to `path` (the pid file, the ready file).
fn write_own_pid(path: &std::path::Path) -> anyhow::Result<()> {
    std::fs::write(path, std::process::id().to_string())
        .with_context(|| format!("writing {}", path.display()))
}

async fn serve(config: &AgentConfig, predecessor: Option<i32>) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    raise_open_file_limit();
    let exit_check = match (config.on_exit, &config.daemonset) {
        (OnExit::Auto, Some(daemonset)) => Some(ExitCheck {
            client: kube::client_from(config.kubeconfig.as_deref())
                .await
                .context("--on-exit auto: Kubernetes client")?,
            daemonset: daemonset.clone(),
        }),
        (OnExit::Auto, None) => bail!("--on-exit auto needs --daemonset and its namespace"),
        _ => None,
    };

    let mut probe = crate::datapath::probe::probe();
    for name in &config.simulate_missing_features {
        probe.simulate_missing(name)?;
    }
    let (mode, mut mode_reason) = crate::datapath::probe::choose(config.mode, &probe)
        .context("choosing the interception mode")?;
    let ebpf = match mode {
        Chosen::Ebpf => {
            for line in probe.fallback_lines() {
                tracing::info!("eBPF fallback: {line}");
            }
            let attached = EbpfDatapath::attach(
                &config.cgroup,
                &config.bpffs,
                EbpfOptions {
                    debug: config.bpf_debug,
                    sockmap: config.sockmap,
                    inbound_flow_capacity: config.inbound_flow_capacity,
                    outbound_flow_capacity: config.outbound_flow_capacity,
                    support: config.tc_attach.apply(KernelSupport::from_probe(&probe)),
                },
            );
            match attached {
                Ok(datapath) => Some(datapath),
                // The probe said yes but the kernel refused at attach time: nothing of
                // the attempt is left (attach is all or nothing), so iptables can take over.
                Err(error) if config.mode == crate::datapath::probe::Mode::Auto => {
                    tracing::error!(%error, "attaching the eBPF data path failed: iptables fallback");
                    mode_reason = format!(
                        "auto: the probe found every required feature, but attaching failed \
                         ({error}): iptables fallback"
                    );
                    None
                }
                Err(error) => {
                    return Err(anyhow::Error::new(error).context("attaching the eBPF data path"))
                }
            }
        }
        Chosen::Iptables => None,
    };
    let (datapath, iptables_backend): (Arc<dyn Datapath>, _) = match ebpf {
        Some(ebpf) => (Arc::new(ebpf), None),
        None => {
            if config.sockmap {
                bail!("--sockmap needs the eBPF mode; this agent runs iptables ({mode_reason})");
            }
            let (backend, why) =
                crate::datapath::iptables::detect(config.iptables_backend, &config.state_dir)
                    .context("choosing the iptables backend")?;
            mode_reason = format!("{mode_reason}; iptables-{}: {why}", backend.name());
            (Arc::new(IptablesDatapath::new(backend)), Some(backend))
        }
    };
    // The client's address inbound: each pod's return route for transparent sockets.
    let datapath = if config.preserve_client_ip {
        crate::datapath::client_addr::ClientAddressRoutes::wrap(datapath, iptables_backend)
    } else {
        tracing::info!("--preserve-client-ip false: applications see their pod's own address as the peer of inbound connections");
        datapath
    };
    // Kubelet's probes in SMI mode: the node's SNAT to the probe address, in either mode.
    let datapath = crate::datapath::node_probes::ProbeSnat::wrap(
        datapath,
        iptables_backend,
        config.iptables_backend,
        &config.state_dir,
    );
    tracing::info!(mode = datapath.mode(), reason = %mode_reason, kernel = %probe.kernel,
        cgroup = %config.cgroup.display(), "interception mode");

    let (tx, mut rx) = watch::channel(ManifestState::default());
    let watcher = match &config.source {
        ModelSource::Manifests(dir) => {
            manifests::watch_dir(dir.clone(), MANIFEST_POLL, tx).abort_handle()
        }
        ModelSource::Kube {
            node_name,
            mesh_config,
        } => {
            let client = kube::client_from(config.kubeconfig.as_deref())
                .await
                .context("Kubernetes client")?;
            let source = kube::KubeSourceConfig {
                node_name: node_name.clone(),
                mesh_config: Some(mesh_config.clone()),
            };
            kube::spawn(client, source, tx).abort_handle()
        }
    };
    let loaded = tokio::time::timeout(FIRST_MODEL_TIMEOUT, rx.wait_for(|s| s.generation > 0))
        .await
        .is_ok_and(|r| r.is_ok());
    if !loaded {
        let error = rx
            .borrow()
            .last_error
            .clone()
            .unwrap_or_else(|| "no model loaded".into());
        watcher.abort();
        bail!("the {} source did not load: {error}", config.source.kind());
    }
    // The kube source's MeshConfig object, laid over the file (or the defaults).
    let mesh_config_object = matches!(config.source, ModelSource::Kube { .. }).then(|| rx.clone());
    let (mesh_config, mesh_config_rx) = match (&config.mesh_config, mesh_config_object) {
        (None, None) => (None, None),
        (path, object) => {
            let (handle, rx) = follow_mesh_config(
                path.clone(),
                object,
                Arc::clone(&datapath),
                config.bpf_debug,
            )
            .await;
            (Some(handle), Some(rx))
        }
    };
    let pods_file = config.state_dir.join(PODS_FILE);
    let options = AgentOptions {
        sockmap: config.sockmap,
        pods_file: Some(pods_file),
        unknown_pod_wait: config.unknown_pod_wait,
        unknown_pod: config.unknown_pod,
        access_log: config.access_log,
        client_hello_timeout: Some(config.client_hello_timeout),
        same_node_direct: config.same_node_direct,
        discovery: Some(
            crate::inpod::discover::ProcScanner::host().context("reading the agent's own netns")?,
        ),
        node_name: match &config.source {
            ModelSource::Kube { node_name, .. } => Some(node_name.clone()),
            ModelSource::Manifests(_) => None,
        },
    };
    let agent = Agent::new(Arc::clone(&datapath), rx, options);
    let follower = agent.spawn_model_follower();
    // In force before the agent is ready: no connection is judged in the wrong mode.
    let policy_follower = mesh_config_rx.map(|rx| {
        agent.set_permissive(rx.borrow().config.permissive());
        agent.set_egress(rx.borrow().config.egress());
        follow_policy_mode(rx, Arc::clone(&agent))
    });
    let watcher_counters =
        spawn_counter_watch(Arc::clone(&datapath), config.inbound_half_open_timeout);
    // Pods enrolled before a restart get their listeners and maps back before CNI
    // requests are taken and before the agent says it is ready. While a predecessor still
    // serves, it may add pods after the list was read: nothing is pruned yet.
    agent.restore(predecessor.is_none()).await;
    let info = StaticInfo {
        cgroup: config.cgroup.clone(),
        bpffs: config.bpffs.clone(),
        cni_socket: config.cni_socket.clone(),
        source: config.source.kind(),
        mode_reason,
        iptables_backend,
        probe,
        manifests: match &config.source {
            ModelSource::Manifests(dir) => Some(dir.clone()),
            ModelSource::Kube { .. } => None,
        },
    };
    // Bound before taking over, so a port in use fails this agent, not the hand-over.
    let admin = admin::serve(config.admin_addr, Arc::clone(&agent), info)
        .await
        .with_context(|| format!("admin endpoint on {}", config.admin_addr))?;
    let metrics = match config.metrics_addr {
        Some(addr) => Some(
            admin::serve_metrics(addr, Arc::clone(&agent))
                .await
                .with_context(|| {
                    format!("metrics endpoint on {addr} (--metrics-addr; `none` turns it off)")
                })?,
        ),
        None => None,
    };
    if let Some(pid) = predecessor {
        // From here on the predecessor answers CNI requests "try again" and writes no pod
        // list; what it added before is in the list, read again now.
        write_own_pid(&config.state_dir.join(PID_FILE))?;
        let adopted = agent.restore(true).await;
        tracing::info!(predecessor = pid, adopted, "took over the state dir");
    }
    // Pods that ran before any agent (no CNI ADD record): once the remembered pods are
    // adopted for good, so a pod a previous agent remembered keeps its record.
    agent.discover_running().await;
    let forgotten = {
        let datapath = Arc::clone(&datapath);
        tokio::task::spawn_blocking(move || datapath.forget_unclaimed_rules())
            .await
            .unwrap_or(0)
    };
    if forgotten > 0 {
        tracing::info!(
            forgotten,
            "removed exclusion rules a previous agent left that this configuration does not have"
        );
    }
    let cni = crate::cni::serve(&config.cni_socket, Arc::clone(&agent))?;
    let cni_install = match &config.install_cni {
        Some(install) => Some(
            crate::cni::install::start(install, crate::cni::install::DEFAULT_WATCH_INTERVAL)
                .context("installing the CNI plugin")?,
        ),
        None => None,
    };
    agent.set_ready();
    if let Some(path) = &config.ready_file {
        write_own_pid(path)?;
    }
    let metrics_addr = config
        .metrics_addr
        .map_or_else(|| "off".to_owned(), |addr| addr.to_string());
    tracing::info!(admin = %config.admin_addr, metrics = %metrics_addr,
        cni_socket = %config.cni_socket.display(), "agent ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: stopping"),
        _ = sigint.recv() => tracing::info!("SIGINT: stopping"),
    }
    let successor = agent.superseded();
    if let Some(path) = &config.ready_file {
        let _ = std::fs::remove_file(path);
    }
    // After a hand-over everything stays: the next agent serves it.
    let on_exit = match successor {
        Some(_) => OnExit::Keep,
        None => exit_action(config.on_exit, exit_check.as_ref()).await,
    };
    if let (Some(watch), Some(install)) = (cni_install, &config.install_cni) {
        let uninstall = on_exit == OnExit::Remove;
        if let Err(error) = crate::cni::install::stop(watch, install, uninstall).await {
            tracing::error!(%error, "uninstalling the CNI plugin");
        }
    }
    cni.abort();
    // Stop accepting at once; open connections go on until they end or the deadline.
    let drain_started = std::time::Instant::now();
    let left_open = agent.drain(config.drain_timeout).await;
    tracing::info!(
        left_open,
        drained_ms = drain_started.elapsed().as_millis() as u64,
        "drained: {left_open} connections still open are closed now"
    );
    admin.abort();
    if let Some(handle) = &metrics {
        handle.abort();
    }
    follower.abort();
    watcher.abort();
    watcher_counters.abort();
    if let Some(handle) = &mesh_config {
        handle.abort();
    }
    if let Some(handle) = &policy_follower {
        handle.abort();
    }
    let result = match (successor, on_exit) {
        (Some(pid), _) => {
            tracing::info!(
                successor = pid,
                "handed over: the data path is agent pid {pid}'s"
            );
            Ok(())
        }
        (None, OnExit::Remove) => {
            agent.remove_all();
            datapath.teardown().context("removing the data path")
        }
        (None, OnExit::Keep | OnExit::Auto) => {
            tracing::info!(
                "keeping the data path: enrolled pods fail closed until the next agent adopts them"
            );
            Ok(())
        }
    };
    drop(agent);
    // Last reference: detaches what was not pinned.
    drop(datapath);
    result
}

/// `--on-exit auto`'s question, asked at start-up of a client (so a missing service
/// account fails the start, not the exit).
struct ExitCheck {
    client: ::kube::Client,
    daemonset: DaemonSetRef,
}

/// What this exit does with the data path: `Auto` becomes `Remove` for an uninstall and
/// `Keep` for everything else, an API server that does not answer included (a kept data
/// path fails closed; a removed one would let enrolled pods bypass the mesh).
async fn exit_action(configured: OnExit, check: Option<&ExitCheck>) -> OnExit {
    let (OnExit::Auto, Some(check)) = (configured, check) else {
        return configured;
    };
    match crate::daemonset::check(check.client.clone(), &check.daemonset, CHECK_TIMEOUT).await {
        Ok(state) if state.is_uninstall() => {
            tracing::info!(daemonset = %check.daemonset, ?state,
                "the DaemonSet is {state:?}: uninstalling (CNI entry, plugin, data path)");
            OnExit::Remove
        }
        Ok(state) => {
            tracing::info!(daemonset = %check.daemonset, ?state,
                "the DaemonSet is still there: a rolling update, keeping the data path");
            OnExit::Keep
        }
        Err(error) => {
            tracing::error!(%error,
                "cannot tell an uninstall from an update: keeping the data path and the CNI \
                 entry (if this was an uninstall, run `interceptor uninstall-cni` and \
                 `interceptor cleanup` on this node)");
            OnExit::Keep
        }
    }
}

/// How often the kernel counters are checked for refused flows (and half-open records
/// swept).
const COUNTER_WATCH: Duration = Duration::from_secs(1);

/// Log, once per check, when records could not be written (a full map): those flows were
/// refused, which an operator must hear about. Sweeps expired half-open inbound records.
fn spawn_counter_watch(
    datapath: Arc<dyn Datapath>,
    half_open_timeout: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A mode without kernel counters has no maps to fill up.
        let Some(mut seen) = datapath.counters() else {
            return;
        };
        let mut ticker = tokio::time::interval(COUNTER_WATCH.min(half_open_timeout / 4));
        loop {
            ticker.tick().await;
            let expired = {
                let datapath = Arc::clone(&datapath);
                tokio::task::spawn_blocking(move || datapath.expire_half_open(half_open_timeout))
                    .await
                    .unwrap_or(0)
            };
            if expired > 0 {
                tracing::warn!(
                    expired,
                    "inbound flow records half-open past the timeout removed (handshakes \
                     that never completed, such as spoofed SYNs)"
                );
            }
            let now = datapath.counters().unwrap_or(seen);
            let outbound = now.record_failed.saturating_sub(seen.record_failed);
            let inbound = now
                .inbound_record_failed
                .saturating_sub(seen.inbound_record_failed);
            if outbound > 0 || inbound > 0 {
                tracing::warn!(
                    outbound,
                    inbound,
                    total_outbound = now.record_failed,
                    total_inbound = now.inbound_record_failed,
                    "new flows of enrolled pods refused: a kernel map was full"
                );
            }
            let busy = now
                .inbound_tuple_busy
                .saturating_sub(seen.inbound_tuple_busy);
            if busy > 0 {
                tracing::warn!(
                    refused = busy,
                    total = now.inbound_tuple_busy,
                    "new inbound flows refused: the client's address and port already \
                     carry a flow to another port of the same pod (one connection on 15003)"
                );
            }
            seen = now;
        }
    })
}

/// Every proxied connection holds two sockets (and two pipes while it carries bytes),
/// so the default soft limit of container runtimes (1,024) would refuse connections
/// past a few hundred: the soft limit goes up to the hard one, as Envoy's and ztunnel's
/// deployments arrange. The gateway too: each UDP session holds a socket of its own.
pub(crate) fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open file limit raised"),
            Err(error) => tracing::warn!(%error, soft, hard, "raising the open file limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open file limit"),
        Err(error) => tracing::warn!(%error, "reading the open file limit"),
    }
}

/// How often the mesh config file is checked.
const MESH_CONFIG_POLL: Duration = Duration::from_secs(1);

/// Watch the global mesh config and apply it to the data path (global scope) whenever it
/// changes; the last good config stays in force while the file is broken. Waits briefly
/// for the first load, so pods enrolled at start already see the global rules. With the
/// kube source (`object`: its state), FSM's MeshConfig object is laid over the file
/// (`config::follow_merged`), and what is applied is the merged configuration.
async fn follow_mesh_config(
    path: Option<PathBuf>,
    object: Option<watch::Receiver<ManifestState>>,
    datapath: Arc<dyn Datapath>,
    cli_debug: bool,
) -> (
    tokio::task::AbortHandle,
    watch::Receiver<crate::config::ConfigState>,
) {
    use crate::config::{follow_merged, watch_file, ConfigState};
    use interceptor_common::rules::GLOBAL_SCOPE;
    let (tx, mut rx) = watch::channel(ConfigState::default());
    let (watcher, merger) = match object {
        None => (
            path.clone()
                .map(|path| watch_file(path, MESH_CONFIG_POLL, tx)),
            None,
        ),
        Some(source) => {
            let (file_tx, file_rx) = watch::channel(ConfigState::default());
            let watcher = path
                .clone()
                .map(|path| watch_file(path, MESH_CONFIG_POLL, file_tx));
            let merger = follow_merged(
                watcher.as_ref().map(|_| file_rx),
                source,
                |state: &ManifestState| state.mesh_config.clone(),
                tx,
            );
            (watcher, Some(merger))
        }
    };
    let path = path.map_or_else(|| "(none)".into(), |p| p.display().to_string());
    let first =
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.generation > 0)).await;
    if !first.is_ok_and(|r| r.is_ok()) {
        let error = rx
            .borrow()
            .last_error
            .clone()
            .unwrap_or_else(|| "not loaded".into());
        tracing::error!(%path, %error, "mesh config: running without global rules until it loads");
    }
    let apply = move |state: &ConfigState| {
        for warning in &state.warnings {
            tracing::warn!(%path, "mesh config: {warning}");
        }
        // iptables mode re-writes every enrolled pod: off the async workers' hands.
        let applied =
            tokio::task::block_in_place(|| datapath.set_rules(GLOBAL_SCOPE, &state.config));
        if let Err(error) = applied {
            tracing::error!(%error, "applying the global mesh config");
        }
        if let Err(error) = datapath.set_debug(cli_debug || state.config.bpf_debug) {
            tracing::error!(%error, "applying bpfDebug");
        }
    };
    let mut seen = 0;
    let for_agent = rx.clone();
    let task = tokio::spawn(async move {
        loop {
            let state = rx.borrow_and_update().clone();
            if state.generation != seen {
                seen = state.generation;
                apply(&state);
                tracing::info!(generation = seen, "mesh config applied");
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        drop((watcher, merger));
    });
    (task.abort_handle(), for_agent)
}

/// Apply the mesh config's traffic policy mode (permissive or SMI) and egress policy to
/// the proxy.
fn follow_policy_mode(
    mut rx: watch::Receiver<crate::config::ConfigState>,
    agent: Arc<Agent>,
) -> tokio::task::AbortHandle {
    tokio::spawn(async move {
        loop {
            // Read, then released before the agent rebuilds its routes.
            let (permissive, egress) = {
                let state = rx.borrow_and_update();
                (state.config.permissive(), state.config.egress())
            };
            agent.set_permissive(permissive);
            agent.set_egress(egress);
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
    .abort_handle()
}
