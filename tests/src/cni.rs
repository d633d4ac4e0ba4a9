//! The CNI side of the testbed: the conflist, and running plugins the way a container
//! runtime does through libcni (config injection, `prevResult` chaining, cached result
//! on DEL, DEL of what was attempted when an ADD fails).

use std::fmt;
use std::process::ExitStatus;

use serde_json::{json, Map, Value};

/// The network name in the conflist.
pub const NETWORK_NAME: &str = "itb";
pub const CNI_VERSION: &str = "1.0.0";
pub const BRIDGE: &str = "itb0";
/// Node a's pod subnet (node `k` has `10.244.<k>.0/24`).
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// Every node's pod subnet: the one route a pod gets (via its node's gateway).
pub const CLUSTER_POD_CIDR: &str = "10.244.0.0/16";
/// The Service (ClusterIP) range. Pods route it to their gateway, as a cluster's default
/// route would: netfilter (iptables mode) rewrites a connect only after routing found a
/// way, while eBPF mode rewrites it before. The nodes themselves have no route for it.
pub const CLUSTER_SERVICE_CIDR: &str = "10.96.0.0/12";
/// Every node's IPv6 pod subnet on dual-stack testbeds (node `k` has
/// `fd00:10:244:<k>::/64`).
pub const CLUSTER_POD_CIDR6: &str = "fd00:10:244::/56";
/// The IPv6 Service range of dual-stack testbeds (kube-apiserver's largest, a /108).
pub const CLUSTER_SERVICE_CIDR6: &str = "fd00:10:96::/108";
/// The agent's probe address (`interceptor_common::NODE_PROBE_SOURCE`): the node's own
/// connections to enrolled pods come from it, and the pod answers through its node, as a
/// pod with a default route would.
pub const NODE_PROBE_ROUTE: &str = "169.254.7.127/32";
pub const IFNAME: &str = "eth0";

/// Variables a runtime sets; cleared from the inherited environment so a stray one in
/// the test's environment cannot leak into a plugin.
pub(crate) const CNI_VARS: &[&str] = &[
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// Settings for the interceptor-cni entry of the chain.
#[derive(Clone, Debug)]
pub(crate) struct InterceptorCni {
    pub agent_socket: String,
    pub failure_policy: String,
}

/// The conflist of the first node: bridge + host-local on [`POD_SUBNET`], then
/// interceptor-cni when enabled.
#[cfg(test)]
pub(crate) fn conflist(ipam_dir: &str, interceptor: Option<&InterceptorCni>) -> Value {
    conflist_with_subnet(ipam_dir, POD_SUBNET, None, interceptor)
}

/// The conflist of a node whose pods get addresses from `subnet`.
/// With `subnet6` (dual-stack), host-local hands out one address of each range (two
/// `ranges`, as a dual-stack cluster's IPAM does) and pods get the IPv6 routes too.
pub(crate) fn conflist_with_subnet(
    ipam_dir: &str,
    subnet: &str,
    subnet6: Option<&str>,
    interceptor: Option<&InterceptorCni>,
) -> Value {
    // Pods reach the other nodes' pod subnets and the node's probe address through their
    // node (the gateway); anything else stays unreachable.
    let mut ipam = json!({
        "type": "host-local",
        "subnet": subnet,
        "dataDir": ipam_dir,
        "routes": [
            {"dst": CLUSTER_POD_CIDR},
            {"dst": CLUSTER_SERVICE_CIDR},
            {"dst": NODE_PROBE_ROUTE},
        ],
    });
    if let Some(subnet6) = subnet6 {
        ipam = json!({
            "type": "host-local",
            "ranges": [[{"subnet": subnet}], [{"subnet": subnet6}]],
            "dataDir": ipam_dir,
            "routes": [
                {"dst": CLUSTER_POD_CIDR}, {"dst": CLUSTER_SERVICE_CIDR}, {"dst": NODE_PROBE_ROUTE},
                {"dst": CLUSTER_POD_CIDR6}, {"dst": CLUSTER_SERVICE_CIDR6},
            ],
        });
    }
    let mut plugins = vec![json!({
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": true,
        "ipMasq": false,
        "ipam": ipam,
    })];
    if let Some(i) = interceptor {
        plugins.push(json!({
            "type": "interceptor-cni",
            "agentSocket": i.agent_socket,
            "failurePolicy": i.failure_policy,
        }));
    }
    json!({"cniVersion": CNI_VERSION, "name": NETWORK_NAME, "plugins": plugins})
}

/// The stdin of plugin `index`: its own object with the list's `cniVersion` and `name`
/// injected, and `prevResult` when given (what libcni's `buildOneConfig` does).
pub(crate) fn plugin_config(list: &Value, index: usize, prev_result: Option<&Value>) -> Value {
    let mut conf: Map<String, Value> = list["plugins"][index]
        .as_object()
        .cloned()
        .unwrap_or_default();
    conf.insert("cniVersion".into(), list["cniVersion"].clone());
    conf.insert("name".into(), list["name"].clone());
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    Value::Object(conf)
}

pub(crate) fn plugin_types(list: &Value) -> Vec<String> {
    list["plugins"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `CNI_ARGS` as kubelet's runtimes pass it.
pub(crate) fn cni_args(namespace: &str, name: &str, container_id: &str) -> String {
    format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};\
         K8S_POD_INFRA_CONTAINER_ID={container_id}"
    )
}

/// What one plugin run produced.
#[derive(Clone, Debug)]
pub struct CniOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// Stdout parsed as JSON (a result, a version answer or an error object).
    pub fn json(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.stdout)?)
    }
}

/// A plugin exited non-zero. `code`, `msg` and `details` come from the error JSON on its
/// stdout; when stdout is not such JSON, `code` is 0 and `msg` says so.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    /// The plugin's `type`.
    pub plugin: String,
    /// ADD, DEL, ...
    pub command: String,
    pub code: u32,
    pub msg: String,
    pub details: String,
    pub stdout: String,
    pub stderr: String,
    /// The process exit code (`None` if killed by a signal).
    pub exit_code: Option<i32>,
}

impl CniError {
    pub(crate) fn from_output(plugin: &str, command: &str, out: &CniOutput) -> CniError {
        let parsed: Option<Value> = serde_json::from_str(&out.stdout).ok();
        let field = |k: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let code = parsed
            .as_ref()
            .and_then(|v| v.get("code"))
            .and_then(Value::as_u64)
            .and_then(|c| u32::try_from(c).ok());
        let (code, msg) = match code {
            Some(code) => (code, field("msg")),
            None => (0, "plugin printed no CNI error object".to_owned()),
        };
        CniError {
            plugin: plugin.to_owned(),
            command: command.to_owned(),
            code,
            msg,
            details: field("details"),
            stdout: out.stdout.clone(),
            stderr: out.stderr.clone(),
            exit_code: out.status.code(),
        }
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CNI {} failed in plugin {} (exit {:?}): code {}: {}",
            self.command, self.plugin, self.exit_code, self.code, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "; stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn conflist_shape() {
        let l = conflist(
            "/s/ipam",
            Some(&InterceptorCni {
                agent_socket: "/s/agent/cni.sock".into(),
                failure_policy: "fail-closed".into(),
            }),
        );
        assert_eq!(
            l,
            json!({"cniVersion":"1.0.0","name":"itb","plugins":[
                {"type":"bridge","bridge":"itb0","isGateway":true,"ipMasq":false,
                 "ipam":{"type":"host-local","subnet":"10.244.0.0/24","dataDir":"/s/ipam",
                         "routes":[{"dst":"10.244.0.0/16"},{"dst":"10.96.0.0/12"},
                                   {"dst":"169.254.7.127/32"}]}},
                {"type":"interceptor-cni","agentSocket":"/s/agent/cni.sock",
                 "failurePolicy":"fail-closed"}]})
        );
        assert_eq!(plugin_types(&l), ["bridge", "interceptor-cni"]);
        assert_eq!(plugin_types(&conflist("/x", None)), ["bridge"]);
    }

    #[test]
    fn plugin_config_injects_list_fields() {
        let l = conflist("/x", None);
        let c = plugin_config(&l, 0, None);
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(c["name"], "itb");
        assert!(c.get("prevResult").is_none());
        let prev = json!({"ips": []});
        assert_eq!(plugin_config(&l, 0, Some(&prev))["prevResult"], prev);
    }

    #[test]
    fn error_from_output() {
        let out = CniOutput {
            status: ExitStatus::from_raw(1 << 8),
            stdout: r#"{"cniVersion":"1.0.0","code":11,"msg":"try again","details":"agent"}"#
                .into(),
            stderr: String::new(),
        };
        let e = CniError::from_output("interceptor-cni", "ADD", &out);
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (11, "try again", "agent")
        );
        assert_eq!(e.exit_code, Some(1));
        let junk = CniOutput {
            stdout: "panic".into(),
            ..out
        };
        assert_eq!(CniError::from_output("x", "ADD", &junk).code, 0);
    }
}
