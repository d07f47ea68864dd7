//! Users, roles and key-range permissions: etcd's auth store without passwords or tokens.
//!
//! Identity comes from the client certificate's Common Name (see `tls.rs`), exactly as etcd
//! does with `--client-cert-auth`; Cilium creates every user password-less, so a password is
//! never a credential here. Everything else follows etcd 3.5's `server/auth/store.go` and
//! `range_perm_cache.go`: the same errors in the same order, the implicit `root` role, the
//! interval-union permission check, and an auth revision that moves like etcd's.
//!
//! This is plain data behind the store's `RwLock`: no IO, no async, cheap to check on every
//! request because the per-user merged permissions are rebuilt on each change, not per check.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

use super::error::{Error, Result};
pub use super::pb::authpb::permission::Type as PermType;

/// The user etcd refuses to delete or demote while auth is on: it is the way back in.
pub const ROOT_USER: &str = "root";
/// The role that bypasses every permission check. It need not exist as a role to be granted.
pub const ROOT_ROLE: &str = "root";

/// A key-range permission as etcd stores it: `[key, range_end)`, a single key when
/// `range_end` is empty, everything from `key` on when `range_end` is `"\0"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub perm_type: PermType,
    pub key: Bytes,
    pub range_end: Bytes,
}

impl Permission {
    pub fn new(perm_type: PermType, key: impl Into<Bytes>, range_end: impl Into<Bytes>) -> Self {
        Self { perm_type, key: key.into(), range_end: range_end.into() }
    }

    /// The prefix range `[prefix, prefix_end(prefix))`, as `etcdctl --prefix` grants it.
    pub fn prefix(perm_type: PermType, prefix: &[u8]) -> Self {
        Self::new(perm_type, Bytes::copy_from_slice(prefix), prefix_end(prefix))
    }
}

/// etcd's `GetPrefixRangeEnd`, shared with the client library so that both sides of the
/// wire agree on what a prefix covers.
pub use clustermesh_client::wire::prefix_range_end as prefix_end;

#[derive(Debug, Clone, Default)]
struct User {
    roles: BTreeSet<String>,
    /// Kept for fidelity with etcd's record; never consulted, since no password is ever
    /// checked here.
    #[allow(dead_code)]
    no_password: bool,
}

/// The store of users and roles. See the module documentation.
#[derive(Debug, Clone)]
pub struct AuthStore {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, User>,
    /// Role name → permissions, kept sorted by (key, range_end) like etcd keeps them by key.
    roles: BTreeMap<String, Vec<Permission>>,
    /// User name → merged permissions, rebuilt after every change (etcd's `rangePermCache`).
    cache: HashMap<String, UserPerms>,
}

impl Default for AuthStore {
    /// Disabled and empty. The revision starts at 1 because etcd commits one on creating its
    /// auth store, so a fresh etcd reports `AuthRevision: 1`.
    fn default() -> Self {
        Self { enabled: false, revision: 1, users: BTreeMap::new(), roles: BTreeMap::new(), cache: HashMap::new() }
    }
}

impl AuthStore {
    /// The users and roles Cilium's `etcdinit` creates (`pkg/kvstore/etcdinit/init.go`), with
    /// auth enabled, so a fresh start is indistinguishable from a freshly initialised etcd.
    ///
    /// The `externalworkload` user and role (read on every key, write on the node-register
    /// and init-lock prefixes) are left out on purpose: they serve only Cilium's legacy
    /// external-workloads (VM) feature, which this server does not support, and a well-known
    /// CN able to read everything is not worth keeping for it.
    pub fn cilium(cluster_name: &str) -> Self {
        const HEARTBEAT: &[u8] = b"cilium/.heartbeat";
        let named = |base: &str| {
            if cluster_name.is_empty() { base.to_owned() } else { format!("{base}-{cluster_name}") }
        };
        // Cilium builds these with Go's `path.Join`, which drops the empty element: with no
        // cluster name the key is `cilium/cluster-config` and the prefix `cilium/synced/`.
        let joined = |base: &str| {
            if cluster_name.is_empty() { base.to_owned() } else { format!("{base}/{cluster_name}") }
        };

        let read = PermType::Read;
        let local = [
            // The heartbeat is deliberately a prefix *without* trailing slash in Cilium.
            Permission::prefix(read, HEARTBEAT),
            Permission::prefix(read, b"cilium/cache/"),
            Permission::prefix(read, b"cilium/cluster-config/"),
            Permission::prefix(read, b"cilium/synced/"),
        ];
        let remote = [
            Permission::prefix(read, HEARTBEAT),
            Permission::prefix(read, b"cilium/state/"),
            Permission::new(read, joined("cilium/cluster-config").into_bytes(), Bytes::new()),
            Permission::prefix(read, format!("{}/", joined("cilium/synced")).as_bytes()),
        ];

        Self::with_cilium_users(&named, local, remote)
            // Only fails if two of the fixed names collided, which `<base>-<cluster>` cannot.
            .expect("Cilium's fixed users and roles are consistent")
    }

    fn with_cilium_users(
        named: &dyn Fn(&str) -> String,
        local: [Permission; 4],
        remote: [Permission; 4],
    ) -> Result<Self> {
        let mut auth = Self::default();
        for (user, role) in [
            (ROOT_USER.to_owned(), ROOT_ROLE),
            (named("admin"), ROOT_ROLE),
            (named("local"), "local"),
            ("remote".to_owned(), "remote"),
        ] {
            auth.user_add(&user, true)?;
            // Like etcdinit, `root` is granted without ever being added as a role.
            if role != ROOT_ROLE {
                auth.role_add(role)?;
            }
            auth.user_grant_role(&user, role)?;
        }
        for perm in local {
            auth.role_grant_permission("local", perm)?;
        }
        for perm in remote {
            auth.role_grant_permission("remote", perm)?;
        }
        auth.enable()?;
        Ok(auth)
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The auth revision, reported by `AuthStatus`.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Turns auth on. Needs user `root` holding role `root`, or nobody could administer
    /// the store afterwards. Enabling twice is a no-op. Like etcd, this does not move the
    /// revision.
    pub fn enable(&mut self) -> Result<()> {
        if self.enabled {
            return Ok(());
        }
        let root = self.users.get(ROOT_USER).ok_or(Error::RootUserNotExist)?;
        if !root.roles.contains(ROOT_ROLE) {
            return Err(Error::RootRoleNotExist);
        }
        self.enabled = true;
        Ok(())
    }

    /// Turns auth off; a no-op when already off.
    pub fn disable(&mut self) {
        if self.enabled {
            self.enabled = false;
            self.commit();
        }
    }

    /// Adds a user. A password, if the request carried one, is accepted and dropped by the
    /// caller: the certificate CN is the only credential here, so storing a hash would only
    /// suggest a check that never happens.
    pub fn user_add(&mut self, name: &str, no_password: bool) -> Result<()> {
        if name.is_empty() {
            return Err(Error::UserEmpty);
        }
        if self.users.contains_key(name) {
            return Err(Error::UserAlreadyExists);
        }
        self.users.insert(name.to_owned(), User { roles: BTreeSet::new(), no_password });
        self.commit();
        Ok(())
    }

    /// The user's roles, sorted.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>> {
        let user = self.users.get(name).ok_or(Error::UserNotFound)?;
        Ok(user.roles.iter().cloned().collect())
    }

    /// All user names, sorted.
    pub fn user_list(&self) -> Vec<String> {
        self.users.keys().cloned().collect()
    }

    pub fn user_delete(&mut self, name: &str) -> Result<()> {
        if self.enabled && name == ROOT_USER {
            return Err(Error::InvalidAuthMgmt);
        }
        self.users.remove(name).ok_or(Error::UserNotFound)?;
        self.commit();
        Ok(())
    }

    /// Accepts a password change for an existing user and discards the password (see
    /// [`Self::user_add`]); the revision still moves, as in etcd.
    pub fn user_change_password(&mut self, name: &str) -> Result<()> {
        if !self.users.contains_key(name) {
            return Err(Error::UserNotFound);
        }
        self.commit();
        Ok(())
    }

    /// Grants `role` to `user`. Role `root` need not exist as a role (etcd special-cases it);
    /// granting a role the user already has succeeds without a change.
    pub fn user_grant_role(&mut self, user: &str, role: &str) -> Result<()> {
        let Some(entry) = self.users.get_mut(user) else {
            return Err(Error::UserNotFound);
        };
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(Error::RoleNotFound);
        }
        if entry.roles.insert(role.to_owned()) {
            self.commit();
        }
        Ok(())
    }

    pub fn user_revoke_role(&mut self, user: &str, role: &str) -> Result<()> {
        if self.enabled && user == ROOT_USER && role == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        let entry = self.users.get_mut(user).ok_or(Error::UserNotFound)?;
        if !entry.roles.remove(role) {
            return Err(Error::RoleNotGranted);
        }
        self.commit();
        Ok(())
    }

    pub fn role_add(&mut self, name: &str) -> Result<()> {
        if name.is_empty() {
            return Err(Error::RoleEmpty);
        }
        if self.roles.contains_key(name) {
            return Err(Error::RoleAlreadyExists);
        }
        self.roles.insert(name.to_owned(), Vec::new());
        self.commit();
        Ok(())
    }

    /// The role's permissions as granted; for `root` too, whose access needs none (etcd 3.5;
    /// 3.6 shows root one everything-permission instead).
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>> {
        self.roles.get(name).cloned().ok_or(Error::RoleNotFound)
    }

    /// All role names, sorted. Role `root` appears only once added with `role add`.
    pub fn role_list(&self) -> Vec<String> {
        self.roles.keys().cloned().collect()
    }

    /// Deletes a role and takes it away from every user holding it.
    pub fn role_delete(&mut self, name: &str) -> Result<()> {
        if self.enabled && name == ROOT_ROLE {
            return Err(Error::InvalidAuthMgmt);
        }
        self.roles.remove(name).ok_or(Error::RoleNotFound)?;
        for user in self.users.values_mut() {
            user.roles.remove(name);
        }
        self.commit();
        Ok(())
    }

    /// Grants a permission; one on the same `[key, range_end)` has its type replaced.
    pub fn role_grant_permission(&mut self, role: &str, perm: Permission) -> Result<()> {
        if !is_valid_permission_range(&perm.key, &perm.range_end) {
            return Err(Error::InvalidAuthMgmt);
        }
        let perms = self.roles.get_mut(role).ok_or(Error::RoleNotFound)?;
        let at = perms.binary_search_by(|p| (&p.key[..], &p.range_end[..]).cmp(&(&perm.key[..], &perm.range_end[..])));
        match at {
            Ok(i) => perms[i].perm_type = perm.perm_type,
            Err(i) => perms.insert(i, perm),
        }
        self.commit();
        Ok(())
    }

    /// Revokes the permission on exactly `[key, range_end)`, whatever its type.
    pub fn role_revoke_permission(&mut self, role: &str, key: &[u8], range_end: &[u8]) -> Result<()> {
        let perms = self.roles.get_mut(role).ok_or(Error::RoleNotFound)?;
        let before = perms.len();
        perms.retain(|p| p.key != key || p.range_end != range_end);
        if perms.len() == before {
            return Err(Error::PermissionNotGranted);
        }
        self.commit();
        Ok(())
    }

    /// Whether `user` exists and holds `role` (etcd lets a user read its own roles).
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.roles.contains(role))
    }

    /// Makes sure `user` exists and holds `role`, leaving its other roles alone; what
    /// Cilium's users manager does for each `remote-<peer>` entry. Returns whether anything
    /// changed. The role is checked first so a failure leaves no half-created user.
    pub fn user_enforce_presence(&mut self, user: &str, role: &str) -> Result<bool> {
        if user.is_empty() {
            return Err(Error::UserEmpty);
        }
        if role != ROOT_ROLE && !self.roles.contains_key(role) {
            return Err(Error::RoleNotFound);
        }
        let had = self.has_role(user, role);
        if !self.users.contains_key(user) {
            self.user_add(user, true)?;
        }
        self.user_grant_role(user, role)?;
        Ok(!had)
    }

    /// Makes sure `user` does not exist. Returns whether it was removed.
    pub fn user_enforce_absence(&mut self, user: &str) -> Result<bool> {
        match self.user_delete(user) {
            Ok(()) => Ok(true),
            Err(Error::UserNotFound) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// May `user` read `[key, range_end)`? Allowed for everyone while auth is off.
    pub fn check_read(&self, user: Option<&str>, key: &[u8], range_end: &[u8]) -> Result<()> {
        self.check_range(user, key, range_end, PermType::Read)
    }

    /// May `user` write (put, delete) `[key, range_end)`? Allowed for everyone while auth is off.
    pub fn check_write(&self, user: Option<&str>, key: &[u8], range_end: &[u8]) -> Result<()> {
        self.check_range(user, key, range_end, PermType::Write)
    }

    /// May `user` administer the store (auth, maintenance)? Only holders of role `root` may,
    /// once auth is on. The errors are etcd's `IsAdminPermitted`: no name → `UserEmpty`,
    /// unknown name → `UserNotFound`, otherwise `PermissionDenied`.
    pub fn check_admin(&self, user: Option<&str>) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let name = user.filter(|name| !name.is_empty()).ok_or(Error::UserEmpty)?;
        let user = self.users.get(name).ok_or(Error::UserNotFound)?;
        if user.roles.contains(ROOT_ROLE) { Ok(()) } else { Err(Error::PermissionDenied) }
    }

    fn check_range(&self, user: Option<&str>, key: &[u8], range_end: &[u8], wanted: PermType) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        // etcd answers a certificate without CN, and an unknown CN, with plain "permission
        // denied" for key-value requests (the user lookup of "" simply fails).
        let perms = user.and_then(|name| self.cache.get(name)).ok_or(Error::PermissionDenied)?;
        let asked = Interval::of_request(key, range_end);
        let allowed = perms.root
            || match wanted {
                PermType::Read => covers(&perms.read, &asked),
                PermType::Write => covers(&perms.write, &asked),
                PermType::Readwrite => covers(&perms.read, &asked) && covers(&perms.write, &asked),
            };
        if allowed { Ok(()) } else { Err(Error::PermissionDenied) }
    }

    /// What survives a restart (what etcd keeps in its backend's auth buckets): the switch,
    /// the revision, every user's roles and every role's permissions.
    pub fn state(&self) -> AuthState {
        AuthState {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.iter().map(|(name, user)| (name.clone(), user.roles.clone())).collect(),
            roles: self.roles.clone(),
        }
    }

    /// The store a saved [`AuthState`] describes. A state no etcd could have reached (a role
    /// granted that does not exist, auth on without `root`, an invalid range) is refused, so
    /// a damaged file fails start-up instead of granting something by accident.
    pub fn from_state(state: AuthState) -> std::result::Result<Self, InvalidAuthState> {
        let AuthState { enabled, revision, users, roles } = state;
        for (role, perms) in &roles {
            if let Some(perm) = perms.iter().find(|p| !is_valid_permission_range(&p.key, &p.range_end)) {
                return Err(InvalidAuthState(format!("role {role:?} has an invalid range {perm:?}")));
            }
        }
        for (user, granted) in &users {
            if let Some(role) = granted.iter().find(|r| r.as_str() != ROOT_ROLE && !roles.contains_key(*r)) {
                return Err(InvalidAuthState(format!("user {user:?} holds role {role:?}, which does not exist")));
            }
        }
        if enabled && !users.get(ROOT_USER).is_some_and(|r| r.contains(ROOT_ROLE)) {
            return Err(InvalidAuthState("auth is enabled but user root does not hold role root".to_owned()));
        }
        let users = users.into_iter().map(|(name, roles)| (name, User { roles, no_password: true })).collect();
        let mut roles = roles;
        for perms in roles.values_mut() {
            perms.sort_by(|a, b| (&a.key, &a.range_end).cmp(&(&b.key, &b.range_end)));
        }
        let mut auth = Self { enabled, revision, users, roles, cache: HashMap::new() };
        auth.rebuild_cache();
        Ok(auth)
    }

    /// Records a change: moves the revision and rebuilds the permission cache.
    fn commit(&mut self) {
        self.revision += 1;
        self.rebuild_cache();
    }

    fn rebuild_cache(&mut self) {
        self.cache =
            self.users.iter().map(|(name, user)| (name.clone(), UserPerms::merge(user, &self.roles))).collect();
    }
}

/// The persistent part of an [`AuthStore`]; see [`AuthStore::state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    /// User name → the roles granted to it.
    pub users: BTreeMap<String, BTreeSet<String>>,
    /// Role name → its permissions.
    pub roles: BTreeMap<String, Vec<Permission>>,
}

#[derive(Debug, thiserror::Error)]
#[error("inconsistent auth state: {0}")]
pub struct InvalidAuthState(String);

/// etcd's `isValidPermissionRange`: a non-empty key, and either a single key, a proper
/// range, or an open-ended one.
fn is_valid_permission_range(key: &[u8], range_end: &[u8]) -> bool {
    !key.is_empty() && (range_end.is_empty() || key < range_end || range_end == b"\0")
}

/// One user's permissions, merged into sorted, disjoint, non-adjacent intervals per kind.
#[derive(Debug, Clone, Default)]
struct UserPerms {
    root: bool,
    read: Vec<Interval>,
    write: Vec<Interval>,
}

impl UserPerms {
    fn merge(user: &User, roles: &BTreeMap<String, Vec<Permission>>) -> Self {
        let mut read = Vec::new();
        let mut write = Vec::new();
        // A granted role that was never created (only possible for `root`) has no
        // permissions; root's power comes from `root: true`, not from intervals.
        for perm in user.roles.iter().filter_map(|name| roles.get(name)).flatten() {
            let interval = Interval::of_permission(&perm.key, &perm.range_end);
            match perm.perm_type {
                PermType::Read => read.push(interval),
                PermType::Write => write.push(interval),
                PermType::Readwrite => {
                    read.push(interval.clone());
                    write.push(interval);
                }
            }
        }
        Self { root: user.roles.contains(ROOT_ROLE), read: union(read), write: union(write) }
    }
}

/// A half-open key interval `[start, end)`; `end: None` is unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    /// A single key `k` is the interval `[k, k\0)`: no key sorts strictly between the two.
    fn point(key: &[u8]) -> Self {
        let mut end = key.to_vec();
        end.push(0);
        Self { start: key.to_vec(), end: Some(end) }
    }

    fn of_permission(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Self::point(key),
            [0] => Self { start: key.to_vec(), end: None },
            end => Self { start: key.to_vec(), end: Some(end.to_vec()) },
        }
    }

    /// The keys a request addresses. A reversed range selects nothing; it is checked as its
    /// start key so that it can neither fail oddly nor grant anything.
    fn of_request(key: &[u8], range_end: &[u8]) -> Self {
        match range_end {
            [] => Self::point(key),
            [0] => Self { start: key.to_vec(), end: None },
            end if end <= key => Self::point(key),
            end => Self { start: key.to_vec(), end: Some(end.to_vec()) },
        }
    }

    /// Does this interval reach at least as far as `end`?
    fn reaches(&self, end: Option<&[u8]>) -> bool {
        match (&self.end, end) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(mine), Some(theirs)) => mine.as_slice() >= theirs,
        }
    }
}

/// Merges intervals into sorted, disjoint ones; touching intervals merge too, since
/// `[a, b) ∪ [b, c)` is `[a, c)` (etcd's interval tree treats them as contiguous as well).
fn union(mut intervals: Vec<Interval>) -> Vec<Interval> {
    intervals.sort_by(|a, b| a.start.cmp(&b.start));
    let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
    for next in intervals {
        match merged.last_mut() {
            Some(last) if last.reaches(Some(&next.start)) => {
                if !last.reaches(next.end.as_deref()) {
                    last.end = next.end;
                }
            }
            _ => merged.push(next),
        }
    }
    merged
}

/// Is `wanted` inside the union? With merged intervals it must fit in a single one: the
/// last one starting at or before it.
fn covers(merged: &[Interval], wanted: &Interval) -> bool {
    let after = merged.partition_point(|i| i.start <= wanted.start);
    after > 0 && merged[after - 1].reaches(wanted.end.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Option<&str> = Some("alice");

    /// Auth enabled, root set up, and `alice` holding role `r` with `perms`.
    fn store_with(perms: &[Permission]) -> AuthStore {
        let mut auth = AuthStore::default();
        auth.user_add("root", true).unwrap();
        auth.user_grant_role("root", "root").unwrap();
        auth.user_add("alice", true).unwrap();
        auth.role_add("r").unwrap();
        auth.user_grant_role("alice", "r").unwrap();
        for perm in perms {
            auth.role_grant_permission("r", perm.clone()).unwrap();
        }
        auth.enable().unwrap();
        auth
    }

    fn read(key: &str, end: &str) -> Permission {
        Permission::new(PermType::Read, key.to_owned(), end.to_owned())
    }

    #[test]
    fn default_store_is_disabled_empty_and_at_revision_one() {
        let auth = AuthStore::default();
        assert!(!auth.is_enabled());
        assert_eq!(auth.revision(), 1);
        assert!(auth.user_list().is_empty());
        assert!(auth.role_list().is_empty());
    }

    #[test]
    fn disabled_auth_allows_everything_even_without_a_user() {
        let auth = AuthStore::default();
        assert_eq!(auth.check_read(None, b"a", b""), Ok(()));
        assert_eq!(auth.check_write(Some("ghost"), b"\0", b"\0"), Ok(()));
        assert_eq!(auth.check_admin(None), Ok(()));
    }

    #[test]
    fn enable_requires_root_user_with_root_role() {
        let mut auth = AuthStore::default();
        assert_eq!(auth.enable(), Err(Error::RootUserNotExist));
        auth.user_add("root", true).unwrap();
        assert_eq!(auth.enable(), Err(Error::RootRoleNotExist));
        auth.user_grant_role("root", "root").unwrap();
        assert_eq!(auth.enable(), Ok(()));
        assert!(auth.is_enabled());
        assert_eq!(auth.enable(), Ok(()), "enabling twice is fine");
    }

    #[test]
    fn root_role_can_be_granted_before_it_exists_and_added_later() {
        let mut auth = AuthStore::default();
        auth.user_add("root", true).unwrap();
        auth.user_grant_role("root", "root").unwrap();
        assert_eq!(auth.role_get("root"), Err(Error::RoleNotFound));
        assert!(auth.role_list().is_empty());
        auth.role_add("root").unwrap();
        assert_eq!(auth.role_get("root"), Ok(vec![]));
        assert_eq!(auth.role_list(), vec!["root"]);
    }

    #[test]
    fn disable_is_idempotent_and_bumps_the_revision_once() {
        let mut auth = store_with(&[]);
        let rev = auth.revision();
        auth.disable();
        assert!(!auth.is_enabled());
        assert_eq!(auth.revision(), rev + 1);
        auth.disable();
        assert_eq!(auth.revision(), rev + 1);
    }

    #[test]
    fn every_change_bumps_the_revision_but_a_repeated_grant_does_not() {
        let mut auth = AuthStore::default();
        let mut rev = auth.revision();
        let mut bumped = |auth: &AuthStore| {
            let moved = auth.revision() > rev;
            rev = auth.revision();
            moved
        };
        auth.user_add("u", false).unwrap();
        assert!(bumped(&auth));
        auth.role_add("r").unwrap();
        assert!(bumped(&auth));
        auth.user_grant_role("u", "r").unwrap();
        assert!(bumped(&auth));
        auth.user_grant_role("u", "r").unwrap();
        assert!(!bumped(&auth));
        auth.role_grant_permission("r", read("a", "")).unwrap();
        assert!(bumped(&auth));
        auth.user_change_password("u").unwrap();
        assert!(bumped(&auth));
        auth.role_revoke_permission("r", b"a", b"").unwrap();
        assert!(bumped(&auth));
        auth.user_revoke_role("u", "r").unwrap();
        assert!(bumped(&auth));
        auth.role_delete("r").unwrap();
        assert!(bumped(&auth));
        auth.user_delete("u").unwrap();
        assert!(bumped(&auth));
        assert_eq!(auth.user_add("", false), Err(Error::UserEmpty));
        assert!(!bumped(&auth));
    }

    #[test]
    fn empty_and_duplicate_names_are_rejected() {
        let mut auth = AuthStore::default();
        assert_eq!(auth.user_add("", true), Err(Error::UserEmpty));
        assert_eq!(auth.role_add(""), Err(Error::RoleEmpty));
        auth.user_add("u", true).unwrap();
        auth.role_add("r").unwrap();
        assert_eq!(auth.user_add("u", true), Err(Error::UserAlreadyExists));
        assert_eq!(auth.role_add("r"), Err(Error::RoleAlreadyExists));
    }

    #[test]
    fn operations_on_missing_users_and_roles_fail_with_not_found() {
        let mut auth = AuthStore::default();
        auth.user_add("u", true).unwrap();
        auth.role_add("r").unwrap();
        assert_eq!(auth.user_get("x"), Err(Error::UserNotFound));
        assert_eq!(auth.user_delete("x"), Err(Error::UserNotFound));
        assert_eq!(auth.user_change_password("x"), Err(Error::UserNotFound));
        assert_eq!(auth.user_grant_role("x", "r"), Err(Error::UserNotFound));
        assert_eq!(auth.user_grant_role("u", "x"), Err(Error::RoleNotFound));
        assert_eq!(auth.user_revoke_role("x", "r"), Err(Error::UserNotFound));
        assert_eq!(auth.role_get("x"), Err(Error::RoleNotFound));
        assert_eq!(auth.role_delete("x"), Err(Error::RoleNotFound));
        assert_eq!(auth.role_grant_permission("x", read("a", "")), Err(Error::RoleNotFound));
        assert_eq!(auth.role_revoke_permission("x", b"a", b""), Err(Error::RoleNotFound));
    }

    #[test]
    fn revoking_what_was_never_granted_fails() {
        let mut auth = AuthStore::default();
        auth.user_add("u", true).unwrap();
        auth.role_add("r").unwrap();
        assert_eq!(auth.user_revoke_role("u", "r"), Err(Error::RoleNotGranted));
        auth.role_grant_permission("r", read("a", "b")).unwrap();
        assert_eq!(auth.role_revoke_permission("r", b"a", b""), Err(Error::PermissionNotGranted));
        assert_eq!(auth.role_revoke_permission("r", b"a", b"b"), Ok(()));
    }

    #[test]
    fn root_cannot_be_deleted_or_demoted_while_auth_is_enabled() {
        let mut auth = store_with(&[]);
        auth.role_add("root").unwrap();
        assert_eq!(auth.user_delete("root"), Err(Error::InvalidAuthMgmt));
        assert_eq!(auth.user_revoke_role("root", "root"), Err(Error::InvalidAuthMgmt));
        assert_eq!(auth.role_delete("root"), Err(Error::InvalidAuthMgmt));
        auth.disable();
        assert_eq!(auth.user_revoke_role("root", "root"), Ok(()));
        assert_eq!(auth.role_delete("root"), Ok(()));
        assert_eq!(auth.user_delete("root"), Ok(()));
    }

    #[test]
    fn granting_the_same_range_again_replaces_its_type() {
        let mut auth = AuthStore::default();
        auth.role_add("r").unwrap();
        auth.role_grant_permission("r", read("b", "c")).unwrap();
        auth.role_grant_permission("r", read("a", "")).unwrap();
        auth.role_grant_permission("r", Permission::new(PermType::Write, "b", "c")).unwrap();
        assert_eq!(auth.role_get("r").unwrap(), vec![read("a", ""), Permission::new(PermType::Write, "b", "c")],);
    }

    #[test]
    fn invalid_permission_ranges_are_rejected() {
        let mut auth = AuthStore::default();
        auth.role_add("r").unwrap();
        for (key, end) in [("", ""), ("b", "a"), ("a", "a"), ("", "\0")] {
            assert_eq!(
                auth.role_grant_permission("r", read(key, end)),
                Err(Error::InvalidAuthMgmt),
                "[{key:?}, {end:?})",
            );
        }
        assert_eq!(auth.role_grant_permission("r", read("\0", "\0")), Ok(()));
    }

    #[test]
    fn deleting_a_role_takes_it_from_its_users() {
        let mut auth = AuthStore::default();
        auth.user_add("u", true).unwrap();
        auth.role_add("a").unwrap();
        auth.role_add("b").unwrap();
        auth.user_grant_role("u", "b").unwrap();
        auth.user_grant_role("u", "a").unwrap();
        assert_eq!(auth.user_get("u").unwrap(), vec!["a", "b"], "roles come back sorted");
        auth.role_delete("a").unwrap();
        assert_eq!(auth.user_get("u").unwrap(), vec!["b"]);
    }

    #[test]
    fn single_key_permission_covers_only_that_key() {
        let auth = store_with(&[read("k", "")]);
        assert_eq!(auth.check_read(ALICE, b"k", b""), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"k", b"k\0"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"k0", b""), Err(Error::PermissionDenied));
        assert_eq!(auth.check_read(ALICE, b"k", b"l"), Err(Error::PermissionDenied));
        assert_eq!(auth.check_write(ALICE, b"k", b""), Err(Error::PermissionDenied));
    }

    #[test]
    fn permission_union_covers_adjacent_ranges() {
        let auth = store_with(&[read("a", "c"), read("c", "e")]);
        assert_eq!(auth.check_read(ALICE, b"a", b"e"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"b", b"d"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"a", b"e\0"), Err(Error::PermissionDenied));
    }

    #[test]
    fn permission_union_does_not_bridge_gaps() {
        let auth = store_with(&[read("a", "c"), read("d", "f")]);
        assert_eq!(auth.check_read(ALICE, b"b", b""), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"e", b""), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"c", b""), Err(Error::PermissionDenied));
        assert_eq!(auth.check_read(ALICE, b"a", b"f"), Err(Error::PermissionDenied));
    }

    #[test]
    fn overlapping_and_nested_permissions_merge() {
        let auth = store_with(&[read("a", "d"), read("b", "c"), read("c", "g"), read("x", "")]);
        assert_eq!(auth.check_read(ALICE, b"a", b"g"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"x", b""), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"a", b"x\0"), Err(Error::PermissionDenied));
    }

    #[test]
    fn open_ended_permission_covers_everything_from_its_key() {
        let auth = store_with(&[read("m", "\0")]);
        assert_eq!(auth.check_read(ALICE, b"m", b"\0"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"zzz", b""), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"\xff\xff", b"\0"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"l", b"\0"), Err(Error::PermissionDenied));
    }

    #[test]
    fn open_ended_request_needs_an_open_ended_permission() {
        let auth = store_with(&[read("a", "\x7f")]);
        assert_eq!(auth.check_read(ALICE, b"a", b"\0"), Err(Error::PermissionDenied));
        let all = store_with(&[read("\0", "\0")]);
        assert_eq!(all.check_read(ALICE, b"\0", b"\0"), Ok(()));
    }

    #[test]
    fn readwrite_counts_for_both_and_write_does_not_grant_read() {
        let auth = store_with(&[
            Permission::new(PermType::Readwrite, "rw/", "rw0"),
            Permission::new(PermType::Write, "w/", "w0"),
        ]);
        assert_eq!(auth.check_read(ALICE, b"rw/x", b""), Ok(()));
        assert_eq!(auth.check_write(ALICE, b"rw/x", b""), Ok(()));
        assert_eq!(auth.check_write(ALICE, b"w/", b"w0"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"w/x", b""), Err(Error::PermissionDenied));
    }

    #[test]
    fn permissions_from_several_roles_combine() {
        let mut auth = store_with(&[read("a", "b")]);
        auth.role_add("s").unwrap();
        auth.role_grant_permission("s", read("b", "c")).unwrap();
        assert_eq!(auth.check_read(ALICE, b"a", b"c"), Err(Error::PermissionDenied));
        auth.user_grant_role("alice", "s").unwrap();
        assert_eq!(auth.check_read(ALICE, b"a", b"c"), Ok(()));
        auth.user_revoke_role("alice", "s").unwrap();
        assert_eq!(auth.check_read(ALICE, b"a", b"c"), Err(Error::PermissionDenied));
    }

    #[test]
    fn unknown_or_anonymous_users_are_denied_when_enabled() {
        let auth = store_with(&[]);
        assert_eq!(auth.check_read(None, b"a", b""), Err(Error::PermissionDenied));
        assert_eq!(auth.check_read(Some("ghost"), b"a", b""), Err(Error::PermissionDenied));
        assert_eq!(auth.check_admin(None), Err(Error::UserEmpty));
        assert_eq!(auth.check_admin(Some("")), Err(Error::UserEmpty));
        assert_eq!(auth.check_admin(Some("ghost")), Err(Error::UserNotFound));
        assert_eq!(auth.check_admin(ALICE), Err(Error::PermissionDenied));
    }

    #[test]
    fn root_role_holders_may_do_anything() {
        let auth = store_with(&[]);
        assert_eq!(auth.check_admin(Some("root")), Ok(()));
        assert_eq!(auth.check_write(Some("root"), b"\0", b"\0"), Ok(()));
        assert_eq!(auth.check_read(Some("root"), b"anything", b""), Ok(()));
    }

    #[test]
    fn deleting_a_user_revokes_its_access() {
        let mut auth = store_with(&[read("a", "")]);
        assert_eq!(auth.check_read(ALICE, b"a", b""), Ok(()));
        auth.user_delete("alice").unwrap();
        assert_eq!(auth.check_read(ALICE, b"a", b""), Err(Error::PermissionDenied));
    }

    #[test]
    fn reversed_request_range_is_checked_as_its_start_key() {
        let auth = store_with(&[read("k", "")]);
        assert_eq!(auth.check_read(ALICE, b"k", b"a"), Ok(()));
        assert_eq!(auth.check_read(ALICE, b"j", b"a"), Err(Error::PermissionDenied));
    }

    #[test]
    fn prefix_end_increments_the_last_byte_that_can_be() {
        assert_eq!(prefix_end(b"cilium/state/"), b"cilium/state0");
        assert_eq!(prefix_end(b"cilium/.heartbeat"), b"cilium/.heartbeau");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
        assert_eq!(prefix_end(b""), b"\0");
    }

    #[test]
    fn enforce_presence_creates_and_grants_idempotently() {
        let mut auth = AuthStore::cilium("c1");
        assert_eq!(auth.user_enforce_presence("remote-c2", "remote"), Ok(true));
        let rev = auth.revision();
        assert_eq!(auth.user_enforce_presence("remote-c2", "remote"), Ok(false));
        assert_eq!(auth.revision(), rev);
        assert_eq!(auth.user_get("remote-c2").unwrap(), vec!["remote"]);
        assert_eq!(auth.check_read(Some("remote-c2"), b"cilium/state/x", b""), Ok(()));
    }

    #[test]
    fn enforce_presence_with_missing_role_creates_nothing() {
        let mut auth = AuthStore::cilium("c1");
        assert_eq!(auth.user_enforce_presence("remote-c2", "nope"), Err(Error::RoleNotFound));
        assert_eq!(auth.user_get("remote-c2"), Err(Error::UserNotFound));
        assert_eq!(auth.user_enforce_presence("", "remote"), Err(Error::UserEmpty));
    }

    #[test]
    fn enforce_absence_is_idempotent_and_spares_root() {
        let mut auth = AuthStore::cilium("c1");
        auth.user_enforce_presence("remote-c2", "remote").unwrap();
        assert_eq!(auth.user_enforce_absence("remote-c2"), Ok(true));
        assert_eq!(auth.user_enforce_absence("remote-c2"), Ok(false));
        assert_eq!(auth.user_enforce_absence("root"), Err(Error::InvalidAuthMgmt));
    }

    #[test]
    fn cilium_store_has_etcdinits_users_and_roles_with_auth_enabled() {
        let auth = AuthStore::cilium("c1");
        assert!(auth.is_enabled());
        assert_eq!(auth.user_list(), vec!["admin-c1", "local-c1", "remote", "root"]);
        assert_eq!(auth.role_list(), vec!["local", "remote"]);
        assert_eq!(auth.user_get("root").unwrap(), vec!["root"]);
        assert_eq!(auth.user_get("admin-c1").unwrap(), vec!["root"]);
        assert_eq!(auth.user_get("local-c1").unwrap(), vec!["local"]);
        assert_eq!(auth.user_get("remote").unwrap(), vec!["remote"]);
    }

    #[test]
    fn cilium_roles_hold_etcdinits_exact_ranges() {
        let auth = AuthStore::cilium("c1");
        let mut local = vec![
            read("cilium/.heartbeat", "cilium/.heartbeau"),
            read("cilium/cache/", "cilium/cache0"),
            read("cilium/cluster-config/", "cilium/cluster-config0"),
            read("cilium/synced/", "cilium/synced0"),
        ];
        let mut remote = vec![
            read("cilium/.heartbeat", "cilium/.heartbeau"),
            read("cilium/state/", "cilium/state0"),
            read("cilium/cluster-config/c1", ""),
            read("cilium/synced/c1/", "cilium/synced/c10"),
        ];
        local.sort_by(|a, b| a.key.cmp(&b.key));
        remote.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(auth.role_get("local").unwrap(), local);
        assert_eq!(auth.role_get("remote").unwrap(), remote);
    }

    #[test]
    fn cilium_store_without_cluster_name_uses_bare_names() {
        let auth = AuthStore::cilium("");
        assert_eq!(auth.user_list(), vec!["admin", "local", "remote", "root"]);
        let remote = auth.role_get("remote").unwrap();
        assert!(remote.contains(&read("cilium/cluster-config", "")));
        assert!(remote.contains(&read("cilium/synced/", "cilium/synced0")));
    }

    #[test]
    fn admin_user_of_the_cluster_has_full_access() {
        let auth = AuthStore::cilium("c1");
        assert_eq!(auth.check_admin(Some("admin-c1")), Ok(()));
        assert_eq!(auth.check_write(Some("admin-c1"), b"cilium/state/x", b""), Ok(()));
        assert_eq!(auth.check_admin(Some("remote")), Err(Error::PermissionDenied));
    }

    #[test]
    fn remote_user_reads_what_a_remote_agent_needs() {
        let auth = AuthStore::cilium("c1");
        let remote = Some("remote");
        assert_eq!(auth.check_read(remote, b"cilium/.heartbeat", b""), Ok(()));
        assert_eq!(auth.check_read(remote, b"cilium/state/", b"cilium/state0"), Ok(()));
        assert_eq!(auth.check_read(remote, b"cilium/state/nodes/v1/", b"cilium/state/nodes/v10"), Ok(()));
        assert_eq!(auth.check_read(remote, b"cilium/cluster-config/c1", b""), Ok(()));
        assert_eq!(auth.check_read(remote, b"cilium/synced/c1/", b"cilium/synced/c10"), Ok(()));
        assert_eq!(auth.check_read(remote, b"cilium/synced/c1/cilium/state/nodes/v1", b""), Ok(()));
    }

    #[test]
    fn remote_user_cannot_read_outside_state_prefix() {
        let auth = AuthStore::cilium("c1");
        let remote = Some("remote");
        let denied = Err(Error::PermissionDenied);
        assert_eq!(auth.check_read(remote, b"cilium/", b"cilium0"), denied);
        assert_eq!(auth.check_read(remote, b"\0", b"\0"), denied);
        assert_eq!(auth.check_read(remote, b"cilium/cache/", b"cilium/cache0"), denied);
        assert_eq!(auth.check_read(remote, b"cilium/cluster-config/c2", b""), denied);
        assert_eq!(auth.check_read(remote, b"cilium/synced/c2/", b"cilium/synced/c20"), denied);
        assert_eq!(auth.check_read(remote, b"cilium/stateless", b""), denied);
        assert_eq!(auth.check_write(remote, b"cilium/state/x", b""), denied);
    }

    #[test]
    fn local_user_reads_cache_config_and_synced_but_not_state() {
        let auth = AuthStore::cilium("c1");
        let local = Some("local-c1");
        assert_eq!(auth.check_read(local, b"cilium/cache/", b"cilium/cache0"), Ok(()));
        assert_eq!(auth.check_read(local, b"cilium/cluster-config/c2", b""), Ok(()));
        assert_eq!(auth.check_read(local, b"cilium/synced/c2/x", b""), Ok(()));
        assert_eq!(auth.check_read(local, b"cilium/.heartbeat", b""), Ok(()));
        assert_eq!(auth.check_read(local, b"cilium/state/x", b""), Err(Error::PermissionDenied));
        assert_eq!(auth.check_write(local, b"cilium/cache/x", b""), Err(Error::PermissionDenied));
    }
}
