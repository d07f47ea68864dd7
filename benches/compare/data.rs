//! Cilium-shaped keys and values: what a clustermesh-apiserver of a big mesh holds. Value
//! shapes come from `tests/fixtures/cilium-test-vectors.json` (the `node`, `identity` and
//! `ipcache` entries), with the identifying parts (name, IP, ID) replaced per key.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub const NODES_PREFIX: &str = "cilium/state/nodes/v1/";
pub const IDENTITIES_PREFIX: &str = "cilium/state/identities/v1/";
pub const IPCACHE_PREFIX: &str = "cilium/state/ip/v1/";

/// The prefixes an agent lists and watches, in the order it lists them.
pub const PREFIXES: [&str; 3] = [NODES_PREFIX, IDENTITIES_PREFIX, IPCACHE_PREFIX];

/// How much of each kind to make.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Sizes {
    pub ipcache: usize,
    pub nodes: usize,
    pub identities: usize,
}

impl Sizes {
    pub fn total(&self) -> usize {
        self.ipcache + self.nodes + self.identities
    }

    pub fn of_prefix(&self, prefix: &str) -> usize {
        match prefix {
            NODES_PREFIX => self.nodes,
            IDENTITIES_PREFIX => self.identities,
            IPCACHE_PREFIX => self.ipcache,
            _ => 0,
        }
    }
}

/// One template: a value and the token in it (and in its key) that varies per key.
struct Template {
    value: String,
    token: String,
}

pub struct Shapes {
    nodes: Vec<Template>,
    identities: Vec<Template>,
    ipcache: Vec<Template>,
}

/// `tests/fixtures/cilium-test-vectors.json` of the repository,
/// or `$CILIUM_TEST_VECTORS`.
pub fn default_vectors_path() -> PathBuf {
    if let Some(path) = std::env::var_os("CILIUM_TEST_VECTORS").filter(|v| !v.is_empty()) {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cilium-test-vectors.json")
}

impl Shapes {
    pub fn load(path: &Path) -> anyhow::Result<Shapes> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!("read the value shapes from {} (set --vectors or $CILIUM_TEST_VECTORS)", path.display())
        })?;
        let entries: Vec<Value> = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let mut shapes = Shapes { nodes: Vec::new(), identities: Vec::new(), ipcache: Vec::new() };
        for entry in &entries {
            let (Some(kind), Some(key), Some(value)) =
                (entry["kind"].as_str(), entry["key"].as_str(), entry["value"].as_str())
            else {
                continue;
            };
            // The last path segment of the key is the node name, identity ID or IP.
            let token = key.rsplit('/').next().unwrap_or_default().to_owned();
            let template = Template { value: value.to_owned(), token };
            match kind {
                "node" => shapes.nodes.push(template),
                "identity" => shapes.identities.push(template),
                "ipcache" => shapes.ipcache.push(template),
                _ => {}
            }
        }
        if shapes.nodes.is_empty() || shapes.identities.is_empty() || shapes.ipcache.is_empty() {
            bail!("{}: expected node, identity and ipcache entries", path.display());
        }
        Ok(shapes)
    }

    /// The `i`th key-value of the data set of `sizes`: nodes first, then identities, then
    /// ipcache entries.
    pub fn item(&self, sizes: &Sizes, i: usize) -> (String, Vec<u8>) {
        if i < sizes.nodes {
            let t = &self.nodes[i % self.nodes.len()];
            let cluster = i / 100 + 1;
            let name = format!("node-{i:06}");
            let value = t.value.replace(&t.token, &name).replace("cluster1", &format!("cluster{cluster}"));
            (format!("{NODES_PREFIX}cluster{cluster}/{name}"), value.into_bytes())
        } else if i < sizes.nodes + sizes.identities {
            let j = i - sizes.nodes;
            let t = &self.identities[j % self.identities.len()];
            let id = 65536 + j;
            let value = format!("{}k8s:bench-id={j};", t.value);
            (format!("{IDENTITIES_PREFIX}id/{id}"), value.into_bytes())
        } else {
            let j = i - sizes.nodes - sizes.identities;
            let t = &self.ipcache[j % self.ipcache.len()];
            let ip = if t.token.contains(':') {
                format!("fd00:10:{:x}:{:x}::{:x}", j >> 24, (j >> 12) & 0xfff, j & 0xfff)
            } else {
                format!("10.{}.{}.{}", (j >> 16) & 0xff, (j >> 8) & 0xff, j & 0xff)
            };
            let value = t.value.replace(&t.token, &ip);
            (format!("{IPCACHE_PREFIX}default/{ip}"), value.into_bytes())
        }
    }
}

/// The end of the range of keys with `prefix` (etcd's prefix encoding).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
