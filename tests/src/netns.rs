//! Named network namespaces (the `ip netns` kind, bind-mounted under /var/run/netns) and
//! doing things inside them from a thread, without `ip netns exec`.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::names::NETNS_DIR;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bind mount `ip netns add` made for `name`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Creates the namespace and brings `lo` up, as a container runtime does: the CNI chain
/// only configures the interface it is given.
pub(crate) fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    if let Err(e) = ip(&["-n", name, "link", "set", "lo", "up"]) {
        let _ = delete(name);
        return Err(e);
    }
    Ok(())
}

/// Deletes the namespace if it exists. Links inside it (veth ends, the bridge) go with it
/// once no process holds it any more.
pub(crate) fn delete(name: &str) -> Result<()> {
    if !netns_path(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// Names of all named network namespaces.
pub(crate) fn list() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Opens the namespace file; the descriptor is what `setns` takes.
pub(crate) fn open(name: &str) -> Result<File> {
    let path = netns_path(name);
    File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))
}

/// Runs `f` on a thread that has entered the network namespace `netns`. Sockets created
/// by `f` keep that namespace after the thread is gone, so they can be returned.
pub fn with_netns<T, F>(netns: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> io::Result<T> + Send,
{
    let ns = open(netns)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(LinkNameSpaceType::Network),
            )?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in network namespace {netns} panicked"))
    })?
    .with_context(|| format!("in network namespace {netns}"))
}

/// A TCP connection made from inside `netns` (5 s connect timeout).
pub fn connect_in_netns(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    with_netns(netns, || TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))
        .with_context(|| format!("connecting to {addr}"))
}
