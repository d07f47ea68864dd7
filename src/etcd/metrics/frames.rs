//! The messages of a gRPC call, counted as its bodies pass: each message is a 5-byte prefix
//! (compression flag, big-endian length) and its payload, cut anywhere by HTTP/2 data frames;
//! the response's trailers carry the call's status.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::grpc::{GrpcLabels, HandledLabels, code_name};

const PREFIX: usize = 5;

/// Where one direction of a call is in its message framing.
#[derive(Debug, Default)]
pub(super) struct Frames {
    prefix: [u8; PREFIX],
    prefix_read: usize,
    payload_left: usize,
}

impl Frames {
    /// Reads the next chunk; returns the messages whose prefix it completed and the payload
    /// bytes those prefixes announce (etcd's codec counts a message's marshalled size).
    fn feed(&mut self, mut chunk: &[u8]) -> (u64, u64) {
        let (mut messages, mut bytes) = (0, 0);
        while !chunk.is_empty() {
            if self.payload_left > 0 {
                let skipped = self.payload_left.min(chunk.len());
                self.payload_left -= skipped;
                chunk = &chunk[skipped..];
                continue;
            }
            let taken = (PREFIX - self.prefix_read).min(chunk.len());
            self.prefix[self.prefix_read..self.prefix_read + taken].copy_from_slice(&chunk[..taken]);
            self.prefix_read += taken;
            chunk = &chunk[taken..];
            if self.prefix_read == PREFIX {
                let length = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                messages += 1;
                bytes += u64::from(length);
                self.payload_left = length as usize;
                self.prefix_read = 0;
            }
        }
        (messages, bytes)
    }
}

/// Counts into `messages` and `bytes` what passes through one body.
#[derive(Debug)]
struct Tally {
    frames: Frames,
    messages: Counter,
    bytes: Counter,
}

impl Tally {
    fn data(&mut self, data: &[u8]) {
        let (messages, bytes) = self.frames.feed(data);
        if messages > 0 {
            self.messages.inc_by(messages);
            self.bytes.inc_by(bytes);
        }
    }
}

/// A request body whose messages are counted as the service reads them.
pub(super) struct CountedRequest<B> {
    inner: B,
    tally: Tally,
}

impl<B> CountedRequest<B> {
    pub fn new(inner: B, messages: Counter, bytes: Counter) -> Self {
        Self { inner, tally: Tally { frames: Frames::default(), messages, bytes } }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedRequest<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.tally.data(data);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The `grpc_server_handled_total` series a call will count in, once its status is known.
pub(super) struct Handled {
    family: Family<HandledLabels, Counter>,
    labels: GrpcLabels,
}

impl Handled {
    pub fn new(family: Family<HandledLabels, Counter>, labels: GrpcLabels) -> Self {
        Self { family, labels }
    }

    pub fn record(self, code: &'static str) {
        self.family.get_or_create(&HandledLabels::new(self.labels, code)).inc();
    }
}

/// A response body whose messages are counted as they go out, and whose call is counted as
/// handled when its trailers do (or as `Canceled` when it is dropped before: the client left).
pub struct CountedResponse<B> {
    inner: B,
    tally: Tally,
    handled: Option<Handled>,
}

impl<B> CountedResponse<B> {
    pub(super) fn new(inner: B, messages: Counter, bytes: Counter, handled: Option<Handled>) -> Self {
        Self { inner, tally: Tally { frames: Frames::default(), messages, bytes }, handled }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedResponse<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.tally.data(data);
            } else if let Some(status) = frame.trailers_ref().and_then(|t| t.get("grpc-status"))
                && let Some(handled) = this.handled.take()
            {
                handled.record(code_name(status.as_bytes()));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedResponse<B> {
    fn drop(&mut self) {
        if let Some(handled) = self.handled.take() {
            handled.record("Canceled");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        framed.extend_from_slice(payload);
        framed
    }

    #[test]
    fn messages_are_counted_however_the_transport_cuts_them() {
        let stream: Vec<u8> = [message(b"hello"), message(b""), message(&[7; 300])].concat();
        for cut in [1, 2, 4, 5, 6, 7, 64, stream.len()] {
            let mut frames = Frames::default();
            let (messages, bytes) =
                stream.chunks(cut).map(|chunk| frames.feed(chunk)).fold((0, 0), |(m, b), (dm, db)| (m + dm, b + db));
            assert_eq!((messages, bytes), (3, 305), "chunks of {cut}");
        }
    }
}
