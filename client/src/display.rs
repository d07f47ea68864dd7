//! How errors and times are written for people and for Cilium's readers, once for the client
//! and the server.

use std::time::SystemTime;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// An error and its sources on one line (`read /x: gone`), each cause once: many errors
/// already quote their source in their own message.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `time` as Go's `time.RFC3339` prints a UTC time (whole seconds: `2026-05-04T09:21:07Z`), the
/// form Cilium writes into canaries, the heartbeat and status reports.
pub fn rfc3339(time: SystemTime) -> String {
    let time = OffsetDateTime::from(time);
    let time = time.replace_nanosecond(0).unwrap_or(time);
    time.format(&Rfc3339).unwrap_or_default()
}

/// Whether `text` parses as RFC 3339, as `metav1.Time` requires of Kubernetes timestamps.
pub fn is_rfc3339(text: &str) -> bool {
    OffsetDateTime::parse(text, &Rfc3339).is_ok()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_in_whole_seconds() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_millis(1_777_886_467_900)), "2026-05-04T09:21:07Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn kubernetes_timestamps_must_be_rfc3339() {
        assert!(is_rfc3339("2026-03-14T08:30:00Z"));
        assert!(is_rfc3339("2026-03-14T08:30:00.5+02:00"));
        assert!(!is_rfc3339("2026-03-14 08:30:00"));
        assert!(!is_rfc3339("2026-13-14T08:30:00Z"));
        assert!(!is_rfc3339(""));
    }

    #[test]
    fn error_chains_name_each_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("read /x")]
        struct Read(#[source] std::io::Error);
        #[derive(Debug, thiserror::Error)]
        #[error("loading config: {0}")]
        struct Load(#[source] std::io::Error);
        let gone = || std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        assert_eq!(error_chain(&Read(gone())), "read /x: gone");
        assert_eq!(error_chain(&Load(gone())), "loading config: gone");
    }
}
