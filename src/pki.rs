//! Certificates made by the server itself: a CA, a server certificate with Cilium's names,
//! and client certificates whose Common Name is the etcd user.

use std::path::{Path, PathBuf};

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("invalid subject alternative name {0:?}")]
    Name(String),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
    validity: Duration,
}

/// Cilium's default certificate validity (`tls.auto.certValidityDuration`: 1095 days).
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(1095 * 24 * 3600);

/// The DNS names Cilium puts in the clustermesh-apiserver's server certificate: remote
/// agents dial `<cluster>.mesh.cilium.io`, local ones the service name.
pub const CILIUM_SERVER_NAMES: &[&str] = &["clustermesh-apiserver.cilium.io", "*.mesh.cilium.io", "localhost"];

impl Authority {
    /// A new self-signed CA whose certificates are valid for [`DEFAULT_VALIDITY`].
    pub fn new(common_name: &str) -> Result<Self, Error> {
        Self::with_validity(common_name, DEFAULT_VALIDITY)
    }

    pub fn with_validity(common_name: &str, validity: Duration) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem, key_pem, validity })
    }

    /// An existing CA (PEM certificate and PKCS#8 key), e.g. the `cilium-ca` Secret, so that
    /// every cluster of a mesh shares one trust root.
    pub fn load(cert_pem: &str, key_pem: &str, validity: Duration) -> Result<Self, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), validity })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.key_pem.clone()
    }

    /// A server certificate for `names` (DNS names or IP addresses). It also carries the
    /// clientAuth usage because etcd uses its server certificate as a client of itself.
    pub fn server(&self, common_name: &str, names: &[&str]) -> Result<Issued, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        for entry in names {
            let san = match entry.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*entry).try_into().map_err(|_| Error::Name((*entry).to_owned()))?),
            };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    /// A client certificate; `common_name` is the etcd user it authenticates as.
    pub fn client(&self, common_name: &str) -> Result<Issued, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, mut params: CertificateParams) -> Result<Issued, Error> {
        set_validity(&mut params, self.validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack before now, for clocks slightly behind ours.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `contents` to `dir/file`, private keys readable by the owner only.
pub fn write(dir: &Path, file: &str, contents: &str) -> Result<PathBuf, Error> {
    let path = dir.join(file);
    let result = std::fs::write(&path, contents).and_then(|()| {
        #[cfg(unix)]
        if file.contains("key") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    });
    result.map_err(|source| Error::Write { path: path.clone(), source })?;
    Ok(path)
}
