//! Per-backend connection caps and the listener's waiting queue.
//!
//! A backend with `max_connections` takes at most that many connections
//! (HTTP mode: requests in flight). When every candidate is at its cap, the
//! connection waits in its listener's queue — first come, first served —
//! for up to `queue_timeout`. A freed slot wakes the longest waiter, and
//! newcomers queue behind waiters rather than overtaking them. This is how
//! a pool is kept under PostgreSQL's `max_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{ActiveGuard, AdminState, Backend};

/// A listener's waiting room; shared by its routes across reloads.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: AtomicUsize,
    /// Woken (one waiter at a time, oldest first) when a capped slot frees.
    freed: Notify,
}

/// One connection's place on a backend: counted as active and in use.
/// Every slot counts against the backend's cap, so a cap set by a reload
/// sees the connections that were already open.
#[derive(Debug)]
pub struct Slot {
    guard: ActiveGuard,
    queue: Arc<Queue>,
}

impl Slot {
    pub fn guard(&self) -> &ActiveGuard {
        &self.guard
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.guard.state().release_slot();
        if self.queue.waiting() > 0 {
            self.queue.freed.notify_one();
        }
    }
}

/// Why no slot could be taken right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// No candidate at all.
    NoCandidate,
    /// Every candidate is at its cap.
    Capped,
}

impl Queue {
    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// A slot on `backend`, unless it is at its cap.
    pub fn try_slot(self: &Arc<Self>, backend: &Backend) -> Option<Slot> {
        backend
            .state
            .try_take_slot(backend.max_connections)
            .then(|| Slot {
                guard: backend.state.enter(),
                queue: self.clone(),
            })
    }

    /// Take a slot with `pick`, queuing behind earlier waiters when needed;
    /// `Err(Busy::Capped)` once `deadline` passes.
    pub async fn acquire(
        &self,
        deadline: Instant,
        mut pick: impl FnMut() -> Result<(Arc<Backend>, Slot), Busy>,
    ) -> Result<(Arc<Backend>, Slot), Busy> {
        // Newcomers do not overtake connections that already wait.
        if self.waiting() == 0 {
            match pick() {
                Err(Busy::Capped) => {}
                done => return done,
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = Leave(&self.waiting);
        let mut woken = false;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a slot freed meanwhile wakes us.
            notified.as_mut().enable();
            match pick() {
                Err(Busy::Capped) => {}
                done => return done,
            }
            if woken {
                // The slot that woke us is no use to this connection (a
                // backend it already failed on, or one its older route does
                // not have): pass the wake-up on rather than lose it.
                self.freed.notify_one();
            }
            tokio::select! {
                () = notified => woken = true,
                () = tokio::time::sleep_until(deadline) => return Err(Busy::Capped),
            }
        }
    }
}

/// Walks one connection's candidates in scheduler order, each offered
/// once: a backend that failed is not offered again, and one that was at
/// its cap is looked at again (first, in order) when a slot frees.
pub struct Picker<I> {
    candidates: I,
    capped: Vec<Arc<Backend>>,
}

impl<'a, I: Iterator<Item = &'a Arc<Backend>>> Picker<I> {
    pub fn new(candidates: I) -> Self {
        Picker {
            candidates,
            capped: Vec::new(),
        }
    }

    /// The next candidate with a free slot.
    pub fn pick(&mut self, queue: &Arc<Queue>) -> Result<(Arc<Backend>, Slot), Busy> {
        self.capped
            .retain(|b| b.state.is_up() && b.state.admin_state() != AdminState::Maint);
        if let Some((i, slot)) = self
            .capped
            .iter()
            .enumerate()
            .find_map(|(i, b)| queue.try_slot(b).map(|slot| (i, slot)))
        {
            return Ok((self.capped.remove(i), slot));
        }
        for backend in self.candidates.by_ref() {
            // The selection may be older than the backend's state (the
            // connection waited in the queue): never onto one that went
            // down or into maintenance meanwhile.
            if !backend.state.is_up() || backend.state.admin_state() == AdminState::Maint {
                continue;
            }
            match queue.try_slot(backend) {
                Some(slot) => return Ok((backend.clone(), slot)),
                None => self.capped.push(backend.clone()),
            }
        }
        if self.capped.is_empty() {
            Err(Busy::NoCandidate)
        } else {
            Err(Busy::Capped)
        }
    }
}

/// Leaves the queue however the wait ends.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Open client connections of a listener, held against its
/// `max_connections`: at the limit the accept loop pauses, and further
/// clients wait in the kernel's backlog.
#[derive(Debug, Default)]
pub struct OpenCount {
    open: AtomicUsize,
    freed: Notify,
}

/// One open client connection; counted until dropped.
#[derive(Debug)]
pub struct Open(Arc<OpenCount>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.freed.notify_one();
    }
}

impl OpenCount {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    pub fn enter(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::SeqCst);
        Open(self.clone())
    }

    /// Wake a paused accept loop to look at its limit again (a reload may
    /// have raised it).
    pub fn wake(&self) {
        self.freed.notify_waiters();
    }

    /// Wait until fewer than `max` connections are open, or until woken
    /// (a connection closed, or a reload may have changed the limit): the
    /// caller looks at the current limit again either way.
    pub async fn changed(&self, max: usize) {
        let notified = self.freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.open() < max {
            return;
        }
        notified.await;
    }
}
