//! From the model's routing objects to the policies of the route table, judging each
//! object on the way: one that names a missing Service, subset or port, or carries an
//! invalid value, is rejected whole with its reasons (and the Services it would have
//! routed keep their default routing); the others are compiled. When two objects claim
//! the same Service port, a VirtualService wins over a TCPRoute, which wins over a
//! TrafficSplit, and between two of one kind the older wins (Gateway API's rule); the loser
//! says so in its status.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use super::hosts::HostPattern;
use super::settings::PortKey;
use super::split::{istio_weights, Split};
use super::{
    Backend, Match, Policy, Rule, ServiceRoute, Transport, UpstreamSettings, MESH_GATEWAY,
};
use crate::model::routing::{
    BackendRef, Destination, IstioL4Route, IstioTcpRoute, IstioTlsRoute, L4MatchAttributes,
    RouteDestination, Routed, TcpRouteRule, TcpRouteSpec, TlsMatchAttributes, TrafficSplitSpec,
    VirtualServiceSpec,
};
use crate::model::{IpFamily, Model, PodAddrs, PodKey, Service, ServiceKey, ServicePort};

/// Whether one routing object is in force, for `/config_dump` and the logs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouteStatus {
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    /// In force for at least one Service port (or gateway listener).
    pub accepted: bool,
    /// What it routes: Service ports (`namespace/name:port`) or gateway listeners.
    pub routes: Vec<String>,
    /// Why it is rejected, or what of it is not in force.
    pub reasons: Vec<String>,
    /// Gateway API route conditions (`Accepted`, `ResolvedRefs`) at a gateway.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A Gateway API status condition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// `True` or `False`.
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

pub(super) struct Compiled {
    pub services: HashMap<SocketAddr, ServiceRoute>,
    pub statuses: Vec<RouteStatus>,
}

/// One object's policies before conflicts are settled.
struct Candidate {
    /// VirtualService 0, TCPRoute 1, TrafficSplit 2.
    rank: u8,
    age: (Option<String>, usize, String),
    status: RouteStatus,
    policies: Vec<(SocketAddr, String, Policy)>,
}

pub(super) struct Ctx<'a> {
    pub model: &'a Model,
    pub pod_ips: &'a HashMap<PodKey, PodAddrs>,
    /// Upstream settings per (Service `namespace/name`, port).
    pub settings: &'a HashMap<PortKey, Arc<UpstreamSettings>>,
}

pub(super) fn compile(
    model: &Model,
    pod_ips: &HashMap<PodKey, PodAddrs>,
    settings: &HashMap<PortKey, Arc<UpstreamSettings>>,
) -> Compiled {
    let ctx = Ctx {
        model,
        pod_ips,
        settings,
    };
    let mut services = HashMap::new();
    for svc in model.services.values() {
        for ip in svc.cluster_ips() {
            for sp in svc.ports.iter().filter(|sp| sp.is_tcp()) {
                services.insert(
                    SocketAddr::new(ip, sp.port),
                    ServiceRoute {
                        service: port_name(svc, sp),
                        default: ctx.backend(svc, sp, None, IpFamily::of(ip)),
                        policy: None,
                    },
                );
            }
        }
    }

    let routing = &model.routing;
    let mut candidates: Vec<Candidate> = Vec::new();
    for vs in routing.virtual_services.values() {
        candidates.push(candidate(0, "VirtualService", vs, |r| {
            ctx.virtual_service(r)
        }));
    }
    for route in routing.tcp_routes.values() {
        candidates.push(candidate(1, "TCPRoute", route, |r| ctx.tcp_route(r)));
    }
    for split in routing.traffic_splits.values() {
        candidates.push(candidate(2, "TrafficSplit", split, |r| {
            ctx.traffic_split(r)
        }));
    }
    candidates.sort_by(|a, b| (a.rank, &a.age).cmp(&(b.rank, &b.age)));

    let mut owners: HashMap<SocketAddr, String> = HashMap::new();
    let mut statuses = Vec::new();
    for mut candidate in candidates {
        let owner = format!("{} {}", candidate.status.kind, candidate.status.name);
        for (addr, service, policy) in candidate.policies {
            // A dual-stack Service port has a policy per VIP, under one name.
            if let Some(first) = owners.get(&addr) {
                push_new(
                    &mut candidate.status.reasons,
                    format!("{service} is routed by {first}, which takes precedence"),
                );
                continue;
            }
            if let Some(route) = services.get_mut(&addr) {
                route.policy = Some(policy);
                owners.insert(addr, owner.clone());
                push_new(&mut candidate.status.routes, service);
            }
        }
        candidate.status.accepted = !candidate.status.routes.is_empty();
        statuses.push(candidate.status);
    }
    statuses.sort_by(|a, b| (a.kind, &a.name).cmp(&(b.kind, &b.name)));
    for status in statuses.iter().filter(|s| !s.reasons.is_empty()) {
        tracing::warn!(kind = status.kind, name = %status.name, accepted = status.accepted,
            reasons = ?status.reasons, "routing object not (fully) in force");
    }
    Compiled { services, statuses }
}

type Compiled1 = Result<(Vec<(SocketAddr, String, Policy)>, Vec<String>), Vec<String>>;

/// Push `item` unless `list` has it already.
fn push_new(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

fn candidate<T>(
    rank: u8,
    kind: &'static str,
    object: &Routed<T>,
    compile: impl FnOnce(&Routed<T>) -> Compiled1,
) -> Candidate {
    let (policies, reasons) = match compile(object) {
        Ok(compiled) => compiled,
        Err(reasons) => (Vec::new(), reasons),
    };
    let (created, order, key) = object.age_key();
    Candidate {
        rank,
        age: (created.map(str::to_owned), order, key),
        status: RouteStatus {
            kind,
            name: object.key(),
            accepted: false,
            routes: Vec::new(),
            reasons,
            conditions: Vec::new(),
        },
        policies,
    }
}

/// Every cluster IP of `svc` (IPv4 first) with every TCP port.
fn vips(svc: &Service) -> impl Iterator<Item = (IpAddr, &ServicePort)> {
    svc.cluster_ips().flat_map(|ip| {
        svc.ports
            .iter()
            .filter(|p| p.is_tcp())
            .map(move |sp| (ip, sp))
    })
}

pub(super) fn port_name(svc: &Service, sp: &ServicePort) -> String {
    format!("{}/{}:{}", svc.namespace, svc.name, sp.port)
}

/// Collects the errors of a whole object: it is in force only if there are none.
#[derive(Default)]
pub(super) struct Errors(pub Vec<String>);

impl Errors {
    /// The value, or `None` with the error kept (once: an object compiled for both VIPs
    /// of a dual-stack Service meets its errors twice).
    pub(super) fn take<T>(&mut self, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| push_new(&mut self.0, e)).ok()
    }
}

impl Ctx<'_> {
    /// A host as Istio and SMI spell it: `name`, `name.ns`, `name.ns.svc[.cluster.local]`,
    /// short names relative to `namespace`.
    pub(super) fn service(&self, host: &str, namespace: &str) -> Result<&Service, String> {
        let trimmed = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        let key = match trimmed.split('.').collect::<Vec<_>>()[..] {
            [name] => ServiceKey::new(namespace, name),
            [name, ns] => ServiceKey::new(ns, name),
            _ => return Err(format!("host {host:?} is not a Service name")),
        };
        self.model
            .service(&key)
            .ok_or_else(|| format!("host {host:?}: Service {key} does not exist"))
    }

    /// The port of `svc` a destination means: `number` if given, else the port the
    /// client dialled when `svc` has it, else `svc`'s only TCP port.
    pub(super) fn port<'s>(
        &self,
        svc: &'s Service,
        number: Option<u32>,
        dialled: u16,
    ) -> Result<&'s ServicePort, String> {
        let tcp: Vec<&ServicePort> = svc.ports.iter().filter(|p| p.is_tcp()).collect();
        let found = match number {
            Some(n) => tcp.iter().find(|p| u32::from(p.port) == n).copied(),
            None => tcp
                .iter()
                .find(|p| p.port == dialled)
                .or(if tcp.len() == 1 { tcp.first() } else { None })
                .copied(),
        };
        found.ok_or_else(|| match number {
            Some(n) => format!("Service {} has no TCP port {n}", svc.key()),
            None => format!(
                "Service {} has several TCP ports and none is {dialled}: name the port",
                svc.key()
            ),
        })
    }

    /// A subset's labels, from the oldest DestinationRule for `svc` that defines it.
    pub(super) fn subset(
        &self,
        svc: &Service,
        subset: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let mut rules: Vec<_> = self
            .model
            .routing
            .destination_rules
            .values()
            .filter(|dr| {
                self.service(&dr.spec.host, &dr.namespace)
                    .is_ok_and(|s| s.key() == svc.key())
            })
            .collect();
        rules.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        if rules.is_empty() {
            return Err(format!(
                "subset {subset:?}: no DestinationRule for Service {}",
                svc.key()
            ));
        }
        rules
            .iter()
            .flat_map(|dr| &dr.spec.subsets)
            .find(|s| s.name == subset)
            .map(|s| s.labels.clone())
            .ok_or_else(|| {
                format!(
                    "subset {subset:?} is not defined by the DestinationRules of Service {}",
                    svc.key()
                )
            })
    }

    /// `svc`'s port `sp` (or a subset of it) as a backend of a VIP of `family`: its
    /// endpoints of that family.
    pub(super) fn backend(
        &self,
        svc: &Service,
        sp: &ServicePort,
        subset: Option<(&str, BTreeMap<String, String>)>,
        family: IpFamily,
    ) -> Backend {
        let mut endpoints = self.model.endpoints(svc, sp, self.pod_ips, family);
        let mut name = port_name(svc, sp);
        if let Some((subset, labels)) = subset {
            endpoints.retain(|e| {
                self.model
                    .pod(&e.pod)
                    .is_some_and(|pod| labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
            });
            name.push_str(&format!(" subset {subset}"));
        }
        let settings = self
            .settings
            .get(&(svc.key().to_string(), sp.port))
            .cloned()
            .unwrap_or_else(|| Arc::new(UpstreamSettings::default_for(svc.key().to_string())));
        Backend::new(name, endpoints, settings)
    }

    fn virtual_service(&self, vs: &Routed<VirtualServiceSpec>) -> Compiled1 {
        let spec = &vs.spec;
        let gateways: Vec<String> = if spec.gateways.is_empty() {
            vec![MESH_GATEWAY.into()]
        } else {
            spec.gateways.clone()
        };
        let mut notes = Vec::new();
        if !gateways.iter().any(|g| g == MESH_GATEWAY) {
            notes.push(format!(
                "bound to gateways {gateways:?} only: served by `interceptor gateway`, not the mesh"
            ));
            return Ok((Vec::new(), notes));
        }
        if spec.tcp.is_empty() && spec.tls.is_empty() {
            notes.push("no tcp or tls routes".into());
            return Ok((Vec::new(), notes));
        }
        let mut hosts = Vec::new();
        for host in &spec.hosts {
            if host.starts_with('*') {
                notes.push(format!("host {host:?}: wildcard hosts route gateways only"));
                continue;
            }
            match self.service(host, &vs.namespace) {
                Ok(svc) => hosts.push(svc),
                Err(e) => notes.push(e),
            }
        }
        let mut errors = Errors::default();
        let mut policies = Vec::new();
        for svc in hosts {
            if svc.cluster_ips().next().is_none() {
                notes.push(format!("Service {} has no cluster IP", svc.key()));
                continue;
            }
            for (ip, sp) in vips(svc) {
                let family = IpFamily::of(ip);
                // `tls` rules first: a ClientHello's server name picks among them.
                let mut rules: Vec<Rule> = spec
                    .tls
                    .iter()
                    .enumerate()
                    .filter(|(_, route)| applies_to_port(route, sp.port))
                    .filter_map(|(i, route)| {
                        errors.take(self.istio_tls_rule(vs, i, route, &gateways, sp.port, family))
                    })
                    .collect();
                let by_sni = !rules.is_empty();
                rules.extend(
                    spec.tcp
                        .iter()
                        .enumerate()
                        .filter(|(_, route)| applies_to_port(route, sp.port))
                        .filter_map(|(i, route)| {
                            errors.take(self.istio_rule(vs, i, route, &gateways, sp.port, family))
                        }),
                );
                policies.push((
                    SocketAddr::new(ip, sp.port),
                    port_name(svc, sp),
                    Policy {
                        route: format!("VirtualService {}", vs.key()),
                        rules,
                        by_sni,
                    },
                ));
            }
        }
        if !errors.0.is_empty() {
            errors.0.dedup();
            return Err(errors.0);
        }
        Ok((policies, notes))
    }

    pub(super) fn istio_rule(
        &self,
        vs: &Routed<VirtualServiceSpec>,
        index: usize,
        route: &IstioTcpRoute,
        vs_gateways: &[String],
        dialled: u16,
        family: IpFamily,
    ) -> Result<Rule, String> {
        self.istio_l4_rule(vs, "tcp", index, route, (dialled, family), |m| {
            istio_match(m, vs_gateways, &vs.namespace)
        })
    }

    /// A VirtualService `tls` rule: like a `tcp` rule, with the server names each match
    /// requires.
    pub(super) fn istio_tls_rule(
        &self,
        vs: &Routed<VirtualServiceSpec>,
        index: usize,
        route: &IstioTlsRoute,
        vs_gateways: &[String],
        dialled: u16,
        family: IpFamily,
    ) -> Result<Rule, String> {
        if route.matches.is_empty() {
            return Err(format!("tls[{index}]: match is required (with sniHosts)"));
        }
        self.istio_l4_rule(vs, "tls", index, route, (dialled, family), |m| {
            tls_match(m, vs_gateways, &vs.namespace)
        })
    }

    /// Rule `kind[index]` of `vs` for a connection to port `dialled` of a VIP of
    /// `family`, its matches compiled by `compile`.
    fn istio_l4_rule<M>(
        &self,
        vs: &Routed<VirtualServiceSpec>,
        kind: &str,
        index: usize,
        route: &IstioL4Route<M>,
        (dialled, family): (u16, IpFamily),
        compile: impl Fn(&M) -> Result<Match, String>,
    ) -> Result<Rule, String> {
        let at = |e: String| format!("{kind}[{index}]: {e}");
        let matches = route
            .matches
            .iter()
            .enumerate()
            .map(|(j, m)| compile(m).map_err(|e| at(format!("match[{j}]: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rule {
            matches,
            split: self
                .istio_split(&route.route, &vs.namespace, dialled, family)
                .map_err(at)?,
        })
    }

    /// The weighted destinations of a `tcp` or `tls` rule.
    fn istio_split(
        &self,
        route: &[RouteDestination],
        namespace: &str,
        dialled: u16,
        family: IpFamily,
    ) -> Result<Split, String> {
        if route.is_empty() {
            return Err("no route destinations".into());
        }
        let mut explicit = Vec::new();
        let mut backends = Vec::new();
        for (j, rd) in route.iter().enumerate() {
            let at = |e: String| format!("route[{j}]: {e}");
            explicit.push(match rd.weight {
                None => None,
                Some(w) => Some(
                    u32::try_from(w)
                        .ok()
                        .filter(|w| *w <= 100)
                        .ok_or_else(|| at(format!("weight {w} is not within 0..=100")))?,
                ),
            });
            backends.push(
                self.istio_destination(&rd.destination, namespace, dialled, family)
                    .map_err(at)?,
            );
        }
        let weights = istio_weights(&explicit);
        Ok(Split::new(backends.into_iter().zip(weights).collect()))
    }

    pub(super) fn istio_destination(
        &self,
        d: &Destination,
        namespace: &str,
        dialled: u16,
        family: IpFamily,
    ) -> Result<Backend, String> {
        let svc = self.service(&d.host, namespace)?;
        let sp = self.port(svc, d.port.as_ref().and_then(|p| p.number), dialled)?;
        let subset = match &d.subset {
            Some(name) => Some((name.as_str(), self.subset(svc, name)?)),
            None => None,
        };
        Ok(self.backend(svc, sp, subset, family))
    }

    fn tcp_route(&self, route: &Routed<TcpRouteSpec>) -> Compiled1 {
        let mut notes = Vec::new();
        let parents: Vec<_> = route
            .spec
            .parent_refs
            .iter()
            .filter(|p| p.is_service())
            .collect();
        if parents.len() < route.spec.parent_refs.len() {
            notes.push("Gateway parents are served by `interceptor gateway`, not the mesh".into());
        }
        if parents.is_empty() {
            return Ok((Vec::new(), notes));
        }
        let (backends, mut errors) =
            self.gateway_backends(&route.spec.rules, &route.namespace, Transport::Tcp);
        if route.spec.rules.iter().all(|r| r.backend_refs.is_empty()) {
            return Err(errors.0);
        }
        let mut policies = Vec::new();
        for parent in parents {
            let namespace = parent.namespace.as_deref().unwrap_or(&route.namespace);
            if namespace != route.namespace {
                // A route for another namespace's Service would redirect every client of
                // it (GAMMA "consumer routes" are not supported): producer routes only.
                errors.0.push(format!(
                    "parentRef Service {namespace}/{}: a route may only attach to Services of its own namespace",
                    parent.name
                ));
                continue;
            }
            let key = ServiceKey::new(namespace, &parent.name);
            let Some(svc) = self.model.service(&key) else {
                errors
                    .0
                    .push(format!("parentRef Service {key} does not exist"));
                continue;
            };
            if svc.cluster_ips().next().is_none() {
                errors
                    .0
                    .push(format!("parentRef Service {key} has no cluster IP"));
                continue;
            }
            let ports: Vec<&ServicePort> = svc
                .ports
                .iter()
                .filter(|p| {
                    p.is_tcp()
                        && parent.port.is_none_or(|n| u32::from(p.port) == n)
                        && parent
                            .section_name
                            .as_ref()
                            .is_none_or(|s| p.name.as_ref() == Some(s))
                })
                .collect();
            if ports.is_empty() {
                errors.0.push(format!(
                    "parentRef Service {key} has no TCP port matching port {:?} sectionName {:?}",
                    parent.port, parent.section_name
                ));
            }
            for (ip, sp) in svc
                .cluster_ips()
                .flat_map(|ip| ports.iter().map(move |sp| (ip, sp)))
            {
                let family = IpFamily::of(ip);
                let split = backends
                    .iter()
                    .map(|(svc, sp, weight)| (self.backend(svc, sp, None, family), *weight))
                    .collect();
                policies.push((
                    SocketAddr::new(ip, sp.port),
                    port_name(svc, sp),
                    Policy::single(format!("TCPRoute {}", route.key()), split),
                ));
            }
        }
        if !errors.0.is_empty() {
            return Err(errors.0);
        }
        Ok((policies, notes))
    }

    /// Every rule's backendRefs of a TCPRoute, resolved; each bad one (and an empty list)
    /// is an error naming it.
    pub(super) fn gateway_backends<'s>(
        &'s self,
        rules: &[TcpRouteRule],
        namespace: &str,
        transport: Transport,
    ) -> (Vec<(&'s Service, &'s ServicePort, u32)>, Errors) {
        let refs: Vec<&BackendRef> = rules.iter().flat_map(|r| &r.backend_refs).collect();
        let mut errors = Errors::default();
        if refs.is_empty() {
            errors.0.push("no backendRefs".into());
        }
        let backends = refs
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                errors.take(
                    self.gateway_backend(b, namespace, transport)
                        .map_err(|e| format!("backendRefs[{i}] {}: {e}", b.name)),
                )
            })
            .collect();
        (backends, errors)
    }

    /// A Gateway API backendRef: a Service in the route's namespace with a port of the
    /// route's transport.
    pub(super) fn gateway_backend<'s>(
        &'s self,
        b: &BackendRef,
        namespace: &str,
        transport: Transport,
    ) -> Result<(&'s Service, &'s ServicePort, u32), String> {
        let kind = b.kind.as_deref().unwrap_or("Service");
        if kind != "Service" || !b.group.as_deref().unwrap_or("").is_empty() {
            return Err(format!("kind {kind} is not supported (only Service)"));
        }
        if b.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return Err(
                "a backend in another namespace needs a ReferenceGrant, which is not supported"
                    .into(),
            );
        }
        let Some(port) = b.port else {
            return Err("port is required for a Service backend".into());
        };
        let weight = b.weight.unwrap_or(1);
        let weight = u32::try_from(weight)
            .map_err(|_| format!("weight {weight} is negative or too large"))?;
        let key = ServiceKey::new(namespace, &b.name);
        let svc = self
            .model
            .service(&key)
            .ok_or_else(|| format!("Service {key} does not exist"))?;
        let sp = match transport {
            Transport::Tcp => self.port(svc, Some(port), 0)?,
            Transport::Udp => udp_port(svc, port)?,
        };
        Ok((svc, sp, weight))
    }

    fn traffic_split(&self, ts: &Routed<TrafficSplitSpec>) -> Compiled1 {
        let same_namespace = |svc: &Service, what: &str| {
            if svc.namespace == ts.namespace {
                Ok(())
            } else {
                Err(format!(
                    "{what} Service {} is not in the TrafficSplit's namespace {}",
                    svc.key(),
                    ts.namespace
                ))
            }
        };
        let root = self
            .service(&ts.spec.service, &ts.namespace)
            .map_err(|e| vec![format!("service: {e}")])?;
        same_namespace(root, "root").map_err(|e| vec![e])?;
        if root.cluster_ips().next().is_none() {
            return Err(vec![format!(
                "root Service {} has no cluster IP",
                root.key()
            )]);
        }
        if ts.spec.backends.is_empty() {
            return Err(vec!["no backends".into()]);
        }
        let mut errors = Errors::default();
        let mut policies = Vec::new();
        for (ip, sp) in vips(root) {
            let family = IpFamily::of(ip);
            let mut split = Vec::new();
            for (i, b) in ts.spec.backends.iter().enumerate() {
                let backend = (|| {
                    let weight = u32::try_from(b.weight)
                        .map_err(|_| format!("weight {} is negative or too large", b.weight))?;
                    let svc = self.service(&b.service, &ts.namespace)?;
                    same_namespace(svc, "backend")?;
                    let bsp = self.port(svc, None, sp.port)?;
                    Ok((self.backend(svc, bsp, None, family), weight))
                })();
                if let Some(b) =
                    errors.take(backend.map_err(|e: String| format!("backends[{i}]: {e}")))
                {
                    split.push(b);
                }
            }
            policies.push((
                SocketAddr::new(ip, sp.port),
                port_name(root, sp),
                Policy::single(format!("TrafficSplit {}", ts.key()), split),
            ));
        }
        if !errors.0.is_empty() {
            errors.0.dedup();
            return Err(errors.0);
        }
        Ok((policies, Vec::new()))
    }
}

/// A VirtualService's gateway reference as `namespace/name` (short names are in the
/// VirtualService's namespace); `mesh` stays `mesh`.
pub(super) fn qualify_gateway(gateway: &str, vs_namespace: &str) -> String {
    if gateway == MESH_GATEWAY || gateway.contains('/') {
        gateway.to_owned()
    } else {
        format!("{vs_namespace}/{gateway}")
    }
}

/// Whether any match of `route` can hold for connections on `port` (a rule whose every
/// match names another port is not compiled for this one; a `tls` rule without matches is
/// judged, and rejected).
pub(super) fn applies_to_port<M: AsRef<L4MatchAttributes>>(
    route: &IstioL4Route<M>,
    port: u16,
) -> bool {
    route.matches.is_empty()
        || route
            .matches
            .iter()
            .any(|m| m.as_ref().port.is_none_or(|p| p == u32::from(port)))
}

/// A `tls` match: the L4 conditions of a `tcp` match, and the required server names.
fn tls_match(
    m: &TlsMatchAttributes,
    vs_gateways: &[String],
    vs_namespace: &str,
) -> Result<Match, String> {
    if m.sni_hosts.is_empty() {
        return Err("sniHosts is required".into());
    }
    let sni_hosts = m
        .sni_hosts
        .iter()
        .map(|h| HostPattern::parse(h, true).map_err(|e| format!("sniHosts: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Match {
        sni_hosts,
        ..istio_match(&m.l4, vs_gateways, vs_namespace)?
    })
}

fn istio_match(
    m: &L4MatchAttributes,
    vs_gateways: &[String],
    vs_namespace: &str,
) -> Result<Match, String> {
    let port = match m.port {
        None => None,
        Some(p) => Some(
            u16::try_from(p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p} is not a TCP port"))?,
        ),
    };
    let destination_subnets = m
        .destination_subnets
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| format!("destinationSubnets: {s:?} is not an IP address or CIDR"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A match's gateways default to the VirtualService's; only mesh traffic reaches here
    // when those are `mesh`, so an explicit list without `mesh` never matches mesh traffic.
    let gateways = if m.gateways.is_empty() {
        vs_gateways
    } else {
        &m.gateways
    }
    .iter()
    .map(|g| qualify_gateway(g, vs_namespace))
    .collect();
    Ok(Match {
        port,
        destination_subnets,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
        gateways,
        sni_hosts: Vec::new(),
    })
}

/// A UDPRoute's Service port `number`: the one with `protocol: UDP`, else the one left
/// at Kubernetes' default protocol (TCP). FSM's own example (7.4.11) names a Service port
/// without a protocol and its UDP echo works there, so such a port carries datagrams too;
/// a Service with both takes the UDP one.
fn udp_port(svc: &Service, number: u32) -> Result<&ServicePort, String> {
    let numbered = || {
        svc.ports
            .iter()
            .filter(move |p| u32::from(p.port) == number)
    };
    numbered()
        .find(|p| p.protocol == "UDP")
        .or_else(|| numbered().find(|p| p.is_tcp()))
        .ok_or_else(|| format!("Service {} has no UDP (or TCP) port {number}", svc.key()))
}
