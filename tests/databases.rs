//! switchyard in front of real databases: PostgreSQL clusters driven by
//! pgbench and Redis servers driven by redis-benchmark, all started by the
//! tests on loopback (see `db/mod.rs`), with the real daemon binary in
//! front of them.

mod common;
mod db;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use db::{Postgres, Redis, pgbench, redis_benchmark};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// Start two clusters side by side (initdb is the slow part), each with
/// the pgbench tables of scale 1.
fn two_clusters() -> (Postgres, Postgres) {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let pg = Postgres::start();
            pg.pgbench_init(1);
            pg
        });
        let b = s.spawn(|| {
            let pg = Postgres::start();
            pg.pgbench_init(1);
            pg
        });
        (a.join(), b.join())
    });
    (
        a.unwrap_or_else(|e| std::panic::resume_unwind(e)),
        b.unwrap_or_else(|e| std::panic::resume_unwind(e)),
    )
}

/// pgbench through the balancer on `proxy` with `args`; fails the test if
/// it is still running `grace` after its `-T`.
fn bench(proxy: SocketAddr, seconds: u64, args: &[&str], grace: Duration) -> db::Run {
    let port = proxy.port().to_string();
    let t = seconds.to_string();
    let mut all = vec!["-n", "-h", "127.0.0.1", "-p", &port, "-T", &t];
    all.extend_from_slice(args);
    pgbench(&all, Duration::from_secs(seconds) + grace)
}

fn num(b: &Value, field: &str) -> u64 {
    b[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {b}"))
}

/// Poll the status until `cond` holds on it (or fail after `DEADLINE`).
async fn status_until(
    admin: SocketAddr,
    what: &str,
    cond: impl Fn(&std::collections::HashMap<String, Value>) -> bool,
) -> std::collections::HashMap<String, Value> {
    let start = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let s = status_backends(admin, "l").await;
        if cond(&s) {
            return s;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}: {s:?}"
        );
        poll.tick().await;
    }
}

fn pg_backends(pg1: &Postgres, pg2: &Postgres) -> Vec<B<'static>> {
    vec![b("pg1", pg1.addr), b("pg2", pg2.addr)]
}

/// Eight pgbench clients for 10 s over two clusters behind `leastconn`:
/// not one failure, and both clusters did real work — every committed
/// TPC-B transaction leaves one row in `pgbench_history`, so the rows
/// counted on each cluster directly add up to what pgbench reports.
/// The daemon as a database failover setup: leastconn, fast checks,
/// retries, and a failed server's sessions cut.
fn failover_daemon(pg1: &Postgres, pg2: &Postgres) -> Daemon {
    let extra = "retries = 2\non_marked_down = \"shutdown\"\n\
                 [listener.health_check]\ninterval = \"500ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2\n";
    Daemon::start(&format!(
        "{ADMIN}{}",
        listener_toml("leastconn", extra, &pg_backends(pg1, pg2))
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_through_leastconn_uses_both_clusters_without_a_failure() {
    let (pg1, pg2) = block_in_place(two_clusters);
    let d = block_in_place(|| {
        Daemon::start(&format!(
            "{ADMIN}{}",
            listener_toml("leastconn", "", &pg_backends(&pg1, &pg2))
        ))
    });
    let (proxy, admin) = (d.addr("l"), d.admin.unwrap());

    let run = block_in_place(|| bench(proxy, 10, &["-c", "8", "-j", "2"], DEADLINE));
    assert_eq!(run.code(), Some(0), "{}", run.output());
    assert_eq!(run.failed(), 0, "{}", run.output());
    assert_eq!(run.aborted_clients(), 0, "{}", run.output());
    let processed = run.processed();
    assert!(processed >= 100, "only {processed} transactions in 10 s");

    let s = status_backends(admin, "l").await;
    let (c1, c2) = (
        num(&s["pg1"], "connections_total"),
        num(&s["pg2"], "connections_total"),
    );
    assert!(c1 > 0 && c2 > 0, "connections: pg1 {c1}, pg2 {c2}");
    // 8 clients + pgbench's own first connection (it reads the scale).
    assert!(c1 + c2 >= 8, "connections: pg1 {c1}, pg2 {c2}");

    let rows = |pg: &Postgres| -> u64 {
        block_in_place(|| pg.psql("select count(*) from pgbench_history"))
            .parse()
            .unwrap()
    };
    let (h1, h2) = (rows(&pg1), rows(&pg2));
    assert!(
        h1 > 0 && h2 > 0,
        "transactions: pg1 {h1}, pg2 {h2}: one cluster did none"
    );
    assert_eq!(
        h1 + h2,
        processed,
        "rows in pgbench_history (pg1 {h1} + pg2 {h2}) != transactions pgbench counted"
    );
    eprintln!(
        "leastconn: {processed} transactions in {:?}, pg1 {h1} / pg2 {h2}, connections pg1 {c1} / pg2 {c2}",
        run.elapsed
    );
}

/// A database server dies under load. pgbench opens a new connection per
/// transaction (-C) through a leastconn listener with fast health checks,
/// `retries` and `on_marked_down = "shutdown"`. One cluster crashes
/// mid-run: the run still finishes on time (no client hangs), the only
/// clients lost are those whose session was on the dead server, the others
/// carry on on the live one, the dead one is shown down, and afterwards
/// every new connection goes to the live cluster without a single failure.
///
/// pgbench 15 has no "continue on error": a client whose session breaks is
/// aborted (and the run exits 2 with "Run was aborted"), so a lost session
/// shows up as an aborted client; "number of failed transactions" only
/// counts serialization and deadlock failures, which TPC-B at read
/// committed does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_survives_a_crashed_cluster_and_moves_to_the_live_one() {
    const CLIENTS: usize = 8;
    let (mut pg1, pg2) = block_in_place(two_clusters);
    let d = block_in_place(|| failover_daemon(&pg1, &pg2));
    let (proxy, admin) = (d.addr("l"), d.admin.unwrap());

    let clients = CLIENTS.to_string();
    let run = std::thread::spawn(move || {
        bench(
            proxy,
            10,
            &["-C", "-c", &clients, "-j", "2"],
            Duration::from_secs(10),
        )
    });
    // Under way on both clusters.
    let before = status_until(admin, "traffic on both clusters", |s| {
        num(&s["pg1"], "connections_total") >= 50 && num(&s["pg2"], "connections_total") >= 50
    })
    .await;
    block_in_place(|| pg1.crash());
    let crashed_at = tokio::time::Instant::now();

    // Marked down within fall × interval (+ timeout and slack).
    status_until(admin, "pg1 marked down", |s| s["pg1"]["health"] == "down").await;
    let detect = crashed_at.elapsed();
    assert!(
        detect < Duration::from_secs(5),
        "pg1 marked down after {detect:?}"
    );

    let run = block_in_place(|| run.join().unwrap());
    let after = status_backends(admin, "l").await;
    let aborted = run.aborted_clients();
    // The run finished (bench() fails the test past -T + 10 s), and within
    // a few seconds of -T: pgbench waits for every client, so one client
    // stuck on the dead server would hold it up.
    assert!(
        run.elapsed < Duration::from_secs(15),
        "pgbench took {:?}\n{}",
        run.elapsed,
        run.output()
    );
    // It reports its counts, and exits 2 exactly when a client was lost.
    let processed = run.processed();
    assert_eq!(run.failed(), 0, "{}", run.output());
    assert_eq!(
        run.code(),
        Some(if aborted > 0 { 2 } else { 0 }),
        "{}",
        run.output()
    );
    // Every lost client had its session on pg1 when it died: one open there
    // at the last status read before the crash, or one opened there after
    // it (a session the kernel had queued for the postmaster). None was
    // lost on pg2, and the failed connects to the dead pg1 were retried.
    let active1 = num(&before["pg1"], "active_connections");
    let late1 = num(&after["pg1"], "connections_total") - num(&before["pg1"], "connections_total");
    assert!(
        aborted as u64 <= active1 + late1,
        "{aborted} clients lost, but only {active1} sessions were on pg1 and {late1} opened there later\n{}",
        run.output()
    );
    // The survivors kept working on pg2 (one connection per transaction).
    let moved = num(&after["pg2"], "connections_total") - num(&before["pg2"], "connections_total");
    assert!(
        aborted < CLIENTS && moved >= 100,
        "{aborted} of {CLIENTS} clients lost, pg2 served {moved} connections after the crash\n{}",
        run.output()
    );
    eprintln!(
        "crash: {processed} transactions in {:?}, {aborted}/{CLIENTS} clients lost \
         ({active1} sessions on pg1 before the crash, {late1} after), pg2 served {moved} \
         connections after it, pg1 down after {detect:?}, {} failed connects to pg1 retried",
        run.elapsed,
        num(&after["pg1"], "connect_errors_total")
    );

    // From now on everything goes to pg2, without a failure.
    let second = block_in_place(|| bench(proxy, 3, &["-C", "-c", "4", "-j", "2"], DEADLINE));
    assert_eq!(second.code(), Some(0), "{}", second.output());
    assert_eq!(second.aborted_clients(), 0, "{}", second.output());
    assert_eq!(second.failed(), 0, "{}", second.output());
    let last = status_backends(admin, "l").await;
    assert_eq!(last["pg1"]["health"], "down");
    assert_eq!(
        num(&last["pg1"], "connections_total"),
        num(&after["pg1"], "connections_total"),
        "a connection went to the dead cluster"
    );
    let grown = num(&last["pg2"], "connections_total") - num(&after["pg2"], "connections_total");
    assert!(
        grown >= second.processed(),
        "pg2 got {grown} connections for {} transactions",
        second.processed()
    );
}

/// A planned switchover loses nothing: drain the cluster through the
/// admin API, wait until its last session has ended (with -C, one
/// transaction), then shut it down (immediate). Not one client fails and
/// the drained cluster gets no new connection. (Shutting a cluster down
/// without draining it first costs more than its open sessions: a
/// postmaster in shutdown still accepts connections, only to answer "the
/// database system is shutting down", and leastconn sends reconnecting
/// clients right there, since it has no sessions left.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_loses_nothing_when_a_cluster_is_drained_before_it_stops() {
    let (mut pg1, pg2) = block_in_place(two_clusters);
    let d = block_in_place(|| failover_daemon(&pg1, &pg2));
    let (proxy, admin) = (d.addr("l"), d.admin.unwrap());

    let run = std::thread::spawn(move || {
        bench(
            proxy,
            6,
            &["-C", "-c", "4", "-j", "2"],
            Duration::from_secs(10),
        )
    });
    status_until(admin, "traffic on both clusters", |s| {
        num(&s["pg1"], "connections_total") >= 20 && num(&s["pg2"], "connections_total") >= 20
    })
    .await;
    let (code, body) = http(
        admin,
        "PUT",
        "/api/v1/listeners/l/backends/pg1/state",
        &[],
        "drain",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let drained = status_until(admin, "pg1 without sessions", |s| {
        num(&s["pg1"], "active_connections") == 0
    })
    .await;
    block_in_place(|| pg1.stop());
    status_until(admin, "pg1 marked down", |s| s["pg1"]["health"] == "down").await;

    let run = block_in_place(|| run.join().unwrap());
    assert_eq!(run.code(), Some(0), "{}", run.output());
    assert_eq!(run.aborted_clients(), 0, "{}", run.output());
    assert_eq!(run.failed(), 0, "{}", run.output());
    let after = status_backends(admin, "l").await;
    assert_eq!(
        num(&after["pg1"], "connections_total"),
        num(&drained["pg1"], "connections_total"),
        "a connection went to the drained cluster"
    );
    assert!(
        run.processed() >= 100,
        "only {} transactions",
        run.processed()
    );
}

/// GET `key` over RESP on a fresh connection from `source`; the bulk
/// string answered.
async fn redis_get_from(proxy: SocketAddr, source: IpAddr, key: &str) -> String {
    let mut s = connect_from(proxy, Some(source)).await;
    let req = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
    within("send GET", s.write_all(req.as_bytes()))
        .await
        .unwrap();
    // "$<len>\r\n<value>\r\n"
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, rest)) = text.split_once("\r\n") {
            assert!(head.starts_with('$'), "unexpected reply {text:?}");
            let len: usize = head[1..].parse().expect("a bulk string");
            if rest.len() >= len + 2 {
                return rest[..len].to_owned();
            }
        }
        let n = within("GET reply", s.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed after {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// redis-benchmark through a `source` listener in front of two Redis
/// servers without an error, and source-IP affinity seen from Redis's side:
/// each server holds a different value under "whoami", and every client
/// address reads the same one on each of its connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_behind_source_hash_benchmarks_clean_and_keeps_each_client_on_one_server() {
    let (r1, r2) = block_in_place(|| (Redis::start(), Redis::start()));
    assert_eq!(block_in_place(|| r1.cli(&["set", "whoami", "r1"])), "OK");
    assert_eq!(block_in_place(|| r2.cli(&["set", "whoami", "r2"])), "OK");
    let d = block_in_place(|| {
        Daemon::start(&format!(
            "{ADMIN}{}",
            listener_toml("source", "", &[b("r1", r1.addr), b("r2", r2.addr)])
        ))
    });
    let (proxy, admin) = (d.addr("l"), d.admin.unwrap());

    let port = proxy.port().to_string();
    let run = block_in_place(|| {
        redis_benchmark(
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-q",
                "-n",
                "20000",
                "-c",
                "20",
                "-t",
                "set,get",
            ],
            Duration::from_secs(60),
        )
    });
    assert_eq!(run.code(), Some(0), "{}", run.output());
    // -q prints one final line per test, after \r-separated progress.
    let finals: Vec<&str> = run
        .stdout
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .collect();
    for test in ["SET:", "GET:"] {
        assert!(
            finals.iter().any(|l| l.trim_start().starts_with(test)),
            "no {test} result\n{}",
            run.output()
        );
    }
    let all = format!("{}{}", run.stdout, run.stderr).to_lowercase();
    assert!(
        !all.contains("error") && !all.contains("closed"),
        "{}",
        run.output()
    );
    eprintln!("redis-benchmark: {}", finals.join(" | "));
    // All of its 20 connections come from 127.0.0.1: one server took them.
    let s = status_backends(admin, "l").await;
    let (c1, c2) = (
        num(&s["r1"], "connections_total"),
        num(&s["r2"], "connections_total"),
    );
    assert!(
        (c1 == 0) != (c2 == 0) && c1 + c2 >= 20,
        "one client address, connections r1 {c1}, r2 {c2}"
    );

    let mut seen = std::collections::BTreeMap::new();
    for last in 2..=9u8 {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(redis_get_from(proxy, ip, "whoami").await);
        }
        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "{ip} moved between servers: {answers:?}"
        );
        assert!(answers[0] == "r1" || answers[0] == "r2", "{answers:?}");
        seen.insert(ip, answers[0].clone());
    }
    let servers: std::collections::BTreeSet<_> = seen.values().collect();
    assert_eq!(
        servers.len(),
        2,
        "all client addresses on one server: {seen:?}"
    );
    eprintln!("source hash: {seen:?}");
}
