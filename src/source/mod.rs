//! Where Kubernetes objects come from: the API server (kube watchers) or a directory of
//! manifests. Both speak the same event protocol to the mirror.

pub mod filter;
mod guard;
pub mod kube;
pub mod objects_dir;

use crate::translate::model::{Kind, Object, ObjectKey};

/// kube-runtime's watcher protocol, per kind: `Init`, the complete set as `InitApply`,
/// `InitDone`, then live `Apply`/`Delete`. A relist repeats the bracket, and whatever was
/// known but is not in the new set was deleted meanwhile.
#[derive(Debug)]
pub enum SourceEvent {
    Init(Kind),
    InitApply(Object),
    InitDone(Kind),
    Apply(Object),
    Delete(ObjectKey),
    /// An object that exists but does not decode. It counts as present during a relist and
    /// loses whatever keys it produced before, exactly as a translation failure would.
    Invalid {
        key: ObjectKey,
        reason: String,
    },
}
