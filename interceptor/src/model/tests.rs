//! Unit tests of the model: keys, enrollment precedence, service lookup and endpoints.

use super::*;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ns(name: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Namespace {
    Namespace {
        name: name.into(),
        labels: map(labels),
        annotations: map(annotations),
    }
}

fn pod(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        namespace: namespace.into(),
        name: name.into(),
        labels: map(labels),
        service_account: "default".into(),
        ..Pod::default()
    }
}

fn model(namespaces: Vec<Namespace>, pods: Vec<Pod>, services: Vec<Service>) -> Model {
    Model {
        namespaces: namespaces
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect(),
        pods: pods.into_iter().map(|p| (p.key(), p)).collect(),
        services: services.into_iter().map(|s| (s.key(), s)).collect(),
        ..Model::default()
    }
}

fn enrollment(m: &Model, ns: &str, name: &str) -> Enrollment {
    m.enrollment(&PodKey::new(ns, name)).expect("pod is known")
}

#[test]
fn keys_display_parse_and_serialize_as_ns_name() {
    let key = PodKey::new("demo", "client");
    assert_eq!(key.to_string(), "demo/client");
    assert_eq!("demo/client".parse::<PodKey>(), Ok(key.clone()));
    assert!("demo".parse::<PodKey>().is_err());
    assert!("/x".parse::<ServiceKey>().is_err());
    assert!("a/b/c".parse::<ServiceKey>().is_err());
    assert_eq!(serde_json::to_string(&key).unwrap(), r#""demo/client""#);

    let m = model(vec![], vec![pod("demo", "client", &[])], vec![]);
    let json = serde_json::to_value(&m).unwrap();
    assert_eq!(json["pods"]["demo/client"]["service_account"], "default");
}

#[test]
fn enrollment_unknown_pod_is_none() {
    let m = model(vec![ns("demo", &[], &[])], vec![], vec![]);
    assert_eq!(m.enrollment(&PodKey::new("demo", "ghost")), None);
}

#[test]
fn enrollment_nothing_said_is_not_enrolled() {
    let m = model(
        vec![ns("plain", &[], &[])],
        vec![pod("plain", "p", &[]), pod("nowhere", "q", &[])],
        vec![],
    );
    let e = enrollment(&m, "plain", "p");
    assert!(!e.enrolled);
    assert!(
        e.reason.starts_with("no flomesh.io/sidecar-injection"),
        "{}",
        e.reason
    );
    let e = enrollment(&m, "nowhere", "q");
    assert!(!e.enrolled);
    assert!(e.reason.contains("namespace unknown"), "{}", e.reason);
}

#[test]
fn enrollment_namespace_label_ambient() {
    let m = model(
        vec![ns("demo", &[(LABEL_DATAPLANE_MODE, "ambient")], &[])],
        vec![pod("demo", "client", &[])],
        vec![],
    );
    let e = enrollment(&m, "demo", "client");
    assert!(e.enrolled);
    assert_eq!(
        e.reason,
        "namespace demo label istio.io/dataplane-mode=ambient"
    );
}

#[test]
fn enrollment_pod_disabled_in_enabled_namespace() {
    let mut p = pod("mesh", "p", &[]);
    p.annotations = map(&[(ANNOTATION_SIDECAR_INJECTION, "disabled")]);
    let m = model(
        vec![ns(
            "mesh",
            &[],
            &[(ANNOTATION_SIDECAR_INJECTION, "enabled")],
        )],
        vec![p],
        vec![],
    );
    let e = enrollment(&m, "mesh", "p");
    assert!(!e.enrolled);
    assert_eq!(
        e.reason,
        "pod mesh/p annotation flomesh.io/sidecar-injection=disabled"
    );
}

#[test]
fn enrollment_pod_ambient_in_plain_namespace() {
    let m = model(
        vec![ns("plain", &[], &[])],
        vec![pod("plain", "p", &[(LABEL_DATAPLANE_MODE, "ambient")])],
        vec![],
    );
    let e = enrollment(&m, "plain", "p");
    assert!(e.enrolled);
    assert_eq!(
        e.reason,
        "pod plain/p label istio.io/dataplane-mode=ambient"
    );
}

#[test]
fn enrollment_namespace_none_pod_annotation_enabled() {
    let mut p = pod("out", "p", &[]);
    p.annotations = map(&[(ANNOTATION_SIDECAR_INJECTION, "enabled")]);
    let m = model(
        vec![ns("out", &[(LABEL_DATAPLANE_MODE, "none")], &[])],
        vec![p],
        vec![],
    );
    let e = enrollment(&m, "out", "p");
    assert!(e.enrolled);
    assert_eq!(
        e.reason,
        "pod out/p annotation flomesh.io/sidecar-injection=enabled"
    );
}

#[test]
fn enrollment_ignores_unknown_values_and_says_so() {
    // Case matters, as it does for Istio and FSM: "Enabled" is not "enabled".
    let mut p = pod("demo", "p", &[]);
    p.annotations = map(&[(ANNOTATION_SIDECAR_INJECTION, "Enabled")]);
    let m = model(
        vec![ns("demo", &[(LABEL_DATAPLANE_MODE, "ambient")], &[])],
        vec![p],
        vec![],
    );
    let e = enrollment(&m, "demo", "p");
    assert!(e.enrolled);
    assert!(
        e.reason
            .starts_with("namespace demo label istio.io/dataplane-mode=ambient; ignored pod demo/p annotation flomesh.io/sidecar-injection=\"Enabled\""),
        "{}",
        e.reason
    );

    let m = model(
        vec![ns("demo", &[(LABEL_DATAPLANE_MODE, "sidecar")], &[])],
        vec![pod("demo", "q", &[])],
        vec![],
    );
    let e = enrollment(&m, "demo", "q");
    assert!(!e.enrolled);
    assert!(
        e.reason
            .contains("ignored namespace demo label istio.io/dataplane-mode=\"sidecar\""),
        "{}",
        e.reason
    );
}

#[test]
fn enrollment_conflict_on_one_object_opts_out() {
    let mut p = pod("demo", "p", &[(LABEL_DATAPLANE_MODE, "none")]);
    p.annotations = map(&[(ANNOTATION_SIDECAR_INJECTION, "enabled")]);
    let mut q = pod("demo", "q", &[(LABEL_DATAPLANE_MODE, "ambient")]);
    q.annotations = map(&[(ANNOTATION_SIDECAR_INJECTION, "enabled")]);
    let m = model(vec![ns("demo", &[], &[])], vec![p, q], vec![]);
    let e = enrollment(&m, "demo", "p");
    assert!(!e.enrolled);
    assert_eq!(
        e.reason,
        "pod demo/p label istio.io/dataplane-mode=none (wins over annotation \
         flomesh.io/sidecar-injection=enabled on the same object)"
    );
    let e = enrollment(&m, "demo", "q");
    assert!(e.enrolled);
    assert_eq!(
        e.reason,
        "pod demo/q annotation flomesh.io/sidecar-injection=enabled and label \
         istio.io/dataplane-mode=ambient"
    );
}

fn echo_service() -> Service {
    Service {
        namespace: "demo".into(),
        name: "echo".into(),
        cluster_ip: Some(Ipv4Addr::new(10, 96, 0, 10)),
        cluster_ipv6: None,
        selector: map(&[("app", "echo")]),
        ports: vec![
            ServicePort {
                name: Some("dns".into()),
                port: 53,
                target_port: TargetPort::Number(5353),
                protocol: "UDP".into(),
            },
            ServicePort {
                name: Some("tcp".into()),
                port: 80,
                target_port: TargetPort::Name("tcp-echo".into()),
                protocol: "TCP".into(),
            },
            ServicePort {
                name: Some("admin".into()),
                port: 81,
                target_port: TargetPort::Number(9001),
                protocol: "TCP".into(),
            },
        ],
    }
}

fn server(name: &str, labels: &[(&str, &str)], ip: Option<[u8; 4]>, echo_port: Option<u16>) -> Pod {
    let mut p = pod("demo", name, labels);
    p.ip = ip.map(Ipv4Addr::from);
    p.container_ports = echo_port
        .map(|port| NamedPort {
            name: Some("tcp-echo".into()),
            port,
        })
        .into_iter()
        .chain([NamedPort {
            name: None,
            port: 8080,
        }])
        .collect();
    p
}

#[test]
fn service_for_matches_cluster_ip_and_tcp_port() {
    let m = model(vec![], vec![], vec![echo_service()]);
    let ip = Ipv4Addr::new(10, 96, 0, 10);
    let (svc, sp) = m.service_for(ip.into(), 80).expect("echo:80");
    assert_eq!(svc.key(), ServiceKey::new("demo", "echo"));
    assert_eq!(sp.name.as_deref(), Some("tcp"));
    assert_eq!(
        m.service_for(ip.into(), 81).map(|(_, sp)| sp.port),
        Some(81)
    );
    assert!(
        m.service_for(ip.into(), 53).is_none(),
        "UDP ports are not ours"
    );
    assert!(m.service_for(ip.into(), 8080).is_none());
    assert!(m
        .service_for(Ipv4Addr::new(10, 96, 0, 11).into(), 80)
        .is_none());

    let mut headless = echo_service();
    headless.name = "headless".into();
    headless.cluster_ip = None;
    let m = model(vec![], vec![], vec![headless]);
    assert!(m.service_for(ip.into(), 80).is_none());
}

#[test]
fn endpoints_select_by_labels_and_resolve_named_port() {
    let svc = echo_service();
    let pods = vec![
        server(
            "b-v2",
            &[("app", "echo"), ("version", "v2")],
            Some([10, 0, 0, 3]),
            Some(9002),
        ),
        server(
            "a-v1",
            &[("app", "echo"), ("version", "v1")],
            Some([10, 0, 0, 2]),
            Some(9000),
        ),
        // No port named tcp-echo: skipped for the named port, kept for the numbered one.
        server("c-noname", &[("app", "echo")], Some([10, 0, 0, 4]), None),
        // No IP anywhere: skipped.
        server("d-noip", &[("app", "echo")], None, Some(9000)),
        // IP only from the CNI plugin.
        server("e-cni", &[("app", "echo")], None, Some(9000)),
        // Labels do not match.
        server(
            "f-other",
            &[("app", "other")],
            Some([10, 0, 0, 6]),
            Some(9000),
        ),
    ];
    let mut elsewhere = server("a-v1", &[("app", "echo")], Some([10, 0, 1, 2]), Some(9000));
    elsewhere.namespace = "other".into();
    let mut all = pods;
    all.push(elsewhere);
    let m = model(vec![], all, vec![svc.clone()]);

    let mut extra = HashMap::new();
    extra.insert(
        PodKey::new("demo", "e-cni"),
        PodAddrs::v4(Ipv4Addr::new(10, 0, 0, 5)),
    );
    // The CNI plugin's address wins over status.podIP.
    extra.insert(
        PodKey::new("demo", "b-v2"),
        PodAddrs::v4(Ipv4Addr::new(10, 0, 0, 33)),
    );

    let got = m.endpoints(&svc, &svc.ports[1], &extra, IpFamily::V4);
    let want = vec![
        Endpoint {
            pod: PodKey::new("demo", "a-v1"),
            addr: "10.0.0.2:9000".parse().unwrap(),
        },
        Endpoint {
            pod: PodKey::new("demo", "b-v2"),
            addr: "10.0.0.33:9002".parse().unwrap(),
        },
        Endpoint {
            pod: PodKey::new("demo", "e-cni"),
            addr: "10.0.0.5:9000".parse().unwrap(),
        },
    ];
    assert_eq!(got, want);

    let got: Vec<String> = m
        .endpoints(&svc, &svc.ports[2], &extra, IpFamily::V4)
        .iter()
        .map(|e| format!("{} {}", e.pod, e.addr))
        .collect();
    assert_eq!(
        got,
        [
            "demo/a-v1 10.0.0.2:9001",
            "demo/b-v2 10.0.0.33:9001",
            "demo/c-noname 10.0.0.4:9001",
            "demo/e-cni 10.0.0.5:9001",
        ]
    );
}

#[test]
fn empty_selector_selects_nothing() {
    let mut svc = echo_service();
    svc.selector.clear();
    let m = model(
        vec![],
        vec![server(
            "a",
            &[("app", "echo")],
            Some([10, 0, 0, 2]),
            Some(9000),
        )],
        vec![svc.clone()],
    );
    assert!(m
        .endpoints(&svc, &svc.ports[2], &HashMap::new(), IpFamily::V4)
        .is_empty());
}

#[test]
fn selector_needs_every_pair() {
    let mut svc = echo_service();
    svc.selector = map(&[("app", "echo"), ("version", "v1")]);
    let v1 = server(
        "v1",
        &[("app", "echo"), ("version", "v1"), ("x", "y")],
        None,
        None,
    );
    let v2 = server("v2", &[("app", "echo"), ("version", "v2")], None, None);
    let bare = server("bare", &[("app", "echo")], None, None);
    assert!(svc.selects(&v1));
    assert!(!svc.selects(&v2));
    assert!(!svc.selects(&bare));
}

fn slice_port(
    name: Option<&str>,
    port: u16,
    protocol: &str,
    eps: &[(&str, Option<&str>)],
) -> SlicePort {
    SlicePort {
        name: name.map(str::to_string),
        port,
        protocol: protocol.into(),
        endpoints: eps
            .iter()
            .map(|(ip, pod)| SliceEndpoint {
                ip: ip.parse().unwrap(),
                pod: pod.map(|name| PodKey::new("demo", name)),
            })
            .collect(),
    }
}

#[test]
fn endpoint_slices_win_over_the_selector() {
    let svc = echo_service();
    // A local pod the selector would pick: with slices present it is not consulted.
    let mut m = model(
        vec![],
        vec![server(
            "local",
            &[("app", "echo")],
            Some([10, 0, 0, 2]),
            Some(9000),
        )],
        vec![svc.clone()],
    );
    m.endpoint_slices.insert(
        svc.key(),
        vec![
            // Two slices: the named port resolves to 9000 on some pods, 9002 on others.
            slice_port(
                Some("tcp"),
                9000,
                "TCP",
                &[
                    ("10.244.1.7", Some("remote-b")),
                    ("10.244.0.2", Some("local")),
                ],
            ),
            slice_port(
                Some("admin"),
                9001,
                "TCP",
                &[("10.244.1.7", Some("remote-b"))],
            ),
            slice_port(
                Some("tcp"),
                9002,
                "TCP",
                // A hand-made endpoint, and a duplicate of one of the first slice.
                &[("192.168.5.5", None), ("10.244.0.2", Some("local"))],
            ),
            slice_port(Some("tcp"), 9002, "TCP", &[("10.244.0.2", Some("local"))]),
            // Same name, other protocol: not this port.
            slice_port(Some("tcp"), 9003, "UDP", &[("10.244.9.9", Some("udp"))]),
        ],
    );
    let got: Vec<String> = m
        .endpoints(&svc, &svc.ports[1], &HashMap::new(), IpFamily::V4)
        .iter()
        .map(|e| format!("{} {}", e.pod, e.addr))
        .collect();
    assert_eq!(
        got,
        [
            "demo/192.168.5.5 192.168.5.5:9002",
            "demo/local 10.244.0.2:9000",
            "demo/local 10.244.0.2:9002",
            "demo/remote-b 10.244.1.7:9000",
        ]
    );
    // The CNI plugin's addresses do not override what the slices say.
    let extra = HashMap::from([(
        PodKey::new("demo", "local"),
        PodAddrs::v4(Ipv4Addr::new(10, 9, 9, 9)),
    )]);
    assert_eq!(
        m.endpoints(&svc, &svc.ports[2], &extra, IpFamily::V4).len(),
        1
    );

    // An empty entry means "no endpoints", not "fall back to the selector".
    m.endpoint_slices.insert(svc.key(), Vec::new());
    assert!(m
        .endpoints(&svc, &svc.ports[1], &HashMap::new(), IpFamily::V4)
        .is_empty());
    // Without an entry the selector applies again.
    m.endpoint_slices.clear();
    assert_eq!(
        m.endpoints(&svc, &svc.ports[1], &HashMap::new(), IpFamily::V4)
            .len(),
        1
    );
    // No slices, no change to the config dump.
    assert!(serde_json::to_value(&m)
        .unwrap()
        .get("endpoint_slices")
        .is_none());
}

#[test]
fn unrecognized_enrollment_values_are_named_with_their_object() {
    let notes = unrecognized_enrollment(
        "namespace shop",
        &map(&[(LABEL_DATAPLANE_MODE, "sidecar")]),
        &map(&[(ANNOTATION_SIDECAR_INJECTION, "maybe")]),
    );
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].contains("namespace shop")
            && notes[0].contains("flomesh.io/sidecar-injection=\"maybe\"")
            && notes[0].contains("expected enabled or disabled"),
        "{notes:?}"
    );
    assert!(
        notes[1].contains("namespace shop")
            && notes[1].contains("istio.io/dataplane-mode=\"sidecar\"")
            && notes[1].contains("expected ambient or none"),
        "{notes:?}"
    );
    // Enrolling and excluding words are not reported.
    let fine = unrecognized_enrollment(
        "pod shop/cart",
        &map(&[(LABEL_DATAPLANE_MODE, "none")]),
        &map(&[(ANNOTATION_SIDECAR_INJECTION, "enabled")]),
    );
    assert!(fine.is_empty(), "{fine:?}");
}
