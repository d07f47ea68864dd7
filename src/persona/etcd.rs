//! `/usr/bin/etcd`: the store, started the way Cilium's chart starts its etcd container.
//!
//! The parsed etcd command line ([`super::etcd_flags`]) becomes the arguments of our own
//! `kvstore` command. Flags with a meaning here are honoured (`--data-dir` keeps the store, see
//! `etcd/wal/`); flags about things a single member does not have (peers, raft, etcd's own WAL
//! and snapshot tuning, the v2 API, the gateway) are
//! accepted and named once in the log; values we cannot honour (plain-HTTP client URLs,
//! Unix sockets) fail start-up with the flag in the message.

use std::path::PathBuf;

use super::etcd_flags::{Flags, go_duration};
use crate::config::{KvstoreArgs, LogArgs, StoreArgs};
use crate::etcd::wal::FsyncPolicy;

/// The flags this store acts on; every other flag etcd accepts is logged as ignored.
const HONOURED: &[&str] = &[
    "advertise-client-urls",
    "auto-compaction-mode",
    "auto-compaction-retention",
    "auto-tls",
    "cert-file",
    "client-cert-auth",
    "data-dir",
    "enable-grpc-gateway",
    "experimental-watch-progress-notify-interval",
    "initial-cluster-token",
    "key-file",
    "listen-client-urls",
    "listen-metrics-urls",
    "log-level",
    "logger",
    "log-outputs",
    "max-concurrent-streams",
    "max-request-bytes",
    "max-txn-ops",
    "metrics",
    "name",
    "quota-backend-bytes",
    "trusted-ca-file",
    "unsafe-no-fsync",
];

/// Set by Cilium's chart on the etcd container up to 1.17 (the pod IP, for the listen URLs);
/// gone from 1.18. See [`KvstoreArgs::remote_reads_agent_cache`] for why it matters.
pub const LEGACY_CHART_ENV: &str = "HOSTNAME_IP";

#[derive(Debug, thiserror::Error)]
pub enum PersonaError {
    #[error("--{flag}: {url} is a plain-HTTP URL; this store serves the etcd API over TLS only (https)")]
    PlainClientUrl { flag: &'static str, url: String },
    #[error("--{flag}: {url}: Unix sockets are not served; use an https://IP:PORT URL")]
    UnixUrl { flag: &'static str, url: String },
    #[error("--{flag}: {url}: only IP addresses and localhost can be listened on")]
    HostName { flag: &'static str, url: String },
    #[error("--metrics={0}: expected basic or extensive")]
    Metrics(String),
    #[error("--auto-compaction-mode={0}: expected periodic or revision")]
    CompactionMode(String),
    #[error("--auto-compaction-retention={0}: expected hours (a number) or a duration")]
    Retention(String),
    #[error("--log-level={0}: expected debug, info, warn, error, panic or fatal")]
    LogLevel(String),
    #[error("--config-file is not supported: pass the settings as flags or ETCD_* variables")]
    ConfigFile,
}

/// What the etcd command line asks of the store, and what it asked that is not applied.
#[derive(Debug)]
pub struct EtcdServe {
    pub kvstore: KvstoreArgs,
    pub log: LogArgs,
    /// Explicitly set flags that mean nothing for this store (logged once at start-up).
    pub ignored: Vec<&'static str>,
    /// Accepted settings that are not applied as etcd would, with the reason.
    pub notes: Vec<String>,
}

/// Maps parsed etcd flags (and the environment, for Cilium's chart signature) onto `kvstore`.
pub fn serve_args(flags: &Flags, env_has_legacy_chart: bool) -> Result<EtcdServe, PersonaError> {
    if flags.get("config-file").is_some() {
        return Err(PersonaError::ConfigFile);
    }
    let mut notes = Vec::new();
    let name = flags.get("name").unwrap_or("default").to_owned();
    let data_dir = flags.get("data-dir").map_or_else(|| PathBuf::from(format!("{name}.etcd")), PathBuf::from);

    let listen_client_urls = match flags.get("listen-client-urls") {
        Some(_) => flags.list("listen-client-urls"),
        None => vec!["http://localhost:2379".to_owned()],
    };
    let listen_client_urls =
        listen_client_urls.iter().map(|url| client_url(url, "listen-client-urls")).collect::<Result<Vec<_>, _>>()?;
    let listen_metrics_urls =
        flags.list("listen-metrics-urls").iter().map(|url| metrics_url(url)).collect::<Result<Vec<_>, _>>()?;

    match flags.get("metrics").unwrap_or("basic") {
        "basic" => {}
        "extensive" => notes.push("--metrics=extensive: the per-method gRPC histograms are not exported".to_owned()),
        other => return Err(PersonaError::Metrics(other.to_owned())),
    }
    match flags.get("auto-compaction-mode").unwrap_or("periodic") {
        "periodic" => {}
        "revision" => notes.push(
            "--auto-compaction-mode=revision: compaction runs periodically, keeping the given retention in hours"
                .to_owned(),
        ),
        other => return Err(PersonaError::CompactionMode(other.to_owned())),
    }
    let retention = flags.get("auto-compaction-retention").unwrap_or("0");
    let auto_compaction_retention = match retention.parse::<u64>() {
        Ok(hours) => std::time::Duration::from_secs(hours * 3600),
        Err(_) => go_duration(retention).ok_or_else(|| PersonaError::Retention(retention.to_owned()))?,
    };
    if flags.bool("enable-grpc-gateway", true) && flags.get("enable-grpc-gateway").is_some() {
        notes.push("--enable-grpc-gateway: the JSON gateway is not served; clients use gRPC".to_owned());
    }
    let log_level = match flags.get("log-level").unwrap_or("info") {
        level @ ("debug" | "info" | "warn" | "error") => level.to_owned(),
        "panic" | "fatal" => "error".to_owned(),
        other => return Err(PersonaError::LogLevel(other.to_owned())),
    };

    let defaults = StoreArgs::etcd_defaults();
    let store = StoreArgs {
        listen_client_urls,
        listen_metrics_urls,
        advertise_client_urls: flags.list("advertise-client-urls"),
        name,
        cert_file: flags.get("cert-file").filter(|p| !p.is_empty()).map(PathBuf::from),
        key_file: flags.get("key-file").filter(|p| !p.is_empty()).map(PathBuf::from),
        trusted_ca_file: flags.get("trusted-ca-file").filter(|p| !p.is_empty()).map(PathBuf::from),
        client_cert_auth: flags.bool("client-cert-auth", false),
        auto_tls: flags.bool("auto-tls", false),
        auto_compaction_retention,
        max_request_bytes: flags.get("max-request-bytes").map_or(defaults.max_request_bytes, parse_number),
        max_txn_ops: flags.get("max-txn-ops").map_or(defaults.max_txn_ops, parse_number),
        quota_backend_bytes: flags
            .get("quota-backend-bytes")
            .map_or(defaults.quota_backend_bytes, |n| n.parse().expect("checked as a signed number when parsed")),
        // etcd's default is unbounded; ours stays unless the flag names a number.
        max_concurrent_streams: flags
            .get("max-concurrent-streams")
            .map_or(defaults.max_concurrent_streams, |n| u32::try_from(parse_number(n)).unwrap_or(u32::MAX)),
        watch_progress_notify_interval: flags
            .get("experimental-watch-progress-notify-interval")
            .and_then(go_duration)
            .unwrap_or(defaults.watch_progress_notify_interval),
        data_dir: Some(data_dir),
        initial_cluster_token: flags
            .get("initial-cluster-token")
            .map_or(defaults.initial_cluster_token.clone(), str::to_owned),
        wal_fsync: match flags.get("unsafe-no-fsync") {
            Some(_) if flags.bool("unsafe-no-fsync", false) => FsyncPolicy::Never,
            _ => defaults.wal_fsync,
        },
        ..defaults
    };
    let ignored = flags.names().map(|(name, _)| name).filter(|name| !HONOURED.contains(name)).collect();
    Ok(EtcdServe {
        kvstore: KvstoreArgs { store, cluster_name: None, remote_reads_agent_cache: env_has_legacy_chart },
        log: LogArgs { log_level, ..LogArgs::default() },
        ignored,
        notes,
    })
}

/// Parsing was checked against etcd's rules already; only the type changes here.
fn parse_number(text: &str) -> usize {
    text.parse().expect("checked as an unsigned number when parsed")
}

/// An etcd client URL as our listener takes it: `https://IP:PORT`, `localhost` as 127.0.0.1.
fn client_url(url: &str, flag: &'static str) -> Result<String, PersonaError> {
    let (scheme, rest) = url.split_once("://").expect("checked as a URL when parsed");
    match scheme {
        "https" => {}
        "http" => return Err(PersonaError::PlainClientUrl { flag, url: url.to_owned() }),
        _ => return Err(PersonaError::UnixUrl { flag, url: url.to_owned() }),
    }
    Ok(format!("https://{}", host_port(rest, flag, url)?))
}

/// Metrics are plain HTTP, as etcd serves them on `--listen-metrics-urls=http://...`.
fn metrics_url(url: &str) -> Result<String, PersonaError> {
    let flag = "listen-metrics-urls";
    let (scheme, rest) = url.split_once("://").expect("checked as a URL when parsed");
    if !matches!(scheme, "http" | "https") {
        return Err(PersonaError::UnixUrl { flag, url: url.to_owned() });
    }
    Ok(format!("http://{}", host_port(rest, flag, url)?))
}

fn host_port(rest: &str, flag: &'static str, url: &str) -> Result<String, PersonaError> {
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').expect("checked as host:port when parsed");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let host = match bare {
        "localhost" => "127.0.0.1".to_owned(),
        "" => "0.0.0.0".to_owned(),
        ip if ip.parse::<std::net::IpAddr>().is_ok() => host.to_owned(),
        _ => return Err(PersonaError::HostName { flag, url: url.to_owned() }),
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::super::etcd_flags::{Parsed, parse};
    use super::*;

    fn serve(args: &[&str]) -> Result<EtcdServe, PersonaError> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let Ok(Parsed::Serve(flags)) = parse(&args, &[]) else { panic!("{args:?} parses") };
        serve_args(&flags, false)
    }

    #[test]
    fn ciliums_1_20_etcd_container_becomes_our_store() {
        let serve = serve(
            &[
                &super::super::etcd_flags::tests::CHART_ETCD_ARGS[..],
                &[
                    "--listen-client-urls=https://0.0.0.0:2379",
                    "--advertise-client-urls=https://localhost:2379",
                    "--initial-cluster-token=0c4f6c58-9a55-4a43-8a4a-5b0d3bb0d9c1",
                    "--auto-compaction-retention=1",
                    "--enable-grpc-gateway=false",
                    "--listen-metrics-urls=http://0.0.0.0:9963",
                    "--metrics=basic",
                ],
            ]
            .concat(),
        )
        .expect("accepted");
        let store = &serve.kvstore.store;
        assert_eq!(store.listen_urls().unwrap()[0].addr, "0.0.0.0:2379".parse().unwrap());
        assert_eq!(store.metrics_urls().unwrap()[0].addr, "0.0.0.0:9963".parse().unwrap());
        assert!(store.client_cert_auth);
        assert_eq!(store.name, "clustermesh-apiserver");
        assert_eq!(store.auto_compaction_retention, std::time::Duration::from_secs(3600));
        assert_eq!(store.data_dir.as_deref(), Some(std::path::Path::new("/var/run/etcd")));
        assert_eq!(store.initial_cluster_token, "0c4f6c58-9a55-4a43-8a4a-5b0d3bb0d9c1");
        assert!(serve.ignored.is_empty(), "{:?}", serve.ignored);
        assert!(serve.notes.is_empty(), "{:?}", serve.notes);
    }

    #[test]
    fn the_1_16_bracketed_ipv4_listeners_and_localhost_are_bound() {
        let serve = serve(&[
            "--listen-client-urls=https://127.0.0.1:2379,https://[10.0.0.7]:2379",
            "--listen-metrics-urls=http://[10.0.0.7]:9963",
            "--advertise-client-urls=https://[10.0.0.7]:2379",
        ])
        .unwrap();
        let addrs: Vec<_> =
            serve.kvstore.store.listen_urls().unwrap().into_iter().map(|u| u.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.1:2379", "10.0.0.7:2379"]);
        let local = serve_args_of(&["--listen-client-urls=https://localhost:2379"]);
        assert_eq!(local.store.listen_urls().unwrap()[0].addr.to_string(), "127.0.0.1:2379");
    }

    #[test]
    fn the_space_quota_is_honoured_with_etcds_meaning_of_zero_and_negative() {
        let quota = |args: &[&str]| serve(args).unwrap().kvstore.store.quota_backend_bytes;
        let tls = "--listen-client-urls=https://127.0.0.1:2379";
        assert_eq!(quota(&[tls, "--quota-backend-bytes=1048576"]), 1_048_576);
        assert_eq!(quota(&[tls, "--quota-backend-bytes=-1"]), -1);
        assert_eq!(quota(&[tls]), 0, "unset: etcd's default quota");
        assert!(serve(&[tls, "--quota-backend-bytes=1048576"]).unwrap().ignored.is_empty());
    }

    #[test]
    fn the_data_directory_keeps_the_store_and_unsafe_no_fsync_turns_fsync_off() {
        let tls = "--listen-client-urls=https://127.0.0.1:2379";
        let store = |args: &[&str]| serve(args).unwrap().kvstore.store;
        let defaults = store(&[tls]);
        assert_eq!(defaults.data_dir.as_deref(), Some(std::path::Path::new("default.etcd")), "etcd's default");
        assert_eq!((defaults.initial_cluster_token.as_str(), defaults.wal_fsync), ("etcd-cluster", FsyncPolicy::Never));
        assert_eq!(store(&[tls, "--unsafe-no-fsync"]).wal_fsync, FsyncPolicy::Never);
        let wal = store(&[tls, "--data-dir=/var/run/etcd", "--initial-cluster-token=uid"]).wal_config().unwrap();
        assert_eq!(wal.dir(), std::path::Path::new("/var/run/etcd/clustermesh-apiserver"));
        assert_eq!(wal.initial_cluster_token, "uid");
    }

    fn serve_args_of(args: &[&str]) -> KvstoreArgs {
        serve(args).unwrap().kvstore
    }

    #[test]
    fn what_cannot_be_served_fails_with_the_flag_named() {
        let error = |args: &[&str]| serve(args).unwrap_err().to_string();
        // etcd's default client URL is plain HTTP: this store never serves without TLS.
        assert!(error(&[]).contains("--listen-client-urls: http://localhost:2379 is a plain-HTTP URL"));
        assert!(error(&["--listen-client-urls=unix://sock:0"]).contains("Unix sockets"));
        assert!(error(&["--listen-client-urls=https://example.com:2379"]).contains("only IP addresses"));
        assert!(error(&["--listen-client-urls=https://[::1]:2379", "--metrics=all"]).contains("--metrics=all"));
    }
}
