//! HTTP mode and lbCookie stickiness, each SPEC bullet against real HTTP
//! backends that report what they received.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use switchyard::proxy::lbcookie::cookie_id;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

const STICKY: &str =
    "mode = \"http\"\n[listener.sticky]\nmethod = \"lbcookie\"\ncookie = \"SERVERID\"\n";
const FAST: &str = "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";

async fn two_backends() -> (HttpBackend, HttpBackend) {
    (
        HttpBackend::start("web1").await,
        HttpBackend::start("web2").await,
    )
}

fn web_config(extra: &str, one: &HttpBackend, two: &HttpBackend) -> String {
    listener_toml(
        "roundrobin",
        extra,
        &[b("web1", one.addr), b("web2", two.addr)],
    )
    .replace("name = \"l\"", "name = \"web\"")
}

/// `NAME=value` of the SERVERID cookie a response sets, if any.
fn set_serverid(reply: &HttpReply) -> Option<String> {
    reply.set_cookies().iter().find_map(|c| {
        c.strip_prefix("SERVERID=")
            .map(|rest| rest.split(';').next().unwrap().to_owned())
    })
}

#[tokio::test]
async fn first_response_inserts_the_cookie_with_nocache() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(
        &format!("{STICKY}max_age = \"1h\"\n"),
        &one,
        &two,
    ))
    .await;
    let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 200);
    let backend = r.header("x-backend").to_owned();
    let set = r.set_cookies();
    assert_eq!(set.len(), 1, "{set:?}");
    let id = cookie_id("web", &backend);
    let mut attrs: Vec<&str> = set[0].split("; ").collect();
    attrs.sort();
    assert_eq!(
        attrs,
        [
            "HttpOnly",
            "Max-Age=3600",
            "Path=/",
            &format!("SERVERID={id}") as &str
        ]
    );
    assert_eq!(r.header("cache-control"), "no-cache=\"set-cookie\"");
    // Opaque: no address or port of the backend in it.
    assert!(!id.contains(&one.addr.port().to_string()) || id.len() == 16);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()) && id.len() == 16);
}

#[tokio::test]
async fn a_valid_cookie_keeps_fifty_requests_on_one_backend_without_new_cookies() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let proxy = server.local_addr("web").unwrap();
    let mut c = HttpClient::connect(proxy).await;
    let first = c.get("/", &[]).await;
    let id = set_serverid(&first).unwrap();
    let home = first.header("x-backend").to_owned();
    let cookie = format!("SERVERID={id}");
    for i in 0..50 {
        // Half on the same keep-alive connection, half on new ones.
        let r = if i % 2 == 0 {
            c.get("/", &[("cookie", &cookie)]).await
        } else {
            HttpClient::connect(proxy)
                .await
                .get("/", &[("cookie", &cookie)])
                .await
        };
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-backend"), home, "request {i} left its backend");
        assert!(r.set_cookies().is_empty(), "request {i} got a new cookie");
        assert!(r.headers.get("cache-control").is_none());
    }
    // Without the cookie, round robin alternates.
    let a = c.get("/", &[]).await.header("x-backend").to_owned();
    let b = c.get("/", &[]).await.header("x-backend").to_owned();
    assert_ne!(a, b);
}

#[tokio::test]
async fn own_cookie_is_stripped_others_pass_untouched_and_forwarded_headers_added() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
    let id = cookie_id("web", "web2");
    let r = c
        .get(
            "/path?q=1",
            &[
                (
                    "cookie",
                    &format!("lang=en; SERVERID={id};  theme=\"dark mode\""),
                ),
                ("cookie", "session=xyz"),
                ("x-forwarded-for", "10.1.2.3"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret"),
            ],
        )
        .await;
    assert_eq!(r.header("x-backend"), "web2");
    assert_eq!(
        r.header("x-seen-cookie"),
        "lang=en; theme=\"dark mode\" | session=xyz"
    );
    assert_eq!(r.header("x-seen-xff"), "10.1.2.3, 127.0.0.1");
    assert_eq!(r.header("x-seen-xfp"), "http");
    assert_eq!(r.header("x-seen-forwarded"), "for=127.0.0.1;proto=http");
    assert_eq!(r.header("x-seen-path"), "/path?q=1");
    // Hop-by-hop headers do not reach the backend as sent.
    assert!(!r.header("x-seen-connection").contains("x-hop"));
    // A request with only our cookie reaches the backend with none.
    let r = c.get("/", &[("cookie", &format!("SERVERID={id}"))]).await;
    assert_eq!(r.header("x-seen-cookie"), "");
}

#[tokio::test]
async fn cookie_of_a_dead_unknown_or_maint_backend_is_replaced() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(&format!("{STICKY}{FAST}"), &one, &two)).await;
    let proxy = server.local_addr("web").unwrap();
    let mut c = HttpClient::connect(proxy).await;

    // Unknown id → scheduled, new cookie.
    let r = c.get("/", &[("cookie", "SERVERID=0123456789abcdef")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        set_serverid(&r),
        Some(cookie_id("web", r.header("x-backend")))
    );

    // web1 killed: its cookie is redispatched to web2 with a new cookie.
    let web1_cookie = format!("SERVERID={}", cookie_id("web", "web1"));
    let state = server.backend_state("web", "web1").unwrap();
    drop(one);
    wait_for("web1 down", || !state.is_up()).await;
    wait_for("web1 out of rotation", || {
        server
            .in_rotation("web")
            .unwrap()
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            == ["web2"]
    })
    .await;
    for _ in 0..5 {
        let r = c.get("/", &[("cookie", &web1_cookie)]).await;
        assert_eq!(r.status, 200, "redispatched, not failed");
        assert_eq!(r.header("x-backend"), "web2");
        assert_eq!(set_serverid(&r), Some(cookie_id("web", "web2")));
    }
    drop(two);
}

#[tokio::test]
async fn keep_alive_requests_are_routed_one_by_one() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
    let mut seen = Vec::new();
    for name in ["web1", "web2", "web2", "web1", "web1", "web2"] {
        let cookie = format!("other=1; SERVERID={}", cookie_id("web", name));
        let r = c.get("/", &[("cookie", &cookie)]).await;
        seen.push(r.header("x-backend").to_owned());
    }
    assert_eq!(seen, ["web1", "web2", "web2", "web1", "web1", "web2"]);
}

#[tokio::test]
async fn cookie_ids_are_the_same_on_two_instances_and_after_restart() {
    let (one, two) = two_backends().await;
    let config = web_config(STICKY, &one, &two);
    let mut ids = Vec::new();
    for _ in 0..2 {
        // Two independent instances (as an HA pair, or before/after restart).
        let server = start_server(&config).await;
        let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
        let mut by_backend = HashMap::new();
        for _ in 0..2 {
            let r = c.get("/", &[]).await;
            by_backend.insert(r.header("x-backend").to_owned(), set_serverid(&r).unwrap());
        }
        ids.push(by_backend);
        server.shutdown(Duration::ZERO).await;
    }
    assert_eq!(ids[0].len(), 2);
    assert_eq!(ids[0], ids[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_sticky_clients_and_maint_does_not() {
    let (one, two) = two_backends().await;
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}",
        web_config(STICKY, &one, &two)
    );
    let d = Daemon::start(&toml);
    let admin = d.admin.unwrap();
    let proxy = d.addr("web");
    let web1 = format!("SERVERID={}", cookie_id("web", "web1"));
    let path = "/api/v1/listeners/web/backends/web1/state";
    assert_eq!(http(admin, "PUT", path, &[], "drain").await.0, 200);
    let mut c = HttpClient::connect(proxy).await;
    for _ in 0..5 {
        let r = c.get("/", &[("cookie", &web1)]).await;
        assert_eq!(
            r.header("x-backend"),
            "web1",
            "drained backend keeps sticky requests"
        );
        assert!(r.set_cookies().is_empty());
        // New clients do not go there.
        let fresh = c.get("/", &[]).await;
        assert_eq!(fresh.header("x-backend"), "web2");
    }
    assert_eq!(http(admin, "PUT", path, &[], "maint").await.0, 200);
    let r = c.get("/", &[("cookie", &web1)]).await;
    assert_eq!(r.header("x-backend"), "web2");
    assert_eq!(set_serverid(&r), Some(cookie_id("web", "web2")));
    drop(d);
}

#[tokio::test]
async fn websocket_upgrade_is_relayed_to_the_chosen_backend() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let proxy = server.local_addr("web").unwrap();
    let mut s = connect_from(proxy, None).await;
    let id = cookie_id("web", "web2");
    s.write_all(
        format!(
            "GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\nCookie: SERVERID={id}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-backend: web2"),
        "{head}"
    );
    for msg in [&b"hello"[..], b"through the tunnel", &[0u8, 255, 1, 254]] {
        s.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        within("tunnel echo", s.read_exact(&mut echo))
            .await
            .unwrap();
        assert_eq!(echo, msg);
    }
}

/// Read an HTTP response head byte by byte (leaves the stream after it).
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within("response head", s.read(&mut byte)).await.unwrap();
        assert_eq!(n, 1, "closed mid-head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_bodies_stream_intact_both_ways() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
    let body: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let sent = Sha256::digest(&body);
    let r = c.request("POST", "/upload", &[], body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 32 << 20);
    assert_eq!(Sha256::digest(&r.body), sent);
    // Counted as body bytes both ways on that backend.
    let state = server.backend_state("web", r.header("x-backend")).unwrap();
    wait_for("byte counters", || state.bytes() == (32 << 20, 32 << 20)).await;
}

#[tokio::test]
async fn slow_header_client_is_cut_at_the_header_timeout() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(
        &format!("header_timeout = \"500ms\"\n{STICKY}"),
        &one,
        &two,
    ))
    .await;
    // The server's wait for headers starts at its accept, which is after
    // the client began to connect: that is the bound the client can see.
    let start = tokio::time::Instant::now();
    let mut s = connect_from(server.local_addr("web").unwrap(), None).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap(); // never finished
    assert!(within("cut", closed_by_peer(&mut s)).await);
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(one.requests.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(two.requests.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A keep-alive client idle after its request is closed the same way.
    // The wait for the next request starts once the response has gone out,
    // which is after the request was sent and before the client reads it:
    // only the former is a lower bound the client can measure.
    let mut s = connect_from(server.local_addr("web").unwrap(), None).await;
    let requested = tokio::time::Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(within("idle keep-alive cut", closed_by_peer(&mut s)).await);
    assert!(requested.elapsed() >= Duration::from_millis(500));
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let mut s = connect_from(server.local_addr("web").unwrap(), None).await;
    let big = "x".repeat(70 * 1024);
    s.write_all(format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
}

#[tokio::test]
async fn no_backend_is_503_and_failed_connects_are_502_both_counted() {
    // Ports that refuse.
    let dead: Vec<SocketAddr> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        })
        .collect();
    let toml = listener_toml(
        "roundrobin",
        "mode = \"http\"\n[listener.health_check]\ninterval = \"1h\"\ntimeout = \"1s\"\n",
        &[b("d1", dead[0]), b("d2", dead[1])],
    );
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();
    // The first probe of each takes it out; until then connects fail → 502.
    let mut c = HttpClient::connect(proxy).await;
    let r = c.get("/", &[]).await;
    assert!([502, 503].contains(&r.status), "{}", r.status);
    let (s1, s2) = (
        server.backend_state("l", "d1").unwrap(),
        server.backend_state("l", "d2").unwrap(),
    );
    wait_for("both down", || !s1.is_up() && !s2.is_up()).await;
    wait_for("out of rotation", || {
        server.in_rotation("l").unwrap().is_empty()
    })
    .await;
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "no backend available\n");
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    assert!(
        text.contains(r#"switchyard_http_requests_total{backend="",code="503",listener="l"} 1"#),
        "{text}"
    );

    // A backend believed up that refuses: retries exhausted → 502.
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = up.local_addr().unwrap();
    let toml = listener_toml(
        "roundrobin",
        "mode = \"http\"\nretries = 0\n[listener.health_check]\ninterval = \"1h\"\ntimeout = \"1s\"\n",
        &[b("flaky", addr)],
    );
    let server = start_server(&toml).await;
    let state = server.backend_state("l", "flaky").unwrap();
    wait_for("first probe passed", || {
        server.checks("l", "flaky").unwrap().0 == 1
    })
    .await;
    drop(up);
    let mut c = HttpClient::connect(server.local_addr("l").unwrap()).await;
    let r = c.get("/", &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(state.connect_errors(), 1);
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    assert!(
        text.contains(r#"switchyard_http_requests_total{backend="",code="502",listener="l"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn responses_are_counted_per_backend_and_code() {
    let (one, two) = two_backends().await;
    let server = start_server(&web_config(STICKY, &one, &two)).await;
    let mut c = HttpClient::connect(server.local_addr("web").unwrap()).await;
    for _ in 0..6 {
        assert_eq!(c.get("/", &[]).await.status, 200);
    }
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    for b in ["web1", "web2"] {
        let line = format!(
            r#"switchyard_http_requests_total{{backend="{b}",code="200",listener="web"}} 3"#
        );
        assert!(text.contains(&line), "{line}\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_to_keep_alive_clients_at_their_next_request() {
    let (one, two) = two_backends().await;
    let mut d = Daemon::start(&web_config(STICKY, &one, &two));
    let mut c = HttpClient::connect(d.addr("web")).await;
    assert_eq!(c.get("/", &[]).await.status, 200);
    let drained = listener_toml(
        "roundrobin",
        STICKY,
        &[
            B {
                name: "web1",
                addr: one.addr,
                weight: 0,
            },
            b("web2", two.addr),
        ],
    )
    .replace("name = \"l\"", "name = \"web\"");
    d.write_config(&drained);
    assert!(block_in_place(|| d.reload()));
    for _ in 0..4 {
        assert_eq!(c.get("/", &[]).await.header("x-backend"), "web2");
    }
}
