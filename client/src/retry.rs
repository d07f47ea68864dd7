//! The one retry shape of the project, client and server alike: a delay that doubles from
//! `initial` up to `max`, plus up to as much again at random so that many clients failing
//! together do not retry together, reset after a success (the shape of kube-runtime's
//! `default_backoff`; anchors §10 rule 7).

use std::time::Duration;

use rand::Rng as _;

/// How to wait between attempts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A connection that stayed up this long starts the next retry from `initial` again.
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// 0.8 s doubling up to 30 s, reset after 120 s healthy.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(120),
        }
    }
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, reset_after: Duration::from_secs(120) }
    }

    pub fn with_reset_after(mut self, reset_after: Duration) -> Self {
        self.reset_after = reset_after;
        self
    }

    /// The delays of one run of attempts.
    pub fn start(self) -> Retry {
        Retry { config: self, base: self.initial }
    }
}

/// The running state of a [`Backoff`].
#[derive(Debug, Clone)]
pub struct Retry {
    config: Backoff,
    base: Duration,
}

impl Retry {
    /// The delay before the next attempt: the current base plus up to the same again at
    /// random, at most `max`; the base doubles.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = self.base.mul_f64(rand::rng().random_range(0.0..1.0));
        let delay = (self.base + jitter).min(self.config.max);
        self.base = (self.base * 2).min(self.config.max);
        delay
    }

    /// After a success: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.base = self.config.initial;
    }

    pub fn reset_after(&self) -> Duration {
        self.config.reset_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_up_to_the_maximum_and_start_again_after_a_reset() {
        let mut retry = Backoff::new(Duration::from_millis(100), Duration::from_secs(1)).start();
        let delays: Vec<Duration> = (0..6).map(|_| retry.next_delay()).collect();
        for (delay, base) in delays.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            let base = Duration::from_millis(base);
            assert!(*delay >= base && *delay <= (base * 2).min(Duration::from_secs(1)), "{delays:?}");
        }
        retry.reset();
        assert!(retry.next_delay() < Duration::from_millis(200));
    }
}
