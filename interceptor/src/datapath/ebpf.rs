//! eBPF mode: the embedded Aya object, attached at a cgroup v2 path and pinned under the
//! agent's own bpffs directory; tc programs attached per pod inside its netns.
use std::collections::HashMap as StdHashMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::sync::lock;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{
    self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle,
};
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SchedClassifier, SkMsg, SockOps,
};
use aya::Ebpf;
use interceptor_common::{
    capacity, config, counters, counters6, inbound_state, maps, rules, CidrKey, CidrKey6,
    EnrolledPod, EnrolledPod6, FlowKey, FlowKey6, InboundFlow, InboundKey, InboundKey6, Ipv6,
    OrigDst, OrigDst6, PortRuleKey, RESERVED_PORTS,
};

use super::{Datapath, DatapathCounters, DatapathError, LiveRecords, PodDatapath};
use crate::inpod::PodNetns;

/// The object built from `interceptor-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// The embedded eBPF object (empty when built with `AYA_BUILD_SKIP`), for audits.
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

pub const PROG_CONNECT4: &str = "intercept_connect4";
pub const PROG_SOCK_OPS: &str = "intercept_sock_ops";
pub const PROG_GETSOCKOPT: &str = "intercept_getsockopt";
pub const PROG_GETPEERNAME4: &str = "intercept_getpeername4";
pub const PROG_CONNECT6: &str = "intercept_connect6";
pub const PROG_GETPEERNAME6: &str = "intercept_getpeername6";
pub const PROG_TC_INGRESS: &str = "intercept_tc_ingress";
pub const PROG_TC_EGRESS: &str = "intercept_tc_egress";
pub const PROG_SK_MSG: &str = "intercept_sk_msg";

/// Every map, pinned by these names.
const MAP_NAMES: [&str; 21] = [
    maps::ENROLLED_NETNS,
    maps::POD_BY_IP,
    maps::ORIG_DST_BY_COOKIE,
    maps::ORIG_DST_BY_FLOW,
    maps::INBOUND_FLOWS,
    maps::PORT_EXCLUSIONS,
    maps::OUT_EXCLUDED_CIDRS,
    maps::OUT_INCLUDED_CIDRS,
    maps::SCOPE_FLAGS,
    maps::SOCK_PAIRS,
    maps::SETTINGS,
    maps::COUNTERS,
    maps::NETNS_PROBE,
    maps::ENROLLED_NETNS6,
    maps::POD_BY_IP6,
    maps::ORIG_DST6_BY_COOKIE,
    maps::ORIG_DST6_BY_FLOW,
    maps::INBOUND_FLOWS6,
    maps::OUT_EXCLUDED_CIDRS6,
    maps::OUT_INCLUDED_CIDRS6,
    maps::COUNTERS6,
];

/// Prefix of pinned links: cgroup links by program name, tc links by netns cookie.
pub const LINK_PREFIX: &str = "link_";
/// Prefix of a pod's pinned tc links (`link_tc_<netns cookie>_ingress|egress`).
pub const TC_LINK_PREFIX: &str = "link_tc_";
/// Whether `name` is a pin this agent makes (cleanup removes these and no other).
pub fn is_our_pin(name: &str) -> bool {
    PROGRAM_PINS.contains(&name)
        || MAP_NAMES.contains(&name)
        || name
            .strip_prefix(LINK_PREFIX)
            .is_some_and(|rest| PROGRAM_PINS.contains(&rest) || rest.starts_with("tc_"))
}

/// Every program the agent pins in its bpffs directory.
pub const PROGRAM_PINS: [&str; 9] = [
    PROG_CONNECT4,
    PROG_GETPEERNAME4,
    PROG_CONNECT6,
    PROG_GETPEERNAME6,
    PROG_SOCK_OPS,
    PROG_GETSOCKOPT,
    PROG_TC_INGRESS,
    PROG_TC_EGRESS,
    PROG_SK_MSG,
];

/// Load, attach at the cgroup, and pin one program; with `pin_link`, also take its
/// link and pin it (replacing the link a previous agent pinned, after the new one is
/// attached, so there is no moment without interception). A macro because aya's
/// program types share `load`/`attach`/`take_link` by name, not through a trait.
macro_rules! attach_cgroup_program {
    ($ebpf:expr, $kind:ty, $name:expr, $cgroup:expr, $pin_dir:expr) => {{
        let name: &'static str = $name;
        let err = |source| DatapathError::Program { name, source };
        let prog: &mut $kind = program(&mut $ebpf, name)?;
        prog.load().map_err(err)?;
        let link_id = prog.attach($cgroup, attach_mode()).map_err(err)?;
        replace_pin($pin_dir, name, |path| prog.pin(path))?;
        (prog, link_id)
    }};
    ($ebpf:expr, $kind:ty, $name:expr, $cgroup:expr, $pin_dir:expr, pin link into $links:expr) => {{
        let name: &'static str = $name;
        let (prog, link_id) = attach_cgroup_program!($ebpf, $kind, name, $cgroup, $pin_dir);
        let link = prog
            .take_link(link_id)
            .map_err(|source| DatapathError::Program { name, source })?;
        match FdLink::try_from(link) {
            Ok(link) => {
                let link_name = format!("{LINK_PREFIX}{name}");
                $links.push(pin_link($pin_dir, &link_name, link)?);
            }
            // Kernels before 5.7 attach without bpf_link: nothing to pin.
            Err(error) => tracing::debug!(%error, name, "link not pinnable"),
        }
    }};
}

/// Where netlink (kernels before TCX) attaches the tc programs: a fixed priority and
/// handle, so a restarted agent replaces its predecessor's filter instead of adding one,
/// and DEL or cleanup removes exactly ours.
pub const TC_NETLINK_PRIORITY: u16 = 0x1500;
pub const TC_NETLINK_HANDLE: TcHandle = TcHandle::new(0x1500, 1);

/// Which optional kernel features the data path may use (the probe's answer); each one
/// missing selects its fallback (see `probe::Optional`).
#[derive(Clone, Copy, Debug)]
pub struct KernelSupport {
    /// TCX links for tc (6.6); else netlink clsact + cls_bpf.
    pub tcx: bool,
    /// The getpeername4 attach type (5.8); else not attached.
    pub getpeername: bool,
    /// `SO_NETNS_COOKIE` (5.14); else the netns probe through connect4.
    pub so_netns_cookie: bool,
    /// `%pI4` in trace lines (5.13); else addresses as hex.
    pub printk_ip: bool,
}

impl KernelSupport {
    pub fn from_probe(probe: &super::probe::Probe) -> Self {
        use super::probe::Optional;
        Self {
            tcx: probe.has(Optional::Tcx),
            getpeername: probe.has(Optional::Getpeername),
            so_netns_cookie: probe.has(Optional::SoNetnsCookie),
            printk_ip: probe.has(Optional::PrintkIp),
        }
    }
}

/// How the tc programs attach to a pod's interface (`--tc-attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// clsact qdisc + cls_bpf filter, every kernel. The pod's netns is the agent's alone,
    /// so TCX's multi-program ordering buys nothing there.
    #[default]
    Netlink,
    /// TCX links where the kernel has them (6.6), netlink below. Each TCX attach waits
    /// for an RCU grace period under the rtnl lock (about 15 ms per direction here):
    /// 30 ms more per CNI ADD, with every rtnl user of the node waiting too.
    Tcx,
}

impl TcAttach {
    /// The kernel's features as this choice uses them: `netlink` turns TCX off.
    pub fn apply(self, mut support: KernelSupport) -> KernelSupport {
        if self == TcAttach::Netlink && support.tcx {
            tracing::info!(
                "tc programs attach with netlink (--tc-attach netlink, the default; \
                 --tc-attach tcx for bpf_link)"
            );
            support.tcx = false;
        }
        support
    }
}

/// Options of the eBPF data path.
#[derive(Clone, Copy, Debug)]
pub struct EbpfOptions {
    /// `bpf_printk` lines on.
    pub debug: bool,
    /// Local connection pairs short-circuited by sk_msg.
    pub sockmap: bool,
    /// Size of INBOUND_FLOWS and INBOUND_FLOWS6 (default [`capacity::INBOUND_FLOWS`]).
    pub inbound_flow_capacity: Option<u32>,
    /// Size of ORIG_DST_BY_FLOW and ORIG_DST6_BY_FLOW (default
    /// [`capacity::ORIG_DST_BY_FLOW`]).
    pub outbound_flow_capacity: Option<u32>,
    /// Optional kernel features present; the missing ones' fallbacks are used.
    pub support: KernelSupport,
}

/// The maps the agent writes, behind one lock so enrollment is a single critical section.
struct Maps {
    port_exclusions: HashMap<MapData, PortRuleKey, u8>,
    out_excluded: LpmTrie<MapData, CidrKey, u8>,
    out_included: LpmTrie<MapData, CidrKey, u8>,
    scope_flags: HashMap<MapData, u64, u32>,
    /// What `set_rules` wrote per scope, so a change removes exactly
    /// the old entries.
    rule_keys: StdHashMap<u64, ScopeRules>,
    /// Rule entries found in reused maps at start that no `set_rules` of this agent has
    /// written again yet; [`Datapath::forget_unclaimed_rules`] removes what is left.
    unclaimed: Option<Unclaimed>,
    enrolled: HashMap<MapData, u64, EnrolledPod>,
    pod_by_ip: HashMap<MapData, u32, u64>,
    orig_dst_by_flow: HashMap<MapData, FlowKey, OrigDst>,
    inbound_flows: HashMap<MapData, InboundKey, InboundFlow>,
    settings: Array<MapData, u32>,
    /// The IPv6 maps, beside the IPv4 ones.
    v6: Maps6,
}

/// The IPv6 maps the agent writes (the pods' IPv6 addresses and the IPv6 ranges).
struct Maps6 {
    enrolled: HashMap<MapData, u64, EnrolledPod6>,
    pod_by_ip: HashMap<MapData, Ipv6, u64>,
    orig_dst_by_flow: HashMap<MapData, FlowKey6, OrigDst6>,
    inbound_flows: HashMap<MapData, InboundKey6, InboundFlow>,
    out_excluded: LpmTrie<MapData, CidrKey6, u8>,
    out_included: LpmTrie<MapData, CidrKey6, u8>,
    /// What `set_rules6` wrote per scope.
    rule_keys: StdHashMap<u64, Rules6>,
    /// IPv6 ranges found in reused maps at start, not written again yet.
    unclaimed: Option<Rules6>,
}

/// The kernel entries of one scope's IPv6 ranges.
#[derive(Clone, Default)]
struct Rules6 {
    excluded: Vec<Key<CidrKey6>>,
    included: Vec<Key<CidrKey6>>,
}

fn same_cidr6(a: &Key<CidrKey6>, b: &Key<CidrKey6>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

fn cidr6_key(scope: u64, net: &ipnet::Ipv6Net) -> Key<CidrKey6> {
    Key::new(
        CidrKey6::SCOPE_BITS + u32::from(net.prefix_len()),
        CidrKey6::new(scope, net.network().octets()),
    )
}

/// An IPv6 address as the programs compare it (four words of network-order bytes).
pub fn ip6_key(ip: Ipv6Addr) -> Ipv6 {
    let o = ip.octets();
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(o.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

/// The IPv6 counters ([`counters6`]), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters6 {
    pub redirected: u64,
    pub flows_recorded: u64,
    pub orig_dst_answered: u64,
    pub record_failed: u64,
    pub same_node_inbound: u64,
    pub inbound_redirected: u64,
    pub inbound_record_failed: u64,
    pub inbound_tuple_busy: u64,
    pub unparsed_passed: u64,
    pub v4_mapped_redirected: u64,
}

/// IPv6 records the kernel holds right now (the twin of [`LiveRecords`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LiveRecords6 {
    pub inbound_flows: usize,
    pub orig_dst_by_flow: usize,
    pub enrolled_netns: usize,
}

/// Programs loaded and attached; dropping it detaches them (the links are owned here).
pub struct EbpfDatapath {
    /// Shared with netns threads, which attach the tc programs inside pods.
    ebpf: Arc<Mutex<Ebpf>>,
    maps: Mutex<Maps>,
    counters: PerCpuArray<MapData, u64>,
    counters6: PerCpuArray<MapData, u64>,
    /// Half-open IPv6 inbound records and when a sweep first saw them.
    half_open_seen6: Mutex<StdHashMap<InboundKey6, std::time::Instant>>,
    /// Held so the sk_msg attachment's map outlives every socket in it.
    _sock_pairs: SockHash<MapData, FlowKey>,
    /// tc attachments per pod (netns cookie), with the netns they live in (netlink
    /// filters are detached from inside it).
    tc_links: Mutex<StdHashMap<u64, PodTc>>,
    /// Answers to the netns probe (used when the kernel lacks `SO_NETNS_COOKIE`).
    netns_probe: HashMap<MapData, u64, u64>,
    /// Half-open inbound records and when a sweep first saw them (see
    /// [`Datapath::expire_half_open`]).
    half_open_seen: Mutex<StdHashMap<InboundKey, std::time::Instant>>,
    /// Half-open records removed so far.
    half_open_expired: std::sync::atomic::AtomicU64,
    /// The cgroup links pinned in the pin dir (they outlive the agent).
    pinned_links: Mutex<Vec<PinnedLink>>,
    options: Mutex<EbpfOptions>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
}

fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

impl EbpfDatapath {
    /// Load the programs, attach the cgroup ones at `cgroup`, and pin programs and maps
    /// in `pin_dir` (which must not be in use by another agent). All or nothing: when any
    /// step fails (a kernel that probed fine but refuses an attach type), every pin is
    /// removed again, which detaches what was attached, and the error says which step.
    pub fn attach(
        cgroup: &Path,
        pin_dir: &Path,
        options: EbpfOptions,
    ) -> Result<Self, DatapathError> {
        let attached = Self::attach_all(cgroup, pin_dir, options);
        if attached.is_err() && !EBPF_OBJECT.is_empty() {
            if let Err(error) = super::bpffs::remove_pin_dir(pin_dir, &is_our_pin) {
                tracing::error!(%error, pin_dir = %pin_dir.display(),
                    "removing the pins of a failed attach");
            }
        }
        attached
    }

    fn attach_all(
        cgroup: &Path,
        pin_dir: &Path,
        options: EbpfOptions,
    ) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::Bpffs {
                path: pin_dir.display().to_string(),
                reason: "this binary was built with AYA_BUILD_SKIP: it carries no eBPF object"
                    .into(),
            });
        }
        super::bpffs::ensure_pin_dir(pin_dir)?;
        let cgroup_err = |source| DatapathError::Cgroup {
            path: cgroup.display().to_string(),
            source,
        };
        if !super::cgroup::is_cgroup2(cgroup) {
            return Err(cgroup_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a cgroup v2 directory",
            )));
        }
        let cgroup_file = File::open(cgroup).map_err(cgroup_err)?;
        let capacity_of = |name: &str| match name {
            // One size per role, for both families.
            maps::INBOUND_FLOWS | maps::INBOUND_FLOWS6 => options.inbound_flow_capacity,
            maps::ORIG_DST_BY_FLOW | maps::ORIG_DST6_BY_FLOW => options.outbound_flow_capacity,
            _ => None,
        };
        // Maps pinned by a previous agent are reused when their layout matches, so enrolled
        // pods and live flows carry over a restart; anything else starts from scratch.
        if let Err(why) = pinned_maps_reusable(pin_dir, &capacity_of) {
            tracing::warn!(pin_dir = %pin_dir.display(), %why,
                "pinned maps of another layout (another build, or pins from before a kernel \
                 or agent change): refused, starting with new maps");
            super::bpffs::remove_pin_dir(pin_dir, &is_our_pin).map_err(|e| {
                DatapathError::Bpffs {
                    path: pin_dir.display().to_string(),
                    reason: format!("removing incompatible pins: {e}"),
                }
            })?;
            super::bpffs::ensure_pin_dir(pin_dir)?;
        }
        let mut loader = aya::EbpfLoader::new();
        for name in [
            maps::INBOUND_FLOWS,
            maps::ORIG_DST_BY_FLOW,
            maps::INBOUND_FLOWS6,
            maps::ORIG_DST6_BY_FLOW,
        ] {
            if let Some(capacity) = capacity_of(name) {
                loader.map_max_entries(name, capacity);
            }
        }
        let map_paths: Vec<(&str, PathBuf)> =
            MAP_NAMES.iter().map(|n| (*n, pin_dir.join(n))).collect();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Load)?;
        let mut links = Vec::new();

        // connect4, getpeername4 and sock_ops links are pinned, so they outlive the agent:
        // while it is away, enrolled pods' connects still go to 15001, where nobody
        // listens, and fail closed. (aya 0.14 cannot turn a getsockopt link into a
        // pinnable one; it is only needed while the proxy runs anyway.)
        attach_cgroup_program!(ebpf, CgroupSockAddr, PROG_CONNECT4, &cgroup_file, pin_dir, pin link into links);
        attach_cgroup_program!(ebpf, CgroupSockAddr, PROG_CONNECT6, &cgroup_file, pin_dir, pin link into links);
        attach_cgroup_program!(ebpf, SockOps, PROG_SOCK_OPS, &cgroup_file, pin_dir, pin link into links);
        if options.support.getpeername {
            attach_cgroup_program!(ebpf, CgroupSockAddr, PROG_GETPEERNAME4, &cgroup_file, pin_dir, pin link into links);
            // getpeername6 came with getpeername4 (5.8): one probe answers for both.
            attach_cgroup_program!(ebpf, CgroupSockAddr, PROG_GETPEERNAME6, &cgroup_file, pin_dir, pin link into links);
        } else {
            // A previous agent's link (before a reboot into an older kernel cannot leave
            // one, but a downgrade of this flag can) would keep answering with stale maps.
            for name in [PROG_GETPEERNAME4, PROG_GETPEERNAME6] {
                let _ = std::fs::remove_file(pin_dir.join(format!("{LINK_PREFIX}{name}")));
            }
            tracing::info!(
                "getpeername4 not attached: {}",
                super::probe::GETPEERNAME_FALLBACK
            );
        }
        let _ = attach_cgroup_program!(ebpf, CgroupSockopt, PROG_GETSOCKOPT, &cgroup_file, pin_dir);
        for name in [PROG_TC_INGRESS, PROG_TC_EGRESS] {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| DatapathError::Program { name, source })?;
            replace_pin(pin_dir, name, |path| prog.pin(path))?;
        }
        let sock_pairs: SockHash<MapData, FlowKey> = typed(&mut ebpf, maps::SOCK_PAIRS)?;
        {
            let prog: &mut SkMsg = program(&mut ebpf, PROG_SK_MSG)?;
            let err = |source| DatapathError::Program {
                name: PROG_SK_MSG,
                source,
            };
            prog.load().map_err(err)?;
            // Attached to the map whether or not sockmap is on: with the flag off,
            // sock_ops adds no socket and sk_msg never runs. On a reused map this
            // replaces the previous agent's program.
            prog.attach(sock_pairs.fd()).map_err(err)?;
            replace_pin(pin_dir, PROG_SK_MSG, |path| prog.pin(path))?;
        }

        let mut port_exclusions: HashMap<MapData, PortRuleKey, u8> =
            typed(&mut ebpf, maps::PORT_EXCLUSIONS)?;
        let out_excluded: LpmTrie<MapData, CidrKey, u8> =
            typed(&mut ebpf, maps::OUT_EXCLUDED_CIDRS)?;
        let out_included: LpmTrie<MapData, CidrKey, u8> =
            typed(&mut ebpf, maps::OUT_INCLUDED_CIDRS)?;
        let scope_flags: HashMap<MapData, u64, u32> = typed(&mut ebpf, maps::SCOPE_FLAGS)?;
        for port in RESERVED_PORTS {
            let key = PortRuleKey::new(rules::GLOBAL_SCOPE, port, rules::DIRECTION_INBOUND);
            port_exclusions
                .insert(key, 1, 0)
                .map_err(|source| DatapathError::Map {
                    name: maps::PORT_EXCLUSIONS,
                    source,
                })?;
        }
        let unclaimed = Unclaimed {
            rules: ScopeRules {
                ports: port_exclusions.keys().filter_map(Result::ok).collect(),
                excluded: out_excluded.keys().filter_map(Result::ok).collect(),
                included: out_included.keys().filter_map(Result::ok).collect(),
            },
            flag_scopes: scope_flags.keys().filter_map(Result::ok).collect(),
        };
        let out_excluded6: LpmTrie<MapData, CidrKey6, u8> =
            typed(&mut ebpf, maps::OUT_EXCLUDED_CIDRS6)?;
        let out_included6: LpmTrie<MapData, CidrKey6, u8> =
            typed(&mut ebpf, maps::OUT_INCLUDED_CIDRS6)?;
        let unclaimed6 = Rules6 {
            excluded: out_excluded6.keys().filter_map(Result::ok).collect(),
            included: out_included6.keys().filter_map(Result::ok).collect(),
        };
        let v6 = Maps6 {
            enrolled: typed(&mut ebpf, maps::ENROLLED_NETNS6)?,
            pod_by_ip: typed(&mut ebpf, maps::POD_BY_IP6)?,
            orig_dst_by_flow: typed(&mut ebpf, maps::ORIG_DST6_BY_FLOW)?,
            inbound_flows: typed(&mut ebpf, maps::INBOUND_FLOWS6)?,
            out_excluded: out_excluded6,
            out_included: out_included6,
            rule_keys: StdHashMap::new(),
            unclaimed: Some(unclaimed6),
        };
        let maps = Maps {
            port_exclusions,
            out_excluded,
            out_included,
            scope_flags,
            rule_keys: StdHashMap::new(),
            unclaimed: Some(unclaimed),
            enrolled: typed(&mut ebpf, maps::ENROLLED_NETNS)?,
            pod_by_ip: typed(&mut ebpf, maps::POD_BY_IP)?,
            orig_dst_by_flow: typed(&mut ebpf, maps::ORIG_DST_BY_FLOW)?,
            inbound_flows: typed(&mut ebpf, maps::INBOUND_FLOWS)?,
            settings: typed(&mut ebpf, maps::SETTINGS)?,
            v6,
        };
        let counters = typed(&mut ebpf, maps::COUNTERS)?;
        let counters6 = typed(&mut ebpf, maps::COUNTERS6)?;
        let netns_probe = typed(&mut ebpf, maps::NETNS_PROBE)?;
        let datapath = Self {
            ebpf: Arc::new(Mutex::new(ebpf)),
            maps: Mutex::new(maps),
            counters,
            counters6,
            half_open_seen6: Mutex::new(StdHashMap::new()),
            _sock_pairs: sock_pairs,
            tc_links: Mutex::new(StdHashMap::new()),
            netns_probe,
            half_open_seen: Mutex::new(StdHashMap::new()),
            half_open_expired: Default::default(),
            pinned_links: Mutex::new(links),
            options: Mutex::new(options),
            pin_dir: pin_dir.to_path_buf(),
            cgroup: cgroup.to_path_buf(),
        };
        datapath.write_flags()?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Give an enrolled pod (`netns_cookie`, already written by [`Datapath::enroll`] for a
    /// dual-stack pod, or alone for an IPv6-only one) its IPv6 address: connect6 then
    /// redirects its native IPv6 connects to `[ip]:15001`, tc steers IPv6 SYNs to `ip`
    /// onto 15003, and the proxy's connects to `ip` go to `[ip]:15003`. A pod without
    /// this call has its IPv6 left alone. The address must be one a peer can reach
    /// (not loopback, link-local, unspecified, multicast or IPv4-mapped). Idempotent;
    /// [`Datapath::unenroll`] removes it with the rest of the pod.
    pub fn enroll_ipv6(&self, netns_cookie: u64, ip: Ipv6Addr) -> Result<(), DatapathError> {
        let usable = !(ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_unicast_link_local()
            || ip.to_ipv4_mapped().is_some());
        if !usable {
            return Err(DatapathError::Unsupported {
                what: "a loopback, link-local, unspecified, multicast or IPv4-mapped pod \
                       IPv6 address",
                mode: "ebpf",
            });
        }
        let key = ip6_key(ip);
        let mut maps = lock(&self.maps);
        let v6 = &mut maps.v6;
        v6.pod_by_ip
            .insert(key, netns_cookie, 0)
            .map_err(map_full_or(maps::POD_BY_IP6, capacity::POD_BY_IP6))?;
        let value = EnrolledPod6 {
            ipv6: key,
            flags: 0,
        };
        if let Err(error) = v6.enrolled.insert(netns_cookie, value, 0) {
            let _ = v6.pod_by_ip.remove(&key);
            return Err(map_full_or(
                maps::ENROLLED_NETNS6,
                capacity::ENROLLED_NETNS6,
            )(error));
        }
        Ok(())
    }

    /// Enroll a pod that has an IPv6 address and no IPv4 one: tc attached to `ifname`
    /// in its netns (as [`Datapath::enroll`] does) and the IPv6 entries written; nothing
    /// goes in the IPv4 maps, so its IPv4 (if any appears) is left alone. Undone by
    /// [`Datapath::unenroll`] with `ipv4: Ipv4Addr::UNSPECIFIED` (no IPv4 entry of another
    /// pod is touched: entries are removed only when they name this netns).
    pub fn enroll_ipv6_only(
        &self,
        netns_cookie: u64,
        ip: Ipv6Addr,
        ifname: &str,
        netns: &Arc<PodNetns>,
    ) -> Result<(), DatapathError> {
        self.enroll_ipv6(netns_cookie, ip)?;
        match self.attach_tc(netns, ifname, netns_cookie) {
            Ok(links) => {
                lock(&self.tc_links).insert(netns_cookie, (Arc::clone(netns), links));
                Ok(())
            }
            Err(error) => {
                self.unenroll_ipv6(netns_cookie);
                Err(error)
            }
        }
    }

    /// Take a pod's IPv6 address away (its IPv4 stays enrolled): its IPv6 connects and
    /// inbound IPv6 flows are left alone from now on, and its IPv6 flow records go.
    pub fn unenroll_ipv6(&self, netns_cookie: u64) {
        let mut maps = lock(&self.maps);
        Self::forget_pod6(&mut maps.v6, netns_cookie);
    }

    /// The IPv6 address [`EbpfDatapath::enroll_ipv6`] gave the pod, if any.
    pub fn pod_ipv6(&self, netns_cookie: u64) -> Option<Ipv6Addr> {
        let maps = lock(&self.maps);
        let pod = maps.v6.enrolled.get(&netns_cookie, 0).ok()?;
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(pod.ipv6) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Some(Ipv6Addr::from(octets))
    }

    fn forget_pod6(v6: &mut Maps6, netns_cookie: u64) {
        let Ok(pod) = v6.enrolled.get(&netns_cookie, 0) else {
            return;
        };
        let _ = v6.enrolled.remove(&netns_cookie);
        // Another pod may have taken the address since; only remove our own entry.
        if v6.pod_by_ip.get(&pod.ipv6, 0).ok() == Some(netns_cookie) {
            let _ = v6.pod_by_ip.remove(&pod.ipv6);
        }
        Self::sweep_flows6(v6, pod.ipv6);
    }

    /// Forget every IPv6 flow record that involves `ip`.
    fn sweep_flows6(v6: &mut Maps6, ip: Ipv6) {
        remove_keys_where(&mut v6.inbound_flows, |k| {
            k.pod_ipv6 == ip || k.client_ipv6 == ip
        });
        remove_keys_where(&mut v6.orig_dst_by_flow, |k| {
            k.src_ipv6 == ip || k.dst_ipv6 == ip
        });
    }

    /// Replace the IPv6 outbound ranges of `scope` (0 global, else a pod's netns cookie),
    /// the IPv6 half of [`Datapath::set_rules`] (whose `MeshConfig` lists are IPv4): new
    /// entries in before old ones out. Ports are family-blind and stay with `set_rules`,
    /// as does the scope's has-an-inclusion-list flag, which covers both families: when
    /// it is set, an IPv6 destination is intercepted only if `included` (or the global
    /// scope's) holds it, so an inclusion list of IPv4 ranges alone intercepts no IPv6.
    pub fn set_rules6(
        &self,
        scope: u64,
        excluded: &[ipnet::Ipv6Net],
        included: &[ipnet::Ipv6Net],
    ) -> Result<(), DatapathError> {
        let new = Rules6 {
            excluded: excluded.iter().map(|n| cidr6_key(scope, n)).collect(),
            included: included.iter().map(|n| cidr6_key(scope, n)).collect(),
        };
        let mut maps = lock(&self.maps);
        let v6 = &mut maps.v6;
        let map_err = |name: &'static str| move |source| DatapathError::Map { name, source };
        for key in &new.excluded {
            v6.out_excluded
                .insert(key, 1, 0)
                .map_err(map_err(maps::OUT_EXCLUDED_CIDRS6))?;
        }
        for key in &new.included {
            v6.out_included
                .insert(key, 1, 0)
                .map_err(map_err(maps::OUT_INCLUDED_CIDRS6))?;
        }
        if let Some(unclaimed) = v6.unclaimed.as_mut() {
            unclaimed
                .excluded
                .retain(|k| !new.excluded.iter().any(|n| same_cidr6(n, k)));
            unclaimed
                .included
                .retain(|k| !new.included.iter().any(|n| same_cidr6(n, k)));
        }
        let old = v6.rule_keys.insert(scope, new.clone()).unwrap_or_default();
        for key in old
            .excluded
            .iter()
            .filter(|k| !new.excluded.iter().any(|n| same_cidr6(n, k)))
        {
            let _ = v6.out_excluded.remove(key);
        }
        for key in old
            .included
            .iter()
            .filter(|k| !new.included.iter().any(|n| same_cidr6(n, k)))
        {
            let _ = v6.out_included.remove(key);
        }
        Ok(())
    }

    /// The IPv6 counters (also exported through [`Datapath::counters`]).
    pub fn counters6(&self) -> Counters6 {
        let sum = |index: u32| -> u64 {
            self.counters6
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        Counters6 {
            redirected: sum(counters6::REDIRECTED),
            flows_recorded: sum(counters6::FLOWS_RECORDED),
            orig_dst_answered: sum(counters6::ORIG_DST_ANSWERED),
            record_failed: sum(counters6::RECORD_FAILED),
            same_node_inbound: sum(counters6::SAME_NODE_INBOUND),
            inbound_redirected: sum(counters6::INBOUND_REDIRECTED),
            inbound_record_failed: sum(counters6::INBOUND_RECORD_FAILED),
            inbound_tuple_busy: sum(counters6::INBOUND_TUPLE_BUSY),
            unparsed_passed: sum(counters6::UNPARSED_PASSED),
            v4_mapped_redirected: sum(counters6::V4_MAPPED_REDIRECTED),
        }
    }

    /// IPv6 records held right now, for the config dump and leak checks.
    pub fn live_records6(&self) -> LiveRecords6 {
        let maps = lock(&self.maps);
        LiveRecords6 {
            inbound_flows: maps.v6.inbound_flows.keys().filter(Result::is_ok).count(),
            orig_dst_by_flow: maps
                .v6
                .orig_dst_by_flow
                .keys()
                .filter(Result::is_ok)
                .count(),
            enrolled_netns: maps.v6.enrolled.keys().filter(Result::is_ok).count(),
        }
    }

    /// [`Datapath::expire_half_open`] for the IPv6 records: how many went.
    fn expire_half_open6(&self, maps: &mut Maps, older_than: std::time::Duration) -> usize {
        let now = std::time::Instant::now();
        let half_open: std::collections::HashSet<InboundKey6> = maps
            .v6
            .inbound_flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flow)| flow.state == inbound_state::HALF_OPEN)
            .map(|(key, _)| key)
            .collect();
        let mut seen = lock(&self.half_open_seen6);
        seen.retain(|key, _| half_open.contains(key));
        let mut expired = 0;
        for key in half_open {
            let first = *seen.entry(key).or_insert(now);
            if now.duration_since(first) < older_than {
                continue;
            }
            let still = maps
                .v6
                .inbound_flows
                .get(&key, 0)
                .is_ok_and(|flow| flow.state == inbound_state::HALF_OPEN);
            if still && maps.v6.inbound_flows.remove(&key).is_ok() {
                expired += 1;
            }
            seen.remove(&key);
        }
        expired
    }

    fn write_flags(&self) -> Result<(), DatapathError> {
        let options = *lock(&self.options);
        let mut flags = 0;
        if options.debug {
            flags |= config::FLAG_DEBUG;
        }
        if options.sockmap {
            flags |= config::FLAG_SOCKMAP;
        }
        if options.support.printk_ip {
            flags |= config::FLAG_PRINTK_IP;
        }
        lock(&self.maps)
            .settings
            .set(config::FLAGS_INDEX, flags, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::SETTINGS,
                source,
            })
    }

    /// Attach both tc programs to `ifname` inside the pod's netns. With TCX (kernel ≥ 6.6)
    /// their links are pinned as `link_tc_<cookie>_{ingress,egress}`, replacing the links
    /// a previous agent pinned for the same netns; below, they are cls_bpf filters on the
    /// clsact qdisc at [`TC_NETLINK_PRIORITY`]/[`TC_NETLINK_HANDLE`], replacing a previous
    /// agent's filter there. Either way they outlive the agent.
    fn attach_tc(
        &self,
        netns: &PodNetns,
        ifname: &str,
        cookie: u64,
    ) -> Result<Vec<TcAttachment>, DatapathError> {
        let ebpf = Arc::clone(&self.ebpf);
        let iface = ifname.to_string();
        let pin_dir = self.pin_dir.clone();
        let tcx = lock(&self.options).support.tcx;
        let attached = netns
            .run_blocking(move || -> Result<Vec<TcAttachment>, String> {
                if !tcx {
                    // Netlink filters hang off the clsact qdisc; an existing one is fine.
                    match tc::qdisc_add_clsact(&iface) {
                        Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                        // aya 0.14 reports an existing qdisc as a plain EEXIST.
                        Err(error) if netlink_exists(&error) => {}
                        Err(error) => return Err(format!("adding the clsact qdisc: {error}")),
                    }
                }
                let mut ebpf = lock(&ebpf);
                let mut attachments = Vec::new();
                for (name, kind, side) in [
                    (PROG_TC_INGRESS, TcAttachType::Ingress, "ingress"),
                    (PROG_TC_EGRESS, TcAttachType::Egress, "egress"),
                ] {
                    let pin_name = format!("{TC_LINK_PREFIX}{cookie}_{side}");
                    // What a previous agent attached the other way (a kernel upgrade or a
                    // changed probe) goes once the new attachment is in, so the program
                    // never runs twice on a packet and there is no moment without it.
                    let attached = if tcx {
                        attach_one_tcx(&mut ebpf, name, &iface, kind).and_then(|link| {
                            let pinned = pin_link(&pin_dir, &pin_name, link)
                                .map(TcAttachment::Pinned)
                                .map_err(|e| e.to_string());
                            if pinned.is_ok() {
                                remove_netlink_filter(&iface, kind);
                            }
                            pinned
                        })
                    } else {
                        let attached = attach_one_netlink(&mut ebpf, name, &iface, kind);
                        if attached.is_ok() {
                            let _ = std::fs::remove_file(pin_dir.join(&pin_name));
                        }
                        attached
                    };
                    match attached {
                        Ok(attachment) => attachments.push(attachment),
                        Err(error) => {
                            for attachment in attachments {
                                attachment.detach();
                            }
                            return Err(error);
                        }
                    }
                }
                Ok(attachments)
            })
            .map_err(|e| DatapathError::Tc {
                ifname: ifname.into(),
                reason: e.to_string(),
            })?;
        attached.map_err(|reason| DatapathError::Tc {
            ifname: ifname.into(),
            reason,
        })
    }

    fn detach_tc(&self, netns: &PodNetns, cookie: u64) {
        let Some((_, attachments)) = lock(&self.tc_links).remove(&cookie) else {
            return;
        };
        // Run in the pod's netns, where a netlink-attached filter would be addressed.
        let _ = netns.run_blocking(move || {
            for attachment in attachments {
                attachment.detach();
            }
        });
    }

    /// Forget every flow record that involves `ip`: a deleted pod leaves nothing behind.
    fn sweep_flows(maps: &mut Maps, ip: u32) {
        remove_keys_where(&mut maps.inbound_flows, |k| {
            k.pod_ipv4 == ip || k.client_ipv4 == ip
        });
        remove_keys_where(&mut maps.orig_dst_by_flow, |k| {
            k.src_ipv4 == ip || k.dst_ipv4 == ip
        });
    }
}

/// Removes the entries of `map` whose key `doomed` picks. The keys are listed first:
/// removing while iterating would make the kernel restart the walk.
fn remove_keys_where<K: aya::Pod, V: aya::Pod>(
    map: &mut HashMap<MapData, K, V>,
    doomed: impl Fn(&K) -> bool,
) {
    let stale: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| doomed(k))
        .collect();
    for key in stale {
        let _ = map.remove(&key);
    }
}

/// Rule entries a previous agent left in reused maps, not (yet) written again.
struct Unclaimed {
    rules: ScopeRules,
    flag_scopes: std::collections::HashSet<u64>,
}

impl Unclaimed {
    /// `set_rules` wrote these again: they stay.
    fn claim(&mut self, scope: u64, written: &ScopeRules) {
        self.rules.ports.retain(|k| !written.ports.contains(k));
        self.rules
            .excluded
            .retain(|k| !written.excluded.iter().any(|n| same_cidr(n, k)));
        self.rules
            .included
            .retain(|k| !written.included.iter().any(|n| same_cidr(n, k)));
        self.flag_scopes.remove(&scope);
    }
}

fn same_cidr(a: &Key<CidrKey>, b: &Key<CidrKey>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data() == b.data()
}

/// The kernel entries of one scope's rules.
#[derive(Clone, Default)]
struct ScopeRules {
    ports: Vec<PortRuleKey>,
    excluded: Vec<Key<CidrKey>>,
    included: Vec<Key<CidrKey>>,
}

/// The IPv4 ranges of a list that holds both families.
fn v4_nets<'a>(
    nets: impl IntoIterator<Item = &'a ipnet::IpNet>,
) -> impl Iterator<Item = &'a ipnet::Ipv4Net> {
    nets.into_iter().filter_map(|net| match net {
        ipnet::IpNet::V4(net) => Some(net),
        ipnet::IpNet::V6(_) => None,
    })
}

/// The IPv6 ranges of a list that holds both families.
fn v6_nets<'a>(nets: impl IntoIterator<Item = &'a ipnet::IpNet>) -> Vec<ipnet::Ipv6Net> {
    nets.into_iter()
        .filter_map(|net| match net {
            ipnet::IpNet::V6(net) => Some(*net),
            ipnet::IpNet::V4(_) => None,
        })
        .collect()
}

fn cidr_key(scope: u64, net: &ipnet::Ipv4Net) -> Key<CidrKey> {
    let ip = ip_key(net.network());
    Key::new(
        CidrKey::SCOPE_BITS + u32::from(net.prefix_len()),
        CidrKey::new(scope, ip),
    )
}

impl ScopeRules {
    fn from_config(scope: u64, rules: &crate::config::MeshConfig) -> Self {
        let mut ports: Vec<PortRuleKey> = rules
            .outbound_port_exclusion_list
            .iter()
            .map(|p| PortRuleKey::new(scope, *p, rules::DIRECTION_OUTBOUND))
            .collect();
        ports.extend(
            rules
                .inbound_port_exclusion_list
                .iter()
                .map(|p| PortRuleKey::new(scope, *p, rules::DIRECTION_INBOUND)),
        );
        Self {
            ports,
            excluded: v4_nets(&rules.outbound_ip_range_exclusion_list)
                .map(|n| cidr_key(scope, n))
                .collect(),
            included: v4_nets(rules.outbound_ip_range_inclusion_list.iter().flatten())
                .map(|n| cidr_key(scope, n))
                .collect(),
        }
    }
}

/// A pod's tc attachments and the netns they live in.
type PodTc = (Arc<PodNetns>, Vec<TcAttachment>);

/// One tc program attached to a pod's interface.
enum TcAttachment {
    /// A TCX bpf_link pinned in the pin dir: unpinning detaches it.
    Pinned(PinnedLink),
    /// A cls_bpf filter at our priority and handle (kernels before TCX): removed by
    /// netlink, from inside the pod's netns.
    Netlink { ifname: String, kind: TcAttachType },
}

impl TcAttachment {
    /// Must run in the pod's netns for [`TcAttachment::Netlink`].
    fn detach(self) {
        match self {
            // The interface may be gone with the pod: the link is defunct then, and
            // removing its pin is all there is to do.
            TcAttachment::Pinned(link) => {
                let _ = link.unpin();
            }
            TcAttachment::Netlink { ifname, kind } => {
                remove_netlink_filter(&ifname, kind);
            }
        }
    }
}

/// Remove our cls_bpf filter from `ifname` (in the calling thread's netns); a filter or
/// interface that is gone already is not an error. Whether a filter was removed.
fn remove_netlink_filter(ifname: &str, kind: TcAttachType) -> bool {
    match SchedClassifierLink::attached(ifname, kind, TC_NETLINK_PRIORITY, TC_NETLINK_HANDLE, None)
    {
        Ok(link) => match aya::programs::Link::detach(link) {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(%error, ifname, ?kind, "no tc filter to remove");
                false
            }
        },
        Err(error) => {
            tracing::debug!(%error, ifname, "interface gone");
            false
        }
    }
}

/// Remove our cls_bpf filters from every interface of the calling thread's netns.
/// Returns how many filters were removed.
fn remove_netlink_filters_here() -> usize {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return 0;
    };
    let names: Vec<String> = interfaces
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .filter(|n| n != "lo")
        .collect();
    names
        .iter()
        .flat_map(|name| [(name, TcAttachType::Ingress), (name, TcAttachType::Egress)])
        .filter(|(name, kind)| remove_netlink_filter(name, *kind))
        .count()
}

/// Remove our netlink tc filters from every interface of the netns at `path` (a pod this
/// agent no longer enrolls, or `interceptor cleanup` after `--on-exit keep`). Returns how
/// many were removed.
pub fn remove_netlink_filters_in(path: &Path) -> Result<usize, crate::inpod::InpodError> {
    PodNetns::enter(path)?.run_blocking(remove_netlink_filters_here)
}

/// Attach with a TCX link (kernel ≥ 6.6) and hand the link over, to be pinned.
fn attach_one_tcx(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
) -> Result<FdLink, String> {
    let prog = tc_program(ebpf, name)?;
    let id = prog
        .attach_with_options(iface, kind, TcAttachOptions::TcxOrder(Default::default()))
        .map_err(|e| format!("{name}: {e}"))?;
    let link = prog.take_link(id).map_err(|e| format!("{name}: {e}"))?;
    FdLink::try_from(link).map_err(|_| format!("{name}: link is not a bpf_link"))
}

/// Attach as a cls_bpf direct-action filter at our priority and handle; a filter a
/// previous agent left there is replaced in place (no moment without one).
fn attach_one_netlink(
    ebpf: &mut Ebpf,
    name: &'static str,
    iface: &str,
    kind: TcAttachType,
) -> Result<TcAttachment, String> {
    let prog = tc_program(ebpf, name)?;
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_NETLINK_PRIORITY,
        handle: TC_NETLINK_HANDLE,
        classid: None,
    });
    let id = match prog.attach_with_options(iface, kind, options) {
        Ok(id) => id,
        Err(aya::programs::ProgramError::TcError(error)) if netlink_exists(&error) => {
            let existing = SchedClassifierLink::attached(
                iface,
                kind,
                TC_NETLINK_PRIORITY,
                TC_NETLINK_HANDLE,
                None,
            )
            .map_err(|e| format!("{name}: {e}"))?;
            prog.attach_to_link(existing)
                .map_err(|e| format!("{name}: replacing the previous filter: {e}"))?
        }
        Err(error) => return Err(format!("{name}: {error}")),
    };
    let link = prog.take_link(id).map_err(|e| format!("{name}: {e}"))?;
    // Dropping the link would remove the filter: it must outlive the agent (like a
    // pinned TCX link). It holds no file descriptor, only ifindex/priority/handle, which
    // TcAttachment::Netlink keeps to remove it later.
    std::mem::forget(link);
    Ok(TcAttachment::Netlink {
        ifname: iface.to_owned(),
        kind,
    })
}

/// Netlink answered EEXIST: the qdisc or the filter at our priority and handle is there.
fn netlink_exists(error: &tc::TcError) -> bool {
    matches!(error, tc::TcError::NetlinkError(e) if e.raw_os_error() == Some(libc::EEXIST))
}

fn tc_program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, String> {
    ebpf.program_mut(name)
        .ok_or_else(|| format!("program {name} missing"))?
        .try_into()
        .map_err(|e| format!("{name}: {e}"))
}

/// Pin `link` as `name` in `pin_dir`. An existing pin of that name (a previous agent's
/// link) is removed first, which detaches it: the new link is already attached.
fn pin_link(pin_dir: &Path, name: &str, link: FdLink) -> Result<PinnedLink, DatapathError> {
    let path = pin_dir.join(name);
    let _ = std::fs::remove_file(&path);
    link.pin(&path).map_err(|source| DatapathError::Pin {
        path: path.display().to_string(),
        source,
    })
}

/// Pin a program (or anything pinned through a closure) as `name`, replacing an old pin.
fn replace_pin(
    pin_dir: &Path,
    name: &str,
    pin_at: impl FnOnce(PathBuf) -> Result<(), aya::pin::PinError>,
) -> Result<(), DatapathError> {
    let path = pin_dir.join(name);
    let _ = std::fs::remove_file(&path);
    pin_at(path.clone()).map_err(|source| DatapathError::Pin {
        path: path.display().to_string(),
        source,
    })
}

/// Whether every map pinned in `pin_dir` has the type, key size, value size and capacity
/// this build expects (a missing pin is fine: it is created). Anything else means another
/// build's layout, which must not be reused.
fn pinned_maps_reusable(
    pin_dir: &Path,
    capacity_of: &dyn Fn(&str) -> Option<u32>,
) -> Result<(), String> {
    use aya::maps::MapType::{Array, Hash, LpmTrie, LruHash, PerCpuArray, SockHash};
    use std::mem::size_of;
    let expected = |name: &str| -> (aya::maps::MapType, usize, usize, u32) {
        match name {
            maps::ENROLLED_NETNS => (
                Hash,
                size_of::<u64>(),
                size_of::<EnrolledPod>(),
                capacity::ENROLLED_NETNS,
            ),
            maps::POD_BY_IP => (
                Hash,
                size_of::<u32>(),
                size_of::<u64>(),
                capacity::POD_BY_IP,
            ),
            maps::ORIG_DST_BY_COOKIE => (
                LruHash,
                size_of::<u64>(),
                size_of::<interceptor_common::PendingConnect>(),
                capacity::ORIG_DST_BY_COOKIE,
            ),
            // A plain hash since getpeername reads it for a connection's whole life: pins
            // of the LRU map older builds made must not be reused.
            maps::ORIG_DST_BY_FLOW => (
                Hash,
                size_of::<FlowKey>(),
                size_of::<OrigDst>(),
                capacity::ORIG_DST_BY_FLOW,
            ),
            maps::INBOUND_FLOWS => (
                Hash,
                size_of::<InboundKey>(),
                size_of::<InboundFlow>(),
                capacity::INBOUND_FLOWS,
            ),
            maps::PORT_EXCLUSIONS => (
                Hash,
                size_of::<PortRuleKey>(),
                size_of::<u8>(),
                capacity::PORT_EXCLUSIONS,
            ),
            // An LPM trie key is its prefix length (u32) followed by the data.
            maps::OUT_EXCLUDED_CIDRS | maps::OUT_INCLUDED_CIDRS => (
                LpmTrie,
                size_of::<u32>() + size_of::<CidrKey>(),
                size_of::<u8>(),
                capacity::CIDRS,
            ),
            maps::SCOPE_FLAGS => (
                Hash,
                size_of::<u64>(),
                size_of::<u32>(),
                capacity::SCOPE_FLAGS,
            ),
            maps::SOCK_PAIRS => (
                SockHash,
                size_of::<FlowKey>(),
                size_of::<u32>(),
                capacity::SOCK_PAIRS,
            ),
            maps::SETTINGS => (Array, size_of::<u32>(), size_of::<u32>(), config::LEN),
            maps::ENROLLED_NETNS6 => (
                Hash,
                size_of::<u64>(),
                size_of::<EnrolledPod6>(),
                capacity::ENROLLED_NETNS6,
            ),
            maps::POD_BY_IP6 => (
                Hash,
                size_of::<Ipv6>(),
                size_of::<u64>(),
                capacity::POD_BY_IP6,
            ),
            maps::ORIG_DST6_BY_COOKIE => (
                LruHash,
                size_of::<u64>(),
                size_of::<interceptor_common::PendingConnect6>(),
                capacity::ORIG_DST6_BY_COOKIE,
            ),
            maps::ORIG_DST6_BY_FLOW => (
                Hash,
                size_of::<FlowKey6>(),
                size_of::<OrigDst6>(),
                capacity::ORIG_DST6_BY_FLOW,
            ),
            maps::INBOUND_FLOWS6 => (
                Hash,
                size_of::<InboundKey6>(),
                size_of::<InboundFlow>(),
                capacity::INBOUND_FLOWS6,
            ),
            maps::OUT_EXCLUDED_CIDRS6 | maps::OUT_INCLUDED_CIDRS6 => (
                LpmTrie,
                size_of::<u32>() + size_of::<CidrKey6>(),
                size_of::<u8>(),
                capacity::CIDRS,
            ),
            maps::COUNTERS6 => (
                PerCpuArray,
                size_of::<u32>(),
                size_of::<u64>(),
                counters6::LEN,
            ),
            maps::NETNS_PROBE => (
                LruHash,
                size_of::<u64>(),
                size_of::<u64>(),
                capacity::NETNS_PROBE,
            ),
            _ => (
                PerCpuArray,
                size_of::<u32>(),
                size_of::<u64>(),
                counters::LEN,
            ),
        }
    };
    for name in MAP_NAMES {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|map| map.info())
            .map_err(|e| format!("{name}: cannot be opened: {e}"))?;
        let (kind, key, value, default_capacity) = expected(name);
        let capacity = capacity_of(name).unwrap_or(default_capacity);
        let found_kind = info
            .map_type()
            .map_err(|e| format!("{name}: map type unknown to this build: {e}"))?;
        if found_kind != kind {
            return Err(format!(
                "{name}: a {found_kind:?} map where this build expects {kind:?}"
            ));
        }
        let found = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if found != (key, value, capacity) {
            return Err(format!(
                "{name}: key/value/entries {}/{}/{} where this build expects {key}/{value}/{capacity}",
                found.0, found.1, found.2
            ));
        }
    }
    Ok(())
}

/// bpf_link cgroup attachments (kernel ≥ 5.7, what aya uses there) are always
/// multi-attach and reject any flag; older kernels fall back to BPF_PROG_ATTACH, where
/// we must ask for multi-attach so we coexist with other programs on the cgroup.
fn attach_mode() -> CgroupAttachMode {
    use aya::util::KernelVersion;
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
        CgroupAttachMode::Single
    } else {
        CgroupAttachMode::AllowMultiple
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

fn map_full_or(name: &'static str, capacity: u32) -> impl Fn(MapError) -> DatapathError {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            DatapathError::MapFull {
                map: name,
                capacity,
            }
        }
        _ => DatapathError::Map { name, source },
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Datapath for EbpfDatapath {
    fn supports_ipv6(&self) -> bool {
        true
    }

    fn enroll_ipv6(&self, pod: &PodDatapath, ip: Ipv6Addr) -> Result<(), DatapathError> {
        // The inherent method, keyed by the netns cookie (tc is attached by `enroll`).
        EbpfDatapath::enroll_ipv6(self, pod.netns_cookie, ip)
    }

    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn enroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        let ip = ip_key(pod.ipv4);
        {
            let mut maps = lock(&self.maps);
            maps.pod_by_ip
                .insert(ip, pod.netns_cookie, 0)
                .map_err(map_full_or(maps::POD_BY_IP, capacity::POD_BY_IP))?;
            let value = EnrolledPod { ipv4: ip, flags: 0 };
            if let Err(error) = maps.enrolled.insert(pod.netns_cookie, value, 0) {
                let _ = maps.pod_by_ip.remove(&ip);
                return Err(map_full_or(maps::ENROLLED_NETNS, capacity::ENROLLED_NETNS)(
                    error,
                ));
            }
        }
        match self.attach_tc(netns, &pod.ifname, pod.netns_cookie) {
            Ok(links) => {
                lock(&self.tc_links).insert(pod.netns_cookie, (Arc::clone(netns), links));
                Ok(())
            }
            Err(error) => {
                let mut maps = lock(&self.maps);
                let _ = maps.enrolled.remove(&pod.netns_cookie);
                let _ = maps.pod_by_ip.remove(&ip);
                Err(error)
            }
        }
    }

    fn unenroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.detach_tc(netns, pod.netns_cookie);
        let ip = ip_key(pod.ipv4);
        let mut maps = lock(&self.maps);
        ignore_missing(maps.enrolled.remove(&pod.netns_cookie)).map_err(|source| {
            DatapathError::Map {
                name: maps::ENROLLED_NETNS,
                source,
            }
        })?;
        // Another pod may have taken the IP since; only remove our own entry.
        if maps.pod_by_ip.get(&ip, 0).ok() == Some(pod.netns_cookie) {
            ignore_missing(maps.pod_by_ip.remove(&ip)).map_err(|source| DatapathError::Map {
                name: maps::POD_BY_IP,
                source,
            })?;
        }
        Self::sweep_flows(&mut maps, ip);
        Self::forget_pod6(&mut maps.v6, pod.netns_cookie);
        Ok(())
    }

    fn set_debug(&self, on: bool) -> Result<(), DatapathError> {
        lock(&self.options).debug = on;
        self.write_flags()
    }

    /// Records tc wrote at a SYN that no inbound listener accepted within `older_than`
    /// (a spoofed source never completes the handshake) are removed, so such SYNs cannot
    /// keep the map full. Ages are measured from the first sweep that saw a record.
    fn expire_half_open(&self, older_than: std::time::Duration) -> usize {
        let now = std::time::Instant::now();
        let mut maps = lock(&self.maps);
        let half_open: std::collections::HashSet<InboundKey> = maps
            .inbound_flows
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flow)| flow.state == inbound_state::HALF_OPEN)
            .map(|(key, _)| key)
            .collect();
        let mut seen = lock(&self.half_open_seen);
        seen.retain(|key, _| half_open.contains(key));
        let mut expired = 0;
        for key in half_open {
            let first = *seen.entry(key).or_insert(now);
            if now.duration_since(first) < older_than {
                continue;
            }
            // Still half-open right now (it may have been accepted since the scan).
            let still = maps
                .inbound_flows
                .get(&key, 0)
                .is_ok_and(|flow| flow.state == inbound_state::HALF_OPEN);
            if still && maps.inbound_flows.remove(&key).is_ok() {
                expired += 1;
            }
            seen.remove(&key);
        }
        drop(seen);
        expired += self.expire_half_open6(&mut maps, older_than);
        self.half_open_expired
            .fetch_add(expired as u64, std::sync::atomic::Ordering::Relaxed);
        expired
    }

    /// `SO_NETNS_COOKIE` where the kernel has it (5.14); below, the netns probe: a UDP
    /// connect from inside the netns that connect4 answers with `bpf_get_netns_cookie`,
    /// the very value the programs compare with.
    fn netns_cookie(&self, netns: &PodNetns) -> Result<u64, DatapathError> {
        if lock(&self.options).support.so_netns_cookie {
            return Ok(netns.cookie());
        }
        let socket_cookie = netns
            .run_blocking(crate::inpod::probe_connect)
            .map_err(|e| DatapathError::NetnsProbe(e.to_string()))?
            .map_err(|e| DatapathError::NetnsProbe(e.to_string()))?;
        let cookie = self.netns_probe.get(&socket_cookie, 0).map_err(|e| {
            DatapathError::NetnsProbe(format!(
                "connect4 did not answer the probe of {} (is the agent inside the cgroup the \
                 programs are attached to?): {e}",
                netns.path().display()
            ))
        })?;
        Ok(cookie)
    }

    /// Remove the netlink tc filters an earlier agent left in a netns this agent does
    /// not enroll (TCX links go with their pins in [`Datapath::retain_pods`]).
    fn release_netns(&self, path: &Path) -> Result<(), DatapathError> {
        if lock(&self.options).support.tcx {
            return Ok(());
        }
        remove_netlink_filters_in(path)
            .map(|_| ())
            .map_err(|e| DatapathError::Tc {
                ifname: "*".into(),
                reason: format!("in {}: {e}", path.display()),
            })
    }

    fn counters(&self) -> Option<DatapathCounters> {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        Some(DatapathCounters {
            redirected: sum(counters::REDIRECTED),
            flows_recorded: sum(counters::FLOWS_RECORDED),
            orig_dst_answered: sum(counters::ORIG_DST_ANSWERED),
            record_failed: sum(counters::RECORD_FAILED),
            same_node_inbound: sum(counters::SAME_NODE_INBOUND),
            inbound_redirected: sum(counters::INBOUND_REDIRECTED),
            inbound_record_failed: sum(counters::INBOUND_RECORD_FAILED),
            inbound_half_open_expired: self
                .half_open_expired
                .load(std::sync::atomic::Ordering::Relaxed),
            ipv6_passed: sum(counters::IPV6_PASSED),
            sockmap_added: sum(counters::SOCKMAP_ADDED),
            sockmap_redirected: sum(counters::SOCKMAP_REDIRECTED),
            sockmap_add_failed: sum(counters::SOCKMAP_ADD_FAILED),
            inbound_tuple_busy: sum(counters::INBOUND_TUPLE_BUSY),
            ipv6: self.counters6(),
        })
    }

    fn live_records(&self) -> LiveRecords {
        let maps = lock(&self.maps);
        LiveRecords {
            inbound_flows: maps.inbound_flows.keys().filter(Result::is_ok).count(),
            orig_dst_by_flow: maps.orig_dst_by_flow.keys().filter(Result::is_ok).count(),
            enrolled_netns: maps.enrolled.keys().filter(Result::is_ok).count(),
        }
    }

    fn forget_unclaimed_rules(&self) -> usize {
        let mut maps = lock(&self.maps);
        let mut removed = 0;
        if let Some(unclaimed) = maps.v6.unclaimed.take() {
            for key in &unclaimed.excluded {
                removed += usize::from(maps.v6.out_excluded.remove(key).is_ok());
            }
            for key in &unclaimed.included {
                removed += usize::from(maps.v6.out_included.remove(key).is_ok());
            }
        }
        let Some(unclaimed) = maps.unclaimed.take() else {
            return removed;
        };
        for key in &unclaimed.rules.ports {
            // The reserved ports are global inbound rules of their own: never removed.
            if RESERVED_PORTS.iter().any(|port| {
                *key == PortRuleKey::new(rules::GLOBAL_SCOPE, *port, rules::DIRECTION_INBOUND)
            }) {
                continue;
            }
            removed += usize::from(maps.port_exclusions.remove(key).is_ok());
        }
        for key in &unclaimed.rules.excluded {
            removed += usize::from(maps.out_excluded.remove(key).is_ok());
        }
        for key in &unclaimed.rules.included {
            removed += usize::from(maps.out_included.remove(key).is_ok());
        }
        for scope in &unclaimed.flag_scopes {
            removed += usize::from(maps.scope_flags.remove(scope).is_ok());
        }
        removed
    }

    /// Forget enrolled pods that were not adopted again after a restart (their entries
    /// and tc link pins came from a previous agent through the reused maps).
    fn retain_pods(&self, cookies: &std::collections::HashSet<u64>) {
        let mut maps = lock(&self.maps);
        let stale: Vec<(u64, EnrolledPod)> = maps
            .enrolled
            .iter()
            .filter_map(Result::ok)
            .filter(|(cookie, _)| !cookies.contains(cookie))
            .collect();
        for (cookie, pod) in stale {
            let _ = maps.enrolled.remove(&cookie);
            if maps.pod_by_ip.get(&pod.ipv4, 0).ok() == Some(cookie) {
                let _ = maps.pod_by_ip.remove(&pod.ipv4);
            }
            Self::sweep_flows(&mut maps, pod.ipv4);
        }
        let stale6: Vec<u64> = maps
            .v6
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .filter(|cookie| !cookies.contains(cookie))
            .collect();
        for cookie in stale6 {
            Self::forget_pod6(&mut maps.v6, cookie);
        }
        drop(maps);
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(TC_LINK_PREFIX) else {
                    continue;
                };
                let cookie = rest.split('_').next().and_then(|c| c.parse::<u64>().ok());
                if cookie.is_some_and(|c| !cookies.contains(&c)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Remove every pin, which detaches the pinned links: interception ends. For a
    /// shutdown that should not leave pods failing closed.
    fn teardown(&self) -> Result<(), DatapathError> {
        for link in lock(&self.pinned_links).drain(..) {
            let _ = link.unpin();
        }
        for (_, (netns, attachments)) in lock(&self.tc_links).drain() {
            // Netlink filters are addressed by ifindex in the pod's netns.
            let _ = netns.run_blocking(move || {
                for attachment in attachments {
                    attachment.detach();
                }
            });
        }
        super::bpffs::remove_pin_dir(&self.pin_dir, &is_our_pin).map_err(|e| DatapathError::Bpffs {
            path: self.pin_dir.display().to_string(),
            reason: e.to_string(),
        })
    }

    /// Replace the rules of `scope` (0: global; else a pod's netns cookie). New entries
    /// go in before old ones come out, so a change never opens a moment with neither.
    /// The IPv6 ranges go first: the has-an-inclusion-list flag written below covers
    /// both families, and must not find the IPv6 inclusions missing.
    fn set_rules(
        &self,
        scope: u64,
        config: &crate::config::MeshConfig,
    ) -> Result<(), DatapathError> {
        self.set_rules6(
            scope,
            &v6_nets(&config.outbound_ip_range_exclusion_list),
            &v6_nets(config.outbound_ip_range_inclusion_list.iter().flatten()),
        )?;
        let new = ScopeRules::from_config(scope, config);
        let mut maps = lock(&self.maps);
        let map_err = |name: &'static str| move |source| DatapathError::Map { name, source };
        for key in &new.ports {
            maps.port_exclusions
                .insert(*key, 1, 0)
                .map_err(map_err(maps::PORT_EXCLUSIONS))?;
        }
        for key in &new.excluded {
            maps.out_excluded
                .insert(key, 1, 0)
                .map_err(map_err(maps::OUT_EXCLUDED_CIDRS))?;
        }
        for key in &new.included {
            maps.out_included
                .insert(key, 1, 0)
                .map_err(map_err(maps::OUT_INCLUDED_CIDRS))?;
        }
        if config.outbound_ip_range_inclusion_list.is_some() {
            maps.scope_flags
                .insert(scope, rules::FLAG_HAS_INCLUSION, 0)
                .map_err(map_err(maps::SCOPE_FLAGS))?;
        } else {
            let _ = maps.scope_flags.remove(&scope);
        }
        if let Some(unclaimed) = maps.unclaimed.as_mut() {
            unclaimed.claim(scope, &new);
        }
        let old = maps
            .rule_keys
            .insert(scope, new.clone())
            .unwrap_or_default();
        for key in old.ports.iter().filter(|k| !new.ports.contains(k)) {
            // The reserved ports are global inbound rules of their own: never removed.
            if !(scope == rules::GLOBAL_SCOPE
                && key.direction == rules::DIRECTION_INBOUND
                && RESERVED_PORTS.contains(&key.port))
            {
                let _ = maps.port_exclusions.remove(key);
            }
        }
        for key in old
            .excluded
            .iter()
            .filter(|k| !new.excluded.iter().any(|n| same_cidr(n, k)))
        {
            let _ = maps.out_excluded.remove(key);
        }
        for key in old
            .included
            .iter()
            .filter(|k| !new.included.iter().any(|n| same_cidr(n, k)))
        {
            let _ = maps.out_included.remove(key);
        }
        Ok(())
    }
}
