//! Prometheus metrics of the proxy, per route and backend, counted as each connection
//! ends (from its [`ConnectionRecord`]): connections, bytes each way, errors (no
//! endpoint, connect failure, no original destination) and refusals (a rule whose weights
//! are all zero, or a policy that denies the connection), and the upstream families of
//! [`super::upstream`]. Served as text on the admin port's `/metrics`.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::listener::{ConnectionRecord, Direction};
use super::routes::Target;
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

#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    connections: Family<RouteLabels, Counter>,
    bytes: Family<ByteLabels, Counter>,
    errors: Family<RouteLabels, Counter>,
    refused: Family<RouteLabels, Counter>,
    upstream: UpstreamMetrics,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("interceptor");
        let connections = Family::<RouteLabels, Counter>::default();
        let bytes = Family::<ByteLabels, Counter>::default();
        let errors = Family::<RouteLabels, Counter>::default();
        let refused = Family::<RouteLabels, Counter>::default();
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
        let upstream = UpstreamMetrics::default();
        upstream.register(&mut registry);
        Self {
            registry,
            connections,
            bytes,
            errors,
            refused,
            upstream,
        }
    }
}

impl ProxyMetrics {
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
        for family in [&self.connections, &self.errors, &self.refused] {
            family.remove(&labels);
        }
        for flow in ["upstream", "downstream"] {
            self.bytes.remove(&ByteLabels {
                route: labels.clone(),
                flow,
            });
        }
    }

    pub fn observe(&self, record: &ConnectionRecord) {
        let direction = match record.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Gateway => "gateway",
        };
        let (route, backend) = match &record.target {
            Some(Target::Endpoint { route, backend, .. })
            | Some(Target::NoEndpoints { route, backend, .. }) => (
                route.clone().unwrap_or_else(|| "service".into()),
                backend.clone(),
            ),
            Some(Target::Refused { route, service, .. }) => (route.clone(), service.clone()),
            Some(Target::Passthrough { .. }) => ("passthrough".into(), "passthrough".into()),
            Some(Target::Local { .. }) => ("inbound".into(), record.pod.clone()),
            None => ("none".into(), "none".into()),
        };
        let labels = RouteLabels {
            direction,
            route,
            backend,
        };
        self.connections.get_or_create(&labels).inc();
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
        if matches!(record.target, Some(Target::Refused { .. })) {
            self.refused.get_or_create(&labels).inc();
        } else if record.outcome != "closed" && record.outcome != "reset" {
            self.errors.get_or_create(&labels).inc();
        }
    }

    /// `/metrics` as an HTTP response (the agent's and the gateway's admin ports).
    pub fn response(&self) -> impl axum::response::IntoResponse {
        (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            self.encode(),
        )
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "encoding metrics");
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::forward::{CopyMode, Forwarded};

    #[test]
    fn a_connection_counts_once_with_its_bytes_per_route_and_backend() {
        let metrics = ProxyMetrics::default();
        let record = ConnectionRecord {
            pod: "default/client".into(),
            direction: Direction::Outbound,
            client: "10.244.0.5:40000".parse().unwrap(),
            original_dst: None,
            target: Some(Target::Endpoint {
                service: "default/echo:80".into(),
                route: Some("VirtualService default/echo".into()),
                backend: "default/echo:80 subset v1".into(),
                pod: "default/echo-v1".into(),
                addr: "10.244.0.9:9000".parse().unwrap(),
            }),
            outcome: "closed".into(),
            copy_mode: CopyMode::Splice,
            bytes: Forwarded {
                upstream_bytes: 5,
                downstream_bytes: 11,
                reset: false,
            },
            unix_ms: 0,
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
                target: Some(Target::Local {
                    addr: "10.244.0.9:9000".parse().unwrap(),
                }),
                outcome: "connect 10.244.0.9:9000: Connection refused".into(),
                copy_mode: CopyMode::Splice,
                bytes: Forwarded {
                    upstream_bytes: 5,
                    downstream_bytes: 0,
                    reset: false,
                },
                unix_ms: 0,
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
}
