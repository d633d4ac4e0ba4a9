//! The gateway's UDP listeners (Gateway API `UDPRoute`s). A client address's first
//! datagram picks a backend endpoint by the route's weights, once: the session (a flow
//! in [`FlowTable`]) keeps it, with a socket connected to it, until the session is idle
//! for `--udp-idle-timeout`, is evicted from a full table (`--udp-max-flows`, the longest
//! idle goes) or its route stops serving that endpoint. Each flow's replies are relayed by
//! a task of its own through the listener's socket, so they come from the address the
//! client sent to. No buffer per flow: one per listener for requests, one per worker
//! thread for replies, each the largest datagram.
use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::UdpSocket;

use super::flows::FlowTable;
use super::Shared;
use crate::proxy::routes::Pick;
use crate::proxy::{GatewayTable, Target};
use crate::sync::read;

pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_FLOWS: u32 = 10_000;
/// Larger than any UDP payload (65,507 bytes over IPv4): a datagram is never truncated.
const MAX_DATAGRAM: usize = 65_536;
/// Replies one flow relays per wake-up before it lets the other tasks run.
const RELAY_BURST: usize = 64;
/// The longest pause between two sweeps for idle flows and changed routes.
const MAX_SWEEP: Duration = Duration::from_secs(1);

/// How the UDP listeners keep sessions.
#[derive(Clone, Copy, Debug)]
pub struct UdpSettings {
    /// A session with no datagram either way for this long ends.
    pub idle_timeout: Duration,
    /// Sessions per listener; a new client of a full table evicts the longest idle one.
    pub max_flows: usize,
}

impl Default for UdpSettings {
    fn default() -> Self {
        Self {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_flows: DEFAULT_MAX_FLOWS as usize,
        }
    }
}

/// Why a datagram was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("no route: {0}")]
    NoRoute(String),
    #[error("backend {0} has no ready endpoint")]
    NoEndpoints(String),
    #[error("socket to backend {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("sending to backend {addr}: {source}")]
    Send { addr: SocketAddr, source: io::Error },
    #[error("backend {addr} is unreachable (ICMP port unreachable)")]
    Unreachable { addr: SocketAddr },
    #[error("reply to client {client}: {source}")]
    Reply {
        client: SocketAddr,
        source: io::Error,
    },
}

impl UdpError {
    /// The `reason` label of `interceptor_gateway_udp_dropped_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            UdpError::NoRoute(_) => "no_route",
            UdpError::NoEndpoints(_) => "no_endpoints",
            UdpError::Socket { .. } => "socket",
            UdpError::Send { .. } => "send",
            UdpError::Unreachable { .. } => "unreachable",
            UdpError::Reply { .. } => "reply",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatagramLabels {
    /// The Gateway listener's name.
    listener: String,
    /// `UDPRoute namespace/name`.
    route: String,
    /// `upstream`: from the client to the backend; `downstream`: the replies.
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    listener: String,
    route: String,
    /// `namespace/service:port`.
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndedLabels {
    listener: String,
    /// `idle` or `route_changed` (evictions have their own counter).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    listener: String,
    /// [`UdpError::reason`].
    reason: &'static str,
}

/// The UDP listeners' metrics, registered beside the proxy's.
#[derive(Clone, Debug, Default)]
pub struct UdpMetrics {
    datagrams: Family<DatagramLabels, Counter>,
    bytes: Family<DatagramLabels, Counter>,
    flows: Family<ListenerLabels, Gauge>,
    opened: Family<FlowLabels, Counter>,
    evicted: Family<ListenerLabels, Counter>,
    ended: Family<EndedLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
}

impl UdpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gateway_udp_datagrams",
            "Datagrams relayed by the gateway's UDP listeners, by route and direction",
            self.datagrams.clone(),
        );
        registry.register(
            "gateway_udp_bytes",
            "Payload bytes relayed by the gateway's UDP listeners, by route and direction",
            self.bytes.clone(),
        );
        registry.register(
            "gateway_udp_flows",
            "Open UDP sessions (client addresses with a backend) per listener",
            self.flows.clone(),
        );
        registry.register(
            "gateway_udp_flows_opened",
            "UDP sessions opened, by the route and backend their first datagram picked",
            self.opened.clone(),
        );
        registry.register(
            "gateway_udp_flows_evicted",
            "UDP sessions ended to make room in a full flow table (the longest idle one)",
            self.evicted.clone(),
        );
        registry.register(
            "gateway_udp_flows_ended",
            "UDP sessions ended because they were idle or their route no longer serves their backend",
            self.ended.clone(),
        );
        registry.register(
            "gateway_udp_dropped",
            "Datagrams the gateway's UDP listeners did not deliver, by why",
            self.dropped.clone(),
        );
    }

    fn drop(&self, listener: &str, error: &UdpError) {
        tracing::debug!(listener, %error, "UDP datagram dropped");
        self.dropped
            .get_or_create(&DropLabels {
                listener: listener.to_owned(),
                reason: error.reason(),
            })
            .inc();
    }

    /// The datagram and byte counters of one route and direction.
    fn relayed(&self, listener: &str, route: &str, direction: &'static str) -> Relayed {
        let labels = DatagramLabels {
            listener: listener.to_owned(),
            route: route.to_owned(),
            direction,
        };
        Relayed {
            datagrams: self.datagrams.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
        }
    }
}

/// One flow's counters for one direction, looked up once when the flow opens.
#[derive(Clone, Debug)]
struct Relayed {
    datagrams: Counter,
    bytes: Counter,
}

impl Relayed {
    fn count(&self, len: usize) {
        self.datagrams.inc();
        self.bytes.inc_by(len as u64);
    }
}

/// One client's session.
struct Flow {
    /// Connected to the backend endpoint: the kernel lets only its datagrams in.
    upstream: Arc<UdpSocket>,
    backend: SocketAddr,
    route: String,
    sent: Relayed,
    /// When the backend last replied, in nanoseconds after the listener's epoch (0:
    /// never); written by the relay task.
    replied: Arc<AtomicU64>,
    relay: tokio::task::AbortHandle,
}

impl Flow {
    fn replied_at(&self, epoch: Instant) -> Option<Instant> {
        match self.replied.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(epoch + Duration::from_nanos(nanos)),
        }
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        // The session is over: its replies stop with it.
        self.relay.abort();
    }
}

/// One UDP listener and its sessions.
struct Listener {
    socket: Arc<UdpSocket>,
    port: u16,
    name: String,
    shared: Arc<Shared>,
    flows: FlowTable<Flow>,
    /// The reference point of the flows' reply times.
    epoch: Instant,
    /// The route table the flows were last checked against.
    table: Arc<GatewayTable>,
    gauge: Gauge,
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Closed (no longer served, or the gateway stops): its sessions went with it.
        self.gauge.set(0);
    }
}

/// Serve the UDP listener `name` on `socket` until the task is aborted.
pub(super) async fn serve(socket: UdpSocket, port: u16, name: String, shared: Arc<Shared>) {
    let settings = shared.config.udp;
    let gauge = shared
        .udp_metrics
        .flows
        .get_or_create(&ListenerLabels {
            listener: name.clone(),
        })
        .clone();
    let table = read(&shared.table).clone();
    let mut listener = Listener {
        socket: Arc::new(socket),
        port,
        name,
        table,
        shared,
        flows: FlowTable::new(settings.max_flows),
        epoch: Instant::now(),
        gauge,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let period = (settings.idle_timeout / 4).clamp(Duration::from_millis(10), MAX_SWEEP);
    let mut sweep = tokio::time::interval(period);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = listener.socket.recv_from(&mut buf) => match received {
                Ok((len, client)) => listener.datagram(&buf[..len], client),
                Err(error) => {
                    tracing::warn!(port, %error, "UDP receive failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = sweep.tick() => listener.sweep(settings.idle_timeout),
        }
    }
}

impl Listener {
    /// Send `data` from `client` on to its session's backend, opening the session first
    /// when the client has none.
    fn datagram(&mut self, data: &[u8], client: SocketAddr) {
        let now = Instant::now();
        if !self.flows.contains(client) {
            match self.open(client) {
                Ok(flow) => {
                    let epoch = self.epoch;
                    let evicted = self
                        .flows
                        .insert(client, flow, now, |f| f.replied_at(epoch));
                    if let Some((old, _)) = evicted {
                        tracing::debug!(listener = %self.name, %old, "UDP flow table full: longest idle session evicted");
                        self.shared
                            .udp_metrics
                            .evicted
                            .get_or_create(&ListenerLabels {
                                listener: self.name.clone(),
                            })
                            .inc();
                    }
                    self.gauge.set(self.flows.len() as i64);
                }
                Err(error) => {
                    self.shared.udp_metrics.drop(&self.name, &error);
                    return;
                }
            }
        }
        let Some(flow) = self.flows.touch(client, now) else {
            return;
        };
        let error = match send_now(&flow.upstream, data, None) {
            Ok(_) => {
                flow.sent.count(data.len());
                return;
            }
            // An earlier datagram met an ICMP port unreachable.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                UdpError::Unreachable { addr: flow.backend }
            }
            Err(source) => UdpError::Send {
                addr: flow.backend,
                source,
            },
        };
        self.shared.udp_metrics.drop(&self.name, &error);
    }

    /// A session for `client`: a backend endpoint by the current table, a socket
    /// connected to it, and the task relaying its replies.
    fn open(&self, client: SocketAddr) -> Result<Flow, UdpError> {
        let table = read(&self.shared.table).clone();
        let client_ip = match client {
            SocketAddr::V4(c) => *c.ip(),
            SocketAddr::V6(c) => c.ip().to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        };
        let local = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.port);
        let resolved = table.resolve_udp_with(local, client_ip, &Pick::default());
        let (route, backend, addr) = match resolved.target {
            Target::Endpoint {
                route,
                backend,
                addr,
                ..
            } => (route.unwrap_or_default(), backend, addr),
            Target::NoEndpoints { backend, .. } => return Err(UdpError::NoEndpoints(backend)),
            Target::Refused { reason, .. } => return Err(UdpError::NoRoute(reason)),
            other => return Err(UdpError::NoRoute(format!("{other:?}"))),
        };
        let upstream =
            Arc::new(connected(addr).map_err(|source| UdpError::Socket { addr, source })?);
        let metrics = &self.shared.udp_metrics;
        metrics
            .opened
            .get_or_create(&FlowLabels {
                listener: self.name.clone(),
                route: route.clone(),
                backend,
            })
            .inc();
        let replied = Arc::new(AtomicU64::new(0));
        let relay = tokio::spawn(relay(Relay {
            upstream: Arc::clone(&upstream),
            listener: Arc::clone(&self.socket),
            client,
            backend: addr,
            replied: Arc::clone(&replied),
            epoch: self.epoch,
            counted: metrics.relayed(&self.name, &route, "downstream"),
            metrics: metrics.clone(),
            name: self.name.clone(),
        }))
        .abort_handle();
        Ok(Flow {
            upstream,
            backend: addr,
            sent: metrics.relayed(&self.name, &route, "upstream"),
            route,
            replied,
            relay,
        })
    }

    /// End the idle sessions and, when the routes changed, those whose route no longer
    /// serves their backend (new sessions already pick from the new table).
    fn sweep(&mut self, idle: Duration) {
        let epoch = self.epoch;
        let idle = self
            .flows
            .expire(Instant::now(), idle, |f| f.replied_at(epoch));
        self.ended("idle", idle.len());
        let table = read(&self.shared.table).clone();
        if !Arc::ptr_eq(&table, &self.table) {
            let port = self.port;
            let rerouted = self
                .flows
                .retain(|f| table.udp_serves(port, &f.route, f.backend));
            self.ended("route_changed", rerouted.len());
            self.table = table;
        }
        self.gauge.set(self.flows.len() as i64);
    }

    fn ended(&self, reason: &'static str, count: usize) {
        if count > 0 {
            self.shared
                .udp_metrics
                .ended
                .get_or_create(&EndedLabels {
                    listener: self.name.clone(),
                    reason,
                })
                .inc_by(count as u64);
        }
    }
}

/// Send one datagram on `socket` (to `to`, or its connected peer) now, or fail with
/// `WouldBlock` when its send buffer is full. A direct `sendto`: tokio's `try_send`
/// answers `WouldBlock` until its reactor has seen the socket writable, which a new
/// session's socket has not been yet; and a datagram that cannot be queued now is dropped
/// (UDP), never waited on.
fn send_now(socket: &UdpSocket, data: &[u8], to: Option<SocketAddr>) -> io::Result<usize> {
    let socket = socket2::SockRef::from(socket);
    match to {
        Some(to) => socket.send_to(data, &to.into()),
        None => socket.send(data),
    }
}

/// A non-blocking UDP socket of `addr`'s family connected to it.
fn connected(addr: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// What one flow's relay task needs.
struct Relay {
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    backend: SocketAddr,
    replied: Arc<AtomicU64>,
    epoch: Instant,
    counted: Relayed,
    metrics: UdpMetrics,
    name: String,
}

thread_local! {
    /// The replies' buffer: used only between a readiness and the next await, so one per
    /// worker thread serves every flow.
    static REPLY: RefCell<Vec<u8>> = RefCell::new(vec![0u8; MAX_DATAGRAM]);
}

/// Relay the backend's replies to the client, from the listener's socket, until aborted
/// or the socket fails.
async fn relay(relay: Relay) {
    loop {
        if let Err(error) = relay.upstream.readable().await {
            tracing::warn!(backend = %relay.backend, %error, "UDP upstream socket failed");
            return;
        }
        let more = REPLY.with_borrow_mut(|buf| relay.ready(buf));
        match more {
            Ok(true) => tokio::task::yield_now().await,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(backend = %relay.backend, %error, "UDP upstream socket failed");
                return;
            }
        }
    }
}

impl Relay {
    /// Relay what the upstream socket holds, at most a burst; true when it may hold more.
    /// A reply the listener's socket cannot take now is dropped (UDP is lossy; waiting
    /// would hold the buffer every flow shares).
    fn ready(&self, buf: &mut [u8]) -> io::Result<bool> {
        for _ in 0..RELAY_BURST {
            let len = match self.upstream.try_recv(buf) {
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let error = UdpError::Unreachable { addr: self.backend };
                    self.metrics.drop(&self.name, &error);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let since = self.epoch.elapsed().as_nanos();
            self.replied.store(
                u64::try_from(since).unwrap_or(u64::MAX).max(1),
                Ordering::Relaxed,
            );
            match send_now(&self.listener, &buf[..len], Some(self.client)) {
                Ok(_) => self.counted.count(len),
                Err(source) => {
                    let error = UdpError::Reply {
                        client: self.client,
                        source,
                    };
                    self.metrics.drop(&self.name, &error);
                }
            }
        }
        Ok(true)
    }
}
