//! Byte-exact renderings of Go's `encoding/json`, `net.IP`/`netip.Addr` text and base64.
//!
//! Remote agents compare keys with the IPs inside values and Cilium's golden files compare bytes,
//! so these follow Go's output exactly rather than any Rust crate's idea of JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

/// A streaming JSON writer that emits what Go's `json.Marshal` emits for the same data: compact,
/// fields in the order they are written (Go: struct declaration order), HTML-safe escaping.
///
/// Maps must be written in byte order of their keys (Go sorts them); the `BTreeMap` helpers do.
#[derive(Default)]
pub(crate) struct JsonWriter {
    out: String,
    /// A value or key was just completed at this nesting level, so the next one needs a comma.
    comma: bool,
}

impl JsonWriter {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn finish(self) -> String {
        self.out
    }

    fn before_value(&mut self) {
        if self.comma {
            self.out.push(',');
        }
        self.comma = true;
    }

    pub(crate) fn begin_object(&mut self) {
        self.before_value();
        self.out.push('{');
        self.comma = false;
    }

    pub(crate) fn end_object(&mut self) {
        self.out.push('}');
        self.comma = true;
    }

    pub(crate) fn begin_array(&mut self) {
        self.before_value();
        self.out.push('[');
        self.comma = false;
    }

    pub(crate) fn end_array(&mut self) {
        self.out.push(']');
        self.comma = true;
    }

    /// Writes an object key; the next call writes its value.
    pub(crate) fn key(&mut self, key: &str) {
        self.before_value();
        write_go_string(&mut self.out, key);
        self.out.push(':');
        self.comma = false;
    }

    pub(crate) fn string(&mut self, value: &str) {
        self.before_value();
        write_go_string(&mut self.out, value);
    }

    pub(crate) fn uint(&mut self, value: u64) {
        self.before_value();
        self.out.push_str(&value.to_string());
    }

    pub(crate) fn int(&mut self, value: i64) {
        self.before_value();
        self.out.push_str(&value.to_string());
    }

    pub(crate) fn bool(&mut self, value: bool) {
        self.before_value();
        self.out.push_str(if value { "true" } else { "false" });
    }

    pub(crate) fn null(&mut self) {
        self.before_value();
        self.out.push_str("null");
    }

    pub(crate) fn field_str(&mut self, key: &str, value: &str) {
        self.key(key);
        self.string(value);
    }

    pub(crate) fn field_uint(&mut self, key: &str, value: u64) {
        self.key(key);
        self.uint(value);
    }

    pub(crate) fn field_bool(&mut self, key: &str, value: bool) {
        self.key(key);
        self.bool(value);
    }

    /// A `map[string]string`: `null` when nil (`None`), `{}` when empty.
    pub(crate) fn string_map(&mut self, map: Option<&BTreeMap<String, String>>) {
        match map {
            None => self.null(),
            Some(map) => {
                self.begin_object();
                for (key, value) in map {
                    self.field_str(key, value);
                }
                self.end_object();
            }
        }
    }
}

/// Go's `encoding/json` string encoding (Go ≥ 1.22): `<`, `>`, `&`, U+2028 and U+2029 as `\u`
/// escapes, `\b \f \n \r \t` short escapes, other control characters as lowercase `\u00xx`.
pub(crate) fn write_go_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses an IP address the way Go's `net.ParseIP`/`netip.ParseAddr` accept it for our inputs:
/// dotted quads without leading zeros, RFC 4291 IPv6 text, no zones.
pub(crate) fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse().ok()
}

/// Go's `net.IP.String()`: IPv4-mapped IPv6 addresses print as plain IPv4, everything else as
/// RFC 5952 text (lowercase, longest run of two or more zero groups compressed, first on ties).
pub(crate) fn go_net_ip(addr: IpAddr) -> String {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Go's `netip.Addr.String()`: like `net.IP` but IPv4-mapped addresses keep their `::ffff:`
/// form. Rust's `Display` follows exactly these rules.
pub(crate) fn go_netip(addr: IpAddr) -> String {
    addr.to_string()
}

/// Removes the IPv4-mapped wrapper, as Go's `netip.Addr.Unmap` does.
pub(crate) fn unmap(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

const BASE64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding: how Go's `encoding/json` renders a `[]byte` (e.g. `net.IPMask`).
pub(crate) fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(BASE64_ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        parse_ip(text).expect("valid test IP")
    }

    #[test]
    fn strings_are_escaped_like_go_encoding_json() {
        let mut out = String::new();
        write_go_string(&mut out, "a<b>&\"\\\n\u{1}\u{8}\u{c}\u{2028}é");
        assert_eq!(out, r#""a\u003cb\u003e\u0026\"\\\n\u0001\b\f\u2028é""#);
    }

    #[test]
    fn writer_places_commas_between_fields_and_elements_only() {
        let mut w = JsonWriter::new();
        w.begin_object();
        w.field_str("a", "x");
        w.key("b");
        w.begin_array();
        w.uint(1);
        w.begin_object();
        w.end_object();
        w.null();
        w.end_array();
        w.key("c");
        w.string_map(Some(&BTreeMap::new()));
        w.key("d");
        w.string_map(None);
        w.end_object();
        assert_eq!(w.finish(), r#"{"a":"x","b":[1,{},null],"c":{},"d":null}"#);
    }

    #[test]
    fn ipv6_text_is_compressed_like_go() {
        assert_eq!(go_net_ip(ip("fd00:10:244:1:0:0:0:d643")), "fd00:10:244:1::d643");
        assert_eq!(go_net_ip(ip("1:0:0:1:0:0:1:1")), "1::1:0:0:1:1");
        assert_eq!(go_net_ip(ip("1:0:0:1:0:0:0:1")), "1:0:0:1::1");
        assert_eq!(go_net_ip(ip("1:2:3:4:5:6:7:0")), "1:2:3:4:5:6:7:0");
        assert_eq!(go_net_ip(ip("FD00::0001")), "fd00::1");
        assert_eq!(go_net_ip(ip("::")), "::");
    }

    #[test]
    fn ipv4_mapped_addresses_unmap_for_net_ip_but_not_for_netip() {
        assert_eq!(go_net_ip(ip("::ffff:10.0.0.1")), "10.0.0.1");
        assert_eq!(go_netip(ip("::ffff:10.0.0.1")), "::ffff:10.0.0.1");
        // IPv4-compatible (deprecated) addresses are plain IPv6 for Go.
        assert_eq!(go_net_ip(ip("::1.2.3.4")), "::102:304");
    }

    #[test]
    fn go_rejects_what_we_reject() {
        for bad in ["010.0.0.1", "10.0.0", "fe80::1%eth0", "", " 10.0.0.1", "10.0.0.1/24"] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn masks_encode_as_padded_standard_base64() {
        assert_eq!(base64(&[0xff, 0xff, 0xff, 0]), "////AA==");
        assert_eq!(base64(&[0xff, 0xff, 0xff, 0xc0]), "////wA==");
        assert_eq!(
            base64(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]),
            "//////////8AAAAAAAAAAA=="
        );
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"fooba"), "Zm9vYmE=");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
