//! Thin tonic adapters, one file per etcd service: validate, authorise, call the store, map.

pub mod auth;
pub mod cluster;
pub mod kv;
pub mod lease;
pub mod maintenance;
pub mod watch;

use tonic::Request;

use super::tls::PeerIdentity;

/// The etcd user a request runs as: the Common Name of the connection's client certificate.
pub(crate) fn caller<T>(request: &Request<T>) -> Option<&str> {
    request.extensions().get::<PeerIdentity>().and_then(|peer| peer.common_name.as_deref())
}
