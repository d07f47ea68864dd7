//! Global services: which backends a Cilium agent uses for a local Service, given its
//! annotations and what remote clusters export (`cilium-wire-format.md` §8.6;
//! `pkg/annotation/clustermesh.go`, `pkg/clustermesh/common/services.go`,
//! `pkg/clustermesh/loadbalancer/selectbackends.go`).
//!
//! Only remote *backends* are used (frontends of remote services are not), remote services
//! exported with `shared: false` are ignored, and the local Service must exist: this helper
//! starts from it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Serialize;

use crate::wire::{ClusterId, ClusterService, L4Addr};

/// `service.cilium.io/global` (alias `io.cilium/global-service`).
pub const GLOBAL: &str = "service.cilium.io/global";
pub const GLOBAL_ALIAS: &str = "io.cilium/global-service";
/// `service.cilium.io/shared` (alias `io.cilium/shared-service`).
pub const SHARED: &str = "service.cilium.io/shared";
pub const SHARED_ALIAS: &str = "io.cilium/shared-service";
/// `service.cilium.io/affinity` (alias `io.cilium/service-affinity`).
pub const AFFINITY: &str = "service.cilium.io/affinity";
pub const AFFINITY_ALIAS: &str = "io.cilium/service-affinity";

/// Which cluster's backends a global service prefers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Local and remote backends alike.
    #[default]
    None,
    /// Local backends; remote ones only while no local backend is active.
    Local,
    /// Remote backends; local ones only while no remote backend is healthy.
    Remote,
}

/// What a Service's annotations say about clustermesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct GlobalServiceSettings {
    /// Remote backends are included (and the service is exported).
    pub global: bool,
    /// Local backends are exported to other clusters (only meaningful when global).
    pub shared: bool,
    pub affinity: Affinity,
}

/// The value of `key`, or else of `alias` (Cilium's `annotation.Get`).
fn lookup<'a>(annotations: &'a BTreeMap<String, String>, key: &str, alias: &str) -> Option<&'a str> {
    annotations.get(key).or_else(|| annotations.get(alias)).map(String::as_str)
}

impl GlobalServiceSettings {
    /// Reads the annotations as Cilium does: `global` is true only for `"true"` (any case);
    /// `shared` defaults to true and, like `affinity`, is ignored unless global; an unknown
    /// affinity is logged and treated as none.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Self {
        let global = lookup(annotations, GLOBAL, GLOBAL_ALIAS).is_some_and(|v| v.eq_ignore_ascii_case("true"));
        if !global {
            return Self::default();
        }
        let shared = lookup(annotations, SHARED, SHARED_ALIAS).is_none_or(|v| v.eq_ignore_ascii_case("true"));
        let affinity = match lookup(annotations, AFFINITY, AFFINITY_ALIAS).map(str::to_ascii_lowercase).as_deref() {
            None | Some("" | "none") => Affinity::None,
            Some("local") => Affinity::Local,
            Some("remote") => Affinity::Remote,
            Some(other) => {
                tracing::warn!(affinity = other, "ignoring an unknown service affinity annotation");
                Affinity::None
            }
        };
        Self { global, shared, affinity }
    }
}

/// The state of a backend (`loadbalancer.BackendState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    Terminating,
    Quarantined,
    Maintenance,
}

/// Where a backend comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "source")]
pub enum Origin {
    Local,
    /// Source "clustermesh", with the remote cluster.
    Remote {
        cluster: String,
        cluster_id: ClusterId,
    },
}

/// One backend: an address and an L4 port, carrying every port name that maps to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: L4Addr,
    pub port_names: Vec<String>,
    pub state: BackendState,
    pub unhealthy: bool,
    pub zone: Option<String>,
    pub origin: Origin,
}

impl Backend {
    /// An active, healthy local backend.
    pub fn local(addr: IpAddr, port: L4Addr, port_names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            addr,
            port,
            port_names: port_names.into_iter().map(Into::into).collect(),
            state: BackendState::Active,
            unhealthy: false,
            zone: None,
            origin: Origin::Local,
        }
    }

    pub fn with_state(mut self, state: BackendState) -> Self {
        self.state = state;
        self
    }

    pub fn with_unhealthy(mut self, unhealthy: bool) -> Self {
        self.unhealthy = unhealthy;
        self
    }

    fn is_remote(&self) -> bool {
        matches!(self.origin, Origin::Remote { .. })
    }

    /// Active or terminating, and not marked unhealthy.
    fn is_healthy(&self) -> bool {
        matches!(self.state, BackendState::Active | BackendState::Terminating) && !self.unhealthy
    }
}

/// The backends remote clusters export for `namespace/name`: one per address and (protocol,
/// port), with every port name using it; services with `shared: false` are skipped.
pub fn remote_backends<'a>(
    namespace: &str,
    name: &str,
    services: impl IntoIterator<Item = &'a ClusterService>,
) -> Vec<Backend> {
    let mut backends = Vec::new();
    for service in services {
        if !service.shared || service.namespace != namespace || service.name != name {
            continue;
        }
        for (addr, ports) in &service.backends {
            let mut by_port: BTreeMap<&L4Addr, Vec<String>> = BTreeMap::new();
            for (port_name, port) in ports {
                by_port.entry(port).or_default().push(port_name.clone());
            }
            let zone = service.zones.get(&addr.to_string()).map(|z| z.zone.clone()).filter(|z| !z.is_empty());
            for (port, port_names) in by_port {
                backends.push(Backend {
                    addr: *addr,
                    port: port.clone(),
                    port_names,
                    state: BackendState::Active,
                    unhealthy: false,
                    zone: zone.clone(),
                    origin: Origin::Remote { cluster: service.cluster.clone(), cluster_id: service.cluster_id },
                });
            }
        }
    }
    backends
}

/// The backends Cilium selects for a local Service with `settings`, its own `local` backends
/// and the `remote` ones (e.g. from [`remote_backends`]):
///
/// - not global: local backends only;
/// - global, affinity none: local and remote;
/// - affinity local: every local backend, remote ones only if no local backend is active and
///   some remote one is healthy;
/// - affinity remote: every remote backend, local ones only if no remote backend is healthy and
///   some local one is.
///
/// Terminating backends count as healthy.
pub fn select_backends(settings: &GlobalServiceSettings, local: &[Backend], remote: &[Backend]) -> Vec<Backend> {
    let (use_local, use_remote) = if !settings.global {
        (true, false)
    } else {
        let healthy_remote = remote.iter().filter(|b| b.is_healthy()).count();
        let healthy_local = local.iter().filter(|b| b.is_healthy()).count();
        let active_local = local.iter().filter(|b| b.is_healthy() && b.state == BackendState::Active).count();
        match settings.affinity {
            Affinity::None => (true, true),
            Affinity::Local => (true, active_local == 0 && healthy_remote > 0),
            Affinity::Remote => (healthy_remote == 0 && healthy_local > 0, true),
        }
    };
    let local = local.iter().filter(|b| !b.is_remote()).filter(|_| use_local);
    let remote = remote.iter().filter(|b| b.is_remote()).filter(|_| use_remote);
    local.chain(remote).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn service(cluster: &str, id: u32, shared: bool, backends: &[&str]) -> ClusterService {
        let ports: crate::wire::PortConfiguration = [
            ("http".to_string(), L4Addr { protocol: "TCP".into(), port: 8080 }),
            ("http-alt".to_string(), L4Addr { protocol: "TCP".into(), port: 8080 }),
            ("dns".to_string(), L4Addr { protocol: "UDP".into(), port: 53 }),
        ]
        .into();
        ClusterService {
            cluster: cluster.into(),
            namespace: "ns".into(),
            name: "svc".into(),
            backends: backends.iter().map(|ip| (ip.parse().unwrap(), ports.clone())).collect(),
            shared,
            cluster_id: ClusterId(id),
            ..ClusterService::default()
        }
    }

    fn local(ip: &str) -> Backend {
        Backend::local(ip.parse().unwrap(), L4Addr { protocol: "TCP".into(), port: 8080 }, ["http"])
    }

    fn addrs(backends: &[Backend]) -> Vec<String> {
        backends.iter().map(|b| b.addr.to_string()).collect()
    }

    #[test]
    fn annotations_and_aliases_are_read_like_cilium() {
        assert_eq!(GlobalServiceSettings::from_annotations(&annotations(&[])), GlobalServiceSettings::default());
        let s = GlobalServiceSettings::from_annotations(&annotations(&[(GLOBAL, "TRUE")]));
        assert_eq!((s.global, s.shared, s.affinity), (true, true, Affinity::None));
        let s = GlobalServiceSettings::from_annotations(&annotations(&[
            (GLOBAL_ALIAS, "true"),
            (SHARED_ALIAS, "false"),
            (AFFINITY_ALIAS, "Remote"),
        ]));
        assert_eq!((s.global, s.shared, s.affinity), (true, false, Affinity::Remote));
        let s = GlobalServiceSettings::from_annotations(&annotations(&[(GLOBAL, "yes"), (AFFINITY, "local")]));
        assert!(!s.global && s.affinity == Affinity::None, "affinity is ignored unless global");
        let s = GlobalServiceSettings::from_annotations(&annotations(&[(GLOBAL, "true"), (AFFINITY, "nearest")]));
        assert_eq!(s.affinity, Affinity::None);
        let s = GlobalServiceSettings::from_annotations(&annotations(&[(GLOBAL, "true"), (GLOBAL_ALIAS, "false")]));
        assert!(s.global, "the current name wins over the alias");
    }

    #[test]
    fn remote_backends_merge_port_names_and_skip_unshared_services() {
        let services = [service("c2", 2, true, &["10.2.0.1"]), service("c3", 3, false, &["10.3.0.1"])];
        let backends = remote_backends("ns", "svc", &services);
        assert_eq!(backends.len(), 2, "{backends:?}");
        let tcp = backends.iter().find(|b| b.port.protocol == "TCP").unwrap();
        assert_eq!(tcp.port_names, ["http", "http-alt"]);
        assert_eq!(tcp.origin, Origin::Remote { cluster: "c2".into(), cluster_id: ClusterId(2) });
        assert!(remote_backends("ns", "other", &services).is_empty());
    }

    #[test]
    fn backends_are_selected_by_global_and_affinity() {
        let services = [service("c2", 2, true, &["10.2.0.1"])];
        let remote: Vec<Backend> =
            remote_backends("ns", "svc", &services).into_iter().filter(|b| b.port.port == 8080).collect();
        let locals = [local("10.1.0.1")];
        let settings = |global, affinity| GlobalServiceSettings { global, shared: true, affinity };

        assert_eq!(addrs(&select_backends(&settings(false, Affinity::None), &locals, &remote)), ["10.1.0.1"]);
        assert_eq!(
            addrs(&select_backends(&settings(true, Affinity::None), &locals, &remote)),
            ["10.1.0.1", "10.2.0.1"]
        );
        assert_eq!(addrs(&select_backends(&settings(true, Affinity::Local), &locals, &remote)), ["10.1.0.1"]);
        assert_eq!(addrs(&select_backends(&settings(true, Affinity::Remote), &locals, &remote)), ["10.2.0.1"]);

        // Affinity local falls back to remote when no local backend is active; terminating
        // local backends stay selected.
        let terminating = [local("10.1.0.1").with_state(BackendState::Terminating)];
        assert_eq!(
            addrs(&select_backends(&settings(true, Affinity::Local), &terminating, &remote)),
            ["10.1.0.1", "10.2.0.1"]
        );
        // Affinity remote falls back to local when no remote backend is healthy.
        let sick: Vec<Backend> = remote.iter().cloned().map(|b| b.with_unhealthy(true)).collect();
        assert_eq!(
            addrs(&select_backends(&settings(true, Affinity::Remote), &locals, &sick)),
            ["10.1.0.1", "10.2.0.1"]
        );
        // Nothing healthy anywhere: affinity remote keeps the remote backends only.
        let sick_local = [local("10.1.0.1").with_unhealthy(true)];
        assert_eq!(addrs(&select_backends(&settings(true, Affinity::Remote), &sick_local, &sick)), ["10.2.0.1"]);
    }
}
