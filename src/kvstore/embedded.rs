//! The embedded store as a backend: direct calls, no network hop, no serialisation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Backend, Error, Result};
use crate::etcd::auth::prefix_end;
use crate::etcd::pb::etcdserverpb::{DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest};
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
    async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let request = LeaseGrantRequest { ttl: ttl.as_secs() as i64, id: 0 };
        Ok(self.store.lease_grant(&request, None).map_err(embedded)?.id)
    }

    async fn keep_alive(&self, lease: i64) -> Result<()> {
        self.store.lease_keep_alive(lease).map(|_| ()).ok_or(Error::LeaseLost(lease))
    }

    async fn put(&self, key: &str, value: Bytes, lease: i64) -> Result<()> {
        let request = PutRequest { key: Bytes::copy_from_slice(key.as_bytes()), value, lease, ..Default::default() };
        match self.store.put(request) {
            Ok(_) => Ok(()),
            Err(crate::etcd::Error::LeaseNotFound) => Err(Error::LeaseLost(lease)),
            Err(error) => Err(embedded(error)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let request = RangeRequest { key: Bytes::copy_from_slice(key.as_bytes()), ..Default::default() };
        let mut response = self.store.range(&request).map_err(embedded)?;
        Ok(response.kvs.pop().map(|kv| kv.value))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let request = DeleteRangeRequest { key: Bytes::copy_from_slice(key.as_bytes()), ..Default::default() };
        self.store.delete_range(request).map_err(embedded)?;
        Ok(())
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let request = RangeRequest {
            key: Bytes::copy_from_slice(prefix.as_bytes()),
            range_end: prefix_end(prefix.as_bytes()).into(),
            keys_only: true,
            ..Default::default()
        };
        let response = self.store.range(&request).map_err(embedded)?;
        Ok(response.kvs.into_iter().map(|kv| String::from_utf8_lossy(&kv.key).into_owned()).collect())
    }

    async fn entries_with_prefix(&self, prefix: &str) -> Result<Vec<super::Entry>> {
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
    }
}
