//! `certs generate`: the certificate set Cilium's chart makes for a clustermesh-apiserver,
//! one directory per Secret with the Secret's file names, so that
//! `kubectl create secret generic NAME --from-file=DIR/NAME` recreates it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pki::{self, Authority, Issued};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pki(#[from] pki::Error),
    #[error("reading the CA {path}")]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("creating {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How remote clusters authenticate: `legacy`/`migration` use the shared user `remote`,
/// `cluster` the per-cluster user `remote-<cluster>` (Helm `tls.authMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RemoteUser {
    Shared,
    PerCluster,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub cluster_name: String,
    pub namespace: String,
    pub out: PathBuf,
    /// An existing CA to sign with (`cilium-ca`), shared across the mesh; else a new one.
    pub ca: Option<(PathBuf, PathBuf)>,
    pub remote_user: RemoteUser,
    pub extra_dns_names: Vec<String>,
    pub extra_ip_addresses: Vec<IpAddr>,
    pub validity: Duration,
}

/// Writes the CA and the server, admin, remote and local certificates; returns the
/// directories written.
pub fn generate(options: &Options) -> Result<Vec<PathBuf>, Error> {
    let ca = match &options.ca {
        Some((cert, key)) => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path).map_err(|source| Error::ReadCa { path: path.clone(), source })
            };
            Authority::load(&read(cert)?, &read(key)?, options.validity)?
        }
        None => Authority::with_validity("Cilium CA", options.validity)?,
    };
    let cluster = &options.cluster_name;
    let service_name = format!("clustermesh-apiserver.{}.svc", options.namespace);
    let mut names: Vec<String> = pki::CILIUM_SERVER_NAMES.iter().map(|n| n.to_string()).collect();
    names.push(service_name);
    names.extend(options.extra_dns_names.iter().cloned());
    names.extend(["127.0.0.1".to_owned(), "::1".to_owned()]);
    names.extend(options.extra_ip_addresses.iter().map(IpAddr::to_string));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();

    let remote = match options.remote_user {
        RemoteUser::Shared => "remote".to_owned(),
        RemoteUser::PerCluster => format!("remote-{cluster}"),
    };
    let leaves: [(&str, Issued); 4] = [
        ("clustermesh-apiserver-server-cert", ca.server("clustermesh-apiserver.cilium.io", &names)?),
        ("clustermesh-apiserver-admin-cert", ca.client(&format!("admin-{cluster}"))?),
        ("clustermesh-apiserver-remote-cert", ca.client(&remote)?),
        ("clustermesh-apiserver-local-cert", ca.client(&format!("local-{cluster}"))?),
    ];

    let mut written = Vec::new();
    let ca_dir = create(&options.out, "cilium-ca")?;
    pki::write(&ca_dir, "ca.crt", &ca.cert_pem())?;
    pki::write(&ca_dir, "ca.key", &ca.key_pem())?;
    written.push(ca_dir);
    for (secret, issued) in leaves {
        let dir = create(&options.out, secret)?;
        pki::write(&dir, "ca.crt", &ca.cert_pem())?;
        pki::write(&dir, "tls.crt", &issued.cert_pem)?;
        pki::write(&dir, "tls.key", &issued.key_pem)?;
        written.push(dir);
    }
    Ok(written)
}

fn create(out: &Path, name: &str) -> Result<PathBuf, Error> {
    let path = out.join(name);
    std::fs::create_dir_all(&path).map_err(|source| Error::CreateDir { path: path.clone(), source })?;
    Ok(path)
}
