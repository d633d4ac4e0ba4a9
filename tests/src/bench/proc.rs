//! Running the measuring tools inside pods: to completion with a deadline, or in the
//! background until dropped.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use interceptor_testbed::{Pod, Testbed};

/// What a tool run to completion printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` in the pod's netns and its node's cgroup, waits up to `timeout`
/// (then kills it: an error). A non-zero exit is not an error here.
pub fn run_in_pod(
    tb: &Testbed,
    pod: &Pod,
    program: &str,
    args: &[String],
    timeout: Duration,
) -> Result<Output> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = tb
        .spawn_in_pod(pod, cmd)
        .with_context(|| format!("starting {program} in pod {}", pod.name))?;
    collect(child, timeout)
        .with_context(|| format!("{program} {} in pod {}", args.join(" "), pod.name))
}

fn collect(mut child: Child, timeout: Duration) -> Result<Output> {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let out = std::thread::spawn(move || read_all(out));
    let err = std::thread::spawn(move || read_all(err));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "did not finish within {timeout:?}, killed; stdout tail: {}; stderr tail: {}",
            tail(&stdout, 5),
            tail(&stderr, 5)
        ),
    }
}

fn read_all(pipe: Option<impl Read>) -> String {
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        let _ = p.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` non-empty lines of `text`, joined with " | ".
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A tool running in a pod in the background (a server, HAProxy); killed when dropped.
pub struct Background {
    child: Option<Child>,
    what: String,
    log: PathBuf,
}

impl Background {
    /// Starts `program args` in the pod, stdout and stderr appended to `log`.
    pub fn spawn(
        tb: &Testbed,
        pod: &Pod,
        program: &str,
        args: &[String],
        log: &Path,
    ) -> Result<Background> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let what = format!("{program} {} in pod {}", args.join(" "), pod.name);
        let child = tb
            .spawn_in_pod(pod, cmd)
            .with_context(|| format!("starting {what}"))?;
        Ok(Background {
            child: Some(child),
            what,
            log: log.to_owned(),
        })
    }

    /// Waits until the process has a TCP socket listening on each of `ports` (read from
    /// its own `/proc/<pid>/net/tcp`, which shows its netns), or fails when it exits or
    /// `timeout` passes.
    pub fn wait_listening(&mut self, ports: &[u16], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().context("process already reaped")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited ({status}) before listening on {ports:?}; log: {}",
                    self.what,
                    self.log_tail(8)
                );
            }
            let listening = listening_ports(child.id());
            if ports.iter().all(|p| listening.contains(p)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not listening on {ports:?} within {timeout:?} (listening: {listening:?}); log: {}",
                    self.what,
                    self.log_tail(8)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("process already reaped")?;
        if let Some(status) = child.try_wait()? {
            self.child = None;
            bail!("{} exited ({status}); log: {}", self.what, self.log_tail(8));
        }
        Ok(())
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        tail(&text, n)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Not reaped yet, so the pid cannot name another process.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Ports in LISTEN state in the netns of process `pid`, IPv4 and IPv6.
fn listening_ports(pid: u32) -> Vec<u16> {
    let mut ports = Vec::new();
    for file in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        ports.extend(parse_listening(&text));
    }
    ports
}

/// LISTEN (state 0A) local ports of a `/proc/net/tcp` table.
fn parse_listening(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != "0A" {
                return None;
            }
            let port = local.rsplit(':').next()?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_from_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:2B67 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:3A99 0100007F:2B67 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 20 4 30 10 -1\n";
        assert_eq!(parse_listening(table), vec![11111]);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\n\nc\n", 2), "b | c");
        assert_eq!(tail("", 3), "");
    }
}
