//! Health-check kinds that need no database: `http` against an endpoint
//! that flips while the service port stays open, and `none`.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tokio::net::TcpListener;

/// A health endpoint answering every request with the current `status`
/// and recording each request's line and headers.
struct HealthEndpoint {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    requests: Arc<AtomicUsize>,
    last: Arc<Mutex<(String, HashMap<String, String>)>>,
}

impl HealthEndpoint {
    async fn start() -> HealthEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let requests = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new((String::new(), HashMap::new())));
        let (st, count, seen) = (status.clone(), requests.clone(), last.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (st, count, seen) = (st.clone(), count.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let headers = req
                                .headers()
                                .iter()
                                .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                                .collect();
                            *seen.lock().unwrap() =
                                (format!("{} {}", req.method(), req.uri()), headers);
                            count.fetch_add(1, Ordering::SeqCst);
                            let code = st.load(Ordering::SeqCst);
                            async move {
                                Ok::<_, std::convert::Infallible>(
                                    hyper::Response::builder()
                                        .status(code)
                                        .body(http_body_util::Full::new(bytes::Bytes::from(
                                            "status\n",
                                        )))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HealthEndpoint {
            addr,
            status,
            requests,
            last,
        }
    }
}

const FAST: &str = "interval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_follows_the_endpoint_while_the_service_port_stays_open() {
    let (a, b_) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
    );
    let endpoint = HealthEndpoint::start().await;
    let extra = format!(
        "[listener.health_check]\nkind = \"http\"\nport = {}\npath = \"/primary\"\n{FAST}",
        endpoint.addr.port()
    );
    // a is checked through the endpoint's port; b's check port is the
    // same endpoint too, but b is made to fail only by the flip below.
    let server = start_server(&listener_toml(
        "roundrobin",
        &extra,
        &[b("a", a.addr), b("b", b_.addr)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    wait_for("first checks", || {
        server.checks("l", "a").unwrap().0 >= 1 && server.checks("l", "b").unwrap().0 >= 1
    })
    .await;
    {
        let (line, headers) = endpoint.last.lock().unwrap().clone();
        assert_eq!(line, "GET /primary");
        assert_eq!(headers["host"], endpoint.addr.to_string());
        assert_eq!(headers["connection"], "close");
    }
    assert_eq!(server.check_reason("l", "a"), None);
    assert_eq!(server.role("l", "a"), None, "http reads no role");

    endpoint.status.store(503, Ordering::SeqCst);
    let a_state = server.backend_state("l", "a").unwrap();
    let b_state = server.backend_state("l", "b").unwrap();
    wait_for("both down on 503", || !a_state.is_up() && !b_state.is_up()).await;
    assert_eq!(server.check_reason("l", "a").as_deref(), Some("HTTP 503"));
    // The service ports never closed: only the endpoint said no.
    let open = tokio::net::TcpStream::connect(a.addr).await;
    assert!(open.is_ok(), "a's service port is open");
    wait_for("out of rotation", || {
        server.in_rotation("l").unwrap().is_empty()
    })
    .await;

    endpoint.status.store(302, Ordering::SeqCst);
    wait_for("up again on 3xx", || a_state.is_up() && b_state.is_up()).await;
    assert_eq!(server.check_reason("l", "a"), None);
    wait_for("both in rotation", || {
        server.in_rotation("l").unwrap().len() == 2
    })
    .await;
    let counts = spread(proxy, 10).await;
    assert_eq!(counts, HashMap::from([("a".into(), 5), ("b".into(), 5)]));
    assert!(endpoint.requests.load(Ordering::SeqCst) >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kind_none_never_probes_and_keeps_a_backend_up() {
    let a = NamedBackend::start("a").await;
    // A port that refuses: bound and released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = start_server(&listener_toml(
        "roundrobin",
        &format!("[listener.health_check]\nkind = \"none\"\n{FAST}"),
        &[b("a", a.addr), b("dead", dead)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap();
    // Retries hide the dead one from clients; checks never mark it down.
    let counts = spread(proxy, 10).await;
    assert_eq!(counts, HashMap::from([("a".into(), 10)]));
    let dead_state = server.backend_state("l", "dead").unwrap();
    assert!(dead_state.is_up(), "kind = none: always up");
    assert_eq!(
        dead_state.connect_errors(),
        5,
        "every other connect was retried"
    );
    assert_eq!(server.checks("l", "dead"), None, "no probe runs");
    assert_eq!(a.accepted(), 10, "no probe connections either");
}
