//! Namespace names shared by every object key and endpoint that refers to them.
//!
//! A cluster has a few hundred namespaces and hundreds of thousands of namespaced objects; a
//! name allocated per object was 8 MiB of copies at 250k CiliumEndpoints.

use std::sync::Arc;

// foldhash, not SipHash: looked up once per object event.
use foldhash::HashSet;

/// The smallest table worth sweeping for names no object uses any more.
const MIN_SWEEP: usize = 64;

/// Hands out one shared handle per distinct name. Names that no holder uses any more are
/// dropped when the table has doubled since the last sweep, so that namespaces created and
/// deleted all day (CI clusters) do not accumulate.
#[derive(Default)]
pub struct Names {
    names: HashSet<Arc<str>>,
    sweep_at: usize,
}

impl Names {
    /// The shared handle for `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        if self.names.len() >= self.sweep_at {
            self.names.retain(|shared| Arc::strong_count(shared) > 1);
            self.sweep_at = (2 * self.names.len()).max(MIN_SWEEP);
        }
        let shared: Arc<str> = name.into();
        self.names.insert(Arc::clone(&shared));
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_name_is_one_allocation_however_many_times_it_is_asked_for() {
        let mut names = Names::default();
        let a = names.get("shop");
        let b = names.get("shop");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &names.get("payments")));
    }

    #[test]
    fn names_nobody_holds_are_forgotten_as_the_table_grows() {
        let mut names = Names::default();
        let kept = names.get("kept");
        for i in 0..10 * MIN_SWEEP {
            names.get(&format!("gone-{i}"));
        }
        assert!(names.len() <= 2 * MIN_SWEEP, "{} names after sweeps", names.len());
        assert!(Arc::ptr_eq(&kept, &names.get("kept")), "a name still held survives every sweep");
    }
}
