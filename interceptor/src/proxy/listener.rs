//! The in-pod listeners: outbound (15001) and inbound (15003). Accept, recover the
//! original destination, pick the target (outbound: within the upstream policies, with
//! one retry on a connect failure; inbound: within the Service's rate limit), connect from
//! inside the pod with the proxy mark (which the programs skip), and forward.
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync::{lock, read};
use std::time::{Duration, Instant, SystemTime};

use interceptor_common::{INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::forward::{forward, reset_on_close, CopyMode, Forwarded};
use super::orig_dst::original_dst;
use super::routes::{ConnectionSource, RouteTable, Target, DEFAULT_CONNECT_TIMEOUT};
use super::upstream::{self, Upstreams};
use crate::inpod::{InpodError, PodNetns};

/// Connection records kept for `/config_dump`.
const LOG_CAPACITY: usize = 256;

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
}

/// What happened to one proxied connection, for operators and tests.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionRecord {
    pub pod: String,
    pub direction: Direction,
    pub client: SocketAddr,
    /// What the application dialled, as `SO_ORIGINAL_DST` reported it.
    pub original_dst: Option<SocketAddrV4>,
    pub target: Option<Target>,
    pub outcome: String,
    pub copy_mode: CopyMode,
    #[serde(flatten)]
    pub bytes: Forwarded,
    pub unix_ms: u64,
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
            target: None,
            outcome: String::new(),
            copy_mode: CopyMode::default(),
            bytes: Forwarded::default(),
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// Recent connection records, bounded, and the metrics every record adds to.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    records: Mutex<VecDeque<ConnectionRecord>>,
    metrics: super::metrics::ProxyMetrics,
    /// Connections accepted and not yet done (what a drain waits for).
    open: std::sync::atomic::AtomicUsize,
}

/// Counts one connection as open for as long as it lives.
pub struct OpenConnection<'a>(&'a ConnectionLog);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ConnectionLog {
    pub fn metrics(&self) -> &super::metrics::ProxyMetrics {
        &self.metrics
    }

    /// Count a connection as open until the returned guard is dropped.
    pub fn opened(&self) -> OpenConnection<'_> {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenConnection(self)
    }

    /// Connections accepted and not yet done.
    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn push(&self, record: ConnectionRecord) {
        self.metrics.observe(&record);
        let mut records = lock(&self.records);
        if records.len() == LOG_CAPACITY {
            records.pop_front();
        }
        records.push_back(record);
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        let records = lock(&self.records);
        records.iter().cloned().collect()
    }
}

/// Open one of the pod's listeners inside its netns, with `SO_REUSEPORT`: during a
/// hand-over the next agent opens its own listener beside this one (see
/// [`allow_request_migration`]).
pub async fn listen(netns: &PodNetns, direction: Direction) -> Result<TcpListener, InpodError> {
    let path = netns.path().display().to_string();
    let port = direction.port().ok_or_else(|| InpodError::Io {
        path: path.clone(),
        source: std::io::Error::other("a gateway has no in-pod listener"),
    })?;
    let std_listener = netns
        .run(move || -> std::io::Result<std::net::TcpListener> {
            let socket = nonblocking_tcp_socket()?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            allow_request_migration();
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket.listen(1024)?;
            Ok(socket.into())
        })
        .await?
        .map_err(|source| InpodError::Io {
            path: path.clone(),
            source,
        })?;
    TcpListener::from_std(std_listener).map_err(|source| InpodError::Io { path, source })
}

/// The pod netns sysctl that moves connections still in a closing listener's accept
/// queue to another listener of its `SO_REUSEPORT` group (kernel 5.14).
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turn on `net.ipv4.tcp_migrate_req` in the calling thread's netns (net sysctls are
/// per netns, resolved from the thread that opens the file). Without it, a connection
/// the kernel queued on the old agent's listener just before that listener closed at a
/// hand-over is reset; with it, the kernel hands it to the new agent's listener. Older
/// kernels lack the sysctl (logged at debug level): the hand-over then has that window.
fn allow_request_migration() {
    match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => {
            if let Err(error) = std::fs::write(MIGRATE_REQ_SYSCTL, "1") {
                tracing::warn!(%error, "setting {MIGRATE_REQ_SYSCTL} in a pod netns");
            }
        }
        Err(error) => tracing::debug!(%error, "no {MIGRATE_REQ_SYSCTL} (kernel before 5.14)"),
    }
}

/// Everything a pod's accept loop shares with the agent.
#[derive(Clone)]
pub struct ListenerContext {
    pub pod: crate::model::PodKey,
    pub direction: Direction,
    pub netns: Arc<PodNetns>,
    pub routes: Arc<RwLock<Arc<RouteTable>>>,
    pub log: Arc<ConnectionLog>,
    pub upstreams: Arc<Upstreams>,
    /// With sockmap on, proxy-to-proxy sockets on this node are in the SOCKHASH.
    pub sockmap: bool,
    /// Turns true when the agent drains: stop accepting, let open connections finish.
    pub draining: tokio::sync::watch::Receiver<bool>,
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
    async fn table_knowing_pod(&self) -> Result<Arc<RouteTable>, String> {
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
                    return Err("the agent stopped building route tables".to_owned());
                }
            }
        };
        tokio::time::timeout(ROUTES_WAIT, wait)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no route table knows this pod after {ROUTES_WAIT:?}"
                ))
            })
    }
}

/// Accept until the agent drains, then close the listener and return once every open
/// connection has ended. Aborting the task aborts every open connection of this pod (they
/// live in the JoinSet), so nothing keeps the pod's netns alive.
pub async fn serve(listener: TcpListener, ctx: ListenerContext) {
    let mut connections = JoinSet::new();
    let mut draining = ctx.draining.clone();
    let mut accepting = ctx.accepting.clone();
    loop {
        let open = *accepting.borrow_and_update();
        tokio::select! {
            _ = async { drop(draining.wait_for(|drain| *drain).await) } => break,
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
    let outcome = proxy_one(stream, &ctx, &mut record).await;
    record.outcome = match outcome {
        Ok(()) if record.bytes.reset => "reset".into(),
        Ok(()) => "closed".into(),
        Err(reason) => reason,
    };
    tracing::debug!(pod = %record.pod, client = %record.client, original_dst = ?record.original_dst,
        target = ?record.target, outcome = %record.outcome, "connection done");
    ctx.log.push(record);
}

async fn proxy_one(
    stream: TcpStream,
    ctx: &ListenerContext,
    record: &mut ConnectionRecord,
) -> Result<(), String> {
    let original = match original_dst(&stream) {
        Ok(addr) => addr,
        Err(error) => {
            reset_on_close(&stream);
            return Err(format!("no original destination: {error}"));
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
    let client_ip = match record.client {
        SocketAddr::V4(client) => *client.ip(),
        SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
    };
    let (target, opened) = match ctx.direction {
        Direction::Outbound => {
            let source = ConnectionSource {
                pod: Some(&ctx.pod),
                gateway: None,
            };
            upstream::open(
                &ctx.upstreams,
                &ctx.pod.to_string(),
                |pick| table.resolve_with(original, source, pick),
                Some(client_ip),
                |addr, timeout| connect_from_pod(&ctx.netns, addr, timeout),
            )
            .await
        }
        Direction::Inbound | Direction::Gateway => inbound(ctx, &table, original, client_ip).await,
    };
    record.target = Some(target);
    let (upstream, leases) = match opened {
        Ok(opened) => opened,
        Err(why) => {
            reset_on_close(&stream);
            return Err(why);
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Proxy-to-proxy connections between pods of this node are in the SOCKHASH when
    // sockmap is on, and their bytes arrive where splice(2) cannot read them.
    let peer = match ctx.direction {
        Direction::Outbound => match upstream.peer_addr() {
            Ok(SocketAddr::V4(peer)) => *peer.ip(),
            _ => Ipv4Addr::UNSPECIFIED,
        },
        Direction::Inbound | Direction::Gateway => client_ip,
    };
    let mode = if ctx.sockmap && table.is_local_enrolled(&peer) {
        CopyMode::Userspace
    } else {
        CopyMode::Splice
    };
    record.copy_mode = mode;
    record.bytes = forward(stream, upstream, mode).await;
    leases.served(record.bytes.downstream_bytes > 0);
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
    if let Err(reason) = table.admit_inbound(client, &ctx.pod, original.port()) {
        return refuse("inbound", reason);
    }
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
    let target = Target::Local { addr: original };
    match connect_from_pod(&ctx.netns, original, DEFAULT_CONNECT_TIMEOUT).await {
        Ok(stream) => (target, Ok((stream, upstream::Leases::default()))),
        Err(error) => {
            if let Some(settings) = settings {
                ctx.upstreams.failed(original, settings, Instant::now());
            }
            (target, Err(format!("connect {original}: {error}")))
        }
    }
}

/// Connect to `addr` with a socket created inside the pod's netns and carrying the
/// proxy mark, so the connect4 program lets it through untouched.
pub async fn connect_from_pod(
    netns: &PodNetns,
    addr: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let std_stream = netns
        .run(|| -> std::io::Result<std::net::TcpStream> {
            let socket = nonblocking_tcp_socket()?;
            socket.set_mark(PROXY_MARK)?;
            Ok(socket.into())
        })
        .await
        .map_err(std::io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std_stream);
    connect_within(timeout, socket.connect(SocketAddr::V4(addr))).await
}

/// Connect to `addr` from the calling process's netns (a gateway, or the node).
pub async fn connect_from_here(
    addr: SocketAddrV4,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    connect_within(timeout, TcpStream::connect(SocketAddr::V4(addr))).await
}

/// `connect`, given up as timed out after `timeout`.
async fn connect_within(
    timeout: Duration,
    connect: impl std::future::Future<Output = std::io::Result<TcpStream>>,
) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// An IPv4 TCP socket in the calling thread's netns, ready for tokio.
fn nonblocking_tcp_socket() -> std::io::Result<socket2::Socket> {
    // Non-blocking from the start: one syscall instead of three.
    socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )
}
