//! The bodies HTTP mode passes between client and backend: counted per
//! backend ([`Metered`]), a client's request body under `body_timeout` and
//! telling whose fault a failure was ([`FromClient`]), and a backend's
//! response read a little ahead so broken framing is a 502 rather than a
//! cut ([`Lookahead`]).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::StatusCode;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use prometheus::IntCounter;

use super::pool::BodyError;
use super::stall::Stall;
use crate::proxy::queue::Slot;

/// Where a body's bytes are counted: set to the backend the request is
/// about to go to (a retry moves it to the next one).
#[derive(Debug, Clone, Default)]
pub struct CounterSlot(Arc<arc_swap::ArcSwapOption<IntCounter>>);

impl CounterSlot {
    pub fn set(&self, counter: IntCounter) {
        self.0.store(Some(Arc::new(counter)));
    }

    fn add(&self, n: usize) {
        if let Some(c) = &*self.0.load() {
            c.inc_by(n as u64);
        }
    }
}

/// A body passed through unchanged, its data bytes counted, holding the
/// request's backend slot (in flight, and against the cap) until it ends.
pub struct Metered<B> {
    inner: B,
    counter: CounterSlot,
    guard: Option<Slot>,
}

impl<B> Metered<B> {
    pub fn new(inner: B, counter: CounterSlot, guard: Option<Slot>) -> Self {
        Metered {
            inner,
            counter,
            guard,
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    self.counter.add(data.len());
                }
            }
            // Ended (or failed): the request is no longer in flight.
            _ => self.guard = None,
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Set when a request failed because of its client: the status to answer
/// instead of blaming the backend the body was going to.
#[derive(Debug, Clone, Default)]
pub struct ClientFault(Arc<AtomicU16>);

impl ClientFault {
    fn set(&self, status: StatusCode) {
        self.0.store(status.as_u16(), Ordering::Relaxed);
    }

    /// 400 (a malformed body, or one cut short), 408 (a stalled one).
    pub fn status(&self) -> Option<StatusCode> {
        StatusCode::from_u16(self.0.load(Ordering::Relaxed)).ok()
    }
}

/// The body stopped moving for `body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for body_timeout")]
struct BodyStalled;

/// A client's request body: fails once the client has sent nothing for
/// `body_timeout`, and records in [`ClientFault`] when it failed.
pub struct FromClient {
    inner: Incoming,
    stall: Stall,
    fault: ClientFault,
}

impl FromClient {
    pub fn new(inner: Incoming, timeout: Duration, fault: ClientFault) -> FromClient {
        FromClient {
            inner,
            stall: Stall::new(timeout),
            fault,
        }
    }
}

impl Body for FromClient {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                // Bad chunked framing, or the client went away mid-body.
                this.fault.set(StatusCode::BAD_REQUEST);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(frame) => {
                this.stall.moved();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                ready!(this.stall.waiting(cx));
                this.fault.set(StatusCode::REQUEST_TIMEOUT);
                Poll::Ready(Some(Err(BodyStalled.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How long a response's head waits for the first part of its body: a body
/// that starts with its head (most do) is read that far first, so a
/// malformed start (a bad chunk size, a body cut short) is answered 502
/// and never reaches the client as half a response. A body that starts
/// later (a stream, a long poll) goes out as it comes after this.
pub const LOOKAHEAD_WINDOW: Duration = Duration::from_millis(100);

/// A backend's response body, its first frame read ahead.
pub struct Lookahead {
    first: Option<Frame<Bytes>>,
    inner: Incoming,
    /// `inner` has ended: `first` is all there is.
    ended: bool,
}

impl Lookahead {
    /// Nothing read ahead (a protocol switch: the body is the tunnel).
    pub fn none(inner: Incoming) -> Lookahead {
        Lookahead {
            first: None,
            inner,
            ended: false,
        }
    }

    /// Read `inner`'s first frame, unless [`LOOKAHEAD_WINDOW`] passes
    /// first; `Err` if its framing broke before it.
    pub async fn read(inner: Incoming) -> Result<Lookahead, hyper::Error> {
        let mut body = Lookahead::none(inner);
        if body.inner.is_end_stream() {
            return Ok(body);
        }
        let first = tokio::time::timeout(LOOKAHEAD_WINDOW, body.inner.frame()).await;
        match first {
            Err(_elapsed) => {}
            Ok(None) => body.ended = true,
            Ok(Some(frame)) => {
                body.first = Some(frame?);
                body.ended = body.inner.is_end_stream();
            }
        }
        Ok(body)
    }

    fn first_len(&self) -> u64 {
        self.first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64)
    }
}

impl Body for Lookahead {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && (self.ended || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let first = self.first_len();
        if self.ended {
            return SizeHint::with_exact(first);
        }
        let rest = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}
