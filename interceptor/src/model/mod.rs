//! The agent's in-memory model of the Kubernetes objects it acts on (namespaces, pods,
//! services), independent of the source that fed it (manifest directory or API server).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use imbl::OrdMap;

use serde::{Serialize, Serializer};

mod enrollment;
pub mod routing;

pub use enrollment::{
    unrecognized as unrecognized_enrollment, Enrollment, ANNOTATION_SIDECAR_INJECTION,
    LABEL_DATAPLANE_MODE,
};
pub use routing::RoutingObjects;

fn is_empty_routing(routing: &Arc<RoutingObjects>) -> bool {
    routing.is_empty()
}

/// Error of parsing a `namespace/name` key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not of the form namespace/name")]
pub struct ParseKeyError(pub String);

macro_rules! object_key {
    ($(#[$doc:meta])* $key:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $key {
            pub namespace: String,
            pub name: String,
        }

        impl $key {
            pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
                Self {
                    namespace: namespace.into(),
                    name: name.into(),
                }
            }
        }

        impl fmt::Display for $key {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}/{}", self.namespace, self.name)
            }
        }

        impl FromStr for $key {
            type Err = ParseKeyError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s.split_once('/') {
                    Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                        Ok(Self::new(ns, name))
                    }
                    _ => Err(ParseKeyError(s.to_string())),
                }
            }
        }

        // As a string so that maps keyed by it become JSON objects on /config_dump.
        impl Serialize for $key {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
    };
}

object_key!(
    /// Identity of a pod: namespace and name, displayed and serialized as `ns/name`.
    PodKey
);
object_key!(
    /// Identity of a service: namespace and name, displayed and serialized as `ns/name`.
    ServiceKey
);

/// Everything the agent knows about the cluster, as of one load or watch event.
///
/// The collections are persistent maps: a clone shares everything and costs O(1), and an
/// update costs O(log n), so a source can publish a new model per event without copying
/// the cluster (the kube source keeps one model and applies each event to it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Model {
    pub namespaces: OrdMap<String, Namespace>,
    pub pods: OrdMap<PodKey, Pod>,
    pub services: OrdMap<ServiceKey, Service>,
    /// What the EndpointSlices (`discovery.k8s.io/v1`) of each service say, merged across
    /// the service's slices. A service with an entry here (even an empty one) takes its
    /// endpoints from it rather than from its selector; see [`Model::endpoints`].
    #[serde(skip_serializing_if = "OrdMap::is_empty")]
    pub endpoint_slices: OrdMap<ServiceKey, Vec<SlicePort>>,
    /// VirtualServices, DestinationRules, TCPRoutes and TrafficSplits; shared between
    /// models until a routing object changes.
    #[serde(skip_serializing_if = "is_empty_routing")]
    pub routing: Arc<RoutingObjects>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// The IPv4 address of `status.podIPs` (or `status.podIP`); absent for pods whose
    /// address the agent learns from the CNI plugin.
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address of `status.podIPs` (or `status.podIP`), for dual-stack and
    /// IPv6-only pods.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// `spec.serviceAccountName`, `"default"` when unset.
    pub service_account: String,
    /// Ports of `spec.containers[*].ports` (Kubernetes keeps their names unique per pod).
    pub container_ports: Vec<NamedPort>,
    /// `metadata.uid`: what kubelet names the pod's cgroup after, so the agent can find a
    /// pod that ran before it (see [`crate::inpod::discover`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `spec.nodeName`: the node the pod is scheduled on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// `spec.hostNetwork`: the pod shares its node's netns (CNI never sees it, and the
    /// agent never enrolls it).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamedPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// The IPv4 address of `spec.clusterIPs` (or `spec.clusterIP`); `None` for headless
    /// (`"None"`), ExternalName and IPv6-only services.
    pub cluster_ip: Option<Ipv4Addr>,
    /// The IPv6 address of `spec.clusterIPs`, for dual-stack and IPv6-only services.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_ipv6: Option<Ipv6Addr>,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    /// `TCP`, `UDP` or `SCTP`, as spelled in the manifest (`TCP` when unset).
    pub protocol: String,
}

/// Where a service port sends traffic on the selected pods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved per pod.
    Name(String),
}

/// One port of one EndpointSlice with the slice's ready endpoints (IPv4 or IPv6, as the
/// slice's `addressType` says). Slices group
/// endpoints by their port numbers, so one service port (`name`) may appear several times
/// with different numbers when a named target port resolves differently per pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    /// The service port's name; `None` for the unnamed port of a single-port service.
    pub name: Option<String>,
    /// The port number on the endpoints (the resolved target port).
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP` (`TCP` when unset).
    pub protocol: String,
    /// The ready endpoints (`conditions.ready` true or unset), in slice order.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One ready endpoint of an EndpointSlice: its first address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    pub ip: IpAddr,
    /// `targetRef` when it names a Pod; `None` for hand-made endpoints (e.g. an external
    /// database behind a selector-less service).
    pub pod: Option<PodKey>,
}

/// One backend of a service port: a selected pod and the address to reach it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub pod: PodKey,
    pub addr: SocketAddr,
}

/// An address family: a Service VIP of one family routes to endpoints of that family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// A pod's addresses as the CNI plugin reported them, one per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PodAddrs {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl PodAddrs {
    pub fn v4(ip: Ipv4Addr) -> Self {
        Self {
            v4: Some(ip),
            v6: None,
        }
    }

    /// Every address, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
    }

    /// The pod's address of `family`: what the CNI plugin reported (`cni`), fresher than
    /// any manifest, else `status.podIPs`.
    pub fn ip_of(&self, family: IpFamily, cni: Option<&PodAddrs>) -> Option<IpAddr> {
        match family {
            IpFamily::V4 => cni.and_then(|a| a.v4).or(self.ip).map(IpAddr::V4),
            IpFamily::V6 => cni.and_then(|a| a.v6).or(self.ipv6).map(IpAddr::V6),
        }
    }

    /// Every address of the pod (`status.podIPs`), IPv4 first.
    pub fn ips(&self) -> impl Iterator<Item = IpAddr> {
        PodAddrs {
            v4: self.ip,
            v6: self.ipv6,
        }
        .iter()
    }

    /// The number of the container port called `name`.
    pub fn container_port(&self, name: &str) -> Option<u16> {
        self.container_ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(&self.namespace, &self.name)
    }

    /// The service's cluster IPs, IPv4 first (`spec.clusterIPs`).
    pub fn cluster_ips(&self) -> impl Iterator<Item = IpAddr> {
        self.cluster_ip
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.cluster_ipv6.map(IpAddr::V6))
    }

    /// Whether the service's selector picks `pod`. An empty selector picks nothing: such
    /// services have hand-made endpoints in Kubernetes, not "every pod".
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
    }
}

impl ServicePort {
    pub fn is_tcp(&self) -> bool {
        self.protocol == "TCP"
    }
}

impl Model {
    pub fn pod(&self, key: &PodKey) -> Option<&Pod> {
        self.pods.get(key)
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// Whether the pod is to be intercepted and why (DESIGN.md section 5); `None` when the
    /// pod is unknown.
    pub fn enrollment(&self, key: &PodKey) -> Option<Enrollment> {
        let pod = self.pods.get(key)?;
        Some(enrollment::decide(pod, self.namespaces.get(&pod.namespace)))
    }

    /// The service one of whose cluster IPs and TCP port are `ip:port`. When two services
    /// claim the same address (an invalid cluster), the first by key wins so the answer is
    /// stable.
    pub fn service_for(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        self.services
            .values()
            .filter(|svc| svc.cluster_ips().any(|vip| vip == ip))
            .find_map(|svc| {
                svc.ports
                    .iter()
                    .find(|sp| sp.port == port && sp.is_tcp())
                    .map(|sp| (svc, sp))
            })
    }

    /// The backends of `sp` of one address `family` (a VIP's: an IPv6 ClusterIP goes to
    /// IPv6 endpoints), sorted by pod key.
    ///
    /// When the model has EndpointSlices for the service (`endpoint_slices`, always the
    /// case with the Kubernetes source), they are the answer: the ready endpoints of
    /// `family` of the slice ports with `sp`'s name and protocol, each once, including pods
    /// of other nodes. An endpoint without a Pod `targetRef` is named
    /// `<service namespace>/<address>`.
    ///
    /// Otherwise the service's selector picks pods from the model. A pod's address of
    /// `family` comes from `extra_pod_ips` (what the CNI plugin reported, fresher than any
    /// manifest) or else its `status.podIPs`; pods with neither, or lacking the named
    /// target port, are left out.
    pub fn endpoints(
        &self,
        svc: &Service,
        sp: &ServicePort,
        extra_pod_ips: &HashMap<PodKey, PodAddrs>,
        family: IpFamily,
    ) -> Vec<Endpoint> {
        if let Some(slice_ports) = self.endpoint_slices.get(&svc.key()) {
            return slice_endpoints(svc, sp, slice_ports, family);
        }
        // BTreeMap iteration is already in key order, which keeps the result deterministic.
        self.pods
            .iter()
            .filter(|(_, pod)| svc.selects(pod))
            .filter_map(|(key, pod)| {
                let ip = pod.ip_of(family, extra_pod_ips.get(key))?;
                let port = match &sp.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => pod.container_port(name)?,
                };
                Some(Endpoint {
                    pod: key.clone(),
                    addr: SocketAddr::new(ip, port),
                })
            })
            .collect()
    }
}

fn slice_endpoints(
    svc: &Service,
    sp: &ServicePort,
    slice_ports: &[SlicePort],
    family: IpFamily,
) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = slice_ports
        .iter()
        .filter(|p| p.name == sp.name && p.protocol == sp.protocol)
        .flat_map(|p| {
            p.endpoints
                .iter()
                .filter(|e| IpFamily::of(e.ip) == family)
                .map(move |e| Endpoint {
                    pod: e
                        .pod
                        .clone()
                        .unwrap_or_else(|| PodKey::new(&svc.namespace, e.ip.to_string())),
                    addr: SocketAddr::new(e.ip, p.port),
                })
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.pod, a.addr).cmp(&(&b.pod, b.addr)));
    // The same endpoint may sit in two slices for a moment while the controller moves it.
    endpoints.dedup();
    endpoints
}

#[cfg(test)]
mod tests;
