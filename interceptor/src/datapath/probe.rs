//! What this kernel offers the eBPF data path, probed at start-up (DESIGN.md §6), and the
//! mode the agent picks from it.
use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

/// One feature the eBPF path relies on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Feature {
    pub name: String,
    /// The kernel that introduced it (for the operator reading why).
    pub since: &'static str,
    pub supported: bool,
}

/// Probe results.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl Probe {
    pub fn missing(&self) -> Vec<&Feature> {
        self.features.iter().filter(|f| !f.supported).collect()
    }
}

enum What {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Attach types have no probe of their own; the kernel version decides.
    KernelAtLeast(u8, u8),
}

const PROBES: &[(&str, &str, What)] = &[
    (
        "program cgroup/sock_addr (connect4, getpeername4)",
        "4.17",
        What::Program(ProgramType::CgroupSockAddr),
    ),
    (
        "program sock_ops",
        "4.13",
        What::Program(ProgramType::SockOps),
    ),
    (
        "program cgroup/sockopt (getsockopt)",
        "5.3",
        What::Program(ProgramType::CgroupSockopt),
    ),
    (
        "program tc classifier",
        "4.1",
        What::Program(ProgramType::SchedClassifier),
    ),
    ("program sk_msg", "4.17", What::Program(ProgramType::SkMsg)),
    ("map hash", "3.19", What::Map(MapType::Hash)),
    ("map LRU hash", "4.10", What::Map(MapType::LruHash)),
    ("map LPM trie", "4.11", What::Map(MapType::LpmTrie)),
    ("map per-CPU array", "4.6", What::Map(MapType::PerCpuArray)),
    ("map SOCKHASH", "4.18", What::Map(MapType::SockHash)),
    (
        "helper get_netns_cookie in sock_addr",
        "5.7",
        What::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    ),
    (
        "helper get_socket_cookie in sock_addr",
        "5.0",
        What::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
    ),
    (
        "helper get_socket_cookie in sock_ops",
        "5.0",
        What::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    (
        "helper sock_hash_update in sock_ops",
        "4.18",
        What::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    ),
    (
        "helper msg_redirect_hash in sk_msg",
        "4.18",
        What::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    ),
    (
        "helper l4_csum_replace in tc",
        "4.1",
        What::Helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_l4_csum_replace,
        ),
    ),
    (
        "attach type cgroup/getpeername4",
        "5.8",
        What::KernelAtLeast(5, 8),
    ),
    ("SO_NETNS_COOKIE", "5.14", What::KernelAtLeast(5, 14)),
    ("bpf_link for tc (TCX)", "6.6", What::KernelAtLeast(6, 6)),
];

/// Probe every feature of [`PROBES`] on this kernel.
pub fn probe() -> Probe {
    let current = KernelVersion::current().ok();
    let features = PROBES
        .iter()
        .map(|(name, since, what)| {
            let supported = match what {
                What::Program(kind) => is_program_supported(*kind).unwrap_or(false),
                What::Map(kind) => is_map_supported(*kind).unwrap_or(false),
                What::Helper(kind, helper) => is_helper_supported(*kind, *helper).unwrap_or(false),
                What::KernelAtLeast(major, minor) => {
                    current.is_some_and(|v| v >= KernelVersion::new(*major, *minor, 0))
                }
            };
            Feature {
                name: (*name).to_owned(),
                since,
                supported,
            }
        })
        .collect();
    Probe {
        kernel: current
            .map(|v| format!("{v:?}"))
            .unwrap_or_else(|| "unknown".into()),
        features,
    }
}

/// `--mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF when the kernel has everything it needs, iptables otherwise.
    #[default]
    Auto,
    Ebpf,
    /// The iptables fallback: FSM's nat chains in each pod's netns.
    Iptables,
}

/// The mode the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Ebpf,
    Iptables,
}

/// Why a mode cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("eBPF mode needs {missing}, which this kernel ({kernel}) lacks; use --mode auto or --mode iptables")]
    EbpfUnavailable { missing: String, kernel: String },
    #[error("--simulate-missing-feature {name:?} names no probed feature; known: {known}")]
    UnknownFeature { name: String, known: String },
}

impl Probe {
    /// Mark a probed feature as missing, to exercise the fallback on a kernel that has
    /// everything (`--simulate-missing-feature`).
    pub fn simulate_missing(&mut self, name: &str) -> Result<(), ModeError> {
        match self.features.iter_mut().find(|f| f.name == name) {
            Some(feature) => {
                feature.supported = false;
                Ok(())
            }
            None => Err(ModeError::UnknownFeature {
                name: name.to_owned(),
                known: self
                    .features
                    .iter()
                    .map(|f| format!("{:?}", f.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// The mode to run and why, from what was asked and what the kernel has.
pub fn choose(requested: Mode, probe: &Probe) -> Result<(Chosen, String), ModeError> {
    let missing: Vec<String> = probe
        .missing()
        .iter()
        .map(|f| format!("{} (kernel {})", f.name, f.since))
        .collect();
    match requested {
        Mode::Iptables => Ok((Chosen::Iptables, "requested with --mode iptables".into())),
        Mode::Ebpf if !missing.is_empty() => Err(ModeError::EbpfUnavailable {
            missing: missing.join(", "),
            kernel: probe.kernel.clone(),
        }),
        Mode::Auto if !missing.is_empty() => Ok((
            Chosen::Iptables,
            format!(
                "auto: eBPF mode needs {}, which this kernel ({}) lacks: iptables fallback",
                missing.join(", "),
                probe.kernel
            ),
        )),
        Mode::Ebpf => Ok((
            Chosen::Ebpf,
            "requested with --mode ebpf; every feature probed is present".into(),
        )),
        Mode::Auto => Ok((
            Chosen::Ebpf,
            format!(
                "auto: all {} features the eBPF path uses are present",
                probe.features.len()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_with(missing: &[&str]) -> Probe {
        Probe {
            kernel: "KernelVersion { major: 5, minor: 4, patch: 0 }".into(),
            features: PROBES
                .iter()
                .map(|(name, since, _)| Feature {
                    name: (*name).to_owned(),
                    since,
                    supported: !missing.contains(name),
                })
                .collect(),
        }
    }

    #[test]
    fn auto_picks_ebpf_when_everything_is_there() {
        let (mode, why) = choose(Mode::Auto, &probe_with(&[])).unwrap();
        assert_eq!(mode, Chosen::Ebpf);
        assert!(why.starts_with("auto"), "{why}");
    }

    #[test]
    fn auto_falls_back_to_iptables_naming_the_missing_feature_and_its_kernel() {
        let probe = probe_with(&["helper get_netns_cookie in sock_addr"]);
        let (mode, why) = choose(Mode::Auto, &probe).unwrap();
        assert_eq!(mode, Chosen::Iptables);
        assert!(
            why.contains("get_netns_cookie") && why.contains("5.7"),
            "{why}"
        );
        let forced = choose(Mode::Ebpf, &probe).unwrap_err().to_string();
        assert!(forced.contains("get_netns_cookie"), "{forced}");
    }

    #[test]
    fn iptables_can_be_forced_on_a_kernel_with_everything() {
        let (mode, _) = choose(Mode::Iptables, &probe_with(&[])).unwrap();
        assert_eq!(mode, Chosen::Iptables);
    }

    #[test]
    fn simulating_a_missing_feature_takes_only_probed_names() {
        let mut probe = probe_with(&[]);
        probe.simulate_missing("program sk_msg").unwrap();
        assert_eq!(choose(Mode::Auto, &probe).unwrap().0, Chosen::Iptables);
        let err = probe
            .simulate_missing("warp drive")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("warp drive") && err.contains("program sk_msg"),
            "{err}"
        );
    }
}
