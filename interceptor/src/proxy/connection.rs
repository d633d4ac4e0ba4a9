//! One proxied connection as operators and metrics see it: which listener took it
//! ([`Direction`]), what became of it ([`Outcome`], with a typed [`ProxyError`] when the
//! proxy could not carry it) and its [`ConnectionRecord`]. A leaf: the listener, the
//! gateway and the upstream code produce these, the metrics and `/config_dump` read them.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use interceptor_common::{INBOUND_PORT, OUTBOUND_PORT};

use super::forward::{CopyMode, Forwarded};
use super::routes::Target;
use super::sni::ClientHelloError;

/// Which of a pod's two listeners accepted a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The pod's application dialled out (15001).
    Outbound,
    /// Someone dialled the pod (15003).
    Inbound,
    /// A client dialled a gateway listener (`interceptor gateway`).
    Gateway,
}

impl Direction {
    /// The in-pod listener's port; a gateway listens on its Gateway's ports instead.
    pub fn port(self) -> Option<u16> {
        match self {
            Direction::Outbound => Some(OUTBOUND_PORT),
            Direction::Inbound => Some(INBOUND_PORT),
            Direction::Gateway => None,
        }
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        }
    }
}

/// Which source address the inbound proxy's socket to the application had (with
/// `--preserve-client-ip`, the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAddress {
    /// The client's address and port: the application sees its real peer.
    Preserved,
    /// The pod's own address, because the client is the pod itself (its own address or
    /// loopback): its address is already the pod's, and binding it would clash with the
    /// client's own socket.
    OwnAddress,
    /// The pod's own address, because binding or connecting from the client's address
    /// failed (the port is taken in the pod, the family differs, the pod has no policy
    /// route): the connection goes on, the application sees the pod as its peer.
    Fallback,
}

impl ClientAddress {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAddress::Preserved => "preserved",
            ClientAddress::OwnAddress => "own_address",
            ClientAddress::Fallback => "fallback",
        }
    }
}

/// Why the proxy did not carry a connection. Each is reset towards the client.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// `SO_ORIGINAL_DST` failed: no record of where the application was going (eBPF: the
    /// flow map had no room; iptables: no conntrack entry).
    #[error("no original destination: {0}")]
    NoOriginalDestination(#[source] std::io::Error),
    /// The agent stopped publishing route tables (it is shutting down).
    #[error("the agent stopped building route tables")]
    RoutesStopped,
    /// A new pod's connection came before any route table that knows the pod, and none
    /// came within the wait.
    #[error("no route table knows this pod after {0:?}")]
    RoutesLate(Duration),
    /// The chosen backend has no ready endpoint.
    #[error("service {service}: backend {backend} has no endpoints")]
    NoEndpoints { service: String, backend: String },
    /// Refused on purpose: a rule with every weight zero, a traffic policy, a circuit
    /// breaker or a rate limit (`route` says which).
    #[error("service {service}: {route}: {reason}")]
    Refused {
        service: String,
        route: String,
        reason: String,
    },
    /// A gateway listener's connection that no route sends to a Service endpoint.
    #[error("no route")]
    NoRoute,
    /// A port routed by server name (TLS passthrough) whose client sent no readable
    /// ClientHello: not TLS, malformed, too large, too late.
    #[error("TLS passthrough: {0}")]
    ClientHello(#[from] ClientHelloError),
    /// No TLS route serves the ClientHello's server name.
    #[error("{service}: no TLS route serves server name {}", sni.as_deref().unwrap_or("(none)"))]
    NoSniRoute {
        service: String,
        sni: Option<String>,
    },
    /// The socket towards the target could not be made or connected.
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The egress gateway did not connect to the destination (its SOCKS5 answer, or no
    /// answer in time).
    #[error("egress gateway {gateway} to {destination}: {source}")]
    EgressGateway {
        gateway: SocketAddr,
        destination: SocketAddr,
        #[source]
        source: super::socks5::Socks5Error,
    },
    /// The connect failed, and so did the one retry on another endpoint.
    #[error("connect {addr}: {first}; retry on {retry}: {source}")]
    ConnectRetry {
        addr: SocketAddr,
        first: std::io::Error,
        retry: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl ProxyError {
    /// The `kind` label of `interceptor_proxy_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoOriginalDestination(_) => "no_original_destination",
            ProxyError::RoutesStopped | ProxyError::RoutesLate(_) => "no_route_table",
            ProxyError::NoEndpoints { .. } => "no_endpoints",
            ProxyError::Refused { .. } => "refused",
            ProxyError::NoRoute => "no_route",
            ProxyError::ClientHello(_) => "client_hello",
            ProxyError::NoSniRoute { .. } => "no_sni_route",
            ProxyError::EgressGateway { .. } => "egress_gateway",
            ProxyError::Connect { .. } | ProxyError::ConnectRetry { .. } => "connect",
        }
    }

    /// Refused on purpose rather than failed.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            ProxyError::Refused { .. } | ProxyError::NoSniRoute { .. }
        )
    }

    /// The `reason` label of `interceptor_proxy_tls_refused_total`, for a connection
    /// that TLS passthrough turned away.
    pub fn tls_reason(&self) -> Option<&'static str> {
        match self {
            ProxyError::ClientHello(error) => Some(error.reason()),
            ProxyError::NoSniRoute { .. } => Some("no_route"),
            _ => None,
        }
    }

    /// The error for a target that is not an address (a refusal or a backend without
    /// endpoints); `None` for an address.
    pub fn of_target(target: &Target) -> Option<Self> {
        match target {
            Target::NoEndpoints {
                service, backend, ..
            } => Some(ProxyError::NoEndpoints {
                service: service.clone(),
                backend: backend.clone(),
            }),
            Target::Refused {
                service,
                route,
                reason,
            } => Some(ProxyError::Refused {
                service: service.clone(),
                route: route.clone(),
                reason: reason.clone(),
            }),
            Target::Endpoint { .. } | Target::Passthrough { .. } | Target::Local { .. } => None,
        }
    }
}

/// What became of a connection.
#[derive(Clone, Debug, Default)]
pub enum Outcome {
    /// Still being proxied.
    #[default]
    Open,
    /// Both sides closed.
    Closed,
    /// One side reset, and the reset was passed on.
    Reset,
    /// The proxy could not carry it.
    Failed(Arc<ProxyError>),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Open => f.write_str("open"),
            Outcome::Closed => f.write_str("closed"),
            Outcome::Reset => f.write_str("reset"),
            Outcome::Failed(error) => error.fmt(f),
        }
    }
}

impl serde::Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What happened to one proxied connection, for operators and tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionRecord {
    pub pod: String,
    pub direction: Direction,
    pub client: SocketAddr,
    /// What the application dialled, as `SO_ORIGINAL_DST` reported it.
    pub original_dst: Option<SocketAddr>,
    /// The server name of the ClientHello, on a port routed by it (TLS passthrough).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    pub target: Option<Target>,
    pub outcome: Outcome,
    pub copy_mode: CopyMode,
    /// Inbound, when the agent preserves client addresses: whether this one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_address: Option<ClientAddress>,
    #[serde(flatten)]
    pub bytes: Forwarded,
    /// When the listener accepted the connection (milliseconds since the epoch).
    pub unix_ms: u64,
    /// From accept to the end of the connection (set by [`ConnectionRecord::finish`]).
    pub duration_ms: u64,
    /// The monotonic clock at accept, for `duration_ms`.
    #[serde(skip)]
    pub started: Instant,
}

impl ConnectionRecord {
    /// The record of a connection `pod`'s listener (or a gateway) accepted from `client`
    /// just now; the rest is filled in as it is proxied.
    pub fn start(pod: String, direction: Direction, client: SocketAddr) -> Self {
        Self {
            pod,
            direction,
            client,
            original_dst: None,
            sni: None,
            target: None,
            outcome: Outcome::Open,
            copy_mode: CopyMode::default(),
            client_address: None,
            bytes: Forwarded::default(),
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            duration_ms: 0,
            started: Instant::now(),
        }
    }

    /// The route and backend labels of metrics and the access log: the routing object
    /// that chose the backend (`service` for a Service's own round-robin, `passthrough`,
    /// `inbound`, or `none` before a target was chosen) and the backend
    /// (`namespace/service:port[ subset s]`, the pod for inbound, `passthrough`, `none`).
    pub fn route_and_backend(&self) -> (String, String) {
        match &self.target {
            Some(Target::Endpoint { route, backend, .. })
            | Some(Target::NoEndpoints { route, backend, .. }) => (
                route.clone().unwrap_or_else(|| "service".into()),
                backend.clone(),
            ),
            Some(Target::Refused { route, service, .. }) => (route.clone(), service.clone()),
            Some(Target::Passthrough { route, .. }) => (
                route.clone().unwrap_or_else(|| "passthrough".into()),
                "passthrough".into(),
            ),
            Some(Target::Local {
                node_probe: true, ..
            }) => ("node probe".into(), self.pod.clone()),
            Some(Target::Local { .. }) => ("inbound".into(), self.pod.clone()),
            None => ("none".into(), "none".into()),
        }
    }

    /// The address the proxy dialled for this connection, if it got that far.
    pub fn target_addr(&self) -> Option<SocketAddr> {
        match &self.target {
            Some(Target::Endpoint { addr, .. })
            | Some(Target::Passthrough { addr, .. })
            | Some(Target::Local { addr, .. }) => Some(*addr),
            Some(Target::NoEndpoints { .. }) | Some(Target::Refused { .. }) | None => None,
        }
    }

    /// Record how a connection ended: forwarded (closed or reset, from the bytes), or
    /// failed with `error`.
    pub fn finish(&mut self, result: Result<(), ProxyError>) {
        self.duration_ms = self.started.elapsed().as_millis() as u64;
        self.outcome = match result {
            Ok(()) if self.bytes.reset => Outcome::Reset,
            Ok(()) => Outcome::Closed,
            Err(error) => Outcome::Failed(Arc::new(error)),
        };
    }
}
