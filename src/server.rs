//! The running proxy: listeners, their routes, and the live backend state.
//!
//! [`Server`] owns the control-plane side of everything the data path reads:
//! per listener one accept task, one `ArcSwap<Route>`, a refresher that
//! rebuilds the pool when health changes, and the health probes; plus the
//! [`Registry`] of backend live state. [`Server::reload`] applies a new
//! config as a diff: bind what is new first (so a failure changes nothing),
//! then swap routes, so open connections never notice. Embedders and tests
//! start it from a validated [`Config`]; the daemon ([`crate::daemon`]) adds
//! signals and file watching on top.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{Backend, BackendState, Registry};
use crate::config::{Config, ListenerConfig};
use crate::health::{self, ProbeContext};
use crate::metrics::{ListenerMetrics, Metrics};
use crate::proxy::Route;
use crate::proxy::queue::{OpenCount, Queue};
use crate::proxy::tcp::{self, ConnContext};
use crate::proxy::tripwire::Tripwire;
use crate::reload::{self, Change};
use crate::sockets;

/// Why the server could not start or apply a config.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener `{listener}`: cannot bind {addr}: {source}")]
    Bind {
        listener: Arc<str>,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A read-only view of one running listener, for the admin endpoint.
#[derive(Debug, Clone)]
pub struct ListenerView {
    pub name: Arc<str>,
    pub local_addr: SocketAddr,
    /// The listener's current route: config, backends and their live state.
    pub route: Arc<ArcSwap<Route>>,
}

/// The running listeners in config order, republished after every reload.
pub type Directory = ArcSwap<Vec<ListenerView>>;

/// A running switchyard instance.
#[derive(Debug)]
pub struct Server {
    config: Config,
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    registry: Registry,
    listeners: HashMap<Arc<str>, Listener>,
    ctx: ConnContext,
}

#[derive(Debug)]
struct Listener {
    local_addr: SocketAddr,
    route: Arc<ArcSwap<Route>>,
    /// Wakes the refresher to rebuild the pool (a backend flipped).
    refresh: Arc<Notify>,
    shared: ListenerShared,
    accept: Acceptor,
    refresher: JoinHandle<()>,
    probes: Vec<JoinHandle<()>>,
}

/// What a listener keeps across reloads, whatever its routes.
#[derive(Debug, Clone)]
struct ListenerShared {
    queue: Arc<Queue>,
    open: Arc<OpenCount>,
    metrics: ListenerMetrics,
}

/// A running accept loop and the means to stop it.
#[derive(Debug)]
struct Acceptor {
    stop: Tripwire,
    task: JoinHandle<()>,
}

impl Acceptor {
    /// Stop accepting and wait until the listening socket is closed.
    async fn stop(&mut self) {
        self.stop.trip();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.accept.stop.trip();
        self.refresher.abort();
        for p in &self.probes {
            p.abort();
        }
    }
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

/// What a successful reload did.
#[derive(Debug, Default)]
pub struct ReloadSummary {
    pub changes: Vec<Change>,
}

impl Server {
    /// A server with no listeners yet; [`reload`](Self::reload) gives it
    /// its config.
    pub fn new() -> Server {
        let metrics = Metrics::new();
        Server {
            config: Config {
                source: Default::default(),
                shutdown_timeout: Duration::ZERO,
                admin: None,
                listeners: Vec::new(),
            },
            directory: Arc::default(),
            registry: Registry::new(metrics.clone()),
            metrics,
            listeners: HashMap::new(),
            ctx: ConnContext {
                tracker: TaskTracker::new(),
                draining: Tripwire::new(),
                abort: Tripwire::new(),
            },
        }
    }

    /// Bind every listener, then start serving. If any bind fails, nothing is
    /// left running.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let mut server = Server::new();
        server.reload(config).await?;
        server.metrics.record_reload(true);
        Ok(server)
    }

    /// Apply a new validated config. Sockets for new or moved listeners are
    /// bound first: if one fails, the running config stays as it was. Open
    /// connections are never closed: they keep the route they started with.
    pub async fn reload(&mut self, new: Config) -> Result<ReloadSummary, StartError> {
        let changes = reload::diff(&self.config, &new);
        let find = |name: &str| new.listeners.iter().find(|l| &*l.name == name).cloned();

        // 1. Bind everything new before touching anything that runs.
        let mut sockets = HashMap::new();
        for change in &changes {
            let needs_socket = matches!(
                change,
                Change::ListenerAdded(_) | Change::ListenerChanged { rebind: true, .. }
            );
            if needs_socket {
                let l = find(change.listener()).expect("diff names new listeners");
                let socket = sockets::bind_listener(l.bind, l.freebind).map_err(|source| {
                    StartError::Bind {
                        listener: l.name.clone(),
                        addr: l.bind,
                        source,
                    }
                })?;
                sockets.insert(l.name.clone(), socket);
            }
        }

        // 2. Backends whose address changed are new servers: fresh health.
        for change in &changes {
            if let Change::BackendChanged {
                listener,
                backend,
                address_changed: true,
            } = change
            {
                self.registry.reset_health(listener, backend);
            }
        }

        // 3. Removed listeners stop accepting; their connections run on.
        for change in &changes {
            if let Change::ListenerRemoved(name) = change
                && let Some(mut l) = self.listeners.remove(name)
            {
                l.accept.stop().await;
                info!(listener = %name, "listener removed");
            }
        }
        self.registry.retain(|l, b| {
            new.listeners
                .iter()
                .any(|nl| &*nl.name == l && nl.backends.iter().any(|nb| &*nb.name == b))
        });

        // 4. Added and changed listeners get their new route (and socket).
        let touched: Vec<Arc<str>> = {
            let mut v: Vec<Arc<str>> = changes
                .iter()
                .filter(|c| !matches!(c, Change::ListenerRemoved(_)))
                .map(|c| c.listener().clone())
                .collect();
            v.dedup();
            v
        };
        for name in touched {
            let config = find(&name).expect("touched listeners are in the new config");
            // Per-listener state that outlives its routes: the queue, the
            // open-connection count, and the metric handles (one set, so a
            // route of an older config cannot drop series the new one uses).
            let shared = match self.listeners.get(&name) {
                Some(l) => l.shared.clone(),
                None => ListenerShared {
                    queue: Arc::default(),
                    open: Arc::default(),
                    metrics: self.metrics.listener(&name),
                },
            };
            let route = Arc::new(self.build_route(config.clone(), &shared));
            let socket = sockets.remove(&name);
            match self.listeners.get_mut(&name) {
                Some(l) => {
                    l.route.store(route);
                    // A raised max_connections must resume a paused accept
                    // loop now, not when a connection next closes.
                    l.shared.open.wake();
                    for p in l.probes.drain(..) {
                        p.abort();
                    }
                    l.probes = spawn_probes(&l.route.load(), &l.refresh);
                    if let Some(socket) = socket {
                        // The new socket accepts before the old one closes:
                        // no moment where both refuse.
                        let addr = socket.local_addr().unwrap_or(config.bind);
                        let mut old = std::mem::replace(
                            &mut l.accept,
                            spawn_acceptor(socket, &l.route, &self.ctx),
                        );
                        old.stop().await;
                        l.local_addr = addr;
                        info!(listener = %name, addr = %addr, "listening (moved)");
                    }
                }
                None => {
                    let socket = socket.expect("added listeners were bound");
                    let local = socket.local_addr().unwrap_or(config.bind);
                    let route = Arc::new(ArcSwap::new(route));
                    let refresh = Arc::new(Notify::new());
                    let listener = Listener {
                        local_addr: local,
                        refresher: tokio::spawn(refresher(route.clone(), refresh.clone())),
                        probes: spawn_probes(&route.load(), &refresh),
                        accept: spawn_acceptor(socket, &route, &self.ctx),
                        route,
                        refresh,
                        shared,
                    };
                    info!(listener = %name, addr = %local, algorithm = config.algorithm.as_str(), backends = config.backends.len(), "listening");
                    self.listeners.insert(name.clone(), listener);
                }
            }
        }
        self.directory.store(Arc::new(
            new.listeners
                .iter()
                .filter_map(|c| {
                    let l = self.listeners.get(&c.name)?;
                    Some(ListenerView {
                        name: c.name.clone(),
                        local_addr: l.local_addr,
                        route: l.route.clone(),
                    })
                })
                .collect(),
        ));
        self.config = new;
        Ok(ReloadSummary { changes })
    }

    /// A route for `config`, with backend state from the registry (kept
    /// backends keep their counters and health).
    fn build_route(&mut self, config: Arc<ListenerConfig>, shared: &ListenerShared) -> Route {
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let state = self.registry.state(&config.name, &b.name);
                Arc::new(Backend::new(b, state))
            })
            .collect();
        Route::new(
            config,
            backends,
            shared.metrics.clone(),
            shared.queue.clone(),
            shared.open.clone(),
        )
    }

    /// The running listeners, kept current across reloads.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.clone()
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The configuration being served.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The address a listener actually bound (resolves port 0).
    pub fn local_addr(&self, listener: &str) -> Option<SocketAddr> {
        self.listeners.get(listener).map(|l| l.local_addr)
    }

    /// Live state of one backend.
    pub fn backend_state(&self, listener: &str, backend: &str) -> Option<Arc<BackendState>> {
        let route = self.listeners.get(listener)?.route.load();
        route
            .pool
            .backends
            .iter()
            .find(|b| &*b.name == backend)
            .map(|b| b.state.clone())
    }

    /// Names of the backends a listener's current pool may offer to new
    /// connections (up, weight above zero, backups only as stand-ins).
    pub fn in_rotation(&self, listener: &str) -> Option<Vec<Arc<str>>> {
        let route = self.listeners.get(listener)?.route.load();
        Some(route.pool.in_rotation().map(|b| b.name.clone()).collect())
    }

    /// Connections of a listener waiting for a backend below its cap.
    pub fn queued(&self, listener: &str) -> Option<usize> {
        Some(self.listeners.get(listener)?.shared.queue.waiting())
    }

    /// Stop accepting at once, let open connections finish for up to `grace`,
    /// then cut the rest. Returns how many were cut.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        for l in self.listeners.values() {
            l.accept.stop.trip();
        }
        for (name, mut l) in self.listeners.drain() {
            l.accept.stop().await;
            info!(listener = %name, "stopped accepting");
        }
        self.directory.store(Arc::default());
        self.ctx.draining.trip();
        let tracker = self.ctx.tracker.clone();
        tracker.close();
        let open = tracker.len();
        if open > 0 {
            info!(open, grace = ?grace, "waiting for open connections");
        }
        if tokio::time::timeout(grace, tracker.wait()).await.is_ok() {
            return 0;
        }
        let cut = tracker.len();
        warn!(cut, "shutdown timeout reached; closing open connections");
        self.ctx.abort.trip();
        tracker.wait().await;
        cut
    }
}

fn spawn_acceptor(socket: TcpListener, route: &Arc<ArcSwap<Route>>, ctx: &ConnContext) -> Acceptor {
    let stop = Tripwire::new();
    let task = tokio::spawn(tcp::accept_loop(
        socket,
        route.clone(),
        stop.clone(),
        ctx.clone(),
    ));
    Acceptor { stop, task }
}

/// One probe task per backend of the route, their first probes spread.
fn spawn_probes(route: &Route, refresh: &Arc<Notify>) -> Vec<JoinHandle<()>> {
    let config = &route.config;
    let count = route.pool.backends.len();
    route
        .pool
        .backends
        .iter()
        .enumerate()
        .map(|(i, backend)| {
            let ctx = ProbeContext {
                listener: config.name.clone(),
                settings: config.health_check,
                on_marked_down: config.on_marked_down,
                first_delay: health::first_delay(i, count, config.health_check.interval),
            };
            let refresh = refresh.clone();
            tokio::spawn(health::run(backend.clone(), ctx, move || {
                refresh.notify_one()
            }))
        })
        .collect()
}

/// Rebuild the listener's pool whenever health changes. Flips that arrive
/// during a rebuild coalesce into one more rebuild.
async fn refresher(route: Arc<ArcSwap<Route>>, refresh: Arc<Notify>) {
    loop {
        refresh.notified().await;
        rebuild(&route).await;
    }
}

/// Re-schedule a listener's pool for its backends' current health and admin
/// state, and publish it. A route replaced meanwhile (reload) is rebuilt
/// again rather than overwritten.
pub async fn rebuild(route: &ArcSwap<Route>) {
    loop {
        let current = route.load_full();
        let from = current.clone();
        // Large source-hash pools take milliseconds to rebuild: keep that off
        // the threads that serve connections.
        let Ok(next) = tokio::task::spawn_blocking(move || from.rebuilt()).await else {
            return;
        };
        let previous = route.compare_and_swap(&current, Arc::new(next));
        if Arc::ptr_eq(&*previous, &current) {
            return;
        }
    }
}
