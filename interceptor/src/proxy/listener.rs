//! The in-pod listeners: outbound (15001) and inbound (15003). Accept, recover the
//! original destination, pick the target (outbound: within the upstream policies, with
//! one retry on a connect failure, and on a Service port routed by server name after
//! peeking the ClientHello, see [`outbound_sni`]; inbound: within the Service's rate
//! limit), connect with
//! a socket from the pod's [`SocketFactory`] (made inside the pod, with the proxy mark
//! the programs skip), and forward.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::connection::{ConnectionRecord, Direction, ProxyError};
use super::forward::{forward, reset_on_close, CopyMode};
use super::log::ConnectionLog;
use super::orig_dst::original_dst_any;
use super::routes::{Admission, ConnectionSource, RouteTable, Target, DEFAULT_CONNECT_TIMEOUT};
use super::sni::peek_sni;
use super::socket::{self, SocketFactory};
use super::upstream::{self, Upstreams};
use crate::sync::read;

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
    /// Bumped whenever a new route table is stored. Tables are built off the CNI ADD
    /// path, so a pod's first connections may come before a table that knows the pod.
    pub routes_published: tokio::sync::watch::Receiver<u64>,
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
    let original = match original_dst_any(&stream) {
        Ok(addr) => addr,
        Err(error) => {
            reset_on_close(&stream);
            return Err(ProxyError::NoOriginalDestination(error));
        }
    };
    record.original_dst = Some(original);
    let original = match original {
        SocketAddr::V4(original) => original,
        SocketAddr::V6(original) => return proxy_one6(stream, ctx, record, original).await,
    };
    let table = match ctx.table_knowing_pod().await {
        Ok(table) => table,
        Err(error) => {
            reset_on_close(&stream);
            return Err(error);
        }
    };
    let client_ip = match record.client {
        SocketAddr::V4(client) => *client.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
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
            upstream::open(
                &ctx.upstreams,
                &ctx.pod,
                |pick| table.resolve_with(original, source, pick),
                Some(client_ip),
                |addr, timeout| socket::connect(&*ctx.sockets, addr, timeout),
            )
            .await
        }
        Direction::Inbound | Direction::Gateway => inbound(ctx, &table, original, client_ip).await,
    };
    record.target = Some(target);
    let (upstream, leases) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            reset_on_close(&stream);
            return Err(error);
        }
    };
    // Both sockets have TCP_NODELAY: the listener's is inherited, the factory sets it on
    // upstream sockets.
    // Proxy-to-proxy connections between pods of this node are in the SOCKHASH when
    // sockmap is on, and their bytes arrive where splice(2) cannot read them.
    let in_sockhash = ctx.sockmap && {
        let peer = match (ctx.direction, &record.target) {
            (
                Direction::Outbound,
                Some(Target::Endpoint { addr, .. } | Target::Passthrough { addr }),
            ) => *addr.ip(),
            (Direction::Outbound, _) => Ipv4Addr::UNSPECIFIED,
            (Direction::Inbound | Direction::Gateway, _) => client_ip,
        };
        table.is_local_enrolled(&peer)
    };
    let mode = if in_sockhash {
        CopyMode::Userspace
    } else {
        CopyMode::Splice
    };
    record.copy_mode = mode;
    record.bytes = forward(stream, upstream, mode).await;
    leases.served(record.bytes.downstream_bytes > 0);
    Ok(())
}

/// An IPv6 flow of a dual-stack pod (eBPF mode). The route table is IPv4 only (no IPv6
/// Services, upstream policies or sockmap yet), so an outbound flow goes where the app
/// was going and an inbound one to the app on its port, once the access check (which
/// treats every IPv6 client as unknown in SMI mode) lets it in. The upstream socket is
/// made in the pod with the proxy mark, so connect6 lets it through (or, to an enrolled
/// pod of this node, hands it to that pod's 15003).
async fn proxy_one6(
    stream: TcpStream,
    ctx: &ListenerContext,
    record: &mut ConnectionRecord,
    original: SocketAddrV6,
) -> Result<(), ProxyError> {
    let target = match ctx.direction {
        Direction::Outbound => Target::Passthrough6 { addr: original },
        Direction::Inbound | Direction::Gateway => {
            let table = match ctx.table_knowing_pod().await {
                Ok(table) => table,
                Err(error) => {
                    reset_on_close(&stream);
                    return Err(error);
                }
            };
            let client = match record.client {
                SocketAddr::V6(client) => *client.ip(),
                SocketAddr::V4(client) => client.ip().to_ipv6_mapped(),
            };
            if let Err(reason) = table.admit_inbound6(client) {
                let (target, refused) = upstream::refusal(ctx.pod.to_string(), "inbound", reason);
                record.target = Some(target);
                reset_on_close(&stream);
                return refused.map(drop);
            }
            Target::Local6 { addr: original }
        }
    };
    record.target = Some(target);
    let addr = SocketAddr::V6(original);
    let upstream = match socket::connect_any(&*ctx.sockets, addr, DEFAULT_CONNECT_TIMEOUT).await {
        Ok(upstream) => upstream,
        Err(source) => {
            reset_on_close(&stream);
            return Err(ProxyError::Connect { addr, source });
        }
    };
    record.copy_mode = CopyMode::Splice;
    record.bytes = forward(stream, upstream, CopyMode::Splice).await;
    Ok(())
}

/// Inbound traffic is for the application in this pod, on the port it was sent to, if
/// the traffic policy lets the client reach it and the Service's rate limit has a token.
/// A failed connect to the application counts against the pod as an endpoint.
async fn inbound(
    ctx: &ListenerContext,
    table: &RouteTable,
    original: SocketAddrV4,
    client: Ipv4Addr,
) -> upstream::Opened {
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
    match socket::connect(&*ctx.sockets, original, DEFAULT_CONNECT_TIMEOUT).await {
        Ok(stream) => (target, Ok((stream, upstream::Leases::default()))),
        Err(source) => {
            if let Some(settings) = settings {
                ctx.upstreams.failed(original, settings, Instant::now());
            }
            let error = ProxyError::Connect {
                addr: SocketAddr::V4(original),
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
    original: SocketAddrV4,
    record: &mut ConnectionRecord,
) -> Result<Option<String>, ProxyError> {
    if !table.routes_by_sni(original) {
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
