//! A thread that lives in one pod's network namespace and runs jobs there.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::sched::{setns, CloneFlags};

use super::InpodError;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Handle to a thread parked in a pod's network namespace. Dropping the handle ends
/// the thread once queued jobs are done.
pub struct PodNetns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
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

impl PodNetns {
    /// Start a thread inside the netns at `path` (e.g. `/var/run/netns/x` or
    /// `/proc/<pid>/ns/net`), and read the namespace's cookie from there.
    pub fn enter(path: &Path) -> Result<Self, InpodError> {
        let file = File::open(path).map_err(|source| InpodError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let shown = path.display().to_string();
        let thread_path = shown.clone();
        std::thread::Builder::new()
            .name(format!("netns:{}", short_name(path)))
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| InpodError::Enter {
                        path: thread_path.clone(),
                        source,
                    })
                    .and_then(|()| {
                        netns_cookie_of_current().map_err(|source| InpodError::Io {
                            path: thread_path,
                            source,
                        })
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                drop(file);
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(|source| InpodError::Io {
                path: shown.clone(),
                source,
            })?;
        let cookie = ready_rx.recv().map_err(|_| InpodError::ThreadGone {
            path: shown.clone(),
        })??;
        Ok(Self {
            path: path.to_path_buf(),
            jobs,
            cookie,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `SO_NETNS_COOKIE` of this namespace: the key the eBPF programs look up.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Run `f` in the namespace and wait for its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, InpodError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    /// Blocking variant of [`PodNetns::run`] for non-async callers.
    pub fn run_blocking<R, F>(&self, f: F) -> Result<R, InpodError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| self.gone())?;
        rx.recv().map_err(|_| self.gone())
    }

    fn gone(&self) -> InpodError {
        InpodError::ThreadGone {
            path: self.path.display().to_string(),
        }
    }
}

fn short_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name.chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
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
