//! The proxy's sockets for one pod: made inside the pod's netns by entering it on the
//! calling thread, so the proxy never touches namespaces itself (it only sees the
//! [`SocketFactory`]). Upstream sockets carry the proxy mark, which the eBPF programs and
//! the iptables chains let through untouched; transparent ones (bound to a client's
//! address) the transparent mark, which they let through too.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use interceptor_common::{PROXY_MARK, TRANSPARENT_MARK};

use super::PodNetns;
use crate::proxy::socket::{
    nonblocking_tcp, nonblocking_tcp6, reuseport_listener, reuseport_listener6, SocketFactory,
};

/// Sockets in one enrolled pod's netns.
#[derive(Debug, Clone)]
pub struct InPodSockets {
    netns: Arc<PodNetns>,
}

impl InPodSockets {
    pub fn new(netns: Arc<PodNetns>) -> Self {
        Self { netns }
    }
}

impl SocketFactory for InPodSockets {
    fn tcp(&self) -> io::Result<socket2::Socket> {
        self.netns.run_blocking(|| {
            let socket = nonblocking_tcp()?;
            socket.set_mark(PROXY_MARK)?;
            Ok(socket)
        })?
    }

    fn listener(&self, port: u16) -> io::Result<std::net::TcpListener> {
        self.netns.run_blocking(|| {
            allow_request_migration();
            reuseport_listener(port)
        })?
    }

    fn tcp6(&self) -> io::Result<socket2::Socket> {
        self.netns.run_blocking(|| {
            let socket = nonblocking_tcp6()?;
            socket.set_mark(PROXY_MARK)?;
            Ok(socket)
        })?
    }

    fn transparent(&self, source: SocketAddr) -> io::Result<socket2::Socket> {
        self.netns.run_blocking(|| {
            let socket = match source {
                SocketAddr::V4(_) => {
                    let socket = nonblocking_tcp()?;
                    socket.set_ip_transparent_v4(true)?;
                    socket
                }
                SocketAddr::V6(_) => {
                    let socket = nonblocking_tcp6()?;
                    socket.set_ip_transparent_v6(true)?;
                    socket
                }
            };
            socket.set_mark(TRANSPARENT_MARK)?;
            // The client's port may be in TIME_WAIT here from an earlier connection of
            // the same client port (the app closed first).
            socket.set_reuse_address(true)?;
            socket.bind(&source.into())?;
            Ok(socket)
        })?
    }

    fn listener6(&self, port: u16) -> io::Result<std::net::TcpListener> {
        // tcp_migrate_req (an ipv4 sysctl) covers IPv6 sockets too; set by `listener`.
        self.netns.run_blocking(|| reuseport_listener6(port))?
    }
}

impl From<super::InpodError> for io::Error {
    fn from(error: super::InpodError) -> Self {
        io::Error::other(error)
    }
}

/// The pod netns sysctl that moves connections still in a closing listener's accept
/// queue to another listener of its `SO_REUSEPORT` group (kernel 5.14).
const MIGRATE_REQ_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Turn on `net.ipv4.tcp_migrate_req` in the calling thread's netns (net sysctls are
/// per netns, resolved from the thread that opens the file). Without it, a connection
/// the kernel queued on the old agent's listener just before that listener closed at a
/// hand-over is reset; with it, the kernel hands it to the new agent's listener. Older
/// kernels lack the sysctl (logged at debug level): the hand-over then has that window.
fn allow_request_migration() {
    match std::fs::read_to_string(MIGRATE_REQ_SYSCTL) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => {
            if let Err(error) = std::fs::write(MIGRATE_REQ_SYSCTL, "1") {
                tracing::warn!(%error, "setting {MIGRATE_REQ_SYSCTL} in a pod netns");
            }
        }
        Err(error) => tracing::debug!(%error, "no {MIGRATE_REQ_SYSCTL} (kernel before 5.14)"),
    }
}
