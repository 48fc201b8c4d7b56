//! What a database needs in front of it: source allow-lists, connection
//! caps with a fair queue, and PROXY protocol headers.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Health checks once at start, then not again during the test: probe
/// connections would show up in the backends' connection counts.
const QUIET: &str = "[listener.health_check]\ninterval = \"1h\"\ntimeout = \"1s\"\n";

fn rejected(server: &switchyard::server::Server, reason: &str) -> u64 {
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    let prefix =
        format!("switchyard_rejected_connections_total{{listener=\"l\",reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix}"))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn allow_list_closes_others_before_contacting_a_backend() {
    let nb = NamedBackend::start("db").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        &format!("allow = [\"127.0.0.2/32\", \"::1\"]\n{QUIET}"),
        &[b("db", nb.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let state = server.backend_state("l", "db").unwrap();
    wait_for("first probe", || server.checks("l", "db").unwrap().0 == 1).await;

    let allowed = connect_named_from(proxy, Some(IpAddr::from([127, 0, 0, 2]))).await;
    assert_eq!(allowed.backend, "db");
    for _ in 0..3 {
        let mut denied = connect_from(proxy, Some(IpAddr::from([127, 0, 0, 3]))).await;
        assert!(within("denied close", closed_by_peer(&mut denied)).await);
    }
    assert_eq!(rejected(&server, "acl"), 3);
    // The backend saw the probe and the allowed client only.
    assert_eq!(nb.accepted(), 2);
    assert_eq!(state.total(), 1);

    // IPv6: a listener on ::1 allows ::1 and nothing else.
    let v6 = listener_toml("roundrobin", "allow = [\"::1/128\"]", &[b("db", nb.addr)])
        .replace("127.0.0.1:0", "[::1]:0");
    let server6 = start_server(&v6).await;
    assert_eq!(
        connect_named(server6.local_addr("l").unwrap())
            .await
            .backend,
        "db"
    );
    let deny_v6 = listener_toml(
        "roundrobin",
        "allow = [\"10.0.0.0/8\"]",
        &[b("db", nb.addr)],
    )
    .replace("127.0.0.1:0", "[::1]:0");
    let server6 = start_server(&deny_v6).await;
    let mut c = connect_from(server6.local_addr("l").unwrap(), None).await;
    assert!(within("v6 denied", closed_by_peer(&mut c)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_cap_queues_the_rest_in_order() {
    let nb = NamedBackend::start("db").await;
    let mut toml = listener_toml(
        "leastconn",
        &format!("queue_timeout = \"30s\"\n{QUIET}"),
        &[b("db", nb.addr)],
    );
    toml += "max_connections = 5\n";
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();
    wait_for("first probe", || server.checks("l", "db").unwrap().0 == 1).await;
    wait_for("probe closed", || nb.open() == 0).await;

    // Five get through at once.
    let mut served = Vec::new();
    for _ in 0..5 {
        served.push(connect_named(proxy).await);
    }
    // Five more wait, queued in the order they came.
    let mut waiting = Vec::new();
    for i in 0..5 {
        let s = connect_from(proxy, None).await;
        wait_for("queued", || server.queued("l") == Some(i + 1)).await;
        waiting.push(BufReader::new(s));
    }
    assert_eq!(nb.open(), 5);
    // Each close lets exactly the longest waiter through.
    for (i, mut next) in waiting.into_iter().enumerate() {
        drop(served.remove(0));
        let mut line = String::new();
        within("queued client served", next.read_line(&mut line))
            .await
            .unwrap();
        assert_eq!(line, "db\n", "waiter {i}");
        wait_for("queue shrinks", || server.queued("l") == Some(4 - i)).await;
        served.push(Session {
            backend: "db".into(),
            stream: next.into_inner(),
        });
    }
    assert_eq!(
        nb.max_open.load(std::sync::atomic::Ordering::SeqCst),
        5,
        "never more than 5 at the backend"
    );
    assert_eq!(rejected(&server, "max_connections"), 0);
}

#[tokio::test]
async fn queue_timeout_closes_the_waiter_and_counts_it() {
    let nb = NamedBackend::start("db").await;
    let mut toml = listener_toml(
        "roundrobin",
        &format!("queue_timeout = \"300ms\"\n{QUIET}"),
        &[b("db", nb.addr)],
    );
    toml += "max_connections = 1\n";
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();
    let _first = connect_named(proxy).await;
    let start = Instant::now();
    let mut second = connect_from(proxy, None).await;
    assert!(within("queue timeout", closed_by_peer(&mut second)).await);
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert_eq!(rejected(&server, "max_connections"), 1);
    assert_eq!(server.queued("l"), Some(0));
}

#[tokio::test]
async fn listener_cap_pauses_accepting_until_a_connection_ends() {
    let nb = NamedBackend::start("db").await;
    let server = start_server(&listener_toml(
        "roundrobin",
        &format!("max_connections = 2\n{QUIET}"),
        &[b("db", nb.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    let first = connect_named(proxy).await;
    let _second = connect_named(proxy).await;
    // The third connects (kernel backlog) but is not served yet.
    let third = connect_from(proxy, None).await;
    let mut third = BufReader::new(third);
    let mut line = String::new();
    let early = tokio::time::timeout(Duration::from_millis(300), third.read_line(&mut line)).await;
    assert!(early.is_err(), "served beyond max_connections: {line:?}");
    drop(first);
    within("served once a slot frees", third.read_line(&mut line))
        .await
        .unwrap();
    assert_eq!(line, "db\n");
    // Paused at the second connection, and again once the third took the
    // freed place.
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    assert!(
        text.contains("switchyard_accept_paused_total{listener=\"l\"} 2"),
        "{text}"
    );
}

/// A backend that reads a PROXY header (v1 or v2) and reports it raw.
async fn proxy_header_backend() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256];
                let mut got = Vec::new();
                // Everything the client side sent, up to its marker.
                while !got.ends_with(b"END") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return, // a health probe
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(got);
                let _ = s.write_all(b"ok").await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn proxy_protocol_headers_carry_the_real_client_address() {
    for version in ["v1", "v2"] {
        let (backend, mut reports) = proxy_header_backend().await;
        let server = start_server(&listener_toml(
            "roundrobin",
            &format!("proxy_protocol = \"{version}\""),
            &[b("pp", backend)],
        ))
        .await;
        let proxy = server.local_addr("l").unwrap();
        let mut c = connect_from(proxy, Some(IpAddr::from([127, 0, 0, 5]))).await;
        let client = c.local_addr().unwrap();
        c.write_all(b"payload END").await.unwrap();
        let got = within("backend report", reports.recv()).await.unwrap();
        assert!(got.ends_with(b"payload END"));
        let header = &got[..got.len() - b"payload END".len()];
        match version {
            "v1" => {
                let expected = format!(
                    "PROXY TCP4 127.0.0.5 127.0.0.1 {} {}\r\n",
                    client.port(),
                    proxy.port()
                );
                assert_eq!(header, expected.as_bytes());
                let parsed =
                    ppp::v1::Header::try_from(std::str::from_utf8(header).unwrap()).unwrap();
                match parsed.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        assert_eq!(a.source_address.to_string(), "127.0.0.5");
                        assert_eq!(a.source_port, client.port());
                        assert_eq!(a.destination_port, proxy.port());
                    }
                    other => panic!("{other:?}"),
                }
            }
            _ => {
                let parsed = ppp::v2::Header::try_from(header).unwrap();
                assert_eq!(
                    parsed.len(),
                    header.len(),
                    "no trailing bytes in the header"
                );
                assert_eq!(parsed.command, ppp::v2::Command::Proxy);
                match parsed.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        assert_eq!(a.source_address.to_string(), "127.0.0.5");
                        assert_eq!(a.source_port, client.port());
                        assert_eq!(a.destination_address.to_string(), "127.0.0.1");
                        assert_eq!(a.destination_port, proxy.port());
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        let mut ok = [0u8; 2];
        c.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"ok");
    }
}

#[tokio::test]
async fn raising_the_listener_cap_by_reload_resumes_accepting_at_once() {
    let nb = NamedBackend::start("db").await;
    let toml = |max: u32| {
        listener_toml(
            "roundrobin",
            &format!("max_connections = {max}\n{QUIET}"),
            &[b("db", nb.addr)],
        )
    };
    let mut server = start_server(&toml(1)).await;
    let proxy = server.local_addr("l").unwrap();
    let _held = connect_named(proxy).await;
    let waiting = connect_from(proxy, None).await;
    let mut waiting = BufReader::new(waiting);
    // The held connection stays open: only the reload can let this one in.
    let config = switchyard::config::load_str(&toml(5), std::path::Path::new("t.toml")).unwrap();
    server.reload(config).await.unwrap();
    let mut line = String::new();
    within(
        "served after the cap was raised",
        waiting.read_line(&mut line),
    )
    .await
    .unwrap();
    assert_eq!(line, "db\n");
}

/// TCP keepalive reaches both sockets of a proxied connection: the client
/// side from the listener (its accepted sockets inherit it), the backend
/// side once the connection has lived a second; a reload that turns it
/// off reaches the connections after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_reaches_both_sides_of_a_proxied_connection() {
    let backend = NamedBackend::start("a").await;
    let with = |on: &str| {
        listener_toml(
            "roundrobin",
            &format!("{on}keepalive_idle = \"42s\"\nkeepalive_interval = \"7s\"\n{QUIET}"),
            &[b("a", backend.addr)],
        )
    };
    let mut server = start_server(&with("")).await;
    let proxy = server.local_addr("l").unwrap();
    let session = connect_named(proxy).await;
    let client = session.stream.local_addr().unwrap();
    assert_eq!(session.backend, "a");
    // The client side: from the listener (not the kernel's 2 h). `ss`
    // shows the retransmit timer instead while a segment is unacknowledged,
    // so wait for the keepalive one.
    let mut client_side = Vec::new();
    wait_for("keepalive on the accepted socket", || {
        client_side = keepalive_timers(Some(proxy), client);
        client_side.iter().any(Option::is_some)
    })
    .await;
    assert_eq!(client_side.len(), 1, "{client_side:?}");
    let left = client_side[0].unwrap();
    assert!((30..=42).contains(&left), "{left} s left of 42");
    // The backend side: once the connection has lived a second. (The
    // only established socket to the backend is this connection's.)
    let mut backend_side = Vec::new();
    wait_for("keepalive on the backend socket", || {
        backend_side = keepalive_timers(None, backend.addr);
        backend_side.iter().any(Option::is_some)
    })
    .await;
    assert_eq!(backend_side.len(), 1, "{backend_side:?}");
    let left = backend_side[0].unwrap();
    assert!((30..=42).contains(&left), "{left} s left of 42");
    drop(session);

    // Off by reload: a later connection has no timer on the client side.
    let config = switchyard::config::load_str(
        &with("keepalive = false\n"),
        std::path::Path::new("test.toml"),
    )
    .unwrap();
    server.reload(config).await.unwrap();
    let session = connect_named(proxy).await;
    let client = session.stream.local_addr().unwrap();
    assert_eq!(session.backend, "a");
    // No timer at all once the greeting is acknowledged (then ss would
    // show keepalive's if there were one).
    let mut timers = Vec::new();
    wait_for("the greeting acknowledged", || {
        timers = keepalive_timers(Some(proxy), client);
        timers == vec![None] && !ss_line(proxy, client).contains("timer:(on")
    })
    .await;
    assert!(!ss_line(proxy, client).contains("keepalive"), "{timers:?}");
}
