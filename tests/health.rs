//! Health checks, retries, backups and what happens when backends die —
//! with real probes against real sockets.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// Fast checks so the tests finish quickly; detection bound is
/// interval × fall + timeout = 1.1 s.
const FAST: &str =
    "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\nfall = 3\nrise = 2\n";
const DETECTION: Duration = Duration::from_millis(300 * 3 + 200);
/// Scheduling noise on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// Checks that never come again after the first (the first is at start-up).
const RARE: &str = "[listener.health_check]\ninterval = \"1h\"\ntimeout = \"1s\"\n";

#[tokio::test]
async fn dead_backend_is_marked_down_in_time_and_returns_after_rise() {
    let a = NamedBackend::start("a").await;
    let b_ = NamedBackend::start("b").await;
    let c = NamedBackend::start("c").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        FAST,
        &[b("a", a.addr), b("b", b_.addr), b("c", c.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let state = server.backend_state("l", "b").unwrap();
    wait_for("first probe of b", || {
        server.checks("l", "b").unwrap().0 >= 1
    })
    .await;

    let b_addr = b_.addr;
    let killed = Instant::now();
    drop(b_); // its listener closes: connects are refused from now on
    wait_for("b marked down", || !state.is_up()).await;
    let took = killed.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "marked down after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    assert!(
        server.checks("l", "b").unwrap().1 >= 3,
        "`fall` failures before the flip"
    );

    // Down: out of rotation, no new connection is even attempted on b.
    wait_for_rotation(&server, &["a", "c"]).await;
    let errors_before = state.connect_errors();
    let counts = spread(proxy, 30).await;
    assert_eq!(counts, HashMap::from([("a".into(), 15), ("c".into(), 15)]));
    assert_eq!(state.connect_errors(), errors_before);

    // Back: after `rise` successes it takes its share again.
    let b_again = NamedBackend::start_on(b_addr, "b").await;
    let failed = server.checks("l", "b").unwrap().1;
    wait_for("b marked up", || state.is_up()).await;
    assert!(
        server.checks("l", "b").unwrap().0 >= 2,
        "rise = 2 successes"
    );
    assert_eq!(
        server.checks("l", "b").unwrap().1,
        failed,
        "no failure after the restart"
    );
    wait_for_rotation(&server, &["a", "b", "c"]).await;
    let counts = spread(proxy, 30).await;
    assert_eq!(
        counts,
        HashMap::from([("a".into(), 10), ("b".into(), 10), ("c".into(), 10)])
    );
    assert!(b_again.accepted() >= 10, "probes plus the 10 clients");
}

/// Wait until the listener's pool offers exactly these backends.
async fn wait_for_rotation(server: &switchyard::server::Server, names: &[&str]) {
    wait_for(&format!("rotation {names:?}"), || {
        let mut now: Vec<String> = server
            .in_rotation("l")
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect();
        now.sort();
        now == names
    })
    .await;
}

#[tokio::test]
async fn hanging_backend_goes_down_while_others_keep_their_cadence() {
    let (_hole, _fillers, hole) = hanging_backend();
    let good = NamedBackend::start("good").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        FAST,
        &[b("hole", hole), b("good", good.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let hole_state = server.backend_state("l", "hole").unwrap();
    let start = Instant::now();
    wait_for("hanging backend marked down", || !hole_state.is_up()).await;
    // Let several more hanging probes time out, then compare cadences.
    wait_for("four more timed-out probes", || {
        server.checks("l", "hole").unwrap().1 >= 5
    })
    .await;
    let elapsed = start.elapsed();
    let (good_ok, good_failed) = server.checks("l", "good").unwrap();
    assert_eq!(good_failed, 0);
    // One probe per 300 ms from the start, whatever the hanging one does.
    let expected = (elapsed.as_millis() / 300) as u64;
    assert!(
        good_ok + 2 >= expected,
        "good probed {good_ok} times in {elapsed:?} (expected about {expected})"
    );
    // Each hanging probe costs its full timeout: at most one per interval.
    assert!(server.checks("l", "hole").unwrap().1 <= expected + 1);
    let counts = spread(proxy, 10).await;
    assert_eq!(counts["good"], 10);
}

#[tokio::test]
async fn retries_hide_a_dead_backend_that_checks_have_not_caught() {
    let a = NamedBackend::start("a").await;
    let d = NamedBackend::start("dead").await;
    let c = NamedBackend::start("c").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        RARE,
        &[b("a", a.addr), b("dead", d.addr), b("c", c.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    for name in ["a", "dead", "c"] {
        wait_for("first probe", || server.checks("l", name).unwrap().0 == 1).await;
    }
    drop(d);
    let dead = server.backend_state("l", "dead").unwrap();
    // Wait until the dead port refuses (the listener task is gone).
    wait_for_refused(dead_addr(&server)).await;

    let counts = spread(proxy, 300).await;
    assert_eq!(
        counts.values().sum::<usize>(),
        300,
        "every client was served"
    );
    assert_eq!(counts.get("dead"), None);
    // Round robin offered the dead backend to a third of them; each of those
    // was retried on the next backend of the cycle.
    assert_eq!(dead.connect_errors(), 100);
    assert_eq!((counts["a"], counts["c"]), (100, 200));
    assert!(dead.is_up(), "probes have not run again: still believed up");
    assert_eq!(dead.total(), 0);
    assert_eq!(dead.active(), 0);
}

fn dead_addr(server: &switchyard::server::Server) -> SocketAddr {
    server.config().listeners[0].backends[1]
        .fixed()
        .unwrap()
        .addr
}

#[tokio::test]
async fn all_backends_down_closes_each_client_promptly() {
    let (x, y) = (
        NamedBackend::start("x").await,
        NamedBackend::start("y").await,
    );
    let server = start_server(&listener_toml(
        "leastconn",
        FAST,
        &[b("x", x.addr), b("y", y.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let (sx, sy) = (
        server.backend_state("l", "x").unwrap(),
        server.backend_state("l", "y").unwrap(),
    );
    drop((x, y));
    wait_for("both down", || !sx.is_up() && !sy.is_up()).await;
    wait_for_rotation(&server, &[]).await;
    let errors = sx.connect_errors() + sy.connect_errors();
    for _ in 0..20 {
        let start = Instant::now();
        let mut c = connect_from(proxy, None).await;
        assert!(within("prompt close", closed_by_peer(&mut c)).await);
        // Closed without waiting on any connect or timeout.
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
    assert_eq!(
        sx.connect_errors() + sy.connect_errors(),
        errors,
        "no backend tried"
    );
}

#[tokio::test]
async fn backup_serves_only_while_the_primary_is_down() {
    let primary = NamedBackend::start("primary").await;
    let standby = NamedBackend::start("standby").await;
    let mut toml = listener_toml("roundrobin", FAST, &[b("primary", primary.addr)]);
    toml += &format!(
        "[[listener.backend]]\nname = \"standby\"\naddress = \"{}\"\nbackup = true\n",
        standby.addr
    );
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();
    assert_eq!(
        spread(proxy, 5).await,
        HashMap::from([("primary".into(), 5)])
    );

    let p_addr = primary.addr;
    let p_state = server.backend_state("l", "primary").unwrap();
    drop(primary);
    wait_for("primary down", || !p_state.is_up()).await;
    wait_for_rotation(&server, &["standby"]).await;
    let mut served = spread(proxy, 10).await;
    assert_eq!(served.remove("standby"), Some(10), "{served:?}");

    let _primary = NamedBackend::start_on(p_addr, "primary").await;
    wait_for("primary up", || p_state.is_up()).await;
    wait_for_rotation(&server, &["primary"]).await;
    assert_eq!(
        spread(proxy, 10).await,
        HashMap::from([("primary".into(), 10)])
    );
}

#[tokio::test]
async fn source_hash_moves_only_the_down_backends_clients_and_back() {
    let backends = [
        NamedBackend::start("s1").await,
        NamedBackend::start("s2").await,
        NamedBackend::start("s3").await,
    ];
    let entries: Vec<_> = backends.iter().map(|nb| b(&nb.name, nb.addr)).collect();
    let server = start_server(&listener_toml("source", FAST, &entries)).await;
    let proxy = server.local_addr("l").unwrap();
    let clients: Vec<IpAddr> = (2..32).map(|i| IpAddr::from([127, 0, 0, i])).collect();
    let mut before = Vec::new();
    for ip in &clients {
        before.push(connect_named_from(proxy, Some(*ip)).await.backend);
    }
    assert!(
        before.iter().any(|b| b == "s2"),
        "no client on s2: {before:?}"
    );

    let [s1, s2, s3] = backends;
    let s2_addr = s2.addr;
    let s2_state = server.backend_state("l", "s2").unwrap();
    drop(s2);
    wait_for("s2 down", || !s2_state.is_up()).await;
    wait_for_rotation(&server, &["s1", "s3"]).await;
    for (ip, was) in clients.iter().zip(&before) {
        let now = connect_named_from(proxy, Some(*ip)).await.backend;
        if was == "s2" {
            assert_ne!(now, "s2");
        } else {
            assert_eq!(&now, was, "client {ip} of a live backend moved");
        }
    }

    let _s2 = NamedBackend::start_on(s2_addr, "s2").await;
    wait_for("s2 up", || s2_state.is_up()).await;
    wait_for_rotation(&server, &["s1", "s2", "s3"]).await;
    for (ip, was) in clients.iter().zip(&before) {
        assert_eq!(&connect_named_from(proxy, Some(*ip)).await.backend, was);
    }
    drop((s1, s3));
}

#[tokio::test]
async fn on_marked_down_shutdown_closes_open_connections() {
    let db = NamedBackend::start("db").await;
    let spare = NamedBackend::start("spare").await;
    let cfg = format!("on_marked_down = \"shutdown\"\n{FAST}");
    let server = start_server(&listener_toml(
        "leastconn",
        &cfg,
        &[b("db", db.addr), b("spare", spare.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let mut session = connect_named(proxy).await;
    let victim = session.backend.clone();
    let state = server.backend_state("l", &victim).unwrap();
    let (dead, alive) = if victim == "db" {
        (db, spare)
    } else {
        (spare, db)
    };
    // The backend's listener dies (health port gone); its open connection
    // would live on, but the balancer cuts it once the backend is down.
    dead.stop();
    let start = Instant::now();
    assert!(within("cut on mark-down", closed_by_peer(&mut session.stream)).await);
    assert!(!state.is_up());
    assert!(
        start.elapsed() <= DETECTION + SLACK,
        "cut after {:?}",
        start.elapsed()
    );
    // The reconnect lands on the live backend.
    assert_eq!(connect_named(proxy).await.backend, alive.name);
}

#[tokio::test]
async fn on_marked_down_keep_leaves_open_connections() {
    let db = NamedBackend::start("db").await;
    let server = start_server(&listener_toml("leastconn", FAST, &[b("db", db.addr)])).await;
    let proxy = server.local_addr("l").unwrap();
    let mut session = connect_named(proxy).await;
    let state = server.backend_state("l", "db").unwrap();
    db.stop();
    wait_for("db down", || !state.is_up()).await;
    session.stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    within("echo after mark-down", session.stream.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"ping");
}
