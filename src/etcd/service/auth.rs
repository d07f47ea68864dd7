//! etcd's `Auth` service over [`AuthStore`]: authorise the caller, apply, map to protobuf.
//!
//! Authorisation follows etcd 3.5 (`etcdserver/apply_auth.go`): once auth is on, every RPC
//! except `Authenticate` needs role `root` — `AuthStatus` included — with two exceptions
//! etcdctl relies on: anyone may `UserGet` themselves and `RoleGet` a role they hold.
//! The check and the change happen under one write lock, so a caller demoted concurrently
//! cannot slip a change in between.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::caller;
use crate::etcd::auth::{AuthStore, PermType, Permission};
use crate::etcd::error::{Error, Result};
use crate::etcd::pb::authpb;
use crate::etcd::pb::etcdserverpb::ResponseHeader;
use crate::etcd::pb::etcdserverpb::auth_server::Auth;
use crate::etcd::pb::etcdserverpb::{
    AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse, AuthRoleAddRequest,
    AuthRoleAddResponse, AuthRoleDeleteRequest, AuthRoleDeleteResponse, AuthRoleGetRequest, AuthRoleGetResponse,
    AuthRoleGrantPermissionRequest, AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse,
    AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse, AuthStatusRequest, AuthStatusResponse,
    AuthUserAddRequest, AuthUserAddResponse, AuthUserChangePasswordRequest, AuthUserChangePasswordResponse,
    AuthUserDeleteRequest, AuthUserDeleteResponse, AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest,
    AuthUserGrantRoleResponse, AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse,
};
use crate::etcd::store::Store;

pub struct AuthService {
    store: Arc<Store>,
}

impl AuthService {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// Runs `change` on the auth store if the caller may administer it.
    ///
    /// Both locks below are released before the response header is built: the header reads
    /// the key-value state, and never holding the auth lock while taking that one means no
    /// lock order between the two has to be kept across services.
    fn admin<T, R>(&self, request: &Request<T>, change: impl FnOnce(&mut AuthStore) -> Result<R>) -> Result<R, Status> {
        let mut auth = self.store.auth().write();
        auth.check_admin(caller(request))?;
        Ok(change(&mut auth)?)
    }

    /// Like [`Self::admin`] for queries, under the read lock so they never wait on each other.
    fn admin_read<T, R>(&self, request: &Request<T>, query: impl FnOnce(&AuthStore) -> Result<R>) -> Result<R, Status> {
        let auth = self.store.auth().read();
        auth.check_admin(caller(request))?;
        Ok(query(&auth)?)
    }

    fn header(&self) -> Option<ResponseHeader> {
        Some(self.store.header())
    }
}

/// The caller's name for logs; empty without a certificate CN.
fn by<T>(request: &Request<T>) -> &str {
    caller(request).unwrap_or("")
}

fn to_pb(perm: Permission) -> authpb::Permission {
    authpb::Permission { perm_type: perm.perm_type as i32, key: perm.key, range_end: perm.range_end }
}

fn from_pb(perm: authpb::Permission) -> Result<Permission> {
    // An unknown type would be stored by etcd and then grant nothing; refusing it tells the
    // client at once instead.
    let perm_type = PermType::try_from(perm.perm_type)
        .map_err(|_| Error::InvalidArgument(format!("etcdserver: invalid permission type {}", perm.perm_type)))?;
    Ok(Permission { perm_type, key: perm.key, range_end: perm.range_end })
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(&self, request: Request<AuthEnableRequest>) -> Result<Response<AuthEnableResponse>, Status> {
        let changed = self.admin(&request, |auth| {
            let was = auth.is_enabled();
            auth.enable()?;
            Ok(!was)
        })?;
        if changed {
            info!(by = by(&request), "authentication enabled");
        }
        Ok(Response::new(AuthEnableResponse { header: self.header() }))
    }

    async fn auth_disable(
        &self,
        request: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let changed = self.admin(&request, |auth| {
            let was = auth.is_enabled();
            auth.disable();
            Ok(was)
        })?;
        if changed {
            info!(by = by(&request), "authentication disabled");
        }
        Ok(Response::new(AuthDisableResponse { header: self.header() }))
    }

    async fn auth_status(&self, request: Request<AuthStatusRequest>) -> Result<Response<AuthStatusResponse>, Status> {
        // Needs root too: etcd 3.5 routes AuthStatus through the admin check like the rest.
        let (enabled, auth_revision) = self.admin_read(&request, |auth| Ok((auth.is_enabled(), auth.revision())))?;
        Ok(Response::new(AuthStatusResponse { header: self.header(), enabled, auth_revision }))
    }

    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        // No user has a password here (Cilium creates them all password-less and the
        // certificate CN is the identity), so no token is ever issued; etcd answers a
        // password-less user the same way, and "not enabled" first when auth is off.
        let enabled = self.store.auth().read().is_enabled();
        let err = if enabled { Error::AuthFailed } else { Error::AuthNotEnabled };
        if enabled {
            debug!(user = %request.get_ref().name, "refused password authentication");
        }
        Err(err.into())
    }

    async fn user_add(&self, request: Request<AuthUserAddRequest>) -> Result<Response<AuthUserAddResponse>, Status> {
        let req = request.get_ref();
        // Certificates are the only credential here: a user given a password could never
        // authenticate with it, so the request is refused rather than accepted in vain.
        if !req.password.is_empty() || !req.hashed_password.is_empty() {
            return Err(crate::etcd::Error::InvalidArgument(
                "passwords are not supported: users authenticate by the Common Name of their client certificate \
                 (add the user with --no-password)"
                    .into(),
            )
            .into());
        }
        let no_password = req.options.is_some_and(|o| o.no_password);
        self.admin(&request, |auth| auth.user_add(&req.name, no_password))?;
        info!(user = %req.name, by = by(&request), "user added");
        Ok(Response::new(AuthUserAddResponse { header: self.header() }))
    }

    async fn user_get(&self, request: Request<AuthUserGetRequest>) -> Result<Response<AuthUserGetResponse>, Status> {
        let name = &request.get_ref().name;
        let roles = {
            let auth = self.store.auth().read();
            // A user may always look itself up (etcd: `UserGet` in apply_auth.go).
            if let Err(err) = auth.check_admin(caller(&request))
                && caller(&request) != Some(name.as_str())
            {
                return Err(err.into());
            }
            auth.user_get(name)?
        };
        Ok(Response::new(AuthUserGetResponse { header: self.header(), roles }))
    }

    async fn user_list(&self, request: Request<AuthUserListRequest>) -> Result<Response<AuthUserListResponse>, Status> {
        let users = self.admin_read(&request, |auth| Ok(auth.user_list()))?;
        Ok(Response::new(AuthUserListResponse { header: self.header(), users }))
    }

    async fn user_delete(
        &self,
        request: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let name = &request.get_ref().name;
        self.admin(&request, |auth| auth.user_delete(name))?;
        info!(user = %name, by = by(&request), "user deleted");
        Ok(Response::new(AuthUserDeleteResponse { header: self.header() }))
    }

    async fn user_change_password(
        &self,
        request: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        // Accepted so etcdctl scripts keep working; the password itself is dropped, as in
        // `user_add`.
        let name = &request.get_ref().name;
        self.admin(&request, |auth| auth.user_change_password(name))?;
        info!(user = %name, by = by(&request), "user password change accepted and ignored");
        Ok(Response::new(AuthUserChangePasswordResponse { header: self.header() }))
    }

    async fn user_grant_role(
        &self,
        request: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let req = request.get_ref();
        self.admin(&request, |auth| auth.user_grant_role(&req.user, &req.role))?;
        info!(user = %req.user, role = %req.role, by = by(&request), "role granted to user");
        Ok(Response::new(AuthUserGrantRoleResponse { header: self.header() }))
    }

    async fn user_revoke_role(
        &self,
        request: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let req = request.get_ref();
        self.admin(&request, |auth| auth.user_revoke_role(&req.name, &req.role))?;
        info!(user = %req.name, role = %req.role, by = by(&request), "role revoked from user");
        Ok(Response::new(AuthUserRevokeRoleResponse { header: self.header() }))
    }

    async fn role_add(&self, request: Request<AuthRoleAddRequest>) -> Result<Response<AuthRoleAddResponse>, Status> {
        let name = &request.get_ref().name;
        self.admin(&request, |auth| auth.role_add(name))?;
        info!(role = %name, by = by(&request), "role added");
        Ok(Response::new(AuthRoleAddResponse { header: self.header() }))
    }

    async fn role_get(&self, request: Request<AuthRoleGetRequest>) -> Result<Response<AuthRoleGetResponse>, Status> {
        let role = &request.get_ref().role;
        let perms = {
            let auth = self.store.auth().read();
            // A user may always read a role it holds (etcd: `RoleGet` in apply_auth.go).
            if let Err(err) = auth.check_admin(caller(&request))
                && !caller(&request).is_some_and(|user| auth.has_role(user, role))
            {
                return Err(err.into());
            }
            auth.role_get(role)?
        };
        let perm = perms.into_iter().map(to_pb).collect();
        Ok(Response::new(AuthRoleGetResponse { header: self.header(), perm }))
    }

    async fn role_list(&self, request: Request<AuthRoleListRequest>) -> Result<Response<AuthRoleListResponse>, Status> {
        let roles = self.admin_read(&request, |auth| Ok(auth.role_list()))?;
        Ok(Response::new(AuthRoleListResponse { header: self.header(), roles }))
    }

    async fn role_delete(
        &self,
        request: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let role = &request.get_ref().role;
        self.admin(&request, |auth| auth.role_delete(role))?;
        info!(role = %role, by = by(&request), "role deleted");
        Ok(Response::new(AuthRoleDeleteResponse { header: self.header() }))
    }

    async fn role_grant_permission(
        &self,
        request: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let req = request.get_ref();
        // Checked after authorisation, as etcd does, so an unauthorised caller learns nothing
        // about its request's validity.
        let perm = self.admin(&request, |auth| {
            let perm = req
                .perm
                .clone()
                .ok_or_else(|| Error::InvalidArgument("etcdserver: permission not given".into()))
                .and_then(from_pb)?;
            auth.role_grant_permission(&req.name, perm.clone())?;
            Ok(perm)
        })?;
        info!(
            role = %req.name,
            perm = perm.perm_type.as_str_name(),
            key = ?String::from_utf8_lossy(&perm.key),
            range_end = ?String::from_utf8_lossy(&perm.range_end),
            by = by(&request),
            "permission granted to role"
        );
        Ok(Response::new(AuthRoleGrantPermissionResponse { header: self.header() }))
    }

    async fn role_revoke_permission(
        &self,
        request: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let req = request.get_ref();
        self.admin(&request, |auth| auth.role_revoke_permission(&req.role, &req.key, &req.range_end))?;
        info!(
            role = %req.role,
            key = ?String::from_utf8_lossy(&req.key),
            range_end = ?String::from_utf8_lossy(&req.range_end),
            by = by(&request),
            "permission revoked from role"
        );
        Ok(Response::new(AuthRoleRevokePermissionResponse { header: self.header() }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::etcd::store::{Identity, Limits};
    use crate::etcd::tls::PeerIdentity;

    fn service(auth: AuthStore) -> AuthService {
        AuthService::new(Store::new(Identity::random(), Limits::default(), auth))
    }

    fn as_user<T>(cn: &str, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.extensions_mut().insert(PeerIdentity { common_name: Some(cn.to_owned()), ..Default::default() });
        request
    }

    fn user_add(name: &str) -> AuthUserAddRequest {
        AuthUserAddRequest { name: name.to_owned(), ..Default::default() }
    }

    #[tokio::test]
    async fn anyone_may_administer_while_auth_is_disabled() {
        let svc = service(AuthStore::default());
        let resp = svc.user_add(Request::new(user_add("u"))).await.unwrap().into_inner();
        assert!(resp.header.is_some());
        let status = svc.auth_status(Request::new(AuthStatusRequest {})).await.unwrap();
        assert!(!status.get_ref().enabled);
        assert_eq!(status.get_ref().auth_revision, 2);
    }

    #[tokio::test]
    async fn admin_rpcs_need_role_root_once_enabled() {
        let svc = service(AuthStore::cilium("c1"));
        let denied = svc.user_add(as_user("remote", user_add("x"))).await.unwrap_err();
        assert_eq!(denied.code(), Code::PermissionDenied);
        let unknown = svc.user_list(as_user("ghost", AuthUserListRequest {})).await.unwrap_err();
        assert_eq!(unknown.message(), "etcdserver: user name not found");
        let anonymous = svc.auth_status(Request::new(AuthStatusRequest {})).await.unwrap_err();
        assert_eq!(anonymous.message(), "etcdserver: user name is empty");

        svc.user_add(as_user("admin-c1", user_add("x"))).await.unwrap();
        let users = svc.user_list(as_user("root", AuthUserListRequest {})).await.unwrap();
        assert!(users.get_ref().users.contains(&"x".to_owned()));
    }

    #[tokio::test]
    async fn users_may_read_themselves_and_roles_they_hold() {
        let svc = service(AuthStore::cilium("c1"));
        let me = AuthUserGetRequest { name: "remote".into() };
        let roles = svc.user_get(as_user("remote", me)).await.unwrap().into_inner().roles;
        assert_eq!(roles, vec!["remote"]);
        let other = AuthUserGetRequest { name: "root".into() };
        assert!(svc.user_get(as_user("remote", other)).await.is_err());

        let held = AuthRoleGetRequest { role: "remote".into() };
        let perms = svc.role_get(as_user("remote", held)).await.unwrap().into_inner().perm;
        assert_eq!(perms.len(), 4);
        let foreign = AuthRoleGetRequest { role: "local".into() };
        assert!(svc.role_get(as_user("remote", foreign)).await.is_err());
    }

    #[tokio::test]
    async fn grant_permission_maps_protobuf_and_rejects_bad_input() {
        let svc = service(AuthStore::default());
        svc.role_add(Request::new(AuthRoleAddRequest { name: "r".into() })).await.unwrap();
        let grant = |perm| AuthRoleGrantPermissionRequest { name: "r".into(), perm };
        let missing = svc.role_grant_permission(Request::new(grant(None))).await.unwrap_err();
        assert_eq!(missing.message(), "etcdserver: permission not given");
        let bad_type = authpb::Permission { perm_type: 7, key: "a".into(), range_end: "".into() };
        let err = svc.role_grant_permission(Request::new(grant(Some(bad_type)))).await;
        assert_eq!(err.unwrap_err().code(), Code::InvalidArgument);

        let perm =
            authpb::Permission { perm_type: PermType::Readwrite as i32, key: "a".into(), range_end: "\0".into() };
        svc.role_grant_permission(Request::new(grant(Some(perm.clone())))).await.unwrap();
        let got = svc.role_get(Request::new(AuthRoleGetRequest { role: "r".into() })).await;
        assert_eq!(got.unwrap().into_inner().perm, vec![perm]);
    }

    #[tokio::test]
    async fn authenticate_never_issues_a_token() {
        let disabled = service(AuthStore::default());
        let req = || Request::new(AuthenticateRequest { name: "root".into(), password: "x".into() });
        let err = disabled.authenticate(req()).await.unwrap_err();
        assert_eq!(err.message(), "etcdserver: authentication is not enabled");
        let enabled = service(AuthStore::cilium("c1"));
        let err = enabled.authenticate(req()).await.unwrap_err();
        assert_eq!(err.message(), "etcdserver: authentication failed, invalid user ID or password");
    }

    #[tokio::test]
    async fn etcdctl_auth_enable_sequence_works() {
        let svc = service(AuthStore::default());
        let root = AuthUserAddRequest {
            name: "root".into(),
            options: Some(authpb::UserAddOptions { no_password: true }),
            ..Default::default()
        };
        svc.user_add(Request::new(root)).await.unwrap();
        // etcdctl retries `auth enable` after adding and granting role root on this error.
        let err = svc.auth_enable(Request::new(AuthEnableRequest {})).await.unwrap_err();
        assert_eq!(err.message(), "etcdserver: root user does not have root role");
        svc.role_add(Request::new(AuthRoleAddRequest { name: "root".into() })).await.unwrap();
        let grant = AuthUserGrantRoleRequest { user: "root".into(), role: "root".into() };
        svc.user_grant_role(Request::new(grant)).await.unwrap();
        svc.auth_enable(Request::new(AuthEnableRequest {})).await.unwrap();
        let status = svc.auth_status(as_user("root", AuthStatusRequest {})).await.unwrap();
        assert!(status.get_ref().enabled);
        let delete = AuthUserDeleteRequest { name: "root".into() };
        let err = svc.user_delete(as_user("root", delete)).await.unwrap_err();
        assert_eq!(err.message(), "etcdserver: invalid auth management");
    }
}
