//! The agent's in-memory model of the Kubernetes objects it acts on (namespaces, pods,
//! services), independent of the source that fed it (manifest directory or API server).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
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
    /// `status.podIP`; absent for pods whose address the agent learns from the CNI plugin.
    pub ip: Option<Ipv4Addr>,
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
    /// `spec.clusterIP`; `None` for headless (`"None"`) and ExternalName services.
    pub cluster_ip: Option<Ipv4Addr>,
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

/// One port of one EndpointSlice with the slice's ready IPv4 endpoints. Slices group
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
    pub ip: Ipv4Addr,
    /// `targetRef` when it names a Pod; `None` for hand-made endpoints (e.g. an external
    /// database behind a selector-less service).
    pub pod: Option<PodKey>,
}

/// One backend of a service port: a selected pod and the address to reach it on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub pod: PodKey,
    pub addr: SocketAddrV4,
}

impl Pod {
    pub fn key(&self) -> PodKey {
        PodKey::new(&self.namespace, &self.name)
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

    /// The service whose cluster IP and TCP port are `ip:port`. When two services claim the
    /// same address (an invalid cluster), the first by key wins so the answer is stable.
    pub fn service_for(&self, ip: Ipv4Addr, port: u16) -> Option<(&Service, &ServicePort)> {
        self.services
            .values()
            .filter(|svc| svc.cluster_ip == Some(ip))
            .find_map(|svc| {
                svc.ports
                    .iter()
                    .find(|sp| sp.port == port && sp.is_tcp())
                    .map(|sp| (svc, sp))
            })
    }

    /// The backends of `sp`, sorted by pod key.
    ///
    /// When the model has EndpointSlices for the service (`endpoint_slices`, always the
    /// case with the Kubernetes source), they are the answer: the ready endpoints of the
    /// slice ports with `sp`'s name and protocol, each once, including pods of other nodes.
    /// An endpoint without a Pod `targetRef` is named `<service namespace>/<address>`.
    ///
    /// Otherwise the service's selector picks pods from the model. A pod's address comes
    /// from `extra_pod_ips` (what the CNI plugin reported, fresher than any manifest) or
    /// else its `status.podIP`; pods with neither, or lacking the named target port, are
    /// left out.
    pub fn endpoints(
        &self,
        svc: &Service,
        sp: &ServicePort,
        extra_pod_ips: &HashMap<PodKey, Ipv4Addr>,
    ) -> Vec<Endpoint> {
        if let Some(slice_ports) = self.endpoint_slices.get(&svc.key()) {
            return slice_endpoints(svc, sp, slice_ports);
        }
        // BTreeMap iteration is already in key order, which keeps the result deterministic.
        self.pods
            .iter()
            .filter(|(_, pod)| svc.selects(pod))
            .filter_map(|(key, pod)| {
                let ip = extra_pod_ips.get(key).copied().or(pod.ip)?;
                let port = match &sp.target_port {
                    TargetPort::Number(n) => *n,
                    TargetPort::Name(name) => pod.container_port(name)?,
                };
                Some(Endpoint {
                    pod: key.clone(),
                    addr: SocketAddrV4::new(ip, port),
                })
            })
            .collect()
    }
}

fn slice_endpoints(svc: &Service, sp: &ServicePort, slice_ports: &[SlicePort]) -> Vec<Endpoint> {
    let mut endpoints: Vec<Endpoint> = slice_ports
        .iter()
        .filter(|p| p.name == sp.name && p.protocol == sp.protocol)
        .flat_map(|p| {
            p.endpoints.iter().map(move |e| Endpoint {
                pod: e
                    .pod
                    .clone()
                    .unwrap_or_else(|| PodKey::new(&svc.namespace, e.ip.to_string())),
                addr: SocketAddrV4::new(e.ip, p.port),
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
