//! The fake Kubernetes API server, proven against kube-rs itself: `kube::runtime::watcher` and
//! `Api` run unchanged over plain HTTP, list, page, watch, relist after `410 Expired`, and see
//! exactly what a real API server would show them.

use std::fmt::Debug;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, WatchEvent, WatchParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{CustomResource, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::support::{FakeApiServer, FakeOptions, Verb, eventually, init_tracing};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// A cluster-scoped custom resource, as production code would derive it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(group = "cilium.io", version = "v2", kind = "CiliumNode", schema = "disabled")]
pub struct CiliumNodeSpec {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    ip: String,
}

fn cilium_node(name: &str, ip: &str) -> CiliumNode {
    CiliumNode::new(name, CiliumNodeSpec { addresses: vec![NodeAddress { kind: "InternalIP".into(), ip: ip.into() }] })
}

fn service(namespace: &str, name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "namespace": namespace, "name": name, "labels": { "app": app } },
        "spec": { "clusterIP": "10.96.0.10", "ports": [{ "port": 80, "protocol": "TCP" }] },
    })
}

/// `namespace/name`, or `name` for cluster-scoped objects.
fn key<K: Resource>(obj: &K) -> String {
    match obj.namespace() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

fn describe<K: Resource>(event: &Event<K>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitApply(o) => format!("InitApply({})", key(o)),
        Event::InitDone => "InitDone".into(),
        Event::Apply(o) => format!("Apply({})", key(o)),
        Event::Delete(o) => format!("Delete({})", key(o)),
    }
}

/// A `kube::runtime::watcher` driven by its own task, as production reflectors are: the watcher
/// only issues its WATCH request while polled.
struct Watched<K> {
    events: mpsc::Receiver<Result<Event<K>, watcher::Error>>,
    task: JoinHandle<()>,
    /// Watcher errors seen (skipped by `next`).
    errors: Vec<String>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    fn start(api: Api<K>, config: watcher::Config) -> Self {
        let (tx, events) = mpsc::channel(64);
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, config).boxed();
            while let Some(item) = stream.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        Self { events, task, errors: Vec::new() }
    }

    /// The next event (errors are recorded and skipped).
    async fn next(&mut self) -> Event<K> {
        let errors = &mut self.errors;
        let events = &mut self.events;
        tokio::time::timeout(WAIT, async {
            loop {
                match events.recv().await.expect("the watcher stream never ends") {
                    Ok(event) => return event,
                    Err(e) => errors.push(e.to_string()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no watcher event within {WAIT:?} (errors so far: {errors:?})"))
    }

    /// Expects a whole initial list (Init, InitApply…, InitDone) and returns its objects.
    async fn init_objects(&mut self) -> Vec<K> {
        let first = self.next().await;
        assert!(matches!(first, Event::Init), "expected Init, got {}", describe(&first));
        let mut objects = Vec::new();
        loop {
            match self.next().await {
                Event::InitApply(obj) => objects.push(obj),
                Event::InitDone => return objects,
                other => panic!("expected InitApply or InitDone, got {}", describe(&other)),
            }
        }
    }

    /// Keys of a whole initial list, sorted.
    async fn init_keys(&mut self) -> Vec<String> {
        let mut keys: Vec<String> = self.init_objects().await.iter().map(key).collect();
        keys.sort();
        keys
    }
}

impl<K> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn kube_is_watching(fake: &FakeApiServer, watches: usize) {
    eventually(&format!("{watches} open watch(es)"), WAIT, || async { fake.open_watches() == watches }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_lists_existing_services_then_watches_from_the_lists_resource_version() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    fake.apply(service("kube-system", "dns", "dns"));
    let list_rv = fake.resource_version().to_string();

    let mut watched = Watched::start(Api::<Service>::all(fake.client()), watcher::Config::default());

    assert_eq!(watched.init_keys().await, ["default/web", "kube-system/dns"]);
    let lists: Vec<_> = fake.requests().into_iter().filter(|r| r.verb == Verb::List).collect();
    assert_eq!(lists.len(), 1, "one LIST: {lists:?}");
    assert_eq!(lists[0].path, "/api/v1/services");
    assert_eq!(lists[0].param("limit").as_deref(), Some("500"));
    eventually("a WATCH from the list's resourceVersion", WAIT, || async {
        fake.requests().iter().any(|r| {
            r.verb == Verb::Watch
                && r.path == "/api/v1/services"
                && r.param("resourceVersion") == Some(list_rv.clone())
                && r.param("allowWatchBookmarks").as_deref() == Some("true")
        })
    })
    .await;
    kube_is_watching(&fake, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_applied_after_the_list_arrives_as_apply_and_a_deleted_one_as_delete() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    let mut watched = Watched::start(Api::<Service>::all(fake.client()), watcher::Config::default());
    assert_eq!(watched.init_keys().await, ["default/web"]);
    kube_is_watching(&fake, 1).await;

    let stored = fake.apply(service("default", "late", "late"));
    match watched.next().await {
        Event::Apply(svc) => {
            assert_eq!(key(&svc), "default/late");
            assert_eq!(svc.resource_version().as_deref(), stored["metadata"]["resourceVersion"].as_str());
            assert!(svc.uid().is_some(), "the fake sets a uid");
            assert!(svc.creation_timestamp().is_some(), "the fake sets a creationTimestamp");
        }
        other => panic!("expected Apply(default/late), got {}", describe(&other)),
    }

    let before = fake.get("v1", "Service", Some("default"), "web").expect("web is stored");
    let rv = fake.resource_version();
    let unchanged = fake.apply(service("default", "web", "web"));
    assert_eq!(unchanged, before, "re-applying identical content is a no-op");
    assert_eq!(fake.resource_version(), rv, "a no-op apply takes no resourceVersion");
    fake.apply(service("default", "web", "web-v2"));
    match watched.next().await {
        Event::Apply(svc) => {
            assert_eq!(key(&svc), "default/web");
            assert_eq!(svc.labels().get("app").map(String::as_str), Some("web-v2"));
            assert_eq!(svc.uid().as_deref(), before["metadata"]["uid"].as_str(), "a replace keeps the uid");
        }
        other => panic!("expected Apply(default/web), got {}", describe(&other)),
    }

    let last = fake.delete("v1", "Service", Some("default"), "web").expect("web existed");
    match watched.next().await {
        Event::Delete(svc) => {
            assert_eq!(key(&svc), "default/web");
            assert_eq!(svc.resource_version().as_deref(), last["metadata"]["resourceVersion"].as_str());
            assert_eq!(svc.labels().get("app").map(String::as_str), Some("web-v2"), "the last state");
        }
        other => panic!("expected Delete(default/web), got {}", describe(&other)),
    }
    assert!(fake.delete("v1", "Service", Some("default"), "web").is_none(), "deleting twice is a no-op");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespaced_api_lists_and_watches_only_its_own_namespace() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("a", "one", "one"));
    fake.apply(service("b", "two", "two"));
    let mut watched = Watched::start(Api::<Service>::namespaced(fake.client(), "a"), watcher::Config::default());

    assert_eq!(watched.init_keys().await, ["a/one"]);
    fake.apply(service("b", "three", "three"));
    fake.apply(service("a", "four", "four"));
    match watched.next().await {
        Event::Apply(svc) => assert_eq!(key(&svc), "a/four", "b/three is not in namespace a"),
        other => panic!("expected Apply(a/four), got {}", describe(&other)),
    }
    assert_eq!(fake.count_requests(Verb::List, "/api/v1/namespaces/a/services"), 1);
    assert_eq!(fake.count_requests(Verb::List, "/api/v1/services"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_scoped_custom_resource_from_yaml_is_listed_and_watched_as_a_dynamic_object() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    let stored = fake.apply_yaml(
        r#"
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata:
  name: "12345"
security-labels:
  k8s:app: web
---
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata:
  name: "23456"
security-labels:
  k8s:app: db
"#,
    );
    assert_eq!(stored.len(), 2);
    let gvk = GroupVersionKind::gvk("cilium.io", "v2", "CiliumIdentity");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "ciliumidentities");
    let mut watched =
        Watched::start(Api::<DynamicObject>::all_with(fake.client(), &resource), watcher::Config::default());

    let mut identities = watched.init_objects().await;
    identities.sort_by_key(|o| o.name_any());
    let names: Vec<String> = identities.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["12345", "23456"]);
    assert_eq!(identities[0].data["security-labels"]["k8s:app"], "web");
    assert_eq!(identities[0].namespace(), None);

    fake.delete("cilium.io/v2", "CiliumIdentity", None, "12345").expect("identity existed");
    match watched.next().await {
        Event::Delete(obj) => assert_eq!(obj.name_any(), "12345"),
        other => panic!("expected Delete(12345), got {}", describe(&other)),
    }
    assert_eq!(fake.count_requests(Verb::List, "/apis/cilium.io/v2/ciliumidentities"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_history_expires_and_watches_close_kube_relists_without_the_object_deleted_meanwhile() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    for (name, ip) in [("node-a", "192.168.1.11"), ("node-b", "192.168.1.12"), ("node-c", "192.168.1.13")] {
        fake.apply_object(&cilium_node(name, ip));
    }
    let mut watched = Watched::start(Api::<CiliumNode>::all(fake.client()), watcher::Config::default());
    assert_eq!(watched.init_keys().await, ["node-a", "node-b", "node-c"]);
    kube_is_watching(&fake, 1).await;
    let path = "/apis/cilium.io/v2/ciliumnodes";
    assert_eq!(fake.count_requests(Verb::List, path), 1);

    // A partition: kube must not see the delete or the create as live events.
    fake.pause_watches();
    fake.delete("cilium.io/v2", "CiliumNode", None, "node-b").expect("node-b existed");
    fake.apply_object(&cilium_node("node-d", "192.168.1.14"));
    fake.expire_history();
    fake.close_watches();
    fake.resume_watches();

    let relisted = watched.init_objects().await;
    let mut keys: Vec<String> = relisted.iter().map(key).collect();
    keys.sort();
    assert_eq!(keys, ["node-a", "node-c", "node-d"]);
    let node_d = relisted.iter().find(|n| n.name_any() == "node-d").expect("node-d relisted");
    assert_eq!(node_d.spec.addresses[0].ip, "192.168.1.14");
    assert!(
        watched.errors.iter().any(|e| e.contains("too old resource version") && e.contains("Expired")),
        "kube reported the 410: {:?}",
        watched.errors
    );
    assert_eq!(fake.count_requests(Verb::List, path), 2, "a second LIST: {:#?}", fake.requests());
    kube_is_watching(&fake, 1).await;

    // Live events flow again after the relist.
    fake.apply_object(&cilium_node("node-e", "192.168.1.15"));
    match watched.next().await {
        Event::Apply(node) => assert_eq!(node.name_any(), "node-e"),
        other => panic!("expected Apply(node-e), got {}", describe(&other)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_pages_through_a_list_larger_than_its_page_size() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    for name in ["s1", "s2", "s3", "s4", "s5"] {
        fake.apply(service("default", name, name));
    }
    let mut watched = Watched::start(Api::<Service>::all(fake.client()), watcher::Config::default().page_size(2));

    assert_eq!(watched.init_keys().await, ["default/s1", "default/s2", "default/s3", "default/s4", "default/s5"]);
    let lists: Vec<_> = fake.requests().into_iter().filter(|r| r.verb == Verb::List).collect();
    assert_eq!(lists.len(), 3, "three pages: {lists:#?}");
    assert!(lists.iter().all(|r| r.param("limit").as_deref() == Some("2")));
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_pages_of_a_list_show_the_snapshot_of_the_first_page_until_it_expires() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    for name in ["a", "b", "c"] {
        fake.apply(service("default", name, name));
    }
    let api = Api::<Service>::all(fake.client());
    let first = api.list(&ListParams::default().limit(2)).await.expect("first page");
    let names: Vec<String> = first.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["a", "b"]);
    let token = first.metadata.continue_.clone().expect("a continue token");
    assert_eq!(first.metadata.remaining_item_count, Some(1));

    fake.delete("v1", "Service", Some("default"), "c");
    fake.apply(service("default", "d", "d"));
    let second = api.list(&ListParams::default().limit(2).continue_token(&token)).await.expect("second page");
    let names: Vec<String> = second.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["c"], "the snapshot of the first page, not the current state");
    assert_eq!(second.metadata.resource_version, first.metadata.resource_version);
    assert_eq!(second.metadata.continue_, None);

    let fresh = api.list(&ListParams::default()).await.expect("fresh list");
    let names: Vec<String> = fresh.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["a", "b", "d"]);

    fake.expire_history();
    match api.list(&ListParams::default().limit(2).continue_token(&token)).await {
        Err(kube::Error::Api(status)) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => panic!("expected 410 Expired for an expired continue token, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_gets_bookmarks_while_idle_and_ends_at_its_timeout() {
    init_tracing();
    let options = FakeOptions { bookmark_interval: Duration::from_millis(200), ..FakeOptions::default() };
    let fake = FakeApiServer::start_with(options).await;
    fake.apply(service("default", "web", "web"));
    let from = fake.resource_version().to_string();
    let api = Api::<Service>::all(fake.client());
    let started = tokio::time::Instant::now();
    let mut stream = api.watch(&WatchParams::default().timeout(1), &from).await.expect("watch").boxed();
    let late = fake.apply(service("default", "late", "late"));

    let events: Vec<_> = tokio::time::timeout(WAIT, async {
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            events.push(event.expect("a well-formed event"));
        }
        events
    })
    .await
    .expect("the watch ends within its timeout");

    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5), "ended after {elapsed:?}");
    match &events[0] {
        WatchEvent::Added(svc) => assert_eq!(svc.name_any(), "late"),
        other => panic!("expected ADDED late first, got {other:?}"),
    }
    let bookmarks: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Bookmark(b) => Some(b.metadata.resource_version.clone()),
            _ => None,
        })
        .collect();
    assert!(bookmarks.len() >= 2, "bookmarks every 200 ms over 1 s: {events:?}");
    assert!(bookmarks.iter().all(|rv| Some(rv.as_str()) == late["metadata"]["resourceVersion"].as_str()));
    kube_is_watching(&fake, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_resource_version_gets_one_410_expired_error_and_ends() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    let old = fake.resource_version().to_string();
    let compacted = fake.expire_history();
    let api = Api::<Service>::all(fake.client());

    let mut stream = api.watch(&WatchParams::default(), &old).await.expect("watch").boxed();
    let events: Vec<_> = tokio::time::timeout(WAIT, async {
        let mut events = Vec::new();
        while let Some(event) = stream.next().await {
            events.push(event.expect("a well-formed event"));
        }
        events
    })
    .await
    .expect("the stream ends after the error");
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        WatchEvent::Error(status) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert_eq!(status.message, format!("too old resource version: {old} ({compacted})"));
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }

    // From the compaction point itself, a watch works.
    let mut stream = api.watch(&WatchParams::default(), &compacted.to_string()).await.expect("watch").boxed();
    fake.apply(service("default", "after", "after"));
    let event = tokio::time::timeout(WAIT, stream.next()).await.expect("an event in time").expect("stream open");
    match event.expect("a well-formed event") {
        WatchEvent::Added(svc) => assert_eq!(svc.name_any(), "after"),
        other => panic!("expected ADDED after, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_failures_answer_with_the_requested_status_and_kube_retries_503_by_itself() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    let api = Api::<Service>::all(fake.client());

    fake.fail_next(1, 500);
    match api.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!((status.code, status.reason.as_str()), (500, "InternalError")),
        other => panic!("expected a 500, got {other:?}"),
    }
    assert_eq!(api.list(&ListParams::default()).await.expect("the next list succeeds").items.len(), 1);

    fake.clear_requests();
    fake.fail_next(2, 503);
    let list = tokio::time::timeout(WAIT, api.list(&ListParams::default())).await.expect("answered in time");
    assert_eq!(list.expect("kube retried past two 503s").items.len(), 1);
    assert_eq!(fake.count_requests(Verb::List, "/api/v1/services"), 3, "{:#?}", fake.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn label_selectors_filter_lists_and_turn_label_changes_into_apply_and_delete() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "x", "web"));
    fake.apply(service("default", "y", "db"));
    let config = watcher::Config::default().labels("app=web");
    let mut watched = Watched::start(Api::<Service>::all(fake.client()), config);
    assert_eq!(watched.init_keys().await, ["default/x"]);
    kube_is_watching(&fake, 1).await;

    fake.apply(service("default", "y", "web"));
    match watched.next().await {
        Event::Apply(svc) => assert_eq!(key(&svc), "default/y", "y now matches"),
        other => panic!("expected Apply(default/y), got {}", describe(&other)),
    }
    fake.apply(service("default", "x", "db"));
    match watched.next().await {
        Event::Delete(svc) => assert_eq!(key(&svc), "default/x", "x no longer matches"),
        other => panic!("expected Delete(default/x), got {}", describe(&other)),
    }

    let api = Api::<Service>::all(fake.client());
    let by_set = api.list(&ListParams::default().labels("app in (db, cache)")).await.expect("list");
    assert_eq!(by_set.items.iter().map(key).collect::<Vec<_>>(), ["default/x"]);
    let by_field = api.list(&ListParams::default().fields("metadata.name=y")).await.expect("list");
    assert_eq!(by_field.items.iter().map(key).collect::<Vec<_>>(), ["default/y"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_server_ends_its_open_watches_promptly() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    let mut watched = Watched::start(Api::<Service>::all(fake.client()), watcher::Config::default());
    assert_eq!(watched.init_keys().await, ["default/web"]);
    kube_is_watching(&fake, 1).await;

    tokio::time::timeout(WAIT, fake.stop()).await.expect("stop is bounded");
    kube_is_watching(&fake, 0).await;
    assert!(tokio::net::TcpStream::connect(fake.addr()).await.is_err(), "the port no longer accepts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_objects_are_read_by_name_and_missing_ones_are_404() {
    init_tracing();
    let fake = FakeApiServer::start().await;
    fake.apply(service("default", "web", "web"));
    fake.apply_object(&cilium_node("node-a", "192.168.1.11"));

    let svc = Api::<Service>::namespaced(fake.client(), "default").get("web").await.expect("get web");
    assert_eq!(key(&svc), "default/web");
    let node = Api::<CiliumNode>::all(fake.client()).get("node-a").await.expect("get node-a");
    assert_eq!(node.spec, cilium_node("node-a", "192.168.1.11").spec);
    match Api::<Service>::namespaced(fake.client(), "other").get("web").await {
        Err(kube::Error::Api(status)) => assert_eq!((status.code, status.reason.as_str()), (404, "NotFound")),
        other => panic!("expected a 404, got {other:?}"),
    }
    assert_eq!(fake.count_requests(Verb::Get, "/api/v1/namespaces/default/services/web"), 1);
    assert_eq!(fake.count_requests(Verb::Get, "/apis/cilium.io/v2/ciliumnodes/node-a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_that_falls_behind_the_history_limit_gets_410_expired() {
    init_tracing();
    let fake = FakeApiServer::start_with(FakeOptions { history_limit: 3, ..FakeOptions::default() }).await;
    let api = Api::<Service>::all(fake.client());
    let mut stream = api.watch(&WatchParams::default(), "0").await.expect("watch").boxed();
    kube_is_watching(&fake, 1).await;

    fake.pause_watches();
    for name in ["s1", "s2", "s3", "s4", "s5"] {
        fake.apply(service("default", name, name));
    }
    fake.resume_watches();

    let event = tokio::time::timeout(WAIT, stream.next()).await.expect("an event in time").expect("stream open");
    match event.expect("a well-formed event") {
        WatchEvent::Error(status) => assert_eq!((status.code, status.reason.as_str()), (410, "Expired")),
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    let end = tokio::time::timeout(WAIT, stream.next()).await.expect("the stream ends in time");
    assert!(end.is_none(), "the stream ends after the error");
}
