//! Processes the testbed starts: tracking them by pidfd so cleanup can never signal a
//! recycled pid, and the handles tests hold (agent, servers, client reports).

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{
    pidfd_open, pidfd_send_signal, waitid, Pid, PidfdFlags, Signal, WaitId, WaitIdOptions,
};
use serde::Deserialize;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Cleanup must go on after a panic elsewhere, so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pidfd for a child. Unlike a pid it cannot come to name another process once the
/// child is reaped: signals then fail with ESRCH instead of hitting a stranger.
#[derive(Debug)]
pub(crate) struct ProcHandle {
    pid: u32,
    pidfd: OwnedFd,
}

impl ProcHandle {
    /// Must be called before anyone can have reaped `pid` (right after spawn).
    pub(crate) fn open(pid: u32) -> Result<Self> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| anyhow!("invalid pid {pid}"))?;
        let pidfd =
            pidfd_open(raw, PidfdFlags::empty()).with_context(|| format!("pidfd_open({pid})"))?;
        Ok(Self { pid, pidfd })
    }

    pub(crate) fn signal(&self, sig: Signal) {
        let _ = pidfd_send_signal(self.pidfd.as_fd(), sig);
    }

    /// Blocks until the process exits or `timeout` passes; true if it exited. A pidfd
    /// turns readable at the exit itself, so the waiter wakes then, not at the end of a
    /// nap: the scale bench times CNI plugins of a few milliseconds with this.
    fn wait_exited(&self, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let left = Timespec::try_from(left).context("wait timeout out of range")?;
            let mut fds = [PollFd::new(&self.pidfd, PollFlags::IN)];
            match poll(&mut fds, Some(&left)) {
                Ok(0) => return Ok(self.exited()),
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e).with_context(|| format!("poll(pidfd of {})", self.pid)),
            }
        }
    }

    /// True once the process has exited (zombie or reaped). Does not reap it, so the
    /// owner of the `Child` still gets its status.
    fn exited(&self) -> bool {
        match waitid(
            WaitId::PidFd(self.pidfd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
        ) {
            Ok(Some(_)) => true,
            Ok(None) => false,
            // ECHILD: already reaped by its owner.
            Err(_) => true,
        }
    }
}

/// Every process a testbed spawned and has not seen reaped yet.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    procs: Mutex<Vec<ProcHandle>>,
}

impl Tracker {
    pub(crate) fn track(&self, pid: u32) -> Result<()> {
        let handle = ProcHandle::open(pid)?;
        lock(&self.procs).push(handle);
        Ok(())
    }

    pub(crate) fn untrack(&self, pid: u32) {
        lock(&self.procs).retain(|h| h.pid != pid);
    }

    /// SIGKILLs everything still tracked and waits (without reaping) until each one
    /// has exited or `timeout` passes.
    pub(crate) fn kill_all(&self, timeout: Duration) {
        let procs = std::mem::take(&mut *lock(&self.procs));
        for p in &procs {
            p.signal(Signal::KILL);
        }
        let deadline = Instant::now() + timeout;
        for p in &procs {
            while !p.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// A child this crate owns and reaps itself; it leaves the tracker once reaped.
#[derive(Debug)]
pub(crate) struct Owned {
    child: Option<Child>,
    handle: ProcHandle,
    tracker: Arc<Tracker>,
}

impl Owned {
    pub(crate) fn new(child: Child, tracker: Arc<Tracker>) -> Result<Self> {
        let handle = ProcHandle::open(child.id())?;
        Ok(Self {
            child: Some(child),
            handle,
            tracker,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.handle.pid
    }

    pub(crate) fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    pub(crate) fn signal(&self, sig: Signal) {
        if self.child.is_some() {
            self.handle.signal(sig);
        }
    }

    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            bail!("process {} was already reaped", self.handle.pid);
        };
        let status = child.try_wait()?;
        if status.is_some() {
            self.child = None;
            self.tracker.untrack(self.handle.pid);
        }
        Ok(status)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub(crate) fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        if self.child.is_some() && !self.handle.wait_exited(timeout)? {
            return Ok(None);
        }
        // Exited, but a traced child (tb-bench under `strace -f`) is reapable only once
        // its tracer has waited for it.
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL and reap.
    pub(crate) fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.handle.signal(Signal::KILL);
        let status = child.wait().ok();
        self.tracker.untrack(self.handle.pid);
        status
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Output of a process run to completion.
pub(crate) struct Collected {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Feeds `stdin`, drains stdout and stderr on threads (so no pipe can fill up and stall
/// the child) and waits up to `timeout`; a child still running then is killed.
pub(crate) fn collect(owned: Owned, stdin: &[u8], timeout: Duration) -> Result<Collected> {
    collect_until(owned, stdin, timeout, None)
}

/// [`collect`], also killing the child as soon as `abort` turns true (a long run
/// interrupted by Ctrl-C must not hold up the cleanup until its timeout).
pub(crate) fn collect_until(
    mut owned: Owned,
    stdin: &[u8],
    timeout: Duration,
    abort: Option<&AtomicBool>,
) -> Result<Collected> {
    let pid = owned.pid();
    let child = owned
        .child_mut()
        .ok_or_else(|| anyhow!("process {pid} already reaped"))?;
    let stdin_pipe = child.stdin.take();
    let stdout_pipe = child.stdout.take();
    let stderr_pipe = child.stderr.take();
    std::thread::scope(|s| {
        if let Some(mut pipe) = stdin_pipe {
            // A child that exits without reading gives EPIPE here, which is its business.
            s.spawn(move || {
                let _ = pipe.write_all(stdin);
            });
        }
        let out = s.spawn(move || read_all(stdout_pipe));
        let err = s.spawn(move || read_all(stderr_pipe));
        let status = wait_or_abort(&mut owned, timeout, abort);
        let status = match status {
            Ok(Some(status)) => Ok(status),
            Ok(None) => {
                owned.kill();
                Err(anyhow!(
                    "process {pid} did not finish within {timeout:?}; killed"
                ))
            }
            Err(e) => {
                owned.kill();
                Err(e)
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        match status {
            Ok(status) => Ok(Collected {
                status,
                stdout,
                stderr,
            }),
            Err(e) => Err(e.context(format!(
                "stdout: {}\nstderr: {}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            ))),
        }
    })
}

/// [`Owned::wait_timeout`] that gives up early (`Ok(None)`) once `abort` is set.
fn wait_or_abort(
    owned: &mut Owned,
    timeout: Duration,
    abort: Option<&AtomicBool>,
) -> Result<Option<ExitStatus>> {
    let Some(abort) = abort else {
        return owned.wait_timeout(timeout);
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = owned.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline || abort.load(Ordering::Relaxed) {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn read_all(pipe: Option<impl Read>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut buf);
    }
    buf
}

/// The last `max_lines` lines of a log file, for error messages.
pub(crate) fn tail(path: &std::path::Path, max_lines: usize) -> String {
    let text = fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(max_lines)..].join("\n")
}

/// The node agent, running in the node netns and the testbed cgroup.
#[derive(Debug)]
pub struct AgentProcess {
    pub(crate) proc: Owned,
    pub(crate) log_path: PathBuf,
}

impl AgentProcess {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGTERM, then up to 10 s for a clean exit; after that SIGKILL and an error.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.proc.signal(Signal::TERM);
        match self.proc.wait_timeout(Duration::from_secs(10))? {
            Some(status) => Ok(status),
            None => {
                self.proc.kill();
                bail!(
                    "agent (pid {}) did not exit within 10 s of SIGTERM; killed it. Log tail:\n{}",
                    self.pid(),
                    tail(&self.log_path, 40)
                )
            }
        }
    }

    /// SIGKILL, as a crash would end it: whatever it pinned stays behind.
    pub fn kill(mut self) {
        self.proc.kill();
    }

    /// `Some(status)` once the agent has exited on its own.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_wait()
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log_path
    }
}

#[derive(Debug, Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A `tb-pod` server in a pod. Its stdout lines after `READY` are collected in the
/// background; it is killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    proc: Owned,
    addr: String,
    lines: Arc<(Mutex<Lines>, Condvar)>,
    stderr_path: PathBuf,
}

impl ServerProcess {
    /// Starts reading `child`'s stdout and waits up to `timeout` for `READY <addr>`.
    pub(crate) fn start(
        mut proc: Owned,
        stderr_path: PathBuf,
        timeout: Duration,
    ) -> Result<ServerProcess> {
        let stdout = proc
            .child_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| anyhow!("server stdout is not piped"))?;
        let lines: Arc<(Mutex<Lines>, Condvar)> = Arc::default();
        let shared = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lock(&shared.0).lines.push(line);
                shared.1.notify_all();
            }
            lock(&shared.0).closed = true;
            shared.1.notify_all();
        });
        let deadline = Instant::now() + timeout;
        let addr = {
            let (m, cv) = &*lines;
            let mut g = lock(m);
            loop {
                if let Some(pos) = g.lines.iter().position(|l| l.starts_with("READY ")) {
                    let ready = g.lines.remove(pos);
                    break ready["READY ".len()..].trim().to_owned();
                }
                let now = Instant::now();
                if g.closed || now >= deadline {
                    let why = if g.closed { "exited" } else { "timed out" };
                    let out = g.lines.join("\n");
                    drop(g);
                    proc.kill();
                    bail!(
                        "tb-pod server {why} before READY\nstdout: {out}\nstderr: {}",
                        tail(&stderr_path, 20)
                    );
                }
                g = cv
                    .wait_timeout(g, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        Ok(ServerProcess {
            proc,
            addr,
            lines,
            stderr_path,
        })
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The address from the READY line (the bound address, port resolved).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stdout lines after READY, so far (does not block).
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines.0).lines.clone()
    }

    /// The JSON event lines so far (does not block).
    pub fn events(&self) -> Vec<serde_json::Value> {
        parse_events(&lock(&self.lines.0).lines)
    }

    /// Waits until at least `n` events whose `"event"` is `kind` have arrived.
    pub fn wait_for_events(
        &self,
        kind: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<serde_json::Value>> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut g = lock(m);
        loop {
            let events: Vec<_> = parse_events(&g.lines)
                .into_iter()
                .filter(|e| e["event"] == kind)
                .collect();
            if events.len() >= n {
                return Ok(events);
            }
            let now = Instant::now();
            if g.closed || now >= deadline {
                bail!(
                    "expected {n} {kind:?} events, got {}; lines: {:?}",
                    events.len(),
                    g.lines
                );
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `Some(status)` once the server has exited on its own.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.proc.try_wait()
    }

    pub fn kill(mut self) {
        self.proc.kill();
    }
}

fn parse_events(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// What `tb-pod client` printed.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ClientReport {
    /// The client socket's local address (`ip:port`); `None` when connect failed.
    pub local: Option<String>,
    /// The address the client connected to, as the socket reports it.
    pub peer: Option<String>,
    /// The greeting line without its newline, when `--expect-greeting` was given.
    pub greeting: Option<String>,
    pub sent: u64,
    pub received: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
    /// `None` on success; else e.g. "connection refused", "connection reset".
    pub error: Option<String>,
    pub elapsed_ms: u64,
    /// The client ran with `--ip-options` (every packet it sent carried IP options).
    #[serde(default)]
    pub ip_options: bool,
}

impl ClientReport {
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        ip_of(self.local.as_deref())
    }

    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        ip_of(self.peer.as_deref())
    }

    /// No error, and every byte sent came back unchanged.
    pub fn echoed_all(&self) -> bool {
        self.error.is_none()
            && self.sent == self.received
            && self.sent_sha256 == self.received_sha256
    }
}

fn ip_of(addr: Option<&str>) -> Option<std::net::IpAddr> {
    addr?.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

/// Opens (appending) a log file that can be handed to a child as stdout or stderr.
pub(crate) fn log_file(path: &std::path::Path) -> Result<File> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// A `tb-pod` run started by [`crate::Testbed::spawn_tb_pod`]: it holds no borrow of the
/// testbed, so a caller can change the testbed (add or delete pods) while runs go on.
/// Killed when dropped (and when the testbed is dropped).
#[derive(Debug)]
pub struct TbPodRun {
    pub(crate) proc: Owned,
    pub(crate) what: String,
}

impl TbPodRun {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits up to `timeout` (killing it then, or as soon as `abort` is set) and parses
    /// the last non-empty stdout line as JSON. A non-zero exit is an error.
    pub fn finish(
        self,
        timeout: Duration,
        abort: Option<&AtomicBool>,
    ) -> Result<serde_json::Value> {
        let what = self.what;
        let out = collect_until(self.proc, &[], timeout, abort)
            .with_context(|| format!("tb-pod {what}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!(
                "tb-pod {what} exited with {}: {}",
                out.status,
                stderr.trim()
            );
        }
        let line = stdout
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .with_context(|| format!("tb-pod {what} printed nothing; stderr: {stderr}"))?;
        serde_json::from_str(line).with_context(|| format!("parsing tb-pod output {line:?}"))
    }
}

/// `Threads` and `VmRSS` (KiB) of a process, from `/proc/<pid>/status`: what the soak,
/// the bench and the thread-count test watch of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStatus {
    pub threads: u64,
    pub rss_kib: u64,
}

pub fn proc_status(pid: u32) -> Result<ProcStatus> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok(ProcStatus {
        threads: field("Threads:")?,
        rss_kib: field("VmRSS:")?,
    })
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Only programs of the exec audit's PATH (xtask/src/programs.rs) may run here.
    fn owned(cmd: &mut Command) -> Owned {
        let child = cmd.spawn().expect("spawning a coreutils program");
        Owned::new(child, Arc::new(Tracker::default())).expect("pidfd_open")
    }

    #[test]
    fn wait_timeout_returns_the_status_of_a_process_that_exits() {
        // cat exits 1 when a file cannot be read.
        let mut p = owned(
            Command::new("cat")
                .arg("/proc/self/no-such-file")
                .stderr(std::process::Stdio::null()),
        );
        let status = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(status.and_then(|s| s.code()), Some(1));
        // Reaped: a second wait is an error, not a hang.
        assert!(p.wait_timeout(Duration::from_millis(10)).is_err());
    }

    #[test]
    fn wait_timeout_gives_up_on_a_process_still_running() {
        let mut p = owned(Command::new("sleep").arg("30"));
        let started = Instant::now();
        assert!(p.wait_timeout(Duration::from_millis(50)).unwrap().is_none());
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert!(p.kill().is_some(), "still running, so kill reaps it");
    }
}
