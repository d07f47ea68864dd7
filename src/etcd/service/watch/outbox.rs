//! A watch stream's queue of responses towards its client, bounded in bytes end to end.
//!
//! Two budgets, both per stream: the *outbox* (responses built but not yet handed to the
//! transport) and the *in-flight* bytes (handed to tonic's channel, not yet taken by the
//! HTTP/2 stream, which takes them only as the client's window allows). When the client stops
//! reading, the in-flight budget fills, then the outbox; a full outbox makes the session stop
//! reading the client's requests and the history, so HTTP/2 flow control pushes back on the
//! client and nothing grows. Nothing is dropped: a client that reads gets every event, in
//! order, only later.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::Status;

use crate::etcd::metrics::WatchGauges;
use crate::etcd::pb::etcdserverpb::WatchResponse;
use crate::etcd::pb::mvccpb::Event;

/// Bytes of responses a stream may have built and not yet handed on before it stops reading
/// its client's requests. Large enough for a few hundred ordinary event batches, small enough
/// that ten thousand stalled streams stay within a few GiB (etcd's own bound is HTTP/2's
/// window, about 2 MiB per stream).
pub const OUTBOX_BUDGET: usize = 256 << 10;

/// Bytes handed to the transport and not yet taken by it. A response larger than this still
/// goes, alone.
pub const IN_FLIGHT_BUDGET: usize = 256 << 10;

/// Responses in tonic's channel at once, whatever their size.
const CHANNEL_SLOTS: usize = 64;

/// What a response costs while queued: its structs and its encoding. Event values are mostly
/// shared with the keyspace, so this overestimates; that errs on the bounded side.
pub fn cost(response: &WatchResponse) -> usize {
    std::mem::size_of::<WatchResponse>()
        + response.events.len() * std::mem::size_of::<Event>()
        + response.cancel_reason.len()
        + response.encoded_len()
}

/// The responses a session has built, oldest first.
#[derive(Debug)]
pub struct Outbox {
    queue: VecDeque<(WatchResponse, usize)>,
    bytes: usize,
    gauges: Arc<WatchGauges>,
}

impl Outbox {
    pub fn new(gauges: Arc<WatchGauges>) -> Self {
        Self { queue: VecDeque::new(), bytes: 0, gauges }
    }

    pub fn push(&mut self, response: WatchResponse) {
        let cost = cost(&response);
        self.bytes += cost;
        self.gauges.queued_bytes.fetch_add(cost as i64, Ordering::Relaxed);
        self.queue.push_back((response, cost));
    }

    pub fn extend(&mut self, responses: impl IntoIterator<Item = WatchResponse>) {
        responses.into_iter().for_each(|r| self.push(r));
    }

    pub fn pop(&mut self) -> Option<(WatchResponse, usize)> {
        let (response, cost) = self.queue.pop_front()?;
        self.bytes -= cost;
        self.gauges.queued_bytes.fetch_sub(cost as i64, Ordering::Relaxed);
        Some((response, cost))
    }

    pub fn front_cost(&self) -> Option<usize> {
        self.queue.front().map(|&(_, cost)| cost)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the session should stop adding to it: no more requests read, no more history.
    pub fn is_full(&self) -> bool {
        self.bytes >= OUTBOX_BUDGET
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.gauges.queued_bytes.fetch_sub(self.bytes as i64, Ordering::Relaxed);
    }
}

/// A response on its way to tonic, holding its share of the in-flight budget until tonic
/// takes it.
#[derive(Debug)]
pub struct Sent {
    response: Result<WatchResponse, Status>,
    /// Dropped as tonic takes the response, which gives its bytes back.
    _charge: Option<Charge>,
}

#[derive(Debug)]
struct Charge {
    _permit: OwnedSemaphorePermit,
    bytes: usize,
    gauges: Arc<WatchGauges>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.gauges.queued_bytes.fetch_sub(self.bytes as i64, Ordering::Relaxed);
    }
}

/// The session's end of the way to tonic.
#[derive(Debug)]
pub struct Sender {
    tx: mpsc::Sender<Sent>,
    budget: Arc<Semaphore>,
    gauges: Arc<WatchGauges>,
}

/// A reserved place for one response of a known cost.
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Sent>,
    bytes: OwnedSemaphorePermit,
    gauges: &'a Arc<WatchGauges>,
}

impl Slot<'_> {
    pub fn send(self, response: WatchResponse, cost: usize) {
        self.gauges.queued_bytes.fetch_add(cost as i64, Ordering::Relaxed);
        let charge = Charge { _permit: self.bytes, bytes: cost, gauges: Arc::clone(self.gauges) };
        self.permit.send(Sent { response: Ok(response), _charge: Some(charge) });
    }
}

impl Sender {
    /// Waits for room for a response of `cost` bytes; `None` once the client is gone.
    /// Cancel-safe: dropping the future gives back whatever it had reserved.
    pub async fn reserve(&self, cost: usize) -> Option<Slot<'_>> {
        let share = cost.min(IN_FLIGHT_BUDGET) as u32;
        let bytes = Arc::clone(&self.budget).acquire_many_owned(share).await.ok()?;
        let permit = self.tx.reserve().await.ok()?;
        Some(Slot { permit, bytes, gauges: &self.gauges })
    }

    /// Resolves once tonic has dropped the response stream (the client reset the stream or
    /// left), even while the in-flight budget is full.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    /// Ends the stream with `status` if there is room for it; a client not reading misses it
    /// only because it is not reading.
    pub fn try_end(&self, status: Status) {
        let _ = self.tx.try_send(Sent { response: Err(status), _charge: None });
    }
}

/// The stream tonic sends from; each response gives its budget back as tonic takes it.
#[derive(Debug)]
pub struct Responses(mpsc::Receiver<Sent>);

impl Stream for Responses {
    type Item = Result<WatchResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|sent| sent.map(|sent| sent.response))
    }
}

pub fn channel(gauges: Arc<WatchGauges>) -> (Sender, Responses) {
    let (tx, rx) = mpsc::channel(CHANNEL_SLOTS);
    (Sender { tx, budget: Arc::new(Semaphore::new(IN_FLIGHT_BUDGET)), gauges }, Responses(rx))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    fn response(bytes: usize) -> WatchResponse {
        WatchResponse { cancel_reason: "x".repeat(bytes), ..WatchResponse::default() }
    }

    #[test]
    fn the_outbox_fills_at_its_budget_and_accounts_every_byte() {
        let gauges = Arc::new(WatchGauges::default());
        let mut outbox = Outbox::new(Arc::clone(&gauges));
        while !outbox.is_full() {
            outbox.push(response(1000));
        }
        assert!(outbox.bytes() < OUTBOX_BUDGET + 2 * 1000 + 200);
        assert_eq!(gauges.queued_bytes.load(Ordering::Relaxed), outbox.bytes() as i64);
        outbox.pop();
        assert!(!outbox.is_full());
        drop(outbox);
        assert_eq!(gauges.queued_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn in_flight_bytes_are_bounded_until_the_transport_takes_them() {
        let gauges = Arc::new(WatchGauges::default());
        let (sender, mut responses) = channel(Arc::clone(&gauges));
        let big = response(100 << 10);
        let each = cost(&big);
        let mut sent = 0;
        while let Ok(Some(slot)) =
            tokio::time::timeout(std::time::Duration::from_millis(20), sender.reserve(each)).await
        {
            slot.send(big.clone(), each);
            sent += 1;
        }
        assert_eq!(sent, IN_FLIGHT_BUDGET / each, "no more than the budget is in flight");
        assert_eq!(gauges.queued_bytes.load(Ordering::Relaxed), (sent * each) as i64);
        responses.next().await.expect("one").expect("ok");
        assert!(sender.reserve(each).await.is_some(), "taking one makes room for one");
        // A response larger than the whole budget still goes, alone.
        while gauges.queued_bytes.load(Ordering::Relaxed) > 0 {
            responses.next().await.expect("queued").expect("ok");
        }
        let huge = response(IN_FLIGHT_BUDGET * 2);
        let slot = sender.reserve(cost(&huge)).await.expect("room once empty");
        slot.send(huge, IN_FLIGHT_BUDGET * 2);
    }
}
