//! What this kernel offers the eBPF data path, probed at start-up (DESIGN.md §6), and the
//! mode the agent picks from it. Features are either required (eBPF mode cannot work
//! without them) or optional, each optional one with the fallback used in its place.
use aya::maps::MapType;
use aya::programs::ProgramType;
use aya::sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper};
use aya::util::KernelVersion;

/// An optional feature: eBPF mode uses it where the kernel has it and a fallback below.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Optional {
    /// TCX `bpf_link`s for the tc programs (6.6); below, netlink clsact + cls_bpf.
    Tcx,
    /// The `cgroup/getpeername4` attach type (5.8, with its twin getpeername6); below,
    /// nothing hides the redirect.
    Getpeername,
    /// `SO_NETNS_COOKIE` (5.14); below, connect4 tells the agent a netns's cookie.
    SoNetnsCookie,
    /// `%pI4` in `bpf_trace_printk` (5.13); below, trace lines carry addresses as hex.
    PrintkIp,
}

/// Whether eBPF mode needs a feature, and what it does without it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Required,
    Optional(Optional, &'static str),
}

/// One feature the eBPF path relies on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Feature {
    pub name: String,
    /// The kernel that introduced it (for the operator reading why).
    pub since: &'static str,
    /// eBPF mode cannot run without it.
    pub required: bool,
    pub supported: bool,
    /// What eBPF mode uses instead when an optional feature is missing.
    pub fallback: Option<&'static str>,
    #[serde(skip)]
    pub optional: Option<Optional>,
}

/// Probe results.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Probe {
    pub kernel: String,
    pub features: Vec<Feature>,
}

impl Probe {
    /// Required features this kernel lacks: any one of them rules eBPF mode out.
    pub fn missing_required(&self) -> Vec<&Feature> {
        self.features
            .iter()
            .filter(|f| f.required && !f.supported)
            .collect()
    }

    /// Optional features this kernel lacks, whose fallbacks eBPF mode uses.
    pub fn fallbacks(&self) -> Vec<&Feature> {
        self.features
            .iter()
            .filter(|f| !f.required && !f.supported)
            .collect()
    }

    /// Whether the kernel has an optional feature (a missing probe entry counts as absent).
    pub fn has(&self, feature: Optional) -> bool {
        self.features
            .iter()
            .any(|f| f.optional == Some(feature) && f.supported)
    }

    /// The oldest kernel eBPF mode can run on: the newest of the required features.
    pub fn ebpf_floor() -> &'static str {
        PROBES
            .iter()
            .filter(|p| p.need == Need::Required)
            .map(|p| p.since)
            .max_by_key(|since| parse_version(since))
            .unwrap_or("0.0")
    }
}

/// `"5.7"` → `(5, 7)`, for comparing the kernels features came with.
pub fn parse_version(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

enum What {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
    /// Attach types and socket options have no probe of their own; the kernel version
    /// decides.
    KernelAtLeast(u8, u8),
}

/// One row of [`PROBES`].
struct ProbeSpec {
    name: &'static str,
    since: &'static str,
    what: What,
    need: Need,
}

const fn required(name: &'static str, since: &'static str, what: What) -> ProbeSpec {
    ProbeSpec {
        name,
        since,
        what,
        need: Need::Required,
    }
}

/// Fallback texts, as the operator reads them in `/config_dump` and the start-up log.
pub const TCX_FALLBACK: &str =
    "netlink clsact qdisc with cls_bpf direct-action filters (fixed priority and handle, \
     replaced on restart, removed at DEL)";
pub const GETPEERNAME_FALLBACK: &str =
    "none: an application whose connect was redirected sees the proxy (<pod IP>:15001) \
     as its peer in getpeername()";
pub const NETNS_COOKIE_FALLBACK: &str =
    "the agent learns a pod netns's cookie from connect4 (a probe connect from inside the \
     netns, answered through the NETNS_PROBE map)";

pub const PRINTK_IP_FALLBACK: &str =
    "debug trace lines carry addresses as hex (ipx:a60000a), which interceptor trace prints \
     dotted";

const PROBES: &[ProbeSpec] = &[
    required(
        "program cgroup/sock_addr (connect4/6, getpeername4/6)",
        "4.17",
        What::Program(ProgramType::CgroupSockAddr),
    ),
    required(
        "program sock_ops",
        "4.13",
        What::Program(ProgramType::SockOps),
    ),
    required(
        "program cgroup/sockopt (getsockopt)",
        "5.3",
        What::Program(ProgramType::CgroupSockopt),
    ),
    required(
        "program tc classifier",
        "4.1",
        What::Program(ProgramType::SchedClassifier),
    ),
    required("program sk_msg", "4.17", What::Program(ProgramType::SkMsg)),
    required("map hash", "3.19", What::Map(MapType::Hash)),
    required("map LRU hash", "4.10", What::Map(MapType::LruHash)),
    required("map LPM trie", "4.11", What::Map(MapType::LpmTrie)),
    required("map per-CPU array", "4.6", What::Map(MapType::PerCpuArray)),
    required("map SOCKHASH", "4.18", What::Map(MapType::SockHash)),
    // The one that decides whether a connect belongs to an enrolled pod. 5.4–5.6 have no
    // replacement for it here (see the README's support matrix): iptables mode there.
    required(
        "helper get_netns_cookie in sock_addr",
        "5.7",
        What::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ),
    ),
    required(
        "helper get_socket_cookie in sock_addr",
        "5.0",
        What::Helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
        ),
    ),
    required(
        "helper get_socket_cookie in sock_ops",
        "5.0",
        What::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    required(
        "helper sock_hash_update in sock_ops",
        "4.18",
        What::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    ),
    required(
        "helper msg_redirect_hash in sk_msg",
        "4.18",
        What::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    ),
    required(
        "helper l4_csum_replace in tc",
        "4.1",
        What::Helper(
            ProgramType::SchedClassifier,
            BpfHelper::BPF_FUNC_l4_csum_replace,
        ),
    ),
    // aya attaches cgroup programs with bpf_link from 5.7 and with BPF_PROG_ATTACH below;
    // the agent pins the links. Below 5.7 the netns cookie helper is missing as well, so
    // eBPF mode never runs there and the PROG_ATTACH path is not relied on.
    required(
        "bpf_link for cgroup programs",
        "5.7",
        What::KernelAtLeast(5, 7),
    ),
    ProbeSpec {
        name: "attach type cgroup/getpeername4",
        since: "5.8",
        what: What::KernelAtLeast(5, 8),
        need: Need::Optional(Optional::Getpeername, GETPEERNAME_FALLBACK),
    },
    ProbeSpec {
        name: "%pI4 in bpf_trace_printk",
        since: "5.13",
        what: What::KernelAtLeast(5, 13),
        need: Need::Optional(Optional::PrintkIp, PRINTK_IP_FALLBACK),
    },
    ProbeSpec {
        name: "SO_NETNS_COOKIE",
        since: "5.14",
        what: What::KernelAtLeast(5, 14),
        need: Need::Optional(Optional::SoNetnsCookie, NETNS_COOKIE_FALLBACK),
    },
    ProbeSpec {
        name: "bpf_link for tc (TCX)",
        since: "6.6",
        what: What::KernelAtLeast(6, 6),
        need: Need::Optional(Optional::Tcx, TCX_FALLBACK),
    },
];

/// Probe every feature of [`PROBES`] on this kernel.
/// Whether IPv6 is on in this process's netns: `/proc/sys/net/ipv6` exists (it does not
/// with `ipv6.disable=1` on the kernel command line) and `conf/all/disable_ipv6` is 0.
/// Pods are then intercepted over IPv6 too where the mode can.
pub fn ipv6_on() -> bool {
    ipv6_on_at(std::path::Path::new("/proc/sys/net/ipv6"))
}

/// [`ipv6_on`] for a `net/ipv6` sysctl directory at `dir`.
pub fn ipv6_on_at(dir: &std::path::Path) -> bool {
    std::fs::read_to_string(dir.join("conf/all/disable_ipv6"))
        .map(|value| value.trim() == "0")
        .unwrap_or(false)
}

pub fn probe() -> Probe {
    let current = KernelVersion::current().ok();
    let features = PROBES
        .iter()
        .map(|spec| {
            let supported = match &spec.what {
                What::Program(kind) => is_program_supported(*kind).unwrap_or(false),
                What::Map(kind) => is_map_supported(*kind).unwrap_or(false),
                What::Helper(kind, helper) => is_helper_supported(*kind, *helper).unwrap_or(false),
                What::KernelAtLeast(major, minor) => {
                    current.is_some_and(|v| v >= KernelVersion::new(*major, *minor, 0))
                }
            };
            feature(spec, supported)
        })
        .collect();
    Probe {
        kernel: current
            .map(|v| v.to_string())
            .unwrap_or_else(|| "unknown".into()),
        features,
    }
}

fn feature(spec: &ProbeSpec, supported: bool) -> Feature {
    let (required, optional, fallback) = match spec.need {
        Need::Required => (true, None, None),
        Need::Optional(which, fallback) => (false, Some(which), Some(fallback)),
    };
    Feature {
        name: spec.name.to_owned(),
        since: spec.since,
        required,
        supported,
        fallback,
        optional,
    }
}

/// `--mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// eBPF when the kernel has every required feature, iptables otherwise.
    #[default]
    Auto,
    Ebpf,
    /// The iptables fallback: FSM's nat chains in each pod's netns.
    Iptables,
}

/// The mode the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

    /// One line per fallback in use: feature, the kernel that has it, what is used
    /// instead (for the start-up log and the mode reason).
    pub fn fallback_lines(&self) -> Vec<String> {
        self.fallbacks()
            .iter()
            .map(|f| {
                format!(
                    "{} (kernel {}) missing: {}",
                    f.name,
                    f.since,
                    f.fallback.unwrap_or("none")
                )
            })
            .collect()
    }
}

/// The mode to run and why, from what was asked and what the kernel has.
pub fn choose(requested: Mode, probe: &Probe) -> Result<(Chosen, String), ModeError> {
    let missing: Vec<String> = probe
        .missing_required()
        .iter()
        .map(|f| format!("{} (kernel {})", f.name, f.since))
        .collect();
    let fallbacks = match probe.fallbacks().len() {
        0 => "every optional feature present".to_owned(),
        n => format!(
            "{n} fallback{}: {}",
            if n == 1 { "" } else { "s" },
            probe.fallback_lines().join("; ")
        ),
    };
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
            format!("requested with --mode ebpf; every required feature is present; {fallbacks}"),
        )),
        Mode::Auto => Ok((
            Chosen::Ebpf,
            format!(
                "auto: all {} required features of the eBPF path are present (eBPF mode needs \
                 kernel {} or newer); {fallbacks}",
                probe.features.iter().filter(|f| f.required).count(),
                Probe::ebpf_floor()
            ),
        )),
    }
}

/// What `interceptor probe --json` prints: this kernel, the mode `--mode auto` would
/// pick and why, and every feature.
#[derive(Debug, serde::Serialize)]
pub struct ProbeReport {
    pub kernel: String,
    pub auto_mode: Chosen,
    pub reason: String,
    pub ebpf_floor: &'static str,
    pub features: Vec<Feature>,
}

impl ProbeReport {
    pub fn new(probe: &Probe) -> Self {
        let (auto_mode, reason) =
            choose(Mode::Auto, probe).unwrap_or_else(|e| (Chosen::Iptables, e.to_string()));
        Self {
            kernel: probe.kernel.clone(),
            auto_mode,
            reason,
            ebpf_floor: Probe::ebpf_floor(),
            features: probe.features.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_off_when_disabled_or_absent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!ipv6_on_at(&dir.path().join("missing")), "no net/ipv6: off");
        let conf = dir.path().join("conf/all");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("disable_ipv6"), "1\n").unwrap();
        assert!(!ipv6_on_at(dir.path()));
        std::fs::write(conf.join("disable_ipv6"), "0\n").unwrap();
        assert!(ipv6_on_at(dir.path()));
    }

    fn probe_with(missing: &[&str]) -> Probe {
        Probe {
            kernel: "5.4.0".into(),
            features: PROBES
                .iter()
                .map(|spec| feature(spec, !missing.contains(&spec.name)))
                .collect(),
        }
    }

    #[test]
    fn auto_picks_ebpf_when_everything_is_there() {
        let (mode, why) = choose(Mode::Auto, &probe_with(&[])).unwrap();
        assert_eq!(mode, Chosen::Ebpf);
        assert!(
            why.starts_with("auto") && why.contains("every optional feature"),
            "{why}"
        );
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

    /// The kernels of Debian 11 (5.10), RHEL 9 (5.14) and Ubuntu 22.04 (5.15) lack TCX;
    /// 5.10 lacks SO_NETNS_COOKIE too: eBPF mode all the same, with the fallbacks named.
    #[test]
    fn optional_features_missing_keep_ebpf_mode_and_name_their_fallbacks() {
        let probe = probe_with(&["bpf_link for tc (TCX)", "SO_NETNS_COOKIE"]);
        let (mode, why) = choose(Mode::Auto, &probe).unwrap();
        assert_eq!(mode, Chosen::Ebpf, "{why}");
        assert!(why.contains("2 fallbacks"), "{why}");
        assert!(
            why.contains("bpf_link for tc (TCX) (kernel 6.6) missing: netlink clsact"),
            "{why}"
        );
        assert!(
            why.contains("SO_NETNS_COOKIE (kernel 5.14) missing"),
            "{why}"
        );
        assert!(!probe.has(Optional::Tcx) && !probe.has(Optional::SoNetnsCookie));
        assert!(probe.has(Optional::Getpeername));
        assert!(choose(Mode::Ebpf, &probe).is_ok());
    }

    #[test]
    fn every_optional_feature_has_a_fallback_and_the_floor_is_the_newest_required_one() {
        for spec in PROBES {
            if let Need::Optional(_, fallback) = spec.need {
                assert!(!fallback.is_empty(), "{}", spec.name);
            }
        }
        assert_eq!(Probe::ebpf_floor(), "5.7");
        assert!(parse_version("5.10") > parse_version("5.7"));
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
