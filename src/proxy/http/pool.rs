//! HTTP mode's idle keep-alive connections to backends, one pool per
//! listener keyed by backend address.
//!
//! A connection is only handed out for a backend that is up: one that went
//! down loses its idle connections at the next checkout, so nothing of
//! health has to reach in here. Entries of backends that left the pool
//! expire like any idle connection and are swept.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashMap;
use http_body_util::combinators::BoxBody;
use tokio::time::Instant;

use crate::backend::Backend;

/// Why a body failed: hyper's error, or one of the proxy's bounds.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, BodyError>;

/// A backend connection's request handle.
pub type Sender = hyper::client::conn::http1::SendRequest<ProxyBody>;

/// Idle keep-alive connections kept per backend. Enough for bursts at a few
/// thousand requests per second; idle ones cost the backend a socket each.
const POOL_MAX_IDLE: usize = 64;

/// Idle backend connections older than this are not reused: many servers
/// close idle keep-alive connections after 5–75 s (Apache 5 s, nginx 75 s),
/// and a connection closed under a request costs that request.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Idle backend connections of one listener.
#[derive(Debug, Default)]
pub struct IdlePool {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    idle: HashMap<SocketAddr, Vec<Idle>>,
    /// When expired entries of every address were last dropped.
    swept: Option<Instant>,
}

#[derive(Debug)]
struct Idle {
    since: Instant,
    sender: Sender,
}

impl IdlePool {
    /// A ready connection to `backend`, if it is up and one is idle.
    pub fn checkout(&self, backend: &Backend) -> Option<Sender> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !backend.state.is_up() {
            // Idle connections to a backend marked down lead nowhere.
            inner.idle.remove(&backend.addr);
            return None;
        }
        let idle = inner.idle.get_mut(&backend.addr)?;
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < POOL_IDLE_TIMEOUT && conn.sender.is_ready() {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Keep a connection whose response has been read, for the next
    /// request to the same backend.
    pub fn checkin(&self, backend: &Backend, sender: Sender) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if inner
            .swept
            .is_none_or(|t| now.duration_since(t) >= POOL_IDLE_TIMEOUT)
        {
            inner.swept = Some(now);
            inner.idle.retain(|_, list| {
                list.retain(|c| now.duration_since(c.since) < POOL_IDLE_TIMEOUT);
                !list.is_empty()
            });
        }
        if !backend.state.is_up() {
            return;
        }
        let list = inner.idle.entry(backend.addr).or_default();
        if list.len() < POOL_MAX_IDLE {
            list.push(Idle { since: now, sender });
        }
    }

    /// Idle connections held now (all backends).
    pub fn idle(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.idle.values().map(Vec::len).sum()
    }
}
