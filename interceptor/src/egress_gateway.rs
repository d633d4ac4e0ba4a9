//! `interceptor egress-gateway`: FSM's egress gateway (8.2) in its SOCKS5 mode. The
//! outbound proxies of enrolled pods send the egress an EgressGateway names here, each
//! connection opened with a SOCKS5 CONNECT to the destination the application dialled;
//! the gateway connects from its own address, answers, and splices the two. Only IP
//! destinations and no authentication (see `proxy::socks5`): like FSM's, it is meant to
//! be reachable from the mesh only (a NetworkPolicy in front of it). Metrics on the admin
//! endpoint: `interceptor_egress_gateway_connections_total{outcome}` and the open count.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::proxy::forward::{forward, reset_on_close, CopyMode};
use crate::proxy::socket::{self, HostSockets};
use crate::proxy::socks5::{self, Reply};

#[derive(Clone, Debug)]
pub struct EgressGatewayConfig {
    /// Where the proxies connect (the gateway Service's target port).
    pub listen: SocketAddr,
    /// `/healthz`, `/metrics`.
    pub admin_addr: SocketAddr,
    /// How long a client has for its greeting and request.
    pub handshake_timeout: Duration,
    /// How long the connect to a destination may take.
    pub connect_timeout: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// `forwarded`, `bad_request` (not a SOCKS5 CONNECT to an IP address, or too slow)
    /// or `connect_failed`.
    outcome: &'static str,
}

#[derive(Default)]
struct Metrics {
    connections: Family<OutcomeLabels, Counter>,
    open: Gauge,
}

impl Metrics {
    fn count(&self, outcome: &'static str) {
        self.connections
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

pub async fn run(config: EgressGatewayConfig) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    registry.register(
        "interceptor_egress_gateway_connections",
        "Connections from the mesh's proxies, by outcome",
        metrics.connections.clone(),
    );
    registry.register(
        "interceptor_egress_gateway_open_connections",
        "Connections being forwarded now",
        metrics.open.clone(),
    );
    let registry = Arc::new(registry);
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let admin = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("admin endpoint on {}", config.admin_addr))?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let registry = Arc::clone(&registry);
                async move { crate::proxy::metrics::openmetrics_response(&registry) }
            }),
        );
    let admin = tokio::spawn(async move {
        if let Err(error) = axum::serve(admin, app).await {
            tracing::error!(%error, "admin endpoint");
        }
    });
    tracing::info!(listen = %config.listen, "egress gateway ready");
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let metrics = Arc::clone(&metrics);
                    let config = config.clone();
                    connections.spawn(async move { handle(stream, client, &config, &metrics).await });
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
        }
    }
    admin.abort();
    Ok(())
}

async fn handle(
    mut stream: TcpStream,
    client: SocketAddr,
    config: &EgressGatewayConfig,
    metrics: &Metrics,
) {
    let destination = match tokio::time::timeout(
        config.handshake_timeout,
        socks5::accept(&mut stream),
    )
    .await
    {
        Ok(Ok(destination)) => destination,
        Ok(Err(error)) => {
            tracing::info!(%client, %error, "refused: not a SOCKS5 CONNECT to an IP address");
            metrics.count("bad_request");
            reset_on_close(&stream);
            return;
        }
        Err(_) => {
            tracing::info!(%client, timeout = ?config.handshake_timeout, "refused: no SOCKS5 request in time");
            metrics.count("bad_request");
            reset_on_close(&stream);
            return;
        }
    };
    // A socket with TCP_NODELAY, given up as timed out (TtlExpired) after the timeout.
    let upstream = match socket::connect(&HostSockets, destination, config.connect_timeout).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::info!(%client, %destination, %error, "connect failed");
            let _ = socks5::reply(&mut stream, Reply::of_connect_error(&error), None).await;
            metrics.count("connect_failed");
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    if socks5::reply(&mut stream, Reply::Succeeded, upstream.local_addr().ok())
        .await
        .is_err()
    {
        metrics.count("bad_request");
        return;
    }
    metrics.open.inc();
    let bytes = forward(stream, upstream, CopyMode::Splice).await;
    metrics.open.dec();
    metrics.count("forwarded");
    tracing::info!(%client, %destination, upstream_bytes = bytes.upstream_bytes,
        downstream_bytes = bytes.downstream_bytes, "forwarded");
}
