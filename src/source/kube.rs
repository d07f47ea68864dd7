//! Objects from the Kubernetes API: one kube-runtime watcher per kind, decoded through
//! [`Guarded`] (a `DeserializeGuard` that decodes once) so that one malformed object never
//! stops a stream.

use std::fmt::Debug;

use futures::StreamExt;
use kube::api::{Api, ObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::SourceEvent;
use super::filter::ListFilter;
use super::guard::Guarded;
use crate::translate::model::{Kind, Object, ObjectKey};

fn object_key(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: meta.namespace.as_deref().map(Into::into),
        name: meta.name.as_deref().unwrap_or_default().into(),
    }
}

/// Starts one watcher per kind in `kinds`, all feeding `events`, each listing what `filter`
/// selects.
pub fn spawn(
    client: Client,
    kinds: &[Kind],
    filter: &ListFilter,
    events: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    for &kind in kinds {
        let (client, events, shutdown) = (client.clone(), events.clone(), shutdown.child_token());
        let span = tracing::info_span!("watch", ?kind);
        let config = match filter.label_selector(kind) {
            Some(selector) => watcher::Config::default().labels(&selector),
            None => watcher::Config::default(),
        };
        match kind {
            Kind::CiliumNode => {
                tracker.spawn(watch(client, kind, Object::CiliumNode, config, events, shutdown).instrument(span))
            }
            Kind::CiliumIdentity => {
                tracker.spawn(watch(client, kind, Object::CiliumIdentity, config, events, shutdown).instrument(span))
            }
            Kind::CiliumEndpoint => {
                tracker.spawn(watch(client, kind, Object::CiliumEndpoint, config, events, shutdown).instrument(span))
            }
            Kind::CiliumEndpointSlice => tracker
                .spawn(watch(client, kind, Object::CiliumEndpointSlice, config, events, shutdown).instrument(span)),
            Kind::Service => {
                tracker.spawn(watch(client, kind, Object::Service, config, events, shutdown).instrument(span))
            }
            Kind::EndpointSlice => {
                tracker.spawn(watch(client, kind, Object::EndpointSlice, config, events, shutdown).instrument(span))
            }
            Kind::ServiceExport => tracker.spawn(watch_service_exports(client, events, shutdown).instrument(span)),
            Kind::Namespace => {
                tracker.spawn(watch(client, kind, Object::Namespace, config, events, shutdown).instrument(span))
            }
        };
    }
}

/// How long to wait before asking again which MCS-API version the cluster serves.
const MCS_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// ServiceExports in the MCS-API version the cluster serves: `v1beta1` (Cilium 1.20's CRDs)
/// when it is there, else `v1alpha1` (the CRDs of Cilium 1.17 to 1.19, whose apiservers read
/// it), waiting for either to appear, as Cilium waits for its CRDs. When the version watched
/// stops being served (a CRD upgrade that drops it), the version is chosen again.
///
/// Cilium 1.20 alone refuses `v1alpha1` and reports degraded until the CRD is upgraded; one
/// binary for 1.16 to 1.20 cannot tell a 1.19 cluster from a 1.20 one mid-upgrade, and the
/// objects are the same in both versions, so both are read.
async fn watch_service_exports(client: Client, events: mpsc::Sender<SourceEvent>, shutdown: CancellationToken) {
    use crate::k8s::{ServiceExport, ServiceExportV1Alpha1};
    let kind = Kind::ServiceExport;
    while !shutdown.is_cancelled() {
        if served(&Api::<ServiceExport>::all(client.clone())).await {
            tracing::info!(version = "v1beta1", "watching MCS-API ServiceExports");
            let config = watcher::Config::default();
            run_watch(client.clone(), kind, Object::ServiceExport, config, events.clone(), shutdown.clone(), true)
                .await;
            continue;
        }
        if served(&Api::<ServiceExportV1Alpha1>::all(client.clone())).await {
            tracing::info!(version = "v1alpha1", "watching MCS-API ServiceExports");
            let wrap = |old: ServiceExportV1Alpha1| Object::ServiceExport(ServiceExport::from(old));
            let config = watcher::Config::default();
            run_watch(client.clone(), kind, wrap, config, events.clone(), shutdown.clone(), true).await;
            continue;
        }
        tracing::warn!("the MCS-API ServiceExport CRD is not served (v1beta1 or v1alpha1); waiting for it");
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(MCS_PROBE_INTERVAL) => {}
        }
    }
}

/// Whether the API serves this resource: a one-item list answers anything but 404.
async fn served<K>(api: &Api<K>) -> bool
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.list_metadata(&kube::api::ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(status)) if status.code == 404 => false,
        // Anything else (a timeout, a 5xx) is not an answer about the version: the watcher's
        // own backoff deals with it once a version is chosen.
        Err(error) => {
            tracing::debug!(error = %crate::error_chain(&error), "probing the MCS-API version");
            false
        }
    }
}

/// Runs one kind's watcher until `shutdown`; errors are logged and retried with kube's
/// default backoff (0.8 s doubling to 30 s, with jitter).
async fn watch<K>(
    client: Client,
    kind: Kind,
    wrap: fn(K) -> Object,
    config: watcher::Config,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    run_watch(client, kind, wrap, config, events, shutdown, false).await
}

fn is_not_served(error: &watcher::Error) -> bool {
    let api = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code,
        watcher::Error::WatchError(status) => status.code,
        _ => return false,
    };
    api == 404
}

/// [`watch`]; with `end_when_gone`, it returns when the API answers 404 (the resource is no
/// longer served) instead of retrying.
async fn run_watch<K>(
    client: Client,
    kind: Kind,
    wrap: fn(K) -> Object,
    config: watcher::Config,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
    end_when_gone: bool,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api: Api<Guarded<K>> = Api::all(client);
    let stream = watcher(api, config).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(event)) => event,
            Some(Err(error)) if end_when_gone && is_not_served(&error) => {
                tracing::info!(error = %crate::error_chain(&error), "the resource is no longer served");
                return;
            }
            Some(Err(error)) => {
                tracing::warn!(error = %crate::error_chain(&error), "watch failed; retrying with backoff");
                continue;
            }
            None => return,
        };
        // An object that does not decode becomes `Invalid`, whatever the event carrying it.
        let decoded = |guard: Guarded<K>, event: fn(Object) -> SourceEvent| match guard.0 {
            Ok(object) => event(wrap(object)),
            Err(invalid) => SourceEvent::Invalid { key: object_key(kind, &invalid.metadata), reason: invalid.error },
        };
        let event = match event {
            watcher::Event::Init => SourceEvent::Init(kind),
            watcher::Event::InitDone => SourceEvent::InitDone(kind),
            watcher::Event::InitApply(guard) => decoded(guard, SourceEvent::InitApply),
            watcher::Event::Apply(guard) => decoded(guard, SourceEvent::Apply),
            watcher::Event::Delete(guard) => SourceEvent::Delete(object_key(kind, guard.meta())),
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}
