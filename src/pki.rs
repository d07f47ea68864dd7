//! Certificates made by the server itself: a CA, a server certificate with Cilium's names,
//! and client certificates whose Common Name is the etcd user.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
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
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// The DNS names Cilium puts in the clustermesh-apiserver's server certificate: remote
/// agents dial `<cluster>.mesh.cilium.io`, local ones the service name.
pub const CILIUM_SERVER_NAMES: &[&str] = &["clustermesh-apiserver.cilium.io", "*.mesh.cilium.io", "localhost"];

impl Authority {
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        Ok(Self { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
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

    fn issue(&self, params: CertificateParams) -> Result<Issued, Error> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
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
