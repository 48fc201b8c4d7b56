//! One owner per listener for its backend set.
//!
//! Every change to which backends a listener has, and which of them may take
//! new connections, is sent as an update to the listener's owner task: a
//! reload's new config, a health flip from a probe, a discovered name's new
//! set of addresses, an operator's admin state. The owner alone applies
//! them to the members' live state, starts and stops their probes and
//! watches, rebuilds the listener's [`Route`] and publishes it. Updates
//! that arrive while a rebuild runs coalesce into the next one, and nothing
//! else writes the route, so no two rebuilds race.
//!
//! Callers that must know the change is in effect (a reload, the admin API:
//! once it says 200, no new connection goes to a drained backend) wait for
//! the owner's acknowledgement, sent after the new route is published.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::backend::{AdminState, Backend, BackendState};
use crate::config::{
    BackendConfig, BackendEntry, CheckKind, DnsBackend, ListenerConfig, Mode, OnMarkedDown,
};
use crate::discovery::{self, Discovery, Found, Params, Primed, WatchHandle};
use crate::health::{self, Flip, ProbeHandle, Target};
use crate::metrics::Metrics;
use crate::proxy::{Route, Settings, Shared};
use crate::registry::Registry;
use crate::ticks::first_delay;

/// A change for a listener's owner.
#[derive(Debug)]
enum Update {
    /// A reload: the listener's new settings and backend list, and how
    /// names are resolved.
    Reconfigure {
        config: Arc<ListenerConfig>,
        discovery: Discovery,
        done: oneshot::Sender<()>,
    },
    /// A probe's verdict changed. `probe` tells a current probe from one
    /// replaced meanwhile.
    Health { probe: u64, flip: Flip },
    /// A discovered name's set of addresses changed; `watch` tells a
    /// current watch from one replaced meanwhile.
    Discovered { watch: u64, found: Vec<Found> },
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
    /// route cell it publishes to, already holding the first route. Its
    /// discovered names are looked up first (each within the lookup
    /// timeout), so the first route has their backends; a name that does
    /// not resolve yet is not an error and fills in later.
    pub async fn start(
        config: Arc<ListenerConfig>,
        discovery: Discovery,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> (BackendSet, Arc<ArcSwap<Route>>) {
        let primed = prime(&config, &discovery, &metrics).await;
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = Arc::new(Settings::of(&config));
        let shared = Arc::new(Shared::new(metrics.listener(&config.name)));
        let mut owner = Owner {
            config: config.clone(),
            settings: settings.clone(),
            shared: shared.clone(),
            members: Vec::new(),
            watches: Vec::new(),
            discovery: discovery.clone(),
            registry,
            metrics,
            reports: tx.downgrade(),
            next_id: 0,
            route: Arc::new(ArcSwap::from_pointee(Route::new(
                settings,
                shared,
                Vec::new(),
            ))),
        };
        owner.apply_config(config, discovery, primed);
        owner.route.store(Arc::new(owner.route_over_members()));
        let route = owner.route.clone();
        tokio::spawn(owner.run(rx));
        (BackendSet { updates: tx }, route)
    }

    /// Apply a reload's config; returns once the new route is published.
    /// Discovered names are looked up again at once; their answers follow.
    pub async fn reconfigure(&self, config: Arc<ListenerConfig>, discovery: Discovery) {
        let (done, wait) = oneshot::channel();
        self.send(Update::Reconfigure {
            config,
            discovery,
            done,
        });
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
    /// In config order, a discovered entry's members in address order.
    members: Vec<Member>,
    /// One per `discover = "dns"` entry, in config order.
    watches: Vec<Watch>,
    discovery: Discovery,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Where probes and watches report; weak, so the owner ends when its
    /// last handle is dropped.
    reports: mpsc::WeakUnboundedSender<Update>,
    /// Tells current probes and watches from replaced ones.
    next_id: u64,
    route: Arc<ArcSwap<Route>>,
}

/// A discovered entry, its watch and the addresses it believes in.
struct Watch {
    entry: DnsBackend,
    id: u64,
    found: Vec<Found>,
    handle: WatchHandle,
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
            let mut discovered = false;
            for update in batch.drain(..) {
                match update {
                    Update::Reconfigure {
                        config,
                        discovery,
                        done,
                    } => {
                        self.apply_config(config, discovery, HashMap::new());
                        rebuild = Rebuild::Members;
                        reconfigured.push(done);
                    }
                    Update::Health { probe, flip } => {
                        if self.apply_flip(probe, flip) {
                            rebuild = rebuild.max(Rebuild::Eligibility);
                        }
                    }
                    Update::Discovered { watch, found } => {
                        if let Some(w) = self.watches.iter_mut().find(|w| w.id == watch) {
                            w.found = found;
                            discovered = true;
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
                            if state == AdminState::Maint && self.ends_sessions() {
                                b.state.cut_connections();
                            }
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
            if discovered {
                // Once per batch, however many names answered.
                self.sync_members();
                rebuild = Rebuild::Members;
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

    /// Take a config (at start, or a reload's): its settings, its
    /// discovered names (kept ones keep their watch and last answer and are
    /// looked up again at once; `primed` holds the first answers of a
    /// starting listener), then its members.
    fn apply_config(
        &mut self,
        config: Arc<ListenerConfig>,
        discovery: Discovery,
        primed: HashMap<Arc<str>, Primed>,
    ) {
        let settings = Settings::of(&config);
        if *self.settings != settings {
            self.settings = Arc::new(settings);
        }
        let certificates: Vec<_> = config
            .tls
            .iter()
            .flat_map(|t| t.certificates.iter())
            .map(|c| (c.names.clone(), c.not_after))
            .collect();
        self.metrics.certificates(&config.name, &certificates);
        self.config = config;
        self.discovery = discovery;
        self.sync_watches(primed);
        self.sync_members();
    }

    /// One watch per discovered entry of the config: kept where the entry
    /// asks the same question, else started.
    fn sync_watches(&mut self, mut primed: HashMap<Arc<str>, Primed>) {
        let config = self.config.clone();
        let entries: Vec<&DnsBackend> = config.backends.iter().filter_map(dns_entry).collect();
        let interval = self.discovery.settings.interval;
        let mut old: Vec<Option<Watch>> = self.watches.drain(..).map(Some).collect();
        let mut watches = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let spread = first_delay(i, entries.len(), interval);
            let params = Params::new(&entry.query, &self.discovery);
            let same = old
                .iter_mut()
                .find(|w| w.as_ref().is_some_and(|w| w.entry.name == entry.name))
                .and_then(Option::take);
            let watch = match same {
                Some(mut w) if w.entry.query == entry.query => {
                    w.handle.refresh(params, spread);
                    w.entry = (*entry).clone();
                    w
                }
                // A new name for the entry: a new watch, from nothing (its
                // lookup counters carry over: same labels).
                _ => self.start_watch(entry, params, primed.remove(&entry.name), spread),
            };
            watches.push(watch);
        }
        self.watches = watches;
    }

    /// A watch of `entry`: from its first answer when `primed` (then the
    /// next lookup is an interval on), else looking up after `spread`.
    fn start_watch(
        &mut self,
        entry: &DnsBackend,
        params: Params,
        primed: Option<Primed>,
        spread: std::time::Duration,
    ) -> Watch {
        self.next_id += 1;
        let id = self.next_id;
        let reports = self.reports.clone();
        let report = move |found| {
            if let Some(tx) = reports.upgrade() {
                let _ = tx.send(Update::Discovered { watch: id, found });
            }
        };
        let (found, handle) = match primed {
            Some(p) => (
                p.known().to_vec(),
                p.start(params.interval + spread, report),
            ),
            None => {
                let target = watch_target(&self.config, entry);
                let metrics = self.metrics.dns_lookups(&self.config.name, &entry.name);
                let handle = discovery::spawn(target, params, metrics, spread, report);
                (Vec::new(), handle)
            }
        };
        Watch {
            entry: entry.clone(),
            id,
            found,
            handle,
        }
    }

    /// Make the members what the config and the watches' answers say:
    /// kept backends keep their live state and probe (which gets the
    /// current check settings), a backend whose address changed is another
    /// server now and is judged afresh, new ones join and are probed at
    /// once, removed ones go.
    fn sync_members(&mut self) {
        let config = self.config.clone();
        let wanted = self.wanted();
        let mut old: Vec<Option<Member>> = self.members.drain(..).map(Some).collect();
        let count = wanted.len();
        let mut members = Vec::with_capacity(count);
        for (i, b) in wanted.iter().enumerate() {
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
                        _ => self.member_for(i, count, backend, None),
                    }
                }
                Some(m) => {
                    // Same name, new address: fresh health, same counters.
                    if self.ends_sessions() {
                        m.backend.state.cut_connections();
                    }
                    m.backend.state.set_up(true);
                    let backend = Backend::new(b, m.backend.state.clone());
                    self.member_for(i, count, Arc::new(backend), None)
                }
                None => {
                    let (state, carried) = self.registry.state_carried(&config.name, &b.name);
                    self.member_for(i, count, Arc::new(Backend::new(b, state)), carried)
                }
            };
            members.push(member);
        }
        for gone in old.into_iter().flatten() {
            if self.ends_sessions() {
                gone.backend.state.cut_connections();
            }
            self.registry.retire(&config.name, &gone.backend.name);
        }
        self.members = members;
    }

    /// The backends the config and the discovered answers ask for, in
    /// config order.
    fn wanted(&self) -> Vec<BackendConfig> {
        let mut wanted = Vec::new();
        for entry in &self.config.backends {
            match entry {
                BackendEntry::Fixed(b) => wanted.push(b.clone()),
                BackendEntry::Dns(d) => {
                    let Some(w) = self.watches.iter().find(|w| w.entry.name == d.name) else {
                        continue;
                    };
                    wanted.extend(w.found.iter().map(|f| discovery::member(d, f)));
                }
            }
        }
        wanted
    }

    /// A member for `backend` with a probe of its own, fresh (its first
    /// check comes soon) or from a `carried` verdict; none with
    /// `kind = "none"`, where it is always up.
    fn member_for(
        &mut self,
        index: usize,
        count: usize,
        backend: Arc<Backend>,
        carried: Option<bool>,
    ) -> Member {
        self.next_id += 1;
        let id = self.next_id;
        let config = &self.config;
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
                carried,
            },
            settings.clone(),
            first_delay(index, count, settings.interval),
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
                if self.settings.on_marked_down == OnMarkedDown::Shutdown || self.ends_sessions() {
                    state.cut_connections();
                }
            }
            Flip::Up => state.set_up(true),
        }
        true
    }

    /// Whether the listener's sessions end with their backend's turn:
    /// a udp session has no connection to keep, so a backend that is down,
    /// in maint or removed ends its sessions, and the clients' next
    /// datagrams open sessions elsewhere.
    fn ends_sessions(&self) -> bool {
        self.settings.mode == Mode::Udp
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
        self.watches.clear();
        for m in self.members.drain(..) {
            self.registry.retire(&self.config.name, &m.backend.name);
        }
    }
}

/// The first answers of a starting listener's discovered names, looked up
/// side by side.
async fn prime(
    config: &ListenerConfig,
    discovery: &Discovery,
    metrics: &Arc<Metrics>,
) -> HashMap<Arc<str>, Primed> {
    let mut lookups = tokio::task::JoinSet::new();
    for entry in config.backends.iter().filter_map(dns_entry) {
        let target = watch_target(config, entry);
        let params = Params::new(&entry.query, discovery);
        let lookups_metrics = metrics.dns_lookups(&config.name, &entry.name);
        let name = entry.name.clone();
        lookups.spawn(async move { (name, Primed::new(target, params, lookups_metrics).await) });
    }
    let mut primed = HashMap::new();
    while let Some(joined) = lookups.join_next().await {
        if let Ok((name, p)) = joined {
            primed.insert(name, p);
        }
    }
    primed
}

fn dns_entry(entry: &BackendEntry) -> Option<&DnsBackend> {
    match entry {
        BackendEntry::Dns(d) => Some(d),
        BackendEntry::Fixed(_) => None,
    }
}

fn watch_target(config: &ListenerConfig, entry: &DnsBackend) -> discovery::Target {
    discovery::Target {
        listener: config.name.clone(),
        entry: entry.name.clone(),
        query: entry.query.to_string(),
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
