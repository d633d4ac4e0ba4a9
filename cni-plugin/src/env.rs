//! The `CNI_*` environment of one plugin call, and `CNI_ARGS` parsing.
//!
//! The environment is captured into a [`CniEnv`] value once so the plugin logic (and its
//! tests) never read or mutate the process environment.

use std::ffi::OsString;

use crate::error::CniError;

/// The names of the CNI variables a runtime sets, in the order of [`CniEnv`]'s fields.
pub const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// The CNI variables of one call. Empty variables count as unset: runtimes pass
/// `CNI_NETNS=` on DEL when the namespace is already gone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub path: Option<String>,
}

impl CniEnv {
    /// Builds the environment from a lookup function (a map in tests, the process
    /// environment in `main`).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            path: get("CNI_PATH"),
        }
    }

    /// Like [`CniEnv::from_lookup`] over raw OS strings; a variable that is not UTF-8 is
    /// an invalid environment rather than something to convert lossily (a mangled netns
    /// path would point somewhere else).
    pub fn from_os_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Result<Self, CniError> {
        for name in CNI_VARS {
            if let Some(value) = lookup(name) {
                if value.to_str().is_none() {
                    return Err(CniError::invalid_environment(format!(
                        "{name} is not valid UTF-8: {value:?}"
                    )));
                }
            }
        }
        Ok(Self::from_lookup(|name| {
            lookup(name).and_then(|v| v.into_string().ok())
        }))
    }

    /// The environment of this process.
    pub fn from_process_env() -> Result<Self, CniError> {
        Self::from_os_lookup(|name| std::env::var_os(name))
    }

    /// `CNI_ARGS`, parsed; unset parses as empty.
    pub fn parsed_args(&self) -> Result<CniArgs, CniError> {
        CniArgs::parse(self.args.as_deref().unwrap_or(""))
    }
}

/// `CNI_ARGS`: `K=V;K=V`, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniArgs {
    pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `K=V;K=V`. A pair without `=` or with an empty key is code 4 naming the
    /// pair. Empty segments (`A=1;;B=2`, a trailing `;`) are skipped: they carry nothing
    /// and some runtimes emit them. The value is everything after the first `=`.
    pub fn parse(args: &str) -> Result<Self, CniError> {
        let mut pairs = Vec::new();
        for pair in args.split(';') {
            if pair.is_empty() {
                continue;
            }
            match pair.split_once('=') {
                Some((key, value)) if !key.is_empty() => {
                    pairs.push((key.to_owned(), value.to_owned()));
                }
                _ => {
                    return Err(CniError::invalid_environment(format!(
                        "CNI_ARGS: invalid pair {pair:?} (expected KEY=VALUE)"
                    )))
                }
            }
        }
        Ok(Self { pairs })
    }

    /// The value of `key`; the last one wins if it repeats.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `K8S_POD_NAMESPACE`, if set and non-empty.
    pub fn pod_namespace(&self) -> Option<&str> {
        self.get("K8S_POD_NAMESPACE").filter(|v| !v.is_empty())
    }

    /// `K8S_POD_NAME`, if set and non-empty.
    pub fn pod_name(&self) -> Option<&str> {
        self.get("K8S_POD_NAME").filter(|v| !v.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::codes;
    use std::collections::HashMap;

    #[test]
    fn env_from_lookup_treats_empty_as_unset() {
        let vars: HashMap<&str, &str> = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", ""),
            ("CNI_IFNAME", "eth0"),
        ]
        .into();
        let env = CniEnv::from_lookup(|k| vars.get(k).map(|v| v.to_string()));
        assert_eq!(env.command.as_deref(), Some("DEL"));
        assert_eq!(env.container_id.as_deref(), Some("abc"));
        assert_eq!(env.netns, None);
        assert_eq!(env.ifname.as_deref(), Some("eth0"));
        assert_eq!(env.args, None);
        assert_eq!(env.path, None);
    }

    #[test]
    fn non_utf8_variable_is_invalid_environment() {
        use std::os::unix::ffi::OsStringExt;
        let err = CniEnv::from_os_lookup(|k| {
            (k == "CNI_NETNS").then(|| OsString::from_vec(vec![b'/', 0xff]))
        })
        .unwrap_err();
        assert_eq!(err.code, codes::INVALID_ENVIRONMENT);
        assert!(err.msg.contains("CNI_NETNS"));
    }

    #[test]
    fn kubelet_args_parse() {
        let args = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=client-7d9;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678",
        )
        .unwrap();
        assert_eq!(args.pod_namespace(), Some("default"));
        assert_eq!(args.pod_name(), Some("client-7d9"));
        assert_eq!(args.get("IgnoreUnknown"), Some("1"));
        assert_eq!(args.get("NOPE"), None);
    }

    #[test]
    fn empty_segments_and_values() {
        let args = CniArgs::parse("K8S_POD_NAME=a;;K8S_POD_NAMESPACE=;X=a=b;").unwrap();
        assert_eq!(args.pod_name(), Some("a"));
        assert_eq!(args.pod_namespace(), None);
        assert_eq!(args.get("X"), Some("a=b"));
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }

    #[test]
    fn malformed_pairs_name_the_pair() {
        for (args, bad) in [
            ("K8S_POD_NAME=a;garbage", "garbage"),
            ("=value", "=value"),
            ("K8S_POD_NAMESPACE", "K8S_POD_NAMESPACE"),
        ] {
            let err = CniArgs::parse(args).unwrap_err();
            assert_eq!(err.code, codes::INVALID_ENVIRONMENT, "{args}");
            assert!(err.msg.contains(&format!("{bad:?}")), "{}", err.msg);
        }
    }
}
