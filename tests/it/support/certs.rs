//! Test PKI generated at test time with rcgen: ECDSA P-256 keys, PKCS#8 PEM, written to a temp dir.
//!
//! Layout of the temp dir: `ca.pem`, `foreign-ca.pem`, `server.pem`, `server-key.pem`, and one
//! `<kind>-<n>-<cn>.pem` / `<kind>-<n>-<cn>-key.pem` pair per issued client certificate (kind =
//! `client`, `foreign` or `expired`). The files live as long as the [`Pki`] does.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Common Name of the test CA (modelled on Cilium's generated CA).
pub const CA_COMMON_NAME: &str = "Cilium CA";

/// Common Name of the server certificate.
pub const SERVER_COMMON_NAME: &str = "clustermesh-apiserver.cilium.io";

/// Subject alternative names of the server certificate.
pub const SERVER_SANS: &[&str] =
    &["localhost", "clustermesh-apiserver.cilium.io", "*.mesh.cilium.io", "127.0.0.1", "::1"];

/// One day in seconds.
const DAY: i64 = 24 * 60 * 60;

/// A certificate and its private key, as PEM strings and as files in the [`Pki`] temp dir.
#[derive(Debug, Clone)]
pub struct ClientCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

/// A certificate authority that can sign certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Authority {
    fn new(common_name: &str) -> Authority {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, -DAY, 3650 * DAY);
        let key = KeyPair::generate().expect("generate CA key");
        let cert = params.self_signed(&key).expect("self-sign CA certificate");
        Authority { cert_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }
}

/// What a leaf certificate is for.
enum Leaf<'a> {
    Server,
    Client { common_name: &'a str, expired: bool },
}

/// CA, server certificate and client certificates for one test, stored in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: Authority,
    foreign: Authority,
    ca_path: PathBuf,
    foreign_ca_path: PathBuf,
    server_cert_path: PathBuf,
    server_key_path: PathBuf,
    /// Current server certificate (replaced by [`Pki::rotate_server_cert`]).
    server: Mutex<ClientCert>,
    counter: AtomicUsize,
}

impl Pki {
    /// Writes the etcd client file of `cluster` into `dir` as Helm does (atomically, so a
    /// directory poller never reads half a file), authenticating as `user`; `extra` is appended.
    pub fn write_peer_config(&self, dir: &Path, cluster: &str, url: &str, user: &str, extra: &str) -> PathBuf {
        let cert = self.client(user);
        let text = format!(
            "endpoints:\n- {url}\ntrusted-ca-file: {}\ncert-file: {}\nkey-file: {}\n{extra}",
            self.ca_path().display(),
            cert.cert_path.display(),
            cert.key_path.display()
        );
        let path = dir.join(cluster);
        let tmp = dir.join(format!(".{cluster}.tmp"));
        fs::write(&tmp, text).expect("write peer config");
        fs::rename(&tmp, &path).expect("rename peer config");
        path
    }

    /// Creates a CA ("Cilium CA"), a second unrelated CA (for "another CA is refused" tests) and a
    /// server certificate, and writes them to a fresh temp dir.
    pub fn new() -> Pki {
        super::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("it-pki-").tempdir().expect("create PKI temp dir");
        let ca = Authority::new(CA_COMMON_NAME);
        // Same subject name, different key: a verifier must check signatures, not names.
        let foreign = Authority::new(CA_COMMON_NAME);
        let ca_path = dir.path().join("ca.pem");
        let foreign_ca_path = dir.path().join("foreign-ca.pem");
        write_file(&ca_path, &ca.cert_pem, 0o644);
        write_file(&foreign_ca_path, &foreign.cert_pem, 0o644);
        let server_cert_path = dir.path().join("server.pem");
        let server_key_path = dir.path().join("server-key.pem");
        let (cert_pem, key_pem) = sign(&ca, Leaf::Server);
        let server =
            ClientCert { cert_pem, key_pem, cert_path: server_cert_path.clone(), key_path: server_key_path.clone() };
        write_pair(&server);
        Pki {
            dir,
            ca,
            foreign,
            ca_path,
            foreign_ca_path,
            server_cert_path,
            server_key_path,
            server: Mutex::new(server),
            counter: AtomicUsize::new(0),
        }
    }

    /// The temp dir holding every file of this PKI.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// The CA of [`Pki::foreign_client`] certificates (same subject name as the real CA).
    pub fn foreign_ca_path(&self) -> &Path {
        &self.foreign_ca_path
    }

    pub fn foreign_ca_pem(&self) -> &str {
        &self.foreign.cert_pem
    }

    pub fn server_cert_path(&self) -> &Path {
        &self.server_cert_path
    }

    pub fn server_key_path(&self) -> &Path {
        &self.server_key_path
    }

    /// The current server certificate PEM (changes after [`Pki::rotate_server_cert`]).
    pub fn server_cert_pem(&self) -> String {
        self.server.lock().unwrap().cert_pem.clone()
    }

    /// The current server private key PEM (changes after [`Pki::rotate_server_cert`]).
    pub fn server_key_pem(&self) -> String {
        self.server.lock().unwrap().key_pem.clone()
    }

    /// The current server certificate and key (PEM and paths).
    pub fn server(&self) -> ClientCert {
        self.server.lock().unwrap().clone()
    }

    /// Issues a fresh server certificate (same CA, same SANs, new key and serial) and replaces
    /// `server.pem` / `server-key.pem` with it. Each file is replaced atomically (write + rename),
    /// key first, then certificate; a reloader may briefly see a new key with the old
    /// certificate and should retry. Returns the new certificate.
    pub fn rotate_server_cert(&self) -> ClientCert {
        let (cert_pem, key_pem) = sign(&self.ca, Leaf::Server);
        let mut server = self.server.lock().unwrap();
        server.cert_pem = cert_pem;
        server.key_pem = key_pem;
        write_pair(&server);
        server.clone()
    }

    /// Issues a client certificate (EKU clientAuth) with Common Name `cn`, signed by the CA.
    pub fn client(&self, cn: &str) -> ClientCert {
        self.issue_client(&self.ca, cn, false, "client")
    }

    /// Issues a client certificate with Common Name `cn` from a *different* CA that no server
    /// of this PKI trusts.
    pub fn foreign_client(&self, cn: &str) -> ClientCert {
        self.issue_client(&self.foreign, cn, false, "foreign")
    }

    /// Issues a client certificate with Common Name `cn`, signed by the right CA, whose validity
    /// lies entirely in the past (notBefore = now − 2 days, notAfter = now − 1 day).
    pub fn expired_client(&self, cn: &str) -> ClientCert {
        self.issue_client(&self.ca, cn, true, "expired")
    }

    fn issue_client(&self, ca: &Authority, cn: &str, expired: bool, kind: &str) -> ClientCert {
        let (cert_pem, key_pem) = sign(ca, Leaf::Client { common_name: cn, expired });
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let stem = format!("{kind}-{n}-{}", file_safe(cn));
        let cert = ClientCert {
            cert_pem,
            key_pem,
            cert_path: self.dir.path().join(format!("{stem}.pem")),
            key_path: self.dir.path().join(format!("{stem}-key.pem")),
        };
        write_pair(&cert);
        cert
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir.path()).finish()
    }
}

/// Signs a leaf certificate with a fresh ECDSA P-256 key; returns (certificate PEM, PKCS#8 key PEM).
fn sign(ca: &Authority, leaf: Leaf<'_>) -> (String, String) {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, -DAY, 365 * DAY);
    match leaf {
        Leaf::Server => {
            // `CertificateParams::new` turns IP strings into IP SANs and the rest into DNS SANs.
            params.subject_alt_names =
                CertificateParams::new(SERVER_SANS.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                    .expect("server SANs")
                    .subject_alt_names;
            params.distinguished_name = dn(SERVER_COMMON_NAME);
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
            // etcd 3.4 also uses its server certificate as a client certificate (grpc-gateway).
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        }
        Leaf::Client { common_name, expired } => {
            params.distinguished_name = dn(common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            if expired {
                set_validity(&mut params, -2 * DAY, -DAY);
            }
        }
    }
    let key = KeyPair::generate().expect("generate leaf key");
    let cert = params.signed_by(&key, &ca.issuer).expect("sign leaf certificate");
    (cert.pem(), key.serialize_pem())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Sets the validity window to [now + `from_secs`, now + `to_secs`] (offsets may be negative).
fn set_validity(params: &mut CertificateParams, from_secs: i64, to_secs: i64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs() as i64;
    let at = |offset: i64| {
        let secs = u64::try_from(now + offset).expect("validity after 1970");
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs)
    };
    params.not_before = at(from_secs);
    params.not_after = at(to_secs);
}

/// Writes a certificate and its key (key first, mode 0600).
fn write_pair(cert: &ClientCert) {
    write_file(&cert.key_path, &cert.key_pem, 0o600);
    write_file(&cert.cert_path, &cert.cert_pem, 0o644);
}

/// Atomically replaces `path` with `contents` (write to a sibling temp file, fsync, rename).
fn write_file(path: &Path, contents: &str, mode: u32) {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), path.display()));
}

/// A Common Name reduced to characters that are safe in a file name.
fn file_safe(cn: &str) -> String {
    let s: String =
        cn.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).take(48).collect();
    if s.is_empty() { "empty".to_string() } else { s }
}
