//! The running proxy: listeners, their routes, and the live backend state.
//!
//! [`Server`] owns the control-plane side of everything the data path reads:
//! one accept task and one `ArcSwap<Route>` per listener, and the
//! [`Registry`] of backend live state. Embedders and tests start it from a
//! validated [`Config`]; the daemon ([`crate::daemon`]) adds signals on top.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{Backend, BackendState, Registry};
use crate::config::{Config, ListenerConfig};
use crate::health::{self, ProbeContext};
use crate::proxy::Route;
use crate::proxy::tcp::{self, ConnContext};
use crate::sockets;

/// Why the server could not start.
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

/// A running switchyard instance.
#[derive(Debug)]
pub struct Server {
    config: Config,
    registry: Registry,
    listeners: HashMap<Arc<str>, Listener>,
    ctx: ConnContext,
}

#[derive(Debug)]
struct Listener {
    local_addr: SocketAddr,
    route: Arc<ArcSwap<Route>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    /// The refresher and the health probes of the listener's backends.
    control: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.control {
            t.abort();
        }
    }
}

impl Server {
    /// Bind every listener, then start serving. If any bind fails, nothing is
    /// left running.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        let mut bound = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let socket = sockets::bind_listener(l.bind).map_err(|source| StartError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            })?;
            bound.push((l.clone(), socket));
        }
        let mut server = Server {
            config,
            registry: Registry::default(),
            listeners: HashMap::new(),
            ctx: ConnContext {
                tracker: TaskTracker::new(),
                abort: CancellationToken::new(),
            },
        };
        for (config, socket) in bound {
            let local_addr = socket.local_addr().unwrap_or(config.bind);
            let route = Arc::new(ArcSwap::from_pointee(server.build_route(config.clone())));
            let refresh = Arc::new(Notify::new());
            let mut control = vec![tokio::spawn(refresher(route.clone(), refresh.clone()))];
            control.extend(spawn_probes(&route.load(), &refresh));
            let stop = CancellationToken::new();
            let task = tokio::spawn(tcp::accept_loop(
                socket,
                route.clone(),
                stop.clone(),
                server.ctx.clone(),
            ));
            info!(listener = %config.name, addr = %local_addr, algorithm = config.algorithm.as_str(), backends = config.backends.len(), "listening");
            server.listeners.insert(
                config.name.clone(),
                Listener {
                    local_addr,
                    route,
                    stop,
                    task,
                    control,
                },
            );
        }
        Ok(server)
    }

    /// A route for `config`, with backend state from the registry (kept
    /// backends keep their counters).
    fn build_route(&mut self, config: Arc<ListenerConfig>) -> Route {
        let backends = config
            .backends
            .iter()
            .map(|b| {
                let state = self.registry.state(&config.name, &b.name);
                Arc::new(Backend::new(b, state))
            })
            .collect();
        Route::new(config, backends)
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

    /// Open client connections.
    pub fn active_connections(&self) -> usize {
        self.ctx.tracker.len()
    }

    /// Stop accepting at once, let open connections finish for up to `grace`,
    /// then cut the rest. Returns how many were cut.
    pub async fn shutdown(mut self, grace: Duration) -> usize {
        for l in self.listeners.values() {
            l.stop.cancel();
        }
        for (name, mut l) in self.listeners.drain() {
            // The accept task owns the socket: once it has returned, the port
            // refuses new connections.
            let _ = (&mut l.task).await;
            info!(listener = %name, "stopped accepting");
        }
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
        self.ctx.abort.cancel();
        tracker.wait().await;
        cut
    }
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
/// during a rebuild coalesce into one more rebuild; a route replaced
/// meanwhile (reload) is rebuilt again rather than overwritten.
async fn refresher(route: Arc<ArcSwap<Route>>, refresh: Arc<Notify>) {
    loop {
        refresh.notified().await;
        loop {
            let current = route.load_full();
            let from = current.clone();
            // Large source-hash pools take milliseconds to rebuild: keep
            // that off the threads that serve connections.
            let Ok(next) = tokio::task::spawn_blocking(move || from.rebuilt()).await else {
                return;
            };
            let previous = route.compare_and_swap(&current, Arc::new(next));
            if Arc::ptr_eq(&*previous, &current) {
                break;
            }
        }
    }
}
