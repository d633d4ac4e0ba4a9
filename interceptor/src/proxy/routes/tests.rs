//! The route table from manifests as users write them.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use super::*;
use crate::source::manifests::load_str;

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v1, labels: {app: echo-server, version: v1}}
spec: {containers: [{name: s, image: x, ports: [{containerPort: 9000}]}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, labels: {app: echo-server, version: v2}}
spec: {containers: [{name: s, image: x, ports: [{containerPort: 9000}]}]}
status: {podIP: 10.244.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, labels: {app: echo-server-2}}
spec: {containers: [{name: s, image: x}]}
status: {podIP: 10.244.0.13}
---
apiVersion: v1
kind: Pod
metadata: {name: client, labels: {app: telnet-client}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client-2, labels: {app: telnet-client-2}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-server}
spec:
  clusterIP: 10.96.0.20
  selector: {app: echo-server}
  ports: [{name: tcp, port: 19000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-server-2}
spec:
  clusterIP: 10.96.0.21
  selector: {app: echo-server-2}
  ports: [{name: tcp, port: 19000, targetPort: 9000}]
"#;

const ECHO: SocketAddr = SocketAddr::V4(SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 96, 0, 20),
    19000,
));

fn table(extra: &str) -> RouteTable {
    table_of(&format!("{BASE}---\n{extra}"))
}

/// The mesh's route table (endpoints known, no SMI) of the manifests `text`.
pub(super) fn table_of(text: &str) -> RouteTable {
    let model = load_str(std::path::Path::new("t.yaml"), text).expect("manifests");
    RouteTable::build(
        &model,
        &HashMap::new(),
        HashSet::new(),
        true,
        &mut LastValid::default(),
    )
}

fn from(table: &RouteTable, pod: &str) -> String {
    let key: PodKey = format!("default/{pod}").parse().unwrap();
    match table.resolve(
        ECHO,
        ConnectionSource {
            pod: Some(&key),
            gateway: None,
            sni: None,
        },
    ) {
        Target::Endpoint { pod, .. } => pod,
        other => format!("{other:?}"),
    }
}

fn status<'a>(table: &'a RouteTable, kind: &str) -> &'a RouteStatus {
    table
        .statuses()
        .iter()
        .find(|s| s.kind == kind)
        .expect("status")
}

#[test]
fn without_policy_the_service_round_robins_its_endpoints() {
    let t = table("");
    let picks: HashSet<String> = (0..4).map(|_| from(&t, "client")).collect();
    assert_eq!(
        picks,
        HashSet::from(["default/echo-v1".into(), "default/echo-v2".into()])
    );
}

#[test]
fn source_labels_match_only_the_labelled_client() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo-server.default.svc.cluster.local]
  tcp:
  - match:
    - sourceLabels: {app: telnet-client}
    route:
    - destination: {host: echo-server-2.default.svc.cluster.local}
"#,
    );
    assert_eq!(from(&t, "client"), "default/echo-2");
    assert!(
        from(&t, "client-2").starts_with("default/echo-v"),
        "{}",
        from(&t, "client-2")
    );
    let s = status(&t, "VirtualService");
    assert!(s.accepted, "{s:?}");
    assert_eq!(s.routes, vec!["default/echo-server:19000"]);
}

#[test]
fn matches_are_ored_and_fields_anded_and_the_first_rule_wins() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo-server]
  tcp:
  - match:
    - {port: 19000, sourceNamespace: elsewhere}
    - {port: 19001}
    route: [{destination: {host: echo-server, subset: v1}}]
  - match:
    - {port: 19000, destinationSubnets: [10.96.0.0/16]}
    route: [{destination: {host: echo-server-2}}]
  - route: [{destination: {host: echo-server, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo-server
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    );
    assert_eq!(from(&t, "client"), "default/echo-2");
}

#[test]
fn a_later_match_entry_is_enough_and_unmatched_connections_fall_through() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo-server]
  tcp:
  - match:
    - {sourceNamespace: elsewhere}
    - {sourceLabels: {app: telnet-client}, port: 19000}
    route: [{destination: {host: echo-server-2}}]
  - match:
    - {sourceLabels: {app: telnet-client-2}}
    route: [{destination: {host: echo-server, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo-server
  subsets: [{name: v2, labels: {version: v2}}]
"#,
    );
    assert_eq!(from(&t, "client"), "default/echo-2");
    assert!((0..4).all(|_| from(&t, "client-2") == "default/echo-v2"));
    // No rule matches an unknown source: the Service's own endpoints.
    let picks: HashSet<String> = (0..4)
        .map(|_| match t.resolve(ECHO, ConnectionSource::default()) {
            Target::Endpoint { pod, route, .. } => {
                assert_eq!(route, None);
                pod
            }
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        picks,
        HashSet::from(["default/echo-v1".into(), "default/echo-v2".into()])
    );
}

#[test]
fn a_rule_for_another_port_is_not_judged_on_this_one() {
    // The destination port cannot be inferred for 19000 (two ports, none named), but the
    // rule only matches port 19001: the object is accepted.
    let t = table(
        r#"apiVersion: v1
kind: Service
metadata: {name: two-ports}
spec:
  clusterIP: 10.96.0.30
  selector: {app: echo-server}
  ports: [{name: a, port: 19000, targetPort: 9000}, {name: b, port: 19001, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: other-two}
spec:
  clusterIP: 10.96.0.31
  selector: {app: echo-server}
  ports: [{name: a, port: 1, targetPort: 9000}, {name: b, port: 19001, targetPort: 9000}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: only-19001}
spec:
  hosts: [two-ports]
  tcp:
  - match: [{port: 19001}]
    route: [{destination: {host: other-two}}]
"#,
    );
    let s = t
        .statuses()
        .iter()
        .find(|s| s.name == "default/only-19001")
        .unwrap();
    assert!(s.accepted && s.reasons.is_empty(), "{s:?}");
}

#[test]
fn routes_and_targets_cannot_reach_into_other_namespaces() {
    let t = table(
        r#"apiVersion: v1
kind: Namespace
metadata: {name: evil}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: hijack, namespace: evil}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-server, namespace: default}]
  rules: [{backendRefs: [{name: echo-server-2, port: 19000}]}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: hijack, namespace: evil}
spec:
  service: echo-server.default
  backends: [{service: echo-server-2.default, weight: 1}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: grant, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: default, namespace: default}
  rules: [{kind: HTTPRouteGroup, name: any}]
  sources: [{kind: ServiceAccount, name: default, namespace: evil}]
"#,
    );
    assert_eq!(t.statuses().len(), 3);
    for s in t.statuses() {
        assert!(!s.accepted, "{s:?}");
        assert!(s.reasons.iter().any(|r| r.contains("namespace")), "{s:?}");
    }
    assert!(from(&t, "client").starts_with("default/echo-v"));
}

#[test]
fn subsets_and_weights_split_as_istio_says() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: [echo-server]
  tcp:
  - match: [{port: 19000}]
    route:
    - destination: {host: echo-server, port: {number: 19000}, subset: v1}
      weight: 80
    - destination: {host: echo-server, port: {number: 19000}, subset: v2}
      weight: 20
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: tcp-echo-destination}
spec:
  host: echo-server
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#,
    );
    let picks: Vec<String> = (0..1000).map(|_| from(&t, "client")).collect();
    assert_eq!(
        picks.iter().filter(|p| *p == "default/echo-v1").count(),
        800
    );
    assert_eq!(
        picks.iter().filter(|p| *p == "default/echo-v2").count(),
        200
    );
    // The metric series of these backends are kept; a name the table lacks is not.
    let backends: Vec<String> = match t.resolve(ECHO, ConnectionSource::default()) {
        Target::Endpoint {
            service, backend, ..
        } => vec![service, backend],
        other => panic!("{other:?}"),
    };
    for name in &backends {
        assert!(t.names_backend(name), "{name}");
    }
    assert!(t.names_backend(&format!("{} subset v2", backends[0])));
    assert!(!t.names_backend("default/gone:80"));
}

#[test]
fn a_missing_subset_or_service_rejects_the_object_and_others_keep_working() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: broken}
spec:
  hosts: [echo-server]
  tcp:
  - route: [{destination: {host: echo-server, subset: nope}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: to-nowhere}
spec:
  hosts: [echo-server-2]
  tcp:
  - route: [{destination: {host: ghost}}]
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: split}
spec:
  service: echo-server-2
  backends: [{service: echo-server, weight: 1}]
"#,
    );
    let broken = t
        .statuses()
        .iter()
        .find(|s| s.name == "default/broken")
        .unwrap();
    assert!(!broken.accepted);
    assert!(
        broken.reasons[0].contains("no DestinationRule"),
        "{broken:?}"
    );
    let nowhere = t
        .statuses()
        .iter()
        .find(|s| s.name == "default/to-nowhere")
        .unwrap();
    assert!(
        nowhere.reasons[0].contains("Service default/ghost does not exist"),
        "{nowhere:?}"
    );
    // The broken VirtualService left echo-server on its default routing...
    assert!(from(&t, "client").starts_with("default/echo-v"));
    // ...and the rejected one on echo-server-2 left room for the TrafficSplit.
    let echo2 = SocketAddr::V4(SocketAddrV4::new(
        std::net::Ipv4Addr::new(10, 96, 0, 21),
        19000,
    ));
    match t.resolve(echo2, ConnectionSource::default()) {
        Target::Endpoint { route, pod, .. } => {
            assert_eq!(route.as_deref(), Some("TrafficSplit default/split"));
            assert!(pod.starts_with("default/echo-v"), "{pod}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn zero_weights_everywhere_refuse_the_connection() {
    let t = table(
        r#"apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: split}
spec:
  service: echo-server
  backends: [{service: echo-server, weight: 0}, {service: echo-server-2, weight: 0}]
"#,
    );
    assert!(matches!(
        t.resolve(ECHO, ConnectionSource::default()),
        Target::Refused { .. }
    ));
}

#[test]
fn a_virtual_service_wins_over_a_tcp_route_and_the_older_tcp_route_wins() {
    let t = table(
        r#"apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: older}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-server-2, port: 19000}]
  rules: [{backendRefs: [{name: echo-server, port: 19000}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: newer}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-server-2}]
  rules: [{backendRefs: [{name: echo-server-2, port: 19000}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: loses-to-vs}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-server}]
  rules: [{backendRefs: [{name: echo-server-2, port: 19000}]}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo-server]
  tcp: [{route: [{destination: {host: echo-server}}]}]
"#,
    );
    let by_name = |n: &str| t.statuses().iter().find(|s| s.name == n).unwrap().clone();
    assert!(by_name("default/older").accepted);
    let newer = by_name("default/newer");
    assert!(!newer.accepted);
    assert!(
        newer.reasons[0].contains("TCPRoute default/older"),
        "{newer:?}"
    );
    let loser = by_name("default/loses-to-vs");
    assert!(
        loser.reasons[0].contains("VirtualService default/echo"),
        "{loser:?}"
    );
    let echo2 = SocketAddr::V4(SocketAddrV4::new(
        std::net::Ipv4Addr::new(10, 96, 0, 21),
        19000,
    ));
    match t.resolve(echo2, ConnectionSource::default()) {
        Target::Endpoint { route, .. } => {
            assert_eq!(route.as_deref(), Some("TCPRoute default/older"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_values_are_reasons_not_load_errors() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: bad}
spec:
  hosts: [echo-server]
  tcp:
  - match: [{destinationSubnets: [banana]}, {port: 70000}]
    route: [{destination: {host: echo-server-2}, weight: -5}]
"#,
    );
    let s = status(&t, "VirtualService");
    assert!(!s.accepted);
    assert!(
        s.reasons[0].contains("\"banana\" is not an IP address or CIDR"),
        "{s:?}"
    );
}

#[test]
fn gateway_bound_objects_stay_out_of_the_mesh() {
    let t = table(
        r#"apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: tcp-echo}
spec:
  hosts: ["*"]
  gateways: [tcp-echo-gateway]
  tcp: [{match: [{port: 31400}], route: [{destination: {host: echo-server, port: {number: 19000}}}]}]
"#,
    );
    let s = status(&t, "VirtualService");
    assert!(
        s.routes.is_empty() && s.reasons[0].contains("bound to gateways"),
        "{s:?}"
    );
    assert!(from(&t, "client").starts_with("default/echo-v"));
}

const SMI: &str = r#"apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: echo-port}
spec: {matches: {ports: [9000]}}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-echo, namespace: default}
spec:
  destination: {kind: ServiceAccount, name: default, namespace: default}
  rules: [{kind: TCPRoute, name: echo-port}]
  sources: [{kind: ServiceAccount, name: telnet-client, namespace: default}]
"#;

fn smi_table(extra: &str, permissive: bool) -> RouteTable {
    let text = format!("{BASE}---\n{extra}")
        .replace(
            "metadata: {name: client, labels: {app: telnet-client}}\nspec: {containers: [{name: c, image: x}]}",
            "metadata: {name: client, labels: {app: telnet-client}}\n\
             spec: {serviceAccountName: telnet-client, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.31}",
        )
        .replace(
            "metadata: {name: client-2, labels: {app: telnet-client-2}}\nspec: {containers: [{name: c, image: x}]}",
            "metadata: {name: client-2, labels: {app: telnet-client-2}}\n\
             spec: {containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.32}",
        );
    let model = load_str(std::path::Path::new("t.yaml"), &text).expect("manifests");
    RouteTable::build(
        &model,
        &HashMap::new(),
        HashSet::new(),
        permissive,
        &mut LastValid::default(),
    )
}

#[test]
fn smi_mode_allows_only_what_a_traffic_target_grants() {
    let t = smi_table(SMI, false);
    assert!(
        from(&t, "client").starts_with("default/echo-v"),
        "{}",
        from(&t, "client")
    );
    let denied = from(&t, "client-2");
    assert!(
        denied.contains("Refused")
            && denied.contains("no TrafficTarget lets ServiceAccount default/default"),
        "{denied}"
    );
    // Inbound: the same rule from the server's side, by the client's address.
    let echo: PodKey = "default/echo-v1".parse().unwrap();
    let ip = |last| IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 0, last));
    assert_eq!(t.admit_inbound(ip(31), &echo, 9000), Ok(Admission::Granted));
    assert!(t
        .admit_inbound(ip(31), &echo, 9001)
        .unwrap_err()
        .contains("on port 9001"));
    assert!(t
        .admit_inbound(ip(32), &echo, 9000)
        .unwrap_err()
        .contains("ServiceAccount default/default reach"));
    assert!(t
        .admit_inbound(ip(99), &echo, 9000)
        .unwrap_err()
        .contains("not a mesh workload"));
    let status = t
        .statuses()
        .iter()
        .find(|s| s.kind == "TrafficTarget")
        .unwrap();
    assert!(status.accepted, "{status:?}");
    assert_eq!(
        status.routes,
        vec!["ServiceAccount default/telnet-client -> ServiceAccount default/default"]
    );
}

/// The node's probe address is let in on any port in both modes, and only it: its
/// neighbours (another link-local address, the node's bridge address) are not.
#[test]
fn only_the_node_probe_address_is_admitted_without_a_grant() {
    let echo: PodKey = "default/echo-v1".parse().unwrap();
    let probe = IpAddr::V4(interceptor_common::NODE_PROBE_SOURCE);
    for permissive in [false, true] {
        let t = smi_table(SMI, permissive);
        for port in [9000, 9001, 8080] {
            assert_eq!(
                t.admit_inbound(probe, &echo, port),
                Ok(Admission::NodeProbe)
            );
        }
    }
    let t = smi_table(SMI, false);
    for other in [
        std::net::Ipv4Addr::new(169, 254, 7, 126),
        std::net::Ipv4Addr::new(169, 254, 7, 128),
        std::net::Ipv4Addr::new(10, 244, 0, 1),
    ] {
        assert!(
            t.admit_inbound(other.into(), &echo, 9000)
                .unwrap_err()
                .contains("not a mesh workload"),
            "{other}"
        );
    }
}

/// IPv6 clients: a pod is known by its IPv6 address too (`status.podIPs`), so SMI mode
/// grants and refuses IPv6 clients as it does IPv4 ones; an unknown IPv6 address, and the
/// node's IPv4 probe address mapped into IPv6, are not mesh workloads.
#[test]
fn ipv6_clients_are_known_by_their_pods_ipv6_address() {
    let dual = SMI.to_owned()
        + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: client-6}\n\
           spec: {serviceAccountName: telnet-client, containers: [{name: c, image: x}]}\n\
           status: {podIPs: [{ip: 10.244.0.41}, {ip: 'fd00:10:244::41'}]}\n---\n\
           apiVersion: v1\nkind: Pod\nmetadata: {name: client-6b}\n\
           spec: {containers: [{name: c, image: x}]}\n\
           status: {podIPs: [{ip: 10.244.0.42}, {ip: 'fd00:10:244::42'}]}\n";
    let echo: PodKey = "default/echo-v1".parse().unwrap();
    let t = smi_table(&dual, false);
    let ip6 = |s: &str| IpAddr::V6(s.parse().unwrap());
    assert_eq!(
        t.admit_inbound(ip6("fd00:10:244::41"), &echo, 9000),
        Ok(Admission::Granted)
    );
    assert!(t
        .admit_inbound(ip6("fd00:10:244::42"), &echo, 9000)
        .unwrap_err()
        .contains("no TrafficTarget lets ServiceAccount default/default"));
    let unknown = [
        ip6("fd00:10:244::5"),
        ip6("fe80::1"),
        IpAddr::V6(interceptor_common::NODE_PROBE_SOURCE.to_ipv6_mapped()),
    ];
    for client in unknown {
        assert!(
            t.admit_inbound(client, &echo, 9000)
                .unwrap_err()
                .contains("not a mesh workload"),
            "{client}"
        );
    }
    let t = smi_table(&dual, true);
    for client in unknown {
        assert_eq!(t.admit_inbound(client, &echo, 9000), Ok(Admission::Granted));
    }
}

#[test]
fn permissive_mode_ignores_traffic_targets_and_says_so() {
    let t = smi_table(SMI, true);
    assert!(from(&t, "client-2").starts_with("default/echo-v"));
    let status = t
        .statuses()
        .iter()
        .find(|s| s.kind == "TrafficTarget")
        .unwrap();
    assert!(
        status.reasons.iter().any(|r| r.contains("not enforced")),
        "{status:?}"
    );
}

#[test]
fn a_traffic_target_naming_a_missing_route_grants_nothing() {
    let t = smi_table(&SMI.replace("name: echo-port}]", "name: ghost}]"), false);
    let status = t
        .statuses()
        .iter()
        .find(|s| s.kind == "TrafficTarget")
        .unwrap();
    assert!(!status.accepted);
    assert!(
        status.reasons[0].contains("TCPRoute default/ghost (specs.smi-spec.io) does not exist"),
        "{status:?}"
    );
    assert!(from(&t, "client").contains("Refused"));
}

/// The status of the settings object `name`.
fn settings_status<'t>(table: &'t RouteTable, kind: &str, name: &str) -> &'t RouteStatus {
    table
        .statuses()
        .iter()
        .find(|s| s.kind == kind && s.name == name)
        .unwrap_or_else(|| panic!("no status of {kind} {name}: {:?}", table.statuses()))
}

fn echo_settings(table: &RouteTable) -> Arc<UpstreamSettings> {
    let addr: SocketAddr = "10.244.0.11:9000".parse().unwrap();
    Arc::clone(
        table
            .endpoint_settings(&addr)
            .expect("echo-v1 serves echo-server"),
    )
}

const UTS: &str = r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: UpstreamTrafficSetting
metadata: {name: echo-limits, namespace: default}
spec:
  host: echo-server.default.svc.cluster.local
  connectionSettings:
    tcp: {maxConnections: 50, connectTimeout: 250ms}
  rateLimit:
    local:
      tcp: {connections: 10, unit: second, burst: 5}
"#;

#[test]
fn an_upstream_traffic_setting_applies_to_every_port_of_its_host() {
    let table = table(UTS);
    let settings = echo_settings(&table);
    assert_eq!(settings.host, "default/echo-server");
    assert_eq!(settings.max_connections, Some(50));
    assert_eq!(
        settings.connect_timeout,
        std::time::Duration::from_millis(250)
    );
    let limit = settings.rate_limit.expect("rate limit");
    assert_eq!((limit.connections, limit.burst), (10, 5));
    assert_eq!(limit.capacity(), 15.0);
    let status = settings_status(&table, "UpstreamTrafficSetting", "default/echo-limits");
    assert!(status.accepted, "{status:?}");
    assert_eq!(status.routes, ["default/echo-server:19000"]);
    // The other Service keeps the defaults.
    let other: SocketAddr = "10.244.0.13:9000".parse().unwrap();
    assert_eq!(
        table.endpoint_settings(&other).unwrap().max_connections,
        None
    );
}

#[test]
fn an_invalid_setting_is_rejected_with_reasons_and_the_previous_valid_one_stays() {
    let mut memory = LastValid::default();
    let build = |extra: &str, memory: &mut LastValid| {
        let text = format!("{BASE}---\n{extra}");
        let model = load_str(std::path::Path::new("t.yaml"), &text).expect("manifests");
        RouteTable::build(&model, &HashMap::new(), HashSet::new(), true, memory)
    };
    let valid = build(UTS, &mut memory);
    assert_eq!(echo_settings(&valid).max_connections, Some(50));
    for (change, reason) in [
        (
            "maxConnections: 50",
            "maxConnections must be at least 1, got 0",
        ),
        (
            "maxConnections: 50",
            "maxConnections must be at least 1, got -3",
        ),
        (
            "unit: second",
            "unit \"fortnight\" is not one of second, minute, hour",
        ),
        (
            "connections: 10",
            "rateLimit.local.tcp.connections must be at least 1, got 0",
        ),
        (
            "host: echo-server.default.svc.cluster.local",
            "outside the object's namespace default",
        ),
        ("connectTimeout: 250ms", "connectTimeout \"soon\""),
    ] {
        let replacement = match reason {
            r if r.contains("got 0") && change.starts_with("max") => "maxConnections: 0",
            r if r.contains("got -3") => "maxConnections: -3",
            r if r.contains("fortnight") => "unit: fortnight",
            r if r.contains("connections must") => "connections: 0",
            r if r.contains("outside") => "host: echo-server.other.svc.cluster.local",
            _ => "connectTimeout: soon",
        };
        let invalid = build(&UTS.replace(change, replacement), &mut memory);
        let status = settings_status(&invalid, "UpstreamTrafficSetting", "default/echo-limits");
        assert!(
            status.reasons.iter().any(|r| r.contains(reason)),
            "{replacement}: {status:?}"
        );
        assert!(
            status
                .reasons
                .iter()
                .any(|r| r.contains("previous valid version stays")),
            "{status:?}"
        );
        let settings = echo_settings(&invalid);
        assert_eq!(settings.max_connections, Some(50), "{replacement}");
        assert_eq!(
            settings.rate_limit.unwrap().connections,
            10,
            "{replacement}"
        );
    }
    // Without a valid version to fall back to, an invalid object sets nothing.
    let fresh = build(
        &UTS.replace("maxConnections: 50", "maxConnections: 0"),
        &mut LastValid::default(),
    );
    assert_eq!(echo_settings(&fresh).max_connections, None);
    assert!(!settings_status(&fresh, "UpstreamTrafficSetting", "default/echo-limits").accepted);
}

#[test]
fn load_balancer_and_health_check_policies_set_their_ports() {
    let table = table(
        r#"
apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata: {name: lb-policy-sample, namespace: default}
spec:
  targetRef: {group: "", kind: Service, name: echo-server, namespace: default}
  ports:
    - port: 19000
      type: LeastConnectionLoadBalancer
---
apiVersion: gateway.flomesh.io/v1alpha1
kind: HealthCheckPolicy
metadata: {name: health-check-policy-sample, namespace: default}
spec:
  targetRef: {group: "", kind: Service, name: echo-server, namespace: default}
  ports:
  - port: 19000
    config: {interval: 10, maxFails: 3, failTimeout: 1}
---
apiVersion: gateway.flomesh.io/v1alpha1
kind: LoadBalancerPolicy
metadata: {name: bad-type, namespace: default}
spec:
  targetRef: {group: "", kind: Service, name: echo-server-2}
  ports: [{port: 19000, type: RandomLoadBalancer}]
---
apiVersion: gateway.flomesh.io/v1alpha1
kind: HealthCheckPolicy
metadata: {name: http-check, namespace: default}
spec:
  targetRef: {group: "", kind: Service, name: echo-server-2}
  ports:
  - port: 19000
    config: {interval: 10, maxFails: 3, path: /healthz, matches: [{statusCodes: [200]}]}
"#,
    );
    let settings = echo_settings(&table);
    assert_eq!(settings.balancer, Balancer::LeastConnections);
    assert_eq!(settings.health.max_fails, 3);
    assert_eq!(
        settings.health.fail_timeout,
        std::time::Duration::from_secs(1)
    );
    assert_eq!(
        settings.health.interval,
        Some(std::time::Duration::from_secs(10))
    );
    assert_eq!(table.checked_endpoints().len(), 2, "echo-v1 and echo-v2");
    let bad = settings_status(&table, "LoadBalancerPolicy", "default/bad-type");
    assert!(!bad.accepted);
    assert!(
        bad.reasons[0].contains("\"RandomLoadBalancer\" is not one of"),
        "{bad:?}"
    );
    let http = settings_status(&table, "HealthCheckPolicy", "default/http-check");
    assert!(!http.accepted);
    assert!(
        http.reasons[0].contains("HTTP checks (path, matches) are not supported"),
        "{http:?}"
    );
    let other: SocketAddr = "10.244.0.13:9000".parse().unwrap();
    let other = table.endpoint_settings(&other).unwrap();
    assert_eq!(other.balancer, Balancer::RoundRobin);
    assert_eq!(other.health.interval, None);
}

/// Endpoints `10.244.1.{1..=n}:9000` of one backend with `balancer`.
fn backend(n: u8, balancer: Balancer) -> Backend {
    let endpoints = (1..=n)
        .map(|i| Endpoint {
            pod: format!("default/echo-{i}").parse().unwrap(),
            addr: SocketAddr::from(([10, 244, 1, i], 9000)),
        })
        .collect();
    let settings = UpstreamSettings {
        balancer,
        ..UpstreamSettings::default_for("default/echo".into())
    };
    Backend::new("default/echo:80".into(), endpoints, Arc::new(settings))
}

#[test]
fn least_connections_fills_the_idle_endpoint_and_round_robins_between_equals() {
    use crate::proxy::upstream::{UpstreamMetrics, Upstreams};
    let upstreams = Arc::new(Upstreams::new(UpstreamMetrics::default()));
    let backend = backend(2, Balancer::LeastConnections);
    let pick = Pick {
        health: Some(upstreams.as_ref()),
        ..Pick::default()
    };
    let a = backend.endpoints[0].addr;
    let b = backend.endpoints[1].addr;
    // Three open on a: the next three go to b, then they alternate.
    let held: Vec<_> = (0..3)
        .map(|_| upstreams.connected(a, "default/echo"))
        .collect();
    let mut chosen = Vec::new();
    let mut on_b = 0;
    for _ in 0..5 {
        let addr = backend.pick(&pick).unwrap().addr;
        on_b += usize::from(addr == b);
        chosen.push(upstreams.connected(addr, "default/echo"));
    }
    assert_eq!(
        on_b, 4,
        "b gets 3 to catch up, then one of the two equal picks"
    );
    drop(held);
    // a now has 1 open, b 4: the next three all go to a.
    for _ in 0..3 {
        assert_eq!(backend.pick(&pick).unwrap().addr, a);
        chosen.push(upstreams.connected(a, "default/echo"));
    }
}

#[test]
fn source_ip_hashing_keeps_each_client_and_moves_only_a_removed_endpoints_clients() {
    let three = backend(3, Balancer::SourceIpHash);
    let clients: Vec<IpAddr> = (1..=200).map(|i| IpAddr::from([10, 244, 7, i])).collect();
    let pick = |backend: &Backend, client| {
        let pick = Pick {
            client: Some(client),
            ..Pick::default()
        };
        backend.pick(&pick).unwrap().addr
    };
    let first: Vec<_> = clients.iter().map(|c| pick(&three, *c)).collect();
    for (c, addr) in clients.iter().zip(&first) {
        for _ in 0..5 {
            assert_eq!(pick(&three, *c), *addr, "client {c} moved");
        }
    }
    // Every endpoint gets a fair share of 200 clients (expected 66.7 each).
    for e in &three.endpoints {
        let n = first.iter().filter(|a| **a == e.addr).count();
        assert!((40..=95).contains(&n), "{} has {n} of 200 clients", e.addr);
    }
    // Without endpoint 3, only its clients move.
    let two = backend(2, Balancer::SourceIpHash);
    let removed = three.endpoints[2].addr;
    for (c, addr) in clients.iter().zip(&first) {
        if *addr != removed {
            assert_eq!(pick(&two, *c), *addr, "client {c} moved needlessly");
        }
    }
}

#[test]
fn an_ejected_endpoint_is_skipped_unless_every_endpoint_is_ejected() {
    use crate::proxy::upstream::{UpstreamMetrics, Upstreams};
    let upstreams = Arc::new(Upstreams::new(UpstreamMetrics::default()));
    let backend = backend(2, Balancer::RoundRobin);
    let (a, b) = (backend.endpoints[0].addr, backend.endpoints[1].addr);
    let pick = Pick {
        health: Some(upstreams.as_ref()),
        ..Pick::default()
    };
    let now = Instant::now();
    for _ in 0..DEFAULT_MAX_FAILS_FOR_TESTS {
        upstreams.failed(b, &backend.settings, now);
    }
    for _ in 0..10 {
        assert_eq!(backend.pick(&pick).unwrap().addr, a);
    }
    // Avoiding a (a retry) leaves only the ejected b: better it than nothing.
    let retry = Pick {
        avoid: Some(a),
        ..pick
    };
    assert_eq!(backend.pick(&retry).unwrap().addr, b);
    for _ in 0..DEFAULT_MAX_FAILS_FOR_TESTS {
        upstreams.failed(a, &backend.settings, now);
    }
    let both: HashSet<_> = (0..10).map(|_| backend.pick(&pick).unwrap().addr).collect();
    assert_eq!(both.len(), 2, "all ejected: round-robin over all");
}

const DEFAULT_MAX_FAILS_FOR_TESTS: u32 = settings::DEFAULT_MAX_FAILS;

/// Two dual-stack echo services: `echo-server` (v1, v2 behind it) and `echo-server-2`.
const DUAL: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: echo-v1, labels: {app: echo-server, version: v1}}
spec: {containers: [{name: s, image: x}]}
status: {podIPs: [{ip: 10.244.0.11}, {ip: 'fd00:10:244::11'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-v2, labels: {app: echo-server, version: v2}}
spec: {containers: [{name: s, image: x}]}
status: {podIPs: [{ip: 10.244.0.12}, {ip: 'fd00:10:244::12'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, labels: {app: echo-server-2}}
spec: {containers: [{name: s, image: x}]}
status: {podIPs: [{ip: 10.244.0.13}, {ip: 'fd00:10:244::13'}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-server}
spec:
  clusterIPs: [10.96.0.20, 'fd00:96::20']
  ipFamilies: [IPv4, IPv6]
  selector: {app: echo-server}
  ports: [{name: tcp, port: 19000, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-server-2}
spec:
  clusterIPs: ['fd00:96::21']
  ipFamilies: [IPv6]
  selector: {app: echo-server-2}
  ports: [{name: tcp, port: 19000, targetPort: 9000}]
"#;

fn dual_table(extra: &str, pod_ips: &[(&str, &str)]) -> RouteTable {
    let model = load_str(
        std::path::Path::new("t.yaml"),
        &format!("{DUAL}---\n{extra}"),
    )
    .expect("manifests");
    let pod_ips = pod_ips
        .iter()
        .map(|(pod, ip)| {
            let addrs = PodAddrs {
                v4: None,
                v6: Some(ip.parse().unwrap()),
            };
            (PodKey::new("default", *pod), addrs)
        })
        .collect();
    RouteTable::build(
        &model,
        &pod_ips,
        HashSet::new(),
        true,
        &mut LastValid::default(),
    )
}

fn endpoint_addr(target: Target) -> String {
    match target {
        Target::Endpoint { addr, .. } => addr.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn an_ipv6_cluster_ip_routes_to_ipv6_endpoints_with_the_same_policies() {
    let echo6: SocketAddr = "[fd00:96::20]:19000".parse().unwrap();
    let t = dual_table("", &[]);
    let picks: HashSet<String> = (0..4)
        .map(|_| endpoint_addr(t.resolve(echo6, ConnectionSource::default())))
        .collect();
    assert_eq!(
        picks,
        HashSet::from([
            "[fd00:10:244::11]:9000".to_string(),
            "[fd00:10:244::12]:9000".to_string()
        ])
    );
    // The IPv4 VIP of the same Service keeps IPv4 endpoints.
    let v4 = endpoint_addr(t.resolve(ECHO, ConnectionSource::default()));
    assert!(v4.starts_with("10.244.0.1"), "{v4}");
    // What the CNI plugin reported wins over status.podIPs.
    let t = dual_table(
        "",
        &[
            ("echo-v1", "fd00:10:244::99"),
            ("echo-v2", "fd00:10:244::98"),
        ],
    );
    let picks: HashSet<String> = (0..4)
        .map(|_| endpoint_addr(t.resolve(echo6, ConnectionSource::default())))
        .collect();
    assert!(
        picks.iter().all(|p| p.starts_with("[fd00:10:244::9")),
        "{picks:?}"
    );

    // A TrafficSplit applies to both VIPs, each to the backends' endpoints of its family.
    let t = dual_table(
        r#"apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: split}
spec:
  service: echo-server
  backends: [{service: echo-server, weight: 0}, {service: echo-server-2, weight: 100}]
"#,
        &[],
    );
    for _ in 0..4 {
        assert_eq!(
            endpoint_addr(t.resolve(echo6, ConnectionSource::default())),
            "[fd00:10:244::13]:9000"
        );
    }
    // The IPv4 VIP splits the same way, to the backend's IPv4 endpoints (without
    // slices, the selected pods' addresses of the VIP's family).
    assert_eq!(
        endpoint_addr(t.resolve(ECHO, ConnectionSource::default())),
        "10.244.0.13:9000"
    );
    let s = status(&t, "TrafficSplit");
    assert!(s.accepted, "{s:?}");
    assert_eq!(
        s.routes,
        ["default/echo-server:19000"],
        "one name for both VIPs"
    );
    let views = t.service_routes();
    let view = views.iter().find(|v| v.vip == echo6).expect("IPv6 VIP");
    assert_eq!(view.policy.as_deref(), Some("TrafficSplit default/split"));
    assert_eq!(view.endpoints.len(), 2);
    assert!(views.iter().any(|v| v.vip == ECHO));
}

#[test]
fn destination_subnets_match_ipv6_vips() {
    let echo6: SocketAddr = "[fd00:96::20]:19000".parse().unwrap();
    let t = dual_table(
        r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo-server]
  tcp:
  - match: [{destinationSubnets: ['fd00:96::/64']}]
    route: [{destination: {host: echo-server, subset: v2}}]
  - route: [{destination: {host: echo-server, subset: v1}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo-server
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#,
        &[],
    );
    for _ in 0..3 {
        assert_eq!(
            endpoint_addr(t.resolve(echo6, ConnectionSource::default())),
            "[fd00:10:244::12]:9000"
        );
        assert_eq!(
            endpoint_addr(t.resolve(ECHO, ConnectionSource::default())),
            "10.244.0.11:9000"
        );
    }
    assert!(status(&t, "VirtualService").accepted);
}

#[test]
fn source_ip_hashing_keeps_ipv6_clients_too() {
    let three = backend(3, Balancer::SourceIpHash);
    let client: IpAddr = "fd00:10:244::7".parse().unwrap();
    let pick = Pick {
        client: Some(client),
        ..Pick::default()
    };
    let first = three.pick(&pick).unwrap().addr;
    for _ in 0..5 {
        assert_eq!(three.pick(&pick).unwrap().addr, first);
    }
}

#[test]
fn with_egress_off_only_services_and_mesh_pods_are_reachable() {
    let text = BASE.replace(
        "metadata: {name: default}\n",
        "metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n",
    ) + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {name: outsider, namespace: legacy}\n\
         spec: {containers: [{name: c, image: x}]}\nstatus: {podIP: 10.244.0.40}\n";
    assert!(text.contains("labels: {istio.io/dataplane-mode: ambient}"));
    let model = load_str(std::path::Path::new("t.yaml"), &text).expect("manifests");
    let mut t = table_of(&text);
    let client: PodKey = "default/client".parse().unwrap();
    let source = ConnectionSource {
        pod: Some(&client),
        gateway: None,
        sni: None,
    };
    let to = |t: &RouteTable, addr: &str| t.resolve(addr.parse().unwrap(), source);
    // On, FSM's default: what is not a Service passes through.
    assert!(matches!(
        to(&t, "192.0.2.7:443"),
        Target::Passthrough { .. }
    ));
    t.set_egress(&model, false);
    match to(&t, "192.0.2.7:443") {
        Target::Refused { route, reason, .. } => {
            assert_eq!(route, EGRESS_POLICY);
            assert!(
                reason.contains("192.0.2.7:443 is neither a Service nor a mesh pod"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A pod of the cluster that is not in the mesh is outside it; so is IPv6.
    assert!(matches!(to(&t, "10.244.0.40:9000"), Target::Refused { .. }));
    assert!(matches!(
        to(&t, "[2001:db8::1]:443"),
        Target::Refused { .. }
    ));
    // A mesh pod dialled directly and a Service stay reachable.
    assert!(matches!(
        to(&t, "10.244.0.11:9000"),
        Target::Passthrough { .. }
    ));
    assert!(matches!(
        to(&t, "10.96.0.20:19000"),
        Target::Endpoint { .. }
    ));
    // A gateway's connections are not the mesh's egress.
    let gateway = ConnectionSource {
        pod: None,
        gateway: Some("gw"),
        sni: None,
    };
    assert!(matches!(
        t.resolve("192.0.2.7:443".parse().unwrap(), gateway),
        Target::Passthrough { .. }
    ));
    t.set_egress(&model, true);
    assert!(matches!(
        to(&t, "192.0.2.7:443"),
        Target::Passthrough { .. }
    ));
}
