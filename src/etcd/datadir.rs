//! The store's data directory (etcd's `--data-dir`): what `etcdinit` leaves there for the
//! `etcd` container of Cilium's pod, and what the store keeps there across restarts.
//!
//! Cilium's pod runs `etcdinit` in an init container and the store in the next one; the two
//! only share the data directory (an emptyDir). With a real etcd that is a bbolt backend
//! holding the users, roles and auth switch. Here it is one versioned JSON document:
//!
//! ```text
//! <data-dir>/clustermesh-apiserver/auth.json   users, roles, auth switch, auth revision
//! ```
//!
//! Written atomically (temporary file, fsync, rename), so a crash leaves the old or the new
//! state, never half of one. Keys of permissions are kept as text when they are UTF-8 (all of
//! Cilium's are) and as base64 otherwise, so nothing an etcd client can grant is lost.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::auth::{AuthState, AuthStore, InvalidAuthState, PermType, Permission};

/// The subdirectory this project owns, beside whatever else an operator keeps there.
pub(crate) const STATE_DIR: &str = "clustermesh-apiserver";
const AUTH_FILE: &str = "auth.json";
/// Bumped on any change a previous release could misread; readers refuse other versions.
const AUTH_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: format {found} is not understood by this release (expected {AUTH_FORMAT})")]
    Format { path: PathBuf, found: u32 },
    #[error("{path}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidAuthState,
    },
    #[error("{path}: key {key:?} is not valid base64")]
    Base64 { path: PathBuf, key: String },
}

/// Who wrote the state, for an operator reading the file (never consulted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `etcdinit` or `store`.
    pub writer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub etcd_cluster_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initial_cluster_token: String,
    pub version: String,
}

impl Origin {
    pub fn store() -> Self {
        Self { writer: "store".to_owned(), version: env!("CARGO_PKG_VERSION").to_owned(), ..Self::default() }
    }
}

#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
}

impl DataDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn auth_path(&self) -> PathBuf {
        self.path.join(STATE_DIR).join(AUTH_FILE)
    }

    /// Removes every entry inside the directory, keeping the directory itself (in Cilium's pod
    /// it is an emptyDir mount point, which cannot be removed); creates it when missing.
    pub fn clear(&self) -> Result<(), DataDirError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| DataDirError::Io { action, path, source }
        };
        std::fs::create_dir_all(&self.path).map_err(io("creating", &self.path))?;
        for entry in std::fs::read_dir(&self.path).map_err(io("listing", &self.path))? {
            let entry = entry.map_err(io("listing", &self.path))?;
            let path = entry.path();
            let is_dir = entry.file_type().map_err(io("inspecting", &path))?.is_dir();
            let removed = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.map_err(io("removing", &path))?;
        }
        Ok(())
    }

    /// The saved users and roles, or `None` for a directory no store or etcdinit wrote to.
    pub fn load_auth(&self) -> Result<Option<AuthStore>, DataDirError> {
        let path = self.auth_path();
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(DataDirError::Io { action: "reading", path, source }),
        };
        let file: AuthFile =
            serde_json::from_slice(&text).map_err(|source| DataDirError::Parse { path: path.clone(), source })?;
        if file.format != AUTH_FORMAT {
            return Err(DataDirError::Format { path, found: file.format });
        }
        let state = file.auth.into_state().map_err(|key| DataDirError::Base64 { path: path.clone(), key })?;
        AuthStore::from_state(state).map(Some).map_err(|source| DataDirError::Invalid { path, source })
    }

    pub fn save_auth(&self, state: AuthState, origin: Origin) -> Result<(), DataDirError> {
        let file = AuthFile { format: AUTH_FORMAT, origin, auth: AuthRecord::from_state(state) };
        let mut text = serde_json::to_vec_pretty(&file).expect("the auth record serializes");
        text.push(b'\n');
        write_atomically(&self.auth_path(), &text)
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), DataDirError> {
    let dir = path.parent().expect("state files live in a directory");
    let io = |action, path: &Path| {
        let path = path.to_owned();
        move |source| DataDirError::Io { action, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    file.write_all(contents).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("renaming", path))?;
    // The rename is durable only once the directory entry is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io("syncing", dir))
}

#[derive(Debug, Serialize, Deserialize)]
struct AuthFile {
    format: u32,
    origin: Origin,
    auth: AuthRecord,
}

#[derive(Debug, Serialize, Deserialize)]
struct AuthRecord {
    enabled: bool,
    revision: u64,
    users: BTreeMap<String, BTreeSet<String>>,
    roles: BTreeMap<String, Vec<PermissionRecord>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PermissionRecord {
    #[serde(rename = "type")]
    perm_type: PermKind,
    key: KeyRecord,
    #[serde(default, skip_serializing_if = "KeyRecord::is_empty")]
    range_end: KeyRecord,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PermKind {
    Read,
    Write,
    Readwrite,
}

/// A key as text when it is UTF-8, else `{"base64": "..."}`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum KeyRecord {
    Text(String),
    Base64 { base64: String },
}

impl Default for KeyRecord {
    fn default() -> Self {
        Self::Text(String::new())
    }
}

impl KeyRecord {
    fn of(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::Text(text.to_owned()),
            Err(_) => Self::Base64 { base64: BASE64.encode(bytes) },
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Text(text) if text.is_empty())
    }

    fn into_bytes(self) -> Result<Bytes, String> {
        match self {
            Self::Text(text) => Ok(Bytes::from(text)),
            Self::Base64 { base64 } => BASE64.decode(&base64).map(Bytes::from).map_err(|_| base64),
        }
    }
}

impl AuthRecord {
    fn from_state(state: AuthState) -> Self {
        let kind = |t| match t {
            PermType::Read => PermKind::Read,
            PermType::Write => PermKind::Write,
            PermType::Readwrite => PermKind::Readwrite,
        };
        let roles = state
            .roles
            .into_iter()
            .map(|(role, perms)| {
                let perms = perms
                    .iter()
                    .map(|p| PermissionRecord {
                        perm_type: kind(p.perm_type),
                        key: KeyRecord::of(&p.key),
                        range_end: KeyRecord::of(&p.range_end),
                    })
                    .collect();
                (role, perms)
            })
            .collect();
        Self { enabled: state.enabled, revision: state.revision, users: state.users, roles }
    }

    /// Fails with the offending base64 text.
    fn into_state(self) -> Result<AuthState, String> {
        let kind = |k| match k {
            PermKind::Read => PermType::Read,
            PermKind::Write => PermType::Write,
            PermKind::Readwrite => PermType::Readwrite,
        };
        let mut roles = BTreeMap::new();
        for (role, records) in self.roles {
            let mut perms = Vec::with_capacity(records.len());
            for record in records {
                perms.push(Permission::new(
                    kind(record.perm_type),
                    record.key.into_bytes()?,
                    record.range_end.into_bytes()?,
                ));
            }
            roles.insert(role, perms);
        }
        Ok(AuthState { enabled: self.enabled, revision: self.revision, users: self.users, roles })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciliums_users_and_roles_survive_a_save_and_a_load() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        let mut auth = AuthStore::cilium("cluster1");
        auth.role_add("odd").unwrap();
        auth.role_grant_permission("odd", Permission::new(PermType::Write, &b"\xff\x00key"[..], &b"\xff\x01"[..]))
            .unwrap();
        data.save_auth(auth.state(), Origin::store()).unwrap();

        let loaded = data.load_auth().unwrap().expect("saved state");
        assert_eq!(loaded.state(), auth.state());
        assert!(loaded.is_enabled());
        assert!(loaded.check_read(Some("remote"), b"cilium/state/nodes/v1/x", b"").is_ok());
        assert!(loaded.check_read(Some("remote"), b"cilium/cache/nodes/v1/x", b"").is_err());
    }

    #[test]
    fn an_empty_directory_has_no_state_and_clearing_keeps_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path());
        assert!(data.load_auth().unwrap().is_none());
        data.save_auth(AuthStore::cilium("c1").state(), Origin::store()).unwrap();
        std::fs::write(dir.path().join("stray"), b"x").unwrap();
        data.clear().unwrap();
        assert!(dir.path().is_dir());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_state_no_etcd_could_reach_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_DIR).join(AUTH_FILE);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let write = |json: &str| std::fs::write(&path, json).unwrap();
        let data = DataDir::new(dir.path());

        write(
            r#"{"format":1,"origin":{"writer":"x","version":"0"},"auth":{"enabled":true,"revision":3,"users":{},"roles":{}}}"#,
        );
        assert!(matches!(data.load_auth(), Err(DataDirError::Invalid { .. })));
        write(
            r#"{"format":2,"origin":{"writer":"x","version":"0"},"auth":{"enabled":false,"revision":1,"users":{},"roles":{}}}"#,
        );
        assert!(matches!(data.load_auth(), Err(DataDirError::Format { found: 2, .. })));
        write("{");
        assert!(matches!(data.load_auth(), Err(DataDirError::Parse { .. })));
    }
}
