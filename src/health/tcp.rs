//! `kind = "tcp"`: success is an established TCP connection.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{Failure, Outcome, Probe, ProbeFuture};

/// Connects and closes at once: the only question is "does it accept?".
#[derive(Debug, Default)]
pub struct TcpProbe;

impl Probe for TcpProbe {
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async move {
            TcpStream::connect(addr)
                .await
                .map(|_| Outcome::default())
                .map_err(|e| Failure::io(&e))
        })
    }
}
