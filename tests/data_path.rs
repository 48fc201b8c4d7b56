//! The byte stream: integrity, half-close, timeouts, no-backend behaviour.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Deterministic pseudo-random bytes (xorshift), so corruption cannot hide
/// in a repeating pattern.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A backend that, per connection, sends `send` and hashes everything it
/// receives until EOF, then reports (bytes, sha256) on the channel.
/// Health probes (connections that send nothing) are not reported.
async fn hashing_backend(
    send: Vec<u8>,
) -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(usize, Vec<u8>)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (tx, send) = (tx.clone(), send.clone());
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let writer = tokio::spawn(async move {
                    // A probe closes at once: its write may fail.
                    let _ = w.write_all(&send).await;
                    let _ = w.shutdown().await;
                });
                let mut h = Sha256::new();
                let mut n = 0;
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(k @ 1..) = r.read(&mut buf).await {
                    n += k;
                    h.update(&buf[..k]);
                }
                let _ = writer.await;
                if n > 0 {
                    let _ = tx.send((n, h.finalize().to_vec()));
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact() {
    const SIZE: usize = 64 << 20;
    let down = pattern(SIZE, 7);
    let up = pattern(SIZE, 11);
    let (backend, mut reports) = hashing_backend(down.clone()).await;
    let server = start_server(&listener_toml("roundrobin", "", &[b("h", backend)])).await;
    let client = connect_from(server.local_addr("l").unwrap(), None).await;
    let (mut r, mut w) = client.into_split();
    let upload = tokio::spawn(async move {
        w.write_all(&up).await.unwrap();
        w.shutdown().await.unwrap();
        Sha256::digest(&up).to_vec()
    });
    let mut got = Vec::with_capacity(SIZE);
    within("download", r.read_to_end(&mut got)).await.unwrap();
    let sent_hash = within("upload", upload).await.unwrap();
    assert_eq!(got.len(), SIZE);
    assert_eq!(
        Sha256::digest(&got).to_vec(),
        Sha256::digest(&down).to_vec()
    );
    let (n, recv_hash) = within("backend report", reports.recv()).await.unwrap();
    assert_eq!(n, SIZE);
    assert_eq!(recv_hash, sent_hash);
    let state = server.backend_state("l", "h").unwrap();
    wait_for("byte counters", || {
        state.bytes() == (SIZE as u64, SIZE as u64)
    })
    .await;
}

#[tokio::test]
async fn client_half_close_still_gets_the_reply() {
    // The backend reads to EOF, then answers with what it counted (health
    // probes, which send nothing, get no answer).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() && !got.is_empty() {
                    let _ = s
                        .write_all(format!("got {} bytes", got.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    let server = start_server(&listener_toml("roundrobin", "", &[b("x", backend)])).await;
    let mut c = connect_from(server.local_addr("l").unwrap(), None).await;
    c.write_all(&[b'z'; 5000]).await.unwrap();
    c.shutdown().await.unwrap(); // FIN: "no more requests"
    let mut reply = String::new();
    within("reply after half-close", c.read_to_string(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, "got 5000 bytes");
}

#[tokio::test]
async fn backend_half_close_lets_the_client_keep_sending() {
    // The backend says hello and shuts its write side at once, then keeps
    // reading and reports what arrived afterwards.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = w.write_all(b"hello").await;
                let _ = w.shutdown().await;
                let mut got = Vec::new();
                // Health probes send nothing: not reported.
                if r.read_to_end(&mut got).await.is_ok() && !got.is_empty() {
                    let _ = tx.send(got);
                }
            });
        }
    });
    let server = start_server(&listener_toml("roundrobin", "", &[b("x", backend)])).await;
    let mut c = connect_from(server.local_addr("l").unwrap(), None).await;
    let mut hello = Vec::new();
    within("backend FIN reaches the client", c.read_to_end(&mut hello))
        .await
        .unwrap();
    assert_eq!(hello, b"hello");
    c.write_all(b"still talking").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(
        within("backend report", rx.recv()).await.unwrap(),
        b"still talking"
    );
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_connection_but_not_a_busy_one() {
    let nb = NamedBackend::start("n").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        "idle_timeout = \"400ms\"",
        &[b("n", nb.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();

    // Busy: a byte every 100 ms for 1.2 s (three idle periods) stays open.
    let mut busy = connect_named(proxy).await;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    for i in 0..12u8 {
        pace.tick().await;
        busy.stream.write_all(&[i]).await.unwrap();
        let mut echo = [0u8; 1];
        within("echo", busy.stream.read_exact(&mut echo))
            .await
            .unwrap();
        assert_eq!(echo[0], i);
    }

    // Silent: closed after the idle timeout, not before.
    let start = Instant::now();
    let mut silent = connect_named(proxy).await;
    assert!(within("idle close", closed_by_peer(&mut silent.stream)).await);
    assert!(start.elapsed() >= Duration::from_millis(400));
    // Now silent too, the busy one goes the same way; both backend sides close.
    assert!(within("idle close", closed_by_peer(&mut busy.stream)).await);
    wait_for("backend sides closed too", || nb.open() == 0).await;
}

#[tokio::test]
async fn connect_timeout_fires_on_a_backend_that_never_answers() {
    let (_hole, _fillers, blackhole) = hanging_backend();
    let server = start_server(&listener_toml(
        "roundrobin",
        // The health probe hangs too, for longer than the test: the backend
        // stays in rotation and the client's connect meets the timeout.
        "connect_timeout = \"300ms\"\nretries = 0\n[listener.health_check]\ninterval = \"1h\"\ntimeout = \"59m\"",
        &[b("hole", blackhole)],
    ))
    .await;
    let start = Instant::now();
    let mut c = connect_from(server.local_addr("l").unwrap(), None).await;
    assert!(within("close after connect timeout", closed_by_peer(&mut c)).await);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");
    let state = server.backend_state("l", "hole").unwrap();
    assert_eq!(state.connect_errors(), 1);
    assert_eq!(state.active(), 0);
}

#[tokio::test]
async fn no_backend_closes_the_client_at_once() {
    // Only weight-0 backends: nothing may take the connection.
    let nb = NamedBackend::start("zero").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        "",
        &[B {
            name: "zero",
            addr: nb.addr,
            weight: 0,
        }],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    for _ in 0..20 {
        let mut c = connect_from(proxy, None).await;
        assert!(within("prompt close", closed_by_peer(&mut c)).await);
    }
    // Only health probes reached it; no client connection was made.
    let state = server.backend_state("l", "zero").unwrap();
    assert_eq!((state.total(), state.connect_errors()), (0, 0));
}

#[tokio::test]
async fn refused_backends_close_the_client_promptly() {
    // Ports that were just bound and released: connects are refused.
    let dead: Vec<SocketAddr> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            v.push(l.local_addr().unwrap());
        }
        v
    };
    let server = start_server(&listener_toml(
        "roundrobin",
        "",
        &[b("d1", dead[0]), b("d2", dead[1])],
    ))
    .await;
    let mut c = connect_from(server.local_addr("l").unwrap(), None).await;
    assert!(within("close when every connect fails", closed_by_peer(&mut c)).await);
    // Each backend was either tried once (and refused) or already taken
    // out of rotation by its first health probe.
    for name in ["d1", "d2"] {
        let s = server.backend_state("l", name).unwrap();
        assert!(
            s.connect_errors() == 1 || !s.is_up(),
            "{name}: errors {} up {}",
            s.connect_errors(),
            s.is_up()
        );
        assert_eq!(s.total(), 0);
    }
}
