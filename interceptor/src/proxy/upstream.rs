//! Upstream state shared by every listener of one process (the agent's pods, or a
//! gateway), kept across route table rebuilds: open connections per client and host
//! (circuit breaking), a token bucket per endpoint and host (connection rate limits),
//! and per endpoint its open connections (least connections), consecutive failures and
//! ejection (outlier detection). Also how a connection to a Service is opened: limits
//! first, then one connect, and on a connect failure one retry on another endpoint, before
//! any byte of the client has been read.
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpStream;

use super::connection::ProxyError;
use super::routes::{
    EndpointHealth, EndpointView, Pick, RateLimit, Resolved, Target, UpstreamSettings,
};
use super::socket::{self, SocketFactory};
use crate::model::Endpoint;
use crate::sync::lock;

/// How long an active check waits, once connected, for a reset from an inbound listener
/// whose application is down.
const CHECK_SETTLE: Duration = Duration::from_millis(100);
/// How often the active checker looks for endpoints that are due.
const CHECK_TICK: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    /// The Service, `namespace/name`.
    host: String,
    /// `ip:port`.
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    #[prometheus(flatten)]
    endpoint: EndpointLabels,
    /// `max_connections` or `rate_limit`.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    #[prometheus(flatten)]
    endpoint: EndpointLabels,
    /// `success` or `failure`.
    result: &'static str,
}

/// The upstream metric families, registered with the proxy's other metrics.
#[derive(Clone, Debug, Default)]
pub struct UpstreamMetrics {
    refused: Family<RefusedLabels, Counter>,
    connect_failures: Family<EndpointLabels, Counter>,
    retries: Family<EndpointLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    checks: Family<CheckLabels, Counter>,
    open: Family<EndpointLabels, Gauge>,
    /// The hosts each endpoint has series for.
    seen: Arc<Mutex<HashMap<SocketAddr, HashSet<String>>>>,
}

impl UpstreamMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "upstream_refused",
            "Connections refused by an UpstreamTrafficSetting: maxConnections reached or no rate-limit token",
            self.refused.clone(),
        );
        registry.register(
            "upstream_connect_failures",
            "Connects to an endpoint that were refused or timed out (and inbound connects to the local application)",
            self.connect_failures.clone(),
        );
        registry.register(
            "upstream_retries",
            "Connections retried on another endpoint after the labelled endpoint failed to connect",
            self.retries.clone(),
        );
        registry.register(
            "upstream_ejections",
            "Times an endpoint was ejected after consecutive failures",
            self.ejections.clone(),
        );
        registry.register(
            "upstream_health_checks",
            "Active TCP checks by result",
            self.checks.clone(),
        );
        registry.register(
            "upstream_open_connections",
            "Open proxied connections per endpoint",
            self.open.clone(),
        );
    }

    /// A connection to `endpoint` of `host` refused on purpose, for `reason`.
    fn refused(&self, host: &str, endpoint: SocketAddr, reason: &'static str) {
        let labels = RefusedLabels {
            endpoint: self.labels(host, endpoint),
            reason,
        };
        self.refused.get_or_create(&labels).inc();
    }
}

impl UpstreamMetrics {
    /// The labels of `endpoint` of `host`, remembered so [`UpstreamMetrics::forget`] can
    /// remove its series once the endpoint is gone.
    fn labels(&self, host: &str, endpoint: SocketAddr) -> EndpointLabels {
        let mut seen = lock(&self.seen);
        let hosts = seen.entry(endpoint).or_default();
        if !hosts.contains(host) {
            hosts.insert(host.to_owned());
        }
        EndpointLabels {
            host: host.to_owned(),
            endpoint: endpoint.to_string(),
        }
    }

    /// Remove every series of endpoints that `keep` rejects, so a cluster whose pods come
    /// and go does not grow `/metrics` (and the agent's memory) without bound.
    fn forget(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let gone: Vec<(SocketAddr, HashSet<String>)> = {
            let mut seen = lock(&self.seen);
            let addrs: Vec<SocketAddr> = seen.keys().filter(|a| !keep(a)).copied().collect();
            addrs
                .into_iter()
                .filter_map(|addr| seen.remove(&addr).map(|hosts| (addr, hosts)))
                .collect()
        };
        for (addr, hosts) in gone {
            for host in hosts {
                let endpoint = EndpointLabels {
                    host,
                    endpoint: addr.to_string(),
                };
                for family in [&self.connect_failures, &self.retries, &self.ejections] {
                    family.remove(&endpoint);
                }
                self.open.remove(&endpoint);
                for reason in ["max_connections", "rate_limit"] {
                    self.refused.remove(&RefusedLabels {
                        endpoint: endpoint.clone(),
                        reason,
                    });
                }
                for result in ["success", "failure"] {
                    self.checks.remove(&CheckLabels {
                        endpoint: endpoint.clone(),
                        result,
                    });
                }
            }
        }
    }
}

/// The shared state; see the module doc.
#[derive(Debug)]
pub struct Upstreams {
    state: Mutex<State>,
    metrics: UpstreamMetrics,
}

#[derive(Debug, Default)]
struct State {
    /// Open connections per (client, host), counted only for hosts with a limit.
    open: HashMap<(String, String), u32>,
    /// Token buckets per (endpoint, host): one per instance, as FSM's local rate limit.
    buckets: HashMap<(SocketAddr, String), Bucket>,
    endpoints: HashMap<SocketAddr, EndpointState>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    limit: RateLimit,
}

#[derive(Debug, Default)]
struct EndpointState {
    open: u32,
    failures: u32,
    ejected_until: Option<Instant>,
}

impl EndpointState {
    /// How much longer the endpoint stays ejected after `now`, if it does.
    fn ejected_for(&self, now: Instant) -> Option<Duration> {
        self.ejected_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }
}

/// A connection counted against its client's `maxConnections` for a host; uncounted on
/// drop.
#[derive(Debug)]
pub struct HostLease {
    upstreams: Arc<Upstreams>,
    key: Option<(String, String)>,
}

impl Drop for HostLease {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            let mut state = lock(&self.upstreams.state);
            if let Some(n) = state.open.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.open.remove(&key);
                }
            }
        }
    }
}

/// An open connection to an endpoint, for least connections; uncounted on drop.
#[derive(Debug)]
pub struct EndpointLease {
    upstreams: Arc<Upstreams>,
    addr: SocketAddr,
    host: String,
}

impl Drop for EndpointLease {
    fn drop(&mut self) {
        // The gauge first: while this connection counts as open, `retain` keeps the
        // endpoint's series, so the decrement never re-creates a removed one.
        self.upstreams
            .metrics
            .open
            .get_or_create(&self.upstreams.metrics.labels(&self.host, self.addr))
            .dec();
        let mut state = lock(&self.upstreams.state);
        if let Some(endpoint) = state.endpoints.get_mut(&self.addr) {
            endpoint.open = endpoint.open.saturating_sub(1);
        }
    }
}

/// The target a connection finally went to, and its upstream connection with what that
/// holds, or why it has none.
pub type Opened = (Target, Result<(TcpStream, Leases), ProxyError>);

/// What a proxied connection holds until it ends.
#[derive(Debug, Default)]
pub struct Leases {
    _host: Option<HostLease>,
    endpoint: Option<EndpointLease>,
}

impl Leases {
    /// The connection is over: bytes came back from the endpoint (`answered`), so its
    /// application is alive and its failure streak ends.
    pub fn served(&self, answered: bool) {
        if let (true, Some(lease)) = (answered, &self.endpoint) {
            lease.upstreams.healthy(lease.addr);
        }
    }
}

/// One endpoint's state, for `/config_dump`.
#[derive(Debug, serde::Serialize)]
pub struct EndpointSnapshot {
    pub endpoint: SocketAddr,
    pub open: u32,
    pub consecutive_failures: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
}

impl Upstreams {
    pub fn new(metrics: UpstreamMetrics) -> Self {
        Self {
            state: Mutex::default(),
            metrics,
        }
    }

    /// Count a new connection from `client` to the host of `settings`, or refuse it when
    /// the host's `maxConnections` are open. `endpoint` labels the refusal.
    pub fn admit(
        self: &Arc<Self>,
        client: &(dyn std::fmt::Display + Sync),
        settings: &UpstreamSettings,
        endpoint: SocketAddr,
    ) -> Result<HostLease, String> {
        let Some(limit) = settings.max_connections else {
            return Ok(HostLease {
                upstreams: Arc::clone(self),
                key: None,
            });
        };
        let key = (client.to_string(), settings.host.clone());
        let mut state = lock(&self.state);
        let open = state.open.entry(key.clone()).or_insert(0);
        if *open >= limit {
            drop(state);
            self.metrics
                .refused(&settings.host, endpoint, "max_connections");
            return Err(format!(
                "{client} has maxConnections ({limit}) open to {}",
                settings.host
            ));
        }
        *open += 1;
        Ok(HostLease {
            upstreams: Arc::clone(self),
            key: Some(key),
        })
    }

    /// Take a token from the bucket of (`endpoint`, host of `settings`), refilled
    /// continuously at the limit's rate. `false` (and counted) when it is empty.
    pub fn take_token(
        &self,
        endpoint: SocketAddr,
        settings: &UpstreamSettings,
        limit: &RateLimit,
        now: Instant,
    ) -> bool {
        let mut state = lock(&self.state);
        let bucket = state
            .buckets
            .entry((endpoint, settings.host.clone()))
            .or_insert_with(|| Bucket {
                tokens: limit.capacity(),
                last: now,
                limit: *limit,
            });
        if bucket.limit != *limit {
            // A changed setting keeps the tokens already earned, up to the new capacity.
            bucket.limit = *limit;
            bucket.tokens = bucket.tokens.min(limit.capacity());
        }
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limit.rate()).min(limit.capacity());
        // Callers read the clock before the lock: never step back and refill twice.
        bucket.last = bucket.last.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return true;
        }
        drop(state);
        self.metrics.refused(&settings.host, endpoint, "rate_limit");
        false
    }
}

impl EndpointHealth for Upstreams {
    fn view(&self, endpoints: &[Endpoint], now: Instant) -> Vec<EndpointView> {
        let state = lock(&self.state);
        endpoints
            .iter()
            .map(|e| match state.endpoints.get(&e.addr) {
                Some(s) => EndpointView {
                    ejected: s.ejected_for(now).is_some(),
                    open: s.open,
                },
                None => EndpointView::default(),
            })
            .collect()
    }
}

impl Upstreams {
    /// A connect to `addr` succeeded: it has one more open connection until the lease
    /// drops. Its failure streak goes on: the connect may have reached the inbound listener
    /// of a mesh pod whose application is down (see [`Leases::served`]).
    pub fn connected(self: &Arc<Self>, addr: SocketAddr, host: &str) -> EndpointLease {
        let mut state = lock(&self.state);
        state.endpoints.entry(addr).or_default().open += 1;
        drop(state);
        self.metrics
            .open
            .get_or_create(&self.metrics.labels(host, addr))
            .inc();
        EndpointLease {
            upstreams: Arc::clone(self),
            addr,
            host: host.to_owned(),
        }
    }

    /// A connect to `addr` (or an active check of it) failed: after `max_fails` in a row
    /// it is ejected for `fail_timeout`.
    pub fn failed(&self, addr: SocketAddr, settings: &UpstreamSettings, now: Instant) {
        let health = settings.health;
        let labels = self.metrics.labels(&settings.host, addr);
        self.metrics.connect_failures.get_or_create(&labels).inc();
        let mut state = lock(&self.state);
        let endpoint = state.endpoints.entry(addr).or_default();
        if endpoint.ejected_for(now).is_some() {
            // Already out (a connection chosen before the ejection, or a check).
            return;
        }
        endpoint.failures += 1;
        let ejected = endpoint.failures >= health.max_fails;
        if ejected {
            endpoint.failures = 0;
            endpoint.ejected_until = now.checked_add(health.fail_timeout);
        }
        drop(state);
        if ejected {
            self.metrics.ejections.get_or_create(&labels).inc();
            tracing::warn!(host = %settings.host, endpoint = %addr, failures = health.max_fails,
                for_ms = health.fail_timeout.as_millis() as u64, "endpoint ejected");
        }
    }

    /// `addr` answered (an active check passed, or a connection got bytes back): its
    /// failure streak ends. An ejection still runs its course, as FSM's `failTimeout` says.
    pub fn healthy(&self, addr: SocketAddr) {
        if let Some(endpoint) = lock(&self.state).endpoints.get_mut(&addr) {
            endpoint.failures = 0;
        }
    }

    /// Forget the endpoints `keep` does not keep (they left every Service), unless a
    /// connection to them is still open; a pod that later reuses an address starts afresh.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let mut state = lock(&self.state);
        state.endpoints.retain(|addr, s| s.open > 0 || keep(addr));
        state.buckets.retain(|(addr, _), _| keep(addr));
        // Series of endpoints with open connections stay until those end and a later
        // table no longer names them.
        let still_open = |addr: &SocketAddr| state.endpoints.get(addr).is_some_and(|s| s.open > 0);
        self.metrics.forget(|addr| still_open(addr) || keep(addr));
    }

    /// Every endpoint the proxy has seen, for `/config_dump`.
    pub fn snapshot(&self) -> Vec<EndpointSnapshot> {
        let now = Instant::now();
        let state = lock(&self.state);
        let mut out: Vec<EndpointSnapshot> = state
            .endpoints
            .iter()
            .map(|(addr, s)| EndpointSnapshot {
                endpoint: *addr,
                open: s.open,
                consecutive_failures: s.failures,
                ejected_for_ms: s.ejected_for(now).map(|d| d.as_millis() as u64),
            })
            .collect();
        out.sort_by_key(|s| s.endpoint);
        out
    }
}

/// Open the upstream connection for a resolved Service connection: the host's
/// `maxConnections`, then a connect within its `connectTimeout`; a connect that fails is
/// counted against the endpoint and retried once on another endpoint. Nothing has been
/// read from the client yet, so a retry never sends application bytes twice. Returns the
/// target finally used and the connection with what it holds, or why there is none.
pub async fn open<F, Fut>(
    upstreams: &Arc<Upstreams>,
    client: &(dyn std::fmt::Display + Sync),
    resolve: impl Fn(&Pick<'_>) -> Resolved,
    client_ip: Option<IpAddr>,
    connect: F,
) -> Opened
where
    F: Fn(SocketAddr, Duration) -> Fut,
    Fut: Future<Output = std::io::Result<TcpStream>>,
{
    let mut pick = Pick {
        client: client_ip,
        health: Some(upstreams.as_ref()),
        avoid: None,
    };
    let first = resolve(&pick);
    let Some(settings) = first.settings.clone() else {
        return plain(first.target, connect).await;
    };
    let Target::Endpoint { addr, .. } = first.target else {
        return plain(first.target, connect).await;
    };
    let mut host = match upstreams.admit(client, &settings, addr) {
        Ok(lease) => lease,
        Err(reason) => return refused(first.target, reason),
    };
    let first_error = match connect(addr, settings.connect_timeout).await {
        Ok(stream) => {
            let endpoint = upstreams.connected(addr, &settings.host);
            return (first.target, Ok((stream, leases(host, endpoint))));
        }
        Err(error) => error,
    };
    count_failure(upstreams, addr, &settings, &first_error);
    pick.avoid = Some(addr);
    let second = resolve(&pick);
    let (Some(retry_settings), Target::Endpoint { addr: retry, .. }) =
        (second.settings.clone(), &second.target)
    else {
        return connect_failed(first.target, addr, first_error);
    };
    let retry = *retry;
    if retry == addr {
        return connect_failed(first.target, addr, first_error);
    }
    upstreams
        .metrics
        .retries
        .get_or_create(&upstreams.metrics.labels(&settings.host, addr))
        .inc();
    if retry_settings.host != settings.host {
        host = match upstreams.admit(client, &retry_settings, retry) {
            Ok(lease) => lease,
            Err(reason) => return refused(second.target, reason),
        };
    }
    match connect(retry, retry_settings.connect_timeout).await {
        Ok(stream) => {
            let endpoint = upstreams.connected(retry, &retry_settings.host);
            (second.target, Ok((stream, leases(host, endpoint))))
        }
        Err(retry_error) => {
            count_failure(upstreams, retry, &retry_settings, &retry_error);
            let error = ProxyError::ConnectRetry {
                addr,
                first: first_error,
                retry,
                source: retry_error,
            };
            (second.target, Err(error))
        }
    }
}

/// Count a failed connect against the endpoint, unless it was reset: then a listener took
/// it (a mesh pod's inbound listener whose application refused, which that listener counts
/// itself, or which refused by policy) and the endpoint's host is not what failed.
fn count_failure(
    upstreams: &Upstreams,
    addr: SocketAddr,
    settings: &UpstreamSettings,
    error: &std::io::Error,
) {
    if error.kind() != std::io::ErrorKind::ConnectionReset {
        upstreams.failed(addr, settings, Instant::now());
    }
}

fn leases(host: HostLease, endpoint: EndpointLease) -> Leases {
    Leases {
        _host: Some(host),
        endpoint: Some(endpoint),
    }
}

/// The target refused by the circuit breaker for `reason`.
fn refused(target: Target, reason: String) -> Opened {
    let service = match target {
        Target::Endpoint { service, .. }
        | Target::NoEndpoints { service, .. }
        | Target::Refused { service, .. } => service,
        Target::Passthrough { addr, .. } | Target::Local { addr, .. } => addr.to_string(),
    };
    refusal(service, "circuit breaker", reason)
}

/// A connection to `service` that `route` refuses on purpose, for `reason`.
pub fn refusal(service: String, route: &str, reason: String) -> Opened {
    let target = Target::Refused {
        service,
        route: route.into(),
        reason,
    };
    not_an_address(target)
}

/// A target that is not an address (a refusal, a backend without endpoints) gets no
/// connection; its error says why.
fn not_an_address(target: Target) -> Opened {
    let error = ProxyError::of_target(&target).expect("not an address");
    (target, Err(error))
}

/// The connect to `addr` failed with `source`.
fn connect_failed(target: Target, addr: SocketAddr, source: std::io::Error) -> Opened {
    (target, Err(ProxyError::Connect { addr, source }))
}

/// A target without upstream settings: passthrough or local delivery, or no connection.
async fn plain<F, Fut>(target: Target, connect: F) -> Opened
where
    F: Fn(SocketAddr, Duration) -> Fut,
    Fut: Future<Output = std::io::Result<TcpStream>>,
{
    let addr = match &target {
        Target::Endpoint { addr, .. }
        | Target::Passthrough { addr, .. }
        | Target::Local { addr, .. } => *addr,
        Target::NoEndpoints { .. } | Target::Refused { .. } => return not_an_address(target),
    };
    match connect(addr, super::routes::DEFAULT_CONNECT_TIMEOUT).await {
        Ok(stream) => (target, Ok((stream, Leases::default()))),
        Err(error) => connect_failed(target, addr, error),
    }
}

/// One endpoint to check actively.
pub struct CheckTarget {
    pub addr: SocketAddr,
    pub settings: Arc<UpstreamSettings>,
    /// Where the check's socket is made: inside the netns of a pod enrolled on this node
    /// (its application is checked from inside, not through its inbound listener), or
    /// here.
    pub sockets: Arc<dyn SocketFactory>,
}

/// Active TCP checks: every endpoint whose Service port has a HealthCheckPolicy is
/// connected to every `interval`: a pod enrolled on this node from inside its netns,
/// others from this process's netns. A check fails when the connect is refused or times
/// out, or when the connection is reset within a moment (what the inbound listener of a
/// pod on another node does when its application does not answer).
pub async fn run_health_checks(upstreams: Arc<Upstreams>, due: impl Fn() -> Vec<CheckTarget>) {
    let mut next: HashMap<SocketAddr, Instant> = HashMap::new();
    let mut checks = tokio::task::JoinSet::new();
    let mut ticker = tokio::time::interval(CHECK_TICK);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(_) = checks.join_next(), if !checks.is_empty() => continue,
        }
        let now = Instant::now();
        let endpoints = due();
        next.retain(|addr, _| endpoints.iter().any(|e| e.addr == *addr));
        for CheckTarget {
            addr,
            settings,
            sockets,
        } in endpoints
        {
            let Some(interval) = settings.health.interval else {
                continue;
            };
            if next.get(&addr).is_some_and(|at| *at > now) {
                continue;
            }
            next.insert(addr, now.checked_add(interval).unwrap_or(now));
            let upstreams = Arc::clone(&upstreams);
            checks.spawn(async move {
                let timeout = settings.connect_timeout.min(interval);
                let healthy = check(addr, timeout, &*sockets).await;
                let result = if healthy { "success" } else { "failure" };
                upstreams
                    .metrics
                    .checks
                    .get_or_create(&CheckLabels {
                        endpoint: upstreams.metrics.labels(&settings.host, addr),
                        result,
                    })
                    .inc();
                if healthy {
                    upstreams.healthy(addr);
                } else {
                    upstreams.failed(addr, &settings, Instant::now());
                }
            });
        }
    }
}

async fn check(addr: SocketAddr, timeout: Duration, sockets: &dyn SocketFactory) -> bool {
    let Ok(stream) = socket::connect(sockets, addr, timeout).await else {
        return false;
    };
    // Readable within the moment: data or EOF is a live application, a reset is not.
    match tokio::time::timeout(CHECK_SETTLE, stream.readable()).await {
        Err(_) => true,
        Ok(Err(_)) => false,
        Ok(Ok(())) => {
            let mut byte = [0u8; 1];
            !matches!(stream.try_read(&mut byte), Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routes::Balancer;

    fn settings(max_connections: Option<u32>) -> UpstreamSettings {
        UpstreamSettings {
            max_connections,
            ..UpstreamSettings::default_for("demo/fortio".into())
        }
    }

    #[test]
    fn max_connections_admits_exactly_the_limit_and_frees_on_drop() {
        let upstreams = Arc::new(Upstreams::new(UpstreamMetrics::default()));
        let s = settings(Some(3));
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let leases: Vec<_> = (0..3)
            .map(|_| upstreams.admit(&"demo/client", &s, addr).unwrap())
            .collect();
        let refused = upstreams.admit(&"demo/client", &s, addr).unwrap_err();
        assert!(refused.contains("maxConnections (3)"), "{refused}");
        // Another client has its own count, as each Envoy sidecar has.
        assert!(upstreams.admit(&"demo/other", &s, addr).is_ok());
        drop(leases);
        assert!(upstreams.admit(&"demo/client", &s, addr).is_ok());
    }

    /// Series of an endpoint the route table no longer names go (issue 14: they were
    /// never removed, so `/metrics` grew with every pod the cluster ever had), except
    /// while the endpoint still has open connections.
    #[test]
    fn series_of_gone_endpoints_are_removed_once_their_connections_end() {
        let metrics = UpstreamMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let encoded = || {
            let mut out = String::new();
            prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
            out
        };
        let upstreams = Arc::new(Upstreams::new(metrics));
        let s = settings(Some(10));
        let (gone, kept): (SocketAddr, SocketAddr) = (
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        let lease = upstreams.connected(gone, &s.host);
        upstreams.failed(gone, &s, Instant::now());
        upstreams.failed(kept, &s, Instant::now());
        assert!(
            encoded().contains("endpoint=\"10.0.0.1:80\""),
            "{}",
            encoded()
        );
        // Still open: its series stay.
        upstreams.retain(|addr| *addr == kept);
        assert!(
            encoded().contains("endpoint=\"10.0.0.1:80\""),
            "{}",
            encoded()
        );
        drop(lease);
        upstreams.retain(|addr| *addr == kept);
        let text = encoded();
        assert!(!text.contains("10.0.0.1:80"), "{text}");
        assert!(text.contains("endpoint=\"10.0.0.2:80\""), "{text}");
    }

    #[test]
    fn a_bucket_gives_its_capacity_at_once_then_its_rate() {
        let upstreams = Upstreams::new(UpstreamMetrics::default());
        let s = settings(None);
        let limit = RateLimit {
            connections: 10,
            per: Duration::from_secs(1),
            burst: 5,
        };
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let t0 = Instant::now();
        let taken = (0..100)
            .filter(|_| upstreams.take_token(addr, &s, &limit, t0))
            .count();
        assert_eq!(taken, 15, "connections + burst at once");
        // 10 per second: 5 tokens after half a second.
        let t1 = t0 + Duration::from_millis(500);
        let taken = (0..100)
            .filter(|_| upstreams.take_token(addr, &s, &limit, t1))
            .count();
        assert_eq!(taken, 5);
        // Never more than the capacity, however long it rested.
        let t2 = t1 + Duration::from_secs(3600);
        let taken = (0..100)
            .filter(|_| upstreams.take_token(addr, &s, &limit, t2))
            .count();
        assert_eq!(taken, 15);
    }

    #[test]
    fn consecutive_failures_eject_for_the_fail_timeout_and_success_resets_the_streak() {
        let upstreams = Arc::new(Upstreams::new(UpstreamMetrics::default()));
        let mut s = settings(None);
        s.health.max_fails = 3;
        s.health.fail_timeout = Duration::from_secs(2);
        s.balancer = Balancer::RoundRobin;
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let endpoints = [Endpoint {
            pod: "demo/fortio-1".parse().unwrap(),
            addr,
        }];
        let t0 = Instant::now();
        upstreams.failed(addr, &s, t0);
        upstreams.failed(addr, &s, t0);
        // A connect alone proves nothing (it may reach a mesh pod's inbound listener);
        // bytes back do.
        drop(upstreams.connected(addr, &s.host));
        upstreams.failed(addr, &s, t0);
        assert!(upstreams.view(&endpoints, t0)[0].ejected, "3 in a row");
        let t0 = t0 + Duration::from_secs(2);
        upstreams.failed(addr, &s, t0);
        upstreams.failed(addr, &s, t0);
        upstreams.healthy(addr);
        upstreams.failed(addr, &s, t0);
        upstreams.failed(addr, &s, t0);
        assert!(
            !upstreams.view(&endpoints, t0)[0].ejected,
            "the streak was broken"
        );
        upstreams.failed(addr, &s, t0);
        assert!(upstreams.view(&endpoints, t0)[0].ejected);
        assert!(upstreams.view(&endpoints, t0 + Duration::from_millis(1999))[0].ejected);
        assert!(!upstreams.view(&endpoints, t0 + Duration::from_secs(2))[0].ejected);
    }
}
