//! `kind = "mysql"` (placeholder for the probe being written).

use std::net::SocketAddr;

use super::{Failure, Probe, ProbeFuture};
use crate::config::HealthCheck;

#[derive(Debug)]
pub struct MysqlProbe;

impl MysqlProbe {
    pub fn new(_settings: &HealthCheck) -> MysqlProbe {
        MysqlProbe
    }
}

impl Probe for MysqlProbe {
    fn check(&self, _addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async { Err(Failure("not written yet".into())) })
    }
}
