//! The Watch service: one bidirectional stream carries many watchers, each served from the
//! store's history at its own pace.
//!
//! A stream's task *pulls* events: it reads the history from its slowest watcher's next
//! revision, hands each watcher what matches, and reads again only once the client has taken
//! what was queued. Writers never wait for a watcher; a watcher that falls behind a
//! compaction is cancelled with etcd's compacted error (and its `compact_revision`), which
//! makes clients relist. Nothing is dropped silently.
//!
//! What a stream queues towards its client is bounded in bytes ([`outbox`]): a client that
//! stops reading makes its stream stop reading requests and history, as etcd's stream stops
//! at HTTP/2's window, instead of queueing without bound.

mod outbox;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prost::Message;
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

pub use outbox::{IN_FLIGHT_BUDGET, OUTBOX_BUDGET};
use outbox::{Outbox, Responses, Sender};

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
    type WatchStream = Responses;

    async fn watch(&self, request: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let user = caller(&request).map(str::to_owned);
        let peer = request.remote_addr();
        let (tx, rx) = outbox::channel(Arc::clone(&self.gauges));
        let session =
            Session::new(Arc::clone(&self.store), user.clone(), self.config.clone(), Arc::clone(&self.gauges));
        let span = tracing::debug_span!("watch_stream", user = user.as_deref().unwrap_or(""), peer = ?peer);
        tokio::spawn(session.run(request.into_inner(), tx, self.shutdown.child_token()).instrument(span));
        Ok(Response::new(rx))
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
    outbox: Outbox,
    /// Where the last history read that hit the outbox budget stopped, so that the next one
    /// starts with the watchers after it: every watcher gets its turn.
    resume_after: Option<i64>,
    /// Whether the stream is not reading requests because its outbox is full (counted once
    /// per episode).
    held_back: bool,
    /// Whether some watcher may be behind `current`: set by a new revision or a watcher that
    /// starts in the past, cleared by a catch-up that finds none. Spares a scan of every
    /// watcher on every wake-up (each create request) of a stream holding thousands.
    behind: bool,
    /// This stream's watchers counted in [`WatchGauges::slow_watchers`].
    slow: i64,
    progress_requested: bool,
}

impl Session {
    fn new(store: Arc<Store>, user: Option<String>, config: WatchConfig, gauges: Arc<WatchGauges>) -> Self {
        let current = store.revision();
        gauges.streams.fetch_add(1, Ordering::Relaxed);
        Self {
            store,
            user,
            config,
            watchers: BTreeMap::new(),
            next_id: 0,
            current,
            outbox: Outbox::new(Arc::clone(&gauges)),
            gauges,
            resume_after: None,
            held_back: false,
            behind: false,
            slow: 0,
            progress_requested: false,
        }
    }

    async fn run(mut self, mut inbound: Streaming<WatchRequest>, tx: Sender, shutdown: CancellationToken) {
        let mut revisions = self.store.subscribe();
        self.current = *revisions.borrow_and_update();
        let mut progress = tokio::time::interval(self.config.progress_notify_interval);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        progress.reset();
        loop {
            if self.outbox.is_empty() {
                self.catch_up();
            }
            let reading = self.note_backpressure();
            let next_cost = self.outbox.front_cost();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                // Requests are not read while held back, so a client that left is noticed here.
                () = tx.closed() => break,
                slot = tx.reserve(next_cost.unwrap_or(0)), if next_cost.is_some() => match slot {
                    Some(slot) => {
                        if let Some((response, cost)) = self.outbox.pop() {
                            slot.send(response, cost);
                        }
                    }
                    None => break,
                },
                // Not polled while the outbox is full: the request stays in HTTP/2's window,
                // which the client then cannot refill.
                message = inbound.message(), if reading => match message {
                    Ok(Some(request)) => self.handle(request),
                    // The client closed its side (or the connection broke): etcd ends the
                    // stream then too.
                    Ok(None) => break,
                    // A request that could not be read ends the stream with the reason, as
                    // gRPC does (a silent OK would read as a clean close).
                    Err(status) => {
                        tx.try_end(super::decode_error_as_grpc_says(status));
                        break;
                    }
                },
                changed = revisions.changed() => match changed {
                    Ok(()) => {
                        self.current = *revisions.borrow_and_update();
                        self.behind = true;
                    }
                    Err(_) => break,
                },
                _ = progress.tick() => self.notify_progress(),
            }
        }
        if shutdown.is_cancelled() {
            // etcd closes watch streams with Unavailable on shutdown; clients reconnect.
            tx.try_end(Error::Stopped.into());
        }
    }

    /// Whether requests may be read; counts each time the outbox budget stops reading.
    fn note_backpressure(&mut self) -> bool {
        let full = self.outbox.is_full();
        if full && !self.held_back {
            self.gauges.backpressured.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(bytes = self.outbox.bytes(), "client not reading: watch stream holds back");
        }
        self.held_back = full;
        !full
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
        self.outbox.push(WatchResponse {
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
        if let Err(error) = self.store.auth().read().check_read(self.user.as_deref(), &create.key, &create.range_end) {
            // etcd reports the whole gRPC status text as the cancel reason.
            let status = tonic::Status::from(error);
            let reason = format!("rpc error: code = {:?} desc = {}", status.code(), status.message());
            self.outbox.push(refused(create.watch_id, reason));
            return;
        }
        // etcd's mvcc refuses a range that holds no key (start at or past its end) rather
        // than create a watcher that can never fire; `\0` as the end means "from the key on".
        let key: &[u8] = if create.key.is_empty() { b"\0" } else { &create.key };
        if !create.range_end.is_empty() && create.range_end.as_ref() != b"\0" && key >= create.range_end.as_ref() {
            self.outbox.push(refused(NO_WATCH_ID, "mvcc: watcher range is empty".into()));
            return;
        }
        let id = if create.watch_id == 0 {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        } else if self.watchers.contains_key(&create.watch_id) {
            self.outbox.push(refused(NO_WATCH_ID, "mvcc: duplicate watch ID provided on the WatchStream".into()));
            return;
        } else {
            create.watch_id
        };
        let next_revision = if create.start_revision > 0 { create.start_revision } else { self.current + 1 };
        self.behind |= next_revision <= self.current;
        let filters = |f: FilterType| create.filters.contains(&(f as i32));
        self.watchers.insert(
            id,
            Watcher {
                no_put: filters(FilterType::Noput),
                no_delete: filters(FilterType::Nodelete),
                // Copied: the request's bytes are a slice of the transport's receive buffer,
                // which a long-lived watcher would otherwise keep whole.
                key: bytes::Bytes::copy_from_slice(&create.key),
                range_end: bytes::Bytes::copy_from_slice(&create.range_end),
                next_revision,
                prev_kv: create.prev_kv,
                progress_notify: create.progress_notify,
                fragment: create.fragment,
            },
        );
        self.gauges.watchers.fetch_add(1, Ordering::Relaxed);
        self.outbox.push(WatchResponse { header, watch_id: id, created: true, ..WatchResponse::default() });
    }

    /// Reads the history from the slowest watcher that is behind and queues what each
    /// watcher should get. Bounded per call: whole reads of the history, and watchers served
    /// in turn only until the outbox is full (the rest keep their place and go first next
    /// time); the loop calls again once the queue is drained.
    fn catch_up(&mut self) {
        let current = self.current;
        let from = self.behind.then(|| self.watchers.values().map(|w| w.next_revision).filter(|&r| r <= current).min());
        let Some(from) = from.flatten() else {
            self.behind = false;
            self.set_slow(0);
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
        let order: Vec<i64> = match self.resume_after.take() {
            Some(after) => {
                self.watchers.range(after + 1..).chain(self.watchers.range(..=after)).map(|(&id, _)| id).collect()
            }
            None => self.watchers.keys().copied().collect(),
        };
        let mut last_served = None;
        for id in order {
            if self.outbox.is_full() {
                // Watchers not served yet keep their `next_revision`: the next read starts
                // from the slowest of them, so nothing is skipped.
                self.resume_after = last_served;
                self.count_slow();
                return;
            }
            let Some(watcher) = self.watchers.get_mut(&id) else { continue };
            if watcher.next_revision > current {
                continue;
            }
            let events = matching_events(watcher, &read.events);
            watcher.next_revision = watcher.next_revision.max(upto + 1);
            last_served = Some(id);
            if events.is_empty() {
                continue;
            }
            let response = WatchResponse { header: Some(header), watch_id: id, events, ..WatchResponse::default() };
            if watcher.fragment {
                self.outbox.extend(fragments(response, max_bytes));
            } else {
                self.outbox.push(response);
            }
        }
        if upto >= current {
            self.set_slow(0);
            self.answer_progress_request();
        } else {
            self.count_slow();
        }
    }

    /// etcd's slow watchers are those it must serve from the history rather than as events
    /// happen: here, those still behind once a history read has served what it could.
    fn count_slow(&mut self) {
        let current = self.current;
        let slow = self.watchers.values().filter(|w| w.next_revision <= current).count();
        self.set_slow(slow as i64);
    }

    fn set_slow(&mut self, slow: i64) {
        if slow != self.slow {
            self.gauges.slow_watchers.fetch_add(slow - self.slow, Ordering::Relaxed);
            self.slow = slow;
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
            self.outbox.push(WatchResponse {
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
        if self.progress_requested && (!self.behind || self.watchers.values().all(|w| w.next_revision > self.current)) {
            self.progress_requested = false;
            self.outbox.push(WatchResponse {
                header: Some(self.store.header_at(self.current)),
                watch_id: NO_WATCH_ID,
                ..WatchResponse::default()
            });
        }
    }

    /// etcd skips a progress notification a watcher's full channel cannot take (the next
    /// tick tries again); a full outbox is skipped the same way.
    fn notify_progress(&mut self) {
        if self.outbox.is_full() {
            return;
        }
        let header = self.store.header_at(self.current);
        for (&watch_id, watcher) in &self.watchers {
            if watcher.progress_notify && watcher.next_revision > self.current {
                self.outbox.push(WatchResponse { header: Some(header), watch_id, ..WatchResponse::default() });
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.gauges.streams.fetch_sub(1, Ordering::Relaxed);
        self.gauges.watchers.fetch_sub(self.watchers.len() as i64, Ordering::Relaxed);
        self.gauges.slow_watchers.fetch_sub(self.slow, Ordering::Relaxed);
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
