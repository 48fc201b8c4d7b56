//! The data path: accept → pick a backend → connect (with retry) → relay.

pub mod http;
pub mod proxy_protocol;
pub mod queue;
pub mod relay;
pub mod tcp;
pub mod tripwire;

use std::sync::Arc;

use crate::balancer::Pool;
use crate::config::ListenerConfig;
use crate::metrics::ListenerMetrics;

/// Everything a listener needs to serve one new connection: its settings and
/// the current pool. Published with `ArcSwap`; each connection takes the
/// snapshot current at its accept and keeps it to its end.
#[derive(Debug)]
pub struct Route {
    pub config: Arc<ListenerConfig>,
    pub pool: Pool,
    pub metrics: ListenerMetrics,
    /// HTTP mode with lbCookie: cookie value → index in `pool.backends`;
    /// empty for other listeners. Shared by rebuilt routes.
    pub cookie_ids: Arc<hashbrown::HashMap<String, usize>>,
    /// The listener's queue for capped backends (kept across reloads).
    pub queue: Arc<queue::Queue>,
    /// The listener's open client connections (kept across reloads).
    pub open: Arc<queue::OpenCount>,
}

impl Route {
    pub fn new(
        config: Arc<ListenerConfig>,
        backends: Vec<Arc<crate::backend::Backend>>,
        metrics: ListenerMetrics,
        queue: Arc<queue::Queue>,
        open: Arc<queue::OpenCount>,
    ) -> Route {
        let cookie_ids = match &config.sticky {
            Some(_) => backends
                .iter()
                .enumerate()
                .map(|(i, b)| (http::cookie_id(&config.name, &b.name), i))
                .collect(),
            None => Default::default(),
        };
        Route {
            pool: Pool::new(config.algorithm, backends),
            config,
            metrics,
            cookie_ids: Arc::new(cookie_ids),
            queue,
            open,
        }
    }

    /// The same listener and backends, re-scheduled for their current
    /// health (after a backend went up or down).
    pub fn rebuilt(&self) -> Route {
        Route {
            pool: Pool::new(self.config.algorithm, self.pool.backends.clone()),
            config: self.config.clone(),
            metrics: self.metrics.clone(),
            cookie_ids: self.cookie_ids.clone(),
            queue: self.queue.clone(),
            open: self.open.clone(),
        }
    }
}
