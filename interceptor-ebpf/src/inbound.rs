//! tc ingress and egress on an enrolled pod's interface (attached inside its netns):
//! steer new TCP connections from outside the pod to the inbound listener 15003, and
//! give the replies their original source port back.
//!
//! Only a SYN starts a flow, so connections that began before enrollment are never
//! rewritten mid-stream. IP options are honoured (IHL), fragments after the first and
//! every non-TCP packet pass untouched.
//!
//! IPv6: up to [`MAX_EXT_HEADERS`] hop-by-hop, routing (with no segments left) and
//! destination-options headers are walked to reach TCP. A fragment header, AH, ESP, any
//! other extension header, a routing header with segments left (the packet is not at its
//! final destination), or more headers than the walk takes: the packet passes untouched
//! and `counters6::UNPARSED_PASSED` counts it; what is not parsed is never rewritten.
//! Link-local destinations are never steered.
use aya_ebpf::maps::HashMap;
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    bpf_printk,
    macros::classifier,
    programs::TcContext,
};
use interceptor_common::{
    counters, counters6, inbound_state, ipv6_local_only, InboundFlow, InboundKey, InboundKey6,
    Ipv6, INBOUND_PORT,
};

use crate::maps::{
    count, count6, debug_enabled, inbound_port_excluded, local_pod, local_pod6,
    printk_ip_supported, INBOUND_FLOWS, INBOUND_FLOWS6,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
/// IPv6 extension headers walked: hop-by-hop, routing, destination options.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DSTOPTS: u8 = 60;
/// IPv6 extension headers not walked (fragment, ESP, AH, mobility, HIP, shim6, the two
/// experimental numbers): counted when they stand between the IPv6 header and TCP.
const IPV6_UNWALKED: [u8; 8] = [44, 50, 51, 135, 139, 140, 253, 254];
/// How many extension headers are walked before giving up (pass and count).
const MAX_EXT_HEADERS: usize = 4;
const IPV6_HLEN: usize = 40;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// Offsets inside the TCP header.
const TCP_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_CHECKSUM: usize = 16;
/// `BPF_F_HDR_FIELD_MASK` size for a 2-byte field in `bpf_l4_csum_replace`.
const CSUM_FIELD_2: u64 = 2;

/// The parts of an IPv4/TCP packet the classifiers look at.
struct TcpPacket {
    saddr: u32,
    daddr: u32,
    /// Offset of the TCP header.
    l4: usize,
    sport: u16,
    dport: u16,
    flags: u8,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Option<TcpPacket> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    if proto != ETH_P_IP {
        return None;
    }
    let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
        return None;
    }
    // Later fragments carry no TCP header.
    if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?) & 0x1fff != 0 {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    Some(TcpPacket {
        saddr: ctx.load(ETH_HLEN + 12).ok()?,
        daddr: ctx.load(ETH_HLEN + 16).ok()?,
        l4,
        sport: u16::from_be(ctx.load::<u16>(l4).ok()?),
        dport: u16::from_be(ctx.load::<u16>(l4 + TCP_DPORT).ok()?),
        flags: ctx.load(l4 + TCP_FLAGS).ok()?,
    })
}

/// The parts of an IPv6/TCP packet the classifiers look at.
struct TcpPacket6 {
    saddr: Ipv6,
    daddr: Ipv6,
    /// Offset of the TCP header, past the walked extension headers.
    l4: usize,
    sport: u16,
    dport: u16,
    flags: u8,
}

#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    ctx.load::<u16>(12)
        .is_ok_and(|proto| u16::from_be(proto) == ETH_P_IPV6)
}

#[inline(always)]
fn parse6(ctx: &TcContext) -> Option<TcpPacket6> {
    let version: u8 = ctx.load(ETH_HLEN).ok()?;
    if version >> 4 != 6 {
        return None;
    }
    let mut next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
    let mut l4 = ETH_HLEN + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        if next != IPV6_HOPOPTS && next != IPV6_ROUTING && next != IPV6_DSTOPTS {
            break;
        }
        // Next header, length in 8-octet units beyond the first 8, and for a routing
        // header its type and segments left.
        let ext: [u8; 4] = ctx.load(l4).ok()?;
        if next == IPV6_ROUTING && ext[3] != 0 {
            count6(counters6::UNPARSED_PASSED);
            return None;
        }
        next = ext[0];
        l4 += (usize::from(ext[1]) + 1) * 8;
    }
    if next != IPPROTO_TCP {
        if next == IPV6_HOPOPTS
            || next == IPV6_ROUTING
            || next == IPV6_DSTOPTS
            || IPV6_UNWALKED.contains(&next)
        {
            count6(counters6::UNPARSED_PASSED);
        }
        // Anything else is another transport (UDP, ICMPv6, no next header): not ours.
        return None;
    }
    Some(TcpPacket6 {
        saddr: ctx.load(ETH_HLEN + 8).ok()?,
        daddr: ctx.load(ETH_HLEN + 24).ok()?,
        l4,
        sport: u16::from_be(ctx.load::<u16>(l4).ok()?),
        dport: u16::from_be(ctx.load::<u16>(l4 + TCP_DPORT).ok()?),
        flags: ctx.load(l4 + TCP_FLAGS).ok()?,
    })
}

/// What [`admit_syn`] counts, so one body serves both families' counters.
#[derive(Clone, Copy)]
enum Tally {
    Redirected,
    RecordFailed,
    TupleBusy,
}

#[inline(always)]
fn tally4(what: Tally) {
    count(match what {
        Tally::Redirected => counters::INBOUND_REDIRECTED,
        Tally::RecordFailed => counters::INBOUND_RECORD_FAILED,
        Tally::TupleBusy => counters::INBOUND_TUPLE_BUSY,
    });
}

#[inline(always)]
fn tally6(what: Tally) {
    count6(match what {
        Tally::Redirected => counters6::INBOUND_REDIRECTED,
        Tally::RecordFailed => counters6::INBOUND_RECORD_FAILED,
        Tally::TupleBusy => counters6::INBOUND_TUPLE_BUSY,
    });
}

/// A new flow (SYN without ACK) to port `dport` of an enrolled pod, not excluded: record
/// it under `key`, or refuse it (`Err`, the SYN is dropped) when that cannot be done.
#[inline(always)]
fn admit_syn<K>(
    flows: &HashMap<K, InboundFlow>,
    key: &K,
    dport: u16,
    // A generic, not a `fn` pointer: BPF has no indirect calls, so the counter must be
    // known at compile time.
    tally: impl Fn(Tally),
) -> Result<(), ()> {
    // SAFETY: plain-old-data value, copied out immediately.
    match unsafe { flows.get(key) }.map(|flow| flow.orig_port) {
        // A retransmitted SYN, or a stray one inside a live flow: the record stays as
        // it is (rewriting it half-open would let the sweep remove a live flow's).
        Some(port) if port == dport => {}
        // The key has no destination port because inside the pod every steered flow
        // ends on 15003: this SYN and the live flow would be one connection there,
        // and taking the record would break the live one. Refused, counted; the
        // client retries, and gets through once the other flow has closed (a
        // half-open one ages out).
        Some(_) => {
            tally(Tally::TupleBusy);
            return Err(());
        }
        None => {
            let flow = InboundFlow {
                orig_port: dport,
                state: inbound_state::HALF_OPEN,
                _pad: 0,
            };
            if flows.insert(key, flow, 0).is_err() {
                // Fail closed: without a record the reply could not be restored, and
                // passing the SYN on would reach the application around the proxy.
                // Dropped, counted; the client retransmits, and half-open records
                // age out (agent sweep).
                tally(Tally::RecordFailed);
                return Err(());
            }
        }
    }
    tally(Tally::Redirected);
    Ok(())
}

/// Rewrite the 2-byte port at `offset` (inside the TCP header) and fix the checksum.
#[inline(always)]
fn rewrite_port(ctx: &mut TcContext, l4: usize, offset: usize, from: u16, to: u16) -> bool {
    let (from_be, to_be) = (from.to_be(), to.to_be());
    ctx.l4_csum_replace(
        l4 + TCP_CHECKSUM,
        u64::from(from_be),
        u64::from(to_be),
        CSUM_FIELD_2,
    )
    .is_ok()
        && ctx.store(l4 + offset, &to_be, 0).is_ok()
}

#[classifier]
pub fn intercept_tc_ingress(mut ctx: TcContext) -> i32 {
    let steered = if is_ipv6(&ctx) {
        steer_ingress6(&mut ctx)
    } else {
        steer_ingress(&mut ctx)
    };
    match steered {
        // A packet half-rewritten (port without checksum), or a new flow that could not
        // be recorded, must not be delivered.
        Err(()) => TC_ACT_SHOT,
        Ok(()) => TC_ACT_OK,
    }
}

#[inline(always)]
fn steer_ingress(ctx: &mut TcContext) -> Result<(), ()> {
    let Some(packet) = parse(ctx) else {
        return Ok(());
    };
    let Some(netns) = local_pod(packet.daddr) else {
        return Ok(());
    };
    let key = InboundKey {
        client_ipv4: packet.saddr,
        pod_ipv4: packet.daddr,
        client_port: packet.sport,
        _pad: 0,
    };
    let new_flow = packet.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if new_flow {
        if inbound_port_excluded(netns, packet.dport) {
            return Ok(());
        }
        admit_syn(&INBOUND_FLOWS, &key, packet.dport, tally4)?;
        if debug_enabled() {
            // SAFETY: formats and arguments match; %pI4 only where the kernel has it.
            unsafe {
                if printk_ip_supported() {
                    bpf_printk!(
                        c"icpt: tc inbound netns=%llu port=%u -> 15003 from %pI4",
                        netns,
                        packet.dport as u32,
                        &packet.saddr as *const u32
                    );
                } else {
                    bpf_printk!(
                        c"icpt: tc inbound netns=%llu port=%u -> 15003 from ipx:%x",
                        netns,
                        packet.dport as u32,
                        u32::from_be(packet.saddr)
                    );
                }
            }
        }
    } else {
        // SAFETY: plain-old-data value, copied out immediately.
        match unsafe { INBOUND_FLOWS.get(key) } {
            Some(flow) if flow.orig_port == packet.dport => {}
            _ => return Ok(()),
        }
    }
    if !rewrite_port(ctx, packet.l4, TCP_DPORT, packet.dport, INBOUND_PORT) {
        return Err(());
    }
    if packet.flags & TCP_FLAG_RST != 0 {
        let _ = INBOUND_FLOWS.remove(key);
    }
    Ok(())
}

#[classifier]
pub fn intercept_tc_egress(mut ctx: TcContext) -> i32 {
    let restored = if is_ipv6(&ctx) {
        restore_egress6(&mut ctx)
    } else {
        restore_egress(&mut ctx)
    };
    match restored {
        Err(()) => TC_ACT_SHOT,
        Ok(()) => TC_ACT_OK,
    }
}

#[inline(always)]
fn restore_egress(ctx: &mut TcContext) -> Result<(), ()> {
    let Some(packet) = parse(ctx) else {
        return Ok(());
    };
    if packet.sport != INBOUND_PORT {
        return Ok(());
    }
    let key = InboundKey {
        client_ipv4: packet.daddr,
        pod_ipv4: packet.saddr,
        client_port: packet.dport,
        _pad: 0,
    };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(flow) = (unsafe { INBOUND_FLOWS.get(key) }).copied() else {
        return Ok(());
    };
    if !rewrite_port(ctx, packet.l4, 0, INBOUND_PORT, flow.orig_port) {
        return Err(());
    }
    if packet.flags & TCP_FLAG_RST != 0 {
        let _ = INBOUND_FLOWS.remove(key);
    }
    Ok(())
}

/// [`steer_ingress`] for IPv6.
#[inline(always)]
fn steer_ingress6(ctx: &mut TcContext) -> Result<(), ()> {
    let Some(packet) = parse6(ctx) else {
        return Ok(());
    };
    // A link-local destination is the pod's link, never a mesh flow (and the agent never
    // enrolls one; checked here so a stray map entry cannot change that).
    if ipv6_local_only(&packet.daddr) {
        return Ok(());
    }
    let Some(netns) = local_pod6(&packet.daddr) else {
        return Ok(());
    };
    let key = InboundKey6 {
        client_ipv6: packet.saddr,
        pod_ipv6: packet.daddr,
        client_port: packet.sport,
        _pad: 0,
    };
    let new_flow = packet.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN;
    if new_flow {
        if inbound_port_excluded(netns, packet.dport) {
            return Ok(());
        }
        admit_syn(&INBOUND_FLOWS6, &key, packet.dport, tally6)?;
        if debug_enabled() {
            // SAFETY: formats and arguments match.
            unsafe {
                bpf_printk!(
                    c"icpt: tc inbound6 netns=%llu port=%u -> 15003 sport=%u",
                    netns,
                    packet.dport as u32,
                    packet.sport as u32
                );
            }
        }
    } else {
        // SAFETY: plain-old-data value, copied out immediately.
        match unsafe { INBOUND_FLOWS6.get(key) } {
            Some(flow) if flow.orig_port == packet.dport => {}
            _ => return Ok(()),
        }
    }
    // The pseudo-header's addresses do not change: only the port enters the checksum.
    if !rewrite_port(ctx, packet.l4, TCP_DPORT, packet.dport, INBOUND_PORT) {
        return Err(());
    }
    if packet.flags & TCP_FLAG_RST != 0 {
        let _ = INBOUND_FLOWS6.remove(key);
    }
    Ok(())
}

/// [`restore_egress`] for IPv6.
#[inline(always)]
fn restore_egress6(ctx: &mut TcContext) -> Result<(), ()> {
    let Some(packet) = parse6(ctx) else {
        return Ok(());
    };
    if packet.sport != INBOUND_PORT {
        return Ok(());
    }
    let key = InboundKey6 {
        client_ipv6: packet.daddr,
        pod_ipv6: packet.saddr,
        client_port: packet.dport,
        _pad: 0,
    };
    // SAFETY: plain-old-data value, copied out immediately.
    let Some(flow) = (unsafe { INBOUND_FLOWS6.get(key) }).copied() else {
        return Ok(());
    };
    if !rewrite_port(ctx, packet.l4, 0, INBOUND_PORT, flow.orig_port) {
        return Err(());
    }
    if packet.flags & TCP_FLAG_RST != 0 {
        let _ = INBOUND_FLOWS6.remove(key);
    }
    Ok(())
}
