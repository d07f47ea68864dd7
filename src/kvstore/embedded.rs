//! The embedded store as a backend: direct calls, no network hop, no serialisation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::{Backend, Error, Result};
use crate::blob::Blob;
use crate::etcd::auth::prefix_end;
use crate::etcd::pb::etcdserverpb::{DeleteRangeRequest, LeaseGrantRequest, RangeRequest};
use crate::etcd::store::Store;

/// Writes go straight into the store, as its administrator: the mirror is the store's
/// owner, so no permission check applies.
#[derive(Clone)]
pub struct Embedded {
    store: Arc<Store>,
}

impl Embedded {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }
}

fn embedded(error: crate::etcd::Error) -> Error {
    Error::Embedded(error)
}

impl Backend for Embedded {
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>> {
        Box::pin(async move {
            let request = LeaseGrantRequest { ttl: ttl.as_secs() as i64, id: 0 };
            Ok(self.store.lease_grant(&request, None).map_err(embedded)?.id)
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { self.store.lease_keep_alive(lease).map(|_| ()).ok_or(Error::LeaseLost(lease)) })
    }

    fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.store.put_shared(key.as_bytes(), value, lease) {
                Ok(_) => Ok(()),
                Err(crate::etcd::Error::LeaseNotFound) => Err(Error::LeaseLost(lease)),
                Err(error) => Err(embedded(error)),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        Box::pin(async move {
            let request = RangeRequest { key: Bytes::copy_from_slice(key.as_bytes()), ..Default::default() };
            let mut response = self.store.range(&request).map_err(embedded)?;
            Ok(response.kvs.pop().map(|kv| kv.value))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let request = DeleteRangeRequest { key: Bytes::copy_from_slice(key.as_bytes()), ..Default::default() };
            self.store.delete_range(request).map_err(embedded)?;
            Ok(())
        })
    }

    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let request = RangeRequest {
                key: Bytes::copy_from_slice(prefix.as_bytes()),
                range_end: prefix_end(prefix.as_bytes()).into(),
                keys_only: true,
                ..Default::default()
            };
            let response = self.store.range(&request).map_err(embedded)?;
            Ok(response.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect())
        })
    }

    fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<super::Entry>>> {
        Box::pin(async move {
            let request = RangeRequest {
                key: Bytes::copy_from_slice(prefix.as_bytes()),
                range_end: prefix_end(prefix.as_bytes()).into(),
                ..Default::default()
            };
            let response = self.store.range(&request).map_err(embedded)?;
            let entries = response.kvs.into_iter().map(|kv| super::Entry {
                key: String::from_utf8_lossy(&kv.key).into_owned(),
                value: kv.value,
                lease: kv.lease,
            });
            Ok(entries.collect())
        })
    }
}
