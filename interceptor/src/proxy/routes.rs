//! Where a connection goes: Service ClusterIP:port to one of its endpoints (round-robin),
//! anything else passed through to the original destination.
use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::model::{Endpoint, Model, PodKey};

/// An immutable routing snapshot; rebuilt and swapped whenever the model or the set
/// of pod addresses changes.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<SocketAddrV4, ServiceRoute>,
    /// Addresses of the pods enrolled on this node.
    local_enrolled: HashSet<Ipv4Addr>,
}

#[derive(Debug)]
struct ServiceRoute {
    service: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A Service endpoint.
    Endpoint {
        service: String,
        pod: String,
        addr: SocketAddrV4,
    },
    /// A Service with no ready endpoint: the connection is refused.
    NoEndpoints { service: String },
    /// Not a Service address: forward to where the application was going.
    Passthrough { addr: SocketAddrV4 },
    /// Inbound: deliver to the application inside the pod.
    Local { addr: SocketAddrV4 },
}

impl RouteTable {
    pub fn build(
        model: &Model,
        pod_ips: &HashMap<PodKey, Ipv4Addr>,
        local_enrolled: HashSet<Ipv4Addr>,
    ) -> Self {
        let mut services = HashMap::new();
        for service in model.services.values() {
            let Some(cluster_ip) = service.cluster_ip else {
                continue;
            };
            for port in &service.ports {
                if !port.protocol.eq_ignore_ascii_case("TCP") {
                    continue;
                }
                services.insert(
                    SocketAddrV4::new(cluster_ip, port.port),
                    ServiceRoute {
                        service: format!("{}/{}:{}", service.namespace, service.name, port.port),
                        endpoints: model.endpoints(service, port, pod_ips),
                        next: AtomicUsize::new(0),
                    },
                );
            }
        }
        Self {
            services,
            local_enrolled,
        }
    }

    pub fn resolve(&self, original: SocketAddrV4) -> Target {
        let Some(route) = self.services.get(&original) else {
            return Target::Passthrough { addr: original };
        };
        if route.endpoints.is_empty() {
            return Target::NoEndpoints {
                service: route.service.clone(),
            };
        }
        let index = route.next.fetch_add(1, Ordering::Relaxed) % route.endpoints.len();
        let endpoint = &route.endpoints[index];
        Target::Endpoint {
            service: route.service.clone(),
            pod: endpoint.pod.to_string(),
            addr: endpoint.addr,
        }
    }

    /// Whether `ip` is a pod enrolled on this node (its inbound listener is local).
    pub fn is_local_enrolled(&self, ip: &Ipv4Addr) -> bool {
        self.local_enrolled.contains(ip)
    }

    /// Number of Service ports known, for the config dump.
    pub fn service_ports(&self) -> usize {
        self.services.len()
    }
}
