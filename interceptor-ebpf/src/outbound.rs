//! `cgroup/connect4` and `cgroup/connect6`: where redirection starts;
//! `cgroup/getpeername4` and `cgroup/getpeername6`: hiding it again.
//!
//! A dual-stack socket connecting to an IPv4-mapped address (`::ffff:a.b.c.d`) runs
//! connect6, but its connection is IPv4 on the wire: it gets the IPv4 decision and
//! records, and goes to `::ffff:<pod IPv4>:15001`, where the proxy's IPv4 listener and
//! `SO_ORIGINAL_DST` see it as any IPv4 client.
use aya_ebpf::{
    bindings::bpf_sock,
    bpf_printk,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use core::ptr::{read_volatile, write_volatile};
use interceptor_common::{
    counters, counters6, ipv6_local_only, is_proxy_mark, to_v4_mapped, v4_mapped, FlowKey,
    FlowKey6, Ipv6, OrigDst, OrigDst6, PendingConnect, PendingConnect6, INBOUND_PORT,
    NETNS_PROBE_IPV4, NETNS_PROBE_PORT, OUTBOUND_PORT,
};

use crate::maps::{
    count, count6, debug_enabled, inbound_port_excluded, local_pod, local_pod6,
    outbound_intercepted, outbound_intercepted6, printk_ip_supported, ENROLLED_NETNS,
    ENROLLED_NETNS6, NETNS_PROBE, ORIG_DST6_BY_COOKIE, ORIG_DST6_BY_FLOW, ORIG_DST_BY_COOKIE,
    ORIG_DST_BY_FLOW,
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
    let Some((new_ip, new_port)) = decide4(sk, netns, dst_ip, dst_port_be) else {
        return Verdict::Go;
    };
    if !record4(ctx, netns, dst_ip, dst_port_be) {
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

/// Where an IPv4 connect (connect4, or connect6 to an IPv4-mapped address) goes: `None`
/// leaves it alone.
#[inline(always)]
fn decide4(sk: *mut bpf_sock, netns: u64, dst_ip: u32, dst_port_be: u16) -> Option<(u32, u16)> {
    // SAFETY: sk is a valid PTR_TO_SOCKET for sock_addr programs.
    let mark = unsafe { (*(sk as *const bpf_sock)).mark };
    Some(if is_proxy_mark(mark) {
        // The proxy dialling a pod on this node: hand it to that pod's inbound listener,
        // unless it is the inbound proxy reaching the application in its own pod (its
        // transparent sockets, TRANSPARENT_MARK, only ever do that).
        match local_pod(dst_ip) {
            Some(owner)
                if owner != netns && !inbound_port_excluded(owner, u16::from_be(dst_port_be)) =>
            {
                (dst_ip, INBOUND_PORT)
            }
            _ => return None,
        }
    } else {
        // SAFETY: plain-old-data value, copied out immediately.
        let pod = (unsafe { ENROLLED_NETNS.get(netns) }).copied()?;
        // Loopback and the pod's own address stay inside the pod: never ours to route.
        let first_octet = dst_ip.to_ne_bytes()[0];
        if first_octet == 127 || dst_ip == pod.ipv4 || dst_ip == 0 {
            return None;
        }
        // Exclusions are applied before any record is written.
        if !outbound_intercepted(netns, dst_ip, u16::from_be(dst_port_be)) {
            return None;
        }
        // Redirect to the pod IP, not loopback, so the 4-tuple is unique on the node.
        (pod.ipv4, OUTBOUND_PORT)
    })
}

/// Leave the original IPv4 destination for sock_ops under the socket's cookie; `false`
/// (counted) when it cannot be stored, and the connect must be refused.
#[inline(always)]
fn record4(ctx: &SockAddrContext, netns: u64, dst_ip: u32, dst_port_be: u16) -> bool {
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
        return false;
    }
    true
}

#[cgroup_sock_addr(connect6)]
pub fn intercept_connect6(ctx: SockAddrContext) -> i32 {
    // As connect4: 1 lets the connect go on, 0 refuses it with EPERM.
    match redirect_connect6(&ctx) {
        Verdict::Go => 1,
        Verdict::Refuse => 0,
    }
}

/// `user_ip6` one word at a time: the verifier allows 4-byte context loads, and LLVM
/// must not widen them.
#[inline(always)]
unsafe fn read_ip6(words: *const [u32; 4]) -> Ipv6 {
    // SAFETY: the caller passes a readable context field.
    unsafe {
        let words = words as *const u32;
        [
            read_volatile(words),
            read_volatile(words.add(1)),
            read_volatile(words.add(2)),
            read_volatile(words.add(3)),
        ]
    }
}

/// `user_ip6` written one word at a time, for the same reason.
#[inline(always)]
unsafe fn write_ip6(words: *mut [u32; 4], ip: Ipv6) {
    // SAFETY: the caller passes a writable context field.
    unsafe {
        let words = words as *mut u32;
        write_volatile(words, ip[0]);
        write_volatile(words.add(1), ip[1]);
        write_volatile(words.add(2), ip[2]);
        write_volatile(words.add(3), ip[3]);
    }
}

#[inline(always)]
fn redirect_connect6(ctx: &SockAddrContext) -> Verdict {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier guarantees ctx points at a bpf_sock_addr for this program.
    let (protocol, dst, dst_port_be, sk) = unsafe {
        (
            (*sa).protocol,
            read_ip6(&(*sa).user_ip6),
            (*sa).user_port as u16,
            (*sa).__bindgen_anon_1.sk,
        )
    };
    if protocol != IPPROTO_TCP || sk.is_null() {
        return Verdict::Go;
    }
    // SAFETY: bpf_get_netns_cookie accepts the sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(dst_ip) = v4_mapped(&dst) {
        // IPv4 on the wire: the IPv4 rules, records and counters, and the pod's IPv4
        // listener, reached through its mapped address.
        let Some((new_ip, new_port)) = decide4(sk, netns, dst_ip, dst_port_be) else {
            return Verdict::Go;
        };
        if !record4(ctx, netns, dst_ip, dst_port_be) {
            return Verdict::Refuse;
        }
        // SAFETY: user_ip6/user_port are writable for connect6.
        unsafe {
            write_ip6(&mut (*sa).user_ip6, to_v4_mapped(new_ip));
            write_volatile(&mut (*sa).user_port, u32::from(new_port.to_be()));
        }
        if new_port == OUTBOUND_PORT {
            count(counters::REDIRECTED);
            count6(counters6::V4_MAPPED_REDIRECTED);
        } else {
            count(counters::SAME_NODE_INBOUND);
        }
        trace6(netns, dst_port_be, new_port, true);
        return Verdict::Go;
    }
    // Loopback, link-local and the unspecified address stay inside the pod or on its
    // link: never ours to route (a link-local peer needs the pod's own interface).
    if ipv6_local_only(&dst) {
        return Verdict::Go;
    }
    let Some((new_ip, new_port)) = decide6(sk, netns, &dst, dst_port_be) else {
        return Verdict::Go;
    };
    // SAFETY: the socket cookie helper accepts the sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pending = PendingConnect6 {
        orig: OrigDst6 {
            ipv6: dst,
            port: dst_port_be,
            _pad: 0,
        },
        _pad: 0,
        netns_cookie: netns,
    };
    if ORIG_DST6_BY_COOKIE.insert(cookie, pending, 0).is_err() {
        // Fail closed, as connect4.
        count6(counters6::RECORD_FAILED);
        return Verdict::Refuse;
    }
    // SAFETY: user_ip6/user_port are writable for connect6.
    unsafe {
        write_ip6(&mut (*sa).user_ip6, new_ip);
        write_volatile(&mut (*sa).user_port, u32::from(new_port.to_be()));
    }
    count6(if new_port == OUTBOUND_PORT {
        counters6::REDIRECTED
    } else {
        counters6::SAME_NODE_INBOUND
    });
    trace6(netns, dst_port_be, new_port, false);
    Verdict::Go
}

/// [`decide4`] for a native IPv6 destination. A pod without an IPv6 address (no
/// ENROLLED_NETNS6 entry) is left alone: a flow of the other family to a single-family
/// pod is not the mesh's.
#[inline(always)]
fn decide6(sk: *mut bpf_sock, netns: u64, dst: &Ipv6, dst_port_be: u16) -> Option<(Ipv6, u16)> {
    // SAFETY: sk is a valid PTR_TO_SOCKET for sock_addr programs.
    let mark = unsafe { (*(sk as *const bpf_sock)).mark };
    let port = u16::from_be(dst_port_be);
    if is_proxy_mark(mark) {
        return match local_pod6(dst) {
            Some(owner) if owner != netns && !inbound_port_excluded(owner, port) => {
                Some((*dst, INBOUND_PORT))
            }
            _ => None,
        };
    }
    // SAFETY: plain-old-data value, copied out immediately.
    let pod = (unsafe { ENROLLED_NETNS6.get(netns) }).copied()?;
    if *dst == pod.ipv6 || !outbound_intercepted6(netns, dst, port) {
        return None;
    }
    Some((pod.ipv6, OUTBOUND_PORT))
}

/// A connect6 trace line; addresses are left out (`%pI6` needs 5.13, and the netns and
/// port name the connection well enough for `interceptor trace`).
#[inline(always)]
fn trace6(netns: u64, dst_port_be: u16, new_port: u16, mapped: bool) {
    if !debug_enabled() {
        return;
    }
    let port = u32::from(u16::from_be(dst_port_be));
    let mapped = u32::from(mapped);
    // SAFETY: formats and arguments match.
    unsafe {
        if new_port == OUTBOUND_PORT {
            bpf_printk!(
                c"icpt: connect6 netns=%llu port=%u v4mapped=%u -> proxy 15001",
                netns,
                port,
                mapped
            );
        } else {
            bpf_printk!(
                c"icpt: connect6 netns=%llu port=%u v4mapped=%u -> inbound 15003",
                netns,
                port,
                mapped
            );
        }
    }
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

/// `cgroup/getpeername6` (5.8): [`intercept_getpeername4`] for IPv6 sockets, including a
/// dual-stack socket whose peer is an IPv4-mapped address (answered from the IPv4
/// records, as a mapped address).
#[cgroup_sock_addr(getpeername6)]
pub fn intercept_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer6(&ctx);
    1
}

#[inline(always)]
fn restore_peer6(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier guarantees ctx points at a bpf_sock_addr for this program.
    let (peer, peer_port, sk) = unsafe {
        (
            read_ip6(&(*sa).user_ip6),
            u16::from_be((*sa).user_port as u16),
            (*sa).__bindgen_anon_1.sk,
        )
    };
    if (peer_port != OUTBOUND_PORT && peer_port != INBOUND_PORT) || sk.is_null() {
        return;
    }
    let sk = sk as *const bpf_sock;
    let (orig_ip, orig_port) = if let Some(peer_ip) = v4_mapped(&peer) {
        // SAFETY: sk is a valid PTR_TO_SOCKET; src_ip4 holds the IPv4 source of a mapped
        // connection (the kernel's skc_rcv_saddr).
        let key = unsafe {
            FlowKey {
                src_ipv4: read_volatile(&(*sk).src_ip4),
                dst_ipv4: peer_ip,
                src_port: read_volatile(&(*sk).src_port) as u16,
                dst_port: peer_port,
            }
        };
        // SAFETY: plain-old-data value, copied out immediately.
        let Some(orig) = (unsafe { ORIG_DST_BY_FLOW.get(key) }).copied() else {
            return;
        };
        (to_v4_mapped(orig.ipv4), orig.port)
    } else {
        // SAFETY: as above.
        let key = unsafe {
            FlowKey6 {
                src_ipv6: read_ip6(&(*sk).src_ip6),
                dst_ipv6: peer,
                src_port: read_volatile(&(*sk).src_port) as u16,
                dst_port: peer_port,
            }
        };
        // SAFETY: plain-old-data value, copied out immediately.
        let Some(orig) = (unsafe { ORIG_DST6_BY_FLOW.get(key) }).copied() else {
            return;
        };
        (orig.ipv6, orig.port)
    };
    // SAFETY: user_ip6/user_port are writable for getpeername6.
    unsafe {
        write_ip6(&mut (*sa).user_ip6, orig_ip);
        write_volatile(&mut (*sa).user_port, u32::from(orig_port));
    }
}
