//! What a store under `cilium/state/` must hold, and how what it holds differs from that: the
//! convergence tests' oracle (chaos, containers).

use std::collections::BTreeMap;

use clustermesh_apiserver::translate::Settings;
use clustermesh_apiserver::translate::model::{Model, Object};
use etcd_client::GetOptions;
use serde_json::Value;

pub const STATE: &str = "cilium/state/";

/// Keys and the bytes under them.
pub type Keys = BTreeMap<String, Vec<u8>>;

/// The keys and bytes cluster1's store must hold under `cilium/state/` for `objects`, per the
/// pure translation model (never the server's writer). An undecodable object contributes
/// nothing, exactly like a deleted one.
pub fn expected(objects: impl IntoIterator<Item = Value>) -> Keys {
    let mut model = Model::new(Settings::new("cluster1", 1));
    for object in objects {
        if let Ok(Some(object)) = Object::decode(object) {
            let _changes = model.apply(object);
        }
    }
    model.desired().into_iter().filter(|(k, _)| k.starts_with(STATE)).map(|(k, v)| (k, v.to_vec())).collect()
}

/// Every key under `prefix`, read through `client`.
pub async fn dump(client: &mut etcd_client::Client, prefix: &str) -> anyhow::Result<Keys> {
    let response = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    Ok(response.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())).collect())
}

/// Stale (present but not expected), missing, and wrong-valued keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Difference {
    pub stale: Vec<String>,
    pub missing: Vec<String>,
    pub wrong: Vec<String>,
}

impl Difference {
    pub fn between(found: &Keys, expected: &Keys) -> Difference {
        let mut diff = Difference::default();
        for (key, value) in found {
            match expected.get(key) {
                None => diff.stale.push(key.clone()),
                Some(want) if want != value => diff.wrong.push(key.clone()),
                Some(_) => {}
            }
        }
        diff.missing = expected.keys().filter(|k| !found.contains_key(*k)).cloned().collect();
        diff
    }

    /// `Ok` when `found` is exactly `expected`; else the difference, for a polling message.
    pub fn none(found: &Keys, expected: &Keys) -> Result<(), String> {
        let diff = Difference::between(found, expected);
        if diff == Difference::default() { Ok(()) } else { Err(format!("{diff:?}")) }
    }
}
