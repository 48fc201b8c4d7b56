//! HTTP mode: every request routed on its own, lbCookie stickiness.
//!
//! Client connections are served by hyper's HTTP/1.1 server (keep-alive,
//! pipelined requests answered in order, bodies streamed in both directions,
//! never buffered whole). Each request reads the listener's *current* route,
//! so a reload applies to keep-alive clients at their next request; a client
//! connection holds the listener's route cell, never a snapshot.
//!
//! lbCookie ([`super::lbcookie`]) behaves like HAProxy's `cookie NAME insert
//! indirect nocache`:
//! - a request without a valid cookie is scheduled by the algorithm; the
//!   response gets `Set-Cookie: NAME=<id>; Path=/; HttpOnly` (plus
//!   `Max-Age`) and `Cache-Control: no-cache="set-cookie"`;
//! - a cookie naming a backend that is up (even drained) pins the request
//!   there and no new cookie is set;
//! - a cookie naming a backend that is down, in maintenance, removed or
//!   unknown is ignored: the request is scheduled and a new cookie set;
//! - the balancer's own cookie is removed from the forwarded request; other
//!   cookies pass byte for byte.
//!
//! Backend connections are kept alive in the listener's idle pool
//! ([`pool`]). A request only leaves for a backend once a connection to it
//! is established, so a failed connect is retried on the next candidate with
//! the request intact (502 only when every attempt failed; 503 when there is
//! no candidate) — the same connect-with-retry loop as tcp mode
//! ([`super::connect`]). A kept-alive connection that closes under a safe
//! request without a body (GET, HEAD, OPTIONS) before any answer sends it
//! once more on a new connection: the backend closed it idle, or died.
//! Connection upgrades (WebSocket) get a dedicated backend connection and
//! are then relayed as a byte stream.
//!
//! What a request must be to reach a backend at all ([`check_host`], and
//! hyper's parser), and how client and backend faults in a body are told
//! apart, are in the README's "Hostile and malformed messages".

mod body;
pub mod pool;
mod stall;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::Instant;
use tokio_util::either::Either;
use tracing::debug;

use super::connect::{self, Reached, Unserved};
use super::prefixed::Prefixed;
use super::queue::{Open, Slot};
use super::{ConnContext, Route, Settings, Shared, lbcookie};
use crate::backend::{Backend, Via};
use crate::handover::{Frozen, FrozenHttp, Pending};
use crate::metrics::Reject;
use crate::sockets;
use crate::sync::Tripwire;
use body::{ClientFault, CounterSlot, FromClient, Lookahead, Metered};
pub use pool::ProxyBody;
use pool::Sender;
use stall::SendDeadline;

/// Largest request head (request line and headers) accepted; larger ones
/// get 431. Matches common server limits (nginx's 4 × 8 KiB buffers).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Most headers in one request, as in hyper's own default.
pub const MAX_HEADERS: usize = 100;

/// The most a connection buffers on each side of the proxy (hyper's
/// default is ~400 KiB): room for the largest head, and what a client that
/// stops reading holds until `body_timeout` — with the backend's side held
/// to the same by backpressure, a stalled reader costs about this twice.
const MAX_BUF_BYTES: usize = 2 * MAX_HEADER_BYTES;

/// The client side of an HTTP-mode connection, with any bytes read ahead:
/// a TCP socket, or on a TLS listener a TLS stream (its session keys are in
/// this process, so it is never handed over; a WebSocket on it is relayed
/// decrypted).
pub type Client = Prefixed<Either<tokio::net::TcpStream, Box<TlsStream>>>;

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// A plain client connection, with what was read of it already.
pub fn plain(client: Prefixed) -> Client {
    Prefixed::new(Either::Left(client.stream), client.prefix)
}

/// A client connection on a TLS listener, once its handshake is done.
pub fn tls(stream: Box<TlsStream>) -> Client {
    Prefixed::new(Either::Right(stream), Bytes::new())
}

/// Serve one client connection in HTTP mode; `started` is when it was
/// accepted (by the process a live upgrade took it over from, perhaps).
///
/// The connection is driven with hyper's `poll_without_shutdown`, so that
/// when it stops between two requests its socket and any bytes read ahead
/// come back: a WebSocket upgrade continues as a tunnel on them, and a
/// live upgrade hands them to the new process. Stopping is hyper's
/// graceful shutdown: an idle connection stops at once, one with a request
/// in progress answers it (with `Connection: close`) first.
pub async fn serve(
    client: Client,
    peer: SocketAddr,
    route: Arc<ArcSwap<Route>>,
    ctx: ConnContext,
    open: Open,
    started: Instant,
) {
    let (header_timeout, body_timeout, duration, listener) = {
        // TCP_NODELAY and keepalive came with the socket from the listener.
        let r = route.load();
        (
            r.settings.header_timeout,
            r.settings.body_timeout,
            r.shared.metrics.connection_duration.clone(),
            r.settings.name.clone(),
        )
    };
    let tunnel = TunnelSlot::default();
    let route_cell = route.clone();
    let https = matches!(client.stream, Either::Right(_));
    let shared = Arc::new((Forwarding::of(peer.ip(), https), tunnel.clone()));
    let service = service_fn(move |req| {
        let (route, shared) = (route.clone(), shared.clone());
        // Boxed: `poll_without_shutdown` wants an `Unpin` future.
        Box::pin(async move {
            let (forwarding, tunnel) = &*shared;
            Ok::<_, Infallible>(handle(req, peer, forwarding, &route, tunnel).await)
        })
    });
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_header_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_BUF_BYTES)
        .serve_connection(
            TokioIo::new(SendDeadline::new(client, body_timeout)),
            service,
        );
    let mut stopping = false;
    let mut handing_over = false;
    let end = loop {
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break r,
            // The handover wire trips for a live upgrade, and with `abort`.
            () = ctx.handover.sessions().tripped(), if !stopping => {
                if !ctx.handover.is_active() {
                    return; // cut by shutdown
                }
                (stopping, handing_over) = (true, true);
                std::pin::Pin::new(&mut conn).graceful_shutdown();
            }
            () = ctx.draining.tripped(), if !stopping => {
                // Shutting down: finish the request in progress, then close.
                stopping = true;
                std::pin::Pin::new(&mut conn).graceful_shutdown();
            }
            () = ctx.abort.tripped(), if stopping => return,
        }
    };
    if let Err(e) = end {
        debug!(error = %e, "http connection ended with error");
        // hyper answered a request it could not parse (400, or 431 for
        // an oversized head): a client error, counted like ours.
        if e.is_parse() {
            let status = if e.is_parse_too_large() { 431 } else { 400 };
            route_cell.load().shared.metrics.http_unrouted.count(status);
        }
        duration.observe(started.elapsed().as_secs_f64());
        return;
    }
    let parts = conn.into_parts();
    let mut client = parts.io.into_inner().into_inner();
    // What hyper read past the last request it answered.
    client.push_prefix(&parts.read_buf);
    let pending = tunnel.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Prefixed { prefix, stream } = client;
    let client = match stream {
        Either::Left(tcp) => Prefixed::new(tcp, prefix),
        Either::Right(tls) => {
            let mut client = Prefixed::new(tls, prefix);
            if let Some(t) = pending {
                t.run_tls(client, open, &route_cell, &ctx, started).await;
                return;
            }
            // close_notify, then FIN: the client sees a clean end.
            use tokio::io::AsyncWriteExt;
            let close = client.stream.shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
            duration.observe(started.elapsed().as_secs_f64());
            return;
        }
    };
    if let Some(t) = pending {
        // This task goes on as the tunnel (still tracked).
        t.run(client, open, &route_cell, started).await;
        return;
    }
    if handing_over {
        let frozen = client
            .stream
            .as_fd()
            .try_clone_to_owned()
            .map(|fd| FrozenHttp {
                listener,
                client: fd,
                peer,
                pending: client.prefix.to_vec(),
                age: started.elapsed(),
            });
        match frozen.map(|f| ctx.handover.give(Frozen::Http(f))) {
            Ok(true) => return,
            Ok(false) => debug!("the handover ended before this connection was taken"),
            Err(e) => debug!(error = %e, "freezing for the handover failed"),
        }
    }
    duration.observe(started.elapsed().as_secs_f64());
}

/// Where a request that switches protocols leaves its tunnel for the
/// connection task, which starts it on the client socket once hyper has
/// written the 101 and let go of it.
#[derive(Clone, Default)]
struct TunnelSlot(Arc<std::sync::Mutex<Option<Tunnel>>>);

/// Route and forward one request.
async fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    forwarding: &Forwarding,
    route: &ArcSwap<Route>,
    tunnel: &TunnelSlot,
) -> Response<ProxyBody> {
    let route = route.load_full();
    let (settings, shared) = (&route.settings, &route.shared);
    if let Err(reason) = check_host(&req) {
        shared.metrics.http_unrouted.count(400);
        return refusal(StatusCode::BAD_REQUEST, reason);
    }

    // lbCookie: which backend does the request ask for, if it may go there?
    let sticky = settings.sticky.as_ref();
    let pinned = sticky.and_then(|s| {
        let id = lbcookie::find_cookie(req.headers(), &s.cookie)?;
        let b = route.cookie_backend(&id)?;
        b.admits(Via::Pinned).then(|| b.clone())
    });
    if let Some(s) = sticky {
        lbcookie::strip_cookie(req.headers_mut(), &s.cookie);
    }
    let upgrade = wants_upgrade(req.headers());
    prepare_request(&mut req, forwarding, upgrade);

    // Wrap the body: bounded by body_timeout, its failures told apart
    // from the backend's, counted per backend once it is known.
    let (parts, body) = req.into_parts();
    let body_counter = CounterSlot::default();
    let fault = ClientFault::default();
    let body = FromClient::new(body, settings.body_timeout, fault.clone());
    let req = Request::from_parts(
        parts,
        Metered::new(body, body_counter.clone(), None).boxed(),
    );

    // The cookie's backend alone first: a sticky request waits for its
    // backend below its cap rather than moving. Only if that backend cannot
    // be reached does the scheduler's order take over.
    let reached = connect::reach(&route, peer.ip(), pinned.as_ref(), req, |backend, req| {
        body_counter.set(backend.state.metrics.bytes_client_to_backend.clone());
        forward(backend, settings, shared, req, upgrade)
    })
    .await;
    let Reached {
        backend,
        slot,
        cut,
        conn: sent,
    } = match reached {
        Ok(reached) => reached,
        Err(Unserved::Capped) => {
            shared.metrics.reject(Reject::MaxConnections);
            shared.metrics.http_unrouted.count(503);
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "all backends busy");
        }
        Err(Unserved::NoBackend) => {
            shared.metrics.reject(Reject::NoBackend);
            shared.metrics.http_unrouted.count(503);
            return error_response(StatusCode::SERVICE_UNAVAILABLE, "no backend available");
        }
        Err(Unserved::Unanswered) => {
            shared.metrics.http_unrouted.count(502);
            return error_response(StatusCode::BAD_GATEWAY, "bad gateway: no backend answered");
        }
    };
    let response = match sent {
        Ok(response) => response,
        Err(e) => {
            // The request body failed on the client's side (bad chunking,
            // cut short, stalled): its fault, not the backend's.
            if let Some(status) = fault.status() {
                debug!(error = %e, "client request body failed");
                shared.metrics.http_unrouted.count(status.as_u16());
                let why = if status == StatusCode::REQUEST_TIMEOUT {
                    "request body stalled"
                } else {
                    "malformed or incomplete request body"
                };
                return refusal(status, why);
            }
            debug!(backend = %backend.name, error = %e, "backend request failed");
            backend.state.metrics.http().count(502);
            return error_response(StatusCode::BAD_GATEWAY, "bad gateway");
        }
    };
    let is_switch = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    // Broken framing in the body's first part is a 502 (and the backend
    // connection, now failed, is dropped), not half a response.
    let (head, body) = response.into_parts();
    let body = if is_switch {
        Lookahead::none(body)
    } else {
        match Lookahead::read(body).await {
            Ok(body) => body,
            Err(e) => {
                debug!(backend = %backend.name, error = %e, "backend response malformed");
                backend.state.metrics.http().count(502);
                let what = if e.is_parse() {
                    "bad gateway: malformed response"
                } else {
                    "bad gateway: the backend's response was cut short"
                };
                return error_response(StatusCode::BAD_GATEWAY, what);
            }
        }
    };
    let response = Response::from_parts(head, body);
    let insert = sticky.filter(|_| !pinned.as_ref().is_some_and(|p| Arc::ptr_eq(p, &backend)));
    backend
        .state
        .metrics
        .http()
        .count(response.status().as_u16());
    let cookie = insert.and_then(|_| route.set_cookie(&backend));
    if is_switch && upgrade {
        let mut response = finish_response(response, &backend, None, cookie);
        // The tunnel is a connection of its own: it keeps the client
        // counted and the backend slot, and shutdown and mark-down reach
        // it. The connection task starts it on the client socket.
        let t = Tunnel {
            backend: hyper::upgrade::on(&mut response),
            slot,
            cut,
        };
        *tunnel.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        return response;
    }
    finish_response(response, &backend, Some(slot), cookie)
}

/// What sending a request to one backend came to: `Err` with the request,
/// untouched, when no connection could be made (the next candidate gets
/// it); `Ok(Err)` when it was sent and the backend failed — too late to try
/// elsewhere.
type Sent = Result<Result<Response<Incoming>, hyper::Error>, (Request<ProxyBody>, std::io::Error)>;

/// Send `req` to `backend` on a pooled keep-alive connection, or a new one.
/// A pooled connection that turns out closed before the request left is
/// replaced by a new connection once.
async fn forward(
    backend: Arc<Backend>,
    settings: &Settings,
    shared: &Arc<Shared>,
    mut req: Request<ProxyBody>,
    upgrade: bool,
) -> Sent {
    // Upgrades take a connection of their own: it never returns to the pool.
    let mut pooled = if upgrade {
        None
    } else {
        shared.idle.checkout(&backend)
    };
    loop {
        let reused = pooled.is_some();
        let mut sender = match pooled.take() {
            Some(s) => s,
            None => match connect(&backend, settings).await {
                Ok(s) => s,
                Err(e) => return Err((req, e)),
            },
        };
        // A kept-alive connection can die under a request (the backend
        // closed it idle, or was killed): a request that is safe to send
        // twice and has no body is kept to send again on a new one.
        let replay = reused.then(|| replayable(&req)).flatten();
        match sender.try_send_request(req).await {
            Ok(response) => {
                if !upgrade {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        // Ready again once the response body has been read.
                        if sender.ready().await.is_ok() {
                            shared.idle.checkin(&backend, sender);
                        }
                    });
                }
                return Ok(Ok(response));
            }
            Err(mut e) => match (e.take_message(), replay) {
                (Some(back), _) if reused => req = back,
                (Some(back), _) => return Err((back, std::io::Error::other(e.into_error()))),
                // It closed or reset with no answer; an answer that did
                // not parse is the backend's, a 502.
                (None, Some(again)) if !e.error().is_parse() => {
                    debug!(backend = %backend.name, error = %e.error(), "kept-alive connection failed under a request; sending it again");
                    req = again;
                }
                (None, _) => return Ok(Err(e.into_error())),
            },
        }
    }
}

/// A copy of `req` to send again if its connection fails before the
/// response: only safe methods (RFC 9110 §9.2.1) without a body, which the
/// backend may see twice without harm (HAProxy's `retry-on` for a reused
/// connection does the same).
fn replayable(req: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
    let safe = matches!(
        *req.method(),
        hyper::Method::GET | hyper::Method::HEAD | hyper::Method::OPTIONS
    );
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// A new keep-alive connection to `backend`.
async fn connect(backend: &Backend, settings: &Settings) -> std::io::Result<Sender> {
    let stream =
        sockets::connect(backend.addr, settings.connect_timeout, settings.keepalive).await?;
    backend.state.record_established();
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_BUF_BYTES)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "backend connection ended with error");
        }
    });
    Ok(sender)
}

/// An upgraded connection (WebSocket), to be relayed as a byte stream.
struct Tunnel {
    /// The backend's side, once its 101 has been read.
    backend: hyper::upgrade::OnUpgrade,
    /// The backend slot (active count, cap) for the tunnel's life.
    slot: Slot,
    /// Tripped if the backend is marked down (`on_marked_down =
    /// "shutdown"`) or the shutdown grace is over.
    cut: Tripwire,
}

impl Tunnel {
    /// Relay as a tcp-mode session from here (`open` keeps it counted as
    /// a client connection): the same relay, counters and cut, and a live
    /// upgrade hands it over like any tcp connection.
    async fn run(self, client: Prefixed, open: Open, route: &ArcSwap<Route>, started: Instant) {
        let Some((upstream, read_ahead)) = upgraded(self.backend).await else {
            return;
        };
        let route = route.load();
        let conn = super::tcp::established(super::tcp::Established {
            client: client.stream,
            upstream,
            c2b: Pending {
                bytes: client.prefix.to_vec(),
                done: false,
            },
            b2c: Pending {
                bytes: read_ahead.to_vec(),
                done: false,
            },
            idle: route.settings.idle_timeout,
            keepalive: None, // set on the backend socket when it was made
            cut: self.cut,
            duration: route.shared.metrics.connection_duration.clone(),
            started,
            slot: self.slot,
            open,
        });
        drop(route);
        conn.await;
    }
}

impl Tunnel {
    /// The same over TLS: the decrypted stream relayed to the backend
    /// (half-close, idle timeout, counters, cut), never handed over.
    async fn run_tls(
        self,
        client: Prefixed<Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>,
        open: Open,
        route: &ArcSwap<Route>,
        ctx: &ConnContext,
        started: Instant,
    ) {
        let Some((upstream, read_ahead)) = upgraded(self.backend).await else {
            return;
        };
        let abort = ctx.abort.clone();
        let stream =
            super::stream::Stream::new(&route.load(), self.slot, self.cut, abort, open, started);
        let end = stream
            .relay(client.stream, upstream, client.prefix, read_ahead)
            .await;
        debug!(end, "tunnel ended");
    }
}

/// The backend's side of an upgraded connection, once its 101 has been
/// read: its socket (ours, made by `connect`) and what hyper read past the
/// 101.
async fn upgraded(backend: hyper::upgrade::OnUpgrade) -> Option<(tokio::net::TcpStream, Bytes)> {
    let Ok(backend) = backend.await else {
        debug!("upgrade did not complete");
        return None;
    };
    let Ok(parts) = backend.downcast::<TokioIo<tokio::net::TcpStream>>() else {
        debug!("upgraded backend connection is not a TCP stream");
        return None;
    };
    Some((parts.io.into_inner(), parts.read_buf))
}

/// Whether the client asks to switch protocols (WebSocket and the like).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded as such.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Remove hop-by-hop headers, including those the Connection header names.
/// An upgrade keeps `Upgrade` and `Connection: upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // `Connection: Upgrade` names the Upgrade header itself: keep it aside.
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if let Some(to) = upgrade_to {
        headers.insert(header::UPGRADE, to);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// What a client's requests say about it to the backend, formatted once
/// per client connection rather than per request.
struct Forwarding {
    /// The client's address: `X-Forwarded-For` when the request has none,
    /// appended to the request's own otherwise.
    xff: Option<HeaderValue>,
    /// `Forwarded: for=<client>;proto=http` (or `https`).
    forwarded: Option<HeaderValue>,
    /// A TLS listener's: `X-Forwarded-Proto: https` and `Forwarded`,
    /// replacing any the client sent (it could claim a protection it does
    /// not have).
    https: bool,
}

impl Forwarding {
    fn of(client: IpAddr, https: bool) -> Forwarding {
        let client = client.to_canonical();
        let node = match client {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        Forwarding {
            xff: HeaderValue::from_str(&client.to_string()).ok(),
            forwarded: HeaderValue::from_str(&format!(
                "for={node};proto={}",
                if https { "https" } else { "http" }
            ))
            .ok(),
            https,
        }
    }
}

/// Make the client's request fit to forward: hop-by-hop headers out,
/// `X-Forwarded-For` appended, `X-Forwarded-Proto` and `Forwarded` added,
/// origin-form target.
fn prepare_request(req: &mut Request<Incoming>, forwarding: &Forwarding, upgrade: bool) {
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let xff_name = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<&str> = headers
        .get_all(&xff_name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let xff = match (&forwarding.xff, prior.is_empty()) {
        (Some(client), false) => {
            let client = client.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{}, {client}", prior.join(", "))).ok()
        }
        (xff, _) => xff.clone(),
    };
    if let Some(v) = xff {
        headers.insert(xff_name, v);
    }
    let proto = HeaderName::from_static("x-forwarded-proto");
    if forwarding.https {
        headers.insert(proto, HeaderValue::from_static("https"));
    } else if !headers.contains_key(&proto) {
        headers.insert(proto, HeaderValue::from_static("http"));
    }
    // Ours follows any the client sent; on a TLS listener it replaces
    // them, as X-Forwarded-Proto does (a client could claim `proto=https`
    // for an element of its own).
    if forwarding.https {
        headers.remove(header::FORWARDED);
    }
    if let Some(v) = forwarding.forwarded.clone() {
        headers.append(header::FORWARDED, v);
    }
    // An absolute-form target (a proxy-style request) names the host:
    // it becomes the Host the backend sees (RFC 9112 §3.2.2), and the
    // target origin-form.
    if req.uri().scheme().is_some() {
        if let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        if let Some(pq) = req.uri().path_and_query()
            && let Ok(uri) = pq.as_str().parse()
        {
            *req.uri_mut() = uri;
        }
    }
}

/// RFC 9112 §3.2: exactly one valid `Host` in an HTTP/1.1 request (at most
/// one in HTTP/1.0), and no user info in an absolute-form target — else
/// 400, before any backend sees the request. Two hosts would let the
/// proxy route by one while the backend serves the other.
fn check_host<B>(req: &Request<B>) -> Result<(), &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    let Some(host) = host else {
        return match req.version() {
            hyper::Version::HTTP_10 | hyper::Version::HTTP_09 => Ok(()),
            _ => Err("no Host header"),
        };
    };
    // uri-host [ ":" port ], or empty for a target without an authority.
    let valid = host.is_empty()
        || (!host.as_bytes().contains(&b'@')
            && hyper::http::uri::Authority::try_from(host.as_bytes()).is_ok());
    if !valid {
        return Err("the Host header is not a host");
    }
    if req
        .uri()
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err("user info in the request target");
    }
    Ok(())
}

/// The backend's response, made fit for the client: hop-by-hop headers out,
/// the lbCookie inserted when needed, the body counted and holding the
/// backend's in-flight count until it ends.
fn finish_response(
    response: Response<Lookahead>,
    backend: &Backend,
    slot: Option<Slot>,
    set_cookie: Option<&HeaderValue>,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if let Some(v) = set_cookie {
        lbcookie::insert(&mut parts.headers, v);
    }
    let counter = CounterSlot::default();
    counter.set(backend.state.metrics.bytes_backend_to_client.clone());
    Response::from_parts(parts, Metered::new(body, counter, slot).boxed())
}

/// A request refused for what the client sent: the connection closes after
/// the answer, since what follows on it cannot be trusted to be framed.
fn refusal(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = error_response(status, message);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(
            Full::new(Bytes::from(format!("{message}\n")))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_by_connection() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
