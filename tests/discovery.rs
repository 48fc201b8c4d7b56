//! DNS discovery end to end: the real daemon resolving backend names
//! against a real dnsmasq the test starts and rewrites (A/AAAA from a hosts
//! file, SRV from its flags), checked through traffic, the status API,
//! the admin state API and `switchyard_dns_lookups_total`.
//!
//! Each test has its own dnsmasq and its own names, so tests run in
//! parallel without seeing each other's answers.

mod common;
mod dns;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use dns::Dnsmasq;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";
const LOOKUPS: &str = "switchyard_dns_lookups_total";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn map(pairs: &[(&str, usize)]) -> HashMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// The whole config: one listener `l` with one discovered entry `web`.
struct Conf<'a> {
    dns: &'a Dnsmasq,
    interval: &'a str,
    hold: &'a str,
    algorithm: &'a str,
    /// Lines of `[listener.health_check]`.
    check: &'a str,
    /// The entry's `address`.
    address: String,
}

impl Conf<'_> {
    fn toml(&self) -> String {
        format!(
            "{ADMIN}[global]\ndns_servers = [\"{}\"]\ndns_interval = \"{}\"\ndns_hold = \"{}\"\n\n\
             [[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nalgorithm = \"{}\"\n\
             [listener.health_check]\n{}\n\
             [[listener.backend]]\nname = \"web\"\naddress = \"{}\"\ndiscover = \"dns\"\n",
            self.dns.server(),
            self.interval,
            self.hold,
            self.algorithm,
            self.check,
            self.address
        )
    }
}

/// Conf with a fast resolve interval and health check, round robin.
fn fast<'a>(dns: &'a Dnsmasq, address: String) -> Conf<'a> {
    Conf {
        dns,
        interval: "200ms",
        hold: "2s",
        algorithm: "roundrobin",
        check: "interval = \"200ms\"\ntimeout = \"200ms\"",
        address,
    }
}

/// The name a discovered backend gets: `web@<ip>:<port>` (`web@[v6]:port`).
fn disc(ip: IpAddr, port: u16) -> String {
    format!("web@{}", SocketAddr::new(ip, port))
}

/// The greeting of the test backend on `ip`: `b<last octet>`, `v6` for ::1.
fn greeting(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("b{}", v4.octets()[3]),
        IpAddr::V6(_) => "v6".into(),
    }
}

/// One test backend on each of `ips`, all on the same port (what one DNS
/// name with one port needs). Tries new ports until one is free on all.
async fn same_port(ips: &[IpAddr]) -> (u16, Vec<NamedBackend>) {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let rest: Option<Vec<_>> = ips[1..]
            .iter()
            .map(|ip| std::net::TcpListener::bind((*ip, port)).ok())
            .collect();
        if rest.is_none() {
            continue;
        }
        drop((first, rest));
        let mut backends = Vec::new();
        for ip in ips {
            backends.push(NamedBackend::start_on(SocketAddr::new(*ip, port), &greeting(*ip)).await);
        }
        return (port, backends);
    }
    panic!("no port free on all of {ips:?}");
}

/// Percent-encode a path segment (everything but RFC 3986 unreserved).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn state_path(backend: &str) -> String {
    format!("/api/v1/listeners/l/backends/{}/state", encode(backend))
}

async fn status(admin: SocketAddr) -> Value {
    let (code, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Listener `l`'s backends, as the status API lists them.
async fn backends(admin: SocketAddr) -> Vec<Value> {
    let doc = status(admin).await;
    let l = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "l")
        .unwrap_or_else(|| panic!("no listener l in {doc}"))
        .clone();
    l["backends"].as_array().unwrap().clone()
}

fn names(bs: &[Value]) -> Vec<String> {
    bs.iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect()
}

fn find<'a>(bs: &'a [Value], name: &str) -> &'a Value {
    bs.iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {bs:?}"))
}

/// Poll the status API until `cond` holds for `l`'s backends; those.
async fn wait_status(admin: SocketAddr, what: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let start = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let bs = backends(admin).await;
        if cond(&bs) {
            return bs;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out waiting for {what}; last status: {}",
            Value::from(bs)
        );
        poll.tick().await;
    }
}

/// Wait until `l` lists exactly `want` (in this order), all of them up and
/// in rotation.
async fn wait_serving(admin: SocketAddr, want: &[String]) -> Vec<Value> {
    wait_status(admin, &format!("exactly {want:?} in rotation"), |bs| {
        names(bs) == want && bs.iter().all(|b| b["in_rotation"] == true)
    })
    .await
}

/// `switchyard_dns_lookups_total{listener="l",backend="web",result}`; 0
/// while the series does not exist. Every sample of the family must carry
/// exactly the labels listener, backend (an entry's name) and result.
async fn lookups(admin: SocketAddr, result: &str) -> f64 {
    let s = scrape(admin).await;
    let mut found = None;
    for sample in s.samples.iter().filter(|s| s.metric == LOOKUPS) {
        let mut keys: Vec<&str> = sample.labels.keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["backend", "listener", "result"], "{sample:?}");
        assert_eq!(sample.labels.get("listener"), Some("l"), "{sample:?}");
        assert_eq!(sample.labels.get("backend"), Some("web"), "{sample:?}");
        let r = sample.labels.get("result").unwrap();
        assert!(
            ["success", "empty", "failure"].contains(&r),
            "unexpected result label: {sample:?}"
        );
        if r == result {
            assert!(found.is_none(), "two {LOOKUPS} samples for {result}");
            found = Some(match sample.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{LOOKUPS} is not a counter: {other:?}"),
            });
        }
    }
    found.unwrap_or(0.0)
}

/// Wait until the `result` lookup counter reaches `at_least`; its value.
async fn wait_lookups(admin: SocketAddr, result: &str, at_least: f64) -> f64 {
    let start = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let v = lookups(admin, result).await;
        if v >= at_least {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{LOOKUPS}{{result=\"{result}\"}} is {v}, waited for {at_least}"
        );
        poll.tick().await;
    }
}

/// A client connection is closed by the proxy, promptly and before any
/// backend said a word.
async fn closed_without_greeting(proxy: SocketAddr) {
    let start = Instant::now();
    let mut s = connect_from(proxy, None).await;
    let mut got = Vec::new();
    let _ = within("proxy closes the connection", s.read_to_end(&mut got)).await;
    assert!(got.is_empty(), "a backend answered: {got:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "closed only after {:?}",
        start.elapsed()
    );
}

/// `n` sequential connections: which backend answered each.
async fn sequence(proxy: SocketAddr, n: usize) -> Vec<String> {
    let mut seq = Vec::new();
    for _ in 0..n {
        seq.push(connect_named(proxy).await.backend);
    }
    seq
}

/// Send `payload` through `stream` (an echo session), half-close, and read
/// the echo to the end: it must be the payload, byte for byte.
async fn echo_to_end(stream: tokio::net::TcpStream, payload: Vec<u8>) {
    let (mut r, mut w) = stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    within("write through the session", w.write_all(&payload))
        .await
        .unwrap();
    w.shutdown().await.unwrap();
    let got = within("echo of the whole payload", reader).await.unwrap();
    assert_eq!(got.len(), payload.len(), "echo length");
    assert!(got == payload, "echo differs from what was sent");
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8)
        .collect()
}

// ---------------------------------------------------------------- harness

/// The harness itself: `set` is visible to a query as soon as it returns,
/// for A and AAAA, and a removed name gets NXDOMAIN; SRV flags answer;
/// a stopped server answers nothing.
#[test]
fn dnsmasq_harness_answers_what_was_set() {
    let srv = "_h._tcp.svc.test,h1.test,5000,0,10";
    let mut d = Dnsmasq::start_with(&[srv]);
    let a = d.query("h.test", dns::A).unwrap();
    assert_eq!((a.rcode, a.records.len()), (dns::NXDOMAIN, 0), "{a:?}");

    d.set("h.test", &[ip("127.0.0.2"), ip("127.0.0.3")]);
    let a = d.query("h.test", dns::A).unwrap();
    assert_eq!(a.rcode, dns::NOERROR);
    assert_eq!(a.addresses(), [ip("127.0.0.2"), ip("127.0.0.3")].into());
    assert!(a.ttls.iter().all(|&t| t == 0), "TTLs {:?}", a.ttls);
    let aaaa = d.query("h.test", dns::AAAA).unwrap();
    assert_eq!((aaaa.rcode, aaaa.records.len()), (dns::NOERROR, 0));

    d.set("other.test", &[ip("::1")]);
    d.set("h.test", &[ip("127.0.0.2"), ip("::1")]);
    assert_eq!(
        d.addresses("h.test").unwrap(),
        [ip("127.0.0.2"), ip("::1")].into()
    );
    assert_eq!(d.addresses("other.test").unwrap(), [ip("::1")].into());

    d.set("h1.test", &[ip("127.0.0.9")]);
    let s = d.query("_h._tcp.svc.test", dns::SRV).unwrap();
    assert_eq!(s.rcode, dns::NOERROR);
    assert_eq!(
        s.records,
        [dns::Record::Srv {
            priority: 0,
            weight: 10,
            port: 5000,
            target: "h1.test".into()
        }]
    );

    d.set("h.test", &[]);
    let a = d.query("h.test", dns::A).unwrap();
    assert_eq!((a.rcode, a.records.len()), (dns::NXDOMAIN, 0), "{a:?}");
    assert_eq!(d.addresses("other.test").unwrap(), [ip("::1")].into());

    let addr = d.addr;
    d.stop();
    assert_eq!(
        dns::query(addr, "other.test", dns::A, Duration::from_millis(300)),
        None
    );
}

// ---------------------------------------------------------------- tests

/// Round robin over the addresses of one name; a third address joins
/// without a reload; a removed one takes no new connections while its
/// open session runs to its end, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_addresses_join_and_leave_with_dns() {
    let (b2, b3, b4) = (ip("127.0.0.2"), ip("127.0.0.3"), ip("127.0.0.4"));
    let (port, servers) = same_port(&[b2, b3, b4]).await;
    let dns = block_in_place(Dnsmasq::start);
    // Written out of order: the status lists them sorted by address.
    block_in_place(|| dns.set("rr.test", &[b3, b2]));
    let conf = fast(&dns, format!("rr.test:{port}"));
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));

    let bs = wait_serving(admin, &[disc(b2, port), disc(b3, port)]).await;
    for (b, ip) in bs.iter().zip([b2, b3]) {
        assert_eq!(b["address"], SocketAddr::new(ip, port).to_string(), "{b}");
        assert_eq!(b["discovered_from"], "web", "{b}");
        assert_eq!(b["weight"], 1, "{b}");
        assert_eq!(b["backup"], false, "{b}");
        assert_eq!(b["admin_state"], "ready", "{b}");
        assert_eq!(b["health"], "up", "{b}");
    }

    // Exact round robin: alternating, 5 and 5.
    let seq = sequence(proxy, 10).await;
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "not alternating: {seq:?}"
    );
    let mut counts = HashMap::new();
    for s in &seq {
        *counts.entry(s.clone()).or_default() += 1;
    }
    assert_eq!(counts, map(&[("b2", 5), ("b3", 5)]), "{seq:?}");

    // A third address joins from DNS alone.
    block_in_place(|| dns.set("rr.test", &[b4, b2, b3]));
    let bs = wait_serving(admin, &[disc(b2, port), disc(b3, port), disc(b4, port)]).await;
    // The kept ones kept their counters.
    let totals: Vec<u64> = bs
        .iter()
        .map(|b| b["connections_total"].as_u64().unwrap())
        .collect();
    assert_eq!(totals, [5, 5, 0], "{}", Value::from(bs));
    assert_eq!(
        spread(proxy, 9).await,
        map(&[("b2", 3), ("b3", 3), ("b4", 3)])
    );

    // A session held on b3, then b3 leaves DNS.
    let mut held = None;
    for _ in 0..3 {
        let s = connect_named(proxy).await;
        if s.backend == "b3" {
            held = Some(s);
            break;
        }
    }
    let mut held = held.expect("round robin over 3 reaches b3 within 3 connections");
    let before = pattern(4096, 7);
    held.stream.write_all(&before).await.unwrap();
    let mut echo = vec![0; before.len()];
    within("echo before removal", held.stream.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(echo, before);

    block_in_place(|| dns.set("rr.test", &[b4, b2]));
    wait_status(admin, "b3 gone from the status", |bs| {
        names(bs) == [disc(b2, port), disc(b4, port)]
    })
    .await;
    assert_eq!(spread(proxy, 10).await, map(&[("b2", 5), ("b4", 5)]));
    echo_to_end(held.stream, pattern(64 * 1024, 11)).await;
    wait_for("b3's session closed", || servers[1].open() == 0).await;

    assert!(lookups(admin, "success").await >= 3.0);
}

/// With dnsmasq gone every lookup fails, and the last known set stays —
/// for well over `dns_hold` — and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_lookups_keep_the_last_known_set() {
    let (b2, b3) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let (port, _servers) = same_port(&[b2, b3]).await;
    let mut dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("fail.test", &[b2, b3]));
    let hold = Duration::from_secs(1);
    let interval = Duration::from_millis(200);
    let conf = Conf {
        hold: "1s",
        ..fast(&dns, format!("fail.test:{port}"))
    };
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));
    let want = [disc(b2, port), disc(b3, port)];
    wait_serving(admin, &want).await;
    wait_lookups(admin, "success", 1.0).await;

    dns.stop();
    let stopped = Instant::now();
    let failures = lookups(admin, "failure").await;
    let success = lookups(admin, "success").await;
    // Enough failed lookups to cover three holds, and three holds of time.
    let needed = (3 * hold.as_millis() / interval.as_millis()) as f64;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let now = lookups(admin, "failure").await;
        if now >= failures + needed && stopped.elapsed() >= 3 * hold {
            break;
        }
        assert!(
            stopped.elapsed() < DEADLINE,
            "{now} failed lookups after {:?}; waited for {} over {:?}",
            stopped.elapsed(),
            failures + needed,
            3 * hold
        );
        poll.tick().await;
    }

    let bs = backends(admin).await;
    assert_eq!(names(&bs), want, "the set changed without an answer");
    assert!(bs.iter().all(|b| b["in_rotation"] == true), "{bs:?}");
    assert_eq!(spread(proxy, 4).await, map(&[("b2", 2), ("b3", 2)]));
    // At most the one lookup in flight when dnsmasq stopped succeeded.
    assert!(lookups(admin, "success").await <= success + 1.0);
    assert_eq!(lookups(admin, "empty").await, 0.0);
}

/// An answer with no address (NXDOMAIN) empties the set, but only once
/// `dns_hold` has passed since the first such answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_answer_empties_the_set_only_after_hold() {
    let (b2, b3) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let (port, _servers) = same_port(&[b2, b3]).await;
    let dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("gone.test", &[b2, b3]));
    let (hold, interval) = (Duration::from_secs(2), Duration::from_millis(200));
    let conf = fast(&dns, format!("gone.test:{port}"));
    assert_eq!((conf.hold, conf.interval), ("2s", "200ms"));
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));
    let want = [disc(b2, port), disc(b3, port)];
    wait_serving(admin, &want).await;
    assert_eq!(lookups(admin, "empty").await, 0.0);

    block_in_place(|| dns.set("gone.test", &[]));
    wait_lookups(admin, "empty", 1.0).await;
    let first_empty = Instant::now();
    // Still there, still serving, right after the first empty answer.
    assert_eq!(names(&backends(admin).await), want);
    let s = connect_named(proxy).await;
    assert!(["b2", "b3"].contains(&s.backend.as_str()), "{}", s.backend);
    drop(s);

    wait_status(admin, "the set emptied", |bs| bs.is_empty()).await;
    let held = first_empty.elapsed();
    assert!(
        held >= hold - interval,
        "emptied {held:?} after the first empty answer; dns_hold is {hold:?}"
    );
    closed_without_greeting(proxy).await;
    assert!(lookups(admin, "empty").await >= 2.0);
}

/// SRV: the lowest priority serves; every higher one forms one backup
/// tier that takes over when no primary is up. SRV weight becomes the
/// backend's weight (0 → 1, capped at 256); a target that does not resolve
/// is left out. Health found by probes survives re-resolution.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_priorities_are_primaries_and_backups() {
    let t1 = NamedBackend::start_on("127.0.0.5:0".parse().unwrap(), "t1").await;
    let t2 = NamedBackend::start_on("127.0.0.6:0".parse().unwrap(), "t2").await;
    // t4: an address where nothing listens (bound, read, released).
    let t4 = std::net::TcpListener::bind("127.0.0.7:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (p1, p2, p4) = (t1.addr.port(), t2.addr.port(), t4.port());
    let srv = [
        format!("_svc._tcp.svc.test,t1.test,{p1},0,10"),
        format!("_svc._tcp.svc.test,t2.test,{p2},10,0"),
        // Same priority as t1, but its name has no address.
        "_svc._tcp.svc.test,t3.test,5999,0,5".to_owned(),
        // A third priority: the same backup tier as t2.
        format!("_svc._tcp.svc.test,t4.test,{p4},20,1000"),
    ];
    let srv: Vec<&str> = srv.iter().map(String::as_str).collect();
    let dns = block_in_place(|| Dnsmasq::start_with(&srv));
    block_in_place(|| dns.set("t1.test", &[t1.addr.ip()]));
    block_in_place(|| dns.set("t2.test", &[t2.addr.ip()]));
    block_in_place(|| dns.set("t4.test", &[t4.ip()]));
    let conf = fast(&dns, "_svc._tcp.svc.test".into());
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));

    let (n1, n2, n4) = (
        disc(t1.addr.ip(), p1),
        disc(t2.addr.ip(), p2),
        disc(t4.ip(), p4),
    );
    let bs = wait_status(admin, "t1, t2, t4 listed; t1 in rotation; t4 down", |bs| {
        names(bs) == [n1.clone(), n2.clone(), n4.clone()]
            && find(bs, &n1)["in_rotation"] == true
            && find(bs, &n4)["health"] == "down"
    })
    .await;
    let (s1, s2, s4) = (find(&bs, &n1), find(&bs, &n2), find(&bs, &n4));
    assert_eq!(s1["address"], t1.addr.to_string(), "{s1}");
    assert_eq!(s2["address"], t2.addr.to_string(), "{s2}");
    assert_eq!(s4["address"], t4.to_string(), "{s4}");
    let tier = |b: &Value| (b["backup"].clone(), b["weight"].clone());
    assert_eq!(tier(s1), (false.into(), 10.into()), "{s1}");
    assert_eq!(tier(s2), (true.into(), 1.into()), "SRV weight 0 → 1: {s2}");
    assert_eq!(tier(s4), (true.into(), 256.into()), "capped at 256: {s4}");
    for b in [s1, s2, s4] {
        assert_eq!(b["discovered_from"], "web", "{b}");
    }
    assert_eq!(
        s2["in_rotation"], false,
        "a backup while a primary is up: {s2}"
    );

    assert_eq!(spread(proxy, 6).await, map(&[("t1", 6)]));

    t1.stop();
    wait_status(admin, "t1 down, t2 in rotation", |bs| {
        find(bs, &n1)["health"] == "down" && find(bs, &n2)["in_rotation"] == true
    })
    .await;
    assert_eq!(spread(proxy, 4).await, map(&[("t2", 4)]));

    // Lookups of the same answer go on; the probes' verdicts stay.
    let ok = lookups(admin, "success").await;
    assert!(ok >= 1.0);
    wait_lookups(admin, "success", ok + 3.0).await;
    let bs = backends(admin).await;
    assert_eq!(names(&bs), [n1.clone(), n2.clone(), n4.clone()]);
    assert_eq!(
        find(&bs, &n1)["health"],
        "down",
        "{}",
        Value::from(bs.clone())
    );
    assert_eq!(
        find(&bs, &n4)["health"],
        "down",
        "{}",
        Value::from(bs.clone())
    );
    assert_eq!(spread(proxy, 4).await, map(&[("t2", 4)]));
}

/// Two instances fed the same answer place the same clients on the same
/// backends with `algorithm = "source"`, even though one learned the
/// addresses one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_agree_on_source_hashing() {
    let ips = [ip("127.0.0.2"), ip("127.0.0.3"), ip("127.0.0.4")];
    let (port, _servers) = same_port(&ips).await;
    let dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("src.test", &ips[2..]));
    let conf = Conf {
        algorithm: "source",
        ..fast(&dns, format!("src.test:{port}"))
    };
    let one = block_in_place(|| Daemon::start(&conf.toml()));
    wait_serving(one.admin.unwrap(), &[disc(ips[2], port)]).await;
    block_in_place(|| dns.set("src.test", &ips));
    let two = block_in_place(|| Daemon::start(&conf.toml()));
    let want: Vec<String> = ips.iter().map(|ip| disc(*ip, port)).collect();
    wait_serving(one.admin.unwrap(), &want).await;
    wait_serving(two.admin.unwrap(), &want).await;

    let mut used = HashMap::new();
    for i in 10..30 {
        let client = ip(&format!("127.0.0.{i}"));
        let a = connect_named_from(one.addr("l"), Some(client))
            .await
            .backend;
        let b = connect_named_from(two.addr("l"), Some(client))
            .await
            .backend;
        assert_eq!(a, b, "instances disagree for client {client}");
        *used.entry(a).or_insert(0) += 1;
    }
    assert!(
        used.len() >= 2,
        "20 clients all hashed to one backend: {used:?}"
    );
}

/// A name that does not resolve at start: the daemon is ready, the entry
/// has no backends and a client is closed at once; when DNS answers, the
/// entry fills in and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unresolvable_at_start_fills_in_later() {
    let (b2,) = (ip("127.0.0.2"),);
    let (port, _servers) = same_port(&[b2]).await;
    let dns = block_in_place(Dnsmasq::start);
    let conf = fast(&dns, format!("late.test:{port}"));
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));

    assert_eq!(
        http(admin, "GET", "/readyz", &[], "").await,
        (200, "ready\n".into())
    );
    wait_lookups(admin, "empty", 1.0).await;
    assert_eq!(backends(admin).await, Vec::<Value>::new());
    closed_without_greeting(proxy).await;
    assert_eq!(lookups(admin, "success").await, 0.0);

    block_in_place(|| dns.set("late.test", &[b2]));
    wait_serving(admin, &[disc(b2, port)]).await;
    assert_eq!(spread(proxy, 3).await, map(&[("b2", 3)]));
    assert!(lookups(admin, "success").await >= 1.0);
}

/// An operator's drain on a discovered backend, by its percent-encoded
/// name, survives re-resolution and a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_state_of_a_discovered_backend_survives_lookups_and_reload() {
    let (b2, b3) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let (port, _servers) = same_port(&[b2, b3]).await;
    let dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("drain.test", &[b2, b3]));
    let conf = fast(&dns, format!("drain.test:{port}"));
    let mut d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));
    let (n2, n3) = (disc(b2, port), disc(b3, port));
    wait_serving(admin, &[n2.clone(), n3.clone()]).await;

    let path = state_path(&n2);
    assert_eq!(
        path,
        format!("/api/v1/listeners/l/backends/web%40127.0.0.2%3A{port}/state")
    );
    let (code, body) = http(admin, "PUT", &path, &[], "drain").await;
    assert_eq!(code, 200, "{body}");
    let drained = |bs: &[Value]| {
        names(bs) == [n2.clone(), n3.clone()]
            && find(bs, &n2)["admin_state"] == "drain"
            && find(bs, &n2)["in_rotation"] == false
            && find(bs, &n3)["in_rotation"] == true
    };
    assert!(drained(&backends(admin).await));
    assert_eq!(spread(proxy, 4).await, map(&[("b3", 4)]));

    // Three more lookups of the same answer.
    let ok = lookups(admin, "success").await;
    wait_lookups(admin, "success", ok + 3.0).await;
    let bs = backends(admin).await;
    assert!(drained(&bs), "after more lookups: {}", Value::from(bs));

    // A reload re-resolves; the state stays.
    assert!(block_in_place(|| d.reload()));
    let bs = backends(admin).await;
    assert!(drained(&bs), "after a reload: {}", Value::from(bs));
    let (code, body) = http(admin, "GET", &path, &[], "").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["admin_state"], "drain", "{v}");
    assert_eq!(v["backend"], n2, "{v}");
    assert_eq!(spread(proxy, 4).await, map(&[("b3", 4)]));
}

/// A reload resolves again at once, whatever `dns_interval` says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_resolves_at_once() {
    let (b2, b3) = (ip("127.0.0.2"), ip("127.0.0.3"));
    let (port, _servers) = same_port(&[b2, b3]).await;
    let dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("slow.test", &[b2]));
    let conf = Conf {
        interval: "1h",
        ..fast(&dns, format!("slow.test:{port}"))
    };
    let mut d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));
    wait_serving(admin, &[disc(b2, port)]).await;
    let ok = lookups(admin, "success").await;
    assert!(ok >= 1.0);

    block_in_place(|| dns.set("slow.test", &[b2, b3]));
    // No lookup is due for an hour: nothing changes by itself.
    assert_eq!(names(&backends(admin).await), [disc(b2, port)]);
    assert_eq!(lookups(admin, "success").await, ok);

    let asked = Instant::now();
    assert!(block_in_place(|| d.reload()));
    wait_serving(admin, &[disc(b2, port), disc(b3, port)]).await;
    assert!(asked.elapsed() < DEADLINE);
    assert_eq!(spread(proxy, 4).await, map(&[("b2", 2), ("b3", 2)]));
    assert!(lookups(admin, "success").await > ok);
}

/// A and AAAA together; an IPv6 backend is `web@[v6]:port`, serves, and
/// its admin path with `%5B`/`%5D` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_addresses_are_discovered_and_addressable() {
    let (v4, v6) = (ip("127.0.0.2"), ip("::1"));
    let (port, _servers) = same_port(&[v4, v6]).await;
    let dns = block_in_place(Dnsmasq::start);
    block_in_place(|| dns.set("six.test", &[v6, v4]));
    let conf = fast(&dns, format!("six.test:{port}"));
    let d = block_in_place(|| Daemon::start(&conf.toml()));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("l"));

    let n6 = format!("web@[::1]:{port}");
    assert_eq!(disc(v6, port), n6);
    let bs = wait_serving(admin, &[disc(v4, port), n6.clone()]).await;
    assert_eq!(find(&bs, &n6)["address"], format!("[::1]:{port}"));
    assert_eq!(find(&bs, &n6)["discovered_from"], "web");
    let seq = sequence(proxy, 4).await;
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "not alternating: {seq:?}"
    );
    assert_eq!(seq.iter().filter(|s| *s == "v6").count(), 2, "{seq:?}");

    let path = state_path(&n6);
    assert_eq!(
        path,
        format!("/api/v1/listeners/l/backends/web%40%5B%3A%3A1%5D%3A{port}/state")
    );
    let (code, body) = http(admin, "PUT", &path, &[], "maint").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(admin, "GET", &path, &[], "").await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["admin_state"], "maint", "{v}");
    assert_eq!(spread(proxy, 3).await, map(&[("b2", 3)]));

    let (code, body) = http(admin, "PUT", &path, &[], "ready").await;
    assert_eq!(code, 200, "{body}");
    wait_serving(admin, &[disc(v4, port), n6.clone()]).await;
    let seq = sequence(proxy, 4).await;
    assert_eq!(seq.iter().filter(|s| *s == "v6").count(), 2, "{seq:?}");
}
