//! The in-pod listeners: outbound (15001) and inbound (15003). Accept, recover the
//! original destination, pick the target, connect from inside the pod with the proxy
//! mark (which the programs skip), and forward.
use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex, RwLock};

use crate::sync::{lock, read};
use std::time::{Duration, SystemTime};

use interceptor_common::{INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::forward::{forward, reset_on_close, CopyMode, Forwarded};
use super::orig_dst::original_dst;
use super::routes::{ConnectionSource, RouteTable, Target};
use crate::inpod::{InpodError, PodNetns};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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

/// Recent connection records, bounded, and the metrics every record adds to.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    records: Mutex<VecDeque<ConnectionRecord>>,
    metrics: super::metrics::ProxyMetrics,
}

impl ConnectionLog {
    pub fn metrics(&self) -> &super::metrics::ProxyMetrics {
        &self.metrics
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

/// Open one of the pod's listeners inside its netns.
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

/// Everything a pod's accept loop shares with the agent.
#[derive(Clone)]
pub struct ListenerContext {
    pub pod: crate::model::PodKey,
    pub direction: Direction,
    pub netns: Arc<PodNetns>,
    pub routes: Arc<RwLock<Arc<RouteTable>>>,
    pub log: Arc<ConnectionLog>,
    /// With sockmap on, proxy-to-proxy sockets on this node are in the SOCKHASH.
    pub sockmap: bool,
}

/// Accept until the task is aborted; aborting also aborts every open connection of
/// this pod (they live in the JoinSet), so nothing keeps the pod's netns alive.
pub async fn serve(listener: TcpListener, ctx: ListenerContext) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
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
}

async fn handle(stream: TcpStream, client: SocketAddr, ctx: ListenerContext) {
    let mut record = ConnectionRecord {
        pod: ctx.pod.to_string(),
        direction: ctx.direction,
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
    };
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
    let table = read(&ctx.routes).clone();
    let target = match ctx.direction {
        Direction::Outbound => {
            let source = ConnectionSource {
                pod: Some(&ctx.pod),
                gateway: None,
            };
            table.resolve(original, source)
        }
        // Inbound traffic is for the application in this pod, on the port it was sent to,
        // if the traffic policy lets the client reach it.
        Direction::Inbound | Direction::Gateway => {
            let client = match record.client {
                SocketAddr::V4(client) => *client.ip(),
                SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            };
            match table.admit_inbound(client, &ctx.pod, original.port()) {
                Ok(()) => Target::Local { addr: original },
                Err(reason) => Target::Refused {
                    service: ctx.pod.to_string(),
                    route: "inbound".into(),
                    reason,
                },
            }
        }
    };
    record.target = Some(target.clone());
    let addr = match target {
        Target::Endpoint { addr, .. } | Target::Passthrough { addr } | Target::Local { addr } => {
            addr
        }
        Target::NoEndpoints {
            service, backend, ..
        } => {
            reset_on_close(&stream);
            return Err(format!(
                "service {service}: backend {backend} has no endpoints"
            ));
        }
        Target::Refused {
            service,
            route,
            reason,
        } => {
            reset_on_close(&stream);
            return Err(format!("service {service}: {route}: {reason}"));
        }
    };
    let upstream = match connect_from_pod(&ctx.netns, addr).await {
        Ok(upstream) => upstream,
        Err(error) => {
            reset_on_close(&stream);
            return Err(format!("connect {addr}: {error}"));
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Proxy-to-proxy connections between pods of this node are in the SOCKHASH when
    // sockmap is on, and their bytes arrive where splice(2) cannot read them.
    let peer = match ctx.direction {
        Direction::Outbound => *addr.ip(),
        Direction::Inbound | Direction::Gateway => match record.client {
            SocketAddr::V4(client) => *client.ip(),
            SocketAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        },
    };
    let mode = if ctx.sockmap && table.is_local_enrolled(&peer) {
        CopyMode::Userspace
    } else {
        CopyMode::Splice
    };
    record.copy_mode = mode;
    record.bytes = forward(stream, upstream, mode).await;
    Ok(())
}

/// Connect to `addr` with a socket created inside the pod's netns and carrying the
/// proxy mark, so the connect4 program lets it through untouched.
pub async fn connect_from_pod(netns: &PodNetns, addr: SocketAddrV4) -> std::io::Result<TcpStream> {
    let std_stream = netns
        .run(|| -> std::io::Result<std::net::TcpStream> {
            let socket = nonblocking_tcp_socket()?;
            socket.set_mark(PROXY_MARK)?;
            Ok(socket.into())
        })
        .await
        .map_err(std::io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std_stream);
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(SocketAddr::V4(addr)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

/// An IPv4 TCP socket in the calling thread's netns, ready for tokio.
fn nonblocking_tcp_socket() -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}
