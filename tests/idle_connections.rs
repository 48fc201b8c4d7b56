//! Many idle TCP connections through the real daemon: new connections are
//! served as fast with them open as without, `idle_timeout` reclaims idle
//! ones, and the daemon's descriptors return to where they were.
//!
//! 9 000 rather than 10 000: each proxied connection holds two descriptors
//! in the daemon (client and backend), and the CI machines' hard limit on
//! open files is 20 000, which an unprivileged test cannot raise.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const IDLE: usize = 9_000;

/// Health probes would open sockets of their own while they are counted.
const NO_PROBES: &str = "[listener.health_check]\nkind = \"none\"\n";

/// Connections left idle on the listener with a short `idle_timeout`,
/// while the 9 000 stay open (within the same descriptor limit).
const SHORT: usize = 400;

/// Sockets the daemon has open. (Its splice pipes are a bounded per-thread
/// pool, not per connection, so they are left out.)
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Connect, read the greeting, echo one byte: a connection through the
/// proxy that has reached its backend.
async fn through(proxy: SocketAddr) -> Session {
    let mut s = connect_named(proxy).await;
    s.stream.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    s.stream.read_exact(&mut b).await.unwrap();
    s
}

/// Latencies of `n` new connections, one after another (connect to echo).
async fn fresh(proxy: SocketAddr, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        drop(within("fresh connection", through(proxy)).await);
        times.push(start.elapsed());
    }
    times.sort();
    times
}

/// Open `n` connections, `batch` at a time.
async fn open_many(proxy: SocketAddr, n: usize, batch: usize) -> Vec<Session> {
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let k = batch.min(n - all.len());
        let opened = futures_join((0..k).map(|_| through(proxy))).await;
        all.extend(opened);
    }
    all
}

async fn futures_join<F: std::future::Future<Output = Session> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<Session> {
    let tasks: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(within("idle connection", t).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_thousand_idle_connections_do_not_slow_new_ones_and_idle_timeout_reclaims() {
    let backend = NamedBackend::start("a").await;
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}{}",
        listener_toml("leastconn", NO_PROBES, &[b("a", backend.addr)]),
        listener_toml(
            "roundrobin",
            &format!("idle_timeout = \"2s\"\n{NO_PROBES}"),
            &[b("a", backend.addr)]
        )
        .replace("name = \"l\"", "name = \"short\"")
    );
    let d = Daemon::start(&toml);
    let (proxy, short, admin) = (d.addr("l"), d.addr("short"), d.admin.unwrap());

    drop(fresh(proxy, 50).await); // warm up
    wait_for("warm-up connections gone", || backend.open() == 0).await;
    let baseline_fds = fds(d.pid);
    let before = fresh(proxy, 300).await;
    wait_for("probe connections gone", || backend.open() == 0).await;

    let mut idle = open_many(proxy, IDLE, 200).await;
    assert_eq!(backend.open(), IDLE);
    let scrape = scrape(admin).await;
    let open = sample_value(
        &scrape,
        "switchyard_active_connections",
        &[("listener", "l"), ("backend", "a")],
    );
    assert_eq!(open, Some(IDLE as f64));
    let loaded_fds = fds(d.pid);
    // Two descriptors per proxied connection (the baseline may still hold
    // a closing warm-up socket or two, so it is not added in).
    assert!(
        loaded_fds >= 2 * IDLE,
        "{loaded_fds} fds with {IDLE} connections (baseline {baseline_fds})"
    );
    let during = fresh(proxy, 300).await;
    println!(
        "new connections (connect to echo), {} each: without idle ones p50 {:?} p99 {:?}; \
         with {IDLE} idle p50 {:?} p99 {:?}; daemon fds {baseline_fds} -> {loaded_fds}",
        before.len(),
        percentile(&before, 0.5),
        percentile(&before, 0.99),
        percentile(&during, 0.5),
        percentile(&during, 0.99),
    );
    // Not slowed: bounded by the idle-free figure with room for a shared
    // 2-core machine, and absolutely.
    let bound = (percentile(&before, 0.99) * 4).max(Duration::from_millis(50));
    assert!(
        percentile(&during, 0.99) < bound,
        "p99 {:?} with {IDLE} idle connections vs {:?} without",
        percentile(&during, 0.99),
        percentile(&before, 0.99)
    );

    // The listener with idle_timeout = 2s closes its idle connections
    // itself, both sides.
    let mut reclaimed = open_many(short, SHORT, 200).await;
    assert_eq!(backend.open(), IDLE + SHORT);
    for s in &mut reclaimed {
        assert!(within("idle timeout", closed_by_peer(&mut s.stream)).await);
    }
    wait_for("backend sides closed", || backend.open() == IDLE).await;

    // The idle ones on the other listener were never touched.
    for s in idle.iter_mut().step_by(97) {
        let mut b = [0u8; 1];
        s.stream.write_all(b"y").await.unwrap();
        within("echo", s.stream.read_exact(&mut b)).await.unwrap();
        assert_eq!(&b, b"y");
    }
    let total = idle.len();
    drop(idle);
    drop(reclaimed);
    assert_eq!(total, IDLE);
    wait_for("every backend side closed", || backend.open() == 0).await;
    wait_for("the daemon's descriptors back to the baseline", || {
        fds(d.pid) <= baseline_fds
    })
    .await;
}
