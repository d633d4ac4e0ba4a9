//! The L4 proxy: in-pod listeners (outbound 15001, inbound 15003), original-destination
//! recovery, routing (Service endpoints and the L4 routing objects), the upstream
//! policies (circuit breaking, rate limits, balancing, health), the byte-forwarding loop,
//! and its metrics.
pub mod forward;
pub mod listener;
pub mod metrics;
pub mod orig_dst;
pub mod routes;
pub mod upstream;

pub use listener::{ConnectionLog, ConnectionRecord, Direction};
pub use routes::{ConnectionSource, GatewayTable, ListenerStatus, RouteStatus, RouteTable, Target};
pub use upstream::Upstreams;
