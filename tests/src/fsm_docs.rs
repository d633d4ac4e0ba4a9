//! The FSM documents' gateway objects as the documents write them, shared by the e2e
//! suites and the bench so that both serve the same YAML.

/// 7.4.9: the TLS Passthrough Gateway (listener `foo`, port 8000, namespace `httpbin`),
/// starting with a `---` separator.
pub const TLS_PASSTHROUGH_GATEWAY: &str = r#"---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  name: simple-fsm-gateway
  namespace: httpbin
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
"#;

/// 7.4.11: the UDP Gateway (listener `udp`, port 8000, namespace `server`) and its
/// UDPRoute to Service `fortio` port 8078, verbatim; no leading separator.
pub const UDP_GATEWAY: &str = r#"apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata:
  namespace: server
  name: simple-fsm-gateway
spec:
  gatewayClassName: fsm-gateway-cls
  listeners:
    - protocol: UDP
      port: 8000
      name: udp
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: UDPRoute
metadata:
  name: udp-route-sample
  namespace: server
spec:
  parentRefs:
    - name: simple-fsm-gateway
      namespace: server
      port: 8000
  rules:
  - backendRefs:
    - name: fortio
      port: 8078
"#;
