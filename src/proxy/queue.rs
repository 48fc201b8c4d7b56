//! Per-backend connection caps and the listener's waiting queue.
//!
//! A backend with `max_connections` takes at most that many connections
//! (HTTP mode: requests in flight). When every candidate is at its cap, the
//! connection waits in its listener's queue — first come, first served —
//! for up to `queue_timeout`. A freed slot wakes the longest waiter, and
//! newcomers queue behind waiters rather than overtaking them. This is how
//! a pool is kept under PostgreSQL's `max_connections`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{ActiveGuard, Backend, Via};

/// A listener's waiting room; shared by its routes across reloads.
#[derive(Debug, Default)]
pub struct Queue {
    waiting: AtomicUsize,
    /// Slots released so far: tells a woken waiter whether its wake-up
    /// brought news it has not looked at yet.
    releases: AtomicU64,
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
        // Only waiters care; a connection that starts waiting later sees
        // the freed slot in its own first pick.
        if self.queue.waiting() > 0 {
            self.queue.releases.fetch_add(1, Ordering::SeqCst);
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

    /// A slot on `backend` whatever its cap: for a connection that a live
    /// upgrade hands over, which held one in the old process already.
    pub fn adopt_slot(self: &Arc<Self>, backend: &Backend) -> Slot {
        backend.state.try_take_slot(None);
        Slot {
            guard: backend.state.enter(),
            queue: self.clone(),
        }
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
        let mut seen = None;
        loop {
            let notified = self.freed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a slot freed meanwhile wakes us.
            notified.as_mut().enable();
            let releases = self.releases.load(Ordering::SeqCst);
            match pick() {
                Err(Busy::Capped) => {}
                done => return done,
            }
            if seen.is_some_and(|s| s != releases) {
                // Woken by a release this connection cannot use (a backend
                // it already failed on, or one its older route does not
                // have): pass the wake-up on rather than lose it. Once per
                // release per waiter, so two waiters that both cannot use
                // it do not hand it back and forth.
                self.freed.notify_one();
            }
            seen = Some(releases);
            tokio::select! {
                () = notified => {}
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

    /// The candidates still to be offered.
    pub fn candidates_mut(&mut self) -> &mut I {
        &mut self.candidates
    }

    /// The next candidate with a free slot.
    pub fn pick(&mut self, queue: &Arc<Queue>) -> Result<(Arc<Backend>, Slot), Busy> {
        // The selection may be older than the backend's state (the
        // connection waited in the queue): never onto one that went down
        // or into maintenance meanwhile.
        self.capped.retain(|b| b.admits(Via::Pinned));
        if let Some((i, slot)) = self
            .capped
            .iter()
            .enumerate()
            .find_map(|(i, b)| queue.try_slot(b).map(|slot| (i, slot)))
        {
            return Ok((self.capped.remove(i), slot));
        }
        for backend in self.candidates.by_ref() {
            if !backend.admits(Via::Pinned) {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::balancer::test_support::backends;

    fn capped(n: usize) -> Vec<Arc<Backend>> {
        let mut list = backends(&vec![1; n]);
        for b in &mut list {
            Arc::get_mut(b).unwrap().config.max_connections = Some(1);
        }
        list
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        let mut poll = tokio::time::interval(Duration::from_millis(2));
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(20), "{what}");
            poll.tick().await;
        }
    }

    #[tokio::test]
    async fn a_wake_up_the_oldest_waiter_cannot_use_is_passed_on() {
        let queue = Arc::new(Queue::default());
        let list = capped(2);
        let (x, y) = (list[0].clone(), list[1].clone());
        let slot_x = queue.try_slot(&x).unwrap();
        let slot_y = queue.try_slot(&y).unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        // The oldest waiter can only use x; the next one takes either.
        let a = tokio::spawn({
            let (queue, x) = (queue.clone(), x.clone());
            async move {
                let q = queue.clone();
                queue
                    .acquire(far, || Picker::new(std::iter::once(&x)).pick(&q))
                    .await
                    .map(|(b, _)| b.name.clone())
            }
        });
        until("a queued", || queue.waiting() == 1).await;
        let b = tokio::spawn({
            let (queue, list) = (queue.clone(), list.clone());
            async move {
                let q = queue.clone();
                queue
                    .acquire(far, || Picker::new(list.iter().rev()).pick(&q))
                    .await
                    .map(|(b, _)| b.name.clone())
            }
        });
        until("b queued", || queue.waiting() == 2).await;
        // y frees: A is woken first, cannot use it, and must hand it to B.
        drop(slot_y);
        let got_b = tokio::time::timeout(Duration::from_secs(20), b).await;
        assert_eq!(
            got_b.expect("B was not woken").unwrap().unwrap(),
            "b1".into()
        );
        assert_eq!(queue.waiting(), 1, "A still waits for x");
        drop(slot_x);
        let got_a = tokio::time::timeout(Duration::from_secs(20), a).await;
        assert_eq!(
            got_a.expect("A was not woken").unwrap().unwrap(),
            "b0".into()
        );
    }

    #[tokio::test]
    async fn every_slot_counts_against_a_cap_set_later() {
        let queue = Arc::new(Queue::default());
        let mut list = backends(&[1]);
        let held = queue.try_slot(&list[0]).unwrap();
        // A reload caps the backend at 1 while a connection is open.
        let b = Arc::new(Backend::new(
            &crate::config::BackendConfig {
                max_connections: Some(1),
                ..list[0].config.clone()
            },
            list[0].state.clone(),
        ));
        list[0] = b;
        assert!(queue.try_slot(&list[0]).is_none(), "the open one counts");
        drop(held);
        assert!(queue.try_slot(&list[0]).is_some());
    }
}
