//! Where a connection goes. An immutable snapshot, rebuilt and swapped whenever the model
//! or the pod addresses change (new connections see the new table, open ones keep their
//! upstream). A Service ClusterIP:port goes to the backends its routing policy names
//! (an Istio VirtualService `tcp` rule, a Gateway API TCPRoute with the Service as parent,
//! or an SMI TrafficSplit), else round-robin to its own endpoints; anything else is passed
//! through to the original destination. In SMI traffic policy mode, a connection between
//! mesh workloads must also be allowed by a TrafficTarget (see `access`).
mod access;
mod compile;
mod gateway;
mod split;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnet::Ipv4Net;

use crate::model::{Endpoint, Model, PodKey};
pub use compile::{Condition, RouteStatus};
pub use gateway::{GatewayTable, ListenerStatus};
use split::Split;

/// The gateway name of the mesh's own traffic in VirtualService `gateways` lists.
pub const MESH_GATEWAY: &str = "mesh";

/// An immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    services: HashMap<SocketAddrV4, ServiceRoute>,
    /// Addresses of the pods enrolled on this node.
    local_enrolled: HashSet<Ipv4Addr>,
    /// Namespace and labels of the model's pods, for source matches.
    sources: HashMap<PodKey, Source>,
    /// Whether each routing object was accepted, and why not.
    statuses: Vec<RouteStatus>,
    /// SMI traffic policy mode; `None` is permissive mode.
    access: Option<access::AccessPolicy>,
    /// Which pod has an address: what CNI reported, then `status.podIP`.
    pods_by_ip: HashMap<Ipv4Addr, PodKey>,
}

#[derive(Debug, Clone)]
struct Source {
    namespace: String,
    labels: BTreeMap<String, String>,
    service_account: String,
}

impl Source {
    /// What routing and access policy need to know of a pod.
    fn of(pod: &crate::model::Pod) -> Self {
        Self {
            namespace: pod.namespace.clone(),
            labels: pod.labels.clone(),
            service_account: pod.service_account.clone(),
        }
    }
}

/// Why SMI mode turns a connection away.
const ACCESS_POLICY: &str = "SMI access policy";

#[derive(Debug)]
struct ServiceRoute {
    /// `namespace/name:port`.
    service: String,
    /// The Service's own endpoints, used when no policy (or no rule) applies.
    default: Backend,
    policy: Option<Policy>,
}

/// The routing object that owns a Service port.
#[derive(Debug)]
struct Policy {
    /// `Kind namespace/name`.
    route: String,
    /// Tried in order; the first that matches decides. A policy without conditions has
    /// one rule that always matches.
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy of one unconditional rule: `route` splits over `backends` by weight.
    fn single(route: String, backends: Vec<(Backend, u32)>) -> Self {
        Self {
            route,
            rules: vec![Rule {
                matches: Vec::new(),
                split: Split::new(backends),
            }],
        }
    }
}

#[derive(Debug)]
struct Rule {
    /// ORed; empty matches everything.
    matches: Vec<Match>,
    split: Split,
}

/// One Istio `match` entry: every condition set must hold.
#[derive(Debug, Default)]
struct Match {
    port: Option<u16>,
    destination_subnets: Vec<Ipv4Net>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    /// Empty: the VirtualService's own gateways.
    gateways: Vec<String>,
}

/// One destination: a Service port, or a subset of it, and its endpoints.
#[derive(Debug)]
struct Backend {
    /// `namespace/name:port`, with ` subset <name>` for a subset.
    name: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

impl Backend {
    fn new(name: String, endpoints: Vec<Endpoint>) -> Self {
        // From a random endpoint: a rebuilt table must not send its first connections to
        // the first endpoint every time.
        let start = split::random_below(endpoints.len() as u64) as usize;
        Self {
            name,
            endpoints,
            next: AtomicUsize::new(start),
        }
    }

    fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(&self.endpoints[index])
    }
}

/// Who opened a connection, as far as routing cares.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionSource<'a> {
    /// The enrolled pod whose outbound listener accepted it.
    pub pod: Option<&'a PodKey>,
    /// The gateway that accepted it (`namespace/name`), or `None` for mesh traffic.
    pub gateway: Option<&'a str>,
}

/// The decision for one connection.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A Service endpoint.
    Endpoint {
        service: String,
        /// The routing object that chose the backend, when one did.
        #[serde(skip_serializing_if = "Option::is_none")]
        route: Option<String>,
        backend: String,
        pod: String,
        addr: SocketAddrV4,
    },
    /// The chosen backend has no ready endpoint: the connection is refused.
    NoEndpoints {
        service: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        route: Option<String>,
        backend: String,
    },
    /// The matching rule gives every backend weight zero: the connection is refused.
    Refused {
        service: String,
        route: String,
        reason: String,
    },
    /// Not a Service address: forward to where the application was going.
    Passthrough { addr: SocketAddrV4 },
    /// Inbound: deliver to the application inside the pod.
    Local { addr: SocketAddrV4 },
}

impl RouteTable {
    /// `permissive`: FSM's permissive traffic policy mode; `false` is SMI mode.
    pub fn build(
        model: &Model,
        pod_ips: &HashMap<PodKey, Ipv4Addr>,
        local_enrolled: HashSet<Ipv4Addr>,
        permissive: bool,
    ) -> Self {
        let mut compiled = compile::compile(model, pod_ips);
        let (policy, access_statuses) = access::build(model, !permissive);
        compiled.statuses.extend(access_statuses);
        let mut pods_by_ip: HashMap<Ipv4Addr, PodKey> = model
            .pods
            .iter()
            .filter_map(|(key, pod)| Some((pod.ip?, key.clone())))
            .collect();
        pods_by_ip.extend(pod_ips.iter().map(|(key, ip)| (*ip, key.clone())));
        let sources = model
            .pods
            .iter()
            .map(|(key, pod)| (key.clone(), Source::of(pod)))
            .collect();
        Self {
            services: compiled.services,
            local_enrolled,
            sources,
            statuses: compiled.statuses,
            access: (!permissive).then_some(policy),
            pods_by_ip,
        }
    }

    /// Where a connection goes, and in SMI mode whether it may.
    pub fn resolve(&self, original: SocketAddrV4, source: ConnectionSource<'_>) -> Target {
        let target = self.route(original, source);
        let (service, destination) = match &target {
            Target::Endpoint {
                service, pod, addr, ..
            } => (service.clone(), Some((pod.parse::<PodKey>().ok(), *addr))),
            // A pod dialled directly is still a mesh workload; anything else is not.
            Target::Passthrough { addr } => (
                // Not the address: it would make one metric series per destination.
                "passthrough".to_owned(),
                self.pods_by_ip
                    .get(addr.ip())
                    .map(|pod| (Some(pod.clone()), *addr)),
            ),
            _ => return target,
        };
        let Some((pod, addr)) = destination else {
            return target;
        };
        match self.check_access(source.pod, pod.as_ref(), addr.port()) {
            Ok(()) => target,
            Err(reason) => Target::Refused {
                service,
                route: ACCESS_POLICY.into(),
                reason,
            },
        }
    }

    /// Inbound, in SMI mode: whether the client at `client` may reach `pod` on `port`.
    pub fn admit_inbound(&self, client: Ipv4Addr, pod: &PodKey, port: u16) -> Result<(), String> {
        if self.access.is_none() {
            return Ok(());
        }
        let Some(source) = self.pods_by_ip.get(&client) else {
            return Err(format!("{ACCESS_POLICY}: {client} is not a mesh workload"));
        };
        self.check_access(Some(source), Some(pod), port)
    }

    fn check_access(
        &self,
        source: Option<&PodKey>,
        destination: Option<&PodKey>,
        port: u16,
    ) -> Result<(), String> {
        let Some(policy) = &self.access else {
            return Ok(());
        };
        let identity = |key: Option<&PodKey>, what: &str| {
            key.and_then(|k| self.sources.get(k))
                .map(|s| (s.namespace.clone(), s.service_account.clone()))
                .ok_or_else(|| format!("the {what} is not a known mesh workload"))
        };
        let from = identity(source, "source")?;
        let to = identity(destination, "destination")?;
        if policy.allows(&from, &to, port) {
            return Ok(());
        }
        Err(format!(
            "no TrafficTarget lets ServiceAccount {}/{} reach ServiceAccount {}/{} on port {port}",
            from.0, from.1, to.0, to.1
        ))
    }

    fn route(&self, original: SocketAddrV4, source: ConnectionSource<'_>) -> Target {
        let Some(route) = self.services.get(&original) else {
            return Target::Passthrough { addr: original };
        };
        let chosen = route.policy.as_ref().and_then(|policy| {
            policy
                .rules
                .iter()
                .find(|rule| {
                    rule.matches.is_empty()
                        || rule.matches.iter().any(|m| {
                            let pod = source.pod.and_then(|key| self.sources.get(key));
                            holds(m, original, pod, source.gateway)
                        })
                })
                .map(|rule| (policy, rule))
        });
        let (route_name, backend) = match chosen {
            None => (None, &route.default),
            Some((policy, rule)) => match rule.split.pick() {
                Some(backend) => (Some(policy.route.clone()), backend),
                None => {
                    return Target::Refused {
                        service: route.service.clone(),
                        route: policy.route.clone(),
                        reason: "every backend of the matching rule has weight 0".into(),
                    }
                }
            },
        };
        match backend.pick() {
            Some(endpoint) => Target::Endpoint {
                service: route.service.clone(),
                route: route_name,
                backend: backend.name.clone(),
                pod: endpoint.pod.to_string(),
                addr: endpoint.addr,
            },
            None => Target::NoEndpoints {
                service: route.service.clone(),
                route: route_name,
                backend: backend.name.clone(),
            },
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

    /// Every routing object and whether it is in force, for the config dump.
    pub fn statuses(&self) -> &[RouteStatus] {
        &self.statuses
    }
}

/// Whether one Istio `match` entry holds for a connection to `original` from `pod` (when
/// known), accepted by `gateway` (`None`: the mesh).
fn holds(m: &Match, original: SocketAddrV4, pod: Option<&Source>, gateway: Option<&str>) -> bool {
    m.port.is_none_or(|port| port == original.port())
        && (m.destination_subnets.is_empty()
            || m.destination_subnets
                .iter()
                .any(|net| net.contains(original.ip())))
        && (m.source_labels.is_empty()
            || pod.is_some_and(|p| {
                m.source_labels
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
            }))
        && m.source_namespace
            .as_ref()
            .is_none_or(|ns| pod.is_some_and(|p| &p.namespace == ns))
        && (m.gateways.is_empty() || {
            let gateway = gateway.unwrap_or(MESH_GATEWAY);
            m.gateways.iter().any(|g| gateway_matches(g, gateway))
        })
}

/// A match's `gateways` entry (qualified as `namespace/name`, or `mesh`) against the
/// gateway that accepted the connection (`namespace/name`, or `mesh`).
fn gateway_matches(entry: &str, gateway: &str) -> bool {
    entry == gateway
}

#[cfg(test)]
mod tests;
