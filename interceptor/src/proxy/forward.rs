//! Full-duplex byte forwarding between the accepted and the upstream connection.
//!
//! A FIN on one side becomes a `shutdown(SHUT_WR)` on the other (half-close), and a reset
//! or error on either side resets both, so neither peer mistakes a failure for a clean end.
//!
//! Two copy paths: `splice(2)` through a pipe per direction keeps the bytes in the
//! kernel (the default), and a userspace copy for sockets that may be in the SOCKHASH
//! (`sk_msg` redirects land in a queue that `splice` does not read, and a redirected send
//! fails with ENOMEM instead of blocking when the peer reads slowly: retried here).
//!
//! In splice mode a direction starts with small chunks through a short-lived userspace
//! buffer (a read and a write, with no pipe), and moves to splice the first time a read
//! fills the buffer: requests, responses and handshakes cost two syscalls per chunk
//! instead of three and take no pipe; bulk stays in the kernel.
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Largest per-direction buffer (userspace copy) and pipe size (splice).
const BUFFER_BYTES: usize = 1024 * 1024;
/// A new pipe's size.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;
/// First userspace buffer of a direction.
const FIRST_BUFFER_BYTES: usize = 16 * 1024;

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

/// The bytes delivered each way are counted as they go, so a connection that ends in a
/// reset still reports what it carried before it.
pub async fn forward(downstream: TcpStream, upstream: TcpStream, mode: CopyMode) -> Forwarded {
    let (mut up_bytes, mut down_bytes) = (0u64, 0u64);
    let result = match mode {
        CopyMode::Splice => {
            // The pipes live here, outside the two directions, so that when one direction
            // fails (a reset) and the other is dropped, both can still go back to the pool.
            let (mut up_pipe, mut down_pipe) = (None, None);
            let result = {
                let up = splice_with(&downstream, &upstream, &mut up_pipe, &mut up_bytes);
                let down = splice_with(&upstream, &downstream, &mut down_pipe, &mut down_bytes);
                tokio::try_join!(up, down)
            };
            for pipe in [up_pipe, down_pipe].into_iter().flatten() {
                pipe.give_back();
            }
            result
        }
        CopyMode::Userspace => {
            let up = copy_one_way(&downstream, &upstream, &mut up_bytes);
            let down = copy_one_way(&upstream, &downstream, &mut down_bytes);
            tokio::try_join!(up, down)
        }
    };
    let reset = result.is_err();
    if reset {
        reset_on_close(&downstream);
        reset_on_close(&upstream);
    }
    Forwarded {
        upstream_bytes: up_bytes,
        downstream_bytes: down_bytes,
        reset,
    }
}

/// SO_LINGER 0: the close that follows sends RST instead of FIN.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Move bytes from `from` to `to` until `from` reaches EOF, then half-close `to`: small
/// chunks through a buffer of [`FIRST_BUFFER_BYTES`] allocated per chunk (an idle
/// connection holds none), then, once a read fills it, by splice through a pipe taken into
/// `slot`. `total` counts the bytes written to `to`.
async fn splice_with(
    from: &TcpStream,
    to: &TcpStream,
    slot: &mut Option<Pipe>,
    total: &mut u64,
) -> io::Result<()> {
    while slot.is_none() {
        let mut chunk = Vec::new();
        let filled = read_chunk(from, &mut chunk, FIRST_BUFFER_BYTES).await?;
        if filled == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        write_all(to, &chunk, OnNoMemory::Fail).await?;
        *total += filled as u64;
        if filled >= FIRST_BUFFER_BYTES {
            *slot = Some(Pipe::take()?);
        }
    }
    let Some(pipe) = slot else {
        unreachable!("the loop above ends with a pipe");
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await?;
        let filled = match from.try_io(Interest::READABLE, || {
            splice(
                from.as_fd(),
                None,
                pipe.write.as_fd(),
                None,
                pipe.capacity,
                flags,
            )
            .map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if filled == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        pipe.queued = filled;
        while pipe.queued > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(
                    pipe.read.as_fd(),
                    None,
                    to.as_fd(),
                    None,
                    pipe.queued,
                    flags,
                )
                .map_err(io::Error::from)
            }) {
                // Bytes left in the pipe keep it out of the pool (`Pipe::give_back`).
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "peer took no bytes",
                    ))
                }
                Ok(n) => {
                    pipe.queued -= n;
                    *total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        if filled == pipe.capacity {
            pipe.grow();
        }
    }
}

/// One read into `buf`'s spare capacity; 0 is EOF. An empty `buf` gets `size` bytes of
/// room once the socket is readable (not before: a connection waiting for bytes holds no
/// buffer). A read that leaves room drained the socket: its readiness is cleared at
/// once, as tokio's own `poll_read` does, instead of learning it from one more read
/// failing with EAGAIN. (Closed and error readiness survive the clearing, so a FIN or
/// RST that came with the bytes is still seen.)
async fn read_chunk(from: &TcpStream, buf: &mut Vec<u8>, size: usize) -> io::Result<usize> {
    buf.clear();
    loop {
        from.readable().await?;
        if buf.capacity() == 0 {
            buf.reserve_exact(size);
        }
        let mut drained = None;
        let read = from.try_io(Interest::READABLE, || {
            let n = socket2::SockRef::from(from).recv(buf.spare_capacity_mut())?;
            if n > 0 && n < buf.capacity() {
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        let n = match (read, drained) {
            (_, Some(n)) | (Ok(n), None) => n,
            (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (Err(e), None) => return Err(e),
        };
        // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity.
        unsafe { buf.set_len(n) };
        return Ok(n);
    }
}

/// How a write treats `ENOMEM`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnNoMemory {
    /// An error, like any other.
    Fail,
    /// Retried after [`ENOMEM_BACKOFF`]: a SOCKHASH redirect to a peer that reads slowly
    /// fails with ENOMEM instead of blocking.
    Retry,
}

/// How long to wait before retrying a send the kernel refused with ENOMEM.
const ENOMEM_BACKOFF: Duration = Duration::from_micros(200);

/// Write all of `bytes` to `to`.
async fn write_all(to: &TcpStream, mut bytes: &[u8], no_memory: OnNoMemory) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "peer took no bytes",
                ))
            }
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if no_memory == OnNoMemory::Retry && e.raw_os_error() == Some(libc::ENOMEM) => {
                tokio::time::sleep(ENOMEM_BACKOFF).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Userspace buffer copy from `from` to `to` until EOF, then half-close `to`; `total`
/// counts the bytes written to `to`.
async fn copy_one_way(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<()> {
    // Allocated when bytes arrive, grown while reads fill it (16 KiB up to BUFFER_BYTES),
    // and dropped after a read that drained the socket, so idle and short connections
    // hold none.
    let mut buf: Vec<u8> = Vec::new();
    let mut size = FIRST_BUFFER_BYTES;
    loop {
        let filled = read_chunk(from, &mut buf, size).await?;
        if filled == 0 {
            socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
            return Ok(());
        }
        write_all(to, &buf[..filled], OnNoMemory::Retry).await?;
        *total += filled as u64;
        if filled < buf.capacity() {
            buf = Vec::new();
            size = FIRST_BUFFER_BYTES;
        } else if size < BUFFER_BYTES {
            size = (size * 4).min(BUFFER_BYTES);
            buf = Vec::new();
        }
    }
}

/// A pipe for `splice`, with its current capacity. Pipes start at the kernel's default
/// size and grow to [`BUFFER_BYTES`] the first time a splice fills one, so idle and short
/// connections hold little while bulk transfers move a whole window per call.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Bytes spliced in and not yet out.
    queued: usize,
}

/// Empty pipes of finished directions, reused by the next connections: making two pipes
/// per connection (four fds and their setup) was a visible share of a short connection.
static PIPE_POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());
/// Pipes kept for reuse; beyond this they are closed.
const PIPE_POOL_MAX: usize = 256;

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = PIPE_POOL.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(pipe);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        Ok(Pipe {
            read,
            write,
            // The kernel's default (16 pages). Were it smaller, a splice would just move
            // less; the size only decides when to grow.
            capacity: DEFAULT_PIPE_BYTES,
            queued: 0,
        })
    }

    /// Only an empty pipe goes back: one an error left holding bytes is closed.
    fn give_back(self) {
        if self.queued != 0 {
            return;
        }
        let mut pool = PIPE_POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < PIPE_POOL_MAX {
            pool.push(self);
        }
    }

    /// Best effort: a pipe that cannot grow only costs more syscalls.
    fn grow(&mut self) {
        if self.capacity < BUFFER_BYTES {
            if let Ok(size) = fcntl(&self.write, FcntlArg::F_SETPIPE_SZ(BUFFER_BYTES as i32)) {
                self.capacity = size as usize;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair over loopback: (the side the test drives, the side forward gets).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (outer, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (outer.expect("connect"), accepted.expect("accept").0)
    }

    /// Bytes arrive intact both ways, the half-close reaches the far side, and the pipes
    /// of a cleanly finished connection go back to the pool, grown to the full window by a
    /// bulk transfer, for the next connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_moves_every_byte_and_returns_its_pipes_to_the_pool() {
        const BYTES: usize = 3 * 1024 * 1024 + 17;
        for round in 0..2 {
            let (mut client, downstream) = pair().await;
            let (upstream, mut server) = pair().await;
            let forwarding = tokio::spawn(forward(downstream, upstream, CopyMode::Splice));
            let payload: Vec<u8> = (0..BYTES).map(|i| (i * 31 % 251) as u8).collect();
            let sent = payload.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&sent).await.expect("write");
                client.shutdown().await.expect("shutdown");
                let mut back = Vec::new();
                client.read_to_end(&mut back).await.expect("read back");
                back
            });
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read");
            assert!(got == payload, "round {round}: bytes differ");
            server.write_all(b"done").await.expect("answer");
            server.shutdown().await.expect("shutdown");
            assert_eq!(writer.await.expect("writer"), b"done");
            let forwarded = forwarding.await.expect("forward");
            assert_eq!(forwarded.upstream_bytes, BYTES as u64);
            assert_eq!(forwarded.downstream_bytes, 4);
            assert!(!forwarded.reset);
            let pool = PIPE_POOL.lock().expect("pool");
            // The bulk direction took a pipe and gave it back when the connection ended
            // (the second round takes it from the pool instead of making one); the
            // 4-byte answer went through userspace and took none.
            assert_eq!(pool.len(), 1, "round {round}");
            assert!(
                pool.iter().any(|pipe| pipe.capacity == BUFFER_BYTES),
                "the bulk direction's pipe did not grow"
            );
        }
    }

    /// A connection that ends in a reset still reports the bytes it carried before (the
    /// access log and the byte metrics read them): both copy paths, bulk and small.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_keeps_the_count_of_what_was_carried() {
        for (mode, bytes) in [
            (CopyMode::Splice, 2 * 1024 * 1024),
            (CopyMode::Splice, 100),
            (CopyMode::Userspace, 2 * 1024 * 1024),
        ] {
            let (mut client, downstream) = pair().await;
            let (upstream, mut server) = pair().await;
            let forwarding = tokio::spawn(forward(downstream, upstream, mode));
            let payload = vec![7u8; bytes];
            client.write_all(&payload).await.expect("write");
            let mut got = vec![0u8; bytes];
            server.read_exact(&mut got).await.expect("read");
            server.write_all(b"answer").await.expect("answer");
            let mut answer = [0u8; 6];
            client
                .read_exact(&mut answer)
                .await
                .expect("read the answer");
            // The server resets instead of closing.
            socket2::SockRef::from(&server)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
            drop(server);
            let forwarded = forwarding.await.expect("forward");
            assert!(forwarded.reset, "{mode:?} {bytes}");
            assert_eq!(forwarded.upstream_bytes, bytes as u64, "{mode:?}");
            assert_eq!(forwarded.downstream_bytes, 6, "{mode:?}");
        }
    }
}
