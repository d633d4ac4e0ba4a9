//! Running code inside a pod's network namespace: the calling thread enters the netns
//! with `setns(2)`, runs a short synchronous job (make a socket, write a sysctl, talk
//! netlink) and returns to its own netns before anything else runs on it. A socket keeps
//! the netns it was made in for life, so nothing else needs the pod's netns. This is
//! ztunnel's in-pod model; it costs two syscalls instead of a thread per pod and a
//! cross-thread round trip per connection.
use std::cell::OnceCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use super::InpodError;

/// Handle to a pod's network namespace: an open `/proc/.../ns/net` or `/var/run/netns`
/// file, which also keeps the namespace alive while the pod's listeners are open.
pub struct PodNetns {
    path: PathBuf,
    file: File,
    cookie: u64,
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodNetns")
            .field("path", &self.path)
            .field("cookie", &self.cookie)
            .finish()
    }
}

thread_local! {
    /// The netns this thread lives in, opened the first time the thread enters a pod's:
    /// where [`PodNetns::run_blocking`] brings it back.
    static HOME_NETNS: OnceCell<File> = const { OnceCell::new() };
}

/// Puts the thread back into its own netns when the job ends, even by a panic.
struct ReturnHome<'a> {
    home: &'a File,
}

impl Drop for ReturnHome<'_> {
    fn drop(&mut self) {
        if let Err(error) = setns(self.home, CloneFlags::CLONE_NEWNET) {
            // A thread left in a pod's netns would make the next socket of any pod there,
            // around its interception: stopping is the only safe answer.
            eprintln!("interceptor: cannot return a thread to its own netns: {error}");
            std::process::abort();
        }
    }
}

impl PodNetns {
    /// Open the netns at `path` (e.g. `/var/run/netns/x` or `/proc/<pid>/ns/net`) and
    /// read its cookie from inside.
    pub fn enter(path: &Path) -> Result<Self, InpodError> {
        let file = File::open(path).map_err(|source| InpodError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let mut netns = Self {
            path: path.to_path_buf(),
            file,
            cookie: 0,
        };
        netns.cookie = netns
            .run_blocking(netns_cookie_of_current)?
            .map_err(|source| InpodError::Io {
                path: path.display().to_string(),
                source,
            })?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `SO_NETNS_COOKIE` of this namespace: the key the eBPF programs look up.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Run `f` in the namespace on the calling thread. `f` must be short and must not
    /// block on async work: the thread (possibly a tokio worker) is inside the pod's
    /// netns until it returns. Not reentrant: `f` must not call back into a `PodNetns`.
    pub fn run_blocking<R, F>(&self, f: F) -> Result<R, InpodError>
    where
        F: FnOnce() -> R,
    {
        HOME_NETNS.with(|home| {
            let home = match home.get() {
                Some(home) => home,
                None => {
                    let file = File::open("/proc/thread-self/ns/net").map_err(|source| {
                        InpodError::Open {
                            path: "/proc/thread-self/ns/net".into(),
                            source,
                        }
                    })?;
                    home.get_or_init(|| file)
                }
            };
            setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| InpodError::Enter {
                path: self.path.display().to_string(),
                source,
            })?;
            let _back = ReturnHome { home };
            Ok(f())
        })
    }

    /// [`PodNetns::run_blocking`] for async callers: the job is a few syscalls, run in
    /// place rather than handed to another thread.
    pub async fn run<R, F>(&self, f: F) -> Result<R, InpodError>
    where
        F: FnOnce() -> R,
    {
        self.run_blocking(f)
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14) of the calling thread's network namespace. Older
/// kernels (iptables mode) get the namespace's inode number instead: it only keys the
/// agent's own tables there, where no eBPF program compares it with a cookie.
pub fn netns_cookie_of_current() -> std::io::Result<u64> {
    match so_netns_cookie() {
        Err(error) if error.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            use std::os::unix::fs::MetadataExt;
            Ok(std::fs::metadata("/proc/thread-self/ns/net")?.ino())
        }
        other => other,
    }
}

/// The agent's netns probe (kernels without `SO_NETNS_COOKIE`): a UDP socket connected
/// to [`interceptor_common::NETNS_PROBE_PORT`] on loopback in the calling thread's netns
/// (a UDP connect sends nothing), so that connect4 records this netns's cookie under the
/// socket's cookie. Returns that socket cookie (`SO_COOKIE`, Linux 4.12), the key to read
/// the answer with.
pub fn probe_connect() -> std::io::Result<u64> {
    const SO_COOKIE: libc::c_int = 57;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let target = std::net::SocketAddr::from((
        interceptor_common::NETNS_PROBE_IPV4,
        interceptor_common::NETNS_PROBE_PORT,
    ));
    socket.connect(&target.into())?;
    socket_option_u64(&socket, SO_COOKIE)
}

fn so_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    socket_option_u64(&socket, SO_NETNS_COOKIE)
}

/// A `SOL_SOCKET` option whose value is a u64 (the cookies).
fn socket_option_u64(socket: &socket2::Socket, option: libc::c_int) -> std::io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd and a properly sized, aligned out buffer.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(value)
}
