//! The status of every remote cluster in Cilium's `RemoteCluster` model (`api/v1/models`), as
//! `GET /v1/cluster` serves it and `kvstoremesh-dbg status` prints it, so that
//! `cilium clustermesh status` reads us as it reads Cilium's KVStoreMesh.

use std::time::{SystemTime, UNIX_EPOCH};

use clustermesh_client::{Kind, Phase, RemoteStatus};
use serde::{Deserialize, Serialize};

/// Go's zero `strfmt.DateTime`: a struct, so `omitempty` never drops it.
const ZERO_TIME: &str = "0001-01-01T00:00:00.000Z";

/// `models.RemoteCluster`. Fields in Go's order (alphabetical, as go-swagger generates them);
/// zero values dropped as Go's `omitempty` drops them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteCluster {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RemoteClusterConfig>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub connected: bool,
    /// RFC 3339 with milliseconds, Go's zero time when none.
    #[serde(default)]
    pub last_failure: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_endpoints: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_failures: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_identities: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_nodes: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_service_exports: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub num_shared_services: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ready: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synced: Option<RemoteClusterSynced>,
}

/// `models.RemoteClusterConfig`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteClusterConfig {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cluster_id: i64,
    #[serde(default, skip_serializing_if = "is_false")]
    pub kvstoremesh: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub retrieved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub sync_canaries: bool,
}

/// `models.RemoteClusterSynced`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteClusterSynced {
    #[serde(default, skip_serializing_if = "is_false")]
    pub endpoints: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub identities: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub nodes: bool,
    /// Present only when the remote offers service exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports: Option<bool>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub services: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &i64) -> bool {
    *value == 0
}

impl RemoteCluster {
    /// From what the client knows of the connection and its raw caches. A kind the remote does
    /// not offer counts as synced once the config is read: its (empty) copy is complete.
    pub fn from_status(status: &RemoteStatus) -> Self {
        let entries = |kind| status.prefixes.get(&kind).map_or(0, |p| p.entries as i64);
        let synced = |kind| match status.prefixes.get(&kind) {
            Some(prefix) => prefix.synced,
            None => status.config.retrieved,
        };
        let config = &status.config;
        let exports = config.service_exports_enabled.is_some();
        Self {
            config: Some(RemoteClusterConfig {
                cluster_id: config.cluster_id.map_or(0, |id| i64::from(id.get())),
                kvstoremesh: config.kvstoremesh,
                required: config.required,
                retrieved: config.retrieved,
                service_exports_enabled: config.service_exports_enabled,
                sync_canaries: config.sync_canaries,
            }),
            connected: status.connected,
            last_failure: status.last_failure.as_ref().map_or_else(|| ZERO_TIME.to_owned(), |f| with_millis(&f.at)),
            name: status.name.to_string(),
            num_endpoints: entries(Kind::IpCache),
            num_failures: status.num_failures as i64,
            num_identities: entries(Kind::Identities),
            num_nodes: entries(Kind::Nodes),
            num_service_exports: entries(Kind::ServiceExports),
            num_shared_services: entries(Kind::Services),
            ready: status.ready,
            status: describe(status),
            synced: Some(RemoteClusterSynced {
                endpoints: synced(Kind::IpCache),
                identities: synced(Kind::Identities),
                nodes: synced(Kind::Nodes),
                service_exports: exports.then(|| synced(Kind::ServiceExports)),
                services: synced(Kind::Services),
            }),
        }
    }
}

/// Cilium prints the etcd client's status line here; ours says where the session stands.
fn describe(status: &RemoteStatus) -> String {
    let id = status.etcd_cluster_id.as_deref().map(|id| format!(", ID: {id}")).unwrap_or_default();
    match status.phase {
        _ if status.connected => format!("etcd: 1/1 connected{id}"),
        Phase::Connecting if status.last_failure.is_none() => "Waiting for initial connection to be established".into(),
        Phase::Stopped => "Connection stopped".into(),
        _ => match &status.last_failure {
            Some(failure) => failure.reason.clone(),
            None => "Waiting for initial connection to be established".into(),
        },
    }
}

/// `2026-05-04T09:21:07Z` → `2026-05-04T09:21:07.000Z` (Go's `strfmt.DateTime` marshalling).
fn with_millis(rfc3339: &str) -> String {
    match rfc3339.strip_suffix('Z') {
        Some(base) if !base.contains('.') => format!("{base}.000Z"),
        _ => rfc3339.to_owned(),
    }
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time (`YYYY-MM-DDTHH:MM:SS[.fff]Z`); `None`
/// for Go's zero time or anything else.
pub fn unix_seconds(rfc3339: &str) -> Option<u64> {
    let b = rfc3339.as_bytes();
    if b.len() < 20 || !rfc3339.ends_with('Z') {
        return None;
    }
    let num = |range: std::ops::Range<usize>| rfc3339.get(range)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hour * 3600 + minute * 60 + second).ok()
}

/// Go's `Duration.String()` for whole seconds: `0s`, `42s`, `3m5s`, `2h0m9s`.
fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

fn time_since(last_failure: &str, now: SystemTime) -> String {
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    match unix_seconds(last_failure) {
        Some(at) if last_failure != ZERO_TIME => format!("{} ago", go_duration(now.saturating_sub(at))),
        _ => "never".into(),
    }
}

/// What `kvstoremesh-dbg status` prints (Cilium's `FormatStatusResponseRemoteClusters`): one line
/// per cluster, and for clusters not ready (or all with `verbose`) the connection, config and
/// synchronization details.
pub fn format_text(clusters: &[RemoteCluster], verbose: bool, now: SystemTime) -> String {
    let ready = clusters.iter().filter(|c| c.ready).count();
    let mut out = format!("KVStoreMesh:\t{ready}/{} clusters ready\n", clusters.len());
    for c in clusters {
        out.push_str(&format!(
            "   {}: {}, {} nodes, {} endpoints, {} identities, {} services, {} failures (last: {})\n",
            c.name,
            if c.ready { "ready" } else { "not-ready" },
            c.num_nodes,
            c.num_endpoints,
            c.num_identities,
            c.num_shared_services,
            c.num_failures,
            time_since(&c.last_failure, now)
        ));
        if c.ready && !verbose {
            continue;
        }
        out.push_str(&format!("   └  {}\n", c.status));
        out.push_str("   └  remote configuration: ");
        match &c.config {
            Some(config) => {
                out.push_str(&format!("expected={}, retrieved={}", config.required, config.retrieved));
                if config.retrieved {
                    out.push_str(&format!(
                        ", cluster-id={}, kvstoremesh={}, sync-canaries={}",
                        config.cluster_id, config.kvstoremesh, config.sync_canaries
                    ));
                }
            }
            None => out.push_str("expected=unknown, retrieved=unknown"),
        }
        out.push('\n');
        if let Some(synced) = &c.synced {
            out.push_str(&format!(
                "   └  synchronization status: nodes={}, endpoints={}, identities={}, services={}\n",
                synced.nodes, synced.endpoints, synced.identities, synced.services
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn zero_values_are_left_out_as_go_does_but_the_failure_time_never_is() {
        let json = serde_json::to_string(&RemoteCluster {
            name: "c2".into(),
            last_failure: ZERO_TIME.into(),
            synced: Some(RemoteClusterSynced { nodes: true, service_exports: Some(false), ..Default::default() }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"last-failure":"0001-01-01T00:00:00.000Z","name":"c2","synced":{"nodes":true,"service-exports":false}}"#
        );
    }

    #[test]
    fn timestamps_read_back_and_print_like_go() {
        assert_eq!(unix_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(unix_seconds("2026-05-04T09:21:07Z"), Some(1_777_886_467));
        assert_eq!(unix_seconds("2000-02-29T00:00:00.000Z"), Some(951_782_400));
        assert_eq!(unix_seconds(ZERO_TIME), None);
        assert_eq!(with_millis("2026-05-04T09:21:07Z"), "2026-05-04T09:21:07.000Z");
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(185), "3m5s");
        assert_eq!(go_duration(7209), "2h0m9s");
    }

    #[test]
    fn the_text_output_details_only_clusters_not_ready() {
        let now = UNIX_EPOCH + Duration::from_secs(1_777_886_467 + 65);
        let ready = RemoteCluster {
            name: "cluster2".into(),
            ready: true,
            num_nodes: 2,
            num_endpoints: 3,
            num_identities: 4,
            num_shared_services: 1,
            num_failures: 1,
            last_failure: "2026-05-04T09:21:07.000Z".into(),
            ..Default::default()
        };
        let waiting = RemoteCluster {
            name: "cluster3".into(),
            status: "Waiting for initial connection to be established".into(),
            last_failure: ZERO_TIME.into(),
            config: Some(RemoteClusterConfig { required: true, ..Default::default() }),
            synced: Some(RemoteClusterSynced::default()),
            ..Default::default()
        };
        assert_eq!(
            format_text(&[ready, waiting], false, now),
            "KVStoreMesh:\t1/2 clusters ready\n\
             \x20  cluster2: ready, 2 nodes, 3 endpoints, 4 identities, 1 services, 1 failures (last: 1m5s ago)\n\
             \x20  cluster3: not-ready, 0 nodes, 0 endpoints, 0 identities, 0 services, 0 failures (last: never)\n\
             \x20  └  Waiting for initial connection to be established\n\
             \x20  └  remote configuration: expected=true, retrieved=false\n\
             \x20  └  synchronization status: nodes=false, endpoints=false, identities=false, services=false\n"
        );
    }
}
