//! The Kubernetes types the apiserver watches, from one import point.
//!
//! Cilium's custom resources are defined here (reduced to what the translation reads); the core
//! types come from `k8s-openapi`, whose version feature is chosen once in `Cargo.toml`.

mod crds;

pub use crds::{
    AddressPair, CiliumEndpoint, CiliumEndpointFields, CiliumEndpointSlice, CiliumEndpointSliceFields, CiliumIdentity,
    CiliumIdentityFields, CiliumNode, CiliumNodeSpec, CoreCiliumEndpoint, EncryptionSpec, EndpointIdentity,
    EndpointNetworking, EndpointStatus, IpamPoolAllocation, IpamPools, IpamSpec, NamedPort, NodeAddress, ServiceExport,
    ServiceExportFields, ServiceExportSpec, ServiceExportV1Alpha1, ServiceExportV1Alpha1Fields, Workload,
};
pub use k8s_openapi::api::core::v1::{Namespace, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
