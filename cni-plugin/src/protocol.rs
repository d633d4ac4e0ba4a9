//! The request/response protocol between `interceptor-cni` and the node agent.
//!
//! One JSON object per line over the agent's unix socket: the plugin writes a
//! [`AgentRequest`] followed by `\n`, the agent answers with one [`AgentResponse`] line
//! and closes. Both sides cap a message at [`MAX_MESSAGE_BYTES`].

use serde::{Deserialize, Serialize};

/// Largest request or response either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// CNI error codes from the CNI specification 1.1.0, section "Error".
pub mod codes {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
}

/// What the plugin asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum AgentRequest {
    /// A new pod sandbox: enroll it if the model says so.
    Add(PodSandbox),
    /// The sandbox is going away: forget it (idempotent).
    Del(PodSandbox),
    /// Is the pod's data path in place?
    Check(PodSandbox),
    /// Is the agent up?
    Status,
}

/// The pod sandbox a CNI call is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSandbox {
    pub container_id: String,
    /// `CNI_NETNS`; may be empty on DEL.
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    /// Pod addresses from `prevResult.ips[].address`, CIDR notation (`10.0.0.5/24`).
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum AgentResponse {
    Ok {
        /// Whether the pod is intercepted (false: the model says it is not enrolled).
        enrolled: bool,
        /// Human-readable detail for logs.
        #[serde(default)]
        detail: String,
    },
    Error {
        /// CNI error code (see [`codes`]).
        code: u32,
        msg: String,
        #[serde(default)]
        details: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged_by_command() {
        let req = AgentRequest::Add(PodSandbox {
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "client".into(),
            ips: vec!["10.0.0.5/24".into()],
        });
        let json = serde_json::to_string(&req).unwrap();
        assert!(
            json.starts_with(r#"{"command":"ADD","containerId":"c1""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<AgentRequest>(&json).unwrap(), req);
        let status: AgentRequest = serde_json::from_str(r#"{"command":"STATUS"}"#).unwrap();
        assert_eq!(status, AgentRequest::Status);
    }

    #[test]
    fn response_wire_format() {
        let err = AgentResponse::Error {
            code: 3,
            msg: "unknown pod".into(),
            details: String::new(),
        };
        let json = serde_json::to_string(&err).unwrap();
        assert_eq!(
            json,
            r#"{"result":"error","code":3,"msg":"unknown pod","details":""}"#
        );
    }
}
