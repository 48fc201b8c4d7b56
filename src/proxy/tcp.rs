//! TCP mode: one client connection's life.
//!
//! The connection is placed with the route current at its accept (queue,
//! connect with retry, PROXY header), then the route is let go: while the
//! bytes flow it holds its client and backend sockets, its backend slot
//! (the backend's live state), its stop signals and its idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Route;
use super::connect::{self, Reached};
use super::proxy_protocol;
use super::queue::Open;
use super::relay::{self, End, Meter};
use crate::backend::BackendState;
use crate::config::ProxyProtocol;
use crate::sockets;
use crate::sync::{self, Tripwire};

/// Serve one client connection to its end.
pub async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    route: Arc<Route>,
    abort: Tripwire,
    _open: Open,
) {
    // TCP_NODELAY and keepalive came with the socket from the listener.
    // Waiting in the queue or connecting must not outlast the shutdown
    // grace either.
    // Boxed: the connect phase (queue wait, timers, retries) is over before
    // the relay starts, and on the heap it does not make every connection's
    // task as large as its largest phase for the connection's whole life.
    let reached = tokio::select! {
        biased;
        () = abort.tripped() => return,
        r = Box::pin(connect_backend(&route, peer)) => r,
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
            return;
        }
    };
    // getsockname only when a PROXY header is wanted.
    let version = route.settings.proxy_protocol;
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
    debug!(backend = %backend.name, "connected");
    // From here on the connection holds what it uses, not the route: a
    // session that lasts for days pins no pool.
    let idle_timeout = route.settings.idle_timeout;
    let route_keepalive = route.settings.keepalive;
    let duration = route.shared.metrics.connection_duration.clone();
    drop((route, backend));
    let started = Instant::now();
    let meter = BackendMeter {
        state: slot.guard().state(),
        keepalive: route_keepalive,
    };
    let end = tokio::select! {
        biased;
        r = relay::relay(&client, &upstream, idle_timeout, &meter) => match r {
            Ok(End::Closed) => "closed",
            Ok(End::Idle) => "idle timeout",
            Err(e) => {
                debug!(error = %e, "relay error");
                "error"
            }
        },
        () = abort.tripped() => "cut by shutdown",
        () = sync::tripped_or_never(cut.as_ref()) => "cut: backend marked down",
    };
    duration.observe(started.elapsed().as_secs_f64());
    debug!(end, "connection ended");
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

/// Counts relayed bytes on the backend's live state, and carries the
/// keepalive the relay sets on the backend socket later.
struct BackendMeter<'a> {
    state: &'a BackendState,
    keepalive: Option<crate::config::Keepalive>,
}

impl Meter for BackendMeter<'_> {
    fn client_to_backend(&self, bytes: u64) {
        self.state.metrics.bytes_client_to_backend.inc_by(bytes);
    }
    fn backend_to_client(&self, bytes: u64) {
        self.state.metrics.bytes_backend_to_client.inc_by(bytes);
    }

    fn backend_keepalive(&self) -> Option<crate::config::Keepalive> {
        self.keepalive
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config;
    use crate::proxy::{Settings, Shared};
    use tokio::net::TcpListener;

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
            Arc::new(Settings::of(&cfg.listeners[0])),
            Arc::new(Shared::new(metrics)),
            vec![],
        ));
        let open = route.shared.open.enter();
        let conn = serve(client, addr, route, Tripwire::new(), open);
        assert!(
            size_of_val(&conn) <= 1024,
            "serve: {} bytes",
            size_of_val(&conn)
        );
        let state = BackendState::default();
        let meter = BackendMeter {
            state: &state,
            keepalive: None,
        };
        let relay = relay::relay(&server_side, &server_side, Duration::from_secs(1), &meter);
        assert!(
            size_of_val(&relay) <= 512,
            "relay: {} bytes",
            size_of_val(&relay)
        );
    }
}
