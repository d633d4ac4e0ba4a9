//! Facts about the machine a run measured, saved with its results.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Facts {
    /// `YYYY-MM-DD`, UTC, when the run started.
    pub date_utc: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub started_utc: String,
    pub hostname: String,
    /// `uname -r`.
    pub kernel: String,
    pub cpu_model: String,
    /// Logical CPUs in /proc/cpuinfo.
    pub cpus: usize,
    /// MemTotal of /proc/meminfo.
    pub memory: String,
    /// /proc/loadavg when the run started (other work on the machine skews the figures).
    pub loadavg_at_start: String,
    pub sockperf: String,
    pub iperf3: String,
    pub haproxy: String,
    /// The workspace's commit, and whether the work tree differed from it.
    pub git_commit: String,
    pub git_dirty: Option<bool>,
    /// How idle CPUs waited during the run ([`super::cpu_idle::describe`]).
    pub cpu_idle: String,
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text)
}

fn first_line(text: Option<String>) -> String {
    text.as_deref()
        .and_then(|t| t.lines().map(str::trim).find(|l| !l.is_empty()))
        .unwrap_or("unknown")
        .to_owned()
}

/// /proc/loadavg as it reads now.
pub fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn collect(workspace: &Path, cpu_idle: String) -> Facts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_owned());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let ws = workspace.display().to_string();
    let git_commit = Command::new("git")
        .args(["-C", &ws, "rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown (not a git work tree)".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    let git_dirty = Command::new("git")
        .args(["-C", &ws, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| !o.stdout.is_empty());
    // sockperf prints its version in colour.
    let sockperf = first_line(command_output(super::measure::SOCKPERF, &["--version"]))
        .replace(|c: char| c.is_control(), "");
    let now = chrono::Utc::now();
    Facts {
        // From the clock here, not `date`: the bench runs with the audited PATH.
        date_utc: now.format("%Y-%m-%d").to_string(),
        started_utc: now.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        hostname: read_trimmed("/proc/sys/kernel/hostname"),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        cpu_model,
        cpus,
        memory,
        loadavg_at_start: loadavg(),
        sockperf,
        iperf3: first_line(command_output("iperf3", &["--version"])),
        haproxy: first_line(command_output(super::haproxy::HAPROXY, &["-v"])),
        git_commit,
        git_dirty,
        cpu_idle,
    }
}
