//! FSM Egress policies with egress off, from the reference documents' shapes: a `tcp`
//! port by destination range, an `https` port by server name, IPv6 ranges, and bad
//! objects rejected with reasons while their previous valid version stays.
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::*;
use crate::source::manifests::load_str;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: curl, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: curl, namespace: curl}
spec: {serviceAccountName: curl, containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.30}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: curl}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.244.0.31}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: curl}
spec:
  clusterIP: 10.96.0.30
  selector: {app: web}
  ports: [{port: 80}]
"#;

/// The Egress policies of FSM's egress policy demo: plain TCP to a range on port 80, and
/// HTTPS to httpbin.org on 443 (any address); IPv6 SSH to a documentation range.
const POLICIES: &str = r#"
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {name: tcp-80, namespace: curl}
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: curl
  ipAddresses: [192.0.2.0/24]
  ports:
  - number: 80
    protocol: tcp
---
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {name: httpbin-443, namespace: curl}
spec:
  sources:
  - kind: ServiceAccount
    name: curl
    namespace: curl
  hosts: [httpbin.org, "*.example.com"]
  ports:
  - number: 443
    protocol: https
---
apiVersion: policy.flomesh.io/v1alpha1
kind: Egress
metadata: {name: ssh-v6, namespace: curl}
spec:
  sources: [{kind: ServiceAccount, name: curl, namespace: curl}]
  ipAddresses: ["2001:db8::/32"]
  ports: [{number: 22, protocol: tcp}]
"#;

fn build(policies: &str, memory: &mut LastValid) -> RouteTable {
    build_with(policies, memory, false)
}

/// The table of the mesh and `policies`, with `enableEgress: egress`.
fn build_with(policies: &str, memory: &mut LastValid, egress: bool) -> RouteTable {
    let text = format!("{MESH}---\n{policies}");
    let model = load_str(std::path::Path::new("t.yaml"), &text).expect("manifests");
    let mut table = RouteTable::build(&model, &HashMap::new(), HashSet::new(), true, memory);
    table.set_egress(&model, egress);
    table
}

fn key(pod: &str) -> PodKey {
    format!("curl/{pod}").parse().unwrap()
}

fn resolve(table: &RouteTable, pod: &str, addr: &str, sni: Option<&str>) -> Target {
    let key = key(pod);
    let source = ConnectionSource {
        pod: Some(&key),
        gateway: None,
        sni,
    };
    table.resolve(addr.parse().unwrap(), source)
}

fn needs_name(table: &RouteTable, pod: &str, addr: &str) -> bool {
    let key = key(pod);
    let source = ConnectionSource {
        pod: Some(&key),
        gateway: None,
        sni: None,
    };
    table.needs_server_name(addr.parse().unwrap(), source)
}

fn allowed_by(target: &Target) -> Option<&str> {
    match target {
        Target::Passthrough { route, .. } => route.as_deref(),
        _ => None,
    }
}

fn egress_status<'t>(table: &'t RouteTable, name: &str) -> &'t RouteStatus {
    table
        .statuses()
        .iter()
        .find(|s| s.kind == "Egress" && s.name == name)
        .unwrap_or_else(|| panic!("no status of Egress {name}: {:?}", table.statuses()))
}

#[test]
fn a_tcp_port_opens_its_range_to_its_service_accounts_only() {
    let t = build(POLICIES, &mut LastValid::default());
    let out = resolve(&t, "curl", "192.0.2.7:80", None);
    assert_eq!(allowed_by(&out), Some("Egress curl/tcp-80"), "{out:?}");
    // Another address, another port, another ServiceAccount: refused.
    for (pod, addr) in [
        ("curl", "198.51.100.1:80"),
        ("curl", "192.0.2.7:81"),
        ("other", "192.0.2.7:80"),
    ] {
        match resolve(&t, pod, addr, None) {
            Target::Refused { route, reason, .. } => {
                assert_eq!(route, EGRESS_POLICY);
                assert!(
                    reason.contains("no Egress policy lets this pod reach it"),
                    "{reason}"
                );
            }
            other => panic!("{pod} -> {addr}: {other:?}"),
        }
    }
    // IPv6 ranges apply to IPv6 destinations.
    let v6 = resolve(&t, "curl", "[2001:db8::5]:22", None);
    assert_eq!(allowed_by(&v6), Some("Egress curl/ssh-v6"), "{v6:?}");
    assert!(matches!(
        resolve(&t, "curl", "[2001:db9::5]:22", None),
        Target::Refused { .. }
    ));
    // Only connections that leave the mesh are judged: a Service stays reachable, and
    // nothing needs a server name on tcp ports.
    assert!(matches!(
        resolve(&t, "other", "10.96.0.30:80", None),
        Target::NoEndpoints { .. }
    ));
    assert!(!needs_name(&t, "curl", "192.0.2.7:80"));
    assert!(!needs_name(&t, "curl", "10.96.0.30:80"));
    let status = egress_status(&t, "curl/tcp-80");
    assert!(status.accepted, "{status:?}");
    assert_eq!(status.routes, ["tcp:80"]);
}

#[test]
fn an_https_port_opens_by_the_client_hellos_server_name() {
    let t = build(POLICIES, &mut LastValid::default());
    // Any address on 443, for a ServiceAccount a policy names: the name decides.
    assert!(needs_name(&t, "curl", "203.0.113.5:443"));
    assert!(!needs_name(&t, "other", "203.0.113.5:443"));
    for sni in ["httpbin.org", "api.example.com"] {
        let out = resolve(&t, "curl", "203.0.113.5:443", Some(sni));
        assert_eq!(allowed_by(&out), Some("Egress curl/httpbin-443"), "{sni}");
    }
    for sni in [Some("evil.org"), Some("example.com"), None] {
        match resolve(&t, "curl", "203.0.113.5:443", sni) {
            Target::Refused { reason, .. } => assert!(
                sni.is_none_or(|s| reason.contains(&format!("as {s:?}"))),
                "{reason}"
            ),
            other => panic!("{sni:?}: {other:?}"),
        }
    }
    // With egress open again nothing is read or refused.
    let text = format!("{MESH}---\n{POLICIES}");
    let model = load_str(std::path::Path::new("t.yaml"), &text).unwrap();
    let mut open = build(POLICIES, &mut LastValid::default());
    open.set_egress(&model, true);
    assert!(!needs_name(&open, "curl", "203.0.113.5:443"));
    let out = resolve(&open, "other", "203.0.113.5:443", None);
    assert!(
        matches!(out, Target::Passthrough { route: None, .. }),
        "{out:?}"
    );
}

#[test]
fn a_bad_value_rejects_the_object_and_its_previous_valid_version_stays() {
    let mut memory = LastValid::default();
    let valid = build(POLICIES, &mut memory);
    assert!(allowed_by(&resolve(&valid, "curl", "192.0.2.7:80", None)).is_some());
    for (bad, reason) in [
        (
            "ipAddresses: [192.0.2.0/33]",
            "ipAddresses[0]: \"192.0.2.0/33\" is not a CIDR",
        ),
        ("ipAddresses: [192.0.2.1]", "(one address is /32 or /128)"),
        (
            "ipAddresses: [192.0.2.1/24]",
            "has host bits set (the range is 192.0.2.0/24)",
        ),
        (
            "ipAddresses: [192.0.2.0/24, fd00::zz/64]",
            "ipAddresses[1]: \"fd00::zz/64\" is not a CIDR",
        ),
    ] {
        let invalid = build(
            &POLICIES.replacen("ipAddresses: [192.0.2.0/24]", bad, 1),
            &mut memory,
        );
        let status = egress_status(&invalid, "curl/tcp-80");
        assert!(
            status.reasons.iter().any(|r| r.contains(reason)),
            "{bad}: {status:?}"
        );
        assert!(
            status
                .reasons
                .iter()
                .any(|r| r.contains("the previous valid version stays in force")),
            "{status:?}"
        );
        assert_eq!(
            allowed_by(&resolve(&invalid, "curl", "192.0.2.7:80", None)),
            Some("Egress curl/tcp-80"),
            "{bad}"
        );
    }
    for (from, bad, reason) in [
        (
            "number: 80",
            "number: 70000",
            "ports[0].number: 70000 is not a port",
        ),
        (
            "number: 80",
            "number: 0",
            "ports[0].number: 0 is not a port",
        ),
        (
            "protocol: tcp",
            "protocol: udp",
            "ports[0].protocol: \"udp\"",
        ),
        (
            "kind: ServiceAccount",
            "kind: Pod",
            "sources[0].kind: \"Pod\" is not ServiceAccount",
        ),
    ] {
        // Without a previous version (a fresh memory), the object opens nothing.
        let invalid = build(&POLICIES.replacen(from, bad, 1), &mut LastValid::default());
        let status = egress_status(&invalid, "curl/tcp-80");
        assert!(!status.accepted, "{status:?}");
        assert!(
            status.reasons.iter().any(|r| r.contains(reason)),
            "{bad}: {status:?}"
        );
        assert!(matches!(
            resolve(&invalid, "curl", "192.0.2.7:80", None),
            Target::Refused { .. }
        ));
        // The other policies are untouched.
        let https = resolve(&invalid, "curl", "203.0.113.5:443", Some("httpbin.org"));
        assert!(allowed_by(&https).is_some(), "{bad}: {https:?}");
    }
    // https without hosts cannot match anything: rejected.
    let no_hosts = build(
        &POLICIES.replacen("  hosts: [httpbin.org, \"*.example.com\"]\n", "", 1),
        &mut LastValid::default(),
    );
    let status = egress_status(&no_hosts, "curl/httpbin-443");
    assert!(
        status.reasons.iter().any(|r| r.contains("hosts is empty")),
        "{status:?}"
    );
}

#[test]
fn an_http_port_is_not_opened_at_l4_and_the_status_says_why() {
    let t = build(
        &POLICIES.replacen("protocol: tcp", "protocol: http", 1),
        &mut LastValid::default(),
    );
    let status = egress_status(&t, "curl/tcp-80");
    assert!(!status.accepted, "{status:?}");
    assert!(
        status
            .reasons
            .iter()
            .any(|r| r.contains("protocol http matches the HTTP Host header")),
        "{status:?}"
    );
    let addr: SocketAddr = "192.0.2.7:80".parse().unwrap();
    assert!(matches!(
        resolve(&t, "curl", &addr.to_string(), None),
        Target::Refused { .. }
    ));
}

/// FSM's egress gateway (8.2): its Service in namespace `fsm` (port 1080, one pod), a
/// second gateway for one policy's rule, and the global EgressGateway of the document.
const GATEWAYS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: fsm}
---
apiVersion: v1
kind: Pod
metadata: {name: egw-0, namespace: fsm, labels: {app: fsm-egress-gateway}}
spec: {containers: [{name: g, image: x}]}
status: {podIP: 10.244.0.50}
---
apiVersion: v1
kind: Service
metadata: {name: fsm-egress-gateway, namespace: fsm}
spec:
  clusterIP: 10.96.0.50
  selector: {app: fsm-egress-gateway}
  ports: [{name: socks, port: 1080}, {name: admin, port: 15000}]
---
apiVersion: v1
kind: Pod
metadata: {name: egw-db-0, namespace: fsm, labels: {app: db-egress}}
spec: {containers: [{name: g, image: x}]}
status: {podIP: 10.244.0.51}
---
apiVersion: v1
kind: Service
metadata: {name: db-egress, namespace: fsm}
spec:
  clusterIP: 10.96.0.51
  selector: {app: db-egress}
  ports: [{port: 1080}]
---
kind: EgressGateway
apiVersion: policy.flomesh.io/v1alpha1
metadata:
  name: global-egress-gateway
  namespace: fsm
spec:
  global:
    - service: fsm-egress-gateway
      namespace: fsm
  rules:
    - egressPolicies: [{name: tcp-80, namespace: curl}]
      egressGateways: [{service: db-egress, namespace: fsm}]
"#;

fn tunnel(target: &Target) -> Option<(SocketAddr, SocketAddr, Option<&str>)> {
    match target {
        Target::Endpoint {
            addr,
            tunnel_to: Some(destination),
            route,
            ..
        } => Some((*addr, *destination, route.as_deref())),
        _ => None,
    }
}

#[test]
fn egress_leaves_through_the_egress_gateway_and_the_mesh_does_not() {
    let open = build_with(GATEWAYS, &mut LastValid::default(), true);
    // Egress open: everything that leaves the mesh goes to the global gateway's endpoint,
    // which is told the destination.
    let out = resolve(&open, "other", "192.0.2.7:80", None);
    assert_eq!(
        tunnel(&out),
        Some((
            "10.244.0.50:1080".parse().unwrap(),
            "192.0.2.7:80".parse().unwrap(),
            Some("EgressGateway fsm/global-egress-gateway")
        )),
        "{out:?}"
    );
    // Within the mesh nothing changes: an enrolled pod, a Service.
    assert!(matches!(
        resolve(&open, "other", "10.244.0.30:9000", None),
        Target::Passthrough { route: None, .. }
    ));
    assert!(matches!(
        resolve(&open, "other", "10.96.0.30:80", None),
        Target::NoEndpoints { .. }
    ));
    // Egress closed: only what a policy lets out leaves, through the gateway of the rule
    // that names the policy, or the global one.
    let closed = build_with(
        &format!("{GATEWAYS}---\n{POLICIES}"),
        &mut LastValid::default(),
        false,
    );
    let db = resolve(&closed, "curl", "192.0.2.7:80", None);
    assert_eq!(
        tunnel(&db).map(|(gateway, ..)| gateway),
        Some("10.244.0.51:1080".parse().unwrap()),
        "{db:?}"
    );
    let https = resolve(&closed, "curl", "203.0.113.5:443", Some("httpbin.org"));
    assert_eq!(
        tunnel(&https).map(|(gateway, ..)| gateway),
        Some("10.244.0.50:1080".parse().unwrap()),
        "{https:?}"
    );
    assert!(matches!(
        resolve(&closed, "other", "192.0.2.7:80", None),
        Target::Refused { .. }
    ));
    let status = closed
        .statuses()
        .iter()
        .find(|s| s.kind == "EgressGateway")
        .expect("a status");
    assert!(status.accepted, "{status:?}");
    assert_eq!(
        status.routes,
        [
            "fsm/db-egress (10.96.0.51:1080)",
            "fsm/fsm-egress-gateway (10.96.0.50:1080)"
        ]
    );
}

#[test]
fn a_gateway_without_endpoints_refuses_and_a_missing_service_is_a_reason() {
    // No gateway pod: the connection is refused, never sent direct.
    let no_pod = GATEWAYS.replace("status: {podIP: 10.244.0.50}\n", "");
    let t = build_with(&no_pod, &mut LastValid::default(), true);
    let out = resolve(&t, "other", "192.0.2.7:80", None);
    assert!(matches!(out, Target::NoEndpoints { .. }), "{out:?}");
    // A binding to a Service that does not exist sets nothing, and says why.
    let missing = GATEWAYS.replace(
        "    - service: fsm-egress-gateway",
        "    - service: nowhere",
    );
    let t = build_with(&missing, &mut LastValid::default(), true);
    let status = t
        .statuses()
        .iter()
        .find(|s| s.kind == "EgressGateway")
        .expect("a status");
    assert!(
        status
            .reasons
            .iter()
            .any(|r| r.contains("global[0]: Service fsm/nowhere does not exist")),
        "{status:?}"
    );
    assert!(matches!(
        resolve(&t, "other", "192.0.2.7:80", None),
        Target::Passthrough { route: None, .. }
    ));
}
