//! The data path: accept → pick a backend → connect (with retry) → relay.
//!
//! A listener publishes its current [`Route`] — settings, the pool, lbCookie
//! ids — with `ArcSwap`. A connection reads it while it is being placed
//! (allow-list, scheduling, queue, connect) and then lets it go: for the
//! rest of its life it holds only its backend's live state (through its
//! `queue::Slot`), its stop signals and the few settings it reads, so a
//! database session that lasts for days pins nothing of the pools that
//! reloads, health flips and discovery build meanwhile.

pub(crate) mod accept;
pub(crate) mod connect;
pub(crate) mod http;
pub mod lbcookie;
pub(crate) mod prefixed;
pub mod proxy_protocol;
pub(crate) mod queue;
pub(crate) mod relay;
pub(crate) mod splice;
pub(crate) mod stream;
pub(crate) mod tcp;
pub(crate) mod tls;
pub(crate) mod udp;

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use hyper::header::HeaderValue;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::balancer::Pool;
use crate::config::{ListenerConfig, Mode};
use crate::handover::{Handover, UdpAdoption};
use crate::metrics::ListenerMetrics;
use crate::sync::Tripwire;

/// A listener's settings as its connections read them: its config without
/// the backend list, so holding them pins no backend (`backends` is
/// empty; the pool is in the [`Route`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings(ListenerConfig);

impl Settings {
    pub fn of(config: &ListenerConfig) -> Settings {
        Settings(ListenerConfig {
            backends: Vec::new(),
            ..config.clone()
        })
    }
}

impl std::ops::Deref for Settings {
    type Target = ListenerConfig;

    fn deref(&self) -> &ListenerConfig {
        &self.0
    }
}

/// What a listener's connections share whatever its config and pool: one
/// value for the listener's life, kept across reloads.
#[derive(Debug)]
pub struct Shared {
    /// The waiting room for capped backends.
    pub queue: Arc<queue::Queue>,
    /// Open client connections, held against `max_connections`.
    pub open: Arc<queue::OpenCount>,
    /// One set of metric handles, so a route of an older config cannot
    /// drop series the new one uses.
    pub metrics: ListenerMetrics,
    /// HTTP mode: idle keep-alive connections to backends.
    pub idle: http::pool::IdlePool,
    /// TLS: failed handshakes, summed up in the log.
    pub tls_failures: crate::tls::FailureLog,
}

impl Shared {
    pub fn new(metrics: ListenerMetrics) -> Shared {
        Shared {
            queue: Arc::default(),
            open: Arc::default(),
            metrics,
            idle: Default::default(),
            tls_failures: Default::default(),
        }
    }
}

/// Everything a listener needs to place one new connection: its settings
/// and the current pool. Published with `ArcSwap` by the listener's
/// backend-set owner; read, never kept, by connections.
#[derive(Debug)]
pub struct Route {
    pub settings: Arc<Settings>,
    pub shared: Arc<Shared>,
    pub pool: Pool,
    /// HTTP mode with lbCookie: cookie value → index in `pool.backends`,
    /// and each backend's `Set-Cookie`; empty for other listeners. Shared
    /// by routes over the same backends.
    pub cookies: Arc<Cookies>,
}

/// A listener's lbCookie values, computed once per set of backends.
#[derive(Debug, Default)]
pub struct Cookies {
    ids: hashbrown::HashMap<String, usize>,
    set_cookie: hashbrown::HashMap<Arc<str>, HeaderValue>,
}

impl Route {
    /// A route over `backends` (in config order).
    pub fn new(settings: Arc<Settings>, shared: Arc<Shared>, backends: Vec<Arc<Backend>>) -> Route {
        let mut cookies = Cookies::default();
        if let Some(sticky) = &settings.sticky {
            for (i, b) in backends.iter().enumerate() {
                let id = lbcookie::cookie_id(&settings.name, &b.name);
                if let Some(v) = lbcookie::set_cookie(sticky, &id) {
                    cookies.set_cookie.insert(b.name.clone(), v);
                }
                cookies.ids.insert(id, i);
            }
        }
        Route {
            pool: Pool::new(settings.algorithm, backends),
            settings,
            shared,
            cookies: Arc::new(cookies),
        }
    }

    /// The same settings and backends, re-scheduled for their current
    /// health and admin state.
    pub fn rebuilt(&self) -> Route {
        Route {
            pool: Pool::new(self.settings.algorithm, self.pool.backends.clone()),
            settings: self.settings.clone(),
            shared: self.shared.clone(),
            cookies: self.cookies.clone(),
        }
    }

    /// The backend an lbCookie value names.
    pub fn cookie_backend(&self, id: &str) -> Option<&Arc<Backend>> {
        self.cookies.ids.get(id).map(|&i| &self.pool.backends[i])
    }

    /// The `Set-Cookie` value that sends later requests to `backend`.
    pub fn set_cookie(&self, backend: &Backend) -> Option<&HeaderValue> {
        self.cookies.set_cookie.get(&*backend.name)
    }
}

/// What every connection task of the server shares.
#[derive(Clone, Debug)]
pub struct ConnContext {
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Tracks the connections that stay in this process through a live
    /// upgrade: TLS ones, whose session keys cannot be handed over. The
    /// upgrade hands everything over without waiting for them; they end
    /// here (within `shutdown_timeout`).
    pub kept: TaskTracker,
    /// Tripped when shutdown begins: keep-alive HTTP connections finish
    /// their request in progress and close.
    pub draining: Tripwire,
    /// Tripped when open connections must be cut (end of shutdown grace).
    pub abort: Tripwire,
    /// Freezes established tcp-mode sessions for a live upgrade (and cuts
    /// them when `abort` trips: its sessions wire is `abort`'s child).
    pub handover: Arc<Handover>,
}

impl Default for ConnContext {
    fn default() -> Self {
        let abort = Tripwire::new();
        ConnContext {
            tracker: TaskTracker::new(),
            kept: TaskTracker::new(),
            draining: Tripwire::new(),
            handover: Handover::under(&abort),
            abort,
        }
    }
}

impl ConnContext {
    /// Connection tasks open now, of both kinds.
    pub fn open(&self) -> usize {
        self.tracker.len() + self.kept.len()
    }

    /// Take no more connection tasks; resolves once every one has ended.
    pub async fn closed(&self) {
        self.tracker.close();
        self.kept.close();
        self.tracker.wait().await;
        self.kept.wait().await;
    }
}

/// A listener's socket, bound and not yet serving: one variant per kind of
/// socket. tcp and http listeners share the TCP accept loop.
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    /// With the sessions of the process a live upgrade took it over from,
    /// adopted before the first datagram is read.
    Udp(UdpSocket, Option<UdpAdoption>),
}

impl Bound {
    /// Bind the socket a listener's config asks for.
    pub fn bind(config: &ListenerConfig) -> std::io::Result<Bound> {
        match config.mode {
            Mode::Udp => {
                crate::sockets::bind_udp(config.bind, config.freebind).map(|s| Bound::Udp(s, None))
            }
            Mode::Tcp | Mode::Http => {
                let l = crate::sockets::bind_listener(config.bind, config.freebind)?;
                // Before the first connection can complete its handshake:
                // accepted sockets inherit these (see `accept_loop`).
                crate::sockets::tune_inherited(&l, config.keepalive);
                Ok(Bound::Tcp(l))
            }
        }
    }

    /// A socket handed over by the process this one took over from (live
    /// upgrade), for a listener of `mode`; its options are as that
    /// process set them. A udp listener waits for that process's sessions
    /// on `sessions` before it serves.
    pub fn inherited(
        mode: Mode,
        fd: OwnedFd,
        sessions: Option<UdpAdoption>,
    ) -> std::io::Result<Bound> {
        Ok(match mode {
            Mode::Udp => Bound::Udp(crate::sockets::inherited_udp(fd)?, sessions),
            Mode::Tcp | Mode::Http => Bound::Tcp(crate::sockets::inherited_listener(fd)?),
        })
    }

    /// Whether this socket serves a listener of `mode`.
    pub fn fits(&self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (Bound::Udp(..), Mode::Udp) | (Bound::Tcp(_), Mode::Tcp | Mode::Http)
        )
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Bound::Tcp(l) => l.local_addr(),
            Bound::Udp(s, _) => s.local_addr(),
        }
    }

    /// Start serving with the listener's route.
    pub fn serve(self, route: Arc<arc_swap::ArcSwap<Route>>, ctx: &ConnContext) -> Frontend {
        let stop = Tripwire::new();
        let local_addr = self.local_addr().ok();
        // A second descriptor of the socket, for a live upgrade to hand over.
        let socket = match &self {
            Bound::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Bound::Udp(s, _) => s.as_fd().try_clone_to_owned(),
        };
        let task = match self {
            Bound::Tcp(l) => tokio::spawn(accept::accept_loop(l, route, stop.clone(), ctx.clone())),
            Bound::Udp(s, adopt) => {
                tokio::spawn(udp::serve(s, route, stop.clone(), ctx.clone(), adopt))
            }
        };
        Frontend {
            local_addr,
            socket: socket.ok(),
            stop,
            task,
        }
    }
}

/// A listener's socket and the task that serves it.
#[derive(Debug)]
pub struct Frontend {
    pub local_addr: Option<SocketAddr>,
    /// The listening socket (a duplicate of the serving task's), kept for
    /// a live upgrade.
    socket: Option<OwnedFd>,
    stop: Tripwire,
    task: JoinHandle<()>,
}

impl Frontend {
    /// Stop accepting now, without waiting.
    pub fn trip(&self) {
        self.stop.trip();
    }

    /// The listening socket, for a live upgrade to hand over.
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        self.socket.as_ref().map(|fd| fd.as_fd())
    }

    /// Stop accepting and wait until the socket is closed.
    pub async fn stop(&mut self) {
        self.stop.trip();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.stop.trip();
    }
}
