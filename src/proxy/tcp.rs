//! TCP mode: the accept loop and one client connection's life.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, debug_span, warn};

use super::relay::{self, End, Meter};
use super::tripwire::Tripwire;
use super::{Route, http};
use crate::backend::{ActiveGuard, Backend, BackendState};
use crate::config::{Mode, OnMarkedDown};
use crate::metrics::Reject;
use crate::sockets;

/// Pause after an accept error such as EMFILE: the error persists until some
/// connection closes, and retrying at once would spin a core. HAProxy and
/// nginx back off similarly.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

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
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let current = route.load_full();
                let span = debug_span!("conn", listener = %current.config.name, %peer);
                match current.config.mode {
                    Mode::Tcp => {
                        let abort = ctx.abort.clone();
                        ctx.tracker
                            .spawn(serve(stream, peer, current, abort).instrument(span));
                    }
                    Mode::Http => {
                        let conn = http::serve(stream, peer, route.clone(), ctx.clone());
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

/// Serve one client connection to its end.
async fn serve(client: TcpStream, peer: SocketAddr, route: Arc<Route>, abort: Tripwire) {
    sockets::tune_stream(&client);
    let Some((backend, upstream, guard)) = connect_backend(&route, peer).await else {
        debug!("no backend available; closing");
        route.metrics.reject(Reject::NoBackend);
        return;
    };
    let started = Instant::now();
    debug!(backend = %backend.name, "connected");
    let meter = BackendMeter(guard.state());
    // Only listeners that cut connections of a failed backend watch for it.
    let cut = match route.config.on_marked_down {
        OnMarkedDown::Shutdown => Some(backend.state.cut_signal()),
        OnMarkedDown::Keep => None,
    };
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

/// Connect to the first candidate that answers, trying at most
/// `1 + retries` of them.
async fn connect_backend(
    route: &Route,
    peer: SocketAddr,
) -> Option<(Arc<Backend>, TcpStream, ActiveGuard)> {
    let attempts = 1 + route.config.retries as usize;
    for backend in route.pool.candidates(peer.ip()).take(attempts) {
        let guard = backend.state.enter();
        match sockets::connect(backend.addr, route.config.connect_timeout).await {
            Ok(stream) => {
                backend.state.record_established();
                return Some((backend.clone(), stream, guard));
            }
            Err(e) => {
                backend.state.record_connect_error();
                debug!(backend = %backend.name, error = %e, "backend connect failed");
            }
        }
    }
    None
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
        let route = Arc::new(Route::new(cfg.listeners[0].clone(), vec![], metrics));
        let conn = serve(client, addr, route, Tripwire::new());
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
