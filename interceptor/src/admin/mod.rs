//! The admin endpoint: `/healthz`, `/readyz`, `/config_dump`, `/metrics`, and a runtime switch for
//! the programs' trace_pipe output; and the metrics endpoint (`--metrics-addr`), which
//! serves `/metrics` alone, for Prometheus to scrape from the network.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::task::JoinHandle;

use crate::agent::Agent;

/// Facts about this agent that do not change while it runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StaticInfo {
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub cni_socket: PathBuf,
    /// `manifests` or `kube`.
    pub source: &'static str,
    /// Why this interception mode was chosen.
    pub mode_reason: String,
    /// `legacy` or `nft` in iptables mode.
    pub iptables_backend: Option<crate::datapath::iptables::Backend>,
    /// What the kernel offers, as probed at start-up.
    pub probe: crate::datapath::probe::Probe,
    pub manifests: Option<PathBuf>,
}

#[derive(Clone)]
struct AdminState {
    agent: Arc<Agent>,
    info: StaticInfo,
}

pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
    info: StaticInfo,
) -> std::io::Result<JoinHandle<()>> {
    let state = AdminState { agent, info };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/config_dump", get(config_dump))
        .route("/bpf_debug/on", post(debug_on))
        .route("/bpf_debug/off", post(debug_off))
        .with_state(state.clone())
        .route(
            "/metrics",
            get(metrics).with_state(Arc::clone(&state.agent)),
        );
    Ok(spawn(bind_shared(addr)?, app, "admin"))
}

/// The metrics endpoint: the admin port's `/metrics` (the proxy's metrics and the data
/// path's counters) and nothing else; readiness, the config dump and the debug switch stay
/// on the loopback admin port. Bound with `SO_REUSEPORT` like the admin port, so the agent
/// of a hand-over listens beside the one it replaces (a scrape then reaches either, as
/// with ztunnel's 15020).
pub async fn serve_metrics(addr: SocketAddr, agent: Arc<Agent>) -> std::io::Result<JoinHandle<()>> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(agent);
    Ok(spawn(bind_shared(addr)?, app, "metrics"))
}

/// Serve `app` on `listener` until aborted.
fn spawn(listener: tokio::net::TcpListener, app: Router, what: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "{what} server stopped");
        }
    })
}

/// Bind with `SO_REUSEPORT`: a DaemonSet's surge pod (a hand-over) starts its agent on
/// the same host port while the old one still runs. Which of the two answers a request
/// is the kernel's choice, so readiness of one agent is its `--ready-file`, not this port.
fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn readyz(State(state): State<AdminState>) -> (StatusCode, &'static str) {
    if state.agent.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn config_dump(State(state): State<AdminState>) -> Json<serde_json::Value> {
    let agent = &state.agent;
    let (generation, last_error) = agent.source_state();
    Json(serde_json::json!({
        "mode": agent.datapath().mode(),
        "mode_reason": state.info.mode_reason,
        "ready": agent.is_ready(),
        "node": state.info,
        "source": { "kind": state.info.source, "generation": generation, "last_error": last_error },
        "pods": agent.pod_statuses(),
        "pods_not_found": agent.pods_not_found(),
        "datapath_counters": agent.datapath().counters(),
        "datapath_records": agent.datapath().live_records(),
        "node_probes": agent.datapath().node_probes(),
        "service_ports": agent.service_ports(),
        "service_routes": agent.service_routes(),
        "routes": agent.route_statuses(),
        "upstream_endpoints": agent.upstream_endpoints(),
        "connections": agent.connection_log(),
        "model": *agent.model(),
    }))
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl axum::response::IntoResponse {
    agent.metrics().response()
}

async fn debug_on(State(state): State<AdminState>) -> (StatusCode, String) {
    set_debug(&state, true)
}

async fn debug_off(State(state): State<AdminState>) -> (StatusCode, String) {
    set_debug(&state, false)
}

fn set_debug(state: &AdminState, on: bool) -> (StatusCode, String) {
    match state.agent.datapath().set_debug(on) {
        Ok(()) => (
            StatusCode::OK,
            format!("bpf debug {}\n", if on { "on" } else { "off" }),
        ),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
    }
}
