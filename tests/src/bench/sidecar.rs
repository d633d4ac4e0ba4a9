//! A sidecar-style proxy of the baselines (HAProxy, ztunnel): a process running in the
//! client pod, and the iptables `nat OUTPUT` REDIRECT rules that steer the client's
//! connections into it. Dropping it removes the rules, then kills the process (by pid).

use std::process::Command;

use anyhow::{bail, Context, Result};

use super::measure::strings;
use super::proc::Background;

/// `iptables -w args` in `netns`; its stdout.
fn iptables(netns: &str, args: &[String]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "iptables", "-w"])
        .args(args)
        .output()
        .context("running ip netns exec ... iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {} in {netns}: {} {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Sidecar {
    /// "haproxy", "ztunnel": for messages.
    name: &'static str,
    netns: String,
    /// The rules added, without `-A`, in order.
    installed: Vec<Vec<String>>,
    proc: Option<Background>,
}

impl Sidecar {
    /// Takes over `proc` (already running in the pod whose netns is `netns`).
    pub fn new(name: &'static str, netns: &str, proc: Background) -> Sidecar {
        Sidecar {
            name,
            netns: netns.to_owned(),
            installed: Vec::new(),
            proc: Some(proc),
        }
    }

    /// Appends `spec` (a rule without `-A OUTPUT`) to the pod's `nat OUTPUT`.
    pub fn redirect(&mut self, spec: Vec<String>) -> Result<()> {
        let mut args = strings(&["-t", "nat", "-A", "OUTPUT"]);
        args.extend(spec.iter().cloned());
        iptables(&self.netns, &args)?;
        self.installed.push(spec);
        Ok(())
    }

    /// Connections the REDIRECT rules steered so far (nat rules see each connection's
    /// first packet only).
    pub fn redirected_connections(&self) -> Result<u64> {
        let listing = iptables(
            &self.netns,
            &strings(&["-t", "nat", "-L", "OUTPUT", "-n", "-v", "-x"]),
        )?;
        Ok(listing
            .lines()
            .filter(|l| l.contains("REDIRECT"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }

    /// Fails when the proxy has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        match self.proc.as_mut() {
            Some(p) => p.check_alive(),
            None => bail!("{} is not running", self.name),
        }
    }

    /// The rules as `iptables -S` prints them, for the record.
    pub fn rules(&self) -> Result<String> {
        iptables(&self.netns, &strings(&["-t", "nat", "-S", "OUTPUT"]))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for spec in self.installed.drain(..) {
            let mut args = strings(&["-t", "nat", "-D", "OUTPUT"]);
            args.extend(spec);
            if let Err(e) = iptables(&self.netns, &args) {
                eprintln!(
                    "tb-bench: removing a REDIRECT rule for {}: {e:#}",
                    self.name
                );
            }
        }
        self.proc.take();
    }
}
