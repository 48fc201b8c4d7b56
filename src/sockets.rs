//! Socket setup in one place, through socket2.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::Keepalive;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Pause after an accept error such as EMFILE: the error persists until some
/// connection closes, and retrying at once would spin a core. HAProxy and
/// nginx back off similarly.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Accept backlog. Linux's default `net.core.somaxconn` since 5.4; the kernel
/// caps it at that sysctl anyway. HAProxy sizes its backlog the same way.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Bind a listening socket. `SO_REUSEADDR` lets a restarted daemon bind while
/// old connections sit in TIME_WAIT. With `freebind` (`IP_FREEBIND`) the
/// address need not be local yet: the standby of an HA pair binds the
/// virtual IP before keepalived moves it there.
pub fn bind_listener(addr: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if freebind {
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
        }
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| explain_bind(e, freebind))?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Socket buffers asked for on a udp listener: room for a burst of a few
/// thousand DNS-sized datagrams while the receive task is busy. The kernel
/// caps the request at `net.core.rmem_max` / `wmem_max`.
const UDP_LISTENER_BUFFER: usize = 4 << 20;

/// Bind a udp listener's socket. No `SO_REUSEADDR`: for UDP it would let a
/// second process bind the same port and take part of the traffic.
pub fn bind_udp(addr: SocketAddr, freebind: bool) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if freebind {
        match addr {
            SocketAddr::V4(_) => socket.set_freebind_v4(true)?,
            SocketAddr::V6(_) => socket.set_freebind_v6(true)?,
        }
    }
    // Best effort: a smaller buffer drops bursts sooner, nothing else.
    let _ = socket.set_recv_buffer_size(UDP_LISTENER_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_LISTENER_BUFFER);
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| explain_bind(e, freebind))?;
    UdpSocket::from_std(socket.into())
}

/// A UDP socket connected to `backend`, from an ephemeral port: the kernel
/// then delivers only that backend's datagrams to it, and an ICMP port
/// unreachable as `ECONNREFUSED`.
pub fn udp_connected(backend: SocketAddr) -> io::Result<UdpSocket> {
    // Non-blocking from creation: one system call fewer per session.
    let socket = Socket::new(
        Domain::for_address(backend),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    socket.connect(&backend.into())?;
    UdpSocket::from_std(socket.into())
}

/// A bind error, with a hint when the address is not (yet) local.
fn explain_bind(e: io::Error, freebind: bool) -> io::Error {
    if e.raw_os_error() == Some(EADDRNOTAVAIL) && !freebind {
        io::Error::new(
            e.kind(),
            format!("{e} (not an address of this host; for a virtual IP set `freebind = true`)"),
        )
    } else {
        e
    }
}

/// `EADDRNOTAVAIL` on Linux (asm-generic/errno.h): "cannot assign
/// requested address", what binding a non-local address fails with.
const EADDRNOTAVAIL: i32 = 99;

/// Connect to a backend within `timeout`.
///
/// By hand rather than with `TcpSocket::connect`, which asks for
/// `SO_ERROR` after every connect: a failed connect always shows as error
/// readiness (`EPOLLERR`), so the error is read only then — one system
/// call less on every successful connect.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    keepalive: Option<Keepalive>,
) -> io::Result<TcpStream> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = tokio::time::timeout(timeout, stream.ready(Interest::WRITABLE | Interest::ERROR))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    tune_stream(&stream, keepalive);
    Ok(stream)
}

/// Options for a backend connection. Best effort: a failure costs latency
/// or liveness detection, not correctness, so it is logged, not fatal.
pub fn tune_stream(stream: &TcpStream, keepalive: Option<Keepalive>) {
    tune(SockRef::from(stream), keepalive);
}

/// The same options on a listening socket, once: Linux copies TCP_NODELAY
/// and the keepalive settings to every connection it accepts, so client
/// connections need no option calls of their own (five per connection
/// otherwise). Called again when a reload changes them, also on an
/// accepted connection that was waiting with the old ones; keepalive is
/// then turned off explicitly where it is no longer wanted.
pub fn tune_inherited<'s>(sock: impl Into<SockRef<'s>>, keepalive: Option<Keepalive>) {
    let sock = sock.into();
    if keepalive.is_none()
        && let Err(e) = sock.set_keepalive(false)
    {
        tracing::debug!(error = %e, "SO_KEEPALIVE off failed");
    }
    tune(sock, keepalive);
}

fn tune(sock: SockRef<'_>, keepalive: Option<Keepalive>) {
    // Relayed writes are already coalesced by the peer; Nagle would only add
    // a delay to small request/response exchanges (database protocols).
    if let Err(e) = sock.set_tcp_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY failed");
    }
    if let Some(k) = keepalive {
        set_keepalive(sock, k);
    }
}

/// Turn keepalive on with these settings (four option calls).
pub fn set_keepalive<'s>(sock: impl Into<SockRef<'s>>, k: Keepalive) {
    let params = TcpKeepalive::new()
        .with_time(Duration::from_secs(k.idle_secs.into()))
        .with_interval(Duration::from_secs(k.interval_secs.into()))
        .with_retries(k.count);
    if let Err(e) = sock.into().set_tcp_keepalive(&params) {
        tracing::debug!(error = %e, "TCP keepalive failed");
    }
}

/// A TCP stream handed over by another process (live upgrade), on this
/// runtime. Its options are as that process set them.
pub fn inherited_stream(fd: std::os::fd::OwnedFd) -> io::Result<TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}

/// A listening socket handed over by another process, on this runtime.
pub fn inherited_listener(fd: std::os::fd::OwnedFd) -> io::Result<TcpListener> {
    let l = std::net::TcpListener::from(fd);
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

/// A UDP socket handed over by another process, on this runtime.
pub fn inherited_udp(fd: std::os::fd::OwnedFd) -> io::Result<UdpSocket> {
    let s = std::net::UdpSocket::from(fd);
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s)
}

/// Whether a socket bound to `local` serves a config that says `bind`:
/// the same address, or any port of the same IP for port 0.
pub fn serves(local: SocketAddr, bind: SocketAddr) -> bool {
    local == bind || (bind.port() == 0 && local.ip() == bind.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_and_nodelay_are_applied() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        let k = Keepalive {
            idle_secs: 42,
            interval_secs: 7,
            count: 5,
        };
        let s = connect(addr, Duration::from_secs(5), Some(k))
            .await
            .unwrap();
        let sock = SockRef::from(&s);
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        assert!(s.nodelay().unwrap());
        let plain = connect(addr, Duration::from_secs(5), None).await.unwrap();
        assert!(!SockRef::from(&plain).keepalive().unwrap());
    }

    #[tokio::test]
    async fn accepted_connections_inherit_the_listeners_options() {
        let l = bind_listener("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = l.local_addr().unwrap();
        let k = Keepalive {
            idle_secs: 42,
            interval_secs: 7,
            count: 5,
        };
        tune_inherited(&l, Some(k));
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let sock = SockRef::from(&s);
        assert!(sock.tcp_nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
        assert_eq!(
            sock.tcp_keepalive_interval().unwrap(),
            Duration::from_secs(7)
        );
        assert_eq!(sock.tcp_keepalive_retries().unwrap(), 5);
        // A reload that turns keepalive off reaches later connections.
        tune_inherited(&l, None);
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert!(!SockRef::from(&s).keepalive().unwrap());
        assert!(SockRef::from(&s).tcp_nodelay().unwrap());
    }
}
