//! The embedded store's errors, and the one place they become etcd's gRPC statuses.

use tonic::{Code, Status};

/// Everything the embedded store can refuse. Each variant is one of etcd's canonical
/// server errors (`api/v3rpc/rpctypes/error.go`): clients match on the exact message text,
/// so the conversion into [`Status`] below is a wire contract, not presentation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("key is not provided")]
    EmptyKey,
    #[error("key not found")]
    KeyNotFound,
    #[error("value is provided")]
    ValueProvided,
    #[error("lease is provided")]
    LeaseProvided,
    #[error("too many operations in txn request")]
    TooManyOps,
    #[error("duplicate key given in txn request")]
    DuplicateKey,
    #[error("required revision has been compacted")]
    Compacted,
    #[error("required revision is a future revision")]
    FutureRev,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExists,
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("too many leases held by this user")]
    TooManyLeases,
    #[error("request is too large")]
    RequestTooLarge,
    /// The space quota (`--quota-backend-bytes`) is used up, or its NOSPACE alarm is active.
    #[error("mvcc: database space exceeded")]
    NoSpace,
    #[error("root user does not exist")]
    RootUserNotExist,
    #[error("root user does not have root role")]
    RootRoleNotExist,
    #[error("user name already exists")]
    UserAlreadyExists,
    #[error("user name is empty")]
    UserEmpty,
    #[error("user name not found")]
    UserNotFound,
    #[error("role name already exists")]
    RoleAlreadyExists,
    #[error("role name not found")]
    RoleNotFound,
    #[error("role name is empty")]
    RoleEmpty,
    #[error("authentication failed")]
    AuthFailed,
    #[error("permission denied")]
    PermissionDenied,
    #[error("role is not granted to the user")]
    RoleNotGranted,
    #[error("permission is not granted to the role")]
    PermissionNotGranted,
    #[error("authentication is not enabled")]
    AuthNotEnabled,
    #[error("invalid auth management")]
    InvalidAuthMgmt,
    #[error("server stopped")]
    Stopped,
    /// A request that etcd itself would reject before reaching the store (bad enum value,
    /// malformed range); the text is ours, the code is etcd's `InvalidArgument`.
    #[error("{0}")]
    InvalidArgument(String),
    /// An RPC etcd has and a single in-memory member has no meaning for (member add, ...).
    #[error("{0}")]
    Unsupported(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code and message etcd sends for this error.
    fn code_and_message(&self) -> (Code, &'static str) {
        use Error::*;
        match self {
            EmptyKey => (Code::InvalidArgument, "etcdserver: key is not provided"),
            KeyNotFound => (Code::InvalidArgument, "etcdserver: key not found"),
            ValueProvided => (Code::InvalidArgument, "etcdserver: value is provided"),
            LeaseProvided => (Code::InvalidArgument, "etcdserver: lease is provided"),
            TooManyOps => (Code::InvalidArgument, "etcdserver: too many operations in txn request"),
            DuplicateKey => (Code::InvalidArgument, "etcdserver: duplicate key given in txn request"),
            Compacted => (Code::OutOfRange, "etcdserver: mvcc: required revision has been compacted"),
            FutureRev => (Code::OutOfRange, "etcdserver: mvcc: required revision is a future revision"),
            LeaseNotFound => (Code::NotFound, "etcdserver: requested lease not found"),
            LeaseExists => (Code::FailedPrecondition, "etcdserver: lease already exists"),
            LeaseTtlTooLarge => (Code::OutOfRange, "etcdserver: too large lease TTL"),
            // Ours (etcd has no such cap): gRPC's code for a quota.
            TooManyLeases => (Code::ResourceExhausted, "etcdserver: too many leases held by this user"),
            RequestTooLarge => (Code::InvalidArgument, "etcdserver: request is too large"),
            NoSpace => (Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
            RootUserNotExist => (Code::FailedPrecondition, "etcdserver: root user does not exist"),
            RootRoleNotExist => (Code::FailedPrecondition, "etcdserver: root user does not have root role"),
            UserAlreadyExists => (Code::FailedPrecondition, "etcdserver: user name already exists"),
            UserEmpty => (Code::InvalidArgument, "etcdserver: user name is empty"),
            UserNotFound => (Code::FailedPrecondition, "etcdserver: user name not found"),
            RoleAlreadyExists => (Code::FailedPrecondition, "etcdserver: role name already exists"),
            RoleNotFound => (Code::FailedPrecondition, "etcdserver: role name not found"),
            RoleEmpty => (Code::InvalidArgument, "etcdserver: role name is empty"),
            AuthFailed => (Code::InvalidArgument, "etcdserver: authentication failed, invalid user ID or password"),
            PermissionDenied => (Code::PermissionDenied, "etcdserver: permission denied"),
            RoleNotGranted => (Code::FailedPrecondition, "etcdserver: role is not granted to the user"),
            PermissionNotGranted => (Code::FailedPrecondition, "etcdserver: permission is not granted to the role"),
            AuthNotEnabled => (Code::FailedPrecondition, "etcdserver: authentication is not enabled"),
            InvalidAuthMgmt => (Code::InvalidArgument, "etcdserver: invalid auth management"),
            Stopped => (Code::Unavailable, "etcdserver: server stopped"),
            InvalidArgument(_) => (Code::InvalidArgument, ""),
            Unsupported(_) => (Code::Unimplemented, ""),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(msg) => Status::invalid_argument(msg),
            Error::Unsupported(msg) => Status::unimplemented(msg),
            other => {
                let (code, message) = other.code_and_message();
                Status::new(code, message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacted_maps_to_etcds_out_of_range_text_that_clients_match_on() {
        let status = Status::from(Error::Compacted);
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(status.message(), "etcdserver: mvcc: required revision has been compacted");
    }

    #[test]
    fn no_space_is_etcds_resource_exhausted_text() {
        let status = Status::from(Error::NoSpace);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.message(), "etcdserver: mvcc: database space exceeded");
    }

    #[test]
    fn permission_denied_keeps_the_grpc_permission_denied_code() {
        let status = Status::from(Error::PermissionDenied);
        assert_eq!(status.code(), Code::PermissionDenied);
        assert_eq!(status.message(), "etcdserver: permission denied");
    }
}
