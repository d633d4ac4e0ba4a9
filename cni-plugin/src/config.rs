//! The network configuration the runtime passes on stdin: the standard CNI fields plus
//! the interceptor's own (`agentSocket`, `timeoutMs`, `failurePolicy`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::CniError;

/// CNI versions this plugin speaks; the last one is what VERSION reports as its own.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The version the plugin reports when the config did not give a usable one.
pub const PLUGIN_CNI_VERSION: &str = "1.1.0";

pub const DEFAULT_AGENT_SOCKET: &str = "/var/run/interceptor/cni.sock";
pub const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// `sun_path` is 108 bytes including the terminating NUL on Linux.
const MAX_SOCKET_PATH_BYTES: usize = 107;

/// What to do when the agent cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailurePolicy {
    /// The pod does not start until the agent has enrolled it.
    #[default]
    FailClosed,
    /// The pod starts unintercepted; a warning goes to stderr.
    FailOpen,
}

impl FailurePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FailClosed => "fail-closed",
            Self::FailOpen => "fail-open",
        }
    }
}

/// A validated network configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    /// The previous plugin's result, as received; `None` when absent or `null`.
    pub prev_result: Option<Value>,
    pub agent_socket: PathBuf,
    pub timeout: Duration,
    pub failure_policy: FailurePolicy,
}

/// Keys a network configuration may carry: the CNI 1.1.0 spec's (runtimes inject
/// `runtimeConfig`, `args`, `capabilities`, ...) and this plugin's own. Anything else,
/// typically a misspelt `agentSocket`, is refused with code 2 rather than silently
/// falling back to a default.
const KNOWN_KEYS: [&str; 17] = [
    "cniVersion",
    "cniVersions",
    "name",
    "type",
    "disableCheck",
    "disableGC",
    "args",
    "ipMasq",
    "ipam",
    "dns",
    "prevResult",
    "runtimeConfig",
    "capabilities",
    "cni.dev/valid-attachments",
    "agentSocket",
    "timeoutMs",
    "failurePolicy",
];

/// The wire shape.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    cni_version: String,
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default)]
    agent_socket: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    failure_policy: Option<String>,
}

/// Parses and validates the stdin config.
///
/// Bad JSON or wrongly typed fields are code 6 (decoding failure), an unsupported
/// `cniVersion` is code 1, and values that decode but make no sense are code 7.
pub fn parse_config(stdin: &[u8]) -> Result<NetConf, CniError> {
    let raw: RawNetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::decoding_failure(format!("cannot decode network configuration: {e}"))
    })?;

    if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice::<Value>(stdin) {
        if let Some((key, value)) = fields
            .iter()
            .find(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
        {
            return Err(CniError::unsupported_field(format!(
                "unsupported field {key:?} = {value} in the interceptor-cni configuration"
            ))
            .with_details(format!("known fields: {}", KNOWN_KEYS.join(", "))));
        }
    }

    if !is_supported_version(&raw.cni_version) {
        return Err(CniError::incompatible_version(format!(
            "cniVersion {:?} is not supported",
            raw.cni_version
        ))
        .with_details(format!(
            "supported versions: {}",
            SUPPORTED_VERSIONS.join(", ")
        )));
    }

    let agent_socket = raw
        .agent_socket
        .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.to_owned());
    if agent_socket.is_empty() {
        return Err(CniError::invalid_network_config("agentSocket is empty"));
    }
    if agent_socket.len() > MAX_SOCKET_PATH_BYTES {
        return Err(CniError::invalid_network_config(format!(
            "agentSocket {agent_socket:?} is longer than {MAX_SOCKET_PATH_BYTES} bytes, \
             the limit for a unix socket path"
        )));
    }

    let timeout_ms = raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if timeout_ms == 0 {
        return Err(CniError::invalid_network_config(
            "timeoutMs must be greater than 0",
        ));
    }

    let failure_policy = match raw.failure_policy.as_deref() {
        None | Some("fail-closed") => FailurePolicy::FailClosed,
        Some("fail-open") => FailurePolicy::FailOpen,
        Some(other) => {
            return Err(CniError::invalid_network_config(format!(
                "failurePolicy {other:?} is not one of \"fail-closed\", \"fail-open\""
            )))
        }
    };

    Ok(NetConf {
        cni_version: raw.cni_version,
        name: raw.name,
        plugin_type: raw.plugin_type,
        prev_result: raw.prev_result,
        agent_socket: PathBuf::from(agent_socket),
        timeout: Duration::from_millis(timeout_ms),
        failure_policy,
    })
}

pub fn is_supported_version(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// Whether `version` is at least `min`; both must be dotted numbers. Unparsable
/// versions compare as too old, which is the safe answer for gating commands.
pub fn version_at_least(version: &str, min: &str) -> bool {
    match (parse_version(version), parse_version(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

fn parse_version(version: &str) -> Option<Vec<u64>> {
    version.split('.').map(|part| part.parse().ok()).collect()
}

/// The best `cniVersion` to put on an error when the config may not have parsed:
/// the config's own if it is one we speak, else ours.
pub fn error_version_hint(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct VersionOnly {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    serde_json::from_slice::<VersionOnly>(stdin)
        .ok()
        .map(|v| v.cni_version)
        .filter(|v| is_supported_version(v))
        .unwrap_or_else(|| PLUGIN_CNI_VERSION.to_owned())
}

/// `prevResult.ips[].address`, in order. A `prevResult` that is not an object, or `ips`
/// entries without a string `address`, are a decoding failure rather than "no IPs":
/// sending the agent a partial list would enroll the pod wrongly.
pub fn prev_result_ips(prev_result: &Value) -> Result<Vec<String>, CniError> {
    let obj = prev_result
        .as_object()
        .ok_or_else(|| CniError::decoding_failure("prevResult is not a JSON object"))?;
    let ips = match obj.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(_) => {
            return Err(CniError::decoding_failure(
                "prevResult.ips is not a JSON array",
            ))
        }
    };
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            ip.get("address")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    CniError::decoding_failure(format!(
                        "prevResult.ips[{i}].address is missing or not a string"
                    ))
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codes;
    use serde_json::json;

    fn parse(v: Value) -> Result<NetConf, CniError> {
        parse_config(v.to_string().as_bytes())
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let conf =
            parse(json!({"cniVersion":"1.0.0","name":"k8s","type":"interceptor-cni"})).unwrap();
        assert_eq!(conf.cni_version, "1.0.0");
        assert_eq!(conf.name, "k8s");
        assert_eq!(conf.plugin_type, "interceptor-cni");
        assert_eq!(conf.prev_result, None);
        assert_eq!(conf.agent_socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        assert_eq!(conf.timeout, Duration::from_millis(5000));
        assert_eq!(conf.failure_policy, FailurePolicy::FailClosed);
    }

    #[test]
    fn our_fields_and_runtime_fields() {
        let conf = parse(json!({
            "cniVersion":"1.1.0","name":"k8s","type":"interceptor-cni",
            "agentSocket":"/run/x.sock","timeoutMs":250,"failurePolicy":"fail-open",
            "runtimeConfig":{"portMappings":[]},"args":{"cni":{}},
            "prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.5/24"}]}
        }))
        .unwrap();
        assert_eq!(conf.agent_socket, PathBuf::from("/run/x.sock"));
        assert_eq!(conf.timeout, Duration::from_millis(250));
        assert_eq!(conf.failure_policy, FailurePolicy::FailOpen);
        assert!(conf.prev_result.is_some());
    }

    #[test]
    fn null_prev_result_is_absent() {
        let conf =
            parse(json!({"cniVersion":"1.1.0","name":"n","type":"t","prevResult":null})).unwrap();
        assert_eq!(conf.prev_result, None);
    }

    #[test]
    fn malformed_json_is_decoding_failure_with_serde_text() {
        let err = parse_config(b"{\"cniVersion\": ").unwrap_err();
        assert_eq!(err.code, codes::DECODING_FAILURE);
        assert!(err.msg.contains("EOF"), "{}", err.msg);

        let err = parse(json!({"cniVersion":"1.1.0","name":"n","type":"t","timeoutMs":"soon"}))
            .unwrap_err();
        assert_eq!(err.code, codes::DECODING_FAILURE);
        assert!(err.msg.contains("invalid type"), "{}", err.msg);

        let err = parse(json!({"cniVersion":"1.1.0","type":"t"})).unwrap_err();
        assert_eq!(err.code, codes::DECODING_FAILURE);
        assert!(err.msg.contains("missing field `name`"), "{}", err.msg);
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let err = parse(json!({"cniVersion":"0.2.0","name":"n","type":"t"})).unwrap_err();
        assert_eq!(err.code, codes::INCOMPATIBLE_VERSION);
        assert!(err.msg.contains("0.2.0"));
        assert!(err.details.contains("1.1.0"));
    }

    #[test]
    fn nonsense_values_are_invalid_config() {
        for bad in [
            json!({"cniVersion":"1.1.0","name":"n","type":"t","failurePolicy":"sometimes"}),
            json!({"cniVersion":"1.1.0","name":"n","type":"t","timeoutMs":0}),
            json!({"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":""}),
            json!({"cniVersion":"1.1.0","name":"n","type":"t","agentSocket":"/".repeat(200)}),
        ] {
            let err = parse(bad.clone()).unwrap_err();
            assert_eq!(err.code, codes::INVALID_NETWORK_CONFIG, "{bad}");
        }
    }

    #[test]
    fn version_ordering() {
        assert!(version_at_least("1.1.0", "1.1.0"));
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(!version_at_least("garbage", "0.4.0"));
    }

    #[test]
    fn error_version_hint_prefers_a_supported_config_version() {
        assert_eq!(error_version_hint(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(error_version_hint(br#"{"cniVersion":"9.9.9"}"#), "1.1.0");
        assert_eq!(error_version_hint(b"not json"), "1.1.0");
    }

    #[test]
    fn ips_from_prev_result() {
        let prev = json!({"ips":[{"address":"10.0.0.5/24","gateway":"10.0.0.1"},
                                 {"address":"fd00::5/64"}]});
        assert_eq!(
            prev_result_ips(&prev).unwrap(),
            vec!["10.0.0.5/24", "fd00::5/64"]
        );
        assert_eq!(prev_result_ips(&json!({})).unwrap(), Vec::<String>::new());
        assert_eq!(
            prev_result_ips(&json!({"ips":[{"gateway":"x"}]}))
                .unwrap_err()
                .code,
            codes::DECODING_FAILURE
        );
        assert_eq!(
            prev_result_ips(&json!([1])).unwrap_err().code,
            codes::DECODING_FAILURE
        );
    }
}

#[cfg(test)]
mod unknown_field_tests {
    use super::*;

    #[test]
    fn a_misspelt_field_is_refused_with_code_2_naming_it() {
        let conf =
            br#"{"cniVersion":"1.0.0","name":"n","type":"interceptor-cni","agentSocet":"/x.sock"}"#;
        let err = parse_config(conf).unwrap_err();
        assert_eq!(err.code, 2);
        assert!(
            err.msg.contains("agentSocet") && err.msg.contains("/x.sock"),
            "{}",
            err.msg
        );
    }

    #[test]
    fn runtime_injected_fields_are_fine() {
        let conf = br#"{"cniVersion":"1.0.0","name":"n","type":"interceptor-cni",
            "runtimeConfig":{"portMappings":[]},"args":{"cni":{}},"capabilities":{}}"#;
        parse_config(conf).unwrap();
    }
}
