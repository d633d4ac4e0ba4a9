//! Where a connection goes. An immutable snapshot, rebuilt and swapped whenever the model
//! or the pod addresses change (new connections see the new table, open ones keep their
//! upstream). A Service ClusterIP:port goes to the backends its routing policy names
//! (an Istio VirtualService `tcp` rule, a Gateway API TCPRoute with the Service as parent,
//! or an SMI TrafficSplit), else round-robin to its own endpoints; anything else is passed
//! through to the original destination. A Service port with VirtualService `tls` rules is
//! routed by the server name of the client's ClientHello (`ConnectionSource::sni`, read by
//! the listener): a connection no rule matches is refused there, not sent to the
//! Service's own endpoints. In SMI traffic policy mode, a connection between
//! mesh workloads must also be allowed by a TrafficTarget (see `access`).
mod access;
mod compile;
mod egress;
mod gateway;
mod hosts;
mod settings;
mod split;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

use crate::model::{Endpoint, Model, PodAddrs, PodKey};
pub use compile::{Condition, RouteStatus};
pub use gateway::{GatewayTable, ListenerStatus};
pub use settings::{
    Balancer, Checked, Health, LastValid, RateLimit, UpstreamSettings, DEFAULT_CONNECT_TIMEOUT,
};
use split::Split;

/// What a gateway listener's port is bound for: a TCP and a UDP listener may share a
/// number, so a listener is known by both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Transport {
    Tcp,
    Udp,
}

/// The gateway name of the mesh's own traffic in VirtualService `gateways` lists.
pub const MESH_GATEWAY: &str = "mesh";

/// An immutable routing snapshot.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Keyed by VIP and port, of either family: an IPv6 ClusterIP routes to IPv6
    /// endpoints with the same policies as the Service's IPv4 one.
    services: HashMap<SocketAddr, ServiceRoute>,
    /// Addresses of the pods enrolled on this node.
    local_enrolled: HashSet<Ipv4Addr>,
    /// Namespace and labels of the model's pods, for source matches.
    sources: HashMap<PodKey, Source>,
    /// Whether each routing object was accepted, and why not.
    statuses: Vec<RouteStatus>,
    /// SMI traffic policy mode; `None` is permissive mode.
    access: Option<access::AccessPolicy>,
    /// Which pod has an address (IPv4 or IPv6): what CNI reported, then `status.podIPs`.
    pods_by_ip: HashMap<IpAddr, PodKey>,
    /// The upstream settings of the Service port each endpoint address serves, and its pod.
    endpoint_settings: HashMap<SocketAddr, (Arc<UpstreamSettings>, PodKey)>,
    /// The endpoints with an active check.
    checked: Vec<Checked>,
    /// FSM `enableEgress: false`: enrolled pods' connections that leave the mesh are
    /// refused unless an Egress policy lets them out.
    egress_closed: bool,
    /// The addresses of the pods the model enrolls, on any node (the mesh's own
    /// destinations): any other address that is not a Service is outside the mesh. Only
    /// known when egress is closed or goes through a gateway.
    mesh_pod_ips: Option<HashSet<IpAddr>>,
    /// FSM Egress policies: what a closed egress still lets out.
    egress: egress::EgressPolicies,
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
/// The route name of a refusal because egress is off.
pub const EGRESS_POLICY: &str = "enableEgress";

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
    /// Routes TLS by server name (VirtualService `tls` rules): the listener reads the
    /// ClientHello first, and a connection no rule matches is refused.
    by_sni: bool,
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
            by_sni: false,
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
    destination_subnets: Vec<IpNet>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    /// Empty: the VirtualService's own gateways.
    gateways: Vec<String>,
    /// `tls` matches: the ClientHello's server name matches one of these (empty: any
    /// connection, a `tcp` match).
    sni_hosts: Vec<hosts::HostPattern>,
}

/// One destination: a Service port, or a subset of it, and its endpoints.
#[derive(Debug)]
struct Backend {
    /// `namespace/name:port`, with ` subset <name>` for a subset.
    name: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    settings: Arc<UpstreamSettings>,
}

/// What one endpoint looks like to the balancer.
#[derive(Clone, Copy, Debug, Default)]
pub struct EndpointView {
    pub ejected: bool,
    pub open: u32,
}

/// The runtime state of endpoints a balancer needs (open connections, ejections), kept
/// outside the table: the table is compiled from the model alone.
pub trait EndpointHealth: Sync {
    /// How each of `endpoints` looks to a balancer at `now`, in the same order.
    fn view(&self, endpoints: &[Endpoint], now: Instant) -> Vec<EndpointView>;
}

/// What choosing an endpoint needs besides the table.
#[derive(Clone, Copy, Default)]
pub struct Pick<'a> {
    /// The client's address, for source IP hashing.
    pub client: Option<IpAddr>,
    /// Open connections and ejections; without it every endpoint is healthy and idle.
    pub health: Option<&'a dyn EndpointHealth>,
    /// An endpoint not to choose (the one a retry moves away from).
    pub avoid: Option<SocketAddr>,
}

/// A decision and, for a Service endpoint, the settings of its Service port.
#[derive(Debug)]
pub struct Resolved {
    pub target: Target,
    pub settings: Option<Arc<UpstreamSettings>>,
}

impl Backend {
    fn new(name: String, endpoints: Vec<Endpoint>, settings: Arc<UpstreamSettings>) -> Self {
        // From a random endpoint: a rebuilt table must not send its first connections to
        // the first endpoint every time.
        let start = split::random_below(endpoints.len() as u64) as usize;
        Self {
            name,
            endpoints,
            next: AtomicUsize::new(start),
            settings,
        }
    }

    /// An endpoint by the Service port's balancer, among those not ejected (all of them
    /// when every one is: better a doubtful endpoint than none) and not avoided.
    fn pick(&self, pick: &Pick<'_>) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        let views = match pick.health {
            Some(health) => health.view(&self.endpoints, Instant::now()),
            None => vec![Default::default(); n],
        };
        let allowed = |i: &usize| Some(self.endpoints[*i].addr) != pick.avoid;
        let mut candidates: Vec<usize> = (0..n)
            .filter(allowed)
            .filter(|i| !views[*i].ejected)
            .collect();
        if candidates.is_empty() {
            candidates = (0..n).filter(allowed).collect();
        }
        if candidates.is_empty() {
            return None;
        }
        let balancer = match (self.settings.balancer, pick.client) {
            (Balancer::SourceIpHash, None) => Balancer::RoundRobin,
            (balancer, _) => balancer,
        };
        let chosen = match balancer {
            Balancer::RoundRobin => self.in_turn(&candidates),
            Balancer::LeastConnections => {
                let fewest = candidates.iter().map(|i| views[*i].open).min()?;
                let least: Vec<usize> = candidates
                    .into_iter()
                    .filter(|i| views[*i].open == fewest)
                    .collect();
                self.in_turn(&least)
            }
            Balancer::SourceIpHash => {
                let client = pick.client?;
                candidates
                    .into_iter()
                    .max_by_key(|i| rendezvous(client, self.endpoints[*i].addr))?
            }
        };
        Some(&self.endpoints[chosen])
    }

    /// The next of `candidates` (indices in ascending order) in round-robin order.
    fn in_turn(&self, candidates: &[usize]) -> usize {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        candidates
            .iter()
            .copied()
            .find(|i| *i >= start)
            .unwrap_or(candidates[0])
    }
}

/// Rendezvous (highest random weight) score of an endpoint for a client: the client goes
/// to the endpoint with the highest score, so removing an endpoint moves only its clients.
fn rendezvous(client: IpAddr, endpoint: SocketAddr) -> u64 {
    let endpoint = (fold(endpoint.ip()) << 16) ^ u64::from(endpoint.port());
    splitmix64(splitmix64(fold(client)) ^ endpoint)
}

/// An address as 64 bits for hashing: an IPv4 address as itself (so IPv4 clients keep the
/// endpoints they had), an IPv6 one as its two halves mixed.
fn fold(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(ip) => u64::from(u32::from(ip)),
        IpAddr::V6(ip) => {
            let bits = u128::from(ip);
            splitmix64(bits as u64) ^ ((bits >> 64) as u64)
        }
    }
}

/// SplitMix64's finalizer: a fixed, well-mixed 64-bit hash (the same on every node and
/// every restart, so every proxy sends a client to the same endpoint).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Who opened a connection, as far as routing cares.
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionSource<'a> {
    /// The enrolled pod whose outbound listener accepted it.
    pub pod: Option<&'a PodKey>,
    /// The gateway that accepted it (`namespace/name`), or `None` for mesh traffic.
    pub gateway: Option<&'a str>,
    /// The server name of its ClientHello (lower-cased), when the listener read one: on
    /// ports routed by server name only ([`RouteTable::routes_by_sni`]).
    pub sni: Option<&'a str>,
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
        addr: SocketAddr,
        /// An egress gateway's endpoint: the destination outside the mesh it is asked
        /// (SOCKS5 CONNECT) to forward to.
        #[serde(skip_serializing_if = "Option::is_none")]
        tunnel_to: Option<SocketAddr>,
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
    Passthrough {
        addr: SocketAddr,
        /// With egress off, the Egress policy that lets it leave the mesh.
        #[serde(skip_serializing_if = "Option::is_none")]
        route: Option<String>,
    },
    /// Inbound: deliver to the application inside the pod.
    Local {
        addr: SocketAddr,
        /// Let in as the node's probe (kubelet), not by the traffic policy.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        node_probe: bool,
    },
}

/// One Service VIP:port as `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRouteView {
    /// A ClusterIP of either family, and the port.
    pub vip: SocketAddr,
    /// `namespace/name:port`.
    pub service: String,
    /// The routing object in force for it (`Kind namespace/name`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The Service's own endpoints of the VIP's family (a policy may send elsewhere).
    pub endpoints: Vec<SocketAddr>,
}

/// Why an inbound connection was let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// The traffic policy allows it (permissive mode, or a TrafficTarget).
    Granted,
    /// It comes from the node's probe address: kubelet's probes must reach a pod that
    /// SMI mode closes to other pods, or the pod never becomes ready.
    NodeProbe,
}

impl RouteTable {
    /// `permissive`: FSM's permissive traffic policy mode; `false` is SMI mode.
    /// `memory`: the last valid upstream settings objects, kept across builds.
    pub fn build(
        model: &Model,
        pod_ips: &HashMap<PodKey, PodAddrs>,
        local_enrolled: HashSet<Ipv4Addr>,
        permissive: bool,
        memory: &mut LastValid,
    ) -> Self {
        let upstream = settings::compile(model, memory);
        let mut compiled = compile::compile(model, pod_ips, &upstream.by_port);
        compiled.statuses.extend(upstream.statuses);
        let egress = egress::EgressPolicies::compile(model, memory, &mut compiled.statuses);
        compiled
            .statuses
            .sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
        let endpoint_settings = settings::by_endpoint(model, pod_ips, &upstream.by_port);
        let checked = settings::checked(model, &endpoint_settings);
        let (policy, access_statuses) = access::build(model, !permissive);
        compiled.statuses.extend(access_statuses);
        let mut pods_by_ip: HashMap<IpAddr, PodKey> = model
            .pods
            .iter()
            .flat_map(|(key, pod)| pod.ips().map(move |ip| (ip, key.clone())))
            .collect();
        pods_by_ip.extend(
            pod_ips
                .iter()
                .flat_map(|(key, ips)| ips.iter().map(move |ip| (ip, key.clone()))),
        );
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
            endpoint_settings,
            checked,
            egress_closed: false,
            mesh_pod_ips: None,
            egress,
        }
    }

    /// FSM's `enableEgress`: `false` refuses enrolled pods' connections to destinations
    /// outside the mesh (`true`, the default, passes them to where they were going).
    /// `model` is the one the table was built from: only a closed egress, or one that
    /// goes through an egress gateway, needs to know which pods it enrolls.
    pub fn set_egress(&mut self, model: &Model, enabled: bool) {
        self.egress_closed = !enabled;
        let needed = !enabled || self.egress.has_gateways();
        self.mesh_pod_ips = needed.then(|| {
            self.pods_by_ip
                .iter()
                .filter(|(_, key)| model.enrollment(key).is_some_and(|e| e.enrolled))
                .map(|(ip, _)| *ip)
                .collect()
        });
    }

    /// Where a connection goes, and in SMI mode whether it may, with every endpoint
    /// healthy and idle.
    pub fn resolve(&self, original: SocketAddr, source: ConnectionSource<'_>) -> Target {
        self.resolve_with(original, source, &Pick::default()).target
    }

    /// Where a connection goes, choosing the endpoint as `pick` allows.
    pub fn resolve_with(
        &self,
        original: SocketAddr,
        source: ConnectionSource<'_>,
        pick: &Pick<'_>,
    ) -> Resolved {
        let (target, settings) = self.route(original, source, pick);
        let target = self.check_egress(self.check_target(target, source), source);
        let (target, settings) = self.via_egress_gateway((target, settings), source, pick);
        let settings = settings.filter(|_| matches!(target, Target::Endpoint { .. }));
        Resolved { target, settings }
    }

    /// Whether `name` names a Service port or a backend of this table: the `backend`
    /// label of outbound metric series (a backend, or the Service of a refusal).
    pub fn names_backend(&self, name: &str) -> bool {
        self.services.values().any(|route| {
            route.service == name
                || route.default.name == name
                || route.policy.iter().any(|policy| {
                    policy
                        .rules
                        .iter()
                        .any(|rule| rule.split.backends().any(|b| b.name == name))
                })
        })
    }

    /// The upstream settings of the Service port `addr` (a pod's address and port) serves.
    pub fn endpoint_settings(&self, addr: &SocketAddr) -> Option<&Arc<UpstreamSettings>> {
        self.endpoint_settings.get(addr).map(|(s, _)| s)
    }

    /// Whether `addr` is an endpoint of a Service now.
    pub fn is_endpoint(&self, addr: &SocketAddr) -> bool {
        self.endpoint_settings.contains_key(addr)
    }

    /// Endpoints with an active check, for the health checker.
    pub fn checked_endpoints(&self) -> &[Checked] {
        &self.checked
    }

    /// In SMI mode, whether the source may reach the endpoint or pod the route chose.
    fn check_target(&self, target: Target, source: ConnectionSource<'_>) -> Target {
        let (service, destination) = match &target {
            Target::Endpoint {
                service, pod, addr, ..
            } => (service.clone(), Some((pod.parse::<PodKey>().ok(), *addr))),
            // A pod dialled directly is still a mesh workload; anything else is not.
            Target::Passthrough { addr, .. } => (
                // Not the address: it would make one metric series per destination.
                "passthrough".to_owned(),
                self.pods_by_ip
                    .get(&addr.ip())
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

    /// With egress off, a mesh connection that would leave the mesh (passed through, no
    /// Service address, to an address no enrolled pod has) is refused unless an Egress
    /// policy lets its pod out to that destination.
    fn check_egress(&self, target: Target, source: ConnectionSource<'_>) -> Target {
        let Target::Passthrough { addr, .. } = &target else {
            return target;
        };
        let addr = *addr;
        let verdict = match self.egress_verdict(addr, source) {
            None => return target,
            Some(verdict) => verdict,
        };
        match verdict {
            egress::Verdict::Allowed(route) => Target::Passthrough {
                addr,
                route: Some(route.to_owned()),
            },
            egress::Verdict::NeedsServerName | egress::Verdict::Refused => Target::Refused {
                service: "egress".into(),
                route: EGRESS_POLICY.into(),
                reason: format!(
                    "egress is off (enableEgress: false): {addr} is neither a Service nor a \
                     mesh pod, and no Egress policy lets this pod reach it{}",
                    source
                        .sni
                        .map(|sni| format!(" as {sni:?}"))
                        .unwrap_or_default()
                ),
            },
        }
    }

    /// `None` when the connection stays in the mesh or egress is open; else what the
    /// Egress policies say of the source's pod reaching `addr`.
    fn egress_verdict(
        &self,
        addr: SocketAddr,
        source: ConnectionSource<'_>,
    ) -> Option<egress::Verdict<'_>> {
        if !self.egress_closed || !self.leaves_mesh(addr, source) {
            return None;
        }
        let identity = source
            .pod
            .and_then(|key| self.sources.get(key))
            .map(|s| (s.namespace.clone(), s.service_account.clone()));
        Some(match identity {
            Some(identity) => self.egress.verdict(&identity, &addr, source.sni),
            None => egress::Verdict::Refused,
        })
    }

    /// Whether a mesh connection to `addr` (not a Service address) leaves the mesh: no
    /// enrolled pod has the address. Gateways' connections are not the mesh's egress.
    fn leaves_mesh(&self, addr: SocketAddr, source: ConnectionSource<'_>) -> bool {
        source.gateway.is_none()
            && self
                .mesh_pod_ips
                .as_ref()
                .is_some_and(|ips| !ips.contains(&addr.ip()))
    }

    /// Egress that leaves the mesh goes to an egress gateway when an EgressGateway names
    /// one: the gateway Service's endpoint, told the destination by SOCKS5. A gateway
    /// Service without a ready endpoint refuses the connection (never sent direct).
    fn via_egress_gateway(
        &self,
        resolved: (Target, Option<Arc<UpstreamSettings>>),
        source: ConnectionSource<'_>,
        pick: &Pick<'_>,
    ) -> (Target, Option<Arc<UpstreamSettings>>) {
        let (Target::Passthrough { addr, route }, _) = &resolved else {
            return resolved;
        };
        if !self.leaves_mesh(*addr, source) {
            return resolved;
        }
        let Some(gateways) = self.egress.gateways_for(route.as_deref()) else {
            return resolved;
        };
        let destination = *addr;
        match self.route(gateways.pick(), source, pick) {
            (
                Target::Endpoint {
                    service,
                    backend,
                    pod,
                    addr,
                    ..
                },
                settings,
            ) => (
                Target::Endpoint {
                    service,
                    route: Some(gateways.route.clone()),
                    backend,
                    pod,
                    addr,
                    tunnel_to: Some(destination),
                },
                settings,
            ),
            other => other,
        }
    }

    /// Whether the listener must read the ClientHello of a connection to `original` from
    /// `source` before routing it: a Service port routed by server name (VirtualService
    /// `tls` rules), or, with egress off, a destination outside the mesh that only an
    /// Egress policy's `https` port could open.
    pub fn needs_server_name(&self, original: SocketAddr, source: ConnectionSource<'_>) -> bool {
        if self.services.contains_key(&original) {
            return self.routes_by_sni(original);
        }
        matches!(
            self.egress_verdict(original, source),
            Some(egress::Verdict::NeedsServerName)
        )
    }

    /// Inbound: whether the client at `client` (either family: a pod is known by its IPv4
    /// and its IPv6 address) may reach `pod` on `port`. In SMI mode a TrafficTarget must
    /// grant it; the node's probe address (IPv4) is let in on every port in both modes,
    /// and said so (only the node's own connections carry it: see `datapath::probes`).
    pub fn admit_inbound(
        &self,
        client: IpAddr,
        pod: &PodKey,
        port: u16,
    ) -> Result<Admission, String> {
        if client == IpAddr::V4(interceptor_common::NODE_PROBE_SOURCE) {
            return Ok(Admission::NodeProbe);
        }
        if self.access.is_none() {
            return Ok(Admission::Granted);
        }
        let Some(source) = self.pods_by_ip.get(&client) else {
            return Err(format!("{ACCESS_POLICY}: {client} is not a mesh workload"));
        };
        self.check_access(Some(source), Some(pod), port)
            .map(|()| Admission::Granted)
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

    fn route(
        &self,
        original: SocketAddr,
        source: ConnectionSource<'_>,
        pick: &Pick<'_>,
    ) -> (Target, Option<Arc<UpstreamSettings>>) {
        let Some(route) = self.services.get(&original) else {
            return (
                Target::Passthrough {
                    addr: original,
                    route: None,
                },
                None,
            );
        };
        let chosen = route.policy.as_ref().and_then(|policy| {
            policy
                .rules
                .iter()
                .find(|rule| {
                    rule.matches.is_empty()
                        || rule.matches.iter().any(|m| {
                            let pod = source.pod.and_then(|key| self.sources.get(key));
                            holds(m, original, pod, source.gateway, source.sni)
                        })
                })
                .map(|rule| (policy, rule))
        });
        let by_sni = route.policy.as_ref().filter(|policy| policy.by_sni);
        let (route_name, backend) = match chosen {
            // A TLS client whose server name no rule routes is not sent to the Service.
            None if by_sni.is_some() => {
                let target = Target::Refused {
                    service: route.service.clone(),
                    route: by_sni.map(|p| p.route.clone()).unwrap_or_default(),
                    reason: format!(
                        "no tls rule matches server name {}",
                        source.sni.unwrap_or("(none)")
                    ),
                };
                return (target, None);
            }
            None => (None, &route.default),
            Some((policy, rule)) => match rule.split.pick() {
                Some(backend) => (Some(policy.route.clone()), backend),
                None => {
                    let target = Target::Refused {
                        service: route.service.clone(),
                        route: policy.route.clone(),
                        reason: "every backend of the matching rule has weight 0".into(),
                    };
                    return (target, None);
                }
            },
        };
        let target = match backend.pick(pick) {
            Some(endpoint) => Target::Endpoint {
                service: route.service.clone(),
                route: route_name,
                backend: backend.name.clone(),
                pod: endpoint.pod.to_string(),
                addr: endpoint.addr,
                tunnel_to: None,
            },
            None => Target::NoEndpoints {
                service: route.service.clone(),
                route: route_name,
                backend: backend.name.clone(),
            },
        };
        (target, Some(Arc::clone(&backend.settings)))
    }

    /// Whether connections to `original` are routed by the server name of their
    /// ClientHello (a VirtualService `tls` rule routes the Service port).
    pub fn routes_by_sni(&self, original: SocketAddr) -> bool {
        self.services
            .get(&original)
            .and_then(|route| route.policy.as_ref())
            .is_some_and(|policy| policy.by_sni)
    }

    /// The Service port `original` is (`namespace/name:port`), for refusals.
    pub fn service_name(&self, original: SocketAddr) -> Option<&str> {
        self.services.get(&original).map(|r| r.service.as_str())
    }

    /// Whether a rule of the policy of `original` matches a connection from `source`
    /// (with its server name): on a port routed by server name, a connection none
    /// matches is refused.
    pub fn matches_sni(&self, original: SocketAddr, source: ConnectionSource<'_>) -> bool {
        let Some(policy) = self.services.get(&original).and_then(|r| r.policy.as_ref()) else {
            return true;
        };
        let pod = source.pod.and_then(|key| self.sources.get(key));
        policy.rules.iter().any(|rule| {
            rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .any(|m| holds(m, original, pod, source.gateway, source.sni))
        })
    }

    /// Whether `ip` is a pod enrolled on this node (its inbound listener is local).
    pub fn is_local_enrolled(&self, ip: &Ipv4Addr) -> bool {
        self.local_enrolled.contains(ip)
    }

    /// Every Service VIP:port with what routes it, sorted by VIP (IPv4 first), for the
    /// config dump.
    pub fn service_routes(&self) -> Vec<ServiceRouteView> {
        let mut views: Vec<ServiceRouteView> = self
            .services
            .iter()
            .map(|(vip, route)| ServiceRouteView {
                vip: *vip,
                service: route.service.clone(),
                policy: route.policy.as_ref().map(|p| p.route.clone()),
                endpoints: route.default.endpoints.iter().map(|e| e.addr).collect(),
            })
            .collect();
        views.sort_by_key(|v| v.vip);
        views
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
/// known), accepted by `gateway` (`None`: the mesh), whose ClientHello named `sni`.
fn holds(
    m: &Match,
    original: SocketAddr,
    pod: Option<&Source>,
    gateway: Option<&str>,
    sni: Option<&str>,
) -> bool {
    (m.sni_hosts.is_empty() || m.sni_hosts.iter().any(|h| h.matches(sni)))
        && m.port.is_none_or(|port| port == original.port())
        && (m.destination_subnets.is_empty()
            || m.destination_subnets
                .iter()
                .any(|net| net.contains(&original.ip())))
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

#[cfg(test)]
mod tls_tests;

#[cfg(test)]
mod egress_tests;

#[cfg(test)]
mod udp_tests;
