//! An attached etcd (one member or a cluster) as a backend, configured by Cilium's etcd
//! client file. The file is read, and becomes a connection, exactly as for a remote cluster:
//! by the client library's `EtcdConfig` and `dial_client`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use clustermesh_client::config::EtcdConfig as ClientFile;
use clustermesh_client::connect::{Dial, dial_client};
use etcd_client::{Client, DeleteOptions, GetOptions, LeaseGrantOptions, PutOptions};
use futures::future::BoxFuture;

use super::{Backend, Error, Result};
use crate::blob::Blob;

/// Cilium's etcd client configuration file (`--kvstore-opt etcd.config=FILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    path: String,
    file: ClientFile,
}

/// The writer's dialing: Cilium's etcd client defaults for the local store.
const DIAL: Dial = Dial {
    dial_timeout: Duration::from_secs(5),
    keep_alive: (Duration::from_secs(15), Duration::from_secs(5)),
    request_timeout: Some(Duration::from_secs(15)),
    require_leader: false,
};

impl EtcdConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let config_error = |reason: String| Error::Config { path: path.display().to_string(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| config_error(e.to_string()))?;
        let file = ClientFile::parse(&text, path).map_err(|e| config_error(e.to_string()))?;
        Ok(Self { path: path.display().to_string(), file })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.file.endpoints
    }

    /// Connects lazily: the first request dials, and the client redials by itself.
    pub async fn connect(&self) -> Result<Client> {
        dial_client(&self.file, &DIAL)
            .await
            .map_err(|e| Error::Config { path: self.path.clone(), reason: crate::error_chain(&e) })
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
    fn grant_lease(&self, ttl: Duration) -> BoxFuture<'_, Result<i64>> {
        Box::pin(async move {
            let response = self.client.clone().lease_grant(ttl.as_secs() as i64, None::<LeaseGrantOptions>).await;
            Ok(response.map_err(Error::Etcd)?.id())
        })
    }

    fn keep_alive(&self, lease: i64) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
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
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Blob, lease: i64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let options = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            match self.client.clone().put(key, value.to_vec(), options).await {
                Ok(_) => Ok(()),
                Err(error) if lease_gone(&error) => Err(Error::LeaseLost(lease)),
                Err(error) => Err(Error::Etcd(error)),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>>> {
        Box::pin(async move {
            let mut response = self.client.clone().get(key, None).await.map_err(Error::Etcd)?;
            Ok(response.take_kvs().pop().map(|kv| Bytes::from(kv.into_key_value().1)))
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.client.clone().delete(key, None::<DeleteOptions>).await.map_err(Error::Etcd)?;
            Ok(())
        })
    }

    fn keys_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let options = GetOptions::new().with_prefix().with_keys_only();
            let mut response = self.client.clone().get(prefix, Some(options)).await.map_err(Error::Etcd)?;
            Ok(response.take_kvs().into_iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect())
        })
    }

    fn entries_with_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<super::Entry>>> {
        Box::pin(async move {
            let options = GetOptions::new().with_prefix();
            let mut response = self.client.clone().get(prefix, Some(options)).await.map_err(Error::Etcd)?;
            let entries = response.take_kvs().into_iter().map(|kv| super::Entry {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: Bytes::copy_from_slice(kv.value()),
                lease: kv.lease(),
            });
            Ok(entries.collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ciliums_etcd_config_file_parses_as_the_client_library_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etcd-config.yaml");
        // The file baked into Cilium's image, and the deprecated `ca-file` spelling.
        std::fs::write(
            &path,
            "---\nca-file: /var/lib/cilium/etcd-secrets/ca.crt\nkey-file: /var/lib/cilium/etcd-secrets/tls.key\n\
             cert-file: /var/lib/cilium/etcd-secrets/tls.crt\nendpoints:\n- https://127.0.0.1:2379\n",
        )
        .unwrap();
        let config = EtcdConfig::load(&path).expect("parses");
        assert_eq!(config.endpoints(), ["https://127.0.0.1:2379"]);
        assert_eq!(config.file.trusted_ca_file.as_deref(), Some(Path::new("/var/lib/cilium/etcd-secrets/ca.crt")));
        std::fs::write(&path, "endpoints: []\n").unwrap();
        assert!(matches!(EtcdConfig::load(&path), Err(Error::Config { .. })));
    }
}
