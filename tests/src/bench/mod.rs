//! The pieces of `tb-bench`: processes in pods ([`proc`]), the tools that measure
//! ([`measure`]), the HAProxy and ztunnel baselines ([`haproxy`], [`ztunnel`]) with what
//! they share ([`sidecar`]), the scenarios on each topology ([`scenario`]), the exclusion
//! scale check ([`scale`]), IPv6 beside IPv4 ([`ipv6`]), TLS passthrough and UDP through the
//! gateway ([`gateway_l4`]), the cost of the upstream policies ([`upstream`]), machine
//! facts ([`facts`]), idle CPUs held to polling for the run ([`cpu_idle`]) and the table
//! and result files ([`report`]).

pub mod cpu_idle;
pub mod facts;
pub mod gateway_l4;
pub mod haproxy;
pub mod ipv6;
pub mod measure;
pub mod proc;
pub mod report;
pub mod scale;
pub mod scale_pods;
pub mod scenario;
pub mod sidecar;
pub mod upstream;
pub mod ztunnel;
