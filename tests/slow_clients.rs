//! Slow clients against the HTTP listeners of the real daemon, driven by
//! Debian's `slowhttptest` in bounded runs on loopback (at most 1 000
//! connections and 15 s each), one scenario after the other so that they
//! do not skew each other's latency:
//!
//! - slowloris (`-H`): request heads trickled, a header every second —
//!   cut by `header_timeout`, which bounds the whole head, not each gap;
//! - slow body, R-U-Dead-Yet (`-B`): a POST body that gets a few bytes
//!   every 5 s, more than `body_timeout` — cut by `body_timeout`, twice:
//!   in front of a backend that streams its answer (`HttpBackend`, which
//!   echoes: its 200 has gone out, so the cut is a reset) and of one that
//!   reads the whole body first (the client gets the 408 and a close);
//! - slow read (`-X`) of a small response, through tiny receive windows,
//!   5 bytes read every 3 s: the kernel's socket buffers take the whole
//!   response, so the daemon has written it and the connection waits for
//!   its next request — cut by `header_timeout`, the keep-alive idle limit;
//! - slow read of a response larger than the kernel's largest send buffer
//!   (`net.ipv4.tcp_wmem`'s maximum and 2 MiB), so the daemon's write
//!   itself waits on the client — cut by `body_timeout`'s send deadline;
//! - an admin flood: 200 tasks scraping `/metrics` on fresh connections as
//!   fast as they can for 8 s, far over the admin endpoint's cap of 64
//!   connections (the rest are answered 503 — counted, not failures);
//!   first against a second daemon (same config), the control: the same
//!   load on the machine, none of it on the probed daemon's admin
//!   endpoint; then against the probed daemon's own.
//!
//! Throughout each, a probe does a GET through the listener under attack
//! on a fresh connection every 10 ms: none may fail and their p99 must
//! stay under 100 ms. The slow connections must be cut by the daemon:
//! every connection slowhttptest established ends with the bound's error
//! in the daemon's debug log, each lived more than 1 s and none more than
//! 10 s (`switchyard_connection_duration_seconds`), the daemon's open
//! client connections (`/api/v1/status`) are down to the probes' at least
//! 3 s before slowhttptest's own time limit, and for the attacks whose
//! connections the client sees closed (`-H`, `-B`) slowhttptest ends with
//! "No open connections left"; where the daemon answers itself (the 408)
//! every connection got the answer. After each scenario the daemon's
//! descriptor count comes back to the baseline exactly and its RSS within
//! 10 % (most of that wait is the backend pool: an idle keep-alive
//! connection beyond the one the probe keeps using goes once 4 s old).
//!
//! Every check is made; the figures are printed as a table and written to
//! `/tmp/slow-figures.md`, and then the test fails with every check that
//! did not hold.
//!
//! The backends and the probe run on a thread of their own (a
//! current-thread runtime), so what the probe measures is the daemon, not
//! this process's flood tasks queued on the same runtime.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{DEADLINE, Daemon, HttpBackend, b, listener_toml, within};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{JoinHandle, block_in_place};
use tokio::time::{Instant, MissedTickBehavior};

/// Both bounds short so that the run is short; the same on both listeners.
const HEADER_TIMEOUT_SECS: u64 = 2;
const BODY_TIMEOUT_SECS: u64 = 2;

/// The probe's pace: one GET, on a fresh connection, every 10 ms.
const PROBE_EVERY: Duration = Duration::from_millis(10);

/// A probe not answered in full within this is a failure.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The most probes of one scenario (a minute at 10 ms): a bound on the
/// loop, never reached by a passing run.
const MAX_PROBES: usize = 6_000;

/// The issue's bound on the probe's p99 under every attack.
const P99_BOUND: Duration = Duration::from_millis(100);

/// How often RSS, descriptors and open connections are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// RSS after a scenario: within 10 % of the baseline.
const RSS_TOLERANCE: f64 = 0.10;

/// Open client connections of the attacked listener that are not the
/// attack's: the probe's (one at a time) and slowhttptest's own probe (one
/// at a time).
const OPEN_SLACK: u64 = 2;

/// The daemon must have cut the slow connections at least this long
/// before slowhttptest's time limit would have ended them.
const CUT_MARGIN: Duration = Duration::from_secs(3);

/// Response bytes beyond the kernel's largest send buffer for the large
/// slow read: room for what the daemon itself holds (64 KiB of look-ahead,
/// hyper's buffers) and the client's receive buffer, with margin.
const BULK_MARGIN: usize = 2 << 20;

/// The source address of the log marker (see `Lab::cut_causes`).
const MARKER_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

const SLOWHTTPTEST: &str = "/usr/bin/slowhttptest";
const FIGURES: &str = "/tmp/slow-figures.md";

/// The admin flood: tasks, each scraping `/metrics` back to back.
const FLOOD_TASKS: usize = 200;
const FLOOD_FOR: Duration = Duration::from_secs(8);

/// The probe alone, for the latency baseline.
const BASELINE_FOR: Duration = Duration::from_secs(3);

/// One slowhttptest run.
struct Attack {
    name: &'static str,
    /// The listener attacked (and probed).
    listener: &'static str,
    /// The mode flag and its options.
    flags: &'static [&'static str],
    connections: u64,
    /// Connections per second.
    rate: u64,
    /// slowhttptest's own time limit (`-l`), seconds.
    limit: u64,
    /// The daemon's bound that must cut the connections, and how long it is.
    bound: &'static str,
    bound_secs: u64,
    /// What the daemon's debug log says about each connection it cut so.
    cause: &'static str,
    /// The status the daemon answered each with itself, if any (counted
    /// with `backend=""`).
    status: Option<&'static str>,
    /// slowhttptest sees the connections closed (its exit status is then
    /// "No open connections left", before its time limit). A slow reader
    /// does not: its receive buffer holds data it reads 5 bytes at a time.
    client_sees_close: bool,
}

impl Attack {
    fn args(&self, url: &str, stats: &Path) -> Vec<String> {
        let mut args: Vec<String> = self.flags.iter().map(|s| s.to_string()).collect();
        for (flag, value) in [
            ("-c", self.connections.to_string()),
            ("-r", self.rate.to_string()),
            ("-l", self.limit.to_string()),
            // Its own probe: every 3 s, unavailable if not answered in 3 s.
            ("-p", "3".to_owned()),
            ("-u", url.to_owned()),
        ] {
            args.extend([flag.to_owned(), value]);
        }
        args.extend([
            "-g".to_owned(),
            "-o".to_owned(),
            stats.display().to_string(),
        ]);
        args
    }
}

/// Slow read: receive windows of 1 to 64 bytes, 5 bytes read every 3 s
/// (more than `body_timeout`), the request sent twice, pipelined.
const SLOW_READ: &[&str] = &["-X", "-w", "1", "-y", "64", "-n", "3", "-z", "5", "-k", "2"];
/// Slow body: a POST with `Content-Length: 8192`, up to 10 more bytes of
/// it every 5 s (more than `body_timeout`).
const SLOW_BODY: &[&str] = &["-B", "-i", "5", "-s", "8192", "-x", "10"];

fn attacks() -> Vec<Attack> {
    vec![
        Attack {
            name: "slowloris (-H)",
            listener: "web",
            flags: &["-H", "-i", "1", "-x", "24"],
            connections: 1000,
            rate: 250,
            limit: 15,
            bound: "header_timeout",
            bound_secs: HEADER_TIMEOUT_SECS,
            cause: "web: http connection ended with error error=read header from client timeout",
            status: None,
            client_sees_close: true,
        },
        Attack {
            name: "slow body (-B), streaming backend",
            listener: "web",
            flags: SLOW_BODY,
            connections: 500,
            rate: 250,
            limit: 15,
            bound: "body_timeout",
            bound_secs: BODY_TIMEOUT_SECS,
            cause: "web: http connection ended with error error=error from user's Body stream",
            status: None,
            client_sees_close: true,
        },
        Attack {
            name: "slow body (-B), buffering backend",
            listener: "bulk",
            flags: SLOW_BODY,
            connections: 500,
            rate: 250,
            limit: 15,
            bound: "body_timeout",
            bound_secs: BODY_TIMEOUT_SECS,
            // hyper's error for a failed request body; ours is its source.
            cause: "bulk: client request body failed error=error from user's Body stream",
            status: Some("408"),
            client_sees_close: true,
        },
        Attack {
            name: "slow read (-X), small response",
            listener: "web",
            flags: SLOW_READ,
            connections: 1000,
            rate: 250,
            limit: 12,
            bound: "header_timeout",
            bound_secs: HEADER_TIMEOUT_SECS,
            cause: "web: http connection ended with error error=read header from client timeout",
            status: None,
            client_sees_close: false,
        },
        Attack {
            name: "slow read (-X), large response",
            listener: "bulk",
            flags: SLOW_READ,
            connections: 32,
            rate: 32,
            limit: 8,
            bound: "body_timeout",
            bound_secs: BODY_TIMEOUT_SECS,
            cause: "bulk: http connection ended with error error=error writing a body to connection",
            status: None,
            client_sees_close: false,
        },
    ]
}

/// A thread with a runtime of its own, for the backends and the probe.
struct Side {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Side {
    fn start() -> Side {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("backends-and-probe".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                tx.send(rt.handle().clone()).unwrap();
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .unwrap();
        Side {
            handle: rx.recv().unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An HTTP backend like most applications: it reads a request's whole
/// body before it answers (`got N bytes`); `GET /` is `size` bytes, any
/// other path `ok\n`; every answer has `x-backend: bulk1`.
struct BulkBackend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl BulkBackend {
    async fn start(size: usize) -> BulkBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let bulk = Bytes::from(vec![b'x'; size]);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let bulk = bulk.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let bulk = bulk.clone();
                            async move {
                                let get_root = req.uri().path() == "/";
                                let got = req.into_body().collect().await.map(|b| b.to_bytes());
                                let body = match got {
                                    Ok(b) if !b.is_empty() => {
                                        Bytes::from(format!("got {} bytes", b.len()))
                                    }
                                    Ok(_) if get_root => bulk,
                                    Ok(_) => Bytes::from_static(b"ok\n"),
                                    // The proxy gave up on the client's body.
                                    Err(e) => Bytes::from(format!("body failed: {e}")),
                                };
                                Ok::<_, Infallible>(
                                    hyper::Response::builder()
                                        .header("x-backend", "bulk1")
                                        .body(Full::new(body))
                                        .unwrap(),
                                )
                            }
                        },
                    );
                    // A slow reader the daemon cut ends in an error here:
                    // expected, and seen from the daemon's side.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        BulkBackend { addr, task }
    }
}

impl Drop for BulkBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the probe goes and what it must get back.
#[derive(Debug, Clone, Copy)]
struct Target {
    addr: SocketAddr,
    path: &'static str,
    backend: &'static str,
    body: &'static [u8],
}

/// One probe: a fresh connection, one GET, the whole answer checked.
async fn probe_once(t: Target) -> Result<(), String> {
    let stream = TcpStream::connect(t.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {}", chain(&e)))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(t.path)
        .header("host", "probe.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {}", chain(&e)))?;
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("x-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {}", chain(&e)))?
        .to_bytes();
    if status != 200 || backend != t.backend || body != t.body {
        return Err(format!(
            "status {status}, x-backend {backend:?}, body {:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

#[derive(Debug, Default)]
struct ProbeLog {
    latencies: Vec<Duration>,
    /// When (since the probe started) and what.
    failures: Vec<(Duration, String)>,
    /// The loop stopped at `MAX_PROBES`, not when told to.
    ran_out: bool,
}

/// Probe `t` every `PROBE_EVERY` until `stop` changes (or `MAX_PROBES`).
async fn probe_loop(t: Target, mut stop: watch::Receiver<bool>) -> ProbeLog {
    let start = Instant::now();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut log = ProbeLog::default();
    loop {
        if log.latencies.len() + log.failures.len() >= MAX_PROBES {
            log.ran_out = true;
            return log;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return log,
        }
        let sent = Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, probe_once(t)).await {
            Ok(Ok(())) => log.latencies.push(sent.elapsed()),
            Ok(Err(e)) => log.failures.push((sent - start, e)),
            Err(_) => log
                .failures
                .push((sent - start, format!("no answer within {PROBE_TIMEOUT:?}"))),
        }
    }
}

/// A running probe loop on the side runtime.
struct Probe {
    stop: watch::Sender<bool>,
    task: JoinHandle<ProbeLog>,
}

impl Probe {
    fn start(side: &Side, t: Target) -> Probe {
        let (stop, stopped) = watch::channel(false);
        let task = side.handle.spawn(probe_loop(t, stopped));
        Probe { stop, task }
    }

    async fn finish(self) -> ProbeLog {
        self.stop.send(true).unwrap();
        within("probe loop ends", self.task).await.unwrap()
    }
}

/// Latency figures of one probe loop (nearest rank).
#[derive(Debug, Clone, Copy, Default)]
struct Latency {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn latency(log: &ProbeLog) -> Latency {
    let mut v = log.latencies.clone();
    if v.is_empty() {
        return Latency::default();
    }
    v.sort();
    let rank = |p: usize| v[(v.len() * p).div_ceil(100).max(1) - 1];
    Latency {
        n: v.len(),
        p50: rank(50),
        p99: rank(99),
        max: *v.last().unwrap(),
    }
}

/// The daemon's resident memory and open descriptors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    rss_kib: u64,
    fds: u64,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("daemon fds")
        .count() as u64;
    Footprint { rss_kib, fds }
}

fn rss_within(now: u64, base: u64) -> bool {
    (now as f64 - base as f64).abs() <= RSS_TOLERANCE * base as f64
}

/// The peaks of two footprints.
fn peak(a: Footprint, b: Footprint) -> Footprint {
    Footprint {
        rss_kib: a.rss_kib.max(b.rss_kib),
        fds: a.fds.max(b.fds),
    }
}

/// CPU time (user and system) process `pid` has used so far.
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // After the command's closing parenthesis: field 3 (state) on;
    // utime and stime are fields 14 and 15, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a constant name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// CPU used by the daemon and by this test process over a stretch of time.
struct Cpu {
    daemon: Duration,
    test: Duration,
    wall: Instant,
    pid: String,
}

impl Cpu {
    fn start(pid: u32) -> Cpu {
        let pid = pid.to_string();
        Cpu {
            daemon: cpu_time(&pid),
            test: cpu_time("self"),
            wall: Instant::now(),
            pid,
        }
    }

    /// "D % / T %" of one core, daemon and test, since `start`.
    fn used(&self) -> String {
        let wall = self.wall.elapsed().as_secs_f64();
        let pct = |now: Duration, then: Duration| 100.0 * (now - then).as_secs_f64() / wall;
        format!(
            "{:.0} % / {:.0} %",
            pct(cpu_time(&self.pid), self.daemon),
            pct(cpu_time("self"), self.test)
        )
    }
}

/// Open client connections of `listener`, as the daemon counts them.
async fn open_clients(admin: SocketAddr, listener: &str) -> u64 {
    let (code, body) = common::http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == listener)
        .and_then(|l| l["open_client_connections"].as_u64())
        .unwrap_or_else(|| panic!("no open_client_connections for {listener}: {body}"))
}

/// What the daemon's metrics say about a listener's client connections.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    /// Connections that have ended, by lifetime: at most 1 s, at most 10 s.
    le_1s: f64,
    le_10s: f64,
    ended: f64,
    /// Requests the daemon answered itself (`backend=""`) with the status
    /// looked for.
    answered: f64,
}

async fn counts(admin: SocketAddr, listener: &str, status: Option<&str>) -> Counts {
    let scrape = common::scrape(admin).await;
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "switchyard_connection_duration_seconds"
                && s.labels.get("listener") == Some(listener)
        })
        .unwrap_or_else(|| panic!("no connection duration histogram for {listener}"));
    let prometheus_parse::Value::Histogram(buckets) = &sample.value else {
        panic!("connection duration is not a histogram: {:?}", sample.value);
    };
    let bucket = |le: f64| {
        buckets
            .iter()
            .find(|b| b.less_than == le)
            .unwrap_or_else(|| panic!("no bucket le={le}"))
            .count
    };
    let answered = status.map_or(0.0, |code| {
        common::sample_value(
            &scrape,
            "switchyard_http_requests_total",
            &[("listener", listener), ("backend", ""), ("code", code)],
        )
        .unwrap_or(0.0)
    });
    Counts {
        le_1s: bucket(1.0),
        le_10s: bucket(10.0),
        ended: buckets.iter().map(|b| b.count).fold(0.0, f64::max),
        answered,
    }
}

/// What slowhttptest's CSV (one row a second) and its output said.
#[derive(Debug)]
struct Report {
    exit_status: String,
    /// Closed and connected in its last row: the connections it made.
    established: u64,
    closed: u64,
    pending_at_end: u64,
    /// Seconds (rows) in which its own probe found the service down.
    unavailable_secs: usize,
    rows: usize,
}

fn read_report(stats: &Path, output: &Path) -> Report {
    let out = std::fs::read_to_string(output).expect("slowhttptest output");
    let out = strip_colour(&out);
    let exit_status = out
        .lines()
        .find_map(|l| l.split_once("Exit status:"))
        .map(|(_, status)| status.trim().to_owned())
        .unwrap_or_else(|| panic!("no exit status in slowhttptest's output:\n{out}"));
    let csv = std::fs::read_to_string(stats.with_extension("csv")).expect("slowhttptest csv");
    // Seconds,Closed,Pending,Connected,Service Available
    let rows: Vec<Vec<u64>> = csv
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("csv row {l:?}")))
                .collect()
        })
        .collect();
    let last = rows.last().expect("slowhttptest csv has rows");
    Report {
        exit_status,
        established: last[1] + last[3],
        closed: last[1],
        pending_at_end: last[2],
        unavailable_secs: rows.iter().filter(|r| r[4] == 0).count(),
        rows: rows.len(),
    }
}

/// `text` without its terminal colour escapes (`ESC [ … m`).
fn strip_colour(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Every check of the run that did not hold, by scenario.
#[derive(Debug, Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, scenario: &str, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.0.push(format!("{scenario}: {}", what()));
        }
    }

    /// No probe failed, none ran out, p99 under the bound.
    fn probe(&mut self, scenario: &str, log: &ProbeLog) -> Latency {
        let lat = latency(log);
        self.check(scenario, log.failures.is_empty(), || {
            format!(
                "{} probes failed, the first: {:?}",
                log.failures.len(),
                &log.failures[..log.failures.len().min(5)]
            )
        });
        self.check(scenario, !log.ran_out, || {
            "the probe loop hit its bound".into()
        });
        self.check(scenario, lat.n > 0 && lat.p99 < P99_BOUND, || {
            format!(
                "probe p99 {:?}, bound {P99_BOUND:?} (p50 {:?}, max {:?}, {} probes)",
                lat.p99, lat.p50, lat.max, lat.n
            )
        });
        lat
    }
}

/// One row of the figures.
struct Row {
    scenario: String,
    connections: String,
    duration: Duration,
    latency: Latency,
    failures: usize,
    cut_by: String,
    /// CPU of the daemon and of this test (backends, probe, flood).
    cpu: String,
    before: Footprint,
    peak: Footprint,
    after: Footprint,
    /// Checks of this scenario that did not hold.
    failed: usize,
}

/// The daemon, its backends and what is measured against.
struct Lab {
    daemon: Daemon,
    admin: SocketAddr,
    toml: String,
    side: Side,
    web: Target,
    bulk: Target,
    baseline: Footprint,
    /// Lines of the daemon's log already counted.
    log_seen: usize,
    checks: Checks,
    _backends: (HttpBackend, BulkBackend),
}

impl Lab {
    fn target(&self, listener: &str) -> Target {
        match listener {
            "web" => self.web,
            "bulk" => self.bulk,
            _ => unreachable!("{listener}"),
        }
    }

    /// The daemon's debug lines about client connections since the last
    /// call, counted by listener and message: drained up to a marker, a
    /// request it cannot parse on `web`, from 127.0.0.2 (which nothing
    /// else uses: slowhttptest's source ports come back soon after the
    /// daemon closed their connections).
    async fn cut_causes(&mut self) -> BTreeMap<String, u64> {
        let mut marker = common::connect_from(self.web.addr, Some(MARKER_SOURCE.into())).await;
        let port = marker.local_addr().unwrap().port();
        marker.write_all(b"\x01\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        within("marker answered", marker.read_to_end(&mut answer))
            .await
            .unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
        let peer = format!("peer={MARKER_SOURCE}:{port}}}");
        block_in_place(|| {
            self.daemon
                .log_until(|l| l.contains(&peer) && l.contains("http connection ended"))
        });
        let end = self.daemon.raw.len() - 1;
        let mut causes = BTreeMap::new();
        for line in &self.daemon.raw[self.log_seen..end] {
            if let Some(cause) = cause_of(line) {
                *causes.entry(cause).or_default() += 1;
            }
        }
        self.log_seen = end + 1;
        causes
    }

    /// One request through each listener, so that each keeps one fresh
    /// idle backend connection and the pool sweeps the others (older than
    /// 4 s).
    async fn refresh(&self) {
        for t in [self.web, self.bulk] {
            within("refresh request", probe_once(t)).await.unwrap();
        }
    }

    /// The daemon at rest: descriptors unchanged and RSS within 2 % over
    /// 2 s, with a request through each listener every 200 ms (measured
    /// before it, so its connection has closed).
    async fn steady(&self) -> Footprint {
        let start = Instant::now();
        let mut window: VecDeque<Footprint> = VecDeque::new();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            window.push_back(footprint(self.daemon.pid));
            if window.len() > 10 {
                window.pop_front();
            }
            let fds_still = window.iter().all(|f| f.fds == window[0].fds);
            let rss = window.iter().map(|f| f.rss_kib);
            let (lo, hi) = (rss.clone().min().unwrap(), rss.max().unwrap());
            if window.len() == 10 && fds_still && (hi - lo) as f64 <= 0.02 * lo as f64 {
                return *window.back().unwrap();
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the daemon did not come to rest: {window:?}"
            );
            self.refresh().await;
        }
    }

    /// Wait (up to `DEADLINE`) until the daemon is back at its baseline:
    /// the same descriptor count, RSS within 10 %. What it was then, and
    /// how long it took.
    async fn settle(&mut self, scenario: &str) -> (Footprint, Duration) {
        let start = Instant::now();
        let base = self.baseline;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let now = footprint(self.daemon.pid);
            let back = now.fds == base.fds && rss_within(now.rss_kib, base.rss_kib);
            if back || start.elapsed() >= DEADLINE {
                self.checks.check(scenario, back, || {
                    format!("not back at the baseline after {DEADLINE:?}: {now:?} against {base:?}")
                });
                return (now, start.elapsed());
            }
            self.refresh().await;
        }
    }

    async fn probe_alone(&mut self) -> Row {
        let what = "baseline (probe alone)";
        let failed_before = self.checks.0.len();
        let before = footprint(self.daemon.pid);
        let mut top = before;
        let probe = Probe::start(&self.side, self.web);
        let start = Instant::now();
        let cpu = Cpu::start(self.daemon.pid);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        while start.elapsed() < BASELINE_FOR {
            tick.tick().await;
            top = peak(top, footprint(self.daemon.pid));
        }
        let cpu = cpu.used();
        let log = probe.finish().await;
        let duration = start.elapsed();
        let latency = self.checks.probe(what, &log);
        let (after, _) = self.settle(what).await;
        Row {
            scenario: what.into(),
            connections: "—".into(),
            duration,
            latency,
            failures: log.failures.len(),
            cut_by: "—".into(),
            cpu,
            before,
            peak: top,
            after,
            failed: self.checks.0.len() - failed_before,
        }
    }

    async fn attack(&mut self, a: &Attack, commands: &mut Vec<String>) -> Row {
        let what = a.name;
        let failed_before = self.checks.0.len();
        let target = self.target(a.listener);
        let pid = self.daemon.pid;
        let dir = tempfile::tempdir().unwrap();
        let stats = dir.path().join("stats");
        let output = dir.path().join("output.txt");
        let args = a.args(&format!("http://{}/", target.addr), &stats);
        commands.push(format!("{SLOWHTTPTEST} {}", args.join(" ")));
        let counts_before = counts(self.admin, a.listener, a.status).await;
        let before = footprint(pid);
        let mut top = before;

        let probe = Probe::start(&self.side, target);
        let out = std::fs::File::create(&output).unwrap();
        let started = Instant::now();
        let cpu = Cpu::start(pid);
        // Killed if this test fails before it ends.
        let mut child = tokio::process::Command::new(SLOWHTTPTEST)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("slowhttptest runs (apt-get install slowhttptest)");
        let limit = Duration::from_secs(a.limit);
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        let mut open_peak = 0;
        let mut cleared: Option<Duration> = None;
        let mut ended: Option<(std::process::ExitStatus, Duration)> = None;
        // Until slowhttptest has ended and the daemon's count is down.
        while ended.is_none() || cleared.is_none() {
            tick.tick().await;
            top = peak(top, footprint(pid));
            let open = open_clients(self.admin, a.listener).await;
            let at = started.elapsed();
            if open > open_peak {
                (open_peak, cleared) = (open, None);
            } else if open <= OPEN_SLACK && open_peak > OPEN_SLACK && cleared.is_none() {
                cleared = Some(at);
            }
            if ended.is_none()
                && let Some(status) = child.try_wait().unwrap()
            {
                ended = Some((status, at));
            }
            assert!(
                at < limit + DEADLINE,
                "{what}: slowhttptest ended: {ended:?}; the daemon's open client connections: \
                 peak {open_peak}, now {open}"
            );
        }
        let cpu = cpu.used();
        let (status, ran) = ended.unwrap();
        let cleared = cleared.unwrap();
        let log = probe.finish().await;
        let causes = self.cut_causes().await;
        let counts_after = counts(self.admin, a.listener, a.status).await;
        let report = read_report(&stats, &output);

        let c = &mut self.checks;
        c.check(what, status.success(), || {
            format!("slowhttptest {status}: {report:?}")
        });
        // Every connection it meant to make was made, and its own probe
        // never found the service down either.
        c.check(
            what,
            report.pending_at_end == 0 && report.established == a.connections,
            || {
                format!(
                    "{} connections, not {}: {report:?}",
                    report.established, a.connections
                )
            },
        );
        c.check(what, report.unavailable_secs == 0, || {
            format!("slowhttptest's probe found the service down: {report:?}")
        });
        // The attack held connections: about rate × bound at once.
        let held = a.connections.min(a.rate * a.bound_secs);
        c.check(what, open_peak >= held / 2, || {
            format!("at most {open_peak} connections open at once, expected about {held}")
        });
        // The daemon cut them, well before slowhttptest would have.
        c.check(what, cleared + CUT_MARGIN <= limit, || {
            format!("the daemon's open connections down only at {cleared:?} of the {limit:?} run")
        });
        let exit = if a.client_sees_close {
            "No open connections left"
        } else {
            "Hit test time limit"
        };
        c.check(what, report.exit_status == exit, || {
            format!(
                "slowhttptest ended with {:?}, not {exit:?}",
                report.exit_status
            )
        });
        if !a.client_sees_close {
            c.check(what, report.closed == 0, || {
                format!("a slow reader saw its connection closed: {report:?}")
            });
        }
        let cut = causes.get(a.cause).copied().unwrap_or(0);
        c.check(what, cut >= a.connections, || {
            format!(
                "{cut} connections cut with {:?}, expected {}; the daemon said {causes:#?}",
                a.cause, a.connections
            )
        });
        let answered = counts_after.answered - counts_before.answered;
        if let Some(code) = a.status {
            c.check(what, answered >= a.connections as f64, || {
                format!(
                    "the daemon answered {answered} × {code}, expected {}",
                    a.connections
                )
            });
        }
        let ended = counts_after.ended - counts_before.ended;
        let over_1s = ended - (counts_after.le_1s - counts_before.le_1s);
        let over_10s = ended - (counts_after.le_10s - counts_before.le_10s);
        c.check(what, over_1s >= a.connections as f64, || {
            format!(
                "only {over_1s} connections lived more than 1 s \
                 ({counts_before:?} → {counts_after:?})"
            )
        });
        c.check(what, over_10s == 0.0, || {
            format!(
                "{over_10s} connections lived more than 10 s \
                 ({counts_before:?} → {counts_after:?})"
            )
        });
        let latency = c.probe(what, &log);
        let (after, settled) = self.settle(what).await;
        println!(
            "{what}: slowhttptest ran {ran:.1?} ({} csv rows, exit: {}); peak {open_peak} open, \
             down to the probes' at {cleared:.1?}; back at the baseline {settled:.1?} later; \
             the daemon's cuts: {causes:?}",
            report.rows, report.exit_status
        );
        let reason = a.cause.split("error=").nth(1).unwrap_or(a.cause);
        let answered = a
            .status
            .map(|code| format!(", {answered} × {code} answered"))
            .unwrap_or_default();
        Row {
            scenario: what.into(),
            connections: format!("{} at {}/s", report.established, a.rate),
            duration: ran,
            latency,
            failures: log.failures.len(),
            cut_by: format!(
                "{}: {cut}/{} ({}){answered}, peak {open_peak} open, all cut by {:.1} s \
                 (limit {} s)",
                a.bound,
                a.connections,
                reason.replace('\'', "’"),
                cleared.as_secs_f64(),
                a.limit
            ),
            cpu,
            before,
            peak: top,
            after,
            failed: self.checks.0.len() - failed_before,
        }
    }

    /// `FLOOD_TASKS` scraping `/metrics` on `admin` for `FLOOD_FOR` while
    /// the probe goes through `web` of the daemon measured.
    async fn admin_flood(&mut self, what: &str, admin: SocketAddr) -> Row {
        let failed_before = self.checks.0.len();
        let pid = self.daemon.pid;
        let before = footprint(pid);
        let mut top = before;
        let tally = Arc::new(Tally::default());
        let probe = Probe::start(&self.side, self.web);
        let start = Instant::now();
        let until = start + FLOOD_FOR;
        let cpu = Cpu::start(pid);
        let workers: Vec<JoinHandle<()>> = (0..FLOOD_TASKS)
            .map(|_| tokio::spawn(flood_worker(admin, until, tally.clone())))
            .collect();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        while !workers.iter().all(|w| w.is_finished()) {
            tick.tick().await;
            top = peak(top, footprint(pid));
            assert!(
                start.elapsed() < FLOOD_FOR + DEADLINE,
                "{what}: flood tasks did not stop"
            );
        }
        for w in workers {
            w.await.unwrap();
        }
        let duration = start.elapsed();
        let cpu = cpu.used();
        let log = probe.finish().await;
        let ok = tally.ok.load(Ordering::SeqCst);
        let busy = tally.busy.load(Ordering::SeqCst);
        let other = tally.other.lock().unwrap().clone();
        let errors = tally.errors.lock().unwrap().clone();
        println!(
            "{what}: {FLOOD_TASKS} tasks for {duration:.1?}: {ok} × 200, {busy} × 503, \
             other statuses {other:?}, no answer {errors:?}; CPU daemon / test {cpu}"
        );
        let c = &mut self.checks;
        c.check(what, other.is_empty(), || format!("statuses {other:?}"));
        c.check(what, ok > 0, || "no scrape served".into());
        c.check(what, busy > 0, || {
            "the 64-connection cap was never reached".into()
        });
        let latency = c.probe(what, &log);
        let (after, _) = self.settle(what).await;
        let unanswered: u64 = errors.values().sum();
        Row {
            scenario: what.into(),
            connections: format!("{} admin requests", ok + busy + unanswered),
            duration,
            latency,
            failures: log.failures.len(),
            cut_by: format!(
                "cap 64: {ok} × 200, {busy} × 503, {unanswered} closed unanswered \
                 ({:.0} scrapes/s)",
                ok as f64 / duration.as_secs_f64()
            ),
            cpu,
            before,
            peak: top,
            after,
            failed: self.checks.0.len() - failed_before,
        }
    }
}

/// What a daemon debug line about a client connection says, with the
/// listener of its span: `web: http connection ended with error error=…`.
fn cause_of(line: &str) -> Option<String> {
    if !line.contains(" DEBUG ") {
        return None;
    }
    let listener = line
        .split(['{', ' ', '}'])
        .find_map(|w| w.strip_prefix("listener="))?;
    let (_, rest) = line.split_once(" switchyard::proxy::")?;
    let (_, what) = rest.split_once(": ")?;
    Some(format!("{listener}: {what}"))
}

#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    busy: AtomicU64,
    other: Mutex<BTreeMap<u16, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

/// Scrape `/metrics` on fresh connections, back to back, until `until`.
async fn flood_worker(admin: SocketAddr, until: Instant, tally: Arc<Tally>) {
    while Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(5), scrape_once(admin)).await {
            Ok(Ok(200)) => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(503)) => {
                tally.busy.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Ok(code)) => *tally.other.lock().unwrap().entry(code).or_default() += 1,
            Ok(Err(e)) => *tally.errors.lock().unwrap().entry(e).or_default() += 1,
            Err(_) => {
                *tally
                    .errors
                    .lock()
                    .unwrap()
                    .entry("no answer within 5 s".into())
                    .or_default() += 1
            }
        }
    }
}

/// An error with its sources: hyper's own message names only its kind.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        write!(text, ": {s}").unwrap();
        source = s.source();
    }
    text
}

async fn scrape_once(admin: SocketAddr) -> Result<u16, String> {
    let stream = TcpStream::connect(admin)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {}", chain(&e)))?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {}", chain(&e)))?;
    let status = resp.status().as_u16();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {}", chain(&e)))?;
    Ok(status)
}

/// The kernel's largest TCP send buffer (`net.ipv4.tcp_wmem`'s maximum).
fn tcp_wmem_max() -> usize {
    let v = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").expect("tcp_wmem");
    v.split_whitespace()
        .nth(2)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("tcp_wmem: {v:?}"))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| scenario | connections | duration | probes | p50 ms | p99 ms | max ms | failures \
         | slow conns cut by | CPU daemon / test | RSS KiB before / peak / after \
         | fds before / peak / after | checks |\n\
         | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | --- |\n",
    );
    for r in rows {
        let verdict = match r.failed {
            0 => "ok".to_owned(),
            n => format!("**{n} failed**"),
        };
        writeln!(
            t,
            "| {} | {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} | {} / {} / {} \
             | {} / {} / {} | {verdict} |",
            r.scenario,
            r.connections,
            r.duration.as_secs_f64(),
            r.latency.n,
            ms(r.latency.p50),
            ms(r.latency.p99),
            ms(r.latency.max),
            r.failures,
            r.cut_by,
            r.cpu,
            r.before.rss_kib,
            r.peak.rss_kib,
            r.after.rss_kib,
            r.before.fds,
            r.peak.fds,
            r.after.fds,
        )
        .unwrap();
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_normal_clients_served_throughout() {
    assert!(
        Path::new(SLOWHTTPTEST).exists(),
        "{SLOWHTTPTEST} is missing (apt-get install slowhttptest)"
    );
    let run_start = Instant::now();
    let side = Side::start();
    let bulk_size = tcp_wmem_max() + BULK_MARGIN;
    let web_backend = side.handle.spawn(HttpBackend::start("web1")).await.unwrap();
    let bulk_backend = side
        .handle
        .spawn(BulkBackend::start(bulk_size))
        .await
        .unwrap();
    let http = format!(
        "mode = \"http\"\nheader_timeout = \"{HEADER_TIMEOUT_SECS}s\"\n\
         body_timeout = \"{BODY_TIMEOUT_SECS}s\""
    );
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}{}",
        listener_toml("roundrobin", &http, &[b("web1", web_backend.addr)])
            .replace("name = \"l\"", "name = \"web\""),
        listener_toml("roundrobin", &http, &[b("bulk1", bulk_backend.addr)])
            .replace("name = \"l\"", "name = \"bulk\""),
    );
    // Debug lines of the proxy: one for each connection cut, and why.
    let daemon = Daemon::start_env(&toml, &[], &[("RUST_LOG", "info,switchyard::proxy=debug")]);
    let admin = daemon.admin.expect("admin address logged");
    let web = Target {
        addr: daemon.addr("web"),
        path: "/probe",
        backend: "web1",
        body: b"",
    };
    let bulk = Target {
        addr: daemon.addr("bulk"),
        path: "/probe",
        backend: "bulk1",
        body: b"ok\n",
    };
    let mut lab = Lab {
        daemon,
        admin,
        toml,
        side,
        web,
        bulk,
        baseline: Footprint { rss_kib: 0, fds: 0 },
        log_seen: 0,
        checks: Checks::default(),
        _backends: (web_backend, bulk_backend),
    };

    // Warm-up: every path once or more, then the baseline at rest.
    for _ in 0..20 {
        lab.refresh().await;
    }
    for (t, answer) in [(web, "warm body"), (bulk, "got 9 bytes")] {
        let (code, body) = common::http(t.addr, "POST", "/post", &[], "warm body").await;
        assert_eq!((code, body.as_str()), (200, answer));
    }
    let (code, body) = common::http(bulk.addr, "GET", "/", &[], "").await;
    assert_eq!((code, body.len()), (200, bulk_size));
    open_clients(admin, "web").await;
    counts(admin, "web", None).await;
    let warm = lab.cut_causes().await;
    assert!(
        warm.is_empty(),
        "warm-up traffic made the daemon log {warm:?}"
    );
    lab.baseline = lab.steady().await;
    println!(
        "baseline: RSS {} KiB, {} fds; large response {bulk_size} bytes",
        lab.baseline.rss_kib, lab.baseline.fds
    );

    let mut rows = vec![lab.probe_alone().await];
    let mut commands = Vec::new();
    for a in attacks() {
        rows.push(lab.attack(&a, &mut commands).await);
    }
    // The control: the same flood on another daemon's admin endpoint.
    let other = Daemon::start(&lab.toml);
    let other_admin = other.admin.expect("admin address logged");
    rows.push(
        lab.admin_flood("admin flood on another daemon (control)", other_admin)
            .await,
    );
    drop(other);
    rows.push(
        lab.admin_flood(
            &format!("admin flood ({FLOOD_TASKS} tasks GET /metrics)"),
            admin,
        )
        .await,
    );

    let elapsed = run_start.elapsed();
    let table = table(&rows);
    let mut md = format!(
        "Slow clients (`cargo test --test slow_clients`): debug build, loopback, \
         header_timeout = body_timeout = 2 s, probe GET on a fresh connection every \
         {} ms; CPU in % of one core; the large response {bulk_size} bytes \
         (tcp_wmem's maximum and 2 MiB); baseline RSS {} KiB, {} fds; run time {:.1} s.\n\n\
         {table}\nslowhttptest command lines:\n\n",
        PROBE_EVERY.as_millis(),
        lab.baseline.rss_kib,
        lab.baseline.fds,
        elapsed.as_secs_f64()
    );
    for c in &commands {
        writeln!(md, "    {c}").unwrap();
    }
    if !lab.checks.0.is_empty() {
        writeln!(md, "\nFailed checks:\n").unwrap();
        for f in &lab.checks.0 {
            writeln!(md, "- {f}").unwrap();
        }
    }
    println!("\n{md}");
    std::fs::write(FIGURES, &md).unwrap();
    assert!(
        lab.checks.0.is_empty(),
        "{} checks failed:\n{}",
        lab.checks.0.len(),
        lab.checks.0.join("\n")
    );
}
