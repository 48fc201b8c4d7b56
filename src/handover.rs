//! Handing established connections and udp sessions over to another
//! process (live upgrade): the plain data a frozen one is, and the one
//! switch that freezes them.
//!
//! Every backend's cut wire is a child of [`Handover::sessions`], so tripping
//! it ([`Handover::freeze`]) wakes every established tcp-mode session and
//! udp session at once, whatever it waits for; HTTP-mode connections wait
//! on it too and stop between two requests. A session that wakes while a handover [`is_active`](Handover::is_active)
//! does not close: it gives its sockets (duplicated) and the bytes it holds
//! to [`Handover::give`] and ends without a FIN, and the upgrade's owner
//! (`upgrade`) sends them on. The wire is also tripped by the server's
//! stop wire (its parent): then sessions are cut as before.
//!
//! A leaf: plain data and a channel, so backend state can carry it.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::sync::Tripwire;

/// One direction of a frozen connection.
#[derive(Debug, Default)]
pub struct Pending {
    /// Read from the source, not yet written to the destination, in order.
    pub bytes: Vec<u8>,
    /// The source sent FIN and it was passed on: this direction is over.
    pub done: bool,
}

/// An established tcp-mode connection, taken out of its task.
#[derive(Debug)]
pub struct FrozenTcp {
    pub listener: Arc<str>,
    pub backend: Arc<str>,
    pub client: OwnedFd,
    pub upstream: OwnedFd,
    pub c2b: Pending,
    pub b2c: Pending,
    /// How long it has been open (its duration histogram goes on from here).
    pub age: Duration,
    /// Its backend socket's keepalive is still to be set.
    pub keepalive_pending: bool,
}

/// A udp-mode session, taken out of its task: the client it serves and
/// its socket connected to the backend (replies already queued there stay
/// in it). The listener socket travels with the listeners.
#[derive(Debug)]
pub struct FrozenUdp {
    pub listener: Arc<str>,
    pub backend: Arc<str>,
    pub client: std::net::SocketAddr,
    pub toward: OwnedFd,
    /// Replies still to relay before it ends (`udp_replies`), if counted.
    pub replies_left: Option<u32>,
}

/// Where a udp listener taken over from another process gets that
/// process's sessions, before it reads its first datagram.
pub type UdpAdoption = tokio::sync::oneshot::Receiver<Vec<FrozenUdp>>;

/// An HTTP-mode client connection, taken between two requests: its socket
/// and what was read past the last request answered.
#[derive(Debug)]
pub struct FrozenHttp {
    pub listener: Arc<str>,
    pub client: OwnedFd,
    pub peer: std::net::SocketAddr,
    pub pending: Vec<u8>,
    pub age: Duration,
}

/// A frozen session of any kind.
#[derive(Debug)]
pub enum Frozen {
    Tcp(FrozenTcp),
    Udp(FrozenUdp),
    Http(FrozenHttp),
}

/// The switch that freezes sessions, and where they go.
#[derive(Debug, Default)]
pub struct Handover {
    sessions: Tripwire,
    taker: Mutex<Option<mpsc::UnboundedSender<Frozen>>>,
}

impl Handover {
    /// A switch whose sessions are also cut when `stop` trips.
    pub fn under(stop: &Tripwire) -> Arc<Handover> {
        Arc::new(Handover {
            sessions: stop.child(),
            taker: Mutex::default(),
        })
    }

    /// The wire every backend's cut wire is a child of.
    pub fn sessions(&self) -> &Tripwire {
        &self.sessions
    }

    /// Get ready to take sessions: from now on a session that wakes
    /// because its listener stopped waits to be frozen instead of winding
    /// down. Each frozen session arrives on the receiver.
    pub fn open(&self) -> mpsc::UnboundedReceiver<Frozen> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.taker() = Some(tx);
        rx
    }

    /// Freeze every established session, now and from now on (after
    /// [`open`](Self::open)).
    pub fn freeze(&self) {
        self.sessions.trip();
    }

    /// Whether a session woken by the sessions wire is to freeze (rather
    /// than be cut by shutdown).
    pub fn is_active(&self) -> bool {
        self.taker().is_some()
    }

    /// Hand one frozen session to the upgrade; false (and its sockets
    /// closed) if nobody takes sessions any more.
    pub fn give(&self, frozen: Frozen) -> bool {
        match &*self.taker() {
            Some(tx) => tx.send(frozen).is_ok(),
            None => false,
        }
    }

    fn taker(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Frozen>>> {
        self.taker.lock().unwrap_or_else(|e| e.into_inner())
    }
}
