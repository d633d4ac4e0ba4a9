//! The routing objects in a cluster: the CRDs of Istio, the Gateway API, SMI and FSM, watched
//! as dynamic objects and converted into the same types the manifest source reads. A CRD
//! the cluster does not have (the API server answers 404) counts as listed and empty, so
//! the agent runs in clusters with some, all or none of them, and picks a CRD's objects up
//! when it is installed later (the watcher keeps retrying with backoff).
use kube::api::{ApiResource, DynamicObject};
use serde::de::DeserializeOwned;

use crate::model::routing::{Routed, RoutingObject};
use crate::source::manifests::ManifestError;

/// One routing CRD, at the version the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum RoutingKind {
    VirtualServices,
    DestinationRules,
    IstioGateways,
    Gateways,
    TcpRoutes,
    TrafficSplits,
    TrafficTargets,
    SmiTcpRoutes,
    UpstreamTrafficSettings,
    LoadBalancerPolicies,
    HealthCheckPolicies,
}

impl RoutingKind {
    pub(crate) const ALL: [RoutingKind; 11] = [
        RoutingKind::VirtualServices,
        RoutingKind::DestinationRules,
        RoutingKind::IstioGateways,
        RoutingKind::Gateways,
        RoutingKind::TcpRoutes,
        RoutingKind::TrafficSplits,
        RoutingKind::TrafficTargets,
        RoutingKind::SmiTcpRoutes,
        RoutingKind::UpstreamTrafficSettings,
        RoutingKind::LoadBalancerPolicies,
        RoutingKind::HealthCheckPolicies,
    ];

    /// (group, version, kind, plural).
    fn gvkp(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            RoutingKind::VirtualServices => (
                "networking.istio.io",
                "v1beta1",
                "VirtualService",
                "virtualservices",
            ),
            RoutingKind::DestinationRules => (
                "networking.istio.io",
                "v1beta1",
                "DestinationRule",
                "destinationrules",
            ),
            RoutingKind::IstioGateways => ("networking.istio.io", "v1beta1", "Gateway", "gateways"),
            RoutingKind::Gateways => ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
            RoutingKind::TcpRoutes => (
                "gateway.networking.k8s.io",
                "v1alpha2",
                "TCPRoute",
                "tcproutes",
            ),
            RoutingKind::TrafficSplits => (
                "split.smi-spec.io",
                "v1alpha4",
                "TrafficSplit",
                "trafficsplits",
            ),
            RoutingKind::TrafficTargets => (
                "access.smi-spec.io",
                "v1alpha3",
                "TrafficTarget",
                "traffictargets",
            ),
            RoutingKind::SmiTcpRoutes => ("specs.smi-spec.io", "v1alpha4", "TCPRoute", "tcproutes"),
            RoutingKind::UpstreamTrafficSettings => (
                "policy.flomesh.io",
                "v1alpha1",
                "UpstreamTrafficSetting",
                "upstreamtrafficsettings",
            ),
            RoutingKind::LoadBalancerPolicies => (
                "gateway.flomesh.io",
                "v1alpha1",
                "LoadBalancerPolicy",
                "loadbalancerpolicies",
            ),
            RoutingKind::HealthCheckPolicies => (
                "gateway.flomesh.io",
                "v1alpha1",
                "HealthCheckPolicy",
                "healthcheckpolicies",
            ),
        }
    }

    pub(crate) fn resource(self) -> ApiResource {
        let (group, version, kind, plural) = self.gvkp();
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }

    /// The collection's path on the API server, as kube-rs requests it.
    pub(crate) fn path(self) -> &'static str {
        match self {
            RoutingKind::VirtualServices => "/apis/networking.istio.io/v1beta1/virtualservices",
            RoutingKind::DestinationRules => "/apis/networking.istio.io/v1beta1/destinationrules",
            RoutingKind::IstioGateways => "/apis/networking.istio.io/v1beta1/gateways",
            RoutingKind::Gateways => "/apis/gateway.networking.k8s.io/v1/gateways",
            RoutingKind::TcpRoutes => "/apis/gateway.networking.k8s.io/v1alpha2/tcproutes",
            RoutingKind::TrafficSplits => "/apis/split.smi-spec.io/v1alpha4/trafficsplits",
            RoutingKind::TrafficTargets => "/apis/access.smi-spec.io/v1alpha3/traffictargets",
            RoutingKind::SmiTcpRoutes => "/apis/specs.smi-spec.io/v1alpha4/tcproutes",
            RoutingKind::UpstreamTrafficSettings => {
                "/apis/policy.flomesh.io/v1alpha1/upstreamtrafficsettings"
            }
            RoutingKind::LoadBalancerPolicies => {
                "/apis/gateway.flomesh.io/v1alpha1/loadbalancerpolicies"
            }
            RoutingKind::HealthCheckPolicies => {
                "/apis/gateway.flomesh.io/v1alpha1/healthcheckpolicies"
            }
        }
    }

    /// `plural.group`, as kubectl names the resource.
    pub(crate) fn name(self) -> &'static str {
        match self {
            RoutingKind::VirtualServices => "virtualservices.networking.istio.io",
            RoutingKind::DestinationRules => "destinationrules.networking.istio.io",
            RoutingKind::IstioGateways => "gateways.networking.istio.io",
            RoutingKind::Gateways => "gateways.gateway.networking.k8s.io",
            RoutingKind::TcpRoutes => "tcproutes.gateway.networking.k8s.io",
            RoutingKind::TrafficSplits => "trafficsplits.split.smi-spec.io",
            RoutingKind::TrafficTargets => "traffictargets.access.smi-spec.io",
            RoutingKind::SmiTcpRoutes => "tcproutes.specs.smi-spec.io",
            RoutingKind::UpstreamTrafficSettings => "upstreamtrafficsettings.policy.flomesh.io",
            RoutingKind::LoadBalancerPolicies => "loadbalancerpolicies.gateway.flomesh.io",
            RoutingKind::HealthCheckPolicies => "healthcheckpolicies.gateway.flomesh.io",
        }
    }
}

fn routed<T: DeserializeOwned + Default>(
    kind: RoutingKind,
    obj: DynamicObject,
) -> Result<Routed<T>, ManifestError> {
    let namespace = obj
        .metadata
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".into());
    let name = obj.metadata.name.clone().unwrap_or_default();
    let invalid = |message: String| ManifestError::InvalidValue {
        at: crate::source::manifests::Location {
            file: "<api server>".into(),
            line: None,
            column: None,
        },
        object: format!("{} {namespace}/{name}", kind.gvkp().2),
        field: "spec".into(),
        message,
    };
    let spec = match obj.data.get("spec") {
        None | Some(serde_json::Value::Null) => T::default(),
        Some(spec) => serde_json::from_value(spec.clone()).map_err(|e| invalid(e.to_string()))?,
    };
    Ok(Routed {
        created: obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        order: 0,
        namespace,
        name,
        spec,
    })
}

/// The routing object of `kind` from a watched dynamic object.
pub(crate) fn convert(
    kind: RoutingKind,
    obj: DynamicObject,
) -> Result<RoutingObject, ManifestError> {
    Ok(match kind {
        RoutingKind::VirtualServices => RoutingObject::VirtualService(routed(kind, obj)?),
        RoutingKind::DestinationRules => RoutingObject::DestinationRule(routed(kind, obj)?),
        RoutingKind::IstioGateways => RoutingObject::IstioGateway(routed(kind, obj)?),
        RoutingKind::Gateways => RoutingObject::Gateway(routed(kind, obj)?),
        RoutingKind::TcpRoutes => RoutingObject::TcpRoute(routed(kind, obj)?),
        RoutingKind::TrafficSplits => RoutingObject::TrafficSplit(routed(kind, obj)?),
        RoutingKind::TrafficTargets => RoutingObject::TrafficTarget(routed(kind, obj)?),
        RoutingKind::SmiTcpRoutes => RoutingObject::SmiTcpRoute(routed(kind, obj)?),
        RoutingKind::UpstreamTrafficSettings => {
            RoutingObject::UpstreamTrafficSetting(routed(kind, obj)?)
        }
        RoutingKind::LoadBalancerPolicies => RoutingObject::LoadBalancerPolicy(routed(kind, obj)?),
        RoutingKind::HealthCheckPolicies => RoutingObject::HealthCheckPolicy(routed(kind, obj)?),
    })
}
