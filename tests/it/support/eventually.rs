//! Bounded polling: `eventually("what", timeout, || async { ... }).await`.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// The outcome of one polling attempt: done with a value, or not yet (with a reason).
pub trait Attempt {
    type Output;
    /// `Ok(value)` when done; `Err(reason)` to try again.
    fn into_attempt(self) -> Result<Self::Output, String>;
}

impl<T> Attempt for Option<T> {
    type Output = T;
    fn into_attempt(self) -> Result<T, String> {
        self.ok_or_else(|| "returned None".to_string())
    }
}

impl<T, E: Display> Attempt for Result<T, E> {
    type Output = T;
    fn into_attempt(self) -> Result<T, String> {
        // `{:#}` prints anyhow's whole context chain on one line.
        self.map_err(|e| format!("{e:#}"))
    }
}

impl Attempt for bool {
    type Output = ();
    fn into_attempt(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("returned false".to_string()) }
    }
}

/// Calls `f` until it succeeds (`Some`, `Ok`, or `true`) and returns the value. Sleeps between
/// attempts (10 ms, doubling up to 200 ms). Each attempt is itself cut off at the deadline.
///
/// Note: `Ok(None)` from a `Result<Option<T>, E>` counts as success (with `None`); to keep
/// polling until a value appears, return an `Option` (e.g. `rpc().await.ok()?`).
///
/// # Panics
/// When `timeout` passes without success, with `what` and the last failure.
pub async fn eventually<F, Fut, R>(what: &str, timeout: Duration, mut f: F) -> R::Output
where
    F: FnMut() -> Fut,
    Fut: Future<Output = R>,
    R: Attempt,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pause = Duration::from_millis(10);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let last = match tokio::time::timeout(remaining, f()).await {
            Ok(outcome) => match outcome.into_attempt() {
                Ok(value) => return value,
                Err(reason) => reason,
            },
            Err(_) => format!("attempt {attempts} still running at the deadline"),
        };
        let now = Instant::now();
        if now >= deadline {
            panic!("timed out after {:?} ({attempts} attempts) waiting for: {what}\nlast failure: {last}", now - start);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}
