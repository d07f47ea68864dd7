//! The heartbeat: the writer rewrites `cilium/.heartbeat` every minute; a connection that saw no
//! write for too long (Cilium: 2 × 60 s) is dropped and re-made (`pkg/kvstore/etcd.go`,
//! `statusChecker`; `pkg/clustermesh/common/remote_cluster.go`, `watchdog`). Like Cilium's
//! client, the connection counts as established once the heartbeat key's first list returned.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cache::{Sink, list_and_watch};
use crate::connect::{self, Connection};
use crate::wire::HEARTBEAT_KEY;

/// No heartbeat arrived in time.
#[derive(Debug, thiserror::Error)]
#[error("no heartbeat for {silent:?} (more than {timeout:?})")]
pub struct HeartbeatTimeout {
    pub silent: Duration,
    pub timeout: Duration,
}

struct HeartbeatSink {
    last: watch::Sender<Instant>,
    established: Option<oneshot::Sender<()>>,
    last_error: watch::Sender<Option<String>>,
}

impl Sink for HeartbeatSink {
    fn upsert(&mut self, _key: &str, _value: &[u8]) {
        self.last.send_replace(Instant::now());
    }

    fn delete(&mut self, _key: &str) {}

    fn list_done(&mut self) {
        if let Some(established) = self.established.take() {
            let _ = established.send(());
        }
    }

    fn error(&mut self, error: &connect::Error) {
        self.last_error.send_replace(Some(error.to_string()));
    }
}

/// What [`watch_heartbeat`] hands back.
pub(crate) struct HeartbeatWatch<F> {
    /// Fires once the first list of the heartbeat key returned.
    pub(crate) established: oneshot::Receiver<()>,
    /// The time of the last heartbeat (initially: now).
    pub(crate) last: watch::Receiver<Instant>,
    /// The last error reading the heartbeat, to explain a connection never established.
    pub(crate) last_error: watch::Receiver<Option<String>>,
    /// List+watches the heartbeat until cancelled.
    pub(crate) run: F,
}

pub(crate) fn watch_heartbeat(
    connection: Connection,
    token: CancellationToken,
) -> HeartbeatWatch<impl Future<Output = connect::Result<()>> + Send + 'static> {
    let (established_tx, established) = oneshot::channel();
    let (last_tx, last) = watch::channel(Instant::now());
    let (error_tx, last_error) = watch::channel(None);
    let run = async move {
        let mut sink = HeartbeatSink { last: last_tx, established: Some(established_tx), last_error: error_tx };
        list_and_watch(&connection, HEARTBEAT_KEY, &token, &mut sink).await
    };
    HeartbeatWatch { established, last, last_error, run }
}

/// Returns an error once `timeout` passed since the last heartbeat; `Ok` when cancelled.
pub(crate) async fn watchdog(
    mut last: watch::Receiver<Instant>,
    timeout: Duration,
    token: CancellationToken,
) -> Result<(), HeartbeatTimeout> {
    loop {
        let deadline = *last.borrow_and_update() + timeout;
        tokio::select! {
            () = token.cancelled() => return Ok(()),
            changed = last.changed() => {
                if changed.is_err() {
                    // The heartbeat watcher ended; the session ends with its own error.
                    token.cancelled().await;
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let silent = last.borrow().elapsed();
                if silent >= timeout {
                    return Err(HeartbeatTimeout { silent, timeout });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_only_after_a_silent_timeout() {
        let (tx, rx) = watch::channel(Instant::now());
        let token = CancellationToken::new();
        let dog = tokio::spawn(watchdog(rx, Duration::from_secs(120), token.clone()));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            tx.send_replace(Instant::now());
        }
        assert!(!dog.is_finished());
        tokio::time::sleep(Duration::from_secs(121)).await;
        let error = dog.await.unwrap().unwrap_err();
        assert!(error.silent >= Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_stops_on_cancellation() {
        let (_tx, rx) = watch::channel(Instant::now());
        let token = CancellationToken::new();
        let dog = tokio::spawn(watchdog(rx, Duration::from_secs(120), token.clone()));
        token.cancel();
        assert!(dog.await.unwrap().is_ok());
    }
}
