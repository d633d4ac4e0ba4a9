//! The kernel side of interception: cgroup connect4, sock_ops and getsockopt programs.
//!
//! Outbound flow for an enrolled pod (see DESIGN.md §2):
//! 1. `intercept_connect4` records the original destination under the socket cookie and
//!    rewrites the connect to `<pod IP>:15001`, the pod's in-netns proxy listener.
//! 2. `intercept_sock_ops` re-keys that record by the 4-tuple once the connection is
//!    established; the tuple is node-wide unique because it uses the pod IP, not loopback.
//! 3. `intercept_getsockopt` answers the proxy's `SOL_IP`/`SO_ORIGINAL_DST` from the
//!    4-tuple record; every other getsockopt passes through untouched.
//!
//! Helpers used, with the kernel that introduced them for these program types:
//! `bpf_get_netns_cookie` (sock_addr 5.7, sock_ops 5.15), `bpf_get_socket_cookie`
//! (sock_addr 5.0, sock_ops 5.0), `bpf_sock_ops_cb_flags_set` (4.16), `bpf_trace_printk`
//! with `%pI4` (5.13 for pointer formats).
// Built for bpfel-unknown-none by interceptor/build.rs; on the host (`cargo build
// --workspace`, clippy) it compiles as an empty binary so the workspace builds whole.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    bpf_printk,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_common::{
    capacity, config, counters, EnrolledPod, FlowKey, OrigDst, OUTBOUND_PORT, PROXY_MARK, SOL_IP,
    SO_ORIGINAL_DST,
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
/// `sizeof(struct sockaddr_in)`.
const SOCKADDR_IN_LEN: usize = 16;

#[map(name = "ENROLLED_NETNS")]
static ENROLLED_NETNS: HashMap<u64, EnrolledPod> =
    HashMap::with_max_entries(capacity::ENROLLED_NETNS, 0);

#[map(name = "ORIG_DST_BY_COOKIE")]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_COOKIE, 0);

#[map(name = "ORIG_DST_BY_FLOW")]
static ORIG_DST_BY_FLOW: LruHashMap<FlowKey, OrigDst> =
    LruHashMap::with_max_entries(capacity::ORIG_DST_BY_FLOW, 0);

#[map(name = "SETTINGS")]
static SETTINGS: Array<u32> = Array::with_max_entries(config::LEN, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

#[inline(always)]
fn debug_enabled() -> bool {
    SETTINGS
        .get(config::FLAGS_INDEX)
        .is_some_and(|flags| flags & config::FLAG_DEBUG != 0)
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while we run.
        unsafe { *counter += 1 };
    }
}

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    redirect_connect4(&ctx);
    // Never refuse a connect: interception is best-effort routing, not policy.
    1
}

#[inline(always)]
fn redirect_connect4(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier guarantees ctx points at a bpf_sock_addr for this program.
    let (protocol, dst_ip, dst_port_be, sk) = unsafe {
        (
            (*sa).protocol,
            (*sa).user_ip4,
            (*sa).user_port as u16,
            (*sa).__bindgen_anon_1.sk,
        )
    };
    if protocol != IPPROTO_TCP || sk.is_null() {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(pod) = (unsafe { ENROLLED_NETNS.get(netns) }).copied() else {
        return;
    };
    // SAFETY: sk is a valid PTR_TO_SOCKET for sock_addr programs.
    let mark = unsafe { (*(sk as *const bpf_sock)).mark };
    if mark == PROXY_MARK {
        return;
    }
    // Loopback and the pod's own address stay inside the pod: never ours to route.
    let first_octet = dst_ip.to_ne_bytes()[0];
    if first_octet == 127 || dst_ip == pod.ipv4 || dst_ip == 0 {
        return;
    }
    // SAFETY: the socket cookie helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        ipv4: dst_ip,
        port: dst_port_be,
        _pad: 0,
    };
    if ORIG_DST_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Without a record the proxy could not recover the destination: let it pass.
        count(counters::RECORD_FAILED);
        return;
    }
    // SAFETY: user_ip4/user_port are writable for connect4; volatile keeps LLVM from
    // merging the two 4-byte stores into one 8-byte store the verifier rejects.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, pod.ipv4);
        write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    count(counters::REDIRECTED);
    if debug_enabled() {
        // SAFETY: format and arguments match; %pI4 reads 4 bytes behind the pointer.
        unsafe {
            bpf_printk!(
                c"icpt: connect4 netns=%llu orig=%pI4:%u -> proxy 15001",
                netns,
                &dst_ip as *const u32,
                u16::from_be(dst_port_be) as u32
            );
        }
    }
}

#[sock_ops]
pub fn intercept_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_flow(&ctx),
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => watch_proxy_side(&ctx),
            BPF_SOCK_OPS_STATE_CB => forget_flow(&ctx),
            _ => {}
        }
    }
    0
}

/// The connect side reached ESTABLISHED: its 4-tuple now exists, re-key the record.
#[inline(always)]
fn record_flow(ctx: &SockOpsContext) {
    // SAFETY: sock_ops context accepted by the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = FlowKey {
        src_ipv4: ctx.local_ip4(),
        dst_ipv4: ctx.remote_ip4(),
        src_port: ctx.local_port() as u16,
        dst_port: remote_port(ctx),
    };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    if ORIG_DST_BY_FLOW.insert(key, orig, 0).is_err() {
        count(counters::RECORD_FAILED);
        return;
    }
    count(counters::FLOWS_RECORDED);
    if debug_enabled() {
        // SAFETY: format and arguments match.
        unsafe {
            bpf_printk!(
                c"icpt: established %pI4:%u orig=%pI4",
                &key.src_ipv4 as *const u32,
                key.src_port as u32,
                &orig.ipv4 as *const u32
            );
        }
    }
}

/// The proxy accepted a redirected connection: ask for a callback when it closes, so
/// the flow record goes away with the connection rather than waiting for LRU eviction.
#[inline(always)]
fn watch_proxy_side(ctx: &SockOpsContext) {
    if ctx.local_port() != u32::from(OUTBOUND_PORT) {
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn forget_flow(ctx: &SockOpsContext) {
    if ctx.arg(1) != TCP_CLOSE || ctx.local_port() != u32::from(OUTBOUND_PORT) {
        return;
    }
    // Seen from the proxy's accepted socket: the client is the remote end.
    let key = FlowKey {
        src_ipv4: ctx.remote_ip4(),
        dst_ipv4: ctx.local_ip4(),
        src_port: remote_port(ctx),
        dst_port: OUTBOUND_PORT,
    };
    let _ = ORIG_DST_BY_FLOW.remove(key);
}

/// `remote_port` carries the network-order port in its upper 16 bits on little-endian.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    u16::from_be((ctx.remote_port() >> 16) as u16)
}

#[cgroup_sockopt(getsockopt)]
pub fn intercept_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the verifier guarantees ctx points at a bpf_sockopt for this program.
    let answered = unsafe { (*so).level == SOL_IP && (*so).optname == SO_ORIGINAL_DST }
        && answer_original_dst(&ctx);
    if !answered {
        // optlen = 0 tells the kernel to ignore our copy of the buffer and return what
        // the kernel itself produced: a true pass-through, whatever the caller's optlen.
        // SAFETY: optlen is writable in getsockopt programs.
        unsafe { write_volatile(&mut (*so).optlen, 0) };
    }
    1
}

#[inline(always)]
fn answer_original_dst(ctx: &SockoptContext) -> bool {
    let so = ctx.sockopt;
    // SAFETY: sk is a valid PTR_TO_SOCKET for sockopt programs; fields read once.
    let key = unsafe {
        let sk = (*so).__bindgen_anon_1.sk as *const bpf_sock;
        if sk.is_null() || read_volatile(&(*sk).family) != AF_INET {
            return false;
        }
        FlowKey {
            src_ipv4: (*sk).dst_ip4,
            dst_ipv4: (*sk).src_ip4,
            src_port: u16::from_be((*sk).dst_port),
            dst_port: (*sk).src_port as u16,
        }
    };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_FLOW.get(key) }).copied() else {
        // Not ours: under iptables REDIRECT the kernel's conntrack answer passes through.
        return false;
    };
    // SAFETY: bounds checked against optval_end before writing, as the verifier requires.
    unsafe {
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let optval_end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if optval.is_null() || optval.add(SOCKADDR_IN_LEN) > optval_end {
            return false;
        }
        let mut sin = [0u8; SOCKADDR_IN_LEN];
        sin[0..2].copy_from_slice(&(AF_INET as u16).to_ne_bytes());
        sin[2..4].copy_from_slice(&orig.port.to_ne_bytes());
        sin[4..8].copy_from_slice(&orig.ipv4.to_ne_bytes());
        core::ptr::copy_nonoverlapping(sin.as_ptr(), optval, SOCKADDR_IN_LEN);
        write_volatile(&mut (*so).optlen, SOCKADDR_IN_LEN as i32);
        write_volatile(&mut (*so).retval, 0);
    }
    count(counters::ORIG_DST_ANSWERED);
    true
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
