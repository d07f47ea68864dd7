//! Thin tonic adapters, one file per etcd service: validate, authorise, call the store, map.

pub mod auth;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use tonic::{Code, Request, Status};

use super::tls::PeerIdentity;

/// The etcd user a request runs as: the Common Name of the connection's client certificate.
pub(crate) fn caller<T>(request: &Request<T>) -> Option<&str> {
    request.extensions().get::<PeerIdentity>().and_then(|peer| peer.common_name.as_deref())
}

/// Whether tonic's decoder refused a message over the receive limit. tonic says `OUT_OF_RANGE`;
/// gRPC and etcd say `RESOURCE_EXHAUSTED`, which clients retry or circuit-break on.
pub(crate) fn is_too_large(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.contains("message length too large")
}

/// A request stream's read error as gRPC reports it (see [`is_too_large`]).
pub(crate) fn decode_error_as_grpc_says(status: Status) -> Status {
    if is_too_large(status.code(), status.message()) { Status::resource_exhausted(status.message()) } else { status }
}
