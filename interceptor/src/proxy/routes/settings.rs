//! The upstream settings of each Service port, compiled from FSM's objects: an
//! `UpstreamTrafficSetting` (per host: `maxConnections`, `connectTimeout`, the local TCP
//! rate limit), a `LoadBalancerPolicy` (per port: the balancing algorithm) and a
//! `HealthCheckPolicy` (per port: outlier detection and an active TCP check). An object
//! with an invalid value (a zero or negative limit, an unknown unit or algorithm, a host
//! outside its namespace) is rejected with its reasons, and the last valid version of the
//! same object, if there was one, stays in force.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::compile::RouteStatus;
use crate::model::routing::{
    HealthCheckConfig, HealthCheckPolicySpec, LoadBalancerPolicySpec, PolicyTargetRef, Routed,
    UpstreamTrafficSettingSpec,
};
use crate::model::{IpFamily, Model, PodAddrs, PodKey, Service, ServiceKey};

/// Connect timeout when no UpstreamTrafficSetting sets one.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive connect failures that eject an endpoint when no HealthCheckPolicy says.
pub const DEFAULT_MAX_FAILS: u32 = 5;
/// How long an ejected endpoint stays out when no HealthCheckPolicy says.
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy applies to the connections to one Service port.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UpstreamSettings {
    /// The Service, `namespace/name`: the host circuit breaking and rate limits count for.
    pub host: String,
    /// Open connections from one client (pod or gateway) to all endpoints of the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(serialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Token bucket per endpoint pod, applied by the pod's inbound listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    pub balancer: Balancer,
    pub health: Health,
}

impl UpstreamSettings {
    pub fn default_for(host: String) -> Self {
        Self {
            host,
            max_connections: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            rate_limit: None,
            balancer: Balancer::RoundRobin,
            health: Health::default(),
        }
    }
}

/// A token bucket: `connections` tokens per `per`, holding at most `connections + burst`
/// (the capacity FSM gives Envoy's local rate limit filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RateLimit {
    pub connections: u32,
    #[serde(serialize_with = "millis")]
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    pub fn capacity(&self) -> f64 {
        f64::from(self.connections) + f64::from(self.burst)
    }

    /// Tokens added per second.
    pub fn rate(&self) -> f64 {
        f64::from(self.connections) / self.per.as_secs_f64()
    }
}

/// How an endpoint of a backend is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balancer {
    /// In turn (FSM `RoundRobinLoadBalancer`, the default).
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections from this node's proxies, in turn
    /// between equals (FSM `LeastConnectionLoadBalancer`).
    LeastConnections,
    /// Rendezvous hashing of the client's IP: a client keeps its endpoint while that
    /// endpoint is there and healthy, and only the clients of a removed endpoint move
    /// (FSM `HashingLoadBalancer`).
    SourceIpHash,
}

/// Outlier detection and the optional active check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// Consecutive failures (refused or timed-out connects, failed checks) that eject an
    /// endpoint.
    pub max_fails: u32,
    /// How long an ejected endpoint gets no new connections.
    #[serde(serialize_with = "millis")]
    pub fail_timeout: Duration,
    /// Active TCP check period, when a HealthCheckPolicy asks for one.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "opt_millis")]
    pub interval: Option<Duration>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            interval: None,
        }
    }
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn opt_millis<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => millis(d, s),
        None => s.serialize_none(),
    }
}

/// The last valid spec of each settings object, kept across rebuilds so that an invalid
/// update leaves the previous version in force.
#[derive(Debug, Default)]
pub struct LastValid {
    traffic: HashMap<String, UpstreamTrafficSettingSpec>,
    balancers: HashMap<String, LoadBalancerPolicySpec>,
    health: HashMap<String, HealthCheckPolicySpec>,
    pub(super) egresses: HashMap<String, crate::model::routing::EgressSpec>,
}

/// The longest check interval or ejection accepted: a day.
const MAX_SECONDS: i64 = 86_400;

/// Settings per (Service `namespace/name`, port), and the objects' statuses.
pub(super) struct Compiled {
    pub by_port: HashMap<PortKey, Arc<UpstreamSettings>>,
    pub statuses: Vec<RouteStatus>,
}

/// A Service port: (`namespace/name`, port).
pub(super) type PortKey = (String, u16);

/// A value for each of some Service ports.
type PerPort<V> = Vec<(PortKey, V)>;

/// What one valid object sets.
struct Traffic {
    host: String,
    max_connections: Option<u32>,
    connect_timeout: Option<Duration>,
    rate_limit: Option<RateLimit>,
}

pub(super) fn compile(model: &Model, memory: &mut LastValid) -> Compiled {
    let routing = &model.routing;
    let mut statuses = Vec::new();
    let mut by_port: HashMap<PortKey, UpstreamSettings> = HashMap::new();
    for svc in model.services.values() {
        for sp in svc.ports.iter().filter(|sp| sp.is_tcp()) {
            by_port.insert(
                (svc.key().to_string(), sp.port),
                UpstreamSettings::default_for(svc.key().to_string()),
            );
        }
    }

    let mut hosts: HashMap<String, String> = HashMap::new();
    for object in oldest_first(&routing.upstream_traffic_settings) {
        let (valid, mut status) = judge(
            "UpstreamTrafficSetting",
            object,
            &mut memory.traffic,
            |spec| validate_traffic(model, &object.namespace, spec),
        );
        if let Some(valid) = valid {
            match hosts.get(&valid.host) {
                Some(first) => status.reasons.push(format!(
                    "host {} already has UpstreamTrafficSetting {first}, which is older",
                    valid.host
                )),
                None => {
                    hosts.insert(valid.host.clone(), object.key());
                    for ((host, port), settings) in by_port.iter_mut() {
                        if *host != valid.host {
                            continue;
                        }
                        settings.max_connections = valid.max_connections;
                        settings.connect_timeout =
                            valid.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
                        settings.rate_limit = valid.rate_limit;
                        status.routes.push(format!("{host}:{port}"));
                    }
                }
            }
        }
        statuses.push(finish(status));
    }

    per_port(
        "LoadBalancerPolicy",
        &routing.load_balancer_policies,
        &mut memory.balancers,
        &mut by_port,
        &mut statuses,
        |object, spec| validate_balancer(model, &object.namespace, spec),
        |s, balancer| s.balancer = balancer,
    );
    per_port(
        "HealthCheckPolicy",
        &routing.health_check_policies,
        &mut memory.health,
        &mut by_port,
        &mut statuses,
        |object, spec| validate_health(model, &object.namespace, spec),
        |s, health| s.health = health,
    );

    // Forget deleted objects: re-created with an invalid spec, nothing of old stays.
    memory
        .traffic
        .retain(|k, _| routing.upstream_traffic_settings.contains_key(k));
    memory
        .balancers
        .retain(|k, _| routing.load_balancer_policies.contains_key(k));
    memory
        .health
        .retain(|k, _| routing.health_check_policies.contains_key(k));

    Compiled {
        by_port: by_port.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        statuses,
    }
}

/// The settings of the Service port each endpoint address serves (the first Service in
/// key order when several select it): what the inbound listener and the active checker
/// apply to it. The endpoints are those of the families of the Service's cluster IPs
/// (both for a headless Service, whose clients dial the pods' own addresses).
pub(super) fn by_endpoint(
    model: &Model,
    pod_ips: &HashMap<PodKey, PodAddrs>,
    by_port: &HashMap<PortKey, Arc<UpstreamSettings>>,
) -> HashMap<SocketAddr, (Arc<UpstreamSettings>, PodKey)> {
    let mut out = HashMap::new();
    for svc in model.services.values() {
        let mut families: Vec<IpFamily> = svc.cluster_ips().map(IpFamily::of).collect();
        if families.is_empty() {
            families = vec![IpFamily::V4, IpFamily::V6];
        }
        for sp in svc.ports.iter().filter(|sp| sp.is_tcp()) {
            let Some(settings) = by_port.get(&(svc.key().to_string(), sp.port)) else {
                continue;
            };
            let endpoints = families
                .iter()
                .flat_map(|family| model.endpoints(svc, sp, pod_ips, *family));
            for endpoint in endpoints {
                out.entry(endpoint.addr)
                    .or_insert_with(|| (Arc::clone(settings), endpoint.pod));
            }
        }
    }
    out
}

/// The endpoints whose settings ask for an active check, each with whether its pod is in
/// the mesh (a check through its inbound listener would meet the mesh's policies).
pub(super) fn checked(
    model: &Model,
    by_endpoint: &HashMap<SocketAddr, (Arc<UpstreamSettings>, PodKey)>,
) -> Vec<Checked> {
    by_endpoint
        .iter()
        .filter(|(_, (s, _))| s.health.interval.is_some())
        .map(|(addr, (s, pod))| Checked {
            addr: *addr,
            settings: Arc::clone(s),
            in_mesh: model.enrollment(pod).is_some_and(|e| e.enrolled),
        })
        .collect()
}

/// An endpoint with an active check.
#[derive(Clone, Debug)]
pub struct Checked {
    pub addr: SocketAddr,
    pub settings: Arc<UpstreamSettings>,
    pub in_mesh: bool,
}

fn finish(mut status: RouteStatus) -> RouteStatus {
    status.routes.sort();
    status.accepted = !status.routes.is_empty();
    if !status.reasons.is_empty() {
        tracing::warn!(kind = status.kind, name = %status.name, accepted = status.accepted,
            reasons = ?status.reasons, "upstream setting not (fully) in force");
    }
    status
}

/// The objects oldest first: the first to claim a host or port keeps it.
pub(super) fn oldest_first<S>(objects: &BTreeMap<String, Routed<S>>) -> Vec<&Routed<S>> {
    let mut sorted: Vec<_> = objects.values().collect();
    sorted.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
    sorted
}

/// Put the per-port policies of one kind in force: each port takes its value from the
/// oldest valid policy that names it.
fn per_port<S: Clone, V: Copy>(
    kind: &'static str,
    objects: &BTreeMap<String, Routed<S>>,
    memory: &mut HashMap<String, S>,
    by_port: &mut HashMap<PortKey, UpstreamSettings>,
    statuses: &mut Vec<RouteStatus>,
    validate: impl Fn(&Routed<S>, &S) -> Result<PerPort<V>, Invalid>,
    set: impl Fn(&mut UpstreamSettings, V),
) {
    let mut owners: HashMap<PortKey, String> = HashMap::new();
    for object in oldest_first(objects) {
        let (valid, mut status) = judge(kind, object, memory, |spec| validate(object, spec));
        for (port, value) in valid.unwrap_or_default() {
            let name = format!("{}:{}", port.0, port.1);
            if let Some(first) = owners.get(&port) {
                status
                    .reasons
                    .push(format!("{name} already has {first}, which is older"));
                continue;
            }
            if let Some(settings) = by_port.get_mut(&port) {
                set(settings, value);
                owners.insert(port, format!("{kind} {}", object.key()));
                status.routes.push(name);
            }
        }
        statuses.push(finish(status));
    }
}

/// Validate an object; when it is invalid, fall back to its last valid spec.
pub(super) fn judge<S: Clone, V>(
    kind: &'static str,
    object: &Routed<S>,
    memory: &mut HashMap<String, S>,
    validate: impl Fn(&S) -> Result<V, Invalid>,
) -> (Option<V>, RouteStatus) {
    let mut status = RouteStatus {
        kind,
        name: object.key(),
        accepted: false,
        routes: Vec::new(),
        reasons: Vec::new(),
        conditions: Vec::new(),
    };
    let valid = match validate(&object.spec) {
        Ok(valid) => {
            memory.insert(object.key(), object.spec.clone());
            Some(valid)
        }
        Err(Invalid::Spec(reasons)) => {
            status.reasons = reasons;
            match memory.get(&object.key()).map(&validate) {
                Some(Ok(previous)) => {
                    status
                        .reasons
                        .push("the previous valid version stays in force".into());
                    Some(previous)
                }
                _ => None,
            }
        }
        // Valid, but about nothing that exists now: no fallback to an older version.
        Err(Invalid::Unresolved(reasons)) => {
            status.reasons = reasons;
            None
        }
    };
    (valid, status)
}

/// Why an object is not in force.
pub(super) enum Invalid {
    /// A value is wrong: the object is rejected.
    Spec(Vec<String>),
    /// What it names is missing (a Service not created yet).
    Unresolved(Vec<String>),
}

fn validate_traffic(
    model: &Model,
    namespace: &str,
    spec: &UpstreamTrafficSettingSpec,
) -> Result<Traffic, Invalid> {
    let mut reasons = Vec::new();
    let host = match host_service(&spec.host, namespace) {
        Ok(host) => Some(host),
        Err(reason) => {
            reasons.push(reason);
            None
        }
    };
    let tcp = spec
        .connection_settings
        .as_ref()
        .and_then(|c| c.tcp.as_ref());
    let max_connections = tcp
        .and_then(|t| t.max_connections)
        .and_then(|n| positive(n, "connectionSettings.tcp.maxConnections", &mut reasons));
    let connect_timeout = tcp
        .and_then(|t| t.connect_timeout.as_deref())
        .and_then(|d| match parse_duration(d) {
            Ok(d) if !d.is_zero() && d.as_secs() <= MAX_SECONDS as u64 => Some(d),
            Ok(_) => {
                reasons.push(format!(
                    "connectionSettings.tcp.connectTimeout must be longer than 0 and at most {MAX_SECONDS} s"
                ));
                None
            }
            Err(e) => {
                reasons.push(format!("connectionSettings.tcp.connectTimeout {d:?}: {e}"));
                None
            }
        });
    let rate_limit = spec
        .rate_limit
        .as_ref()
        .and_then(|r| r.local.as_ref())
        .and_then(|l| l.tcp.as_ref())
        .and_then(|tcp| {
            let connections = positive(
                tcp.connections,
                "rateLimit.local.tcp.connections",
                &mut reasons,
            );
            let per = match tcp.unit.as_str() {
                "second" => Some(Duration::from_secs(1)),
                "minute" => Some(Duration::from_secs(60)),
                "hour" => Some(Duration::from_secs(3600)),
                other => {
                    reasons.push(format!(
                        "rateLimit.local.tcp.unit {other:?} is not one of second, minute, hour"
                    ));
                    None
                }
            };
            let burst = match tcp.burst.unwrap_or(0) {
                n if n < 0 => {
                    reasons.push(format!(
                        "rateLimit.local.tcp.burst must not be negative, got {n}"
                    ));
                    None
                }
                n => u32::try_from(n).ok().or_else(|| {
                    reasons.push(format!("rateLimit.local.tcp.burst {n} is too large"));
                    None
                }),
            };
            Some(RateLimit {
                connections: connections?,
                per: per?,
                burst: burst?,
            })
        });
    if !reasons.is_empty() {
        return Err(Invalid::Spec(reasons));
    }
    let host = host.expect("no reasons means the host parsed");
    let exists = host
        .parse::<ServiceKey>()
        .is_ok_and(|key| model.service(&key).is_some());
    if !exists {
        return Err(Invalid::Unresolved(vec![format!(
            "host {:?}: Service {host} does not exist",
            spec.host
        )]));
    }
    Ok(Traffic {
        host,
        max_connections,
        connect_timeout,
        rate_limit,
    })
}

/// A host as FSM spells it (`name.namespace.svc.cluster.local`, or shorter) as the key
/// `namespace/name` of a Service that must live in `namespace`.
fn host_service(host: &str, namespace: &str) -> Result<String, String> {
    let trimmed = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let (name, host_namespace) = match trimmed.split('.').collect::<Vec<_>>()[..] {
        [name] if !name.is_empty() => (name, namespace),
        [name, ns] if !name.is_empty() && !ns.is_empty() => (name, ns),
        _ => return Err(format!("host {host:?} is not a Service's name")),
    };
    if host_namespace != namespace {
        return Err(format!(
            "host {host:?} is in namespace {host_namespace}, outside the object's namespace {namespace}"
        ));
    }
    Ok(format!("{namespace}/{name}"))
}

fn positive(n: i64, field: &str, reasons: &mut Vec<String>) -> Option<u32> {
    if n <= 0 {
        reasons.push(format!("{field} must be at least 1, got {n}"));
        return None;
    }
    u32::try_from(n).ok().or_else(|| {
        reasons.push(format!("{field} {n} is larger than {}", u32::MAX));
        None
    })
}

/// The Service a policy's `targetRef` names, which must be in the policy's namespace.
fn target_service<'m>(
    model: &'m Model,
    namespace: &str,
    target: &PolicyTargetRef,
) -> Result<Result<&'m Service, String>, String> {
    if !target.group.is_empty() || target.kind != "Service" {
        return Err(format!(
            "targetRef must be a core Service (group \"\", kind Service), not {:?}/{:?}",
            target.group, target.kind
        ));
    }
    if target.name.is_empty() {
        return Err("targetRef has no name".into());
    }
    if let Some(ns) = target.namespace.as_deref().filter(|ns| *ns != namespace) {
        return Err(format!(
            "targetRef is in namespace {ns}, outside the policy's namespace {namespace}"
        ));
    }
    let key = ServiceKey::new(namespace, &target.name);
    Ok(model
        .service(&key)
        .ok_or(format!("targetRef: Service {key} does not exist")))
}

/// Each (port, value) of a per-port policy, validated: listed ports take their own value,
/// every other TCP port of the Service the default value.
fn ports_of<C, V: Copy>(
    model: &Model,
    namespace: &str,
    target: &PolicyTargetRef,
    ports: Vec<(i64, Option<&C>)>,
    default: Option<&C>,
    value: impl Fn(&C, &mut Vec<String>) -> Option<V>,
) -> Result<PerPort<V>, Invalid> {
    let mut reasons = Vec::new();
    let svc = target_service(model, namespace, target).map_err(|r| Invalid::Spec(vec![r]))?;
    let mut listed: BTreeMap<u16, Option<V>> = BTreeMap::new();
    for (port, config) in &ports {
        let Some(port) = u16::try_from(*port).ok().filter(|p| *p != 0) else {
            reasons.push(format!("port {port} is not a port number"));
            continue;
        };
        listed.insert(port, config.and_then(|c| value(c, &mut reasons)));
    }
    let default = default.and_then(|c| value(c, &mut reasons));
    if !reasons.is_empty() {
        return Err(Invalid::Spec(reasons));
    }
    let svc = svc.map_err(|r| Invalid::Unresolved(vec![r]))?;
    let mut out = Vec::new();
    for (port, v) in &listed {
        if !svc.ports.iter().any(|sp| sp.is_tcp() && sp.port == *port) {
            return Err(Invalid::Spec(vec![format!(
                "Service {} has no TCP port {port}",
                svc.key()
            )]));
        }
        if let Some(v) = v.or(default) {
            out.push(((svc.key().to_string(), *port), v));
        }
    }
    if let Some(default) = default {
        for sp in svc.ports.iter().filter(|sp| sp.is_tcp()) {
            if !listed.contains_key(&sp.port) {
                out.push(((svc.key().to_string(), sp.port), default));
            }
        }
    }
    Ok(out)
}

fn validate_balancer(
    model: &Model,
    namespace: &str,
    spec: &LoadBalancerPolicySpec,
) -> Result<PerPort<Balancer>, Invalid> {
    let algorithm = |name: &String, reasons: &mut Vec<String>| match name.as_str() {
        "RoundRobinLoadBalancer" => Some(Balancer::RoundRobin),
        "LeastConnectionLoadBalancer" => Some(Balancer::LeastConnections),
        "HashingLoadBalancer" => Some(Balancer::SourceIpHash),
        other => {
            reasons.push(format!(
                "type {other:?} is not one of RoundRobinLoadBalancer, LeastConnectionLoadBalancer, HashingLoadBalancer"
            ));
            None
        }
    };
    // A port without a type takes the policy's `type`, and without both it is round-robin,
    // as FSM defaults them.
    let round_robin = "RoundRobinLoadBalancer".to_string();
    let default = spec.default_type.as_ref().unwrap_or(&round_robin);
    let ports = spec
        .ports
        .iter()
        .map(|p| (p.port, Some(p.algorithm.as_ref().unwrap_or(default))))
        .collect();
    ports_of(
        model,
        namespace,
        &spec.target_ref,
        ports,
        spec.default_type.as_ref(),
        algorithm,
    )
}

fn validate_health(
    model: &Model,
    namespace: &str,
    spec: &HealthCheckPolicySpec,
) -> Result<PerPort<Health>, Invalid> {
    let health = |c: &HealthCheckConfig, reasons: &mut Vec<String>| {
        let before = reasons.len();
        if c.path.is_some() || !c.matches.is_empty() {
            reasons.push(
                "HTTP checks (path, matches) are not supported: interceptor proxies L4 and checks that a TCP connection opens"
                    .into(),
            );
        }
        if !(1..=MAX_SECONDS).contains(&c.interval) {
            reasons.push(format!(
                "interval must be between 1 and {MAX_SECONDS} seconds, got {}",
                c.interval
            ));
        }
        if c.max_fails < 0 {
            reasons.push(format!(
                "maxFails must not be negative, got {}",
                c.max_fails
            ));
        }
        let fail_timeout = match c.fail_timeout {
            Some(s) if !(0..=MAX_SECONDS).contains(&s) => {
                reasons.push(format!(
                    "failTimeout must be between 0 and {MAX_SECONDS} seconds, got {s}"
                ));
                0
            }
            Some(s) => s as u64,
            None => DEFAULT_FAIL_TIMEOUT.as_secs(),
        };
        (reasons.len() == before).then(|| Health {
            // FSM: the failures tolerated before an endpoint is unhealthy; 0 ejects at the
            // first one.
            max_fails: u32::try_from(c.max_fails).unwrap_or(u32::MAX).max(1),
            fail_timeout: Duration::from_secs(fail_timeout),
            interval: Some(Duration::from_secs(c.interval as u64)),
        })
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| (p.port, p.config.as_ref().or(spec.config.as_ref())))
        .collect();
    ports_of(
        model,
        namespace,
        &spec.target_ref,
        ports,
        spec.config.as_ref(),
        health,
    )
}

/// A Go duration (`300ms`, `5s`, `1m30s`, `1.5h`), as Kubernetes' `metav1.Duration` reads.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?} lacks a unit (ns, us, ms, s, m, h)"))?;
        let value: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{text:?} is not a duration"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            unit => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                ))
            }
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("5").unwrap_err().contains("lacks a unit"));
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn a_host_must_be_a_service_of_the_objects_namespace() {
        assert_eq!(
            host_service("fortio.demo.svc.cluster.local", "demo"),
            Ok("demo/fortio".into())
        );
        assert_eq!(host_service("fortio", "demo"), Ok("demo/fortio".into()));
        let outside = host_service("fortio.other.svc.cluster.local", "demo").unwrap_err();
        assert!(
            outside.contains("outside the object's namespace demo"),
            "{outside}"
        );
        assert!(host_service("a.b.c", "demo").is_err());
    }
}
