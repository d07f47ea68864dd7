//! Sync canaries: with the `syncedCanaries` capability, a prefix is listed only once
//! `cilium/synced/<C>/<prefix name>` exists, i.e. once the writer has flushed its initial
//! snapshot (`pkg/kvstore/store/watchstoremgr.go`, `wsmSync`). An empty or half-filled prefix
//! after a server restart is therefore never taken for "everything was deleted".

use std::collections::BTreeSet;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::cache::{Sink, list_and_watch};
use crate::connect::{self, Connection};
use crate::wire::{ClusterName, canary_prefix};

/// The canary names seen so far on this connection. Deletions are ignored, as in Cilium: a
/// started prefix keeps running.
#[derive(Clone)]
pub(crate) struct Canaries {
    seen: watch::Receiver<BTreeSet<String>>,
}

impl Canaries {
    /// Waits until the canary `name` exists; `false` if the watcher stopped first.
    pub(crate) async fn wait_for(&mut self, name: &str) -> bool {
        self.seen.wait_for(|seen| seen.contains(name)).await.is_ok()
    }
}

struct CanarySink<'a> {
    prefix: &'a str,
    seen: &'a watch::Sender<BTreeSet<String>>,
}

impl Sink for CanarySink<'_> {
    fn upsert(&mut self, key: &str, _value: &[u8]) {
        if let Some(name) = key.strip_prefix(self.prefix) {
            self.seen.send_if_modified(|seen| {
                let new = seen.insert(name.to_string());
                if new {
                    tracing::debug!(canary = name, "sync canary present");
                }
                new
            });
        }
    }

    fn delete(&mut self, _key: &str) {}
}

/// Starts nothing by itself: returns the handle prefix tasks wait on and the future that
/// list+watches the canaries until `token` is cancelled.
pub(crate) fn watch_canaries(
    connection: Connection,
    cluster: &ClusterName,
    token: CancellationToken,
) -> (Canaries, impl Future<Output = connect::Result<()>> + Send + 'static) {
    let (tx, rx) = watch::channel(BTreeSet::new());
    let prefix = canary_prefix(cluster);
    let run = async move {
        let mut sink = CanarySink { prefix: &prefix, seen: &tx };
        list_and_watch(&connection, &prefix, &token, &mut sink).await
    };
    (Canaries { seen: rx }, run)
}
