//! The state machine the sync pipeline drives: Kubernetes object events in, minimal key diffs out.
//!
//! The model joins what Cilium joins (Services with their EndpointSlices and ServiceExports,
//! everything namespaced with its Namespace's global flag, ipcache keys with their first owner)
//! and remembers only parsed, validated forms of the objects. It does no IO; `desired()` is the
//! full picture for relists and pruning.
//!
//! Invalid objects: an object that fails validation is reported in [`Changes::invalid`] and
//! treated exactly as if it had been deleted, so a live update and a relist agree. The one
//! partial case is a Service whose global-service part is invalid (malformed Cilium annotation,
//! bad cluster IP): it loses its `services/v1` key but keeps its MCS-API export, which reads
//! neither.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::blob::Blob;

use super::endpoint::{self, EndpointEntries};
use super::endpointslice::{self, ParsedSlice, endpoint_slice_key};
use super::identity::{self, IdentityEntry, identity_key};
use super::names::Names;
use super::namespace::global_annotation;
use super::node::{node_entry, node_key};
use super::ownership::Ownership;
use super::service::{self, ClusterServiceTemplate, service_key};
use super::serviceexport::{self, ExportTemplate, ServiceTemplate, service_export_key};
use super::{
    ENDPOINT_SLICES_PREFIX, Entry, Error, IDENTITIES_PREFIX, IPCACHE_PREFIX, NODES_PREFIX, SERVICE_EXPORTS_PREFIX,
    SERVICES_PREFIX, StoreKey,
};
use crate::k8s::{
    CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode, EndpointSlice, Namespace, Service, ServiceExport,
};

/// The apiserver configuration that shapes translation (Cilium flag names in parentheses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `--cluster-name`: first segment of node/service keys and the canaries' cluster.
    pub cluster_name: String,
    /// `--cluster-id`: `ClusterID`/`clusterID` in values and the cluster config `id`.
    pub cluster_id: u32,
    /// `--max-connected-clusters` (255 or 511), published in the cluster config.
    pub max_connected_clusters: u32,
    /// `--enable-cilium-endpoint-slice`: ipcache from CiliumEndpointSlices instead of
    /// CiliumEndpoints (the other kind is then ignored).
    pub enable_cilium_endpoint_slice: bool,
    /// `--clustermesh-enable-mcs-api`: export ServiceExports.
    pub mcs_api_enabled: bool,
    /// `--clustermesh-default-global-namespace` (Cilium default: true): whether a namespace
    /// without the `clustermesh.cilium.io/global` annotation is exported.
    pub default_global_namespace: bool,
    /// `--clustermesh-service-v2`: whether legacy `services/v1` keys are still written.
    pub service_v2_mode: ServiceV2Mode,
}

impl Settings {
    /// Cilium's defaults for everything but the cluster identity.
    pub fn new(cluster_name: impl Into<String>, cluster_id: u32) -> Self {
        Settings {
            cluster_name: cluster_name.into(),
            cluster_id,
            // Cilium's default; 511 halves the identity space per cluster.
            max_connected_clusters: 255,
            enable_cilium_endpoint_slice: false,
            mcs_api_enabled: false,
            default_global_namespace: true,
            service_v2_mode: ServiceV2Mode::default(),
        }
    }
}

/// `--clustermesh-service-v2` (Cilium 1.20): how services are shared with other clusters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ServiceV2Mode {
    /// Both `services/v1` and `endpointslices/v1`; agents keep consuming `services/v1`
    /// (Cilium 1.20 default).
    #[default]
    PreferLegacy,
    /// Both, agents prefer EndpointSlices.
    PreferEndpointSlice,
    /// `endpointslices/v1` only: agents older than 1.20 see no global services.
    OnlyEndpointSlice,
}

impl ServiceV2Mode {
    pub fn exports_legacy_services(self) -> bool {
        self != ServiceV2Mode::OnlyEndpointSlice
    }

    /// The flag value, as accepted by `FromStr`.
    pub fn as_flag(self) -> &'static str {
        match self {
            ServiceV2Mode::PreferLegacy => "prefer-legacy",
            ServiceV2Mode::PreferEndpointSlice => "prefer-endpointslice",
            ServiceV2Mode::OnlyEndpointSlice => "only-endpointslice",
        }
    }

    /// The cluster config's `endpointSlicesExportMode`.
    pub(crate) fn export_mode(self) -> &'static str {
        if self.exports_legacy_services() { "services-and-endpointslices" } else { "endpointslices-only" }
    }
}

impl std::str::FromStr for ServiceV2Mode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        [ServiceV2Mode::PreferLegacy, ServiceV2Mode::PreferEndpointSlice, ServiceV2Mode::OnlyEndpointSlice]
            .into_iter()
            .find(|mode| mode.as_flag() == value)
            .ok_or_else(|| format!("{value:?} is not one of prefer-legacy, prefer-endpointslice, only-endpointslice"))
    }
}

/// The object kinds the model understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    CiliumNode,
    CiliumIdentity,
    CiliumEndpoint,
    CiliumEndpointSlice,
    Service,
    EndpointSlice,
    ServiceExport,
    Namespace,
}

impl Kind {
    pub fn is_namespaced(self) -> bool {
        matches!(self, Kind::CiliumEndpoint | Kind::Service | Kind::EndpointSlice | Kind::ServiceExport)
    }

    /// The kind for a Kubernetes `kind` name (`"CiliumNode"`, `"Service"`, ...).
    pub fn from_kubernetes_kind(name: &str) -> Option<Kind> {
        ALL_KINDS.into_iter().find(|kind| kind.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CiliumNode => "CiliumNode",
            Kind::CiliumIdentity => "CiliumIdentity",
            Kind::CiliumEndpoint => "CiliumEndpoint",
            Kind::CiliumEndpointSlice => "CiliumEndpointSlice",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::ServiceExport => "ServiceExport",
            Kind::Namespace => "Namespace",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every kind, in `Ord` order.
pub const ALL_KINDS: [Kind; 8] = [
    Kind::CiliumNode,
    Kind::CiliumIdentity,
    Kind::CiliumEndpoint,
    Kind::CiliumEndpointSlice,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::ServiceExport,
    Kind::Namespace,
];

/// Identifies a Kubernetes object; `namespace` is `None` for cluster-scoped kinds. The names
/// are shared handles: the model keys several maps by the same object (its entries, its claims
/// on ipcache keys, the owner of each claimed key), and a clone costs no copy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Option<std::sync::Arc<str>>,
    pub name: std::sync::Arc<str>,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A typed Kubernetes object.
// Objects are moved once per event; boxing the large variants would cost an allocation per
// event and clutter every constructor in the pipeline.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Object {
    CiliumNode(CiliumNode),
    CiliumIdentity(CiliumIdentity),
    CiliumEndpoint(CiliumEndpoint),
    CiliumEndpointSlice(CiliumEndpointSlice),
    Service(Service),
    EndpointSlice(EndpointSlice),
    ServiceExport(ServiceExport),
    Namespace(Namespace),
}

/// An object document that could not be turned into an [`Object`].
#[derive(Debug, thiserror::Error)]
pub enum UnknownObject {
    #[error("the document has no apiVersion and kind")]
    MissingTypeMeta,
    #[error("decoding {kind}: {reason}")]
    Decode { kind: Kind, reason: String },
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::CiliumNode(_) => Kind::CiliumNode,
            Object::CiliumIdentity(_) => Kind::CiliumIdentity,
            Object::CiliumEndpoint(_) => Kind::CiliumEndpoint,
            Object::CiliumEndpointSlice(_) => Kind::CiliumEndpointSlice,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceExport(_) => Kind::ServiceExport,
            Object::Namespace(_) => Kind::Namespace,
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::CiliumNode(o) => &o.metadata,
            Object::CiliumIdentity(o) => &o.metadata,
            Object::CiliumEndpoint(o) => &o.metadata,
            Object::CiliumEndpointSlice(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::ServiceExport(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
        }
    }

    /// The object's key; the name is empty when the object has none (it is then invalid).
    pub fn key(&self) -> ObjectKey {
        self.key_with(|namespace| namespace.into())
    }

    /// [`Object::key`] with the namespace's handle from `namespace`.
    fn key_with(&self, namespace: impl FnOnce(&str) -> std::sync::Arc<str>) -> ObjectKey {
        let kind = self.kind();
        let metadata = self.metadata();
        ObjectKey {
            kind,
            namespace: if kind.is_namespaced() { metadata.namespace.as_deref().map(namespace) } else { None },
            name: metadata.name.as_deref().unwrap_or_default().into(),
        }
    }

    /// Decodes a JSON document known to be of `kind` (unknown fields are ignored; the
    /// `apiVersion` is not checked). The error is the decoder's reason, for an invalid report.
    pub fn from_value(kind: Kind, value: serde_json::Value) -> Result<Object, String> {
        fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, String> {
            serde_json::from_value(value).map_err(|e| e.to_string())
        }
        Ok(match kind {
            Kind::CiliumNode => Object::CiliumNode(decode(value)?),
            Kind::CiliumIdentity => Object::CiliumIdentity(decode(value)?),
            Kind::CiliumEndpoint => Object::CiliumEndpoint(decode(value)?),
            Kind::CiliumEndpointSlice => Object::CiliumEndpointSlice(decode(value)?),
            Kind::Service => Object::Service(decode(value)?),
            Kind::EndpointSlice => Object::EndpointSlice(decode(value)?),
            // v1alpha1 and v1beta1 share the fields Cilium reads.
            Kind::ServiceExport => Object::ServiceExport(decode(value)?),
            Kind::Namespace => Object::Namespace(decode(value)?),
        })
    }

    /// Decodes a JSON document (e.g. a YAML manifest converted to JSON) by its `apiVersion` and
    /// `kind`. `Ok(None)` for kinds the model does not use, such as CustomResourceDefinitions.
    pub fn decode(value: serde_json::Value) -> Result<Option<Object>, UnknownObject> {
        let api_version = value.get("apiVersion").and_then(|v| v.as_str()).ok_or(UnknownObject::MissingTypeMeta)?;
        let kind_name = value.get("kind").and_then(|v| v.as_str()).ok_or(UnknownObject::MissingTypeMeta)?;
        let Some(kind) = Kind::from_kubernetes_kind(kind_name) else { return Ok(None) };
        let served = match kind {
            Kind::CiliumNode | Kind::CiliumIdentity | Kind::CiliumEndpoint => api_version == "cilium.io/v2",
            Kind::CiliumEndpointSlice => matches!(api_version, "cilium.io/v2alpha1" | "cilium.io/v2"),
            Kind::Service | Kind::Namespace => api_version == "v1",
            Kind::EndpointSlice => api_version == "discovery.k8s.io/v1",
            Kind::ServiceExport => {
                matches!(api_version, "multicluster.x-k8s.io/v1beta1" | "multicluster.x-k8s.io/v1alpha1")
            }
        };
        if !served {
            return Ok(None);
        }
        Object::from_value(kind, value).map(Some).map_err(|reason| UnknownObject::Decode { kind, reason })
    }
}

/// What one event changes in the store. Upserts carry only values that differ from what the
/// model wanted before; keys are unique across both lists and sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: Vec<(StoreKey, Blob)>,
    pub deletes: Vec<String>,
    /// Objects found invalid by this event, with the reason (one warn line and one counter bump
    /// each). Their keys are gone, as if they had been deleted.
    pub invalid: Vec<(ObjectKey, String)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty() && self.invalid.is_empty()
    }
}

/// Pending writes of one event: the last intended value per key (`None` = absent).
#[derive(Default)]
pub(crate) struct Tx {
    writes: BTreeMap<StoreKey, Option<Blob>>,
}

impl Tx {
    pub(crate) fn put(&mut self, key: impl Into<StoreKey>, value: Blob) {
        self.writes.insert(key.into(), Some(value));
    }

    pub(crate) fn delete(&mut self, key: &str) {
        self.writes.insert(key.into(), None);
    }

    #[cfg(test)]
    pub(crate) fn into_writes(self) -> BTreeMap<String, Option<Blob>> {
        self.writes.into_iter().map(|(key, value)| (key.to_string(), value)).collect()
    }
}

/// What the model knows about a Service.
struct ServiceState {
    /// The `services/v1` template: `Ok(None)` when not global and shared.
    cluster_service: Result<Option<ClusterServiceTemplate>, Error>,
    /// Whether its EndpointSlices are exported (global and shared, annotations valid).
    exports_slices: bool,
    export: ServiceTemplate,
}

type NamespacedName = (String, String);

/// See the module documentation.
pub struct Model {
    settings: Settings,
    desired: BTreeMap<StoreKey, Blob>,
    /// The size of `desired` when [`Model::settle`] last rebuilt it.
    desired_settled: usize,
    /// CiliumNodes given (valid or not): a node's key is all the model needs of it otherwise.
    nodes: BTreeSet<std::sync::Arc<str>>,
    /// Valid namespaces and their `clustermesh.cilium.io/global` annotation, if any.
    namespaces: BTreeMap<String, Option<bool>>,
    identities: BTreeMap<String, IdentityEntry>,
    /// Valid CiliumEndpoints or CiliumEndpointSlices (whichever the settings select).
    endpoints: BTreeMap<ObjectKey, EndpointEntries>,
    ownership: Ownership,
    services: BTreeMap<NamespacedName, ServiceState>,
    slices: BTreeMap<NamespacedName, ParsedSlice>,
    /// (namespace, service) → names of the slices labelled with it.
    slices_by_service: BTreeMap<NamespacedName, BTreeSet<String>>,
    exports: BTreeMap<NamespacedName, ExportTemplate>,
    invalid: BTreeMap<ObjectKey, String>,
    /// The namespace names that keys and endpoints share.
    names: Names,
}

impl Model {
    pub fn new(settings: Settings) -> Self {
        Model {
            settings,
            desired: BTreeMap::new(),
            desired_settled: 0,
            nodes: BTreeSet::new(),
            namespaces: BTreeMap::new(),
            identities: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            ownership: Ownership::default(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_by_service: BTreeMap::new(),
            exports: BTreeMap::new(),
            invalid: BTreeMap::new(),
            names: Names::default(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every key the model wants in the store now, with its exact value.
    pub fn desired(&self) -> BTreeMap<String, Blob> {
        self.desired.iter().map(|(key, value)| (key.to_string(), value.clone())).collect()
    }

    /// The store prefixes this configuration writes (without trailing slash); each gets a
    /// canary, and in attached mode keys under them that `desired()` lacks are stale.
    pub fn prefixes(&self) -> Vec<&'static str> {
        let mut prefixes = vec![NODES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX];
        if self.settings.service_v2_mode.exports_legacy_services() {
            prefixes.push(SERVICES_PREFIX);
        }
        // Cilium writes the service-export canary even with MCS-API disabled, so consumers
        // never wait on it.
        prefixes.push(SERVICE_EXPORTS_PREFIX);
        prefixes.push(ENDPOINT_SLICES_PREFIX);
        prefixes
    }

    /// Whether this configuration reads objects of `kind`; the others need no watcher and are
    /// ignored by `apply` and `delete` (CiliumEndpoints in CiliumEndpointSlice mode and the
    /// reverse, ServiceExports without MCS-API).
    pub fn reads(&self, kind: Kind) -> bool {
        match kind {
            Kind::CiliumEndpoint => !self.settings.enable_cilium_endpoint_slice,
            Kind::CiliumEndpointSlice => self.settings.enable_cilium_endpoint_slice,
            Kind::ServiceExport => self.settings.mcs_api_enabled,
            _ => true,
        }
    }

    /// Objects currently invalid, with the reason; for a gauge or a status page.
    pub fn invalid_objects(&self) -> impl Iterator<Item = (&ObjectKey, &str)> {
        self.invalid.iter().map(|(key, reason)| (key, reason.as_str()))
    }

    /// `object.key()`, its namespace shared with every other key and endpoint in it: keys that
    /// a caller keeps beside the model should come from here.
    pub fn key_of(&mut self, object: &Object) -> ObjectKey {
        object.key_with(|namespace| self.names.get(namespace))
    }

    /// Adds or updates an object.
    pub fn apply(&mut self, object: Object) -> Changes {
        let key = self.key_of(&object);
        self.apply_as(key, object)
    }

    /// [`Model::apply`] with the object's key already made ([`Model::key_of`]), so that a
    /// caller that keeps the key too shares its names with the model's maps.
    pub fn apply_as(&mut self, key: ObjectKey, object: Object) -> Changes {
        if !self.reads(key.kind) {
            return Changes::default();
        }
        let mut tx = Tx::default();
        let mut invalid = Vec::new();
        if key.name.is_empty() || (key.kind.is_namespaced() && key.namespace.as_deref().is_none_or(str::is_empty)) {
            let field = if key.name.is_empty() { "metadata.name" } else { "metadata.namespace" };
            invalid.push((key, Error::MissingField { field }.to_string()));
            return Changes { invalid, ..Changes::default() };
        }

        if key.kind == Kind::CiliumNode {
            self.nodes.insert(key.name.clone());
        }
        let outcome: Result<(), Error> = match object {
            Object::CiliumNode(node) => match node_entry(&node, &self.settings) {
                Ok((k, v)) => {
                    tx.put(k, v);
                    Ok(())
                }
                Err(error) => {
                    tx.delete(&node_key(&self.settings, &key.name));
                    Err(error)
                }
            },
            Object::CiliumIdentity(identity) => {
                let (parsed, outcome) = split(identity::parse(&identity));
                store(&mut self.identities, key.name.to_string(), parsed);
                self.sync_identity(&key.name, &mut tx);
                outcome
            }
            Object::CiliumEndpoint(endpoint) => {
                let (parsed, outcome) = split(endpoint::parse_cilium_endpoint(&endpoint, &mut self.names));
                self.set_endpoint(&key, parsed, &mut tx);
                outcome
            }
            Object::CiliumEndpointSlice(slice) => {
                let (parsed, outcome) = split(endpoint::parse_cilium_endpoint_slice(&slice, &mut self.names));
                self.set_endpoint(&key, parsed, &mut tx);
                outcome
            }
            Object::Namespace(namespace) => {
                let (parsed, outcome) = split(global_annotation(&namespace));
                self.set_namespace(&key.name, parsed, &mut tx);
                outcome
            }
            Object::Service(svc) => {
                let state = ServiceState {
                    cluster_service: service::parse(&svc),
                    exports_slices: service::is_global_and_shared(&svc).unwrap_or(false),
                    export: serviceexport::parse_service(&svc),
                };
                let outcome = state.cluster_service.as_ref().map(drop).map_err(Clone::clone);
                self.set_service(namespaced(&key), Some(state), &mut tx);
                outcome
            }
            Object::EndpointSlice(slice) => {
                let (parsed, outcome) = split(endpointslice::parse(&slice, &self.settings));
                self.set_slice(namespaced(&key), parsed, &mut tx);
                outcome
            }
            Object::ServiceExport(export) => {
                let (parsed, outcome) = split(serviceexport::parse_export(&export));
                let id = namespaced(&key);
                store(&mut self.exports, id.clone(), parsed);
                self.sync_export(&id, &mut tx);
                outcome
            }
        };

        match outcome {
            Ok(()) => {
                self.invalid.remove(&key);
            }
            Err(error) => {
                self.invalid.insert(key.clone(), error.to_string());
                invalid.push((key, error.to_string()));
            }
        }
        self.commit(tx, invalid)
    }

    /// Removes an object; a no-op for objects the model does not know.
    pub fn delete(&mut self, key: &ObjectKey) -> Changes {
        if !self.reads(key.kind) {
            return Changes::default();
        }
        let mut tx = Tx::default();
        self.invalid.remove(key);
        match key.kind {
            Kind::CiliumNode => {
                self.nodes.remove(&key.name);
                tx.delete(&node_key(&self.settings, &key.name));
            }
            Kind::CiliumIdentity => {
                if self.identities.remove(&*key.name).is_some() {
                    self.sync_identity(&key.name, &mut tx);
                }
            }
            Kind::CiliumEndpoint | Kind::CiliumEndpointSlice => {
                if self.endpoints.contains_key(key) {
                    self.set_endpoint(key, None, &mut tx);
                }
            }
            Kind::Namespace => self.set_namespace(&key.name, None, &mut tx),
            Kind::Service => self.set_service(namespaced(key), None, &mut tx),
            Kind::EndpointSlice => self.set_slice(namespaced(key), None, &mut tx),
            Kind::ServiceExport => {
                let id = namespaced(key);
                if self.exports.remove(&id).is_some() {
                    self.sync_export(&id, &mut tx);
                }
            }
        }
        self.commit(tx, Vec::new())
    }

    /// Rebuilds densely the large ordered maps that a list of `kind` has just filled. Rust's
    /// B-tree splits a full node into two half-full ones, so entries inserted in key order (a
    /// Kubernetes list comes sorted by name) leave about half of every node empty; a tree built
    /// from sorted entries in one pass fills them (scenario 7's objects in process: 272 -> 247
    /// MiB). Later inserts split nodes again; updates and deletes leave the tree as it is.
    pub fn settle(&mut self, kind: Kind) {
        fn rebuild<T: Default + IntoIterator + FromIterator<T::Item>>(tree: &mut T) {
            *tree = std::mem::take(tree).into_iter().collect();
        }
        match kind {
            Kind::CiliumEndpoint | Kind::CiliumEndpointSlice => rebuild(&mut self.endpoints),
            Kind::CiliumNode => rebuild(&mut self.nodes),
            Kind::CiliumIdentity => rebuild(&mut self.identities),
            _ => {}
        }
        // Every kind writes keys: rebuilt once it has grown by half since the last time, so
        // that the lists of all kinds together rebuild it a few times, not once each.
        if self.desired.len() >= self.desired_settled + self.desired_settled / 2 {
            rebuild(&mut self.desired);
            self.desired_settled = self.desired.len();
        }
    }

    /// Whether [`Model::objects`] of `kind` would list anything.
    pub fn knows_any(&self, kind: Kind) -> bool {
        self.object_keys(kind).next().is_some()
    }

    /// Every object of `kind` given and not deleted since, valid or not: what a relist of the
    /// kind must find again (objects without a name, which have no keys, aside).
    pub fn objects(&self, kind: Kind) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self.object_keys(kind).collect();
        // A Service with an invalid global part is kept and listed as invalid too.
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    /// The keys behind [`Model::objects`], unsorted, possibly twice.
    fn object_keys(&self, kind: Kind) -> Box<dyn Iterator<Item = ObjectKey> + '_> {
        let cluster_scoped = move |name: &str| ObjectKey { kind, namespace: None, name: name.into() };
        let namespaced = move |(namespace, name): &NamespacedName| ObjectKey {
            kind,
            namespace: Some(namespace.as_str().into()),
            name: name.as_str().into(),
        };
        let valid: Box<dyn Iterator<Item = ObjectKey>> = match kind {
            Kind::CiliumNode => {
                Box::new(self.nodes.iter().map(move |name| ObjectKey { kind, namespace: None, name: name.clone() }))
            }
            Kind::CiliumIdentity => Box::new(self.identities.keys().map(move |name| cluster_scoped(name))),
            Kind::Namespace => Box::new(self.namespaces.keys().map(move |name| cluster_scoped(name))),
            Kind::CiliumEndpoint | Kind::CiliumEndpointSlice => {
                Box::new(self.endpoints.keys().filter(move |key| key.kind == kind).cloned())
            }
            Kind::Service => Box::new(self.services.keys().map(namespaced)),
            Kind::EndpointSlice => Box::new(self.slices.keys().map(namespaced)),
            Kind::ServiceExport => Box::new(self.exports.keys().map(namespaced)),
        };
        Box::new(valid.chain(self.invalid.keys().filter(move |key| key.kind == kind).cloned()))
    }

    /// Turns pending writes into the minimal diff against `desired` and applies it.
    fn commit(&mut self, tx: Tx, invalid: Vec<(ObjectKey, String)>) -> Changes {
        let mut changes = Changes { invalid, ..Changes::default() };
        for (key, value) in tx.writes {
            match value {
                Some(value) => {
                    if self.desired.get(&key) != Some(&value) {
                        self.desired.insert(key.clone(), value.clone());
                        changes.upserts.push((key, value));
                    }
                }
                None => {
                    if self.desired.remove(&key).is_some() {
                        changes.deletes.push(key.to_string());
                    }
                }
            }
        }
        changes
    }

    fn is_global(&self, namespace: &str) -> bool {
        is_global(&self.namespaces, &self.settings, namespace)
    }

    // ----- Per-unit synchronisation: compute what one unit wants and record it in `tx`. -----

    fn sync_identity(&self, name: &str, tx: &mut Tx) {
        match self.identities.get(name).filter(|i| self.is_global(&i.namespace)) {
            Some(identity) => tx.put(identity.entry.0.clone(), identity.entry.1.clone()),
            None => tx.delete(&identity_key(name)),
        }
    }

    fn set_endpoint(&mut self, key: &ObjectKey, entries: Option<EndpointEntries>, tx: &mut Tx) {
        let old = claims(&self.endpoints, &self.namespaces, &self.settings, key).to_vec();
        store(&mut self.endpoints, key.clone(), entries);
        self.sync_endpoint(key, &old, tx);
    }

    /// Tells the ipcache ownership what `key` claims now, where it claimed `old` before.
    fn sync_endpoint(&mut self, key: &ObjectKey, old: &[Entry], tx: &mut Tx) {
        let Model { settings, namespaces, endpoints, ownership, .. } = self;
        let claims_of = |owner: &ObjectKey| claims(endpoints, namespaces, settings, owner);
        let claimed = |owner: &ObjectKey, ip_key: &str| {
            claims_of(owner).iter().find(|(k, _)| &**k == ip_key).map(|(_, value)| value.clone())
        };
        ownership.set(key, old, claims_of(key), claimed, tx);
    }

    fn set_namespace(&mut self, name: &str, annotation: Option<Option<bool>>, tx: &mut Tx) {
        let was_global = self.is_global(name);
        store(&mut self.namespaces, name.to_string(), annotation);
        if was_global == self.is_global(name) {
            return;
        }
        let identities: Vec<String> =
            self.identities.iter().filter(|(_, i)| i.namespace == name).map(|(id, _)| id.clone()).collect();
        for id in identities {
            self.sync_identity(&id, tx);
        }
        let endpoints: Vec<ObjectKey> =
            self.endpoints.iter().filter(|(_, e)| &*e.namespace == name).map(|(k, _)| k.clone()).collect();
        for key in endpoints {
            let old = if was_global { self.endpoints[&key].entries.to_vec() } else { Vec::new() };
            self.sync_endpoint(&key, &old, tx);
        }
        let in_namespace = |id: &&NamespacedName| id.0 == name;
        let services: Vec<NamespacedName> = self.services.keys().filter(in_namespace).cloned().collect();
        let slices: Vec<NamespacedName> = self.slices.keys().filter(in_namespace).cloned().collect();
        let exports: Vec<NamespacedName> = self.exports.keys().filter(in_namespace).cloned().collect();
        for id in &services {
            self.sync_service(id, tx);
        }
        for id in &slices {
            self.sync_slice(id, tx);
        }
        for id in &exports {
            self.sync_export(id, tx);
        }
    }

    fn set_service(&mut self, id: NamespacedName, state: Option<ServiceState>, tx: &mut Tx) {
        store(&mut self.services, id.clone(), state);
        self.sync_service(&id, tx);
        let slices: Vec<NamespacedName> =
            self.slices_by_service.get(&id).into_iter().flatten().map(|slice| (id.0.clone(), slice.clone())).collect();
        for slice in &slices {
            self.sync_slice(slice, tx);
        }
        self.sync_export(&id, tx);
    }

    fn sync_service(&self, id: &NamespacedName, tx: &mut Tx) {
        let (namespace, name) = id;
        let template = self
            .services
            .get(id)
            .and_then(|s| s.cluster_service.as_ref().ok())
            .and_then(Option::as_ref)
            .filter(|_| self.settings.service_v2_mode.exports_legacy_services() && self.is_global(namespace));
        match template {
            Some(template) => {
                let slices = self
                    .slices_by_service
                    .get(id)
                    .into_iter()
                    .flatten()
                    .filter_map(|slice| self.slices.get(&(namespace.clone(), slice.clone())));
                let (key, value) = service::render(template, slices, &self.settings);
                tx.put(key, value);
            }
            None => tx.delete(&service_key(&self.settings, namespace, name)),
        }
    }

    fn set_slice(&mut self, id: NamespacedName, parsed: Option<ParsedSlice>, tx: &mut Tx) {
        let old_service = self.slices.get(&id).and_then(|s| s.service.clone());
        let new_service = parsed.as_ref().and_then(|s| s.service.clone());
        store(&mut self.slices, id.clone(), parsed);
        if let Some(old) = old_service.filter(|old| new_service.as_ref() != Some(old)) {
            let service = (id.0.clone(), old);
            if let Some(names) = self.slices_by_service.get_mut(&service) {
                names.remove(&id.1);
                if names.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.sync_service(&service, tx);
        }
        if let Some(new) = &new_service {
            let service = (id.0.clone(), new.clone());
            self.slices_by_service.entry(service.clone()).or_default().insert(id.1.clone());
            self.sync_service(&service, tx);
        }
        self.sync_slice(&id, tx);
    }

    fn sync_slice(&self, id: &NamespacedName, tx: &mut Tx) {
        let (namespace, name) = id;
        let export = self.slices.get(id).and_then(|slice| {
            let service = self.services.get(&(namespace.clone(), slice.service.clone()?))?;
            (service.exports_slices && self.is_global(namespace)).then_some(slice.export.as_ref()).flatten()
        });
        match export {
            Some((key, value)) => tx.put(key.clone(), value.clone()),
            None => tx.delete(&endpoint_slice_key(&self.settings, namespace, name)),
        }
    }

    fn sync_export(&self, id: &NamespacedName, tx: &mut Tx) {
        let (namespace, name) = id;
        let entry = match (self.services.get(id), self.exports.get(id)) {
            (Some(service), Some(export)) if self.settings.mcs_api_enabled && self.is_global(namespace) => {
                serviceexport::render(&self.settings, namespace, name, &service.export, export)
            }
            _ => None,
        };
        match entry {
            Some((key, value)) => tx.put(key, value),
            None => tx.delete(&service_export_key(&self.settings, namespace, name)),
        }
    }
}

fn is_global(namespaces: &BTreeMap<String, Option<bool>>, settings: &Settings, namespace: &str) -> bool {
    match namespaces.get(namespace) {
        Some(annotation) => annotation.unwrap_or(settings.default_global_namespace),
        None => false,
    }
}

/// The ipcache entries `owner` claims: its own, while its namespace is global.
fn claims<'a>(
    endpoints: &'a BTreeMap<ObjectKey, EndpointEntries>,
    namespaces: &BTreeMap<String, Option<bool>>,
    settings: &Settings,
    owner: &ObjectKey,
) -> &'a [Entry] {
    match endpoints.get(owner) {
        Some(endpoint) if is_global(namespaces, settings, &endpoint.namespace) => &endpoint.entries,
        _ => &[],
    }
}

/// Separates a parse result into what to store (nothing if invalid) and what to report.
fn split<T>(result: Result<T, Error>) -> (Option<T>, Result<(), Error>) {
    match result {
        Ok(value) => (Some(value), Ok(())),
        Err(error) => (None, Err(error)),
    }
}

fn store<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
    match value {
        Some(value) => map.insert(key, value),
        None => map.remove(&key),
    };
}

fn namespaced(key: &ObjectKey) -> NamespacedName {
    (key.namespace.as_deref().unwrap_or_default().to_owned(), key.name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a model and checks after every event that replaying the emitted changes onto a
    /// shadow store yields exactly `desired()`: the diffs are complete and minimal.
    struct Harness {
        model: Model,
        store: BTreeMap<String, Blob>,
    }

    impl Harness {
        fn new(settings: Settings) -> Self {
            Harness { model: Model::new(settings), store: BTreeMap::new() }
        }

        fn apply_yaml(&mut self, yaml: &str) -> Changes {
            let value: serde_json::Value = serde_saphyr::from_str(yaml).expect("test YAML");
            let object = Object::decode(value).expect("decodes").expect("a model kind");
            let changes = self.model.apply(object);
            self.replay(&changes);
            changes
        }

        fn delete(&mut self, kind: Kind, namespace: Option<&str>, name: &str) -> Changes {
            let changes =
                self.model.delete(&ObjectKey { kind, namespace: namespace.map(Into::into), name: name.into() });
            self.replay(&changes);
            changes
        }

        fn replay(&mut self, changes: &Changes) {
            for (key, value) in &changes.upserts {
                assert_ne!(self.store.get(&**key), Some(value), "{key} re-upserted with an unchanged value");
                self.store.insert(key.to_string(), value.clone());
            }
            for key in &changes.deletes {
                assert!(self.store.remove(key).is_some(), "{key} deleted but was never written");
            }
            assert_eq!(self.store, self.model.desired(), "emitted changes diverge from desired()");
        }

        fn keys(&self, prefix: &str) -> Vec<&str> {
            self.store.keys().filter(|k| k.starts_with(prefix)).map(String::as_str).collect()
        }

        fn value(&self, key: &str) -> &str {
            std::str::from_utf8(self.store.get(key).unwrap_or_else(|| panic!("{key} is not in the store")))
                .expect("utf-8")
        }
    }

    fn settings() -> Settings {
        Settings::new("cluster1", 1)
    }

    const NAMESPACE: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";

    const DUAL_STACK_NODE: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNode
metadata:
  name: worker-1
spec:
  addresses:
  - {type: InternalIP, ip: 172.18.0.9}
  - {type: InternalIP, ip: "FC00:C111:0000::0009"}
  - {type: CiliumInternalIP, ip: 10.1.4.1}
  ipam:
    podCIDRs: [10.1.4.0/24, "fd00:10:1:4::/64", 10.1.250.0/25]
    pools:
      allocated:
      - {pool: extra, cidrs: ["fd00:10:1:ff::/80"]}
  health: {ipv4: 10.1.4.20, ipv6: "fd00:10:1:4::14"}
  ingress: {ipv4: 10.1.4.30}
  encryption: {key: 2}
  bootid: 00000000-0000-0000-0000-000000000001
"#;

    #[test]
    fn a_dual_stack_node_with_secondary_cidrs_and_uppercase_ipv6_is_exported_in_go_form() {
        let mut h = Harness::new(settings());
        h.apply_yaml(DUAL_STACK_NODE);
        assert_eq!(
            h.value("cilium/state/nodes/v1/cluster1/worker-1"),
            r#"{"Name":"worker-1","Cluster":"cluster1","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.9"},{"Type":"InternalIP","IP":"fc00:c111::9"},{"Type":"CiliumInternalIP","IP":"10.1.4.1"}],"IPv4AllocCIDR":{"IP":"10.1.4.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":[{"IP":"10.1.250.0","Mask":"////gA=="}],"IPv6AllocCIDR":{"IP":"fd00:10:1:4::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":[{"IP":"fd00:10:1:ff::","Mask":"/////////////wAAAAAAAA=="}],"IPv4HealthIP":"10.1.4.20","IPv6HealthIP":"fd00:10:1:4::14","IPv4IngressIP":"10.1.4.30","IPv6IngressIP":"","ClusterID":1,"Source":"custom-resource","EncryptionKey":2,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":"00000000-0000-0000-0000-000000000001"}"#
        );
    }

    #[test]
    fn reapplying_an_unchanged_object_emits_nothing() {
        let mut h = Harness::new(settings());
        assert_eq!(h.apply_yaml(DUAL_STACK_NODE).upserts.len(), 1);
        assert!(h.apply_yaml(DUAL_STACK_NODE).is_empty());
    }

    #[test]
    fn deleting_an_unknown_object_is_a_no_op() {
        let mut h = Harness::new(settings());
        for kind in ALL_KINDS {
            let namespace = kind.is_namespaced().then_some("shop");
            assert!(h.delete(kind, namespace, "ghost").is_empty(), "{kind}");
        }
    }

    const ENDPOINT: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumEndpoint
metadata: {name: web-0, namespace: shop}
status:
  identity: {id: 65800}
  networking:
    addressing:
    - {ipv4: 10.1.4.7, ipv6: "fd00:10:1:4:0:0:0:7"}
    node: 172.18.0.9
"#;

    #[test]
    fn a_dual_stack_endpoint_writes_one_key_per_ip() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(ENDPOINT);
        assert_eq!(
            h.keys("cilium/state/ip/v1/default/"),
            ["cilium/state/ip/v1/default/10.1.4.7", "cilium/state/ip/v1/default/fd00:10:1:4::7"]
        );
        assert_eq!(
            h.value("cilium/state/ip/v1/default/fd00:10:1:4::7"),
            r#"{"IP":"fd00:10:1:4::7","HostIP":"172.18.0.9","ID":65800,"Key":0,"Metadata":"","K8sNamespace":"shop","K8sPodName":"web-0"}"#
        );
    }

    #[test]
    fn an_object_that_turns_invalid_loses_its_keys_and_is_reported_until_fixed() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(ENDPOINT);
        let broken = ENDPOINT.replace("10.1.4.7", "10.1.4.700");
        let changes = h.apply_yaml(&broken);
        assert_eq!(changes.deletes.len(), 2);
        assert_eq!(changes.invalid.len(), 1);
        assert_eq!(changes.invalid[0].0.to_string(), "CiliumEndpoint shop/web-0");
        assert!(changes.invalid[0].1.contains("status.networking.addressing[0].ipv4"), "{}", changes.invalid[0].1);
        assert_eq!(h.model.invalid_objects().count(), 1);
        // A relist sees the same invalid object again: same (empty) store, reported again.
        let again = h.apply_yaml(&broken);
        assert!(again.upserts.is_empty() && again.deletes.is_empty() && again.invalid.len() == 1);
        h.apply_yaml(ENDPOINT);
        assert_eq!(h.keys("cilium/state/ip/").len(), 2);
        assert_eq!(h.model.invalid_objects().count(), 0);
    }

    #[test]
    fn settling_after_a_list_changes_nothing_a_reader_sees() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(ENDPOINT);
        h.apply_yaml("apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata: {name: n1}\nspec: {}\n");
        let before = (h.model.desired(), h.model.objects(Kind::CiliumEndpoint), h.model.objects(Kind::CiliumNode));
        for kind in ALL_KINDS {
            h.model.settle(kind);
        }
        let after = (h.model.desired(), h.model.objects(Kind::CiliumEndpoint), h.model.objects(Kind::CiliumNode));
        assert_eq!(before, after);
        assert!(h.delete(Kind::CiliumEndpoint, Some("shop"), "web-0").deletes.len() == 2, "still owned after settling");
    }

    /// What the mirror compares a relist with: nothing is forgotten while it is invalid, and
    /// nothing is remembered once deleted.
    #[test]
    fn the_model_remembers_every_object_given_valid_or_not_until_it_is_deleted() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(ENDPOINT);
        h.apply_yaml("apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata: {name: n1}\nspec: {}\n");
        let names = |h: &Harness, kind| h.model.objects(kind).iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(names(&h, Kind::CiliumEndpoint), ["CiliumEndpoint shop/web-0"]);
        assert_eq!(names(&h, Kind::CiliumNode), ["CiliumNode n1"]);
        assert_eq!(names(&h, Kind::Namespace), ["Namespace shop"]);
        assert!(h.model.knows_any(Kind::CiliumNode) && !h.model.knows_any(Kind::Service));
        h.apply_yaml(&ENDPOINT.replace("10.1.4.7", "10.1.4.700"));
        assert_eq!(names(&h, Kind::CiliumEndpoint), ["CiliumEndpoint shop/web-0"], "invalid, still known");
        h.delete(Kind::CiliumEndpoint, Some("shop"), "web-0");
        h.delete(Kind::CiliumNode, None, "n1");
        assert!(names(&h, Kind::CiliumEndpoint).is_empty() && names(&h, Kind::CiliumNode).is_empty());
        assert!(!h.model.knows_any(Kind::CiliumEndpoint) && !h.model.knows_any(Kind::CiliumNode));
    }

    #[test]
    fn objects_without_a_name_or_namespace_are_reported_and_ignored() {
        let mut h = Harness::new(settings());
        let changes = h.apply_yaml("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n");
        assert_eq!(changes.invalid.len(), 1);
        assert_eq!(changes.invalid[0].1, "metadata.namespace is missing");
        let changes = h.apply_yaml("apiVersion: cilium.io/v2\nkind: CiliumNode\nmetadata: {}\nspec: {}\n");
        assert_eq!(changes.invalid[0].1, "metadata.name is missing");
        assert!(h.store.is_empty());
    }

    #[test]
    fn nothing_namespaced_is_exported_before_its_namespace_is_known() {
        let mut h = Harness::new(settings());
        h.apply_yaml(ENDPOINT);
        assert!(h.store.is_empty());
        h.apply_yaml(NAMESPACE);
        assert_eq!(h.keys("cilium/state/ip/").len(), 2);
        h.delete(Kind::Namespace, None, "shop");
        assert!(h.store.is_empty());
    }

    #[test]
    fn a_malformed_namespace_annotation_makes_the_namespace_local_and_is_reported() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(ENDPOINT);
        let changes = h.apply_yaml(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: {clustermesh.cilium.io/global: maybe}\n",
        );
        assert_eq!(changes.deletes.len(), 2);
        assert_eq!(changes.invalid[0].0.kind, Kind::Namespace);
    }

    #[test]
    fn endpoints_are_ignored_in_endpoint_slice_mode_and_slices_otherwise() {
        let mut ces_mode = settings();
        ces_mode.enable_cilium_endpoint_slice = true;
        let mut h = Harness::new(ces_mode);
        h.apply_yaml(NAMESPACE);
        assert!(h.apply_yaml(ENDPOINT).is_empty());
        let slice = "apiVersion: cilium.io/v2alpha1\nkind: CiliumEndpointSlice\nmetadata: {name: ces-1}\nnamespace: shop\nendpoints:\n- {name: web-0, id: 65800, networking: {addressing: [{ipv4: 10.1.4.7}], node: 172.18.0.9}}\n";
        assert_eq!(h.apply_yaml(slice).upserts.len(), 1);

        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        assert!(h.apply_yaml(slice).is_empty());
    }

    const GLOBAL_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {service.cilium.io/global: "true"}
spec:
  clusterIP: 10.96.7.7
  clusterIPs: [10.96.7.7, "fd00:96::7"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, protocol: TCP}]
  selector: {app: web}
"#;

    fn slice_yaml(name: &str, service: &str, address: &str) -> String {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nendpoints:\n- addresses: [{address}]\n  conditions: {{ready: true}}\nports: [{{name: http, port: 8080, protocol: TCP}}]\n"
        )
    }

    #[test]
    fn a_global_service_joins_its_slices_whichever_arrives_first() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(&slice_yaml("web-a", "web", "10.1.4.7"));
        assert!(h.store.is_empty(), "a slice without its Service exports nothing");
        h.apply_yaml(GLOBAL_SERVICE);
        h.apply_yaml(&slice_yaml("web-b", "web", "10.1.4.8"));
        assert_eq!(
            h.value("cilium/state/services/v1/cluster1/shop/web"),
            r#"{"cluster":"cluster1","namespace":"shop","name":"web","frontends":{"10.96.7.7":{"http":{"Protocol":"TCP","Port":80}},"fd00:96::7":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.1.4.7":{"http":{"Protocol":"TCP","Port":8080}},"10.1.4.8":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"web"},"includeExternal":true,"shared":true,"clusterID":1}"#
        );
        assert_eq!(
            h.keys("cilium/state/endpointslices/v1/"),
            [
                "cilium/state/endpointslices/v1/cluster1/shop/web-a",
                "cilium/state/endpointslices/v1/cluster1/shop/web-b"
            ]
        );

        // Relabelling a slice to another service moves its backend away.
        h.apply_yaml(&slice_yaml("web-b", "other", "10.1.4.8"));
        assert!(!h.value("cilium/state/services/v1/cluster1/shop/web").contains("10.1.4.8"));
        assert_eq!(h.keys("cilium/state/endpointslices/v1/").len(), 1);

        // Deleting the Service removes the service and its slices' exports.
        h.delete(Kind::Service, Some("shop"), "web");
        assert!(h.store.is_empty());
    }

    #[test]
    fn non_global_and_headless_services_in_the_model() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(&slice_yaml("web-a", "web", "10.1.4.7"));
        h.apply_yaml(&GLOBAL_SERVICE.replace(r#""true""#, r#""false""#));
        assert!(h.store.is_empty(), "a non-global service exports neither the service nor its slices");
        h.apply_yaml(
            &GLOBAL_SERVICE
                .replace("clusterIP: 10.96.7.7", "clusterIP: None")
                .replace(r#"clusterIPs: [10.96.7.7, "fd00:96::7"]"#, "clusterIPs: [None]"),
        );
        assert_eq!(
            h.value("cilium/state/services/v1/cluster1/shop/web"),
            r#"{"cluster":"cluster1","namespace":"shop","name":"web","frontends":{},"backends":{"10.1.4.7":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"web"},"includeExternal":true,"shared":true,"clusterID":1}"#
        );
    }

    #[test]
    fn a_bad_cluster_ip_drops_the_global_service_but_not_its_mcs_export() {
        let mut mcs = settings();
        mcs.mcs_api_enabled = true;
        let mut h = Harness::new(mcs);
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop, creationTimestamp: \"2026-01-01T00:00:00Z\"}\n",
        );
        h.apply_yaml(GLOBAL_SERVICE);
        assert_eq!(h.keys("cilium/state/").len(), 2);
        let changes = h.apply_yaml(&GLOBAL_SERVICE.replace("fd00:96::7", "fd00:96::zz"));
        assert_eq!(changes.deletes, ["cilium/state/services/v1/cluster1/shop/web"]);
        assert_eq!(changes.invalid.len(), 1);
        assert_eq!(
            h.value("cilium/state/serviceexports/v1/cluster1/shop/web"),
            r#"{"cluster":"cluster1","name":"web","namespace":"shop","exportCreationTimestamp":"2026-01-01T00:00:00Z","ports":[{"name":"http","protocol":"TCP","port":80}],"type":"ClusterSetIP","sessionAffinity":"None","ipFamilies":["IPv4","IPv6"]}"#
        );
    }

    #[test]
    fn only_endpointslice_mode_writes_no_legacy_services() {
        let mut v2 = settings();
        v2.service_v2_mode = ServiceV2Mode::OnlyEndpointSlice;
        let mut h = Harness::new(v2);
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(GLOBAL_SERVICE);
        h.apply_yaml(&slice_yaml("web-a", "web", "10.1.4.7"));
        assert_eq!(h.keys("cilium/state/"), ["cilium/state/endpointslices/v1/cluster1/shop/web-a"]);
        assert!(!h.model.prefixes().contains(&SERVICES_PREFIX));
    }

    #[test]
    fn service_exports_are_ignored_without_mcs_api() {
        let mut h = Harness::new(settings());
        h.apply_yaml(NAMESPACE);
        h.apply_yaml(GLOBAL_SERVICE);
        let export =
            "apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata: {name: web, namespace: shop}\n";
        assert!(h.apply_yaml(export).is_empty(), "not even reported invalid for its missing timestamp");
    }

    #[test]
    fn identities_follow_their_namespace_label_and_the_namespace_flag() {
        let mut local_by_default = settings();
        local_by_default.default_global_namespace = false;
        let mut h = Harness::new(local_by_default);
        h.apply_yaml(NAMESPACE);
        let identity = "apiVersion: cilium.io/v2\nkind: CiliumIdentity\nmetadata: {name: \"65800\"}\nsecurity-labels:\n  k8s:app: web\n  k8s:io.cilium.k8s.policy.cluster: cluster1\n  k8s:io.kubernetes.pod.namespace: shop\n";
        h.apply_yaml(identity);
        assert!(h.store.is_empty());
        h.apply_yaml("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  annotations: {clustermesh.cilium.io/global: \"true\"}\n");
        assert_eq!(
            h.value("cilium/state/identities/v1/id/65800"),
            "k8s:app=web;k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:io.kubernetes.pod.namespace=shop;"
        );
        h.delete(Kind::CiliumIdentity, None, "65800");
        assert!(h.store.is_empty());
    }

    #[test]
    fn prefixes_cover_every_kind_this_configuration_writes() {
        let model = Model::new(settings());
        assert_eq!(
            model.prefixes(),
            [
                "cilium/state/nodes/v1",
                "cilium/state/identities/v1/id",
                "cilium/state/ip/v1/default",
                "cilium/state/services/v1",
                "cilium/state/serviceexports/v1",
                "cilium/state/endpointslices/v1"
            ]
        );
    }

    #[test]
    fn the_service_v2_flag_parses_cilium_values_only() {
        assert_eq!("only-endpointslice".parse(), Ok(ServiceV2Mode::OnlyEndpointSlice));
        assert_eq!("prefer-legacy".parse(), Ok(ServiceV2Mode::PreferLegacy));
        assert!("legacy".parse::<ServiceV2Mode>().is_err());
    }

    #[test]
    fn documents_of_other_kinds_are_not_objects() {
        let crd = serde_json::json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition"});
        assert!(matches!(Object::decode(crd), Ok(None)));
        assert!(matches!(Object::decode(serde_json::json!({"kind": "Service"})), Err(UnknownObject::MissingTypeMeta)));
        let bad = serde_json::json!({"apiVersion": "v1", "kind": "Service", "spec": {"ports": "nope"}});
        assert!(matches!(Object::decode(bad), Err(UnknownObject::Decode { kind: Kind::Service, .. })));
        let wrong_group = serde_json::json!({"apiVersion": "example.com/v1", "kind": "Service"});
        assert!(matches!(Object::decode(wrong_group), Ok(None)));
        assert_eq!(Kind::from_kubernetes_kind("CiliumEndpointSlice"), Some(Kind::CiliumEndpointSlice));
        assert_eq!(Kind::from_kubernetes_kind("Pod"), None);
        let node = Object::from_value(Kind::CiliumNode, serde_json::json!({"metadata": {"name": "n"}, "spec": {}}));
        assert_eq!(node.map(|o| o.key().to_string()), Ok("CiliumNode n".to_string()));
    }
}
