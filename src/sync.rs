//! Stop signals shared by the data path and the control plane.
//!
//! A [`Tripwire`] is a one-shot stop signal that a connection can watch for
//! the price of an atomic load.
//!
//! Every wake-up of a connection task re-polls whatever it selects on. A
//! `tokio_util::sync::CancellationToken` (or a waiting `Notified`) takes a
//! mutex on every such poll — and a token shared by all connections (server
//! shutdown) makes that one lock for the whole data path. A [`Tripwire`]
//! registers its waiter once, then only reads a flag.
//!
//! A wire can be the [`child`](Tripwire::child) of another: it trips with
//! its parent as well as on its own, so a connection that must stop on
//! either (its backend is cut, the server's shutdown grace is over) waits
//! on one wire.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::sync::{Notify, futures::OwnedNotified};

/// Cloneable; every clone sees the same trip.
#[derive(Debug, Clone, Default)]
pub struct Tripwire(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    tripped: AtomicBool,
    notify: Arc<Notify>,
    parent: Option<Tripwire>,
    /// Tripped with this one.
    children: Mutex<Vec<Weak<Inner>>>,
}

impl Tripwire {
    pub fn new() -> Tripwire {
        Tripwire::default()
    }

    /// A wire that trips when this one does, or on its own.
    pub fn child(&self) -> Tripwire {
        let child = Tripwire(Arc::new(Inner {
            parent: Some(self.clone()),
            ..Inner::default()
        }));
        {
            let mut children = self.children();
            children.retain(|c| c.strong_count() > 0);
            children.push(Arc::downgrade(&child.0));
        }
        // After joining the list: a trip either sees the child there or
        // happened before, and shows here.
        if self.is_tripped() {
            child.trip();
        }
        child
    }

    /// Trip it: every current and future waiter completes, and so do the
    /// children's.
    pub fn trip(&self) {
        self.0.tripped.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
        let children = std::mem::take(&mut *self.children());
        for child in children.iter().filter_map(Weak::upgrade) {
            Tripwire(child).trip();
        }
    }

    /// Whether it tripped because its parent did.
    pub fn parent_tripped(&self) -> bool {
        self.0.parent.as_ref().is_some_and(Tripwire::is_tripped)
    }

    fn children(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Inner>>> {
        // A poisoned list is still a list of weak pointers.
        self.0.children.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_tripped(&self) -> bool {
        self.0.tripped.load(Ordering::Acquire)
    }

    /// Completes once tripped. The future owns a clone of the wire, so a
    /// connection can keep it beside its sockets (no borrow of the wire).
    pub fn tripped(&self) -> Tripped {
        Tripped {
            wire: self.clone(),
            notified: self.0.notify.clone().notified_owned(),
            armed: false,
        }
    }
}

pin_project! {
    /// The wait of [`Tripwire::tripped`].
    ///
    /// The waiter is registered (with the task's waker) on the first poll
    /// only; later polls read the flag. That relies on the waker staying
    /// the same between polls, which holds for a future polled by one
    /// task, as connection tasks are.
    #[derive(Debug)]
    pub struct Tripped {
        wire: Tripwire,
        #[pin]
        notified: OwnedNotified,
        armed: bool,
    }
}

impl Tripped {
    /// The wire this waits on.
    pub fn wire(&self) -> &Tripwire {
        &self.wire
    }
}

impl Future for Tripped {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if !*this.armed {
            // In the waiter list before the flag is read: no trip can
            // slip by.
            this.notified.as_mut().enable();
        }
        if this.wire.is_tripped() {
            return Poll::Ready(());
        }
        if !std::mem::replace(this.armed, true) {
            return this.notified.poll(cx);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_before_and_after_the_trip_complete() {
        let wire = Tripwire::new();
        let early = tokio::spawn({
            let w = wire.clone();
            async move { w.tripped().await }
        });
        tokio::task::yield_now().await;
        assert!(!early.is_finished());
        wire.trip();
        early.await.unwrap();
        // After the trip, waiting completes at once.
        wire.tripped().await;
        assert!(wire.is_tripped());
    }

    #[tokio::test]
    async fn a_child_trips_with_its_parent_and_alone() {
        let parent = Tripwire::new();
        let alone = parent.child();
        alone.trip();
        alone.tripped().await;
        assert!(!parent.is_tripped() && !alone.parent_tripped());

        let child = parent.child();
        let waiting = tokio::spawn(child.tripped());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        parent.trip();
        waiting.await.unwrap();
        assert!(child.parent_tripped());
        // Made after the parent tripped: tripped from the start.
        assert!(parent.child().is_tripped());
    }
}
