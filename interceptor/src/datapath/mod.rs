//! The kernel side of interception as the agent sees it: load, attach, pin, and keep
//! the pod maps. Two implementations of [`Datapath`]: eBPF (the default) and the iptables
//! fallback for kernels that lack what eBPF mode needs.
pub mod bpffs;
pub mod cgroup;
pub mod client_addr;
pub mod ebpf;
pub mod iptables;
pub mod metrics;
pub mod node_probes;
pub mod probe;

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::inpod::PodNetns;

/// One pod's place in the data path: what the programs need to intercept it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDatapath {
    /// The pod netns's cookie ([`Datapath::netns_cookie`]).
    pub netns_cookie: u64,
    /// The pod's IPv4 address; redirects go to `<ip>:15001` and `<ip>:15003`.
    pub ipv4: Ipv4Addr,
    /// The pod's interface inside its netns (`CNI_IFNAME`), where tc attaches.
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("eBPF object failed to load: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {name} not found in the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} not found in the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bpffs {path}: {reason}")]
    Bpffs { path: String, reason: String },
    #[error("map {map} is full ({capacity} entries): pod not enrolled")]
    MapFull { map: &'static str, capacity: u32 },
    #[error("tc on {ifname} in the pod netns: {reason}")]
    Tc { ifname: String, reason: String },
    #[error("iptables: {what}: {reason}")]
    Iptables { what: String, reason: String },
    #[error("learning the pod netns's cookie: {0}")]
    NetnsProbe(String),
    #[error("the pod's return route for transparent inbound sockets: {0}")]
    PodRouting(String),
    #[error("a data path call did not complete: {0}")]
    Interrupted(String),
    #[error("{what} is not available in {mode} mode")]
    Unsupported {
        what: &'static str,
        mode: &'static str,
    },
}

/// Counters the programs keep, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct DatapathCounters {
    pub redirected: u64,
    pub flows_recorded: u64,
    pub orig_dst_answered: u64,
    pub record_failed: u64,
    pub same_node_inbound: u64,
    pub inbound_redirected: u64,
    /// New inbound flows refused (SYN dropped) because their record could not be stored.
    pub inbound_record_failed: u64,
    /// Half-open inbound records the agent removed after the timeout.
    pub inbound_half_open_expired: u64,
    /// Retired (IPv6 is intercepted now): stays 0 from this build on.
    pub ipv6_passed: u64,
    pub sockmap_added: u64,
    pub sockmap_redirected: u64,
    /// Local pairs sock_ops could not add to the SOCKHASH (not accelerated).
    pub sockmap_add_failed: u64,
    /// New inbound flows refused (SYN dropped) because the client's address and port
    /// already had a live flow to another port of the pod (both would be one connection
    /// on 15003 inside the pod).
    pub inbound_tuple_busy: u64,
    /// The IPv6 paths' counters (eBPF mode's `COUNTERS6`).
    pub ipv6: ebpf::Counters6,
}

/// Records the kernel holds right now, for the config dump and leak checks.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LiveRecords {
    /// Inbound flows tc steered to 15003 and not yet closed.
    pub inbound_flows: usize,
    /// Original destinations of established connections not yet closed.
    pub orig_dst_by_flow: usize,
    /// Enrolled network namespaces.
    pub enrolled_netns: usize,
}

/// What every interception mode offers the agent.
pub trait Datapath: Send + Sync {
    /// Short mode name for logs and `/config_dump` (`ebpf`, `iptables`).
    fn mode(&self) -> &'static str;
    /// Start intercepting a pod; `netns` runs what must happen inside the pod's netns.
    /// All-or-nothing: on error nothing of the pod is left in the data path.
    fn enroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError>;
    /// Whether this mode intercepts IPv6: eBPF mode does, iptables mode does where the
    /// ip6tables tools are installed. The agent refuses a pod with an IPv6 address in a
    /// mode that cannot intercept it, rather than let that traffic around the mesh.
    fn supports_ipv6(&self) -> bool {
        false
    }
    /// Intercept an enrolled dual-stack pod's IPv6 address too (after
    /// [`Datapath::enroll`], once its IPv6 listeners are up); [`Datapath::unenroll`]
    /// removes it with the rest. The default: not in this mode.
    fn enroll_ipv6(&self, pod: &PodDatapath, ip: Ipv6Addr) -> Result<(), DatapathError> {
        let _ = (pod, ip);
        Err(DatapathError::Unsupported {
            what: "IPv6 interception",
            mode: self.mode(),
        })
    }
    /// Stop intercepting a pod and forget its flows; unknown pods are not an error.
    fn unenroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError>;
    /// Stop intercepting a running pod that leaves the mesh, such that the connections it
    /// made through the proxy keep working until they close: new ones go direct. eBPF
    /// needs nothing more than [`Datapath::unenroll`] (the app's socket is connected to
    /// the proxy's listener). iptables keeps conntrack on in the pod until
    /// [`Datapath::drained`]: see `IptablesDatapath`.
    fn unenroll_running(
        &self,
        pod: &PodDatapath,
        netns: &Arc<PodNetns>,
    ) -> Result<(), DatapathError> {
        self.unenroll(pod, netns)
    }
    /// The connections a pod made through the proxy before it left the mesh have all
    /// closed: remove what [`Datapath::unenroll_running`] kept for them.
    fn drained(&self, _pod: &PodDatapath, _netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        Ok(())
    }
    /// A pod netns this agent does not enroll (after a restart): remove what an earlier
    /// agent left inside it. eBPF mode keeps nothing inside a pod's netns that outlives
    /// [`Datapath::retain_pods`], so the default does nothing.
    fn release_netns(&self, _path: &std::path::Path) -> Result<(), DatapathError> {
        Ok(())
    }
    /// The key this mode knows the pod's netns by: its cookie as the eBPF programs see it
    /// (`SO_NETNS_COOKIE`, or a fallback on kernels without it).
    fn netns_cookie(&self, netns: &PodNetns) -> Result<u64, DatapathError> {
        Ok(netns.cookie())
    }
    /// Remove inbound flow records that stayed half-open (never accepted by an inbound
    /// listener) for `older_than`; how many went. Modes without such records: none.
    fn expire_half_open(&self, _older_than: std::time::Duration) -> usize {
        0
    }
    /// Turn the programs' trace_pipe lines on or off.
    fn set_debug(&self, on: bool) -> Result<(), DatapathError>;
    /// The programs' counters; `None` in a mode without them.
    fn counters(&self) -> Option<DatapathCounters>;
    fn live_records(&self) -> LiveRecords;
    /// After a restart, once pods are adopted and the global config applied: remove every
    /// rule a previous agent left in reused maps that this agent has not written again (a
    /// rule removed while no agent ran must not survive). How many entries went.
    fn forget_unclaimed_rules(&self) -> usize {
        0
    }
    /// After a restart: forget pods (by netns cookie) a previous agent enrolled that were
    /// not adopted again.
    fn retain_pods(&self, netns_cookies: &HashSet<u64>);
    /// Replace the exclusion/inclusion rules of a scope: 0 for the global rules, a pod's
    /// netns cookie for its own (which add to the global ones).
    fn set_rules(&self, scope: u64, rules: &crate::config::MeshConfig)
        -> Result<(), DatapathError>;
    /// Remove everything the data path made (pins, pinned links): interception ends.
    fn teardown(&self) -> Result<(), DatapathError>;
    /// Whether the pod's netns has the return route of transparent inbound sockets for
    /// this family ([`client_addr`]), so its inbound proxy may dial the application from
    /// the client's address. The default: no.
    fn preserves_client_ip(&self, netns_cookie: u64, ipv6: bool) -> bool {
        let _ = (netns_cookie, ipv6);
        false
    }
    /// Before every pod is removed at once (`--on-exit remove`): remove what is
    /// node-wide and would otherwise be rewritten once per pod (the probe SNAT chain,
    /// one `iptables-restore` per pod: 1,000 pods took longer than a stop may). The
    /// default: nothing.
    fn remove_node_wide(&self) -> Result<(), DatapathError> {
        Ok(())
    }
    /// The node's probe SNAT (`/config_dump` `node_probes`); `None` when there is none.
    fn node_probes(&self) -> Option<node_probes::NodeProbesStatus> {
        None
    }
}
