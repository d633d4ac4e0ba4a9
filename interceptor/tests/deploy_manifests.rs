//! Checks the Kubernetes manifests in `deploy/`: each parses into its k8s-openapi type with no
//! unknown fields, the kustomization lists them all, and the DaemonSet, RBAC and ConfigMap
//! say what the agent needs (privileges, host mounts, read-only RBAC, FSM config fields).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const NAMESPACE: &str = "interceptor-system";

/// One object of a deploy file, typed by its `kind`.
#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    Role(Role),
    RoleBinding(RoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kustomization() -> serde_yaml::Value {
    let path = deploy_dir().join("kustomization.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The file names under `resources:` in kustomization.yaml.
fn resources() -> Vec<String> {
    let kustomization = kustomization();
    let list = kustomization["resources"]
        .as_sequence()
        .expect("kustomization.yaml has a resources list");
    list.iter()
        .map(|r| {
            r.as_str()
                .unwrap_or_else(|| panic!("resource entry {r:?} is not a string"))
                .to_owned()
        })
        .collect()
}

/// Deserialize into `T`, and fail when serializing it back loses anything: k8s-openapi
/// ignores unknown fields, so a misspelt `mountPropogation` would otherwise pass silently.
fn typed<T: DeserializeOwned + Serialize>(file: &str, value: &serde_yaml::Value) -> T {
    let object: T = serde_yaml::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", describe(value)));
    let original = serde_json::to_value(value).expect("YAML to JSON");
    let round_trip = serde_json::to_value(&object).expect("typed object to JSON");
    assert_eq!(
        round_trip,
        original,
        "{file}: {} has fields its type does not know (or mistyped values)",
        describe(value)
    );
    object
}

fn describe(value: &serde_yaml::Value) -> String {
    format!(
        "{} {}",
        value["kind"].as_str().unwrap_or("<no kind>"),
        value["metadata"]["name"].as_str().unwrap_or("<no name>")
    )
}

fn parse_object(file: &str, value: &serde_yaml::Value) -> Object {
    match value["kind"].as_str() {
        Some("Namespace") => Object::Namespace(typed(file, value)),
        Some("ServiceAccount") => Object::ServiceAccount(typed(file, value)),
        Some("ClusterRole") => Object::ClusterRole(typed(file, value)),
        Some("ClusterRoleBinding") => Object::ClusterRoleBinding(typed(file, value)),
        Some("Role") => Object::Role(typed(file, value)),
        Some("RoleBinding") => Object::RoleBinding(typed(file, value)),
        Some("ConfigMap") => Object::ConfigMap(typed(file, value)),
        Some("DaemonSet") => Object::DaemonSet(Box::new(typed(file, value))),
        other => panic!("{file}: unexpected kind {other:?}"),
    }
}

/// Every object of every file the kustomization lists, with the file it came from.
fn load_all() -> Vec<(String, Object)> {
    let mut objects = Vec::new();
    for file in resources() {
        let path = deploy_dir().join(&file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut in_file = 0;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            objects.push((file.clone(), parse_object(&file, &value)));
            in_file += 1;
        }
        assert!(in_file > 0, "{file} holds no object");
    }
    objects
}

fn daemonset() -> DaemonSet {
    let mut found: Vec<DaemonSet> = load_all()
        .into_iter()
        .filter_map(|(_, o)| match o {
            Object::DaemonSet(ds) => Some(*ds),
            _ => None,
        })
        .collect();
    assert_eq!(found.len(), 1, "exactly one DaemonSet");
    found.remove(0)
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet has a pod template spec")
}

fn agent_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1, "one container");
    let container = &spec.containers[0];
    assert_eq!(container.name, "agent");
    container
}

fn config_maps() -> Vec<ConfigMap> {
    load_all()
        .into_iter()
        .filter_map(|(_, o)| match o {
            Object::ConfigMap(cm) => Some(cm),
            _ => None,
        })
        .collect()
}

fn config_map(name: &str) -> ConfigMap {
    config_maps()
        .into_iter()
        .find(|cm| cm.metadata.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("ConfigMap {name} is deployed"))
}

/// The value following `flag` in the container's args.
fn arg_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("args {args:?} have {flag}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} has a value"))
}

fn mount<'a>(container: &'a Container, path: &str) -> &'a VolumeMount {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("the agent mounts {path}"))
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("volume {name} exists"))
}

/// The host path behind the mount at `path`.
fn host_path_of(spec: &PodSpec, container: &Container, path: &str) -> String {
    let volume = volume(spec, &mount(container, path).name);
    volume
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("the mount at {path} is a hostPath"))
        .path
        .clone()
}

#[test]
fn every_listed_file_parses_into_its_kind() {
    let objects = load_all();
    let kinds: BTreeSet<&str> = objects
        .iter()
        .map(|(_, o)| match o {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
        })
        .collect();
    let expected: BTreeSet<&str> = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
    ]
    .into();
    assert_eq!(kinds, expected);

    // Namespaced objects say their namespace themselves, so they also apply without -k.
    for (file, object) in &objects {
        let namespace = match object {
            Object::ServiceAccount(o) => &o.metadata.namespace,
            Object::ConfigMap(o) => &o.metadata.namespace,
            Object::DaemonSet(o) => &o.metadata.namespace,
            Object::Role(o) => &o.metadata.namespace,
            Object::RoleBinding(o) => &o.metadata.namespace,
            Object::Namespace(o) => {
                assert_eq!(o.metadata.name.as_deref(), Some(NAMESPACE), "{file}");
                continue;
            }
            Object::ClusterRole(_) | Object::ClusterRoleBinding(_) => continue,
        };
        assert_eq!(namespace.as_deref(), Some(NAMESPACE), "{file}");
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    assert_eq!(kustomization()["namespace"].as_str(), Some(NAMESPACE));
    let listed = resources();
    let unique: BTreeSet<&String> = listed.iter().collect();
    assert_eq!(
        unique.len(),
        listed.len(),
        "duplicate resources: {listed:?}"
    );

    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/ exists") {
        let name = entry.expect("deploy/ entry").file_name();
        let name = name.to_string_lossy().into_owned();
        if (name.ends_with(".yaml") || name.ends_with(".yml")) && name != "kustomization.yaml" {
            on_disk.insert(name);
        }
    }
    let listed: BTreeSet<String> = listed.into_iter().collect();
    let orphans: Vec<&String> = on_disk.difference(&listed).collect();
    assert!(orphans.is_empty(), "not in kustomization.yaml: {orphans:?}");
    let missing: Vec<&String> = listed.difference(&on_disk).collect();
    assert!(missing.is_empty(), "listed but absent: {missing:?}");
}

#[test]
fn daemonset_runs_a_privileged_agent_in_the_host_namespaces() {
    let ds = daemonset();
    assert_eq!(ds.metadata.name.as_deref(), Some("interceptor-node"));
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.host_pid, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("interceptor-node")
    );
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );

    let container = agent_container(spec);
    let privileged = container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged);
    assert_eq!(privileged, Some(true));

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME comes from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
}

#[test]
fn daemonset_args_match_the_agent_cli_and_the_mounts() {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let container = agent_container(spec);
    let args = container.args.as_deref().expect("the agent has args");
    assert_eq!(args.first().map(String::as_str), Some("agent"));
    assert_eq!(arg_value(args, "--cgroup"), "/sys/fs/cgroup");
    assert_eq!(arg_value(args, "--admin-addr"), "127.0.0.1:15000");
    assert_eq!(arg_value(args, "--metrics-addr"), "0.0.0.0:15020");

    // The model comes from the API server, not from a manifests directory.
    assert_eq!(arg_value(args, "--source"), "kube");
    assert!(
        !args.iter().any(|a| a.starts_with("--manifests")),
        "no --manifests in a cluster: {args:?}"
    );

    // A rolling update keeps the pinned data path so enrolled pods fail closed meanwhile;
    // an uninstall (the DaemonSet gone) removes it: the agent asks about its own DaemonSet,
    // in the namespace the downward API gives it.
    assert_eq!(arg_value(args, "--on-exit"), "auto");
    assert_eq!(
        Some(arg_value(args, "--daemonset")),
        ds.metadata.name.as_deref()
    );
    let namespace = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAMESPACE")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .expect("POD_NAMESPACE comes from a fieldRef");
    assert_eq!(namespace.field_path, "metadata.namespace");

    // --install-cni writes into the host's CNI dirs: the flags name the (writable) mounts
    // of exactly those host paths.
    assert!(
        args.iter().any(|a| a == "--install-cni"),
        "args {args:?} have --install-cni"
    );
    for (flag, host) in [
        ("--cni-bin-dir", "/opt/cni/bin"),
        ("--cni-conf-dir", "/etc/cni/net.d"),
    ] {
        let dir = arg_value(args, flag);
        assert_eq!(host_path_of(spec, container, dir), host, "{flag} {dir}");
        assert_ne!(mount(container, dir).read_only, Some(true), "{flag} {dir}");
    }

    // The state dir (pid file, cni.sock) is the host's, so the host's CNI plugin reaches it.
    let state_dir = arg_value(args, "--state-dir");
    assert_eq!(host_path_of(spec, container, state_dir), state_dir);

    // The pins land in the host's bpffs.
    let bpffs = arg_value(args, "--bpffs");
    assert!(
        Path::new(bpffs).starts_with("/sys/fs/bpf"),
        "--bpffs {bpffs} is under the /sys/fs/bpf mount"
    );

    let config = volume(spec, &mount(container, "/etc/interceptor/config").name);
    assert_eq!(
        config.config_map.as_ref().map(|c| c.name.as_str()),
        Some("interceptor-config")
    );
    // The mesh config the agent watches is the ConfigMap's config.yaml key.
    assert_eq!(
        arg_value(args, "--mesh-config"),
        "/etc/interceptor/config/config.yaml"
    );
}

#[test]
fn daemonset_mounts_the_host_paths_the_agent_needs() {
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let container = agent_container(spec);

    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/var/run/netns",
        "/etc/cni/net.d",
        "/opt/cni/bin",
        "/var/run/interceptor",
    ] {
        assert_eq!(host_path_of(spec, container, path), path);
    }
    assert_eq!(
        mount(container, "/sys/fs/bpf").mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_eq!(
        mount(container, "/var/run/netns")
            .mount_propagation
            .as_deref(),
        Some("HostToContainer")
    );
    let proc = mount(container, "/host/proc");
    assert_eq!(proc.read_only, Some(true));
    assert_eq!(host_path_of(spec, container, "/host/proc"), "/proc");

    // Every mount has a volume and every volume is mounted.
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let mounted: BTreeSet<&str> = container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert_eq!(volumes, mounted);
}

#[test]
fn daemonset_probes_judge_this_pods_agent() {
    let ds = daemonset();
    let container = agent_container(pod_spec(&ds));
    let get = container
        .liveness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("liveness probe is an httpGet");
    assert_eq!(get.port, IntOrString::Int(15000));
    assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    assert_eq!(get.path.as_deref(), Some("/healthz"));
    // Readiness reads this container's ready file: during a hand-over the admin port is
    // shared with the other agent, whose /readyz would say nothing about this one.
    let args = container.args.as_deref().expect("args");
    let ready_file = arg_value(args, "--ready-file");
    let command = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("readiness probe is an exec");
    assert_eq!(
        command,
        ["interceptor", "ready", "--ready-file", ready_file],
        "readiness probe"
    );
    assert!(
        container
            .volume_mounts
            .iter()
            .flatten()
            .all(|m| !Path::new(ready_file).starts_with(&m.mount_path)),
        "the ready file {ready_file} must be container-local, not on a shared mount"
    );
}

/// Prometheus scrapes the metrics port through the pod annotations; the port is not a
/// declared containerPort, which hostNetwork would make a host port that blocks the
/// surge pod of a rolling update.
#[test]
fn daemonset_is_scraped_on_the_metrics_port() {
    let ds = daemonset();
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .expect("pod template annotations");
    let args = agent_container(pod_spec(&ds))
        .args
        .as_deref()
        .expect("args");
    let port = arg_value(args, "--metrics-addr")
        .rsplit_once(':')
        .map(|(_, port)| port)
        .expect("--metrics-addr has a port");
    for (key, value) in [
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", port),
        ("prometheus.io/path", "/metrics"),
    ] {
        assert_eq!(
            annotations.get(key).map(String::as_str),
            Some(value),
            "{key}"
        );
    }
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true));
    for container in &spec.containers {
        assert!(
            container.ports.as_ref().is_none_or(Vec::is_empty),
            "container {} declares ports: host ports would stall the surge pod",
            container.name
        );
    }
}

#[test]
fn daemonset_rolls_by_hand_over() {
    let ds = daemonset();
    let strategy = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref())
        .expect("rolling update");
    assert_eq!(strategy.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(strategy.max_unavailable, Some(IntOrString::Int(0)));
    let spec = pod_spec(&ds);
    let args = agent_container(spec).args.as_deref().expect("args");
    let drain = arg_value(args, "--drain-timeout");
    let drain_s: i64 = drain
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("--drain-timeout {drain} in whole seconds"));
    let grace = spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > drain_s,
        "grace period {grace}s must outlast the drain {drain_s}s"
    );
}

#[test]
fn cluster_role_only_reads_the_model_objects_and_covers_every_watch() {
    let roles: Vec<ClusterRole> = load_all()
        .into_iter()
        .filter_map(|(_, o)| match o {
            Object::ClusterRole(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(roles.len(), 1);
    let allowed_verbs: BTreeSet<&str> = ["get", "list", "watch"].into();
    // (API group, resource) of every collection the kube source watches.
    let watched: BTreeSet<(&str, &str)> = [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "gateways"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "tcproutes"),
        ("gateway.networking.k8s.io", "tlsroutes"),
        ("gateway.networking.k8s.io", "udproutes"),
        ("split.smi-spec.io", "trafficsplits"),
        ("access.smi-spec.io", "traffictargets"),
        ("specs.smi-spec.io", "tcproutes"),
        ("policy.flomesh.io", "upstreamtrafficsettings"),
        ("policy.flomesh.io", "egresses"),
        ("policy.flomesh.io", "egressgateways"),
        ("gateway.flomesh.io", "loadbalancerpolicies"),
        ("gateway.flomesh.io", "healthcheckpolicies"),
        // FSM's MeshConfig: one object, by name, in its namespace.
        ("config.flomesh.io", "meshconfigs"),
    ]
    .into();
    let rules = roles[0]
        .rules
        .as_deref()
        .expect("the ClusterRole has rules");
    let mut granted = BTreeSet::new();
    for rule in rules {
        for verb in &rule.verbs {
            assert!(allowed_verbs.contains(verb.as_str()), "verb {verb}");
        }
        assert!(
            ["list", "watch"]
                .iter()
                .all(|v| rule.verbs.iter().any(|r| r == v)),
            "{rule:?}"
        );
        let resources = rule.resources.as_deref().expect("rules name resources");
        for group in rule.api_groups.iter().flatten() {
            for resource in resources {
                let pair = (group.as_str(), resource.as_str());
                assert!(
                    watched.iter().any(|w| *w == pair),
                    "grants {group}/{resource}, which the agent does not read"
                );
                granted.insert((group.clone(), resource.clone()));
            }
        }
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs");
        assert!(rule.resource_names.is_none(), "no resourceNames tricks");
    }
    for (group, resource) in watched {
        assert!(
            granted.contains(&(group.to_owned(), resource.to_owned())),
            "no rule lets the agent watch {group}/{resource}"
        );
    }
}

#[test]
fn cluster_role_binding_binds_the_service_account() {
    let objects = load_all();
    let account = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::ServiceAccount(sa) => Some(sa),
            _ => None,
        })
        .expect("a ServiceAccount");
    let role = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::ClusterRole(r) => Some(r),
            _ => None,
        })
        .expect("a ClusterRole");
    let binding = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::ClusterRoleBinding(b) => Some(b),
            _ => None,
        })
        .expect("a ClusterRoleBinding");

    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding
        .subjects
        .as_deref()
        .expect("the binding has subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));

    let ds = daemonset();
    assert_eq!(
        pod_spec(&ds).service_account_name.as_ref(),
        account.metadata.name.as_ref()
    );
}

#[test]
fn config_map_holds_the_fsm_mesh_config_fields() {
    // The only ConfigMap: the model comes from the API server, not from a mounted one.
    let names: Vec<Option<String>> = config_maps()
        .into_iter()
        .map(|cm| cm.metadata.name)
        .collect();
    assert_eq!(names, [Some("interceptor-config".to_owned())]);

    let cm = config_map("interceptor-config");
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .expect("interceptor-config has config.yaml");
    let config: serde_yaml::Value = serde_yaml::from_str(text).expect("config.yaml is YAML");
    for field in [
        "outboundIPRangeExclusionList",
        "outboundIPRangeInclusionList",
        "outboundPortExclusionList",
        "inboundPortExclusionList",
    ] {
        assert!(
            config[field].is_sequence(),
            "config.yaml has {field} as a list: {config:?}"
        );
    }
    assert_eq!(config["bpfDebug"].as_bool(), Some(false));
}

/// `--on-exit auto` reads the agent's own DaemonSet, and nothing else: a namespaced Role
/// with `get` on that one name, bound to the agent's service account.
#[test]
fn role_lets_the_agent_read_its_own_daemonset_only() {
    let objects = load_all();
    let ds = daemonset();
    let ds_name = ds.metadata.name.clone().expect("DaemonSet name");
    let account = pod_spec(&ds)
        .service_account_name
        .clone()
        .expect("serviceAccountName");
    let role = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::Role(r) => Some(r),
            _ => None,
        })
        .expect("a Role");
    let rules = role.rules.as_deref().expect("the Role has rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].api_groups.as_deref(),
        Some(&["apps".to_owned()][..])
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["daemonsets".to_owned()][..])
    );
    assert_eq!(rules[0].resource_names.as_deref(), Some(&[ds_name][..]));
    assert_eq!(rules[0].verbs, ["get"]);
    let binding = objects
        .iter()
        .find_map(|(_, o)| match o {
            Object::RoleBinding(b) => Some(b),
            _ => None,
        })
        .expect("a RoleBinding");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, account);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}
