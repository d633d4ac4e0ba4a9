//! `interceptor`: the node agent (`agent`), the TCP gateway (`gateway`), and the operator
//! commands `cleanup` and `trace`.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use interceptor::cni::install::{self, InstallConfig};
use interceptor::daemon::{self, AgentConfig, ModelSource};
use interceptor::{cleanup, datapath, trace};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "interceptor",
    version,
    about = "Sidecar-less eBPF traffic interceptor and node agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct Paths {
    /// bpffs directory of this agent's pins (one per agent instance).
    #[arg(long, default_value = "/sys/fs/bpf/interceptor")]
    bpffs: PathBuf,
    /// State directory (pid file, CNI socket).
    #[arg(long, default_value = "/var/run/interceptor")]
    state_dir: PathBuf,
    /// Unix socket the CNI plugin talks to [default: <state-dir>/cni.sock].
    #[arg(long)]
    cni_socket: Option<PathBuf>,
}

impl Paths {
    fn cni_socket(&self) -> PathBuf {
        self.cni_socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cni.sock"))
    }
}

#[derive(clap::Args, Debug, Clone)]
struct CniDirs {
    /// CNI bin dir the plugin is copied into.
    #[arg(long, default_value = install::DEFAULT_CNI_BIN_DIR)]
    cni_bin_dir: PathBuf,
    /// CNI conf dir holding the node's primary network config.
    #[arg(long, default_value = install::DEFAULT_CNI_CONF_DIR)]
    cni_conf_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    Manifests,
    Kube,
}

#[derive(Subcommand, Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at start-up; boxing the agent's flags buys nothing"
)]
enum Command {
    /// Run the node agent.
    Agent {
        /// cgroup v2 directory the programs attach to [default: the cgroup2 root].
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[command(flatten)]
        paths: Paths,
        /// Where the model comes from: a directory of manifests (standalone) or the
        /// Kubernetes API.
        #[arg(long, value_enum, default_value = "manifests")]
        source: SourceKind,
        /// Directory of Kubernetes YAML (Namespace, Pod, Service, EndpointSlice), watched
        /// for changes; required with `--source manifests`.
        #[arg(long, required_if_eq("source", "manifests"))]
        manifests: Option<PathBuf>,
        /// This node's name (the DaemonSet passes spec.nodeName); required with
        /// `--source kube`: only Pods scheduled here are watched.
        #[arg(long, env = "NODE_NAME", required_if_eq("source", "kube"))]
        node_name: Option<String>,
        /// The kubeconfig for the API server (`--source kube`, `--on-exit auto`); by
        /// default `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Admin endpoint (/healthz, /readyz, /config_dump, /metrics).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Metrics endpoint for Prometheus: /metrics only (the admin port's, with the
        /// data path's kernel counters), bound with SO_REUSEPORT like the admin port.
        /// `none` (or empty) serves metrics on the admin port only.
        #[arg(long, default_value = "0.0.0.0:15020", value_parser = parse_optional_addr)]
        metrics_addr: OptionalAddr,
        /// Write one JSON line per finished proxied connection to stdout (source pod,
        /// client, original destination, target, route, backend, bytes, duration,
        /// outcome); logs stay on stderr.
        #[arg(long)]
        access_log: bool,
        /// Turn on the programs' trace_pipe lines (`interceptor trace` reads them).
        #[arg(long)]
        bpf_debug: bool,
        /// Accelerate connections between local pods with sockmap + sk_msg (opt-in:
        /// lower small-message latency, lower bulk throughput).
        #[arg(long)]
        sockmap: bool,
        /// Inbound, dial the application from the client's address and port (a
        /// transparent socket and a policy route in the pod, as ztunnel does), so it sees
        /// its real peer; `false`: from the pod's own address.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        preserve_client_ip: bool,
        /// Entries in the inbound flow map; when full, new inbound flows are refused
        /// (their SYN dropped, counted and logged) and existing ones are unaffected.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        inbound_flow_capacity: Option<u32>,
        /// Entries in the map of redirected connections' original destinations (one per
        /// open outbound connection of an enrolled pod); when full, new connections are
        /// refused (reset by the proxy, counted and logged), never sent direct, and
        /// existing ones are unaffected.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        outbound_flow_capacity: Option<u32>,
        /// How long an inbound flow record may stay half-open (SYN seen, never accepted
        /// by the inbound listener, such as a spoofed SYN) before the agent removes it.
        #[arg(long, default_value_t = 75_000, value_parser = clap::value_parser!(u64).range(100..))]
        inbound_half_open_timeout_ms: u64,
        /// On SIGTERM/SIGINT: `remove` the data path (pods are left alone), or `keep` it
        /// so enrolled pods fail closed until the next agent adopts them (rolling updates),
        /// or `auto`: remove it (and the CNI entry and plugin) only when the agent's
        /// DaemonSet (`--daemonset`) is gone or being deleted, an uninstall.
        #[arg(long, value_enum, default_value = "remove")]
        on_exit: daemon::OnExit,
        /// The agent's DaemonSet, which `--on-exit auto` looks up in the API server.
        #[arg(long, default_value = "interceptor-node")]
        daemonset: String,
        /// The namespace of the agent's pod and DaemonSet (the DaemonSet passes
        /// metadata.namespace); required with `--on-exit auto`.
        #[arg(long, env = "POD_NAMESPACE", required_if_eq("on_exit", "auto"))]
        pod_namespace: Option<String>,
        /// On SIGTERM/SIGINT the agent stops accepting at once (the next agent's
        /// listeners take new connections) and lets open connections go on for this long
        /// (`30s`, `500ms`; plain numbers are seconds); those still open then are closed.
        #[arg(long, default_value = "25s", value_parser = parse_duration)]
        drain_timeout: std::time::Duration,
        /// On a Service port routed by server name (a VirtualService `tls` rule), how
        /// long an enrolled client has to send its whole ClientHello before its
        /// connection is reset (`5s`, `500ms`).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        client_hello_timeout: std::time::Duration,
        /// A connection between two enrolled pods of this node takes one proxy hop
        /// instead of two: the client's outbound proxy does the destination's inbound
        /// checks (SMI admission, rate limit) and connects to its application from the
        /// client's address inside its netns, keeping both pods' records and metrics.
        #[arg(long)]
        same_node_direct: bool,
        /// A file created when the agent is ready and removed when it stops: a readiness
        /// check of this agent alone (an exec probe), where the admin port is shared with
        /// the agent it replaces.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Interception mode: `auto` probes the kernel and picks eBPF when everything it
        /// needs is there, the iptables fallback otherwise.
        #[arg(long, value_enum, default_value = "auto")]
        mode: interceptor::datapath::probe::Mode,
        /// Treat a probed feature (by its name in /config_dump) as missing: shows what
        /// `--mode auto` does on an older kernel. Repeatable.
        #[arg(long = "simulate-missing-feature", value_name = "FEATURE")]
        simulate_missing_features: Vec<String>,
        /// eBPF mode: how the tc programs attach to each pod's interface. `netlink`
        /// (clsact + cls_bpf filter); `tcx` uses bpf_link (kernel 6.6, netlink below),
        /// which waits for an RCU grace period under the rtnl lock per direction: about
        /// 30 ms more per CNI ADD on the machine measured.
        #[arg(long, value_enum, default_value = "netlink")]
        tc_attach: interceptor::datapath::ebpf::TcAttach,
        /// iptables mode: `legacy` or `nft`; `auto` picks the one the node already uses.
        #[arg(long, value_enum, default_value = "auto")]
        iptables_backend: interceptor::datapath::iptables::BackendChoice,
        /// The global mesh config (YAML with FSM MeshConfig names:
        /// outboundIPRangeExclusionList, outboundIPRangeInclusionList,
        /// outboundPortExclusionList, inboundPortExclusionList, bpfDebug), watched.
        #[arg(long)]
        mesh_config: Option<PathBuf>,
        /// With `--source kube`: FSM's MeshConfig object (namespace/name), watched; the
        /// fields of its spec.traffic it sets win over the --mesh-config file's.
        #[arg(long, default_value = "fsm-system/fsm-mesh-config")]
        mesh_config_name: interceptor::config::MeshConfigName,
        /// How long CNI ADD waits for a pod the model does not know yet (milliseconds).
        #[arg(long, default_value_t = 2000)]
        unknown_pod_wait_ms: u64,
        /// What CNI ADD does for a pod still unknown after the wait: `reject` (code 3,
        /// kubelet retries) or `admit` (the pod starts unintercepted, logged).
        #[arg(long, value_enum, default_value = "reject")]
        unknown_pod: interceptor::agent::UnknownPod,
        /// Install interceptor-cni (the one next to this executable) at start, keep it
        /// in the primary CNI config while running, and uninstall it on exit.
        #[arg(long)]
        install_cni: bool,
        #[command(flatten)]
        cni_dirs: CniDirs,
    },
    /// Serve one Gateway (Gateway API or Istio) as a TCP gateway, from inside the gateway
    /// pod's network namespace.
    Gateway {
        /// The Gateway to serve, NAMESPACE/NAME: a gateway.networking.k8s.io Gateway, or
        /// else a networking.istio.io Gateway of that name. Without it, the Istio Gateway
        /// whose selector matches the labels of --pod.
        #[arg(long)]
        gateway: Option<String>,
        /// The gateway pod, NAMESPACE/NAME (the Deployment passes its own name).
        #[arg(long, env = "POD_NAME_NAMESPACED")]
        pod: Option<String>,
        /// Serve a Gateway API Gateway only when its gatewayClassName is this.
        #[arg(long)]
        gateway_class: Option<String>,
        /// Where the objects come from.
        #[arg(long, value_enum, default_value = "manifests")]
        source: SourceKind,
        /// Directory of manifests (with --source manifests).
        #[arg(long)]
        manifests: Option<PathBuf>,
        /// The gateway pod's node (with --source kube).
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Admin endpoint: /healthz, /readyz, /config_dump, /metrics.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// On a TLS passthrough listener, how long a client has to send its whole
        /// ClientHello before its connection is reset (`5s`, `500ms`).
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        client_hello_timeout: std::time::Duration,
        /// On a UDP listener, a client's session (its backend) ends after no datagram
        /// either way for this long (`60s`, `500ms`).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        udp_idle_timeout: std::time::Duration,
        /// Sessions per UDP listener; a new client of a full table evicts the session idle
        /// the longest.
        #[arg(long, default_value_t = interceptor::gateway::udp::DEFAULT_MAX_FLOWS,
              value_parser = clap::value_parser!(u32).range(1..))]
        udp_max_flows: u32,
    },
    /// FSM's egress gateway (SOCKS5 mode): the mesh's proxies send egress that an
    /// EgressGateway names here, each connection opened with a SOCKS5 CONNECT to where
    /// the application was going; run it in the gateway Service's pods.
    EgressGateway {
        /// Where the proxies connect (the Service's target port; FSM's is 1080).
        #[arg(long, default_value = "0.0.0.0:1080")]
        listen: SocketAddr,
        /// Admin endpoint: /healthz, /metrics.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// How long a connection has to send its SOCKS5 greeting and request.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        handshake_timeout: std::time::Duration,
        /// How long the connect to a destination may take.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        connect_timeout: std::time::Duration,
    },
    /// Probe this kernel: the features eBPF mode needs or can do without (each with its
    /// fallback), and the mode `--mode auto` picks and why.
    Probe {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Treat a probed feature as missing, as `agent --simulate-missing-feature` does.
        #[arg(long = "simulate-missing-feature", value_name = "FEATURE")]
        simulate_missing_features: Vec<String>,
    },
    /// Exit 0 when the agent that wrote `--ready-file` is ready (the file names a live
    /// agent), 1 otherwise: the DaemonSet's readiness probe, which must judge this pod's
    /// agent alone while a hand-over shares the admin port between two.
    Ready {
        #[arg(long)]
        ready_file: PathBuf,
    },
    /// Remove everything a stopped agent left behind (pins, socket, pid file).
    Cleanup {
        #[command(flatten)]
        paths: Paths,
    },
    /// Follow the programs' trace lines, optionally for one pod.
    Trace {
        /// Only lines about this pod (NAMESPACE/NAME), looked up through the admin endpoint.
        #[arg(long)]
        pod: Option<String>,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
        /// Stop after this many lines.
        #[arg(long)]
        max_lines: Option<usize>,
    },
    /// Copy interceptor-cni into the CNI bin dir and append it to the node's primary CNI
    /// config (a single-plugin .conf is wrapped into a .conflist).
    InstallCni {
        #[command(flatten)]
        dirs: CniDirs,
        /// The plugin to copy [default: interceptor-cni next to this executable].
        #[arg(long)]
        plugin_binary: Option<PathBuf>,
        /// `agentSocket` of the entry: the agent's CNI socket.
        #[arg(long, default_value = install::DEFAULT_AGENT_SOCKET)]
        agent_socket: PathBuf,
        /// `failurePolicy` of the entry: fail-closed or fail-open.
        #[arg(long, default_value = "fail-closed", value_parser = install::parse_failure_policy)]
        failure_policy: interceptor_cni::FailurePolicy,
    },
    /// Remove interceptor-cni from the CNI configs and the CNI bin dir.
    UninstallCni {
        #[command(flatten)]
        dirs: CniDirs,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// An address, or none (`--metrics-addr none`).
#[derive(Clone, Copy, Debug)]
struct OptionalAddr(Option<SocketAddr>);

/// `ADDR:PORT`, or `none` / empty for no listener.
fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("none") {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|_| format!("{text:?} is not ADDRESS:PORT (such as 0.0.0.0:15020) or `none`"))
}

/// `30s`, `500ms` or a plain number of seconds.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.strip_suffix("ms") {
        Some(number) => (number, 1),
        None => (text.strip_suffix('s').unwrap_or(text), 1000),
    };
    number
        .trim()
        .parse::<u64>()
        .map(|n| std::time::Duration::from_millis(n.saturating_mul(unit)))
        .map_err(|_| format!("{text:?} is not a duration (like 30s, 500ms or 30)"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent {
            cgroup,
            paths,
            source,
            manifests,
            node_name,
            kubeconfig,
            admin_addr,
            metrics_addr,
            access_log,
            bpf_debug,
            sockmap,
            preserve_client_ip,
            inbound_flow_capacity,
            outbound_flow_capacity,
            inbound_half_open_timeout_ms,
            on_exit,
            daemonset,
            pod_namespace,
            drain_timeout,
            client_hello_timeout,
            same_node_direct,
            ready_file,
            mode,
            simulate_missing_features,
            tc_attach,
            iptables_backend,
            mesh_config,
            mesh_config_name,
            unknown_pod_wait_ms,
            unknown_pod,
            install_cni,
            cni_dirs,
        } => {
            let cgroup = match cgroup {
                Some(path) => path,
                None => {
                    datapath::cgroup::detect_cgroup2_root().context("detecting the cgroup2 root")?
                }
            };
            let install_cni = match install_cni {
                true => Some(InstallConfig {
                    bin_dir: cni_dirs.cni_bin_dir,
                    conf_dir: cni_dirs.cni_conf_dir,
                    plugin_binary: install::default_plugin_binary()
                        .context("locating interceptor-cni next to this executable")?,
                    agent_socket: std::path::absolute(paths.cni_socket())
                        .context("resolving the CNI socket path")?,
                    failure_policy: interceptor_cni::FailurePolicy::FailClosed,
                }),
                false => None,
            };
            let config = AgentConfig {
                cgroup,
                cni_socket: paths.cni_socket(),
                bpffs: paths.bpffs,
                state_dir: paths.state_dir,
                source: match (source, manifests, node_name) {
                    (SourceKind::Manifests, Some(dir), _) => ModelSource::Manifests(dir),
                    (SourceKind::Kube, _, Some(node_name)) if !node_name.is_empty() => {
                        ModelSource::Kube {
                            node_name,
                            mesh_config: mesh_config_name,
                        }
                    }
                    (SourceKind::Manifests, None, _) => {
                        bail!("--source manifests needs --manifests DIR")
                    }
                    (SourceKind::Kube, _, _) => {
                        bail!("--source kube needs --node-name (or NODE_NAME)")
                    }
                },
                kubeconfig,
                admin_addr,
                metrics_addr: metrics_addr.0,
                access_log,
                bpf_debug,
                sockmap,
                preserve_client_ip,
                inbound_flow_capacity,
                outbound_flow_capacity,
                inbound_half_open_timeout: std::time::Duration::from_millis(
                    inbound_half_open_timeout_ms,
                ),
                on_exit,
                daemonset: pod_namespace.filter(|ns| !ns.is_empty()).map(|namespace| {
                    interceptor::daemonset::DaemonSetRef {
                        namespace,
                        name: daemonset,
                    }
                }),
                drain_timeout,
                client_hello_timeout,
                same_node_direct,
                ready_file,
                mode,
                simulate_missing_features,
                tc_attach,
                iptables_backend,
                mesh_config,
                unknown_pod_wait: std::time::Duration::from_millis(unknown_pod_wait_ms),
                unknown_pod,
                install_cni,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?;
            runtime.block_on(daemon::run(config))
        }
        Command::Gateway {
            gateway,
            pod,
            gateway_class,
            source,
            manifests,
            node_name,
            admin_addr,
            client_hello_timeout,
            udp_idle_timeout,
            udp_max_flows,
        } => {
            use interceptor::gateway::{udp::UdpSettings, GatewayConfig, GatewaySource};
            let source = match (source, manifests, node_name) {
                (SourceKind::Manifests, Some(dir), _) => GatewaySource::Manifests(dir),
                (SourceKind::Kube, _, Some(node_name)) if !node_name.is_empty() => {
                    GatewaySource::Kube { node_name }
                }
                (SourceKind::Manifests, None, _) => {
                    bail!("--source manifests needs --manifests DIR")
                }
                (SourceKind::Kube, _, _) => bail!("--source kube needs --node-name (or NODE_NAME)"),
            };
            if gateway.is_none() && pod.is_none() {
                bail!("name the Gateway with --gateway NS/NAME, or the gateway pod with --pod NS/NAME");
            }
            let config = GatewayConfig {
                gateway,
                pod,
                class: gateway_class,
                source,
                admin_addr,
                client_hello_timeout,
                udp: UdpSettings {
                    idle_timeout: udp_idle_timeout,
                    max_flows: udp_max_flows as usize,
                },
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(interceptor::gateway::run(config))
        }
        Command::EgressGateway {
            listen,
            admin_addr,
            handshake_timeout,
            connect_timeout,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(interceptor::egress_gateway::run(
                interceptor::egress_gateway::EgressGatewayConfig {
                    listen,
                    admin_addr,
                    handshake_timeout,
                    connect_timeout,
                },
            )),
        Command::Probe {
            json,
            simulate_missing_features,
        } => {
            let mut probe = datapath::probe::probe();
            for name in &simulate_missing_features {
                probe.simulate_missing(name)?;
            }
            let report = datapath::probe::ProbeReport::new(&probe);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("kernel {}", report.kernel);
                println!("--mode auto: {:?} ({})", report.auto_mode, report.reason);
                for f in &report.features {
                    let state = match (f.supported, f.required) {
                        (true, _) => "present".to_owned(),
                        (false, true) => "MISSING (required)".to_owned(),
                        (false, false) => {
                            format!("missing, fallback: {}", f.fallback.unwrap_or("none"))
                        }
                    };
                    println!("  {:<52} {:>5}  {state}", f.name, f.since);
                }
            }
            Ok(())
        }
        Command::Ready { ready_file } => match cleanup::live_agent_in(&ready_file) {
            Some(pid) => {
                println!("agent pid {pid} is ready");
                Ok(())
            }
            None => bail!("not ready: {} names no live agent", ready_file.display()),
        },
        Command::Cleanup { paths } => {
            let removed = cleanup::cleanup(
                &paths.bpffs,
                &paths.state_dir,
                &paths.cni_socket(),
                cleanup::Scope::Everything,
            )?;
            for path in &removed {
                println!("removed {path}");
            }
            if removed.is_empty() {
                println!("nothing to clean up");
            }
            Ok(())
        }
        Command::Trace {
            pod,
            admin_addr,
            max_lines,
        } => {
            let filter = match pod {
                Some(pod) => trace::pod_filter(&fetch_config_dump(admin_addr)?, &pod)?,
                None => trace::TraceFilter::default(),
            };
            let pipe = trace::locate_trace_pipe()?;
            trace::follow(&pipe, &filter, max_lines, &mut std::io::stdout().lock())
        }
        Command::InstallCni {
            dirs,
            plugin_binary,
            agent_socket,
            failure_policy,
        } => {
            let plugin_binary = match plugin_binary {
                Some(path) => path,
                None => install::default_plugin_binary()
                    .context("locating interceptor-cni next to this executable")?,
            };
            let report = install::install(&InstallConfig {
                bin_dir: dirs.cni_bin_dir,
                conf_dir: dirs.cni_conf_dir,
                plugin_binary,
                agent_socket,
                failure_policy,
            })?;
            println!("{report}");
            Ok(())
        }
        Command::UninstallCni { dirs } => {
            let report = install::uninstall(&dirs.cni_bin_dir, &dirs.cni_conf_dir)?;
            println!("{report}");
            Ok(())
        }
    }
}

/// GET /config_dump from a running agent (plain HTTP/1.0, no client library needed for
/// one request on loopback).
fn fetch_config_dump(admin_addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin_addr)
        .with_context(|| format!("connecting to the agent's admin endpoint {admin_addr}"))?;
    stream.write_all(b"GET /config_dump HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("malformed HTTP response from the admin endpoint")?;
    serde_json::from_str(body).context("config_dump is not JSON")
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_take_seconds_milliseconds_or_plain_seconds() {
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("1m").unwrap_err().contains("\"1m\""));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }
}
