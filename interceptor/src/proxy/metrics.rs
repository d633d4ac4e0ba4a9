//! Prometheus metrics of the proxy, per route and backend, counted as each connection
//! ends (from its [`ConnectionRecord`]): connections, bytes each way, errors (no
//! endpoint, connect failure, no original destination) and refusals (a rule whose weights
//! are all zero, or a policy that denies the connection), and the upstream families of
//! [`super::upstream`]. Served as text on the admin port's `/metrics`.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::connection::{ConnectionRecord, Outcome};
use super::upstream::UpstreamMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    /// `outbound`, `inbound` or `gateway`.
    direction: &'static str,
    /// The routing object that chose the backend; `service` for a Service's own
    /// round-robin, `passthrough` or `inbound` otherwise.
    route: String,
    /// The backend (`namespace/service:port[ subset s]`), the pod for inbound, or
    /// `passthrough`.
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ByteLabels {
    #[prometheus(flatten)]
    route: RouteLabels,
    /// `upstream`: from the client towards the backend; `downstream`: back.
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    direction: &'static str,
    /// [`super::ProxyError::kind`]: `no_original_destination`, `no_route_table`,
    /// `no_endpoints`, `refused`, `no_route`, `connect`, `client_hello` or
    /// `no_sni_route`.
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TlsLabels {
    direction: &'static str,
    /// `not_tls`, `malformed`, `too_large`, `timeout`, `closed`, `io` (no usable
    /// ClientHello) or `no_route` (no route serves its server name).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientAddressLabels {
    /// [`super::connection::ClientAddress::as_str`]: `preserved`, `own_address` or
    /// `fallback`.
    source: &'static str,
}

#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    /// The outbound route series created, so those of Services that are gone can be
    /// removed (a Family cannot list its series).
    outbound: std::sync::Mutex<std::collections::HashSet<RouteLabels>>,
    connections: Family<RouteLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    errors: Family<RouteLabels, Counter>,
    refused: Family<RouteLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    tls_refused: Family<TlsLabels, Counter>,
    client_address: Family<ClientAddressLabels, Counter>,
    upstream: UpstreamMetrics,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let connections = Family::<RouteLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let errors = Family::<RouteLabels, Counter>::default();
        let refused = Family::<RouteLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let tls_refused = Family::<TlsLabels, Counter>::default();
        let client_address = Family::<ClientAddressLabels, Counter>::default();
        registry.register(
            "proxy_connections",
            "Connections the proxy handled, counted when they end",
            connections.clone(),
        );
        registry.register(
            "proxy_bytes",
            "Bytes forwarded, counted when the connection ends",
            bytes.clone(),
        );
        registry.register(
            "proxy_errors",
            "Connections that failed in the proxy: no original destination, no endpoint, connect failure",
            errors.clone(),
        );
        registry.register(
            "proxy_refused",
            "Connections refused on purpose: every weight of the matching rule is zero, or a policy denies them",
            refused.clone(),
        );
        registry.register(
            "proxy_failures",
            "Connections the proxy did not carry, by why (the errors and refusals above, by kind)",
            failures.clone(),
        );
        registry.register(
            "proxy_tls_refused",
            "Connections to a port routed by server name (TLS passthrough) that were reset: no usable ClientHello, or no route for its server name",
            tls_refused.clone(),
        );
        registry.register(
            "inbound_client_address",
            "Inbound connections by the source address of the proxy's socket to the \
             application: the client's (preserved), or the pod's own because the client is \
             the pod (own_address) or binding the client's address failed (fallback)",
            client_address.clone(),
        );
        let upstream = UpstreamMetrics::default();
        upstream.register(&mut registry);
        Self {
            registry,
            outbound: std::sync::Mutex::default(),
            connections,
            bytes,
            errors,
            refused,
            failures,
            tls_refused,
            client_address,
            upstream,
        }
    }
}

impl ProxyMetrics {
    /// The proxy's metrics and, read on every scrape, `collector`'s (the agent passes the
    /// data path's kernel counters, see [`crate::datapath::metrics`]).
    pub fn with_collector(collector: Box<dyn prometheus_client::collector::Collector>) -> Self {
        let mut metrics = Self::default();
        metrics.registry.register_collector(collector);
        metrics
    }

    /// The registry, for metrics counted elsewhere (the gateway's UDP listeners).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The upstream families (refusals, failures, ejections per host and endpoint), for
    /// the [`super::Upstreams`] that counts into them.
    pub fn upstream(&self) -> UpstreamMetrics {
        self.upstream.clone()
    }

    /// Remove the series of a pod that is gone: its inbound connections are labelled
    /// with the pod's name, so without this `/metrics` keeps every pod the node ever ran.
    pub fn forget_pod(&self, pod: &str) {
        let labels = RouteLabels {
            direction: "inbound",
            route: "inbound".into(),
            backend: pod.to_owned(),
        };
        self.remove_series(&labels);
    }

    /// Remove every series of one route label set.
    fn remove_series(&self, labels: &RouteLabels) {
        for family in [&self.connections, &self.errors, &self.refused] {
            family.remove(labels);
        }
        for flow in ["upstream", "downstream"] {
            self.bytes.remove(&ByteLabels {
                route: labels.clone(),
                flow,
            });
        }
    }

    /// Remove the outbound series of backends that `live` no longer names (their Service
    /// or routing object is gone), as [`ProxyMetrics::forget_pod`] does for pods.
    pub fn retain_backends(&self, live: impl Fn(&str) -> bool) {
        let mut outbound = crate::sync::lock(&self.outbound);
        let gone: Vec<RouteLabels> = outbound
            .iter()
            .filter(|labels| !matches!(labels.backend.as_str(), "passthrough" | "none"))
            .filter(|labels| !live(&labels.backend))
            .cloned()
            .collect();
        for labels in gone {
            outbound.remove(&labels);
            self.remove_series(&labels);
        }
    }

    pub fn observe(&self, record: &ConnectionRecord) {
        let direction = record.direction.as_str();
        let (route, backend) = record.route_and_backend();
        let labels = RouteLabels {
            direction,
            route,
            backend,
        };
        self.connections.get_or_create(&labels).inc();
        if let Some(source) = record.client_address {
            self.client_address
                .get_or_create(&ClientAddressLabels {
                    source: source.as_str(),
                })
                .inc();
        }
        if record.direction == super::connection::Direction::Outbound {
            let mut outbound = crate::sync::lock(&self.outbound);
            if !outbound.contains(&labels) {
                outbound.insert(labels.clone());
            }
        }
        for (flow, n) in [
            ("upstream", record.bytes.upstream_bytes),
            ("downstream", record.bytes.downstream_bytes),
        ] {
            if n > 0 {
                let byte_labels = ByteLabels {
                    route: labels.clone(),
                    flow,
                };
                self.bytes.get_or_create(&byte_labels).inc_by(n);
            }
        }
        if let Outcome::Failed(error) = &record.outcome {
            let family = if error.is_refusal() {
                &self.refused
            } else {
                &self.errors
            };
            family.get_or_create(&labels).inc();
            self.failures
                .get_or_create(&FailureLabels {
                    direction,
                    kind: error.kind(),
                })
                .inc();
            if let Some(reason) = error.tls_reason() {
                self.tls_refused
                    .get_or_create(&TlsLabels { direction, reason })
                    .inc();
            }
        }
    }

    /// `/metrics` as an HTTP response (the agent's and the gateway's admin ports).
    pub fn response(&self) -> impl axum::response::IntoResponse {
        openmetrics_response(&self.registry)
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

/// The content type of OpenMetrics' text format, which `prometheus_client` writes.
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `registry` as a `/metrics` response: its OpenMetrics text, with the OpenMetrics
/// content type (every admin port of ours serves metrics through this).
pub fn openmetrics_response(registry: &Registry) -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        encode(registry),
    )
}

/// The OpenMetrics text of `registry`; a failure is logged and leaves what was written.
fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(error) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%error, "encoding metrics");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::connection::{Direction, ProxyError};
    use crate::proxy::forward::{CopyMode, Forwarded};
    use crate::proxy::routes::Target;

    /// `openmetrics_response`, which every admin port's `/metrics` (the agent's, the
    /// gateway's, the egress gateway's) answers with: the OpenMetrics content type and
    /// the registry's text, ending in `# EOF`.
    #[tokio::test]
    async fn a_registry_is_served_as_openmetrics() {
        use axum::response::IntoResponse;
        let mut registry = Registry::default();
        let served: Counter = Counter::default();
        served.inc();
        registry.register("served", "Connections served", served);
        let response = openmetrics_response(&registry).into_response();
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("served_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_connection_counts_once_with_its_bytes_per_route_and_backend() {
        let metrics = ProxyMetrics::default();
        let record = ConnectionRecord {
            pod: "default/client".into(),
            direction: Direction::Outbound,
            client: "10.244.0.5:40000".parse().unwrap(),
            original_dst: None,
            sni: None,
            target: Some(Target::Endpoint {
                service: "default/echo:80".into(),
                route: Some("VirtualService default/echo".into()),
                backend: "default/echo:80 subset v1".into(),
                pod: "default/echo-v1".into(),
                addr: "10.244.0.9:9000".parse().unwrap(),
                tunnel_to: None,
            }),
            outcome: Outcome::Closed,
            copy_mode: CopyMode::Splice,
            client_address: None,
            bytes: Forwarded {
                upstream_bytes: 5,
                downstream_bytes: 11,
                reset: false,
            },
            unix_ms: 0,
            duration_ms: 0,
            started: std::time::Instant::now(),
        };
        metrics.observe(&record);
        metrics.observe(&record);
        let text = metrics.encode();
        let labels = r#"direction="outbound",route="VirtualService default/echo",backend="default/echo:80 subset v1""#;
        assert!(
            text.contains(&format!(
                "interceptor_proxy_connections_total{{{labels}}} 2\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "interceptor_proxy_bytes_total{{{labels},flow=\"upstream\"}} 10\n"
            )),
            "{text}"
        );
        assert!(!text.contains("interceptor_proxy_errors_total{"), "{text}");
    }

    #[test]
    fn tls_passthrough_refusals_are_counted_by_reason() {
        use crate::proxy::sni::ClientHelloError;
        use crate::proxy::ProxyError;
        let metrics = ProxyMetrics::default();
        let errors = [
            ProxyError::ClientHello(ClientHelloError::Timeout(std::time::Duration::from_secs(5))),
            ProxyError::ClientHello(ClientHelloError::NotTls(b"GET".to_vec())),
            ProxyError::ClientHello(ClientHelloError::NotTls(b"SSH".to_vec())),
            ProxyError::NoSniRoute {
                service: "gateway default/gw port 8000".into(),
                sni: Some("c.example.com".into()),
            },
        ];
        for error in errors {
            let mut record = ConnectionRecord::start(
                "default/gw".into(),
                Direction::Gateway,
                "10.0.0.1:1".parse().unwrap(),
            );
            record.finish(Err(error));
            metrics.observe(&record);
        }
        let text = metrics.encode();
        for (reason, n) in [("timeout", 1), ("not_tls", 2), ("no_route", 1)] {
            let line = format!(
                "interceptor_proxy_tls_refused_total{{direction=\"gateway\",reason=\"{reason}\"}} {n}\n"
            );
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(
            text.contains(
                "interceptor_proxy_failures_total{direction=\"gateway\",kind=\"client_hello\"} 3\n"
            ),
            "{text}"
        );
    }

    /// A connection let in as the node's probe is counted apart from the rest of the
    /// pod's inbound traffic, and its access log line says so.
    #[test]
    fn a_node_probe_counts_under_its_own_route() {
        let metrics = ProxyMetrics::default();
        let mut record = ConnectionRecord::start(
            "demo/server".into(),
            Direction::Inbound,
            "169.254.7.127:40000".parse().unwrap(),
        );
        for node_probe in [true, true, false] {
            record.target = Some(Target::Local {
                addr: "10.244.0.9:9000".parse().unwrap(),
                node_probe,
            });
            record.finish(Ok(()));
            metrics.observe(&record);
        }
        let text = metrics.encode();
        let count = |route: &str| {
            format!(
                "interceptor_proxy_connections_total{{direction=\"inbound\",route=\"{route}\",backend=\"demo/server\"}}"
            )
        };
        assert!(
            text.contains(&format!("{} 2\n", count("node probe"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1\n", count("inbound"))),
            "{text}"
        );
        let line = crate::proxy::log::access_log_line(&record);
        assert_eq!(line["route"], "inbound", "{line}");
        record.target = Some(Target::Local {
            addr: "10.244.0.9:9000".parse().unwrap(),
            node_probe: true,
        });
        let line = crate::proxy::log::access_log_line(&record);
        assert_eq!(line["route"], "node probe", "{line}");
    }

    /// A deleted pod's inbound series go; another pod's stay.
    #[test]
    fn a_removed_pod_leaves_no_series() {
        let metrics = ProxyMetrics::default();
        for pod in ["demo/gone", "demo/kept"] {
            metrics.observe(&ConnectionRecord {
                pod: pod.into(),
                direction: Direction::Inbound,
                client: "10.244.0.5:40000".parse().unwrap(),
                original_dst: None,
                sni: None,
                target: Some(Target::Local {
                    addr: "10.244.0.9:9000".parse().unwrap(),
                    node_probe: false,
                }),
                outcome: Outcome::Failed(std::sync::Arc::new(ProxyError::Connect {
                    addr: "10.244.0.9:9000".parse().unwrap(),
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                })),
                copy_mode: CopyMode::Splice,
                client_address: None,
                bytes: Forwarded {
                    upstream_bytes: 5,
                    downstream_bytes: 0,
                    reset: false,
                },
                unix_ms: 0,
                duration_ms: 0,
                started: std::time::Instant::now(),
            });
        }
        assert!(metrics.encode().contains("backend=\"demo/gone\""));
        metrics.forget_pod("demo/gone");
        let text = metrics.encode();
        assert!(!text.contains("demo/gone"), "{text}");
        assert!(
            text.contains("interceptor_proxy_errors_total{direction=\"inbound\",route=\"inbound\",backend=\"demo/kept\"} 1"),
            "{text}"
        );
    }

    /// Refusals and failures are told apart by the error's type, not its text.
    #[test]
    fn failures_are_counted_by_kind() {
        let metrics = ProxyMetrics::default();
        let failed = |error: ProxyError| ConnectionRecord {
            outcome: Outcome::Failed(std::sync::Arc::new(error)),
            ..ConnectionRecord::start(
                "demo/client".into(),
                Direction::Outbound,
                "10.244.0.5:40000".parse().unwrap(),
            )
        };
        metrics.observe(&failed(ProxyError::Refused {
            service: "demo/echo:80".into(),
            route: "circuit breaker".into(),
            reason: "maxConnections (1) open".into(),
        }));
        metrics.observe(&failed(ProxyError::NoOriginalDestination(
            std::io::ErrorKind::NotFound.into(),
        )));
        metrics.observe(&failed(ProxyError::NoOriginalDestination(
            std::io::ErrorKind::NotFound.into(),
        )));
        let text = metrics.encode();
        for line in [
            "interceptor_proxy_failures_total{direction=\"outbound\",kind=\"refused\"} 1\n",
            "interceptor_proxy_failures_total{direction=\"outbound\",kind=\"no_original_destination\"} 2\n",
            "interceptor_proxy_refused_total{direction=\"outbound\",route=\"none\",backend=\"none\"} 1\n",
            "interceptor_proxy_errors_total{direction=\"outbound\",route=\"none\",backend=\"none\"} 2\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    /// The outbound series of a backend whose Service is gone are removed; others stay.
    #[test]
    fn series_of_gone_backends_are_removed() {
        let metrics = ProxyMetrics::default();
        for backend in ["demo/gone:80", "demo/kept:80"] {
            metrics.observe(&ConnectionRecord {
                target: Some(Target::Endpoint {
                    service: backend.into(),
                    route: None,
                    backend: backend.into(),
                    pod: "demo/echo".into(),
                    addr: "10.244.0.9:9000".parse().unwrap(),
                    tunnel_to: None,
                }),
                outcome: Outcome::Closed,
                ..ConnectionRecord::start(
                    "demo/client".into(),
                    Direction::Outbound,
                    "10.244.0.5:40000".parse().unwrap(),
                )
            });
        }
        metrics.retain_backends(|name| name == "demo/kept:80");
        let text = metrics.encode();
        assert!(!text.contains("demo/gone:80"), "{text}");
        assert!(text.contains("backend=\"demo/kept:80\"} 1"), "{text}");
    }
}
