//! `cilium/state/nodes/v1/<C>/<node>`: a node of the remote cluster (`pkg/node/types/node.go`,
//! no JSON tags: the Go field names are the wire names).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::go::{IpNet, null_default, opt_ip, ser_opt_ip};
use super::{ClusterId, Entry, Kind, Rejected, Validation, ensure};

/// A remote node. Fields missing from older or newer shapes (`NodeIdentity`, `BootID`) default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Node {
    #[serde(rename = "Name", deserialize_with = "null_default")]
    pub name: String,
    #[serde(rename = "Cluster", deserialize_with = "null_default")]
    pub cluster: String,
    #[serde(rename = "IPAddresses", deserialize_with = "null_default")]
    pub ip_addresses: Vec<NodeAddress>,
    #[serde(rename = "IPv4AllocCIDR")]
    pub ipv4_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv4SecondaryAllocCIDRs", deserialize_with = "null_default")]
    pub ipv4_secondary_alloc_cidrs: Vec<IpNet>,
    #[serde(rename = "IPv6AllocCIDR")]
    pub ipv6_alloc_cidr: Option<IpNet>,
    #[serde(rename = "IPv6SecondaryAllocCIDRs", deserialize_with = "null_default")]
    pub ipv6_secondary_alloc_cidrs: Vec<IpNet>,
    #[serde(rename = "IPv4HealthIP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ipv4_health_ip: Option<IpAddr>,
    #[serde(rename = "IPv6HealthIP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ipv6_health_ip: Option<IpAddr>,
    #[serde(rename = "IPv4IngressIP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ipv4_ingress_ip: Option<IpAddr>,
    #[serde(rename = "IPv6IngressIP", deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ipv6_ingress_ip: Option<IpAddr>,
    #[serde(rename = "ClusterID", deserialize_with = "null_default")]
    pub cluster_id: ClusterId,
    #[serde(rename = "Source", deserialize_with = "null_default")]
    pub source: String,
    #[serde(rename = "EncryptionKey", deserialize_with = "null_default")]
    pub encryption_key: u8,
    #[serde(rename = "Labels", deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(rename = "Annotations", deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    #[serde(rename = "WireguardPubKey", deserialize_with = "null_default")]
    pub wireguard_pub_key: String,
    #[serde(rename = "BootID", deserialize_with = "null_default")]
    pub boot_id: String,
}

/// One address of a node: `InternalIP`, `ExternalIP`, `CiliumInternalIP`, ...
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "Type", default, deserialize_with = "null_default")]
    pub address_type: String,
    #[serde(rename = "IP", default, deserialize_with = "opt_ip", serialize_with = "ser_opt_ip")]
    pub ip: Option<IpAddr>,
}

impl Entry for Node {
    const KIND: Kind = Kind::Nodes;

    /// Cilium's node rules: `Name` and `Cluster` set (`validate`), `Cluster` = the remote's name
    /// (`ClusterNameValidator`), `Name` = the key (`NameValidator`), `ClusterID` = the remote
    /// config's ID (`ClusterIDValidator`) (`pkg/node/store/store.go`).
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected> {
        let node: Node = serde_json::from_slice(value)?;
        ensure(!node.cluster.is_empty(), || Rejected::Unset("cluster"))?;
        ensure(!node.name.is_empty(), || Rejected::Unset("name"))?;
        ensure(validation.cluster == node.cluster.as_str(), || Rejected::ClusterName {
            got: node.cluster.clone(),
            expected: validation.cluster.to_string(),
        })?;
        ensure(node.name == key, || Rejected::KeyMismatch { what: "name", got: node.name.clone(), key: key.into() })?;
        ensure(node.cluster_id == validation.cluster_id, || Rejected::ClusterId {
            got: node.cluster_id.0,
            expected: validation.cluster_id.0,
        })?;
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::validation;

    const NODE: &str = r#"{"Name":"k8s-node-a1","Cluster":"cluster1","IPAddresses":[{"Type":"InternalIP","IP":"192.168.10.11"}],"IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.1.0.10","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":1,"Source":"custom-resource","EncryptionKey":0,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}"#;

    fn decode(key: &str, value: &str) -> Result<Node, Rejected> {
        Node::decode(key, value.as_bytes(), &validation("cluster1", 1))
    }

    #[test]
    fn a_valid_node_decodes_with_its_cidrs_and_addresses() {
        let node = decode("k8s-node-a1", NODE).unwrap();
        assert_eq!(node.ipv4_alloc_cidr.unwrap().to_string(), "10.1.0.0/24");
        assert_eq!(node.ip_addresses[0].ip.unwrap().to_string(), "192.168.10.11");
        assert_eq!(node.ipv4_health_ip.unwrap().to_string(), "10.1.0.10");
        assert_eq!(node.ipv6_health_ip, None);
        assert!(node.labels.is_empty());
    }

    #[test]
    fn nodes_of_another_cluster_name_or_id_or_key_are_rejected() {
        assert!(matches!(
            decode("k8s-node-a1", &NODE.replace("\"cluster1\"", "\"cluster9\"")),
            Err(Rejected::ClusterName { .. })
        ));
        assert!(matches!(decode("other", NODE), Err(Rejected::KeyMismatch { .. })));
        assert!(matches!(
            decode("k8s-node-a1", &NODE.replace("\"ClusterID\":1", "\"ClusterID\":2")),
            Err(Rejected::ClusterId { got: 2, expected: 1 })
        ));
        assert!(matches!(decode("", &NODE.replace("k8s-node-a1", "")), Err(Rejected::Unset("name"))));
        assert!(matches!(decode("k8s-node-a1", "{"), Err(Rejected::Json(_))));
        assert!(matches!(decode("k8s-node-a1", &NODE.replace("192.168.10.11", "not-an-ip")), Err(Rejected::Json(_))));
        assert!(matches!(decode("k8s-node-a1", &NODE.replace("////AA==", "/wD/AA==")), Err(Rejected::Json(_))));
    }
}
