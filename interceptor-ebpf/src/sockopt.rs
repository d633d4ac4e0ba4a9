//! `cgroup/getsockopt`: answer `SOL_IP`/`SO_ORIGINAL_DST` for the proxy's accepted
//! sockets; pass every other call through untouched.
use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sockopt, programs::SockoptContext};
use core::ptr::{read_volatile, write_volatile};
use interceptor_common::{
    counters, FlowKey, InboundKey, OrigDst, INBOUND_PORT, SOL_IP, SO_ORIGINAL_DST,
};

use crate::maps::{count, INBOUND_FLOWS, ORIG_DST_BY_FLOW};

const AF_INET: u32 = 2;
/// `sizeof(struct sockaddr_in)`.
const SOCKADDR_IN_LEN: usize = 16;

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
