//! Kubelet's probes in SMI mode, done Istio ambient's way: the node's own connections to
//! an enrolled pod leave the node's netns with the source address
//! [`NODE_PROBE_SOURCE`] (169.254.7.127), and the inbound proxy admits exactly that
//! address without a TrafficTarget. One SNAT rule per enrolled pod in the node netns's nat
//! `POSTROUTING` (chain [`CHAIN`]), matched with `-m owner --socket-exists`: only packets
//! of a socket on the node itself, so forwarded traffic (another node's pods, a NodePort
//! client that kube-proxy masqueraded to the node's address) keeps its source and its SMI
//! check. The same rule serves both modes, since it lives outside the pod: eBPF mode's tc
//! and iptables mode's PREROUTING both steer the SNATed SYN to 15003 as before.
//! [`ProbeSnat`] wraps either data path and keeps the chain in step with enrollment: a
//! new pod's rule is written off its CNI ADD's path (a tool run costs milliseconds, the
//! periodic whole rewrite reads the node's nat table, O(cluster)), a leaving pod's before
//! the pod leaves the data path.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use interceptor_common::NODE_PROBE_SOURCE;

use super::iptables::{self, Backend, BackendChoice, LOCK_WAIT_SECS};
use super::{Datapath, DatapathCounters, DatapathError, LiveRecords, PodDatapath};
use crate::config::MeshConfig;
use crate::inpod::PodNetns;
use crate::sync::lock;

/// The nat chain in the node's netns; `POSTROUTING` jumps to it first.
pub const CHAIN: &str = "INTERCEPTOR_PROBES";

/// One enrolled pod's rule as `iptables-save` prints it (the order of its matches).
fn rule(pod: Ipv4Addr) -> String {
    format!(
        "-A {CHAIN} -d {pod}/32 -p tcp -m owner --socket-exists -j SNAT --to-source {NODE_PROBE_SOURCE}"
    )
}

/// What of ours the node's nat table holds now.
#[derive(Debug, Default, PartialEq, Eq)]
struct Installed {
    chain: bool,
    /// Every rule that jumps to [`CHAIN`] (normally just [`JUMP`]).
    jumps: Vec<String>,
    /// The pods the chain SNATs for.
    pods: BTreeSet<Ipv4Addr>,
}

impl Installed {
    fn parse(nat_save: &str) -> Installed {
        let mut installed = Installed::default();
        let rule_prefix = format!("-A {CHAIN} -d ");
        for line in nat_save.lines().map(str::trim) {
            if line == format!(":{CHAIN}").as_str() || line.starts_with(&format!(":{CHAIN} ")) {
                installed.chain = true;
            } else if let Some(rest) = line.strip_prefix(&rule_prefix) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                if let Ok(ip) = addr.trim_end_matches("/32").parse() {
                    installed.pods.insert(ip);
                }
            } else if line.starts_with("-A ") && line.ends_with(&format!("-j {CHAIN}")) {
                installed.jumps.push(line.to_owned());
            }
        }
        installed
    }
}

/// The input that makes the chain hold exactly one rule per pod in `pods`: declaring
/// the chain in a `--noflush` restore creates or empties it, and the jump goes first in
/// `POSTROUTING` (before any MASQUERADE there, which would otherwise pick the source).
fn sync_script(installed: &Installed, pods: &BTreeSet<Ipv4Addr>) -> String {
    let mut s = format!("*nat\n:{CHAIN} - [0:0]\n");
    if installed.jumps.is_empty() {
        let _ = writeln!(s, "-I POSTROUTING 1 -j {CHAIN}");
    }
    for pod in pods {
        let _ = writeln!(s, "{}", rule(*pod));
    }
    s.push_str("COMMIT\n");
    s
}

/// The input that appends the rules of `added` to the chain and deletes those of
/// `removed`: one pod's ADD or DEL without reading the node's nat table (which holds
/// kube-proxy's rules, O(cluster), on a real node). `None` when nothing changes.
fn delta_script(added: &BTreeSet<Ipv4Addr>, removed: &BTreeSet<Ipv4Addr>) -> Option<String> {
    if added.is_empty() && removed.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for pod in removed {
        let _ = writeln!(s, "-D{}", &rule(*pod)[2..]);
    }
    for pod in added {
        let _ = writeln!(s, "{}", rule(*pod));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// The input that removes the chain and every jump to it; `None` when there is none.
fn remove_script(installed: &Installed) -> Option<String> {
    if !installed.chain && installed.jumps.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for jump in &installed.jumps {
        let _ = writeln!(s, "-D{}", &jump[2..]);
    }
    let _ = writeln!(s, ":{CHAIN} - [0:0]\n-X {CHAIN}");
    s.push_str("COMMIT\n");
    Some(s)
}

fn save(backend: Backend) -> Result<Installed, DatapathError> {
    let text = iptables::run(&backend.tool("save"), &["-t", "nat"], None)?;
    Ok(Installed::parse(&text))
}

fn restore(backend: Backend, script: &str) -> Result<(), DatapathError> {
    iptables::run(
        &backend.tool("restore"),
        &["--noflush", "-w", LOCK_WAIT_SECS],
        Some(script),
    )
    .map(drop)
}

fn remove_with(backend: Backend) -> Result<bool, DatapathError> {
    match remove_script(&save(backend)?) {
        Some(script) => restore(backend, &script).map(|()| true),
        None => Ok(false),
    }
}

/// Remove the chain from the calling process's netns (the node's) in both backends, for
/// `interceptor cleanup`; a backend whose tools are not installed holds nothing. Returns
/// the backends that held it.
pub fn remove_from_node() -> Result<Vec<Backend>, DatapathError> {
    let mut held = Vec::new();
    for backend in [Backend::Legacy, Backend::Nft] {
        if !iptables::resolve(&backend.tool("save")).is_file() {
            continue;
        }
        if remove_with(backend)? {
            held.push(backend);
        }
    }
    Ok(held)
}

/// What `/config_dump` says of the node's probe SNAT.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeProbesStatus {
    /// The address the node's connections to enrolled pods come from.
    pub source: Ipv4Addr,
    pub backend: Backend,
    /// The pods the chain SNATs for, as this agent last wrote it.
    pub pods: BTreeSet<Ipv4Addr>,
    /// Why the last write failed; `None` once one succeeds.
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Enrolled pods by netns cookie.
    pods: HashMap<u64, Ipv4Addr>,
    /// Pods a previous agent's chain held, kept until this agent enrolls them or prunes
    /// (`retain_pods`): during a restart or a hand-over their probes keep working.
    inherited: BTreeSet<Ipv4Addr>,
    /// What the last write put in the chain, and its error if it failed.
    written: BTreeSet<Ipv4Addr>,
    last_error: Option<String>,
    /// When the last whole write (save, compare, restore) succeeded, if every write
    /// since did too: the chain, its jump and `written` agree, so a change within
    /// [`WHOLE_EVERY`] of it is written as a difference. Cleared by a failure, which the
    /// next write repairs in full.
    in_step_since: Option<std::time::Instant>,
    /// The chain was removed for good (every pod is being removed): no more writes.
    removed: bool,
}

/// How long differences are written before the chain is checked and written whole again
/// (what a tool that flushed the nat table took away comes back by then).
const WHOLE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// A data path that also keeps the node's probe SNAT rules for the pods it enrolls.
/// Everything else is the wrapped mode's.
pub struct ProbeSnat {
    inner: Arc<dyn Datapath>,
    backend: Backend,
    /// Held only briefly, never while a tool runs.
    state: Mutex<State>,
    /// Held while the tools run: each write reads the latest state, so an older rule set
    /// never lands after a newer one.
    writes: Mutex<()>,
    /// Writes asked for by enrollments, served off their path by one background build at a
    /// time: those asked for during a write are served by the next one.
    background: crate::sync::Coalesced,
    me: Weak<ProbeSnat>,
}

impl ProbeSnat {
    /// Takes the pod out of the chain first: once the pod is out of the data path, a
    /// probe SNATed to the probe address would reach it unintercepted, and its
    /// NetworkPolicy may not expect it.
    fn forget(&self, pod: &PodDatapath) {
        {
            let mut state = lock(&self.state);
            state.pods.remove(&pod.netns_cookie);
            state.inherited.remove(&pod.ipv4);
        }
        self.sync();
    }

    /// Bring the chain in step off the caller's path, as the route table's builder is
    /// (below the CNI path's priority, which the tool it runs inherits): a new pod's rule
    /// is not on its ADD's path. Until it is written, kubelet's probes of the pod keep the
    /// node's address, which SMI mode refuses (closed, never open); a pod's containers,
    /// and so its probes, start after its ADD anyway. In place outside a tokio runtime.
    fn sync_in_background(&self) {
        crate::sync::request_in_background(
            self,
            &self.me,
            |snat| &snat.background,
            ProbeSnat::sync,
        );
    }

    /// Remove the chain and every jump to it, and write nothing more: every pod is being
    /// removed, and a write still asked for finds nothing to do.
    fn remove_for_good(&self) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        *lock(&self.state) = State {
            removed: true,
            ..State::default()
        };
        remove_with(self.backend).map(drop)
    }

    /// Wrap `inner`, writing with `backend` (iptables mode's), or in eBPF mode with the
    /// one detected for this node the way iptables mode would. Without a usable iptables
    /// the node's probes stay unadmitted in SMI mode, which is logged, and `inner` is
    /// returned as it is: interception itself does not depend on this.
    pub fn wrap(
        inner: Arc<dyn Datapath>,
        backend: Option<Backend>,
        choice: BackendChoice,
        state_dir: &Path,
    ) -> Arc<dyn Datapath> {
        let backend = match backend {
            Some(backend) => backend,
            None => match iptables::detect(choice, state_dir) {
                Ok((backend, _why)) => backend,
                Err(error) => {
                    tracing::error!(%error, "no iptables for the node's probe SNAT: in SMI \
                        mode kubelet's probes of enrolled pods will be refused");
                    return inner;
                }
            },
        };
        let inherited = match save(backend) {
            Ok(installed) => installed.pods,
            Err(error) => {
                tracing::warn!(%error, "reading the node's probe SNAT rules");
                BTreeSet::new()
            }
        };
        Arc::new_cyclic(|me| ProbeSnat {
            inner,
            backend,
            state: Mutex::new(State {
                pods: HashMap::new(),
                written: inherited.clone(),
                inherited,
                last_error: None,
                in_step_since: None,
                removed: false,
            }),
            writes: Mutex::new(()),
            background: crate::sync::Coalesced::default(),
            me: me.clone(),
        })
    }

    /// Bring the chain in step with the current state: the difference from the last
    /// write when the chain is known to match it (one restore, no save), else the whole
    /// chain; a failed difference (the chain changed behind our back) is retried whole.
    /// A failure is logged, not returned: the pod is intercepted either way, and only its
    /// probes in SMI mode depend on it.
    fn sync(&self) {
        let _writing = lock(&self.writes);
        let (pods, written, in_step) = {
            let state = lock(&self.state);
            if state.removed {
                return;
            }
            let pods: BTreeSet<Ipv4Addr> = state
                .pods
                .values()
                .chain(&state.inherited)
                .copied()
                .collect();
            let in_step = state
                .in_step_since
                .is_some_and(|since| since.elapsed() < WHOLE_EVERY);
            (pods, state.written.clone(), in_step)
        };
        let whole = || {
            save(self.backend).and_then(|installed| {
                if installed.pods == pods && !installed.jumps.is_empty() {
                    return Ok(());
                }
                restore(self.backend, &sync_script(&installed, &pods))
            })
        };
        let added = pods.difference(&written).copied().collect();
        let removed = written.difference(&pods).copied().collect();
        let mut wrote_whole = false;
        let result = match delta_script(&added, &removed) {
            Some(script) if in_step => restore(self.backend, &script).or_else(|error| {
                tracing::warn!(%error, "the node's probe SNAT chain changed behind our back: rewriting it whole");
                wrote_whole = true;
                whole()
            }),
            None if in_step => Ok(()),
            _ => {
                wrote_whole = true;
                whole()
            }
        };
        let mut state = lock(&self.state);
        state.in_step_since = match (&result, wrote_whole) {
            (Err(_), _) => None,
            (Ok(()), true) => Some(std::time::Instant::now()),
            (Ok(()), false) => state.in_step_since,
        };
        match result {
            Ok(()) => {
                state.written = pods;
                state.last_error = None;
            }
            Err(error) => {
                tracing::error!(%error, "writing the node's probe SNAT rules: in SMI mode \
                    kubelet's probes of the pods missing from them are refused");
                state.last_error = Some(error.to_string());
            }
        }
    }
}

impl Datapath for ProbeSnat {
    fn mode(&self) -> &'static str {
        self.inner.mode()
    }

    fn enroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.inner.enroll(pod, netns)?;
        {
            let mut state = lock(&self.state);
            state.pods.insert(pod.netns_cookie, pod.ipv4);
            state.inherited.remove(&pod.ipv4);
        }
        self.sync_in_background();
        Ok(())
    }

    // No IPv6 probe SNAT: kubelet's probes reach pods over IPv4.
    fn supports_ipv6(&self) -> bool {
        self.inner.supports_ipv6()
    }

    fn enroll_ipv6(&self, pod: &PodDatapath, ip: Ipv6Addr) -> Result<(), DatapathError> {
        self.inner.enroll_ipv6(pod, ip)
    }

    fn unenroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.forget(pod);
        self.inner.unenroll(pod, netns)
    }

    fn unenroll_running(
        &self,
        pod: &PodDatapath,
        netns: &Arc<PodNetns>,
    ) -> Result<(), DatapathError> {
        self.forget(pod);
        self.inner.unenroll_running(pod, netns)
    }

    fn drained(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        self.inner.drained(pod, netns)
    }

    fn preserves_client_ip(&self, netns_cookie: u64, ipv6: bool) -> bool {
        self.inner.preserves_client_ip(netns_cookie, ipv6)
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
        {
            let mut state = lock(&self.state);
            state
                .pods
                .retain(|cookie, _| netns_cookies.contains(cookie));
            state.inherited.clear();
        }
        self.sync();
    }

    fn set_rules(&self, scope: u64, rules: &MeshConfig) -> Result<(), DatapathError> {
        self.inner.set_rules(scope, rules)
    }

    fn node_probes(&self) -> Option<NodeProbesStatus> {
        let state = lock(&self.state);
        Some(NodeProbesStatus {
            source: NODE_PROBE_SOURCE,
            backend: self.backend,
            pods: state.written.clone(),
            last_error: state.last_error.clone(),
        })
    }

    fn remove_node_wide(&self) -> Result<(), DatapathError> {
        let inner = self.inner.remove_node_wide();
        inner.and(self.remove_for_good())
    }

    fn teardown(&self) -> Result<(), DatapathError> {
        let inner = self.inner.teardown();
        inner.and(self.remove_for_good())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "# Generated by iptables-nft-save\n*nat\n\
        :PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:INTERCEPTOR_PROBES - [0:0]\n\
        -A POSTROUTING -j INTERCEPTOR_PROBES\n\
        -A POSTROUTING -s 10.244.0.0/24 -j MASQUERADE\n\
        -A INTERCEPTOR_PROBES -d 10.244.0.5/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
        -A INTERCEPTOR_PROBES -d 10.244.0.7/32 -p tcp -m owner --socket-exists -j SNAT --to-source 169.254.7.127\n\
        COMMIT\n";

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, last)
    }

    #[test]
    fn parsing_finds_the_chain_its_jump_and_its_pods_and_nothing_else() {
        let installed = Installed::parse(SAVED);
        assert!(installed.chain);
        assert_eq!(
            installed.jumps,
            vec!["-A POSTROUTING -j INTERCEPTOR_PROBES"]
        );
        assert_eq!(installed.pods, BTreeSet::from([ip(5), ip(7)]));
        // Every rule the script writes parses back as its pod.
        assert!(SAVED.contains(&rule(ip(5))));
        assert_eq!(Installed::parse(""), Installed::default());
    }

    #[test]
    fn a_fresh_node_gets_the_chain_one_jump_first_and_one_rule_per_pod() {
        let script = sync_script(&Installed::default(), &BTreeSet::from([ip(9), ip(3)]));
        assert_eq!(
            script,
            format!(
                "*nat\n:INTERCEPTOR_PROBES - [0:0]\n-I POSTROUTING 1 -j INTERCEPTOR_PROBES\n{}\n{}\nCOMMIT\n",
                rule(ip(3)),
                rule(ip(9))
            )
        );
    }

    #[test]
    fn resyncing_never_duplicates_the_jump_and_drops_gone_pods() {
        let script = sync_script(&Installed::parse(SAVED), &BTreeSet::from([ip(7)]));
        assert!(!script.contains("-I POSTROUTING"), "{script}");
        assert!(!script.contains("10.244.0.5"), "{script}");
        assert!(script.contains(&rule(ip(7))), "{script}");
        // The empty chain still declared: it is what flushes the old rules.
        let empty = sync_script(&Installed::parse(SAVED), &BTreeSet::new());
        assert_eq!(empty, "*nat\n:INTERCEPTOR_PROBES - [0:0]\nCOMMIT\n");
    }

    #[test]
    fn one_pod_added_or_removed_is_one_rule_appended_or_deleted() {
        let script =
            delta_script(&BTreeSet::from([ip(9)]), &BTreeSet::from([ip(5)])).expect("a change");
        assert_eq!(
            script,
            format!("*nat\n-D{}\n{}\nCOMMIT\n", &rule(ip(5))[2..], rule(ip(9)))
        );
        assert!(
            script.contains("-D INTERCEPTOR_PROBES -d 10.244.0.5/32 -p tcp"),
            "{script}"
        );
        assert_eq!(delta_script(&BTreeSet::new(), &BTreeSet::new()), None);
    }

    #[test]
    fn removal_deletes_the_jump_before_the_chain_and_nothing_when_clean() {
        let script = remove_script(&Installed::parse(SAVED)).expect("something to remove");
        assert_eq!(
            script,
            "*nat\n-D POSTROUTING -j INTERCEPTOR_PROBES\n:INTERCEPTOR_PROBES - [0:0]\n-X INTERCEPTOR_PROBES\nCOMMIT\n"
        );
        assert_eq!(remove_script(&Installed::default()), None);
        assert_eq!(
            remove_script(&Installed::parse(
                "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n"
            )),
            None
        );
    }
}
