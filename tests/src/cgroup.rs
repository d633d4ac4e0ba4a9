//! The testbed's cgroup v2 directory: finding the cgroup2 mount, and emptying and
//! removing a directory that only testbeds put processes into.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The first cgroup2 mount in /proc/self/mountinfo (on hybrid hosts it is not at
/// /sys/fs/cgroup, e.g. /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    find_cgroup2(&info).context("no cgroup2 filesystem is mounted")
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Optional fields sit before " - ", so the mount point is counted from the front
        // and the filesystem type from the separator.
        let (front, back) = line.split_once(" - ")?;
        let fstype = back.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = front.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Pids listed in `cgroup.procs` of `dir` (not of its children).
pub fn procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process in `dir` and below. Only call this on testbed cgroups: nothing
/// but testbed processes is ever put there.
pub fn kill_all(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    // cgroup.kill (5.14+) kills the whole subtree at once, racing no forks.
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for sub in subdirs(dir) {
        kill_all(&sub);
    }
    for pid in procs(dir) {
        if let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills what is left in `dir`, then removes it (children first), retrying while the
/// killed processes are still exiting.
pub fn remove(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    kill_all(dir);
    let deadline = Instant::now() + timeout;
    loop {
        match remove_tree(dir) {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => {
                kill_all(dir);
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                bail!(
                    "removing cgroup {}: {e} (processes left: {:?})",
                    dir.display(),
                    procs(dir)
                )
            }
        }
    }
}

fn remove_tree(dir: &Path) -> std::io::Result<()> {
    for sub in subdirs(dir) {
        remove_tree(&sub)?;
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(find_cgroup2("31 23 0:28 / /x rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_octal(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_octal(r"/plain"), "/plain");
        assert_eq!(unescape_octal(r"/trailing\"), r"/trailing\");
    }
}
