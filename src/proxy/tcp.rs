//! TCP mode: one client connection's life.
//!
//! The connection is placed with the route current at its accept (queue,
//! connect with retry, PROXY header), then the route is let go: while the
//! bytes flow it holds its client and backend sockets, its backend slot
//! (the backend's live state), its stop signals and its idle timeout.
//!
//! The two phases are two states of one hand-written future, so a
//! connection that lives for days costs only what its relay holds: the
//! placing phase (queue wait, connect timers, retries) lives on the heap
//! while it runs and is gone once the bytes flow, and nothing is kept twice,
//! as an `async fn`'s arguments beside their moved copies would be.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use prometheus::Histogram;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Route;
use super::connect::{self, Reached};
use super::proxy_protocol;
use super::queue::{Open, Slot};
use super::relay::{End, Relay};
use crate::backend::Backend;
use crate::config::ProxyProtocol;
use crate::handover::{Frozen, FrozenTcp, Pending};
use crate::sockets;
use crate::sync::{Tripped, Tripwire};

/// Serve one client connection to its end.
pub fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    abort: Tripwire,
    open: Open,
) -> Connection {
    Connection::Placing {
        placing: Box::pin(place(client, peer, route, abort, open)),
    }
}

pin_project! {
    /// One client connection: being placed, then relaying.
    #[project = ConnectionProj]
    pub enum Connection {
        Placing { placing: Pin<Box<dyn Future<Output = Option<Session>> + Send>> },
        Relaying { #[pin] session: Session },
        Done,
    }
}

impl Future for Connection {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.as_mut().project() {
                ConnectionProj::Placing { placing } => match placing.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(session)) => self.set(Connection::Relaying { session }),
                    Poll::Ready(None) => {
                        self.set(Connection::Done);
                        return Poll::Ready(());
                    }
                },
                ConnectionProj::Relaying { session } => {
                    let end = std::task::ready!(session.poll_end(cx));
                    debug!(end, "connection ended");
                    // Sockets, slot and counters go now, not when the
                    // task is freed.
                    self.set(Connection::Done);
                    return Poll::Ready(());
                }
                ConnectionProj::Done => return Poll::Ready(()),
            }
        }
    }
}

/// Place the connection: queue, connect with retries, PROXY header.
/// `None`: it ended here (no backend, shutdown, a failed PROXY header).
async fn place(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    abort: Tripwire,
    open: Open,
) -> Option<Session> {
    // TCP_NODELAY and keepalive came with the socket from the listener.
    // getsockname only when a PROXY header is wanted.
    let local = || client.local_addr().ok();
    let Placed {
        upstream,
        slot,
        cut,
    } = reach_for(&route, peer, local, &abort).await?;
    // From here on the connection holds what it uses, not the route: a
    // session that lasts for days pins no pool.
    Some(Session {
        relay: Relay::new(route.settings.idle_timeout, route.settings.keepalive),
        client,
        upstream,
        cut: cut.tripped(),
        duration: route.shared.metrics.connection_duration.clone(),
        started: Instant::now(),
        slot,
        _open: open,
    })
}

/// A backend connection made for a client, its PROXY header sent.
pub(crate) struct Placed {
    pub upstream: TcpStream,
    pub slot: Slot,
    pub cut: Tripwire,
}

/// Reach a backend for a client from `peer` (queue, connect with retries)
/// and send the PROXY header (for the listener address `local` gives):
/// the one way a stream connection is placed, plain or TLS. `None`: it
/// ended here (no backend, shutdown, a failed PROXY header).
pub(crate) async fn reach_for(
    route: &Route,
    peer: SocketAddr,
    local: impl FnOnce() -> Option<SocketAddr>,
    abort: &Tripwire,
) -> Option<Placed> {
    // Waiting in the queue or connecting must not outlast the shutdown
    // grace either.
    let reached = tokio::select! {
        biased;
        () = abort.tripped() => return None,
        r = connect_backend(route, peer) => r,
    };
    let Reached {
        backend,
        conn: upstream,
        slot,
        cut,
    } = match reached {
        Ok(reached) => reached,
        Err(unserved) => {
            let reason = unserved.reject();
            debug!(reason = reason.as_str(), "closing unserved");
            route.shared.metrics.reject(reason);
            return None;
        }
    };
    let version = route.settings.proxy_protocol;
    if version != ProxyProtocol::Off
        && let Some(header) = local().and_then(|local| proxy_protocol::header(version, peer, local))
        && let Err(e) = write_all(&upstream, &header).await
    {
        debug!(error = %e, "sending the PROXY header failed");
        return None;
    }
    debug!(backend = %backend.name, "connected");
    Some(Placed {
        upstream,
        slot,
        cut,
    })
}

pin_project! {
    /// An established connection: what it holds while the bytes flow.
    #[project = SessionProj]
    pub struct Session {
        #[pin]
        relay: Relay,
        client: TcpStream,
        upstream: TcpStream,
        // Ends the session when the backend is marked down
        // (`on_marked_down = "shutdown"`) or the shutdown grace is over.
        #[pin]
        cut: Tripped,
        duration: Histogram,
        started: Instant,
        slot: Slot,
        _open: Open,
    }
}

impl Session {
    /// Relay until the connection ends; how it ended, for the log.
    fn poll_end(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<&'static str> {
        let mut this = self.project();
        let end = if this.cut.as_mut().poll(cx).is_ready() {
            let parent = this.cut.wire().parent_tripped();
            if parent && this.slot.guard().state().handover().is_active() {
                // A live upgrade takes it: no FIN, no duration yet (the
                // new process observes the whole lifetime).
                return Poll::Ready(hand_over(this));
            }
            match parent {
                true => "cut by shutdown",
                false => "cut: backend marked down",
            }
        } else {
            let counters = this.slot.guard().state();
            match std::task::ready!(
                this.relay
                    .poll_relay(cx, this.client, this.upstream, counters)
            ) {
                Ok(End::Closed) => "closed",
                Ok(End::Idle) => "idle timeout",
                Err(e) => {
                    debug!(error = %e, "relay error");
                    "error"
                }
            }
        };
        this.duration.observe(this.started.elapsed().as_secs_f64());
        Poll::Ready(end)
    }
}

/// Take an established session out of its task for a live upgrade and
/// give it to the handover: its sockets (duplicated: closing the task's own
/// copies then sends nothing) and the bytes its relay holds.
fn hand_over(this: SessionProj<'_>) -> &'static str {
    let state = this.slot.guard().state();
    let frozen = (|| {
        let (listener, backend) = state
            .metrics
            .key()
            .cloned()
            .ok_or_else(|| std::io::Error::other("a backend with no name"))?;
        let (c2b, b2c, keepalive_pending) = this.relay.freeze()?;
        std::io::Result::Ok(FrozenTcp {
            listener,
            backend,
            client: this.client.as_fd().try_clone_to_owned()?,
            upstream: this.upstream.as_fd().try_clone_to_owned()?,
            c2b,
            b2c,
            age: this.started.elapsed(),
            keepalive_pending,
        })
    })();
    match frozen {
        Ok(frozen) => match state.handover().give(Frozen::Tcp(frozen)) {
            true => "handed over",
            false => "closed: the handover ended before it was taken",
        },
        Err(e) => {
            debug!(error = %e, "freezing for the handover failed");
            "error"
        }
    }
}

/// A connection handed over by the process this one took over from: it
/// relays on from the carried bytes, on its backend's live state here,
/// counted as open on its listener (not as a new connection: the
/// counters came with the metrics).
pub fn adopt(
    frozen: FrozenTcp,
    route: &Route,
    backend: &Backend,
    open: Open,
) -> std::io::Result<Connection> {
    let settings = &route.settings;
    Ok(established(Established {
        client: sockets::inherited_stream(frozen.client)?,
        upstream: sockets::inherited_stream(frozen.upstream)?,
        c2b: frozen.c2b,
        b2c: frozen.b2c,
        idle: settings.idle_timeout,
        keepalive: settings.keepalive.filter(|_| frozen.keepalive_pending),
        cut: backend.state.cut_signal(),
        duration: route.shared.metrics.connection_duration.clone(),
        started: Instant::now()
            .checked_sub(frozen.age)
            .unwrap_or_else(Instant::now),
        slot: route.shared.queue.adopt_slot(backend),
        open,
    }))
}

/// A byte stream between a client and a backend that is already set up
/// elsewhere: a connection a live upgrade handed over, or an HTTP
/// connection upgraded to a tunnel (WebSocket).
pub struct Established {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// Bytes already read from the client, to go to the backend first.
    pub c2b: Pending,
    /// Bytes already read from the backend, to go to the client first.
    pub b2c: Pending,
    pub idle: std::time::Duration,
    /// Still to set on the backend socket.
    pub keepalive: Option<crate::config::Keepalive>,
    pub cut: Tripwire,
    pub duration: Histogram,
    pub started: Instant,
    pub slot: Slot,
    pub open: Open,
}

/// Relay an [`Established`] stream as a tcp-mode session: the same relay
/// (splice for bulk, half-close, idle timeout), counters and cut, and a
/// live upgrade hands it over like any other.
pub fn established(e: Established) -> Connection {
    Connection::Relaying {
        session: Session {
            relay: Relay::resume(e.idle, e.keepalive, e.c2b, e.b2c),
            client: e.client,
            upstream: e.upstream,
            cut: e.cut.tripped(),
            duration: e.duration,
            started: e.started,
            slot: e.slot,
            _open: e.open,
        },
    }
}

/// Connect to the first candidate that answers and is below its cap.
async fn connect_backend(
    route: &Route,
    peer: SocketAddr,
) -> Result<Reached<TcpStream>, connect::Unserved> {
    let timeout = route.settings.connect_timeout;
    connect::reach(route, peer.ip(), None, (), |backend, ()| async move {
        // Keepalive comes later, if the connection lives (the relay sets it).
        match sockets::connect(backend.addr, timeout, None).await {
            Ok(stream) => {
                backend.state.record_established();
                Ok(stream)
            }
            Err(e) => Err(((), e)),
        }
    })
    .await
}

/// Write all of `data` (a PROXY header: a few dozen bytes).
async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config;
    use crate::proxy::{Settings, Shared};
    use tokio::net::TcpListener;

    /// What an idle proxied connection costs is its task (this future,
    /// wrapped, inside tokio's 128-byte-aligned task cell) and its two
    /// socket registrations (256 bytes each). 440 bytes in a release build
    /// (456 with debug assertions): the cell takes 640.
    #[tokio::test]
    async fn per_connection_state_stays_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[listener.backend]]\nname = \"b\"\naddress = \"{addr}\"\n"
        );
        let cfg = config::load_str(&text, std::path::Path::new("t.toml")).unwrap();
        let metrics = crate::metrics::Metrics::new().listener("l");
        let route = Arc::new(Route::new(
            Arc::new(Settings::of(&cfg.listeners[0])),
            Arc::new(Shared::new(metrics)),
            vec![],
        ));
        let open = route.shared.open.enter();
        let conn = serve(client, addr, route, Tripwire::new(), open);
        assert!(
            size_of_val(&conn) <= 456,
            "connection: {} bytes",
            size_of_val(&conn)
        );
    }
}
