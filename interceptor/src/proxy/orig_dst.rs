//! `SO_ORIGINAL_DST`: the one call that answers "where was this connection going" under
//! both the eBPF getsockopt program and iptables REDIRECT (conntrack); and its IPv6 twin
//! `IP6T_SO_ORIGINAL_DST` (eBPF mode only so far).
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::{getsockopt, sockopt::OriginalDst};

/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h): the same number as
/// `SO_ORIGINAL_DST`, asked at `SOL_IPV6`; libc does not name it.
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

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

/// The original IPv6 destination of an accepted, redirected AF_INET6 connection.
pub fn original_dst6<S: AsFd>(socket: &S) -> std::io::Result<SocketAddrV6> {
    // SAFETY: a zeroed sockaddr_in6 is a valid value; the kernel writes at most `len`
    // bytes into it and the fd is borrowed for the call.
    let (sin6, len) = unsafe {
        let mut sin6: libc::sockaddr_in6 = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_IPV6,
            IP6T_SO_ORIGINAL_DST,
            (&mut sin6 as *mut libc::sockaddr_in6).cast(),
            &mut len,
        );
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        (sin6, len)
    };
    if len as usize != std::mem::size_of::<libc::sockaddr_in6>()
        || i32::from(sin6.sin6_family) != libc::AF_INET6
    {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "IP6T_SO_ORIGINAL_DST returned {len} bytes of address family {}",
                sin6.sin6_family
            ),
        ));
    }
    Ok(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        0,
        0,
    ))
}

/// The original destination of an accepted connection of either family, `peer` being
/// the address `accept` returned: its family is the listener's, which decides which
/// option answers (the IPv6 listeners are `IPV6_V6ONLY`, so an IPv6 socket never carries
/// an IPv4 flow). Taken from the peer rather than asked with `getsockname`: one syscall
/// less per connection.
pub fn original_dst_any(
    socket: &tokio::net::TcpStream,
    peer: SocketAddr,
) -> std::io::Result<SocketAddr> {
    match peer {
        SocketAddr::V4(_) => original_dst(socket).map(SocketAddr::V4),
        SocketAddr::V6(_) => original_dst6(socket).map(SocketAddr::V6),
    }
}
