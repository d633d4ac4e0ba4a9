//! `interceptor gateway`: a TCP and UDP gateway run in a gateway pod's network namespace.
//! It serves one Gateway API `Gateway` (its TCP listeners and attached `TCPRoute`s, its TLS
//! passthrough listeners and attached `TLSRoute`s, routed by the server name peeked from
//! the ClientHello, see `proxy::sni`, and its UDP listeners and attached `UDPRoute`s, by
//! client session, see `udp`) or one
//! Istio `Gateway` (its TCP servers and the `VirtualService`s bound to it), named with
//! `--gateway` or, in a cluster, the Istio Gateway whose `selector` matches the gateway
//! pod's labels; from a directory of manifests or from the API server. Routes follow the
//! objects as they change, listeners open and close with the Gateway's. In a cluster the
//! routes' `status.parents` conditions are written back (server-side apply on the
//! status subresource). Its admin port has `/healthz`, `/readyz`, `/config_dump`
//! (listeners, route conditions, recent connections) and `/metrics`.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod flows;
pub mod udp;

use crate::proxy::forward::{forward, reset_on_close, CopyMode};
use crate::proxy::metrics::ProxyMetrics;
use crate::proxy::routes::LastValid;
use crate::proxy::sni::peek_sni;
use crate::proxy::socket::{self, HostSockets};
use crate::proxy::upstream::{self, Upstreams};
use crate::proxy::{ConnectionLog, ConnectionRecord, Direction, GatewayTable, ProxyError, Target};
use crate::source::manifests::{self, ManifestState};
use crate::sync::{lock, read, write};

const MANIFEST_POLL: Duration = Duration::from_millis(500);
const FIRST_MODEL_TIMEOUT: Duration = Duration::from_secs(10);

/// The `controllerName` the gateway writes in route status.
pub const CONTROLLER_NAME: &str = "interceptor.dev/gateway";

/// Where the gateway's objects come from.
#[derive(Clone, Debug)]
pub enum GatewaySource {
    Manifests(PathBuf),
    /// The API server; the node name scopes the Pods watched (the gateway pod's node).
    Kube {
        node_name: String,
    },
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// `namespace/name` of the Gateway to serve; `None`: the Istio Gateway whose selector
    /// matches the labels of `pod`.
    pub gateway: Option<String>,
    /// The gateway pod (`namespace/name`), for selector matching.
    pub pod: Option<String>,
    /// Serve a Gateway API Gateway only of this class.
    pub class: Option<String>,
    pub source: GatewaySource,
    pub admin_addr: SocketAddr,
    /// How long a client of a TLS passthrough listener has to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// The UDP listeners' session timeout and table size.
    pub udp: udp::UdpSettings,
}

impl GatewayConfig {
    fn source_text(&self) -> String {
        match &self.source {
            GatewaySource::Manifests(dir) => format!("manifests in {}", dir.display()),
            GatewaySource::Kube { .. } => "API server".into(),
        }
    }
}

/// The Gateway to serve: `--gateway`, else the oldest Istio Gateway selecting the pod.
pub fn pick_gateway(model: &crate::model::Model, config: &GatewayConfig) -> Result<String, String> {
    if let Some(gateway) = &config.gateway {
        return Ok(gateway.clone());
    }
    let Some(pod) = &config.pod else {
        return Err("neither --gateway nor --pod: nothing to serve".into());
    };
    let key: crate::model::PodKey = pod.parse().map_err(|e| format!("--pod: {e}"))?;
    let labels = &model
        .pod(&key)
        .ok_or_else(|| format!("pod {key} is not in the model (yet)"))?
        .labels;
    let mut selecting: Vec<_> = model
        .routing
        .istio_gateways
        .values()
        .filter(|gw| {
            !gw.spec.selector.is_empty()
                && gw
                    .spec
                    .selector
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect();
    selecting.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    let first = selecting
        .first()
        .ok_or_else(|| format!("no Istio Gateway selects pod {key} (labels {labels:?})"))?;
    for other in &selecting[1..] {
        tracing::warn!(gateway = %other.key(), served = %first.key(), "also selects this pod: not served, one Gateway per gateway process");
    }
    Ok(first.key())
}

struct Shared {
    config: GatewayConfig,
    /// The Gateway served now (`namespace/name`), or why none is.
    serving: RwLock<Result<String, String>>,
    table: RwLock<Arc<GatewayTable>>,
    log: ConnectionLog,
    upstreams: Arc<Upstreams>,
    /// The last valid version of each upstream settings object, across table builds.
    last_valid: std::sync::Mutex<LastValid>,
    model: watch::Receiver<ManifestState>,
    /// Ports that could not be bound, with the error (`8000` for TCP, `8000/udp`).
    bind_errors: std::sync::Mutex<HashMap<String, String>>,
    udp_metrics: udp::UdpMetrics,
}

/// The running listeners: TCP by port, UDP by port with the listener's name (its metrics'
/// label; a renamed listener is reopened).
#[derive(Default)]
struct Running {
    tcp: HashMap<u16, JoinHandle<()>>,
    udp: HashMap<u16, (String, JoinHandle<()>)>,
}

pub async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    if let Some(gateway) = &config.gateway {
        if gateway.parse::<crate::model::PodKey>().is_err() {
            bail!("--gateway {gateway:?}: expected NAMESPACE/NAME");
        }
    }
    crate::daemon::raise_open_file_limit();
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (tx, mut rx) = watch::channel(ManifestState::default());
    let mut status_writer = None;
    let watcher = match &config.source {
        GatewaySource::Manifests(dir) => {
            manifests::watch_dir(dir.clone(), MANIFEST_POLL, tx).abort_handle()
        }
        GatewaySource::Kube { node_name } => {
            let client = crate::source::kube::client_from_env()
                .await
                .context("Kubernetes client")?;
            status_writer = Some(StatusWriter::new(client.clone()));
            let source = crate::source::kube::KubeSourceConfig {
                node_name: node_name.clone(),
                mesh_config: None,
            };
            crate::source::kube::spawn(client, source, tx).abort_handle()
        }
    };
    let loaded = tokio::time::timeout(FIRST_MODEL_TIMEOUT, rx.wait_for(|s| s.generation > 0))
        .await
        .is_ok_and(|r| r.is_ok());
    if !loaded {
        let error = rx.borrow().last_error.clone().unwrap_or_default();
        watcher.abort();
        bail!("the {} did not load: {error}", config.source_text());
    }
    let udp_metrics = udp::UdpMetrics::default();
    let mut proxy_metrics = ProxyMetrics::default();
    udp_metrics.register(proxy_metrics.registry_mut());
    let log = ConnectionLog::new(proxy_metrics, None);
    let shared = Arc::new(Shared {
        serving: RwLock::new(Err("not started".into())),
        config: config.clone(),
        table: RwLock::new(Arc::new(GatewayTable::default())),
        upstreams: Arc::new(Upstreams::new(log.metrics().upstream())),
        log,
        last_valid: std::sync::Mutex::default(),
        model: rx.clone(),
        bind_errors: std::sync::Mutex::new(HashMap::new()),
        udp_metrics,
    });
    let mut listeners = Running::default();
    reconcile(&shared, &mut listeners, status_writer.as_mut()).await;
    let checked = Arc::clone(&shared);
    let health_checks = tokio::spawn(upstream::run_health_checks(
        Arc::clone(&shared.upstreams),
        move || {
            // A gateway is a client like any other: it checks mesh endpoints through their
            // inbound listeners, under the mesh's policies.
            let table = read(&checked.table).clone();
            table
                .checked_endpoints()
                .iter()
                .map(|c| upstream::CheckTarget {
                    addr: c.addr,
                    settings: Arc::clone(&c.settings),
                    sockets: Arc::new(HostSockets),
                })
                .collect()
        },
    ));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
        .route("/config_dump", get(config_dump))
        .route("/metrics", get(metrics))
        .with_state(Arc::clone(&shared));
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("admin endpoint on {}", config.admin_addr))?;
    let admin = tokio::spawn(async move {
        if let Err(error) = axum::serve(admin, app).await {
            tracing::error!(%error, "admin endpoint");
        }
    });
    tracing::info!(gateway = ?*read(&shared.serving), ports = ?read(&shared.table).ports(),
        udp_ports = ?read(&shared.table).udp_listeners().iter().map(|l| l.0).collect::<Vec<_>>(), "gateway ready");
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { break; }
                reconcile(&shared, &mut listeners, status_writer.as_mut()).await;
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    for (_, task) in listeners.tcp {
        task.abort();
    }
    for (_, (_, task)) in listeners.udp {
        task.abort();
    }
    admin.abort();
    health_checks.abort();
    watcher.abort();
    Ok(())
}

/// Rebuild the table from the current model, then open the listeners it has and close
/// those it no longer has (their open connections end with them).
async fn reconcile(
    shared: &Arc<Shared>,
    listeners: &mut Running,
    status_writer: Option<&mut StatusWriter>,
) {
    let model = shared.model.borrow().model.clone();
    let serving = pick_gateway(&model, &shared.config);
    let table = Arc::new(match &serving {
        Ok(key) => GatewayTable::build(
            &model,
            key,
            shared.config.class.as_deref(),
            &mut lock(&shared.last_valid),
        ),
        Err(_) => GatewayTable::default(),
    });
    if let Some(error) = serving.as_ref().err().map(String::as_str).or(table.error()) {
        tracing::error!("gateway not served: {error}");
    }
    let status_for = serving.clone().ok();
    *write(&shared.serving) = serving;
    for status in table.statuses().iter().filter(|s| !s.reasons.is_empty()) {
        tracing::warn!(kind = status.kind, name = %status.name, accepted = status.accepted,
            reasons = ?status.reasons, "route not (fully) in force at the gateway");
    }
    let ports = table.ports();
    shared.upstreams.retain(|addr| table.is_endpoint(addr));
    *write(&shared.table) = Arc::clone(&table);
    listeners.tcp.retain(|port, task| {
        let keep = ports.contains(port);
        if !keep {
            task.abort();
            tracing::info!(port, "listener closed");
        }
        keep
    });
    for port in ports {
        if listeners.tcp.contains_key(&port) {
            continue;
        }
        match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await {
            Ok(listener) => {
                lock(&shared.bind_errors).remove(&port.to_string());
                tracing::info!(port, "listener open");
                listeners.tcp.insert(
                    port,
                    tokio::spawn(accept_loop(listener, Arc::clone(shared))),
                );
            }
            Err(error) => {
                tracing::error!(port, %error, "cannot listen");
                lock(&shared.bind_errors).insert(port.to_string(), error.to_string());
            }
        }
    }
    reconcile_udp(shared, &table, &mut listeners.udp).await;
    // Last: the new routes already serve while the API server is being told.
    if let (Some(writer), Some(key)) = (status_writer, status_for) {
        writer.write(&key, table.statuses()).await;
    }
}

/// Open the UDP listeners `table` has and close those it no longer has (their sessions
/// end with them).
async fn reconcile_udp(
    shared: &Arc<Shared>,
    table: &GatewayTable,
    running: &mut HashMap<u16, (String, JoinHandle<()>)>,
) {
    let served = table.udp_listeners();
    running.retain(|port, (name, task)| {
        let keep = served.contains(&(*port, name.as_str()));
        if !keep {
            task.abort();
            tracing::info!(port, listener = %name, "UDP listener closed");
        }
        keep
    });
    for (port, name) in served {
        if running.contains_key(&port) {
            continue;
        }
        let key = format!("{port}/udp");
        match tokio::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await {
            Ok(socket) => {
                lock(&shared.bind_errors).remove(&key);
                tracing::info!(port, listener = name, "UDP listener open");
                let task = tokio::spawn(udp::serve(
                    socket,
                    port,
                    name.to_owned(),
                    Arc::clone(shared),
                ));
                running.insert(port, (name.to_owned(), task));
            }
            Err(error) => {
                tracing::error!(port, %error, "cannot listen (UDP)");
                lock(&shared.bind_errors).insert(key, error.to_string());
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let shared = Arc::clone(&shared);
                    connections.spawn(async move { handle(stream, client, shared).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(stream: TcpStream, client: SocketAddr, shared: Arc<Shared>) {
    let local = match stream.local_addr() {
        Ok(SocketAddr::V4(local)) => local,
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    };
    let table = read(&shared.table).clone();
    let gateway = read(&shared.serving).clone().unwrap_or_default();
    let mut record = ConnectionRecord::start(gateway, Direction::Gateway, client);
    record.original_dst = Some(std::net::SocketAddr::V4(local));
    let result = proxy_one(stream, local, &table, &shared, &mut record).await;
    record.finish(result);
    shared.log.push(record);
}

async fn proxy_one(
    stream: TcpStream,
    local: SocketAddrV4,
    table: &GatewayTable,
    shared: &Shared,
    record: &mut ConnectionRecord,
) -> Result<(), ProxyError> {
    let client_ip = match record.client {
        SocketAddr::V4(c) => *c.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    // A TLS passthrough listener routes by the ClientHello's server name, read without
    // consuming it; without a usable hello or a route for its name, the client is reset.
    let sni = if table.is_tls(local.port()) {
        let sni = match peek_sni(&stream, shared.config.client_hello_timeout).await {
            Ok(sni) => sni,
            Err(error) => {
                reset_on_close(&stream);
                return Err(error.into());
            }
        };
        record.sni = sni.clone();
        if table.tls_route(local.port(), sni.as_deref()).is_none() {
            reset_on_close(&stream);
            return Err(ProxyError::NoSniRoute {
                service: format!("gateway {} port {}", table.gateway(), local.port()),
                sni,
            });
        }
        Some(sni)
    } else {
        None
    };
    let (target, opened) = upstream::open(
        &shared.upstreams,
        &format!("gateway {}", table.gateway()),
        |pick| match &sni {
            Some(sni) => table.resolve_tls_with(local, client_ip, sni.as_deref(), pick),
            None => table.resolve_with(local, client_ip, pick),
        },
        Some(client_ip.into()),
        |addr, timeout| socket::connect(&HostSockets, addr, timeout),
    )
    .await;
    record.target = Some(target);
    match opened {
        // A gateway only forwards to Service endpoints; anything else has no route.
        Ok(_) if !matches!(record.target, Some(Target::Endpoint { .. })) => {
            reset_on_close(&stream);
            Err(ProxyError::NoRoute)
        }
        Ok((upstream, leases)) => {
            // The upstream socket has TCP_NODELAY from the socket factory.
            let _ = stream.set_nodelay(true);
            record.bytes = forward(stream, upstream, CopyMode::Splice).await;
            leases.served(record.bytes.downstream_bytes > 0);
            Ok(())
        }
        Err(error) => {
            reset_on_close(&stream);
            Err(error)
        }
    }
}

async fn config_dump(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let table = read(&shared.table).clone();
    let state = shared.model.borrow().clone();
    let serving = read(&shared.serving).clone();
    Json(serde_json::json!({
        "gateway": serving.as_ref().ok(),
        "gateway_class": shared.config.class,
        "error": serving.as_ref().err().map(String::as_str).or(table.error()),
        "listeners": table.listener_statuses(),
        "udp": {
            "idle_timeout_ms": shared.config.udp.idle_timeout.as_millis(),
            "max_flows": shared.config.udp.max_flows,
        },
        "bind_errors": *lock(&shared.bind_errors),
        "routes": table.statuses(),
        "upstream_settings": table.settings_statuses(),
        "upstream_endpoints": shared.upstreams.snapshot(),
        "source": {
            "kind": match &shared.config.source {
                GatewaySource::Manifests(_) => "manifests",
                GatewaySource::Kube { .. } => "kube",
            },
            "generation": state.generation,
            "last_error": state.last_error,
        },
        "connections": shared.log.snapshot(),
    }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl axum::response::IntoResponse {
    shared.log.metrics().response()
}

/// Writes the TCPRoutes', TLSRoutes' and UDPRoutes' conditions at this gateway to their `status.parents` in the
/// cluster (server-side apply of the status subresource, field manager
/// `interceptor-gateway`), only when they changed since the last write.
pub struct StatusWriter {
    client: kube::Client,
    written: HashMap<String, serde_json::Value>,
}

impl StatusWriter {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            written: HashMap::new(),
        }
    }

    /// The status of every TCPRoute, TLSRoute and UDPRoute judged at `gateway` (`namespace/name`).
    pub async fn write(&mut self, gateway: &str, statuses: &[crate::proxy::RouteStatus]) {
        use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
        let Some((gw_namespace, gw_name)) = gateway.split_once('/') else {
            return;
        };
        let resource = |kind: &str, plural: &str| ApiResource {
            group: "gateway.networking.k8s.io".into(),
            version: "v1alpha2".into(),
            api_version: "gateway.networking.k8s.io/v1alpha2".into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        for status in statuses.iter().filter(|s| !s.conditions.is_empty()) {
            let resource = match status.kind {
                "TCPRoute" => resource("TCPRoute", "tcproutes"),
                "TLSRoute" => resource("TLSRoute", "tlsroutes"),
                "UDPRoute" => resource("UDPRoute", "udproutes"),
                _ => continue,
            };
            let Some((namespace, name)) = status.name.split_once('/') else {
                continue;
            };
            let conditions: Vec<serde_json::Value> = status
                .conditions
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "type": c.kind,
                        "status": c.status,
                        "reason": c.reason,
                        "message": c.message,
                    })
                })
                .collect();
            let written_key = format!("{} {}", status.kind, status.name);
            if self.written.get(&written_key) == Some(&serde_json::Value::Array(conditions.clone()))
            {
                continue;
            }
            let now = rfc3339_now();
            let stamped: Vec<serde_json::Value> = conditions
                .iter()
                .map(|c| {
                    let mut c = c.clone();
                    c["lastTransitionTime"] = serde_json::Value::String(now.clone());
                    c
                })
                .collect();
            let patch = serde_json::json!({
                "apiVersion": "gateway.networking.k8s.io/v1alpha2",
                "kind": status.kind,
                "metadata": {"name": name, "namespace": namespace},
                "status": {"parents": [{
                    "parentRef": {
                        "group": "gateway.networking.k8s.io",
                        "kind": "Gateway",
                        "namespace": gw_namespace,
                        "name": gw_name,
                    },
                    "controllerName": CONTROLLER_NAME,
                    "conditions": stamped,
                }]},
            });
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, &resource);
            let params = PatchParams::apply("interceptor-gateway").force();
            match api.patch_status(name, &params, &Patch::Apply(&patch)).await {
                Ok(_) => {
                    self.written
                        .insert(written_key, serde_json::Value::Array(conditions));
                }
                Err(error) => {
                    tracing::warn!(kind = status.kind, route = %status.name, %error, "writing the route status");
                }
            }
        }
    }
}

/// Now, as the API server writes times (RFC 3339, UTC).
fn rfc3339_now() -> String {
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::chrono::Utc::now());
    serde_json::to_value(now)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(gateway: Option<&str>, pod: Option<&str>) -> GatewayConfig {
        GatewayConfig {
            gateway: gateway.map(str::to_owned),
            pod: pod.map(str::to_owned),
            class: None,
            source: GatewaySource::Manifests(PathBuf::from("/nonexistent")),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            client_hello_timeout: crate::proxy::sni::DEFAULT_CLIENT_HELLO_TIMEOUT,
            udp: udp::UdpSettings::default(),
        }
    }

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: ingressgateway-2-abc, namespace: istio-system, labels: {istio: ingressgateway-2}}
spec: {containers: [{name: gw, image: x}]}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: ingressgateway-1, namespace: istio-system}
spec: {selector: {istio: ingressgateway-1}, servers: [{port: {number: 19000, name: tcp, protocol: TCP}, hosts: ['*']}]}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: ingressgateway-2, namespace: istio-system}
spec: {selector: {istio: ingressgateway-2}, servers: [{port: {number: 19000, name: tcp, protocol: TCP}, hosts: ['*']}]}
"#;

    #[test]
    fn the_istio_gateway_selecting_the_pod_is_served_unless_one_is_named() {
        let model =
            crate::source::manifests::load_str(std::path::Path::new("g.yaml"), OBJECTS).unwrap();
        let by_pod = config(None, Some("istio-system/ingressgateway-2-abc"));
        assert_eq!(
            pick_gateway(&model, &by_pod).unwrap(),
            "istio-system/ingressgateway-2"
        );
        let named = config(
            Some("istio-system/ingressgateway-1"),
            Some("istio-system/ingressgateway-2-abc"),
        );
        assert_eq!(
            pick_gateway(&model, &named).unwrap(),
            "istio-system/ingressgateway-1"
        );
        let stranger = config(None, Some("istio-system/nobody"));
        assert!(pick_gateway(&model, &stranger)
            .unwrap_err()
            .contains("not in the model"));
    }
}
