//! CiliumNode → `cilium/state/nodes/v1/<cluster>/<node>` (Go `nodeTypes.Node`).
//!
//! Go's `Node` has no JSON tags: field names and declaration order are the wire format. Like
//! Cilium's `ParseCiliumNode`, addresses and CIDRs that do not parse are skipped, not fatal: one
//! bad address must not hide a node from the whole mesh (wire contract §9).

use std::net::IpAddr;

use crate::blob::Blob;

use super::encode::{JsonWriter, base64, go_net_ip, parse_ip, unmap};
use super::{Entry, Error, NODES_PREFIX, Result, Settings};
use crate::k8s::CiliumNode;

const WIREGUARD_PUB_KEY: &str = "network.cilium.io/wg-pub-key";
const WIREGUARD_PUB_KEY_ALIAS: &str = "io.cilium.network.wg-pub-key";

/// The node key for a CiliumNode name; a stable wire contract.
pub(crate) fn node_key(settings: &Settings, name: &str) -> String {
    format!("{NODES_PREFIX}/{}/{name}", settings.cluster_name)
}

/// Translates a CiliumNode into its store entry. `Cluster` and `ClusterID` are the apiserver's
/// own, whatever the object says; `Source` is always `custom-resource`.
pub fn node_entry(node: &CiliumNode, settings: &Settings) -> Result<Entry> {
    let name = node
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.name" })?;
    let spec = &node.spec;

    let encryption_key = match spec.encryption.as_ref().and_then(|e| e.key) {
        None => 0,
        Some(key) => u8::try_from(key).map_err(|_| Error::InvalidValue {
            field: "spec.encryption.key".into(),
            value: key.to_string(),
            expected: "an IPsec key index in 0..=255",
        })?,
    };

    let mut cidrs = AllocCidrs::default();
    let ipam = spec.ipam.as_ref();
    for text in ipam.and_then(|i| i.pod_cidrs.as_deref()).unwrap_or_default() {
        cidrs.push(text);
    }
    let pools = ipam.and_then(|i| i.pools.as_ref()).and_then(|p| p.allocated.as_deref()).unwrap_or_default();
    for text in pools.iter().flat_map(|pool| pool.cidrs.as_deref().unwrap_or_default()) {
        cidrs.push(text);
    }

    let health = spec.health.as_ref();
    let ingress = spec.ingress.as_ref();
    let annotations = node.metadata.annotations.as_ref();
    let wireguard_key = annotations
        .and_then(|a| a.get(WIREGUARD_PUB_KEY).or_else(|| a.get(WIREGUARD_PUB_KEY_ALIAS)))
        .map_or("", String::as_str);

    let mut w = JsonWriter::new();
    w.begin_object();
    w.field_str("Name", name);
    w.field_str("Cluster", &settings.cluster_name);
    w.key("IPAddresses");
    let addresses: Vec<(&str, IpAddr)> = spec
        .addresses
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|a| Some((a.type_.as_deref().unwrap_or(""), unmap(parse_ip(a.ip.as_deref()?)?))))
        .collect();
    if addresses.is_empty() {
        w.null();
    } else {
        w.begin_array();
        for (type_, ip) in addresses {
            w.begin_object();
            w.field_str("Type", type_);
            w.field_str("IP", &go_net_ip(ip));
            w.end_object();
        }
        w.end_array();
    }
    w.key("IPv4AllocCIDR");
    write_cidr(&mut w, cidrs.v4.first());
    w.key("IPv4SecondaryAllocCIDRs");
    write_cidrs(&mut w, cidrs.v4.get(1..));
    w.key("IPv6AllocCIDR");
    write_cidr(&mut w, cidrs.v6.first());
    w.key("IPv6SecondaryAllocCIDRs");
    write_cidrs(&mut w, cidrs.v6.get(1..));
    w.field_str("IPv4HealthIP", &v4_only(health.and_then(|h| h.ipv4.as_deref())));
    w.field_str("IPv6HealthIP", &v6_only(health.and_then(|h| h.ipv6.as_deref())));
    w.field_str("IPv4IngressIP", &v4_only(ingress.and_then(|h| h.ipv4.as_deref())));
    w.field_str("IPv6IngressIP", &v6_only(ingress.and_then(|h| h.ipv6.as_deref())));
    w.field_uint("ClusterID", u64::from(settings.cluster_id));
    w.field_str("Source", "custom-resource");
    w.field_uint("EncryptionKey", u64::from(encryption_key));
    w.key("Labels");
    w.string_map(node.metadata.labels.as_ref());
    w.key("Annotations");
    w.string_map(annotations);
    w.field_str("WireguardPubKey", wireguard_key);
    w.field_str("BootID", spec.boot_id.as_deref().unwrap_or(""));
    w.end_object();

    Ok((node_key(settings, name).into(), Blob::from(w.finish())))
}

/// A parsed pod CIDR: the masked network address and the prefix length.
struct Cidr {
    network: IpAddr,
    bits: u8,
}

/// The first CIDR of each family is the primary alloc CIDR, the rest are secondary, in input order.
#[derive(Default)]
struct AllocCidrs {
    v4: Vec<Cidr>,
    v6: Vec<Cidr>,
}

impl AllocCidrs {
    fn push(&mut self, text: &str) {
        let Some(cidr) = parse_cidr(text) else { return };
        match cidr.network {
            IpAddr::V4(_) => self.v4.push(cidr),
            IpAddr::V6(_) => self.v6.push(cidr),
        }
    }
}

/// `net.ParseCIDR`: address and decimal prefix length; the address is masked to the network.
/// IPv4-mapped IPv6 prefixes are rejected: Go would render them as a 4-byte IP with a 16-byte
/// mask, which no reader expects.
fn parse_cidr(text: &str) -> Option<Cidr> {
    let (addr, bits) = text.split_once('/')?;
    if bits.is_empty() || !bits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u8 = bits.parse().ok()?;
    match parse_ip(addr)? {
        IpAddr::V4(v4) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            Some(Cidr { network: IpAddr::from((u32::from(v4) & mask).to_be_bytes()), bits })
        }
        IpAddr::V6(v6) if bits <= 128 && v6.to_ipv4_mapped().is_none() => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            Some(Cidr { network: IpAddr::from((u128::from(v6) & mask).to_be_bytes()), bits })
        }
        _ => None,
    }
}

/// The legacy `net.IPNet` object form `{"IP":"10.0.0.0","Mask":"////AA=="}`; older agents only
/// accept this form, so it is always used.
fn write_cidr(w: &mut JsonWriter, cidr: Option<&Cidr>) {
    let Some(cidr) = cidr else {
        w.null();
        return;
    };
    let (len, ip) = match cidr.network {
        IpAddr::V4(_) => (4, cidr.network),
        IpAddr::V6(_) => (16, cidr.network),
    };
    let mask: Vec<u8> = (0..len)
        .map(|byte| {
            let ones = u32::from(cidr.bits).saturating_sub(byte * 8).min(8);
            (0xffu16 << (8 - ones)) as u8
        })
        .collect();
    w.begin_object();
    w.field_str("IP", &go_net_ip(ip));
    w.field_str("Mask", &base64(&mask));
    w.end_object();
}

fn write_cidrs(w: &mut JsonWriter, cidrs: Option<&[Cidr]>) {
    match cidrs {
        Some(cidrs) if !cidrs.is_empty() => {
            w.begin_array();
            for cidr in cidrs {
                write_cidr(w, Some(cidr));
            }
            w.end_array();
        }
        _ => w.null(),
    }
}

/// Cilium's `ToV4Addr`: the text form of a plain IPv4 address, `""` for anything else.
fn v4_only(text: Option<&str>) -> String {
    match text.and_then(parse_ip) {
        Some(ip @ IpAddr::V4(_)) => go_net_ip(ip),
        _ => String::new(),
    }
}

/// Cilium's `ToV6Addr`: the text form of a true IPv6 address (not IPv4-mapped), `""` otherwise.
fn v6_only(text: Option<&str>) -> String {
    match text.and_then(parse_ip) {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => go_net_ip(IpAddr::V6(v6)),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::{
        AddressPair, CiliumNodeSpec, EncryptionSpec, IpamPoolAllocation, IpamPools, IpamSpec, NodeAddress,
    };
    use std::collections::BTreeMap;

    fn address(type_: &str, ip: &str) -> NodeAddress {
        NodeAddress { ip: Some(ip.into()), type_: Some(type_.into()) }
    }

    fn map(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn a_dual_stack_node_with_a_secondary_pool_matches_the_reference_vector() {
        let mut node = CiliumNode::new(
            "k8s-node-b7",
            CiliumNodeSpec {
                addresses: Some(vec![
                    address("InternalIP", "172.18.0.7"),
                    address("InternalIP", "fc00:c111::7"),
                    address("CiliumInternalIP", "10.2.3.1"),
                    address("CiliumInternalIP", "fd00:10:2:3:0:0:0:1f0e"),
                ]),
                health: Some(AddressPair { ipv4: Some("10.2.3.77".into()), ipv6: Some("fd00:10:2:3::9a1".into()) }),
                ingress: None,
                encryption: Some(EncryptionSpec { key: Some(3) }),
                ipam: Some(IpamSpec {
                    pod_cidrs: Some(vec!["10.2.3.0/24".into(), "fd00:10:2:3::/64".into()]),
                    pools: Some(IpamPools {
                        allocated: Some(vec![IpamPoolAllocation {
                            pool: Some("extra".into()),
                            cidrs: Some(vec!["10.2.200.0/26".into()]),
                        }]),
                    }),
                }),
                boot_id: Some("b2d9c1e4-7a3f-4f0e-8c5b-91e7d6a2f3c8".into()),
            },
        );
        node.metadata.labels =
            map(&[("kubernetes.io/hostname", "k8s-node-b7"), ("node-role.kubernetes.io/worker", "")]);
        node.metadata.annotations =
            map(&[("network.cilium.io/wg-pub-key", "q0K1xRKbrNnO0wVZ0xk1fV1tA2Tn8yR4y2aC3oD5Ysk=")]);

        let (key, value) = node_entry(&node, &Settings::new("cluster2", 2)).expect("valid node");
        assert_eq!(&*key, "cilium/state/nodes/v1/cluster2/k8s-node-b7");
        assert_eq!(
            value,
            r#"{"Name":"k8s-node-b7","Cluster":"cluster2","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.7"},{"Type":"InternalIP","IP":"fc00:c111::7"},{"Type":"CiliumInternalIP","IP":"10.2.3.1"},{"Type":"CiliumInternalIP","IP":"fd00:10:2:3::1f0e"}],"IPv4AllocCIDR":{"IP":"10.2.3.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":[{"IP":"10.2.200.0","Mask":"////wA=="}],"IPv6AllocCIDR":{"IP":"fd00:10:2:3::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.2.3.77","IPv6HealthIP":"fd00:10:2:3::9a1","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":2,"Source":"custom-resource","EncryptionKey":3,"Labels":{"kubernetes.io/hostname":"k8s-node-b7","node-role.kubernetes.io/worker":""},"Annotations":{"network.cilium.io/wg-pub-key":"q0K1xRKbrNnO0wVZ0xk1fV1tA2Tn8yR4y2aC3oD5Ysk="},"WireguardPubKey":"q0K1xRKbrNnO0wVZ0xk1fV1tA2Tn8yR4y2aC3oD5Ysk=","BootID":"b2d9c1e4-7a3f-4f0e-8c5b-91e7d6a2f3c8"}"#
        );
    }

    #[test]
    fn an_ipv4_only_node_without_metadata_maps_has_null_collections() {
        let node = CiliumNode::new(
            "k8s-node-a1",
            CiliumNodeSpec {
                addresses: Some(vec![address("InternalIP", "192.168.10.11")]),
                ipam: Some(IpamSpec { pod_cidrs: Some(vec!["10.1.0.0/24".into()]), pools: None }),
                ..Default::default()
            },
        );
        let (_, value) = node_entry(&node, &Settings::new("cluster1", 1)).expect("valid node");
        assert_eq!(
            value,
            r#"{"Name":"k8s-node-a1","Cluster":"cluster1","IPAddresses":[{"Type":"InternalIP","IP":"192.168.10.11"}],"IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":null,"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":1,"Source":"custom-resource","EncryptionKey":0,"Labels":null,"Annotations":null,"WireguardPubKey":"","BootID":""}"#
        );
    }

    #[test]
    fn bad_addresses_and_cidrs_are_skipped_and_cidrs_are_masked() {
        let node = CiliumNode::new(
            "n",
            CiliumNodeSpec {
                addresses: Some(vec![
                    address("InternalIP", "not-an-ip"),
                    address("ExternalIP", "::ffff:192.0.2.1"),
                    NodeAddress { ip: None, type_: Some("InternalIP".into()) },
                ]),
                health: Some(AddressPair { ipv4: Some("fd00::1".into()), ipv6: Some("::ffff:10.0.0.1".into()) }),
                ingress: Some(AddressPair { ipv4: Some("10.9.9.9".into()), ipv6: Some("FD00:0:0::0009".into()) }),
                ipam: Some(IpamSpec {
                    pod_cidrs: Some(vec![
                        "10.0.0.77/24".into(),
                        "garbage".into(),
                        "10.1.0.0/33".into(),
                        "fd00::/+64".into(),
                        "fd00:1:2:3:4::1/48".into(),
                        "0.0.0.0/0".into(),
                    ]),
                    pools: None,
                }),
                ..Default::default()
            },
        );
        let (_, value) = node_entry(&node, &Settings::new("c", 1)).expect("valid node");
        let value = std::str::from_utf8(&value).expect("utf-8");
        assert!(value.contains(r#""IPAddresses":[{"Type":"ExternalIP","IP":"192.0.2.1"}]"#), "{value}");
        assert!(value.contains(r#""IPv4AllocCIDR":{"IP":"10.0.0.0","Mask":"////AA=="}"#), "{value}");
        assert!(value.contains(r#""IPv4SecondaryAllocCIDRs":[{"IP":"0.0.0.0","Mask":"AAAAAA=="}]"#), "{value}");
        assert!(value.contains(r#""IPv6AllocCIDR":{"IP":"fd00:1:2::","Mask":"////////AAAAAAAAAAAAAA=="}"#), "{value}");
        assert!(
            value.contains(
                r#""IPv4HealthIP":"","IPv6HealthIP":"","IPv4IngressIP":"10.9.9.9","IPv6IngressIP":"fd00::9""#
            ),
            "{value}"
        );
    }

    #[test]
    fn a_node_without_name_or_with_an_oversized_key_index_is_invalid() {
        let nameless = CiliumNode { metadata: Default::default(), spec: Default::default() };
        assert_eq!(node_entry(&nameless, &Settings::new("c", 1)), Err(Error::MissingField { field: "metadata.name" }));

        let node = CiliumNode::new(
            "n",
            CiliumNodeSpec { encryption: Some(EncryptionSpec { key: Some(256) }), ..Default::default() },
        );
        let err = node_entry(&node, &Settings::new("c", 1)).expect_err("key 256 does not fit a uint8");
        assert!(err.to_string().contains("spec.encryption.key"), "{err}");
    }

    #[test]
    fn the_wireguard_key_falls_back_to_the_legacy_annotation() {
        let mut node = CiliumNode::new("n", CiliumNodeSpec::default());
        node.metadata.annotations = map(&[("io.cilium.network.wg-pub-key", "legacy=")]);
        let (_, value) = node_entry(&node, &Settings::new("c", 1)).expect("valid node");
        assert!(std::str::from_utf8(&value).expect("utf-8").contains(r#""WireguardPubKey":"legacy=""#));
    }
}
