//! UDP listeners (`mode = "udp"`): sessions keyed by client address.
//!
//! A session is one client address (ip:port). Its first datagram picks a
//! backend with the listener's scheduler; the session then owns a UDP
//! socket *connected* to that backend, so the kernel hands it exactly that
//! backend's replies and reports an ICMP port unreachable as
//! `ECONNREFUSED`. Replies go back to the client from the listener's own
//! socket, so the client sees them come from the address it asked.
//!
//! Who touches what, and why there is no lock on the hot path:
//! - One *receive task* per listener owns the listener socket's receive
//!   side and the session table, a plain `HashMap` that nothing else
//!   touches. Per client datagram it does an allow-list check, one table
//!   lookup, one relaxed atomic store (the session's last-activity time),
//!   one `send` on the session's connected socket and a few atomic counter
//!   adds. Datagrams are read with `recvmmsg`, up to 16 per system call
//!   ([`batch`]), into buffers allocated once: nothing is allocated per
//!   datagram once a session exists.
//! - One *session task* per session owns the connected socket's receive
//!   side. It waits for replies, sends each to the client on the listener
//!   socket (a buffer borrowed from the per-thread pool only while a reply
//!   is in hand, so an idle session holds none), and ends the session on
//!   idle (`idle_timeout` since the last datagram either way), after
//!   `udp_replies` replies, on an ICMP error, when its backend is cut (the
//!   backend-set owner cuts a udp listener's backends when they go down,
//!   into `maint`, or out of the config) and at shutdown. It tells the
//!   receive task through a channel, which drops the table entry; the
//!   entry's `ended` flag closes the gap until then, so no datagram goes to
//!   a session that has ended.
//! - `sendmmsg` would not pay: datagrams toward backends go out on a
//!   different socket per session, and replies leave from their session
//!   tasks as they arrive, so there is never a batch for one socket to
//!   send at once.
//!
//! A client whose session ended on an ICMP error gets its next session
//! scheduled without that backend (while another is usable); the datagram
//! that met the error is lost, as it would be without a balancer.

pub(crate) mod batch;

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use hashbrown::hash_map::Entry as Slot;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use self::batch::Batch;
use super::accept::allowed;
use super::queue::{Open, Slot as BackendSlot};
use super::relay::PooledBuf;
use super::{ConnContext, Route};
use crate::backend::{Backend, BackendState};
use crate::handover::{Frozen, FrozenUdp, UdpAdoption};
use crate::metrics::Reject;
use crate::sockets::{self, ACCEPT_ERROR_BACKOFF};
use crate::sync::Tripwire;

/// After the listener stops (a reload removed it, or shutdown began), a
/// session lives on only until it has been quiet this long, so replies
/// already on their way still reach their clients.
const LINGER: Duration = Duration::from_secs(1);

/// Clients remembered as having met a dead backend, at most; beyond it the
/// oldest memories go (each is only a preference for one next session).
const AVOID_KEEP: usize = 4096;

/// Serve a bound udp listener until `stop` trips; first adopt the
/// sessions `adopt` brings (a live upgrade's, from the process that served
/// this socket before).
pub async fn serve(
    socket: UdpSocket,
    route: Arc<ArcSwap<Route>>,
    stop: Tripwire,
    ctx: ConnContext,
    adopt: Option<UdpAdoption>,
) {
    let socket = Arc::new(socket);
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel();
    let mut table = Table {
        sessions: HashMap::new(),
        avoid: HashMap::new(),
        next_id: 0,
        clock: Clock::new(),
        env: Env {
            listener: socket.clone(),
            ended: ended_tx,
            stop: stop.clone(),
            ctx,
        },
    };
    let mut batch = Batch::default();
    let stopped = stop.tripped();
    tokio::pin!(stopped);
    if let Some(adopt) = adopt {
        let sessions = tokio::select! {
            biased;
            () = &mut stopped => return,
            s = adopt => s.unwrap_or_default(),
        };
        let route = route.load();
        for frozen in sessions {
            table.adopt(&route, frozen);
        }
    }
    loop {
        tokio::select! {
            biased;
            () = &mut stopped => return,
            Some(ended) = ended_rx.recv() => {
                table.ended(ended);
                while let Ok(ended) = ended_rx.try_recv() {
                    table.ended(ended);
                }
                continue;
            }
            ready = socket.readable() => {
                if let Err(e) = ready {
                    warn!(error = %e, "udp listener socket failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            }
        }
        let n = match batch.recv(&socket) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let route = route.load();
        let now = table.clock.now();
        for i in 0..n {
            match batch.get(i) {
                (client, Some(data)) => table.forward(&route, client, data, now),
                (client, None) => debug!(%client, "oversized datagram dropped"),
            }
        }
    }
}

/// Milliseconds since the listener started: what sessions record as their
/// last activity, in one atomic word.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn new() -> Clock {
        Clock(Instant::now())
    }

    fn now(&self) -> u64 {
        self.0.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// The receive task's sessions.
struct Table {
    sessions: HashMap<SocketAddr, Session>,
    /// Clients whose last session met an ICMP error, and that backend.
    avoid: HashMap<SocketAddr, (Arc<BackendState>, Instant)>,
    next_id: u64,
    clock: Clock,
    env: Env,
}

/// What every session task of a listener gets.
#[derive(Clone)]
struct Env {
    listener: Arc<UdpSocket>,
    ended: mpsc::UnboundedSender<Ended>,
    /// The listener stops: sessions linger, then end.
    stop: Tripwire,
    ctx: ConnContext,
}

/// The receive task's view of one session.
struct Session {
    id: u64,
    /// Connected to the backend; the session task reads from it.
    toward: Arc<UdpSocket>,
    backend: Arc<BackendState>,
    live: Arc<Live>,
}

/// What the receive task and a session task share.
#[derive(Debug, Default)]
struct Live {
    ended: AtomicBool,
    /// Last datagram either way, in [`Clock`] milliseconds.
    last: AtomicU64,
    /// Tripped by the receive task when a send met an ICMP error (it
    /// counts the error and remembers the backend itself).
    end: Tripwire,
}

/// A session task's last word.
struct Ended {
    client: SocketAddr,
    id: u64,
    /// The backend answered with an ICMP error.
    refused: Option<Arc<BackendState>>,
}

impl Table {
    /// One datagram from `client`: to its session's backend, opening the
    /// session first if there is none.
    fn forward(&mut self, route: &Route, client: SocketAddr, data: &[u8], now: u64) {
        let settings = &route.settings;
        if let Some(allow) = &settings.allow
            && !allowed(allow, client.ip())
        {
            route.shared.metrics.reject(Reject::Acl);
            return;
        }
        let Table {
            sessions,
            avoid,
            next_id,
            clock,
            env,
        } = self;
        let session = match sessions.entry(client) {
            Slot::Occupied(mut o) => {
                if o.get().live.ended.load(Relaxed) {
                    match open(route, client, avoid, next_id, *clock, env) {
                        Some(s) => {
                            o.insert(s);
                        }
                        None => {
                            o.remove();
                            return;
                        }
                    }
                }
                o.into_mut()
            }
            Slot::Vacant(v) => match open(route, client, avoid, next_id, *clock, env) {
                Some(s) => v.insert(s),
                None => return,
            },
        };
        session.live.last.store(now, Relaxed);
        // Straight to the kernel: tokio's `try_send` would refuse until the
        // reactor has seen the new socket writable, dropping a session's
        // first datagram. A full socket buffer drops it just the same.
        match SockRef::from(&*session.toward).send(data) {
            Ok(_) => {
                let m = &session.backend.metrics;
                m.bytes_client_to_backend.inc_by(data.len() as u64);
                m.udp().client_to_backend.inc();
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // An ICMP error from an earlier datagram surfaced here.
                session.backend.record_connect_error();
                session.live.ended.store(true, Relaxed);
                session.live.end.trip();
                let backend = session.backend.clone();
                self.sessions.remove(&client);
                self.remember_refused(client, backend);
            }
            Err(e) => debug!(%client, error = %e, "datagram to backend dropped"),
        }
    }

    /// Go on with a session a live upgrade handed over: same client, same
    /// backend, its socket connected there (replies already queued in it
    /// included); idle from now. Closed if its backend is not in this
    /// listener's pool.
    fn adopt(&mut self, route: &Route, frozen: FrozenUdp) {
        let Some(backend) = route
            .pool
            .backends
            .iter()
            .find(|b| b.name == frozen.backend)
        else {
            warn!(backend = %frozen.backend, client = %frozen.client, "a handed-over udp session has no backend here; closed");
            return;
        };
        let toward = match sockets::inherited_udp(frozen.toward) {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "a handed-over udp session could not be adopted");
                return;
            }
        };
        let slot = route.shared.queue.adopt_slot(backend);
        let session = start(
            route,
            frozen.client,
            backend,
            toward,
            slot,
            frozen.replies_left,
            &mut self.next_id,
            self.clock,
            &self.env,
        );
        self.sessions.insert(frozen.client, session);
    }

    /// A session task ended: forget it (unless a newer session took its
    /// place) and remember a refusing backend for the client's next one.
    fn ended(&mut self, ended: Ended) {
        if self
            .sessions
            .get(&ended.client)
            .is_some_and(|s| s.id == ended.id)
        {
            self.sessions.remove(&ended.client);
        }
        if let Some(backend) = ended.refused {
            self.remember_refused(ended.client, backend);
        }
    }

    fn remember_refused(&mut self, client: SocketAddr, backend: Arc<BackendState>) {
        if self.avoid.len() >= AVOID_KEEP {
            let oldest = self.avoid.values().map(|(_, at)| *at).min();
            if let Some(oldest) = oldest {
                self.avoid.retain(|_, (_, at)| *at > oldest);
            }
        }
        self.avoid.insert(client, (backend, Instant::now()));
    }
}

/// Open a session for `client`: a backend by the scheduler (one that sent
/// this client an ICMP error last time only if no other is usable), its
/// connected socket and its task. `None` if the datagram is to be dropped
/// (listener at its cap, no usable backend), counted as a rejection.
fn open(
    route: &Route,
    client: SocketAddr,
    avoid: &mut HashMap<SocketAddr, (Arc<BackendState>, Instant)>,
    next_id: &mut u64,
    clock: Clock,
    env: &Env,
) -> Option<Session> {
    let settings = &route.settings;
    let shared = &route.shared;
    if let Some(max) = settings.max_connections
        && shared.open.open() >= max as usize
    {
        shared.metrics.reject(Reject::MaxConnections);
        debug!(listener = %settings.name, %client, "max_connections reached; datagram dropped");
        return None;
    }
    let avoided = avoid.remove(&client).map(|(b, _)| b);
    let is_avoided = |b: &Backend| avoided.as_ref().is_some_and(|a| Arc::ptr_eq(a, &b.state));
    let mut fallback = None;
    let mut reached = None;
    for backend in route.pool.candidates(client.ip()) {
        if is_avoided(backend) {
            fallback = Some(backend);
            continue;
        }
        if let Some(r) = connect(backend) {
            reached = Some(r);
            break;
        }
    }
    let (backend, toward) = match reached.or_else(|| fallback.and_then(connect)) {
        Some(r) => r,
        None => {
            shared.metrics.reject(Reject::NoBackend);
            debug!(listener = %settings.name, %client, "no backend; datagram dropped");
            return None;
        }
    };
    let slot = shared
        .queue
        .try_slot(backend)
        .expect("udp backends have no cap");
    backend.state.record_established();
    Some(start(
        route,
        client,
        backend,
        toward,
        slot,
        settings.udp_replies,
        next_id,
        clock,
        env,
    ))
}

/// A session's task, started, and the receive task's view of it.
#[allow(clippy::too_many_arguments)]
fn start(
    route: &Route,
    client: SocketAddr,
    backend: &Backend,
    toward: UdpSocket,
    slot: BackendSlot,
    replies: Option<u32>,
    next_id: &mut u64,
    clock: Clock,
    env: &Env,
) -> Session {
    *next_id += 1;
    let live = Arc::new(Live {
        last: AtomicU64::new(clock.now()),
        ..Live::default()
    });
    let toward = Arc::new(toward);
    let task = SessionTask {
        id: *next_id,
        client,
        toward: toward.clone(),
        backend: backend.state.clone(),
        live: live.clone(),
        cut: backend.state.cut_signal(),
        idle: route.settings.idle_timeout,
        replies,
        clock,
        env: env.clone(),
        _slot: slot,
        _open: route.shared.open.enter(),
    };
    env.ctx.tracker.spawn(task.run());
    Session {
        id: *next_id,
        toward,
        backend: backend.state.clone(),
        live,
    }
}

/// A socket connected to `backend`, or `None` (counted) if the kernel
/// refuses at once (no route, no socket left).
fn connect(backend: &Arc<Backend>) -> Option<(&Arc<Backend>, UdpSocket)> {
    match sockets::udp_connected(backend.addr) {
        Ok(socket) => Some((backend, socket)),
        Err(e) => {
            backend.state.record_connect_error();
            debug!(backend = %backend.name, error = %e, "udp connect failed");
            None
        }
    }
}

/// One session's task and what it holds for its life.
struct SessionTask {
    id: u64,
    client: SocketAddr,
    toward: Arc<UdpSocket>,
    backend: Arc<BackendState>,
    live: Arc<Live>,
    /// Tripped when the backend goes down, into maint, or away.
    cut: Tripwire,
    idle: Duration,
    /// Replies left before the session ends, if counted.
    replies: Option<u32>,
    clock: Clock,
    env: Env,
    /// Counted on its backend (open sessions, leastconn's measure).
    _slot: BackendSlot,
    /// Counted against the listener's `max_connections`.
    _open: Open,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Idle,
    Replied,
    /// The backend answered with an ICMP error.
    Refused,
    /// The receive task met the backend's ICMP error (and counted it).
    Told,
    Cut,
    /// A live upgrade took it to the new process.
    HandedOver,
    Failed,
}

impl SessionTask {
    async fn run(mut self) {
        let end = self.relay().await;
        self.live.ended.store(true, Relaxed);
        if end == End::Refused {
            self.backend.record_connect_error();
        }
        debug!(client = %self.client, ?end, "udp session ended");
        let _ = self.env.ended.send(Ended {
            client: self.client,
            id: self.id,
            refused: (end == End::Refused).then(|| self.backend.clone()),
        });
    }

    async fn relay(&mut self) -> End {
        let env = self.env.clone();
        let mut lingering = false;
        loop {
            let last = self.clock.at(self.live.last.load(Relaxed));
            tokio::select! {
                biased;
                () = env.ctx.abort.tripped() => return End::Cut,
                () = self.cut.tripped() => {
                    let handover = self.backend.handover();
                    if self.cut.parent_tripped() && handover.is_active() {
                        return self.hand_over();
                    }
                    return End::Cut;
                }
                () = self.live.end.tripped() => return End::Told,
                // A live upgrade stops the listener too: then the session
                // waits to be handed over, its idle timeout unchanged.
                () = env.stop.tripped(), if !lingering => {
                    lingering = true;
                    if !self.backend.handover().is_active() {
                        self.idle = self.idle.min(LINGER);
                    }
                }
                () = env.ctx.draining.tripped(), if !lingering => {
                    lingering = true;
                    if !self.backend.handover().is_active() {
                        self.idle = self.idle.min(LINGER);
                    }
                }
                () = tokio::time::sleep_until(last + self.idle) => {
                    // Activity since the timer was set moves the deadline.
                    let latest = self.clock.at(self.live.last.load(Relaxed));
                    if Instant::now() >= latest + self.idle {
                        return End::Idle;
                    }
                }
                // An ICMP error with no datagram raises only EPOLLERR,
                // which readable() alone would never see.
                ready = self.toward.ready(Interest::READABLE | Interest::ERROR) => {
                    let Ok(ready) = ready else {
                        return End::Failed;
                    };
                    if ready.is_error()
                        && let Some(end) = self.pending_error()
                    {
                        return end;
                    }
                    if let Some(end) = self.replies().await {
                        return end;
                    }
                }
            }
        }
    }

    /// Give the session to a live upgrade: its client, its connected socket
    /// (duplicated: this task's copy closes when it ends), what is left of
    /// its reply count.
    fn hand_over(&self) -> End {
        let frozen = (|| {
            let (listener, backend) = self.backend.metrics.key().cloned()?;
            let toward = self.toward.as_fd().try_clone_to_owned().ok()?;
            Some(FrozenUdp {
                listener,
                backend,
                client: self.client,
                toward,
                replies_left: self.replies,
            })
        })();
        match frozen.map(|f| self.backend.handover().give(Frozen::Udp(f))) {
            Some(true) => End::HandedOver,
            _ => End::Cut,
        }
    }

    /// The socket's pending error, taken (an ICMP error raises only error
    /// readiness, and no datagram): the end it means, if any. No error
    /// clears the readiness. One `try_io` per interest: tokio runs the
    /// closure for a single interest only.
    fn pending_error(&self) -> Option<End> {
        let taken = self.toward.try_io(Interest::ERROR, || {
            self.toward
                .take_error()?
                .ok_or_else(|| io::ErrorKind::WouldBlock.into())
        });
        match taken {
            Ok(e) if e.kind() == io::ErrorKind::ConnectionRefused => Some(End::Refused),
            Ok(e) => {
                debug!(client = %self.client, error = %e, "udp backend socket failed");
                Some(End::Failed)
            }
            Err(_) => None,
        }
    }

    /// Send every reply queued on the backend socket to the client; an end
    /// if one came with them.
    async fn replies(&mut self) -> Option<End> {
        let mut buf = PooledBuf::take();
        loop {
            let n = match self.toward.try_recv(&mut buf.0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return Some(End::Refused);
                }
                Err(e) => {
                    debug!(client = %self.client, error = %e, "udp backend socket failed");
                    return Some(End::Failed);
                }
            };
            self.live.last.store(self.clock.now(), Relaxed);
            match self.env.listener.send_to(&buf.0[..n], self.client).await {
                Ok(_) => {
                    let m = &self.backend.metrics;
                    m.bytes_backend_to_client.inc_by(n as u64);
                    m.udp().backend_to_client.inc();
                }
                Err(e) => debug!(client = %self.client, error = %e, "reply to client dropped"),
            }
            if let Some(left) = &mut self.replies {
                *left -= 1;
                if *left == 0 {
                    return Some(End::Replied);
                }
            }
        }
    }
}
