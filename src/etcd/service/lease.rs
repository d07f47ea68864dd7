//! The Lease service: grant, revoke, keep-alive stream, time-to-live, list.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::caller;
use crate::etcd::pb::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest,
    LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    lease_server::Lease,
};
use crate::etcd::store::Store;

pub struct LeaseService {
    store: Arc<Store>,
    shutdown: CancellationToken,
}

impl LeaseService {
    pub fn new(store: Arc<Store>, shutdown: CancellationToken) -> Self {
        Self { store, shutdown }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(&self, request: Request<LeaseGrantRequest>) -> Result<Response<LeaseGrantResponse>, Status> {
        Ok(Response::new(self.store.lease_grant(request.get_ref(), caller(&request))?))
    }

    /// Revoking deletes the lease's keys, so etcd requires write access to every one of them.
    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let auth = self.store.auth().read();
        if auth.is_enabled() {
            for key in self.store.lease_keys(request.get_ref().id)? {
                auth.check_write(caller(&request), &key, &[])?;
            }
        }
        drop(auth);
        Ok(Response::new(self.store.lease_revoke(request.get_ref())?))
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let store = Arc::clone(&self.store);
        let shutdown = self.shutdown.child_token();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => break,
                    message = inbound.message() => message,
                };
                let Ok(Some(LeaseKeepAliveRequest { id })) = message else { break };
                // A missing lease is answered with TTL 0, not an error: that is how etcd's
                // clients learn their lease is gone.
                let ttl = store.lease_keep_alive(id).unwrap_or(0);
                let response = LeaseKeepAliveResponse { header: Some(store.header()), id, ttl };
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let response = self.store.lease_time_to_live(request.get_ref());
        let auth = self.store.auth().read();
        if auth.is_enabled() {
            for key in &response.keys {
                auth.check_read(caller(&request), key, &[])?;
            }
        }
        Ok(Response::new(response))
    }

    async fn lease_leases(&self, _: Request<LeaseLeasesRequest>) -> Result<Response<LeaseLeasesResponse>, Status> {
        let (header, leases) = self.store.lease_list();
        Ok(Response::new(LeaseLeasesResponse { header: Some(header), leases }))
    }
}
