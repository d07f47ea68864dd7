//! One cancellation signal for the whole process: SIGINT or SIGTERM cancels it, a second
//! signal exits at once.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// How long tasks get to finish after the first signal before the process exits anyway.
pub const GRACE_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Cancels `token` on the first SIGINT/SIGTERM; exits with status 130 on the second.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down (signal again to exit at once)");
        token.cancel();
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::warn!("second signal: exiting without waiting");
        std::process::exit(130);
    });
    Ok(())
}
