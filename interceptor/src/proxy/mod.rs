//! The L4 proxy: in-pod listeners (outbound 15001, inbound 15003), original-destination recovery, routing to Service
//! endpoints, and the byte-forwarding loop.
pub mod forward;
pub mod listener;
pub mod orig_dst;
pub mod routes;

pub use listener::{ConnectionLog, ConnectionRecord, Direction};
pub use routes::{ConnectionSource, RouteStatus, RouteTable, Target};
