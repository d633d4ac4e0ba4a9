//! SMI traffic policy mode (FSM's `enablePermissiveTrafficPolicyMode: false`): a
//! connection between mesh workloads is allowed only when an SMI `TrafficTarget` lets the
//! source's ServiceAccount reach the destination's, on a port its rules name. Permissive
//! mode (the default) has no [`AccessPolicy`] at all.
use std::collections::{HashMap, HashSet};

use super::RouteStatus;
use crate::model::routing::{IdentityBinding, Routed, TrafficTargetSpec};
use crate::model::Model;

/// A ServiceAccount: `(namespace, name)`.
pub(super) type Identity = (String, String);

#[derive(Debug, Default)]
pub(super) struct AccessPolicy {
    /// What each (source, destination) pair may reach: `None` is every port.
    grants: HashMap<(Identity, Identity), Option<HashSet<u16>>>,
}

impl AccessPolicy {
    pub(super) fn allows(&self, source: &Identity, destination: &Identity, port: u16) -> bool {
        self.grants
            .get(&(source.clone(), destination.clone()))
            .is_some_and(|ports| ports.as_ref().is_none_or(|p| p.contains(&port)))
    }
}

/// The policy of every accepted TrafficTarget, and the status of each; `enforced` says
/// whether SMI mode is on (the statuses say so when it is not).
pub(super) fn build(model: &Model, enforced: bool) -> (AccessPolicy, Vec<RouteStatus>) {
    let mut policy = AccessPolicy::default();
    let mut statuses = Vec::new();
    for target in model.routing.traffic_targets.values() {
        let mut status = RouteStatus {
            kind: "TrafficTarget",
            name: target.key(),
            accepted: false,
            routes: Vec::new(),
            reasons: Vec::new(),
            conditions: Vec::new(),
        };
        match grants(model, target) {
            Ok((pairs, ports, notes)) => {
                status.accepted = true;
                status.reasons = notes;
                if !enforced {
                    status
                        .reasons
                        .push("not enforced: permissive traffic policy mode".into());
                }
                for (source, destination) in pairs {
                    status.routes.push(format!(
                        "ServiceAccount {}/{} -> ServiceAccount {}/{}",
                        source.0, source.1, destination.0, destination.1
                    ));
                    let entry = policy
                        .grants
                        .entry((source, destination))
                        .or_insert_with(|| Some(HashSet::new()));
                    match (entry.as_mut(), &ports) {
                        (Some(have), Some(more)) => have.extend(more),
                        _ => *entry = None,
                    }
                }
            }
            Err(reasons) => status.reasons = reasons,
        }
        statuses.push(status);
    }
    (policy, statuses)
}

type Grants = (Vec<(Identity, Identity)>, Option<HashSet<u16>>, Vec<String>);

fn grants(model: &Model, target: &Routed<TrafficTargetSpec>) -> Result<Grants, Vec<String>> {
    let spec = &target.spec;
    let mut errors = Vec::new();
    let mut notes = Vec::new();
    let identity = |b: &IdentityBinding, what: &str| -> Result<Identity, String> {
        if b.kind != "ServiceAccount" {
            return Err(format!("{what}: kind {:?} is not ServiceAccount", b.kind));
        }
        if b.name.is_empty() {
            return Err(format!("{what}: name is missing"));
        }
        Ok((
            b.namespace
                .clone()
                .unwrap_or_else(|| target.namespace.clone()),
            b.name.clone(),
        ))
    };
    let destination = identity(&spec.destination, "destination")
        .and_then(|d| {
            // As FSM and OSM do: a TrafficTarget lives in its destination's namespace, so
            // one namespace can never grant access to another's workloads.
            if d.0 == target.namespace {
                Ok(d)
            } else {
                Err(format!(
                    "destination namespace {} is not the TrafficTarget's namespace {}",
                    d.0, target.namespace
                ))
            }
        })
        .map_err(|e| errors.push(e));
    let sources: Vec<Identity> = spec
        .sources
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            identity(s, &format!("sources[{i}]"))
                .map_err(|e| errors.push(e))
                .ok()
        })
        .collect();
    if spec.sources.is_empty() {
        errors.push("no sources: allows nothing".into());
    }
    if spec.rules.is_empty() {
        errors.push("no rules: allows nothing".into());
    }
    // Some(ports) while every rule so far limits ports; None once one allows all.
    let mut ports: Option<HashSet<u16>> = Some(HashSet::new());
    for (i, rule) in spec.rules.iter().enumerate() {
        match rule.kind.as_str() {
            "TCPRoute" => {
                let key = format!("{}/{}", target.namespace, rule.name);
                let Some(route) = model.routing.smi_tcp_routes.get(&key) else {
                    errors.push(format!(
                        "rules[{i}]: TCPRoute {key} (specs.smi-spec.io) does not exist"
                    ));
                    continue;
                };
                if route.spec.matches.ports.is_empty() {
                    ports = None;
                }
                for p in &route.spec.matches.ports {
                    match u16::try_from(*p).ok().filter(|p| *p != 0) {
                        Some(p) => {
                            if let Some(set) = ports.as_mut() {
                                set.insert(p);
                            }
                        }
                        None => errors.push(format!("TCPRoute {key}: port {p} is not a TCP port")),
                    }
                }
            }
            "HTTPRouteGroup" => {
                notes.push(format!(
                    "rules[{i}]: HTTPRouteGroup {} is L7; at L4 it allows the connection on every port",
                    rule.name
                ));
                ports = None;
            }
            other => errors.push(format!(
                "rules[{i}]: kind {other:?} is not TCPRoute or HTTPRouteGroup"
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let destination = destination.map_err(|()| Vec::<String>::new())?;
    let pairs = sources
        .into_iter()
        .map(|s| (s, destination.clone()))
        .collect();
    Ok((pairs, ports, notes))
}
