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
//! CIDRs are IPv4 or IPv6 (`10.0.0.0/8`, `fd00::/8`; a bare address means one host;
//! host bits are cleared with a warning), each applied to its own family: an IPv6 range
//! never touches IPv4 traffic. An inclusion list names the ranges of both families that
//! are redirected, so one of IPv4 ranges alone redirects no IPv6 destination.
//! Ports are integers 1-65535 (a quoted number is taken as one).
//!
//! With `--source kube` the same settings also come from FSM's `MeshConfig` object
//! (`config.flomesh.io`, `spec.traffic`), watched by the Kubernetes source and published
//! as a [`MeshConfigObject`]; [`follow_merged`] lays it over the file, field by field: a
//! field the object sets wins, the file is the node's default for the rest and the whole
//! configuration when there is no object (or no MeshConfig CRD). `bpfDebug` is not FSM's
//! and comes from the file only. Unlike the file, an object with an invalid entry is
//! rejected as a whole ([`TrafficSettings::from_spec`]) and its previous valid version
//! stays in force: it is the mesh's configuration, shared by every node, and half of it
//! is not what its author applied.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
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
/// FSM's `spec.traffic.enableEgress`: `false` refuses what leaves the mesh.
pub const ENABLE_EGRESS: &str = "enableEgress";

const KNOWN_FIELDS: [&str; 7] = [
    ENABLE_PERMISSIVE_TRAFFIC_POLICY_MODE,
    ENABLE_EGRESS,
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
    pub outbound_ip_range_exclusion_list: Vec<IpNet>,
    /// `None`: every destination is redirected (the list is empty or absent).
    /// `Some(nets)`: only destinations in `nets` are; `Some` of an empty list (every
    /// configured entry was invalid) redirects none.
    #[serde(
        rename = "outboundIPRangeInclusionList",
        serialize_with = "serialize_inclusion"
    )]
    pub outbound_ip_range_inclusion_list: Option<Vec<IpNet>>,
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
    /// `None` (unset) and `Some(true)`: enrolled pods reach destinations outside the mesh
    /// through the proxy (FSM's default); `Some(false)`: those connections are refused.
    #[serde(rename = "enableEgress", skip_serializing_if = "Option::is_none")]
    pub enable_egress: Option<bool>,
}

impl MeshConfig {
    /// Whether enrolled pods may reach destinations outside the mesh (FSM's default).
    pub fn egress(&self) -> bool {
        self.enable_egress.unwrap_or(true)
    }

    /// Whether all mesh traffic is allowed (FSM's default) rather than SMI policy.
    pub fn permissive(&self) -> bool {
        self.enable_permissive_traffic_policy_mode.unwrap_or(true)
    }
}

fn serialize_nets<S: Serializer>(nets: &[IpNet], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(nets.iter().map(ToString::to_string))
}

fn serialize_inclusion<S: Serializer>(nets: &Option<Vec<IpNet>>, s: S) -> Result<S::Ok, S::Error> {
    serialize_nets(nets.as_deref().unwrap_or_default(), s)
}

impl MeshConfig {
    /// Whether outbound traffic to `ip:port` is to be redirected by the global lists.
    pub fn intercepts_outbound(&self, ip: IpAddr, port: u16) -> bool {
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
            ENABLE_EGRESS => config.enable_egress = boolean(&key, value).map_err(invalid)?,
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

/// Why an entry of a list of ranges is not one.
const NOT_A_CIDR: &str = "not a CIDR such as 10.0.0.0/8 or fd00::/8";
/// Why an entry of a list of ports is not one.
const NOT_A_PORT: &str = "not a port number (1-65535)";

fn nets(key: &str, entries: Vec<Value>, warnings: &mut Vec<String>) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let skip = |why: &str| format!("{key}[{i}]: {}: {why}; entry skipped", describe(&entry));
        let Value::String(text) = &entry else {
            warnings.push(skip(NOT_A_CIDR));
            continue;
        };
        let text = text.trim();
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        let net = match parsed {
            Ok(net) => net,
            Err(_) => {
                warnings.push(skip(NOT_A_CIDR));
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
                "{key}[{i}]: {}: {NOT_A_PORT}; entry skipped",
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

/// The settings FSM's MeshConfig object gives in `spec.traffic`: each `None` when the
/// object leaves the field out (the file's value then stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficSettings {
    pub outbound_ip_range_exclusion_list: Option<Vec<IpNet>>,
    /// `Some(None)`: the object's list is empty, every destination is redirected.
    pub outbound_ip_range_inclusion_list: Option<Option<Vec<IpNet>>>,
    pub outbound_port_exclusion_list: Option<Vec<u16>>,
    pub inbound_port_exclusion_list: Option<Vec<u16>>,
    pub enable_permissive_traffic_policy_mode: Option<bool>,
    pub enable_egress: Option<bool>,
}

impl TrafficSettings {
    /// The settings of a MeshConfig's `spec` (JSON, as the API server gives it), with the
    /// warnings of entries taken as meaning something (host bits cleared), or why the
    /// object is rejected: a field of the wrong type, or an entry that is not a CIDR or a
    /// port. Fields of `spec.traffic` the agent has no use for (`interceptionMode`, ...)
    /// are ignored.
    pub fn from_spec(spec: &serde_json::Value) -> Result<(TrafficSettings, Vec<String>), String> {
        let traffic = match spec.get("traffic") {
            None | Some(serde_json::Value::Null) => return Ok(Default::default()),
            Some(serde_json::Value::Object(traffic)) => traffic,
            Some(_) => return Err("spec.traffic: expected a mapping".into()),
        };
        let mut settings = TrafficSettings::default();
        let mut warnings = Vec::new();
        let mut invalid = Vec::new();
        for (key, value) in traffic {
            // JSON is YAML: the file's checks apply unchanged.
            let value: Value = serde_json::from_value(value.clone())
                .map_err(|e| format!("spec.traffic.{key}: {e}"))?;
            let field = |e: String| format!("spec.traffic.{e}");
            let mut notes = Vec::new();
            match key.as_str() {
                OUTBOUND_IP_RANGE_EXCLUSION_LIST => {
                    let entries = list(key, value).map_err(field)?;
                    settings.outbound_ip_range_exclusion_list =
                        Some(nets(key, entries, &mut notes));
                }
                OUTBOUND_IP_RANGE_INCLUSION_LIST => {
                    let entries = list(key, value).map_err(field)?;
                    // As in the file: a list of only IPv6 ranges includes no IPv4
                    // destination (and the reverse); only an empty list means every one.
                    let configured = entries.len();
                    let nets = nets(key, entries, &mut notes);
                    settings.outbound_ip_range_inclusion_list =
                        Some((configured > 0).then_some(nets));
                }
                OUTBOUND_PORT_EXCLUSION_LIST => {
                    let entries = list(key, value).map_err(field)?;
                    settings.outbound_port_exclusion_list = Some(ports(key, entries, &mut notes));
                }
                INBOUND_PORT_EXCLUSION_LIST => {
                    let entries = list(key, value).map_err(field)?;
                    settings.inbound_port_exclusion_list = Some(ports(key, entries, &mut notes));
                }
                ENABLE_PERMISSIVE_TRAFFIC_POLICY_MODE => {
                    settings.enable_permissive_traffic_policy_mode =
                        boolean(key, value).map_err(field)?;
                }
                ENABLE_EGRESS => settings.enable_egress = boolean(key, value).map_err(field)?,
                _ => {}
            }
            for note in notes {
                let note = format!("spec.traffic.{note}");
                if note.contains(NOT_A_CIDR) || note.contains(NOT_A_PORT) {
                    invalid.push(note.replace("; entry skipped", ""));
                } else {
                    warnings.push(note);
                }
            }
        }
        if !invalid.is_empty() {
            return Err(invalid.join("; "));
        }
        Ok((settings, warnings))
    }

    /// `base` (the file's configuration) with every field these settings give replaced.
    pub fn over(&self, base: &MeshConfig) -> MeshConfig {
        let mut config = base.clone();
        if let Some(list) = &self.outbound_ip_range_exclusion_list {
            config.outbound_ip_range_exclusion_list = list.clone();
        }
        if let Some(list) = &self.outbound_ip_range_inclusion_list {
            config.outbound_ip_range_inclusion_list = list.clone();
        }
        if let Some(list) = &self.outbound_port_exclusion_list {
            config.outbound_port_exclusion_list = list.clone();
        }
        if let Some(list) = &self.inbound_port_exclusion_list {
            config.inbound_port_exclusion_list = list.clone();
        }
        if let Some(permissive) = self.enable_permissive_traffic_policy_mode {
            config.enable_permissive_traffic_policy_mode = Some(permissive);
        }
        if let Some(egress) = self.enable_egress {
            config.enable_egress = Some(egress);
        }
        config
    }
}

/// FSM's MeshConfig object as the Kubernetes source last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MeshConfigObject {
    /// Not listed yet (or not watched: the manifest source).
    #[default]
    Unknown,
    /// No such object, or no MeshConfig CRD in the cluster: the file alone applies.
    Absent,
    /// Its last valid version, with the warnings of its entries.
    Present {
        /// `namespace/name`, for the logs.
        name: String,
        settings: TrafficSettings,
        warnings: Vec<String>,
    },
}

/// Which MeshConfig object the Kubernetes source watches: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfigName {
    pub namespace: String,
    pub name: String,
}

impl Default for MeshConfigName {
    /// FSM's: `fsm-mesh-config` in the mesh namespace, `fsm-system` by default.
    fn default() -> Self {
        Self {
            namespace: "fsm-system".into(),
            name: "fsm-mesh-config".into(),
        }
    }
}

impl fmt::Display for MeshConfigName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for MeshConfigName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{s:?}: expected namespace/name")),
        }
    }
}

/// Publishes on `tx` the file's configuration (`file`; `None`: no file, the defaults) with
/// the MeshConfig object's settings (`object` of the state of `source`, the Kubernetes
/// source's channel) laid over it (see the module documentation), each time
/// either changes, in the manner of [`watch_file`]: `generation` is bumped when the merged
/// configuration changes, and stays 0 until the file has loaded and the object has been
/// listed. `last_error` is the file's; the object's rejections are the Kubernetes source's
/// to report (its `last_error`), since the object's previous version stays in force. Runs
/// until every receiver of `tx` is gone or an input closes.
pub fn follow_merged<S: Send + Sync + 'static>(
    file: Option<watch::Receiver<ConfigState>>,
    mut source: watch::Receiver<S>,
    object: impl Fn(&S) -> MeshConfigObject + Send + 'static,
    tx: watch::Sender<ConfigState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut file = file;
        loop {
            let file_state = file.as_mut().map(|rx| rx.borrow_and_update().clone());
            let object_state = object(&source.borrow_and_update());
            publish_merged(&tx, file_state.as_ref(), &object_state);
            let file_changed = async {
                match file.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            };
            let closed = tokio::select! {
                r = file_changed => r.is_err(),
                r = source.changed() => r.is_err(),
                () = tx.closed() => true,
            };
            if closed {
                return;
            }
        }
    })
}

fn publish_merged(
    tx: &watch::Sender<ConfigState>,
    file: Option<&ConfigState>,
    object: &MeshConfigObject,
) {
    let file_loaded = file.is_none_or(|f| f.generation > 0);
    let default = MeshConfig::default();
    let base = file.map_or(&default, |f| &*f.config);
    let (config, object_warnings) = match object {
        MeshConfigObject::Present {
            name,
            settings,
            warnings,
        } => (
            settings.over(base),
            warnings
                .iter()
                .map(|w| format!("MeshConfig {name}: {w}"))
                .collect(),
        ),
        MeshConfigObject::Absent | MeshConfigObject::Unknown => (base.clone(), Vec::new()),
    };
    // A file that does not load yet is the defaults, as without the object; the object
    // applies over them meanwhile.
    let file_settled = file_loaded || file.is_some_and(|f| f.last_error.is_some());
    let ready = file_settled && *object != MeshConfigObject::Unknown;
    let mut warnings: Vec<String> = file.map(|f| f.warnings.clone()).unwrap_or_default();
    warnings.extend(object_warnings);
    let last_error = file.and_then(|f| f.last_error.clone());
    tx.send_if_modified(|state| {
        let mut changed = false;
        if state.last_error != last_error {
            state.last_error = last_error;
            changed = true;
        }
        if state.warnings != warnings {
            state.warnings = warnings;
            changed = true;
        }
        if ready && (state.generation == 0 || *state.config != config) {
            state.generation += 1;
            let source = match object {
                MeshConfigObject::Present { name, .. } => {
                    format!("MeshConfig {name} over the file")
                }
                _ => "the file (no MeshConfig object)".into(),
            };
            info!(
                generation = state.generation,
                config = %Summary(&config),
                "mesh config from {source}"
            );
            state.config = Arc::new(config);
            changed = true;
        }
        changed
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

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::from([a, b, c, d])
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
            !c.intercepts_outbound(ip(10, 96, 0, 1), 80),
            "excluded range"
        );
        assert!(
            !c.intercepts_outbound(ip(10, 1, 2, 3), 6379),
            "excluded port"
        );
        assert!(c.intercepts_outbound(ip(10, 1, 2, 3), 80));
        assert!(
            !c.intercepts_outbound(ip(192, 168, 1, 1), 80),
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
            assert!(loaded.config.intercepts_outbound(ip(1, 2, 3, 4), 443));
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
outboundIPRangeExclusionList: [10.0.0.0/33, 10.1.0.0/16, banana, 7, 'fd00::/8', 10.2.3.4, 10.9.9.9/8, 'fd00::1/129', 'fd00:1::7/64']
outboundPortExclusionList: [0, 6379, 70000, -1, \"8080\", http, 6379]
inboundPortExclusionList: [{port: 1}, 9090]
");
        let c = &loaded.config;
        assert_eq!(
            c.outbound_ip_range_exclusion_list,
            [
                net("10.1.0.0/16"),
                net("fd00::/8"),
                net("10.2.3.4/32"),
                net("10.0.0.0/8"),
                net("fd00:1::/64")
            ]
        );
        assert_eq!(c.outbound_port_exclusion_list, [6379, 8080]);
        assert_eq!(c.inbound_port_exclusion_list, [9090]);
        assert_eq!(
            loaded.warnings,
            [
                "outboundIPRangeExclusionList[0]: \"10.0.0.0/33\": not a CIDR such as 10.0.0.0/8 or fd00::/8; entry skipped",
                "outboundIPRangeExclusionList[2]: \"banana\": not a CIDR such as 10.0.0.0/8 or fd00::/8; entry skipped",
                "outboundIPRangeExclusionList[3]: 7: not a CIDR such as 10.0.0.0/8 or fd00::/8; entry skipped",
                "outboundIPRangeExclusionList[6]: \"10.9.9.9/8\" has host bits set; taken as 10.0.0.0/8",
                "outboundIPRangeExclusionList[7]: \"fd00::1/129\": not a CIDR such as 10.0.0.0/8 or fd00::/8; entry skipped",
                "outboundIPRangeExclusionList[8]: \"fd00:1::7/64\" has host bits set; taken as fd00:1::/64",
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
        assert!(!c.intercepts_outbound(ip(8, 8, 8, 8), 53));

        // None valid: no destination, rather than every destination.
        let loaded = ok("outboundIPRangeInclusionList: [nope, 300.1.1.1/8]\n");
        assert_eq!(loaded.config.outbound_ip_range_inclusion_list, Some(vec![]));
        assert!(!loaded.config.intercepts_outbound(ip(10, 0, 0, 1), 80));
        assert!(!loaded.config.intercepts_outbound(ip(8, 8, 8, 8), 53));
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

    pub(super) async fn wait_for(
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

#[cfg(test)]
mod object_tests {
    use super::tests::wait_for;
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ok(text: &str) -> Loaded {
        parse(Path::new("mesh.yaml"), text).unwrap()
    }

    fn spec(traffic: serde_json::Value) -> serde_json::Value {
        serde_json::json!({ "traffic": traffic })
    }

    #[test]
    fn mesh_config_object_fields_win_where_set() {
        let (settings, warnings) = TrafficSettings::from_spec(&spec(serde_json::json!({
            "outboundIPRangeExclusionList": ["1.1.1.1/32", "2.2.2.2/24", "fd00::/8"],
            "inboundPortExclusionList": [6379, "7070"],
            "enablePermissiveTrafficPolicyMode": false,
            "enableEgress": false,
            "interceptionMode": "PodLevel",
        })))
        .unwrap();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("spec.traffic.outboundIPRangeExclusionList[1]"));
        let file = ok("outboundIPRangeExclusionList: [10.0.0.0/8]\n\
             outboundPortExclusionList: [53]\n\
             inboundPortExclusionList: [8081]\n\
             bpfDebug: true\n")
        .config;
        let merged = settings.over(&file);
        assert_eq!(
            merged.outbound_ip_range_exclusion_list,
            [net("1.1.1.1/32"), net("2.2.2.0/24"), net("fd00::/8")]
        );
        assert_eq!(merged.inbound_port_exclusion_list, [6379, 7070]);
        // Not set by the object: the file's.
        assert_eq!(merged.outbound_port_exclusion_list, [53]);
        assert!(merged.bpf_debug);
        assert!(!merged.permissive());
        assert!(!merged.egress());
        // FSM's default, and the file's value where the object leaves it out.
        assert!(file.egress());
        let closed = ok("enableEgress: false\n").config;
        assert!(!closed.egress());
        assert!(!TrafficSettings::default().over(&closed).egress());

        // An empty list the object sets wins too; an empty inclusion list is "all".
        let (settings, _) = TrafficSettings::from_spec(&spec(serde_json::json!({
            "outboundIPRangeExclusionList": [],
            "outboundIPRangeInclusionList": [],
        })))
        .unwrap();
        let merged = settings.over(&file);
        assert!(merged.outbound_ip_range_exclusion_list.is_empty());
        assert_eq!(merged.outbound_ip_range_inclusion_list, None);
        // Only IPv6 ranges to include: no IPv4 destination, never every one.
        let (settings, _) = TrafficSettings::from_spec(&spec(serde_json::json!({
            "outboundIPRangeInclusionList": ["fd00::/8"],
        })))
        .unwrap();
        let merged = settings.over(&file);
        assert_eq!(
            merged.outbound_ip_range_inclusion_list,
            Some(vec![net("fd00::/8")])
        );
        assert!(!merged.intercepts_outbound(IpAddr::from([10, 0, 0, 1]), 80));
        assert!(merged.intercepts_outbound("fd00::1".parse().unwrap(), 80));
        // No traffic section: nothing set.
        let (settings, _) = TrafficSettings::from_spec(&serde_json::json!({})).unwrap();
        assert_eq!(settings.over(&file), file);
    }

    #[test]
    fn an_invalid_mesh_config_object_is_rejected_whole() {
        let err = TrafficSettings::from_spec(&spec(serde_json::json!({
            "outboundIPRangeExclusionList": ["1.1.1.1/33", "2.2.2.0/24"],
            "outboundPortExclusionList": [6379, 70000],
        })))
        .unwrap_err();
        assert_eq!(
            err,
            "spec.traffic.outboundIPRangeExclusionList[0]: \"1.1.1.1/33\": not a CIDR such \
             as 10.0.0.0/8 or fd00::/8; spec.traffic.outboundPortExclusionList[1]: 70000: not a port \
             number (1-65535)"
        );
        let err = TrafficSettings::from_spec(&spec(serde_json::json!({
            "enablePermissiveTrafficPolicyMode": "yes",
        })))
        .unwrap_err();
        assert!(
            err.starts_with(
                "spec.traffic.enablePermissiveTrafficPolicyMode: expected true or false"
            ),
            "{err}"
        );
        let err =
            TrafficSettings::from_spec(&spec(serde_json::json!({"enableEgress": 0}))).unwrap_err();
        assert!(
            err.starts_with("spec.traffic.enableEgress: expected true or false"),
            "{err}"
        );
        assert!(TrafficSettings::from_spec(&serde_json::json!({"traffic": []})).is_err());
    }

    #[test]
    fn mesh_config_names() {
        assert_eq!(
            "fsm-system/fsm-mesh-config"
                .parse::<MeshConfigName>()
                .unwrap(),
            MeshConfigName::default()
        );
        assert_eq!(
            "mesh/config".parse::<MeshConfigName>().unwrap().to_string(),
            "mesh/config"
        );
        for bad in ["fsm-mesh-config", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<MeshConfigName>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn without_a_file_the_object_lays_over_the_defaults() {
        let (source_tx, source_rx) = watch::channel(MeshConfigObject::Unknown);
        let (tx, mut rx) = watch::channel(ConfigState::default());
        let _task = follow_merged(None, source_rx, MeshConfigObject::clone, tx);
        tokio::task::yield_now().await;
        assert_eq!(rx.borrow().generation, 0, "not before the object is listed");
        let (settings, warnings) = TrafficSettings::from_spec(&spec(serde_json::json!({
            "outboundPortExclusionList": [6379],
        })))
        .unwrap();
        source_tx
            .send(MeshConfigObject::Present {
                name: "fsm-system/fsm-mesh-config".into(),
                settings,
                warnings,
            })
            .unwrap();
        let state = wait_for(&mut rx, "the object", |s| s.generation == 1).await;
        assert_eq!(state.config.outbound_port_exclusion_list, [6379]);
        source_tx.send(MeshConfigObject::Absent).unwrap();
        let state = wait_for(&mut rx, "no object", |s| s.generation == 2).await;
        assert_eq!(*state.config, MeshConfig::default());
    }
}
