//! Full-duplex byte forwarding between the accepted and the upstream connection.
//!
//! A FIN on one side becomes a `shutdown(SHUT_WR)` on the other (half-close), and a reset
//! or error on either side resets both, so neither peer mistakes a failure for a clean end.
use std::time::Duration;

use tokio::net::TcpStream;

/// Per-direction buffer. Large enough that bulk transfers move in few syscalls.
const BUFFER_BYTES: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Forwarded {
    /// Bytes from the downstream (accepted) side to upstream.
    pub upstream_bytes: u64,
    /// Bytes from upstream back downstream.
    pub downstream_bytes: u64,
    /// Whether the exchange ended in an error that was propagated as a reset.
    pub reset: bool,
}

pub async fn forward(mut downstream: TcpStream, mut upstream: TcpStream) -> Forwarded {
    match tokio::io::copy_bidirectional_with_sizes(
        &mut downstream,
        &mut upstream,
        BUFFER_BYTES,
        BUFFER_BYTES,
    )
    .await
    {
        Ok((up, down)) => Forwarded {
            upstream_bytes: up,
            downstream_bytes: down,
            reset: false,
        },
        Err(_) => {
            reset_on_close(&downstream);
            reset_on_close(&upstream);
            Forwarded {
                reset: true,
                ..Forwarded::default()
            }
        }
    }
}

/// SO_LINGER 0: the close that follows sends RST instead of FIN.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}
