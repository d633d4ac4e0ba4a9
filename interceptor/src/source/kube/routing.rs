//! The routing objects in a cluster: the CRDs of Istio, the Gateway API, SMI and FSM, watched
//! as dynamic objects and converted into the same types the manifest source reads. A CRD
//! the cluster does not have (the API server answers 404) counts as listed and empty, so
//! the agent runs in clusters with some, all or none of them, and picks a CRD's objects up
//! when it is installed later (the watcher keeps retrying with backoff).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject};
use serde::de::DeserializeOwned;

use crate::model::routing::RoutingObject;
use crate::source::objects::{self, Decode, FieldPath, ObjectError, RoutingKind, Seg};

/// The API of each routing CRD, at the version the agent watches.
impl RoutingKind {
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
            RoutingKind::TlsRoutes => (
                "gateway.networking.k8s.io",
                "v1alpha2",
                "TLSRoute",
                "tlsroutes",
            ),
            RoutingKind::UdpRoutes => (
                "gateway.networking.k8s.io",
                "v1alpha2",
                "UDPRoute",
                "udproutes",
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
            RoutingKind::Egresses => ("policy.flomesh.io", "v1alpha1", "Egress", "egresses"),
            RoutingKind::EgressGateways => (
                "policy.flomesh.io",
                "v1alpha1",
                "EgressGateway",
                "egressgateways",
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
            RoutingKind::TlsRoutes => "/apis/gateway.networking.k8s.io/v1alpha2/tlsroutes",
            RoutingKind::UdpRoutes => "/apis/gateway.networking.k8s.io/v1alpha2/udproutes",
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
            RoutingKind::Egresses => "/apis/policy.flomesh.io/v1alpha1/egresses",
            RoutingKind::EgressGateways => "/apis/policy.flomesh.io/v1alpha1/egressgateways",
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
            RoutingKind::TlsRoutes => "tlsroutes.gateway.networking.k8s.io",
            RoutingKind::UdpRoutes => "udproutes.gateway.networking.k8s.io",
            RoutingKind::TrafficSplits => "trafficsplits.split.smi-spec.io",
            RoutingKind::TrafficTargets => "traffictargets.access.smi-spec.io",
            RoutingKind::SmiTcpRoutes => "tcproutes.specs.smi-spec.io",
            RoutingKind::UpstreamTrafficSettings => "upstreamtrafficsettings.policy.flomesh.io",
            RoutingKind::LoadBalancerPolicies => "loadbalancerpolicies.gateway.flomesh.io",
            RoutingKind::HealthCheckPolicies => "healthcheckpolicies.gateway.flomesh.io",
            RoutingKind::Egresses => "egresses.policy.flomesh.io",
            RoutingKind::EgressGateways => "egressgateways.policy.flomesh.io",
        }
    }
}

/// A routing object from the API server: its metadata is the API server's; a spec of the
/// wrong shape is reported on the `spec` field (JSON has no line to point at).
struct ApiObject(DynamicObject);

impl Decode for ApiObject {
    type Error = ObjectError;

    fn decode<S: DeserializeOwned + Default>(
        &mut self,
        kind: RoutingKind,
    ) -> Result<(ObjectMeta, S), ObjectError> {
        let spec = match self.0.data.get("spec") {
            None | Some(serde_json::Value::Null) => S::default(),
            Some(spec) => S::deserialize(spec).map_err(|e| {
                let meta = &self.0.metadata;
                let namespace = meta.namespace.as_deref().filter(|ns| !ns.is_empty());
                ObjectError::InvalidValue {
                    object: format!(
                        "{} {}/{}",
                        kind.kind(),
                        namespace.unwrap_or("default"),
                        meta.name.as_deref().unwrap_or("?")
                    ),
                    field: FieldPath::new(&[Seg::Key("spec")]),
                    message: e.to_string(),
                }
            })?,
        };
        Ok((std::mem::take(&mut self.0.metadata), spec))
    }

    fn reject(&self, error: ObjectError) -> ObjectError {
        error
    }
}

/// The routing object of `kind` from a watched dynamic object.
pub(crate) fn convert(kind: RoutingKind, obj: DynamicObject) -> Result<RoutingObject, ObjectError> {
    objects::routing_object(kind, ApiObject(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_of_the_wrong_shape_names_the_object_and_spec() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "split.smi-spec.io/v1alpha4",
            "kind": "TrafficSplit",
            "metadata": {"name": "s", "namespace": "demo"},
            "spec": {"service": "echo", "backends": "all of them"},
        }))
        .unwrap();
        let err = convert(RoutingKind::TrafficSplits, obj).unwrap_err();
        let ObjectError::InvalidValue { object, field, .. } = &err;
        assert_eq!(
            (object.as_str(), field.as_str()),
            ("TrafficSplit demo/s", "spec")
        );
        assert!(
            err.to_string()
                .starts_with("TrafficSplit demo/s: spec: invalid type"),
            "{err}"
        );
    }
}
