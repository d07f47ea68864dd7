//! Decoding the way Go's `encoding/json` does for the types Cilium uses: `null` leaves a field at
//! its zero value, `net.IP` is text (`""` = no address), `net.IPMask` is standard base64, and a
//! `net.IPNet` is `{"IP": ..., "Mask": ...}`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// `null` (or a missing field) becomes `T::default()`, as Go leaves the zero value in place.
pub(crate) fn null_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Parses an address the way Go prints it back: an IPv4-mapped IPv6 address is IPv4.
pub(crate) fn parse_ip(text: &str) -> Option<IpAddr> {
    IpAddr::from_str(text).ok().map(|ip| ip.to_canonical())
}

/// A Go `net.IP` field: `""` or `null` is no address; anything else must parse.
pub(crate) fn opt_ip<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<IpAddr>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => {
            parse_ip(&text).map(Some).ok_or_else(|| de::Error::custom(format!("invalid IP address {text:?}")))
        }
    }
}

/// Serialises an optional address as Go does: the text form, `""` when absent.
pub(crate) fn ser_opt_ip<S: Serializer>(ip: &Option<IpAddr>, serializer: S) -> Result<S::Ok, S::Error> {
    match ip {
        Some(ip) => serializer.collect_str(ip),
        None => serializer.serialize_str(""),
    }
}

/// Standard base64 with padding (Go's `[]byte` JSON encoding), `None` if malformed.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for (index, chunk) in bytes.chunks(4).enumerate() {
        let last = index == bytes.len() / 4 - 1;
        let padding = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && !last) {
            return None;
        }
        let mut word = 0u32;
        for &c in &chunk[..4 - padding] {
            word = (word << 6) | sextet(c)?;
        }
        word <<= 6 * padding as u32;
        let decoded = [(word >> 16) as u8, (word >> 8) as u8, word as u8];
        out.extend_from_slice(&decoded[..3 - padding]);
    }
    Some(out)
}

/// The prefix length of a canonical netmask (ones then zeros), as Go's `IPMask.Size`; `None`
/// for a non-canonical mask.
pub(crate) fn mask_prefix_len(mask: &[u8]) -> Option<u8> {
    let mut ones = 0u32;
    let mut seen_zero = false;
    for &byte in mask {
        for bit in (0..8).rev() {
            if byte & (1 << bit) != 0 {
                if seen_zero {
                    return None;
                }
                ones += 1;
            } else {
                seen_zero = true;
            }
        }
    }
    u8::try_from(ones).ok()
}

/// An IP network (`10.1.0.0/24`), read from Go's `net.IPNet` object form
/// `{"IP":"10.1.0.0","Mask":"////AA=="}` (what every Cilium version writes) or from the plain
/// CIDR string newer readers also accept. Serialises as the CIDR string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl IpNet {
    fn from_object(ip: &str, mask: &str) -> Result<Self, String> {
        let addr = parse_ip(ip).ok_or_else(|| format!("invalid CIDR address {ip:?}"))?;
        let mask = base64_decode(mask).ok_or_else(|| format!("invalid CIDR mask {mask:?}"))?;
        let prefix_len = mask_prefix_len(&mask).ok_or_else(|| "CIDR mask is not a canonical prefix".to_string())?;
        // A 16-byte mask on an IPv4 address is the IPv4-mapped form: 96 leading ones.
        let prefix_len = match (addr, mask.len()) {
            (IpAddr::V4(_), 4) | (IpAddr::V6(_), 16) => prefix_len,
            (IpAddr::V4(_), 16) if prefix_len >= 96 => prefix_len - 96,
            _ => return Err(format!("CIDR mask of {} bytes does not fit {addr}", mask.len())),
        };
        Ok(Self { addr, prefix_len })
    }

    fn from_text(text: &str) -> Result<Self, String> {
        let (ip, len) = text.split_once('/').ok_or_else(|| format!("invalid CIDR {text:?}"))?;
        let addr = parse_ip(ip).ok_or_else(|| format!("invalid CIDR {text:?}"))?;
        let prefix_len: u8 = len.parse().map_err(|_| format!("invalid CIDR {text:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(format!("invalid CIDR {text:?}"));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Object {
                #[serde(rename = "IP")]
                ip: String,
                #[serde(rename = "Mask")]
                mask: String,
            },
            Text(String),
        }
        match Repr::deserialize(deserializer)? {
            Repr::Object { ip, mask } => IpNet::from_object(&ip, &mask),
            Repr::Text(text) => IpNet::from_text(&text),
        }
        .map_err(de::Error::custom)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_like_go() {
        assert_eq!(base64_decode("////AA==").unwrap(), vec![255, 255, 255, 0]);
        assert_eq!(base64_decode("//////////8AAAAAAAAAAA==").unwrap(), [[255u8; 8], [0u8; 8]].concat());
        assert_eq!(base64_decode("////wA==").unwrap(), vec![255, 255, 255, 192]);
        assert_eq!(base64_decode("").unwrap(), Vec::<u8>::new());
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert!(base64_decode("////AA=").is_none());
        assert!(base64_decode("//=/AA==").is_none());
        assert!(base64_decode("**//AA==").is_none());
    }

    #[test]
    fn masks_must_be_canonical_prefixes() {
        assert_eq!(mask_prefix_len(&[255, 255, 255, 0]), Some(24));
        assert_eq!(mask_prefix_len(&[255, 255, 255, 192]), Some(26));
        assert_eq!(mask_prefix_len(&[0, 0, 0, 0]), Some(0));
        assert_eq!(mask_prefix_len(&[255, 0, 255, 0]), None);
    }

    #[test]
    fn cidrs_decode_from_the_object_and_the_text_form() {
        let object: IpNet = serde_json::from_str(r#"{"IP":"10.2.3.0","Mask":"////AA=="}"#).unwrap();
        assert_eq!(object.to_string(), "10.2.3.0/24");
        let v6: IpNet = serde_json::from_str(r#"{"IP":"fd00:10:2:3::","Mask":"//////////8AAAAAAAAAAA=="}"#).unwrap();
        assert_eq!(v6.to_string(), "fd00:10:2:3::/64");
        let text: IpNet = serde_json::from_str(r#""10.0.0.0/8""#).unwrap();
        assert_eq!(text.to_string(), "10.0.0.0/8");
        assert!(serde_json::from_str::<IpNet>(r#"{"IP":"10.2.3.0","Mask":"/wD/AA=="}"#).is_err());
        assert!(serde_json::from_str::<IpNet>(r#"{"IP":"fd00::","Mask":"////AA=="}"#).is_err());
        assert!(serde_json::from_str::<IpNet>(r#""10.0.0.0/33""#).is_err());
    }

    #[test]
    fn ipv4_mapped_addresses_read_as_ipv4_like_go_prints_them() {
        assert_eq!(parse_ip("::ffff:10.0.0.1").unwrap().to_string(), "10.0.0.1");
        assert_eq!(parse_ip("FD00::1").unwrap().to_string(), "fd00::1");
        assert!(parse_ip("10.0.0.256").is_none());
    }
}
