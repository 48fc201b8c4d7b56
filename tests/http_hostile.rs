//! HTTP mode against hostile and malformed messages (RFC 9112 / 9110):
//! a table of raw requests sent byte for byte through the proxy to a
//! raw-socket backend that records exactly what arrived, and raw backend
//! responses with broken framing.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::*;
use switchyard::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What reached the raw backend.
#[derive(Debug, Default)]
struct Seen {
    /// Whole requests, head and body exactly as they arrived, with the
    /// number of the backend connection they came on.
    requests: Vec<(usize, Vec<u8>)>,
    /// Bytes of a request that never completed before its connection
    /// closed or broke framing, by connection.
    partial: Vec<(usize, Vec<u8>)>,
    /// Connections accepted, and whether each has been closed by the proxy.
    closed: Vec<bool>,
}

/// A backend on a raw socket: reads requests framed by Content-Length or
/// chunked encoding, records them, and answers each with the next scripted
/// response (then `200 ok`); an empty one closes the connection unanswered.
struct RawBackend {
    addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    script: Arc<Mutex<Vec<&'static [u8]>>>,
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

impl RawBackend {
    async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let script = Arc::new(Mutex::new(Vec::new()));
        let (s, sc) = (seen.clone(), script.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let id = {
                    let mut s = s.lock().unwrap();
                    s.closed.push(false);
                    s.closed.len() - 1
                };
                tokio::spawn(serve_raw(stream, id, s.clone(), sc.clone()));
            }
        });
        RawBackend { addr, seen, script }
    }

    /// Answer the next requests with these responses, in order.
    fn answer(&self, responses: &[&'static [u8]]) {
        *self.script.lock().unwrap() = responses.iter().rev().copied().collect();
    }

    fn requests(&self) -> Vec<(usize, String)> {
        let s = self.seen.lock().unwrap();
        s.requests
            .iter()
            .map(|(c, r)| (*c, String::from_utf8_lossy(r).into_owned()))
            .collect()
    }

    fn partial(&self) -> Vec<(usize, Vec<u8>)> {
        self.seen.lock().unwrap().partial.clone()
    }

    fn closed(&self, conn: usize) -> bool {
        self.seen.lock().unwrap().closed.get(conn) == Some(&true)
    }

    fn accepted(&self) -> usize {
        self.seen.lock().unwrap().closed.len()
    }
}

async fn serve_raw(
    stream: TcpStream,
    id: usize,
    seen: Arc<Mutex<Seen>>,
    script: Arc<Mutex<Vec<&'static [u8]>>>,
) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut raw = Vec::new();
        let whole = read_request(&mut read, &mut raw).await;
        let response = {
            let mut s = seen.lock().unwrap();
            if !whole {
                if !raw.is_empty() {
                    s.partial.push((id, raw));
                }
                s.closed[id] = true;
                return;
            }
            s.requests.push((id, raw));
            let response = script.lock().unwrap().pop().unwrap_or(OK);
            if response.is_empty() {
                // Scripted: close without answering.
                s.closed[id] = true;
                return;
            }
            response
        };
        if write.write_all(response).await.is_err() {
            return;
        }
    }
}

/// Read one request into `raw`; false if the connection closed or the
/// framing broke first.
async fn read_request(
    read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    raw: &mut Vec<u8>,
) -> bool {
    let mut length = 0usize;
    let mut chunked = false;
    loop {
        let start = raw.len();
        match read.read_until(b'\n', raw).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw[start..]).to_ascii_lowercase();
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.strip_prefix("content-length:") {
            let Ok(n) = v.trim().parse() else {
                return false;
            };
            length = n;
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        let start = raw.len();
        raw.resize(start + length, 0);
        return read.read_exact(&mut raw[start..]).await.is_ok();
    }
    loop {
        let start = raw.len();
        if read.read_until(b'\n', raw).await.unwrap_or(0) == 0 {
            return false;
        }
        let line = String::from_utf8_lossy(&raw[start..]).into_owned();
        let Ok(size) = usize::from_str_radix(line.trim_end().split(';').next().unwrap(), 16) else {
            return false;
        };
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let start = raw.len();
                if read.read_until(b'\n', raw).await.unwrap_or(0) == 0 {
                    return false;
                }
                if &raw[start..] == b"\r\n" {
                    return true;
                }
            }
        }
        let start = raw.len();
        raw.resize(start + size + 2, 0);
        if read.read_exact(&mut raw[start..]).await.is_err() || !raw.ends_with(b"\r\n") {
            return false;
        }
    }
}

/// A response as the client read it.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

/// Read one response (framed by Content-Length, or chunked) from `s`.
async fn read_reply(s: &mut BufReader<TcpStream>) -> Reply {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        let n = within("response head", s.read_line(&mut line))
            .await
            .unwrap();
        assert!(n > 0, "closed mid-head: {head:?}");
        head += &line;
        if line == "\r\n" {
            break;
        }
    }
    let status = head[9..12].parse().unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut line = String::new();
            within("chunk size", s.read_line(&mut line)).await.unwrap();
            let size = usize::from_str_radix(line.trim_end(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            within("chunk", s.read_exact(&mut chunk)).await.unwrap();
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(at) = lower.find("content-length: ") {
        let n: usize = lower[at + 16..].lines().next().unwrap().parse().unwrap();
        body.resize(n, 0);
        within("response body", s.read_exact(&mut body))
            .await
            .unwrap();
    }
    Reply { status, head, body }
}

/// Whether the proxy closes the client connection (after what was read).
async fn closes(s: &mut BufReader<TcpStream>) -> bool {
    within("close", closed_by_peer(s.get_mut())).await
}

async fn proxy_for(backend: &RawBackend) -> (Server, SocketAddr) {
    let toml = listener_toml("roundrobin", "mode = \"http\"\n", &[b("raw", backend.addr)]);
    let server = start_server(&toml).await;
    let addr = server.local_addr("l").unwrap();
    (server, addr)
}

/// Send `raw` as it is and read the one response.
async fn send(proxy: SocketAddr, raw: &[u8]) -> (Reply, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut s = BufReader::new(s);
    (read_reply(&mut s).await, s)
}

/// Send `raw` on a connection already in use and read the response.
async fn again(s: &mut BufReader<TcpStream>, raw: &[u8]) -> Reply {
    s.get_mut().write_all(raw).await.unwrap();
    read_reply(s).await
}

/// What the backend must have been sent for a request.
enum Expect {
    /// Refused by the proxy with this status; nothing reached a backend.
    Refused(u16),
    /// Forwarded whole: these lines are in the head (or body) the backend
    /// received, these are not, and whether the proxy closes the client
    /// connection after the response.
    Forwarded {
        has: &'static [&'static str],
        lacks: &'static [&'static str],
        then_close: bool,
    },
}

/// Requests that are refused before any byte reaches a backend, and good
/// ones with what the backend must see.
const TABLE: &[(&str, &[u8], Expect)] = &[
    (
        "plain GET",
        b"GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nX-Keep: 1\r\n\r\n",
        Expect::Forwarded {
            has: &["GET /a?b=1 HTTP/1.1\r\n", "host: app.example\r\n", "x-keep: 1\r\n"],
            lacks: &[],
            then_close: false,
        },
    ),
    (
        "CL then TE: forwarded with Transfer-Encoding only, then closed",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Expect::Forwarded {
            has: &["transfer-encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"],
            lacks: &["content-length"],
            then_close: true,
        },
    ),
    (
        "TE then CL: forwarded with Transfer-Encoding only, then closed",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Expect::Forwarded {
            has: &["transfer-encoding: chunked\r\n", "3\r\nabc\r\n0\r\n\r\n"],
            lacks: &["content-length"],
            then_close: true,
        },
    ),
    (
        "absolute-form target: its authority becomes Host",
        b"GET http://other.example:8080/x?y=2 HTTP/1.1\r\nHost: unrelated.example\r\n\r\n",
        Expect::Forwarded {
            has: &["GET /x?y=2 HTTP/1.1\r\n", "host: other.example:8080\r\n"],
            lacks: &["unrelated"],
            then_close: false,
        },
    ),
    (
        "HTTP/1.0 without Host",
        b"GET / HTTP/1.0\r\n\r\n",
        Expect::Forwarded {
            has: &["GET / HTTP/1.0\r\n"],
            lacks: &["host:"],
            then_close: true,
        },
    ),
    (
        "two Host headers",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "two Host headers, same value",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
        Expect::Refused(400),
    ),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n", Expect::Refused(400)),
    (
        "Host that is not a host",
        b"GET / HTTP/1.1\r\nHost: a b/c\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "obfuscated Transfer-Encoding (xchunked)",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "obfuscated Transfer-Encoding (space before the colon)",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "two differing Content-Length headers",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        Expect::Refused(400),
    ),
    (
        "Content-Length with two values",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd",
        Expect::Refused(400),
    ),
    (
        "obs-fold continuation line",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "NUL in a header value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Nul: a\0b\r\n\r\n",
        Expect::Refused(400),
    ),
    (
        "HTTP/1.0 with chunked",
        b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        Expect::Refused(400),
    ),
];

#[tokio::test]
async fn raw_requests_are_forwarded_exactly_or_refused_before_any_backend() {
    let backend = RawBackend::start().await;
    let (server, proxy) = proxy_for(&backend).await;
    let mut refused_400 = 0;
    for (name, raw, expect) in TABLE {
        let before = backend.requests().len();
        let (reply, mut s) = send(proxy, raw).await;
        match expect {
            Expect::Refused(status) => {
                assert_eq!(reply.status, *status, "{name}: {}", reply.head);
                assert!(closes(&mut s).await, "{name}: connection left open");
                assert_eq!(
                    backend.requests().len(),
                    before,
                    "{name}: reached the backend"
                );
                refused_400 += 1;
            }
            Expect::Forwarded {
                has,
                lacks,
                then_close,
            } => {
                assert_eq!(reply.status, 200, "{name}: {}", reply.head);
                assert_eq!(reply.body, b"ok", "{name}");
                let got = backend.requests();
                assert_eq!(got.len(), before + 1, "{name}: {got:?}");
                let seen = &got[before].1;
                // Header names in lower case, as the proxy writes them.
                let (head, body) = seen.split_once("\r\n\r\n").unwrap();
                let text = format!("{}\r\n\r\n{body}", head.to_ascii_lowercase());
                let first = seen.lines().next().unwrap();
                for want in *has {
                    let found = if want.contains(" HTTP/1.") {
                        format!("{first}\r\n") == *want
                    } else {
                        text.contains(&want.to_ascii_lowercase())
                    };
                    assert!(found, "{name}: {want:?} not in {seen:?}");
                }
                for unwanted in *lacks {
                    assert!(!text.contains(unwanted), "{name}: {unwanted:?} in {seen:?}");
                }
                if *then_close {
                    assert!(closes(&mut s).await, "{name}: connection left open");
                } else {
                    // Kept alive: a second request on it is answered.
                    assert_eq!(
                        again(&mut s, b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")
                            .await
                            .status,
                        200,
                        "{name}"
                    );
                }
            }
        }
    }
    assert!(backend.partial().is_empty(), "{:?}", backend.partial());
    // Counted as client errors: no backend in the label.
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    let line = format!(
        r#"switchyard_http_requests_total{{backend="",code="400",listener="l"}} {refused_400}"#
    );
    assert!(text.contains(&line), "{line} not in\n{text}");
}

#[tokio::test]
async fn a_malformed_chunk_size_is_the_clients_fault_and_no_whole_request_reaches_a_backend() {
    let backend = RawBackend::start().await;
    let (server, proxy) = proxy_for(&backend).await;
    for (i, bad) in [
        &b"zz\r\nabc\r\n0\r\n\r\n"[..],
        b"3\r\nabc\r\n-1\r\n\r\n",
        b"3\r\nabcXY",
    ]
    .iter()
    .enumerate()
    {
        let raw = [
            &b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            bad,
        ]
        .concat();
        let (reply, mut s) = send(proxy, &raw).await;
        assert_eq!(reply.status, 400, "case {i}: {}", reply.head);
        assert!(closes(&mut s).await, "case {i}");
        // The head may have left, but never a whole request: the backend
        // connection it went on is closed, so nothing desyncs.
        wait_for("backend connection closed", || {
            (0..backend.accepted()).all(|c| backend.closed(c))
        })
        .await;
        assert!(
            backend.requests().is_empty(),
            "case {i}: {:?}",
            backend.requests()
        );
    }
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    let line = r#"switchyard_http_requests_total{backend="",code="400",listener="l"} 3"#;
    assert!(text.contains(line), "{line} not in\n{text}");
    assert!(!text.contains(r#"code="502""#), "{text}");
}

#[tokio::test]
async fn a_backend_response_with_broken_framing_is_a_502_and_its_connection_is_not_reused() {
    let broken: [(&str, &'static [u8]); 3] = [
        (
            "differing Content-Length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
        ),
        (
            "bad chunk size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
        ),
        (
            "chunk size overflowing 64 bits",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nok\r\n0\r\n\r\n",
        ),
    ];
    for (name, response) in broken {
        let backend = RawBackend::start().await;
        let (server, proxy) = proxy_for(&backend).await;
        // Warm a keep-alive backend connection, then break it.
        backend.answer(&[OK, response]);
        let (first, mut s) = send(proxy, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(first.status, 200, "{name}");
        // (Health probes make connections of their own.)
        let warm = backend.requests()[0].0;
        let reply = again(&mut s, b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(reply.status, 502, "{name}: {}", reply.head);
        assert_ne!(reply.body, b"ok", "{name}");
        wait_for("the broken connection closed", || backend.closed(warm)).await;
        // The next request is served on a new backend connection.
        let next = again(&mut s, b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_eq!(next.status, 200, "{name}");
        let conns: Vec<usize> = backend.requests().iter().map(|(c, _)| *c).collect();
        assert_eq!(conns.len(), 3, "{name}");
        assert_eq!(
            conns[1], warm,
            "{name}: the broken answer came on the warm connection"
        );
        assert!(
            conns[2] > warm,
            "{name}: {conns:?} reused the broken connection"
        );
        let text = String::from_utf8(server.metrics().encode()).unwrap();
        let line = r#"switchyard_http_requests_total{backend="raw",code="502",listener="l"} 1"#;
        assert!(text.contains(line), "{name}: {line} not in\n{text}");
    }
}

#[tokio::test]
async fn a_backend_response_with_repeated_equal_content_length_is_passed() {
    let backend = RawBackend::start().await;
    let (_server, proxy) = proxy_for(&backend).await;
    backend.answer(&[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"]);
    let (reply, _s) = send(proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(reply.status, 200, "{}", reply.head);
    assert_eq!(reply.body, b"ok");
}

#[tokio::test]
async fn a_kept_alive_connection_that_dies_under_a_safe_request_is_retried_once_and_others_are_not()
{
    let backend = RawBackend::start().await;
    let (server, proxy) = proxy_for(&backend).await;
    // Warm a pooled connection; the backend then closes it under the next
    // request without a byte of answer.
    backend.answer(&[OK, b""]);
    let (first, mut s) = send(proxy, b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(first.status, 200);
    let retried = again(&mut s, b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(retried.status, 200, "{}", retried.head);
    let paths: Vec<(usize, String)> = backend
        .requests()
        .into_iter()
        .map(|(c, r)| (c, r.lines().next().unwrap().to_owned()))
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(paths[1].1, "GET /2 HTTP/1.1");
    assert_eq!(paths[2].1, "GET /2 HTTP/1.1");
    assert!(
        paths[2].0 > paths[1].0,
        "sent again on a new connection: {paths:?}"
    );

    // A request with a body is not sent twice: 502.
    backend.answer(&[OK, b""]);
    let (first, mut s) = send(proxy, b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(first.status, 200);
    assert_eq!(
        again(
            &mut s,
            b"POST /4 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
        )
        .await
        .status,
        502
    );
    let posts = backend
        .requests()
        .iter()
        .filter(|(_, r)| r.starts_with("POST /4"))
        .count();
    assert_eq!(posts, 1);
    let text = String::from_utf8(server.metrics().encode()).unwrap();
    let line = r#"switchyard_http_requests_total{backend="raw",code="502",listener="l"} 1"#;
    assert!(text.contains(line), "{line} not in\n{text}");
}

#[tokio::test]
async fn broken_framing_after_the_body_has_started_cuts_the_client_and_the_backend_connection() {
    let backend = RawBackend::start().await;
    let (_server, proxy) = proxy_for(&backend).await;
    // A good first chunk, then no CRLF after the second's data.
    backend.answer(&[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n2\r\nokXY0\r\n\r\n",
    ]);
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    within("cut", s.read_to_end(&mut got)).await.unwrap();
    let got = String::from_utf8_lossy(&got);
    // The head and what was good went; the response never ends, so the
    // client cannot take it for whole.
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
    assert!(!got.ends_with("0\r\n\r\n"), "{got:?}");
    let warm = backend.requests()[0].0;
    wait_for("the broken connection closed", || backend.closed(warm)).await;
    let (next, _s) = send(proxy, b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert_eq!(next.status, 200);
    let conns: Vec<usize> = backend.requests().iter().map(|(c, _)| *c).collect();
    assert!(conns.len() == 2 && conns[1] > warm, "{conns:?}");
}
