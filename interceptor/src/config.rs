//! The agent's global mesh configuration (DESIGN.md section 5): one YAML (or JSON) file,
//! in the DaemonSet the `config.yaml` key of the `interceptor-config` ConfigMap, with the
//! field names of FSM's MeshConfig:
//!
//! ```yaml
//! outboundIPRangeExclusionList: ["169.254.169.254/32"]  # never redirected outbound
//! outboundIPRangeInclusionList: []    # if not empty, only these are redirected outbound
//! outboundPortExclusionList: [6379]   # destination ports never redirected
//! inboundPortExclusionList: [8081]    # pod ports never redirected inbound
//! bpfDebug: false                     # bpf_printk lines for `interceptor trace`
//! ```
//!
//! Every field is optional (empty lists, `false`). How bad input is handled:
//! - A file that is not YAML, is not a mapping, or has a field of the wrong type (a list
//!   field that is not a list, a `bpfDebug` that is not a boolean) is an error naming the
//!   key; [`watch_file`] then keeps the last good configuration.
//! - A bad entry of a list (`10.0.0.0/33`, port `70000`, a hostname) is skipped with a
//!   warning naming the key, the index and the value. For the exclusion lists that means
//!   the traffic is intercepted, as if the entry were absent. For the inclusion list a
//!   skipped entry only narrows it: if every entry is bad, the list means "no
//!   destination", never "every destination" (which is what an empty list means).
//! - An unknown field is a warning (with a hint when it differs from a known name only
//!   in case), and is ignored.
//!
//! CIDRs are IPv4 (`10.0.0.0/8`; a bare address means `/32`; host bits are cleared with
//! a warning); IPv6 ranges are skipped with a warning, since the agent intercepts IPv4.
//! Ports are integers 1-65535 (a quoted number is taken as one).
//!
//! The agent does not act on this yet; the daemon wires it in later.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use serde::{Serialize, Serializer};
use serde_yaml::{Mapping, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// `outboundIPRangeExclusionList`
pub const OUTBOUND_IP_RANGE_EXCLUSION_LIST: &str = "outboundIPRangeExclusionList";
/// `outboundIPRangeInclusionList`
pub const OUTBOUND_IP_RANGE_INCLUSION_LIST: &str = "outboundIPRangeInclusionList";
/// `outboundPortExclusionList`
pub const OUTBOUND_PORT_EXCLUSION_LIST: &str = "outboundPortExclusionList";
/// `inboundPortExclusionList`
pub const INBOUND_PORT_EXCLUSION_LIST: &str = "inboundPortExclusionList";
/// `bpfDebug`
pub const BPF_DEBUG: &str = "bpfDebug";
/// FSM's `spec.traffic.enablePermissiveTrafficPolicyMode`: `false` is SMI mode.
pub const ENABLE_PERMISSIVE_TRAFFIC_POLICY_MODE: &str = "enablePermissiveTrafficPolicyMode";

const KNOWN_FIELDS: [&str; 6] = [
    ENABLE_PERMISSIVE_TRAFFIC_POLICY_MODE,
    OUTBOUND_IP_RANGE_EXCLUSION_LIST,
    OUTBOUND_IP_RANGE_INCLUSION_LIST,
    OUTBOUND_PORT_EXCLUSION_LIST,
    INBOUND_PORT_EXCLUSION_LIST,
    BPF_DEBUG,
];

/// The validated configuration. Serialized (for a config dump) with the file's names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshConfig {
    /// Destinations whose outbound traffic is never redirected.
    #[serde(
        rename = "outboundIPRangeExclusionList",
        serialize_with = "serialize_nets"
    )]
    pub outbound_ip_range_exclusion_list: Vec<Ipv4Net>,
    /// `None`: every destination is redirected (the list is empty or absent).
    /// `Some(nets)`: only destinations in `nets` are; `Some` of an empty list (every
    /// configured entry was invalid) redirects none.
    #[serde(
        rename = "outboundIPRangeInclusionList",
        serialize_with = "serialize_inclusion"
    )]
    pub outbound_ip_range_inclusion_list: Option<Vec<Ipv4Net>>,
    /// Destination ports whose outbound traffic is never redirected.
    #[serde(rename = "outboundPortExclusionList")]
    pub outbound_port_exclusion_list: Vec<u16>,
    /// Pod ports whose inbound traffic is never redirected (on top of the reserved ports).
    #[serde(rename = "inboundPortExclusionList")]
    pub inbound_port_exclusion_list: Vec<u16>,
    /// Whether the eBPF programs write `bpf_printk` lines.
    #[serde(rename = "bpfDebug")]
    pub bpf_debug: bool,
    /// `None` (unset) and `Some(true)`: permissive mode, all mesh traffic allowed;
    /// `Some(false)`: SMI mode, denied unless an SMI TrafficTarget allows it.
    #[serde(
        rename = "enablePermissiveTrafficPolicyMode",
        skip_serializing_if = "Option::is_none"
    )]
    pub enable_permissive_traffic_policy_mode: Option<bool>,
}

impl MeshConfig {
    /// Whether all mesh traffic is allowed (FSM's default) rather than SMI policy.
    pub fn permissive(&self) -> bool {
        self.enable_permissive_traffic_policy_mode.unwrap_or(true)
    }
}

fn serialize_nets<S: Serializer>(nets: &[Ipv4Net], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(ToString::to_string))
}

fn serialize_inclusion<S: Serializer>(
    nets: &Option<Vec<Ipv4Net>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    serialize_nets(nets.as_deref().unwrap_or_default(), s)
}

impl MeshConfig {
    /// Whether outbound traffic to `ip:port` is to be redirected by the global lists.
    pub fn intercepts_outbound(&self, ip: Ipv4Addr, port: u16) -> bool {
        !self.outbound_port_exclusion_list.contains(&port)
            && !self
                .outbound_ip_range_exclusion_list
                .iter()
                .any(|net| net.contains(&ip))
            && self
                .outbound_ip_range_inclusion_list
                .as_ref()
                .is_none_or(|nets| nets.iter().any(|net| net.contains(&ip)))
    }

    /// Whether inbound traffic to the pod's `port` is to be redirected by the global list
    /// (the reserved ports are the data path's business).
    pub fn intercepts_inbound(&self, port: u16) -> bool {
        !self.inbound_port_exclusion_list.contains(&port)
    }
}

/// A configuration as loaded: the values and what was wrong with the file short of an
/// error, one line each (`key[index]: value: why; entry skipped`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub config: MeshConfig,
    pub warnings: Vec<String>,
}

/// Why the configuration file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Not YAML, not a mapping, or a field of the wrong type; `message` names the key.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Validates the text of a configuration file; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let value: Value = serde_yaml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let map = match value {
        // An empty file, or only comments.
        Value::Null => Mapping::new(),
        Value::Mapping(map) => map,
        other => {
            return Err(invalid(format!(
                "expected a mapping of field names ({}) to values, found {}",
                KNOWN_FIELDS.join(", "),
                describe(&other)
            )))
        }
    };
    let mut loaded = Loaded::default();
    let warnings = &mut loaded.warnings;
    let config = &mut loaded.config;
    for (key, value) in map {
        let Some(key) = key.as_str().map(str::to_string) else {
            warnings.push(format!(
                "field name {} is not a string; ignored",
                describe(&key)
            ));
            continue;
        };
        match key.as_str() {
            OUTBOUND_IP_RANGE_EXCLUSION_LIST => {
                let entries = list(&key, value).map_err(invalid)?;
                config.outbound_ip_range_exclusion_list = nets(&key, entries, warnings);
            }
            OUTBOUND_IP_RANGE_INCLUSION_LIST => {
                let entries = list(&key, value).map_err(invalid)?;
                let configured = entries.len();
                let nets = nets(&key, entries, warnings);
                if configured > 0 && nets.is_empty() {
                    warnings.push(format!(
                        "{key}: no valid entry; no outbound traffic is redirected until it \
                         has one (an empty list would redirect every destination)"
                    ));
                }
                config.outbound_ip_range_inclusion_list = (configured > 0).then_some(nets);
            }
            OUTBOUND_PORT_EXCLUSION_LIST => {
                let entries = list(&key, value).map_err(invalid)?;
                config.outbound_port_exclusion_list = ports(&key, entries, warnings);
            }
            INBOUND_PORT_EXCLUSION_LIST => {
                let entries = list(&key, value).map_err(invalid)?;
                config.inbound_port_exclusion_list = ports(&key, entries, warnings);
            }
            BPF_DEBUG => config.bpf_debug = boolean(&key, value).map_err(invalid)?.unwrap_or(false),
            ENABLE_PERMISSIVE_TRAFFIC_POLICY_MODE => {
                config.enable_permissive_traffic_policy_mode =
                    boolean(&key, value).map_err(invalid)?;
            }
            _ => {
                let hint = KNOWN_FIELDS
                    .iter()
                    .find(|known| known.eq_ignore_ascii_case(&key))
                    .map(|known| format!(" (did you mean {known}?)"))
                    .unwrap_or_default();
                warnings.push(format!("unknown field {key:?} ignored{hint}"));
            }
        }
    }
    Ok(loaded)
}

/// A short description of a YAML value for messages: its text for scalars.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

fn boolean(key: &str, value: Value) -> Result<Option<bool>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(b)),
        other => Err(format!(
            "{key}: expected true or false, found {}",
            describe(&other)
        )),
    }
}

fn list(key: &str, value: Value) -> Result<Vec<Value>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Sequence(entries) => Ok(entries),
        other => Err(format!(
            "{key}: expected a list, found {}",
            describe(&other)
        )),
    }
}

fn nets(key: &str, entries: Vec<Value>, warnings: &mut Vec<String>) -> Vec<Ipv4Net> {
    let mut out: Vec<Ipv4Net> = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let skip = |why: &str| format!("{key}[{i}]: {}: {why}; entry skipped", describe(&entry));
        let Value::String(text) = &entry else {
            warnings.push(skip("not an IPv4 CIDR such as 10.0.0.0/8"));
            continue;
        };
        let text = text.trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        let net = match parsed {
            Ok(IpNet::V4(net)) => net,
            Ok(IpNet::V6(_)) => {
                warnings.push(skip(
                    "IPv6 ranges are not supported (the agent intercepts IPv4)",
                ));
                continue;
            }
            Err(_) => {
                warnings.push(skip("not an IPv4 CIDR such as 10.0.0.0/8"));
                continue;
            }
        };
        let trunc = net.trunc();
        if trunc != net {
            warnings.push(format!(
                "{key}[{i}]: {text:?} has host bits set; taken as {trunc}"
            ));
        }
        if !out.contains(&trunc) {
            out.push(trunc);
        }
    }
    out
}

fn ports(key: &str, entries: Vec<Value>, warnings: &mut Vec<String>) -> Vec<u16> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let number = match &entry {
            Value::Number(n) => n.as_u64(),
            Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                s.parse::<u64>().ok()
            }
            _ => None,
        };
        match number
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&p| p != 0)
        {
            Some(port) => {
                if seen.insert(port) {
                    out.push(port);
                }
            }
            None => warnings.push(format!(
                "{key}[{i}]: {}: not a port number (1-65535); entry skipped",
                describe(&entry)
            )),
        }
    }
    out
}

/// Per-pod annotations (FSM's and Istio's names for the same four lists). A pod's rules
/// add to the global ones.
pub const POD_OUTBOUND_EXCLUDE_CIDRS: [&str; 2] = [
    "flomesh.io/outbound-ip-range-exclusion-list",
    "traffic.sidecar.istio.io/excludeOutboundIPRanges",
];
pub const POD_OUTBOUND_INCLUDE_CIDRS: [&str; 2] = [
    "flomesh.io/outbound-ip-range-inclusion-list",
    "traffic.sidecar.istio.io/includeOutboundIPRanges",
];
pub const POD_OUTBOUND_EXCLUDE_PORTS: [&str; 2] = [
    "flomesh.io/outbound-port-exclusion-list",
    "traffic.sidecar.istio.io/excludeOutboundPorts",
];
pub const POD_INBOUND_EXCLUDE_PORTS: [&str; 2] = [
    "flomesh.io/inbound-port-exclusion-list",
    "traffic.sidecar.istio.io/excludeInboundPorts",
];

/// The rules a pod's annotations ask for (comma-separated lists), and one warning per
/// bad entry naming the pod, the annotation and the value; bad entries are skipped, so a
/// typo never widens interception beyond what the valid entries say. Istio's
/// `includeOutboundIPRanges: "*"` means every destination (no inclusion list).
pub fn pod_rules(pod: &str, annotations: &std::collections::BTreeMap<String, String>) -> Loaded {
    let mut warnings = Vec::new();
    let mut config = MeshConfig::default();
    let entries = |text: &str| -> Vec<Value> {
        text.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| Value::String(e.to_owned()))
            .collect()
    };
    for (key, text) in annotations {
        let key = key.as_str();
        let mut local = Vec::new();
        if POD_OUTBOUND_EXCLUDE_CIDRS.contains(&key) {
            for net in nets(key, entries(text), &mut local) {
                if !config.outbound_ip_range_exclusion_list.contains(&net) {
                    config.outbound_ip_range_exclusion_list.push(net);
                }
            }
        } else if POD_OUTBOUND_INCLUDE_CIDRS.contains(&key) {
            if text.trim() == "*" {
                continue;
            }
            let included = nets(key, entries(text), &mut local);
            config
                .outbound_ip_range_inclusion_list
                .get_or_insert_with(Vec::new)
                .extend(included);
        } else if POD_OUTBOUND_EXCLUDE_PORTS.contains(&key) {
            config
                .outbound_port_exclusion_list
                .extend(ports(key, entries(text), &mut local));
        } else if POD_INBOUND_EXCLUDE_PORTS.contains(&key) {
            config
                .inbound_port_exclusion_list
                .extend(ports(key, entries(text), &mut local));
        }
        warnings.extend(
            local
                .into_iter()
                .map(|w| format!("pod {pod}: annotation {w}")),
        );
    }
    Loaded { config, warnings }
}

/// What [`watch_file`] publishes, in the manner of the sources' state.
#[derive(Clone, Debug, Default)]
pub struct ConfigState {
    /// The configuration in force: the last one that loaded, or the defaults before that.
    pub config: Arc<MeshConfig>,
    /// 0 before the first successful load, then bumped each time `config` changes.
    pub generation: u64,
    /// The warnings of the file as last loaded successfully.
    pub warnings: Vec<String>,
    /// The error of the latest attempt while the file cannot be used; `None` once it can.
    pub last_error: Option<String>,
}

/// Reads `path` every `interval` (the first time at once) and publishes on `tx` when the
/// configuration, its warnings or the error change. Only a changed file is parsed again
/// (its whole content is compared, which also catches a ConfigMap's symbolic-link swap).
/// While the file cannot be read or is invalid, the last good configuration stays in
/// force and each distinct error is logged once. Runs until the handle is aborted or
/// every receiver is gone.
pub fn watch_file(
    path: PathBuf,
    interval: Duration,
    tx: watch::Sender<ConfigState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_text: Option<String> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = tx.closed() => return,
            }
            let result = match tokio::fs::read_to_string(&path).await {
                Ok(text) if last_text.as_ref() == Some(&text) => continue,
                Ok(text) => {
                    let parsed = parse(&path, &text);
                    last_text = Some(text);
                    parsed
                }
                Err(source) => {
                    last_text = None;
                    Err(ConfigError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            };
            match result {
                Ok(loaded) => publish_config(&path, &tx, loaded),
                Err(err) => publish_error(&path, &tx, &err),
            }
        }
    })
}

fn publish_config(path: &Path, tx: &watch::Sender<ConfigState>, loaded: Loaded) {
    tx.send_if_modified(|state| {
        let mut changed = state.last_error.take().is_some();
        if state.warnings != loaded.warnings {
            for warning in &loaded.warnings {
                warn!(file = %path.display(), "mesh config: {warning}");
            }
            state.warnings = loaded.warnings;
            changed = true;
        }
        if state.generation == 0 || *state.config != loaded.config {
            state.generation += 1;
            info!(
                file = %path.display(),
                generation = state.generation,
                config = %Summary(&loaded.config),
                "mesh config loaded"
            );
            state.config = Arc::new(loaded.config);
            changed = true;
        }
        changed
    });
}

fn publish_error(path: &Path, tx: &watch::Sender<ConfigState>, err: &ConfigError) {
    let message = err.to_string();
    tx.send_if_modified(|state| {
        if state.last_error.as_deref() == Some(message.as_str()) {
            return false;
        }
        warn!(
            file = %path.display(),
            generation = state.generation,
            "cannot load the mesh config, keeping the previous one: {message}"
        );
        state.last_error = Some(message.clone());
        true
    });
}

/// The configuration on one log line, as JSON.
struct Summary<'a>(&'a MeshConfig);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self.0) {
            Ok(json) => f.write_str(&json),
            Err(_) => write!(f, "{:?}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    fn ok(text: &str) -> Loaded {
        parse(Path::new("config.yaml"), text).expect("loads")
    }

    fn err(text: &str) -> String {
        parse(Path::new("config.yaml"), text)
            .expect_err("does not load")
            .to_string()
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn full_file_in_fsm_names() {
        let loaded = ok("\
# As in deploy/configmap.yaml
outboundIPRangeExclusionList: [169.254.169.254/32, 10.96.0.0/12]
outboundIPRangeInclusionList:
  - 10.0.0.0/8
outboundPortExclusionList: [6379, 7070]
inboundPortExclusionList: [8081]
bpfDebug: true
");
        assert_eq!(loaded.warnings, Vec::<String>::new());
        let c = loaded.config;
        assert_eq!(
            c.outbound_ip_range_exclusion_list,
            [net("169.254.169.254/32"), net("10.96.0.0/12")]
        );
        assert_eq!(
            c.outbound_ip_range_inclusion_list,
            Some(vec![net("10.0.0.0/8")])
        );
        assert_eq!(c.outbound_port_exclusion_list, [6379, 7070]);
        assert_eq!(c.inbound_port_exclusion_list, [8081]);
        assert!(c.bpf_debug);

        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "outboundIPRangeExclusionList": ["169.254.169.254/32", "10.96.0.0/12"],
                "outboundIPRangeInclusionList": ["10.0.0.0/8"],
                "outboundPortExclusionList": [6379, 7070],
                "inboundPortExclusionList": [8081],
                "bpfDebug": true,
            })
        );

        assert!(
            !c.intercepts_outbound(Ipv4Addr::new(10, 96, 0, 1), 80),
            "excluded range"
        );
        assert!(
            !c.intercepts_outbound(Ipv4Addr::new(10, 1, 2, 3), 6379),
            "excluded port"
        );
        assert!(c.intercepts_outbound(Ipv4Addr::new(10, 1, 2, 3), 80));
        assert!(
            !c.intercepts_outbound(Ipv4Addr::new(192, 168, 1, 1), 80),
            "not included"
        );
        assert!(!c.intercepts_inbound(8081));
        assert!(c.intercepts_inbound(8080));
    }

    #[test]
    fn json_and_empty_files_and_the_deployed_config_map() {
        let c = ok(r#"{"outboundPortExclusionList": [53], "bpfDebug": false}"#).config;
        assert_eq!(c.outbound_port_exclusion_list, [53]);

        for text in [
            "",
            "# nothing\n",
            "{}",
            "outboundIPRangeInclusionList: []\nbpfDebug:\n",
        ] {
            let loaded = ok(text);
            assert_eq!(loaded, Loaded::default(), "{text:?}");
            assert!(loaded
                .config
                .intercepts_outbound(Ipv4Addr::new(1, 2, 3, 4), 443));
        }

        // The config.yaml that deploy/configmap.yaml ships.
        let cm: serde_yaml::Value =
            serde_yaml::Deserializer::from_str(include_str!("../../deploy/configmap.yaml"))
                .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
                .find(|doc| doc["metadata"]["name"] == "interceptor-config")
                .expect("interceptor-config in deploy/configmap.yaml");
        let text = cm["data"]["config.yaml"].as_str().unwrap();
        assert_eq!(ok(text), Loaded::default());
    }

    #[test]
    fn bad_entries_are_skipped_and_named() {
        let loaded = ok("\
outboundIPRangeExclusionList: [10.0.0.0/33, 10.1.0.0/16, banana, 7, 'fd00::/8', 10.2.3.4, 10.9.9.9/8]
outboundPortExclusionList: [0, 6379, 70000, -1, \"8080\", http, 6379]
inboundPortExclusionList: [{port: 1}, 9090]
");
        let c = &loaded.config;
        assert_eq!(
            c.outbound_ip_range_exclusion_list,
            [net("10.1.0.0/16"), net("10.2.3.4/32"), net("10.0.0.0/8")]
        );
        assert_eq!(c.outbound_port_exclusion_list, [6379, 8080]);
        assert_eq!(c.inbound_port_exclusion_list, [9090]);
        assert_eq!(
            loaded.warnings,
            [
                "outboundIPRangeExclusionList[0]: \"10.0.0.0/33\": not an IPv4 CIDR such as 10.0.0.0/8; entry skipped",
                "outboundIPRangeExclusionList[2]: \"banana\": not an IPv4 CIDR such as 10.0.0.0/8; entry skipped",
                "outboundIPRangeExclusionList[3]: 7: not an IPv4 CIDR such as 10.0.0.0/8; entry skipped",
                "outboundIPRangeExclusionList[4]: \"fd00::/8\": IPv6 ranges are not supported (the agent intercepts IPv4); entry skipped",
                "outboundIPRangeExclusionList[6]: \"10.9.9.9/8\" has host bits set; taken as 10.0.0.0/8",
                "outboundPortExclusionList[0]: 0: not a port number (1-65535); entry skipped",
                "outboundPortExclusionList[2]: 70000: not a port number (1-65535); entry skipped",
                "outboundPortExclusionList[3]: -1: not a port number (1-65535); entry skipped",
                "outboundPortExclusionList[5]: \"http\": not a port number (1-65535); entry skipped",
                "inboundPortExclusionList[0]: a mapping: not a port number (1-65535); entry skipped",
            ]
        );
    }

    #[test]
    fn a_bad_inclusion_list_never_widens_interception() {
        // Some entries valid: only those destinations.
        let c = ok("outboundIPRangeInclusionList: [10.0.0.0/8, nope]\n").config;
        assert_eq!(
            c.outbound_ip_range_inclusion_list,
            Some(vec![net("10.0.0.0/8")])
        );
        assert!(!c.intercepts_outbound(Ipv4Addr::new(8, 8, 8, 8), 53));

        // None valid: no destination, rather than every destination.
        let loaded = ok("outboundIPRangeInclusionList: [nope, 300.1.1.1/8]\n");
        assert_eq!(loaded.config.outbound_ip_range_inclusion_list, Some(vec![]));
        assert!(!loaded
            .config
            .intercepts_outbound(Ipv4Addr::new(10, 0, 0, 1), 80));
        assert!(!loaded
            .config
            .intercepts_outbound(Ipv4Addr::new(8, 8, 8, 8), 53));
        assert_eq!(loaded.warnings.len(), 3, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[2].starts_with("outboundIPRangeInclusionList: no valid entry"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn unknown_fields_warn_with_a_hint() {
        let loaded = ok("\
outboundIpRangeExclusionList: [10.0.0.0/8]
spec: {traffic: {}}
bpfDebug: false
");
        assert_eq!(loaded.config, MeshConfig::default());
        assert_eq!(
            loaded.warnings,
            [
                "unknown field \"outboundIpRangeExclusionList\" ignored (did you mean outboundIPRangeExclusionList?)",
                "unknown field \"spec\" ignored",
            ]
        );
    }

    #[test]
    fn wrong_types_and_syntax_are_errors_naming_the_key() {
        assert_eq!(
            err("outboundPortExclusionList: 6379\n"),
            "config.yaml: outboundPortExclusionList: expected a list, found 6379"
        );
        assert_eq!(
            err("outboundIPRangeExclusionList: {a: b}\n"),
            "config.yaml: outboundIPRangeExclusionList: expected a list, found a mapping"
        );
        assert_eq!(
            err("bpfDebug: \"yes\"\n"),
            "config.yaml: bpfDebug: expected true or false, found \"yes\""
        );
        assert!(
            err("- just\n- a list\n").starts_with("config.yaml: expected a mapping of field names"),
        );
        let syntax = err("bpfDebug: [true\n");
        assert!(syntax.starts_with("config.yaml: "), "{syntax}");
        assert!(syntax.contains("line 2"), "{syntax}");
    }

    async fn wait_for(
        rx: &mut watch::Receiver<ConfigState>,
        what: &str,
        f: impl FnMut(&ConfigState) -> bool,
    ) -> ConfigState {
        let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
            .await
            .map(|r| r.map(|state| state.clone()));
        match waited {
            Ok(Ok(state)) => state,
            Ok(Err(e)) => panic!("channel closed waiting for {what}: {e}"),
            Err(_) => panic!("timed out waiting for {what}: {:?}", rx.borrow()),
        }
    }

    #[tokio::test]
    async fn watch_reloads_and_keeps_the_last_good_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        let (tx, mut rx) = watch::channel(ConfigState::default());
        let task = watch_file(path.clone(), Duration::from_millis(20), tx);

        // No file yet: an error, defaults, generation 0.
        let missing = wait_for(&mut rx, "the missing file", |s| s.last_error.is_some()).await;
        assert_eq!(missing.generation, 0);
        assert!(missing
            .last_error
            .unwrap()
            .starts_with(&format!("cannot read {}", path.display())));

        std::fs::write(&path, "outboundPortExclusionList: [6379]\n").unwrap();
        let first = wait_for(&mut rx, "the first load", |s| s.generation == 1).await;
        assert_eq!(first.last_error, None);
        assert_eq!(first.config.outbound_port_exclusion_list, [6379]);

        // Wrong type: the error names the key; the last good config stays.
        std::fs::write(&path, "outboundPortExclusionList: 6379\n").unwrap();
        let broken = wait_for(&mut rx, "the error", |s| s.last_error.is_some()).await;
        assert_eq!(broken.generation, 1);
        assert!(Arc::ptr_eq(&broken.config, &first.config));
        assert!(broken
            .last_error
            .unwrap()
            .ends_with("outboundPortExclusionList: expected a list, found 6379"));

        // Fixed, with a skipped entry: new generation, warning published, error cleared.
        std::fs::write(
            &path,
            "outboundPortExclusionList: [6379, 99999]\nbpfDebug: true\n",
        )
        .unwrap();
        let fixed = wait_for(&mut rx, "the fix", |s| s.generation == 2).await;
        assert_eq!(fixed.last_error, None);
        assert!(fixed.config.bpf_debug);
        assert_eq!(fixed.config.outbound_port_exclusion_list, [6379]);
        assert_eq!(
            fixed.warnings,
            ["outboundPortExclusionList[1]: 99999: not a port number (1-65535); entry skipped"]
        );

        // A ConfigMap update: the file is replaced through a symbolic-link swap.
        let data = dir.path().join("..data_2");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("config.yaml"), "bpfDebug: false\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(data.join("config.yaml"), &path).unwrap();
        let swapped = wait_for(&mut rx, "the swap", |s| s.generation == 3).await;
        assert_eq!(*swapped.config, MeshConfig::default());
        assert!(swapped.warnings.is_empty());

        task.abort();
    }
}

#[cfg(test)]
mod pod_rule_tests {
    use super::*;

    #[test]
    fn annotations_give_rules_and_bad_values_are_named_and_skipped() {
        let annotations: std::collections::BTreeMap<String, String> = [
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.1.0.0/16, 300.1.1.1/8",
            ),
            ("flomesh.io/outbound-port-exclusion-list", "9000,abc"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "8080"),
            ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
            ("unrelated", "x"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let loaded = pod_rules("demo/client", &annotations);
        assert_eq!(
            loaded.config.outbound_ip_range_exclusion_list,
            vec!["10.1.0.0/16".parse().unwrap()]
        );
        assert_eq!(loaded.config.outbound_port_exclusion_list, vec![9000]);
        assert_eq!(loaded.config.inbound_port_exclusion_list, vec![8080]);
        assert_eq!(
            loaded.config.outbound_ip_range_inclusion_list, None,
            "* means everything"
        );
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
        assert!(loaded.warnings.iter().any(|w| w.contains("demo/client")
            && w.contains("excludeOutboundIPRanges")
            && w.contains("300.1.1.1/8")));
        assert!(loaded
            .warnings
            .iter()
            .any(|w| w.contains("outbound-port-exclusion-list") && w.contains("abc")));
    }

    #[test]
    fn an_inclusion_list_of_only_bad_entries_includes_nothing() {
        let annotations = [(
            "flomesh.io/outbound-ip-range-inclusion-list".to_owned(),
            "nope".to_owned(),
        )]
        .into_iter()
        .collect();
        let loaded = pod_rules("demo/x", &annotations);
        assert_eq!(loaded.config.outbound_ip_range_inclusion_list, Some(vec![]));
    }
}
