//! The L4 proxy: in-pod listeners (outbound 15001, inbound 15003), original-destination
//! recovery, routing (Service endpoints and the L4 routing objects), the upstream
//! policies (circuit breaking, rate limits, balancing, health), the byte-forwarding loop,
//! and its metrics.
//!
//! Layers, each using only those before it: the leaves `routes` (model → table, pure;
//! runtime endpoint state comes in through `routes::EndpointHealth`), `forward` (bytes),
//! `orig_dst`, `sni` (the ClientHello peek of TLS passthrough) and `socket` (the
//! `SocketFactory`); then `connection` (records, outcomes,
//! typed errors), `upstream` (policies, endpoint state, the connect with one retry),
//! `metrics` (by error type), `log`, and `listener` at the top. The proxy never enters a
//! namespace: a pod's sockets come from `inpod::InPodSockets`.
pub mod connection;
pub mod forward;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod orig_dst;
pub mod routes;
pub mod sni;
pub mod socket;
pub mod socks5;
pub mod upstream;

pub use connection::{ConnectionRecord, Direction, Outcome, ProxyError};
pub use log::{AccessLog, ConnectionLog};
pub use routes::{ConnectionSource, GatewayTable, ListenerStatus, RouteStatus, RouteTable, Target};
pub use upstream::Upstreams;
