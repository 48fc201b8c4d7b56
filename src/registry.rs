//! Where backend live state is found across reloads.
//!
//! The [`Registry`] keys every backend's [`BackendState`] by
//! [`BackendKey`] = (listener, backend name). Each listener's backend-set
//! owner ([`crate::backend_set`]) asks it for the state of a backend that
//! joins and tells it when one leaves; nothing on the data path touches it.

use std::sync::{Arc, Mutex, Weak};

use hashbrown::HashMap;

use crate::backend::BackendState;
use crate::metrics::Metrics;
use crate::sync::Tripwire;

/// (listener name, backend name): how live state is found across reloads.
pub type BackendKey = (Arc<str>, Arc<str>);

/// Live state of every backend of every listener.
#[derive(Debug)]
pub struct Registry {
    metrics: Arc<Metrics>,
    /// The server's stop wire, parent of every backend's cut wire.
    stop: Tripwire,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    states: HashMap<BackendKey, Arc<BackendState>>,
    /// Removed backends whose connections may still be open: re-added
    /// before those end, a backend gets its state back, so its cap and
    /// counters still see them.
    retired: HashMap<BackendKey, Weak<BackendState>>,
}

impl Registry {
    /// States whose connections are cut when `stop` trips, too.
    pub fn new(metrics: Arc<Metrics>, stop: Tripwire) -> Registry {
        Registry {
            metrics,
            stop,
            inner: Mutex::default(),
        }
    }

    /// The state for (listener, backend): kept, still draining, or new.
    pub fn state(&self, listener: &Arc<str>, backend: &Arc<str>) -> Arc<BackendState> {
        let key = (listener.clone(), backend.clone());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = inner.states.get(&key) {
            return state.clone();
        }
        let state = inner
            .retired
            .remove(&key)
            .and_then(|w| w.upgrade())
            .unwrap_or_else(|| {
                Arc::new(BackendState::new(
                    self.metrics.backend(listener, backend),
                    &self.stop,
                ))
            });
        inner.states.insert(key, state.clone());
        state
    }

    /// Forget a backend that is no longer configured. Its connections keep
    /// their own `Arc`s and finish normally.
    pub fn retire(&self, listener: &Arc<str>, backend: &Arc<str>) {
        let key = (listener.clone(), backend.clone());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.retired.retain(|_, w| w.strong_count() > 0);
        if let Some(state) = inner.states.remove(&key) {
            inner.retired.insert(key, Arc::downgrade(&state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_the_same_state_for_the_same_key() {
        let r = Registry::new(Metrics::new(), Tripwire::new());
        let (l, b): (Arc<str>, Arc<str>) = ("pg".into(), "pg1".into());
        let a = r.state(&l, &b);
        let again = r.state(&l, &b);
        assert!(Arc::ptr_eq(&a, &again));
        let other = r.state(&l, &"pg2".into());
        assert!(!Arc::ptr_eq(&a, &other));
        r.retire(&l, &b);
        // Re-added while its old state is still held (open connections):
        // the same state comes back, caps and counters intact.
        assert!(Arc::ptr_eq(&a, &r.state(&l, &b)));
        r.retire(&l, &b);
        drop((a, again));
        r.retire(&l, &"none".into());
        let fresh = r.state(&l, &b);
        assert_eq!(
            fresh.total(),
            0,
            "a backend re-added after its last connection starts fresh"
        );
    }
}
