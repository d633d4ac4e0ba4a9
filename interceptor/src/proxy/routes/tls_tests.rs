//! TLS passthrough routing from manifests: a Gateway's TLS listener with TLSRoutes
//! (precedence, conflicts, listeners that refuse them) and a mesh VirtualService's `tls`
//! rules.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::*;
use crate::source::manifests::load_str;

/// Four backends `svc-<x>` (port 443 → pod `<x>` at 10.244.0.1x:8443) in `httpbin`.
fn backends() -> String {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: httpbin}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    );
    for (i, name) in ["a", "wild", "any", "late"].iter().enumerate() {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: httpbin, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: s, image: x}}]}}\nstatus: {{podIP: 10.244.0.1{i}}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{name}, namespace: httpbin}}\n\
             spec: {{clusterIP: 10.96.1.1{i}, selector: {{app: {name}}}, ports: [{{name: tls, port: 443, targetPort: 8443}}]}}\n"
        ));
    }
    yaml
}

/// The document's Gateway (FSM 7.4.9), with a TCP and a Terminate listener beside it.
const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: simple-fsm-gateway, namespace: httpbin}
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
  - protocol: TLS
    port: 8000
    name: foo
    tls:
      mode: Passthrough
    allowedRoutes:
      namespaces:
        from: Same
  - {protocol: TCP, port: 9000, name: plain}
  - {protocol: TLS, port: 8443, name: terminate, tls: {mode: Terminate}}
  - {protocol: TLS, port: 8001, name: only-b, hostname: b.example.com, tls: {mode: Passthrough}}
"#;

fn tls_route(name: &str, created: &str, section: &str, hostnames: &str, backend: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TLSRoute\n\
         metadata: {{name: {name}, namespace: httpbin, creationTimestamp: '{created}'}}\n\
         spec:\n  parentRefs: [{{name: simple-fsm-gateway, sectionName: {section}}}]\n  \
         hostnames: {hostnames}\n  rules: [{{backendRefs: [{{name: {backend}, port: 443}}]}}]\n"
    )
}

fn gateway_table(routes: &str) -> GatewayTable {
    let text = format!("{}---{GATEWAY}{routes}", backends());
    let model = load_str(std::path::Path::new("tls.yaml"), &text).expect("manifests");
    GatewayTable::build(
        &model,
        "httpbin/simple-fsm-gateway",
        None,
        &mut LastValid::default(),
    )
}

fn route_status<'t>(table: &'t GatewayTable, name: &str) -> &'t RouteStatus {
    table
        .statuses()
        .iter()
        .find(|s| s.name == format!("httpbin/{name}"))
        .unwrap_or_else(|| panic!("no status of {name}: {:#?}", table.statuses()))
}

fn accepted_condition(status: &RouteStatus) -> (&'static str, &'static str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.kind == "Accepted")
        .expect("Accepted condition");
    (c.status, c.reason)
}

/// The pod a connection to `port` with server name `sni` reaches.
fn reached(table: &GatewayTable, port: u16, sni: Option<&str>) -> String {
    let local = SocketAddrV4::new(Ipv4Addr::new(10, 244, 9, 9), port);
    let resolved = table.resolve_tls_with(local, Ipv4Addr::new(10, 0, 0, 1), sni, &Pick::default());
    match resolved.target {
        Target::Endpoint { pod, route, .. } => format!("{pod} by {}", route.unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

fn all_routes() -> String {
    [
        tls_route("catch-all", "2024-01-01T00:00:00Z", "foo", "[]", "svc-any"),
        tls_route(
            "wild",
            "2024-01-02T00:00:00Z",
            "foo",
            "['*.example.com']",
            "svc-wild",
        ),
        tls_route(
            "a",
            "2024-01-03T00:00:00Z",
            "foo",
            "[A.example.com]",
            "svc-a",
        ),
        // Younger routes claiming names that are held.
        tls_route(
            "late-a",
            "2024-01-04T00:00:00Z",
            "foo",
            "[a.example.com]",
            "svc-late",
        ),
        tls_route("late-any", "2024-01-05T00:00:00Z", "foo", "[]", "svc-late"),
        tls_route(
            "partly-late",
            "2024-01-06T00:00:00Z",
            "foo",
            "[a.example.com, c.other.org]",
            "svc-late",
        ),
    ]
    .concat()
}

#[test]
fn the_tls_listener_routes_exact_names_then_the_longest_wildcard_then_the_catch_all() {
    let table = gateway_table(&all_routes());
    assert!(table.is_tls(8000));
    assert!(!table.is_tls(9000));
    assert_eq!(
        reached(&table, 8000, Some("a.example.com")),
        "httpbin/a by TLSRoute httpbin/a"
    );
    assert_eq!(
        reached(&table, 8000, Some("x.y.example.com")),
        "httpbin/wild by TLSRoute httpbin/wild"
    );
    assert_eq!(
        reached(&table, 8000, Some("c.other.org")),
        "httpbin/late by TLSRoute httpbin/partly-late"
    );
    assert_eq!(
        reached(&table, 8000, Some("example.org")),
        "httpbin/any by TLSRoute httpbin/catch-all"
    );
    // A hello without a server name goes to the route without hostnames.
    assert_eq!(
        reached(&table, 8000, None),
        "httpbin/any by TLSRoute httpbin/catch-all"
    );
    assert_eq!(
        table.tls_route(8000, Some("a.example.com")),
        Some("TLSRoute httpbin/a")
    );
}

#[test]
fn a_name_two_routes_claim_stays_with_the_older_and_the_younger_says_why() {
    let table = gateway_table(&all_routes());
    for name in ["catch-all", "wild", "a"] {
        let status = route_status(&table, name);
        assert!(status.accepted, "{status:?}");
        assert_eq!(accepted_condition(status), ("True", "Accepted"));
    }
    for (name, held_by) in [("late-a", "httpbin/a"), ("late-any", "httpbin/catch-all")] {
        let status = route_status(&table, name);
        assert!(!status.accepted, "{status:?}");
        assert_eq!(accepted_condition(status), ("False", "HostnameConflict"));
        assert!(
            status.reasons[0].contains(&format!("held by the older TLSRoute {held_by}")),
            "{status:?}"
        );
    }
    // Partly held: in force for the name it alone claims, and says which it lost.
    let partly = route_status(&table, "partly-late");
    assert!(partly.accepted, "{partly:?}");
    assert_eq!(
        partly.routes,
        ["listener foo (port 8000) hostnames c.other.org"]
    );
    assert!(partly.reasons[0].contains("a.example.com"), "{partly:?}");
}

#[test]
fn without_a_catch_all_an_unknown_name_is_refused() {
    let table = gateway_table(&tls_route(
        "a",
        "2024-01-03T00:00:00Z",
        "foo",
        "[a.example.com]",
        "svc-a",
    ));
    assert_eq!(table.tls_route(8000, Some("b.example.com")), None);
    assert_eq!(table.tls_route(8000, None), None);
    assert!(reached(&table, 8000, Some("b.example.com")).starts_with("Refused"));
}

#[test]
fn routes_on_the_wrong_listener_kind_are_not_allowed_and_terminate_is_not_served() {
    let tcp_route = "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\n\
        metadata: {name: tcp-on-tls, namespace: httpbin}\n\
        spec: {parentRefs: [{name: simple-fsm-gateway, sectionName: foo}], rules: [{backendRefs: [{name: svc-a, port: 443}]}]}\n";
    let routes = [
        tls_route("tls-on-tcp", "2024-01-01T00:00:00Z", "plain", "[]", "svc-a"),
        tls_route(
            "on-terminate",
            "2024-01-01T00:00:00Z",
            "terminate",
            "[]",
            "svc-a",
        ),
        tls_route(
            "bad-name",
            "2024-01-01T00:00:00Z",
            "foo",
            "['a.*.com']",
            "svc-a",
        ),
        tls_route(
            "outside-listener",
            "2024-01-01T00:00:00Z",
            "only-b",
            "[a.example.com]",
            "svc-a",
        ),
        tls_route(
            "inside-listener",
            "2024-01-01T00:00:00Z",
            "only-b",
            "['*.example.com']",
            "svc-wild",
        ),
        tcp_route.to_owned(),
    ]
    .concat();
    let table = gateway_table(&routes);
    for (name, reason) in [
        ("tls-on-tcp", "NotAllowedByListeners"),
        ("tcp-on-tls", "NotAllowedByListeners"),
        ("on-terminate", "NoMatchingParent"),
        ("bad-name", "UnsupportedValue"),
        ("outside-listener", "NoMatchingListenerHostname"),
    ] {
        let status = route_status(&table, name);
        assert!(!status.accepted, "{name}: {status:?}");
        assert_eq!(
            accepted_condition(status),
            ("False", reason),
            "{name}: {status:?}"
        );
    }
    assert!(route_status(&table, "tls-on-tcp").reasons[0].contains("does not take TLSRoutes"));
    let terminate = table
        .listener_statuses()
        .iter()
        .find(|l| l.name == "terminate")
        .unwrap();
    assert!(!terminate.accepted);
    assert!(terminate.reason.as_deref().unwrap().contains("Passthrough"));
    // The listener's hostname narrows the wildcard route to its one name.
    let inside = route_status(&table, "inside-listener");
    assert_eq!(
        inside.routes,
        ["listener only-b (port 8001) hostnames b.example.com"]
    );
    assert_eq!(
        reached(&table, 8001, Some("b.example.com")),
        "httpbin/wild by TLSRoute httpbin/inside-listener"
    );
    assert_eq!(table.tls_route(8001, Some("c.example.com")), None);
}

/// The mesh: a VirtualService's `tls` rules on the Service `svc-any:443`.
fn mesh_table(vs: &str) -> RouteTable {
    let text = format!(
        "{}---\n{vs}---\napiVersion: v1\nkind: Pod\n\
         metadata: {{name: client, namespace: httpbin, labels: {{app: client}}}}\n\
         spec: {{containers: [{{name: c, image: x}}]}}\nstatus: {{podIP: 10.244.0.99}}\n",
        backends()
    );
    super::tests::table_of(&text)
}

const SVC_ANY: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 96, 1, 12), 443));

fn mesh_reached(table: &RouteTable, sni: Option<&str>, pod: &str) -> String {
    let key: PodKey = format!("httpbin/{pod}").parse().unwrap();
    let source = ConnectionSource {
        pod: Some(&key),
        gateway: None,
        sni,
    };
    match table.resolve(SVC_ANY, source) {
        Target::Endpoint { pod, .. } => pod,
        Target::Refused { reason, .. } => format!("refused: {reason}"),
        other => format!("{other:?}"),
    }
}

const VS_TLS: &str = r#"apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: by-sni, namespace: httpbin}
spec:
  hosts: [svc-any]
  tls:
  - match:
    - port: 443
      sniHosts: [a.example.com]
      sourceLabels: {app: client}
    route:
    - destination: {host: svc-a}
  - match:
    - sniHosts: ["*.example.com"]
      destinationSubnets: [10.96.1.0/24]
    route:
    - destination: {host: svc-wild, port: {number: 443}}
"#;

#[test]
fn a_virtual_service_tls_rule_routes_its_service_port_by_server_name() {
    let table = mesh_table(VS_TLS);
    assert!(table.routes_by_sni(SVC_ANY));
    assert!(!table.routes_by_sni(SocketAddr::from((Ipv4Addr::new(10, 96, 1, 10), 443))));
    assert_eq!(
        mesh_reached(&table, Some("a.example.com"), "client"),
        "httpbin/a"
    );
    // sourceLabels: another client falls to the wildcard rule.
    assert_eq!(
        mesh_reached(&table, Some("a.example.com"), "a"),
        "httpbin/wild"
    );
    assert_eq!(
        mesh_reached(&table, Some("b.example.com"), "client"),
        "httpbin/wild"
    );
    // No rule for the name (or no name): refused, never the Service's own endpoints.
    for sni in [Some("b.other.org"), None] {
        let got = mesh_reached(&table, sni, "client");
        assert!(got.starts_with("refused: no tls rule matches"), "{got}");
        let key: PodKey = "httpbin/client".parse().unwrap();
        let source = ConnectionSource {
            pod: Some(&key),
            gateway: None,
            sni,
        };
        assert!(!table.matches_sni(SVC_ANY, source));
    }
}

#[test]
fn a_tls_rule_without_sni_hosts_or_with_a_bad_one_rejects_the_virtual_service() {
    for (spec, reason) in [
        (
            "tls: [{match: [{port: 443}], route: [{destination: {host: svc-a}}]}]",
            "sniHosts is required",
        ),
        (
            "tls: [{route: [{destination: {host: svc-a}}]}]",
            "match is required",
        ),
        (
            "tls: [{match: [{sniHosts: ['10.0.0.1']}], route: [{destination: {host: svc-a}}]}]",
            "IP address",
        ),
    ] {
        let vs = format!(
            "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
             metadata: {{name: bad, namespace: httpbin}}\nspec: {{hosts: [svc-any], {spec}}}\n"
        );
        let table = mesh_table(&vs);
        let status = table
            .statuses()
            .iter()
            .find(|s| s.name == "httpbin/bad")
            .unwrap();
        assert!(!status.accepted, "{status:?}");
        assert!(
            status.reasons.iter().any(|r| r.contains(reason)),
            "{reason}: {status:?}"
        );
        // The Service keeps its own routing, not by server name.
        assert!(!table.routes_by_sni(SVC_ANY));
    }
}
