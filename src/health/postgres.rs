//! `kind = "postgres"` (placeholder for the probe being written).

use std::net::SocketAddr;

use super::{Failure, Probe, ProbeFuture};
use crate::config::HealthCheck;

#[derive(Debug)]
pub struct PostgresProbe;

impl PostgresProbe {
    pub fn new(_settings: &HealthCheck) -> PostgresProbe {
        PostgresProbe
    }
}

impl Probe for PostgresProbe {
    fn check(&self, _addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async { Err(Failure("not written yet".into())) })
    }
}
