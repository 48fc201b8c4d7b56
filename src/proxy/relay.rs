//! Copying bytes both ways between a client and a backend.
//!
//! Built for many idle connections and fast bulk transfer at once:
//! - **No buffer while idle.** Each direction waits for readiness with no
//!   memory attached and borrows a buffer from a per-thread pool only while
//!   data moves (HAProxy's approach). An idle proxied connection costs its two
//!   sockets and one small task — not the 2 × 8 KiB that
//!   `tokio::io::copy_bidirectional` allocates up front.
//! - **Large buffers while busy.** 64 KiB reads halve the syscalls of bulk
//!   transfers compared with 8–16 KiB.
//! - **Half-close is passed on.** When one side sends FIN, the other side's
//!   write half is shut down and the opposite direction keeps flowing until
//!   it ends too.
//! - **Idle timeout** without a timer reset per read: one timer re-arms
//!   itself from the time of the last transfer when it fires.
//! - **Fairness**: every wait goes through tokio's readiness polling, which
//!   counts against the task's cooperative budget, so a bulk transfer yields
//!   to other connections on the same worker thread.

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::splice::Pipe;
use crate::backend::BackendState;
use crate::config::Keepalive;
use crate::handover::Pending;
use std::os::fd::AsRawFd;

/// Read size while data flows. 64 KiB matches the kernel's default maximum
/// autotuned receive window chunk on loopback and halves syscalls compared
/// with 16 KiB in bulk benchmarks.
pub const BUF_SIZE: usize = 64 * 1024;

/// Buffers kept per worker thread between uses: enough for the connections
/// a thread moves data for at one moment, bounded so a burst does not pin
/// memory for ever (16 × 64 KiB = 1 MiB per thread).
const POOL_KEEP: usize = 16;

thread_local! {
    static BUFFERS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of [`BUF_SIZE`] from this thread's pool, returned to it on
/// drop. Zeroed once when first allocated, then reused as is. (UDP replies
/// borrow one too: it holds the largest datagram.)
pub(crate) struct PooledBuf(pub(crate) Box<[u8]>);

impl PooledBuf {
    pub(crate) fn take() -> PooledBuf {
        let buf = BUFFERS
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice());
        PooledBuf(buf)
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        if buf.len() != BUF_SIZE {
            return; // bytes a live upgrade carried in: not the pool's size
        }
        BUFFERS.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_KEEP {
                p.push(buf);
            }
        });
    }
}

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed their sending half.
    Closed,
    /// No byte moved either way for the idle timeout.
    Idle,
}

/// A connection that ends sooner than this never needs a keepalive probe,
/// so its backend socket's keepalive is set only once it has lived this
/// long: four option calls saved on every short connection, and the first
/// probe of a long one comes at most this much later than configured.
pub const KEEPALIVE_AFTER: Duration = Duration::from_secs(1);

pin_project! {
    /// One connection's relay: both directions and the idle timer. Polled
    /// until both directions have ended, one fails, or the connection has
    /// been idle for `idle`; the backend socket's keepalive, if any, is
    /// turned on once the connection has lived [`KEEPALIVE_AFTER`]. Bytes
    /// are counted on the backend's live state as they move.
    ///
    /// A plain struct polled by hand rather than two `async` copy loops
    /// joined: it waits through the sockets' own reader/writer waker slots
    /// (`poll_read_ready` / `poll_write_ready`), so the whole relay state is
    /// its two [`Half`]s plus one timer, with no waiter node per pending
    /// future. That is most of what an idle connection costs. Its state is
    /// all in the open: the bytes in flight are in the halves' buffers and
    /// pipes.
    pub struct Relay {
        c2b: Half,
        b2c: Half,
        idle: Duration,
        last_activity: Instant,
        // Still to set on the backend socket (taken when it is).
        keepalive: Option<Keepalive>,
        // One timer for the connection, re-armed from the last activity
        // when it fires, never reset per read; first due when keepalive is.
        #[pin]
        timer: Sleep,
    }
}

impl Relay {
    /// A relay that ends after `idle` without a byte moved and sets
    /// `keepalive` on the backend socket after [`KEEPALIVE_AFTER`].
    pub fn new(idle: Duration, keepalive: Option<Keepalive>) -> Relay {
        let first = if keepalive.is_some() {
            idle.min(KEEPALIVE_AFTER)
        } else {
            idle
        };
        Relay {
            c2b: Half::default(),
            b2c: Half::default(),
            idle,
            last_activity: Instant::now(),
            keepalive,
            timer: tokio::time::sleep(first),
        }
    }

    /// A relay taken over from another process (live upgrade): each
    /// direction starts with the bytes that process had read and not yet
    /// written, or ended as it had; idle from now.
    pub fn resume(
        idle: Duration,
        keepalive: Option<Keepalive>,
        c2b: Pending,
        b2c: Pending,
    ) -> Relay {
        let mut relay = Relay::new(idle, keepalive);
        relay.c2b = Half::resumed(c2b);
        relay.b2c = Half::resumed(b2c);
        relay
    }

    /// Take the relay's state out for a handover: per direction the bytes
    /// read and not yet written (from its buffer or its pipe), in order,
    /// and whether it has ended; and whether the backend's keepalive is
    /// still to be set. The relay is spent afterwards.
    pub fn freeze(self: Pin<&mut Self>) -> io::Result<(Pending, Pending, bool)> {
        let this = self.project();
        let c2b = this.c2b.freeze()?;
        let b2c = this.b2c.freeze()?;
        Ok((c2b, b2c, this.keepalive.is_some()))
    }

    pub fn poll_relay(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        client: &TcpStream,
        backend: &TcpStream,
        counters: &BackendState,
    ) -> Poll<io::Result<End>> {
        let mut this = self.project();
        let mut moved = false;
        let up = this.c2b.poll(cx, client, backend, this.b2c.done, |n| {
            counters.metrics.bytes_client_to_backend.inc_by(n);
            moved = true;
        })?;
        let down = this.b2c.poll(cx, backend, client, this.c2b.done, |n| {
            counters.metrics.bytes_backend_to_client.inc_by(n);
            moved = true;
        })?;
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ok(End::Closed));
        }
        if moved {
            *this.last_activity = Instant::now();
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            if let Some(k) = this.keepalive.take() {
                crate::sockets::set_keepalive(backend, k);
            }
            let deadline = *this.last_activity + *this.idle;
            if deadline <= Instant::now() {
                return Poll::Ready(Ok(End::Idle));
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// One direction of a relay: bytes read from `src` and not yet written to
/// `dst` sit in a pooled buffer, held only while there are some. Once a
/// read fills a whole buffer the direction is bulk, and its bytes go
/// through a pooled pipe with `splice` instead, never copied through user
/// space ([`super::splice`]); small request/response traffic stays on the
/// copy path, whose short reads save a call each.
#[derive(Default)]
struct Half {
    buf: Option<PooledBuf>,
    /// Bytes of `buf` written so far / read so far (at most 64 KiB: u32
    /// keeps an idle connection's task small).
    pos: u32,
    len: u32,
    /// The last read emptied the socket: give the buffer (pipe) back after
    /// writing.
    drained: bool,
    /// `src` sent FIN and it was passed on.
    done: bool,
    /// Bulk: bytes move by `splice` through `pipe`.
    bulk: bool,
    pipe: Option<Pipe>,
    /// Bytes in `pipe` not yet written to `dst`.
    in_pipe: u32,
}

impl Half {
    /// A direction that starts with `pending` (a live upgrade's carried
    /// bytes), on the copy path.
    fn resumed(pending: Pending) -> Half {
        let len = pending.bytes.len() as u32;
        Half {
            buf: (len > 0).then(|| PooledBuf(pending.bytes.into_boxed_slice())),
            len,
            drained: true,
            done: pending.done,
            ..Half::default()
        }
    }

    /// What this direction holds, taken out (see [`Relay::freeze`]). At
    /// most one of buffer and pipe holds bytes: a read only follows once
    /// both are empty.
    fn freeze(&mut self) -> io::Result<Pending> {
        let mut bytes = Vec::new();
        if let Some(buf) = self.buf.take() {
            bytes.extend_from_slice(&buf.0[self.pos as usize..self.len as usize]);
        }
        if let Some(pipe) = self.pipe.take()
            && self.in_pipe > 0
        {
            bytes.extend(pipe.read_out(self.in_pipe as usize)?);
        }
        (self.pos, self.len, self.in_pipe) = (0, 0, 0);
        Ok(Pending {
            bytes,
            done: self.done,
        })
    }

    /// Move bytes until `src` would block (Pending) or has ended (Ready).
    /// `other_done`: the other direction has ended already, so the relay
    /// ends with this one and closing the sockets says the rest.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        other_done: bool,
        mut count: impl FnMut(u64),
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(buf) = self.buf.as_ref().filter(|_| self.pos < self.len) {
                match dst.try_write(&buf.0[self.pos as usize..self.len as usize]) {
                    Ok(n) => {
                        self.pos += n as u32;
                        if self.pos == self.len {
                            count(self.len as u64);
                            (self.pos, self.len) = (0, 0);
                            if self.drained {
                                // Idle from here: no memory held.
                                self.buf = None;
                            }
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(dst.poll_write_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if self.in_pipe > 0 {
                let pipe = self.pipe.as_ref().expect("bytes in a pipe");
                let len = self.in_pipe as usize;
                match dst.try_io(Interest::WRITABLE, || pipe.drain_into(dst.as_raw_fd(), len)) {
                    Ok(n) => {
                        self.in_pipe -= n as u32;
                        count(n as u64);
                        if self.in_pipe == 0 && self.drained {
                            self.pipe.take().expect("the pipe just drained").give_back();
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready!(dst.poll_write_ready(cx))?;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            ready!(src.poll_read_ready(cx))?;
            if self.bulk {
                match self.splice_in(src) {
                    Ok(0) => return self.end(dst, other_done),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        // This pair of sockets cannot splice: copy.
                        self.bulk = false;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            let buf = self.buf.get_or_insert_with(PooledBuf::take);
            match read_chunk(src, &mut buf.0) {
                Ok((0, _)) => return self.end(dst, other_done),
                Ok((n, chunk)) => {
                    (self.pos, self.len) = (0, n as u32);
                    self.drained = chunk == Chunk::Drained;
                    // A full buffer: bulk from the next read on.
                    self.bulk = chunk == Chunk::Full;
                }
                // Readiness was stale and is now cleared: the next
                // poll_read_ready registers for the next data.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.buf = None,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Splice what `src` has into an (empty) pipe: the bytes moved, 0 at
    /// the end of the stream. Unlike a short read, a short splice does not
    /// prove the socket empty (the pipe may have been the limit), so the
    /// readiness is left to the next splice's EAGAIN; a pipe left empty
    /// goes back to the pool.
    fn splice_in(&mut self, src: &TcpStream) -> io::Result<usize> {
        let pipe = match self.pipe.take() {
            Some(pipe) => pipe,
            None => Pipe::take()?,
        };
        match src.try_io(Interest::READABLE, || pipe.fill_from(src.as_raw_fd())) {
            Ok(0) => {
                pipe.give_back();
                Ok(0)
            }
            Ok(n) => {
                (self.in_pipe, self.drained) = (n as u32, false);
                self.pipe = Some(pipe);
                Ok(n)
            }
            Err(e) => {
                // WouldBlock: idle from here, no pipe held.
                pipe.give_back();
                Err(e)
            }
        }
    }

    /// `src` ended (FIN): pass it on to `dst`, unless the other direction
    /// has ended too.
    fn end(&mut self, dst: &TcpStream, other_done: bool) -> Poll<io::Result<()>> {
        self.buf = None;
        self.done = true;
        if other_done {
            // Both directions are over: the caller closes both sockets,
            // and closing `dst` sends its FIN (its receive side is
            // drained: it sent FIN first), so a `shutdown` here would be
            // one call for nothing.
            return Poll::Ready(Ok(()));
        }
        match SockRef::from(dst).shutdown(Shutdown::Write) {
            Ok(()) => Poll::Ready(Ok(())),
            // The peer already closed: nothing left to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// What a read left in the socket.
#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// The buffer filled up: there may be more.
    Full,
    /// Fewer bytes than asked for: the receive queue is empty now.
    Drained,
}

/// Read into `buf`. A short read means TCP handed over everything it had
/// queued, so readiness is cleared right there instead of paying one more
/// `read` just to hear EAGAIN — for request/response traffic that is a
/// third of the syscalls. The clear goes through `try_io`, which keeps the
/// readiness if new data was signalled meanwhile, so no wake-up is lost.
fn read_chunk(src: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, Chunk)> {
    let mut short = None;
    let result = src.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(src)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, short) {
        (Ok(n), _) => Ok((n, Chunk::Full)),
        (Err(_), Some(n)) => Ok((n, Chunk::Drained)),
        (Err(e), None) => Err(e),
    }
}
