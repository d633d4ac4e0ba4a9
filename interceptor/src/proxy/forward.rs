//! Full-duplex byte forwarding between the accepted and the upstream connection.
//!
//! A FIN on one side becomes a `shutdown(SHUT_WR)` on the other (half-close), and a reset
//! or error on either side resets both, so neither peer mistakes a failure for a clean end.
//!
//! Two copy paths: `splice(2)` through a pipe per direction keeps the bytes in the
//! kernel (the default), and a userspace copy for sockets that may be in the SOCKHASH
//! (`sk_msg` redirects land in a queue that `splice` does not read, and a redirected send
//! fails with ENOMEM instead of blocking when the peer reads slowly: retried here).
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Per-direction buffer (userspace copy) and pipe size (splice).
const BUFFER_BYTES: usize = 1024 * 1024;

/// How bytes move between the two sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// `splice(2)` through a pipe: no copy to userspace.
    #[default]
    Splice,
    /// read/write through a userspace buffer (required with sockmap).
    Userspace,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Forwarded {
    /// Bytes from the downstream (accepted) side to upstream.
    pub upstream_bytes: u64,
    /// Bytes from upstream back downstream.
    pub downstream_bytes: u64,
    /// Whether the exchange ended in an error that was propagated as a reset.
    pub reset: bool,
}

pub async fn forward(downstream: TcpStream, upstream: TcpStream, mode: CopyMode) -> Forwarded {
    let result = match mode {
        CopyMode::Splice => {
            let up = splice_one_way(&downstream, &upstream);
            let down = splice_one_way(&upstream, &downstream);
            tokio::try_join!(up, down)
        }
        CopyMode::Userspace => {
            let up = copy_one_way(&downstream, &upstream);
            let down = copy_one_way(&upstream, &downstream);
            tokio::try_join!(up, down)
        }
    };
    match result {
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

/// Move bytes from `from` to `to` until `from` reaches EOF, then half-close `to`.
async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_read, pipe_write) = pipe()?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut total = 0u64;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(
                    from.as_fd(),
                    None,
                    pipe_write.as_fd(),
                    None,
                    BUFFER_BYTES,
                    flags,
                )
                .map_err(io::Error::from)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_read.as_fd(), None, to.as_fd(), None, left, flags)
                    .map_err(io::Error::from)
            }) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer took no bytes",
                    ))
                }
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += filled as u64;
    }
}

/// Userspace buffer copy from `from` to `to` until EOF, then half-close `to`.
async fn copy_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    /// How long to wait before retrying a send the kernel refused with ENOMEM.
    const ENOMEM_BACKOFF: Duration = Duration::from_micros(200);
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut total = 0u64;
    loop {
        let filled = loop {
            from.readable().await?;
            match from.try_read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if filled == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(total);
        }
        let mut sent = 0;
        while sent < filled {
            to.writable().await?;
            match to.try_write(&buf[sent..filled]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer took no bytes",
                    ))
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    tokio::time::sleep(ENOMEM_BACKOFF).await;
                }
                Err(e) => return Err(e),
            }
        }
        total += filled as u64;
    }
}

/// A non-blocking pipe as large as the buffer, so one splice can move a whole window.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // Best effort: a smaller pipe (the default 64 KiB) only costs more syscalls.
    let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(BUFFER_BYTES as i32));
    Ok((read, write))
}
