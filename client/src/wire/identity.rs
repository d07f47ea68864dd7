//! `cilium/state/identities/v1/id/<ID>`: a security identity and its labels. The value is not
//! JSON but Cilium's kvstore label format, `source:key=value;` per label
//! (`pkg/labels/labels.go`, `FormatForKVStore`).

use std::fmt;

use serde::{Serialize, Serializer};

use super::{Entry, Kind, NumericIdentity, Rejected, Validation, ensure};

/// The label every identity carries with its cluster's name.
pub const POLICY_CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// A remote identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub id: NumericIdentity,
    pub labels: Labels,
}

/// One label: `source:key=value`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    /// Splits `source:key=value` the way `labels.ParseLabel` does: the value follows the first
    /// `=`; a `:` before that separates the source (none: source `unspec`).
    pub fn parse(text: &str) -> Self {
        let (head, value) = text.split_once('=').unwrap_or((text, ""));
        let (source, key) = match head.split_once(':') {
            Some((source, key)) if !source.is_empty() => (source, key),
            Some((_, key)) => ("unspec", key),
            None => ("unspec", head),
        };
        Self { source: source.into(), key: key.into(), value: value.into() }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

impl Serialize for Label {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A label set, in the order it was stored (sorted by the writer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Labels(pub Vec<Label>);

impl Labels {
    /// Parses the kvstore form: labels separated (and terminated) by `;`.
    pub fn parse(text: &str) -> Self {
        Self(text.split(';').filter(|item| !item.is_empty()).map(Label::parse).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// The value of `source:key`, if present.
    pub fn get(&self, source: &str, key: &str) -> Option<&str> {
        self.0.iter().find(|l| l.source == source && l.key == key).map(|l| l.value.as_str())
    }
}

impl Entry for Identity {
    const KIND: Kind = Kind::Identities;

    /// Cilium's identity rules (`pkg/identity/cache/allocator.go`, `WatchRemoteIdentities`): the
    /// key is a decimal ID (`keyToID`), inside the remote cluster's allocation range
    /// (`clusterIDValidator`), and the labels name the remote cluster (`clusterNameValidator`).
    fn decode(key: &str, value: &[u8], validation: &Validation) -> Result<Self, Rejected> {
        ensure(!key.is_empty() && key.bytes().all(|b| b.is_ascii_digit()), || Rejected::IdentityKey(key.into()))?;
        let id: u64 = key.parse().map_err(|_| Rejected::IdentityKey(key.into()))?;
        let range = validation.identity_range();
        ensure(id >= u64::from(*range.start()) && id <= u64::from(*range.end()), || Rejected::IdentityOutOfRange {
            id,
            cluster_id: validation.cluster_id.0,
        })?;
        let text = std::str::from_utf8(value).map_err(|_| Rejected::NotUtf8)?;
        let labels = Labels::parse(text);
        ensure(labels.get("k8s", POLICY_CLUSTER_LABEL) == Some(validation.cluster.as_str()), || {
            Rejected::ClusterLabel { expected: validation.cluster.to_string() }
        })?;
        // In range, hence below 2^24.
        Ok(Identity { id: NumericIdentity(id as u32), labels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tests::validation;

    const LABELS: &str = "k8s:app=frontend;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:io.kubernetes.pod.namespace=shop;";

    #[test]
    fn labels_parse_from_the_kvstore_form() {
        let labels = Labels::parse(LABELS);
        assert_eq!(labels.0.len(), 4);
        assert_eq!(labels.get("k8s", "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"), Some("shop"));
        assert_eq!(Label::parse("reserved:host").to_string(), "reserved:host=");
        assert_eq!(Label::parse("k8s:a=b:c=d").value, "b:c=d");
        assert_eq!(Label::parse("plain=1").source, "unspec");
    }

    #[test]
    fn an_identity_in_range_with_the_cluster_label_is_accepted() {
        let identity = Identity::decode("65792", LABELS.as_bytes(), &validation("cluster1", 1)).unwrap();
        assert_eq!(identity.id, NumericIdentity(65792));
        assert_eq!(identity.labels.get("k8s", "app"), Some("frontend"));
    }

    #[test]
    fn identities_outside_the_range_or_without_the_label_are_rejected() {
        let v = validation("cluster1", 1);
        assert!(matches!(Identity::decode("65535", LABELS.as_bytes(), &v), Err(Rejected::IdentityOutOfRange { .. })));
        assert!(matches!(Identity::decode("131072", LABELS.as_bytes(), &v), Err(Rejected::IdentityOutOfRange { .. })));
        assert!(matches!(Identity::decode("+65792", LABELS.as_bytes(), &v), Err(Rejected::IdentityKey(_))));
        assert!(matches!(Identity::decode("abc", LABELS.as_bytes(), &v), Err(Rejected::IdentityKey(_))));
        let other = LABELS.replace("cluster=cluster1", "cluster=cluster2");
        assert!(matches!(Identity::decode("65792", other.as_bytes(), &v), Err(Rejected::ClusterLabel { .. })));
        assert!(matches!(Identity::decode("65792", b"", &v), Err(Rejected::ClusterLabel { .. })));
    }
}
