//! `interceptor cleanup`: remove what an agent left behind (pins, socket, state files).
//! The programs' cgroup links belong to the agent process, so they are gone with it.
use std::path::Path;

use anyhow::{bail, Context};

use crate::datapath::bpffs;
use crate::datapath::ebpf::is_our_pin;

/// File in the state dir that holds the running agent's PID.
pub const PID_FILE: &str = "agent.pid";
/// File in the state dir that remembers the pods handed over by CNI, across restarts.
pub const PODS_FILE: &str = "pods.json";

/// What to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// What a stopping agent removes: socket and pid file. Pins are the data path's
    /// business (`--on-exit`), and the pod list stays, so the next agent adopts the pods.
    Shutdown,
    /// Everything: pins (which detaches pinned links), socket, pid file, pod list
    /// (`interceptor cleanup`).
    Everything,
}

/// Refuses while the agent that wrote the state dir is still running.
pub fn cleanup(
    bpffs_dir: &Path,
    state_dir: &Path,
    cni_socket: &Path,
    scope: Scope,
) -> anyhow::Result<Vec<String>> {
    if let Some(pid) = running_agent(state_dir) {
        bail!("agent pid {pid} is still running: stop it (SIGTERM) before cleaning up");
    }
    let mut removed = Vec::new();
    if scope == Scope::Everything && bpffs_dir.exists() {
        bpffs::remove_pin_dir(bpffs_dir, &is_our_pin)
            .with_context(|| format!("removing {}", bpffs_dir.display()))?;
        removed.push(bpffs_dir.display().to_string());
    }
    let mut files = vec![cni_socket.to_path_buf(), state_dir.join(PID_FILE)];
    if scope == Scope::Everything {
        // iptables mode leaves its chains in the pods' netns (and with them, pods that
        // fail closed): remove them while the pod list still says where they are.
        removed.extend(remove_pod_chains(&state_dir.join(PODS_FILE))?);
        // Both modes leave the node's probe SNAT chain (here, in the node's netns).
        let held = crate::datapath::node_probes::remove_from_node()
            .context("removing the node's probe SNAT chain")?;
        for backend in held {
            removed.push(format!(
                "iptables-{} chain {}",
                backend.name(),
                crate::datapath::node_probes::CHAIN
            ));
        }
        files.push(state_dir.join(PODS_FILE));
        files.push(state_dir.join(crate::datapath::iptables::BACKEND_FILE));
    }
    for path in files {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    // The state dir itself only if we emptied it: it may be shared with the operator.
    if std::fs::remove_dir(state_dir).is_ok() {
        removed.push(state_dir.display().to_string());
    }
    Ok(removed)
}

/// Remove the iptables chains and the netlink tc filters from every remembered pod netns
/// that still exists.
fn remove_pod_chains(pods_file: &Path) -> anyhow::Result<Vec<String>> {
    let sandboxes: Vec<interceptor_cni::protocol::PodSandbox> = match std::fs::read(pods_file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", pods_file.display())),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a pod list", pods_file.display()))?,
    };
    let mut removed = Vec::new();
    for sandbox in sandboxes {
        let netns = Path::new(&sandbox.netns);
        if sandbox.netns.is_empty() || !netns.exists() {
            continue;
        }
        let held = crate::datapath::iptables::remove_from_netns(netns).with_context(|| {
            format!(
                "removing the iptables chains of pod {}/{}",
                sandbox.pod_namespace, sandbox.pod_name
            )
        })?;
        for backend in held {
            removed.push(format!(
                "iptables-{} chains in {}",
                backend.name(),
                netns.display()
            ));
        }
        crate::datapath::client_addr::remove_from_netns(netns).with_context(|| {
            format!(
                "removing the return route of pod {}/{}",
                sandbox.pod_namespace, sandbox.pod_name
            )
        })?;
        // eBPF mode below TCX (6.6): the tc programs are netlink filters on the pod's
        // interfaces, which outlive the agent like its pinned links do.
        let filters =
            crate::datapath::ebpf::remove_netlink_filters_in(netns).with_context(|| {
                format!(
                    "removing the tc filters of pod {}/{}",
                    sandbox.pod_namespace, sandbox.pod_name
                )
            })?;
        if filters > 0 {
            removed.push(format!("{filters} tc filters in {}", netns.display()));
        }
    }
    Ok(removed)
}

/// The PID recorded in the state dir, if that process is alive, is an interceptor, and
/// is not this process.
pub fn running_agent(state_dir: &Path) -> Option<i32> {
    live_agent_in(&state_dir.join(PID_FILE)).filter(|&pid| pid != std::process::id() as i32)
}

/// The PID written in `file` (a pid file or a ready file), if that process is alive and
/// is an interceptor.
pub fn live_agent_in(file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "interceptor").then_some(pid)
}
