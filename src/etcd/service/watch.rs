//! The Watch service: one bidirectional stream carries many watchers, each served from the
//! store's history at its own pace.
//!
//! A stream's task *pulls* events: it reads the history from its slowest watcher's next
//! revision, hands each watcher what matches, and reads again only once the client has taken
//! what was queued. Writers never wait for a watcher; a watcher that falls behind a
//! compaction is cancelled with etcd's compacted error (and its `compact_revision`), which
//! makes clients relist. Nothing is dropped silently.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::caller;
use crate::etcd::Error;
use crate::etcd::metrics::WatchGauges;
use crate::etcd::pb::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse, watch_create_request::FilterType,
    watch_request::RequestUnion, watch_server::Watch,
};
use crate::etcd::pb::mvccpb::{Event, event::EventType};
use crate::etcd::store::{KeyRange, Store};

/// Responses handed to the transport ahead of the client reading them; the session's outbox
/// holds the rest.
const OUTBOUND_BUFFER: usize = 16;

/// Bytes of responses a session queues for a client that is not reading them. Past it, the
/// session stops reading the client's requests too, so HTTP/2 flow control holds the client
/// back: a client sending watch requests without reading the answers cannot make the server
/// queue them without bound. Event replies are read from the history only into an empty
/// outbox, so they never pile up either.
const OUTBOX_BUDGET_BYTES: usize = 1 << 20;

/// The watch ID etcd puts on responses that belong to no single watcher (progress).
const NO_WATCH_ID: i64 = -1;

#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// etcd's `--experimental-watch-progress-notify-interval` (default 10 minutes).
    pub progress_notify_interval: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { progress_notify_interval: Duration::from_secs(600) }
    }
}

pub struct WatchService {
    store: Arc<Store>,
    config: WatchConfig,
    gauges: Arc<WatchGauges>,
    shutdown: CancellationToken,
}

impl WatchService {
    pub fn new(store: Arc<Store>, config: WatchConfig, gauges: Arc<WatchGauges>, shutdown: CancellationToken) -> Self {
        Self { store, config, gauges, shutdown }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ReceiverStream<Result<WatchResponse, Status>>;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let user = caller(&request).map(str::to_owned);
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let session =
            Session::new(Arc::clone(&self.store), user.clone(), self.config.clone(), Arc::clone(&self.gauges));
        let span = tracing::debug_span!("watch_stream", user = user.as_deref().unwrap_or(""), peer = ?peer);
        tokio::spawn(session.run(request.into_inner(), tx, self.shutdown.child_token()).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Watcher {
    key: bytes::Bytes,
    range_end: bytes::Bytes,
    /// The first revision this watcher has not been sent yet.
    next_revision: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    fragment: bool,
}

impl Watcher {
    /// Whether this watcher is to be sent the change `kv` (of type `r#type`).
    fn wants(&self, key: &[u8], mod_revision: i64, r#type: EventType) -> bool {
        mod_revision >= self.next_revision
            && !match r#type {
                EventType::Put => self.no_put,
                EventType::Delete => self.no_delete,
            }
            && KeyRange::new(&self.key, &self.range_end).contains(key)
    }

    fn wants_event(&self, event: &Event) -> bool {
        let r#type = EventType::try_from(event.r#type).unwrap_or(EventType::Put);
        event.kv.as_ref().is_some_and(|kv| self.wants(&kv.key, kv.mod_revision, r#type))
    }
}

struct Session {
    store: Arc<Store>,
    gauges: Arc<WatchGauges>,
    user: Option<String>,
    config: WatchConfig,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    /// The store's revision as last published.
    current: i64,
    outbox: VecDeque<WatchResponse>,
    /// Encoded bytes of what `outbox` holds.
    outbox_bytes: usize,
    progress_requested: bool,
}

impl Session {
    fn new(store: Arc<Store>, user: Option<String>, config: WatchConfig, gauges: Arc<WatchGauges>) -> Self {
        let current = store.revision();
        gauges.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            store,
            gauges,
            user,
            config,
            watchers: BTreeMap::new(),
            next_id: 0,
            current,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            progress_requested: false,
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<WatchRequest>,
        tx: mpsc::Sender<Result<WatchResponse, Status>>,
        shutdown: CancellationToken,
    ) {
        let mut revisions = self.store.subscribe();
        self.current = *revisions.borrow_and_update();
        let mut progress = tokio::time::interval(self.config.progress_notify_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.reset();
        let mut held_back = false;
        loop {
            if self.outbox.is_empty() {
                self.catch_up();
            }
            let full = self.outbox_bytes >= OUTBOX_BUDGET_BYTES;
            if full && !held_back {
                self.gauges.backpressured.fetch_add(1, Ordering::Relaxed);
            }
            held_back = full;
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                message = inbound.message(), if self.outbox_bytes < OUTBOX_BUDGET_BYTES => match message {
                    Ok(Some(request)) => self.handle(request),
                    // The client closed its side (or the connection broke): etcd ends the
                    // stream then too.
                    Ok(None) | Err(_) => break,
                },
                permit = tx.reserve(), if !self.outbox.is_empty() => match permit {
                    Ok(permit) => {
                        if let Some(response) = self.outbox.pop_front() {
                            self.outbox_bytes -= response.encoded_len();
                            permit.send(Ok(response));
                        }
                    }
                    Err(_) => break,
                },
                changed = revisions.changed() => match changed {
                    Ok(()) => self.current = *revisions.borrow_and_update(),
                    Err(_) => break,
                },
                _ = progress.tick() => self.notify_progress(),
            }
        }
        if shutdown.is_cancelled() {
            // etcd closes watch streams with Unavailable on shutdown; clients reconnect.
            let _ = tx.try_send(Err(Error::Stopped.into()));
        }
    }

    fn queue(&mut self, response: WatchResponse) {
        self.outbox_bytes += response.encoded_len();
        self.outbox.push_back(response);
    }

    fn handle(&mut self, request: WatchRequest) {
        match request.request_union {
            Some(RequestUnion::CreateRequest(create)) => self.create(create),
            Some(RequestUnion::CancelRequest(WatchCancelRequest { watch_id })) => self.cancel(watch_id),
            Some(RequestUnion::ProgressRequest(_)) => self.progress_requested = true,
            None => {}
        }
    }

    /// etcd confirms the cancellation of a watcher it has, and ignores unknown IDs.
    fn cancel(&mut self, watch_id: i64) {
        if self.watchers.remove(&watch_id).is_none() {
            return;
        }
        self.gauges.watchers.fetch_sub(1, Ordering::Relaxed);
        self.queue(WatchResponse {
            header: Some(self.store.header_at(self.current)),
            watch_id,
            canceled: true,
            ..WatchResponse::default()
        });
    }

    fn create(&mut self, create: WatchCreateRequest) {
        let header = Some(self.store.header_at(self.current));
        let refused = |watch_id: i64, reason: String| WatchResponse {
            header,
            watch_id,
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..WatchResponse::default()
        };
        let allowed = self.store.auth().read().check_read(self.user.as_deref(), &create.key, &create.range_end);
        if let Err(error) = allowed {
            // etcd reports the whole gRPC status text as the cancel reason.
            let status = tonic::Status::from(error);
            let reason = format!("rpc error: code = {:?} desc = {}", status.code(), status.message());
            self.queue(refused(create.watch_id, reason));
            return;
        }
        // etcd's `ErrEmptyWatcherRange`: a reversed range could never fire.
        if !create.range_end.is_empty() && create.range_end.as_ref() != b"\0" && create.key >= create.range_end {
            self.queue(refused(NO_WATCH_ID, "mvcc: watcher range is empty".into()));
            return;
        }
        let id = if create.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watchers.contains_key(&create.watch_id) {
            self.queue(refused(NO_WATCH_ID, "mvcc: duplicate watch ID provided on the WatchStream".into()));
            return;
        } else {
            create.watch_id
        };
        let next_revision = if create.start_revision > 0 { create.start_revision } else { self.current + 1 };
        let filters = |f: FilterType| create.filters.contains(&(f as i32));
        self.watchers.insert(
            id,
            Watcher {
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                key: create.key,
                range_end: create.range_end,
                next_revision,
                prev_kv: create.prev_kv,
                progress_notify: create.progress_notify,
                fragment: create.fragment,
            },
        );
        self.gauges.watchers.fetch_add(1, Ordering::Relaxed);
        self.queue(WatchResponse { header, watch_id: id, created: true, ..WatchResponse::default() });
    }

    /// Reads the history from the slowest watcher that is behind and queues what each
    /// watcher should get. Bounded per call; the loop calls again once the queue is drained.
    fn catch_up(&mut self) {
        let current = self.current;
        let Some(from) = self.watchers.values().map(|w| w.next_revision).filter(|&r| r <= current).min() else {
            self.answer_progress_request();
            return;
        };
        // Only the events some watcher wants are built, and `prev_kv` only looked up when one
        // of them asked for it.
        let prev_kv = self.watchers.values().any(|w| w.prev_kv && w.next_revision <= current);
        let watchers = &self.watchers;
        let wanted = |key: &[u8], mod_revision: i64, r#type: EventType| {
            watchers.values().any(|w| w.wants(key, mod_revision, r#type))
        };
        let read = match self.store.history_from(from, prev_kv, wanted) {
            Ok(read) => read,
            Err(compact_revision) => return self.cancel_compacted(compact_revision),
        };
        let upto = read.upto.unwrap_or(current);
        let header = self.store.header_at(upto);
        let max_bytes = self.store.limits().max_request_bytes;
        for (&id, watcher) in self.watchers.iter_mut() {
            if watcher.next_revision > current {
                continue;
            }
            let events = matching_events(watcher, &read.events);
            watcher.next_revision = watcher.next_revision.max(upto + 1);
            if events.is_empty() {
                continue;
            }
            let response = WatchResponse { header: Some(header), watch_id: id, events, ..WatchResponse::default() };
            let pieces = if watcher.fragment { fragments(response, max_bytes) } else { vec![response] };
            for piece in pieces {
                self.outbox_bytes += piece.encoded_len();
                self.outbox.push_back(piece);
            }
        }
        if upto >= current {
            self.answer_progress_request();
        }
    }

    fn cancel_compacted(&mut self, compact_revision: i64) {
        let header = self.store.header_at(self.current);
        let lost: Vec<i64> =
            self.watchers.iter().filter(|(_, w)| w.next_revision < compact_revision).map(|(&id, _)| id).collect();
        for watch_id in lost {
            self.watchers.remove(&watch_id);
            self.gauges.watchers.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(watch_id, compact_revision, "watcher fell behind a compaction");
            self.queue(WatchResponse {
                header: Some(header),
                watch_id,
                canceled: true,
                compact_revision,
                ..WatchResponse::default()
            });
        }
    }

    /// A progress response promises that every later event has a higher revision, so it is
    /// only sent once every watcher of the stream has been given everything up to now.
    fn answer_progress_request(&mut self) {
        if self.progress_requested && self.watchers.values().all(|w| w.next_revision > self.current) {
            self.progress_requested = false;
            self.queue(WatchResponse {
                header: Some(self.store.header_at(self.current)),
                watch_id: NO_WATCH_ID,
                ..WatchResponse::default()
            });
        }
    }

    fn notify_progress(&mut self) {
        let header = self.store.header_at(self.current);
        let due: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.next_revision > self.current)
            .map(|(&id, _)| id)
            .collect();
        for watch_id in due {
            self.queue(WatchResponse { header: Some(header), watch_id, ..WatchResponse::default() });
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gauges.streams.fetch_sub(1, Ordering::Relaxed);
        self.gauges.watchers.fetch_sub(self.watchers.len() as i64, Ordering::Relaxed);
    }
}

fn matching_events(watcher: &Watcher, events: &[Event]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| watcher.wants_event(e))
        .map(|e| {
            let mut event = e.clone();
            if !watcher.prev_kv {
                event.prev_kv = None;
            }
            event
        })
        .collect()
}

/// etcd's `sendFragments`: a response over the request size limit is split into pieces of
/// at most that size (at least one event each), all but the last marked `fragment`.
fn fragments(response: WatchResponse, max_bytes: usize) -> Vec<WatchResponse> {
    if response.events.len() < 2 || response.encoded_len() < max_bytes {
        return vec![response];
    }
    let mut template = response;
    let events = std::mem::take(&mut template.events);
    template.fragment = true;
    let mut out = Vec::new();
    let mut piece = template.clone();
    let mut size = 0;
    for event in events {
        let len = event.encoded_len();
        if !piece.events.is_empty() && size + len > max_bytes {
            out.push(std::mem::replace(&mut piece, template.clone()));
            size = 0;
        }
        size += len;
        piece.events.push(event);
    }
    piece.fragment = false;
    out.push(piece);
    out
}
