//! Global namespaces: which namespaces' identities, endpoints, services and exports leave the cluster.
//!
//! A namespace annotated `clustermesh.cilium.io/global` follows the annotation; otherwise it
//! follows `--clustermesh-default-global-namespace`. A namespace the model has not seen (or that
//! is invalid) is not global, as in Cilium, whose lookup fails for unknown namespaces.

use super::{Error, Result};
use crate::k8s::Namespace;

pub(crate) const GLOBAL_NAMESPACE_ANNOTATION: &str = "clustermesh.cilium.io/global";

/// Cilium's boolean annotations compare the lower-cased value with `"true"`. Any other value
/// means false in Cilium; here only `"false"` and `""` do, and anything else is reported, so a
/// typo such as `"yes"` is visible instead of silently meaning false.
pub(crate) fn bool_annotation(annotation: &'static str, value: &str) -> Result<bool> {
    if value.eq_ignore_ascii_case("true") {
        Ok(true)
    } else if value.is_empty() || value.eq_ignore_ascii_case("false") {
        Ok(false)
    } else {
        Err(Error::MalformedAnnotation { annotation, value: value.into() })
    }
}

/// The namespace's annotation, if any: `Ok(None)` means "use the default".
pub(crate) fn global_annotation(namespace: &Namespace) -> Result<Option<bool>> {
    namespace
        .metadata
        .name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(Error::MissingField { field: "metadata.name" })?;
    namespace
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GLOBAL_NAMESPACE_ANNOTATION))
        .map(|value| bool_annotation(GLOBAL_NAMESPACE_ANNOTATION, value))
        .transpose()
}

/// Whether a namespace is global given the default of `--clustermesh-default-global-namespace`.
pub fn is_global_namespace(namespace: &Namespace, default_global: bool) -> Result<bool> {
    Ok(global_annotation(namespace)?.unwrap_or(default_global))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn namespace(annotation: Option<&str>) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some("ns".into());
        ns.metadata.annotations =
            annotation.map(|v| BTreeMap::from([(GLOBAL_NAMESPACE_ANNOTATION.to_string(), v.to_string())]));
        ns
    }

    #[test]
    fn the_annotation_overrides_the_default_in_both_directions() {
        assert_eq!(is_global_namespace(&namespace(None), true), Ok(true));
        assert_eq!(is_global_namespace(&namespace(None), false), Ok(false));
        assert_eq!(is_global_namespace(&namespace(Some("TRUE")), false), Ok(true));
        assert_eq!(is_global_namespace(&namespace(Some("false")), true), Ok(false));
        assert_eq!(is_global_namespace(&namespace(Some("")), true), Ok(false));
    }

    #[test]
    fn a_malformed_annotation_is_an_error_naming_it() {
        let err = is_global_namespace(&namespace(Some("yes")), true).expect_err("malformed");
        assert_eq!(err.to_string(), r#"annotation clustermesh.cilium.io/global: "yes" is neither "true" nor "false""#);
    }
}
