//! An attached etcd (one member or a cluster) as a backend, configured by Cilium's etcd
//! client YAML (`endpoints`, `trusted-ca-file`, `cert-file`, `key-file`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, GetOptions, Identity, LeaseGrantOptions, PutOptions, TlsOptions,
};
use serde::Deserialize;

use super::{Backend, Error, Result};

/// Cilium's etcd client configuration file (`--kvstore-opt etcd.config=FILE`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub trusted_ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let config_error = |reason: String| Error::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
        let config: Self = serde_saphyr::from_str(&text).map_err(|e| config_error(e.to_string()))?;
        if config.endpoints.is_empty() {
            return Err(config_error("no endpoints".into()));
        }
        Ok(config)
    }

    /// Connects lazily: the first request dials, and the client redials by itself.
    pub async fn connect(&self) -> Result<Client> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| Error::Config { path: path.display().to_string(), reason: e.to_string() })
        };
        let mut tls = None;
        if let Some(ca) = &self.trusted_ca_file {
            let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
                options = options.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            tls = Some(options);
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(15), Duration::from_secs(5));
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        Client::connect(&self.endpoints, Some(options)).await.map_err(Error::Etcd)
    }
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
}

impl Etcd {
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

/// etcd answers a write with a lease it no longer has with this status message.
fn lease_gone(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if status.code() == tonic::Code::NotFound && status.message().contains("requested lease not found"))
}

impl Backend for Etcd {
    async fn grant_lease(&self, ttl: Duration) -> Result<i64> {
        let response = self.client.clone().lease_grant(ttl.as_secs() as i64, None::<LeaseGrantOptions>).await;
        Ok(response.map_err(Error::Etcd)?.id())
    }

    async fn keep_alive(&self, lease: i64) -> Result<()> {
        let mut client = self.client.clone();
        let (mut keeper, mut responses) = match client.lease_keep_alive(lease).await {
            Ok(stream) => stream,
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => return Err(Error::LeaseLost(lease)),
            Err(error) => return Err(Error::Etcd(error)),
        };
        keeper.keep_alive().await.map_err(Error::Etcd)?;
        match responses.message().await.map_err(Error::Etcd)? {
            Some(response) if response.ttl() > 0 => Ok(()),
            _ => Err(Error::LeaseLost(lease)),
        }
    }

    async fn put(&self, key: &str, value: Bytes, lease: i64) -> Result<()> {
        let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
        match self.client.clone().put(key, value.to_vec(), options).await {
            Ok(_) => Ok(()),
            Err(error) if lease_gone(&error) => Err(Error::LeaseLost(lease)),
            Err(error) => Err(Error::Etcd(error)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let mut response = self.client.clone().get(key, None).await.map_err(Error::Etcd)?;
        Ok(response.take_kvs().pop().map(|kv| Bytes::from(kv.into_key_value().1)))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client.clone().delete(key, None::<DeleteOptions>).await.map_err(Error::Etcd)?;
        Ok(())
    }

    async fn keys_with_prefix(&self, prefix: &str) -> Result<Vec<String>> {
        let options = GetOptions::new().with_prefix().with_keys_only();
        let mut response = self.client.clone().get(prefix, Some(options)).await.map_err(Error::Etcd)?;
        Ok(response.take_kvs().into_iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciliums_etcd_config_file_parses() {
        let text = "endpoints:\n- https://cluster1.mesh.cilium.io:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/cluster1-ca.crt\ncert-file: /var/lib/cilium/clustermesh/cluster1.crt\nkey-file: /var/lib/cilium/clustermesh/cluster1.key\n";
        let config: EtcdConfig = serde_saphyr::from_str(text).expect("parses");
        assert_eq!(config.endpoints, ["https://cluster1.mesh.cilium.io:2379"]);
        assert_eq!(config.key_file.as_deref(), Some(Path::new("/var/lib/cilium/clustermesh/cluster1.key")));
    }
}
