//! The iptables fallback for kernels the eBPF path cannot use: FSM's nat chains in each
//! enrolled pod's netns, written with one atomic `iptables-restore --noflush` per change,
//! and the same chains in `ip6tables` for a dual-stack pod's IPv6 (one transaction per
//! family, removed together). The proxy is the same; `SO_ORIGINAL_DST` and
//! `IP6T_SO_ORIGINAL_DST` are answered by conntrack instead of eBPF.
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use interceptor_common::{
    INBOUND_PORT, OUTBOUND_PORT, PROXY_MARK, PROXY_MARK_MASK, RESERVED_PORTS,
};
use ipnet::IpNet;

use super::{Datapath, DatapathCounters, DatapathError, LiveRecords, PodDatapath};
use crate::config::MeshConfig;
use crate::inpod::PodNetns;
use crate::sync::lock;

/// Inbound: `PREROUTING` jumps here; reserved and excluded ports return.
pub const CHAIN_INBOUND: &str = "PROXY_INBOUND";
/// Inbound: REDIRECT to the inbound listener (15003).
pub const CHAIN_IN_REDIRECT: &str = "PROXY_IN_REDIRECT";
/// Outbound: `OUTPUT` jumps here; the proxy's own sockets, loopback and exclusions return.
pub const CHAIN_OUTPUT: &str = "PROXY_OUTPUT";
/// Outbound: REDIRECT to the outbound listener (15001).
pub const CHAIN_REDIRECT: &str = "PROXY_REDIRECT";
const CHAINS: [&str; 4] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
];
/// Left in a pod that leaves the mesh while it runs, until the connections it made
/// through the proxy have closed: one rule that needs conntrack and matches nothing new,
/// in a chain nothing jumps to. The kernel turns conntrack on in a netns only while a
/// rule needs it (the REDIRECT targets did); once the last such rule is gone it stops
/// tracking, so the established flows' NAT is no longer applied and their next packets
/// leave for the original destination untranslated (reset there, or lost). Found by
/// measurement: deleting a REDIRECT rule breaks the flows it redirected, on both
/// backends; keeping any conntrack rule keeps them working.
pub const CHAIN_DRAIN: &str = "PROXY_DRAIN";
const DRAIN_RULE: &str = "-A PROXY_DRAIN -m conntrack --ctstate DNAT -j RETURN";
/// Every chain of ours that removal looks for.
const ALL_CHAINS: [&str; 5] = [
    CHAIN_INBOUND,
    CHAIN_IN_REDIRECT,
    CHAIN_OUTPUT,
    CHAIN_REDIRECT,
    CHAIN_DRAIN,
];
/// The jumps from the built-in chains into ours, exactly as `iptables-save` prints them.
const JUMP_INBOUND: &str = "-A PREROUTING -p tcp -j PROXY_INBOUND";
const JUMP_OUTPUT: &str = "-A OUTPUT -p tcp -j PROXY_OUTPUT";
/// How long `iptables-restore` waits for the xtables lock another writer holds.
pub(super) const LOCK_WAIT_SECS: &str = "5";

/// Which iptables a node uses: the two must never be mixed on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        }
    }

    pub(super) fn tool(self, what: &str) -> String {
        self.tool_of(Family::V4, what)
    }

    /// `iptables-legacy-save`, `ip6tables-nft-restore`, ...
    pub(super) fn tool_of(self, family: Family, what: &str) -> String {
        format!("{}-{}-{what}", family.prefix(), self.name())
    }
}

/// The address family a set of chains is for: `iptables` or `ip6tables`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn prefix(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    fn holds(self, net: &IpNet) -> bool {
        matches!(
            (self, net),
            (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_))
        )
    }
}

/// Link-local IPv6 destinations stay on their link, as in eBPF mode: never steered.
const LINK_LOCAL6: &str = "fe80::/10";

/// `--iptables-backend`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The one whose tables already hold rules on this node (nft when neither does).
    #[default]
    Auto,
    Legacy,
    Nft,
}

/// File in the agent's state dir naming the backend in use, so a restarted agent keeps
/// writing (and removing) where the previous one wrote.
pub const BACKEND_FILE: &str = "iptables-backend";

/// Pick the backend for this node: the one a previous agent used (from `state_dir`), else
/// the way kube-proxy's iptables-wrapper does: the one whose tables already hold more rules
/// in the node's netns (where the agent runs), nft on a tie. Remembers the choice.
/// Returns the backend and why.
pub fn detect(
    choice: BackendChoice,
    state_dir: &std::path::Path,
) -> Result<(Backend, String), DatapathError> {
    let file = state_dir.join(BACKEND_FILE);
    let (backend, why) = choose_backend(choice, &file)?;
    if let Err(error) = std::fs::write(&file, backend.name()) {
        tracing::warn!(path = %file.display(), %error, "remembering the iptables backend");
    }
    Ok((backend, why))
}

fn choose_backend(
    choice: BackendChoice,
    file: &std::path::Path,
) -> Result<(Backend, String), DatapathError> {
    let forced = match choice {
        BackendChoice::Legacy => Some(Backend::Legacy),
        BackendChoice::Nft => Some(Backend::Nft),
        BackendChoice::Auto => None,
    };
    if let Some(backend) = forced {
        rule_count(backend)?;
        return Ok((
            backend,
            format!("requested with --iptables-backend {}", backend.name()),
        ));
    }
    let remembered = match std::fs::read_to_string(file).as_deref().map(str::trim) {
        Ok("legacy") => Some(Backend::Legacy),
        Ok("nft") => Some(Backend::Nft),
        _ => None,
    };
    if let Some(backend) = remembered.filter(|b| rule_count(*b).is_ok()) {
        return Ok((
            backend,
            format!("auto: the previous agent used it ({})", file.display()),
        ));
    }
    match (rule_count(Backend::Legacy), rule_count(Backend::Nft)) {
        (Ok(legacy), Ok(nft)) => Ok((
            if legacy > nft {
                Backend::Legacy
            } else {
                Backend::Nft
            },
            format!(
                "auto: the node has {legacy} iptables-legacy rules and {nft} iptables-nft rules"
            ),
        )),
        (Ok(_), Err(nft)) => Ok((Backend::Legacy, format!("auto: {nft}"))),
        (Err(_), Ok(_)) => Ok((Backend::Nft, "auto: iptables-legacy is not usable".into())),
        (Err(legacy), Err(nft)) => Err(DatapathError::Iptables {
            what: "detecting the iptables backend".into(),
            reason: format!("{legacy}; {nft}"),
        }),
    }
}

/// Rules (`-A` lines) in every table of `backend` in the calling thread's netns.
fn rule_count(backend: Backend) -> Result<usize, DatapathError> {
    let save = run(&backend.tool("save"), &[], None)?;
    Ok(save.lines().filter(|line| line.starts_with("-A ")).count())
}

/// Run an iptables tool, feeding `stdin`; its stdout, or its stderr as the error.
pub(super) fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, DatapathError> {
    let failed = |reason: String| DatapathError::Iptables {
        what: format!("{tool} {}", args.join(" ")).trim_end().to_owned(),
        reason,
    };
    let mut child = Command::new(resolve(tool))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    // The tool is always waited for, so a failed write leaves no zombie and its stderr
    // (which says why it stopped reading) is kept.
    let written = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let output = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    if let Err(e) = written {
        return Err(failed(format!("writing the rules: {e}; {stderr}")));
    }
    if !output.status.success() {
        return Err(failed(format!("{}: {stderr}", output.status)));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The tool in `PATH`, or in the sbin directories a minimal `PATH` may lack.
pub(super) fn resolve(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(tool))
}

/// What of ours a pod netns's nat table holds now.
#[derive(Debug, Default, PartialEq, Eq)]
struct Installed {
    chains: Vec<&'static str>,
    /// Our exact jumps from `PREROUTING` / `OUTPUT`.
    inbound_jumps: usize,
    output_jumps: usize,
    /// Every rule outside our chains that jumps (or goes) to one of them, as saved: our
    /// two jumps and anything else, which would keep a chain from being deleted.
    references: Vec<String>,
}

impl Installed {
    fn parse(nat_save: &str) -> Installed {
        let mut installed = Installed::default();
        for line in nat_save.lines().map(str::trim_end) {
            if let Some(declared) = line.strip_prefix(':') {
                let name = declared.split_whitespace().next().unwrap_or_default();
                if let Some(chain) = ALL_CHAINS.iter().find(|c| **c == name) {
                    installed.chains.push(chain);
                }
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let (Some(&"-A"), Some(chain)) = (words.first(), words.get(1)) else {
                continue;
            };
            let targets_ours = words
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && ALL_CHAINS.contains(&w[1]));
            if ALL_CHAINS.contains(chain) || !targets_ours {
                continue;
            }
            if line == JUMP_INBOUND {
                installed.inbound_jumps += 1;
            } else if line == JUMP_OUTPUT {
                installed.output_jumps += 1;
            }
            installed.references.push(line.to_owned());
        }
        installed
    }
}

/// The `iptables-restore --noflush` input that installs (or replaces) a pod's chains.
/// Declaring a chain flushes it, so re-applying gives the same rules, never duplicates;
/// the jumps from `PREROUTING`/`OUTPUT` are only added when missing.
fn install_script(rules: &[&MeshConfig], installed: &Installed, family: Family) -> String {
    let mut s = String::from("*nat\n");
    for chain in CHAINS {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    // Only a SYN starts an intercepted flow, as in eBPF mode: connections open before
    // the chains existed have no conntrack entry yet, and conntrack picks them up
    // mid-stream; redirecting such a packet would reset a working connection.
    let _ = writeln!(
        s,
        "-A {CHAIN_IN_REDIRECT} -p tcp --syn -j REDIRECT --to-ports {INBOUND_PORT}"
    );
    let mut inbound_skip: Vec<u16> = RESERVED_PORTS.to_vec();
    inbound_skip.extend(rules.iter().flat_map(|r| &r.inbound_port_exclusion_list));
    for port in dedup(inbound_skip) {
        let _ = writeln!(s, "-A {CHAIN_INBOUND} -p tcp --dport {port} -j RETURN");
    }
    if family == Family::V6 {
        let _ = writeln!(s, "-A {CHAIN_INBOUND} -d {LINK_LOCAL6} -j RETURN");
    }
    let _ = writeln!(s, "-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}");

    let _ = writeln!(
        s,
        "-A {CHAIN_REDIRECT} -p tcp --syn -j REDIRECT --to-ports {OUTBOUND_PORT}"
    );
    // The proxy's own upstream sockets carry the mark (or the transparent one, which
    // differs in the masked bit): never back into the proxy.
    let _ = writeln!(
        s,
        "-A {CHAIN_OUTPUT} -m mark --mark {PROXY_MARK:#x}/{PROXY_MARK_MASK:#x} -j RETURN"
    );
    // Loopback and the pod's own address stay inside the pod, as in eBPF mode.
    let _ = writeln!(s, "-A {CHAIN_OUTPUT} -o lo -j RETURN");
    if family == Family::V6 {
        let _ = writeln!(s, "-A {CHAIN_OUTPUT} -d {LINK_LOCAL6} -j RETURN");
    }
    let ports = dedup(
        rules
            .iter()
            .flat_map(|r| r.outbound_port_exclusion_list.iter().copied())
            .collect(),
    );
    for port in ports {
        let _ = writeln!(s, "-A {CHAIN_OUTPUT} -p tcp --dport {port} -j RETURN");
    }
    for net in rules
        .iter()
        .flat_map(|r| &r.outbound_ip_range_exclusion_list)
        .filter(|net| family.holds(net))
    {
        let _ = writeln!(s, "-A {CHAIN_OUTPUT} -d {net} -j RETURN");
    }
    let inclusions: Vec<_> = rules
        .iter()
        .filter_map(|r| r.outbound_ip_range_inclusion_list.as_ref())
        .collect();
    if inclusions.is_empty() {
        let _ = writeln!(s, "-A {CHAIN_OUTPUT} -j {CHAIN_REDIRECT}");
    } else {
        // An inclusion list means only those ranges, of this family; none of this
        // family (or an empty list: every entry was invalid) means none.
        for net in inclusions
            .into_iter()
            .flatten()
            .filter(|net| family.holds(net))
        {
            let _ = writeln!(s, "-A {CHAIN_OUTPUT} -d {net} -j {CHAIN_REDIRECT}");
        }
    }
    if installed.inbound_jumps == 0 {
        let _ = writeln!(s, "{JUMP_INBOUND}");
    }
    if installed.output_jumps == 0 {
        let _ = writeln!(s, "{JUMP_OUTPUT}");
    }
    s.push_str("COMMIT\n");
    s
}

/// The input that removes whatever of ours a pod netns holds; `None` when nothing.
fn remove_script(installed: &Installed) -> Option<String> {
    if installed.chains.is_empty() && installed.references.is_empty() {
        return None;
    }
    let mut s = String::from("*nat\n");
    for reference in &installed.references {
        let _ = writeln!(s, "-D{}", &reference[2..]);
    }
    // Flush all first, then delete: a chain still referenced cannot be deleted.
    for chain in &installed.chains {
        let _ = writeln!(s, ":{chain} - [0:0]");
    }
    for chain in &installed.chains {
        let _ = writeln!(s, "-X {chain}");
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// Our chains removed as [`remove_script`] does, and the drain chain made in the same
/// transaction: the pod's flows through the proxy keep their NAT (see [`CHAIN_DRAIN`]).
fn leave_script(installed: &Installed) -> String {
    let mut s = remove_script(installed).unwrap_or_else(|| "*nat\nCOMMIT\n".to_owned());
    let commit = s
        .rfind("COMMIT\n")
        .expect("a restore script ends in COMMIT");
    s.insert_str(commit, &format!(":{CHAIN_DRAIN} - [0:0]\n{DRAIN_RULE}\n"));
    s
}

/// The drain chain removed (nothing jumps to it); `None` when it is not there.
fn drained_script(installed: &Installed) -> Option<String> {
    installed
        .chains
        .contains(&CHAIN_DRAIN)
        .then(|| format!("*nat\n:{CHAIN_DRAIN} - [0:0]\n-X {CHAIN_DRAIN}\nCOMMIT\n"))
}

/// Runs the script `make` derives from the calling thread's netns's nat table of
/// `family`, if any.
fn restore_here(
    backend: Backend,
    family: Family,
    make: impl FnOnce(&Installed) -> Option<String>,
) -> Result<bool, DatapathError> {
    let save = run(&backend.tool_of(family, "save"), &["-t", "nat"], None)?;
    match make(&Installed::parse(&save)) {
        Some(script) => run(
            &backend.tool_of(family, "restore"),
            &["--noflush", "-w", LOCK_WAIT_SECS],
            Some(&script),
        )
        .map(|_| true),
        None => Ok(false),
    }
}

/// [`restore_here`] in each of `families`, in order, up to the first failure.
fn restore_each(
    backend: Backend,
    families: &[Family],
    make: impl Fn(&Installed) -> Option<String>,
) -> Result<(), DatapathError> {
    families
        .iter()
        .try_for_each(|family| restore_here(backend, *family, &make).map(drop))
}

/// Remove our chains and every reference to them from the calling thread's netns, in
/// both families where `backend`'s tools for it are installed. Returns whether there
/// was anything to remove. Both families are tried even when the first fails.
fn remove_here(backend: Backend) -> Result<bool, DatapathError> {
    let mut removed = false;
    let mut first_error = None;
    for family in [Family::V4, Family::V6] {
        if !resolve(&backend.tool_of(family, "save")).is_file() {
            continue;
        }
        match restore_here(backend, family, remove_script) {
            Ok(held) => removed |= held,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    first_error.map_or(Ok(removed), Err)
}

/// Remove what any agent wrote into the netns at `path`, in both backends (a backend
/// whose tools are not installed holds nothing). For `interceptor cleanup` and for pods
/// a restarted agent no longer enrolls. Returns the backends that held something.
pub fn remove_from_netns(path: &std::path::Path) -> Result<Vec<Backend>, DatapathError> {
    let netns = PodNetns::enter(path).map_err(|e| DatapathError::Iptables {
        what: format!("netns {}", path.display()),
        reason: e.to_string(),
    })?;
    netns
        .run_blocking(|| {
            let mut held = Vec::new();
            for backend in [Backend::Legacy, Backend::Nft] {
                if !resolve(&backend.tool("save")).is_file() {
                    continue;
                }
                if remove_here(backend)? {
                    held.push(backend);
                }
            }
            Ok(held)
        })
        .map_err(|e| DatapathError::Iptables {
            what: format!("netns {}", path.display()),
            reason: e.to_string(),
        })?
}

fn dedup(mut ports: Vec<u16>) -> Vec<u16> {
    let mut seen = HashSet::new();
    ports.retain(|p| seen.insert(*p));
    ports
}

struct Enrolled {
    pod: PodDatapath,
    netns: Arc<PodNetns>,
    /// Whether [`Datapath::enroll_ipv6`] gave it the ip6tables chains too.
    ipv6: bool,
}

impl Enrolled {
    /// The families whose chains this pod has.
    fn families(&self) -> &'static [Family] {
        if self.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        }
    }
}

#[derive(Default)]
struct State {
    global: MeshConfig,
    /// Per-pod rules by netns cookie; they add to the global ones.
    scoped: HashMap<u64, MeshConfig>,
    pods: HashMap<u64, Enrolled>,
    /// Pods that left the mesh while running, whose drain chain stays until
    /// [`Datapath::drained`].
    draining: HashMap<u64, Enrolled>,
}

impl State {
    /// The rules of one pod: the global ones, then its own.
    fn layered(&self, cookie: u64) -> Vec<MeshConfig> {
        let mut rules = vec![self.global.clone()];
        rules.extend(self.scoped.get(&cookie).cloned());
        rules
    }
}

/// The iptables data path of one node.
pub struct IptablesDatapath {
    backend: Backend,
    /// Whether the backend's ip6tables tools are installed: dual-stack pods' IPv6 is
    /// intercepted only with them (the agent refuses such pods without them).
    ipv6: bool,
    /// Held only briefly: readers (`/config_dump`) never wait for a tool to run.
    state: Mutex<State>,
    /// Held while the tools run: one writer at a time, each reading the latest state, so
    /// an older rule set never lands after a newer one.
    writes: Mutex<()>,
}

impl IptablesDatapath {
    pub fn new(backend: Backend) -> Self {
        let ipv6 = resolve(&backend.tool_of(Family::V6, "restore")).is_file();
        if !ipv6 {
            tracing::warn!(
                tool = backend.tool_of(Family::V6, "restore"),
                "not installed: pods with an IPv6 address cannot be intercepted"
            );
        }
        Self {
            backend,
            ipv6,
            state: Mutex::new(State::default()),
            writes: Mutex::new(()),
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Install the pod's chains of each of `families` for `rules` inside its netns, one
    /// transaction per family. All-or-nothing across families: when a later family fails,
    /// the earlier ones' chains are removed again.
    fn apply(
        &self,
        netns: &PodNetns,
        ip: Ipv4Addr,
        families: &'static [Family],
        rules: Vec<MeshConfig>,
    ) -> Result<(), DatapathError> {
        let backend = self.backend;
        self.in_netns(netns, ip, move || {
            let refs: Vec<&MeshConfig> = rules.iter().collect();
            for (done, family) in families.iter().enumerate() {
                let applied = restore_here(backend, *family, |installed| {
                    Some(install_script(&refs, installed, *family))
                });
                if let Err(error) = applied {
                    for earlier in &families[..done] {
                        let _ = restore_here(backend, *earlier, remove_script);
                    }
                    return Err(error);
                }
            }
            Ok(())
        })
    }

    fn remove(&self, netns: &PodNetns, ip: Ipv4Addr) -> Result<(), DatapathError> {
        let backend = self.backend;
        self.in_netns(netns, ip, move || remove_here(backend).map(drop))
    }

    /// Run `job` on the pod's netns thread: the tools it starts inherit that netns.
    fn in_netns(
        &self,
        netns: &PodNetns,
        ip: Ipv4Addr,
        job: impl FnOnce() -> Result<(), DatapathError> + Send + 'static,
    ) -> Result<(), DatapathError> {
        netns
            .run_blocking(job)
            .map_err(|e| DatapathError::Iptables {
                what: format!("pod {ip}"),
                reason: e.to_string(),
            })?
            .map_err(|e| match e {
                DatapathError::Iptables { what, reason } => DatapathError::Iptables {
                    what: format!("pod {ip}: {what}"),
                    reason,
                },
                other => other,
            })
    }
}

impl Datapath for IptablesDatapath {
    fn mode(&self) -> &'static str {
        "iptables"
    }

    fn supports_ipv6(&self) -> bool {
        self.ipv6
    }

    fn enroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        let rules = lock(&self.state).layered(pod.netns_cookie);
        self.apply(netns, pod.ipv4, &[Family::V4], rules)?;
        lock(&self.state).pods.insert(
            pod.netns_cookie,
            Enrolled {
                pod: pod.clone(),
                netns: Arc::clone(netns),
                ipv6: false,
            },
        );
        Ok(())
    }

    /// The same chains in the pod's ip6tables nat table: its IPv6 connects go to
    /// `[::1]:15001` (REDIRECT from OUTPUT), IPv6 SYNs arriving for it to 15003, where
    /// the agent listens on `[::]` (IPv6 only). [`Datapath::unenroll`] removes both.
    fn enroll_ipv6(&self, pod: &PodDatapath, ip: Ipv6Addr) -> Result<(), DatapathError> {
        if !self.ipv6 {
            return Err(DatapathError::Unsupported {
                what: "IPv6 interception without ip6tables",
                mode: "iptables",
            });
        }
        let _writing = lock(&self.writes);
        let (netns, rules) = {
            let state = lock(&self.state);
            let enrolled =
                state
                    .pods
                    .get(&pod.netns_cookie)
                    .ok_or_else(|| DatapathError::Iptables {
                        what: format!("pod {}", pod.ipv4),
                        reason: format!("IPv6 {ip} before the pod's IPv4 chains"),
                    })?;
            (Arc::clone(&enrolled.netns), state.layered(pod.netns_cookie))
        };
        self.apply(&netns, pod.ipv4, &[Family::V6], rules)?;
        if let Some(enrolled) = lock(&self.state).pods.get_mut(&pod.netns_cookie) {
            enrolled.ipv6 = true;
        }
        Ok(())
    }

    fn unenroll(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        self.remove(netns, pod.ipv4)?;
        // Only once the rules are gone: a pod whose removal failed is retried at teardown.
        let mut state = lock(&self.state);
        state.pods.remove(&pod.netns_cookie);
        state.draining.remove(&pod.netns_cookie);
        Ok(())
    }

    fn unenroll_running(
        &self,
        pod: &PodDatapath,
        netns: &Arc<PodNetns>,
    ) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        let backend = self.backend;
        let families = lock(&self.state)
            .pods
            .get(&pod.netns_cookie)
            .map_or(&[Family::V4][..], Enrolled::families);
        self.in_netns(netns, pod.ipv4, move || {
            restore_each(backend, families, |installed| Some(leave_script(installed)))
        })?;
        let mut state = lock(&self.state);
        if let Some(left) = state.pods.remove(&pod.netns_cookie) {
            // Removed at teardown if it is still draining then.
            state.draining.insert(pod.netns_cookie, left);
        }
        Ok(())
    }

    fn drained(&self, pod: &PodDatapath, netns: &Arc<PodNetns>) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        let Some(left) = lock(&self.state).draining.remove(&pod.netns_cookie) else {
            // Enrolled again (its REDIRECT rules need conntrack themselves) or gone.
            return Ok(());
        };
        let backend = self.backend;
        let families = left.families();
        self.in_netns(netns, pod.ipv4, move || {
            restore_each(backend, families, drained_script)
        })
    }

    fn release_netns(&self, path: &std::path::Path) -> Result<(), DatapathError> {
        let held = remove_from_netns(path)?;
        if !held.is_empty() {
            tracing::info!(netns = %path.display(), ?held, "removed chains an earlier agent left");
        }
        Ok(())
    }

    fn set_debug(&self, on: bool) -> Result<(), DatapathError> {
        match on {
            false => Ok(()),
            true => Err(DatapathError::Unsupported {
                what: "kernel trace lines (bpf debug)",
                mode: "iptables",
            }),
        }
    }

    fn counters(&self) -> Option<DatapathCounters> {
        None
    }

    fn live_records(&self) -> LiveRecords {
        LiveRecords {
            enrolled_netns: lock(&self.state).pods.len(),
            ..LiveRecords::default()
        }
    }

    fn retain_pods(&self, _netns_cookies: &HashSet<u64>) {
        // Nothing is shared between pods here: rules live in each pod's netns, and those
        // of pods not adopted again are removed through `release_netns`.
    }

    fn set_rules(&self, scope: u64, rules: &MeshConfig) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        type Target = (Arc<PodNetns>, Ipv4Addr, &'static [Family], Vec<MeshConfig>);
        let targets: Vec<Target> = {
            let mut state = lock(&self.state);
            if scope == interceptor_common::rules::GLOBAL_SCOPE {
                state.global = rules.clone();
            } else if *rules == MeshConfig::default() {
                state.scoped.remove(&scope);
            } else {
                state.scoped.insert(scope, rules.clone());
            }
            state
                .pods
                .iter()
                .filter(|(cookie, _)| {
                    scope == interceptor_common::rules::GLOBAL_SCOPE || **cookie == scope
                })
                .map(|(cookie, pod)| {
                    (
                        Arc::clone(&pod.netns),
                        pod.pod.ipv4,
                        pod.families(),
                        state.layered(*cookie),
                    )
                })
                .collect()
        };
        // Every enrolled pod gets the new rules even when one of them fails.
        let mut first_error = None;
        for (netns, ip, families, layered) in targets {
            if let Err(error) = self.apply(&netns, ip, families, layered) {
                tracing::error!(pod = %ip, %error, "re-applying iptables rules");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn teardown(&self) -> Result<(), DatapathError> {
        let _writing = lock(&self.writes);
        let pods: Vec<Enrolled> = {
            let mut state = lock(&self.state);
            let draining: Vec<Enrolled> = state.draining.drain().map(|(_, p)| p).collect();
            state.pods.drain().map(|(_, p)| p).chain(draining).collect()
        };
        let mut first_error = None;
        for pod in pods {
            if let Err(error) = self.remove(&pod.netns, pod.pod.ipv4) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> MeshConfig {
        crate::config::parse(std::path::Path::new("test.yaml"), yaml)
            .expect("config")
            .config
    }

    #[test]
    fn leaving_replaces_the_chains_with_the_drain_chain_in_one_transaction() {
        let saved =
            "*nat\n:PREROUTING ACCEPT [0:0]\n:PROXY_INBOUND - [0:0]\n:PROXY_IN_REDIRECT - [0:0]\n\
                     :PROXY_OUTPUT - [0:0]\n:PROXY_REDIRECT - [0:0]\n\
                     -A PREROUTING -p tcp -j PROXY_INBOUND\n-A OUTPUT -p tcp -j PROXY_OUTPUT\n\
                     -A PROXY_REDIRECT -p tcp --syn -j REDIRECT --to-ports 15001\nCOMMIT\n";
        let script = leave_script(&Installed::parse(saved));
        assert!(
            script.starts_with("*nat\n") && script.ends_with("COMMIT\n"),
            "{script}"
        );
        assert_eq!(script.matches("COMMIT").count(), 1, "{script}");
        for chain in CHAINS {
            assert!(script.contains(&format!("-X {chain}\n")), "{script}");
        }
        assert!(
            script.contains("-D PREROUTING -p tcp -j PROXY_INBOUND\n"),
            "{script}"
        );
        assert!(
            script.contains(
                ":PROXY_DRAIN - [0:0]\n-A PROXY_DRAIN -m conntrack --ctstate DNAT -j RETURN\n"
            ),
            "{script}"
        );
        assert!(!script.contains("-X PROXY_DRAIN"), "{script}");

        // Once drained: the drain chain alone goes; a netns without it needs nothing.
        let draining = "*nat\n:OUTPUT ACCEPT [0:0]\n:PROXY_DRAIN - [0:0]\n\
                        -A PROXY_DRAIN -m conntrack --ctstate DNAT -j RETURN\nCOMMIT\n";
        let installed = Installed::parse(draining);
        assert_eq!(
            drained_script(&installed).as_deref(),
            Some("*nat\n:PROXY_DRAIN - [0:0]\n-X PROXY_DRAIN\nCOMMIT\n")
        );
        assert_eq!(drained_script(&Installed::parse(saved)), None);
        // Cleanup and DEL remove a drain chain left behind like the others.
        let removal = remove_script(&installed).expect("something to remove");
        assert!(removal.contains("-X PROXY_DRAIN\n"), "{removal}");
    }

    #[test]
    fn a_fresh_netns_gets_the_four_chains_and_both_jumps() {
        let global = MeshConfig::default();
        let script = install_script(&[&global], &Installed::default(), Family::V4);
        for chain in CHAINS {
            assert!(script.contains(&format!(":{chain} - [0:0]\n")), "{script}");
        }
        assert!(script.contains("-A PROXY_IN_REDIRECT -p tcp --syn -j REDIRECT --to-ports 15003\n"));
        assert!(script.contains("-A PROXY_REDIRECT -p tcp --syn -j REDIRECT --to-ports 15001\n"));
        assert!(script.contains("-A PROXY_OUTPUT -m mark --mark 0x1500/0xfffffffe -j RETURN\n"));
        assert!(script.contains("-A PROXY_INBOUND -p tcp --dport 15003 -j RETURN\n"));
        assert!(script.contains("-A PROXY_OUTPUT -j PROXY_REDIRECT\n"));
        assert!(script.contains(&format!("{JUMP_INBOUND}\n")));
        assert!(script.contains(&format!("{JUMP_OUTPUT}\n")));
        assert!(script.ends_with("COMMIT\n"));
    }

    #[test]
    fn re_applying_never_duplicates_the_jumps() {
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:PROXY_INBOUND - [0:0]\n:PROXY_OUTPUT - [0:0]\n\
                     -A PREROUTING -p tcp -j PROXY_INBOUND\n-A OUTPUT -p tcp -j PROXY_OUTPUT\nCOMMIT\n";
        let installed = Installed::parse(saved);
        assert_eq!(installed.inbound_jumps, 1);
        assert_eq!(installed.output_jumps, 1);
        assert_eq!(installed.chains, vec![CHAIN_INBOUND, CHAIN_OUTPUT]);
        assert_eq!(installed.references.len(), 2);
        let script = install_script(&[&MeshConfig::default()], &installed, Family::V4);
        assert!(!script.contains("-A PREROUTING"), "{script}");
        assert!(!script.contains("-A OUTPUT"), "{script}");
    }

    #[test]
    fn inclusions_replace_the_catch_all_and_exclusions_come_first() {
        let global = config(
            "outboundIPRangeInclusionList: [10.96.0.0/12]\noutboundPortExclusionList: [9001]\n",
        );
        let pod = config(
            "outboundIPRangeExclusionList: [10.96.0.10/32]\ninboundPortExclusionList: [8080]\n",
        );
        let script = install_script(&[&global, &pod], &Installed::default(), Family::V4);
        let at = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} not in\n{script}"))
        };
        assert!(at("-d 10.96.0.10/32 -j RETURN") < at("-d 10.96.0.0/12 -j PROXY_REDIRECT"));
        assert!(at("--dport 9001 -j RETURN") < at("-d 10.96.0.0/12 -j PROXY_REDIRECT"));
        assert!(
            !script.contains("-A PROXY_OUTPUT -j PROXY_REDIRECT"),
            "{script}"
        );
        assert!(script.contains("-A PROXY_INBOUND -p tcp --dport 8080 -j RETURN\n"));
    }

    #[test]
    fn each_family_gets_its_own_ranges_and_ipv6_link_local_is_never_steered() {
        let global = config(
            "outboundIPRangeExclusionList: [10.96.0.10/32, 'fd00:10:96::10/128']\n\
             outboundIPRangeInclusionList: [10.96.0.0/12]\n",
        );
        let v4 = install_script(&[&global], &Installed::default(), Family::V4);
        let v6 = install_script(&[&global], &Installed::default(), Family::V6);
        assert!(
            v4.contains("-A PROXY_OUTPUT -d 10.96.0.10/32 -j RETURN\n"),
            "{v4}"
        );
        assert!(!v4.contains("fd00"), "{v4}");
        assert!(!v4.contains(LINK_LOCAL6), "{v4}");
        assert!(
            v6.contains("-A PROXY_OUTPUT -d fd00:10:96::10/128 -j RETURN\n"),
            "{v6}"
        );
        assert!(!v6.contains("10.96."), "{v6}");
        // An inclusion list of IPv4 ranges only redirects no IPv6 destination.
        assert!(!v6.contains("-j PROXY_REDIRECT\n"), "{v6}");
        assert!(
            v6.contains("-A PROXY_OUTPUT -d fe80::/10 -j RETURN\n"),
            "{v6}"
        );
        assert!(
            v6.contains("-A PROXY_INBOUND -d fe80::/10 -j RETURN\n"),
            "{v6}"
        );
        // The rest is the IPv4 script's: the same chains, ports, mark and jumps.
        for line in [
            "-A PROXY_IN_REDIRECT -p tcp --syn -j REDIRECT --to-ports 15003\n",
            "-A PROXY_REDIRECT -p tcp --syn -j REDIRECT --to-ports 15001\n",
            "-A PROXY_OUTPUT -m mark --mark 0x1500/0xfffffffe -j RETURN\n",
            "-A PROXY_OUTPUT -o lo -j RETURN\n",
            JUMP_INBOUND,
            JUMP_OUTPUT,
        ] {
            assert!(v6.contains(line), "{line} not in\n{v6}");
        }
        // Without an inclusion list every IPv6 destination outside the exclusions is.
        let v6 = install_script(&[&MeshConfig::default()], &Installed::default(), Family::V6);
        assert!(v6.contains("-A PROXY_OUTPUT -j PROXY_REDIRECT\n"), "{v6}");
        assert_eq!(
            Backend::Nft.tool_of(Family::V6, "save"),
            "ip6tables-nft-save"
        );
        assert_eq!(Backend::Legacy.tool("restore"), "iptables-legacy-restore");
    }

    #[test]
    fn an_inclusion_list_left_empty_by_bad_entries_redirects_nothing() {
        let global = MeshConfig {
            outbound_ip_range_inclusion_list: Some(Vec::new()),
            ..MeshConfig::default()
        };
        let script = install_script(&[&global], &Installed::default(), Family::V4);
        assert!(!script.contains("-j PROXY_REDIRECT\n"), "{script}");
    }

    #[test]
    fn removal_deletes_every_reference_before_the_chains_and_nothing_when_clean() {
        assert_eq!(remove_script(&Installed::default()), None);
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n:PROXY_INBOUND - [0:0]\n:PROXY_IN_REDIRECT - [0:0]\n\
                     :PROXY_OUTPUT - [0:0]\n:PROXY_REDIRECT - [0:0]\n\
                     -A PREROUTING -p tcp -j PROXY_INBOUND\n-A OUTPUT -p tcp -j PROXY_OUTPUT\n\
                     -A OUTPUT -p tcp -j PROXY_OUTPUT\n-A OUTPUT -d 10.0.0.1/32 -g PROXY_REDIRECT\n\
                     -A POSTROUTING -j MASQUERADE\n-A PROXY_INBOUND -p tcp -j PROXY_IN_REDIRECT\nCOMMIT\n";
        let installed = Installed::parse(saved);
        assert_eq!(installed.output_jumps, 2);
        assert_eq!(installed.references.len(), 4, "{installed:?}");
        let script = remove_script(&installed).expect("script");
        assert_eq!(
            script.matches("-D OUTPUT -p tcp -j PROXY_OUTPUT\n").count(),
            2
        );
        // A reference someone else added is removed too, word for word, or -X would fail.
        assert!(
            script.contains("-D OUTPUT -d 10.0.0.1/32 -g PROXY_REDIRECT\n"),
            "{script}"
        );
        assert!(!script.contains("MASQUERADE"), "{script}");
        assert!(script.find("-D PREROUTING").unwrap() < script.find("-X PROXY_INBOUND").unwrap());
        assert_eq!(script.matches("-X ").count(), 4);
    }
}
