//! Where the proxy's sockets come from. The proxy asks a [`SocketFactory`] for every
//! listener and upstream socket and never enters a network namespace itself: the in-pod
//! code (`inpod::InPodSockets`) makes them inside a pod's netns with the proxy mark, a
//! gateway uses [`HostSockets`]. This is ztunnel's `SocketFactory` split.
use std::future::Future;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// Makes the sockets of one place the proxy works in (a pod's netns, or this process's).
pub trait SocketFactory: Send + Sync + std::fmt::Debug {
    /// A non-blocking IPv4 TCP socket for a connection to an upstream.
    fn tcp(&self) -> io::Result<socket2::Socket>;

    /// A non-blocking IPv4 listener on `port` of every address, with `SO_REUSEPORT` (a
    /// hand-over's next agent listens beside it).
    fn listener(&self, port: u16) -> io::Result<std::net::TcpListener>;

    /// A non-blocking IPv6 TCP socket for a connection to an IPv6 upstream. Only
    /// factories of places with IPv6 interception make one; the default refuses.
    fn tcp6(&self) -> io::Result<socket2::Socket> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket factory makes no IPv6 sockets",
        ))
    }

    /// A non-blocking TCP socket of `source`'s family bound to `source`, an address that
    /// is not this place's (`IP_TRANSPARENT`/`IPV6_TRANSPARENT`, with the transparent
    /// mark the pod's policy route recognises): the inbound proxy's socket to the
    /// application, so that it sees the client's address. The default refuses (a place
    /// without the policy route could not get the replies back).
    fn transparent(&self, source: SocketAddr) -> io::Result<socket2::Socket> {
        let _ = source;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket factory makes no transparent sockets",
        ))
    }

    /// An IPv6-only listener on `port` of every IPv6 address, with `SO_REUSEPORT`: beside
    /// the IPv4 one from [`SocketFactory::listener`], which it leaves alone (a
    /// dual-stack one would take IPv4 connections as mapped addresses). The default
    /// refuses, like [`SocketFactory::tcp6`].
    fn listener6(&self, port: u16) -> io::Result<std::net::TcpListener> {
        let _ = port;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this socket factory makes no IPv6 listeners",
        ))
    }
}

/// Sockets in this process's netns, unmarked: a gateway's, and active checks of
/// endpoints that are not enrolled on this node.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostSockets;

impl SocketFactory for HostSockets {
    fn tcp(&self) -> io::Result<socket2::Socket> {
        nonblocking_tcp()
    }

    fn listener(&self, port: u16) -> io::Result<std::net::TcpListener> {
        reuseport_listener(port)
    }

    fn tcp6(&self) -> io::Result<socket2::Socket> {
        nonblocking_tcp6()
    }

    fn listener6(&self, port: u16) -> io::Result<std::net::TcpListener> {
        reuseport_listener6(port)
    }
}

/// Connect to `addr` with a socket from `sockets` (an IPv6 address gets one from
/// [`SocketFactory::tcp6`]), given up as timed out after `timeout`.
pub async fn connect(
    sockets: &dyn SocketFactory,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => sockets.tcp()?,
        SocketAddr::V6(_) => sockets.tcp6()?,
    };
    within(
        timeout,
        TcpSocket::from_std_stream(socket.into()).connect(addr),
    )
    .await
}

/// Connect `socket` (from a [`SocketFactory`], e.g. [`SocketFactory::transparent`]) to
/// `addr`, given up as timed out after `timeout`.
pub async fn connect_socket(
    socket: socket2::Socket,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    within(
        timeout,
        TcpSocket::from_std_stream(socket.into()).connect(addr),
    )
    .await
}

/// `connect`, given up as timed out after `timeout`.
async fn within(
    timeout: Duration,
    connect: impl Future<Output = io::Result<TcpStream>>,
) -> io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// An IPv4 TCP socket in the calling thread's netns, ready for tokio, with `TCP_NODELAY`
/// (a proxy passes on what it has at once; the application chose its own batching).
pub fn nonblocking_tcp() -> io::Result<socket2::Socket> {
    // Non-blocking from the start: one syscall instead of three.
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// [`nonblocking_tcp`] for IPv6.
pub fn nonblocking_tcp6() -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket)
}

/// [`reuseport_listener`] on every IPv6 address, `IPV6_V6ONLY`: the IPv4 listener on
/// the same port stays the one IPv4 connections reach, so nothing about them changes
/// (a dual-stack socket would report IPv4 clients as `::ffff:a.b.c.d` and conflict with
/// a hand-over partner's IPv4 listener).
pub fn reuseport_listener6(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = nonblocking_tcp6()?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// A listener on `port` of every IPv4 address of the calling thread's netns, with
/// `SO_REUSEADDR` and `SO_REUSEPORT`. Accepted sockets inherit its `TCP_NODELAY`, which
/// saves a syscall per connection.
pub fn reuseport_listener(port: u16) -> io::Result<std::net::TcpListener> {
    let socket = nonblocking_tcp()?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection `set_nodelay` calls are gone: both ends of a proxied
    /// connection must still have it, the accepted one by inheritance.
    #[tokio::test]
    async fn accepted_and_upstream_sockets_have_nodelay() {
        let listener = tokio::net::TcpListener::from_std(reuseport_listener(0).unwrap()).unwrap();
        let port = listener.local_addr().unwrap().port();
        let addr = std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, port);
        let (upstream, accepted) = tokio::join!(
            connect(&HostSockets, addr.into(), Duration::from_secs(5)),
            listener.accept()
        );
        assert!(upstream.unwrap().nodelay().unwrap());
        assert!(accepted.unwrap().0.nodelay().unwrap());
    }
}
