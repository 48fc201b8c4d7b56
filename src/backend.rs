//! Backend identity and live state: plain data.
//!
//! A [`Backend`] is one `[[listener.backend]]` as the current config describes
//! it (name, address, weight). Its [`BackendState`] — health verdict, admin
//! state, active connections, totals — lives in an `Arc` that the registry
//! (`registry`) keys by (listener, backend name), so a reload that
//! keeps the backend hands the new pool the very same counters, and a
//! connection holds this and nothing of the pool it was scheduled from.
//! Everything on the connection path is an atomic, except the short lock
//! of a least-connection pool's load tree, taken on each open and close.
//!
//! This module decides nothing about health (that is `health`; a
//! `Backend` only carries the plain-data report its checks write), HTTP (the
//! keep-alive pool belongs to HTTP mode) or metric registration (it is
//! handed its metric handles): everything else can depend on it, and it on
//! nothing but leaves (config types, metric handles, the check report, stop
//! signals).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering::Relaxed};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::balancer::load_tree::LoadSlot;
use crate::config::BackendConfig;
use crate::handover::Handover;
use crate::health::report::HealthReport;
use crate::metrics::BackendMetrics;
use crate::sync::Tripwire;

/// One backend as the current snapshot sees it: its config (name,
/// address, weight… — reachable directly through `Deref`) and its live
/// state, which outlives the snapshot.
#[derive(Debug)]
pub struct Backend {
    pub config: BackendConfig,
    /// Live state shared with every snapshot that contains this backend.
    pub state: Arc<BackendState>,
    /// What its last health check said (reason, role), for the status API.
    pub health: Arc<HealthReport>,
}

impl std::ops::Deref for Backend {
    type Target = BackendConfig;

    fn deref(&self) -> &BackendConfig {
        &self.config
    }
}

impl Backend {
    pub fn new(config: &BackendConfig, state: Arc<BackendState>) -> Backend {
        Backend::with_report(config, state, Arc::default())
    }

    /// A backend whose checks report into `health` (kept across reloads).
    pub fn with_report(
        config: &BackendConfig,
        state: Arc<BackendState>,
        health: Arc<HealthReport>,
    ) -> Backend {
        Backend {
            config: config.clone(),
            state,
            health,
        }
    }

    /// Whether this backend may take a new connection that comes `via`.
    /// The one eligibility rule of the crate: the scheduler, the queue and
    /// lbCookie all ask here.
    pub fn admits(&self, via: Via) -> bool {
        self.state.is_up()
            && match via {
                Via::Scheduler => self.weight > 0 && self.state.admin_state() == AdminState::Ready,
                Via::Pinned => self.state.admin_state() != AdminState::Maint,
            }
    }
}

/// How a new connection comes to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Offered by the scheduler: the backend must be up, ready and of a
    /// weight above zero.
    Scheduler,
    /// Already bound for it — an lbCookie, or a selection made before the
    /// connection waited in the queue: up and not in maintenance is enough
    /// (a drained backend keeps what was already its own).
    Pinned,
}

/// An operator's say on a backend, kept apart from health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
    /// The server's handover switch: every cut wire is a child of its
    /// sessions wire (itself a child of the server's stop wire), so one
    /// wait covers all three.
    handover: Arc<Handover>,
    /// Tripped (and replaced) when open connections must be cut: the
    /// backend was marked down with `on_marked_down = "shutdown"` (udp:
    /// down, maintenance, removed or moved), or, through the handover's
    /// sessions wire, the shutdown grace is over or a live upgrade takes
    /// the sessions.
    cut: ArcSwap<Tripwire>,
    /// Counters, exported as they are: the metrics are the live state.
    pub metrics: Arc<BackendMetrics>,
    /// Connections (HTTP: requests) holding a slot, checked against
    /// `max_connections`.
    in_use: AtomicUsize,
    /// Where a least-connection pool that holds this backend keeps its
    /// load; told on every open and close. Empty for other schedulers.
    load: ArcSwapOption<LoadSlot>,
}

impl Default for BackendState {
    /// State whose metrics are registered nowhere (tests, benchmarks).
    fn default() -> Self {
        BackendState::new(Arc::new(BackendMetrics::detached()), &Arc::default())
    }
}

impl BackendState {
    /// Live state whose connections are also cut (or frozen) when
    /// `handover`'s sessions wire trips: the server's end of shutdown
    /// grace, or a live upgrade.
    pub fn new(metrics: Arc<BackendMetrics>, handover: &Arc<Handover>) -> BackendState {
        metrics.up.set(1);
        BackendState {
            up: AtomicBool::new(true),
            admin: AtomicU8::new(AdminState::Ready as u8),
            cut: ArcSwap::from_pointee(handover.sessions().child()),
            handover: handover.clone(),
            metrics,
            in_use: AtomicUsize::new(0),
            load: ArcSwapOption::empty(),
        }
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Record health's verdict (the listener's backend-set owner does, on
    /// a flip).
    pub fn set_up(&self, up: bool) {
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
        self.cut
            .swap(Arc::new(self.handover.sessions().child()))
            .trip();
    }

    /// The server's handover switch (a session woken by its cut wire asks
    /// it whether to freeze).
    pub fn handover(&self) -> &Handover {
        &self.handover
    }

    /// Count a connection assigned to this backend (connecting or
    /// established); the guard un-counts it when dropped.
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.metrics.active.inc();
        self.report_load();
        ActiveGuard(self.clone())
    }

    /// Report this backend's load to `slot` from now on (a new pool's
    /// scheduler does, as it is built), or to nothing.
    pub(crate) fn report_load_to(&self, slot: Option<LoadSlot>) {
        self.load.store(slot.map(Arc::new));
    }

    fn report_load(&self) {
        if let Some(slot) = &*self.load.load() {
            slot.set(self.active());
        }
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
        self.0.report_load();
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
}
