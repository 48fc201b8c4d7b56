//! Backend identity and live state.
//!
//! A [`Backend`] is one `[[listener.backend]]` as the current config describes
//! it (name, address, weight). Its [`BackendState`] — active connections,
//! totals — lives in an `Arc` that the [`Registry`] keys by (listener, backend
//! name), so a reload that keeps the backend hands the new snapshot the very
//! same counters. Everything on the connection path is an atomic: no locks.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::HashMap;

use crate::config::BackendConfig;
use crate::health::Hysteresis;
use crate::metrics::{BackendMetrics, Metrics};
use crate::proxy::http::ConnPool;
use crate::proxy::tripwire::Tripwire;

/// (listener name, backend name): how live state is found across reloads.
pub type BackendKey = (Arc<str>, Arc<str>);

/// One backend as the current snapshot sees it: its config (name,
/// address, weight… — reachable directly through `Deref`) and its live
/// state, which outlives the snapshot.
#[derive(Debug)]
pub struct Backend {
    pub config: BackendConfig,
    /// Live state shared with every snapshot that contains this backend.
    pub state: Arc<BackendState>,
}

impl std::ops::Deref for Backend {
    type Target = BackendConfig;

    fn deref(&self) -> &BackendConfig {
        &self.config
    }
}

impl Backend {
    pub fn new(config: &BackendConfig, state: Arc<BackendState>) -> Backend {
        Backend {
            config: config.clone(),
            state,
        }
    }

    /// Whether the scheduler may offer this backend for new connections:
    /// weight above zero, up, and not drained or in maintenance.
    pub fn usable(&self) -> bool {
        self.weight > 0 && self.state.is_up() && self.state.admin_state() == AdminState::Ready
    }
}

/// An operator's say on a backend, kept apart from health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes connections as health allows.
    Ready = 0,
    /// No new connections, except requests that are sticky to it.
    Drain = 1,
    /// No new connections at all.
    Maint = 2,
}

impl AdminState {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }

    pub fn parse(s: &str) -> Option<AdminState> {
        match s {
            "ready" => Some(AdminState::Ready),
            "drain" => Some(AdminState::Drain),
            "maint" => Some(AdminState::Maint),
            _ => None,
        }
    }
}

/// Counters and status that outlive any one config snapshot.
#[derive(Debug)]
pub struct BackendState {
    /// Health as the probes last decided. A new backend starts up: it takes
    /// traffic until probes say otherwise.
    up: AtomicBool,
    /// [`AdminState`] as a number; survives reloads, not restarts.
    admin: AtomicU8,
    /// The probes' consecutive-result counters; only the probe task of this
    /// backend touches it (never the data path).
    pub(crate) hysteresis: Mutex<Hysteresis>,
    /// Tripped (and replaced) when open connections must be cut because
    /// the backend was marked down with `on_marked_down = "shutdown"`.
    cut: ArcSwap<Tripwire>,
    /// Counters, exported as they are: the metrics are the live state.
    pub metrics: Arc<BackendMetrics>,
    /// HTTP mode: idle keep-alive connections to this backend.
    pub http_pool: ConnPool,
    /// Connections (HTTP: requests) holding a slot, checked against
    /// `max_connections`.
    in_use: AtomicUsize,
}

impl Default for BackendState {
    /// State whose metrics are registered nowhere (tests, benchmarks).
    fn default() -> Self {
        BackendState::new(Arc::new(BackendMetrics::detached()))
    }
}

impl BackendState {
    pub fn new(metrics: Arc<BackendMetrics>) -> BackendState {
        metrics.up.set(1);
        BackendState {
            up: AtomicBool::new(true),
            admin: AtomicU8::new(AdminState::Ready as u8),
            hysteresis: Mutex::default(),
            cut: ArcSwap::from_pointee(Tripwire::new()),
            metrics,
            http_pool: ConnPool::default(),
            in_use: AtomicUsize::new(0),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
        self.metrics.up.set(i64::from(up));
    }

    pub fn admin_state(&self) -> AdminState {
        match self.admin.load(Relaxed) {
            0 => AdminState::Ready,
            1 => AdminState::Drain,
            _ => AdminState::Maint,
        }
    }

    pub fn set_admin_state(&self, state: AdminState) {
        self.admin.store(state as u8, Relaxed);
    }

    /// Take a slot: always when uncapped, else if fewer than `max` are in
    /// use.
    pub(crate) fn try_take_slot(&self, max: Option<u32>) -> bool {
        match max {
            None => {
                self.in_use.fetch_add(1, Relaxed);
                true
            }
            Some(max) => self
                .in_use
                .fetch_update(Relaxed, Relaxed, |n| (n < max as usize).then_some(n + 1))
                .is_ok(),
        }
    }

    pub(crate) fn release_slot(&self) {
        self.in_use.fetch_sub(1, Relaxed);
    }

    /// A tripwire tripped when this backend's open connections must close.
    pub fn cut_signal(&self) -> Tripwire {
        (**self.cut.load()).clone()
    }

    /// Close every connection that holds a [`cut_signal`](Self::cut_signal)
    /// taken before now; later connections are unaffected.
    pub fn cut_connections(&self) {
        self.cut.swap(Arc::new(Tripwire::new())).trip();
    }

    pub(crate) fn record_check(&self, ok: bool, took: Duration) {
        let m = &self.metrics;
        if ok { &m.checks_ok } else { &m.checks_failed }.inc();
        m.check_duration.observe(took.as_secs_f64());
    }

    /// (successful, failed) health probes so far.
    pub fn checks(&self) -> (u64, u64) {
        (
            self.metrics.checks_ok.get(),
            self.metrics.checks_failed.get(),
        )
    }

    /// Count a connection assigned to this backend (connecting or
    /// established); the guard un-counts it when dropped.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.metrics.active.inc();
        ActiveGuard(self.clone())
    }

    /// Count a connection whose backend connect succeeded.
    pub fn record_established(&self) {
        self.metrics.connections.inc();
    }

    pub fn active(&self) -> u64 {
        self.metrics.active.get().max(0) as u64
    }

    /// Connections established so far.
    pub fn total(&self) -> u64 {
        self.metrics.connections.get()
    }

    pub fn connect_errors(&self) -> u64 {
        self.metrics.connect_errors.get()
    }

    pub fn record_connect_error(&self) {
        self.metrics.connect_errors.inc();
    }

    /// (client→backend, backend→client) bytes relayed so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.metrics.bytes_client_to_backend.get(),
            self.metrics.bytes_backend_to_client.get(),
        )
    }
}

/// Holds one active connection on a backend.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendState>);

impl ActiveGuard {
    pub fn state(&self) -> &BackendState {
        &self.0
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.metrics.active.dec();
    }
}

/// Live state of every backend, keyed by (listener, backend name).
///
/// Only the control plane touches the map (at start and reload); the data path
/// holds the `Arc`s it was handed in a snapshot.
#[derive(Debug)]
pub struct Registry {
    metrics: Arc<Metrics>,
    states: HashMap<BackendKey, Arc<BackendState>>,
    /// Removed backends whose connections may still be open: re-added
    /// before those end, a backend gets its state back, so its cap and
    /// counters still see them.
    retired: HashMap<BackendKey, Weak<BackendState>>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Registry {
        Registry {
            metrics,
            states: HashMap::new(),
            retired: HashMap::new(),
        }
    }

    /// The state for (listener, backend): kept, still draining, or new.
    pub fn state(&mut self, listener: &Arc<str>, backend: &Arc<str>) -> Arc<BackendState> {
        let key = (listener.clone(), backend.clone());
        if let Some(state) = self.states.get(&key) {
            return state.clone();
        }
        let state = self
            .retired
            .remove(&key)
            .and_then(|w| w.upgrade())
            .unwrap_or_else(|| {
                Arc::new(BackendState::new(self.metrics.backend(listener, backend)))
            });
        self.states.insert(key, state.clone());
        state
    }

    /// Judge a backend's health afresh (its address changed: it is another
    /// server now). It starts up and unprobed, like a new backend.
    pub fn reset_health(&mut self, listener: &Arc<str>, backend: &Arc<str>) {
        if let Some(state) = self.states.get(&(listener.clone(), backend.clone())) {
            *state.hysteresis.lock().unwrap_or_else(|e| e.into_inner()) = Default::default();
            state.set_up(true);
        }
    }

    /// Forget backends that are no longer configured. Their connections keep
    /// their own `Arc`s and finish normally.
    pub fn retain(&mut self, keep: impl Fn(&str, &str) -> bool) {
        let mut removed = Vec::new();
        self.states.retain(|(l, b), state| {
            let kept = keep(l, b);
            if !kept {
                removed.push(((l.clone(), b.clone()), Arc::downgrade(state)));
            }
            kept
        });
        self.retired.retain(|_, w| w.strong_count() > 0);
        self.retired.extend(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_counts_active_and_total() {
        let s = Arc::new(BackendState::default());
        let g1 = s.enter();
        let g2 = s.enter();
        assert_eq!((s.active(), s.total()), (2, 0));
        s.record_established();
        s.record_established();
        drop(g1);
        assert_eq!((s.active(), s.total()), (1, 2));
        drop(g2);
        assert_eq!((s.active(), s.total()), (0, 2));
    }

    #[test]
    fn registry_hands_out_the_same_state_for_the_same_key() {
        let mut r = Registry::new(Metrics::new());
        let (l, b): (Arc<str>, Arc<str>) = ("pg".into(), "pg1".into());
        let a = r.state(&l, &b);
        let again = r.state(&l, &b);
        assert!(Arc::ptr_eq(&a, &again));
        let other = r.state(&l, &"pg2".into());
        assert!(!Arc::ptr_eq(&a, &other));
        r.retain(|_, name| name != "pg1");
        // Re-added while its old state is still held (open connections):
        // the same state comes back, caps and counters intact.
        assert!(Arc::ptr_eq(&a, &r.state(&l, &b)));
        r.retain(|_, name| name != "pg1");
        drop((a, again));
        r.retain(|_, _| true);
        let fresh = r.state(&l, &b);
        assert_eq!(
            fresh.total(),
            0,
            "a backend re-added after its last connection starts fresh"
        );
    }
}
