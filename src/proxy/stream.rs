//! A byte stream that is not a plain socket (TLS, decrypted here)
//! relayed to its backend connection: both directions at once,
//! half-close, idle timeout, byte counters, cut. Plain sockets use
//! `relay` (splice, handover); this serves tcp-mode TLS listeners and
//! WebSocket tunnels over TLS.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use prometheus::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use super::Route;
use super::queue::{Open, Slot};
use crate::sync::Tripwire;

/// A decrypted stream's life beside its backend connection: what it holds
/// while the bytes flow.
pub struct Stream {
    idle: Duration,
    duration: Histogram,
    started: Instant,
    slot: Slot,
    /// The backend marked down (`on_marked_down = "shutdown"`), or the
    /// shutdown grace over.
    cut: Tripwire,
    /// The shutdown grace over (a live upgrade's included).
    abort: Tripwire,
    _open: Open,
}

impl Stream {
    /// What a stream on `route`'s listener holds: its idle timeout and
    /// duration histogram, its backend's slot and cut wire.
    pub fn new(
        route: &Route,
        slot: Slot,
        cut: Tripwire,
        abort: Tripwire,
        open: Open,
        started: Instant,
    ) -> Stream {
        Stream {
            idle: route.settings.idle_timeout,
            duration: route.shared.metrics.connection_duration.clone(),
            started,
            slot,
            cut,
            abort,
            _open: open,
        }
    }

    /// Relay between `client` and `upstream`, each direction first
    /// sending what was read ahead (`c2b`, `b2c`): the client's end of
    /// stream (close_notify, or a bare FIN) reaches the backend as a FIN,
    /// the backend's FIN the client as close_notify then FIN. Ends when
    /// both directions have, after `idle` without a byte either way, or
    /// when cut. How it ended, for the log.
    pub async fn relay<C: AsyncRead + AsyncWrite + Unpin>(
        self,
        client: C,
        upstream: TcpStream,
        c2b: Bytes,
        b2c: Bytes,
    ) -> &'static str {
        let state = self.slot.guard().state();
        let base = Instant::now();
        let last = AtomicU64::new(0);
        let touch = || last.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
        let (mut client_rx, mut client_tx) = tokio::io::split(client);
        let (mut up_rx, mut up_tx) = upstream.into_split();
        let to_backend = async {
            pump(&mut client_rx, &mut up_tx, c2b, |n| {
                state.metrics.bytes_client_to_backend.inc_by(n);
                touch();
            })
            .await
        };
        let to_client = async {
            pump(&mut up_rx, &mut client_tx, b2c, |n| {
                state.metrics.bytes_backend_to_client.inc_by(n);
                touch();
            })
            .await
        };
        let idle = async {
            loop {
                let quiet_since = Duration::from_millis(last.load(Ordering::Relaxed));
                let due = base + quiet_since + self.idle;
                if Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        // A live upgrade trips `cut` through its parent: this stream stays
        // (its keys are here) until the grace is over.
        let cut = async {
            self.cut.tripped().await;
            if self.cut.parent_tripped() {
                self.abort.tripped().await;
            }
        };
        let end = tokio::select! {
            r = async { tokio::try_join!(to_backend, to_client) } => match r {
                Ok(_) => "closed",
                Err(e) => {
                    debug!(error = %e, "relay error");
                    "error"
                }
            },
            () = idle => "idle timeout",
            () = cut => if self.abort.is_tripped() { "cut by shutdown" } else { "cut: backend marked down" },
        };
        self.duration.observe(self.started.elapsed().as_secs_f64());
        end
    }
}

/// Copy `src` to `dst` (after `ahead`) until `src` ends, then end `dst`'s
/// writing side. A TLS peer that closes without close_notify ends its
/// stream as well (most clients do).
async fn pump<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    ahead: Bytes,
    mut moved: impl FnMut(u64),
) -> std::io::Result<()> {
    if !ahead.is_empty() {
        dst.write_all(&ahead).await?;
        moved(ahead.len() as u64);
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match src.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n]).await?;
        moved(n as u64);
    }
    dst.shutdown().await
}
