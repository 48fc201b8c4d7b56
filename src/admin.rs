//! The admin endpoint: Prometheus metrics, liveness/readiness, status and
//! runtime admin state, over HTTP/1.1 (hyper).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /` | the status page (`status_page.html`), for a person |
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 once listeners are bound and the config loaded; 503 before and during shutdown |
//! | `GET /api/v1/status` | JSON: listeners, backends, health, admin state, counters |
//! | `GET /api/v1/listeners/{l}/backends/{b}/state` | the backend's admin state |
//! | `PUT /api/v1/listeners/{l}/backends/{b}/state` | body `ready`, `drain` or `maint` |
//!
//! Names in paths are percent-decoded (a discovered backend is
//! `web@[2001:db8::1]:80`, sent as `web%40%5B2001%3Adb8%3A%3A1%5D%3A80`).
//!
//! Reads are open to whoever reaches the admin address (loopback by
//! default). With a token configured, a state change needs
//! `Authorization: Bearer <token>`, compared in constant time and never
//! logged. Unknown paths answer 404, known paths with the wrong method 405
//! (with `Allow`), malformed requests 400 with a one-line reason.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::backend::{AdminState, BackendState};
use crate::config::Secret;
use crate::metrics::Metrics;
use crate::server::{Directory, ListenerView};
use crate::sockets::{self, ACCEPT_ERROR_BACKOFF};
use crate::sync::Tripwire;

/// A slow or idle admin client cannot hold a connection open for ever
/// waiting for its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request body accepted (a state name is a few bytes).
const MAX_BODY: usize = 1024;

/// Admin connections served at once. Beyond it a new connection is answered
/// 503 and closed at once: a flood of scrapes or a client that opens
/// connections and sits on them costs a bounded number of tasks and fds,
/// and the data path none of its own.
pub const MAX_CONNECTIONS: usize = 64;

/// The status page: one self-contained file, compiled in.
const STATUS_PAGE: &str = include_str!("status_page.html");

/// The page's Content-Security-Policy: its own inline script and style
/// (by hash) and requests to this endpoint, nothing else; no framing, so
/// another site cannot overlay its buttons.
fn status_page_policy() -> &'static str {
    static POLICY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let hash = |tag: &str| {
            use base64::Engine;
            use sha2::Digest;
            let open = format!("<{tag}>");
            let start = STATUS_PAGE.find(&open).expect("page has the tag") + open.len();
            let end = STATUS_PAGE.find(&format!("</{tag}>")).expect("tag closed");
            let digest = sha2::Sha256::digest(&STATUS_PAGE.as_bytes()[start..end]);
            format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            )
        };
        format!(
            "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
             img-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
            hash("script"),
            hash("style")
        )
    });
    &POLICY
}

/// Written, without waiting, to a connection over [`MAX_CONNECTIONS`].
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 28\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many admin connections\r\n";

/// What the admin endpoint reads and changes.
#[derive(Debug)]
pub struct AdminContext {
    pub directory: Arc<Directory>,
    pub metrics: Arc<Metrics>,
    /// Listeners bound and config loaded, and not shutting down.
    pub ready: AtomicBool,
    /// Required bearer token for changes, if any (replaced on reload).
    pub token: ArcSwap<Option<Secret>>,
}

impl AdminContext {
    pub fn new(
        directory: Arc<Directory>,
        metrics: Arc<Metrics>,
        token: Option<Secret>,
    ) -> Arc<Self> {
        Arc::new(AdminContext {
            directory,
            metrics,
            ready: AtomicBool::new(false),
            token: ArcSwap::from_pointee(token),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// A running admin server.
#[derive(Debug)]
pub struct AdminServer {
    /// The listening socket (a duplicate of the serving task's), for a
    /// live upgrade to hand over.
    socket: std::os::fd::OwnedFd,
    stop: Tripwire,
    /// Sent once the endpoint has stopped accepting.
    stopped: tokio::sync::oneshot::Receiver<()>,
}

impl AdminServer {
    /// Bind `bind` and serve on it.
    pub fn start(bind: SocketAddr, ctx: Arc<AdminContext>) -> std::io::Result<AdminServer> {
        AdminServer::serve_on(sockets::bind_listener(bind, false)?, ctx)
    }

    /// Serve on a bound socket (a live upgrade hands the old process's
    /// over).
    ///
    /// The endpoint runs on a thread of its own, at a lower CPU priority,
    /// with its own event loop: a flood of scrapes (each one encodes every
    /// metric) never queues behind or in front of a connection on the data
    /// path's workers, and when the CPUs are short the data path gets them
    /// first (as Envoy keeps its admin off the worker threads).
    pub fn serve_on(listener: TcpListener, ctx: Arc<AdminContext>) -> std::io::Result<AdminServer> {
        use std::os::fd::AsFd;
        let local_addr = listener.local_addr()?;
        let socket = listener.as_fd().try_clone_to_owned()?;
        let listener = listener.into_std()?;
        let stop = Tripwire::new();
        let (done, stopped) = tokio::sync::oneshot::channel();
        let wire = stop.clone();
        std::thread::Builder::new()
            .name("switchyard-admin".into())
            .spawn(move || run_thread(listener, ctx, wire, done))?;
        info!(addr = %local_addr, "admin listening");
        Ok(AdminServer {
            socket,
            stop,
            stopped,
        })
    }

    /// The listening socket, for a live upgrade to hand over.
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.socket.as_fd()
    }

    /// Stop accepting; requests in progress finish on their own.
    pub async fn stop(self) {
        self.stop.trip();
        let _ = self.stopped.await;
    }
}

/// The admin thread: lower its priority, serve until `stop` trips, say so,
/// then give connections still open up to `HEADER_TIMEOUT` to finish.
fn run_thread(
    listener: std::net::TcpListener,
    ctx: Arc<AdminContext>,
    stop: Tripwire,
    done: tokio::sync::oneshot::Sender<()>,
) {
    // Nice 10 for this thread alone (Linux applies it per thread): only a
    // preference, so a failure changes nothing but the order.
    // SAFETY: plain syscalls on this thread's own id.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "admin endpoint cannot start its event loop");
            return;
        }
    };
    runtime.block_on(async move {
        let connections = tokio_util::task::TaskTracker::new();
        match TcpListener::from_std(listener) {
            Ok(listener) => serve(listener, ctx, stop, &connections).await,
            Err(e) => warn!(error = %e, "admin endpoint cannot use its socket"),
        }
        let _ = done.send(());
        connections.close();
        let _ = tokio::time::timeout(HEADER_TIMEOUT, connections.wait()).await;
    });
}

async fn serve(
    listener: TcpListener,
    ctx: Arc<AdminContext>,
    stop: Tripwire,
    connections: &tokio_util::task::TaskTracker,
) {
    let stopped = stop.tripped();
    tokio::pin!(stopped);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stopped => return,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and the like persist until something closes:
                    // back off rather than spin (the data path does too).
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // A full socket buffer just loses the courtesy.
            let _ = stream.try_write(BUSY);
            debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let ctx = ctx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(req, &ctx, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "admin connection ended with error");
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

fn text(status: StatusCode, body: impl Into<String>) -> Reply {
    let mut body = body.into();
    body.push('\n');
    reply(status, "text/plain; charset=utf-8", body)
}

fn json_reply(status: StatusCode, value: &serde_json::Value) -> Reply {
    reply(status, "application/json", value.to_string())
}

fn method_not_allowed(allow: &'static str) -> Reply {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
    r
}

/// Route one request.
pub async fn handle(req: Request<Incoming>, ctx: &AdminContext, peer: SocketAddr) -> Reply {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        [""] => match *req.method() {
            Method::GET | Method::HEAD => {
                let mut r = reply(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
                let h = r.headers_mut();
                use hyper::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderValue};
                h.insert(
                    CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(status_page_policy()),
                );
                h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
                h.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                r
            }
            _ => method_not_allowed("GET, HEAD"),
        },
        ["metrics"] => match *req.method() {
            Method::GET | Method::HEAD => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                ctx.metrics.encode(),
            ),
            _ => method_not_allowed("GET, HEAD"),
        },
        ["healthz"] => match *req.method() {
            Method::GET | Method::HEAD => text(StatusCode::OK, "ok"),
            _ => method_not_allowed("GET, HEAD"),
        },
        ["readyz"] => match *req.method() {
            Method::GET | Method::HEAD if ctx.ready.load(Ordering::SeqCst) => {
                text(StatusCode::OK, "ready")
            }
            Method::GET | Method::HEAD => text(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
            _ => method_not_allowed("GET, HEAD"),
        },
        ["api", "v1", "status"] => match *req.method() {
            Method::GET => {
                let mut doc = status(&ctx.directory);
                // The status page offers state changes without asking for a
                // token when none is needed.
                doc["admin"] = json!({"token_required": ctx.token.load().is_some()});
                json_reply(StatusCode::OK, &doc)
            }
            _ => method_not_allowed("GET"),
        },
        [
            "api",
            "v1",
            "listeners",
            listener,
            "backends",
            backend,
            "state",
        ] => {
            // A discovered backend's name (`web@[2001:db8::1]:80`) comes
            // percent-encoded.
            let (Some(listener), Some(backend)) = (decoded(listener), decoded(backend)) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "listener and backend names must be percent-encoded UTF-8",
                );
            };
            match *req.method() {
                Method::GET => match find_backend(ctx, &listener, &backend) {
                    Some(state) => json_reply(
                        StatusCode::OK,
                        &json!({"listener": listener, "backend": backend,
                                "admin_state": state.admin_state().as_str()}),
                    ),
                    None => not_found_backend(&listener, &backend),
                },
                Method::PUT => set_state(req, ctx, peer, &listener, &backend).await,
                _ => method_not_allowed("GET, PUT"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, format!("no such endpoint: {path}")),
    }
}

/// A path segment, percent-decoded; `None` unless it decodes to UTF-8.
fn decoded(segment: &str) -> Option<String> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn not_found_backend(listener: &str, backend: &str) -> Reply {
    text(
        StatusCode::NOT_FOUND,
        format!("no backend `{backend}` in listener `{listener}`"),
    )
}

fn find_view(ctx: &AdminContext, listener: &str) -> Option<ListenerView> {
    ctx.directory
        .load()
        .iter()
        .find(|v| &*v.name == listener)
        .cloned()
}

fn find_backend(ctx: &AdminContext, listener: &str, backend: &str) -> Option<Arc<BackendState>> {
    let route = find_view(ctx, listener)?.route.load_full();
    let b = route.pool.backends.iter().find(|b| &*b.name == backend)?;
    Some(b.state.clone())
}

async fn set_state(
    req: Request<Incoming>,
    ctx: &AdminContext,
    peer: SocketAddr,
    listener: &str,
    backend: &str,
) -> Reply {
    if let Some(token) = &**ctx.token.load() {
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !presented.is_some_and(|p| token.matches(p)) {
            warn!(%peer, listener, backend, "admin state change refused: missing or wrong token");
            let mut r = text(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer"),
            );
            return r;
        }
    }
    // The body has the headers' bound too: a client that sends headers
    // and then nothing does not keep its connection.
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(HEADER_TIMEOUT, collect).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(_)) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("body must be at most {MAX_BODY} bytes"),
            );
        }
        Err(_) => {
            return text(
                StatusCode::REQUEST_TIMEOUT,
                format!("no whole body within {}s", HEADER_TIMEOUT.as_secs()),
            );
        }
    };
    let Some(new) = std::str::from_utf8(&body)
        .ok()
        .and_then(|s| AdminState::parse(s.trim()))
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "body must be one of: ready, drain, maint",
        );
    };
    // The listener's owner sets it and rebuilds the pool before answering:
    // once the caller sees 200, no new connection goes to a drained backend.
    let changed = match find_view(ctx, listener) {
        Some(view) => view.backends.set_admin_state(backend, new).await,
        None => None,
    };
    let Some(old) = changed else {
        return not_found_backend(listener, backend);
    };
    info!(%peer, listener, backend, from = old.as_str(), to = new.as_str(), "admin state changed");
    json_reply(
        StatusCode::OK,
        &json!({"listener": listener, "backend": backend, "admin_state": new.as_str()}),
    )
}

/// The `/api/v1/status` document.
pub fn status(directory: &Directory) -> serde_json::Value {
    let listeners: Vec<_> = directory
        .load()
        .iter()
        .map(|view| {
            let route = view.route.load();
            let c = &route.settings;
            let in_rotation: Vec<&str> = route.pool.in_rotation().map(|b| &*b.name).collect();
            let backends: Vec<_> = route
                .pool
                .backends
                .iter()
                .map(|b| {
                    let s = &b.state;
                    let (c2b, b2c) = s.bytes();
                    json!({
                        "name": &*b.name,
                        "address": b.address,
                        "resolved_address": b.addr.to_string(),
                        "weight": b.weight,
                        "backup": b.backup,
                        "max_connections": b.max_connections,
                        "discovered_from": b.discovered_from.as_deref(),
                        "health": if s.is_up() { "up" } else { "down" },
                        "check_kind": c.health_check.kind.as_str(),
                        "check_reason": b.health.reason(),
                        "role": b.health.role().map(|r| r.as_str()),
                        "admin_state": s.admin_state().as_str(),
                        "in_rotation": in_rotation.contains(&&*b.name),
                        "active_connections": s.active(),
                        "connections_total": s.total(),
                        "connect_errors_total": s.connect_errors(),
                        "bytes_client_to_backend": c2b,
                        "bytes_backend_to_client": b2c,
                    })
                })
                .collect();
            let active: u64 = route.pool.backends.iter().map(|b| b.state.active()).sum();
            json!({
                "name": &*view.name,
                "bind": view.bind.to_string(),
                "local_addr": view.local_addr.to_string(),
                "mode": c.mode.as_str(),
                "algorithm": c.algorithm.as_str(),
                "active_connections": active,
                "open_client_connections": route.shared.open.open(),
                "max_connections": c.max_connections,
                "queued_connections": route.shared.queue.waiting(),
                "tls": c.tls.as_ref().map(|t| json!({
                    "min_version": t.min_version.as_str(),
                    "certificates": t.certificates.iter().map(|cert| json!({
                        "names": cert.names,
                        "not_after": humantime::format_rfc3339_seconds(cert.not_after).to_string(),
                    })).collect::<Vec<_>>(),
                })),
                "backends": backends,
            })
        })
        .collect();
    json!({ "listeners": listeners })
}
