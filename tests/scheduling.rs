//! Scheduling over real sockets: the in-process server in front of test
//! backends that answer with their name.

mod common;

use std::collections::HashMap;
use std::net::IpAddr;

use common::*;

#[tokio::test]
async fn roundrobin_equal_weights_exact_thirds() {
    let (a, b_, c) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
        NamedBackend::start("c").await,
    );
    let server = start_server(&listener_toml(
        "roundrobin",
        "",
        &[b("a", a.addr), b("b", b_.addr), b("c", c.addr)],
    ))
    .await;
    let counts = spread(server.local_addr("l").unwrap(), 300).await;
    assert_eq!(
        counts,
        HashMap::from([("a".into(), 100), ("b".into(), 100), ("c".into(), 100)])
    );
    assert_eq!(server.backend_state("l", "a").unwrap().total(), 100);
}

#[tokio::test]
async fn roundrobin_weights_exact_one_two_three() {
    let backends = [
        NamedBackend::start("w1").await,
        NamedBackend::start("w2").await,
        NamedBackend::start("w3").await,
    ];
    let entries: Vec<B<'_>> = backends
        .iter()
        .zip([1, 2, 3])
        .map(|(nb, weight)| B {
            name: &nb.name,
            addr: nb.addr,
            weight,
        })
        .collect();
    let server = start_server(&listener_toml("roundrobin", "", &entries)).await;
    let proxy = server.local_addr("l").unwrap();
    // Every window of 6 consecutive connections holds exactly 1:2:3.
    let mut order = Vec::new();
    for _ in 0..600 {
        order.push(connect_named(proxy).await.backend);
    }
    for window in order.chunks(6) {
        let count = |n: &str| window.iter().filter(|b| *b == n).count();
        assert_eq!(
            (count("w1"), count("w2"), count("w3")),
            (1, 2, 3),
            "{window:?}"
        );
    }
    let total = |n: &str| order.iter().filter(|b| *b == n).count();
    assert_eq!((total("w1"), total("w2"), total("w3")), (100, 200, 300));
}

#[tokio::test]
async fn leastconn_sends_new_connections_to_the_least_loaded() {
    let (a, b_, c) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
        NamedBackend::start("c").await,
    );
    let server = start_server(&listener_toml(
        "leastconn",
        "",
        &[b("a", a.addr), b("b", b_.addr), b("c", c.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    // Six long-held connections spread 2/2/2.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(connect_named(proxy).await);
    }
    let on = |held: &[Session], n: &str| held.iter().filter(|s| s.backend == n).count();
    assert_eq!((on(&held, "a"), on(&held, "b"), on(&held, "c")), (2, 2, 2));

    // Close both of a's: a is now the least loaded and takes the next two.
    held.retain(|s| s.backend != "a");
    let state = server.backend_state("l", "a").unwrap();
    wait_for("a's connections to close", || state.active() == 0).await;
    for _ in 0..2 {
        let s = connect_named(proxy).await;
        assert_eq!(s.backend, "a");
        held.push(s);
    }
    // All equal again (2/2/2): the next three go one to each.
    let mut next: Vec<String> = Vec::new();
    for _ in 0..3 {
        let s = connect_named(proxy).await;
        next.push(s.backend.clone());
        held.push(s);
    }
    next.sort();
    assert_eq!(next, ["a", "b", "c"]);
}

#[tokio::test]
async fn leastconn_weighted_keeps_proportions() {
    let (light, heavy) = (
        NamedBackend::start("light").await,
        NamedBackend::start("heavy").await,
    );
    let server = start_server(&listener_toml(
        "leastconn",
        "",
        &[
            B {
                name: "light",
                addr: light.addr,
                weight: 1,
            },
            B {
                name: "heavy",
                addr: heavy.addr,
                weight: 3,
            },
        ],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(connect_named(proxy).await);
    }
    let heavy_count = held.iter().filter(|s| s.backend == "heavy").count();
    assert_eq!(heavy_count, 30);
    assert_eq!(server.backend_state("l", "heavy").unwrap().active(), 30);
    assert_eq!(server.backend_state("l", "light").unwrap().active(), 10);
}

/// 127.0.0.2 … 127.0.0.(1+n): distinct loopback sources.
fn sources(n: u8) -> Vec<IpAddr> {
    (2..2 + n).map(|i| IpAddr::from([127, 0, 0, i])).collect()
}

#[tokio::test]
async fn source_hash_keeps_each_client_on_one_backend_and_spreads_clients() {
    let backends = [
        NamedBackend::start("s1").await,
        NamedBackend::start("s2").await,
        NamedBackend::start("s3").await,
    ];
    let entries: Vec<_> = backends.iter().map(|nb| b(&nb.name, nb.addr)).collect();
    let server = start_server(&listener_toml("source", "", &entries)).await;
    let proxy = server.local_addr("l").unwrap();
    let mut seen = HashMap::new();
    for ip in sources(30) {
        let first = connect_named_from(proxy, Some(ip)).await.backend;
        for _ in 0..10 {
            let again = connect_named_from(proxy, Some(ip)).await.backend;
            assert_eq!(again, first, "client {ip} moved");
        }
        seen.insert(ip, first);
    }
    let distinct: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(distinct.len(), 3, "30 clients all landed on {distinct:?}");
}

#[tokio::test]
async fn source_hash_agrees_across_instances_and_backend_order() {
    let backends = [
        NamedBackend::start("r1").await,
        NamedBackend::start("r2").await,
        NamedBackend::start("r3").await,
        NamedBackend::start("r4").await,
    ];
    let entries: Vec<_> = backends.iter().map(|nb| b(&nb.name, nb.addr)).collect();
    let mut reversed: Vec<_> = backends.iter().map(|nb| b(&nb.name, nb.addr)).collect();
    reversed.reverse();
    // Two independent instances, as an HA pair would run them.
    let one = start_server(&listener_toml("source", "", &entries)).await;
    let two = start_server(&listener_toml("source", "", &reversed)).await;
    for ip in sources(20) {
        let a = connect_named_from(one.local_addr("l").unwrap(), Some(ip))
            .await
            .backend;
        let b = connect_named_from(two.local_addr("l").unwrap(), Some(ip))
            .await
            .backend;
        assert_eq!(a, b, "instances disagree on {ip}");
    }
}

#[tokio::test]
async fn several_listeners_in_one_process() {
    let (x, y) = (
        NamedBackend::start("x").await,
        NamedBackend::start("y").await,
    );
    let toml = format!(
        "{}\n{}",
        listener_toml("roundrobin", "", &[b("x", x.addr)]),
        listener_toml("leastconn", "", &[b("y", y.addr)]).replace("name = \"l\"", "name = \"m\"")
    );
    let server = start_server(&toml).await;
    let (l, m) = (
        server.local_addr("l").unwrap(),
        server.local_addr("m").unwrap(),
    );
    assert_ne!(l, m);
    assert_eq!(connect_named(l).await.backend, "x");
    assert_eq!(connect_named(m).await.backend, "y");
}

#[tokio::test]
async fn ipv6_listener_and_backend() {
    let v6 = NamedBackend::start_on("[::1]:0".parse().unwrap(), "six").await;
    let toml =
        listener_toml("roundrobin", "", &[b("six", v6.addr)]).replace("127.0.0.1:0", "[::1]:0");
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();
    assert!(proxy.is_ipv6());
    assert_eq!(connect_named(proxy).await.backend, "six");
}
