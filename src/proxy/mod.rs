//! The data path: accept → pick a backend → connect (with retry) → relay.

pub mod relay;
pub mod tcp;

use std::sync::Arc;

use crate::balancer::Pool;
use crate::config::ListenerConfig;

/// Everything a listener needs to serve one new connection: its settings and
/// the current pool. Published with `ArcSwap`; each connection takes the
/// snapshot current at its accept and keeps it to its end.
#[derive(Debug)]
pub struct Route {
    pub config: Arc<ListenerConfig>,
    pub pool: Pool,
}
