//! The routes of one gateway (`interceptor gateway --gateway NS/NAME`): a Gateway API
//! `Gateway` with its TCP listeners and the `TCPRoute`s attached to them, its TLS
//! passthrough listeners and the `TLSRoute`s attached to them (by server name, see
//! `hosts`) and its UDP listeners and the `UDPRoute`s attached to them, or an Istio
//! `Gateway` with its TCP servers and the `VirtualService`s bound to it. Compiled from the model like the mesh's table, judged with Gateway API conditions
//! (`Accepted`, `ResolvedRefs`) or reasons.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use super::compile::{applies_to_port, Condition, Ctx, Errors, RouteStatus};
use super::hosts::{HostPattern, SniRoutes};
use super::settings::{self, Checked, LastValid};
use super::split::Split;
use super::{holds, Pick, Policy, Resolved, Rule, Source, Target, Transport};
use crate::model::routing::{
    GatewaySpec, IstioGatewaySpec, Listener, ParentReference, Routed, TcpRouteRule, TcpRouteSpec,
    TlsRouteSpec,
};
use crate::model::{IpFamily, Model};

const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

/// One listener (Gateway API) or server (Istio) of the gateway.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ListenerStatus {
    pub name: String,
    pub port: u32,
    pub protocol: String,
    /// Served: the gateway listens on the port.
    pub accepted: bool,
    pub attached_routes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug)]
struct GatewayListener {
    name: String,
    policy: Option<Policy>,
    /// The object each rule of `policy` came from (Istio: several VirtualServices may
    /// bind one server).
    owners: Vec<String>,
    /// A TLS passthrough listener: its TLSRoutes by server name (`policy` stays unset).
    tls: Option<SniRoutes<Policy>>,
    /// The listener's `hostname`, narrowing its routes' names.
    hostname: HostPattern,
    /// The kind of route it takes: `TCPRoute`, `TLSRoute` or `UDPRoute`.
    takes: &'static str,
}

impl GatewayListener {
    fn new(name: String, protocol: &str, hostname: HostPattern) -> Self {
        Self {
            name,
            policy: None,
            owners: Vec::new(),
            tls: (protocol == "TLS").then(SniRoutes::default),
            hostname,
            takes: match protocol {
                "TLS" => "TLSRoute",
                "UDP" => "UDPRoute",
                _ => "TCPRoute",
            },
        }
    }
}

/// The transport a Gateway API listener's port is bound for.
fn transport_of(listener: &Listener) -> Transport {
    if listener.protocol == "UDP" {
        Transport::Udp
    } else {
        Transport::Tcp
    }
}

/// A Gateway API route as a gateway attaches it: a TCPRoute, a UDPRoute, or a TLSRoute
/// with its hostnames.
struct RouteView<'a> {
    kind: &'static str,
    key: String,
    namespace: &'a str,
    rules: &'a [TcpRouteRule],
    /// TLSRoute: its hostnames (empty: every name).
    hostnames: Option<&'a [String]>,
}

fn accepted(status: &'static str, reason: &'static str, message: String) -> Condition {
    Condition {
        kind: "Accepted",
        status,
        reason,
        message,
    }
}

/// The gateway listens on IPv4 and reaches its backends' IPv4 endpoints.
const GATEWAY_FAMILY: IpFamily = IpFamily::V4;

/// The routing of one gateway: what each listening port does with a connection.
#[derive(Debug, Default)]
pub struct GatewayTable {
    /// `namespace/name` of the gateway.
    gateway: String,
    /// Why the gateway itself is not served (missing, another class, ...).
    error: Option<String>,
    listeners: BTreeMap<(Transport, u16), GatewayListener>,
    listener_statuses: Vec<ListenerStatus>,
    statuses: Vec<RouteStatus>,
    sources: HashMap<Ipv4Addr, Source>,
    /// The FSM upstream settings objects and whether each is in force.
    settings_statuses: Vec<RouteStatus>,
    /// The endpoints with an active check.
    checked: Vec<Checked>,
    /// Every endpoint of a Service.
    endpoints: std::collections::HashSet<SocketAddr>,
}

impl GatewayTable {
    /// The table of gateway `key` (`namespace/name`): a Gateway API Gateway of that name,
    /// else an Istio Gateway. `class`: serve a Gateway API Gateway only of this class.
    /// `memory`: the last valid upstream settings objects, kept across builds.
    pub fn build(model: &Model, key: &str, class: Option<&str>, memory: &mut LastValid) -> Self {
        let pod_ips = HashMap::new();
        let upstream = settings::compile(model, memory);
        let by_endpoint = settings::by_endpoint(model, &pod_ips, &upstream.by_port);
        let ctx = Ctx {
            model,
            pod_ips: &pod_ips,
            settings: &upstream.by_port,
        };
        let mut table = GatewayTable {
            gateway: key.to_owned(),
            checked: settings::checked(model, &by_endpoint),
            endpoints: by_endpoint.keys().copied().collect(),
            settings_statuses: upstream.statuses,
            sources: model
                .pods
                .values()
                .filter_map(|pod| Some((pod.ip?, Source::of(pod))))
                .collect(),
            ..GatewayTable::default()
        };
        if let Some(gateway) = model.routing.gateways.get(key) {
            match class {
                Some(class) if gateway.spec.gateway_class_name != class => {
                    table.error = Some(format!(
                        "Gateway {key} has gatewayClassName {:?}, not {class:?}: not served",
                        gateway.spec.gateway_class_name
                    ));
                }
                _ => table.gateway_api(&ctx, gateway),
            }
        } else if let Some(gateway) = model.routing.istio_gateways.get(key) {
            table.istio(&ctx, gateway);
        } else {
            table.error = Some(format!(
                "no Gateway {key} (gateway.networking.k8s.io or networking.istio.io)"
            ));
        }
        table
    }

    /// `namespace/name` of the gateway.
    pub fn gateway(&self) -> &str {
        &self.gateway
    }

    /// The TCP ports to listen on (TCP and TLS listeners).
    pub fn ports(&self) -> Vec<u16> {
        self.ports_of(Transport::Tcp)
    }

    /// The UDP ports to listen on, each with its listener's name.
    pub fn udp_listeners(&self) -> Vec<(u16, &str)> {
        self.listeners
            .iter()
            .filter(|((t, _), _)| *t == Transport::Udp)
            .map(|((_, port), l)| (*port, l.name.as_str()))
            .collect()
    }

    /// Whether the UDP listener on `port` still routes by `route` (`UDPRoute ns/name`) to
    /// a backend with endpoint `addr`: a session keeps its backend across rebuilds of the
    /// table while this holds.
    pub fn udp_serves(&self, port: u16, route: &str, addr: SocketAddr) -> bool {
        let policy = self
            .listeners
            .get(&(Transport::Udp, port))
            .and_then(|l| l.policy.as_ref());
        policy.is_some_and(|p| {
            p.route == route
                && p.rules
                    .iter()
                    .flat_map(|r| r.split.backends())
                    .any(|b| b.endpoints.iter().any(|e| e.addr == addr))
        })
    }

    fn ports_of(&self, transport: Transport) -> Vec<u16> {
        self.listeners
            .keys()
            .filter(|(t, _)| *t == transport)
            .map(|(_, port)| *port)
            .collect()
    }

    /// The UDPRoute attached to the UDP listener on `port` (`UDPRoute namespace/name`).
    pub fn udp_route(&self, port: u16) -> Option<&str> {
        let listener = self.listeners.get(&(Transport::Udp, port))?;
        listener.policy.as_ref().map(|p| p.route.as_str())
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn statuses(&self) -> &[RouteStatus] {
        &self.statuses
    }

    /// The FSM upstream settings objects and whether each is in force.
    pub fn settings_statuses(&self) -> &[RouteStatus] {
        &self.settings_statuses
    }

    /// Endpoints with an active check, for the health checker.
    pub fn checked_endpoints(&self) -> &[Checked] {
        &self.checked
    }

    /// Whether `addr` is an endpoint of a Service now.
    pub fn is_endpoint(&self, addr: &SocketAddr) -> bool {
        self.endpoints.contains(addr)
    }

    pub fn listener_statuses(&self) -> &[ListenerStatus] {
        &self.listener_statuses
    }

    /// Where a connection accepted on `local` from `client` goes, with every endpoint
    /// healthy and idle.
    pub fn resolve(&self, local: SocketAddrV4, client: Ipv4Addr) -> Target {
        self.resolve_with(local, client, &Pick::default()).target
    }

    /// Where a connection accepted on `local` from `client` goes, choosing the endpoint
    /// as `pick` allows.
    pub fn resolve_with(&self, local: SocketAddrV4, client: Ipv4Addr, pick: &Pick<'_>) -> Resolved {
        self.resolve_on(Transport::Tcp, local, client, pick)
    }

    /// Where a new session of datagrams from `client` to the UDP listener `local` goes,
    /// choosing the backend by weight and the endpoint as `pick` allows.
    pub fn resolve_udp_with(
        &self,
        local: SocketAddrV4,
        client: Ipv4Addr,
        pick: &Pick<'_>,
    ) -> Resolved {
        self.resolve_on(Transport::Udp, local, client, pick)
    }

    fn resolve_on(
        &self,
        transport: Transport,
        local: SocketAddrV4,
        client: Ipv4Addr,
        pick: &Pick<'_>,
    ) -> Resolved {
        let target = |target| Resolved {
            target,
            settings: None,
        };
        let service = format!("gateway {} port {}", self.gateway, local.port());
        let key = (transport, local.port());
        let Some(policy) = self.listeners.get(&key).and_then(|l| l.policy.as_ref()) else {
            return target(Target::Refused {
                service,
                route: "none".into(),
                reason: "no route is attached to this listener".into(),
            });
        };
        let source = self.sources.get(&client);
        let listener = &self.listeners[&key];
        let found = policy.rules.iter().enumerate().find(|(_, rule)| {
            rule.matches.is_empty()
                || rule
                    .matches
                    .iter()
                    .any(|m| holds(m, local.into(), source, Some(&self.gateway), None))
        });
        let Some((index, rule)) = found else {
            return target(Target::Refused {
                service,
                route: policy.route.clone(),
                reason: "no rule matches".into(),
            });
        };
        let route = listener
            .owners
            .get(index)
            .cloned()
            .unwrap_or_else(|| policy.route.clone());
        pick_endpoint(service, route, &rule.split, client, pick)
    }

    /// Whether the listener on `port` is a TLS passthrough listener (its connections
    /// are routed by the server name of their ClientHello).
    pub fn is_tls(&self, port: u16) -> bool {
        self.listeners
            .get(&(Transport::Tcp, port))
            .is_some_and(|l| l.tls.is_some())
    }

    /// The TLSRoute of the TLS listener on `port` that serves server name `sni`.
    pub fn tls_route(&self, port: u16, sni: Option<&str>) -> Option<&str> {
        let routes = self.listeners.get(&(Transport::Tcp, port))?.tls.as_ref()?;
        routes.lookup(sni).map(|policy| policy.route.as_str())
    }

    /// Where a connection accepted on the TLS listener `local` from `client` with server
    /// name `sni` goes, choosing the endpoint as `pick` allows.
    pub fn resolve_tls_with(
        &self,
        local: SocketAddrV4,
        client: Ipv4Addr,
        sni: Option<&str>,
        pick: &Pick<'_>,
    ) -> Resolved {
        let service = format!("gateway {} port {}", self.gateway, local.port());
        let found = self
            .listeners
            .get(&(Transport::Tcp, local.port()))
            .and_then(|l| l.tls.as_ref())
            .and_then(|routes| routes.lookup(sni));
        let Some(policy) = found else {
            return Resolved {
                target: Target::Refused {
                    service,
                    route: "none".into(),
                    reason: format!(
                        "no TLSRoute of this listener serves server name {}",
                        sni.unwrap_or("(none)")
                    ),
                },
                settings: None,
            };
        };
        let split = &policy.rules[0].split;
        pick_endpoint(service, policy.route.clone(), split, client, pick)
    }

    fn gateway_api(&mut self, ctx: &Ctx<'_>, gateway: &Routed<GatewaySpec>) {
        let gw_namespace = &gateway.namespace;
        // Listeners first: which ports are served.
        for listener in &gateway.spec.listeners {
            let mut status = ListenerStatus {
                name: listener.name.clone(),
                port: listener.port,
                protocol: listener.protocol.clone(),
                accepted: false,
                attached_routes: 0,
                reason: None,
            };
            let port = u16::try_from(listener.port).ok().filter(|p| *p != 0);
            let protocol = listener.protocol.as_str();
            // The API's default mode is Terminate, which an L4 proxy cannot serve.
            let mode = listener
                .tls
                .as_ref()
                .and_then(|t| t.mode.as_deref())
                .unwrap_or("Terminate");
            let hostname = match listener.hostname.as_deref() {
                None | Some("") => Ok(HostPattern::Any),
                Some(h) => HostPattern::parse(h, false).map_err(|e| format!("hostname: {e}")),
            };
            // A TCP and a UDP listener may share a port number; two of one transport not.
            let transport = transport_of(listener);
            let taken = |port| self.listeners.contains_key(&(transport, port));
            status.reason = match (protocol, port, hostname) {
                ("TCP" | "TLS" | "UDP", Some(port), _) if taken(port) => {
                    Some(format!("port {port} is taken by an earlier listener"))
                }
                ("TLS", Some(_), _) if mode != "Passthrough" => Some(format!(
                    "tls mode {mode:?} is not served (only Passthrough: the proxy does not terminate TLS)"
                )),
                ("TCP" | "TLS" | "UDP", Some(_), Err(error)) => Some(error),
                ("TCP" | "TLS" | "UDP", Some(port), Ok(hostname)) => {
                    self.listeners.insert(
                        (transport, port),
                        GatewayListener::new(listener.name.clone(), protocol, hostname),
                    );
                    status.accepted = true;
                    None
                }
                ("TCP" | "TLS" | "UDP", None, _) => Some(format!(
                    "port {} is not a {protocol} port",
                    listener.port
                )),
                (other, _, _) => Some(format!(
                    "protocol {other:?} is not served (only TCP, UDP, and TLS in Passthrough mode)"
                )),
            };
            self.listener_statuses.push(status);
        }
        let mut routes: Vec<(_, RouteView<'_>, &[ParentReference])> = Vec::new();
        for (kind, by_key) in [
            ("TCPRoute", &ctx.model.routing.tcp_routes),
            ("UDPRoute", &ctx.model.routing.udp_routes),
        ] {
            for route in by_key.values() {
                routes.push((
                    route.age_key(),
                    l4_view(kind, route),
                    &route.spec.parent_refs,
                ));
            }
        }
        for route in ctx.model.routing.tls_routes.values() {
            routes.push((route.age_key(), tls_view(route), &route.spec.parent_refs));
        }
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, route, parent_refs) in routes {
            let parents: Vec<&ParentReference> = parent_refs
                .iter()
                .filter(|p| {
                    p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
                        && p.group.as_deref().unwrap_or(GATEWAY_API_GROUP) == GATEWAY_API_GROUP
                        && p.name == gateway.name
                        && p.namespace.as_deref().unwrap_or(route.namespace) == gw_namespace
                })
                .collect();
            if parents.is_empty() {
                continue;
            }
            let status = self.attach(ctx, gateway, &route, &parents);
            self.statuses.push(status);
        }
    }

    /// Attach one TCPRoute, TLSRoute or UDPRoute to the listeners its parentRefs select.
    fn attach(
        &mut self,
        ctx: &Ctx<'_>,
        gateway: &Routed<GatewaySpec>,
        route: &RouteView<'_>,
        parents: &[&ParentReference],
    ) -> RouteStatus {
        let mut status = RouteStatus {
            kind: route.kind,
            name: route.key.clone(),
            accepted: false,
            routes: Vec::new(),
            reasons: Vec::new(),
            conditions: Vec::new(),
        };
        let refuse = |mut status: RouteStatus, reason, message: String| {
            status.reasons.push(message.clone());
            status.conditions.push(accepted("False", reason, message));
            status
        };
        // A TLSRoute's names; none means every name.
        let mut patterns = vec![HostPattern::Any];
        if let Some(hostnames) = route.hostnames.filter(|h| !h.is_empty()) {
            let parsed: Result<Vec<_>, String> = hostnames
                .iter()
                .map(|h| HostPattern::parse(h, false).map_err(|e| format!("hostnames: {e}")))
                .collect();
            match parsed {
                Ok(parsed) => patterns = parsed,
                Err(message) => return refuse(status, "UnsupportedValue", message),
            }
        }
        let route_ns = ctx
            .model
            .namespaces
            .get(route.namespace)
            .map(|ns| ns.labels.clone())
            .unwrap_or_default();
        // The listeners this route may attach to, by sectionName / port and allowedRoutes.
        let mut selected: Vec<((Transport, u16), String)> = Vec::new();
        let mut refusals = Vec::new();
        for parent in parents {
            for listener in &gateway.spec.listeners {
                let Some(port) = u16::try_from(listener.port).ok() else {
                    continue;
                };
                if parent
                    .section_name
                    .as_ref()
                    .is_some_and(|s| s != &listener.name)
                    || parent.port.is_some_and(|p| p != listener.port)
                {
                    continue;
                }
                let key = (transport_of(listener), port);
                let Some(served) = self.listeners.get(&key).filter(|l| l.name == listener.name)
                else {
                    continue;
                };
                // TCP listeners take TCPRoutes, TLS passthrough listeners TLSRoutes, UDP
                // listeners UDPRoutes.
                let protocol_ok = served.takes == route.kind;
                let allowed = listener.allowed_routes.as_ref();
                let from = allowed
                    .and_then(|a| a.namespaces.as_ref())
                    .and_then(|n| n.from.as_deref())
                    .unwrap_or("Same");
                let namespace_ok = match from {
                    "All" => true,
                    "Same" => route.namespace == gateway.namespace,
                    "Selector" => allowed
                        .and_then(|a| a.namespaces.as_ref())
                        .and_then(|n| n.selector.as_ref())
                        .is_some_and(|sel| sel.matches(&route_ns)),
                    _ => false,
                };
                let kind_ok = protocol_ok
                    && allowed.is_none_or(|a| {
                        a.kinds.is_empty()
                            || a.kinds.iter().any(|k| {
                                k.kind == route.kind
                                    && k.group.as_deref().unwrap_or(GATEWAY_API_GROUP)
                                        == GATEWAY_API_GROUP
                            })
                    });
                if namespace_ok && kind_ok {
                    selected.push((key, listener.name.clone()));
                } else if !protocol_ok {
                    refusals.push(format!(
                        "listener {} (protocol {}) does not take {}s",
                        listener.name, listener.protocol, route.kind
                    ));
                } else {
                    refusals.push(format!(
                        "listener {} does not allow {} from namespace {}",
                        listener.name,
                        if kind_ok { "routes" } else { route.kind },
                        route.namespace
                    ));
                }
            }
        }
        selected.dedup();
        if selected.is_empty() {
            let (reason, message) = if refusals.is_empty() {
                (
                    "NoMatchingParent",
                    "no listener matches the parentRefs".to_owned(),
                )
            } else {
                ("NotAllowedByListeners", refusals.join("; "))
            };
            return refuse(status, reason, message);
        }
        let transport = if route.kind == "UDPRoute" {
            Transport::Udp
        } else {
            Transport::Tcp
        };
        let (backends, errors) = ctx.gateway_backends(route.rules, route.namespace, transport);
        if !errors.0.is_empty() {
            let message = errors.0.join("; ");
            status.reasons = errors.0;
            status
                .conditions
                .push(accepted("True", "Accepted", String::new()));
            status.conditions.push(Condition {
                kind: "ResolvedRefs",
                status: "False",
                reason: if message.contains("is not supported") {
                    "InvalidKind"
                } else if message.contains("ReferenceGrant") {
                    "RefNotPermitted"
                } else {
                    "BackendNotFound"
                },
                message,
            });
            return status;
        }
        let label = format!("{} {}", route.kind, route.key);
        let policy = || {
            Policy::single(
                label.clone(),
                backends
                    .iter()
                    .map(|(svc, sp, w)| (ctx.backend(svc, sp, None, GATEWAY_FAMILY), *w))
                    .collect(),
            )
        };
        // Why the route is not in force on a listener it selected.
        let mut no_hostname = false;
        let mut conflict = false;
        for (key, name) in selected {
            let port = key.1;
            let listener = self
                .listeners
                .get_mut(&key)
                .expect("selected listeners exist");
            if let Some(routes) = &mut listener.tls {
                let mut names: Vec<HostPattern> = patterns
                    .iter()
                    .filter_map(|p| listener.hostname.intersect(p))
                    .collect();
                names.dedup();
                if names.is_empty() {
                    no_hostname = true;
                    status.reasons.push(format!(
                        "no hostname of the route is within listener {name}'s hostname {}",
                        listener.hostname
                    ));
                    continue;
                }
                let mut free = Vec::new();
                for pattern in names {
                    match routes.holder(&pattern) {
                        Some(older) => status.reasons.push(format!(
                            "hostname {pattern} on listener {name} is held by the older {}",
                            older.route
                        )),
                        None => free.push(pattern),
                    }
                }
                if free.is_empty() {
                    conflict = true;
                    continue;
                }
                let shown: Vec<String> = free.iter().map(ToString::to_string).collect();
                routes.add(policy(), &free);
                status.routes.push(format!(
                    "listener {name} (port {port}) hostnames {}",
                    shown.join(", ")
                ));
            } else {
                if let Some(owner) = &listener.policy {
                    status.reasons.push(format!(
                        "listener {name} is taken by the older {}",
                        owner.route
                    ));
                    continue;
                }
                listener.policy = Some(policy());
                status.routes.push(format!("listener {name} (port {port})"));
            }
            if let Some(l) = self.listener_statuses.iter_mut().find(|l| l.name == name) {
                l.attached_routes += 1;
            }
        }
        status.accepted = !status.routes.is_empty();
        status.conditions.push(if status.accepted {
            accepted("True", "Accepted", status.reasons.join("; "))
        } else if conflict {
            // Gateway API leaves this reason to implementations: the older route keeps
            // every name this one asks for.
            accepted("False", "HostnameConflict", status.reasons.join("; "))
        } else if no_hostname {
            accepted(
                "False",
                "NoMatchingListenerHostname",
                status.reasons.join("; "),
            )
        } else {
            accepted("False", "NotAllowedByListeners", status.reasons.join("; "))
        });
        status.conditions.push(Condition {
            kind: "ResolvedRefs",
            status: "True",
            reason: "ResolvedRefs",
            message: String::new(),
        });
        status
    }

    fn istio(&mut self, ctx: &Ctx<'_>, gateway: &Routed<IstioGatewaySpec>) {
        for (i, server) in gateway.spec.servers.iter().enumerate() {
            let name = if server.port.name.is_empty() {
                format!("servers[{i}]")
            } else {
                server.port.name.clone()
            };
            let mut status = ListenerStatus {
                name: name.clone(),
                port: server.port.number,
                protocol: server.port.protocol.clone(),
                accepted: false,
                attached_routes: 0,
                reason: None,
            };
            let port = u16::try_from(server.port.number).ok().filter(|p| *p != 0);
            status.reason = match (server.port.protocol.to_ascii_uppercase().as_str(), port) {
                ("TCP", Some(port)) if !self.listeners.contains_key(&(Transport::Tcp, port)) => {
                    self.listeners.insert(
                        (Transport::Tcp, port),
                        GatewayListener::new(name, "TCP", HostPattern::Any),
                    );
                    status.accepted = true;
                    None
                }
                ("TCP", Some(port)) => Some(format!("port {port} is taken by an earlier server")),
                ("TCP", None) => Some(format!("port {} is not a TCP port", server.port.number)),
                (other, _) => Some(format!("protocol {other:?} is not served (only TCP)")),
            };
            self.listener_statuses.push(status);
        }
        let mut services: Vec<_> = ctx.model.routing.virtual_services.values().collect();
        services.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let ports = self.ports();
        let mut rules: BTreeMap<u16, Vec<(String, Rule)>> = BTreeMap::new();
        for vs in services {
            let binds = vs.spec.gateways.iter().any(|g| {
                g == &format!("{}/{}", gateway.namespace, gateway.name)
                    || (g == &gateway.name && vs.namespace == gateway.namespace)
            });
            if !binds {
                continue;
            }
            // `servers[].hosts` say which namespaces' VirtualServices may bind: `*` or
            // `*/host` any, `./host` the Gateway's own, `ns/host` that one.
            let admitted = gateway.spec.servers.iter().flat_map(|s| &s.hosts).any(|h| {
                match h.split_once('/') {
                    None | Some(("*", _)) => true,
                    Some((".", _)) => vs.namespace == gateway.namespace,
                    Some((ns, _)) => vs.namespace == ns,
                }
            });
            if !admitted {
                self.statuses.push(RouteStatus {
                    kind: "VirtualService",
                    name: vs.key(),
                    accepted: false,
                    routes: Vec::new(),
                    reasons: vec![format!(
                        "the hosts of Gateway {} do not admit VirtualServices of namespace {}",
                        gateway.key(),
                        vs.namespace
                    )],
                    conditions: Vec::new(),
                });
                continue;
            }
            let mut status = RouteStatus {
                kind: "VirtualService",
                name: vs.key(),
                accepted: false,
                routes: Vec::new(),
                reasons: Vec::new(),
                conditions: Vec::new(),
            };
            if vs.spec.tcp.is_empty() {
                status.reasons.push("no tcp routes".into());
            }
            if !vs.spec.tls.is_empty() {
                status.reasons.push(
                    "tls routes are served in the mesh and by Gateway API TLS listeners, not at an Istio Gateway"
                        .into(),
                );
            }
            let gateways: Vec<String> = vs.spec.gateways.clone();
            let mut errors = Errors::default();
            let mut compiled: Vec<(u16, Rule)> = Vec::new();
            for &port in &ports {
                for (i, route) in vs.spec.tcp.iter().enumerate() {
                    if !applies_to_port(route, port) {
                        continue;
                    }
                    if let Some(rule) =
                        errors.take(ctx.istio_rule(vs, i, route, &gateways, port, GATEWAY_FAMILY))
                    {
                        compiled.push((port, rule));
                    }
                }
            }
            if !errors.0.is_empty() {
                errors.0.dedup();
                status.reasons = errors.0;
            } else {
                for (port, rule) in compiled {
                    let label = format!("port {port}");
                    if !status.routes.contains(&label) {
                        status.routes.push(label);
                    }
                    rules
                        .entry(port)
                        .or_default()
                        .push((format!("VirtualService {}", vs.key()), rule));
                }
                status.accepted = !status.routes.is_empty();
            }
            self.statuses.push(status);
        }
        for (port, port_rules) in rules {
            let names: Vec<String> = port_rules.iter().map(|(n, _)| n.clone()).collect();
            if let Some(listener) = self.listeners.get_mut(&(Transport::Tcp, port)) {
                listener.policy = Some(Policy {
                    route: names.first().cloned().unwrap_or_default(),
                    rules: port_rules.into_iter().map(|(_, r)| r).collect(),
                    by_sni: false,
                });
                listener.owners = names.clone();
            }
            if let Some(l) = self
                .listener_statuses
                .iter_mut()
                .find(|l| l.port == u32::from(port))
            {
                let mut distinct = names.clone();
                distinct.dedup();
                l.attached_routes = distinct.len();
            }
        }
    }
}

/// A TCPRoute or UDPRoute (`kind`) as a gateway attaches it.
fn l4_view<'a>(kind: &'static str, route: &'a Routed<TcpRouteSpec>) -> RouteView<'a> {
    RouteView {
        kind,
        key: route.key(),
        namespace: &route.namespace,
        rules: &route.spec.rules,
        hostnames: None,
    }
}

/// A TLSRoute as a gateway attaches it.
fn tls_view(route: &Routed<TlsRouteSpec>) -> RouteView<'_> {
    RouteView {
        kind: "TLSRoute",
        key: route.key(),
        namespace: &route.namespace,
        rules: &route.spec.rules,
        hostnames: Some(&route.spec.hostnames),
    }
}

/// An endpoint of a backend of `split` for a connection from `client`, as `pick` allows.
fn pick_endpoint(
    service: String,
    route: String,
    split: &Split,
    client: Ipv4Addr,
    pick: &Pick<'_>,
) -> Resolved {
    let target = |target| Resolved {
        target,
        settings: None,
    };
    let Some(backend) = split.pick() else {
        return target(Target::Refused {
            service,
            route,
            reason: "every backend of the matching rule has weight 0".into(),
        });
    };
    let pick = Pick {
        client: Some(IpAddr::V4(client)),
        ..*pick
    };
    match backend.pick(&pick) {
        Some(endpoint) => Resolved {
            target: Target::Endpoint {
                service,
                route: Some(route),
                backend: backend.name.clone(),
                pod: endpoint.pod.to_string(),
                addr: endpoint.addr,
                tunnel_to: None,
            },
            settings: Some(Arc::clone(&backend.settings)),
        },
        None => target(Target::NoEndpoints {
            service,
            route: Some(route),
            backend: backend.name.clone(),
        }),
    }
}
