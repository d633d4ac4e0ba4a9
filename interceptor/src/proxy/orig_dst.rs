//! `SO_ORIGINAL_DST`: the one call that answers "where was this connection going" under
//! both the eBPF getsockopt program and iptables REDIRECT (conntrack).
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};

/// The original IPv4 destination of an accepted, redirected connection.
pub fn original_dst<S: AsFd>(socket: &S) -> std::io::Result<SocketAddrV4> {
    let sin = getsockopt(socket, OriginalDst).map_err(std::io::Error::from)?;
    if i32::from(sin.sin_family) != libc::AF_INET {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST returned address family {}", sin.sin_family),
        ));
    }
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)))
}
