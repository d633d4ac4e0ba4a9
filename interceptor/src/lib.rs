//! interceptor: the node agent and L4 proxy of a sidecar-less eBPF service mesh data plane.
//!
//! Modules follow the domain: `datapath` (kernel programs and maps), `inpod` (work inside
//! pod network namespaces), `proxy` (listeners, original destination, routing,
//! forwarding), `cni` (the agent side of the plugin protocol), `source` and `model` (what
//! the cluster or the manifests say), `admin` (health, readiness, config dump), `daemon`
//! (start-up and shutdown of the agent; `daemonset`: update or uninstall), `gateway` (the TCP gateway process), `trace` and
//! `cleanup` (operator commands).
pub mod admin;
pub mod agent;
pub mod cleanup;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod daemonset;
pub mod datapath;
pub mod egress_gateway;
/// The bodies of the fuzz targets (fuzz/), shared with their stable regression test.
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod inpod;
pub mod model;
pub mod proxy;
pub mod source;
pub(crate) mod sync;
pub mod trace;
