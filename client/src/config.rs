//! Cilium's clustermesh configuration directory: one etcd client YAML file per remote cluster,
//! named after the cluster (`pkg/clustermesh/common/config.go`, `pkg/kvstore/etcd.go`).

use std::collections::BTreeMap;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::wire::ClusterName;

/// Why a config file or the directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One remote cluster's etcd client configuration (the subset of
/// `go.etcd.io/etcd/client/v3/yaml` Cilium's files use).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EtcdConfig {
    /// `https://host:port` URLs (plain `http://` only with `insecure-transport`).
    pub endpoints: Vec<String>,
    /// `trusted-ca-file` (or the deprecated `ca-file`).
    pub trusted_ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_transport: bool,
    pub insecure_skip_tls_verify: bool,
    pub dial_timeout: Option<Duration>,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawEtcdConfig {
    #[serde(default)]
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    insecure_transport: bool,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    dial_timeout: Option<RawDuration>,
    username: Option<String>,
    password: Option<String>,
}

/// Go's YAML → JSON → `time.Duration` takes nanoseconds; a Go duration string is accepted too.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Nanos(u64),
    Text(String),
}

/// Parses a Go duration like `5s`, `1m30s`, `250ms`.
fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds).ok()?;
    }
    Some(total)
}

impl EtcdConfig {
    /// Parses the YAML text of a config file; relative paths are taken as they are (Cilium's
    /// files carry absolute paths into the same mounted directory).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let raw: RawEtcdConfig =
            serde_saphyr::from_str(text).map_err(|e| Error::Parse { path: path.into(), reason: e.to_string() })?;
        let invalid = |reason: &str| Error::Invalid { path: path.into(), reason: reason.into() };
        if raw.endpoints.is_empty() {
            return Err(invalid("no endpoints"));
        }
        let dial_timeout = match raw.dial_timeout {
            None | Some(RawDuration::Nanos(0)) => None,
            Some(RawDuration::Nanos(nanos)) => Some(Duration::from_nanos(nanos)),
            Some(RawDuration::Text(text)) => Some(parse_go_duration(&text).ok_or_else(|| invalid("bad dial-timeout"))?),
        };
        Ok(Self {
            endpoints: raw.endpoints,
            trusted_ca_file: raw.trusted_ca_file.or(raw.ca_file),
            cert_file: raw.cert_file,
            key_file: raw.key_file,
            insecure_transport: raw.insecure_transport,
            insecure_skip_tls_verify: raw.insecure_skip_tls_verify,
            dial_timeout,
            username: raw.username.filter(|u| !u.is_empty()),
            password: raw.password,
        })
    }

    pub async fn load(path: &Path) -> Result<Self> {
        let text = tokio::fs::read_to_string(path).await.map_err(|source| Error::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// The files this config refers to (CA, certificate, key).
    pub fn referenced_files(&self) -> impl Iterator<Item = &Path> {
        [&self.trusted_ca_file, &self.cert_file, &self.key_file].into_iter().flatten().map(PathBuf::as_path)
    }
}

/// Cilium's test for a remote-cluster file: its content contains `endpoints:`
/// (`isEtcdConfigFile`). Other files in the directory (certificates, keys) are ignored.
pub fn is_cluster_config(content: &str) -> bool {
    content.contains("endpoints:")
}

/// One remote cluster's file as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFile {
    pub path: PathBuf,
    /// Changes whenever the file or a certificate, key or CA it names changes.
    pub fingerprint: u64,
}

/// The configuration directory (`--clustermesh-config`).
#[derive(Debug, Clone)]
pub struct ConfigDir {
    path: PathBuf,
}

impl ConfigDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every remote cluster configured in the directory, by name. Symbolic links are followed
    /// (Kubernetes Secret mounts), directories skipped, and the local cluster's own file and
    /// files whose name is not a valid cluster name are ignored with a warning.
    ///
    /// The fingerprint covers the TLS files the config names: this client cannot re-read a
    /// rotated certificate at each handshake as Cilium's does, so a rotation reconnects.
    pub fn scan(&self, local: &ClusterName) -> Result<BTreeMap<ClusterName, PeerFile>> {
        let read_dir = |source| Error::Read { path: self.path.clone(), source };
        let mut peers = BTreeMap::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_dir)? {
            let entry = entry.map_err(read_dir)?;
            let path = entry.path();
            // `metadata` follows symlinks, as Go's `os.Stat` does.
            if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let Ok(content) = std::fs::read_to_string(&path) else { continue };
            if !is_cluster_config(&content) {
                continue;
            }
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let name = match ClusterName::new(file_name) {
                Ok(name) => name,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "ignoring a clustermesh config file");
                    continue;
                }
            };
            if &name == local {
                continue;
            }
            let fingerprint = fingerprint(&content, &path);
            peers.insert(name, PeerFile { path, fingerprint });
        }
        Ok(peers)
    }
}

fn fingerprint(content: &str, path: &Path) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut hasher);
    if let Ok(config) = EtcdConfig::parse(content, path) {
        for file in config.referenced_files() {
            std::fs::read(file).ok().hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// How a directory changed between two scans.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: Vec<(ClusterName, PeerFile)>,
    pub changed: Vec<(ClusterName, PeerFile)>,
    pub removed: Vec<ClusterName>,
}

/// Compares two scans.
pub fn diff(old: &BTreeMap<ClusterName, PeerFile>, new: &BTreeMap<ClusterName, PeerFile>) -> Changes {
    let mut changes = Changes::default();
    for (name, file) in new {
        match old.get(name) {
            None => changes.added.push((name.clone(), file.clone())),
            Some(previous) if previous != file => changes.changed.push((name.clone(), file.clone())),
            Some(_) => {}
        }
    }
    changes.removed = old.keys().filter(|name| !new.contains_key(*name)).cloned().collect();
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory removed on drop.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("cm-client-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const HELM: &str = "endpoints:\n- https://cluster2.mesh.cilium.io:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/common-etcd-client-ca.crt\nkey-file: /var/lib/cilium/clustermesh/common-etcd-client.key\ncert-file: /var/lib/cilium/clustermesh/common-etcd-client.crt\n";

    #[test]
    fn the_file_helm_writes_parses() {
        let config = EtcdConfig::parse(HELM, Path::new("cluster2")).unwrap();
        assert_eq!(config.endpoints, ["https://cluster2.mesh.cilium.io:2379"]);
        assert_eq!(
            config.trusted_ca_file.as_deref(),
            Some(Path::new("/var/lib/cilium/clustermesh/common-etcd-client-ca.crt"))
        );
        assert_eq!(config.cert_file.as_deref(), Some(Path::new("/var/lib/cilium/clustermesh/common-etcd-client.crt")));
        assert_eq!(config.key_file.as_deref(), Some(Path::new("/var/lib/cilium/clustermesh/common-etcd-client.key")));
        assert!(!config.insecure_transport);
    }

    #[test]
    fn optional_fields_and_aliases_parse() {
        let text = "endpoints: [\"https://a:2379\", \"https://b:2379\"]\nca-file: /ca\ndial-timeout: 5s\nusername: u\nunknown-field: 1\n";
        let config = EtcdConfig::parse(text, Path::new("x")).unwrap();
        assert_eq!(config.endpoints.len(), 2);
        assert_eq!(config.trusted_ca_file.as_deref(), Some(Path::new("/ca")));
        assert_eq!(config.dial_timeout, Some(Duration::from_secs(5)));
        assert_eq!(config.username.as_deref(), Some("u"));
        let nanos =
            EtcdConfig::parse("endpoints: [\"https://a\"]\ndial-timeout: 2000000000\n", Path::new("x")).unwrap();
        assert_eq!(nanos.dial_timeout, Some(Duration::from_secs(2)));
        assert!(EtcdConfig::parse("endpoints: []\n", Path::new("x")).is_err());
        assert!(EtcdConfig::parse("endpoints: [", Path::new("x")).is_err());
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn only_files_with_endpoints_count_and_the_file_name_is_the_cluster_name() {
        let dir = TempDir::new();
        std::fs::write(dir.0.join("cluster2"), HELM).unwrap();
        std::fs::write(dir.0.join("cluster3"), HELM.replace("cluster2", "cluster3")).unwrap();
        std::fs::write(dir.0.join("local"), HELM).unwrap();
        std::fs::write(dir.0.join("common-etcd-client.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(dir.0.join("Bad_Name"), HELM).unwrap();
        std::fs::create_dir(dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink(dir.0.join("cluster2"), dir.0.join("cluster4")).unwrap();
        let local = ClusterName::new("local").unwrap();
        let peers = ConfigDir::new(&dir.0).scan(&local).unwrap();
        let names: Vec<&str> = peers.keys().map(ClusterName::as_str).collect();
        assert_eq!(names, ["cluster2", "cluster3", "cluster4"]);
    }

    #[test]
    fn changes_to_a_file_or_the_certificates_it_names_are_detected() {
        let dir = TempDir::new();
        let cert = dir.0.join("client.crt");
        std::fs::write(&cert, "one").unwrap();
        let text = format!("endpoints: [\"https://a:2379\"]\ncert-file: {}\n", cert.display());
        std::fs::write(dir.0.join("cluster2"), &text).unwrap();
        std::fs::write(dir.0.join("cluster3"), &text).unwrap();
        let configs = ConfigDir::new(&dir.0);
        let local = ClusterName::new("local").unwrap();
        let first = configs.scan(&local).unwrap();

        std::fs::write(dir.0.join("cluster2"), format!("{text}dial-timeout: 1s\n")).unwrap();
        std::fs::remove_file(dir.0.join("cluster3")).unwrap();
        std::fs::write(dir.0.join("cluster4"), &text).unwrap();
        let second = configs.scan(&local).unwrap();
        let changes = diff(&first, &second);
        let names = |list: &[(ClusterName, PeerFile)]| list.iter().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
        assert_eq!(names(&changes.added), ["cluster4"]);
        assert_eq!(names(&changes.changed), ["cluster2"]);
        assert_eq!(changes.removed, [ClusterName::new("cluster3").unwrap()]);

        std::fs::write(&cert, "two").unwrap();
        let third = configs.scan(&local).unwrap();
        let changes = diff(&second, &third);
        assert_eq!(names(&changes.changed), ["cluster2", "cluster4"]);
        assert!(diff(&third, &third) == Changes::default());
    }
}
