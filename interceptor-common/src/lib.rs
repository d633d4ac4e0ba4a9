//! Types, ports and map names shared by the eBPF programs and the node agent.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields so the kernel and
//! userspace agree on the layout byte for byte; `aya::Pod` impls live behind the
//! `user` feature so the eBPF side stays `no_std` without aya.
#![no_std]

/// Admin endpoint (health, readiness, config dump).
pub const ADMIN_PORT: u16 = 15000;
/// In-pod listener that receives redirected outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod listener that receives redirected inbound connections.
pub const INBOUND_PORT: u16 = 15003;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 15010;
/// Health endpoint.
pub const HEALTH_PORT: u16 = 15904;
/// Probe-rewrite ports (FSM convention).
pub const PROBE_PORTS: [u16; 3] = [15901, 15902, 15903];
/// Ports never intercepted inbound: the mesh's own (DESIGN.md §5).
pub const RESERVED_PORTS: [u16; 8] = [
    ADMIN_PORT,
    OUTBOUND_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    PROBE_PORTS[0],
    PROBE_PORTS[1],
    PROBE_PORTS[2],
    HEALTH_PORT,
];

/// The source address the agent gives the node's own connections to enrolled pods
/// (kubelet's probes), with SNAT in the node's netns; the inbound proxy admits it in SMI
/// mode. Istio ambient's address, so one NetworkPolicy exception serves both meshes.
pub const NODE_PROBE_SOURCE: core::net::Ipv4Addr = core::net::Ipv4Addr::new(169, 254, 7, 127);

/// Socket mark carried by every socket the proxy opens upstream; the programs never
/// redirect a socket with this mark, which is what keeps the proxy out of its own loop.
pub const PROXY_MARK: u32 = 0x1500;
/// Socket mark of the inbound proxy's transparent sockets to the application (bound to
/// the client's address, `IP_TRANSPARENT`). It differs from [`PROXY_MARK`] only in the
/// lowest bit, so everything that skips the proxy's sockets matches both with
/// [`PROXY_MARK_MASK`] (iptables: `--mark 0x1500/0xfffffffe`); the pod's policy route
/// sends the application's replies, which take this mark (`tcp_fwmark_accept`), back to
/// the proxy.
pub const TRANSPARENT_MARK: u32 = 0x1501;
/// The bits of a socket mark that say "the proxy's": [`PROXY_MARK`] and
/// [`TRANSPARENT_MARK`] agree on them.
pub const PROXY_MARK_MASK: u32 = 0xffff_fffe;

/// Whether a socket mark is one of the proxy's ([`PROXY_MARK`] or [`TRANSPARENT_MARK`]).
#[inline(always)]
pub const fn is_proxy_mark(mark: u32) -> bool {
    mark & PROXY_MARK_MASK == PROXY_MARK
}
/// UID the proxy may run as (FSM convention); reserved for the iptables fallback.
pub const PROXY_UID: u32 = 1500;

/// `SOL_IP` / `SO_ORIGINAL_DST` as netfilter defines them.
pub const SOL_IP: i32 = 0;
pub const SO_ORIGINAL_DST: i32 = 80;
/// `SOL_IPV6` / `IP6T_SO_ORIGINAL_DST`, the IPv6 twin (same option number, answered with
/// a `sockaddr_in6`).
pub const SOL_IPV6: i32 = 41;
pub const IP6T_SO_ORIGINAL_DST: i32 = 80;

/// Where the agent sends its netns probe: a UDP `connect()` (which sends nothing) from a
/// socket inside a pod's netns to this loopback address and port makes connect4 record
/// the netns cookie under the socket's cookie in [`maps::NETNS_PROBE`]. Kernels before
/// 5.14 have no `SO_NETNS_COOKIE`, and this is how the agent learns the key that
/// `bpf_get_netns_cookie` gives the programs there.
pub const NETNS_PROBE_IPV4: [u8; 4] = [127, 0, 0, 1];
pub const NETNS_PROBE_PORT: u16 = 15099;

/// Map names, as the agent finds them in the loaded object and pins them.
pub mod maps {
    /// netns cookie -> [`crate::EnrolledPod`]: which network namespaces are intercepted.
    pub const ENROLLED_NETNS: &str = "ENROLLED_NETNS";
    /// socket cookie -> [`crate::PendingConnect`]: written at connect, before the
    /// 4-tuple exists.
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    /// [`crate::FlowKey`] -> [`crate::OrigDst`]: what `SO_ORIGINAL_DST` answers from.
    pub const ORIG_DST_BY_FLOW: &str = "ORIG_DST_BY_FLOW";
    /// index -> u32 runtime settings (see [`crate::config`]).
    pub const SETTINGS: &str = "SETTINGS";
    /// index -> u64 per-CPU counters (see [`crate::counters`]).
    pub const COUNTERS: &str = "COUNTERS";
    /// pod IPv4 (network order) -> netns cookie, for every enrolled pod on this node.
    pub const POD_BY_IP: &str = "POD_BY_IP";
    /// [`crate::InboundKey`] -> [`crate::InboundFlow`]: connections tc steered to 15003.
    pub const INBOUND_FLOWS: &str = "INBOUND_FLOWS";
    /// [`crate::PortRuleKey`] -> 1: ports never intercepted, per scope and direction.
    pub const PORT_EXCLUSIONS: &str = "PORT_EXCLUSIONS";
    /// LPM [`crate::CidrKey`] -> 1: destination ranges never intercepted outbound.
    pub const OUT_EXCLUDED_CIDRS: &str = "OUT_EXCLUDED_CIDRS";
    /// LPM [`crate::CidrKey`] -> 1: when a scope has an inclusion list, only these
    /// destination ranges are intercepted outbound.
    pub const OUT_INCLUDED_CIDRS: &str = "OUT_INCLUDED_CIDRS";
    /// scope -> [`crate::rules`] flags.
    pub const SCOPE_FLAGS: &str = "SCOPE_FLAGS";
    /// [`crate::FlowKey`] -> socket: local connection endpoints for sk_msg redirects.
    pub const SOCK_PAIRS: &str = "SOCK_PAIRS";
    /// socket cookie -> netns cookie, written by connect4 for the agent's netns probe
    /// (see [`crate::NETNS_PROBE_PORT`]).
    pub const NETNS_PROBE: &str = "NETNS_PROBE";
    // IPv6 maps live beside the IPv4 ones rather than widening them: a running agent's
    // pinned IPv4 maps are reused by the next agent in a hand-over, so their layouts
    // never change.
    /// netns cookie -> [`crate::EnrolledPod6`]: pods with an IPv6 address (a pod with
    /// none is absent, and its native IPv6 connects are left alone).
    pub const ENROLLED_NETNS6: &str = "ENROLLED_NETNS6";
    /// pod IPv6 ([`crate::Ipv6`]) -> netns cookie, for every enrolled pod on this node.
    pub const POD_BY_IP6: &str = "POD_BY_IP6";
    /// socket cookie -> [`crate::PendingConnect6`], written by connect6.
    pub const ORIG_DST6_BY_COOKIE: &str = "ORIG_DST6_BY_COOKIE";
    /// [`crate::FlowKey6`] -> [`crate::OrigDst6`]: what `IP6T_SO_ORIGINAL_DST` answers.
    pub const ORIG_DST6_BY_FLOW: &str = "ORIG_DST6_BY_FLOW";
    /// [`crate::InboundKey6`] -> [`crate::InboundFlow`]: IPv6 connections tc steered.
    pub const INBOUND_FLOWS6: &str = "INBOUND_FLOWS6";
    /// LPM [`crate::CidrKey6`] -> 1: IPv6 destination ranges never intercepted.
    pub const OUT_EXCLUDED_CIDRS6: &str = "OUT_EXCLUDED_CIDRS6";
    /// LPM [`crate::CidrKey6`] -> 1: IPv6 ranges intercepted when the scope has an
    /// inclusion list (the scope's `FLAG_HAS_INCLUSION` covers both families).
    pub const OUT_INCLUDED_CIDRS6: &str = "OUT_INCLUDED_CIDRS6";
    /// index -> u64 per-CPU counters of the IPv6 paths (see [`crate::counters6`]); a
    /// map of its own so `COUNTERS` keeps its length across a hand-over.
    pub const COUNTERS6: &str = "COUNTERS6";
}

/// Capacity of each map; LRU maps evict the oldest records instead of failing.
pub mod capacity {
    pub const ENROLLED_NETNS: u32 = 4096;
    pub const ORIG_DST_BY_COOKIE: u32 = 65536;
    pub const ORIG_DST_BY_FLOW: u32 = 65536;
    pub const POD_BY_IP: u32 = 4096;
    /// A plain hash, not LRU: eviction would break live flows mid-stream, while a full
    /// map refuses new flows (their SYN dropped, counted) until records free up.
    pub const INBOUND_FLOWS: u32 = 65536;
    pub const PORT_EXCLUSIONS: u32 = 16384;
    /// Enough for the benchmark's 10,000 ranges plus per-pod rules.
    pub const CIDRS: u32 = 65536;
    pub const SCOPE_FLAGS: u32 = 8192;
    pub const SOCK_PAIRS: u32 = 65536;
    /// LRU: an answer is read by the agent right after its probe connect.
    pub const NETNS_PROBE: u32 = 256;
    pub const ENROLLED_NETNS6: u32 = 4096;
    pub const POD_BY_IP6: u32 = 4096;
    pub const ORIG_DST6_BY_COOKIE: u32 = 65536;
    pub const ORIG_DST6_BY_FLOW: u32 = 65536;
    /// A plain hash for the reasons of [`INBOUND_FLOWS`].
    pub const INBOUND_FLOWS6: u32 = 65536;
}

/// Indices and bits of the `SETTINGS` array.
pub mod config {
    /// Index of the flags word.
    pub const FLAGS_INDEX: u32 = 0;
    /// Number of entries in the settings array.
    pub const LEN: u32 = 1;
    /// Emit `bpf_printk` lines to trace_pipe.
    pub const FLAG_DEBUG: u32 = 1 << 0;
    /// Put local connection pairs in the SOCKHASH so sk_msg can short-circuit them.
    pub const FLAG_SOCKMAP: u32 = 1 << 1;
    /// The kernel formats addresses in trace lines (`%pI4`, 5.13); without it the
    /// programs print them as `ipx:<hex>`, which `interceptor trace` shows dotted.
    pub const FLAG_PRINTK_IP: u32 = 1 << 2;
}

/// Exclusion and inclusion rules: scopes and flags.
pub mod rules {
    /// The scope of the global rules (agent config); a pod's scope is its netns cookie.
    pub const GLOBAL_SCOPE: u64 = 0;
    /// The scope has an outbound inclusion list (possibly empty: then nothing matches).
    pub const FLAG_HAS_INCLUSION: u32 = 1 << 0;
    pub const DIRECTION_OUTBOUND: u8 = 0;
    pub const DIRECTION_INBOUND: u8 = 1;
}

/// Indices of the `COUNTERS` per-CPU array.
pub mod counters {
    /// Outbound connects redirected to 15001.
    pub const REDIRECTED: u32 = 0;
    /// Flow records written on ESTABLISHED.
    pub const FLOWS_RECORDED: u32 = 1;
    /// `SO_ORIGINAL_DST` answers given.
    pub const ORIG_DST_ANSWERED: u32 = 2;
    /// Record writes that failed (map full or error): the connect was refused.
    pub const RECORD_FAILED: u32 = 3;
    /// Proxy connects to a pod on this node steered to its inbound listener.
    pub const SAME_NODE_INBOUND: u32 = 4;
    /// New inbound flows tc steered to 15003.
    pub const INBOUND_REDIRECTED: u32 = 5;
    /// New inbound flows refused (SYN dropped) because INBOUND_FLOWS was full.
    pub const INBOUND_RECORD_FAILED: u32 = 6;
    /// Retired: IPv6 packets tc left alone while IPv6 was not intercepted. Kept so the
    /// array keeps its length (pinned maps are reused across a hand-over); no program
    /// counts it any more, see [`crate::counters6`].
    pub const IPV6_PASSED: u32 = 7;
    /// Sockets added to the SOCKHASH.
    pub const SOCKMAP_ADDED: u32 = 8;
    /// Messages sk_msg redirected straight to the peer socket.
    pub const SOCKMAP_REDIRECTED: u32 = 9;
    /// Sockets sock_ops could not add to SOCK_PAIRS (map full or error): that pair
    /// goes through the normal socket path, correct but not accelerated.
    pub const SOCKMAP_ADD_FAILED: u32 = 10;
    /// New inbound flows refused (SYN dropped) because the same client address and port
    /// already has a live flow to another port of the pod: both would be the same
    /// connection on 15003 inside the pod, so the second would break the first.
    pub const INBOUND_TUPLE_BUSY: u32 = 11;
    pub const LEN: u32 = 12;
}

/// Indices of the `COUNTERS6` per-CPU array: the IPv6 twins of [`counters`]. A
/// connect to an IPv4-mapped address (`::ffff:a.b.c.d`) is IPv4 on the wire and is
/// counted in [`counters`], plus [`counters6::V4_MAPPED_REDIRECTED`].
pub mod counters6 {
    /// Native IPv6 connects redirected to 15001 (connect6).
    pub const REDIRECTED: u32 = 0;
    /// IPv6 flow records written on ESTABLISHED.
    pub const FLOWS_RECORDED: u32 = 1;
    /// `IP6T_SO_ORIGINAL_DST` answers given.
    pub const ORIG_DST_ANSWERED: u32 = 2;
    /// IPv6 record writes that failed: the connect was refused (fail closed).
    pub const RECORD_FAILED: u32 = 3;
    /// Proxy connects to a pod's IPv6 address on this node steered to its 15003.
    pub const SAME_NODE_INBOUND: u32 = 4;
    /// New inbound IPv6 flows tc steered to 15003.
    pub const INBOUND_REDIRECTED: u32 = 5;
    /// New inbound IPv6 flows refused (SYN dropped): INBOUND_FLOWS6 had no room.
    pub const INBOUND_RECORD_FAILED: u32 = 6;
    /// New inbound IPv6 flows refused: the client address and port carry another flow.
    pub const INBOUND_TUPLE_BUSY: u32 = 7;
    /// IPv6 packets tc passed without looking at their transport: a fragment header,
    /// AH, ESP, another extension header it does not walk, or more extension headers
    /// than it walks. Never rewritten, since what it cannot parse it must not touch.
    pub const UNPARSED_PASSED: u32 = 8;
    /// connect6 to an IPv4-mapped address of a dual-stack socket, redirected to
    /// `::ffff:<pod IPv4>:15001` (also counted in `counters::REDIRECTED`).
    pub const V4_MAPPED_REDIRECTED: u32 = 9;
    pub const LEN: u32 = 10;
}

/// Prefix of every trace_pipe line the programs print, so `interceptor trace` can filter.
pub const TRACE_PREFIX: &str = "icpt:";

/// An enrolled network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod {
    /// Pod IPv4 address, network byte order. Redirects target this address so that the
    /// resulting 4-tuple is unique on the node (loopback tuples repeat across netns).
    pub ipv4: u32,
    /// Bit flags, reserved.
    pub flags: u32,
}

/// An original destination (IPv4), network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub ipv4: u32,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// What connect4 leaves for sock_ops, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnect {
    pub orig: OrigDst,
    /// The connecting socket's netns cookie, so later trace lines name the pod.
    pub netns_cookie: u64,
}

/// A TCP connection as seen from the client side: the key is node-wide unique because
/// the redirect targets the pod's own IP rather than loopback.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client IPv4, network order.
    pub src_ipv4: u32,
    /// Server IPv4, network order.
    pub dst_ipv4: u32,
    /// Client port, host order.
    pub src_port: u16,
    /// Server port, host order.
    pub dst_port: u16,
}

/// A port rule: scope (0 global, else a pod's netns cookie, split in two words so the
/// struct has no padding), port in host order, direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRuleKey {
    pub scope_hi: u32,
    pub scope_lo: u32,
    pub port: u16,
    pub direction: u8,
    pub _pad: u8,
}

impl PortRuleKey {
    pub const fn new(scope: u64, port: u16, direction: u8) -> Self {
        Self {
            scope_hi: (scope >> 32) as u32,
            scope_lo: scope as u32,
            port,
            direction,
            _pad: 0,
        }
    }
}

/// The data of an LPM trie key: the scope must match exactly (its 64 bits come first
/// in the prefix), then the first `prefix_len - 64` bits of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrKey {
    /// Scope, big-endian bytes, so the trie compares it bit by bit from the top.
    pub scope: [u8; 8],
    /// IPv4 address, network order.
    pub ipv4: u32,
}

impl CidrKey {
    /// Bits of scope in front of the address bits.
    pub const SCOPE_BITS: u32 = 64;

    pub const fn new(scope: u64, ipv4: u32) -> Self {
        Self {
            scope: scope.to_be_bytes(),
            ipv4,
        }
    }
}

/// An inbound connection as tc sees it arriving at a pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// Client IPv4, network order.
    pub client_ipv4: u32,
    /// Pod IPv4, network order.
    pub pod_ipv4: u32,
    /// Client port, host order.
    pub client_port: u16,
    pub _pad: u16,
}

/// What tc remembers about an inbound flow it steered to 15003.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundFlow {
    /// The destination port the client dialled, host order.
    pub orig_port: u16,
    /// [`inbound_state`]: whether the inbound listener has accepted the connection yet.
    pub state: u16,
    pub _pad: u32,
}

/// States of an [`InboundFlow`]: tc writes `HALF_OPEN` at the SYN, sock_ops marks it
/// `ACCEPTED` when the inbound listener's socket is established. A record that stays
/// half-open (a handshake that never completes, such as a spoofed SYN) is removed by the
/// agent after the half-open timeout, so such SYNs cannot fill the map for good.
pub mod inbound_state {
    pub const HALF_OPEN: u16 = 0;
    pub const ACCEPTED: u16 = 1;
}

/// An IPv6 address as the kernel hands it to programs (`user_ip6`, `remote_ip6`,
/// `src_ip6`): four words, each holding four address bytes in network order.
pub type Ipv6 = [u32; 4];

/// An enrolled network namespace's IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnrolledPod6 {
    /// Redirects of native IPv6 connects target this address (unique on the node).
    pub ipv6: Ipv6,
    /// Bit flags, reserved.
    pub flags: u32,
}

/// An original IPv6 destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst6 {
    pub ipv6: Ipv6,
    /// Port, network byte order.
    pub port: u16,
    pub _pad: u16,
}

/// What connect6 leaves for sock_ops, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingConnect6 {
    pub orig: OrigDst6,
    pub _pad: u32,
    /// The connecting socket's netns cookie, for trace lines.
    pub netns_cookie: u64,
}

/// An IPv6 TCP connection as seen from the client side (see [`FlowKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub src_ipv6: Ipv6,
    pub dst_ipv6: Ipv6,
    /// Client port, host order.
    pub src_port: u16,
    /// Server port, host order.
    pub dst_port: u16,
}

/// An inbound IPv6 connection as tc sees it arriving at a pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey6 {
    pub client_ipv6: Ipv6,
    pub pod_ipv6: Ipv6,
    /// Client port, host order.
    pub client_port: u16,
    pub _pad: u16,
}

/// The data of an IPv6 LPM trie key: scope first (exact), then `prefix_len - 64` bits of
/// the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrKey6 {
    /// Scope, big-endian bytes (see [`CidrKey`]).
    pub scope: [u8; 8],
    /// IPv6 address, network order.
    pub ipv6: [u8; 16],
}

impl CidrKey6 {
    pub const SCOPE_BITS: u32 = 64;

    pub const fn new(scope: u64, ipv6: [u8; 16]) -> Self {
        Self {
            scope: scope.to_be_bytes(),
            ipv6,
        }
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network
/// order; `None` for any other address.
#[inline(always)]
pub const fn v4_mapped(ip: &Ipv6) -> Option<u32> {
    if ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
        Some(ip[3])
    } else {
        None
    }
}

/// `::ffff:a.b.c.d` of an IPv4 address in network order.
#[inline(always)]
pub const fn to_v4_mapped(ipv4: u32) -> Ipv6 {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ipv4]
}

/// `::1`, `::`, link-local `fe80::/10`: never steered (they stay inside the pod or on
/// its link).
#[inline(always)]
pub const fn ipv6_local_only(ip: &Ipv6) -> bool {
    let first = ip[0].to_ne_bytes();
    let link_local = first[0] == 0xfe && first[1] & 0xc0 == 0x80;
    let unspecified_or_loopback = ip[0] == 0
        && ip[1] == 0
        && ip[2] == 0
        && (ip[3] == 0 || ip[3] == u32::from_ne_bytes([0, 0, 0, 1]));
    link_local || unspecified_or_loopback
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all three are repr(C), made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::EnrolledPod {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PendingConnect {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::PortRuleKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::InboundFlow {}
    unsafe impl aya::Pod for super::EnrolledPod6 {}
    unsafe impl aya::Pod for super::OrigDst6 {}
    unsafe impl aya::Pod for super::PendingConnect6 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::InboundKey6 {}
    unsafe impl aya::Pod for super::CidrKey6 {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EnrolledPod>(), 8);
        assert_eq!(size_of::<OrigDst>(), 8);
        assert_eq!(size_of::<PendingConnect>(), 16);
        assert_eq!(size_of::<FlowKey>(), 12);
        assert_eq!(size_of::<InboundKey>(), 12);
        assert_eq!(size_of::<PortRuleKey>(), 12);
        assert_eq!(size_of::<CidrKey>(), 12);
        assert_eq!(size_of::<InboundFlow>(), 8);
        assert_eq!(size_of::<EnrolledPod6>(), 20);
        assert_eq!(size_of::<OrigDst6>(), 20);
        assert_eq!(size_of::<PendingConnect6>(), 32);
        assert_eq!(size_of::<FlowKey6>(), 36);
        assert_eq!(size_of::<InboundKey6>(), 36);
        assert_eq!(size_of::<CidrKey6>(), 24);
    }

    #[test]
    fn both_proxy_marks_and_nothing_else_are_the_proxys() {
        assert!(is_proxy_mark(PROXY_MARK));
        assert!(is_proxy_mark(TRANSPARENT_MARK));
        for other in [0, 1, 0x1502, 0x1400, 0x11500, 0x1500 | 0x8000_0000] {
            assert!(!is_proxy_mark(other), "{other:#x}");
        }
    }

    fn words(octets: [u8; 16]) -> Ipv6 {
        let mut ip = [0u32; 4];
        for (word, chunk) in ip.iter_mut().zip(octets.chunks(4)) {
            *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        ip
    }

    #[test]
    fn address_classes() {
        let mapped = words([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 9]);
        assert_eq!(v4_mapped(&mapped), Some(u32::from_ne_bytes([10, 0, 0, 9])));
        assert_eq!(to_v4_mapped(u32::from_ne_bytes([10, 0, 0, 9])), mapped);
        let global = words([0xfd, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        assert_eq!(v4_mapped(&global), None);
        assert!(!ipv6_local_only(&global));
        assert!(!ipv6_local_only(&mapped));
        let mut loopback = [0u8; 16];
        loopback[15] = 1;
        assert!(ipv6_local_only(&words(loopback)));
        assert!(ipv6_local_only(&words([0; 16])));
        for first in [[0xfe, 0x80], [0xfe, 0xbf]] {
            let mut ll = [0u8; 16];
            ll[..2].copy_from_slice(&first);
            ll[15] = 2;
            assert!(ipv6_local_only(&words(ll)), "{first:x?}");
        }
        let mut site = [0u8; 16];
        site[..2].copy_from_slice(&[0xfe, 0xc0]);
        assert!(!ipv6_local_only(&words(site)));
    }
}
