//! HTTP mode's bound on a body that stops moving (`body_timeout`): a
//! client that trickles nothing of its request body, or takes nothing of
//! its response, is cut after the bound rather than holding a connection
//! (and a backend's) for ever — slow-body (R-U-Dead-Yet) and slow-read
//! attacks. Headers have hyper's own bound (`header_timeout`).
//!
//! The clock runs only while the transfer waits on the client: armed when
//! a read or write is pending, cleared by any progress, so a long transfer
//! that keeps moving is never cut, and time spent waiting for a backend
//! does not count.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A deadline for progress, re-armed each time the transfer starts to wait.
pub struct Stall {
    after: Duration,
    /// Made at the first wait, reset after.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Stall {
    pub fn new(after: Duration) -> Stall {
        Stall {
            after,
            timer: None,
            armed: false,
        }
    }

    /// The transfer is pending: `Ready` once it has waited `after` since
    /// it last moved (the task is woken then).
    pub fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = Instant::now() + self.after;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        timer.as_mut().poll(cx)
    }

    /// The transfer moved: the next wait starts a new clock.
    pub fn moved(&mut self) {
        self.armed = false;
    }

    /// Poll an operation under this deadline: its result when it is
    /// ready, `stalled()` once it has waited too long.
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        op: Poll<T>,
        stalled: impl FnOnce() -> T,
    ) -> Poll<T> {
        match op {
            Poll::Ready(r) => {
                self.moved();
                Poll::Ready(r)
            }
            Poll::Pending => match self.waiting(cx) {
                Poll::Ready(()) => Poll::Ready(stalled()),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// A client connection whose writes fail with `TimedOut` once the client
/// has taken nothing for the bound (nginx's `send_timeout`). Reads pass
/// through.
pub struct SendDeadline<T> {
    inner: T,
    stall: Stall,
}

impl<T> SendDeadline<T> {
    pub fn new(inner: T, after: Duration) -> SendDeadline<T> {
        SendDeadline {
            inner,
            stall: Stall::new(after),
        }
    }

    pub fn into_inner(self) -> T {
        self.inner
    }
}

fn send_stalled<T>() -> io::Result<T> {
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "client took nothing of the response for body_timeout",
    ))
}

impl<T: AsyncRead + Unpin> AsyncRead for SendDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SendDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let op = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stall.poll(cx, op, send_stalled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let op = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stall.poll(cx, op, send_stalled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let op = Pin::new(&mut this.inner).poll_flush(cx);
        this.stall.poll(cx, op, send_stalled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_times_out_and_one_it_takes_does_not() {
        let (a, b) = tokio::io::duplex(16);
        let mut w = SendDeadline::new(a, Duration::from_secs(5));
        // Fits the pipe: written at once, however long it then sits.
        w.write_all(&[0; 16]).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        // The pipe is full and nobody reads: cut after the bound.
        let start = Instant::now();
        let e = w.write_all(&[0; 1]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(b);
    }
}
