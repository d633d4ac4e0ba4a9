//! `sock_ops`: re-key original-destination records by 4-tuple once connections exist,
//! forget them when the connecting socket closes (inbound records when the proxy's side
//! does), and feed the SOCKHASH.
//!
//! IPv6 sockets get the same treatment in the IPv6 maps. A dual-stack (AF_INET6) socket
//! whose peer is an IPv4-mapped address carries an IPv4 connection: the kernel fills
//! `local_ip4`/`remote_ip4` for it as for an AF_INET socket (sock_ops reads them from the
//! socket's `skc_rcv_saddr`/`skc_daddr` whatever the family), so it is keyed in the IPv4
//! maps by the same 4-tuple the peer's AF_INET socket sees. The SOCKHASH stays IPv4-only
//! (AF_INET sockets): IPv6 pairs take the normal socket path.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    bpf_printk,
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use core::ptr::read_volatile;
use interceptor_common::{
    counters, counters6, inbound_state, is_proxy_mark, v4_mapped, FlowKey, FlowKey6, InboundKey,
    InboundKey6, Ipv6, INBOUND_PORT,
};

use crate::maps::{
    count, count6, debug_enabled, local_pod, printk_ip_supported, sockmap_enabled, INBOUND_FLOWS,
    INBOUND_FLOWS6, ORIG_DST6_BY_COOKIE, ORIG_DST6_BY_FLOW, ORIG_DST_BY_COOKIE, ORIG_DST_BY_FLOW,
    SOCK_PAIRS,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn intercept_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET {
        match ctx.op() {
            BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
                record_flow(&ctx);
                if remote_port(&ctx) == INBOUND_PORT && is_proxy_socket(&ctx) {
                    add_local_pair(&ctx);
                }
            }
            BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if ctx.local_port() == u32::from(INBOUND_PORT) => {
                // Called back when it closes, to remove the flow's tc record.
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
                mark_inbound_accepted(&ctx);
                add_local_pair(&ctx);
            }
            BPF_SOCK_OPS_STATE_CB => forget_flow(&ctx),
            _ => {}
        }
    } else if ctx.family() == AF_INET6 {
        sock_ops6(&ctx);
    }
    0
}

/// AF_INET6 sockets: an IPv4-mapped peer goes to the IPv4 records (see the module doc),
/// any other to the IPv6 ones.
#[inline(always)]
fn sock_ops6(ctx: &SockOpsContext) {
    let mapped = v4_mapped(&remote_ip6(ctx)).is_some();
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if mapped {
                record_flow(ctx);
            } else {
                record_flow6(ctx);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB if ctx.local_port() == u32::from(INBOUND_PORT) => {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            if mapped {
                mark_inbound_accepted(ctx);
            } else if let Some(flow) = INBOUND_FLOWS6.get_ptr_mut(inbound_key6(ctx)) {
                // SAFETY: a valid map value; a racing writer can only be tc re-recording
                // a SYN.
                unsafe { (*flow).state = inbound_state::ACCEPTED };
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if mapped {
                forget_flow(ctx);
            } else if ctx.arg(1) == TCP_CLOSE {
                if ctx.local_port() != u32::from(INBOUND_PORT) {
                    let _ = ORIG_DST6_BY_FLOW.remove(own_key6(ctx));
                } else {
                    let _ = INBOUND_FLOWS6.remove(inbound_key6(ctx));
                }
            }
        }
        _ => {}
    }
}

/// [`record_flow`] for a native IPv6 connection.
#[inline(always)]
fn record_flow6(ctx: &SockOpsContext) {
    // SAFETY: sock_ops context accepted by the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(pending) = (unsafe { ORIG_DST6_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = own_key6(ctx);
    let _ = ORIG_DST6_BY_COOKIE.remove(cookie);
    if ORIG_DST6_BY_FLOW.insert(key, pending.orig, 0).is_err() {
        // Fail closed, as IPv4: the proxy finds no original destination and refuses.
        count6(counters6::RECORD_FAILED);
        return;
    }
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    count6(counters6::FLOWS_RECORDED);
    if debug_enabled() {
        // SAFETY: formats and arguments match.
        unsafe {
            bpf_printk!(
                c"icpt: established6 netns=%llu port=%u orig_port=%u",
                pending.netns_cookie,
                key.src_port as u32,
                u16::from_be(pending.orig.port) as u32
            );
        }
    }
}

/// The inbound listener's (local) end and the client (remote) end of an IPv6 flow.
#[inline(always)]
fn inbound_key6(ctx: &SockOpsContext) -> InboundKey6 {
    InboundKey6 {
        client_ipv6: remote_ip6(ctx),
        pod_ipv6: local_ip6(ctx),
        client_port: remote_port(ctx),
        _pad: 0,
    }
}

/// This IPv6 socket's 4-tuple, local end first.
#[inline(always)]
fn own_key6(ctx: &SockOpsContext) -> FlowKey6 {
    FlowKey6 {
        src_ipv6: local_ip6(ctx),
        dst_ipv6: remote_ip6(ctx),
        src_port: ctx.local_port() as u16,
        dst_port: remote_port(ctx),
    }
}

/// `remote_ip6` one word at a time: sock_ops context fields take 4-byte loads only, and
/// LLVM must not widen them.
#[inline(always)]
fn remote_ip6(ctx: &SockOpsContext) -> Ipv6 {
    // SAFETY: ctx.ops is the live bpf_sock_ops of this callback.
    unsafe { read_words(&(*ctx.ops).remote_ip6) }
}

#[inline(always)]
fn local_ip6(ctx: &SockOpsContext) -> Ipv6 {
    // SAFETY: as above.
    unsafe { read_words(&(*ctx.ops).local_ip6) }
}

#[inline(always)]
unsafe fn read_words(words: *const [u32; 4]) -> Ipv6 {
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

/// The connect side reached ESTABLISHED: its 4-tuple now exists, re-key the record.
#[inline(always)]
fn record_flow(ctx: &SockOpsContext) {
    // SAFETY: sock_ops context accepted by the cookie helper.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(pending) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let orig = pending.orig;
    let key = own_key(ctx);
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    if ORIG_DST_BY_FLOW.insert(key, orig, 0).is_err() {
        // Fail closed: the proxy finds no original destination and refuses the
        // connection, which is never sent direct.
        count(counters::RECORD_FAILED);
        return;
    }
    // The record answers getpeername for this socket's whole life, so it goes when this
    // socket closes, not before (the proxy reads it once, at accept, while this socket
    // cannot have reached CLOSE without the proxy's side having answered its FIN).
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    count(counters::FLOWS_RECORDED);
    if debug_enabled() {
        // SAFETY: formats and arguments match; %pI4 (5.13) reads 4 bytes behind the
        // pointer, older kernels get the address as hex.
        unsafe {
            if printk_ip_supported() {
                bpf_printk!(
                    c"icpt: established netns=%llu port=%u orig=%pI4",
                    pending.netns_cookie,
                    key.src_port as u32,
                    &orig.ipv4 as *const u32
                );
            } else {
                bpf_printk!(
                    c"icpt: established netns=%llu port=%u orig=ipx:%x",
                    pending.netns_cookie,
                    key.src_port as u32,
                    u32::from_be(orig.ipv4)
                );
            }
        }
    }
}

/// The inbound listener's socket is established: its tc record (if tc steered it) is no
/// longer half-open, so the agent's sweep leaves it alone.
#[inline(always)]
fn mark_inbound_accepted(ctx: &SockOpsContext) {
    let key = InboundKey {
        client_ipv4: ctx.remote_ip4(),
        pod_ipv4: ctx.local_ip4(),
        client_port: remote_port(ctx),
        _pad: 0,
    };
    if let Some(flow) = INBOUND_FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value; a racing writer can only be tc re-recording a SYN.
        unsafe { (*flow).state = inbound_state::ACCEPTED };
    }
}

/// A watched socket closed. The connecting socket owns its ORIG_DST_BY_FLOW record
/// (getpeername reads it until the end); the inbound listener's socket owns the tc
/// record of its flow. Records are never evicted (a plain hash map), so these callbacks
/// are what frees them.
#[inline(always)]
fn forget_flow(ctx: &SockOpsContext) {
    if ctx.arg(1) != TCP_CLOSE {
        return;
    }
    if ctx.local_port() != u32::from(INBOUND_PORT) {
        let _ = ORIG_DST_BY_FLOW.remove(own_key(ctx));
        return;
    }
    // Seen from the proxy's accepted socket: the client is the remote end.
    let inbound = InboundKey {
        client_ipv4: ctx.remote_ip4(),
        pod_ipv4: ctx.local_ip4(),
        client_port: remote_port(ctx),
        _pad: 0,
    };
    let _ = INBOUND_FLOWS.remove(inbound);
}

/// With sockmap on, both ends of a proxy-to-proxy connection between pods on this node
/// (an outbound proxy's upstream socket and the peer pod's inbound listener socket) go
/// into the SOCKHASH so sk_msg hands bytes from one straight to the other.
///
/// Application sockets are deliberately left out: a socket in a SOCKHASH reads through
/// tcp_bpf, where (seen on 6.18) a blocking reader woken by its own writer thread gets a
/// spurious EAGAIN, and a sender whose peer reads slowly gets ENOMEM instead of
/// backpressure. The proxy copes with both; applications should never see them.
#[inline(always)]
fn add_local_pair(ctx: &SockOpsContext) {
    if !sockmap_enabled() || local_pod(ctx.remote_ip4()).is_none() {
        return;
    }
    let key = own_key(ctx);
    // SAFETY: ctx.ops is the live bpf_sock_ops of this callback.
    let ops = unsafe { &mut *ctx.ops };
    if SOCK_PAIRS.update(key, ops, BPF_ANY.into()).is_ok() {
        count(counters::SOCKMAP_ADDED);
    } else {
        count(counters::SOCKMAP_ADD_FAILED);
    }
}

/// Whether this socket carries one of the proxy's marks (its upstream sockets do).
#[inline(always)]
fn is_proxy_socket(ctx: &SockOpsContext) -> bool {
    // SAFETY: ctx.ops is valid; sk may be NULL for request sockets, checked before use.
    unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        !sk.is_null() && is_proxy_mark((*sk).mark)
    }
}

/// This socket's 4-tuple, local end first.
#[inline(always)]
fn own_key(ctx: &SockOpsContext) -> FlowKey {
    FlowKey {
        src_ipv4: ctx.local_ip4(),
        dst_ipv4: ctx.remote_ip4(),
        src_port: ctx.local_port() as u16,
        dst_port: remote_port(ctx),
    }
}

/// `remote_port` carries the network-order port in its upper 16 bits on little-endian.
#[inline(always)]
fn remote_port(ctx: &SockOpsContext) -> u16 {
    u16::from_be((ctx.remote_port() >> 16) as u16)
}
