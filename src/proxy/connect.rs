//! Reaching a backend for one client connection (HTTP mode: one request):
//! the connect-with-retry loop that tcp and http modes share.
//!
//! One selection per connection is walked across retries and queue waits:
//! a pinned backend (an lbCookie's) alone first, then the scheduler's order
//! without it. Each candidate must have a free slot below its cap (else the
//! connection waits in the listener's queue up to `queue_timeout`); a failed
//! attempt is counted on that backend and the next candidate is tried, at
//! most `1 + retries` attempts in all.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::debug;

use super::Route;
use super::queue::{Busy, Picker, Slot};
use crate::backend::Backend;
use crate::balancer::Candidates;
use crate::metrics::Reject;
use crate::sync::Tripwire;

/// A backend that took the connection, and what the connection holds of it
/// for its life.
#[derive(Debug)]
pub struct Reached<S> {
    pub backend: Arc<Backend>,
    /// Active count and cap; held until the connection (request) ends.
    pub slot: Slot,
    /// Tripped when the connection must be cut: its backend is marked
    /// down with `on_marked_down = "shutdown"`, or the server's shutdown
    /// grace is over (a child of the server's stop wire). Taken before
    /// connecting: a mark-down during a slow connect still cuts this
    /// connection.
    pub cut: Tripwire,
    /// What the successful attempt produced (a stream, a response).
    pub conn: S,
}

/// Why no backend took the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unserved {
    /// No candidate at all.
    NoBackend,
    /// Every candidate stayed at its cap for `queue_timeout`.
    Capped,
    /// Candidates were tried and none answered.
    Unanswered,
}

impl Unserved {
    /// How a closed client connection is counted.
    pub fn reject(self) -> Reject {
        match self {
            Unserved::Capped => Reject::MaxConnections,
            Unserved::NoBackend | Unserved::Unanswered => Reject::NoBackend,
        }
    }
}

/// Reach a backend for a client at `client`: `attempt` is called with each
/// candidate that has a free slot and with `payload` (a request that must
/// come back untouched when the attempt fails, or `()`); it answers with
/// what it made, or the payload and the error.
pub async fn reach<P, S, F, Fut>(
    route: &Route,
    client: IpAddr,
    pinned: Option<&Arc<Backend>>,
    mut payload: P,
    mut attempt: F,
) -> Result<Reached<S>, Unserved>
where
    F: FnMut(Arc<Backend>, P) -> Fut,
    Fut: Future<Output = Result<S, (P, io::Error)>>,
{
    let settings = &route.settings;
    let queue = &route.shared.queue;
    let deadline = Instant::now() + settings.queue_timeout;
    let mut attempts = 1 + settings.retries as usize;
    let mut failed = false;
    let mut picker = Picker::new(Order {
        pinned,
        pinned_first: pinned.is_some(),
        pinned_offered: false,
        scheduled: route.pool.candidates(client),
    });
    loop {
        let pick = || picker.pick(queue);
        let (backend, slot) = match queue.acquire(deadline, pick).await {
            Ok(taken) => taken,
            Err(Busy::Capped) => return Err(Unserved::Capped),
            // The pinned backend cannot be had: the scheduler takes over.
            Err(Busy::NoCandidate) if picker.candidates_mut().next_stage() => continue,
            Err(Busy::NoCandidate) if failed => return Err(Unserved::Unanswered),
            Err(Busy::NoCandidate) => return Err(Unserved::NoBackend),
        };
        let cut = backend.state.cut_signal();
        match attempt(backend.clone(), payload).await {
            Ok(conn) => {
                return Ok(Reached {
                    backend,
                    slot,
                    cut,
                    conn,
                });
            }
            Err((back, e)) => {
                backend.state.record_connect_error();
                debug!(backend = %backend.name, error = %e, "backend connect failed");
                payload = back;
                failed = true;
                attempts -= 1;
                if attempts == 0 {
                    return Err(Unserved::Unanswered);
                }
            }
        }
    }
}

/// One connection's candidates: the pinned backend alone, then (after
/// [`next_stage`](Self::next_stage)) the scheduler's order without it.
struct Order<'a> {
    pinned: Option<&'a Arc<Backend>>,
    /// Still offering the pinned backend only.
    pinned_first: bool,
    pinned_offered: bool,
    scheduled: Candidates<'a>,
}

impl Order<'_> {
    /// Move on from the pinned backend to the scheduler's order; false if
    /// that was done already.
    fn next_stage(&mut self) -> bool {
        std::mem::replace(&mut self.pinned_first, false)
    }
}

impl<'a> Iterator for Order<'a> {
    type Item = &'a Arc<Backend>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pinned_first {
            if std::mem::replace(&mut self.pinned_offered, true) {
                return None;
            }
            return self.pinned;
        }
        let pinned = self.pinned;
        self.scheduled
            .by_ref()
            .find(|b| !pinned.is_some_and(|p| Arc::ptr_eq(p, b)))
    }
}
