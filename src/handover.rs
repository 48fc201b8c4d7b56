//! Handing established connections over to another process (live upgrade):
//! the plain data a frozen connection is, and the one switch that freezes
//! them.
//!
//! Every backend's cut wire is a child of [`Handover::sessions`], so tripping
//! it wakes every established tcp-mode session at once, whatever it waits
//! for. A session that wakes while a handover [`is_active`](Handover::is_active)
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

/// The switch that freezes sessions, and where they go.
#[derive(Debug, Default)]
pub struct Handover {
    sessions: Tripwire,
    taker: Mutex<Option<mpsc::UnboundedSender<FrozenTcp>>>,
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

    /// Freeze every established session, now and from now on: each one
    /// arrives on the receiver.
    pub fn begin(&self) -> mpsc::UnboundedReceiver<FrozenTcp> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.taker() = Some(tx);
        self.sessions.trip();
        rx
    }

    /// Whether a session woken by the sessions wire is to freeze (rather
    /// than be cut by shutdown).
    pub fn is_active(&self) -> bool {
        self.taker().is_some()
    }

    /// Hand one frozen session to the upgrade; false (and its sockets
    /// closed) if nobody takes sessions any more.
    pub fn give(&self, frozen: FrozenTcp) -> bool {
        match &*self.taker() {
            Some(tx) => tx.send(frozen).is_ok(),
            None => false,
        }
    }

    fn taker(&self) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<FrozenTcp>>> {
        self.taker.lock().unwrap_or_else(|e| e.into_inner())
    }
}
