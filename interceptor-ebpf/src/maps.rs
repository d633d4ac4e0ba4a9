//! Every map the programs share, and the small helpers around the settings and counters.
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
};
use interceptor_common::{
    capacity, config, counters, counters6, rules, CidrKey, CidrKey6, EnrolledPod, EnrolledPod6,
    FlowKey, FlowKey6, InboundFlow, InboundKey, InboundKey6, Ipv6, OrigDst, OrigDst6,
    PendingConnect, PendingConnect6, PortRuleKey,
};

#[map(name = "ENROLLED_NETNS")]
pub static ENROLLED_NETNS: HashMap<u64, EnrolledPod> =
    HashMap::with_max_entries(capacity::ENROLLED_NETNS, 0);

#[map(name = "POD_BY_IP")]
pub static POD_BY_IP: HashMap<u32, u64> = HashMap::with_max_entries(capacity::POD_BY_IP, 0);

#[map(name = "ORIG_DST_BY_COOKIE")]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, PendingConnect> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_COOKIE, 0);

/// Not LRU: getpeername answers from this record for the connection's whole life, so an
/// eviction would change a live socket's peer. A full map refuses new connections
/// instead (RECORD_FAILED); sock_ops removes each record when its socket closes.
#[map(name = "ORIG_DST_BY_FLOW")]
pub static ORIG_DST_BY_FLOW: HashMap<FlowKey, OrigDst> =
    HashMap::with_max_entries(capacity::ORIG_DST_BY_FLOW, 0);

#[map(name = "INBOUND_FLOWS")]
pub static INBOUND_FLOWS: HashMap<InboundKey, InboundFlow> =
    HashMap::with_max_entries(capacity::INBOUND_FLOWS, 0);

#[map(name = "PORT_EXCLUSIONS")]
pub static PORT_EXCLUSIONS: HashMap<PortRuleKey, u8> =
    HashMap::with_max_entries(capacity::PORT_EXCLUSIONS, 0);

/// LPM tries must be created with BPF_F_NO_PREALLOC.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "OUT_EXCLUDED_CIDRS")]
pub static OUT_EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> =
    LpmTrie::with_max_entries(capacity::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "OUT_INCLUDED_CIDRS")]
pub static OUT_INCLUDED_CIDRS: LpmTrie<CidrKey, u8> =
    LpmTrie::with_max_entries(capacity::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "SCOPE_FLAGS")]
pub static SCOPE_FLAGS: HashMap<u64, u32> = HashMap::with_max_entries(capacity::SCOPE_FLAGS, 0);

#[map(name = "SOCK_PAIRS")]
pub static SOCK_PAIRS: SockHash<FlowKey> = SockHash::with_max_entries(capacity::SOCK_PAIRS, 0);

/// Answers to the agent's netns probe (kernels without `SO_NETNS_COOKIE`).
#[map(name = "NETNS_PROBE")]
pub static NETNS_PROBE: LruHashMap<u64, u64> =
    LruHashMap::with_max_entries(capacity::NETNS_PROBE, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(config::LEN, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

// IPv6 maps beside the IPv4 ones (see `interceptor_common::maps`): same roles, wider
// keys; the IPv4 maps keep their layouts for a hand-over between agents.

#[map(name = "ENROLLED_NETNS6")]
pub static ENROLLED_NETNS6: HashMap<u64, EnrolledPod6> =
    HashMap::with_max_entries(capacity::ENROLLED_NETNS6, 0);

#[map(name = "POD_BY_IP6")]
pub static POD_BY_IP6: HashMap<Ipv6, u64> = HashMap::with_max_entries(capacity::POD_BY_IP6, 0);

#[map(name = "ORIG_DST6_BY_COOKIE")]
pub static ORIG_DST6_BY_COOKIE: LruHashMap<u64, PendingConnect6> =
    LruHashMap::with_max_entries(capacity::ORIG_DST6_BY_COOKIE, 0);

/// Not LRU, as ORIG_DST_BY_FLOW.
#[map(name = "ORIG_DST6_BY_FLOW")]
pub static ORIG_DST6_BY_FLOW: HashMap<FlowKey6, OrigDst6> =
    HashMap::with_max_entries(capacity::ORIG_DST6_BY_FLOW, 0);

#[map(name = "INBOUND_FLOWS6")]
pub static INBOUND_FLOWS6: HashMap<InboundKey6, InboundFlow> =
    HashMap::with_max_entries(capacity::INBOUND_FLOWS6, 0);

#[map(name = "OUT_EXCLUDED_CIDRS6")]
pub static OUT_EXCLUDED_CIDRS6: LpmTrie<CidrKey6, u8> =
    LpmTrie::with_max_entries(capacity::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "OUT_INCLUDED_CIDRS6")]
pub static OUT_INCLUDED_CIDRS6: LpmTrie<CidrKey6, u8> =
    LpmTrie::with_max_entries(capacity::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "COUNTERS6")]
pub static COUNTERS6: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters6::LEN, 0);

#[inline(always)]
fn flag(bit: u32) -> bool {
    SETTINGS
        .get(config::FLAGS_INDEX)
        .is_some_and(|flags| flags & bit != 0)
}

#[inline(always)]
pub fn debug_enabled() -> bool {
    flag(config::FLAG_DEBUG)
}

/// Whether trace lines may use `%pI4` (kernel 5.13); else addresses go out as hex.
#[inline(always)]
pub fn printk_ip_supported() -> bool {
    flag(config::FLAG_PRINTK_IP)
}

#[inline(always)]
pub fn sockmap_enabled() -> bool {
    flag(config::FLAG_SOCKMAP)
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn count6(index: u32) {
    if let Some(counter) = COUNTERS6.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

/// The netns cookie of an enrolled pod on this node with this IPv6 address.
#[inline(always)]
pub fn local_pod6(ipv6: &Ipv6) -> Option<u64> {
    // SAFETY: plain-old-data value, copied out immediately.
    unsafe { POD_BY_IP6.get(ipv6) }.copied()
}

/// The netns cookie of an enrolled pod on this node with this IPv4 (network order).
#[inline(always)]
pub fn local_pod(ipv4: u32) -> Option<u64> {
    // SAFETY: plain-old-data value, copied out immediately.
    unsafe { POD_BY_IP.get(ipv4) }.copied()
}

#[inline(always)]
fn port_excluded_in(scope: u64, port: u16, direction: u8) -> bool {
    // SAFETY: plain-old-data value, only tested for presence.
    unsafe { PORT_EXCLUSIONS.get(PortRuleKey::new(scope, port, direction)) }.is_some()
}

/// Whether inbound connections to `port` of the pod whose netns cookie is `scope` are
/// left alone (global rules, the reserved ports among them, or the pod's own).
#[inline(always)]
pub fn inbound_port_excluded(scope: u64, port: u16) -> bool {
    port_excluded_in(rules::GLOBAL_SCOPE, port, rules::DIRECTION_INBOUND)
        || port_excluded_in(scope, port, rules::DIRECTION_INBOUND)
}

#[inline(always)]
fn cidr_match(trie: &LpmTrie<CidrKey, u8>, scope: u64, ipv4: u32) -> bool {
    let key = Key::new(CidrKey::SCOPE_BITS + 32, CidrKey::new(scope, ipv4));
    trie.get(&key).is_some()
}

#[inline(always)]
fn has_inclusion(scope: u64) -> bool {
    // SAFETY: plain-old-data value, copied out immediately.
    unsafe { SCOPE_FLAGS.get(scope) }.is_some_and(|flags| flags & rules::FLAG_HAS_INCLUSION != 0)
}

/// FSM's semantics: exclusions win; when the global or the pod's rules name an inclusion
/// list, only destinations in one of them are intercepted; pod rules add to global ones.
/// At most eight lookups, whatever the number of rules.
#[inline(always)]
pub fn outbound_intercepted(scope: u64, ipv4: u32, port: u16) -> bool {
    let global = rules::GLOBAL_SCOPE;
    if port_excluded_in(global, port, rules::DIRECTION_OUTBOUND)
        || port_excluded_in(scope, port, rules::DIRECTION_OUTBOUND)
        || cidr_match(&OUT_EXCLUDED_CIDRS, global, ipv4)
        || cidr_match(&OUT_EXCLUDED_CIDRS, scope, ipv4)
    {
        return false;
    }
    if has_inclusion(global) || has_inclusion(scope) {
        return cidr_match(&OUT_INCLUDED_CIDRS, global, ipv4)
            || cidr_match(&OUT_INCLUDED_CIDRS, scope, ipv4);
    }
    true
}

#[inline(always)]
fn cidr6_match(trie: &LpmTrie<CidrKey6, u8>, scope: u64, ipv6: &Ipv6) -> bool {
    let mut bytes = [0u8; 16];
    for (i, word) in ipv6.iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let key = Key::new(CidrKey6::SCOPE_BITS + 128, CidrKey6::new(scope, bytes));
    trie.get(&key).is_some()
}

/// [`outbound_intercepted`] for a native IPv6 destination: the same port rules (ports
/// know no family), the IPv6 tries, and the scope's inclusion flag, which covers both
/// families (an inclusion list that names only IPv4 ranges intercepts no IPv6).
#[inline(always)]
pub fn outbound_intercepted6(scope: u64, ipv6: &Ipv6, port: u16) -> bool {
    let global = rules::GLOBAL_SCOPE;
    if port_excluded_in(global, port, rules::DIRECTION_OUTBOUND)
        || port_excluded_in(scope, port, rules::DIRECTION_OUTBOUND)
        || cidr6_match(&OUT_EXCLUDED_CIDRS6, global, ipv6)
        || cidr6_match(&OUT_EXCLUDED_CIDRS6, scope, ipv6)
    {
        return false;
    }
    if has_inclusion(global) || has_inclusion(scope) {
        return cidr6_match(&OUT_INCLUDED_CIDRS6, global, ipv6)
            || cidr6_match(&OUT_INCLUDED_CIDRS6, scope, ipv6);
    }
    true
}
