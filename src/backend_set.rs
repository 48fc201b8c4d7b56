//! One owner per listener for its backend set.
//!
//! Every change to which backends a listener has, and which of them may take
//! new connections, is sent as an update to the listener's owner task: a
//! reload's new config, a health flip from a probe, an operator's admin
//! state. The owner alone applies them to the members' live state, starts
//! and stops their probes, rebuilds the listener's [`Route`] and publishes
//! it. Updates that arrive while a rebuild runs coalesce into the next one,
//! and nothing else writes the route, so no two rebuilds race.
//!
//! Callers that must know the change is in effect (a reload, the admin API:
//! once it says 200, no new connection goes to a drained backend) wait for
//! the owner's acknowledgement, sent after the new route is published.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::backend::{AdminState, Backend, BackendState};
use crate::config::{CheckKind, ListenerConfig, OnMarkedDown};
use crate::health::{self, Flip, ProbeHandle, Target};
use crate::metrics::Metrics;
use crate::proxy::{Route, Settings, Shared};
use crate::registry::Registry;

/// A change for a listener's owner.
#[derive(Debug)]
enum Update {
    /// A reload: the listener's new settings and backend list.
    Reconfigure {
        config: Arc<ListenerConfig>,
        done: oneshot::Sender<()>,
    },
    /// A probe's verdict changed. `probe` tells a current probe from one
    /// replaced meanwhile.
    Health { probe: u64, flip: Flip },
    /// An operator's say on a backend; answered with its previous state, or
    /// `None` if the listener has no such backend.
    Admin {
        backend: String,
        state: AdminState,
        done: oneshot::Sender<Option<AdminState>>,
    },
    /// The listener is removed or the server stops.
    Stop { done: oneshot::Sender<()> },
}

/// The means to reach a listener's owner. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BackendSet {
    updates: mpsc::UnboundedSender<Update>,
}

impl BackendSet {
    /// Start the owner of `config`'s backend set; returns its handle and the
    /// route cell it publishes to, already holding the first route.
    pub fn start(
        config: Arc<ListenerConfig>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (BackendSet, Arc<ArcSwap<Route>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Arc::new(Settings::of(&config));
        let shared = Arc::new(Shared::new(metrics.listener(&config.name)));
        let mut owner = Owner {
            config: config.clone(),
            settings: settings.clone(),
            shared: shared.clone(),
            members: Vec::new(),
            registry,
            metrics,
            reports: tx.downgrade(),
            next_probe: 0,
            route: Arc::new(ArcSwap::from_pointee(Route::new(
                settings,
                shared,
                Vec::new(),
            ))),
        };
        owner.apply_config(config);
        owner.route.store(Arc::new(owner.route_over_members()));
        let route = owner.route.clone();
        tokio::spawn(owner.run(rx));
        (BackendSet { updates: tx }, route)
    }

    /// Apply a reload's config; returns once the new route is published.
    pub async fn reconfigure(&self, config: Arc<ListenerConfig>) {
        let (done, wait) = oneshot::channel();
        self.send(Update::Reconfigure { config, done });
        let _ = wait.await;
    }

    /// Set a backend's admin state and republish the pool; `None` if there
    /// is no such backend, else its previous state.
    pub async fn set_admin_state(&self, backend: &str, state: AdminState) -> Option<AdminState> {
        let (done, wait) = oneshot::channel();
        self.send(Update::Admin {
            backend: backend.to_owned(),
            state,
            done,
        });
        wait.await.ok().flatten()
    }

    /// Stop the probes and let the backends go; open connections keep
    /// their own state and finish normally.
    pub async fn stop(&self) {
        let (done, wait) = oneshot::channel();
        self.send(Update::Stop { done });
        let _ = wait.await;
    }

    fn send(&self, update: Update) {
        if self.updates.send(update).is_err() {
            debug!("backend set already stopped");
        }
    }
}

/// The owner task's state.
struct Owner {
    config: Arc<ListenerConfig>,
    settings: Arc<Settings>,
    shared: Arc<Shared>,
    /// In config order.
    members: Vec<Member>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Where probes report flips; weak, so the owner ends when its last
    /// handle is dropped.
    reports: mpsc::WeakUnboundedSender<Update>,
    next_probe: u64,
    route: Arc<ArcSwap<Route>>,
}

/// One backend of the set and its probe.
struct Member {
    backend: Arc<Backend>,
    probe_id: u64,
    /// `None` with `kind = "none"`.
    probe: Option<ProbeHandle>,
}

impl Owner {
    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>) {
        let mut batch = Vec::new();
        loop {
            if updates.recv_many(&mut batch, usize::MAX).await == 0 {
                break; // every handle dropped
            }
            let mut rebuild = Rebuild::No;
            let mut reconfigured = Vec::new();
            let mut admin = Vec::new();
            let mut stop = None;
            for update in batch.drain(..) {
                match update {
                    Update::Reconfigure { config, done } => {
                        self.apply_config(config);
                        rebuild = Rebuild::Members;
                        reconfigured.push(done);
                    }
                    Update::Health { probe, flip } => {
                        if self.apply_flip(probe, flip) {
                            rebuild = rebuild.max(Rebuild::Eligibility);
                        }
                    }
                    Update::Admin {
                        backend,
                        state,
                        done,
                    } => {
                        let old = self.member(&backend).map(|b| {
                            let old = b.state.admin_state();
                            b.state.set_admin_state(state);
                            old
                        });
                        if old.is_some() {
                            rebuild = rebuild.max(Rebuild::Eligibility);
                        }
                        admin.push((done, old));
                    }
                    Update::Stop { done } => stop = Some(done),
                }
            }
            if let Some(done) = stop {
                self.retire_all();
                let _ = done.send(());
                return;
            }
            if rebuild != Rebuild::No {
                self.publish(rebuild).await;
            }
            if !reconfigured.is_empty() {
                // A raised max_connections must resume a paused accept
                // loop now, not when a connection next closes.
                self.shared.open.wake();
            }
            for done in reconfigured {
                let _ = done.send(());
            }
            for (done, old) in admin {
                let _ = done.send(old);
            }
        }
        self.retire_all();
    }

    /// Take a reload's config: kept backends keep their live state and
    /// probe (which gets the new check settings), a backend whose address
    /// changed is another server now and is judged afresh, new ones join
    /// and are probed at once, removed ones go.
    fn apply_config(&mut self, config: Arc<ListenerConfig>) {
        let settings = Settings::of(&config);
        if *self.settings != settings {
            self.settings = Arc::new(settings);
        }
        let mut old: Vec<Option<Member>> = self.members.drain(..).map(Some).collect();
        let count = config.backends.len();
        let mut members = Vec::with_capacity(count);
        for (i, b) in config.backends.iter().enumerate() {
            let kept = old
                .iter_mut()
                .find(|m| m.as_ref().is_some_and(|m| m.backend.name == b.name))
                .and_then(Option::take);
            let member = match kept {
                Some(m) if m.backend.addr == b.addr => {
                    let backend = if m.backend.config == *b {
                        m.backend
                    } else {
                        let (state, health) = (m.backend.state.clone(), m.backend.health.clone());
                        Arc::new(Backend::with_report(b, state, health))
                    };
                    match m.probe {
                        // The running probe takes the new settings, its
                        // counters intact (and stops if now `none`).
                        Some(probe) if config.health_check.kind != CheckKind::None => {
                            probe.update(config.health_check.clone());
                            Member {
                                backend,
                                probe_id: m.probe_id,
                                probe: Some(probe),
                            }
                        }
                        _ => self.member_for(&config, i, backend),
                    }
                }
                Some(m) => {
                    // Same name, new address: fresh health, same counters.
                    m.backend.state.set_up(true);
                    let backend = Backend::new(b, m.backend.state.clone());
                    self.member_for(&config, i, Arc::new(backend))
                }
                None => {
                    let state = self.registry.state(&config.name, &b.name);
                    self.member_for(&config, i, Arc::new(Backend::new(b, state)))
                }
            };
            members.push(member);
        }
        for gone in old.into_iter().flatten() {
            self.registry.retire(&self.config.name, &gone.backend.name);
        }
        self.members = members;
        self.config = config;
    }

    /// A member for `backend` with a probe of its own, fresh (its first
    /// check comes soon); none with `kind = "none"`, where it is always up.
    fn member_for(
        &mut self,
        config: &ListenerConfig,
        index: usize,
        backend: Arc<Backend>,
    ) -> Member {
        self.next_probe += 1;
        let id = self.next_probe;
        let settings = &config.health_check;
        if settings.kind == CheckKind::None {
            backend.state.set_up(true);
            backend.health.record(None, None);
            return Member {
                backend,
                probe_id: id,
                probe: None,
            };
        }
        let reports = self.reports.clone();
        let probe = health::spawn(
            Target {
                listener: config.name.clone(),
                backend: backend.name.clone(),
                addr: backend.addr,
                report: backend.health.clone(),
            },
            settings.clone(),
            health::first_delay(index, config.backends.len(), settings.interval),
            self.metrics.checks(&config.name, &backend.name),
            move |flip| {
                if let Some(tx) = reports.upgrade() {
                    let _ = tx.send(Update::Health { probe: id, flip });
                }
            },
        );
        Member {
            backend,
            probe_id: id,
            probe: Some(probe),
        }
    }

    /// Record a current probe's flip in the backend's live state; false for
    /// a probe that was replaced meanwhile.
    fn apply_flip(&self, probe: u64, flip: Flip) -> bool {
        let Some(m) = self.members.iter().find(|m| m.probe_id == probe) else {
            return false;
        };
        let state: &BackendState = &m.backend.state;
        match flip {
            Flip::Down => {
                state.set_up(false);
                if self.settings.on_marked_down == OnMarkedDown::Shutdown {
                    state.cut_connections();
                }
            }
            Flip::Up => state.set_up(true),
        }
        true
    }

    fn member(&self, name: &str) -> Option<&Arc<Backend>> {
        self.members
            .iter()
            .map(|m| &m.backend)
            .find(|b| &*b.name == name)
    }

    /// A route over the current members.
    fn route_over_members(&self) -> Route {
        Route::new(
            self.settings.clone(),
            self.shared.clone(),
            self.members.iter().map(|m| m.backend.clone()).collect(),
        )
    }

    /// Rebuild and publish the route. Large source-hash pools take
    /// milliseconds to build: that runs off the threads that serve
    /// connections.
    async fn publish(&self, rebuild: Rebuild) {
        let next = match rebuild {
            Rebuild::No => return,
            Rebuild::Eligibility => {
                let current = self.route.load_full();
                tokio::task::spawn_blocking(move || current.rebuilt()).await
            }
            Rebuild::Members => {
                let (settings, shared) = (self.settings.clone(), self.shared.clone());
                let backends: Vec<_> = self.members.iter().map(|m| m.backend.clone()).collect();
                tokio::task::spawn_blocking(move || Route::new(settings, shared, backends)).await
            }
        };
        match next {
            Ok(route) => self.route.store(Arc::new(route)),
            Err(e) => debug!(error = %e, "route rebuild did not finish"),
        }
    }

    /// Let every member go (the listener is removed or the server stops).
    fn retire_all(&mut self) {
        for m in self.members.drain(..) {
            self.registry.retire(&self.config.name, &m.backend.name);
        }
    }
}

/// How much of the route a batch of updates invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rebuild {
    No,
    /// Same members; who may take new connections changed.
    Eligibility,
    /// Members or settings changed.
    Members,
}
