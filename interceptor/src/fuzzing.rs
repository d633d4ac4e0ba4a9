//! The bodies of the `cargo fuzz` targets (fuzz/fuzz_targets/*.rs), one function per target,
//! so the libFuzzer binaries and the stable regression test (tests/fuzz_corpus.rs, which
//! replays fuzz/corpus and fuzz/regressions) run exactly the same code.
//!
//! Each body feeds arbitrary bytes to the repo's real parsers of untrusted input: the CNI
//! plugin's stdin and environment, the agent socket protocol, pod annotations, manifest
//! documents, the mesh configuration and a TLS client's first bytes (the ClientHello that
//! TLS passthrough peeks). Parsers may refuse the input; a panic (or an
//! assertion below about what they return) is the bug the fuzzer looks for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use interceptor_cni::config::{error_version_hint, parse_config, prev_result_ips};
use interceptor_cni::env::{CniArgs, CniEnv, CNI_VARS};
use interceptor_cni::plugin::{self, Command};
use interceptor_cni::protocol::{AgentRequest, AgentResponse};

use crate::config::{
    self, MeshConfig, POD_INBOUND_EXCLUDE_PORTS, POD_OUTBOUND_EXCLUDE_CIDRS,
    POD_OUTBOUND_EXCLUDE_PORTS, POD_OUTBOUND_INCLUDE_CIDRS,
};
use crate::model::{IpFamily, Model, Namespace, Pod, PodKey, ANNOTATION_SIDECAR_INJECTION};
use crate::proxy::routes::{ConnectionSource, GatewayTable, LastValid, RouteTable};
use crate::source::manifests;

/// A target's body: it takes one input of the fuzzer, and panics on a bug.
pub type Body = fn(&[u8]);

/// Every target: its name (the file under fuzz/fuzz_targets and the directory under
/// fuzz/corpus and fuzz/regressions) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("cni_stdin", cni_stdin),
    ("cni_env", cni_env),
    ("agent_protocol", agent_protocol),
    ("annotations", annotations),
    ("manifests", manifests),
    ("mesh_config", mesh_config),
    ("client_hello", client_hello),
];

/// The network configuration on the plugin's stdin, parsed as the plugin does, and a
/// whole GC invocation on it (GC parses the config and never contacts the agent, so it
/// exercises the error reporting path too).
pub fn cni_stdin(data: &[u8]) {
    let hint = error_version_hint(data);
    assert!(
        interceptor_cni::config::is_supported_version(&hint),
        "error_version_hint gave {hint:?}, which the plugin does not speak"
    );
    if let Ok(conf) = parse_config(data) {
        if let Some(prev) = &conf.prev_result {
            let _ = prev_result_ips(prev);
        }
    }

    let env = CniEnv {
        command: Some("GC".into()),
        ..CniEnv::default()
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    plugin::run(&env, &mut &data[..], &mut stdout, &mut stderr);
    // The runtime parses whatever the plugin prints: a result or a CNI error object.
    if !stdout.is_empty() {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&stdout) {
            panic!(
                "the plugin printed something that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&stdout)
            );
        }
    }
}

/// The `CNI_*` environment: the input split at NUL bytes gives the variables' raw values
/// in [`CNI_VARS`] order (the input's NUL-separated fields fill them in turn) (NUL, because no environment value can hold one); missing fields
/// are unset.
pub fn cni_env(data: &[u8]) {
    let fields: Vec<&[u8]> = data.split(|&b| b == 0).collect();
    let value = |name: &str| -> Option<OsString> {
        let i = CNI_VARS.iter().position(|v| *v == name)?;
        fields.get(i).map(|f| OsString::from_vec(f.to_vec()))
    };
    let env = match CniEnv::from_os_lookup(value) {
        Ok(env) => env,
        Err(err) => {
            assert!(
                fields.iter().any(|f| std::str::from_utf8(f).is_err()),
                "an all-UTF-8 environment was refused: {err:?}"
            );
            return;
        }
    };
    for v in [
        &env.command,
        &env.container_id,
        &env.netns,
        &env.ifname,
        &env.args,
        &env.path,
    ] {
        assert!(v.as_deref() != Some(""), "an empty variable counted as set");
    }
    let _ = Command::parse(env.command.as_deref());
    if let Ok(args) = env.parsed_args() {
        check_args(env.args.as_deref().unwrap_or(""), &args);
    }
    // The whole input as one CNI_ARGS value too, so the fuzzer need not find the NULs.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(args) = CniArgs::parse(text) {
            check_args(text, &args);
        }
    }
}

/// What a parsed `CNI_ARGS` must say: every `K=V` pair of the text is found, the last of
/// a repeated key winning.
fn check_args(text: &str, args: &CniArgs) {
    let mut last: HashMap<&str, &str> = HashMap::new();
    for pair in text.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').expect("a pair without '=' parsed");
        last.insert(k, v);
    }
    for (k, v) in last {
        assert_eq!(args.get(k), Some(v), "CNI_ARGS {text:?}: key {k:?}");
    }
    for v in [args.pod_name(), args.pod_namespace()]
        .into_iter()
        .flatten()
    {
        assert!(!v.is_empty());
    }
}

/// One line of the agent socket protocol, read by the agent as a request and by the
/// plugin as a response. What parses must serialize to one line (the protocol's framing)
/// that parses back to the same value.
pub fn agent_protocol(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<AgentRequest>(data) {
        let line = serde_json::to_vec(&request).expect("a request serializes");
        assert!(!line.contains(&b'\n'), "a request line holds a newline");
        let again: AgentRequest = serde_json::from_slice(&line).expect("a request re-parses");
        assert_eq!(again, request);
    }
    if let Ok(response) = serde_json::from_slice::<AgentResponse>(data) {
        let line = serde_json::to_vec(&response).expect("a response serializes");
        assert!(!line.contains(&b'\n'), "a response line holds a newline");
        let again: AgentResponse = serde_json::from_slice(&line).expect("a response re-parses");
        assert_eq!(again, response);
    }
}

/// Annotation keys the input can name by number (`0=...` is the first), so the fuzzer
/// reaches the value parsers without having to spell the keys.
const ANNOTATION_KEYS: [&str; 9] = [
    POD_OUTBOUND_EXCLUDE_CIDRS[0],
    POD_OUTBOUND_EXCLUDE_CIDRS[1],
    POD_OUTBOUND_INCLUDE_CIDRS[0],
    POD_OUTBOUND_INCLUDE_CIDRS[1],
    POD_OUTBOUND_EXCLUDE_PORTS[0],
    POD_OUTBOUND_EXCLUDE_PORTS[1],
    POD_INBOUND_EXCLUDE_PORTS[0],
    POD_INBOUND_EXCLUDE_PORTS[1],
    ANNOTATION_SIDECAR_INJECTION,
];

/// A pod's annotations: one `key=value` per line, where a key that is a number picks from
/// [`ANNOTATION_KEYS`] and any other key is taken as written. They go through the per-pod
/// rules and, on the pod and its namespace, the enrollment decision.
pub fn annotations(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut annotations = BTreeMap::new();
    for line in text.lines() {
        let (key, value) = line.split_once('=').unwrap_or((line, ""));
        let key = match key.parse::<usize>() {
            Ok(n) => ANNOTATION_KEYS[n % ANNOTATION_KEYS.len()].to_owned(),
            Err(_) => key.to_owned(),
        };
        annotations.insert(key, value.to_owned());
    }

    let loaded = config::pod_rules("fuzz/pod", &annotations);
    check_rules(&loaded.config);

    let pod = Pod {
        namespace: "fuzz".into(),
        name: "pod".into(),
        annotations: annotations.clone(),
        ..Pod::default()
    };
    let mut model = Model::default();
    model.namespaces.insert(
        "fuzz".into(),
        Namespace {
            name: "fuzz".into(),
            annotations,
            ..Namespace::default()
        },
    );
    model.pods.insert(pod.key(), pod);
    let key = PodKey::new("fuzz", "pod");
    assert!(
        model.enrollment(&key).is_some(),
        "a known pod has no decision"
    );
}

/// What validated rules always are: CIDRs without host bits, ports other than 0.
fn check_rules(config: &MeshConfig) {
    let nets = config
        .outbound_ip_range_exclusion_list
        .iter()
        .chain(config.outbound_ip_range_inclusion_list.iter().flatten());
    for net in nets {
        assert_eq!(*net, net.trunc(), "a CIDR kept its host bits");
    }
    let ports = config
        .outbound_port_exclusion_list
        .iter()
        .chain(&config.inbound_port_exclusion_list);
    for port in ports {
        assert_ne!(*port, 0, "port 0 was accepted");
    }
}

/// A manifest file, loaded as the manifest source does; what loads is put through what the
/// agent does with a model: enrollment, per-pod rules, endpoints, the route table in both
/// traffic policy modes with a connection from every pod to every service port, the
/// gateways' tables, and the config dump (JSON).
pub fn manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let model = match manifests::load_str(Path::new("fuzz.yaml"), text) {
        Ok(model) => model,
        Err(err) => {
            // The error is shown to the operator; rendering it must not panic either.
            let _ = (err.to_string(), err.location());
            return;
        }
    };
    serde_json::to_string(&model).expect("the model dumps as JSON");

    let no_ips = HashMap::new();
    for (key, pod) in &model.pods {
        assert!(model.enrollment(key).is_some(), "pod {key} has no decision");
        check_rules(&config::pod_rules(&key.to_string(), &pod.annotations).config);
    }
    let mut services = Vec::new();
    for svc in model.services.values() {
        for sp in &svc.ports {
            for family in [IpFamily::V4, IpFamily::V6] {
                let _ = model.endpoints(svc, sp, &no_ips, family);
            }
            for ip in svc.cluster_ips() {
                services.push(SocketAddr::new(ip, sp.port));
            }
        }
    }

    let mut memory = LastValid::default();
    for permissive in [true, false] {
        let table = RouteTable::build(&model, &no_ips, HashSet::new(), permissive, &mut memory);
        for addr in &services {
            let _ = table.resolve(*addr, ConnectionSource::default());
            for key in model.pods.keys() {
                let source = ConnectionSource {
                    pod: Some(key),
                    gateway: None,
                    sni: None,
                };
                let _ = table.resolve(*addr, source);
            }
        }
        let _ = (
            table.statuses(),
            table.service_ports(),
            table.service_routes(),
        );
    }

    let gateways = model.routing.gateways.keys();
    for key in gateways.chain(model.routing.istio_gateways.keys()) {
        let table = GatewayTable::build(&model, key, None, &mut memory);
        for port in table.ports() {
            let _ = table.resolve(
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
                Ipv4Addr::new(10, 0, 0, 1),
            );
        }
        let _ = (table.error(), table.statuses(), table.listener_statuses());
    }
}

/// The mesh configuration file, parsed as the agent does. What parses must dump (as the
/// admin endpoint does) to a file that parses back to the same configuration.
pub fn mesh_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("config.yaml");
    let loaded = match config::parse(path, text) {
        Ok(loaded) => loaded,
        Err(err) => {
            let _ = err.to_string();
            return;
        }
    };
    check_rules(&loaded.config);
    let dump = serde_yaml::to_string(&loaded.config).expect("the config dumps as YAML");
    let again = config::parse(path, &dump)
        .unwrap_or_else(|e| panic!("the dump does not parse: {e}\n{dump}"))
        .config;
    let mut expected = loaded.config;
    // An inclusion list whose every entry was invalid (`Some(empty)`: redirect nothing)
    // dumps as `[]`, like an absent one (`None`: redirect everything): the dump cannot
    // tell the two apart, so that one difference is not a failure here.
    if expected.outbound_ip_range_inclusion_list == Some(Vec::new()) {
        expected.outbound_ip_range_inclusion_list = None;
    }
    assert_eq!(
        again, expected,
        "the dump parses to another config:\n{dump}"
    );
}

/// A TLS client's first bytes, as TLS passthrough peeks them: the parser must never read
/// past them, never ask for fewer bytes than it has, and say the same of every prefix
/// that ends before the hello does (the peek loop relies on both).
pub fn client_hello(data: &[u8]) {
    use crate::proxy::sni::{parse_client_hello, Parsed, MAX_CLIENT_HELLO};
    match parse_client_hello(data) {
        Ok(Parsed::Incomplete { needed }) => {
            assert!(
                needed > data.len(),
                "incomplete, yet needs only {needed} of {}",
                data.len()
            );
            assert!(
                needed <= MAX_CLIENT_HELLO,
                "asks for {needed}, past the bound"
            );
        }
        Ok(Parsed::Hello { sni }) => {
            if let Some(sni) = sni {
                assert!(!sni.is_empty() && sni.len() <= 253, "server name {sni:?}");
                assert_eq!(sni, sni.to_ascii_lowercase(), "not lower-cased");
            }
        }
        Err(error) => {
            let _ = (error.to_string(), error.reason());
        }
    }
}
