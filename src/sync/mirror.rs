//! The mirror: source events into the translation model, the model's key diffs into the sync
//! store, relists turned into deletes, and a canary requested per prefix once every kind
//! feeding it has been listed.

use std::collections::{BTreeSet, HashMap, HashSet};

// The per-object sets hash every object's names on every event (SipHash was 3.6% of a
// 300k-object bootstrap in process); see Cargo.toml.
use foldhash::HashSet as FastSet;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::store::SyncStore;
use crate::source::SourceEvent;
use crate::translate::model::{ALL_KINDS, Changes, Kind, Model, Object, ObjectKey};
use crate::translate::{
    ENDPOINT_SLICES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX, NODES_PREFIX, SERVICE_EXPORTS_PREFIX, SERVICES_PREFIX,
    canary_key,
};

/// The most events handled as one run ([`Mirror::handle_all`]): what the source's channel
/// holds (1,024) is taken in a few runs, so that the writer starts on the first keys while
/// the rest are translated.
const EVENTS_AT_ONCE: usize = 256;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// `cilium_clustermesh_apiserver_invalid_objects_total{kind}`: objects skipped because they
/// do not decode or do not translate.
#[derive(Debug, Clone, Default)]
pub struct MirrorMetrics {
    invalid: Family<KindLabel, Counter>,
}

impl MirrorMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register("invalid_objects", "Kubernetes objects skipped as invalid", metrics.invalid.clone());
        metrics
    }
}

/// Which kinds must have been listed before a prefix's content is complete. Namespaces
/// decide what is global, so they gate everything but nodes. Kinds not delivered (not read
/// in this configuration) gate nothing: service exports without MCS-API are complete, and
/// empty, from the start, as Cilium announces them.
fn feeding_kinds(prefix: &str, kinds: &[Kind]) -> Vec<Kind> {
    let wanted: &[Kind] = match prefix {
        NODES_PREFIX => &[Kind::CiliumNode],
        IDENTITIES_PREFIX => &[Kind::CiliumIdentity, Kind::Namespace],
        IPCACHE_PREFIX => &[Kind::CiliumEndpoint, Kind::CiliumEndpointSlice, Kind::Namespace],
        SERVICE_EXPORTS_PREFIX if !kinds.contains(&Kind::ServiceExport) => &[],
        SERVICE_EXPORTS_PREFIX => &[Kind::ServiceExport, Kind::Service, Kind::Namespace],
        SERVICES_PREFIX | ENDPOINT_SLICES_PREFIX => &[Kind::Service, Kind::EndpointSlice, Kind::Namespace],
        // Unknown to this table: wait for everything rather than announce too early.
        _ => kinds,
    };
    wanted.iter().copied().filter(|k| kinds.contains(k)).collect()
}

/// What a listing in progress has seen of its kind. Keys, to find at its end the objects
/// known before it that it did not list (deleted while not watching); on a listing that starts
/// with none known (the first), only a count: a set of every key for nothing to compare with
/// cost the initial sync a hash insert per object and a pass over them all at the end.
enum Seen {
    Counted(usize),
    Keys(FastSet<ObjectKey>),
}

impl Seen {
    fn keys() -> Self {
        Seen::Keys(FastSet::default())
    }

    fn insert(&mut self, key: &ObjectKey) {
        match self {
            Seen::Counted(count) => *count += 1,
            Seen::Keys(keys) => {
                keys.insert(key.clone());
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Seen::Counted(count) => *count,
            Seen::Keys(keys) => keys.len(),
        }
    }
}

pub struct Mirror {
    model: Model,
    sync: Arc<SyncStore>,
    metrics: MirrorMetrics,
    /// The kinds the sources deliver; a kind not delivered never gates a canary.
    kinds: Vec<Kind>,
    /// During a listing of a kind: what it has seen so far. Objects that the model knows (it
    /// remembers every object it was given) and the listing did not bring were deleted meanwhile.
    relisting: HashMap<Kind, Seen>,
    listed: HashSet<Kind>,
    /// Prefixes whose canary is still to be requested.
    waiting: BTreeSet<&'static str>,
}

impl Mirror {
    /// A mirror of the kinds `model` reads, all of which the sources must deliver.
    pub fn new(model: Model, sync: Arc<SyncStore>, metrics: MirrorMetrics) -> Self {
        let waiting = model.prefixes().into_iter().collect();
        let kinds = ALL_KINDS.iter().copied().filter(|&k| model.reads(k)).collect();
        Self { model, sync, metrics, kinds, relisting: HashMap::new(), listed: HashSet::new(), waiting }
    }

    /// The canary keys this mirror will write, for readiness.
    pub fn canary_keys(&self) -> Vec<String> {
        self.model.prefixes().into_iter().map(|p| canary_key(self.model.settings(), p)).collect()
    }

    /// The kinds the sources must deliver.
    pub fn kinds(&self) -> Vec<Kind> {
        self.kinds.clone()
    }

    /// The prefixes this mirror writes, for pruning.
    pub fn prefixes(&self) -> Vec<&'static str> {
        self.model.prefixes()
    }

    pub async fn run(mut self, mut events: mpsc::Receiver<SourceEvent>, shutdown: CancellationToken) {
        // Prefixes fed by no delivered kind are complete (empty) from the start.
        self.request_ready_canaries();
        let mut batch = Vec::with_capacity(EVENTS_AT_ONCE);
        loop {
            let received = tokio::select! {
                () = shutdown.cancelled() => return,
                received = events.recv_many(&mut batch, EVENTS_AT_ONCE) => received,
            };
            if received == 0 {
                return;
            }
            self.handle_all(batch.drain(..));
        }
    }

    /// Handles a run of events, waking the sync store's writer for a batch of keys rather
    /// than for each ([`SyncStore::hold_wakes`]).
    pub fn handle_all(&mut self, events: impl IntoIterator<Item = SourceEvent>) {
        let sync = Arc::clone(&self.sync);
        let _held = sync.hold_wakes();
        for event in events {
            self.handle(event);
        }
    }

    pub fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Init(kind) => {
                let first = !self.model.knows_any(kind);
                self.relisting.insert(kind, if first { Seen::Counted(0) } else { Seen::keys() });
            }
            SourceEvent::InitApply(object) => {
                let key = self.model.key_of(&object);
                self.relisting.entry(key.kind).or_insert_with(Seen::keys).insert(&key);
                self.apply_as(key, object);
            }
            SourceEvent::InitDone(kind) => {
                let seen = self.relisting.remove(&kind).unwrap_or_else(Seen::keys);
                let vanished: Vec<ObjectKey> = match &seen {
                    Seen::Keys(seen) => {
                        self.model.objects(kind).into_iter().filter(|key| !seen.contains(key)).collect()
                    }
                    Seen::Counted(_) => Vec::new(),
                };
                if !vanished.is_empty() {
                    tracing::info!(?kind, deleted = vanished.len(), "relist: objects deleted while not watching");
                }
                for key in vanished {
                    self.delete(&key);
                }
                self.model.settle(kind);
                if self.listed.insert(kind) {
                    tracing::info!(?kind, objects = seen.len(), "initial list complete");
                    self.request_ready_canaries();
                }
            }
            SourceEvent::Apply(object) => {
                let key = self.model.key_of(&object);
                self.apply_as(key, object);
            }
            SourceEvent::Delete(key) => self.delete(&key),
            SourceEvent::Invalid { key, reason } => {
                self.report_invalid(&key, &reason);
                if let Some(seen) = self.relisting.get_mut(&key.kind) {
                    seen.insert(&key);
                }
                self.delete(&key);
            }
        }
    }

    fn apply_as(&mut self, key: ObjectKey, object: Object) {
        let changes = self.model.apply_as(key, object);
        self.push(changes);
    }

    fn delete(&mut self, key: &ObjectKey) {
        let changes = self.model.delete(key);
        self.push(changes);
    }

    fn push(&mut self, changes: Changes) {
        let Changes { upserts, deletes, invalid } = changes;
        for (key, reason) in &invalid {
            self.report_invalid(key, reason);
        }
        for (key, value) in upserts {
            self.sync.upsert(key, value);
        }
        for key in deletes {
            self.sync.delete(&key);
        }
    }

    fn report_invalid(&self, key: &ObjectKey, reason: &str) {
        tracing::warn!(
            kind = ?key.kind,
            namespace = key.namespace.as_deref().unwrap_or(""),
            name = %key.name,
            %reason,
            "skipping invalid object"
        );
        self.metrics.invalid.get_or_create(&KindLabel { kind: format!("{:?}", key.kind) }).inc();
    }

    fn request_ready_canaries(&mut self) {
        let ready: Vec<&'static str> = self
            .waiting
            .iter()
            .copied()
            .filter(|prefix| feeding_kinds(prefix, &self.kinds).iter().all(|k| self.listed.contains(k)))
            .collect();
        for prefix in ready {
            self.waiting.remove(prefix);
            self.sync.request_canary(prefix, &canary_key(self.model.settings(), prefix));
        }
    }
}
