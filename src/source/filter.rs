//! The label selectors Cilium's clustermesh-apiserver lists and watches with, so that the
//! objects it ignores never reach the mirror, whichever source they come from.
//!
//! - Services: Cilium's `ServiceResource` (`pkg/k8s/resource_ctors.go`) applies
//!   `GetServiceAndEndpointListOptionsModifier(--k8s-service-proxy-name)`
//!   (`pkg/k8s/utils/utils.go`): without a proxy name, Services that name a service proxy
//!   (`service.kubernetes.io/service-proxy-name`) belong to another proxy and are skipped; with
//!   one, only the Services naming it are read.
//! - EndpointSlices: `EndpointsResource` applies `GetEndpointSliceListOptionsModifier`: the
//!   slices Cilium's own endpoint-slice mesh controller writes (the operator's copies of remote
//!   clusters' backends, `clustermesh.enableEndpointSliceSynchronization`) are not this
//!   cluster's backends and must never be exported back into the mesh.
//! - Cilium's own CRDs and Namespaces are read whole (`clustermesh-apiserver/clustermesh/k8s`).
//!
//! The selector string sent to the API server and the predicate applied to manifests are
//! derived from the same requirements, so the two sources cannot disagree.

use std::collections::BTreeMap;

use crate::translate::model::{Kind, Object};

/// Marks the Services (and, mirrored by Kubernetes, their slices) another service proxy owns.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Kubernetes' label naming the controller that manages an EndpointSlice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The `managed-by` value of Cilium's endpoint-slice mesh controller.
pub const ENDPOINT_SLICE_MESH_CONTROLLER: &str = "endpointslice-mesh-controller.cilium.io";

/// One requirement of a Kubernetes label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Absent(&'static str),
    Equals(&'static str, String),
    NotEquals(&'static str, String),
}

impl Requirement {
    /// As `k8s.io/apimachinery/pkg/labels` writes it.
    fn selector(&self) -> String {
        match self {
            Requirement::Absent(key) => format!("!{key}"),
            Requirement::Equals(key, value) => format!("{key}=={value}"),
            Requirement::NotEquals(key, value) => format!("{key}!={value}"),
        }
    }

    fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let label = |key: &str| labels.and_then(|labels| labels.get(key)).map(String::as_str);
        match self {
            Requirement::Absent(key) => label(key).is_none(),
            Requirement::Equals(key, value) => label(key) == Some(value.as_str()),
            // As in Kubernetes, a missing label satisfies `!=`.
            Requirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
        }
    }
}

/// Which objects of each kind are read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// `--k8s-service-proxy-name`: empty reads the Services that name no proxy.
    pub service_proxy_name: String,
}

impl ListFilter {
    fn requirements(&self, kind: Kind) -> Vec<Requirement> {
        match kind {
            Kind::Service if self.service_proxy_name.is_empty() => vec![Requirement::Absent(SERVICE_PROXY_NAME_LABEL)],
            Kind::Service => vec![Requirement::Equals(SERVICE_PROXY_NAME_LABEL, self.service_proxy_name.clone())],
            Kind::EndpointSlice => {
                vec![Requirement::NotEquals(MANAGED_BY_LABEL, ENDPOINT_SLICE_MESH_CONTROLLER.to_owned())]
            }
            _ => Vec::new(),
        }
    }

    /// The `labelSelector` to list and watch `kind` with, if any.
    pub fn label_selector(&self, kind: Kind) -> Option<String> {
        let requirements = self.requirements(kind);
        (!requirements.is_empty()).then(|| requirements.iter().map(Requirement::selector).collect::<Vec<_>>().join(","))
    }

    /// Whether the API server would have returned `object` for [`Self::label_selector`].
    pub fn admits(&self, object: &Object) -> bool {
        let labels = object.metadata().labels.as_ref();
        self.requirements(object.kind()).iter().all(|requirement| requirement.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{EndpointSlice, ObjectMeta, Service};

    fn labelled(pairs: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("web".into()),
            namespace: Some("default".into()),
            labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..ObjectMeta::default()
        }
    }

    fn service(labels: &[(&str, &str)]) -> Object {
        Object::Service(Service { metadata: labelled(labels), ..Service::default() })
    }

    fn slice(labels: &[(&str, &str)]) -> Object {
        Object::EndpointSlice(EndpointSlice { metadata: labelled(labels), ..EndpointSlice::default() })
    }

    #[test]
    fn by_default_services_of_another_proxy_are_not_read() {
        let filter = ListFilter::default();
        assert_eq!(filter.label_selector(Kind::Service).as_deref(), Some("!service.kubernetes.io/service-proxy-name"));
        assert!(filter.admits(&service(&[])));
        assert!(!filter.admits(&service(&[(SERVICE_PROXY_NAME_LABEL, "other-proxy")])));
    }

    #[test]
    fn with_a_proxy_name_only_its_services_are_read() {
        let filter = ListFilter { service_proxy_name: "cilium-mesh".into() };
        assert_eq!(
            filter.label_selector(Kind::Service).as_deref(),
            Some("service.kubernetes.io/service-proxy-name==cilium-mesh")
        );
        assert!(filter.admits(&service(&[(SERVICE_PROXY_NAME_LABEL, "cilium-mesh")])));
        assert!(!filter.admits(&service(&[(SERVICE_PROXY_NAME_LABEL, "other-proxy")])));
        assert!(!filter.admits(&service(&[])));
    }

    #[test]
    fn slices_written_by_ciliums_mesh_controller_are_never_read() {
        let filter = ListFilter::default();
        assert_eq!(
            filter.label_selector(Kind::EndpointSlice).as_deref(),
            Some("endpointslice.kubernetes.io/managed-by!=endpointslice-mesh-controller.cilium.io")
        );
        assert!(filter.admits(&slice(&[(MANAGED_BY_LABEL, "endpointslice-controller.k8s.io")])));
        assert!(filter.admits(&slice(&[])), "a slice made by hand has no managed-by label");
        assert!(!filter.admits(&slice(&[(MANAGED_BY_LABEL, ENDPOINT_SLICE_MESH_CONTROLLER)])));
    }

    #[test]
    fn ciliums_own_resources_are_read_whole() {
        let filter = ListFilter { service_proxy_name: "cilium-mesh".into() };
        for kind in [Kind::CiliumNode, Kind::CiliumIdentity, Kind::CiliumEndpoint, Kind::ServiceExport, Kind::Namespace]
        {
            assert_eq!(filter.label_selector(kind), None, "{kind:?}");
        }
    }
}
