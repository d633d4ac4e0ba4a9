//! UDP routing at a gateway from manifests: the FSM document's UDP Gateway (7.4.11) with
//! UDPRoutes, weights across backendRefs, and the listeners that refuse a route of the
//! other transport.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use super::*;
use crate::source::manifests::load_str;

/// The document's Service and Pod (the Service port without `protocol`, as written), a
/// second echo server and a Service with both a TCP and a UDP port 53.
const BACKENDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: server}
---
apiVersion: v1
kind: Service
metadata: {name: fortio, namespace: server}
spec: {selector: {app: fortio}, ports: [{port: 8078, name: udp-8078}]}
---
apiVersion: v1
kind: Pod
metadata: {name: fortio, namespace: server, labels: {app: fortio}}
spec: {containers: [{name: fortio, image: x, ports: [{containerPort: 8078, name: http}]}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: echo-b, namespace: server}
spec: {selector: {app: echo-b}, ports: [{name: udp, port: 8078, protocol: UDP, targetPort: 9078}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-b, namespace: server, labels: {app: echo-b}}
spec: {containers: [{name: echo, image: x}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: server}
spec:
  selector: {app: echo-b}
  ports:
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5300}
  - {name: dns-udp, port: 53, protocol: UDP, targetPort: 5353}
  - {name: sctp, port: 99, protocol: SCTP}
"#;

/// The document's Gateway (its UDP listener 8000), with a TCP listener, a UDP listener on
/// the same port, and a second UDP listener on 8000 beside it.
const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {namespace: server, name: simple-fsm-gateway}
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
  - {protocol: UDP, port: 8000, name: udp}
  - {protocol: TCP, port: 8001, name: tcp}
  - {protocol: UDP, port: 8001, name: udp-beside-tcp}
  - {protocol: UDP, port: 8000, name: udp-again}
"#;

fn route(kind: &str, name: &str, parent: &str, backends: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: {kind}\n\
         metadata: {{name: {name}, namespace: server}}\n\
         spec:\n  parentRefs: [{parent}]\n  rules: [{{backendRefs: {backends}}}]\n"
    )
}

fn table(routes: &str) -> GatewayTable {
    let text = format!("{BACKENDS}---{GATEWAY}{routes}");
    let model = load_str(std::path::Path::new("udp.yaml"), &text).expect("manifests");
    GatewayTable::build(
        &model,
        "server/simple-fsm-gateway",
        None,
        &mut LastValid::default(),
    )
}

fn status<'t>(table: &'t GatewayTable, name: &str) -> &'t RouteStatus {
    table
        .statuses()
        .iter()
        .find(|s| s.name == format!("server/{name}"))
        .unwrap_or_else(|| panic!("no status of {name}: {:#?}", table.statuses()))
}

fn condition(status: &RouteStatus, kind: &str) -> (&'static str, &'static str) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no {kind}: {status:?}"));
    (c.status, c.reason)
}

/// Where a new session to UDP `port` goes: `pod addr by route`.
fn session(table: &GatewayTable, port: u16) -> String {
    let local = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let resolved = table.resolve_udp_with(local, Ipv4Addr::new(10, 0, 0, 1), &Pick::default());
    match resolved.target {
        Target::Endpoint {
            pod, addr, route, ..
        } => format!("{pod} {addr} by {}", route.unwrap_or_default()),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_documents_udp_route_attaches_to_the_udp_listener_and_reaches_fortio() {
    let table = table(&route(
        "UDPRoute",
        "udp-route-sample",
        "{name: simple-fsm-gateway, namespace: server, port: 8000}",
        "[{name: fortio, port: 8078}]",
    ));
    let s = status(&table, "udp-route-sample");
    assert!(s.accepted, "{s:?}");
    assert_eq!(condition(s, "Accepted"), ("True", "Accepted"));
    assert_eq!(condition(s, "ResolvedRefs"), ("True", "ResolvedRefs"));
    assert_eq!(s.routes, ["listener udp (port 8000)"]);
    // A Service port without `protocol` (TCP by default) carries the datagrams, as in FSM.
    assert_eq!(
        session(&table, 8000),
        "server/fortio 10.244.0.10:8078 by UDPRoute server/udp-route-sample"
    );
    assert_eq!(
        table.udp_listeners(),
        [(8000, "udp"), (8001, "udp-beside-tcp")]
    );
    assert_eq!(table.ports(), [8001]);
    assert_eq!(
        table.udp_route(8000),
        Some("UDPRoute server/udp-route-sample")
    );
    assert!(table.udp_serves(
        8000,
        "UDPRoute server/udp-route-sample",
        "10.244.0.10:8078".parse().unwrap()
    ));
    assert!(!table.udp_serves(
        8000,
        "UDPRoute server/other",
        "10.244.0.10:8078".parse().unwrap()
    ));
    // No route on the second UDP listener; the TCP listener knows nothing of UDP.
    assert!(session(&table, 8001).contains("no route is attached"));
    let local = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8000);
    assert!(matches!(
        table.resolve(local, Ipv4Addr::new(10, 0, 0, 1)),
        Target::Refused { .. }
    ));
    // A UDP and a TCP listener share 8001; a second UDP listener on 8000 does not.
    let listeners: BTreeMap<&str, (bool, Option<&str>)> = table
        .listener_statuses()
        .iter()
        .map(|l| (l.name.as_str(), (l.accepted, l.reason.as_deref())))
        .collect();
    assert_eq!(listeners["udp-beside-tcp"], (true, None));
    assert_eq!(
        listeners["udp-again"],
        (false, Some("port 8000 is taken by an earlier listener"))
    );
}

#[test]
fn routes_of_the_other_transport_are_not_allowed_by_listeners() {
    let routes = [
        route(
            "UDPRoute",
            "udp-on-tcp",
            "{name: simple-fsm-gateway, sectionName: tcp}",
            "[{name: fortio, port: 8078}]",
        ),
        route(
            "TCPRoute",
            "tcp-on-udp",
            "{name: simple-fsm-gateway, port: 8000}",
            "[{name: fortio, port: 8078}]",
        ),
        route(
            "UDPRoute",
            "valid",
            "{name: simple-fsm-gateway, port: 8000}",
            "[{name: echo-b, port: 8078}]",
        ),
        route(
            "UDPRoute",
            "no-such-backend",
            "{name: simple-fsm-gateway, port: 8001}",
            "[{name: nobody, port: 8078}]",
        ),
        route(
            "UDPRoute",
            "sctp-port",
            "{name: simple-fsm-gateway, port: 8001}",
            "[{name: dns, port: 99}]",
        ),
    ]
    .concat();
    let table = table(&routes);
    for (name, kind) in [("udp-on-tcp", "UDPRoutes"), ("tcp-on-udp", "TCPRoutes")] {
        let s = status(&table, name);
        assert!(!s.accepted, "{s:?}");
        assert_eq!(condition(s, "Accepted"), ("False", "NotAllowedByListeners"));
        assert!(
            s.reasons[0].contains(&format!("does not take {kind}")),
            "{s:?}"
        );
    }
    for name in ["no-such-backend", "sctp-port"] {
        let s = status(&table, name);
        assert_eq!(
            condition(s, "ResolvedRefs"),
            ("False", "BackendNotFound"),
            "{s:?}"
        );
    }
    assert!(status(&table, "sctp-port").reasons[0].contains("has no UDP (or TCP) port 99"));
    // The bad routes harm nothing: the valid one serves its listener.
    assert!(status(&table, "valid").accepted);
    assert_eq!(
        session(&table, 8000),
        "server/echo-b 10.244.0.11:9078 by UDPRoute server/valid"
    );
}

#[test]
fn a_service_with_both_protocols_on_the_port_gives_the_udp_one() {
    let table = table(&route(
        "UDPRoute",
        "dns",
        "{name: simple-fsm-gateway, port: 8000}",
        "[{name: dns, port: 53}]",
    ));
    assert_eq!(
        session(&table, 8000),
        "server/echo-b 10.244.0.11:5353 by UDPRoute server/dns"
    );
}

#[test]
fn weights_across_backend_refs_split_new_sessions() {
    let table = table(&route(
        "UDPRoute",
        "split",
        "{name: simple-fsm-gateway, port: 8000}",
        "[{name: fortio, port: 8078, weight: 80}, {name: echo-b, port: 8078, weight: 20}]",
    ));
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..200 {
        *counts.entry(session(&table, 8000)).or_default() += 1;
    }
    let by_pod: Vec<(String, u32)> = counts
        .into_iter()
        .map(|(k, n)| (k.split(' ').next().unwrap().to_owned(), n))
        .collect();
    assert_eq!(
        by_pod,
        [
            ("server/echo-b".to_owned(), 40),
            ("server/fortio".to_owned(), 160)
        ]
    );
}
