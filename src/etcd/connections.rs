//! `--max-connections-per-user`: how many client connections one certificate user may hold.
//!
//! Off by default: every agent of every remote cluster connects as the same user (`remote`,
//! or `remote-<cluster>` with per-cluster users), so no bound fits every mesh; an operator who
//! knows the largest cluster's node count can set one. Connections are counted from the end
//! of the TLS handshake to their close; one refused is closed at once and counted.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// The open connections of each user (the certificate's Common Name; `None` without one).
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    /// 0: no limit.
    max_per_user: usize,
    open: Mutex<HashMap<Option<String>, usize>>,
}

impl ConnectionLimit {
    pub fn new(max_per_user: usize) -> Arc<Self> {
        Arc::new(Self { max_per_user, open: Mutex::default() })
    }

    /// A slot for one more connection of `user`, held until the returned value is dropped;
    /// `None` when the user already holds the maximum.
    pub fn open(self: &Arc<Self>, user: Option<&str>) -> Option<OpenConnection> {
        let user = user.map(str::to_owned);
        let mut open = self.open.lock();
        let count = open.entry(user.clone()).or_default();
        if self.max_per_user != 0 && *count >= self.max_per_user {
            return None;
        }
        *count += 1;
        Some(OpenConnection { limit: Arc::clone(self), user })
    }

    /// Connections `user` holds now.
    pub fn held(&self, user: Option<&str>) -> usize {
        self.open.lock().get(&user.map(str::to_owned)).copied().unwrap_or(0)
    }
}

/// One counted connection; its slot is given back on drop.
#[derive(Debug)]
pub struct OpenConnection {
    limit: Arc<ConnectionLimit>,
    user: Option<String>,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = self.limit.open.lock();
        if let Some(count) = open.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_at_the_limit_is_refused_until_one_of_its_connections_closes() {
        let limit = ConnectionLimit::new(2);
        let first = limit.open(Some("remote")).expect("first");
        let _second = limit.open(Some("remote")).expect("second");
        assert!(limit.open(Some("remote")).is_none(), "a third is refused");
        let _other = limit.open(Some("admin-cluster1")).expect("other users are counted apart");
        let _anonymous = limit.open(None).expect("connections without a certificate user count apart too");
        drop(first);
        assert_eq!(limit.held(Some("remote")), 1);
        assert!(limit.open(Some("remote")).is_some(), "a closed connection gives its slot back");
    }

    #[test]
    fn zero_means_no_limit() {
        let limit = ConnectionLimit::new(0);
        let held: Vec<_> = (0..1000).map(|_| limit.open(Some("remote")).expect("never refused")).collect();
        assert_eq!(limit.held(Some("remote")), 1000);
        drop(held);
        assert_eq!(limit.held(Some("remote")), 0);
    }
}
