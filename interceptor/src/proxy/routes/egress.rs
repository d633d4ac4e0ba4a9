//! FSM `Egress` policies (`policy.flomesh.io`): with `enableEgress: false`, which enrolled
//! pods may still reach which destinations outside the mesh. A policy grants its
//! `sources` (ServiceAccounts) its `ports`: on a `tcp` port, every destination in
//! `ipAddresses` (every address when the list is empty); on an `https` port, the same
//! addresses when the ClientHello names one of `hosts`. `http` ports match the HTTP Host
//! header, which an L4 proxy does not read: they grant nothing, and the status says so.
//! An object with a bad value (a CIDR, a port number, a protocol, a source kind, a host)
//! is rejected with its reasons, and its previous valid version stays in force.
//!
//! FSM `EgressGateway` (8.2): egress that leaves the mesh (with egress open, or let out by
//! a policy) goes to the gateway Service's endpoint instead, which is told the original
//! destination by SOCKS5 (`proxy::socks5`): the oldest object's `global` gateways by
//! weight, or, for a connection an Egress policy let out, the gateways of the rule naming
//! that policy.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ipnet::IpNet;

use super::compile::RouteStatus;
use super::hosts::HostPattern;
use super::settings::{judge, oldest_first, Invalid, LastValid};
use crate::model::routing::{EgressGatewayBinding, EgressSpec};
use crate::model::{Model, ServiceKey};

/// The route name of a connection an Egress policy let out: `Egress namespace/name`.
pub const KIND: &str = "Egress";
const GATEWAY_KIND: &str = "EgressGateway";
/// The port of FSM's egress gateway Service, preferred when the Service has several.
const SOCKS_PORT: u16 = 1080;

/// The valid Egress policies, oldest first, and the egress gateways.
#[derive(Debug, Default)]
pub(super) struct EgressPolicies {
    policies: Vec<EgressPolicy>,
    /// The oldest EgressGateway's `global` gateways.
    global: Option<Gateways>,
    /// Per Egress policy route name (`Egress namespace/name`): a rule's gateways.
    by_policy: HashMap<String, Arc<Gateways>>,
}

/// Weighted egress gateways of one binding list, and the object that set them.
#[derive(Debug)]
pub(super) struct Gateways {
    /// `EgressGateway namespace/name`.
    pub route: String,
    /// Each gateway Service's address (VIP and port) and weight (at least 1).
    choices: Vec<(SocketAddr, u32)>,
    total: u32,
    turn: AtomicUsize,
}

impl Gateways {
    /// The next gateway, in turn by weight.
    pub fn pick(&self) -> SocketAddr {
        let mut slot = (self.turn.fetch_add(1, Ordering::Relaxed) % self.total as usize) as u32;
        for (vip, weight) in &self.choices {
            if slot < *weight {
                return *vip;
            }
            slot -= weight;
        }
        self.choices[0].0
    }
}

/// One valid Egress object.
#[derive(Debug)]
struct EgressPolicy {
    /// `Egress namespace/name`.
    route: String,
    /// (namespace, ServiceAccount) of the pods it applies to.
    sources: HashSet<(String, String)>,
    /// Destination ranges; empty: every address.
    ranges: Vec<IpNet>,
    /// Ports open by destination alone.
    tcp_ports: HashSet<u16>,
    /// Ports open to a ClientHello naming one of `hosts`.
    https_ports: HashSet<u16>,
    hosts: Vec<HostPattern>,
}

/// What the policies say of one connection that leaves the mesh.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict<'a> {
    /// A policy lets it out: its route name.
    Allowed(&'a str),
    /// Only an `https` port could let it out: the ClientHello's server name decides.
    NeedsServerName,
    Refused,
}

impl EgressPolicy {
    /// Whether it applies to a pod of `identity` dialling `addr`.
    fn covers(&self, identity: &(String, String), addr: &SocketAddr) -> bool {
        self.sources.contains(identity)
            && (self.ranges.is_empty() || self.ranges.iter().any(|r| r.contains(&addr.ip())))
    }
}

impl EgressPolicies {
    /// The policies in force, with a status per object. `memory` keeps each object's last
    /// valid version across builds.
    pub(super) fn compile(
        model: &Model,
        memory: &mut LastValid,
        statuses: &mut Vec<RouteStatus>,
    ) -> Self {
        let mut policies = Vec::new();
        for object in oldest_first(&model.routing.egresses) {
            let (valid, mut status) = judge(KIND, object, &mut memory.egresses, validate);
            if let Some((policy, notes)) = valid {
                status.reasons.extend(notes);
                status.routes = ports_text(&policy);
                status.accepted = !status.routes.is_empty();
                policies.push(EgressPolicy {
                    route: format!("{KIND} {}", object.key()),
                    ..policy
                });
            }
            if !status.reasons.is_empty() {
                tracing::warn!(name = %status.name, accepted = status.accepted,
                    reasons = ?status.reasons, "Egress policy not (fully) in force");
            }
            statuses.push(status);
        }
        let (global, by_policy) = compile_gateways(model, statuses);
        Self {
            policies,
            global,
            by_policy,
        }
    }

    pub(super) fn has_gateways(&self) -> bool {
        self.global.is_some() || !self.by_policy.is_empty()
    }

    /// The gateways egress let out by `route` (an Egress policy's, or `None`: egress is
    /// open) goes through, if any.
    pub(super) fn gateways_for(&self, route: Option<&str>) -> Option<&Gateways> {
        route
            .and_then(|r| self.by_policy.get(r))
            .map(|g| &**g)
            .or(self.global.as_ref())
    }

    /// Whether a pod of `identity` (namespace, ServiceAccount) may reach `addr`, outside
    /// the mesh, having sent a ClientHello naming `sni` (`None`: not read, or none).
    pub(super) fn verdict(
        &self,
        identity: &(String, String),
        addr: &SocketAddr,
        sni: Option<&str>,
    ) -> Verdict<'_> {
        let port = addr.port();
        let mut by_name = false;
        for policy in self.policies.iter().filter(|p| p.covers(identity, addr)) {
            if policy.tcp_ports.contains(&port) {
                return Verdict::Allowed(&policy.route);
            }
            if policy.https_ports.contains(&port) {
                if policy.hosts.iter().any(|h| h.matches(sni)) {
                    return Verdict::Allowed(&policy.route);
                }
                by_name = true;
            }
        }
        if by_name && sni.is_none() {
            Verdict::NeedsServerName
        } else {
            Verdict::Refused
        }
    }
}

/// `tcp:80`, `https:443 (httpbin.org)`: what the status lists as routed.
fn ports_text(policy: &EgressPolicy) -> Vec<String> {
    let mut ports: Vec<String> = policy
        .tcp_ports
        .iter()
        .map(|p| format!("tcp:{p}"))
        .chain(policy.https_ports.iter().map(|p| format!("https:{p}")))
        .collect();
    ports.sort();
    ports
}

/// The policy an object describes, and what of it is not in force; or why it is rejected.
fn validate(spec: &EgressSpec) -> Result<(EgressPolicy, Vec<String>), Invalid> {
    let mut reasons = Vec::new();
    let mut notes = Vec::new();
    if spec.sources.is_empty() {
        reasons.push("sources: at least one ServiceAccount is required".to_owned());
    }
    let mut sources = HashSet::new();
    for (i, source) in spec.sources.iter().enumerate() {
        if source.kind != "ServiceAccount" {
            reasons.push(format!(
                "sources[{i}].kind: {:?} is not ServiceAccount, the only kind of source",
                source.kind
            ));
        } else if source.name.is_empty() || source.namespace.is_empty() {
            reasons.push(format!(
                "sources[{i}]: a ServiceAccount needs its name and namespace"
            ));
        } else {
            sources.insert((source.namespace.clone(), source.name.clone()));
        }
    }
    let mut ranges = Vec::new();
    for (i, text) in spec.ip_addresses.iter().enumerate() {
        match text.parse::<IpNet>() {
            Ok(net) if net.trunc() != net => reasons.push(format!(
                "ipAddresses[{i}]: {text:?} has host bits set (the range is {})",
                net.trunc()
            )),
            Ok(net) => ranges.push(net),
            Err(_) => reasons.push(format!(
                "ipAddresses[{i}]: {text:?} is not a CIDR such as 203.0.113.0/24 or 2001:db8::/32{}",
                if text.parse::<IpAddr>().is_ok() {
                    " (one address is /32 or /128)"
                } else {
                    ""
                }
            )),
        }
    }
    let mut hosts = Vec::new();
    for (i, host) in spec.hosts.iter().enumerate() {
        match HostPattern::parse(host, false) {
            Ok(pattern) => hosts.push(pattern),
            Err(reason) => reasons.push(format!("hosts[{i}]: {reason}")),
        }
    }
    if spec.ports.is_empty() {
        reasons.push("ports: at least one port is required".to_owned());
    }
    let (mut tcp_ports, mut https_ports) = (HashSet::new(), HashSet::new());
    for (i, port) in spec.ports.iter().enumerate() {
        let Some(number) = u16::try_from(port.number).ok().filter(|n| *n != 0) else {
            reasons.push(format!(
                "ports[{i}].number: {} is not a port (1-65535)",
                port.number
            ));
            continue;
        };
        match port.protocol.to_ascii_lowercase().as_str() {
            "tcp" | "tcp-server-first" => drop(tcp_ports.insert(number)),
            "https" if spec.hosts.is_empty() => reasons.push(format!(
                "ports[{i}]: protocol https matches the ClientHello's server name, and hosts is empty"
            )),
            "https" => drop(https_ports.insert(number)),
            "http" => notes.push(format!(
                "ports[{i}]: protocol http matches the HTTP Host header, which an L4 proxy \
                 does not read: port {number} is not opened"
            )),
            other => reasons.push(format!(
                "ports[{i}].protocol: {other:?} is not tcp, tcp-server-first, https or http"
            )),
        }
    }
    if !spec.matches.is_empty() {
        notes.push(
            "matches: HTTPRouteGroup and UpstreamTrafficSetting references are not applied \
             to egress (L4)"
                .to_owned(),
        );
    }
    if !reasons.is_empty() {
        return Err(Invalid::Spec(reasons));
    }
    if tcp_ports.is_empty() && https_ports.is_empty() {
        notes.push("no port is opened".to_owned());
    }
    Ok((
        EgressPolicy {
            route: String::new(),
            sources,
            ranges,
            tcp_ports,
            https_ports,
            hosts,
        },
        notes,
    ))
}

/// The gateways of the oldest EgressGateway object (others get a reason): its `global`
/// list, and its rules' per-policy lists. A binding whose Service is missing, headless or
/// has no TCP port is left out with a reason; a list left empty sets nothing.
fn compile_gateways(
    model: &Model,
    statuses: &mut Vec<RouteStatus>,
) -> (Option<Gateways>, HashMap<String, Arc<Gateways>>) {
    let mut global = None;
    let mut by_policy = HashMap::new();
    let mut first: Option<String> = None;
    for object in oldest_first(&model.routing.egress_gateways) {
        let route = format!("{GATEWAY_KIND} {}", object.key());
        let mut status = RouteStatus {
            kind: GATEWAY_KIND,
            name: object.key(),
            accepted: false,
            routes: Vec::new(),
            reasons: Vec::new(),
            conditions: Vec::new(),
        };
        if let Some(first) = &first {
            status
                .reasons
                .push(format!("{first} is older: one EgressGateway is in force"));
            statuses.push(status);
            continue;
        }
        first = Some(route.clone());
        let mut resolve = |field: String, bindings: &[EgressGatewayBinding]| {
            let mut choices = Vec::new();
            for (i, binding) in bindings.iter().enumerate() {
                match gateway_address(model, binding) {
                    Ok(vip) => {
                        let weight = binding.weight.unwrap_or(1);
                        if !(1..=i64::from(u16::MAX)).contains(&weight) {
                            status
                                .reasons
                                .push(format!("{field}[{i}].weight: {weight} is not 1-65535"));
                            continue;
                        }
                        status
                            .routes
                            .push(format!("{}/{} ({vip})", binding.namespace, binding.service));
                        choices.push((vip, weight as u32));
                    }
                    Err(reason) => status.reasons.push(format!("{field}[{i}]: {reason}")),
                }
            }
            let total = choices.iter().map(|(_, w)| w).sum();
            (!choices.is_empty()).then(|| Gateways {
                route: route.clone(),
                choices,
                total,
                turn: AtomicUsize::new(0),
            })
        };
        global = resolve("global".to_owned(), &object.spec.global);
        for (r, rule) in object.spec.rules.iter().enumerate() {
            let field = format!("rules[{r}].egressGateways");
            let Some(gateways) = resolve(field, &rule.egress_gateways) else {
                continue;
            };
            let gateways = Arc::new(gateways);
            for policy in &rule.egress_policies {
                let name = format!("{KIND} {}/{}", policy.namespace, policy.name);
                by_policy.insert(name, Arc::clone(&gateways));
            }
        }
        if !object.spec.matches.is_empty() {
            status
                .reasons
                .push("matches: not applied to egress gateways (L4)".to_owned());
        }
        status.routes.sort();
        status.routes.dedup();
        status.accepted = !status.routes.is_empty();
        statuses.push(status);
    }
    (global, by_policy)
}

/// The address the proxy dials for a gateway binding: the Service's ClusterIP (IPv4, else
/// IPv6) and its port 1080, or its only TCP port.
fn gateway_address(model: &Model, binding: &EgressGatewayBinding) -> Result<SocketAddr, String> {
    let key = ServiceKey::new(&binding.namespace, &binding.service);
    let service = model
        .services
        .get(&key)
        .ok_or_else(|| format!("Service {key} does not exist"))?;
    let ip: IpAddr = match (service.cluster_ip, service.cluster_ipv6) {
        (Some(v4), _) => v4.into(),
        (None, Some(v6)) => v6.into(),
        (None, None) => return Err(format!("Service {key} has no cluster IP (headless)")),
    };
    let tcp: Vec<u16> = service
        .ports
        .iter()
        .filter(|p| p.protocol.eq_ignore_ascii_case("TCP"))
        .map(|p| p.port)
        .collect();
    let port = match tcp.as_slice() {
        [] => return Err(format!("Service {key} has no TCP port")),
        [only] => *only,
        several if several.contains(&SOCKS_PORT) => SOCKS_PORT,
        several => {
            return Err(format!(
                "Service {key} has several TCP ports ({several:?}) and none is {SOCKS_PORT}"
            ))
        }
    };
    Ok(SocketAddr::new(ip, port))
}
