//! The data path: accept → pick a backend → connect (with retry) → relay.

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
}

impl Route {
    pub fn new(
        config: Arc<ListenerConfig>,
        backends: Vec<Arc<crate::backend::Backend>>,
        metrics: ListenerMetrics,
    ) -> Route {
        Route {
            pool: Pool::new(config.algorithm, backends),
            config,
            metrics,
        }
    }

    /// The same listener and backends, re-scheduled for their current
    /// health (after a backend went up or down).
    pub fn rebuilt(&self) -> Route {
        Route::new(
            self.config.clone(),
            self.pool.backends.clone(),
            self.metrics.clone(),
        )
    }
}
