//! CiliumIdentity → `cilium/state/identities/v1/id/<id>` whose value is the label string.
//!
//! The value is not JSON: it is Cilium's kvstore label format, `source:key=value;` per label,
//! sorted by label key, every item (the last one too) terminated by `;`. Agents parse it back
//! into a label set and require `k8s:io.cilium.k8s.policy.cluster=<cluster>` in it.

use crate::blob::Blob;

use super::{Entry, Error, IDENTITIES_PREFIX, Result};
use crate::k8s::CiliumIdentity;

/// The security label holding the pod namespace; it decides namespace filtering of identities.
pub(crate) const NAMESPACE_LABEL: &str = "k8s:io.kubernetes.pod.namespace";

/// An identity ready for export, with the namespace the global-namespace filter looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IdentityEntry {
    pub(crate) namespace: String,
    pub(crate) entry: Entry,
}

pub(crate) fn identity_key(name: &str) -> String {
    format!("{IDENTITIES_PREFIX}/{name}")
}

/// Translates a CiliumIdentity. Returns the namespace (from the
/// `k8s:io.kubernetes.pod.namespace` security label) and the entry.
///
/// Cilium skips identities without security labels or without that namespace label; both are
/// reported as errors here.
pub fn identity_entry(identity: &CiliumIdentity) -> Result<(String, Entry)> {
    let parsed = parse(identity)?;
    Ok((parsed.namespace, parsed.entry))
}

pub(crate) fn parse(identity: &CiliumIdentity) -> Result<IdentityEntry> {
    let name = identity
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.name" })?;
    // Agents parse the key suffix as an unsigned decimal number.
    if !name.bytes().all(|b| b.is_ascii_digit()) || name.parse::<u32>().is_err() {
        return Err(Error::InvalidValue {
            field: "metadata.name".into(),
            value: name.into(),
            expected: "a numeric security identity",
        });
    }
    let labels = identity
        .spec
        .security_labels
        .as_ref()
        .filter(|l| !l.is_empty())
        .ok_or(Error::MissingField { field: "security-labels" })?;
    let namespace = labels
        .get(NAMESPACE_LABEL)
        .filter(|ns| !ns.is_empty())
        .ok_or(Error::MissingField { field: "security-labels[k8s:io.kubernetes.pod.namespace]" })?;

    Ok(IdentityEntry {
        namespace: namespace.clone(),
        entry: (identity_key(name).into(), Blob::from(format_labels(labels.iter()))),
    })
}

/// Cilium's `labels.Map2Labels(m, "").SortedList()`: the source is what precedes the first `:`
/// of the map key (`unspec` when there is none, `reserved` for a leading `$`), and the list is
/// sorted by the key without its source. Ties (same key, different sources) are broken by source
/// so the output is deterministic.
pub(crate) fn format_labels<'a>(labels: impl Iterator<Item = (&'a String, &'a String)>) -> String {
    let mut parsed: Vec<(&str, &str, &str)> = labels
        .map(|(full_key, value)| {
            let (source, key) = split_source(full_key);
            (key, source, value.as_str())
        })
        .collect();
    parsed.sort_unstable();
    let mut out = String::new();
    for (key, source, value) in parsed {
        out.push_str(source);
        out.push(':');
        out.push_str(key);
        out.push('=');
        out.push_str(value);
        out.push(';');
    }
    out
}

fn split_source(full_key: &str) -> (&str, &str) {
    if let Some(rest) = full_key.strip_prefix('$') {
        return ("reserved", rest);
    }
    match full_key.split_once(':') {
        Some((source, key)) => (if source.is_empty() { "unspec" } else { source }, key),
        None => ("unspec", full_key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::CiliumIdentityFields;
    use std::collections::BTreeMap;

    fn identity(name: &str, labels: &[(&str, &str)]) -> CiliumIdentity {
        CiliumIdentity::new(
            name,
            CiliumIdentityFields {
                security_labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            },
        )
    }

    #[test]
    fn labels_are_sorted_by_key_and_every_item_ends_with_a_semicolon() {
        let (namespace, (key, value)) = identity_entry(&identity(
            "65792",
            &[
                ("k8s:io.kubernetes.pod.namespace", "shop"),
                ("k8s:app", "frontend"),
                ("k8s:io.cilium.k8s.policy.serviceaccount", "frontend"),
                ("k8s:io.cilium.k8s.policy.cluster", "cluster1"),
                ("k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name", "shop"),
            ],
        ))
        .expect("valid identity");
        assert_eq!(namespace, "shop");
        assert_eq!(&*key, "cilium/state/identities/v1/id/65792");
        assert_eq!(
            value,
            "k8s:app=frontend;k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=shop;k8s:io.cilium.k8s.policy.cluster=cluster1;k8s:io.cilium.k8s.policy.serviceaccount=frontend;k8s:io.kubernetes.pod.namespace=shop;"
        );
    }

    #[test]
    fn sorting_ignores_the_source_prefix() {
        let labels: BTreeMap<String, String> = [("k8s:b", "1"), ("container:a", "2"), ("c", "3"), ("$host", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(format_labels(labels.iter()), "container:a=2;k8s:b=1;unspec:c=3;reserved:host=;");
    }

    #[test]
    fn identities_without_labels_namespace_or_numeric_name_are_invalid() {
        assert_eq!(identity_entry(&identity("5", &[])), Err(Error::MissingField { field: "security-labels" }));
        assert!(matches!(
            identity_entry(&identity("5", &[("k8s:app", "x")])),
            Err(Error::MissingField { field: "security-labels[k8s:io.kubernetes.pod.namespace]" })
        ));
        assert!(matches!(
            identity_entry(&identity("abc", &[("k8s:io.kubernetes.pod.namespace", "x")])),
            Err(Error::InvalidValue { .. })
        ));
        assert!(matches!(
            identity_entry(&identity("99999999999", &[("k8s:io.kubernetes.pod.namespace", "x")])),
            Err(Error::InvalidValue { .. })
        ));
    }
}
