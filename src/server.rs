//! The running proxy: listeners, their backend sets, and the live backend
//! state.
//!
//! [`Server`] holds per listener its [`Frontend`] (the socket and the task
//! that serves it) and its `BackendSet` (the one owner of its backends,
//! which publishes the route connections read), plus the `Registry` of
//! backend live state. [`Server::reload`] applies a new config as a diff:
//! bind what is new first (so a failure changes nothing), then hand each
//! listener's owner its new config, so open connections never notice.
//! Embedders and tests start it from a validated [`Config`]; the daemon
//! ([`crate::daemon`]) adds signals and file watching on top.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use tracing::{info, warn};

use crate::backend::BackendState;
use crate::backend_set::BackendSet;
use crate::config::{BackendEntry, Config, ListenerConfig};
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::proxy::{Bound, ConnContext, Frontend, Route};
use crate::registry::Registry;
use crate::reload::{self, Change};

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

/// A view of one running listener, for the admin endpoint.
#[derive(Debug, Clone)]
pub struct ListenerView {
    pub name: Arc<str>,
    /// The configured address (`local_addr` is what it resolved to).
    pub bind: SocketAddr,
    pub local_addr: SocketAddr,
    /// The listener's current route: settings, backends and their live
    /// state.
    pub route: Arc<ArcSwap<Route>>,
    /// Where admin state changes go.
    pub backends: BackendSet,
}

/// The running listeners in config order, republished after every reload.
pub type Directory = ArcSwap<Vec<ListenerView>>;

/// A running switchyard instance.
#[derive(Debug)]
pub struct Server {
    config: Config,
    directory: Arc<Directory>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    /// How discovered names are resolved; rebuilt when `[global]`'s DNS
    /// settings change.
    discovery: Discovery,
    listeners: HashMap<Arc<str>, Listener>,
    ctx: ConnContext,
}

/// One running listener.
#[derive(Debug)]
struct Listener {
    local_addr: SocketAddr,
    route: Arc<ArcSwap<Route>>,
    backends: BackendSet,
    frontend: Frontend,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

/// Whether a listener has names to keep resolved.
fn discovers(l: &ListenerConfig) -> bool {
    l.backends.iter().any(|b| matches!(b, BackendEntry::Dns(_)))
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
        let ctx = ConnContext::default();
        Server {
            config: Config {
                source: Default::default(),
                shutdown_timeout: Duration::ZERO,
                dns: Default::default(),
                admin: None,
                listeners: Vec::new(),
            },
            directory: Arc::default(),
            registry: Arc::new(Registry::new(metrics.clone(), ctx.handover.clone())),
            discovery: Discovery::default(),
            metrics,
            listeners: HashMap::new(),
            ctx,
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
    /// connections are never closed.
    pub async fn reload(&mut self, new: Config) -> Result<ReloadSummary, StartError> {
        self.reload_inherited(new, HashMap::new()).await
    }

    /// [`reload`](Self::reload), serving a listener from the socket
    /// `inherited` has under its name (a live upgrade's, bound by the old
    /// process) where it fits: same mode, and the configured address, or
    /// any port of the configured IP for port 0.
    pub async fn reload_inherited(
        &mut self,
        new: Config,
        mut inherited: HashMap<Arc<str>, Bound>,
    ) -> Result<ReloadSummary, StartError> {
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
                let fitting = inherited.remove(&l.name).filter(|b| {
                    b.fits(l.mode)
                        && b.local_addr()
                            .is_ok_and(|a| crate::sockets::serves(a, l.bind))
                });
                let socket = match fitting {
                    Some(socket) => socket,
                    None => Bound::bind(&l).map_err(|source| StartError::Bind {
                        listener: l.name.clone(),
                        addr: l.bind,
                        source,
                    })?,
                };
                sockets.insert(l.name.clone(), socket);
            }
        }

        // 2. Removed listeners stop accepting; their connections run on.
        for change in &changes {
            if let Change::ListenerRemoved(name) = change
                && let Some(mut l) = self.listeners.remove(name)
            {
                l.frontend.stop().await;
                l.backends.stop().await;
                self.metrics.certificates(name, &[]);
                info!(listener = %name, "listener removed");
            }
        }

        // 3. Added and changed listeners: their owner takes the new config
        //    (and a new socket where the bind changed). Every reload looks
        //    discovered names up again, so listeners with any are told too.
        if self.discovery.settings != new.dns {
            self.discovery = Discovery::new(new.dns.clone());
        }
        let touched: Vec<Arc<str>> = {
            let mut v: Vec<Arc<str>> = changes
                .iter()
                .filter(|c| !matches!(c, Change::ListenerRemoved(_)))
                .map(|c| c.listener().clone())
                .chain(
                    new.listeners
                        .iter()
                        .filter(|l| discovers(l))
                        .map(|l| l.name.clone()),
                )
                .collect();
            let mut seen = hashbrown::HashSet::new();
            v.retain(|name| seen.insert(name.clone()));
            v
        };
        // New listeners' owners start side by side: each first looks its
        // discovered names up, within the lookup timeout.
        let mut starting = tokio::task::JoinSet::new();
        for name in &touched {
            if !self.listeners.contains_key(name) {
                let config = find(name).expect("touched listeners are in the new config");
                let (registry, metrics) = (self.registry.clone(), self.metrics.clone());
                let discovery = self.discovery.clone();
                starting.spawn(async move {
                    let started = BackendSet::start(config.clone(), discovery, registry, metrics);
                    (config, started.await)
                });
            }
        }
        let mut started = hashbrown::HashSet::new();
        while let Some(joined) = starting.join_next().await {
            let (config, (backends, route)) = joined.expect("a backend set's start does not panic");
            let name = config.name.clone();
            started.insert(name.clone());
            let socket = sockets.remove(&name).expect("added listeners were bound");
            let frontend = socket.serve(route.clone(), &self.ctx);
            let local_addr = frontend.local_addr.unwrap_or(config.bind);
            info!(listener = %name, addr = %local_addr, algorithm = config.algorithm.as_str(), backends = config.backends.len(), "listening");
            self.listeners.insert(
                name,
                Listener {
                    local_addr,
                    route,
                    backends,
                    frontend,
                },
            );
        }
        for name in touched.into_iter().filter(|n| !started.contains(n)) {
            let config = find(&name).expect("touched listeners are in the new config");
            let Some(socket) = sockets.remove(&name) else {
                if let Some(l) = self.listeners.get(&name) {
                    l.backends
                        .reconfigure(config.clone(), self.discovery.clone())
                        .await;
                }
                continue;
            };
            let l = self
                .listeners
                .get_mut(&name)
                .expect("a moved listener is running");
            l.backends
                .reconfigure(config.clone(), self.discovery.clone())
                .await;
            // The new socket accepts before the old one closes: no moment
            // where both refuse.
            let mut old =
                std::mem::replace(&mut l.frontend, socket.serve(l.route.clone(), &self.ctx));
            old.stop().await;
            l.local_addr = l.frontend.local_addr.unwrap_or(config.bind);
            info!(listener = %name, addr = %l.local_addr, "listening (moved)");
        }
        self.directory.store(Arc::new(
            new.listeners
                .iter()
                .filter_map(|c| {
                    let l = self.listeners.get(&c.name)?;
                    Some(ListenerView {
                        name: c.name.clone(),
                        bind: c.bind,
                        local_addr: l.local_addr,
                        route: l.route.clone(),
                        backends: l.backends.clone(),
                    })
                })
                .collect(),
        ));
        self.config = new;
        Ok(ReloadSummary { changes })
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
        Some(self.backend(listener, backend)?.state.clone())
    }

    /// Why a backend's last health check failed; `None` after a success,
    /// before any, or for an unknown backend.
    pub fn check_reason(&self, listener: &str, backend: &str) -> Option<String> {
        self.backend(listener, backend)?.health.reason()
    }

    /// The role a backend's last successful check read (database kinds).
    pub fn role(&self, listener: &str, backend: &str) -> Option<crate::config::Role> {
        self.backend(listener, backend)?.health.role()
    }

    fn backend(&self, listener: &str, backend: &str) -> Option<Arc<crate::backend::Backend>> {
        let route = self.listeners.get(listener)?.route.load();
        let found = route.pool.backends.iter().find(|b| &*b.name == backend);
        found.cloned()
    }

    /// (successful, failed) health checks of a backend being probed now.
    pub fn checks(&self, listener: &str, backend: &str) -> Option<(u64, u64)> {
        self.metrics.check_counts(listener, backend)
    }

    /// Set a backend's admin state (as the admin API does); `None` if there
    /// is no such backend, else its previous state.
    pub async fn set_admin_state(
        &self,
        listener: &str,
        backend: &str,
        state: crate::backend::AdminState,
    ) -> Option<crate::backend::AdminState> {
        let l = self.listeners.get(listener)?;
        l.backends.set_admin_state(backend, state).await
    }

    /// Names of the backends a listener's current pool may offer to new
    /// connections (up, weight above zero, backups only as stand-ins).
    pub fn in_rotation(&self, listener: &str) -> Option<Vec<Arc<str>>> {
        let route = self.listeners.get(listener)?.route.load();
        Some(route.pool.in_rotation().map(|b| b.name.clone()).collect())
    }

    /// Connections of a listener waiting for a backend below its cap.
    pub fn queued(&self, listener: &str) -> Option<usize> {
        let route = self.listeners.get(listener)?.route.load();
        Some(route.shared.queue.waiting())
    }

    /// Every listener's socket, for a live upgrade to hand over (the new
    /// process tells a udp one by its type).
    pub fn sockets(&self) -> Vec<(Arc<str>, std::os::fd::BorrowedFd<'_>)> {
        self.config
            .listeners
            .iter()
            .filter_map(|c| {
                let l = self.listeners.get(&c.name)?;
                Some((c.name.clone(), l.frontend.socket()?))
            })
            .collect()
    }

    /// Stop accepting on every listener, keeping the sockets open (the
    /// kernel queues new clients in their backlog until another process
    /// accepts them). Health checks go on: connections still being placed
    /// here use them.
    pub async fn stop_accepting(&mut self) {
        for l in self.listeners.values_mut() {
            l.frontend.stop().await;
        }
    }

    /// Every (listener, backend) name pair of the current pools.
    pub fn backend_names(&self) -> Vec<(Arc<str>, Arc<str>)> {
        let mut v = Vec::new();
        for (name, l) in &self.listeners {
            for b in &l.route.load().pool.backends {
                v.push((name.clone(), b.name.clone()));
            }
        }
        v
    }

    /// The live state of every backend, by (listener, name).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// What every connection task shares (the handover switch, the
    /// tracker).
    pub fn context(&self) -> &ConnContext {
        &self.ctx
    }

    /// Go on serving a tcp-mode connection a live upgrade handed over, on
    /// its listener and backend here (an http listener's WebSocket tunnels
    /// are such connections too); false (and it is closed) if there is no
    /// such listener or backend now (the config changed on disk).
    pub fn adopt(&self, frozen: crate::handover::FrozenTcp) -> bool {
        let Some(l) = self.listeners.get(&frozen.listener) else {
            return false;
        };
        let route = l.route.load_full();
        let backend = route
            .pool
            .backends
            .iter()
            .find(|b| b.name == frozen.backend);
        // tcp mode, or an http listener's upgraded (WebSocket) tunnel.
        let Some(backend) = backend.filter(|_| route.settings.mode != crate::config::Mode::Udp)
        else {
            return false;
        };
        let open = route.shared.open.enter();
        let span = tracing::debug_span!("conn", listener = %route.settings.name, adopted = true);
        match crate::proxy::tcp::adopt(frozen, &route, backend, open) {
            Ok(conn) => {
                use tracing::Instrument;
                self.ctx.tracker.spawn(conn.instrument(span));
                true
            }
            Err(e) => {
                warn!(listener = %route.settings.name, error = %e, "a handed-over connection could not be adopted");
                false
            }
        }
    }

    /// Go on serving an HTTP-mode client connection a live upgrade handed
    /// over between two requests; false (and it is closed) if there is no
    /// such http listener now.
    pub fn adopt_http(&self, frozen: crate::handover::FrozenHttp) -> bool {
        let Some(l) = self.listeners.get(&frozen.listener) else {
            return false;
        };
        let current = l.route.load_full();
        if current.settings.mode != crate::config::Mode::Http {
            return false;
        }
        let stream = match crate::sockets::inherited_stream(frozen.client) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "a handed-over http connection could not be adopted");
                return false;
            }
        };
        let client = crate::proxy::prefixed::Prefixed::new(stream, frozen.pending.into());
        let open = current.shared.open.enter();
        let started = tokio::time::Instant::now()
            .checked_sub(frozen.age)
            .unwrap_or_else(tokio::time::Instant::now);
        let span = tracing::debug_span!("conn", listener = %current.settings.name, peer = %frozen.peer, adopted = true);
        let conn = crate::proxy::http::serve(
            crate::proxy::http::plain(client),
            frozen.peer,
            l.route.clone(),
            self.ctx.clone(),
            open,
            started,
        );
        use tracing::Instrument;
        self.ctx.tracker.spawn(conn.instrument(span));
        true
    }

    /// Stop accepting at once, let open connections finish for up to `grace`,
    /// then cut the rest. Returns how many were cut.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        for l in self.listeners.values() {
            l.frontend.trip();
        }
        for (name, mut l) in self.listeners.drain() {
            l.frontend.stop().await;
            l.backends.stop().await;
            info!(listener = %name, "stopped accepting");
        }
        self.directory.store(Arc::default());
        self.ctx.draining.trip();
        let ctx = self.ctx.clone();
        let open = ctx.open();
        if open > 0 {
            info!(open, grace = ?grace, "waiting for open connections");
        }
        if tokio::time::timeout(grace, ctx.closed()).await.is_ok() {
            return 0;
        }
        let cut = ctx.open();
        warn!(cut, "shutdown timeout reached; closing open connections");
        ctx.abort.trip();
        ctx.closed().await;
        cut
    }
}
