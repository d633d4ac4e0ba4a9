//! `cgroup/connect4`: where redirection starts; `cgroup/getpeername4`: hiding it again.
use aya_ebpf::{
    bindings::bpf_sock,
    bpf_printk,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use core::ptr::write_volatile;
use interceptor_common::{
    counters, FlowKey, OrigDst, PendingConnect, INBOUND_PORT, NETNS_PROBE_IPV4, NETNS_PROBE_PORT,
    OUTBOUND_PORT, PROXY_MARK,
};

use crate::maps::{
    count, debug_enabled, inbound_port_excluded, local_pod, outbound_intercepted,
    printk_ip_supported, ENROLLED_NETNS, NETNS_PROBE, ORIG_DST_BY_COOKIE, ORIG_DST_BY_FLOW,
};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    // 1 lets the connect go on (rewritten or not), 0 refuses it with EPERM.
    match redirect_connect4(&ctx) {
        Verdict::Go => 1,
        Verdict::Refuse => 0,
    }
}

enum Verdict {
    Go,
    /// An enrolled pod's connect whose original destination could not be recorded: the
    /// mesh fails closed, it is never sent around the proxy.
    Refuse,
}

#[inline(always)]
fn redirect_connect4(ctx: &SockAddrContext) -> Verdict {
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
    if protocol == IPPROTO_UDP
        && dst_ip == u32::from_ne_bytes(NETNS_PROBE_IPV4)
        && dst_port_be == NETNS_PROBE_PORT.to_be()
    {
        answer_netns_probe(ctx);
        return Verdict::Go;
    }
    if protocol != IPPROTO_TCP || sk.is_null() {
        return Verdict::Go;
    }
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: sk is a valid PTR_TO_SOCKET for sock_addr programs.
    let mark = unsafe { (*(sk as *const bpf_sock)).mark };
    let (new_ip, new_port) = if mark == PROXY_MARK {
        // The proxy dialling a pod on this node: hand it to that pod's inbound listener,
        // unless it is the inbound proxy reaching the application in its own pod.
        match local_pod(dst_ip) {
            Some(owner)
                if owner != netns && !inbound_port_excluded(owner, u16::from_be(dst_port_be)) =>
            {
                (dst_ip, INBOUND_PORT)
            }
            _ => return Verdict::Go,
        }
    } else {
        // SAFETY: plain-old-data value, copied out immediately.
        let Some(pod) = (unsafe { ENROLLED_NETNS.get(netns) }).copied() else {
            return Verdict::Go;
        };
        // Loopback and the pod's own address stay inside the pod: never ours to route.
        let first_octet = dst_ip.to_ne_bytes()[0];
        if first_octet == 127 || dst_ip == pod.ipv4 || dst_ip == 0 {
            return Verdict::Go;
        }
        // Exclusions are applied before any record is written.
        if !outbound_intercepted(netns, dst_ip, u16::from_be(dst_port_be)) {
            return Verdict::Go;
        }
        // Redirect to the pod IP, not loopback, so the 4-tuple is unique on the node.
        (pod.ipv4, OUTBOUND_PORT)
    };
    // SAFETY: the socket cookie helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pending = PendingConnect {
        orig: OrigDst {
            ipv4: dst_ip,
            port: dst_port_be,
            _pad: 0,
        },
        netns_cookie: netns,
    };
    if ORIG_DST_BY_COOKIE.insert(cookie, pending, 0).is_err() {
        // Without a record the proxy could not recover the destination, and passing the
        // connect on unrewritten would bypass the mesh: refused and counted.
        count(counters::RECORD_FAILED);
        return Verdict::Refuse;
    }
    // SAFETY: user_ip4/user_port are writable for connect4; volatile keeps LLVM from
    // merging the two 4-byte stores into one 8-byte store the verifier rejects.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, new_ip);
        write_volatile(&mut (*sa).user_port, u32::from(new_port.to_be()));
    }
    count(if new_port == OUTBOUND_PORT {
        counters::REDIRECTED
    } else {
        counters::SAME_NODE_INBOUND
    });
    if debug_enabled() {
        let port = u16::from_be(dst_port_be) as u32;
        let orig_ip = &dst_ip as *const u32;
        let orig_hex = u32::from_be(dst_ip);
        // Three arguments at most: bpf_trace_printk takes no more before 5.16. Before
        // 5.13 it refuses %pI4, so the address goes out as hex there.
        // SAFETY: formats and arguments match; %pI4 reads 4 bytes behind the pointer.
        unsafe {
            match (new_port == OUTBOUND_PORT, printk_ip_supported()) {
                (true, true) => bpf_printk!(
                    c"icpt: connect4 netns=%llu orig=%pI4:%u -> proxy 15001",
                    netns,
                    orig_ip,
                    port
                ),
                (true, false) => bpf_printk!(
                    c"icpt: connect4 netns=%llu orig=ipx:%x:%u -> proxy 15001",
                    netns,
                    orig_hex,
                    port
                ),
                (false, true) => bpf_printk!(
                    c"icpt: connect4 netns=%llu orig=%pI4:%u -> inbound 15003",
                    netns,
                    orig_ip,
                    port
                ),
                (false, false) => bpf_printk!(
                    c"icpt: connect4 netns=%llu orig=ipx:%x:%u -> inbound 15003",
                    netns,
                    orig_hex,
                    port
                ),
            };
        }
    }
    Verdict::Go
}

/// The agent's netns probe (kernels without `SO_NETNS_COOKIE`): record this netns's
/// cookie under the probing socket's cookie, which the agent reads with `SO_COOKIE`. The
/// connect itself goes on untouched (a UDP connect to loopback sends nothing).
#[inline(always)]
fn answer_netns_probe(ctx: &SockAddrContext) {
    // SAFETY: both cookie helpers accept the sock_addr context.
    let (socket, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    let _ = NETNS_PROBE.insert(socket, netns, 0);
}

/// `cgroup/getpeername4` (5.8): an application whose connect was redirected asks who
/// its peer is; answer with the original destination, not the proxy's listener, so
/// redirection stays invisible to it.
#[cgroup_sock_addr(getpeername4)]
pub fn intercept_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx);
    1
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier guarantees ctx points at a bpf_sock_addr for this program.
    let (peer_ip, peer_port, sk) = unsafe {
        (
            (*sa).user_ip4,
            u16::from_be((*sa).user_port as u16),
            (*sa).__bindgen_anon_1.sk,
        )
    };
    if (peer_port != OUTBOUND_PORT && peer_port != INBOUND_PORT) || sk.is_null() {
        return;
    }
    // SAFETY: sk is a valid PTR_TO_SOCKET for sock_addr programs.
    let key = unsafe {
        let sk = sk as *const bpf_sock;
        FlowKey {
            src_ipv4: (*sk).src_ip4,
            dst_ipv4: peer_ip,
            src_port: (*sk).src_port as u16,
            dst_port: peer_port,
        }
    };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_FLOW.get(key) }).copied() else {
        return;
    };
    // SAFETY: user_ip4/user_port are writable for getpeername4; volatile as in connect4.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, orig.ipv4);
        write_volatile(&mut (*sa).user_port, u32::from(orig.port));
    }
}
