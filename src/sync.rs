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

use std::future::poll_fn;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use tokio::sync::Notify;

/// Cloneable; every clone sees the same trip.
#[derive(Debug, Clone, Default)]
pub struct Tripwire(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    tripped: AtomicBool,
    notify: Notify,
}

impl Tripwire {
    pub fn new() -> Tripwire {
        Tripwire::default()
    }

    /// Trip it: every current and future waiter completes.
    pub fn trip(&self) {
        self.0.tripped.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    pub fn is_tripped(&self) -> bool {
        self.0.tripped.load(Ordering::Acquire)
    }

    /// Completes once tripped.
    ///
    /// The waiter is registered (with the task's waker) on the first poll
    /// only; later polls read the flag. That relies on the waker staying
    /// the same between polls, which holds for a future polled by one task,
    /// as connection tasks are.
    pub async fn tripped(&self) {
        let mut notified = pin!(self.0.notify.notified());
        // In the waiter list before the flag is read: no trip can slip by.
        notified.as_mut().enable();
        let mut armed = false;
        poll_fn(|cx| {
            if self.is_tripped() {
                return Poll::Ready(());
            }
            if !armed {
                armed = true;
                return notified.as_mut().poll(cx);
            }
            Poll::Pending
        })
        .await
    }
}

/// Completes once `wire` trips; never, without one. The one wait for an
/// optional cut signal (`on_marked_down = "shutdown"`) of every connection
/// kind.
pub async fn tripped_or_never(wire: Option<&Tripwire>) {
    match wire {
        Some(wire) => wire.tripped().await,
        None => std::future::pending().await,
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
}
