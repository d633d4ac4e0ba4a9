//! `cgroup/getsockopt`: answer `SOL_IP`/`SO_ORIGINAL_DST` (a `sockaddr_in`) and
//! `SOL_IPV6`/`IP6T_SO_ORIGINAL_DST` (a `sockaddr_in6`) for the proxy's accepted sockets;
//! pass every other call through untouched. An AF_INET6 socket accepted from an
//! IPv4-mapped peer (a dual-stack listener) is IPv4 on the wire and answers `SOL_IP`.
use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sockopt, programs::SockoptContext};
use core::ptr::{read_volatile, write_volatile};
use interceptor_common::{
    counters, counters6, v4_mapped, FlowKey, FlowKey6, InboundKey, InboundKey6, Ipv6, OrigDst,
    OrigDst6, INBOUND_PORT, IP6T_SO_ORIGINAL_DST, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
};

use crate::maps::{
    count, count6, INBOUND_FLOWS, INBOUND_FLOWS6, ORIG_DST6_BY_FLOW, ORIG_DST_BY_FLOW,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `sizeof(struct sockaddr_in)`.
const SOCKADDR_IN_LEN: usize = 16;
/// `sizeof(struct sockaddr_in6)`.
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn intercept_getsockopt(ctx: SockoptContext) -> i32 {
    let so = ctx.sockopt;
    // SAFETY: the verifier guarantees ctx points at a bpf_sockopt for this program.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    let answered = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => answer_original_dst(&ctx),
        (SOL_IPV6, IP6T_SO_ORIGINAL_DST) => answer_original_dst6(&ctx),
        _ => false,
    };
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
        if sk.is_null() {
            return false;
        }
        match read_volatile(&(*sk).family) {
            AF_INET => {}
            // Dual-stack listener, IPv4 client: the IPv4 fields hold the connection
            // (skc_rcv_saddr/skc_daddr, as for AF_INET).
            AF_INET6 if v4_mapped(&read_ip6(&(*sk).dst_ip6)).is_some() => {}
            _ => return false,
        }
        FlowKey {
            src_ipv4: (*sk).dst_ip4,
            dst_ipv4: (*sk).src_ip4,
            src_port: u16::from_be((*sk).dst_port),
            dst_port: (*sk).src_port as u16,
        }
    };
    let Some(orig) = lookup(&key) else {
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

/// connect4 records first (outbound, and same-node inbound), then what tc steered.
#[inline(always)]
fn lookup(key: &FlowKey) -> Option<OrigDst> {
    // SAFETY: plain-old-data values, copied out immediately.
    if let Some(orig) = unsafe { ORIG_DST_BY_FLOW.get(key) } {
        return Some(*orig);
    }
    if key.dst_port != INBOUND_PORT {
        return None;
    }
    let inbound = InboundKey {
        client_ipv4: key.src_ipv4,
        pod_ipv4: key.dst_ipv4,
        client_port: key.src_port,
        _pad: 0,
    };
    // SAFETY: as above.
    let flow = unsafe { INBOUND_FLOWS.get(inbound) }?;
    Some(OrigDst {
        ipv4: key.dst_ipv4,
        port: flow.orig_port.to_be(),
        _pad: 0,
    })
}

#[inline(always)]
unsafe fn read_ip6(words: *const [u32; 4]) -> Ipv6 {
    // SAFETY: the caller passes a readable socket field; one 4-byte load per word, the
    // only size the verifier allows for these fields.
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

/// `IP6T_SO_ORIGINAL_DST` for an accepted AF_INET6 socket of a native IPv6 connection.
#[inline(always)]
fn answer_original_dst6(ctx: &SockoptContext) -> bool {
    let so = ctx.sockopt;
    // SAFETY: sk is a valid PTR_TO_SOCKET for sockopt programs; fields read once.
    let key = unsafe {
        let sk = (*so).__bindgen_anon_1.sk as *const bpf_sock;
        if sk.is_null() || read_volatile(&(*sk).family) != AF_INET6 {
            return false;
        }
        FlowKey6 {
            src_ipv6: read_ip6(&(*sk).dst_ip6),
            dst_ipv6: read_ip6(&(*sk).src_ip6),
            src_port: u16::from_be(read_volatile(&(*sk).dst_port)),
            dst_port: read_volatile(&(*sk).src_port) as u16,
        }
    };
    if v4_mapped(&key.src_ipv6).is_some() {
        // IPv4 on the wire: SOL_IP answers it, as conntrack would.
        return false;
    }
    let Some(orig) = lookup6(&key) else {
        return false;
    };
    // SAFETY: bounds checked against optval_end before writing, as the verifier requires.
    unsafe {
        let optval = (*so).__bindgen_anon_2.optval as *mut u8;
        let optval_end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if optval.is_null() || optval.add(SOCKADDR_IN6_LEN) > optval_end {
            return false;
        }
        // sin6_family, sin6_port, sin6_flowinfo (0), sin6_addr, sin6_scope_id (0: the
        // original destination is never link-local, connect6 does not steer those).
        let mut sin6 = [0u8; SOCKADDR_IN6_LEN];
        sin6[0..2].copy_from_slice(&(AF_INET6 as u16).to_ne_bytes());
        sin6[2..4].copy_from_slice(&orig.port.to_ne_bytes());
        let mut i = 0;
        while i < 4 {
            sin6[8 + i * 4..12 + i * 4].copy_from_slice(&orig.ipv6[i].to_ne_bytes());
            i += 1;
        }
        core::ptr::copy_nonoverlapping(sin6.as_ptr(), optval, SOCKADDR_IN6_LEN);
        write_volatile(&mut (*so).optlen, SOCKADDR_IN6_LEN as i32);
        write_volatile(&mut (*so).retval, 0);
    }
    count6(counters6::ORIG_DST_ANSWERED);
    true
}

/// connect6 records first, then what tc steered, as [`lookup`].
#[inline(always)]
fn lookup6(key: &FlowKey6) -> Option<OrigDst6> {
    // SAFETY: plain-old-data values, copied out immediately.
    if let Some(orig) = unsafe { ORIG_DST6_BY_FLOW.get(key) } {
        return Some(*orig);
    }
    if key.dst_port != INBOUND_PORT {
        return None;
    }
    let inbound = InboundKey6 {
        client_ipv6: key.src_ipv6,
        pod_ipv6: key.dst_ipv6,
        client_port: key.src_port,
        _pad: 0,
    };
    // SAFETY: as above.
    let flow = unsafe { INBOUND_FLOWS6.get(inbound) }?;
    Some(OrigDst6 {
        ipv6: key.dst_ipv6,
        port: flow.orig_port.to_be(),
        _pad: 0,
    })
}
