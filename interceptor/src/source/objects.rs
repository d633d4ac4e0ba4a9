//! Kubernetes objects to the model: the one conversion both sources use (DESIGN.md
//! section 4), so a directory of manifests and an API server holding the same objects give
//! the same model.
//!
//! Which `apiVersion`/`kind` pairs the agent reads ([`ObjectKind::of`]), and how a Namespace,
//! Pod, Service, EndpointSlice or routing object becomes its model type. Nothing here knows
//! where an object came from: an [`ObjectError`] names the object, the field (a
//! [`FieldPath`]) and what is wrong with its value; the manifest source adds the file, line
//! and column, the Kubernetes source reports it as it is. Decoding the raw document is the
//! caller's part ([`Decode`] for the routing objects), because only the caller knows where a
//! type error points (a line in a file, or nothing for an API server's JSON).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1 as k8s;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::model::routing::{Routed, RoutingObject};
use crate::model::{
    NamedPort, Namespace, Pod, PodKey, Service, ServiceKey, ServicePort, SliceEndpoint, SlicePort,
    TargetPort,
};

/// One step of a path into an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(&'static str),
    Index(usize),
}

/// Where a field is in its object: its steps, and its name, e.g. `spec.ports[0].port`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath {
    segments: Vec<Seg>,
    name: String,
}

impl FieldPath {
    pub fn new(segments: &[Seg]) -> Self {
        let mut name = String::new();
        for seg in segments {
            match seg {
                Seg::Key(key) => {
                    if !name.is_empty() {
                        name.push('.');
                    }
                    name.push_str(key);
                }
                Seg::Index(i) => name.push_str(&format!("[{i}]")),
            }
        }
        Self {
            segments: segments.to_vec(),
            name,
        }
    }

    pub fn segments(&self) -> &[Seg] {
        &self.segments
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Why an object does not convert. Displayed as `Kind ns/name: field: what`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// A well-typed field whose value the agent cannot use, e.g. `clusterIP: banana`, or
    /// (from the API server, where no line can be pointed at) a spec of the wrong shape.
    #[error("{object}: {field}: {message}")]
    InvalidValue {
        /// `Kind ns/name`, e.g. `Service demo/echo`.
        object: String,
        field: FieldPath,
        message: String,
    },
}

impl ObjectError {
    /// The field the error is about.
    pub fn field(&self) -> &FieldPath {
        match self {
            ObjectError::InvalidValue { field, .. } => field,
        }
    }
}

/// Reports a bad value of one object.
struct Invalid {
    object: String,
}

impl Invalid {
    fn at(&self, field: &[Seg], message: impl Into<String>) -> ObjectError {
        ObjectError::InvalidValue {
            object: self.object.clone(),
            field: FieldPath::new(field),
            message: message.into(),
        }
    }
}

/// The kinds of object the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    Routing(RoutingKind),
}

impl ObjectKind {
    /// The kind of an object of `api_version` and `kind`; `None` for one the agent does not
    /// use (a Deployment, a `List`, a version it does not read).
    pub fn of(api_version: &str, kind: &str) -> Option<ObjectKind> {
        Some(match (api_version, kind) {
            ("v1", "Namespace") => ObjectKind::Namespace,
            ("v1", "Pod") => ObjectKind::Pod,
            ("v1", "Service") => ObjectKind::Service,
            ("discovery.k8s.io/v1", "EndpointSlice") => ObjectKind::EndpointSlice,
            _ => ObjectKind::Routing(RoutingKind::of(api_version, kind)?),
        })
    }
}

/// One routing object type (a CRD in a cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoutingKind {
    VirtualServices,
    DestinationRules,
    IstioGateways,
    Gateways,
    TcpRoutes,
    TlsRoutes,
    UdpRoutes,
    TrafficSplits,
    TrafficTargets,
    SmiTcpRoutes,
    UpstreamTrafficSettings,
    LoadBalancerPolicies,
    HealthCheckPolicies,
    Egresses,
    EgressGateways,
}

impl RoutingKind {
    pub const ALL: [RoutingKind; 15] = [
        RoutingKind::VirtualServices,
        RoutingKind::DestinationRules,
        RoutingKind::IstioGateways,
        RoutingKind::Gateways,
        RoutingKind::TcpRoutes,
        RoutingKind::TlsRoutes,
        RoutingKind::UdpRoutes,
        RoutingKind::TrafficSplits,
        RoutingKind::TrafficTargets,
        RoutingKind::SmiTcpRoutes,
        RoutingKind::UpstreamTrafficSettings,
        RoutingKind::LoadBalancerPolicies,
        RoutingKind::HealthCheckPolicies,
        RoutingKind::Egresses,
        RoutingKind::EgressGateways,
    ];

    /// The routing kind of `api_version` and `kind`: every version the agent reads (the
    /// spec fields it uses mean the same in all of them).
    pub fn of(api_version: &str, kind: &str) -> Option<RoutingKind> {
        const ISTIO: [&str; 3] = [
            "networking.istio.io/v1alpha3",
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1",
        ];
        let istio = ISTIO.contains(&api_version);
        Some(match (api_version, kind) {
            (_, "VirtualService") if istio => RoutingKind::VirtualServices,
            (_, "DestinationRule") if istio => RoutingKind::DestinationRules,
            (_, "Gateway") if istio => RoutingKind::IstioGateways,
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "Gateway") => {
                RoutingKind::Gateways
            }
            ("gateway.networking.k8s.io/v1alpha2", "TCPRoute") => RoutingKind::TcpRoutes,
            ("gateway.networking.k8s.io/v1alpha2", "TLSRoute") => RoutingKind::TlsRoutes,
            ("gateway.networking.k8s.io/v1alpha2", "UDPRoute") => RoutingKind::UdpRoutes,
            (
                "split.smi-spec.io/v1alpha4"
                | "split.smi-spec.io/v1alpha3"
                | "split.smi-spec.io/v1alpha2",
                "TrafficSplit",
            ) => RoutingKind::TrafficSplits,
            ("access.smi-spec.io/v1alpha3" | "access.smi-spec.io/v1alpha2", "TrafficTarget") => {
                RoutingKind::TrafficTargets
            }
            ("specs.smi-spec.io/v1alpha4" | "specs.smi-spec.io/v1alpha3", "TCPRoute") => {
                RoutingKind::SmiTcpRoutes
            }
            (
                "policy.flomesh.io/v1alpha1" | "policy.openservicemesh.io/v1alpha1",
                "UpstreamTrafficSetting",
            ) => RoutingKind::UpstreamTrafficSettings,
            ("gateway.flomesh.io/v1alpha1", "LoadBalancerPolicy") => {
                RoutingKind::LoadBalancerPolicies
            }
            ("gateway.flomesh.io/v1alpha1", "HealthCheckPolicy") => {
                RoutingKind::HealthCheckPolicies
            }
            ("policy.flomesh.io/v1alpha1" | "policy.openservicemesh.io/v1alpha1", "Egress") => {
                RoutingKind::Egresses
            }
            ("policy.flomesh.io/v1alpha1", "EgressGateway") => RoutingKind::EgressGateways,
            _ => return None,
        })
    }

    /// The object's `kind`, as errors name it.
    pub fn kind(self) -> &'static str {
        match self {
            RoutingKind::VirtualServices => "VirtualService",
            RoutingKind::DestinationRules => "DestinationRule",
            RoutingKind::IstioGateways | RoutingKind::Gateways => "Gateway",
            RoutingKind::TcpRoutes | RoutingKind::SmiTcpRoutes => "TCPRoute",
            RoutingKind::TlsRoutes => "TLSRoute",
            RoutingKind::UdpRoutes => "UDPRoute",
            RoutingKind::TrafficSplits => "TrafficSplit",
            RoutingKind::TrafficTargets => "TrafficTarget",
            RoutingKind::UpstreamTrafficSettings => "UpstreamTrafficSetting",
            RoutingKind::LoadBalancerPolicies => "LoadBalancerPolicy",
            RoutingKind::HealthCheckPolicies => "HealthCheckPolicy",
            RoutingKind::Egresses => "Egress",
            RoutingKind::EgressGateways => "EgressGateway",
        }
    }
}

/// A routing object's document, decoded by its source: a file's decoder points a type error
/// at its line, the API server's has no line to point at.
pub trait Decode {
    type Error;

    /// The object's metadata, and its spec as `S` (the default when it has none). Called
    /// once.
    fn decode<S: DeserializeOwned + Default>(
        &mut self,
        kind: RoutingKind,
    ) -> Result<(ObjectMeta, S), Self::Error>;

    /// `error`, about the decoded object, as the source reports it.
    fn reject(&self, error: ObjectError) -> Self::Error;
}

/// The routing object of `kind` in `object`; what its spec means is judged when routes are
/// compiled.
pub fn routing_object<D: Decode>(kind: RoutingKind, object: D) -> Result<RoutingObject, D::Error> {
    fn routed<S: DeserializeOwned + Default, D: Decode>(
        kind: RoutingKind,
        mut object: D,
    ) -> Result<Routed<S>, D::Error> {
        let (metadata, spec) = object.decode::<S>(kind)?;
        let (namespace, name) =
            name_and_namespace(kind.kind(), &metadata).map_err(|e| object.reject(e))?;
        Ok(Routed {
            namespace,
            name,
            created: metadata.creation_timestamp.map(|t| t.0.to_string()),
            order: 0,
            spec,
        })
    }
    Ok(match kind {
        RoutingKind::VirtualServices => RoutingObject::VirtualService(routed(kind, object)?),
        RoutingKind::DestinationRules => RoutingObject::DestinationRule(routed(kind, object)?),
        RoutingKind::IstioGateways => RoutingObject::IstioGateway(routed(kind, object)?),
        RoutingKind::Gateways => RoutingObject::Gateway(routed(kind, object)?),
        RoutingKind::TcpRoutes => RoutingObject::TcpRoute(routed(kind, object)?),
        RoutingKind::TlsRoutes => RoutingObject::TlsRoute(routed(kind, object)?),
        RoutingKind::UdpRoutes => RoutingObject::UdpRoute(routed(kind, object)?),
        RoutingKind::TrafficSplits => RoutingObject::TrafficSplit(routed(kind, object)?),
        RoutingKind::TrafficTargets => RoutingObject::TrafficTarget(routed(kind, object)?),
        RoutingKind::SmiTcpRoutes => RoutingObject::SmiTcpRoute(routed(kind, object)?),
        RoutingKind::UpstreamTrafficSettings => {
            RoutingObject::UpstreamTrafficSetting(routed(kind, object)?)
        }
        RoutingKind::LoadBalancerPolicies => {
            RoutingObject::LoadBalancerPolicy(routed(kind, object)?)
        }
        RoutingKind::HealthCheckPolicies => RoutingObject::HealthCheckPolicy(routed(kind, object)?),
        RoutingKind::Egresses => RoutingObject::Egress(routed(kind, object)?),
        RoutingKind::EgressGateways => RoutingObject::EgressGateway(routed(kind, object)?),
    })
}

const NAME: [Seg; 2] = [Seg::Key("metadata"), Seg::Key("name")];

/// `namespace` (`default` when unset) and name of an object; the name is required.
fn name_and_namespace(kind: &str, meta: &ObjectMeta) -> Result<(String, String), ObjectError> {
    let namespace = match meta.namespace.as_deref() {
        None | Some("") => "default".to_string(),
        Some(ns) => ns.to_string(),
    };
    match meta.name.as_deref() {
        Some(name) if !name.is_empty() => Ok((namespace, name.to_string())),
        _ => Err(Invalid {
            object: format!("{kind} {namespace}/?"),
        }
        .at(&NAME, "missing")),
    }
}

/// An enrollment label or annotation value that neither enrolls nor excludes is ignored;
/// the operator hears of it here, once per version of the object read.
fn warn_unrecognized(
    object: &str,
    labels: &std::collections::BTreeMap<String, String>,
    annotations: &std::collections::BTreeMap<String, String>,
) {
    for note in crate::model::unrecognized_enrollment(object, labels, annotations) {
        tracing::warn!("{note}");
    }
}

/// A Namespace: its name, labels and annotations (enrollment reads them).
pub fn namespace(ns: k8s::Namespace) -> Result<Namespace, ObjectError> {
    let meta = ns.metadata;
    let Some(name) = meta.name.filter(|n| !n.is_empty()) else {
        return Err(Invalid {
            object: "Namespace ?".into(),
        }
        .at(&NAME, "missing"));
    };
    let namespace = Namespace {
        name,
        labels: meta.labels.unwrap_or_default(),
        annotations: meta.annotations.unwrap_or_default(),
    };
    warn_unrecognized(
        &format!("namespace {}", namespace.name),
        &namespace.labels,
        &namespace.annotations,
    );
    Ok(namespace)
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// A Pod: identity, labels, annotations, IPv4 and IPv6 addresses, container ports, and what finds
/// it on its node (UID, node name, host network).
pub fn pod(p: k8s::Pod) -> Result<Pod, ObjectError> {
    let (namespace, name) = name_and_namespace("Pod", &p.metadata)?;
    let invalid = Invalid {
        object: format!("Pod {namespace}/{name}"),
    };
    let status = p.status.unwrap_or_default();
    let mut addresses = Vec::new();
    // `podIPs` lists one address per family; `podIP` is its first, and all an older
    // writer (or a hand-made manifest) may set.
    if let Some(ip) = status.pod_ip.filter(|ip| !ip.is_empty()) {
        addresses.push((ip, vec![Seg::Key("status"), Seg::Key("podIP")]));
    }
    for (i, entry) in status.pod_ips.unwrap_or_default().into_iter().enumerate() {
        addresses.push((
            entry.ip,
            vec![
                Seg::Key("status"),
                Seg::Key("podIPs"),
                Seg::Index(i),
                Seg::Key("ip"),
            ],
        ));
    }
    let (ip, ipv6) = one_per_family(&invalid, addresses, "an IP address")?;
    let spec = p.spec.unwrap_or_default();
    let service_account = spec
        .service_account_name
        .filter(|s| !s.is_empty())
        // The deprecated spelling, still accepted by the API server.
        .or(spec.service_account.filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "default".to_string());
    let mut container_ports = Vec::new();
    for (ci, container) in spec.containers.into_iter().enumerate() {
        for (pi, cp) in container.ports.unwrap_or_default().into_iter().enumerate() {
            let port = port_number(cp.container_port).ok_or_else(|| {
                invalid.at(
                    &[
                        Seg::Key("spec"),
                        Seg::Key("containers"),
                        Seg::Index(ci),
                        Seg::Key("ports"),
                        Seg::Index(pi),
                        Seg::Key("containerPort"),
                    ],
                    format!("{} is not a port number (1-65535)", cp.container_port),
                )
            })?;
            container_ports.push(NamedPort {
                name: cp.name.filter(|n| !n.is_empty()),
                port,
            });
        }
    }
    let (labels, annotations) = (
        p.metadata.labels.unwrap_or_default(),
        p.metadata.annotations.unwrap_or_default(),
    );
    warn_unrecognized(&format!("pod {namespace}/{name}"), &labels, &annotations);
    Ok(Pod {
        namespace,
        name,
        labels,
        annotations,
        ip,
        ipv6,
        service_account,
        container_ports,
        uid: p.metadata.uid.filter(|u| !u.is_empty()),
        node_name: spec.node_name.filter(|n| !n.is_empty()),
        host_network: spec.host_network.unwrap_or(false),
    })
}

/// The IPv4 and the IPv6 address among `addresses` (each with its field), the first of
/// each family; a value that is no IP address is an error naming its field.
fn one_per_family(
    invalid: &Invalid,
    addresses: Vec<(String, Vec<Seg>)>,
    expected: &str,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ObjectError> {
    let (mut v4, mut v6) = (None, None);
    for (address, field) in addresses {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => {
                v4.get_or_insert(ip);
            }
            Ok(IpAddr::V6(ip)) => {
                v6.get_or_insert(ip);
            }
            Err(_) => {
                return Err(invalid.at(&field, format!("{address:?} is not {expected}")));
            }
        }
    }
    Ok((v4, v6))
}

/// A Service's cluster IPs, one per family: `spec.clusterIPs` (dual-stack), else
/// `spec.clusterIP`; none when headless (`"None"`) or unset. An address of a family that
/// `spec.ipFamilies` (when set) does not list is an error, as the API server would say.
fn cluster_ips(
    invalid: &Invalid,
    spec: &k8s::ServiceSpec,
) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ObjectError> {
    let mut families = Vec::new();
    for (i, family) in spec.ip_families.iter().flatten().enumerate() {
        let field = [Seg::Key("spec"), Seg::Key("ipFamilies"), Seg::Index(i)];
        families.push(match family.as_str() {
            "IPv4" => crate::model::IpFamily::V4,
            "IPv6" => crate::model::IpFamily::V6,
            other => {
                return Err(invalid.at(&field, format!("{other:?} is not IPv4 or IPv6")));
            }
        });
    }
    let mut addresses = Vec::new();
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            for (i, ip) in ips.iter().enumerate() {
                let field = vec![Seg::Key("spec"), Seg::Key("clusterIPs"), Seg::Index(i)];
                addresses.push((ip.clone(), field));
            }
        }
        _ => {
            if let Some(ip) = spec.cluster_ip.clone() {
                addresses.push((ip, vec![Seg::Key("spec"), Seg::Key("clusterIP")]));
            }
        }
    }
    // Unset (ExternalName, or not allocated yet) or headless.
    addresses.retain(|(ip, _)| !ip.is_empty() && ip != "None");
    for (ip, field) in &addresses {
        let family = ip.parse::<IpAddr>().ok().map(crate::model::IpFamily::of);
        if let Some(family) = family.filter(|f| !families.is_empty() && !families.contains(f)) {
            return Err(invalid.at(
                field,
                format!("{ip:?} is of family {family:?}, which spec.ipFamilies does not list"),
            ));
        }
    }
    one_per_family(invalid, addresses, "an IP address or \"None\"")
}

/// A Service: cluster IPs (none when headless or unset), selector and ports.
pub fn service(s: k8s::Service) -> Result<Service, ObjectError> {
    let (namespace, name) = name_and_namespace("Service", &s.metadata)?;
    let invalid = Invalid {
        object: format!("Service {namespace}/{name}"),
    };
    let spec = s.spec.unwrap_or_default();
    let (cluster_ip, cluster_ipv6) = cluster_ips(&invalid, &spec)?;
    let mut ports = Vec::new();
    for (i, sp) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        let field = |last: &'static str| {
            [
                Seg::Key("spec"),
                Seg::Key("ports"),
                Seg::Index(i),
                Seg::Key(last),
            ]
        };
        let port = port_number(sp.port).ok_or_else(|| {
            invalid.at(
                &field("port"),
                format!("{} is not a port number (1-65535)", sp.port),
            )
        })?;
        let target_port = match sp.target_port {
            // Kubernetes defaults both of these to the service port.
            None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
            Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(port_number(n).ok_or_else(|| {
                invalid.at(
                    &field("targetPort"),
                    format!("{n} is not a port number (1-65535)"),
                )
            })?),
            Some(IntOrString::String(s)) => {
                // The API server takes a quoted number as a port name and rejects it as
                // one (names need a letter); say so rather than never matching.
                if s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid.at(
                        &field("targetPort"),
                        format!("{s:?} is a port name without letters; write the number unquoted"),
                    ));
                }
                TargetPort::Name(s)
            }
        };
        ports.push(ServicePort {
            name: sp.name.filter(|n| !n.is_empty()),
            port,
            target_port,
            protocol: sp
                .protocol
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "TCP".to_string()),
        });
    }
    Ok(Service {
        namespace,
        name,
        cluster_ip,
        cluster_ipv6,
        selector: spec.selector.unwrap_or_default(),
        ports,
    })
}

/// The label that ties an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One EndpointSlice in model terms, before the slices of a service are merged into
/// [`Model::endpoint_slices`](crate::model::Model::endpoint_slices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub name: String,
    /// From the `kubernetes.io/service-name` label; `None` for a slice of no service.
    pub service: Option<ServiceKey>,
    /// Ports with their ready endpoints; empty for slices of addresses other than IPv4 and
    /// IPv6 (FQDN).
    pub ports: Vec<SlicePort>,
}

impl Slice {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An EndpointSlice: its Service and the ready endpoints (IPv4 or IPv6, by its
/// `addressType`) of each port.
pub fn endpoint_slice(s: discovery::EndpointSlice) -> Result<Slice, ObjectError> {
    let (namespace, name) = name_and_namespace("EndpointSlice", &s.metadata)?;
    let invalid = Invalid {
        object: format!("EndpointSlice {namespace}/{name}"),
    };
    let service = s
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .filter(|n| !n.is_empty())
        .map(|n| ServiceKey::new(&namespace, n));
    // FQDN slices have no defined meaning for a proxy.
    let ipv6 = match s.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => {
            debug!(
                slice = %format!("{namespace}/{name}"),
                address_type = s.address_type,
                "skipping the endpoints of a slice that is neither IPv4 nor IPv6"
            );
            return Ok(Slice {
                namespace,
                name,
                service,
                ports: Vec::new(),
            });
        }
    };
    let mut endpoints = Vec::new();
    for (i, ep) in s.endpoints.into_iter().enumerate() {
        // Unset means ready; not-ready endpoints (starting, terminating) get no traffic.
        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        // The controller writes exactly one address; no meaning is defined for more.
        let Some(address) = ep.addresses.first() else {
            continue;
        };
        let ip = match address.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == ipv6 => ip,
            _ => {
                let family = if ipv6 { "IPv6" } else { "IPv4" };
                return Err(invalid.at(
                    &[
                        Seg::Key("endpoints"),
                        Seg::Index(i),
                        Seg::Key("addresses"),
                        Seg::Index(0),
                    ],
                    format!("{address:?} is not an {family} address (addressType {family})"),
                ));
            }
        };
        let pod = ep.target_ref.and_then(|r| {
            let is_pod = r.kind.as_deref() == Some("Pod");
            let name = r.name.filter(|n| !n.is_empty())?;
            let ns = r
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| namespace.clone());
            is_pod.then(|| PodKey::new(ns, name))
        });
        endpoints.push(SliceEndpoint { ip, pod });
    }
    let mut ports = Vec::new();
    for (i, p) in s.ports.unwrap_or_default().into_iter().enumerate() {
        // No number means "all ports", which only selector-less headless services use.
        let Some(number) = p.port else { continue };
        let port = port_number(number).ok_or_else(|| {
            invalid.at(
                &[Seg::Key("ports"), Seg::Index(i), Seg::Key("port")],
                format!("{number} is not a port number (1-65535)"),
            )
        })?;
        ports.push(SlicePort {
            name: p.name.filter(|n| !n.is_empty()),
            port,
            protocol: p
                .protocol
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "TCP".to_string()),
            endpoints: endpoints.clone(),
        });
    }
    Ok(Slice {
        namespace,
        name,
        service,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_pod_keeps_what_finds_it_on_its_node() {
        let pod: k8s::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "2c48913c-b29f-11e7-9350-020968147796"},
            "spec": {"nodeName": "node-a", "hostNetwork": true, "containers": []}
        }))
        .unwrap();
        let pod = super::pod(pod).unwrap();
        assert_eq!(
            pod.uid.as_deref(),
            Some("2c48913c-b29f-11e7-9350-020968147796")
        );
        assert_eq!(pod.node_name.as_deref(), Some("node-a"));
        assert!(pod.host_network);
        let bare: k8s::Pod =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "n", "uid": ""}}))
                .unwrap();
        let bare = super::pod(bare).unwrap();
        assert_eq!(
            (bare.uid, bare.node_name, bare.host_network),
            (None, None, false)
        );
    }

    #[test]
    fn errors_name_the_object_and_field_and_no_file() {
        let pod: k8s::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"},
            "status": {"podIP": "fd00::zz"}
        }))
        .unwrap();
        let err = super::pod(pod).unwrap_err();
        let ObjectError::InvalidValue {
            object,
            field,
            message,
        } = &err;
        assert_eq!(object, "Pod n/p");
        assert_eq!(field.as_str(), "status.podIP");
        assert_eq!(
            field.segments(),
            [Seg::Key("status"), Seg::Key("podIP")].as_slice()
        );
        assert_eq!(message, "\"fd00::zz\" is not an IP address");
        assert_eq!(
            err.to_string(),
            "Pod n/p: status.podIP: \"fd00::zz\" is not an IP address"
        );

        let ns: k8s::Namespace = serde_json::from_value(json!({"metadata": {}})).unwrap();
        assert_eq!(
            super::namespace(ns).unwrap_err().to_string(),
            "Namespace ?: metadata.name: missing"
        );
        let ns: k8s::Namespace =
            serde_json::from_value(json!({"metadata": {"name": "demo"}})).unwrap();
        assert_eq!(super::namespace(ns).unwrap().name, "demo");
    }

    #[test]
    fn dual_stack_pods_and_services_keep_one_address_per_family() {
        let pod: k8s::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"},
            "status": {"podIP": "10.244.0.5", "podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00:10:244::5"}]}
        }))
        .unwrap();
        let pod = super::pod(pod).unwrap();
        assert_eq!(pod.ip, Some(Ipv4Addr::new(10, 244, 0, 5)));
        assert_eq!(pod.ipv6, Some("fd00:10:244::5".parse().unwrap()));
        // An IPv6-only pod: its podIP is IPv6.
        let pod: k8s::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"}, "status": {"podIP": "fd00::9"}
        }))
        .unwrap();
        let pod = super::pod(pod).unwrap();
        assert_eq!((pod.ip, pod.ipv6), (None, Some("fd00::9".parse().unwrap())));

        let service = |spec: serde_json::Value| {
            let svc: k8s::Service = serde_json::from_value(json!({
                "metadata": {"name": "s", "namespace": "n"}, "spec": spec
            }))
            .unwrap();
            super::service(svc)
        };
        let dual = service(json!({
            "clusterIP": "fd00:96::10", "clusterIPs": ["fd00:96::10", "10.96.0.10"],
            "ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "RequireDualStack"
        }))
        .unwrap();
        assert_eq!(dual.cluster_ip, Some(Ipv4Addr::new(10, 96, 0, 10)));
        assert_eq!(dual.cluster_ipv6, Some("fd00:96::10".parse().unwrap()));
        assert_eq!(
            dual.cluster_ips()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>(),
            ["10.96.0.10", "fd00:96::10"]
        );
        let v6 = service(json!({"clusterIP": "fd00:96::11", "ipFamilies": ["IPv6"]})).unwrap();
        assert_eq!((v6.cluster_ip, v6.cluster_ipv6.is_some()), (None, true));
        let headless = service(json!({"clusterIP": "None", "clusterIPs": ["None"]})).unwrap();
        assert_eq!(headless.cluster_ips().count(), 0);

        let err = service(json!({"clusterIPs": ["10.96.0.10", "fd00:96::zz"]})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service n/s: spec.clusterIPs[1]: \"fd00:96::zz\" is not an IP address or \"None\""
        );
        let err =
            service(json!({"clusterIPs": ["fd00:96::12"], "ipFamilies": ["IPv4"]})).unwrap_err();
        assert_eq!(err.field().as_str(), "spec.clusterIPs[0]");
        assert!(
            err.to_string()
                .contains("which spec.ipFamilies does not list"),
            "{err}"
        );
        let err = service(json!({"ipFamilies": ["IPv5"]})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Service n/s: spec.ipFamilies[0]: \"IPv5\" is not IPv4 or IPv6"
        );
        let pod: k8s::Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n"},
            "status": {"podIPs": [{"ip": "10.244.0.5"}, {"ip": "fd00::zz"}]}
        }))
        .unwrap();
        assert_eq!(
            super::pod(pod).unwrap_err().to_string(),
            "Pod n/p: status.podIPs[1].ip: \"fd00::zz\" is not an IP address"
        );
    }

    #[test]
    fn kinds_by_api_version() {
        assert_eq!(ObjectKind::of("v1", "Pod"), Some(ObjectKind::Pod));
        assert_eq!(ObjectKind::of("apps/v1", "Deployment"), None);
        assert_eq!(ObjectKind::of("v1", "List"), None);
        assert_eq!(
            ObjectKind::of("networking.istio.io/v1alpha3", "Gateway"),
            Some(ObjectKind::Routing(RoutingKind::IstioGateways))
        );
        assert_eq!(
            ObjectKind::of("gateway.networking.k8s.io/v1beta1", "Gateway"),
            Some(ObjectKind::Routing(RoutingKind::Gateways))
        );
        assert_eq!(
            ObjectKind::of("specs.smi-spec.io/v1alpha4", "TCPRoute"),
            Some(ObjectKind::Routing(RoutingKind::SmiTcpRoutes))
        );
        // A version the agent does not read is skipped, not misread.
        assert_eq!(
            ObjectKind::of("gateway.networking.k8s.io/v1", "TCPRoute"),
            None
        );
    }

    /// A decoder that hands over what it was given, as the API server's does.
    struct Given(ObjectMeta, serde_json::Value);

    impl Decode for Given {
        type Error = ObjectError;

        fn decode<S: DeserializeOwned + Default>(
            &mut self,
            _: RoutingKind,
        ) -> Result<(ObjectMeta, S), ObjectError> {
            Ok((self.0.clone(), S::deserialize(&self.1).unwrap()))
        }

        fn reject(&self, error: ObjectError) -> ObjectError {
            error
        }
    }

    #[test]
    fn routing_objects_need_a_name() {
        let meta = ObjectMeta {
            name: Some("split".into()),
            ..ObjectMeta::default()
        };
        let spec = json!({"service": "echo", "backends": []});
        let object = routing_object(RoutingKind::TrafficSplits, Given(meta, spec.clone())).unwrap();
        assert_eq!(object.key(), "default/split");
        assert_eq!(object.kind(), "TrafficSplit");
        let err = routing_object(
            RoutingKind::TrafficSplits,
            Given(ObjectMeta::default(), spec),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "TrafficSplit default/?: metadata.name: missing"
        );
    }
}
