//! `cilium/state/ip/v1/default/<ip>`: which identity an IP (endpoint) has
//! (`IPIdentityPair`, `pkg/identity/identity.go`).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::go::{base64_decode, mask_prefix_len, null_default, opt_ip, ser_opt_ip};
use super::{Entry, Kind, NumericIdentity, Rejected, Validation, ensure};

/// One IP → identity entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpCacheEntry {
    #[serde(rename = "IP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ip: Option<IpAddr>,
    /// Only set for CIDR entries (never by the apiserver): base64 netmask bytes, as stored.
    #[serde(rename = "Mask", skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(rename = "HostIP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub host_ip: Option<IpAddr>,
    #[serde(rename = "ID", deserialize_with = "null_default")]
    pub id: NumericIdentity,
    /// IPsec key index.
    #[serde(rename = "Key", deserialize_with = "null_default")]
    pub key: u8,
    #[serde(rename = "Metadata", deserialize_with = "null_default")]
    pub metadata: String,
    #[serde(rename = "K8sNamespace", deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub k8s_namespace: String,
    #[serde(rename = "K8sPodName", deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub k8s_pod_name: String,
    #[serde(rename = "K8sPodUID", deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub k8s_pod_uid: String,
    #[serde(rename = "K8sServiceAccount", deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub k8s_service_account: String,
    #[serde(rename = "NamedPorts", deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

/// A named container port of the endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NamedPort {
    #[serde(rename = "Name", deserialize_with = "null_default")]
    pub name: String,
    #[serde(rename = "Port", deserialize_with = "null_default")]
    pub port: u16,
    #[serde(rename = "Protocol", deserialize_with = "null_default")]
    pub protocol: String,
}

impl IpCacheEntry {
    /// The key this entry belongs under, as Go prints it (`PrefixString`): the IP, plus
    /// `/<prefix length>` when a mask is set. `None` without an IP.
    pub fn key_name(&self) -> Option<String> {
        let ip = self.ip?;
        Some(match &self.mask {
            None => ip.to_string(),
            // Go's `IPMask.Size` reports 0 for a malformed or non-canonical mask.
            Some(mask) => {
                let len = base64_decode(mask).and_then(|bytes| mask_prefix_len(&bytes)).unwrap_or(0);
                format!("{ip}/{len}")
            }
        })
    }

    /// The identity the agent uses for this entry: a remote "host" (1) is a remote node (6).
    pub fn effective_identity(&self) -> NumericIdentity {
        if self.id == NumericIdentity::HOST { NumericIdentity::REMOTE_NODE } else { self.id }
    }
}

impl Entry for IpCacheEntry {
    const KIND: Kind = Kind::IpCache;

    /// Cilium's ipcache rules: the key equals the value's IP in Go's text form
    /// (`IPIdentityPair.Unmarshal`), and the identity is in the remote cluster's range or a
    /// reserved one below 256 (`WithIdentityValidator`, `pkg/ipcache/kvstore.go`).
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected> {
        let entry: IpCacheEntry = serde_json::from_slice(value)?;
        let name = entry.key_name().unwrap_or_else(|| "<nil>".into());
        ensure(name == key, || Rejected::KeyMismatch { what: "IP address", got: name.clone(), key: key.into() })?;
        let id = entry.id.0;
        ensure(validation.identity_range().contains(&id) || id < NumericIdentity::MINIMAL_GLOBAL.0, || {
            Rejected::IdentityOutOfRange { id: id.into(), cluster_id: validation.cluster_id.0 }
        })?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::validation;

    fn decode(key: &str, value: &str) -> Result<IpCacheEntry, Rejected> {
        IpCacheEntry::decode(key, value.as_bytes(), &validation("cluster1", 1))
    }

    #[test]
    fn the_key_must_be_the_ip_in_go_text_form() {
        let v4 = r#"{"IP":"10.1.0.57","HostIP":"192.168.10.11","ID":65792,"Key":0,"Metadata":""}"#;
        assert!(decode("10.1.0.57", v4).is_ok());
        assert!(matches!(decode("10.1.0.58", v4), Err(Rejected::KeyMismatch { .. })));
        let v6 = r#"{"IP":"FD00:10:2:3:0::3a5c","ID":65792}"#;
        assert!(decode("fd00:10:2:3::3a5c", v6).is_ok());
        assert!(matches!(decode("FD00:10:2:3:0::3a5c", v6), Err(Rejected::KeyMismatch { .. })));
        let cidr = r#"{"IP":"10.9.0.0","Mask":"//8AAA==","ID":2}"#;
        assert!(decode("10.9.0.0/16", cidr).is_ok());
        assert!(matches!(decode("10.1.0.57", r#"{"IP":"","ID":65792}"#), Err(Rejected::KeyMismatch { .. })));
    }

    #[test]
    fn identities_outside_the_cluster_range_are_rejected_unless_reserved() {
        assert!(decode("10.0.0.1", r#"{"IP":"10.0.0.1","ID":6}"#).is_ok());
        assert!(decode("10.0.0.1", r#"{"IP":"10.0.0.1","ID":255}"#).is_ok());
        assert!(matches!(
            decode("10.0.0.1", r#"{"IP":"10.0.0.1","ID":256}"#),
            Err(Rejected::IdentityOutOfRange { .. })
        ));
        assert!(matches!(
            decode("10.0.0.1", r#"{"IP":"10.0.0.1","ID":131072}"#),
            Err(Rejected::IdentityOutOfRange { .. })
        ));
    }

    #[test]
    fn a_remote_host_identity_counts_as_remote_node() {
        let entry = decode("10.0.0.1", r#"{"IP":"10.0.0.1","ID":1}"#).unwrap();
        assert_eq!(entry.effective_identity(), NumericIdentity::REMOTE_NODE);
    }
}
