//! `clustermesh-dbg troubleshoot` and `kvstoremesh-dbg troubleshoot`: the checks Cilium's
//! commands of those names make on an etcd client file (`pkg/kvstore/etcd_debug.go`), step by
//! step, each printed as it passes or fails — name resolution, TCP, the TLS handshake with the
//! file's certificates, the server's version over HTTP/1.1, the certificates themselves, and an
//! etcd read as the file's user — so that an operator (or `cilium sysdump`) sees where a
//! connection breaks. Unlike Cilium's, the commands exit non-zero when a check fails.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clustermesh_client::config::{EtcdConfig, is_cluster_config};
use clustermesh_client::connect::{Dial, dial_client};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The key every Cilium user may read: a read of it checks authentication and authorisation.
use clustermesh_client::wire::HEARTBEAT_KEY;

/// What the checks found, as the lines to print.
#[derive(Debug, Default)]
pub struct Report {
    text: String,
    failures: usize,
}

impl Report {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn failed(&self) -> bool {
        self.failures > 0
    }

    fn line(&mut self, indent: usize, line: impl std::fmt::Display) {
        let _ = writeln!(self.text, "{:indent$}{line}", "");
    }

    fn ok(&mut self, indent: usize, line: impl std::fmt::Display) {
        self.line(indent, format_args!("✅ {line}"));
    }

    fn info(&mut self, indent: usize, line: impl std::fmt::Display) {
        self.line(indent, format_args!("ℹ️  {line}"));
    }

    fn warn(&mut self, indent: usize, line: impl std::fmt::Display) {
        self.line(indent, format_args!("⚠️ {line}"));
    }

    fn fail(&mut self, indent: usize, line: impl std::fmt::Display) {
        self.failures += 1;
        self.line(indent, format_args!("❌ {line}"));
    }

    fn blank(&mut self) {
        self.text.push('\n');
    }

    fn append(&mut self, other: Report) {
        self.text.push_str(&other.text);
        self.failures += other.failures;
    }
}

/// `clustermesh-dbg troubleshoot`: the local etcd of `--etcd-config`.
pub async fn local(etcd_config: &Path, timeout: Duration) -> Report {
    etcd(etcd_config, None, timeout).await
}

/// `kvstoremesh-dbg troubleshoot [clusters...]`: every remote cluster of the directory (or the
/// named ones), and the local etcd first with `include_local`.
pub async fn kvstoremesh(
    clustermesh_config: &Path,
    clusters: &[String],
    local_config: Option<&Path>,
    timeout: Duration,
) -> Report {
    let mut report = Report::default();
    if let Some(path) = local_config {
        report.line(0, "Local etcd:");
        report.append(etcd(path, None, timeout).await);
        report.blank();
    }
    let remotes = match remote_configs(clustermesh_config) {
        Ok(remotes) => remotes,
        Err(error) => {
            report.fail(
                0,
                format_args!("Cannot read the ClusterMesh configuration {}: {error}", clustermesh_config.display()),
            );
            return report;
        }
    };
    let wanted: Vec<&(String, PathBuf)> =
        remotes.iter().filter(|(name, _)| clusters.is_empty() || clusters.contains(name)).collect();
    for missing in clusters.iter().filter(|c| !remotes.iter().any(|(name, _)| name == *c)) {
        report
            .fail(0, format_args!("Remote cluster {missing:?}: no configuration in {}", clustermesh_config.display()));
    }
    if wanted.is_empty() && clusters.is_empty() {
        report.info(0, "No remote cluster is configured");
    }
    for (name, path) in wanted {
        report.line(0, format_args!("Remote cluster {name:?}:"));
        report.append(etcd(path, Some(name), timeout).await);
        report.blank();
    }
    report
}

/// The files of the directory that configure a remote cluster, as Cilium decides it: content
/// with `endpoints:`, names not starting with `..` (Kubernetes' Secret mount internals).
fn remote_configs(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut remotes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        if name.starts_with("..") || !path.is_file() {
            continue;
        }
        if std::fs::read_to_string(&path).is_ok_and(|content| is_cluster_config(&content)) {
            remotes.push((name, path));
        }
    }
    remotes.sort();
    Ok(remotes)
}

/// Every check on one etcd client file; `cluster` names the remote cluster whose config key
/// to look for.
async fn etcd(path: &Path, cluster: Option<&str>, timeout: Duration) -> Report {
    let mut report = Report::default();
    report.line(0, format_args!("📄 Configuration path: {}", path.display()));
    let config = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|text| EtcdConfig::parse(&text, path).map_err(|e| e.to_string()))
    {
        Ok(config) => config,
        Err(error) => {
            report.fail(0, format_args!("Cannot parse etcd configuration: {error}"));
            return report;
        }
    };

    report.blank();
    report.line(0, "🔌 Endpoints:");
    let tls = tls_config(&config);
    for endpoint in &config.endpoints {
        report.line(3, format_args!("- {endpoint}"));
        check_endpoint(&mut report, endpoint, tls.as_ref().ok(), timeout).await;
    }

    report.blank();
    report.line(0, "🔑 Digital certificates:");
    check_certificates(&mut report, &config, &tls);

    report.blank();
    report.line(0, "⚙️ Etcd client:");
    check_client(&mut report, &config, cluster, timeout).await;
    report
}

fn tls_config(config: &EtcdConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &config.trusted_ca_file {
        for cert in CertificateDer::pem_slice_iter(&read(ca)?).filter_map(Result::ok) {
            roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(&read(cert)?).filter_map(Result::ok).collect();
            let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| format!("{}: {e}", key.display()))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    // No ALPN, as Cilium's check: the server tells the protocol from the request itself.
    Ok(Arc::new(config))
}

async fn check_endpoint(
    report: &mut Report,
    endpoint: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) {
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("", endpoint));
    let hostport = rest.trim_end_matches('/');
    let Some((host, port)) = hostport.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?))) else {
        report.fail(5, format_args!("Cannot parse endpoint {endpoint:?}"));
        return;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                let ips: Vec<String> = addrs.iter().take(4).map(|a| a.ip().to_string()).collect();
                report.ok(5, format_args!("Hostname resolved to: {}", ips.join(", ")));
                addrs
            }
            Ok(Err(error)) => return report.fail(5, format_args!("Cannot resolve hostname: {error}")),
            Err(_) => return report.fail(5, "Cannot resolve hostname: timed out"),
        },
    };
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addrs.as_slice())).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(error)) => {
            return report.fail(5, format_args!("Cannot establish TCP connection to {hostport}: {error}"));
        }
        Err(_) => return report.fail(5, format_args!("Cannot establish TCP connection to {hostport}: timed out")),
    };
    let peer = tcp.peer_addr().map_or_else(|_| hostport.to_owned(), |a| a.to_string());
    report.ok(5, format_args!("TCP connection successfully established to {peer}"));
    if scheme != "https" {
        return;
    }
    let Some(tls) = tls else {
        return report.fail(5, "Cannot establish TLS connection: the configured certificates cannot be loaded");
    };
    let Ok(server_name) = ServerName::try_from(host.to_owned()) else {
        return report.fail(5, format_args!("Cannot use {host:?} as a TLS server name"));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
    let mut stream = match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return report.fail(5, format_args!("Cannot establish TLS connection to {hostport}: {error}"));
        }
        Err(_) => return report.fail(5, format_args!("Cannot establish TLS connection to {hostport}: timed out")),
    };
    report.ok(5, format_args!("TLS connection successfully established to {peer}"));
    let session = stream.get_ref().1;
    let version = session.protocol_version().map_or_else(|| "unknown".to_owned(), |v| format!("{v:?}"));
    let suite = session.negotiated_cipher_suite().map_or_else(|| "unknown".to_owned(), |s| format!("{:?}", s.suite()));
    report.info(5, format_args!("Negotiated TLS version: {version}, ciphersuite {suite}"));

    // With TLS 1.3 a refused client certificate shows only on the first read.
    let request = format!("GET /version HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    let exchange = async {
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.map(|_| answer)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => match etcd_server_version(&String::from_utf8_lossy(&answer)) {
            Some(version) => report.info(5, format_args!("Etcd server version: {version}")),
            None => report.warn(5, "Could not retrieve etcd server version"),
        },
        Ok(Err(error)) => report.fail(5, format_args!("TLS client authentication or GET /version failed: {error}")),
        Err(_) => report.fail(5, "GET /version: timed out"),
    }
}

/// The `etcdserver` field of a `/version` answer.
fn etcd_server_version(answer: &str) -> Option<String> {
    let body = answer.split_once("\r\n\r\n").map_or(answer, |(_, body)| body);
    let start = body.find('{')?;
    let json: serde_json::Value = serde_json::Deserializer::from_str(&body[start..]).into_iter().next()?.ok()?;
    json["etcdserver"].as_str().map(str::to_owned)
}

fn check_certificates(report: &mut Report, config: &EtcdConfig, tls: &Result<Arc<rustls::ClientConfig>, String>) {
    if let Err(error) = tls {
        report.fail(3, format_args!("Cannot load the TLS files: {error}"));
    }
    match &config.trusted_ca_file {
        None => report.warn(3, "Root CA unset: using system pool"),
        Some(path) => match pem_certificates(path) {
            Ok(certs) => {
                report.ok(3, "TLS Root CA certificates:");
                for cert in certs {
                    describe(report, &cert);
                }
            }
            Err(error) => report.fail(3, format_args!("Failed to read the root CA {}: {error}", path.display())),
        },
    }
    match &config.cert_file {
        None => report.warn(3, "No available TLS client certificates"),
        Some(path) => match pem_certificates(path) {
            Ok(certs) => {
                report.ok(3, "TLS client certificates:");
                if let Some(leaf) = certs.first() {
                    describe(report, leaf);
                }
            }
            Err(error) => {
                report.fail(3, format_args!("Failed to read the client certificate {}: {error}", path.display()))
            }
        },
    }
    if let Some(user) = &config.username {
        let password = if config.password.as_deref().is_some_and(|p| !p.is_empty()) { "set" } else { "unset" };
        report.ok(3, format_args!("Username set to {user}, password is {password}"));
    }
}

fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() { Err("no certificate found".to_owned()) } else { Ok(certs) }
}

/// Serial, subject, issuer and validity; an expired or not yet valid certificate fails.
fn describe(report: &mut Report, der: &CertificateDer<'_>) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return report.fail(6, "Failed to parse certificate");
    };
    let serial: Vec<String> = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    report.line(6, format_args!("- Serial number:       {}", serial.join(":")));
    report.line(6, format_args!("  Subject:             {}", cert.subject()));
    report.line(6, format_args!("  Issuer:              {}", cert.issuer()));
    report.line(6, "  Validity:");
    let validity = cert.validity();
    report.line(6, format_args!("    Not before:  {}", validity.not_before));
    report.line(6, format_args!("    Not after:   {}", validity.not_after));
    if !validity.is_valid() {
        report.fail(8, "The certificate is not valid now");
    }
}

async fn check_client(report: &mut Report, config: &EtcdConfig, cluster: Option<&str>, timeout: Duration) {
    // A short dial timeout: the client waits for a connection that may never come.
    let dial = Dial {
        dial_timeout: Duration::from_secs(1),
        keep_alive: (Duration::from_secs(15), Duration::from_secs(5)),
        request_timeout: Some(timeout),
        require_leader: false,
    };
    let mut client = match dial_client(config, &dial).await {
        Ok(client) => client,
        Err(error) => {
            return report.fail(3, format_args!("Failed to establish connection: {}", crate::error_chain(&error)));
        }
    };
    let heartbeat = match tokio::time::timeout(timeout, client.get(HEARTBEAT_KEY, None)).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return report.fail(3, format_args!("Failed to retrieve key from etcd: {error}")),
        Err(_) => return report.fail(3, "Failed to retrieve key from etcd: timed out"),
    };
    report.ok(3, "Etcd connection successfully established");
    if let Some(header) = heartbeat.header() {
        report.info(3, format_args!("Etcd cluster ID: {:x}", header.cluster_id()));
    }
    if let Some(cluster) = cluster {
        let key = format!("cilium/cluster-config/{cluster}");
        match tokio::time::timeout(timeout, client.get(key.as_str(), None)).await {
            Ok(Ok(response)) if !response.kvs().is_empty() => {
                report.ok(
                    3,
                    format_args!("Cluster configuration found: {}", response.kvs()[0].value_str().unwrap_or("")),
                );
            }
            Ok(Ok(_)) => report.fail(3, format_args!("Cluster configuration {key} not found")),
            Ok(Err(error)) => report.fail(3, format_args!("Failed to retrieve {key}: {error}")),
            Err(_) => report.fail(3, format_args!("Failed to retrieve {key}: timed out")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_an_etcd_version_answer() {
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"etcdserver\":\"3.5.16\",\"etcdcluster\":\"3.5.0\"}";
        assert_eq!(etcd_server_version(answer).as_deref(), Some("3.5.16"));
        assert_eq!(etcd_server_version("HTTP/1.1 404 Not Found\r\n\r\n"), None);
    }

    #[test]
    fn remote_configs_are_told_by_content_as_cilium_tells_them() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cluster2"), "endpoints:\n- https://c2:2379\n").unwrap();
        std::fs::write(dir.path().join("common-etcd-client.crt"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(dir.path().join("..data"), "endpoints: []\n").unwrap();
        let names: Vec<String> = remote_configs(dir.path()).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["cluster2"]);
    }
}
