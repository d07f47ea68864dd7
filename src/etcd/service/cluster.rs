//! The Cluster service of a single member: itself, and no membership changes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::etcd::error::Error;
use crate::etcd::pb::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest, MemberUpdateResponse,
    ResponseHeader, cluster_server::Cluster,
};
use crate::etcd::store::Store;

/// How this member describes itself in `member list`.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// etcd's `--name`.
    pub name: String,
    /// etcd's `--advertise-client-urls`: where clients reach this member.
    pub client_urls: Vec<String>,
}

pub struct ClusterService {
    store: Arc<Store>,
    member: MemberInfo,
}

impl ClusterService {
    pub fn new(store: Arc<Store>, member: MemberInfo) -> Self {
        Self { store, member }
    }
}

const SINGLE_MEMBER: &str = "the embedded store is a single member; run etcd (attached mode) for a cluster";

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(&self, _: Request<MemberAddRequest>) -> Result<Response<MemberAddResponse>, Status> {
        Err(Error::Unsupported(SINGLE_MEMBER).into())
    }

    async fn member_remove(&self, _: Request<MemberRemoveRequest>) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(Error::Unsupported(SINGLE_MEMBER).into())
    }

    async fn member_update(&self, _: Request<MemberUpdateRequest>) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Error::Unsupported(SINGLE_MEMBER).into())
    }

    async fn member_list(&self, _: Request<MemberListRequest>) -> Result<Response<MemberListResponse>, Status> {
        let member = Member {
            id: self.store.identity().member_id,
            name: self.member.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: self.member.client_urls.clone(),
            is_learner: false,
        };
        // etcd's cluster service fills cluster ID, member ID and raft term but never the
        // revision (`ClusterServer.header()`), so `member list -w json` shows none.
        let header = ResponseHeader { revision: 0, ..self.store.header() };
        Ok(Response::new(MemberListResponse { header: Some(header), members: vec![member] }))
    }

    async fn member_promote(
        &self,
        _: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(Error::Unsupported(SINGLE_MEMBER).into())
    }
}
