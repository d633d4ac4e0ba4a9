//! The client's address preserved inbound, done ztunnel's way: the inbound proxy dials
//! the application from the client's address and port (a transparent socket with
//! [`TRANSPARENT_MARK`], see `InPodSockets::transparent`), and this module keeps what
//! each enrolled pod's netns needs for the application's replies to come back to that
//! socket instead of leaving the pod towards the real client:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1` (IPv4 and IPv6): the application's accepted socket
//!   takes the mark of the proxy's SYN, so everything it sends carries it;
//!   `net.ipv{4,6}.fwmark_reflect = 1`: so do the kernel's own replies (the RST when the
//!   application is not listening);
//! - a policy rule `fwmark 0x1501 lookup 1501` and, in that table, `local 0.0.0.0/0 dev
//!   lo` (and `local ::/0 dev lo` for a pod with IPv6): every marked packet is delivered
//!   inside the pod, where the transparent socket takes it;
//! - iptables mode: raw-table `CT --notrack` for marked packets (chain [`RAW_CHAIN`]),
//!   in `iptables` and, for a pod with IPv6, in `ip6tables`.
//!   REDIRECT's conntrack entry has the client's tuple to the application's port as its
//!   original direction, which is exactly the proxy's new connection: tracked, it would
//!   be taken for that connection and redirected to 15003 again.
//!
//! Written over netlink and `/proc/sys` from a thread inside the pod's netns (the image
//! has no `ip`). [`ClientAddressRoutes`] wraps either mode: installed after the mode's
//! enrollment, removed before its unenrollment (after the drain of a pod that leaves
//! while running). A pod whose routing could not be installed is still intercepted,
//! from the pod's own address ([`Datapath::preserves_client_ip`] says no), since
//! transparent connections without the route would send the replies out of the pod.
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::Ipv6Addr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use interceptor_common::TRANSPARENT_MARK;

use super::iptables::{self, Backend, LOCK_WAIT_SECS};
use super::{Datapath, DatapathCounters, DatapathError, LiveRecords, PodDatapath};
use crate::inpod::PodNetns;
use crate::sync::lock;

/// The routing table of the pod's local-delivery route; the same number as the mark.
pub const TABLE: u32 = 0x1501;
/// The policy rule's priority: after `local` (0), before `main` (32766).
pub const RULE_PRIORITY: u32 = 0x1501;
/// The raw-table chain of iptables mode; `OUTPUT` and `PREROUTING` jump to it.
pub const RAW_CHAIN: &str = "PROXY_TRANSPARENT";
/// The sysctls each family sets to 1 (and back to 0 on removal):
/// `tcp_fwmark_accept` gives accepted sockets their SYN's mark (IPv6 too);
/// `fwmark_reflect` gives the kernel's own replies (the RST to a SYN for a port nobody
/// listens on) the mark of the packet they answer, so that the RST to the transparent
/// socket's SYN takes the local route back to it instead of leaving the pod (without
/// it, a connect to an application that is down would time out instead of failing).
const SYSCTLS_V4: &[&str] = &[
    "/proc/sys/net/ipv4/tcp_fwmark_accept",
    "/proc/sys/net/ipv4/fwmark_reflect",
];
const SYSCTLS_V6: &[&str] = &["/proc/sys/net/ipv6/fwmark_reflect"];

/// What is installed for one pod.
#[derive(Debug)]
struct PodRouting {
    netns: Arc<PodNetns>,
    ipv4: bool,
    ipv6: bool,
}

/// A data path that also keeps each enrolled pod's return route for transparent
/// inbound sockets; everything else is the wrapped mode's.
pub struct ClientAddressRoutes {
    inner: Arc<dyn Datapath>,
    /// iptables mode's backend (the raw-table notrack rules); `None` in eBPF mode.
    iptables: Option<Backend>,
    pods: Mutex<HashMap<u64, PodRouting>>,
    /// Pods that left the mesh while running: their routing stays until they drain.
    draining: Mutex<HashSet<u64>>,
}

impl ClientAddressRoutes {
    pub fn wrap(inner: Arc<dyn Datapath>, iptables: Option<Backend>) -> Arc<dyn Datapath> {
        Arc::new(Self {
            inner,
            iptables,
            pods: Mutex::default(),
            draining: Mutex::default(),
        })
    }

    fn remove(&self, pod: &PodDatapath, netns: &PodNetns) {
        let had = lock(&self.pods).remove(&pod.netns_cookie);
        lock(&self.draining).remove(&pod.netns_cookie);
        if had.is_none() {
            return;
        }
        let backend = self.iptables;
        let removed = netns
            .run_blocking(|| remove_here(backend))
            .map_err(|e| DatapathError::PodRouting(e.to_string()))
            .and_then(|result| result);
        if let Err(error) = removed {
            tracing::warn!(netns = %netns.path().display(), %error,
                "removing the return route of transparent inbound sockets");
        }
    }
}

/// Install `family`'s part in `netns` (see [`install_here`]); `false`, logged, when it
/// failed: the pod's connections then come from its own address.
fn install_logged(netns: &PodNetns, family: Family, iptables: Option<Backend>) -> bool {
    let installed = netns
        .run_blocking(|| install_here(family, iptables))
        .map_err(|e| DatapathError::PodRouting(e.to_string()))
        .and_then(|result| result);
    match installed {
        Ok(()) => true,
        Err(error) => {
            tracing::error!(netns = %netns.path().display(), ?family, %error, "the pod's \
                return route for transparent inbound sockets: its applications see the \
                pod's own address as their peer");
            false
        }
    }
}

impl Datapath for ClientAddressRoutes {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn enroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.inner.enroll(pod, netns)?;
        lock(&self.draining).remove(&pod.netns_cookie);
        let backend = self.iptables;
        let ipv4 = install_logged(netns, Family::V4, backend);
        let routing = PodRouting {
            netns: Arc::clone(netns),
            ipv4,
            ipv6: false,
        };
        lock(&self.pods).insert(pod.netns_cookie, routing);
        Ok(())
    }

    fn supports_ipv6(&self) -> bool {
        self.inner.supports_ipv6()
    }

    fn enroll_ipv6(&self, pod: &PodDatapath, ip: Ipv6Addr) -> Result<(), DatapathError> {
        self.inner.enroll_ipv6(pod, ip)?;
        let netns = lock(&self.pods)
            .get(&pod.netns_cookie)
            .map(|routing| Arc::clone(&routing.netns));
        if let Some(netns) = netns {
            let ipv6 = install_logged(&netns, Family::V6, self.iptables);
            if let Some(routing) = lock(&self.pods).get_mut(&pod.netns_cookie) {
                routing.ipv6 = ipv6;
            }
        }
        Ok(())
    }

    fn unenroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.remove(pod, netns);
        self.inner.unenroll(pod, netns)
    }

    fn unenroll_running(
        &self,
        pod: &PodDatapath,
        netns: &Arc<PodNetns>,
    ) -> Result<(), DatapathError> {
        // Its open transparent connections still need the route: kept until drained.
        lock(&self.draining).insert(pod.netns_cookie);
        self.inner.unenroll_running(pod, netns)
    }

    fn drained(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        if lock(&self.draining).contains(&pod.netns_cookie) {
            self.remove(pod, netns);
        }
        self.inner.drained(pod, netns)
    }

    fn preserves_client_ip(&self, netns_cookie: u64, ipv6: bool) -> bool {
        lock(&self.pods).get(&netns_cookie).is_some_and(|routing| {
            if ipv6 {
                routing.ipv6
            } else {
                routing.ipv4
            }
        })
    }

    fn release_netns(&self, path: &Path) -> Result<(), DatapathError> {
        self.inner.release_netns(path)
    }

    fn netns_cookie(&self, netns: &PodNetns) -> Result<u64, DatapathError> {
        self.inner.netns_cookie(netns)
    }

    fn expire_half_open(&self, older_than: std::time::Duration) -> usize {
        self.inner.expire_half_open(older_than)
    }

    fn set_debug(&self, on: bool) -> Result<(), DatapathError> {
        self.inner.set_debug(on)
    }

    fn counters(&self) -> Option<DatapathCounters> {
        self.inner.counters()
    }

    fn live_records(&self) -> LiveRecords {
        self.inner.live_records()
    }

    fn forget_unclaimed_rules(&self) -> usize {
        self.inner.forget_unclaimed_rules()
    }

    fn retain_pods(&self, netns_cookies: &HashSet<u64>) {
        self.inner.retain_pods(netns_cookies);
    }

    fn set_rules(
        &self,
        scope: u64,
        rules: &crate::config::MeshConfig,
    ) -> Result<(), DatapathError> {
        self.inner.set_rules(scope, rules)
    }

    fn teardown(&self) -> Result<(), DatapathError> {
        self.inner.teardown()
    }

    fn node_probes(&self) -> Option<super::node_probes::NodeProbesStatus> {
        self.inner.node_probes()
    }
}

/// Remove the return route from the pod netns at `path` (`interceptor cleanup`): both
/// families, the sysctl, and the raw chain in every iptables backend installed here.
pub fn remove_from_netns(path: &Path) -> Result<(), DatapathError> {
    let netns = PodNetns::enter(path).map_err(|e| DatapathError::PodRouting(e.to_string()))?;
    netns
        .run_blocking(|| {
            let mut result = remove_here(None);
            for backend in [Backend::Legacy, Backend::Nft] {
                for family in [Family::V4, Family::V6] {
                    result = result.and(remove_raw_here(backend, family));
                }
            }
            result
        })
        .map_err(|e| DatapathError::PodRouting(e.to_string()))?
}

/// An address family of the pod's return route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn sysctls(self) -> &'static [&'static str] {
        match self {
            Family::V4 => SYSCTLS_V4,
            Family::V6 => SYSCTLS_V6,
        }
    }

    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }

    /// The iptables family of the same name (`iptables` or `ip6tables`).
    fn tables(self) -> iptables::Family {
        match self {
            Family::V4 => iptables::Family::V4,
            Family::V6 => iptables::Family::V6,
        }
    }
}

/// Install `family`'s rule and route in the calling thread's netns (in iptables mode,
/// the family's raw rules) and the family's sysctls. All or nothing: on an error what
/// this call added is removed again.
fn install_here(family: Family, iptables: Option<Backend>) -> Result<(), DatapathError> {
    let install = || -> Result<(), DatapathError> {
        if let Some(backend) = iptables {
            restore_raw(backend, family, |save| Some(raw_install_script(save)))?;
        }
        for sysctl in family.sysctls() {
            std::fs::write(sysctl, "1")
                .map_err(|e| routing_error(format!("writing {sysctl}"), e))?;
        }
        let netlink = Netlink::open()?;
        netlink.request(&rule_message(family, Op::Add), "adding the policy rule")?;
        let lo = loopback_index()?;
        netlink.request(
            &route_message(family, lo, Op::Add),
            "adding the local route",
        )?;
        Ok(())
    };
    install().inspect_err(|_| {
        let _ = remove_family_here(family);
        let _ = remove_extras_here(family, iptables);
    })
}

/// Remove everything [`install_here`] adds, both families, from the calling thread's
/// netns; what is not there is not an error. The first failure is returned, after
/// every part was tried.
fn remove_here(iptables: Option<Backend>) -> Result<(), DatapathError> {
    let v6 = remove_family_here(Family::V6);
    let v4 = remove_family_here(Family::V4);
    let extras4 = remove_extras_here(Family::V4, iptables);
    let extras6 = remove_extras_here(Family::V6, iptables);
    v4.and(v6).and(extras4).and(extras6)
}

fn remove_family_here(family: Family) -> Result<(), DatapathError> {
    let netlink = Netlink::open()?;
    let lo = loopback_index()?;
    let route = netlink.request(
        &route_message(family, lo, Op::Delete),
        "deleting the local route",
    );
    let rule = netlink.request(
        &rule_message(family, Op::Delete),
        "deleting the policy rule",
    );
    route.and(rule)
}

/// The family's sysctls back to 0 and, in iptables mode, its raw rules.
fn remove_extras_here(family: Family, iptables: Option<Backend>) -> Result<(), DatapathError> {
    let sysctl = reset_sysctls(family);
    let raw = match iptables {
        Some(backend) => remove_raw_here(backend, family),
        None => Ok(()),
    };
    sysctl.and(raw)
}

/// The family's raw rules of `backend`, where this node has that family's tools.
fn remove_raw_here(backend: Backend, family: Family) -> Result<(), DatapathError> {
    if iptables::resolve(&backend.tool_of(family.tables(), "save")).is_file() {
        restore_raw(backend, family, raw_remove_script)
    } else {
        Ok(())
    }
}

/// Back to 0; a sysctl that is not there (IPv6 off in the pod) is nothing to undo.
fn reset_sysctls(family: Family) -> Result<(), DatapathError> {
    let mut result = Ok(());
    for sysctl in family.sysctls() {
        match std::fs::write(sysctl, "0") {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                result = result.and(Err(routing_error(format!("writing {sysctl}"), error)));
            }
            _ => {}
        }
    }
    result
}

fn routing_error(what: String, error: std::io::Error) -> DatapathError {
    DatapathError::PodRouting(format!("{what}: {error}"))
}

fn loopback_index() -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex("lo")
        .map_err(|e| routing_error("the pod's lo".into(), std::io::Error::from(e)))
}

/// The raw-table rules: marked packets (the proxy's transparent sockets and the
/// application's replies to them) are never tracked. In `OUTPUT` where they are made;
/// from `PREROUTING` too, for the loopback delivery (a packet of lo keeps its mark).
fn raw_install_script(save: &str) -> String {
    let installed = RawInstalled::parse(save);
    let mut s = format!("*raw\n:{RAW_CHAIN} - [0:0]\n");
    for hook in ["OUTPUT", "PREROUTING"] {
        if !installed
            .jumps
            .iter()
            .any(|jump| jump.starts_with(&format!("-A {hook} ")))
        {
            let _ = writeln!(s, "-I {hook} 1 -j {RAW_CHAIN}");
        }
    }
    let _ = writeln!(
        s,
        "-A {RAW_CHAIN} -m mark --mark {TRANSPARENT_MARK:#x} -j CT --notrack"
    );
    s.push_str("COMMIT\n");
    s
}

/// The input that removes the chain and the jumps to it; `None` when there is none.
fn raw_remove_script(save: &str) -> Option<String> {
    let installed = RawInstalled::parse(save);
    if !installed.chain && installed.jumps.is_empty() {
        return None;
    }
    let mut s = String::from("*raw\n");
    for jump in &installed.jumps {
        let _ = writeln!(s, "-D{}", &jump[2..]);
    }
    let _ = writeln!(s, ":{RAW_CHAIN} - [0:0]\n-X {RAW_CHAIN}");
    s.push_str("COMMIT\n");
    Some(s)
}

/// What of ours the raw table holds.
#[derive(Debug, Default)]
struct RawInstalled {
    chain: bool,
    jumps: Vec<String>,
}

impl RawInstalled {
    fn parse(save: &str) -> Self {
        let mut installed = Self::default();
        for line in save.lines().map(str::trim) {
            if line == format!(":{RAW_CHAIN}") || line.starts_with(&format!(":{RAW_CHAIN} ")) {
                installed.chain = true;
            } else if line.starts_with("-A ") && line.ends_with(&format!("-j {RAW_CHAIN}")) {
                installed.jumps.push(line.to_owned());
            }
        }
        installed
    }
}

/// Read the raw table of the calling thread's netns and restore what `script` makes of
/// it (`None`: nothing to do).
fn restore_raw(
    backend: Backend,
    family: Family,
    script: impl FnOnce(&str) -> Option<String>,
) -> Result<(), DatapathError> {
    let tool = |what| backend.tool_of(family.tables(), what);
    let save = iptables::run(&tool("save"), &["-t", "raw"], None)?;
    match script(&save) {
        Some(script) => iptables::run(
            &tool("restore"),
            &["--noflush", "-w", LOCK_WAIT_SECS],
            Some(&script),
        )
        .map(drop),
        None => Ok(()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Add,
    Delete,
}

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_LOCAL: u8 = 2;
const RT_SCOPE_HOST: u8 = 254;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTPROT_STATIC: u8 = 4;
const NLMSG_HDRLEN: usize = 16;

/// A netlink message: header (length and sequence filled in by [`Netlink::request`]),
/// a fixed 12-byte family header, then 4-byte attributes.
fn message(kind: u16, flags: u16, header: [u8; 12], attrs: &[(u16, u32)]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + 12 + attrs.len() * 8);
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(&header);
    for (kind, value) in attrs {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&value.to_ne_bytes());
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    msg
}

/// `ip rule add|del fwmark 0x1501/0xffffffff lookup 0x1501 pref 0x1501`. Added with
/// `NLM_F_EXCL`: the kernel otherwise adds an identical rule again.
fn rule_message(family: Family, op: Op) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table (in FRA_TABLE), res1,
    // res2, action, flags.
    let header = [family.af(), 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    let (kind, flags) = match op {
        Op::Add => (RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL),
        Op::Delete => (RTM_DELRULE, 0),
    };
    let attrs = [
        (FRA_PRIORITY, RULE_PRIORITY),
        (FRA_FWMARK, TRANSPARENT_MARK),
        (FRA_FWMASK, u32::MAX),
        (FRA_TABLE, TABLE),
    ];
    message(kind, flags, header, &attrs)
}

/// `ip route add|del local 0.0.0.0/0 (::/0) dev lo table 0x1501`.
fn route_message(family: Family, lo: u32, op: Op) -> Vec<u8> {
    let (kind, flags, scope) = match op {
        Op::Add => (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, RT_SCOPE_HOST),
        Op::Delete => (RTM_DELROUTE, 0, RT_SCOPE_NOWHERE),
    };
    // struct rtmsg: family, dst_len, src_len, tos, table (in RTA_TABLE), protocol, scope,
    // type, flags.
    let header = [
        family.af(),
        0,
        0,
        0,
        0,
        RTPROT_STATIC,
        scope,
        RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    message(kind, flags, header, &[(RTA_TABLE, TABLE), (RTA_OIF, lo)])
}

/// A route netlink socket in the calling thread's netns (a netlink socket keeps the netns
/// it was made in).
struct Netlink {
    fd: std::os::fd::OwnedFd,
}

impl Netlink {
    fn open() -> Result<Self, DatapathError> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the fd is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(routing_error(
                "netlink socket".into(),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Send `msg` and wait for its acknowledgement. "Already there" for an add and "not
    /// there" for a delete are success: both calls are idempotent.
    fn request(&self, msg: &[u8], what: &str) -> Result<(), DatapathError> {
        use std::os::fd::AsRawFd;
        let kind = u16::from_ne_bytes([msg[4], msg[5]]);
        let adding = kind == RTM_NEWRULE || kind == RTM_NEWROUTE;
        let fd = self.fd.as_raw_fd();
        let failed = |error: std::io::Error| routing_error(what.to_owned(), error);
        // SAFETY: msg is a readable buffer of msg.len() bytes; the kernel is the peer
        // (the default destination of an unconnected netlink socket is pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: as above; addr is a valid sockaddr_nl of the length passed.
        let sent = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(failed(std::io::Error::last_os_error()));
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(failed(std::io::Error::last_os_error()));
            }
            let n = n as usize;
            let mut at = 0;
            while at + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default());
                let len = len as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if kind == NLMSG_ERROR && at + NLMSG_HDRLEN + 4 <= n {
                    let start = at + NLMSG_HDRLEN;
                    let code =
                        i32::from_ne_bytes(buf[start..start + 4].try_into().unwrap_or_default());
                    return match -code {
                        0 => Ok(()),
                        libc::EEXIST if adding => Ok(()),
                        libc::ENOENT | libc::ESRCH | libc::EAFNOSUPPORT if !adding => Ok(()),
                        errno => Err(failed(std::io::Error::from_raw_os_error(errno))),
                    };
                }
                if len < NLMSG_HDRLEN {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(msg: &[u8], kind: u16) -> Option<u32> {
        let mut at = NLMSG_HDRLEN + 12;
        while at + 8 <= msg.len() {
            let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
            if u16::from_ne_bytes([msg[at + 2], msg[at + 3]]) == kind {
                return Some(u32::from_ne_bytes(msg[at + 4..at + 8].try_into().unwrap()));
            }
            at += (len + 3) & !3;
        }
        None
    }

    fn header(msg: &[u8]) -> (u32, u16, u16) {
        (
            u32::from_ne_bytes(msg[..4].try_into().unwrap()),
            u16::from_ne_bytes([msg[4], msg[5]]),
            u16::from_ne_bytes([msg[6], msg[7]]),
        )
    }

    #[test]
    fn the_rule_sends_the_transparent_mark_to_the_table_before_main() {
        for family in [Family::V4, Family::V6] {
            let add = rule_message(family, Op::Add);
            let (len, kind, flags) = header(&add);
            assert_eq!(len as usize, add.len());
            assert_eq!(kind, RTM_NEWRULE);
            assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
            assert_eq!(add[NLMSG_HDRLEN], family.af());
            assert_eq!(add[NLMSG_HDRLEN + 7], FR_ACT_TO_TBL);
            assert_eq!(attr(&add, FRA_FWMARK), Some(0x1501));
            assert_eq!(attr(&add, FRA_FWMASK), Some(u32::MAX));
            assert_eq!(attr(&add, FRA_TABLE), Some(TABLE));
            let priority = attr(&add, FRA_PRIORITY).unwrap();
            assert!(priority > 0 && priority < 32766, "{priority}");
            let delete = rule_message(family, Op::Delete);
            assert_eq!(header(&delete).1, RTM_DELRULE);
            assert_eq!(header(&delete).2, NLM_F_REQUEST | NLM_F_ACK);
            assert_eq!(&delete[NLMSG_HDRLEN..], &add[NLMSG_HDRLEN..]);
        }
    }

    #[test]
    fn the_route_delivers_every_address_locally_through_lo() {
        let add = route_message(Family::V6, 1, Op::Add);
        let rtm = &add[NLMSG_HDRLEN..NLMSG_HDRLEN + 12];
        assert_eq!(rtm[0], libc::AF_INET6 as u8);
        assert_eq!(rtm[1], 0, "the default prefix, /0");
        assert_eq!((rtm[6], rtm[7]), (RT_SCOPE_HOST, RTN_LOCAL));
        assert_eq!(attr(&add, RTA_TABLE), Some(TABLE));
        assert_eq!(attr(&add, RTA_OIF), Some(1));
        let delete = route_message(Family::V4, 7, Op::Delete);
        assert_eq!(header(&delete).1, RTM_DELROUTE);
        assert_eq!(delete[NLMSG_HDRLEN], libc::AF_INET as u8);
        assert_eq!(delete[NLMSG_HDRLEN + 7], RTN_LOCAL);
        assert_eq!(attr(&delete, RTA_OIF), Some(7));
    }

    const RAW_WITH_OURS: &str = "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
        :PROXY_TRANSPARENT - [0:0]\n-A PREROUTING -j PROXY_TRANSPARENT\n\
        -A OUTPUT -j PROXY_TRANSPARENT\n\
        -A PROXY_TRANSPARENT -m mark --mark 0x1501 -j CT --notrack\nCOMMIT\n";

    #[test]
    fn raw_rules_untrack_the_transparent_mark_and_never_duplicate_jumps() {
        let fresh = raw_install_script("*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n");
        assert_eq!(
            fresh,
            "*raw\n:PROXY_TRANSPARENT - [0:0]\n-I OUTPUT 1 -j PROXY_TRANSPARENT\n\
             -I PREROUTING 1 -j PROXY_TRANSPARENT\n\
             -A PROXY_TRANSPARENT -m mark --mark 0x1501 -j CT --notrack\nCOMMIT\n"
        );
        let again = raw_install_script(RAW_WITH_OURS);
        assert!(!again.contains("-I "), "{again}");
        assert!(
            again.contains(":PROXY_TRANSPARENT - [0:0]\n"),
            "flushed and refilled"
        );
    }

    #[test]
    fn raw_removal_deletes_the_jumps_then_the_chain_and_nothing_when_clean() {
        assert_eq!(
            raw_remove_script(RAW_WITH_OURS).unwrap(),
            "*raw\n-D PREROUTING -j PROXY_TRANSPARENT\n-D OUTPUT -j PROXY_TRANSPARENT\n\
             :PROXY_TRANSPARENT - [0:0]\n-X PROXY_TRANSPARENT\nCOMMIT\n"
        );
        assert_eq!(
            raw_remove_script("*raw\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"),
            None
        );
    }
}
