//! What a long-lived connection keeps alive: only its own backend's state
//! and the settings it reads, never the pool it was scheduled from. The
//! real daemon, real sockets, reloads by SIGHUP.

mod common;

use common::*;
use prometheus_parse::{Scrape, Value};
use tokio::task::block_in_place;

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// Samples of any family whose `backend` label is `backend`.
fn series_of(scrape: &Scrape, backend: &str) -> Vec<String> {
    scrape
        .samples
        .iter()
        .filter(|s| s.labels.get("backend") == Some(backend))
        .map(|s| format!("{}{:?}", s.metric, s.labels))
        .collect()
}

fn gauge(scrape: &Scrape, name: &str, backend: &str) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("backend") == Some(backend))
        .map(|s| match s.value {
            Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a gauge"),
        })
}

/// SPEC: "A removed backend's series disappear once its last connection
/// ends" — its own last connection, whatever else is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_series_go_with_its_own_last_connection() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let both = format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr), b("b", b_.addr)])
    );
    let mut d = Daemon::start(&both);
    let admin = d.admin.unwrap();
    let proxy = d.addr("l");
    let on_a = connect_named(proxy).await;
    let on_b = connect_named(proxy).await;
    assert_eq!((on_a.backend.as_str(), on_b.backend.as_str()), ("a", "b"));

    d.write_config(&format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    assert!(block_in_place(|| d.reload()));
    let s = scrape(admin).await;
    assert_eq!(
        gauge(&s, "switchyard_active_connections", "b"),
        Some(1.0),
        "b's open connection is still counted"
    );

    drop(on_b);
    let start = tokio::time::Instant::now();
    loop {
        let s = scrape(admin).await;
        let left = series_of(&s, "b");
        if left.is_empty() {
            assert_eq!(
                gauge(&s, "switchyard_active_connections", "a"),
                Some(1.0),
                "a's older connection is open and counted"
            );
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "b's series outlive its last connection: {left:?}"
        );
        tokio::task::yield_now().await;
    }
    drop(on_a);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A connection kept open across many pool-changing reloads pins no pool:
/// with a source-hash listener every rebuilt pool has a 65 536-slot table,
/// so a pinned snapshot per connection would show as about 200 KiB a round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_with_held_connections_do_not_pin_memory() {
    const WARMUP: usize = 40;
    const ROUNDS: usize = 240;
    /// A held connection's own cost is about 2 KiB (its task and buffers
    /// in the daemon); a pinned pool would be a hundred times that.
    const MAX_GROWTH_PER_ROUND_KIB: f64 = 8.0;
    let backends = [
        NamedBackend::start("x").await,
        NamedBackend::start("y").await,
        NamedBackend::start("z").await,
    ];
    let config = |round: usize| {
        let list: Vec<B<'_>> = backends
            .iter()
            .map(|nb| B {
                name: &nb.name,
                addr: nb.addr,
                // The pool changes every round: z's weight alternates.
                weight: if nb.name == "z" {
                    1 + (round % 2) as u32
                } else {
                    1
                },
            })
            .collect();
        listener_toml(
            "source",
            "[listener.health_check]\ninterval = \"1h\"\n",
            &list,
        )
    };
    let mut d = Daemon::start(&config(0));
    let proxy = d.addr("l");
    let mut held = Vec::with_capacity(ROUNDS);
    let mut before = 0;
    for round in 1..=ROUNDS {
        d.write_config(&config(round));
        assert!(block_in_place(|| d.reload()), "reload {round} applied");
        held.push(connect_named(proxy).await);
        if round == WARMUP {
            before = rss_kib(d.pid);
        }
    }
    let after = rss_kib(d.pid);
    let per_round = after.saturating_sub(before) as f64 / (ROUNDS - WARMUP) as f64;
    eprintln!(
        "RSS {before} KiB after {WARMUP} rounds, {after} KiB after {ROUNDS}: {per_round:.1} KiB per round"
    );
    assert!(
        per_round <= MAX_GROWTH_PER_ROUND_KIB,
        "RSS grew {per_round:.1} KiB per reload with a held connection (limit {MAX_GROWTH_PER_ROUND_KIB})"
    );
    assert_eq!(held.len(), ROUNDS, "every connection still held");
    for s in &held {
        assert!(["x", "y", "z"].contains(&s.backend.as_str()));
    }
}
