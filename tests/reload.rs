//! Reload without dropping a connection: the real daemon with SIGHUP and
//! `--watch`, and the library server where live state must be inspected.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use sha2::{Digest, Sha256};
use switchyard::config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

fn map(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_backend() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let mut d = Daemon::start(&listener_toml("roundrobin", "", &[b("a", a.addr)]));
    let proxy = d.addr("l");
    assert_eq!(spread(proxy, 4).await, map(&[("a", 4)]));
    d.write_config(&listener_toml(
        "roundrobin",
        "",
        &[b("a", a.addr), b("b", b_.addr)],
    ));
    assert!(block_in_place(|| d.reload()));
    assert_eq!(d.addr("l"), proxy, "same socket");
    assert_eq!(spread(proxy, 10).await, map(&[("a", 5), ("b", 5)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_keeps_streaming_to_the_end() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let mut d = Daemon::start(&listener_toml(
        "roundrobin",
        "",
        &[b("a", a.addr), b("b", b_.addr)],
    ));
    let proxy = d.addr("l");
    let s = connect_named(proxy).await;
    assert_eq!(s.backend, "a");

    // 8 MiB through the echo backend, with `a` removed half-way.
    let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    let (mut r, mut w) = s.stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    let mut sent = Sha256::new();
    for i in 0..8 {
        if i == 4 {
            d.write_config(&listener_toml("roundrobin", "", &[b("b", b_.addr)]));
            assert!(block_in_place(|| d.reload()));
            // New connections no longer reach `a`.
            assert_eq!(spread(proxy, 3).await, map(&[("b", 3)]));
        }
        w.write_all(&chunk).await.unwrap();
        sent.update(&chunk);
    }
    w.shutdown().await.unwrap();
    let got = within("echo of the whole stream", reader).await.unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert_eq!(Sha256::digest(&got), sent.finalize());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_changes_nothing_and_is_reported() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let good = listener_toml("roundrobin", "", &[b("a", a.addr), b("b", b_.addr)]);
    let mut d = Daemon::start(&good);
    let proxy = d.addr("l");
    let mut open = connect_named(proxy).await;

    for bad in [
        good.replace("algorithm = \"roundrobin\"", "algorithm = \"fastest\""),
        good.replace("weight = 1", "weight = 1000"),
        format!("{good}\n[[listener\n"),
    ] {
        d.write_config(&bad);
        d.signal("HUP");
        let line = block_in_place(|| d.log_until(|l| l.contains("reload failed")));
        let file = d.path.display().to_string();
        assert!(line.contains(&format!("{file}:")), "no file:line in {line}");
        assert!(d.alive());
    }
    // A bind that cannot be taken is refused too, before anything changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = listener_toml("roundrobin", "", &[b("a", a.addr)])
        .replace("name = \"l\"", "name = \"m\"")
        .replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    d.write_config(&format!("{good}{extra}"));
    assert!(!block_in_place(|| d.reload()));

    // Old behaviour unchanged: both backends, same socket, open session alive.
    assert_eq!(spread(proxy, 4).await.len(), 2);
    open.stream.write_all(b"ok?").await.unwrap();
    let mut echo = [0u8; 3];
    open.stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"ok?");
    // And a good file applies again.
    d.write_config(&listener_toml("roundrobin", "", &[b("b", b_.addr)]));
    assert!(block_in_place(|| d.reload()));
    assert_eq!(spread(proxy, 3).await, map(&[("b", 3)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_removed_and_moved() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let l = listener_toml("roundrobin", "", &[b("a", a.addr)]);
    let m =
        listener_toml("roundrobin", "", &[b("b", b_.addr)]).replace("name = \"l\"", "name = \"m\"");
    let mut d = Daemon::start(&l);
    let l_addr = d.addr("l");

    // Added.
    d.write_config(&format!("{l}{m}"));
    assert!(block_in_place(|| d.reload()));
    let m_addr = d.addr("m");
    let mut on_m = connect_named(m_addr).await;
    assert_eq!(on_m.backend, "b");

    // Removed: the port refuses, the open session lives on.
    d.write_config(&l);
    assert!(block_in_place(|| d.reload()));
    assert!(tokio::net::TcpStream::connect(m_addr).await.is_err());
    on_m.stream.write_all(b"still").await.unwrap();
    let mut echo = [0u8; 5];
    on_m.stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still");

    // Moved: a new bind takes over, the old address refuses, open sessions
    // on the old socket live on.
    let mut on_l = connect_named(l_addr).await;
    d.write_config(&l.replace("127.0.0.1:0", "127.0.0.2:0"));
    assert!(block_in_place(|| d.reload()));
    let moved = d.addr("l");
    assert_eq!(moved.ip().to_string(), "127.0.0.2");
    assert_eq!(connect_named(moved).await.backend, "a");
    assert!(tokio::net::TcpStream::connect(l_addr).await.is_err());
    on_l.stream.write_all(b"alive").await.unwrap();
    on_l.stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"alive");
}

/// Client connections in a loop (greeting + echo each) until `stop`; counts
/// successes and failures.
async fn client_loop(
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::SeqCst) {
        let attempt = async {
            let mut s = connect_named(proxy).await;
            s.stream.write_all(b"ping").await?;
            let mut echo = [0u8; 4];
            s.stream.read_exact(&mut echo).await?;
            anyhow::ensure!(&echo == b"ping", "bad echo");
            Ok::<_, anyhow::Error>(())
        };
        match attempt.await {
            Ok(()) => ok.fetch_add(1, Ordering::SeqCst),
            Err(_) => failed.fetch_add(1, Ordering::SeqCst),
        };
    }
}

/// 50 reloads alternating between two configs while clients connect
/// continuously; `apply` performs one reload and returns its outcome.
async fn reload_under_load(
    d: &mut Daemon,
    configs: [String; 2],
    apply: fn(&mut Daemon, &str) -> bool,
) {
    let proxy = d.addr("l");
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| tokio::spawn(client_loop(proxy, stop.clone(), ok.clone(), failed.clone())))
        .collect();
    for i in 0..50 {
        let before = ok.load(Ordering::SeqCst);
        assert!(
            block_in_place(|| apply(d, &configs[i % 2])),
            "reload {i} failed"
        );
        // Traffic flows between reloads.
        wait_for("traffic after reload", || {
            ok.load(Ordering::SeqCst) > before
        })
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        within("client loop end", c).await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "failed client connections"
    );
    assert!(ok.load(Ordering::SeqCst) >= 50);
}

fn two_configs(a: SocketAddr, b_: SocketAddr, c: SocketAddr) -> [String; 2] {
    [
        listener_toml("roundrobin", "", &[b("a", a), b("b", b_)]),
        listener_toml("leastconn", "retries = 3", &[b("b", b_), b("c", c)]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sighup_reloads_under_load_lose_no_connection() {
    let (a, b_, c) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
        NamedBackend::start("c").await,
    );
    let configs = two_configs(a.addr, b_.addr, c.addr);
    let mut d = Daemon::start(&configs[0]);
    reload_under_load(&mut d, configs, |d, toml| {
        d.write_config(toml);
        d.reload()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_watched_file_rewrites_under_load_lose_no_connection() {
    let (a, b_, c) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
        NamedBackend::start("c").await,
    );
    let configs = two_configs(a.addr, b_.addr, c.addr);
    let mut d = Daemon::start_with(&configs[0], &["--watch"]);
    // Alternate in-place writes and editor-style rename-over.
    static N: AtomicUsize = AtomicUsize::new(0);
    reload_under_load(&mut d, configs, |d, toml| {
        if N.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
            d.write_config(toml);
        } else {
            d.replace_config(toml);
        }
        d.reload_outcome()
    })
    .await;
}

/// In-process: live state carried across reloads.
#[tokio::test]
async fn kept_backends_keep_state_and_down_stays_down() {
    let fast = "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let a = NamedBackend::start("a").await;
    let dead_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let c = NamedBackend::start("c").await;
    let text = listener_toml("roundrobin", fast, &[b("a", a.addr), b("dead", dead_addr)]);
    let mut server = start_server(&text).await;
    let proxy = server.local_addr("l").unwrap();
    let dead = server.backend_state("l", "dead").unwrap();
    wait_for("dead marked down", || !dead.is_up()).await;
    let a_state = server.backend_state("l", "a").unwrap();
    let _held = connect_named(proxy).await;
    assert_eq!(a_state.active(), 1);

    // A reload that adds `c` and leaves `a` and `dead` alone.
    let new = listener_toml(
        "roundrobin",
        fast,
        &[b("a", a.addr), b("dead", dead_addr), b("c", c.addr)],
    );
    let summary = server
        .reload(config::load_str(&new, Path::new("t.toml")).unwrap())
        .await
        .unwrap();
    assert_eq!(summary.changes.len(), 1);
    let dead_after = server.backend_state("l", "dead").unwrap();
    assert!(Arc::ptr_eq(&dead, &dead_after), "same live state");
    assert!(!dead_after.is_up(), "still down after the reload");
    let a_after = server.backend_state("l", "a").unwrap();
    assert!(Arc::ptr_eq(&a_state, &a_after));
    assert_eq!(a_after.active(), 1, "open connection still counted");
    assert_eq!(a_after.total(), 1);
    let mut rotation: Vec<String> = server
        .in_rotation("l")
        .unwrap()
        .iter()
        .map(|s| s.to_string())
        .collect();
    rotation.sort();
    assert_eq!(rotation, ["a", "c"]);
    assert_eq!(dead_after.connect_errors(), 0, "never offered while down");
}
