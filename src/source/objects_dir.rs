//! Objects from a directory of YAML or JSON manifests (`--k8s-objects-dir`): a file added,
//! changed or removed is an add, update or delete. Serves the demo, offline use and tests;
//! the Kubernetes API remains the production source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::SourceEvent;
use super::filter::ListFilter;
use crate::translate::model::{Kind, Object, ObjectKey};

/// One manifest document, as decoded.
#[derive(Debug)]
enum Document {
    Valid(Box<Object>),
    Invalid { key: ObjectKey, reason: String },
}

/// Watches `dir` (recursively) until `shutdown`, polling every `interval`. Polling compares
/// contents, so it sees edits that change-notification APIs miss (editors that replace
/// files, Kubernetes ConfigMap mounts that swap symlinks).
pub async fn run(
    dir: PathBuf,
    kinds: Vec<Kind>,
    filter: ListFilter,
    interval: Duration,
    events: mpsc::Sender<SourceEvent>,
    shutdown: CancellationToken,
) {
    let mut known: BTreeMap<ObjectKey, String> = BTreeMap::new();
    let mut first = true;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let scanned = match scan(&dir) {
            Ok(scanned) => scanned,
            Err(error) => {
                tracing::warn!(dir = %dir.display(), %error, "reading the objects directory failed");
                continue;
            }
        };
        let mut out = Vec::new();
        if first {
            out.extend(kinds.iter().map(|&k| SourceEvent::Init(k)));
        }
        let mut now: BTreeMap<ObjectKey, String> = BTreeMap::new();
        for (fingerprint, document) in scanned {
            let key = match &document {
                // What the API server would not list is not there: a label change that
                // takes an object out of the selection is its delete.
                Document::Valid(object) if !filter.admits(object) => continue,
                Document::Valid(object) => object.key(),
                Document::Invalid { key, .. } => key.clone(),
            };
            if !kinds.contains(&key.kind) {
                continue;
            }
            let changed = known.get(&key) != Some(&fingerprint);
            now.insert(key, fingerprint);
            if !(first || changed) {
                continue;
            }
            out.push(match document {
                Document::Valid(object) if first => SourceEvent::InitApply(*object),
                Document::Valid(object) => SourceEvent::Apply(*object),
                Document::Invalid { key, reason } => SourceEvent::Invalid { key, reason },
            });
        }
        for gone in known.keys().filter(|k| !now.contains_key(*k)) {
            out.push(SourceEvent::Delete(gone.clone()));
        }
        if first {
            out.extend(kinds.iter().map(|&k| SourceEvent::InitDone(k)));
            first = false;
        }
        known = now;
        for event in out {
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// Every document of every manifest under `dir`, with a fingerprint of its content.
fn scan(dir: &Path) -> std::io::Result<Vec<(String, Document)>> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    files.sort();
    let mut documents = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            // Removed between listing and reading: the next scan sees it gone.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for value in parse_documents(&file, &text) {
            let fingerprint = value.to_string();
            match decode(value) {
                Ok(document) => documents.push((fingerprint, document)),
                Err(reason) => tracing::warn!(file = %file.display(), %reason, "skipping a manifest document"),
            }
        }
    }
    Ok(documents)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
}

fn parse_documents(file: &Path, text: &str) -> Vec<serde_json::Value> {
    if file.extension().is_some_and(|e| e == "json") {
        return match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => vec![value],
            Err(error) => {
                tracing::warn!(file = %file.display(), %error, "not valid JSON");
                Vec::new()
            }
        };
    }
    match serde_saphyr::from_multiple::<serde_json::Value>(text) {
        Ok(values) => values.into_iter().filter(|v| !v.is_null()).collect(),
        Err(error) => {
            tracing::warn!(file = %file.display(), %error, "not valid YAML");
            Vec::new()
        }
    }
}

/// A manifest document as an object. `Err` when it does not even say what it is (no kind,
/// no name): then there is no object whose keys could be removed, only a log line.
fn decode(mut value: serde_json::Value) -> Result<Document, String> {
    let kind_name = value.get("kind").and_then(|k| k.as_str()).ok_or("no kind")?.to_owned();
    let kind = Kind::from_kubernetes_kind(&kind_name).ok_or_else(|| format!("kind {kind_name} is not mirrored"))?;
    let metadata = value.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(|n| n.as_str()).ok_or("no metadata.name")?.to_owned();
    let namespace = metadata.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()).map(str::to_owned);
    // An API server stamps every object it creates; manifests rarely carry the stamp, and
    // Cilium's readers reject a ServiceExport without one.
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.entry("creationTimestamp").or_insert_with(|| crate::sync::rfc3339_now().into());
    }
    Ok(match Object::from_value(kind, value) {
        Ok(object) => Document::Valid(Box::new(object)),
        Err(reason) => Document::Invalid {
            key: ObjectKey { kind, namespace: namespace.map(Into::into), name: name.into() },
            reason,
        },
    })
}
