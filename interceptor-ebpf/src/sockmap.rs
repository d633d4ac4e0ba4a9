//! `sk_msg`: with sockmap on, a send on one end of a local connection goes straight to
//! the peer socket's receive queue, skipping the TCP/IP stack.
use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use interceptor_common::{counters, FlowKey};

use crate::maps::{count, SOCK_PAIRS};

#[sk_msg]
pub fn intercept_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the verifier guarantees ctx.msg points at this program's sk_msg_md.
    let peer = unsafe {
        let md = ctx.msg;
        // The peer's own key has its local end first: our remote end.
        FlowKey {
            src_ipv4: (*md).remote_ip4,
            dst_ipv4: (*md).local_ip4,
            src_port: u16::from_be(((*md).remote_port >> 16) as u16),
            dst_port: (*md).local_port as u16,
        }
    };
    if SOCK_PAIRS.redirect_msg(&ctx, peer, BPF_F_INGRESS.into()) == SK_PASS.into() {
        count(counters::SOCKMAP_REDIRECTED);
    }
    // Always pass: when the peer is not in the map the redirect was not set up and the
    // message takes the normal path; returning the helper's SK_DROP would fail the send.
    SK_PASS
}
