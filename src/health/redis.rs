//! `kind = "redis"` (placeholder for the probe being written).

use std::net::SocketAddr;

use super::{Failure, Probe, ProbeFuture};
use crate::config::HealthCheck;

#[derive(Debug)]
pub struct RedisProbe;

impl RedisProbe {
    pub fn new(_settings: &HealthCheck) -> RedisProbe {
        RedisProbe
    }
}

impl Probe for RedisProbe {
    fn check(&self, _addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async { Err(Failure("not written yet".into())) })
    }
}
