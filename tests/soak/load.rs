//! The soak's client load: a few workers per listener, each a bounded loop
//! of short-lived client connections (a few request/response round trips
//! each), all on 127.0.0.1. The load makes as many connections as it is
//! allowed ([`Load::allow`]) and no more: the chaos loop hands out a stretch
//! at a time and waits until it has been made ([`Load::made`]), so events
//! and traffic interleave by progress, not by the clock.
//!
//! - tcp: read the echo backend's name, then echo 1–4 payloads (1 B to
//!   16 KiB, now and then 256 KiB) and compare them byte for byte;
//! - web (HTTP mode): 1–4 keep-alive POSTs with a random body that the
//!   backend echoes; a response is whole when its body is exactly that;
//! - redis: `CONFIG GET port` (which server is this?), then SET/GET pairs.
//!
//! Every connection counts as attempted, then succeeded or failed. A
//! failure is kept with its time window and its backend, if the client
//! learnt it, and whether a backend outage could explain it at all (an
//! early close or a reset could; a wrong byte, a 503 or a hang could not):
//! the report decides from the chaos log which failures are excused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::rng::Rng;

pub const TCP: usize = 0;
pub const WEB: usize = 1;
pub const REDIS: usize = 2;
/// Listener names in the daemon's config, by index.
pub const LISTENERS: [&str; 3] = ["tcp", "web", "redis"];

/// Concurrent client workers per listener: moderate, for a 2-core CI
/// machine that runs other test binaries beside this one.
const WORKERS: [usize; 3] = [3, 2, 2];

/// Longer than any outage takes to show (a frozen Redis server is marked
/// down and cut within interval × fall + timeout): a client still waiting
/// after this was hung, which no outage excuses.
const OP_TIMEOUT: Duration = Duration::from_secs(20);

/// The occasional payload that fills the relay's buffer (bulk, splice).
const BIG: usize = 256 * 1024;

#[derive(Debug, Default)]
pub struct Counts {
    pub attempted: AtomicU64,
    pub succeeded: AtomicU64,
}

/// What the clients did and saw, across all phases.
#[derive(Debug, Default)]
pub struct Stats {
    /// Client connections, by listener index.
    pub conns: [Counts; 3],
    pub tcp_bytes: AtomicU64,
    pub redis_commands: AtomicU64,
    pub http_requests: AtomicU64,
    /// Responses from a backend (status 200 with `x-backend`).
    pub http_responses: AtomicU64,
    /// Of those, the ones whose body was exactly the request's.
    pub http_whole: AtomicU64,
    /// Bodies that ended in an error (cut), never taken for whole.
    pub http_cut: AtomicU64,
    /// Bodies that ended cleanly but were not what was sent: never allowed.
    pub http_not_whole: AtomicU64,
    pub failures: Mutex<Vec<Failure>>,
    /// Connections that succeeded but took over `SLOW`: a client waiting on
    /// a frozen server that was thawed before the daemon cut it.
    pub slow: Mutex<Vec<Slow>>,
}

/// A successful connection that took over `SLOW`.
#[derive(Debug, Clone)]
pub struct Slow {
    pub listener: usize,
    pub start: Instant,
    pub end: Instant,
    pub backend: Option<String>,
}

/// Far longer than any connection of this load takes against live
/// backends (a few round trips on loopback).
pub const SLOW: Duration = Duration::from_secs(1);

/// A failed client connection (HTTP: its failed request).
#[derive(Debug, Clone)]
pub struct Failure {
    pub listener: usize,
    pub start: Instant,
    pub end: Instant,
    /// The backend that served it, if the client learnt that.
    pub backend: Option<String>,
    pub what: String,
    /// An early close, a reset or a 502 after the request went out: what
    /// a backend's death looks like. False for what no outage explains.
    pub outage_shaped: bool,
    /// An HTTP response whose body was cut.
    pub cut_response: bool,
}

/// Why one connection failed, before its window is known.
struct Fail {
    what: String,
    outage_shaped: bool,
    cut_response: bool,
}

impl Fail {
    fn outage(what: impl Into<String>) -> Fail {
        Fail {
            what: what.into(),
            outage_shaped: true,
            cut_response: false,
        }
    }
    fn never(what: impl Into<String>) -> Fail {
        Fail {
            what: what.into(),
            outage_shaped: false,
            cut_response: false,
        }
    }
}

impl Stats {
    fn record(
        &self,
        listener: usize,
        start: Instant,
        backend: Option<String>,
        result: Result<(), Fail>,
    ) {
        match result {
            Ok(()) => {
                self.conns[listener].succeeded.fetch_add(1, Relaxed);
                let end = Instant::now();
                if end - start > SLOW {
                    self.slow.lock().unwrap().push(Slow {
                        listener,
                        start,
                        end,
                        backend,
                    });
                }
            }
            Err(f) => self.failures.lock().unwrap().push(Failure {
                listener,
                start,
                end: Instant::now(),
                backend,
                what: f.what,
                outage_shaped: f.outage_shaped,
                cut_response: f.cut_response,
            }),
        }
    }
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Targets {
    pub addrs: [SocketAddr; 3],
    /// Redis server port → backend name (what `CONFIG GET port` tells).
    pub redis_names: Arc<HashMap<u16, String>>,
}

/// Running workers.
pub struct Load {
    stop: Arc<AtomicBool>,
    budget: Arc<Budget>,
    tasks: Vec<JoinHandle<()>>,
}

/// Connections the workers may still start, and how many have ended.
struct Budget {
    permits: Semaphore,
    allowed: AtomicU64,
    made: AtomicU64,
    progress: Notify,
}

impl Load {
    pub fn start(targets: &Targets, stats: &Arc<Stats>, rng: &mut Rng) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let budget = Arc::new(Budget {
            permits: Semaphore::new(0),
            allowed: AtomicU64::new(0),
            made: AtomicU64::new(0),
            progress: Notify::new(),
        });
        let mut tasks = Vec::new();
        for (listener, &n) in WORKERS.iter().enumerate() {
            for w in 0..n {
                let (stats, stop, rng) = (stats.clone(), stop.clone(), rng.fork());
                let (targets, budget) = (targets.clone(), budget.clone());
                let id = format!("{}{w}", LISTENERS[listener]);
                tasks.push(tokio::spawn(worker(
                    listener, id, targets, stats, stop, budget, rng,
                )));
            }
        }
        Load {
            stop,
            budget,
            tasks,
        }
    }

    /// Let the workers make `n` more client connections.
    pub fn allow(&self, n: u64) {
        self.budget.allowed.fetch_add(n, Relaxed);
        self.budget.permits.add_permits(n as usize);
    }

    /// Wait until every connection allowed so far has been made (each
    /// ends within `OP_TIMEOUT`, so that bounds the wait).
    pub async fn made(&self) {
        let deadline = Instant::now() + OP_TIMEOUT + Duration::from_secs(10);
        loop {
            let progress = self.budget.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let (made, allowed) = (
                self.budget.made.load(Relaxed),
                self.budget.allowed.load(Relaxed),
            );
            if made >= allowed {
                return;
            }
            let moved = tokio::time::timeout_at(deadline, progress).await;
            assert!(
                moved.is_ok(),
                "the load made {made} of the {allowed} connections it was allowed"
            );
        }
    }

    /// Let each worker finish its connection, and wait for them.
    pub async fn stop(self) {
        self.stop.store(true, Relaxed);
        self.budget.permits.close();
        for t in self.tasks {
            t.await.expect("load worker");
        }
    }
}

async fn worker(
    listener: usize,
    id: String,
    targets: Targets,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    budget: Arc<Budget>,
    mut rng: Rng,
) {
    let addr = targets.addrs[listener];
    let mut n = 0u64;
    while let Ok(permit) = budget.permits.acquire().await {
        permit.forget();
        if stop.load(Relaxed) {
            break;
        }
        n += 1;
        stats.conns[listener].attempted.fetch_add(1, Relaxed);
        let mut start = Instant::now();
        let mut backend = None;
        let one = async {
            match listener {
                TCP => tcp_conn(addr, &mut rng, &mut backend, &stats).await,
                WEB => http_conn(addr, &mut rng, &mut backend, &mut start, &stats).await,
                _ => {
                    let key = format!("soak:{id}:{n}");
                    let names = &targets.redis_names;
                    redis_conn(addr, names, &key, &mut rng, &mut backend, &stats).await
                }
            }
        };
        let result = tokio::time::timeout(OP_TIMEOUT, one)
            .await
            .unwrap_or_else(|_| Err(Fail::never(format!("no progress for {OP_TIMEOUT:?}"))));
        stats.record(listener, start, backend, result);
        budget.made.fetch_add(1, Relaxed);
        budget.progress.notify_waiters();
    }
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> Fail + '_ {
    move |e| Fail::outage(format!("{what}: {e}"))
}

async fn tcp_conn(
    addr: SocketAddr,
    rng: &mut Rng,
    backend: &mut Option<String>,
    stats: &Stats,
) -> Result<(), Fail> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Fail::never(format!("connect to the listener: {e}")))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.map_err(io("greeting"))?;
    let Some(name) = line.strip_suffix('\n') else {
        return Err(Fail::outage(format!(
            "closed before the greeting ({line:?})"
        )));
    };
    *backend = Some(name.to_owned());
    if !reader.buffer().is_empty() {
        return Err(Fail::never("bytes after the greeting"));
    }
    let mut stream = reader.into_inner();
    for round in 0..rng.range(1, 5) {
        let size = if rng.percent(4) {
            BIG
        } else {
            rng.range(1, 16 * 1024) as usize
        };
        let payload = rng.bytes(size);
        let mut echo = vec![0u8; size];
        let (mut r, mut w) = stream.split();
        let (wrote, read) = tokio::join!(w.write_all(&payload), r.read_exact(&mut echo));
        wrote.map_err(io(&format!("round {round}: write")))?;
        read.map_err(io(&format!("round {round}: read the echo")))?;
        if echo != payload {
            return Err(Fail::never(format!(
                "round {round}: the echo of {size} bytes differs"
            )));
        }
        stats.tcp_bytes.fetch_add(size as u64, Relaxed);
    }
    Ok(())
}

/// A keep-alive client connection of 1–4 requests; `start` is moved to the
/// start of each request, so a failure's window is its request's.
async fn http_conn(
    addr: SocketAddr,
    rng: &mut Rng,
    backend: &mut Option<String>,
    start: &mut Instant,
    stats: &Stats,
) -> Result<(), Fail> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Fail::never(format!("connect to the listener: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| Fail::never(format!("handshake: {e}")))?;
    let conn = tokio::spawn(conn);
    for i in 0..rng.range(1, 5) {
        (*start, *backend) = (Instant::now(), None);
        let size = if rng.percent(3) {
            200 * 1024
        } else {
            rng.below(32 * 1024) as usize
        };
        let body = Bytes::from(rng.bytes(size));
        stats.http_requests.fetch_add(1, Relaxed);
        sender
            .ready()
            .await
            // Only after a whole response: the daemon has no reason to
            // close the connection then.
            .map_err(|e| Fail::never(format!("request {i}: connection closed before it: {e}")))?;
        let req = hyper::Request::post(format!("/soak/{i}"))
            .header("host", "soak.test")
            .body(Full::new(body.clone()))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Fail::outage(format!("request {i}: no response: {e}")))?;
        let status = resp.status().as_u16();
        let name = resp
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let got = resp.into_body().collect().await.map(|c| c.to_bytes());
        match (status, name) {
            (200, Some(name)) => {
                *backend = Some(name);
                stats.http_responses.fetch_add(1, Relaxed);
                match got {
                    Ok(got) if got == body => {
                        stats.http_whole.fetch_add(1, Relaxed);
                    }
                    Ok(got) => {
                        stats.http_not_whole.fetch_add(1, Relaxed);
                        return Err(Fail::never(format!(
                            "request {i}: the response ended cleanly but is not whole \
                             ({} bytes for {size} sent, or different bytes)",
                            got.len()
                        )));
                    }
                    Err(e) => {
                        stats.http_cut.fetch_add(1, Relaxed);
                        return Err(Fail {
                            cut_response: true,
                            ..Fail::outage(format!("request {i}: response body cut: {e}"))
                        });
                    }
                }
            }
            (status, _) => {
                let text = got
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .unwrap_or_else(|e| format!("(body: {e})"));
                let what = format!("request {i}: {status} {text:?}");
                // The daemon's 502s for a request that reached a backend
                // which then failed: before its response (a plain "bad
                // gateway") or in the first part of its body, which the
                // daemon reads ahead ("cut short"; "malformed" if what
                // came did not parse). "No backend answered" and 503 mean
                // it found no live backend, which there always was.
                let backend_failed = [
                    "bad gateway",
                    "bad gateway: the backend's response was cut short",
                    "bad gateway: malformed response",
                ];
                return Err(
                    if status == 502 && backend_failed.contains(&text.as_str()) {
                        Fail::outage(what)
                    } else {
                        Fail::never(what)
                    },
                );
            }
        }
    }
    drop(sender);
    let _ = conn.await;
    Ok(())
}

/// A RESP reply (what these commands get back).
#[derive(Debug, PartialEq)]
enum Reply {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn resp_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Vec<u8>, Fail> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)
        .await
        .map_err(io("read a reply"))?;
    if !line.ends_with(b"\r\n") {
        return Err(Fail::outage(format!(
            "closed in a reply ({:?})",
            String::from_utf8_lossy(&line)
        )));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn number(digits: &[u8]) -> Result<i64, Fail> {
    std::str::from_utf8(digits)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Fail::never(format!("bad RESP number {digits:?}")))
}

async fn scalar<R: AsyncBufRead + Unpin>(r: &mut R, head: Vec<u8>) -> Result<Reply, Fail> {
    let rest = head.get(1..).unwrap_or_default();
    Ok(match head.first() {
        Some(b'+') => Reply::Simple(rest.to_vec()),
        Some(b'-') => Reply::Error(rest.to_vec()),
        Some(b':') => Reply::Int(number(rest)?),
        Some(b'$') => match usize::try_from(number(rest)?) {
            Err(_) => Reply::Bulk(None),
            Ok(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).await.map_err(io("read a bulk"))?;
                if !buf.ends_with(b"\r\n") {
                    return Err(Fail::never("a bulk string without its CRLF"));
                }
                buf.truncate(n);
                Reply::Bulk(Some(buf))
            }
        },
        _ => return Err(Fail::never(format!("bad RESP reply {head:?}"))),
    })
}

/// One reply: a scalar or a flat array of scalars.
async fn reply<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, Fail> {
    let head = resp_line(r).await?;
    if head.first() != Some(&b'*') {
        return scalar(r, head).await;
    }
    let mut items = Vec::new();
    for _ in 0..number(&head[1..])?.max(0) {
        let head = resp_line(r).await?;
        items.push(scalar(r, head).await?);
    }
    Ok(Reply::Array(items))
}

async fn redis_conn(
    addr: SocketAddr,
    names: &HashMap<u16, String>,
    key: &str,
    rng: &mut Rng,
    backend: &mut Option<String>,
    stats: &Stats,
) -> Result<(), Fail> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Fail::never(format!("connect to the listener: {e}")))?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(&command(&[b"CONFIG", b"GET", b"port"]))
        .await
        .map_err(io("write CONFIG GET"))?;
    let port = match reply(&mut r).await? {
        Reply::Array(items) => match items.as_slice() {
            [_, Reply::Bulk(Some(p))] => std::str::from_utf8(p).ok().and_then(|p| p.parse().ok()),
            _ => None,
        },
        other => return Err(Fail::never(format!("CONFIG GET port: {other:?}"))),
    };
    let Some(name) = port.and_then(|p: u16| names.get(&p)) else {
        return Err(Fail::never(format!(
            "CONFIG GET port: unknown port {port:?}"
        )));
    };
    *backend = Some(name.clone());
    for i in 0..rng.range(1, 4) {
        let key = format!("{key}:{i}");
        let size = rng.range(1, 4096) as usize;
        let value = rng.bytes(size);
        w.write_all(&command(&[b"SET", key.as_bytes(), &value]))
            .await
            .map_err(io("write SET"))?;
        let set = reply(&mut r).await?;
        if set != Reply::Simple(b"OK".to_vec()) {
            return Err(Fail::never(format!("SET {key}: {set:?}")));
        }
        w.write_all(&command(&[b"GET", key.as_bytes()]))
            .await
            .map_err(io("write GET"))?;
        let get = reply(&mut r).await?;
        if get != Reply::Bulk(Some(value)) {
            return Err(Fail::never(format!("GET {key}: not the value just set")));
        }
        stats.redis_commands.fetch_add(2, Relaxed);
    }
    Ok(())
}
