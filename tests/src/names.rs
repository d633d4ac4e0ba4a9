//! Names of everything a testbed creates, and the bookkeeping that tells a leftover of a
//! dead run from a testbed that is still alive.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// Every network namespace a testbed creates starts with this (`itb-<pid>-<n>-...`).
pub const NETNS_PREFIX: &str = "itb-";
/// Cgroup and bpffs directories: `interceptor-tb-<pid>-<n>`.
pub const DIR_PREFIX: &str = "interceptor-tb-";
/// State directories live below this, named `<pid>-<n>`.
pub const STATE_ROOT: &str = "/run/interceptor-tb";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
pub const NETNS_DIR: &str = "/var/run/netns";

/// Ids of the testbeds alive in this process. A leftover carrying our own pid can only
/// come from an earlier process that had the same pid, since ids are never reused here.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub fn register(id: &str) {
    live().insert(id.to_owned());
}

pub fn unregister(id: &str) {
    live().remove(id);
}

pub fn is_registered(id: &str) -> bool {
    live().contains(id)
}

fn live() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    // A panic elsewhere must not stop cleanup, so a poisoned set is still used.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits `<pid>-<n>` off the front of `s`; returns the pid, the id and the rest (which
/// is empty or starts with `-`).
pub fn parse_id(s: &str) -> Option<(u32, &str, &str)> {
    let (pid, after_pid) = s.split_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    let n_len = after_pid
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after_pid.len());
    if n_len == 0 {
        return None;
    }
    let rest = &after_pid[n_len..];
    if !(rest.is_empty() || rest.starts_with('-')) {
        return None;
    }
    let id_len = s.len() - rest.len();
    Some((pid, &s[..id_len], rest))
}

/// True when `id` (owned by `pid`) belongs to no live testbed: its process is gone, or it
/// carries this process's pid without being one of our testbeds.
pub fn is_leftover(pid: u32, id: &str) -> bool {
    if pid == std::process::id() {
        return !is_registered(id);
    }
    !pid_alive(pid)
}

fn pid_alive(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return false;
    };
    // EPERM would still mean "exists"; only ESRCH means the process is gone.
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// Keeps a pod's name readable in `ip netns list` while staying a safe file name.
pub fn short_name(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(16)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids() {
        assert_eq!(parse_id("12-3"), Some((12, "12-3", "")));
        assert_eq!(parse_id("12-3-node"), Some((12, "12-3", "-node")));
        assert_eq!(parse_id("12-34-p0-web"), Some((12, "12-34", "-p0-web")));
        assert_eq!(parse_id("12-x"), None);
        assert_eq!(parse_id("12-3x"), None);
        assert_eq!(parse_id("ab-3"), None);
        assert_eq!(parse_id("12"), None);
    }

    #[test]
    fn own_pid_is_leftover_only_when_unregistered() {
        let id = format!("{}-999999", std::process::id());
        assert!(is_leftover(std::process::id(), &id));
        register(&id);
        assert!(!is_leftover(std::process::id(), &id));
        unregister(&id);
        assert!(is_leftover(std::process::id(), &id));
    }

    #[test]
    fn short_names_are_safe() {
        assert_eq!(short_name("web/../x_y"), "webxy");
        assert_eq!(
            short_name("a-very-long-pod-name-indeed"),
            "a-very-long-pod-"
        );
    }
}
