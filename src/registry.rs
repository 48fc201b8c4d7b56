//! Where backend live state is found across reloads.
//!
//! The [`Registry`] keys every backend's [`BackendState`] by
//! [`BackendKey`] = (listener, backend name). Each listener's backend-set
//! owner ([`crate::backend_set`]) asks it for the state of a backend that
//! joins and tells it when one leaves; nothing on the data path touches it.

use std::sync::{Arc, Mutex, Weak};

use hashbrown::HashMap;

use crate::backend::{AdminState, BackendState};
use crate::handover::Handover;
use crate::metrics::Metrics;

/// (listener name, backend name): how live state is found across reloads.
pub type BackendKey = (Arc<str>, Arc<str>);

/// Live state of every backend of every listener.
#[derive(Debug)]
pub struct Registry {
    metrics: Arc<Metrics>,
    /// The server's handover switch, whose sessions wire is the parent of
    /// every backend's cut wire.
    handover: Arc<Handover>,
    inner: Mutex<Inner>,
}

/// What a backend's state says, as a live upgrade carries it to the new
/// process: health verdict and admin state (its counters travel with the
/// metrics).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seed {
    pub listener: Arc<str>,
    pub backend: Arc<str>,
    pub up: bool,
    pub admin: AdminState,
}

#[derive(Debug, Default)]
struct Inner {
    states: HashMap<BackendKey, Arc<BackendState>>,
    /// Removed backends whose connections may still be open: re-added
    /// before those end, a backend gets its state back, so its cap and
    /// counters still see them.
    retired: HashMap<BackendKey, Weak<BackendState>>,
    /// States carried from the process this one took over from, applied
    /// to each backend's state when it is first asked for.
    seeds: HashMap<BackendKey, Seed>,
}

impl Registry {
    /// States whose connections are cut (or frozen) when `handover`'s
    /// sessions wire trips, too.
    pub fn new(metrics: Arc<Metrics>, handover: Arc<Handover>) -> Registry {
        Registry {
            metrics,
            handover,
            inner: Mutex::default(),
        }
    }

    /// Start the listed backends from these states instead of fresh (up,
    /// ready): before the config that names them is applied.
    pub fn seed(&self, seeds: Vec<Seed>) {
        let mut inner = self.lock();
        for s in seeds {
            inner
                .seeds
                .insert((s.listener.clone(), s.backend.clone()), s);
        }
    }

    /// Every current backend's state, to carry to another process.
    pub fn seeds(&self) -> Vec<Seed> {
        let inner = self.lock();
        let mut v: Vec<Seed> = inner
            .states
            .iter()
            .map(|((listener, backend), state)| Seed {
                listener: listener.clone(),
                backend: backend.clone(),
                up: state.is_up(),
                admin: state.admin_state(),
            })
            .collect();
        v.sort_by(|a, b| (&a.listener, &a.backend).cmp(&(&b.listener, &b.backend)));
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state for (listener, backend): kept, still draining, or new.
    pub fn state(&self, listener: &Arc<str>, backend: &Arc<str>) -> Arc<BackendState> {
        self.state_carried(listener, backend).0
    }

    /// [`state`](Self::state), and the health verdict carried from the
    /// process this one took over from when this call applied its seed
    /// (its health checks go on from that verdict, not from fresh).
    pub fn state_carried(
        &self,
        listener: &Arc<str>,
        backend: &Arc<str>,
    ) -> (Arc<BackendState>, Option<bool>) {
        let key = (listener.clone(), backend.clone());
        let mut inner = self.lock();
        if let Some(state) = inner.states.get(&key) {
            return (state.clone(), None);
        }
        let mut carried = None;
        let state = match inner.retired.remove(&key).and_then(|w| w.upgrade()) {
            Some(state) => state,
            None => {
                let state =
                    BackendState::new(self.metrics.backend(listener, backend), &self.handover);
                if let Some(seed) = inner.seeds.remove(&key) {
                    state.set_up(seed.up);
                    state.set_admin_state(seed.admin);
                    carried = Some(seed.up);
                }
                Arc::new(state)
            }
        };
        inner.states.insert(key, state.clone());
        (state, carried)
    }

    /// Forget a backend that is no longer configured. Its connections keep
    /// their own `Arc`s and finish normally.
    pub fn retire(&self, listener: &Arc<str>, backend: &Arc<str>) {
        let key = (listener.clone(), backend.clone());
        let mut inner = self.lock();
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
        let r = Registry::new(Metrics::new(), Arc::default());
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
