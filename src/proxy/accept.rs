//! The accept loop of tcp and http listeners: allow-list, the listener's
//! connection cap, and a task per accepted connection.

use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::prefixed::Prefixed;
use super::{ConnContext, Route, http, tcp};
use crate::config::Mode;
use crate::metrics::Reject;
use crate::sockets::{self, ACCEPT_ERROR_BACKOFF};
use crate::sync::Tripwire;
use bytes::Bytes;
use tokio::time::Instant;

/// Accept connections until `stop` trips, each placed with the route
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
    // The options accepted connections inherit, as last set on the socket
    // (first when it was bound, from the config this route is of).
    let mut tuned = route.load().settings.keepalive;
    loop {
        // At max_connections, stop accepting: clients wait in the backlog.
        // (The route is not held across the accept: an old snapshot must
        // not outlive a reload while the listener is quiet.)
        let limit = {
            let current = route.load();
            let s = &current.settings;
            s.max_connections
                .map(|max| (max as usize, current.shared.clone(), s.name.clone()))
        };
        if let Some((max, shared, name)) = limit {
            if shared.open.open() >= max {
                if !paused {
                    paused = true;
                    shared.metrics.accept_paused.inc();
                    warn!(listener = %name, max, "max_connections reached; accepting paused");
                }
                tokio::select! {
                    biased;
                    () = &mut stopped => return,
                    () = shared.open.changed(max) => {}
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
                let settings = &current.settings;
                if tuned != settings.keepalive {
                    // A reload changed them while this connection waited in
                    // the backlog with the old ones: it gets its own, and
                    // the listener the new ones for those after it.
                    sockets::tune_inherited(&stream, settings.keepalive);
                    sockets::tune_inherited(&listener, settings.keepalive);
                    tuned = settings.keepalive;
                }
                if let Some(allow) = &settings.allow
                    && !allowed(allow, peer.ip())
                {
                    // Closed before any backend is contacted.
                    current.shared.metrics.reject(Reject::Acl);
                    debug!(listener = %settings.name, %peer, "source not allowed");
                    continue;
                }
                let open = current.shared.open.enter();
                let span = debug_span!("conn", listener = %settings.name, %peer);
                if let Some(tls) = &settings.tls {
                    let (config, mode) = (tls.config.clone(), settings.mode);
                    drop(current);
                    let (route, conn_ctx) = (route.clone(), ctx.clone());
                    let conn = super::tls::serve(stream, peer, config, mode, route, conn_ctx, open);
                    ctx.kept.spawn(conn.instrument(span));
                    continue;
                }
                match settings.mode {
                    Mode::Tcp => {
                        let abort = ctx.abort.clone();
                        let conn = tcp::serve(stream, peer, current, abort, open);
                        ctx.tracker.spawn(conn.instrument(span));
                    }
                    Mode::Http => {
                        drop(current);
                        let client = http::plain(Prefixed::new(stream, Bytes::new()));
                        let conn = http::serve(
                            client,
                            peer,
                            route.clone(),
                            ctx.clone(),
                            open,
                            Instant::now(),
                        );
                        ctx.tracker.spawn(conn.instrument(span));
                    }
                    Mode::Udp => unreachable!("a udp listener has no TCP socket"),
                }
            }
            Err(e) => {
                let name = route.load().settings.name.clone();
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
