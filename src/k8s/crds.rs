//! Cilium and MCS-API custom resources, reduced to the fields the translation reads.
//!
//! Every field is optional (or defaulted) and unknown fields are ignored, so objects from any
//! recent Cilium release decode; the translation decides what is required. Field names follow
//! the CRD JSON (`security-labels`, `named-ports`, `pod-uid`, ...), which is a wire contract with
//! the Kubernetes API, not a Rust choice.

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

// ----- CiliumNode (cilium.io/v2, cluster-scoped) -----

/// What `ParseCiliumNode` reads from a CiliumNode's spec.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNode",
    plural = "ciliumnodes",
    schema = "disabled",
    derive = "Default",
    derive = "PartialEq"
)]
pub struct CiliumNodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<NodeAddress>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<AddressPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<AddressPair>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam: Option<IpamSpec>,
    #[serde(rename = "bootid", default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// One entry of `spec.addresses`; `type` is `InternalIP`, `ExternalIP`, `CiliumInternalIP`, ...
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NodeAddress {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
}

/// `spec.health` and `spec.ingress` of a CiliumNode; Cilium spells both keys `ipv4`/`ipv6`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AddressPair {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
}

/// `encryption` of nodes and endpoints: the IPsec key index (0 = no encryption).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EncryptionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct IpamSpec {
    #[serde(rename = "podCIDRs", default, skip_serializing_if = "Option::is_none")]
    pub pod_cidrs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pools: Option<IpamPools>,
}

/// Multi-pool IPAM: `spec.ipam.pools.allocated[].cidrs` add to the node's alloc CIDRs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct IpamPools {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<Vec<IpamPoolAllocation>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct IpamPoolAllocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidrs: Option<Vec<String>>,
}

// ----- CiliumIdentity (cilium.io/v2, cluster-scoped, no spec) -----

/// A CiliumIdentity has no spec: its labels sit at the top level under `security-labels`,
/// keyed `source:key` (e.g. `k8s:app`). The name is the numeric identity.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumIdentity",
    plural = "ciliumidentities",
    schema = "disabled",
    no_spec,
    derive = "Default",
    derive = "PartialEq"
)]
pub struct CiliumIdentityFields {
    #[serde(rename = "security-labels", default, skip_serializing_if = "Option::is_none")]
    pub security_labels: Option<BTreeMap<String, String>>,
}

// ----- CiliumEndpoint (cilium.io/v2, namespaced, status only) -----

/// A CiliumEndpoint carries everything in `status`; the root has no other fields we read.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cilium.io",
    version = "v2",
    kind = "CiliumEndpoint",
    plural = "ciliumendpoints",
    namespaced,
    schema = "disabled",
    no_spec,
    status = "EndpointStatus",
    derive = "Default",
    derive = "PartialEq"
)]
pub struct CiliumEndpointFields {}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EndpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<EndpointIdentity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<EndpointNetworking>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    #[serde(rename = "named-ports", default, skip_serializing_if = "Option::is_none")]
    pub named_ports: Option<Vec<NamedPort>>,
    #[serde(rename = "service-account", default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EndpointIdentity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

/// `networking` of endpoints: the pod IPs and the IP of the node hosting them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct EndpointNetworking {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addressing: Option<Vec<AddressPair>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NamedPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

// ----- CiliumEndpointSlice (cilium.io/v2alpha1, cluster-scoped, no spec) -----

/// A batch of endpoints of one namespace. Cluster-scoped: the namespace of its endpoints is the
/// top-level `namespace` field, not `metadata.namespace`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "cilium.io",
    version = "v2alpha1",
    kind = "CiliumEndpointSlice",
    plural = "ciliumendpointslices",
    schema = "disabled",
    no_spec,
    derive = "Default",
    derive = "PartialEq"
)]
pub struct CiliumEndpointSliceFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<CoreCiliumEndpoint>>,
}

/// The slimmed CiliumEndpoint kept inside a CiliumEndpointSlice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CoreCiliumEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The numeric security identity (not the endpoint ID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networking: Option<EndpointNetworking>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
    #[serde(rename = "named-ports", default, skip_serializing_if = "Option::is_none")]
    pub named_ports: Option<Vec<NamedPort>>,
    #[serde(rename = "service-account", default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(rename = "pod-uid", default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
}

/// The controller owning the endpoint's pod (e.g. `Deployment`/`echo`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Workload {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

// ----- ServiceExport (multicluster.x-k8s.io, namespaced) -----

/// The MCS-API ServiceExport as Cilium reads it (newest Cilium watches `v1beta1`; the golden
/// fixtures use it too). `spec` is optional on the wire, hence `no_spec` with an inner optional
/// `spec`: an export without spec is the common case.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1beta1",
    kind = "ServiceExport",
    plural = "serviceexports",
    namespaced,
    schema = "disabled",
    no_spec,
    derive = "Default",
    derive = "PartialEq"
)]
pub struct ServiceExportFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ServiceExportSpec>,
}

/// The same object served as `v1alpha1` by older MCS-API CRDs (Cilium 1.17-1.19 watched this
/// version). Its fields are a subset of `v1beta1`'s; convert with `ServiceExport::from`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "multicluster.x-k8s.io",
    version = "v1alpha1",
    kind = "ServiceExport",
    root = "ServiceExportV1Alpha1",
    plural = "serviceexports",
    namespaced,
    schema = "disabled",
    no_spec,
    derive = "Default",
    derive = "PartialEq"
)]
pub struct ServiceExportV1Alpha1Fields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ServiceExportSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ServiceExportSpec {
    #[serde(rename = "exportedLabels", default, skip_serializing_if = "Option::is_none")]
    pub exported_labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "exportedAnnotations", default, skip_serializing_if = "Option::is_none")]
    pub exported_annotations: Option<BTreeMap<String, String>>,
}

impl From<ServiceExportV1Alpha1> for ServiceExport {
    fn from(old: ServiceExportV1Alpha1) -> Self {
        ServiceExport { metadata: old.metadata, spec: ServiceExportFields { spec: old.spec.spec } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_export_without_spec_decodes() {
        let export: ServiceExport = serde_json::from_value(serde_json::json!({
            "apiVersion": "multicluster.x-k8s.io/v1beta1",
            "kind": "ServiceExport",
            "metadata": {"name": "headless", "namespace": "default"},
            "status": {"conditions": []}
        }))
        .expect("decodes");
        assert_eq!(export.spec.spec, None);
        assert_eq!(export.metadata.name.as_deref(), Some("headless"));
    }

    #[test]
    fn unknown_and_null_fields_are_ignored() {
        let cep: CiliumEndpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEndpoint",
            "metadata": {"name": "a", "namespace": "b"},
            "status": {
                "identity": {"id": 7, "labels": null},
                "networking": {"addressing": [{"ipv4": "10.0.0.1"}], "node": "1.1.1.1"},
                "policy": {"ingress": {"enforcing": false}},
                "external-identifiers": {"pod-name": "a"},
                "named-ports": null
            }
        }))
        .expect("decodes");
        let status = cep.status.expect("status");
        assert_eq!(status.identity.and_then(|i| i.id), Some(7));
        assert_eq!(status.named_ports, None);
    }

    #[test]
    fn the_endpoint_slice_keeps_its_top_level_namespace_apart_from_metadata() {
        let ces: CiliumEndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2alpha1",
            "kind": "CiliumEndpointSlice",
            "metadata": {"name": "ces-1"},
            "namespace": "qux",
            "endpoints": [{"name": "foo", "id": 5, "pod-uid": "u", "workload": {"kind": "Deployment", "name": "w"}}]
        }))
        .expect("decodes");
        assert_eq!(ces.metadata.namespace, None);
        assert_eq!(ces.spec.namespace.as_deref(), Some("qux"));
        let endpoint = &ces.spec.endpoints.as_deref().expect("endpoints")[0];
        assert_eq!(endpoint.pod_uid.as_deref(), Some("u"));
    }

    #[test]
    fn identities_round_trip_their_top_level_security_labels() {
        let identity = CiliumIdentity::new(
            "196915",
            CiliumIdentityFields {
                security_labels: Some(BTreeMap::from([("k8s:app".to_string(), "baz".to_string())])),
            },
        );
        let json = serde_json::to_value(&identity).expect("encodes");
        assert_eq!(json["security-labels"]["k8s:app"], "baz");
        assert_eq!(json["apiVersion"], "cilium.io/v2");
    }
}
