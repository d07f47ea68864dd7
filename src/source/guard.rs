//! A `DeserializeGuard` that decodes each object once.
//!
//! kube's `DeserializeGuard` buffers every object as a `serde_value::Value`, clones that whole
//! tree, and decodes the clone (its own FIXME), so that the buffer is left to read the
//! metadata from when decoding fails. Decoding from a borrowed `serde_json::Value` instead
//! needs no clone: the tree is built once and read once, or twice for the rare invalid
//! object. The bootstrap profile (benchmark scenario 7) spent about 10% of its time in that
//! double decoding. Same contract as kube's: a valid object, or its metadata and the error.

use std::borrow::Cow;

use kube::Resource;
use kube::api::{ObjectMeta, PartialObjectMeta};
use kube::core::error_boundary::InvalidObject;
use serde::{Deserialize, Deserializer, de::Error as _};

#[derive(Debug, Clone)]
pub struct Guarded<K>(pub Result<K, InvalidObject>);

impl<'de, K> Deserialize<'de> for Guarded<K>
where
    K: for<'a> Deserialize<'a> + Resource,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let tree = serde_json::Value::deserialize(deserializer)?;
        match K::deserialize(&tree) {
            Ok(object) => Ok(Guarded(Ok(object))),
            Err(error) => {
                let PartialObjectMeta { metadata, .. } =
                    PartialObjectMeta::<K>::deserialize(&tree).map_err(D::Error::custom)?;
                Ok(Guarded(Err(InvalidObject { error: error.to_string(), metadata })))
            }
        }
    }
}

impl<K: Resource> Resource for Guarded<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.as_ref().map_or_else(|invalid| &invalid.metadata, K::meta)
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.as_mut().map_or_else(|invalid| &mut invalid.metadata, K::meta_mut)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use serde_json::json;

    use super::*;

    #[test]
    fn a_valid_object_decodes() {
        let guarded: Guarded<Namespace> =
            serde_json::from_value(json!({"metadata": {"name": "ns", "labels": {"a": "b"}}})).expect("decodes");
        let namespace = guarded.0.expect("valid");
        assert_eq!(namespace.metadata.name.as_deref(), Some("ns"));
        assert_eq!(namespace.metadata.labels.expect("labels")["a"], "b");
    }

    #[test]
    fn an_invalid_object_keeps_its_metadata_and_the_error() {
        let text = r#"{"metadata": {"name": "svc", "namespace": "ns"}, "spec": {"ports": "not-a-list"}}"#;
        let guarded: Guarded<Service> = serde_json::from_str(text).expect("the guard itself decodes");
        assert_eq!(guarded.meta().name.as_deref(), Some("svc"));
        assert_eq!(guarded.meta().namespace.as_deref(), Some("ns"));
        let invalid = guarded.0.expect_err("invalid");
        assert!(invalid.error.contains("invalid type"), "{}", invalid.error);
    }

    #[test]
    fn without_metadata_it_is_an_error_of_the_enclosing_list() {
        assert!(serde_json::from_str::<Guarded<Service>>(r#"{"metadata": 3}"#).is_err());
    }
}
