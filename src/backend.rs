//! Backend identity and live state.
//!
//! A [`Backend`] is one `[[listener.backend]]` as the current config describes
//! it (name, address, weight). Its [`BackendState`] — active connections,
//! totals — lives in an `Arc` that the [`Registry`] keys by (listener, backend
//! name), so a reload that keeps the backend hands the new snapshot the very
//! same counters. Everything on the connection path is an atomic: no locks.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hashbrown::HashMap;

use crate::config::BackendConfig;
use crate::health::Hysteresis;
use crate::proxy::tripwire::Tripwire;

/// One backend as the current snapshot sees it.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    /// The address as configured (may be a host name).
    pub address: String,
    /// Where new connections go.
    pub addr: SocketAddr,
    pub weight: u32,
    /// Used only while no non-backup backend can take connections.
    pub backup: bool,
    /// Live state shared with every snapshot that contains this backend.
    pub state: Arc<BackendState>,
}

impl Backend {
    pub fn new(config: &BackendConfig, state: Arc<BackendState>) -> Backend {
        Backend {
            name: config.name.clone(),
            address: config.address.clone(),
            addr: config.addr,
            weight: config.weight,
            backup: config.backup,
            state,
        }
    }

    /// Whether the scheduler may offer this backend for new connections.
    pub fn usable(&self) -> bool {
        self.weight > 0 && self.state.is_up()
    }
}

/// Counters and status that outlive any one config snapshot.
#[derive(Debug)]
pub struct BackendState {
    /// Health as the probes last decided. A new backend starts up: it takes
    /// traffic until probes say otherwise.
    up: AtomicBool,
    /// The probes' consecutive-result counters; only the probe task of this
    /// backend touches it (never the data path).
    pub(crate) hysteresis: Mutex<Hysteresis>,
    /// Tripped (and replaced) when open connections must be cut because
    /// the backend was marked down with `on_marked_down = "shutdown"`.
    cut: ArcSwap<Tripwire>,
    checks_ok: AtomicU64,
    checks_failed: AtomicU64,
    /// Connections assigned to this backend and not yet closed (includes the
    /// connect phase, so least-connection sees in-flight work at once).
    active: AtomicU64,
    /// Connections ever established.
    total: AtomicU64,
    /// Failed connect attempts.
    connect_errors: AtomicU64,
    bytes_client_to_backend: AtomicU64,
    bytes_backend_to_client: AtomicU64,
}

impl Default for BackendState {
    fn default() -> Self {
        BackendState {
            up: AtomicBool::new(true),
            hysteresis: Mutex::default(),
            cut: ArcSwap::from_pointee(Tripwire::new()),
            checks_ok: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            bytes_client_to_backend: AtomicU64::new(0),
            bytes_backend_to_client: AtomicU64::new(0),
        }
    }
}

impl BackendState {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
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

    pub(crate) fn record_check(&self, ok: bool) {
        let counter = if ok {
            &self.checks_ok
        } else {
            &self.checks_failed
        };
        counter.fetch_add(1, Relaxed);
    }

    /// (successful, failed) health probes so far.
    pub fn checks(&self) -> (u64, u64) {
        (
            self.checks_ok.load(Relaxed),
            self.checks_failed.load(Relaxed),
        )
    }

    /// Count a connection assigned to this backend (connecting or
    /// established); the guard un-counts it when dropped.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(self.clone())
    }

    /// Count a connection whose backend connect succeeded.
    pub fn record_established(&self) {
        self.total.fetch_add(1, Relaxed);
    }

    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Relaxed)
    }

    pub fn record_connect_error(&self) {
        self.connect_errors.fetch_add(1, Relaxed);
    }

    pub fn add_bytes(&self, client_to_backend: u64, backend_to_client: u64) {
        if client_to_backend > 0 {
            self.bytes_client_to_backend
                .fetch_add(client_to_backend, Relaxed);
        }
        if backend_to_client > 0 {
            self.bytes_backend_to_client
                .fetch_add(backend_to_client, Relaxed);
        }
    }

    /// (client→backend, backend→client) bytes relayed so far.
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes_client_to_backend.load(Relaxed),
            self.bytes_backend_to_client.load(Relaxed),
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
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Live state of every backend, keyed by (listener, backend name).
///
/// Only the control plane touches the map (at start and reload); the data path
/// holds the `Arc`s it was handed in a snapshot.
#[derive(Debug, Default)]
pub struct Registry {
    states: HashMap<(Arc<str>, Arc<str>), Arc<BackendState>>,
}

impl Registry {
    /// The state for (listener, backend), created fresh if it is new.
    pub fn state(&mut self, listener: &Arc<str>, backend: &Arc<str>) -> Arc<BackendState> {
        self.states
            .entry((listener.clone(), backend.clone()))
            .or_default()
            .clone()
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
        self.states.retain(|(l, b), _| keep(l, b));
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
        let mut r = Registry::default();
        let (l, b): (Arc<str>, Arc<str>) = ("pg".into(), "pg1".into());
        let a = r.state(&l, &b);
        let again = r.state(&l, &b);
        assert!(Arc::ptr_eq(&a, &again));
        let other = r.state(&l, &"pg2".into());
        assert!(!Arc::ptr_eq(&a, &other));
        r.retain(|_, name| name != "pg1");
        assert!(!Arc::ptr_eq(&a, &r.state(&l, &b)));
    }
}
