//! TCP mode: the accept loop and one client connection's life.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::queue::{Busy, Open, Picker, Slot};
use super::relay::{self, End, Meter};
use super::tripwire::Tripwire;
use super::{Route, http, proxy_protocol};
use crate::backend::{Backend, BackendState};
use crate::config::{Mode, OnMarkedDown, ProxyProtocol};
use crate::metrics::Reject;
use crate::sockets;

/// Pause after an accept error such as EMFILE: the error persists until some
/// connection closes, and retrying at once would spin a core. HAProxy and
/// nginx back off similarly.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// What every connection task of the server shares.
#[derive(Clone, Debug)]
pub struct ConnContext {
    /// Tracks connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Tripped when shutdown begins: keep-alive HTTP connections finish
    /// their request in progress and close.
    pub draining: Tripwire,
    /// Tripped when open connections must be cut (end of shutdown grace).
    pub abort: Tripwire,
}

/// Accept connections until `stop` trips, each served with the route
/// current at its accept.
pub async fn accept_loop(
    listener: TcpListener,
    route: Arc<ArcSwap<Route>>,
    stop: Tripwire,
    ctx: ConnContext,
) {
    let stopped = stop.tripped();
    tokio::pin!(stopped);
    let mut paused = false;
    loop {
        // At max_connections, stop accepting: clients wait in the backlog.
        // (The route is not held across the accept: an old snapshot must
        // not outlive a reload while the listener is quiet.)
        let limit = {
            let current = route.load();
            current.config.max_connections.map(|max| {
                (
                    max as usize,
                    current.open.clone(),
                    current.config.name.clone(),
                )
            })
        };
        if let Some((max, open, name)) = limit {
            if open.open() >= max {
                if !paused {
                    paused = true;
                    route.load().metrics.accept_paused.inc();
                    warn!(listener = %name, max, "max_connections reached; accepting paused");
                }
                tokio::select! {
                    biased;
                    () = &mut stopped => return,
                    () = open.changed(max) => {}
                }
                continue;
            }
            if paused {
                paused = false;
                info!(listener = %name, "accepting again");
            }
        }
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let current = route.load_full();
                if let Some(allow) = &current.config.allow
                    && !allowed(allow, peer.ip())
                {
                    // Closed before any backend is contacted.
                    current.metrics.reject(Reject::Acl);
                    debug!(listener = %current.config.name, %peer, "source not allowed");
                    continue;
                }
                let open = current.open.enter();
                let span = debug_span!("conn", listener = %current.config.name, %peer);
                match current.config.mode {
                    Mode::Tcp => {
                        let abort = ctx.abort.clone();
                        ctx.tracker
                            .spawn(serve(stream, peer, current, abort, open).instrument(span));
                    }
                    Mode::Http => {
                        let conn = http::serve(stream, peer, route.clone(), ctx.clone(), open);
                        ctx.tracker.spawn(conn.instrument(span));
                    }
                }
            }
            Err(e) => {
                let name = &route.load().config.name;
                warn!(listener = %name, error = %e, "accept failed");
                tokio::select! {
                    () = &mut stopped => return,
                    () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => {}
                }
            }
        }
    }
}

/// Whether a client address is in the allow-list (IPv4 clients seen
/// through a dual-stack socket are checked as IPv4).
pub fn allowed(allow: &[ipnet::IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allow.iter().any(|net| net.contains(&ip))
}

/// Serve one client connection to its end.
async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    abort: Tripwire,
    _open: Open,
) {
    sockets::tune_stream(&client, route.config.keepalive);
    // Waiting in the queue or connecting must not outlast the shutdown
    // grace either.
    // Boxed: the connect phase (queue wait, timers, retries) is over before
    // the relay starts, and on the heap it does not make every connection's
    // task as large as its largest phase for the connection's whole life.
    let connected = tokio::select! {
        biased;
        () = abort.tripped() => return,
        c = Box::pin(connect_backend(&route, peer)) => c,
    };
    let Connected {
        backend,
        stream: upstream,
        slot,
        cut,
    } = match connected {
        Ok(connected) => connected,
        Err(reason) => {
            debug!(reason = reason.as_str(), "closing unserved");
            route.metrics.reject(reason);
            return;
        }
    };
    // getsockname only when a PROXY header is wanted.
    let version = route.config.proxy_protocol;
    if version != ProxyProtocol::Off
        && let Some(header) = client
            .local_addr()
            .ok()
            .and_then(|local| proxy_protocol::header(version, peer, local))
        && let Err(e) = write_all(&upstream, &header).await
    {
        debug!(error = %e, "sending the PROXY header failed");
        return;
    }
    let guard = slot.guard();
    let started = Instant::now();
    debug!(backend = %backend.name, "connected");
    let meter = BackendMeter(guard.state());
    let backend_down = async {
        match &cut {
            Some(signal) => signal.tripped().await,
            None => std::future::pending().await,
        }
    };
    let end = tokio::select! {
        biased;
        r = relay::relay(&client, &upstream, route.config.idle_timeout, &meter) => match r {
            Ok(End::Closed) => "closed",
            Ok(End::Idle) => "idle timeout",
            Err(e) => {
                debug!(error = %e, "relay error");
                "error"
            }
        },
        () = abort.tripped() => "cut by shutdown",
        () = backend_down => "cut: backend marked down",
    };
    route
        .metrics
        .connection_duration
        .observe(started.elapsed().as_secs_f64());
    debug!(end, "connection ended");
}

/// A client's backend connection, ready to relay.
struct Connected {
    backend: Arc<Backend>,
    stream: TcpStream,
    /// Held for the connection's life: active count and cap.
    slot: Slot,
    /// Tripped if the backend is marked down (`on_marked_down = "shutdown"`).
    cut: Option<Tripwire>,
}

/// Connect to the first candidate that answers and is below its cap,
/// trying at most `1 + retries` of them; when every candidate is at its
/// cap, wait in the listener's queue up to `queue_timeout`.
async fn connect_backend(route: &Route, peer: SocketAddr) -> Result<Connected, Reject> {
    let deadline = Instant::now() + route.config.queue_timeout;
    let mut attempts = 1 + route.config.retries as usize;
    // One selection per connection: a retry takes the next candidate.
    let mut picker = Picker::new(route.pool.candidates(peer.ip()));
    loop {
        let pick = || picker.pick(&route.queue);
        let (backend, slot) = match route.queue.acquire(deadline, pick).await {
            Ok(taken) => taken,
            Err(Busy::Capped) => return Err(Reject::MaxConnections),
            Err(Busy::NoCandidate) => return Err(Reject::NoBackend),
        };
        // Taken before connecting: a mark-down during a slow connect still
        // cuts this connection. Only listeners that cut watch for it.
        let cut = match route.config.on_marked_down {
            OnMarkedDown::Shutdown => Some(backend.state.cut_signal()),
            OnMarkedDown::Keep => None,
        };
        match sockets::connect(
            backend.addr,
            route.config.connect_timeout,
            route.config.keepalive,
        )
        .await
        {
            Ok(stream) => {
                backend.state.record_established();
                return Ok(Connected {
                    backend,
                    stream,
                    slot,
                    cut,
                });
            }
            Err(e) => {
                backend.state.record_connect_error();
                debug!(backend = %backend.name, error = %e, "backend connect failed");
                attempts -= 1;
                if attempts == 0 {
                    return Err(Reject::NoBackend);
                }
            }
        }
    }
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

/// Counts relayed bytes on the backend's live state.
struct BackendMeter<'a>(&'a BackendState);

impl Meter for BackendMeter<'_> {
    fn client_to_backend(&self, bytes: u64) {
        self.0.metrics.bytes_client_to_backend.inc_by(bytes);
    }
    fn backend_to_client(&self, bytes: u64) {
        self.0.metrics.bytes_backend_to_client.inc_by(bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config;

    /// What an idle proxied connection costs is mostly the size of its task:
    /// keep the whole per-connection future (connect phase and relay) well
    /// under HAProxy's ~3.3 KiB per idle connection.
    #[tokio::test]
    async fn per_connection_state_stays_small() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, _) = l.accept().await.unwrap();
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n[[listener.backend]]\nname = \"b\"\naddress = \"{addr}\"\n"
        );
        let cfg = config::load_str(&text, std::path::Path::new("t.toml")).unwrap();
        let metrics = crate::metrics::Metrics::new().listener("l");
        let route = Arc::new(Route::new(
            cfg.listeners[0].clone(),
            vec![],
            metrics,
            Default::default(),
            Default::default(),
        ));
        let open = route.open.enter();
        let conn = serve(client, addr, route, Tripwire::new(), open);
        assert!(
            size_of_val(&conn) <= 1024,
            "serve: {} bytes",
            size_of_val(&conn)
        );
        let state = BackendState::default();
        let meter = BackendMeter(&state);
        let relay = relay::relay(&server_side, &server_side, Duration::from_secs(1), &meter);
        assert!(
            size_of_val(&relay) <= 512,
            "relay: {} bytes",
            size_of_val(&relay)
        );
    }
}
