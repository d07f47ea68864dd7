//! A fake Kubernetes API server that speaks the real HTTP list/watch protocol, so kube-rs
//! (`Api`, `watcher`, `reflector`) runs against it unchanged.
//!
//! - Plain HTTP on `127.0.0.1:0`, no auth; [`FakeApiServer::client`] is a normal `kube::Client`.
//! - Resources are registered generically ([`ResourceSpec`]); [`default_resources`] covers what
//!   the clustermesh-apiserver reads.
//! - One global resourceVersion counter, like etcd behind a real API server. Every write bumps it
//!   and appends an event to a bounded history, from which watches are served and paginated lists
//!   are reconstructed at their snapshot resourceVersion.
//! - LIST honours `limit`/`continue` (consistent at the first page's RV), `resourceVersion` and
//!   `resourceVersionMatch`, and simple `labelSelector`/`fieldSelector`s.
//! - WATCH streams one JSON event per line (chunked), replays history after `resourceVersion`,
//!   sends BOOKMARKs every [`FakeOptions::bookmark_interval`] when asked, and honours
//!   `timeoutSeconds`. Watches do not buffer: each pulls from the shared history when hyper can
//!   take more, so a watcher that falls behind the history limit gets `410 Expired`, as from a
//!   real API server.
//! - Faults: [`FakeApiServer::expire_history`] (410 for resumes from older RVs),
//!   [`FakeApiServer::close_watches`], [`FakeApiServer::pause_watches`] (a partition: nothing is
//!   delivered until resumed), [`FakeApiServer::fail_next`] (HTTP errors).
//! - Observability: [`FakeApiServer::requests`] and [`FakeApiServer::open_watches`].

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::serve::ListenerExt as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Events a watch renders per pull before handing lines to hyper.
const WATCH_BATCH: usize = 64;
/// Bound on [`FakeApiServer::stop`] waiting for connections to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// One kind of object the fake serves: `/api/v1/{plural}` for the core group (`group` empty),
/// `/apis/{group}/{version}/{plural}` otherwise, with `/namespaces/{ns}/` before the plural when
/// `namespaced`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceSpec {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
}

impl ResourceSpec {
    pub fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
        }
    }

    /// `v1` for the core group, `group/version` otherwise.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    fn prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// The cluster-wide collection, e.g. `/api/v1/services` (all namespaces for namespaced kinds).
    pub fn path(&self) -> String {
        format!("{}/{}", self.prefix(), self.plural)
    }

    /// The collection within one namespace, e.g. `/api/v1/namespaces/default/services`.
    pub fn namespaced_path(&self, namespace: &str) -> String {
        format!("{}/namespaces/{namespace}/{}", self.prefix(), self.plural)
    }
}

/// The resources registered by [`FakeApiServer::start`].
pub fn default_resources() -> Vec<ResourceSpec> {
    vec![
        ResourceSpec::new("", "v1", "services", "Service", true),
        ResourceSpec::new("", "v1", "namespaces", "Namespace", false),
        ResourceSpec::new("", "v1", "endpoints", "Endpoints", true),
        ResourceSpec::new("", "v1", "pods", "Pod", true),
        ResourceSpec::new("", "v1", "nodes", "Node", false),
        ResourceSpec::new("", "v1", "configmaps", "ConfigMap", true),
        ResourceSpec::new("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true),
        ResourceSpec::new("cilium.io", "v2", "ciliumnodes", "CiliumNode", false),
        ResourceSpec::new("cilium.io", "v2", "ciliumidentities", "CiliumIdentity", false),
        ResourceSpec::new("cilium.io", "v2", "ciliumendpoints", "CiliumEndpoint", true),
        ResourceSpec::new("cilium.io", "v2alpha1", "ciliumendpointslices", "CiliumEndpointSlice", false),
        ResourceSpec::new("multicluster.x-k8s.io", "v1alpha1", "serviceexports", "ServiceExport", true),
        ResourceSpec::new("multicluster.x-k8s.io", "v1alpha1", "serviceimports", "ServiceImport", true),
    ]
}

/// Settings for [`FakeApiServer::start_with`].
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Period of BOOKMARK events on watches that set `allowWatchBookmarks=true`.
    pub bookmark_interval: Duration,
    /// Events kept for watches and paginated lists; older ones are dropped as by a compaction.
    pub history_limit: usize,
    /// Requests kept by [`FakeApiServer::requests`] (oldest dropped first).
    pub request_log_limit: usize,
    /// What the server serves; more can be added with [`FakeApiServer::register`].
    pub resources: Vec<ResourceSpec>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            bookmark_interval: Duration::from_secs(1),
            history_limit: 10_000,
            request_log_limit: 10_000,
            resources: default_resources(),
        }
    }
}

/// What a request asked for, as the fake understood it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// GET of a collection without `watch`.
    List,
    /// GET of a collection with `watch=true` (or `1`).
    Watch,
    /// GET of one object by name.
    Get,
    /// Anything else (other methods, `/version`, unknown paths).
    Other,
}

/// One request received, in arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw (still percent-encoded) query string, without `?`.
    pub query: String,
    pub verb: Verb,
}

impl RequestRecord {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }
}

impl std::fmt::Display for RequestRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// A fake Kubernetes API server on `127.0.0.1`; serves until [`stop`](Self::stop) or drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl FakeApiServer {
    /// Starts with [`FakeOptions::default`] (bookmarks every second, [`default_resources`]).
    pub async fn start() -> Self {
        Self::start_with(FakeOptions::default()).await
    }

    pub async fn start_with(options: FakeOptions) -> Self {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake API server on 127.0.0.1");
        let addr = listener.local_addr().expect("local address of the fake API server");
        // As kube-apiserver (Go sets TCP_NODELAY on every connection). Without it a watch's
        // lines, one small write each, wait in Nagle's buffer for the client's delayed ACK:
        // up to 40 ms on Linux, which was most of scenario 6's latency.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let (signal, _) = watch::channel(Signal::default());
        let store = Store {
            resources: options.resources.clone(),
            rv: 0,
            min_resumable: 0,
            dropped_rv: 0,
            next_uid: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            requests: VecDeque::new(),
            fail: None,
        };
        let shared = Arc::new(Shared { store: Mutex::new(store), signal, open_watches: AtomicUsize::new(0), options });
        let app = Router::new().fallback(handle).with_state(Arc::clone(&shared));
        let mut stopped = shared.signal.subscribe();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| s.stopped).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "fake API server failed");
            }
        });
        Self { shared, addr, server: Mutex::new(Some(server)) }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kube config for this server (plain HTTP, no auth, default namespace `default`).
    pub fn config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("the fake's URL is a valid URI"))
    }

    /// A `kube::Client` for this server. Must be called within a Tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("kube client for the fake API server")
    }

    /// Adds (or replaces, by group/version/plural) a served resource.
    pub fn register(&self, spec: ResourceSpec) {
        let mut store = self.shared.lock();
        match store
            .resources
            .iter()
            .position(|r| r.group == spec.group && r.version == spec.version && r.plural == spec.plural)
        {
            Some(i) => store.resources[i] = spec,
            None => store.resources.push(spec),
        }
    }

    /// Stops serving every version of `group`/`plural` not in `versions` (a CRD update that
    /// drops a version); open watches are closed, as an API server ends them.
    pub fn serve_only(&self, group: &str, plural: &str, versions: &[&str]) {
        let removed = {
            let mut store = self.shared.lock();
            let before = store.resources.len();
            store
                .resources
                .retain(|r| !(r.group == group && r.plural == plural && !versions.contains(&r.version.as_str())));
            before != store.resources.len()
        };
        if removed {
            self.close_watches();
        }
    }

    /// The current global resourceVersion (the RV of the last write, or of the last
    /// [`expire_history`](Self::expire_history)).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Creates or replaces `obj` (ADDED or MODIFIED event); panics on an invalid object.
    /// See [`try_apply`](Self::try_apply).
    pub fn apply(&self, obj: Value) -> Value {
        self.try_apply(obj).unwrap_or_else(|e| panic!("fake API server: apply: {e:#}"))
    }

    /// Creates or replaces `obj`, chosen by `apiVersion`, `kind`, `metadata.name` and (for
    /// namespaced kinds, required) `metadata.namespace`. Sets `metadata.resourceVersion` to a new
    /// global RV, keeps `uid` and `creationTimestamp` of the object it replaces (or takes them from
    /// `obj`, or makes them). Returns the object as stored. Replacing an object with identical
    /// content is a no-op (no new RV, no event), as on a real API server.
    pub fn try_apply(&self, obj: Value) -> anyhow::Result<Value> {
        self.shared.apply(obj)
    }

    /// Applies any serializable object (k8s-openapi types and `#[derive(CustomResource)]` types
    /// serialize their `apiVersion` and `kind`).
    pub fn apply_object<K: serde::Serialize>(&self, obj: &K) -> Value {
        self.apply(serde_json::to_value(obj).expect("object serializes to JSON"))
    }

    /// Applies every document of a (multi-document) YAML manifest, in order; panics on invalid
    /// input. Returns the objects as stored.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<Value> {
        self.try_apply_yaml(yaml).unwrap_or_else(|e| panic!("fake API server: apply_yaml: {e:#}"))
    }

    pub fn try_apply_yaml(&self, yaml: &str) -> anyhow::Result<Vec<Value>> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).context("parse YAML")?;
        docs.into_iter().filter(|d| !d.is_null()).map(|d| self.try_apply(d)).collect()
    }

    /// Deletes an object (DELETED event carrying its last state with a new RV) and returns that
    /// last state, or `None` (and no event) when absent. Panics for an unregistered kind, or a
    /// namespaced kind without `namespace`.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let mut store = self.shared.lock();
        let (res, namespace) = store.key_parts(api_version, kind, namespace);
        let key = (res, namespace.clone(), name.to_string());
        let prev = store.objects.remove(&key)?;
        store.rv += 1;
        let rv = store.rv;
        let mut last = prev.clone();
        last["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let limit = self.shared.options.history_limit;
        store.record(
            HistoryEvent { rv, res, namespace, change: Change::Deleted, object: last.clone(), prev: Some(prev) },
            limit,
        );
        drop(store);
        self.shared.signal.send_modify(|s| s.rv = rv);
        Some(last)
    }

    /// The stored object, if present (same key rules as [`delete`](Self::delete)).
    pub fn get(&self, api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let store = self.shared.lock();
        let (res, namespace) = store.key_parts(api_version, kind, namespace);
        store.objects.get(&(res, namespace, name.to_string())).cloned()
    }

    /// Every stored object of a kind, ordered by namespace then name.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let store = self.shared.lock();
        let res = store.find_kind(api_version, kind).unwrap_or_else(|| panic!("no resource for {api_version} {kind}"));
        store.snapshot(res, None, store.rv).into_values().collect()
    }

    /// Compacts: forgets all history and bumps the global RV, so that every LIST continue token
    /// and every new WATCH from a resourceVersion issued before this call gets `410 Expired`
    /// (kube then relists). Open watches that have already sent every event continue; ones that
    /// had not get `410 Expired` too. Returns the new compaction point (the new global RV).
    pub fn expire_history(&self) -> u64 {
        let mut store = self.shared.lock();
        if let Some(last) = store.history.back() {
            store.dropped_rv = last.rv;
        }
        store.history.clear();
        store.rv += 1;
        store.min_resumable = store.rv;
        let rv = store.rv;
        drop(store);
        self.shared.signal.send_modify(|s| s.rv = rv);
        rv
    }

    /// Ends every open watch stream now (cleanly, as at `timeoutSeconds`); clients re-watch.
    pub fn close_watches(&self) {
        self.shared.signal.send_modify(|s| s.close_gen += 1);
    }

    /// A partition: open and new watch streams deliver nothing (no events, bookmarks or errors)
    /// until [`resume_watches`](Self::resume_watches). Closing, timeouts and stop still apply.
    /// Lists are still answered.
    pub fn pause_watches(&self) {
        self.shared.signal.send_modify(|s| s.paused = true);
    }

    pub fn resume_watches(&self) {
        self.shared.signal.send_modify(|s| s.paused = false);
    }

    /// Answers the next `n` requests (any path or verb) with HTTP `status` and a `Status` body.
    /// Note: kube's client retries 429, 503 and 504 by itself (up to 15 times, with backoff).
    pub fn fail_next(&self, n: usize, status: u16) {
        self.shared.lock().fail = (n > 0).then_some((n, status));
    }

    /// Every request received so far (bounded by [`FakeOptions::request_log_limit`]).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    /// Requests with this verb on exactly this path, e.g. `(Verb::List, "/api/v1/services")`.
    pub fn count_requests(&self, verb: Verb, path: &str) -> usize {
        self.shared.lock().requests.iter().filter(|r| r.verb == verb && r.path == path).count()
    }

    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Watch response bodies currently alive.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// Ends every watch stream, stops accepting, and waits (at most 5 s) for connections to close.
    /// Idempotent.
    pub async fn stop(&self) {
        self.shared.signal.send_modify(|s| s.stopped = true);
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut server) = server else { return };
        if tokio::time::timeout(STOP_TIMEOUT, &mut server).await.is_err() {
            tracing::warn!("fake API server did not stop within {STOP_TIMEOUT:?}; aborting it");
            server.abort();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        // The server task shuts down gracefully on its own (watch streams end at once).
        self.shared.signal.send_modify(|s| s.stopped = true);
    }
}

// ---------------------------------------------------------------------------------------------
// State

#[derive(Clone, Copy, Debug, Default)]
struct Signal {
    /// Bumped on every write: wakes watches.
    rv: u64,
    close_gen: u64,
    paused: bool,
    stopped: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

struct HistoryEvent {
    rv: u64,
    res: usize,
    /// Empty for cluster-scoped kinds.
    namespace: String,
    change: Change,
    /// The object after the change (for a delete: the last state, with the delete's RV).
    object: Value,
    /// The object before the change.
    prev: Option<Value>,
}

/// (resource index, namespace or "", name)
type Key = (usize, String, String);

struct Store {
    resources: Vec<ResourceSpec>,
    /// The global resourceVersion.
    rv: u64,
    /// New watches and continue tokens from an RV below this get 410.
    min_resumable: u64,
    /// RV of the newest event dropped from history: open watches behind it get 410.
    dropped_rv: u64,
    next_uid: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<HistoryEvent>,
    requests: VecDeque<RequestRecord>,
    /// (requests left to fail, HTTP status)
    fail: Option<(usize, u16)>,
}

struct Shared {
    store: Mutex<Store>,
    signal: watch::Sender<Signal>,
    open_watches: AtomicUsize,
    options: FakeOptions,
}

impl Shared {
    /// Creates or replaces `obj`; see [`FakeApiServer::try_apply`].
    fn apply(&self, mut obj: Value) -> anyhow::Result<Value> {
        let api_version =
            obj.get("apiVersion").and_then(Value::as_str).context("object has no apiVersion")?.to_string();
        let kind = obj.get("kind").and_then(Value::as_str).context("object has no kind")?.to_string();
        let mut store = self.lock();
        let res = store
            .find_kind(&api_version, &kind)
            .with_context(|| format!("no resource registered for apiVersion {api_version} kind {kind}"))?;
        let namespaced = store.resources[res].namespaced;
        let meta = obj.get_mut("metadata").and_then(Value::as_object_mut).context("object has no metadata")?;
        let name = non_empty_str(meta, "name").context("object has no metadata.name")?;
        let namespace = if namespaced {
            non_empty_str(meta, "namespace").with_context(|| format!("{kind} {name} has no metadata.namespace"))?
        } else {
            meta.remove("namespace");
            String::new()
        };
        let key = (res, namespace.clone(), name.clone());
        let prev = store.objects.get(&key).cloned();
        let prev_meta = |field: &str| prev.as_ref().and_then(|p| p["metadata"][field].as_str()).map(str::to_string);
        let uid = match prev_meta("uid").or_else(|| non_empty_str(meta, "uid")) {
            Some(uid) => uid,
            None => store.new_uid(),
        };
        let created = prev_meta("creationTimestamp")
            .or_else(|| non_empty_str(meta, "creationTimestamp"))
            .unwrap_or_else(now_rfc3339);
        meta.insert("uid".into(), Value::String(uid));
        meta.insert("creationTimestamp".into(), Value::String(created));
        if let Some(prev) = &prev {
            // Like a real API server, an update that changes nothing is a no-op: no RV, no event.
            meta.insert("resourceVersion".into(), prev["metadata"]["resourceVersion"].clone());
            if obj == *prev {
                return Ok(obj);
            }
        }
        store.rv += 1;
        let rv = store.rv;
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        store.objects.insert(key, obj.clone());
        let change = if prev.is_some() { Change::Modified } else { Change::Added };
        let limit = self.options.history_limit;
        store.record(HistoryEvent { rv, res, namespace, change, object: obj.clone(), prev }, limit);
        drop(store);
        self.signal.send_modify(|s| s.rv = rv);
        Ok(obj)
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    fn find_kind(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.resources.iter().position(|r| r.kind == kind && r.api_version() == api_version)
    }

    fn find_plural(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.resources.iter().position(|r| r.group == group && r.version == version && r.plural == plural)
    }

    fn key_parts(&self, api_version: &str, kind: &str, namespace: Option<&str>) -> (usize, String) {
        let res = self.find_kind(api_version, kind).unwrap_or_else(|| panic!("no resource for {api_version} {kind}"));
        let namespace = if self.resources[res].namespaced {
            namespace.unwrap_or_else(|| panic!("{kind} is namespaced: a namespace is required")).to_string()
        } else {
            String::new()
        };
        (res, namespace)
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        format!("fa4e0000-0000-4000-8000-{:012x}", self.next_uid)
    }

    fn record(&mut self, event: HistoryEvent, limit: usize) {
        self.history.push_back(event);
        while self.history.len() > limit.max(1) {
            let Some(old) = self.history.pop_front() else { break };
            self.dropped_rv = old.rv;
            self.min_resumable = self.min_resumable.max(old.rv);
        }
    }

    fn log(&mut self, record: RequestRecord, limit: usize) {
        self.requests.push_back(record);
        while self.requests.len() > limit.max(1) {
            self.requests.pop_front();
        }
    }

    /// The objects of `res` (in `namespace`, if given) as they were at RV `at`, keyed by
    /// (namespace, name). `at` must not be below `min_resumable`.
    fn snapshot(&self, res: usize, namespace: Option<&str>, at: u64) -> BTreeMap<(String, String), Value> {
        let in_scope = |ns: &str| namespace.is_none_or(|want| want == ns);
        let mut map: BTreeMap<(String, String), Value> = self
            .objects
            .range((res, String::new(), String::new())..(res + 1, String::new(), String::new()))
            .filter(|((_, ns, _), _)| in_scope(ns))
            .map(|((_, ns, name), obj)| ((ns.clone(), name.clone()), obj.clone()))
            .collect();
        for event in self.history.iter().rev().take_while(|e| e.rv > at) {
            if event.res != res || !in_scope(&event.namespace) {
                continue;
            }
            let key = (event.namespace.clone(), object_name(&event.object));
            match &event.prev {
                Some(prev) => map.insert(key, prev.clone()),
                None => map.remove(&key),
            };
        }
        map
    }
}

fn non_empty_str(meta: &Map<String, Value>, field: &str) -> Option<String> {
    meta.get(field).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string)
}

fn object_name(obj: &Value) -> String {
    obj["metadata"]["name"].as_str().unwrap_or_default().to_string()
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// An answer with a Kubernetes `Status` body.
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Self { code, reason: reason_for(code), message: message.into() }
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(status, &status_object(self.code, self.reason, &self.message))
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let body = serde_json::to_vec(body).expect("JSON values serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("valid response")
}

enum Route {
    Version,
    /// A collection: all namespaces (or cluster-scoped) when `namespace` is `None`.
    Collection {
        res: usize,
        namespace: Option<String>,
    },
    Object {
        res: usize,
        namespace: Option<String>,
        name: String,
    },
    NotFound,
}

fn route(store: &Store, path: &str) -> Route {
    let segments: Vec<String> = path.trim_matches('/').split('/').map(|s| percent_decode(s, false)).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let (group, version, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Route::NotFound,
    };
    let find = |plural: &str| store.find_plural(group, version, plural);
    let namespaced = |res: usize| store.resources[res].namespaced;
    match rest {
        [plural] => find(plural).map_or(Route::NotFound, |res| Route::Collection { res, namespace: None }),
        [plural, name] => match find(plural) {
            Some(res) if !namespaced(res) => Route::Object { res, namespace: None, name: name.to_string() },
            _ => Route::NotFound,
        },
        ["namespaces", ns, plural] => match find(plural) {
            Some(res) if namespaced(res) => Route::Collection { res, namespace: Some(ns.to_string()) },
            _ => Route::NotFound,
        },
        ["namespaces", ns, plural, name] => match find(plural) {
            Some(res) if namespaced(res) => {
                Route::Object { res, namespace: Some(ns.to_string()), name: name.to_string() }
            }
            _ => Route::NotFound,
        },
        _ => Route::NotFound,
    }
}

struct Params(Vec<(String, String)>);

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The parameter, unless absent or empty.
    fn non_empty(&self, name: &str) -> Option<&str> {
        self.get(name).filter(|v| !v.is_empty())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let params = Params(parse_query(&query));
    let mut store = shared.lock();
    let route = route(&store, &path);
    let verb = match (&route, method == Method::GET) {
        (Route::Collection { .. }, true) if params.flag("watch") => Verb::Watch,
        (Route::Collection { .. }, true) => Verb::List,
        (Route::Object { .. }, true) => Verb::Get,
        _ => Verb::Other,
    };
    tracing::debug!(%method, %uri, ?verb, "fake API server request");
    store.log(RequestRecord { method: method.to_string(), path, query, verb }, shared.options.request_log_limit);
    if let Some((left, status)) = store.fail {
        store.fail = (left > 1).then_some((left - 1, status));
        return ApiError::new(status, format!("injected failure ({status})")).into_response();
    }
    if method == Method::PUT || method == Method::PATCH {
        let Route::Object { res, namespace, name } = route else {
            return ApiError::new(405, format!("{method} is served on objects only")).into_response();
        };
        let current = store.objects.get(&(res, namespace.unwrap_or_default(), name)).cloned();
        drop(store);
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        return write_object(&shared, &method, content_type, current, &body).unwrap_or_else(ApiError::into_response);
    }
    if method != Method::GET {
        return ApiError::new(405, format!("the fake API server serves GET, PUT and PATCH, not {method}"))
            .into_response();
    }
    let answer = match route {
        Route::Version => Ok(json_response(StatusCode::OK, &version_info())),
        Route::NotFound => Err(ApiError::new(404, "the server could not find the requested resource")),
        Route::Object { res, namespace, name } => get_object(&store, res, namespace, &name),
        Route::Collection { res, namespace } if verb == Verb::Watch => {
            drop(store);
            start_watch(&shared, res, namespace, &params)
        }
        Route::Collection { res, namespace } => list(&store, res, namespace.as_deref(), &params),
    };
    answer.unwrap_or_else(ApiError::into_response)
}

/// `PUT` (a replace, refused with 409 when `metadata.resourceVersion` is stale, as an API
/// server refuses it) and `PATCH` (apply and merge patches, applied as a JSON merge patch: what
/// the clients under test send fits that reading).
fn write_object(
    shared: &Shared,
    method: &Method,
    content_type: &str,
    current: Option<Value>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let sent: Value = serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("invalid body: {e}")))?;
    let current = current.ok_or_else(|| ApiError::new(404, "the object does not exist"))?;
    let object = if *method == Method::PUT {
        let sent_rv = sent["metadata"]["resourceVersion"].as_str();
        if sent_rv.is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str()) {
            return Err(ApiError::new(
                409,
                "the object has been modified; please apply your changes to the latest version",
            ));
        }
        sent
    } else {
        if !content_type.starts_with("application/apply-patch") && !content_type.starts_with("application/merge-patch")
        {
            return Err(ApiError::new(415, format!("unsupported patch type {content_type:?}")));
        }
        let mut merged = current;
        merge_patch(&mut merged, &sent);
        merged
    };
    let stored = shared.apply(object).map_err(|e| ApiError::new(422, format!("{e:#}")))?;
    Ok(json_response(StatusCode::OK, &stored))
}

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn get_object(store: &Store, res: usize, namespace: Option<String>, name: &str) -> Result<Response, ApiError> {
    let spec = &store.resources[res];
    match store.objects.get(&(res, namespace.unwrap_or_default(), name.to_string())) {
        Some(obj) => Ok(json_response(StatusCode::OK, obj)),
        None => {
            let what =
                if spec.group.is_empty() { spec.plural.clone() } else { format!("{}.{}", spec.plural, spec.group) };
            Err(ApiError::new(404, format!("{what} \"{name}\" not found")))
        }
    }
}

fn parse_rv(value: &str) -> Result<u64, ApiError> {
    value.parse().map_err(|_| ApiError::new(400, format!("invalid resourceVersion {value:?}")))
}

fn too_old(requested: u64, oldest: u64) -> String {
    format!("too old resource version: {requested} ({oldest})")
}

fn list(store: &Store, res: usize, namespace: Option<&str>, params: &Params) -> Result<Response, ApiError> {
    let selector = Selector::parse(params.get("labelSelector"), params.get("fieldSelector"))?;
    let limit: usize = match params.non_empty("limit") {
        Some(v) => v.parse().map_err(|_| ApiError::new(400, format!("invalid limit {v:?}")))?,
        None => 0,
    };
    let rv_param = params.non_empty("resourceVersion");
    let (at, after) = if let Some(token) = params.non_empty("continue") {
        if rv_param.is_some() {
            return Err(ApiError::new(400, "specifying resource version is not allowed when using continue"));
        }
        let (at, ns, name) = decode_continue(token).ok_or_else(|| ApiError::new(400, "invalid continue token"))?;
        if at < store.min_resumable {
            return Err(ApiError::new(
                410,
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter.",
            ));
        }
        (at, Some((ns, name)))
    } else {
        let at = match rv_param {
            None | Some("0") => store.rv,
            Some(value) => {
                let n = parse_rv(value)?;
                if n > store.rv {
                    return Err(ApiError::new(504, format!("Too large resource version: {n}, current: {}", store.rv)));
                }
                match params.non_empty("resourceVersionMatch") {
                    Some("Exact") if n < store.min_resumable => {
                        return Err(ApiError::new(410, too_old(n, store.min_resumable)));
                    }
                    Some("Exact") => n,
                    None | Some("NotOlderThan") => store.rv,
                    Some(other) => return Err(ApiError::new(400, format!("invalid resourceVersionMatch {other:?}"))),
                }
            }
        };
        (at, None)
    };
    let spec = &store.resources[res];
    let matching: Vec<((String, String), Value)> = store
        .snapshot(res, namespace, at)
        .into_iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|after| key > after))
        .filter(|(_, obj)| selector.matches(obj))
        .collect();
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    let page_len = if limit > 0 { limit.min(matching.len()) } else { matching.len() };
    if page_len < matching.len() {
        let (ns, name) = &matching[page_len - 1].0;
        metadata["continue"] = Value::String(encode_continue(at, ns, name));
        metadata["remainingItemCount"] = json!(matching.len() - page_len);
    }
    let items: Vec<Value> = matching.into_iter().take(page_len).map(|(_, obj)| obj).collect();
    let body = json!({
        "apiVersion": spec.api_version(),
        "kind": format!("{}List", spec.kind),
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn encode_continue(at: u64, namespace: &str, name: &str) -> String {
    let raw = serde_json::to_vec(&json!([at, namespace, name])).expect("JSON values serialize");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(token: &str) -> Option<(u64, String, String)> {
    if !token.len().is_multiple_of(2) || !token.is_ascii() {
        return None;
    }
    let raw: Option<Vec<u8>> =
        (0..token.len()).step_by(2).map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok()).collect();
    serde_json::from_slice(&raw?).ok()
}

// ---------------------------------------------------------------------------------------------
// Watch

fn start_watch(
    shared: &Arc<Shared>,
    res: usize,
    namespace: Option<String>,
    params: &Params,
) -> Result<Response, ApiError> {
    let selector = Selector::parse(params.get("labelSelector"), params.get("fieldSelector"))?;
    let deadline = match params.non_empty("timeoutSeconds") {
        Some(v) => {
            let secs: u64 = v.parse().map_err(|_| ApiError::new(400, format!("invalid timeoutSeconds {v:?}")))?;
            (secs > 0).then(|| Instant::now() + Duration::from_secs(secs))
        }
        None => None,
    };
    let bookmarks = params.flag("allowWatchBookmarks");
    let send_initial = params.flag("sendInitialEvents");
    // Subscribe before reading the store, so no write between the two goes unnoticed.
    let mut signal = shared.signal.subscribe();
    let close_gen = signal.borrow_and_update().close_gen;
    let store = shared.lock();
    let spec = &store.resources[res];
    // Counted from here; `WatchStream::drop` uncounts it.
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let mut stream = WatchStream {
        shared: Arc::clone(shared),
        res,
        kind: spec.kind.clone(),
        api_version: spec.api_version(),
        namespace,
        selector,
        cursor: store.rv,
        pending: VecDeque::new(),
        finished: false,
        signal,
        close_gen,
        deadline,
        bookmark_interval: bookmarks.then_some(shared.options.bookmark_interval),
        next_bookmark: Instant::now() + shared.options.bookmark_interval,
        bookmark_due: false,
    };
    match params.non_empty("resourceVersion") {
        Some(value) if value != "0" && !send_initial => {
            let n = parse_rv(value)?;
            if n > store.rv {
                return Err(ApiError::new(504, format!("Too large resource version: {n}, current: {}", store.rv)));
            }
            if n < store.min_resumable {
                stream.pending.push_back(line(&error_event(410, "Expired", &too_old(n, store.min_resumable))));
                stream.finished = true;
            } else {
                stream.cursor = n;
            }
        }
        // No RV, "0", or sendInitialEvents: the current state as ADDED events, then changes.
        _ => {
            for obj in store.snapshot(res, stream.namespace.as_deref(), store.rv).values() {
                if stream.selector.matches(obj) {
                    stream.pending.push_back(line(&json!({ "type": "ADDED", "object": obj })));
                }
            }
            if send_initial && bookmarks {
                let bookmark = stream.bookmark(store.rv, true);
                stream.pending.push_back(bookmark);
            }
        }
    }
    drop(store);
    let body = futures::stream::unfold(stream, |mut stream| async move {
        stream.next_line().await.map(|line| (Ok::<Bytes, Infallible>(line), stream))
    });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(body))
        .expect("valid response"))
}

fn error_event(code: u16, reason: &str, message: &str) -> Value {
    json!({ "type": "ERROR", "object": status_object(code, reason, message) })
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("JSON values serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// One watch response body. Holds no per-watch event queue beyond one pulled batch: it reads the
/// shared history from `cursor` whenever hyper asks for more.
struct WatchStream {
    shared: Arc<Shared>,
    res: usize,
    kind: String,
    api_version: String,
    namespace: Option<String>,
    selector: Selector,
    /// Every event up to this RV has been rendered.
    cursor: u64,
    pending: VecDeque<Bytes>,
    /// After the pending lines, end the stream (after an ERROR).
    finished: bool,
    signal: watch::Receiver<Signal>,
    close_gen: u64,
    deadline: Option<Instant>,
    bookmark_interval: Option<Duration>,
    next_bookmark: Instant,
    bookmark_due: bool,
}

impl WatchStream {
    async fn next_line(&mut self) -> Option<Bytes> {
        if self.finished && self.pending.is_empty() {
            return None;
        }
        loop {
            let signal = *self.signal.borrow_and_update();
            if signal.stopped || signal.close_gen != self.close_gen {
                return None;
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if !signal.paused {
                if let Some(line) = self.pending.pop_front() {
                    return Some(line);
                }
                if self.finished {
                    return None;
                }
                self.pull();
                if self.pending.is_empty() && self.bookmark_due {
                    self.bookmark_due = false;
                    let bookmark = self.bookmark(self.cursor, false);
                    self.pending.push_back(bookmark);
                }
                if !self.pending.is_empty() {
                    continue;
                }
            }
            let bookmark_timer = self.bookmark_interval.filter(|_| !self.bookmark_due);
            tokio::select! {
                changed = self.signal.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = sleep_until(self.deadline) => return None,
                () = tokio::time::sleep_until(self.next_bookmark), if bookmark_timer.is_some() => {
                    self.bookmark_due = true;
                    self.next_bookmark = Instant::now() + bookmark_timer.unwrap_or_default();
                }
            }
        }
    }

    /// Renders the next batch of history events after `cursor` into `pending`.
    fn pull(&mut self) {
        let store = self.shared.lock();
        if self.cursor < store.dropped_rv {
            let message = too_old(self.cursor, store.min_resumable);
            self.pending.push_back(line(&error_event(410, "Expired", &message)));
            self.finished = true;
            return;
        }
        let start = store.history.partition_point(|e| e.rv <= self.cursor);
        for event in store.history.range(start..) {
            self.cursor = event.rv;
            if let Some(rendered) = self.render(event) {
                self.pending.push_back(rendered);
                if self.pending.len() >= WATCH_BATCH {
                    return;
                }
            }
        }
        // Every event up to the global RV is in the history (or was seen).
        self.cursor = self.cursor.max(store.rv);
    }

    /// The line for `event` as this watch sees it: selector transitions become ADDED / DELETED.
    fn render(&self, event: &HistoryEvent) -> Option<Bytes> {
        if event.res != self.res || self.namespace.as_ref().is_some_and(|ns| *ns != event.namespace) {
            return None;
        }
        let was = event.prev.as_ref().is_some_and(|prev| self.selector.matches(prev));
        let is = event.change != Change::Deleted && self.selector.matches(&event.object);
        let kind = match (was, is) {
            (false, true) => "ADDED",
            (true, true) => "MODIFIED",
            (true, false) => "DELETED",
            (false, false) => return None,
        };
        Some(line(&json!({ "type": kind, "object": event.object })))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> Bytes {
        let mut metadata = json!({ "resourceVersion": rv.to_string() });
        if initial_events_end {
            metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
        }
        line(&json!({
            "type": "BOOKMARK",
            "object": { "kind": self.kind, "apiVersion": self.api_version, "metadata": metadata },
        }))
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Clone, Debug, Default)]
struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

#[derive(Clone, Debug)]
enum LabelRequirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Clone, Debug)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

impl Selector {
    /// Equality- and set-based label selectors (`a=b`, `a==b`, `a!=b`, `a in (x,y)`,
    /// `a notin (x)`, `a`, `!a`); field selectors `path=value`, `path==value`, `path!=value` on
    /// any dotted JSON path (missing fields compare as "").
    fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let mut selector = Selector::default();
        for requirement in split_top_level(labels.unwrap_or_default()) {
            selector.labels.push(parse_label_requirement(&requirement)?);
        }
        for requirement in split_top_level(fields.unwrap_or_default()) {
            let (path, value, equal) = if let Some((p, v)) = requirement.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = requirement.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = requirement.split_once('=') {
                (p, v, true)
            } else {
                return Err(ApiError::new(400, format!("invalid field selector requirement {requirement:?}")));
            };
            selector.fields.push(FieldRequirement {
                path: path.trim().to_string(),
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(selector)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = obj["metadata"]["labels"].as_object();
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|req| match req {
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
            LabelRequirement::In(k, values) => label(k).is_some_and(|v| values.iter().any(|x| x == v)),
            LabelRequirement::NotIn(k, values) => label(k).is_none_or(|v| values.iter().all(|x| x != v)),
        });
        labels_ok
            && self.fields.iter().all(|req| {
                let mut node = obj;
                for part in req.path.split('.') {
                    node = &node[part];
                }
                let actual = match node {
                    Value::Null => String::new(),
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (actual == req.value) == req.equal
            })
    }
}

/// Splits at commas outside parentheses, trimming and dropping empty parts.
fn split_top_level(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut current = String::new();
    for c in text.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect()
}

fn parse_label_requirement(text: &str) -> Result<LabelRequirement, ApiError> {
    let invalid = || ApiError::new(400, format!("invalid label selector requirement {text:?}"));
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) { Err(invalid()) } else { Ok(k.to_string()) }
    };
    if let Some(k) = text.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(key(k)?));
    }
    if let Some((k, v)) = text.split_once("!=") {
        return Ok(LabelRequirement::NotIn(key(k)?, vec![v.trim().to_string()]));
    }
    if let Some((k, v)) = text.split_once("==").or_else(|| text.split_once('=')) {
        return Ok(LabelRequirement::In(key(k)?, vec![v.trim().to_string()]));
    }
    if let Some((k, rest)) = text.split_once(char::is_whitespace) {
        let rest = rest.trim();
        let (negate, set) = if let Some(set) = rest.strip_prefix("notin") {
            (true, set)
        } else if let Some(set) = rest.strip_prefix("in") {
            (false, set)
        } else {
            return Err(invalid());
        };
        let set = set.trim().strip_prefix('(').and_then(|s| s.strip_suffix(')')).ok_or_else(invalid)?;
        let values: Vec<String> = set.split(',').map(|v| v.trim().to_string()).collect();
        let k = key(k)?;
        return Ok(if negate { LabelRequirement::NotIn(k, values) } else { LabelRequirement::In(k, values) });
    }
    Ok(LabelRequirement::Exists(key(text)?))
}

// ---------------------------------------------------------------------------------------------
// Query strings

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) => (percent_decode(k, true), percent_decode(v, true)),
            None => (percent_decode(pair, true), String::new()),
        })
        .collect()
}

/// Decodes `%XX` escapes, and `+` as a space when `plus_is_space` (query strings).
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) if plus_is_space => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
