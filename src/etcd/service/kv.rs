//! The KV service: size limits and permissions, then the store.

use std::sync::Arc;

use prost::Message;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::caller;
use crate::etcd::auth::AuthStore;
use crate::etcd::error::{Error, Result};
use crate::etcd::pb::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, kv_server::Kv, request_op::Request as Op,
};
use crate::etcd::store::Store;

pub struct KvService {
    store: Arc<Store>,
    shutdown: CancellationToken,
}

impl KvService {
    pub fn new(store: Arc<Store>, shutdown: CancellationToken) -> Self {
        Self { store, shutdown }
    }

    /// Once shutdown has begun a write is refused with etcd's "server stopped" (clients retry
    /// elsewhere) rather than acknowledged into a store about to be gone.
    fn accepting_writes(&self) -> Result<()> {
        if self.shutdown.is_cancelled() { Err(Error::Stopped) } else { Ok(()) }
    }

    /// etcd refuses writes larger than `--max-request-bytes` with its own error, before the
    /// transport limit (which leaves headroom for framing) would.
    fn check_size(&self, request: &impl Message) -> Result<()> {
        if request.encoded_len() > self.store.limits().max_request_bytes {
            return Err(Error::RequestTooLarge);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, request: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let user = caller(&request);
        let range = request.get_ref();
        self.store.auth().read().check_read(user, &range.key, &range.range_end)?;
        Ok(Response::new(self.store.range(range)?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        self.accepting_writes()?;
        self.check_size(request.get_ref())?;
        check_put(&self.store.auth().read(), caller(&request), request.get_ref())?;
        Ok(Response::new(self.store.put(request.into_inner())?))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        self.accepting_writes()?;
        check_delete(&self.store.auth().read(), caller(&request), request.get_ref())?;
        Ok(Response::new(self.store.delete_range(request.into_inner())?))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        self.accepting_writes()?;
        self.check_size(request.get_ref())?;
        check_txn(&self.store.auth().read(), caller(&request), request.get_ref())?;
        Ok(Response::new(self.store.txn(request.into_inner())?))
    }

    /// Deliberately stricter than etcd, which lets any user compact: a compaction makes every
    /// watching agent relist, so a read-only `remote` user must not be able to trigger one.
    async fn compact(&self, request: Request<CompactionRequest>) -> Result<Response<CompactionResponse>, Status> {
        self.store.auth().read().check_admin(caller(&request))?;
        Ok(Response::new(self.store.compact(request.get_ref())?))
    }
}

fn check_put(auth: &AuthStore, user: Option<&str>, put: &PutRequest) -> Result<()> {
    auth.check_write(user, &put.key, &[])?;
    if put.prev_kv {
        auth.check_read(user, &put.key, &[])?;
    }
    Ok(())
}

fn check_delete(auth: &AuthStore, user: Option<&str>, delete: &DeleteRangeRequest) -> Result<()> {
    auth.check_write(user, &delete.key, &delete.range_end)?;
    if delete.prev_kv {
        auth.check_read(user, &delete.key, &delete.range_end)?;
    }
    Ok(())
}

/// Every compare needs read access and every operation of both branches its own access,
/// as etcd's `checkTxnAuth` decides, whichever branch ends up running.
fn check_txn(auth: &AuthStore, user: Option<&str>, txn: &TxnRequest) -> Result<()> {
    if !auth.is_enabled() {
        return Ok(());
    }
    for compare in &txn.compare {
        auth.check_read(user, &compare.key, &compare.range_end)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match &op.request {
            Some(Op::RequestRange(range)) => auth.check_read(user, &range.key, &range.range_end)?,
            Some(Op::RequestPut(put)) => check_put(auth, user, put)?,
            Some(Op::RequestDeleteRange(delete)) => check_delete(auth, user, delete)?,
            Some(Op::RequestTxn(nested)) => check_txn(auth, user, nested)?,
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::store::{Identity, Limits};

    #[tokio::test]
    async fn writes_are_refused_once_shutdown_begins_and_reads_still_answer() {
        let store = Store::new(Identity::random(), Limits::default(), AuthStore::default());
        let shutdown = CancellationToken::new();
        let kv = KvService::new(store, shutdown.clone());
        let put = || Request::new(PutRequest { key: "k".into(), value: "v".into(), ..PutRequest::default() });
        kv.put(put()).await.expect("written before shutdown");
        shutdown.cancel();
        let refused = kv.put(put()).await.expect_err("refused during shutdown");
        assert_eq!((refused.code(), refused.message()), (tonic::Code::Unavailable, "etcdserver: server stopped"));
        let range = Request::new(RangeRequest { key: "k".into(), ..RangeRequest::default() });
        assert_eq!(kv.range(range).await.expect("reads still answer").into_inner().kvs.len(), 1);
    }
}
