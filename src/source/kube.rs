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
use super::guard::Guarded;
use crate::translate::model::{Kind, Object, ObjectKey};

fn object_key(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    ObjectKey { kind, namespace: meta.namespace.clone(), name: meta.name.clone().unwrap_or_default() }
}

/// Starts one watcher per kind in `kinds`, all feeding `events`.
pub fn spawn(
    client: Client,
    kinds: &[Kind],
    events: mpsc::Sender<SourceEvent>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    for &kind in kinds {
        let (client, events, shutdown) = (client.clone(), events.clone(), shutdown.child_token());
        let span = tracing::info_span!("watch", ?kind);
        match kind {
            Kind::CiliumNode => {
                tracker.spawn(watch(client, kind, Object::CiliumNode, events, shutdown).instrument(span))
            }
            Kind::CiliumIdentity => {
                tracker.spawn(watch(client, kind, Object::CiliumIdentity, events, shutdown).instrument(span))
            }
            Kind::CiliumEndpoint => {
                tracker.spawn(watch(client, kind, Object::CiliumEndpoint, events, shutdown).instrument(span))
            }
            Kind::CiliumEndpointSlice => {
                tracker.spawn(watch(client, kind, Object::CiliumEndpointSlice, events, shutdown).instrument(span))
            }
            Kind::Service => tracker.spawn(watch(client, kind, Object::Service, events, shutdown).instrument(span)),
            Kind::EndpointSlice => {
                tracker.spawn(watch(client, kind, Object::EndpointSlice, events, shutdown).instrument(span))
            }
            Kind::ServiceExport => {
                tracker.spawn(watch(client, kind, Object::ServiceExport, events, shutdown).instrument(span))
            }
            Kind::Namespace => tracker.spawn(watch(client, kind, Object::Namespace, events, shutdown).instrument(span)),
        };
    }
}

/// Runs one kind's watcher until `shutdown`; errors are logged and retried with kube's
/// default backoff (0.8 s doubling to 30 s, with jitter).
async fn watch<K>(
    client: Client,
    kind: Kind,
    wrap: fn(K) -> Object,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api: Api<Guarded<K>> = Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            next = stream.next() => next,
        };
        let event = match next {
            Some(Ok(event)) => event,
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
