//! What could leak, read at one moment: the entries of every pinned kernel map and the
//! pins themselves (both outlive agents, so a leak there accumulates over the whole
//! soak), the current agent's open fds (by kind), threads and RSS from /proc, and what
//! the agent's admin endpoint says (live kernel records, enrolled pods, proxy counters).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use interceptor_testbed::{NodeId, Testbed};
use serde_json::{json, Value};

/// Maps whose entries belong to connections: after the load stops and the settle period
/// they must be back to the baseline exactly.
pub const FLOW_MAPS: &[&str] = &[
    "ORIG_DST_BY_COOKIE",
    "ORIG_DST_BY_FLOW",
    "INBOUND_FLOWS",
    "SOCK_PAIRS",
];

/// Entries per pinned map, by name; `None` when bpftool could not dump the map.
pub type MapEntries = BTreeMap<String, Option<u64>>;

#[derive(Clone, Debug)]
pub struct Snapshot {
    pub at_unix_ms: u64,
    pub agent_pid: u32,
    pub fds: usize,
    /// Open fds by kind (`socket`, `anon_inode:bpf-map`, `pipe`, `file`, ...), to say
    /// what leaks when the count grows.
    pub fd_kinds: BTreeMap<String, usize>,
    pub threads: u64,
    pub rss_kib: u64,
    pub maps: MapEntries,
    /// Every name in the bpffs dir (programs, maps, cgroup and tc links).
    pub pins: Vec<String>,
    /// `/config_dump`'s `datapath_records`.
    pub datapath_records: Value,
    /// `/config_dump`'s enrolled pods, as `namespace/name`.
    pub enrolled_pods: Vec<String>,
    /// Sums of the agent's `interceptor_proxy_connections_total` and `_errors_total`.
    pub proxy_connections: u64,
    pub proxy_errors: u64,
    /// Samples on `/metrics` (lines that are not comments): label sets the agent keeps
    /// for as long as it runs, so a count that grows with churn is memory that grows.
    pub metrics_series: usize,
}

impl Snapshot {
    pub fn to_json(&self) -> Value {
        json!({
            "at_unix_ms": self.at_unix_ms,
            "agent_pid": self.agent_pid,
            "fds": self.fds,
            "fd_kinds": self.fd_kinds,
            "threads": self.threads,
            "rss_kib": self.rss_kib,
            "maps": self.maps,
            "pins": self.pins.len(),
            "datapath_records": self.datapath_records,
            "enrolled_pods": self.enrolled_pods,
            "proxy_connections": self.proxy_connections,
            "proxy_errors": self.proxy_errors,
            "metrics_series": self.metrics_series,
        })
    }
}

/// Everything of [`Snapshot`] for the agent `pid` whose admin endpoint is `admin_addr`.
pub fn take(tb: &Testbed, admin_addr: &str, pid: u32) -> Result<Snapshot> {
    let proc = process(pid)?;
    let (maps, pins) = kernel_maps(tb.bpffs_dir())?;
    let dump = admin_json(tb, admin_addr, "/config_dump")?;
    let mut enrolled_pods: Vec<String> = dump["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["enrolled"] == true)
        .filter_map(|p| p["pod"].as_str().map(str::to_owned))
        .collect();
    enrolled_pods.sort();
    let (proxy_connections, proxy_errors, metrics_series) = proxy_counters(tb, admin_addr)?;
    Ok(Snapshot {
        at_unix_ms: super::unix_ms(),
        agent_pid: pid,
        fds: proc.fds,
        fd_kinds: proc.fd_kinds,
        threads: proc.threads,
        rss_kib: proc.rss_kib,
        maps,
        pins,
        datapath_records: dump["datapath_records"].clone(),
        enrolled_pods,
        proxy_connections,
        proxy_errors,
        metrics_series,
    })
}

pub struct ProcFigures {
    pub fds: usize,
    pub fd_kinds: BTreeMap<String, usize>,
    pub threads: u64,
    pub rss_kib: u64,
}

/// fds (`/proc/<pid>/fd`, by what each links to), `Threads` and `VmRSS` of `pid`.
pub fn process(pid: u32) -> Result<ProcFigures> {
    let fd_dir = format!("/proc/{pid}/fd");
    let mut fd_kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut fds = 0;
    for entry in std::fs::read_dir(&fd_dir).with_context(|| format!("reading {fd_dir}"))? {
        let entry = entry?;
        fds += 1;
        // An fd closed between readdir and readlink is simply gone.
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        *fd_kinds
            .entry(fd_kind(&target.to_string_lossy()))
            .or_default() += 1;
    }
    let status = interceptor_testbed::proc_status(pid)?;
    Ok(ProcFigures {
        fds,
        fd_kinds,
        threads: status.threads,
        rss_kib: status.rss_kib,
    })
}

/// `socket:[123]` -> `socket`, `anon_inode:…` stays (it names the kind), a path -> `file`.
fn fd_kind(target: &str) -> String {
    if target.starts_with('/') {
        return "file".into();
    }
    if target.starts_with("anon_inode:") {
        return target.to_owned();
    }
    match target.split_once(":[") {
        Some((kind, _)) => kind.to_owned(),
        None => target.to_owned(),
    }
}

/// Entries of every map pinned in `dir` (names in capitals are maps, see the agent's
/// `MAP_NAMES`) and the names of all pins. A missing dir (iptables mode) is empty.
pub fn kernel_maps(dir: &Path) -> Result<(MapEntries, Vec<String>)> {
    let mut maps = BTreeMap::new();
    let mut pins = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((maps, pins)),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            maps.insert(name.clone(), map_entries(&dir.join(&name)));
        }
        pins.push(name);
    }
    pins.sort();
    Ok((maps, pins))
}

/// `bpftool map dump pinned <path>`'s entry count; `None` when it cannot be dumped.
fn map_entries(path: &Path) -> Option<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    Some(value.as_array()?.len() as u64)
}

/// GET `path` on the admin endpoint at `admin_addr` (node a's netns) as JSON.
pub fn admin_json(tb: &Testbed, admin_addr: &str, path: &str) -> Result<Value> {
    let (code, body) = tb.admin_get_at(NodeId::A, admin_addr, path)?;
    if code != 200 {
        bail!("GET {path} on {admin_addr}: {code} {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
}

/// Sums of `interceptor_proxy_connections_total` and `interceptor_proxy_errors_total`
/// over every label set, and the number of samples, from `/metrics`.
pub fn proxy_counters(tb: &Testbed, admin_addr: &str) -> Result<(u64, u64, usize)> {
    let (code, body) = tb.admin_get_at(NodeId::A, admin_addr, "/metrics")?;
    if code != 200 {
        bail!("GET /metrics on {admin_addr}: {code}");
    }
    let sum = |name: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    Ok((
        sum("interceptor_proxy_connections_total"),
        sum("interceptor_proxy_errors_total"),
        body.lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .count(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_kinds_are_short() {
        assert_eq!(fd_kind("socket:[4242]"), "socket");
        assert_eq!(fd_kind("pipe:[7]"), "pipe");
        assert_eq!(fd_kind("anon_inode:bpf-map"), "anon_inode:bpf-map");
        assert_eq!(fd_kind("anon_inode:[eventpoll]"), "anon_inode:[eventpoll]");
        assert_eq!(fd_kind("/run/x/agent.log"), "file");
    }
}
