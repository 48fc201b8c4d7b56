//! `kind = "http"`: `GET path` answered with a 2xx or 3xx status.
//!
//! `Host` is the address probed (the backend's host and the check port) and
//! `Connection: close` asks the server to end the exchange; the response
//! body is read to its end so the connection closes cleanly. With
//! `port = 8008, path = "/primary"` this is Patroni's leader endpoint.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{Failure, Outcome, Probe, ProbeFuture};
use crate::config::HealthCheck;

/// Checks one path over HTTP/1.1.
#[derive(Debug)]
pub struct HttpProbe {
    path: String,
}

impl HttpProbe {
    pub fn new(settings: &HealthCheck) -> HttpProbe {
        HttpProbe {
            path: settings.path.clone(),
        }
    }
}

impl Probe for HttpProbe {
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| Failure::io(&e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Failure(format!("HTTP: {e}")))?;
            let request = Request::get(self.path.as_str())
                .header(HOST, addr.to_string())
                .header(CONNECTION, "close")
                .header(USER_AGENT, "switchyard-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| Failure(format!("HTTP: {e}")))?;
            let exchange = async move {
                let response = sender.send_request(request).await?;
                let status = response.status();
                // Read to the end: the server closes, no reset from our side.
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(status)
            };
            // The connection is driven here, not in a task of its own: a
            // probe cut by its timeout leaves nothing behind.
            let (status, _) = tokio::join!(exchange, conn);
            let status = status.map_err(|e| Failure(format!("HTTP: {e}")))?;
            if status.is_success() || status.is_redirection() {
                Ok(Outcome::default())
            } else {
                Err(Failure(format!("HTTP {}", status.as_u16())))
            }
        })
    }
}
