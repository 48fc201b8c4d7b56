//! TLS termination met by real clients and real servers: redis-cli and
//! redis-benchmark (OpenSSL, through hiredis) in front of a real Redis on a
//! tcp listener; curl and Python's `ssl` keeping lbCookie stickiness over
//! HTTPS (and refusing a certificate from another CA); 32 MiB each way with
//! SHA-256 compared on both sides, in http mode (curl, chunked upload) and
//! tcp mode (tokio-rustls); a WebSocket session through an http listener to
//! a backend that speaks RFC 6455 (tokio-tungstenite on both ends).
//!
//! Needs `redis-server`, `redis-tools`, `curl` and `python3` (standard
//! library only); a missing one is a failure, never a skip.

mod common;
mod db;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::tls::*;
use common::*;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use sha2::{Digest, Sha256};
use switchyard::proxy::lbcookie::cookie_id;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, block_in_place};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data as OpData, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame as WsFrame};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{accept_hdr_async, client_async};

/// Every bulk transfer here moves 32 MiB: far more than any buffer on the
/// way (TLS records are 16 KiB, socket buffers a few MiB), so the whole
/// path streams, with back-pressure.
const BULK: u64 = 32 << 20;

/// The size of each chunk written: one generated and hashed at a time, so
/// no side ever holds the whole body.
const CHUNK: usize = 64 * 1024;

/// A client process may take this long at most (a 32 MiB transfer through
/// an unoptimized daemon on a 2-core machine takes a few seconds).
const PROCESS_LIMIT: Duration = Duration::from_secs(45);

const STICKY: &str =
    "mode = \"http\"\n[listener.sticky]\nmethod = \"lbcookie\"\ncookie = \"SERVERID\"\n";

/// The test CA's certificate as a PEM file (what `--cacert` and
/// `cafile=` read).
fn ca_pem(ca: &Ca, dir: &Path, file: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::write(&path, ca.issuer.pem()).unwrap();
    path
}

/// Bytes `[offset, offset + len)` of the bulk stream: each 8-byte word is
/// its own index, little endian, so a lost, repeated or reordered chunk
/// changes the hash. Both bounds are multiples of 8.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    assert!(
        offset.is_multiple_of(8) && len.is_multiple_of(8),
        "word-aligned: {offset} {len}"
    );
    let mut out = Vec::with_capacity(len);
    for word in offset / 8..(offset + len as u64) / 8 {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out
}

/// The bulk stream of `total` bytes, chunk by chunk.
fn chunks(total: u64) -> impl Iterator<Item = Vec<u8>> {
    (0..total.div_ceil(CHUNK as u64)).map(move |i| {
        let offset = i * CHUNK as u64;
        pattern(offset, (total - offset).min(CHUNK as u64) as usize)
    })
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of the bulk stream, computed from the pattern itself.
fn bulk_sha256() -> String {
    let mut h = Sha256::new();
    chunks(BULK).for_each(|c| h.update(&c));
    hex(&h.finalize())
}

/// curl against `https://<name>:<port>` with the name resolved to
/// 127.0.0.1, trusting only `cacert`; no ~/.curlrc.
fn curl_cmd(cacert: &Path, name: &str, port: u16) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-q", "-sS", "--max-time", "40", "--cacert"])
        .arg(cacert)
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")]);
    cmd
}

fn curl(cacert: &Path, name: &str, port: u16, args: &[&str]) -> db::Run {
    let mut cmd = curl_cmd(cacert, name, port);
    cmd.args(args);
    block_in_place(|| db::run(cmd, PROCESS_LIMIT))
}

/// One transfer of a curl run made with `-D -` and [`TRANSFER_END`].
#[derive(Debug)]
struct Transfer {
    /// Response header (name lowercased, value) pairs, in order.
    headers: Vec<(String, String)>,
    /// 1 when the transfer opened a connection, 0 when it reused one.
    connects: u32,
    code: u16,
    http_version: String,
}

impl Transfer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// curl's `-w` after each transfer: the line that ends it (not starting
/// with `@`, which `-w` takes for a file to read the format from).
const TRANSFER_END: &str = "== %{num_connects} %{http_code} %{http_version}\\n";

/// Split a `-D - -w TRANSFER_END` run (bodies are empty) into transfers.
fn transfers(stdout: &str) -> Vec<Transfer> {
    let mut out = Vec::new();
    let mut headers = Vec::new();
    for line in stdout.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(end) = line.strip_prefix("== ") {
            let f: Vec<&str> = end.split(' ').collect();
            assert_eq!(f.len(), 3, "{line}");
            out.push(Transfer {
                headers: std::mem::take(&mut headers),
                connects: f[0].parse().unwrap(),
                code: f[1].parse().unwrap(),
                http_version: f[2].to_owned(),
            });
        } else if let Some((k, v)) = line.split_once(": ") {
            headers.push((k.to_ascii_lowercase(), v.to_owned()));
        }
    }
    assert!(
        headers.is_empty(),
        "output after the last transfer: {stdout}"
    );
    out
}

/// A Set-Cookie is exactly the balancer's cookie for `backend` of
/// listener "l": `SERVERID=<id>; Path=/; HttpOnly`, in any order.
fn assert_sets_cookie_for(set_cookie: &str, backend: &str) {
    let mut attrs: Vec<&str> = set_cookie.split("; ").collect();
    attrs.sort();
    let id = format!("SERVERID={}", cookie_id("l", backend));
    assert_eq!(attrs, ["HttpOnly", "Path=/", id.as_str()], "for {backend}");
}

/// The value of a `SERVERID=<id>; ...` Set-Cookie.
fn serverid(set_cookie: &str) -> &str {
    set_cookie
        .strip_prefix("SERVERID=")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("not a SERVERID cookie: {set_cookie:?}"))
}

// ---------------------------------------------------------------------
// 1. Redis behind a tcp listener with TLS.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_and_redis_benchmark_speak_tls_to_a_plain_redis() {
    let redis = block_in_place(db::Redis::start);
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new(), Ca::new());
    let (cert, key, _) = ca.leaf(dir.path(), "redis", &["redis.example.com"], 30);
    let cacert = ca_pem(&ca, dir.path(), "ca.pem");
    let other_ca = ca_pem(&other, dir.path(), "other-ca.pem");
    let toml = format!(
        "{}{}",
        listener_toml("roundrobin", "", &[b("redis", redis.addr)]),
        tls_table(&[(cert, key)])
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let port = d.addr("l").port().to_string();

    let cli = |cacert: &Path, args: &[&str]| {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--tls", "--cacert"])
            .arg(cacert)
            .args(["--sni", "redis.example.com", "-h", "127.0.0.1", "-p", &port])
            .args(args)
            .env_remove("REDISCLI_AUTH");
        block_in_place(|| db::run(cmd, PROCESS_LIMIT))
    };
    // Each invocation is a TLS connection of its own.
    let set = cli(&cacert, &["SET", "k", "v"]);
    assert!(set.status.success(), "{}", set.output());
    assert_eq!(set.stdout.trim(), "OK", "{}", set.output());
    let get = cli(&cacert, &["GET", "k"]);
    assert!(get.status.success(), "{}", get.output());
    assert_eq!(get.stdout.trim(), "v", "{}", get.output());
    // It reached the real server: asked directly, in the clear.
    assert_eq!(block_in_place(|| redis.cli(&["GET", "k"])), "v");

    // A client that trusts another CA does not get through.
    let refused = cli(&other_ca, &["PING"]);
    let said = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        !refused.status.success() && said.contains("certificate verify failed"),
        "{}",
        refused.output()
    );
    assert!(!said.contains("PONG"), "{}", refused.output());

    let bench = block_in_place(|| {
        db::redis_benchmark(
            &[
                "--tls",
                "--cacert",
                cacert.to_str().unwrap(),
                "--sni",
                "redis.example.com",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-n",
                "2000",
                "-c",
                "10",
                "-t",
                "set,get",
                "-q",
            ],
            PROCESS_LIMIT,
        )
    });
    assert_eq!(bench.code(), Some(0), "{}", bench.output());
    let all = format!("{}{}", bench.stdout, bench.stderr).to_lowercase();
    assert!(
        !all.contains("error") && !all.contains("closed") && !all.contains("fail"),
        "{}",
        bench.output()
    );
    // -q: one final line per test ("SET: 12345.68 requests per second,
    // p50=0.439 msec"), after \r-separated progress lines.
    let finals: Vec<&str> = bench
        .stdout
        .split(['\r', '\n'])
        .filter(|l| l.contains("requests per second"))
        .collect();
    assert_eq!(finals.len(), 2, "{}", bench.output());
    for (line, test) in finals.iter().zip(["SET:", "GET:"]) {
        let rate: f64 = line
            .trim_start()
            .strip_prefix(test)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {test} rate in {line:?}\n{}", bench.output()));
        assert!(rate > 0.0, "{line}");
    }
    eprintln!("redis-benchmark over TLS: {}", finals.join(" | "));
    // The benchmark's keys are in the real server too.
    let keys = block_in_place(|| redis.cli(&["EXISTS", "key:__rand_int__"]));
    assert_eq!(keys, "1", "redis-benchmark's SET key is missing");
}

// ---------------------------------------------------------------------
// 2. lbCookie over HTTPS with curl and Python's ssl.

/// Python's `http.client` over `ssl`, trusting only the CA file it is
/// given. `sticky`: one keep-alive connection, a request without a cookie,
/// three with the cookie the first got (and a forged X-Forwarded-Proto),
/// then two without; prints what each saw as JSON. `verify`: one request,
/// prints how verification failed.
const PYTHON_CLIENT: &str = r#"
import http.client, json, socket, ssl, sys
port, name, cafile, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["http/1.1"])
connects = 0
class Conn(http.client.HTTPSConnection):
    def connect(self):
        global connects
        connects += 1
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sock = ctx.wrap_socket(raw, server_hostname=name)
c = Conn(name, port, context=ctx, timeout=20)
if mode == "verify":
    try:
        c.request("GET", "/")
        print("connected:", c.getresponse().status)
    except ssl.SSLCertVerificationError as e:
        print("verify failed:", e.verify_message)
    sys.exit(0)
replies = []
def get(path, headers):
    c.request("GET", path, headers=headers)
    r = c.getresponse()
    body = r.read()
    replies.append({
        "status": r.status,
        "backend": r.getheader("x-backend"),
        "set_cookie": r.getheader("set-cookie"),
        "xfp": r.getheader("x-seen-xfp"),
        "forwarded": r.getheader("x-seen-forwarded"),
        "cookie_seen": r.getheader("x-seen-cookie"),
        "body": len(body),
        "local_port": c.sock.getsockname()[1],
        "alpn": c.sock.selected_alpn_protocol(),
        "version": c.sock.version(),
    })
get("/first", {})
cookie = replies[0]["set_cookie"].split(";")[0]
for i in range(3):
    get("/again/%d" % i, {"Cookie": cookie + "; other=1", "X-Forwarded-Proto": "http"})
get("/fresh/1", {})
get("/fresh/2", {})
c.close()
print(json.dumps({"connects": connects, "replies": replies}))
"#;

fn python(port: u16, name: &str, cafile: &Path, mode: &str) -> db::Run {
    let mut cmd = Command::new("python3");
    cmd.args(["-I", "-c", PYTHON_CLIENT, &port.to_string(), name])
        .arg(cafile)
        .arg(mode);
    block_in_place(|| db::run(cmd, PROCESS_LIMIT))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_python_stick_to_one_backend_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (Ca::new(), Ca::new());
    let name = "www.example.com";
    let (cert, key, _) = ca.leaf(dir.path(), "www", &[name], 30);
    let cacert = ca_pem(&ca, dir.path(), "ca.pem");
    let other_ca = ca_pem(&other, dir.path(), "other-ca.pem");
    let (one, two) = (
        HttpBackend::start("one").await,
        HttpBackend::start("two").await,
    );
    let toml = format!(
        "{}{}",
        listener_toml(
            "roundrobin",
            STICKY,
            &[b("one", one.addr), b("two", two.addr)]
        ),
        tls_table(&[(cert, key)])
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let port = d.addr("l").port();
    let url = |path: &str| format!("https://{name}:{port}{path}");
    let jar = dir.path().join("jar.txt");
    let jar = jar.to_str().unwrap();

    // curl, a fresh jar, three requests on one keep-alive connection: the
    // first is scheduled and gets the cookie, the next two carry it.
    let (u1, u2, u3) = (url("/1"), url("/2"), url("/3"));
    let first = curl(
        &cacert,
        name,
        port,
        &[
            "-c",
            jar,
            "-b",
            jar,
            "-D",
            "-",
            "-w",
            TRANSFER_END,
            &u1,
            &u2,
            &u3,
        ],
    );
    assert!(first.status.success(), "{}", first.output());
    let t = transfers(&first.stdout);
    assert_eq!(t.len(), 3, "{}", first.output());
    let pinned = t[0].header("x-backend").to_owned();
    assert!(pinned == "one" || pinned == "two", "{t:?}");
    let set = t[0].all("set-cookie");
    assert_eq!(set.len(), 1, "{t:?}");
    let id = serverid(set[0]).to_owned();
    assert_sets_cookie_for(set[0], &pinned);
    assert_eq!(t[0].header("cache-control"), "no-cache=\"set-cookie\"");
    for (i, t) in t.iter().enumerate() {
        assert_eq!(t.code, 200, "{t:?}");
        assert_eq!(t.http_version, "1.1", "ALPN chose http/1.1: {t:?}");
        assert_eq!(t.connects, u32::from(i == 0), "keep-alive: {t:?}");
        assert_eq!(t.header("x-backend"), pinned, "request {i}: {t:?}");
        assert_eq!(t.header("x-seen-xfp"), "https", "{t:?}");
        assert!(
            t.header("x-seen-forwarded").ends_with("proto=https"),
            "{t:?}"
        );
        assert_eq!(t.header("x-seen-cookie"), "", "our cookie is stripped");
        if i > 0 {
            assert!(t.all("set-cookie").is_empty(), "a second cookie: {t:?}");
        }
    }
    let saved = std::fs::read_to_string(jar).unwrap();
    assert!(
        saved
            .lines()
            .any(|l| l.starts_with("#HttpOnly_www.example.com\t")
                && l.ends_with(&format!("\tSERVERID\t{id}"))),
        "the jar lacks the cookie:\n{saved}"
    );

    // New connections, one per curl run, with the jar: the same backend,
    // no new cookie.
    for round in 0..3 {
        let u = url(&format!("/again/{round}"));
        let r = curl(
            &cacert,
            name,
            port,
            &["-b", jar, "-D", "-", "-w", TRANSFER_END, &u],
        );
        assert!(r.status.success(), "{}", r.output());
        let t = transfers(&r.stdout);
        assert_eq!(t.len(), 1, "{}", r.output());
        assert_eq!((t[0].code, t[0].connects), (200, 1), "{t:?}");
        assert_eq!(t[0].header("x-backend"), pinned, "round {round}: {t:?}");
        assert!(t[0].all("set-cookie").is_empty(), "{t:?}");
        assert_eq!(t[0].header("x-seen-xfp"), "https", "{t:?}");
    }

    // Without cookies, two requests on one connection are scheduled one
    // by one: round robin sends them to both backends, each with its own
    // cookie.
    let (f1, f2) = (url("/fresh/1"), url("/fresh/2"));
    let r = curl(
        &cacert,
        name,
        port,
        &["-D", "-", "-w", TRANSFER_END, &f1, &f2],
    );
    assert!(r.status.success(), "{}", r.output());
    let t = transfers(&r.stdout);
    assert_eq!(t.len(), 2, "{}", r.output());
    assert_eq!((t[0].connects, t[1].connects), (1, 0), "{t:?}");
    let id_of: HashMap<&str, &str> = t
        .iter()
        .map(|t| (t.header("x-backend"), serverid(t.header("set-cookie"))))
        .collect();
    assert_eq!(id_of.len(), 2, "both backends: {t:?}");
    assert!(
        id_of.contains_key("one") && id_of.contains_key("two"),
        "{t:?}"
    );
    assert_ne!(id_of["one"], id_of["two"], "{t:?}");
    assert_eq!(id_of[pinned.as_str()], id, "cookie ids are stable");

    // Python's ssl on one keep-alive connection.
    let run = python(port, name, &cacert, "sticky");
    assert!(run.status.success(), "{}", run.output());
    let doc: serde_json::Value =
        serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.output()));
    assert_eq!(doc["connects"], 1, "one connection: {doc}");
    let replies = doc["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 6, "{doc}");
    let py_pinned = replies[0]["backend"].as_str().unwrap().to_owned();
    let py_id = serverid(replies[0]["set_cookie"].as_str().unwrap()).to_owned();
    assert_eq!(py_id, id_of[py_pinned.as_str()], "the backend's id: {doc}");
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["xfp"], "https", "{r}");
        assert!(
            r["forwarded"].as_str().unwrap().ends_with("proto=https"),
            "{r}"
        );
        assert_eq!(r["local_port"], replies[0]["local_port"], "keep-alive: {r}");
        assert_eq!(r["alpn"], "http/1.1", "{r}");
        assert!(
            r["version"] == "TLSv1.3" || r["version"] == "TLSv1.2",
            "{r}"
        );
        assert_eq!(r["body"], 0, "{r}");
        match i {
            0 => assert_eq!(r["cookie_seen"], "", "{r}"),
            1..=3 => {
                assert_eq!(r["backend"], py_pinned.as_str(), "request {i}: {r}");
                assert_eq!(r["set_cookie"], serde_json::Value::Null, "{r}");
                assert_eq!(r["cookie_seen"], "other=1", "ours stripped: {r}");
            }
            _ => assert!(r["set_cookie"].is_string(), "scheduled again: {r}"),
        }
    }
    assert_ne!(
        replies[4]["backend"], replies[5]["backend"],
        "two requests without a cookie go round robin: {doc}"
    );
    for r in &replies[4..] {
        let backend = r["backend"].as_str().unwrap();
        let set = r["set_cookie"].as_str().unwrap();
        assert_eq!(serverid(set), id_of[backend], "{r}");
        assert_sets_cookie_for(set, backend);
    }

    // Clients that trust another CA refuse the balancer's certificate.
    let refused = curl(&other_ca, name, port, &[&url("/")]);
    assert_eq!(refused.code(), Some(60), "{}", refused.output());
    let refused = python(port, name, &other_ca, "verify");
    assert!(refused.status.success(), "{}", refused.output());
    // The chain the balancer sends ends in the test CA, which this client
    // does not trust: "self-signed certificate in certificate chain" (the
    // wording varies between OpenSSL versions).
    let said = refused.stdout.trim();
    assert!(
        said.starts_with("verify failed: ") && said.contains("certificate"),
        "{}",
        refused.output()
    );
    // Neither refused client's request reached a backend: 3 + 3 + 2 from
    // curl, 6 from Python.
    let served = |b: &HttpBackend| b.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(served(&one) + served(&two), 14);
}

// ---------------------------------------------------------------------
// 3. 32 MiB each way, hashed on both sides.

/// The bulk stream as an HTTP body of known length (so Content-Length),
/// generated chunk by chunk as it is polled.
struct BulkBody {
    offset: u64,
    total: u64,
}

impl hyper::body::Body for BulkBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.offset >= self.total {
            return Poll::Ready(None);
        }
        let len = (self.total - self.offset).min(CHUNK as u64) as usize;
        let chunk = pattern(self.offset, len);
        self.offset += len as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.total
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.total - self.offset)
    }
}

/// An HTTP/1.1 backend (hyper) for bulk bodies: `POST /upload` is hashed
/// as it arrives and answered `"<sha256 hex> <length>"`; `GET /download`
/// answers the bulk stream, its hash in `x-sha256`. Every response says
/// what framing and `X-Forwarded-Proto` the request came with.
struct BulkHttpBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BulkHttpBackend {
    async fn start(sha256: String) -> BulkHttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sha256 = sha256.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let sha256 = sha256.clone();
                            async move {
                                let seen = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .map_or("", |v| v.to_str().unwrap_or("?"))
                                        .to_owned()
                                };
                                let resp = hyper::Response::builder()
                                    .header("x-seen-xfp", seen("x-forwarded-proto"))
                                    .header("x-seen-te", seen("transfer-encoding"))
                                    .header("x-seen-length", seen("content-length"));
                                let resp = match (req.method().as_str(), req.uri().path()) {
                                    ("POST", "/upload") => {
                                        let mut body = req.into_body();
                                        let (mut h, mut n) = (Sha256::new(), 0u64);
                                        while let Some(frame) = body.frame().await {
                                            let frame = frame?;
                                            if let Some(data) = frame.data_ref() {
                                                h.update(data);
                                                n += data.len() as u64;
                                            }
                                        }
                                        let answer = format!("{} {n}", hex(&h.finalize()));
                                        resp.body(http_body_util::Full::from(answer).boxed())
                                    }
                                    ("GET", "/download") => resp.header("x-sha256", sha256).body(
                                        BulkBody {
                                            offset: 0,
                                            total: BULK,
                                        }
                                        .boxed(),
                                    ),
                                    _ => {
                                        resp.status(404).body(http_body_util::Empty::new().boxed())
                                    }
                                };
                                Ok::<_, hyper::Error>(resp.unwrap())
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BulkHttpBackend { addr, task }
    }
}

impl Drop for BulkHttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Headers of a `-D <file>` dump (the last response head in it), names
/// lowercased.
fn dumped_headers(path: &Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap();
    let last = text
        .split("\r\n\r\n")
        .filter(|h| !h.trim().is_empty())
        .last()
        .unwrap_or_else(|| panic!("no headers in {text:?}"));
    let mut lines = last.lines();
    let status = lines.next().unwrap();
    let mut map: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    map.insert(":status".to_owned(), status.to_owned());
    map
}

/// Run curl with `args`, its stdin fed the bulk stream when `upload`, its
/// stdout hashed as it arrives: (exit code, bytes out, their SHA-256,
/// stderr).
async fn curl_streamed(
    mut cmd: Command,
    upload: bool,
    out_limit: u64,
) -> (Option<i32>, u64, String, String) {
    let mut child =
        tokio::process::Command::from(std::mem::replace(&mut cmd, Command::new("true")))
            .stdin(if upload {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("curl runs");
    let stdin = child.stdin.take();
    let feed = async move {
        if let Some(mut stdin) = stdin {
            for chunk in chunks(BULK) {
                // A curl that gave up stops reading: its exit code and
                // stderr say why, below.
                if stdin.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            // Dropped: the end of the upload.
        }
    };
    let mut stdout = child.stdout.take().unwrap();
    let read = async move {
        let (mut h, mut n) = (Sha256::new(), 0u64);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let got = stdout.read(&mut buf).await.unwrap();
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            n += got as u64;
            assert!(n <= out_limit, "curl wrote more than {out_limit} bytes");
        }
        (n, hex(&h.finalize()))
    };
    let mut stderr = child.stderr.take().unwrap();
    let errors = async move {
        let mut s = String::new();
        stderr.read_to_string(&mut s).await.unwrap();
        s
    };
    let ((), (n, sha), errors, status) = tokio::time::timeout(PROCESS_LIMIT, async {
        tokio::join!(feed, read, errors, child.wait())
    })
    .await
    .expect("curl finishes within the limit");
    (status.unwrap().code(), n, sha, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_over_https_hash_the_same_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let name = "bulk.example.com";
    let (cert, key, _) = ca.leaf(dir.path(), "bulk", &[name], 30);
    let cacert = ca_pem(&ca, dir.path(), "ca.pem");
    let want = bulk_sha256();
    let backend = BulkHttpBackend::start(want.clone()).await;
    let toml = format!(
        "{}{}",
        listener_toml("roundrobin", "mode = \"http\"", &[b("bulk", backend.addr)]),
        tls_table(&[(cert, key)])
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let port = d.addr("l").port();

    // Upload: curl reads the body from stdin as it is generated and sends
    // it chunked (no length known in advance); the backend answers the
    // hash and length of what it received.
    let (head, answer) = (dir.path().join("up-head"), dir.path().join("up-body"));
    let mut cmd = curl_cmd(&cacert, name, port);
    cmd.args(["-X", "POST", "-T", "-", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&answer)
        .arg(format!("https://{name}:{port}/upload"));
    let (code, n, _, errors) = curl_streamed(cmd, true, 0).await;
    assert_eq!((code, n), (Some(0), 0), "curl upload: {errors}");
    let h = dumped_headers(&head);
    assert!(h[":status"].starts_with("HTTP/1.1 200"), "{h:?}");
    assert_eq!(h["x-seen-te"], "chunked", "{h:?}");
    assert_eq!(h["x-seen-xfp"], "https", "{h:?}");
    assert_eq!(
        std::fs::read_to_string(&answer).unwrap(),
        format!("{want} {BULK}"),
        "what the backend received through the balancer"
    );

    // Download: curl's stdout hashed as it arrives.
    let head = dir.path().join("down-head");
    let mut cmd = curl_cmd(&cacert, name, port);
    cmd.arg("-D")
        .arg(&head)
        .arg(format!("https://{name}:{port}/download"));
    let (code, n, sha, errors) = curl_streamed(cmd, false, BULK).await;
    assert_eq!(code, Some(0), "curl download: {errors}");
    let h = dumped_headers(&head);
    assert!(h[":status"].starts_with("HTTP/1.1 200"), "{h:?}");
    assert_eq!(h["content-length"], BULK.to_string(), "{h:?}");
    assert_eq!(h["x-sha256"], want, "{h:?}");
    assert_eq!(n, BULK);
    assert_eq!(sha, want, "what curl received differs from what was sent");
}

/// A tcp backend for bulk streams: the first byte a client sends says
/// what it wants. `U`: everything after it, up to the client's end of
/// stream, is hashed, and answered `"<sha256 hex> <length>\n"`, then the
/// connection is closed. `D`: the bulk stream, then a close.
async fn bulk_tcp_backend() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut what = [0u8; 1];
                if s.read_exact(&mut what).await.is_err() {
                    return;
                }
                match what[0] {
                    b'U' => {
                        let (mut h, mut n) = (Sha256::new(), 0u64);
                        let mut buf = vec![0u8; CHUNK];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(got) => {
                                    h.update(&buf[..got]);
                                    n += got as u64;
                                }
                                Err(_) => return,
                            }
                        }
                        let answer = format!("{} {n}\n", hex(&h.finalize()));
                        if s.write_all(answer.as_bytes()).await.is_ok() {
                            let _ = s.shutdown().await;
                        }
                    }
                    b'D' => {
                        for chunk in chunks(BULK) {
                            if s.write_all(&chunk).await.is_err() {
                                return;
                            }
                        }
                        let _ = s.shutdown().await;
                    }
                    _ => {}
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_over_a_tls_tcp_listener_hash_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let name = "stream.example.com";
    let (cert, key, _) = ca.leaf(dir.path(), "stream", &[name], 30);
    let (addr, backend) = bulk_tcp_backend().await;
    let toml = format!(
        "{}{}",
        listener_toml("roundrobin", "", &[b("bulk", addr)]),
        tls_table(&[(cert, key)])
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let proxy = d.addr("l");
    let want = bulk_sha256();

    // Upload, then close_notify: the backend sees its end of stream,
    // answers what it received, and its close reaches the client as a
    // clean TLS close (read_to_end fails on a bare FIN).
    let (tls, _) = connect(&ca, proxy, name, true).await;
    let (mut rx, mut tx) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        tx.write_all(b"U").await.unwrap();
        let mut h = Sha256::new();
        for chunk in chunks(BULK) {
            h.update(&chunk);
            tx.write_all(&chunk).await.unwrap();
        }
        tx.shutdown().await.unwrap();
        hex(&h.finalize())
    });
    let mut answer = String::new();
    within(
        "the upload's answer, then close_notify",
        rx.read_to_string(&mut answer),
    )
    .await
    .expect("a clean close after the answer");
    let sent = within("the writer", writer).await.unwrap();
    assert_eq!(sent, want);
    assert_eq!(
        answer,
        format!("{want} {BULK}\n"),
        "what the backend received"
    );

    // Download: hashed as it arrives, up to a clean close.
    let (mut tls, _) = connect(&ca, proxy, name, true).await;
    tls.write_all(b"D").await.unwrap();
    let (mut h, mut n) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; CHUNK];
    within("the download, then close_notify", async {
        loop {
            let got = tls.read(&mut buf).await.expect("a clean close at the end");
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            n += got as u64;
            assert!(n <= BULK, "more than was sent");
        }
    })
    .await;
    assert_eq!(n, BULK);
    assert_eq!(hex(&h.finalize()), want, "what the client received differs");
    backend.abort();
}

// ---------------------------------------------------------------------
// 4. WebSocket over TLS.

/// What the WebSocket backend saw: each upgrade request's path and
/// headers, then every message it received, in order.
#[derive(Default)]
struct WsSeen {
    upgrades: Vec<(String, HeaderMap)>,
    messages: Vec<Message>,
}

/// A WebSocket backend (tungstenite, server side). The handshake records
/// the upgrade request; then text and binary messages are echoed, pings are
/// answered with pongs and a close with the same close, all by tungstenite,
/// which also refuses unmasked client frames. Every message is recorded.
async fn websocket_backend() -> (SocketAddr, Arc<Mutex<WsSeen>>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(WsSeen::default()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let _ = websocket_session(s, log).await;
            });
        }
    });
    (addr, seen, task)
}

async fn websocket_session(s: TcpStream, seen: Arc<Mutex<WsSeen>>) -> Result<(), WsError> {
    let log = seen.clone();
    #[expect(clippy::result_large_err, reason = "tungstenite's callback signature")]
    let record = move |req: &Request, resp: Response| {
        let upgrade = (req.uri().to_string(), req.headers().clone());
        log.lock().unwrap().upgrades.push(upgrade);
        Ok(resp)
    };
    let mut ws = accept_hdr_async(s, record).await?;
    // Ends after the close handshake: tungstenite answers the close, then
    // the stream ends and dropping it closes the connection.
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        seen.lock().unwrap().messages.push(msg.clone());
        if msg.is_text() || msg.is_binary() {
            ws.send(msg).await?;
        }
    }
    Ok(())
}

/// A message's kind and size, for assertion messages (a 300 kB payload
/// would be unreadable in full).
fn ws_summary(msg: &Message) -> String {
    let kind = match msg {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "frame",
    };
    format!("{kind} of {} bytes", msg.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_https_echoes_frames_byte_exact_and_closes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let name = "ws.example.com";
    let (cert, key, _) = ca.leaf(dir.path(), "ws", &[name], 30);
    let (addr, seen, backend) = websocket_backend().await;
    let toml = format!(
        "{}{}",
        listener_toml("roundrobin", "mode = \"http\"", &[b("ws", addr)]),
        tls_table(&[(cert, key)])
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let (tls, _) = connect(&ca, d.addr("l"), name, true).await;

    // The upgrade: tungstenite checks the 101's Upgrade, Connection and
    // Sec-WebSocket-Accept itself.
    let (mut ws, response) = within("the 101", client_async(format!("wss://{name}/chat"), tls))
        .await
        .expect("the upgrade is accepted");
    assert_eq!(response.status(), 101);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.upgrades.len(), 1, "one upgrade request");
        let (path, headers) = &seen.upgrades[0];
        assert_eq!(path, "/chat");
        assert_eq!(
            headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok()),
            Some("https"),
            "{headers:?}"
        );
    }

    // Text, then binary of each length encoding (7-bit, 16-bit, 64-bit);
    // each echoed before the next is sent.
    let big = pattern(0, 300_000);
    let mut sent: Vec<Message> = vec![
        Message::text("hello over TLS"),
        Message::text("h\u{e9}llo \u{2713}"),
        Message::binary(Vec::new()),
        Message::binary((0..125u8).collect::<Vec<_>>()),
        Message::binary((0..126u8).collect::<Vec<_>>()),
        Message::binary(big[..65_535].to_vec()),
        Message::binary(big[..65_536].to_vec()),
        Message::binary(big.clone()),
    ];
    for (i, msg) in sent.iter().enumerate() {
        ws.send(msg.clone()).await.unwrap();
        let back = within("the echo", ws.next())
            .await
            .expect("an echo, not the end")
            .expect("a well-formed echo");
        assert!(
            back == *msg,
            "message {i}: {} back, {} sent",
            ws_summary(&back),
            ws_summary(msg)
        );
    }

    // A text message in two frames: the backend gets (and echoes) the
    // whole message.
    ws.send(Message::Frame(WsFrame::message(
        "frag",
        OpCode::Data(OpData::Text),
        false,
    )))
    .await
    .unwrap();
    ws.send(Message::Frame(WsFrame::message(
        "mented",
        OpCode::Data(OpData::Continue),
        true,
    )))
    .await
    .unwrap();
    let whole = Message::text("fragmented");
    let back = within("the fragmented echo", ws.next()).await;
    assert_eq!(back.expect("an echo").unwrap(), whole);
    sent.push(whole);

    // A ping: answered with a pong of the same payload.
    let ping = Message::Ping(Bytes::from_static(b"ping!"));
    ws.send(ping.clone()).await.unwrap();
    let back = within("the pong", ws.next()).await;
    assert_eq!(
        back.expect("a pong").unwrap(),
        Message::Pong(Bytes::from_static(b"ping!"))
    );
    sent.push(ping);

    // Two messages in one write: two answers, in order.
    let pair = [Message::text("one"), Message::text("two")];
    for msg in &pair {
        ws.feed(msg.clone()).await.unwrap();
    }
    ws.flush().await.unwrap();
    for msg in &pair {
        let back = within("pipelined echo", ws.next()).await;
        assert_eq!(&back.expect("an echo").unwrap(), msg);
    }
    sent.extend(pair);

    // Close: 1000 "bye" answered in kind, then the stream ends. The
    // backend's close reaches the client as close_notify: a bare FIN would
    // come out of the TLS stream as an UnexpectedEof error, not the end.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    };
    ws.close(Some(bye.clone())).await.unwrap();
    let back = within("the close", ws.next()).await;
    assert_eq!(
        back.expect("the close answered").unwrap(),
        Message::Close(Some(bye.clone()))
    );
    let end = within("the end after the close", ws.next()).await;
    assert!(end.is_none(), "after the close: {end:?}");
    sent.push(Message::Close(Some(bye)));

    // The backend got every message exactly as sent.
    let got = std::mem::take(&mut seen.lock().unwrap().messages);
    assert_eq!(got.len(), sent.len());
    for (i, (g, w)) in got.iter().zip(&sent).enumerate() {
        assert!(
            g == w,
            "message {i} at the backend: {}, {} sent",
            ws_summary(g),
            ws_summary(w)
        );
    }
    backend.abort();
}
