//! Every map the programs share, and the small helpers around the settings and counters.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use interceptor_common::{
    capacity, config, counters, EnrolledPod, FlowKey, InboundFlow, InboundKey, OrigDst,
    PendingConnect,
};

#[map(name = "ENROLLED_NETNS")]
pub static ENROLLED_NETNS: HashMap<u64, EnrolledPod> =
    HashMap::with_max_entries(capacity::ENROLLED_NETNS, 0);

#[map(name = "POD_BY_IP")]
pub static POD_BY_IP: HashMap<u32, u64> = HashMap::with_max_entries(capacity::POD_BY_IP, 0);

#[map(name = "ORIG_DST_BY_COOKIE")]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, PendingConnect> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_COOKIE, 0);

/// LRU is safe here: a record is needed only between ESTABLISHED and the proxy's
/// `SO_ORIGINAL_DST` call, microseconds later, so eviction cannot break a live flow.
#[map(name = "ORIG_DST_BY_FLOW")]
pub static ORIG_DST_BY_FLOW: LruHashMap<FlowKey, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_FLOW, 0);

#[map(name = "INBOUND_FLOWS")]
pub static INBOUND_FLOWS: HashMap<InboundKey, InboundFlow> =
    HashMap::with_max_entries(capacity::INBOUND_FLOWS, 0);

#[map(name = "INBOUND_PORT_EXCLUSIONS")]
pub static INBOUND_PORT_EXCLUSIONS: HashMap<u16, u8> =
    HashMap::with_max_entries(capacity::INBOUND_PORT_EXCLUSIONS, 0);

#[map(name = "SOCK_PAIRS")]
pub static SOCK_PAIRS: SockHash<FlowKey> = SockHash::with_max_entries(capacity::SOCK_PAIRS, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(config::LEN, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

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

/// The netns cookie of an enrolled pod on this node with this IPv4 (network order).
#[inline(always)]
pub fn local_pod(ipv4: u32) -> Option<u64> {
    // SAFETY: plain-old-data value, copied out immediately.
    unsafe { POD_BY_IP.get(ipv4) }.copied()
}

/// Whether tc must leave inbound connections to this port alone.
#[inline(always)]
pub fn inbound_port_excluded(port: u16) -> bool {
    // SAFETY: plain-old-data value, only tested for presence.
    unsafe { INBOUND_PORT_EXCLUSIONS.get(port) }.is_some()
}
