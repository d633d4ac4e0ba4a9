//! The L4 routing objects as their APIs spell them: Istio `VirtualService` (`tcp` and
//! `tls` routes) and `DestinationRule` (subsets), Gateway API `TCPRoute`, `TLSRoute` and
//! `UDPRoute`,
//! SMI `TrafficSplit`, and the SMI access objects (`TrafficTarget` and the `TCPRoute` of
//! specs.smi-spec.io). Only the fields L4 routing reads are kept; the others (http, ...)
//! are ignored. What the
//! objects mean together is compiled by `proxy::routes`, which also judges them.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One routing object with its identity and load order (older first: conflicts between
/// Gateway API routes go to the oldest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Routed<T> {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` when the object has one (the API server sets it).
    pub created: Option<String>,
    /// Position in the order the source delivered objects (file order for manifests).
    pub order: usize,
    pub spec: T,
}

impl<T> Routed<T> {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Oldest first: creation time, then load order, then name.
    pub fn age_key(&self) -> (Option<&str>, usize, String) {
        (
            // Objects without a timestamp sort after those with one.
            self.created.as_deref().or(Some("\u{10ffff}")),
            self.order,
            self.key(),
        )
    }
}

/// Every routing object of the model, by `namespace/name`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RoutingObjects {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub virtual_services: BTreeMap<String, Routed<VirtualServiceSpec>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub destination_rules: BTreeMap<String, Routed<DestinationRuleSpec>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tcp_routes: BTreeMap<String, Routed<TcpRouteSpec>>,
    /// Gateway API TLSRoutes (TLS passthrough by SNI, served by `interceptor gateway`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tls_routes: BTreeMap<String, Routed<TlsRouteSpec>>,
    /// Gateway API UDPRoutes (datagrams by client session, served by `interceptor gateway`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub udp_routes: BTreeMap<String, Routed<UdpRouteSpec>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub traffic_splits: BTreeMap<String, Routed<TrafficSplitSpec>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub traffic_targets: BTreeMap<String, Routed<TrafficTargetSpec>>,
    /// `specs.smi-spec.io` TCPRoutes (port lists for TrafficTarget rules).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub smi_tcp_routes: BTreeMap<String, Routed<SmiTcpRouteSpec>>,
    /// Gateway API Gateways (served by `interceptor gateway`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub gateways: BTreeMap<String, Routed<GatewaySpec>>,
    /// Istio Gateways (served by `interceptor gateway`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub istio_gateways: BTreeMap<String, Routed<IstioGatewaySpec>>,
    /// FSM UpstreamTrafficSettings: circuit breaking and connection rate limits per host.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_traffic_settings: BTreeMap<String, Routed<UpstreamTrafficSettingSpec>>,
    /// FSM LoadBalancerPolicies: the balancing algorithm per Service port.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub load_balancer_policies: BTreeMap<String, Routed<LoadBalancerPolicySpec>>,
    /// FSM HealthCheckPolicies: outlier detection and active TCP checks per Service port.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub health_check_policies: BTreeMap<String, Routed<HealthCheckPolicySpec>>,
    /// FSM Egress policies: destinations outside the mesh that chosen ServiceAccounts may
    /// reach while `enableEgress` is off.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub egresses: BTreeMap<String, Routed<EgressSpec>>,
    /// FSM EgressGateways: which Service's gateway carries egress out of the mesh.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_gateways: BTreeMap<String, Routed<EgressGatewaySpec>>,
}

impl RoutingObjects {
    pub fn is_empty(&self) -> bool {
        self == &RoutingObjects::default()
    }
}

/// One routing object of any kind, as a source delivers it (both the manifest directory
/// and the API server go through this).
#[derive(Clone, Debug, PartialEq)]
pub enum RoutingObject {
    VirtualService(Routed<VirtualServiceSpec>),
    DestinationRule(Routed<DestinationRuleSpec>),
    IstioGateway(Routed<IstioGatewaySpec>),
    Gateway(Routed<GatewaySpec>),
    TcpRoute(Routed<TcpRouteSpec>),
    TlsRoute(Routed<TlsRouteSpec>),
    UdpRoute(Routed<UdpRouteSpec>),
    TrafficSplit(Routed<TrafficSplitSpec>),
    TrafficTarget(Routed<TrafficTargetSpec>),
    SmiTcpRoute(Routed<SmiTcpRouteSpec>),
    UpstreamTrafficSetting(Routed<UpstreamTrafficSettingSpec>),
    LoadBalancerPolicy(Routed<LoadBalancerPolicySpec>),
    HealthCheckPolicy(Routed<HealthCheckPolicySpec>),
    Egress(Routed<EgressSpec>),
    EgressGateway(Routed<EgressGatewaySpec>),
}

/// `$body` for the `Routed` inside any variant of a [`RoutingObject`], bound to `$o`.
macro_rules! each_routed {
    ($object:expr, $o:ident => $body:expr) => {
        match $object {
            RoutingObject::VirtualService($o) => $body,
            RoutingObject::DestinationRule($o) => $body,
            RoutingObject::IstioGateway($o) => $body,
            RoutingObject::Gateway($o) => $body,
            RoutingObject::TcpRoute($o) => $body,
            RoutingObject::TlsRoute($o) => $body,
            RoutingObject::UdpRoute($o) => $body,
            RoutingObject::TrafficSplit($o) => $body,
            RoutingObject::TrafficTarget($o) => $body,
            RoutingObject::SmiTcpRoute($o) => $body,
            RoutingObject::UpstreamTrafficSetting($o) => $body,
            RoutingObject::LoadBalancerPolicy($o) => $body,
            RoutingObject::HealthCheckPolicy($o) => $body,
            RoutingObject::Egress($o) => $body,
            RoutingObject::EgressGateway($o) => $body,
        }
    };
}

impl RoutingObject {
    /// The kind, told apart where two APIs share a name (for duplicate reports).
    pub fn kind(&self) -> &'static str {
        match self {
            RoutingObject::VirtualService(_) => "VirtualService",
            RoutingObject::DestinationRule(_) => "DestinationRule",
            RoutingObject::IstioGateway(_) => "Gateway (networking.istio.io)",
            RoutingObject::Gateway(_) => "Gateway",
            RoutingObject::TcpRoute(_) => "TCPRoute",
            RoutingObject::TlsRoute(_) => "TLSRoute",
            RoutingObject::UdpRoute(_) => "UDPRoute",
            RoutingObject::TrafficSplit(_) => "TrafficSplit",
            RoutingObject::TrafficTarget(_) => "TrafficTarget",
            RoutingObject::SmiTcpRoute(_) => "TCPRoute (specs.smi-spec.io)",
            RoutingObject::UpstreamTrafficSetting(_) => "UpstreamTrafficSetting",
            RoutingObject::LoadBalancerPolicy(_) => "LoadBalancerPolicy",
            RoutingObject::HealthCheckPolicy(_) => "HealthCheckPolicy",
            RoutingObject::Egress(_) => "Egress",
            RoutingObject::EgressGateway(_) => "EgressGateway",
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        each_routed!(self, o => o.key())
    }

    /// Set the position in the source's delivery order.
    pub fn set_order(&mut self, order: usize) {
        each_routed!(self, o => o.order = order)
    }

    /// Put it into the model's objects (replacing one of the same kind and key).
    pub fn insert_into(self, objects: &mut RoutingObjects) {
        match self {
            RoutingObject::VirtualService(o) => drop(objects.virtual_services.insert(o.key(), o)),
            RoutingObject::DestinationRule(o) => drop(objects.destination_rules.insert(o.key(), o)),
            RoutingObject::IstioGateway(o) => drop(objects.istio_gateways.insert(o.key(), o)),
            RoutingObject::Gateway(o) => drop(objects.gateways.insert(o.key(), o)),
            RoutingObject::TcpRoute(o) => drop(objects.tcp_routes.insert(o.key(), o)),
            RoutingObject::TlsRoute(o) => drop(objects.tls_routes.insert(o.key(), o)),
            RoutingObject::UdpRoute(o) => drop(objects.udp_routes.insert(o.key(), o)),
            RoutingObject::TrafficSplit(o) => drop(objects.traffic_splits.insert(o.key(), o)),
            RoutingObject::TrafficTarget(o) => drop(objects.traffic_targets.insert(o.key(), o)),
            RoutingObject::SmiTcpRoute(o) => drop(objects.smi_tcp_routes.insert(o.key(), o)),
            RoutingObject::UpstreamTrafficSetting(o) => {
                drop(objects.upstream_traffic_settings.insert(o.key(), o))
            }
            RoutingObject::LoadBalancerPolicy(o) => {
                drop(objects.load_balancer_policies.insert(o.key(), o))
            }
            RoutingObject::HealthCheckPolicy(o) => {
                drop(objects.health_check_policies.insert(o.key(), o))
            }
            RoutingObject::Egress(o) => drop(objects.egresses.insert(o.key(), o)),
            RoutingObject::EgressGateway(o) => drop(objects.egress_gateways.insert(o.key(), o)),
        }
    }
}

/// `networking.istio.io` `VirtualService` (v1alpha3, v1beta1, v1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    /// Empty means `["mesh"]`: the routes apply to the mesh's own traffic.
    pub gateways: Vec<String>,
    pub tcp: Vec<IstioTcpRoute>,
    /// Routes of TLS connections by their SNI (passthrough: the proxy reads the
    /// ClientHello's server name, the stream stays encrypted end to end).
    pub tls: Vec<IstioTlsRoute>,
}

/// A VirtualService `tcp` or `tls` rule: the matches of its kind and where it routes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IstioL4Route<M> {
    /// ORed. `tcp`: an empty list matches every connection; `tls`: required (each entry
    /// names `sniHosts`).
    #[serde(rename = "match")]
    pub matches: Vec<M>,
    pub route: Vec<RouteDestination>,
}

pub type IstioTcpRoute = IstioL4Route<L4MatchAttributes>;
pub type IstioTlsRoute = IstioL4Route<TlsMatchAttributes>;

/// One `tls` `match` entry: a `tcp` match's attributes and the server names; every
/// field set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsMatchAttributes {
    /// Required: the server names (exact, or `*.` wildcards) the ClientHello may carry.
    pub sni_hosts: Vec<String>,
    #[serde(flatten)]
    pub l4: L4MatchAttributes,
}

impl AsRef<L4MatchAttributes> for TlsMatchAttributes {
    fn as_ref(&self) -> &L4MatchAttributes {
        &self.l4
    }
}

/// One `tcp` `match` entry: every field set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct L4MatchAttributes {
    pub destination_subnets: Vec<String>,
    pub port: Option<u32>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

impl AsRef<L4MatchAttributes> for L4MatchAttributes {
    fn as_ref(&self) -> &L4MatchAttributes {
        self
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Absent: an equal share of what the explicit weights leave.
    pub weight: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortSelector {
    pub number: Option<u32>,
}

/// `networking.istio.io` `DestinationRule`: only its subsets matter at L4 here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub subsets: Vec<Subset>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// `gateway.networking.k8s.io/v1alpha2` `TCPRoute`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    pub rules: Vec<TcpRouteRule>,
}

/// `gateway.networking.k8s.io/v1alpha2` `TLSRoute`: TLS passthrough by the ClientHello's
/// server name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsRouteSpec {
    pub parent_refs: Vec<ParentReference>,
    /// Exact names or `*.` wildcards; empty: every name (and a hello without one).
    pub hostnames: Vec<String>,
    pub rules: Vec<TcpRouteRule>,
}

/// `gateway.networking.k8s.io/v1alpha2` `UDPRoute`: the fields of a TCPRoute (parentRefs,
/// rules of weighted backendRefs); what differs is the listener it takes and that a
/// client's datagrams, not a connection, stay with one backend.
pub type UdpRouteSpec = TcpRouteSpec;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentReference {
    /// Unset means `gateway.networking.k8s.io`; `""` is the core group (a Service).
    pub group: Option<String>,
    /// Unset means `Gateway`.
    pub kind: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    pub section_name: Option<String>,
    pub port: Option<u32>,
}

impl ParentReference {
    /// A Service parent (GAMMA: the route applies to traffic for that Service).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service") && self.group.as_deref().unwrap_or("").is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpRouteRule {
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendRef {
    pub group: Option<String>,
    /// Unset means `Service`.
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
    /// Unset means 1.
    pub weight: Option<i64>,
}

/// `split.smi-spec.io` `TrafficSplit` (v1alpha4, also read from v1alpha2/v1alpha3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficSplitSpec {
    /// The root service clients dial.
    pub service: String,
    pub backends: Vec<TrafficSplitBackend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: i64,
}

/// `access.smi-spec.io` `TrafficTarget` (v1alpha3, also read from v1alpha2): sources
/// (ServiceAccounts) allowed to reach a destination ServiceAccount, on what the rules name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficTargetSpec {
    pub destination: IdentityBinding,
    pub rules: Vec<TrafficTargetRule>,
    pub sources: Vec<IdentityBinding>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IdentityBinding {
    /// Only `ServiceAccount`.
    pub kind: String,
    pub name: String,
    /// Unset: the TrafficTarget's namespace.
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficTargetRule {
    /// `TCPRoute` (ports) or `HTTPRouteGroup` (L7; at L4 it allows the connection).
    pub kind: String,
    pub name: String,
    pub matches: Vec<String>,
}

/// `specs.smi-spec.io` `TCPRoute` (v1alpha4): the destination ports a rule allows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SmiTcpRouteSpec {
    pub matches: SmiTcpMatch,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SmiTcpMatch {
    /// Empty: every port.
    pub ports: Vec<u32>,
}

/// `gateway.networking.k8s.io` `Gateway` (v1, v1beta1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    pub listeners: Vec<Listener>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Listener {
    pub name: String,
    pub port: u32,
    pub protocol: String,
    /// Restricts the server names of the routes attached (`TLS` listeners).
    pub hostname: Option<String>,
    pub tls: Option<GatewayTlsConfig>,
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewayTlsConfig {
    /// `Terminate` (the API's default) or `Passthrough`; only `Passthrough` is served.
    pub mode: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedRoutes {
    pub namespaces: Option<RouteNamespaces>,
    /// Empty: the kinds the listener's protocol supports (TCPRoute for TCP).
    pub kinds: Vec<RouteGroupKind>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteNamespaces {
    /// `Same` (default), `All` or `Selector`.
    pub from: Option<String>,
    pub selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LabelSelectorRequirement {
    pub key: String,
    /// `In`, `NotIn`, `Exists`, `DoesNotExist`.
    pub operator: String,
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector (Kubernetes semantics; an unknown operator
    /// matches nothing).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| {
                let value = labels.get(&e.key);
                match e.operator.as_str() {
                    "In" => value.is_some_and(|v| e.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteGroupKind {
    pub group: Option<String>,
    pub kind: String,
}

/// `networking.istio.io` `Gateway`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IstioGatewaySpec {
    /// In a cluster, the gateway pods it configures; standalone, `--gateway` names it.
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<IstioServer>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IstioServer {
    pub port: IstioPort,
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct IstioPort {
    pub number: u32,
    pub name: String,
    pub protocol: String,
}

/// `policy.flomesh.io` `UpstreamTrafficSetting` (v1alpha1): settings for the traffic to
/// one upstream host. Numbers are read signed so that a negative limit is rejected with a
/// reason by the compiler instead of failing to parse; the HTTP settings are ignored (L4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct UpstreamTrafficSettingSpec {
    /// `name.namespace.svc.cluster.local` of a Service in the object's namespace.
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_settings: Option<ConnectionSettings>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ConnectionSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpConnectionSettings>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpConnectionSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    /// A Go duration (`5s`, `250ms`, `1m30s`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RateLimitSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalRateLimitSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LocalRateLimitSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpLocalRateLimitSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TcpLocalRateLimitSpec {
    pub connections: i64,
    /// `second`, `minute` or `hour`.
    pub unit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
}

/// The object an FSM policy attaches to (a core Service).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `gateway.flomesh.io` `LoadBalancerPolicy` (v1alpha1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct LoadBalancerPolicySpec {
    pub target_ref: PolicyTargetRef,
    pub ports: Vec<PortLoadBalancer>,
    /// The algorithm of the ports not listed.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub default_type: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortLoadBalancer {
    pub port: i64,
    /// `RoundRobinLoadBalancer`, `HashingLoadBalancer` or `LeastConnectionLoadBalancer`.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

/// `gateway.flomesh.io` `HealthCheckPolicy` (v1alpha1).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheckPolicySpec {
    pub target_ref: PolicyTargetRef,
    pub ports: Vec<PortHealthCheck>,
    /// The check of the ports not listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<HealthCheckConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct PortHealthCheck {
    pub port: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<HealthCheckConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HealthCheckConfig {
    /// Seconds between active checks.
    pub interval: i64,
    /// Consecutive failures that eject an endpoint.
    pub max_fails: i64,
    /// Seconds an ejected endpoint stays out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fail_timeout: Option<i64>,
    /// HTTP checks: refused with a reason (an L4 proxy checks TCP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<serde_json::Value>,
}

/// `policy.flomesh.io` `Egress` (v1alpha1): the ServiceAccounts in `sources` may reach
/// destinations outside the mesh on `ports`, by destination address (`ipAddresses`, every
/// address when empty) and, on `https` ports, by the server name of the ClientHello
/// (`hosts`). Read as written (ports signed, CIDRs as strings) so that a bad value is
/// rejected with a reason when routes are compiled, and the previous valid version stays.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressSpec {
    pub sources: Vec<EgressSource>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    pub ports: Vec<EgressPort>,
    /// References to HTTPRouteGroups or UpstreamTrafficSettings (L7 and per-host
    /// settings): noted in the status, not applied.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressSource {
    /// `ServiceAccount`, the only kind FSM reads.
    pub kind: String,
    pub name: String,
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressPort {
    pub number: i64,
    /// `tcp`, `tcp-server-first`, `https` (by server name) or `http` (Host header: L7).
    pub protocol: String,
}

/// `policy.flomesh.io` `EgressGateway` (v1alpha1): egress leaves the mesh through the
/// gateways of `global` (weighted), or, for the connections an Egress policy named in a
/// rule lets out, through that rule's gateways.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressGatewaySpec {
    pub global: Vec<EgressGatewayBinding>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<EgressGatewayRule>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<serde_json::Value>,
}

/// A gateway: a Service (its pods run the egress gateway) and its weight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressGatewayBinding {
    pub service: String,
    pub namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressGatewayRule {
    pub egress_policies: Vec<EgressPolicyRef>,
    pub egress_gateways: Vec<EgressGatewayBinding>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EgressPolicyRef {
    pub name: String,
    pub namespace: String,
}
