//! The admin endpoint of the real daemon: metrics parsed with a real
//! Prometheus text parser, readiness, status, drain/maint and the token.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use prometheus_parse::Scrape;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

fn must(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample_value(scrape, name, labels).unwrap_or_else(|| panic!("missing {name} {labels:?}"))
}

/// One connection: read the greeting, send `payload`, read its echo, close.
async fn exchange(proxy: SocketAddr, payload: &[u8]) -> String {
    let mut s = connect_named(proxy).await;
    s.stream.write_all(payload).await.unwrap();
    let mut echo = vec![0u8; payload.len()];
    s.stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, payload);
    s.backend
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exact_after_known_traffic() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let zero = NamedBackend::start("zero").await;
    let toml = format!(
        "{ADMIN}{}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr), b("b", b_.addr)]),
        listener_toml(
            "roundrobin",
            "",
            &[B {
                name: "zero",
                addr: zero.addr,
                weight: 0
            }]
        )
        .replace("name = \"l\"", "name = \"empty\"")
    );
    let d = Daemon::start(&toml);
    let admin = d.admin.expect("admin address logged");
    let proxy = d.addr("l");
    for _ in 0..10 {
        exchange(proxy, b"hello").await;
    }
    // Three clients that nothing can serve.
    for _ in 0..3 {
        let mut c = connect_from(d.addr("empty"), None).await;
        assert!(closed_by_peer(&mut c).await);
    }
    // Counters settle when the relays have ended.
    let mut s = scrape(admin).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let probed = |s: &Scrape, backend| {
        sample_value(
            s,
            "switchyard_health_checks_total",
            &[("backend", backend), ("result", "success")],
        )
        .unwrap_or(0.0)
            >= 1.0
    };
    while must(
        &s,
        "switchyard_connection_duration_seconds_count",
        &[("listener", "l")],
    ) < 10.0
        || !probed(&s, "a")
        || !probed(&s, "b")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections did not end"
        );
        s = scrape(admin).await;
    }

    // The exposition declares every family with its type.
    let types: HashMap<&str, &str> = [
        ("switchyard_connections_total", "counter"),
        ("switchyard_active_connections", "gauge"),
        ("switchyard_bytes_total", "counter"),
        ("switchyard_backend_up", "gauge"),
        ("switchyard_backend_connect_errors_total", "counter"),
        ("switchyard_health_checks_total", "counter"),
        ("switchyard_health_check_duration_seconds", "histogram"),
        ("switchyard_rejected_connections_total", "counter"),
        ("switchyard_connection_duration_seconds", "histogram"),
        ("switchyard_config_reloads_total", "counter"),
        (
            "switchyard_config_last_reload_success_timestamp_seconds",
            "gauge",
        ),
    ]
    .into();
    let (_, body) = http(admin, "GET", "/metrics", &[], "").await;
    for (name, kind) in &types {
        assert!(
            body.contains(&format!("# TYPE {name} {kind}\n")),
            "no TYPE line for {name}"
        );
    }

    for (backend, greeting) in [("a", 2.0), ("b", 2.0)] {
        let lb = [("listener", "l"), ("backend", backend)];
        assert_eq!(must(&s, "switchyard_connections_total", &lb), 5.0);
        assert_eq!(must(&s, "switchyard_active_connections", &lb), 0.0);
        assert_eq!(must(&s, "switchyard_backend_up", &lb), 1.0);
        assert_eq!(
            must(&s, "switchyard_backend_connect_errors_total", &lb),
            0.0
        );
        let dir = |d| [lb[0], lb[1], ("direction", d)];
        assert_eq!(
            must(&s, "switchyard_bytes_total", &dir("client_to_backend")),
            25.0
        );
        // Each connection: the greeting ("a\n") plus the 5-byte echo.
        assert_eq!(
            must(&s, "switchyard_bytes_total", &dir("backend_to_client")),
            5.0 * (greeting + 5.0)
        );
        assert!(
            must(
                &s,
                "switchyard_health_checks_total",
                &[lb[0], lb[1], ("result", "success")]
            ) >= 1.0
        );
        assert_eq!(
            must(
                &s,
                "switchyard_health_checks_total",
                &[lb[0], lb[1], ("result", "failure")]
            ),
            0.0
        );
        assert!(must(&s, "switchyard_health_check_duration_seconds_count", &lb) >= 1.0);
    }
    let reason = |r| [("listener", "empty"), ("reason", r)];
    assert_eq!(
        must(
            &s,
            "switchyard_rejected_connections_total",
            &reason("no_backend")
        ),
        3.0
    );
    assert_eq!(
        must(&s, "switchyard_rejected_connections_total", &reason("acl")),
        0.0
    );
    assert_eq!(
        must(
            &s,
            "switchyard_rejected_connections_total",
            &reason("max_connections")
        ),
        0.0
    );
    assert_eq!(
        must(
            &s,
            "switchyard_rejected_connections_total",
            &[("listener", "l"), ("reason", "no_backend")]
        ),
        0.0
    );
    assert_eq!(
        must(
            &s,
            "switchyard_connection_duration_seconds_count",
            &[("listener", "l")]
        ),
        10.0
    );
    assert_eq!(
        must(
            &s,
            "switchyard_config_reloads_total",
            &[("result", "success")]
        ),
        1.0
    );
    let stamp = must(
        &s,
        "switchyard_config_last_reload_success_timestamp_seconds",
        &[],
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        stamp > now - 600.0 && stamp <= now + 1.0,
        "timestamp {stamp} vs now {now}"
    );
    // Label values are only config names.
    for sample in &s.samples {
        if let Some(l) = sample.labels.get("listener") {
            assert!(["l", "empty"].contains(&l), "unexpected listener label {l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_backend_series_disappear_after_its_last_connection() {
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
    let first = connect_named(proxy).await;
    assert_eq!(first.backend, "a");
    d.write_config(&format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("b", b_.addr)])
    ));
    assert!(block_in_place(|| d.reload()));
    let lb = [("listener", "l"), ("backend", "a")];
    let s = scrape(admin).await;
    assert_eq!(
        must(&s, "switchyard_active_connections", &lb),
        1.0,
        "open connection still counted"
    );
    drop(first);
    let start = tokio::time::Instant::now();
    loop {
        // The families go one after another (a scrape can fall between
        // two): wait until every one of them has gone.
        let s = scrape(admin).await;
        let gone = |name: &str, labels: &[(&str, &str)]| sample_value(&s, name, labels).is_none();
        if gone("switchyard_connections_total", &lb)
            && gone("switchyard_backend_up", &lb)
            && gone("switchyard_active_connections", &lb)
            && gone(
                "switchyard_bytes_total",
                &[lb[0], lb[1], ("direction", "client_to_backend")],
            )
            && gone(
                "switchyard_bytes_total",
                &[lb[0], lb[1], ("direction", "backend_to_client")],
            )
        {
            assert_eq!(
                must(
                    &s,
                    "switchyard_backend_up",
                    &[("listener", "l"), ("backend", "b")]
                ),
                1.0
            );
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "series of removed backend still there"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_counters_move_exactly() {
    let a = NamedBackend::start("a").await;
    let good = format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    );
    let mut d = Daemon::start(&good);
    let admin = d.admin.unwrap();
    assert!(block_in_place(|| d.reload()));
    d.write_config(&good.replace("roundrobin", "leastconn"));
    assert!(block_in_place(|| d.reload()));
    d.write_config("[[listener]]\nbogus = 1\n");
    assert!(!block_in_place(|| d.reload()));
    let s = scrape(admin).await;
    assert_eq!(
        must(
            &s,
            "switchyard_config_reloads_total",
            &[("result", "success")]
        ),
        3.0
    );
    assert_eq!(
        must(
            &s,
            "switchyard_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reflects_live_state_and_readyz_turns_503_on_shutdown() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let fast = "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let mut d = Daemon::start(&format!(
        "{ADMIN}[global]\nshutdown_timeout = \"30s\"\n{}",
        listener_toml("leastconn", fast, &[b("a", a.addr), b("b", b_.addr)])
    ));
    let admin = d.admin.unwrap();
    assert_eq!(
        http(admin, "GET", "/healthz", &[], "").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http(admin, "GET", "/readyz", &[], "").await,
        (200, "ready\n".into())
    );
    let held = connect_named(d.addr("l")).await;

    let (status, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = &doc["listeners"][0];
    assert_eq!(l["name"], "l");
    assert_eq!(l["mode"], "tcp");
    assert_eq!(l["algorithm"], "leastconn");
    assert_eq!(l["bind"], "127.0.0.1:0");
    assert_eq!(l["local_addr"], d.addr("l").to_string());
    assert_eq!(l["active_connections"], 1);
    let backend = |doc: &serde_json::Value, name: &str| {
        doc["listeners"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap()
    };
    let held_on = backend(&doc, &held.backend);
    assert_eq!(held_on["active_connections"], 1);
    assert_eq!(held_on["connections_total"], 1);
    assert_eq!(held_on["health"], "up");
    assert_eq!(held_on["admin_state"], "ready");
    assert_eq!(held_on["weight"], 1);
    assert_eq!(held_on["backup"], false);
    assert_eq!(held_on["check_kind"], "tcp");
    assert_eq!(
        held_on["role"],
        serde_json::Value::Null,
        "tcp reads no role"
    );

    // Kill b: the status shows it down.
    drop(b_);
    let start = tokio::time::Instant::now();
    loop {
        let (_, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Health flips first, the pool is rebuilt right after.
        if backend(&doc, "b")["health"] == "down" && backend(&doc, "b")["in_rotation"] == false {
            assert_eq!(backend(&doc, "b")["in_rotation"], false);
            assert_eq!(backend(&doc, "b")["check_reason"], "connection refused");
            assert_eq!(backend(&doc, "a")["health"], "up");
            assert_eq!(backend(&doc, "a")["check_reason"], serde_json::Value::Null);
            break;
        }
        assert!(start.elapsed() < DEADLINE, "b never shown down");
    }

    // Shutdown with a connection open: not ready at once, still serving.
    d.signal("TERM");
    let start = tokio::time::Instant::now();
    while http(admin, "GET", "/readyz", &[], "").await.0 != 503 {
        assert!(
            start.elapsed() < DEADLINE,
            "readyz stayed 200 during shutdown"
        );
    }
    assert_eq!(http(admin, "GET", "/healthz", &[], "").await.0, 200);
    drop(held);
    assert_eq!(block_in_place(|| d.wait_exit()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_maint_keep_open_connections_and_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken-123\n").unwrap();
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n{}",
        token_file.display(),
        listener_toml("roundrobin", "", &[b("a", a.addr), b("b", b_.addr)])
    );
    let mut d = Daemon::start(&toml);
    let admin = d.admin.unwrap();
    let proxy = d.addr("l");
    let mut open = connect_named(proxy).await;
    assert_eq!(open.backend, "a");
    let path = "/api/v1/listeners/l/backends/a/state";
    let auth = [("authorization", "Bearer t0ken-123")];

    // Without or with a wrong token: refused, nothing changes.
    assert_eq!(http(admin, "PUT", path, &[], "drain").await.0, 401);
    assert_eq!(
        http(
            admin,
            "PUT",
            path,
            &[("authorization", "Bearer nope")],
            "drain"
        )
        .await
        .0,
        401
    );
    assert_eq!(
        spread(proxy, 4).await,
        HashMap::from([("a".into(), 2), ("b".into(), 2)])
    );
    // Reads stay open.
    let (status, body) = http(admin, "GET", path, &[], "").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"admin_state\":\"ready\""), "{body}");

    for state in ["drain", "maint"] {
        let (status, body) = http(admin, "PUT", path, &auth, state).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(&format!("\"admin_state\":\"{state}\"")),
            "{body}"
        );
        assert_eq!(
            spread(proxy, 6).await,
            HashMap::from([("b".into(), 6)]),
            "{state}"
        );
        // The open connection keeps flowing.
        open.stream.write_all(state.as_bytes()).await.unwrap();
        let mut echo = vec![0u8; state.len()];
        open.stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, state.as_bytes());
    }
    let (_, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert!(body.contains("\"admin_state\":\"maint\""), "{body}");

    // Survives a reload that keeps the backend.
    d.write_config(&toml.replace("roundrobin", "leastconn"));
    assert!(block_in_place(|| d.reload()));
    let (_, body) = http(admin, "GET", path, &[], "").await;
    assert!(body.contains("\"admin_state\":\"maint\""), "{body}");
    assert_eq!(spread(proxy, 3).await, HashMap::from([("b".into(), 3)]));

    assert_eq!(http(admin, "PUT", path, &auth, "ready\n").await.0, 200);
    let (_, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let a_status = &doc["listeners"][0]["backends"][0];
    assert_eq!(
        (&a_status["name"], &a_status["admin_state"]),
        (&"a".into(), &"ready".into())
    );
    assert_eq!(a_status["in_rotation"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_errors() {
    let a = NamedBackend::start("a").await;
    let d = Daemon::start(&format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let admin = d.admin.unwrap();
    assert_eq!(http(admin, "GET", "/nope", &[], "").await.0, 404);
    assert_eq!(http(admin, "POST", "/metrics", &[], "").await.0, 405);
    assert_eq!(
        http(
            admin,
            "DELETE",
            "/api/v1/listeners/l/backends/a/state",
            &[],
            ""
        )
        .await
        .0,
        405
    );
    let (status, body) = http(
        admin,
        "PUT",
        "/api/v1/listeners/l/backends/a/state",
        &[],
        "sleep",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (400, "body must be one of: ready, drain, maint\n")
    );
    let (status, body) = http(
        admin,
        "PUT",
        "/api/v1/listeners/l/backends/zz/state",
        &[],
        "drain",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (404, "no backend `zz` in listener `l`\n")
    );
    assert_eq!(
        http(
            admin,
            "PUT",
            "/api/v1/listeners/x/backends/a/state",
            &[],
            "drain"
        )
        .await
        .0,
        404
    );
    let big = "x".repeat(5000);
    assert_eq!(
        http(
            admin,
            "PUT",
            "/api/v1/listeners/l/backends/a/state",
            &[],
            &big
        )
        .await
        .0,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_bounded_and_silent_ones_are_cut() {
    // The daemon's cap (src/admin.rs MAX_CONNECTIONS).
    const MAX_CONNECTIONS: usize = 64;
    let a = NamedBackend::start("a").await;
    let d = Daemon::start(&format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let admin = d.admin.unwrap();
    // The cap's worth of connections that send nothing, and one that
    // sends headers promising a body that never comes.
    let mut silent = Vec::new();
    for _ in 0..MAX_CONNECTIONS - 1 {
        silent.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let mut stalled = tokio::net::TcpStream::connect(admin).await.unwrap();
    stalled
        .write_all(
            b"PUT /api/v1/listeners/l/backends/a/state HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    // Accepted in order: the next one is over the cap, answered and closed.
    let mut over = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut answer = String::new();
    within("503", over.read_to_string(&mut answer))
        .await
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n")
            && answer.ends_with("\r\n\r\ntoo many admin connections\r\n"),
        "{answer:?}"
    );
    // The data path is not part of it.
    assert_eq!(exchange(d.addr("l"), b"still served").await, "a");
    // The header timeout (10 s) cuts the silent ones; the stalled body
    // gets 408 at the same bound.
    let mut reply = String::new();
    within("408", stalled.read_to_string(&mut reply))
        .await
        .unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply:?}");
    for s in &mut silent {
        assert!(within("silent connection cut", closed_by_peer(s)).await);
    }
    // Their places are free again.
    assert_eq!(http(admin, "GET", "/healthz", &[], "").await.0, 200);
}

/// `GET /`: the status page, self-contained and locked down: no asset from
/// anywhere else, a policy that allows only its own script and style and
/// requests to this endpoint, and no framing by another site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_is_self_contained_and_locked_down() {
    let a = NamedBackend::start("a").await;
    let d = Daemon::start(&format!(
        "{ADMIN}{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let admin = d.admin.unwrap();
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = String::new();
    within("the page", s.read_to_string(&mut raw))
        .await
        .unwrap();
    let (head, page) = raw.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    let policy = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("no policy in {head}"));
    for part in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
    ] {
        assert!(policy.contains(part), "{policy}");
    }
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert!(page.starts_with("<!doctype html>"), "{page}");
    for external in [
        "src=", "href=", "@import", "url(", "//cdn", "http://", "https://",
    ] {
        assert!(!page.contains(external), "the page refers to `{external}`");
    }
    assert!(
        page.contains("fetch(\"/api/v1/status\""),
        "it reads the status API"
    );

    assert_eq!(http(admin, "POST", "/", &[], "").await.0, 405);
    // No token configured: the page may offer changes without one.
    let (_, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["admin"]["token_required"], false, "{body}");
}
