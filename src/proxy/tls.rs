//! TLS listeners: the handshake, then the listener's mode on the
//! decrypted stream, and the relay of a decrypted stream to a backend
//! (tcp mode, and WebSocket tunnels over TLS).
//!
//! A TLS connection's session keys live in this process, so a live
//! upgrade does not hand it over: it finishes here (within the old
//! process's `shutdown_timeout`) while the new process serves everything
//! else. An HTTP connection ends after the request in progress, as at a
//! graceful stop; a tcp-mode stream runs on.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info};

use super::queue::Open;
use super::stream::Stream;
use super::{ConnContext, Route, http, tcp};
use crate::config::Mode;
use crate::tls::{Handshake, handshake};

/// Serve one accepted connection of a TLS listener: handshake (counted;
/// failures summed up in the log), then its mode.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<rustls::ServerConfig>,
    mode: Mode,
    route: Arc<ArcSwap<Route>>,
    ctx: ConnContext,
    open: Open,
) {
    let started = Instant::now();
    let done = tokio::select! {
        biased;
        () = ctx.abort.tripped() => return,
        h = handshake(config, stream) => h,
    };
    let tls = match done {
        Handshake::Done(tls) => tls,
        Handshake::Silent => return,
        Handshake::Failed(error) => {
            let r = route.load();
            r.shared.metrics.tls.count(false);
            debug!(error, "TLS handshake failed");
            if let Some((count, last)) = r.shared.tls_failures.note(error) {
                info!(listener = %r.settings.name, failed = count, last_error = %last,
                    "TLS handshakes failed (summed up at most once a minute)");
            }
            return;
        }
    };
    route.load().shared.metrics.tls.count(true);
    match mode {
        Mode::Http => {
            let client = http::tls(tls);
            http::serve(client, peer, route, ctx, open, started).await;
        }
        Mode::Tcp => {
            // The task keeps only what the stream uses, not the listener's
            // route or the server's context.
            let (abort, cell) = (ctx.abort.clone(), route);
            drop(ctx);
            let route = cell.load_full();
            drop(cell);
            let local = || tls.get_ref().0.local_addr().ok();
            let Some(placed) = tcp::reach_for(&route, peer, local, &abort).await else {
                return;
            };
            // A plain tcp connection's relay turns keepalive on once it
            // has lived a second; this one is worth a handshake already.
            if let Some(k) = route.settings.keepalive {
                crate::sockets::set_keepalive(&placed.upstream, k);
            }
            let stream = Stream::new(&route, placed.slot, placed.cut, abort, open, started);
            drop(route);
            let end = stream
                .relay(tls, placed.upstream, Bytes::new(), Bytes::new())
                .await;
            debug!(end, "connection ended");
        }
        Mode::Udp => unreachable!("a udp listener has no TLS"),
    }
}
