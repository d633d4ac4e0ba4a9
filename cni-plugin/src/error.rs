//! The CNI error the plugin reports on stdout, and its JSON form (CNI spec 1.1.0, "Error").

use crate::protocol::codes;

/// A failed CNI call: printed as the spec's error object, then the plugin exits 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    /// CNI error code (see [`codes`]).
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn incompatible_version(msg: impl Into<String>) -> Self {
        Self::new(codes::INCOMPATIBLE_VERSION, msg)
    }

    pub fn invalid_environment(msg: impl Into<String>) -> Self {
        Self::new(codes::INVALID_ENVIRONMENT, msg)
    }

    pub fn decoding_failure(msg: impl Into<String>) -> Self {
        Self::new(codes::DECODING_FAILURE, msg)
    }

    pub fn unsupported_field(msg: impl Into<String>) -> Self {
        Self::new(codes::UNSUPPORTED_FIELD, msg)
    }

    pub fn invalid_network_config(msg: impl Into<String>) -> Self {
        Self::new(codes::INVALID_NETWORK_CONFIG, msg)
    }

    /// The JSON object the spec asks for, tagged with `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields() {
        let err = CniError::new(11, "agent down").with_details("socket /x");
        assert_eq!(
            err.to_json("1.0.0"),
            serde_json::json!({"cniVersion":"1.0.0","code":11,"msg":"agent down","details":"socket /x"})
        );
    }
}
