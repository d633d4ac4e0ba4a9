//! The L4 proxy: in-pod listeners, original-destination recovery, routing to Service
//! endpoints, and the byte-forwarding loop.
pub mod forward;
pub mod orig_dst;
pub mod outbound;
pub mod routes;

pub use outbound::{ConnectionLog, ConnectionRecord};
pub use routes::{RouteTable, Target};
