//! `interceptor gateway`: a TCP gateway run in a gateway pod's network namespace. It
//! serves one Gateway API `Gateway` (its TCP listeners and attached `TCPRoute`s) or one
//! Istio `Gateway` (its TCP servers and the `VirtualService`s bound to it), from a
//! directory of manifests; routes follow the manifests as they change, listeners open and
//! close with the Gateway's. Its admin port has `/healthz`, `/readyz`, `/config_dump`
//! (listeners, route conditions, recent connections) and `/metrics`.
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::proxy::forward::{forward, reset_on_close, CopyMode, Forwarded};
use crate::proxy::listener::{ConnectionLog, ConnectionRecord, Direction};
use crate::proxy::{GatewayTable, Target};
use crate::source::manifests::{self, ManifestState};
use crate::sync::{lock, read, write};

const MANIFEST_POLL: Duration = Duration::from_millis(500);
const FIRST_MODEL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// `namespace/name` of the Gateway to serve.
    pub gateway: String,
    /// Serve a Gateway API Gateway only of this class.
    pub class: Option<String>,
    pub manifests: PathBuf,
    pub admin_addr: SocketAddr,
}

struct Shared {
    config: GatewayConfig,
    table: RwLock<Arc<GatewayTable>>,
    log: ConnectionLog,
    model: watch::Receiver<ManifestState>,
    /// Ports that could not be bound, with the error.
    bind_errors: std::sync::Mutex<HashMap<u16, String>>,
}

pub async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    if !config.gateway.contains('/') {
        bail!("--gateway {:?}: expected NAMESPACE/NAME", config.gateway);
    }
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let (tx, mut rx) = watch::channel(ManifestState::default());
    let watcher = manifests::watch_dir(config.manifests.clone(), MANIFEST_POLL, tx);
    let loaded = tokio::time::timeout(FIRST_MODEL_TIMEOUT, rx.wait_for(|s| s.generation > 0))
        .await
        .is_ok_and(|r| r.is_ok());
    if !loaded {
        let error = rx.borrow().last_error.clone().unwrap_or_default();
        watcher.abort();
        bail!(
            "the manifests in {} did not load: {error}",
            config.manifests.display()
        );
    }
    let shared = Arc::new(Shared {
        config: config.clone(),
        table: RwLock::new(Arc::new(GatewayTable::default())),
        log: ConnectionLog::default(),
        model: rx.clone(),
        bind_errors: std::sync::Mutex::new(HashMap::new()),
    });
    let mut listeners: HashMap<u16, JoinHandle<()>> = HashMap::new();
    reconcile(&shared, &mut listeners).await;
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
    tracing::info!(gateway = %config.gateway, ports = ?read(&shared.table).ports(), "gateway ready");
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { break; }
                reconcile(&shared, &mut listeners).await;
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    for (_, task) in listeners {
        task.abort();
    }
    admin.abort();
    watcher.abort();
    Ok(())
}

/// Rebuild the table from the current model, then open the listeners it has and close
/// those it no longer has (their open connections end with them).
async fn reconcile(shared: &Arc<Shared>, listeners: &mut HashMap<u16, JoinHandle<()>>) {
    let model = shared.model.borrow().model.clone();
    let table = Arc::new(GatewayTable::build(
        &model,
        &shared.config.gateway,
        shared.config.class.as_deref(),
    ));
    if let Some(error) = table.error() {
        tracing::error!(gateway = %shared.config.gateway, "{error}");
    }
    for status in table.statuses().iter().filter(|s| !s.reasons.is_empty()) {
        tracing::warn!(kind = status.kind, name = %status.name, accepted = status.accepted,
            reasons = ?status.reasons, "route not (fully) in force at the gateway");
    }
    let ports = table.ports();
    *write(&shared.table) = table;
    listeners.retain(|port, task| {
        let keep = ports.contains(port);
        if !keep {
            task.abort();
            tracing::info!(port, "listener closed");
        }
        keep
    });
    for port in ports {
        if listeners.contains_key(&port) {
            continue;
        }
        match TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))).await {
            Ok(listener) => {
                lock(&shared.bind_errors).remove(&port);
                tracing::info!(port, "listener open");
                listeners.insert(
                    port,
                    tokio::spawn(accept_loop(listener, Arc::clone(shared))),
                );
            }
            Err(error) => {
                tracing::error!(port, %error, "cannot listen");
                lock(&shared.bind_errors).insert(port, error.to_string());
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
    let client_ip = match client {
        SocketAddr::V4(c) => *c.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let target = read(&shared.table).resolve(local, client_ip);
    let mut record = ConnectionRecord {
        pod: shared.config.gateway.clone(),
        direction: Direction::Gateway,
        client,
        original_dst: Some(local),
        target: Some(target.clone()),
        outcome: String::new(),
        copy_mode: CopyMode::Splice,
        bytes: Forwarded::default(),
        unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    record.outcome = match target {
        Target::Endpoint { addr, .. } => {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(upstream)) => {
                    let _ = stream.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    record.bytes = forward(stream, upstream, CopyMode::Splice).await;
                    if record.bytes.reset {
                        "reset"
                    } else {
                        "closed"
                    }
                    .into()
                }
                Ok(Err(error)) => {
                    reset_on_close(&stream);
                    format!("connect {addr}: {error}")
                }
                Err(_) => {
                    reset_on_close(&stream);
                    format!("connect {addr}: timed out")
                }
            }
        }
        Target::NoEndpoints { backend, .. } => {
            reset_on_close(&stream);
            format!("backend {backend} has no endpoints")
        }
        Target::Refused { route, reason, .. } => {
            reset_on_close(&stream);
            format!("{route}: {reason}")
        }
        Target::Passthrough { .. } | Target::Local { .. } => {
            reset_on_close(&stream);
            "no route".into()
        }
    };
    shared.log.push(record);
}

async fn config_dump(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let table = read(&shared.table).clone();
    let state = shared.model.borrow().clone();
    Json(serde_json::json!({
        "gateway": shared.config.gateway,
        "gateway_class": shared.config.class,
        "error": table.error(),
        "listeners": table.listener_statuses(),
        "bind_errors": *lock(&shared.bind_errors),
        "routes": table.statuses(),
        "source": {
            "kind": "manifests",
            "dir": shared.config.manifests,
            "generation": state.generation,
            "last_error": state.last_error,
        },
        "connections": shared.log.snapshot(),
    }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.log.metrics().encode(),
    )
}
