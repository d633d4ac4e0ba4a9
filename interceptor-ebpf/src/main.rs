//! The kernel side of interception (DESIGN.md §2).
//!
//! - [`outbound`]: `cgroup/connect4` steers an enrolled pod's connects to its outbound
//!   listener (15001), and the proxy's connects to a pod on this node to that pod's
//!   inbound listener (15003).
//! - [`flows`]: `sock_ops` re-keys those records by 4-tuple at ESTABLISHED, forgets them
//!   when the proxy's socket closes, and feeds the SOCKHASH when sockmap is on.
//! - [`sockopt`]: `cgroup/getsockopt` answers `SOL_IP`/`SO_ORIGINAL_DST`.
//! - [`inbound`]: tc ingress/egress on a pod's interface steer new TCP flows from other
//!   nodes to 15003 and restore the source port of the replies.
//! - [`sockmap`]: `sk_msg` hands a local sender's bytes straight to the peer socket.
//!
//! Helpers used, with the kernel that introduced them for these program types:
//! `bpf_get_netns_cookie` (sock_addr 5.7), `bpf_get_socket_cookie` (sock_addr and
//! sock_ops 5.0), `bpf_sock_ops_cb_flags_set` (4.16), `bpf_sock_hash_update` and
//! `bpf_msg_redirect_hash` (4.18), `bpf_skb_load_bytes`/`store_bytes`/`l4_csum_replace`
//! (4.x), `bpf_trace_printk` (4.1; its `%pI4` needs 5.13: below, addresses are printed as
//! `ipx:<hex>`, chosen at run time by the `FLAG_PRINTK_IP` setting).
//
// Built for bpfel-unknown-none by interceptor/build.rs; on the host (`cargo build
// --workspace`, clippy) it compiles as an empty binary so the workspace builds whole.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod flows;
mod inbound;
mod maps;
mod outbound;
mod sockmap;
mod sockopt;

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
