//! The Maintenance service as a single in-memory member answers it: always the leader,
//! alarms from the space quota only, nothing to defragment.

use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::caller;
use crate::etcd::error::Error;
use crate::etcd::pb::etcdserverpb::{
    AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse, DowngradeRequest, DowngradeResponse,
    HashKvRequest, HashKvResponse, HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, RangeRequest,
    SnapshotRequest, SnapshotResponse, StatusRequest, StatusResponse, alarm_request::AlarmAction,
    maintenance_server::Maintenance,
};
use crate::etcd::store::Store;

/// The etcd server version we report. Cilium and etcdctl only check it is at least 3.1;
/// 3.5 is the API level we implement.
pub const ETCD_VERSION: &str = "3.5.0";

pub struct MaintenanceService {
    store: Arc<Store>,
}

impl MaintenanceService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    fn check_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        Ok(self.store.auth().read().check_admin(caller(request))?)
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(&self, request: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        if request.get_ref().action != AlarmAction::Get as i32 {
            self.check_admin(&request)?;
        }
        Ok(Response::new(self.store.alarm(request.get_ref())?))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let stats = self.store.stats();
        let identity = self.store.identity();
        // Memory freed by a compaction is given back at once: nothing is ever allocated and
        // not in use, so the size and the size in use are the same.
        let size = stats.retained_bytes as i64;
        // etcd lists every active alarm among the errors, as its alarm store prints them.
        let errors = self.store.alarms().iter().map(crate::etcd::store::describe_alarm).collect();
        Ok(Response::new(StatusResponse {
            header: Some(self.store.header_at(stats.revision)),
            version: ETCD_VERSION.to_owned(),
            db_size: size,
            leader: identity.member_id,
            raft_index: stats.revision as u64,
            raft_term: crate::etcd::store::RAFT_TERM,
            raft_applied_index: stats.revision as u64,
            errors,
            db_size_in_use: size,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota: self.store.limits().quota_bytes(),
            downgrade_info: None,
        }))
    }

    async fn defragment(&self, request: Request<DefragmentRequest>) -> Result<Response<DefragmentResponse>, Status> {
        self.check_admin(&request)?;
        Ok(Response::new(DefragmentResponse { header: Some(self.store.header()) }))
    }

    async fn hash(&self, request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.check_admin(&request)?;
        let (header, hash) = self.hash_at(0)?;
        Ok(Response::new(HashResponse { header: Some(header), hash }))
    }

    async fn hash_kv(&self, request: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        self.check_admin(&request)?;
        let (header, hash) = self.hash_at(request.get_ref().revision)?;
        let stats = self.store.stats();
        let hash_revision = if request.get_ref().revision > 0 { request.get_ref().revision } else { stats.revision };
        Ok(Response::new(HashKvResponse {
            header: Some(header),
            hash,
            compact_revision: stats.compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = ReceiverStream<Result<SnapshotResponse, Status>>;

    async fn snapshot(&self, _: Request<SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(Error::Unsupported(
            "snapshot: the embedded store has no backend file; it is rebuilt from Kubernetes on start",
        )
        .into())
    }

    async fn move_leader(&self, request: Request<MoveLeaderRequest>) -> Result<Response<MoveLeaderResponse>, Status> {
        self.check_admin(&request)?;
        if request.get_ref().target_id != self.store.identity().member_id {
            return Err(Error::Unsupported("move-leader: the embedded store is a single member").into());
        }
        Ok(Response::new(MoveLeaderResponse { header: Some(self.store.header()) }))
    }

    async fn downgrade(&self, _: Request<DowngradeRequest>) -> Result<Response<DowngradeResponse>, Status> {
        Err(Error::Unsupported("downgrade: the embedded store has no cluster version to change").into())
    }
}

impl MaintenanceService {
    /// FNV-1a over every key, value and modification revision visible at `revision`: equal
    /// for equal contents, which is all `etcdctl endpoint hashkv` users compare.
    fn hash_at(&self, revision: i64) -> Result<(crate::etcd::pb::etcdserverpb::ResponseHeader, u32), Status> {
        let everything =
            RangeRequest { key: vec![0].into(), range_end: vec![0].into(), revision, ..Default::default() };
        let response = self.store.range(&everything)?;
        let mut hash: u32 = 0x811c_9dc5;
        for kv in &response.kvs {
            for byte in kv.key.iter().chain(kv.value.iter()).chain(kv.mod_revision.to_be_bytes().iter()) {
                hash ^= u32::from(*byte);
                hash = hash.wrapping_mul(0x0100_0193);
            }
        }
        Ok((response.header.unwrap_or_default(), hash))
    }
}
