//! The in-pod listeners: outbound (15001) and inbound (15003). Accept, recover the
//! original destination, pick the target (outbound: within the upstream policies, with
//! one retry on a connect failure, and on a Service port routed by server name after
//! peeking the ClientHello, see [`outbound_sni`]; inbound: within the Service's rate
//! limit), connect with a socket from the pod's [`SocketFactory`] (made inside the pod,
//! with the proxy mark the programs skip; inbound, bound to the client's address unless
//! the agent was told not to, see [`connect_app`]), and forward.
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::connection::{ClientAddress, ConnectionRecord, Direction, ProxyError};
use super::forward::{forward, reset_on_close, CopyMode};
use super::log::ConnectionLog;
use super::orig_dst::original_dst_any;
use super::routes::{
    Admission, ConnectionSource, RouteTable, Target, DEFAULT_CONNECT_TIMEOUT, EGRESS_POLICY,
};
use super::sni::peek_sni;
use super::socket::{self, SocketFactory};
use super::socks5;
use super::upstream::{self, Upstreams};
use crate::sync::{lock, read, write};

/// How long an egress gateway may take to connect to the destination and say so.
const EGRESS_GATEWAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Open one of the pod's listeners with `SO_REUSEPORT`, from the pod's socket factory:
/// during a hand-over the next agent opens its own listener beside this one.
pub fn listen(sockets: &dyn SocketFactory, direction: Direction) -> std::io::Result<TcpListener> {
    let port = direction
        .port()
        .ok_or_else(|| std::io::Error::other("a gateway has no in-pod listener"))?;
    TcpListener::from_std(sockets.listener(port)?)
}

/// [`listen`] on the pod's IPv6 addresses (`IPV6_V6ONLY`, beside the IPv4 listener), for
/// a dual-stack pod whose IPv6 is intercepted: connect6 sends the app's IPv6 connects to
/// `[pod IPv6]:15001`, tc steers IPv6 SYNs to 15003.
pub fn listen6(sockets: &dyn SocketFactory, direction: Direction) -> std::io::Result<TcpListener> {
    let port = direction
        .port()
        .ok_or_else(|| std::io::Error::other("a gateway has no in-pod listener"))?;
    TcpListener::from_std(sockets.listener6(port)?)
}

/// Everything a pod's accept loop shares with the agent.
#[derive(Clone)]
pub struct ListenerContext {
    pub pod: crate::model::PodKey,
    pub direction: Direction,
    /// Sockets inside the pod's netns, with the proxy mark.
    pub sockets: Arc<dyn SocketFactory>,
    pub routes: Arc<RwLock<Arc<RouteTable>>>,
    pub log: Arc<ConnectionLog>,
    pub upstreams: Arc<Upstreams>,
    /// With sockmap on, proxy-to-proxy sockets on this node are in the SOCKHASH.
    pub sockmap: bool,
    /// How long a client of a port routed by server name has to send its ClientHello.
    pub client_hello_timeout: Duration,
    /// Turns true when the agent drains: stop accepting, let open connections finish.
    pub draining: tokio::sync::watch::Receiver<bool>,
    /// Turns true when this pod leaves the mesh while it runs (its enrollment label or
    /// annotation changed): the same as a drain, for this pod only.
    pub leaving: tokio::sync::watch::Receiver<bool>,
    /// False while the agent adopts pods at start: a connection accepted then would be
    /// routed by a table that lacks the pods not adopted yet (their endpoints), so it
    /// waits in the accept queue instead.
    pub accepting: tokio::sync::watch::Receiver<bool>,
    /// The pod's address: a route table knows the pod once it counts it enrolled.
    pub pod_ip: Ipv4Addr,
    /// Inbound: dial the application from the client's address and port (a transparent
    /// socket; the pod's policy route brings the replies back), so it sees its real
    /// peer. Off (`--preserve-client-ip false`, or the pod's route could not be
    /// installed): from the pod's own address.
    pub preserve_client_ip: bool,
    /// Bumped whenever a new route table is stored. Tables are built off the CNI ADD
    /// path, so a pod's first connections may come before a table that knows the pod.
    pub routes_published: tokio::sync::watch::Receiver<u64>,
    /// Outbound, with `--same-node-direct`: this node's enrolled pods' inbound sides, to
    /// which the outbound proxy hands a connection itself ([`SameNodePods`]).
    pub same_node: Option<Arc<SameNodePods>>,
}

/// The inbound listeners' contexts of this node's enrolled pods, by address. With
/// `--same-node-direct`, an outbound connection whose endpoint is one of them skips that
/// pod's inbound proxy: the outbound proxy does the inbound proxy's work itself (the SMI
/// admission of the client, the Service's rate limit, the connect to the application
/// from the client's address, in the pod's netns, and the pod's inbound record and
/// metrics), one proxy hop instead of two. Ztunnel does the same for pods of its node.
#[derive(Default)]
pub struct SameNodePods {
    pods: RwLock<HashMap<IpAddr, ListenerContext>>,
}

impl SameNodePods {
    /// Serve `ctx`'s pod (an inbound context) directly from now on, until the returned
    /// guard is dropped.
    pub fn insert(self: &Arc<Self>, ip: IpAddr, ctx: ListenerContext) -> SameNodeEntry {
        write(&self.pods).insert(ip, ctx);
        SameNodeEntry {
            pods: Arc::clone(self),
            ip,
        }
    }

    /// The inbound side of the pod at `ip`, while it accepts (not leaving the mesh, the
    /// agent not draining).
    fn get(&self, ip: IpAddr) -> Option<ListenerContext> {
        let pods = read(&self.pods);
        let ctx = pods.get(&ip)?;
        let accepting = !*ctx.draining.borrow() && !*ctx.leaving.borrow();
        accepting.then(|| ctx.clone())
    }
}

/// One pod's entry in [`SameNodePods`]; dropping it takes the pod out.
pub struct SameNodeEntry {
    pods: Arc<SameNodePods>,
    ip: IpAddr,
}

impl Drop for SameNodeEntry {
    fn drop(&mut self) {
        write(&self.pods.pods).remove(&self.ip);
    }
}

/// How long a connection of a just-added pod waits for a route table that knows the pod
/// before it is refused.
const ROUTES_WAIT: Duration = Duration::from_secs(5);

impl ListenerContext {
    /// The current route table once it knows this pod (its source identity, its
    /// Services' endpoints); a new pod's first connections wait for it.
    async fn table_knowing_pod(&self) -> Result<Arc<RouteTable>, ProxyError> {
        // Every connection but a new pod's first ones: no receiver clone, no timer.
        let table = read(&self.routes).clone();
        if table.is_local_enrolled(&self.pod_ip) {
            return Ok(table);
        }
        let mut published = self.routes_published.clone();
        let wait = async {
            loop {
                published.borrow_and_update();
                let table = read(&self.routes).clone();
                if table.is_local_enrolled(&self.pod_ip) {
                    return Ok(table);
                }
                if published.changed().await.is_err() {
                    return Err(ProxyError::RoutesStopped);
                }
            }
        };
        tokio::time::timeout(ROUTES_WAIT, wait)
            .await
            .unwrap_or(Err(ProxyError::RoutesLate(ROUTES_WAIT)))
    }
}

/// Accept until the agent drains or the pod leaves the mesh, then close the listener and
/// return once every open connection has ended. Aborting the task aborts every open
/// connection of this pod (they live in the JoinSet), so nothing keeps the pod's netns
/// alive.
pub async fn serve(listener: TcpListener, ctx: ListenerContext) {
    let mut connections = JoinSet::new();
    let mut draining = ctx.draining.clone();
    let mut leaving = ctx.leaving.clone();
    let mut accepting = ctx.accepting.clone();
    loop {
        let open = *accepting.borrow_and_update();
        tokio::select! {
            _ = async { drop(draining.wait_for(|drain| *drain).await) } => break,
            _ = async { drop(leaving.wait_for(|leave| *leave).await) } => break,
            _ = accepting.changed() => {}
            accepted = listener.accept(), if open => match accepted {
                Ok((stream, client)) => {
                    let ctx = ctx.clone();
                    connections.spawn(async move { handle(stream, client, ctx).await });
                }
                Err(error) => {
                    tracing::warn!(pod = %ctx.pod, %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    // Closed at once: the kernel sends new connections to the next agent's listener (and,
    // with tcp_migrate_req, those queued here too).
    drop(listener);
    while connections.join_next().await.is_some() {}
}

async fn handle(stream: TcpStream, client: SocketAddr, ctx: ListenerContext) {
    let _open = ctx.log.opened();
    let mut record = ConnectionRecord::start(ctx.pod.to_string(), ctx.direction, client);
    let result = proxy_one(stream, &ctx, &mut record).await;
    record.finish(result);
    tracing::debug!(pod = %record.pod, client = %record.client, original_dst = ?record.original_dst,
        target = ?record.target, outcome = %record.outcome, "connection done");
    ctx.log.push(record);
}

async fn proxy_one(
    stream: TcpStream,
    ctx: &ListenerContext,
    record: &mut ConnectionRecord,
) -> Result<(), ProxyError> {
    let original = match original_dst_any(&stream, record.client) {
        Ok(addr) => addr,
        Err(error) => {
            reset_on_close(&stream);
            return Err(ProxyError::NoOriginalDestination(error));
        }
    };
    record.original_dst = Some(original);
    let table = match ctx.table_knowing_pod().await {
        Ok(table) => table,
        Err(error) => {
            reset_on_close(&stream);
            return Err(error);
        }
    };
    // Either family: a dual-stack pod's IPv6 flows go through the same table (IPv6
    // Service VIPs, IPv6 clients' identities) as its IPv4 ones.
    let client_ip = record.client.ip();
    // The destination pod's inbound record, when the connection went to a pod of this
    // node directly (`--same-node-direct`).
    let direct: Mutex<Option<ConnectionRecord>> = Mutex::new(None);
    let (target, opened) = match ctx.direction {
        Direction::Outbound => {
            let sni = match outbound_sni(&stream, ctx, &table, original, record).await {
                Ok(sni) => sni,
                Err(error) => {
                    reset_on_close(&stream);
                    return Err(error);
                }
            };
            let source = ConnectionSource {
                pod: Some(&ctx.pod),
                gateway: None,
                sni: sni.as_deref(),
            };
            let (client, direct, routes) = (record.client, &direct, &*table);
            // Boxed: the open (endpoint picks, retries, the same-node connect) is the
            // largest state of this future, 2.7 KiB of its 3.9 (`-Zprint-type-sizes`),
            // and an idle connection would hold that room for its whole life. On the
            // heap it is freed once the upstream is open.
            Box::pin(upstream::open(
                &ctx.upstreams,
                &ctx.pod,
                |pick| table.resolve_with(original, source, pick),
                Some(client_ip),
                |addr, timeout| {
                    let peer = ctx.same_node.as_ref().and_then(|pods| pods.get(addr.ip()));
                    async move {
                        match peer {
                            Some(peer) => {
                                connect_same_node(&peer, routes, client, addr, direct).await
                            }
                            None => socket::connect(&*ctx.sockets, addr, timeout).await,
                        }
                    }
                },
            ))
            .await
        }
        Direction::Inbound | Direction::Gateway => inbound(ctx, &table, original, record).await,
    };
    if let Target::Refused { route, .. } = &target {
        if route == EGRESS_POLICY {
            tracing::info!(pod = %ctx.pod, destination = %original,
                "egress refused: enableEgress is false and the destination is outside the mesh");
        }
    }
    let tunnel = match &target {
        Target::Endpoint {
            addr,
            tunnel_to: Some(destination),
            ..
        } => Some((*addr, *destination)),
        _ => None,
    };
    record.target = Some(target);
    let (mut upstream, leases) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            reset_on_close(&stream);
            return Err(error);
        }
    };
    // Through an egress gateway: it is told where the application was going first.
    if let Some((gateway, destination)) = tunnel {
        let asked = tokio::time::timeout(
            EGRESS_GATEWAY_TIMEOUT,
            socks5::connect(&mut upstream, destination),
        )
        .await
        .unwrap_or_else(|_| {
            Err(socks5::Socks5Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {EGRESS_GATEWAY_TIMEOUT:?}"),
            )))
        });
        if let Err(source) = asked {
            reset_on_close(&stream);
            return Err(ProxyError::EgressGateway {
                gateway,
                destination,
                source,
            });
        }
    }
    // Both sockets have TCP_NODELAY: the listener's is inherited, the factory sets it on
    // upstream sockets.
    // Proxy-to-proxy connections between pods of this node are in the SOCKHASH when
    // sockmap is on, and their bytes arrive where splice(2) cannot read them.
    let in_sockhash = ctx.sockmap && {
        let peer = match (ctx.direction, &record.target) {
            (
                Direction::Outbound,
                Some(Target::Endpoint { addr, .. } | Target::Passthrough { addr, .. }),
            ) => addr.ip(),
            (Direction::Outbound, _) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (Direction::Inbound | Direction::Gateway, _) => client_ip,
        };
        // The SOCKHASH is IPv4 only (see interceptor-ebpf's flows.rs).
        matches!(peer, IpAddr::V4(peer) if table.is_local_enrolled(&peer))
    };
    let direct = direct.into_inner().unwrap_or_else(|p| p.into_inner());
    // A socket made in the destination pod's netns may be in the SOCKHASH (sock_ops sees
    // a connection to a local pod): read it the way that always works.
    let mode = if in_sockhash || (ctx.sockmap && direct.is_some()) {
        CopyMode::Userspace
    } else {
        CopyMode::Splice
    };
    record.copy_mode = mode;
    record.bytes = forward(stream, upstream, mode).await;
    leases.served(record.bytes.downstream_bytes > 0);
    if let Some(mut inbound) = direct {
        // The same bytes, seen from the destination pod: what came from its client went
        // up to its application.
        inbound.copy_mode = mode;
        inbound.bytes = record.bytes;
        inbound.finish(Ok(()));
        ctx.log.push(inbound);
    }
    Ok(())
}

/// `--same-node-direct`: the connection to `app`, an endpoint in an enrolled pod of this
/// node, made by the outbound proxy in that pod's place ([`SameNodePods`]): the pod's
/// inbound checks, then the connect from `client` (the application's own address) in the
/// pod's netns. Its inbound record goes into `direct` to be finished with the bytes; a
/// refusal's is logged now, and the connect fails as a reset (as the pod's inbound proxy
/// would have reset it): not counted against the endpoint.
async fn connect_same_node(
    peer: &ListenerContext,
    table: &RouteTable,
    client: SocketAddr,
    app: SocketAddr,
    direct: &Mutex<Option<ConnectionRecord>>,
) -> std::io::Result<TcpStream> {
    let mut record = ConnectionRecord::start(peer.pod.to_string(), Direction::Inbound, client);
    record.original_dst = Some(app);
    let (target, opened) = inbound(peer, table, app, &mut record).await;
    record.target = Some(target);
    match opened {
        Ok((stream, _no_leases)) => {
            *lock(direct) = Some(record);
            Ok(stream)
        }
        Err(error) => {
            let reason = error.to_string();
            record.finish(Err(error));
            peer.log.push(record);
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                format!("refused by {}'s inbound side: {reason}", peer.pod),
            ))
        }
    }
}

/// Inbound traffic is for the application in this pod, on the port it was sent to, if
/// the traffic policy lets the client reach it and the Service's rate limit has a token.
/// A failed connect to the application counts against the pod as an endpoint.
async fn inbound(
    ctx: &ListenerContext,
    table: &RouteTable,
    original: SocketAddr,
    record: &mut ConnectionRecord,
) -> upstream::Opened {
    // Access rules and rate limits are the accepted peer's, whatever the socket to the
    // application is bound to.
    let client = record.client.ip();
    let refuse = |route: &str, reason| upstream::refusal(ctx.pod.to_string(), route, reason);
    let admission = match table.admit_inbound(client, &ctx.pod, original.port()) {
        Ok(admission) => admission,
        Err(reason) => return refuse("inbound", reason),
    };
    let settings = table.endpoint_settings(&original);
    if let Some((settings, limit)) = settings.and_then(|s| Some((s, s.rate_limit?))) {
        if !ctx
            .upstreams
            .take_token(original, settings, &limit, Instant::now())
        {
            let reason = format!(
                "no token left for {} ({} per {} s, burst {})",
                settings.host,
                limit.connections,
                limit.per.as_secs(),
                limit.burst
            );
            return refuse("rate limit", reason);
        }
    }
    let target = Target::Local {
        addr: original,
        node_probe: admission == Admission::NodeProbe,
    };
    let (connected, source) = connect_app(ctx, record.client, original).await;
    record.client_address = source;
    match connected {
        Ok(stream) => (target, Ok((stream, upstream::Leases::default()))),
        Err(source) => {
            if let Some(settings) = settings {
                ctx.upstreams.failed(original, settings, Instant::now());
            }
            let error = ProxyError::Connect {
                addr: original,
                source,
            };
            (target, Err(error))
        }
    }
}

/// On a Service port routed by server name (VirtualService `tls` rules), the server name
/// of the app's ClientHello, peeked without consuming it; an error when there is no
/// usable hello in time or no rule for its name (the caller resets: never forwarded
/// blind). `None` on every other port, which is not peeked at.
async fn outbound_sni(
    stream: &TcpStream,
    ctx: &ListenerContext,
    table: &RouteTable,
    original: SocketAddr,
    record: &mut ConnectionRecord,
) -> Result<Option<String>, ProxyError> {
    let source = ConnectionSource {
        pod: Some(&ctx.pod),
        gateway: None,
        sni: None,
    };
    if !table.needs_server_name(original, source) {
        return Ok(None);
    }
    let sni = peek_sni(stream, ctx.client_hello_timeout).await?;
    record.sni = sni.clone();
    let source = ConnectionSource {
        pod: Some(&ctx.pod),
        gateway: None,
        sni: sni.as_deref(),
    };
    if !table.matches_sni(original, source) {
        return Err(ProxyError::NoSniRoute {
            service: table.service_name(original).unwrap_or_default().to_owned(),
            sni,
        });
    }
    Ok(sni)
}

/// Connect to the application in this pod at `app`. With client addresses preserved, the
/// socket is bound to `client` (the accepted peer), so the application sees who really
/// called; the pod's own address is used instead, and said so in the returned
/// [`ClientAddress`] (counted in `interceptor_inbound_client_address_total`), when the
/// client is the pod itself, or when binding or connecting from the client's address
/// fails. Transparency is never a reason to refuse: the connection still goes through
/// the proxy, only with the pod's address.
async fn connect_app(
    ctx: &ListenerContext,
    client: SocketAddr,
    app: SocketAddr,
) -> (std::io::Result<TcpStream>, Option<ClientAddress>) {
    let own = || socket::connect(&*ctx.sockets, app, DEFAULT_CONNECT_TIMEOUT);
    if !ctx.preserve_client_ip {
        return (own().await, None);
    }
    if is_own_address(client.ip(), app.ip(), ctx.pod_ip) || client.is_ipv4() != app.is_ipv4() {
        return (own().await, Some(ClientAddress::OwnAddress));
    }
    let error = match ctx.sockets.transparent(client) {
        Ok(socket) => {
            match socket::connect_socket(socket, app, DEFAULT_CONNECT_TIMEOUT).await {
                Ok(stream) => return (Ok(stream), Some(ClientAddress::Preserved)),
                // The 4-tuple is taken (the client port's last connection is in TIME_WAIT
                // on our side): the pod's address will do.
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    error
                }
                // The application itself did not answer: no other source would help.
                Err(error) => return (Err(error), Some(ClientAddress::Preserved)),
            }
        }
        Err(error) => error,
    };
    tracing::debug!(pod = %ctx.pod, %client, %app, %error,
        "cannot dial the application from the client's address: from the pod's own");
    (own().await, Some(ClientAddress::Fallback))
}

/// Whether `client` is the pod itself: loopback, the address it dialled (the pod's, on
/// an inbound connection) or the pod's IPv4 address.
fn is_own_address(client: IpAddr, dialled: IpAddr, pod_ip: Ipv4Addr) -> bool {
    client.is_loopback()
        || client.is_unspecified()
        || client == dialled
        || client == IpAddr::V4(pod_ip)
        || client.to_canonical() == IpAddr::V4(pod_ip)
}
