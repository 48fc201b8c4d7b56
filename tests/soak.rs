//! Chaos soak: the real daemon with three listeners — tcp mode (leastconn)
//! over echo backends, HTTP mode (round robin) over echoing HTTP backends,
//! and tcp mode with `kind = "redis"` checks and `on_marked_down =
//! "shutdown"` over two real redis-server processes — under client load
//! while backends are SIGKILLed and revived (Redis servers also frozen
//! with SIGSTOP and thawed), the config is reloaded with backends added,
//! removed, reweighted (and now and then an invalid file), and backends are
//! drained, put in maintenance and made ready through the admin API.
//!
//! Invariants, checked and printed in a table at the end:
//! - zero lost connections: every client connection (HTTP: request)
//!   succeeded unless the backend it was on died (or froze) while it was
//!   open, which the chaos log shows; the chaos never leaves a listener
//!   without a backend that is alive and in rotation;
//! - every HTTP response is whole: a body that ends cleanly is exactly the
//!   echo of what was sent; one cut short must end in an error (and be
//!   excused as above);
//! - RSS and descriptor count of the daemon back within 10 % of the
//!   baseline taken after the warm-up (same config, all backends up, no
//!   client connection open), measured the same way at the end;
//! - no error-level log line except one "reload failed" per invalid file.
//!
//! Harness-less (`harness = false`): this is its own `main`, and also the
//! backend processes (`SOAK_ROLE`, see `soak/procs.rs`). Runs for
//! `SWITCHYARD_SOAK_SECS` seconds of chaos (default 60, as in CI) after a
//! warm-up; `SWITCHYARD_SOAK_SEED` repeats a run's choices (the seed is
//! printed). `benches/soak.sh` runs it for longer.

#[path = "soak/chaos.rs"]
mod chaos;
mod common;
#[path = "soak/load.rs"]
mod load;
#[path = "soak/procs.rs"]
mod procs;
#[path = "soak/rng.rs"]
mod rng;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use load::{SLOW, Slow};

use chaos::{Chaos, Outage, Tally};
use load::{Failure, LISTENERS, Load, REDIS, Stats};
use rng::Rng;
use tokio::time::Instant;

/// Seconds of chaos under `cargo test`.
const DEFAULT_SECS: u64 = 60;

/// How far RSS and the descriptor count may be from the baseline.
const TOLERANCE: f64 = 0.10;

/// How long the daemon gets, after the load stopped and the start state is
/// back, to return to its baseline: jemalloc's background thread gives
/// freed pages back within about a second (`dirty_decay_ms:1000`), idle
/// backend keep-alive connections are dropped after 4 s. Generous, for a
/// loaded CI machine; the time it took is printed.
const SETTLE: Duration = Duration::from_secs(60);

fn main() {
    if let Ok(role) = std::env::var(procs::ROLE) {
        procs::serve(&role);
    }
    // The libtest arguments that matter for one test named "soak".
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("soak: test");
        return;
    }
    let filtered = args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .any(|f| !"soak".contains(f.as_str()));
    if filtered || args.iter().any(|a| a == "--ignored") {
        println!("soak: filtered out");
        return;
    }
    let secs = std::env::var("SWITCHYARD_SOAK_SECS")
        .map(|s| s.parse().expect("SWITCHYARD_SOAK_SECS: seconds"))
        .unwrap_or(DEFAULT_SECS);
    let seed = std::env::var("SWITCHYARD_SOAK_SEED")
        .map(|s| s.parse().expect("SWITCHYARD_SOAK_SEED: a number"))
        .unwrap_or_else(|_| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            now.as_nanos() as u64 ^ u64::from(std::process::id())
        });
    println!("soak: {secs} s of chaos, seed {seed} (SWITCHYARD_SOAK_SEED={seed} repeats it)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(secs, seed));
    print!("{}", report.table());
    let failed = report.failed_invariants();
    assert!(
        failed.is_empty(),
        "soak failed (seed {seed}): {}",
        failed.join("; ")
    );
    println!("soak: ok");
}

async fn run(secs: u64, seed: u64) -> Report {
    let clocks = (SystemTime::now(), Instant::now());
    let mut rng = Rng::new(seed);
    let backend_ports = procs::pick_ports(chaos::PORTS, &mut rng);
    let mut chaos = Chaos::start(&backend_ports, rng.fork()).await;
    let pid = chaos.daemon.pid;
    let targets = chaos.targets();
    let stats = Arc::new(Stats::default());

    // Warm-up: load and one of each event, then the baseline in the start
    // state with no client connection open.
    let began = Instant::now();
    let load = Load::start(&targets, &stats, &mut rng);
    load.allow((secs * 50).clamp(3_000, 30_000));
    chaos.warm_up().await;
    load.made().await;
    load.stop().await;
    chaos.restore().await;
    let ports = chaos.ports();
    let (web, admin) = (chaos.daemon.addr("web"), chaos.admin);
    one_idle_per_backend(pid, &ports, web, admin).await;
    chaos.wait_idle().await;
    let (baseline, steady_baseline) = steady(pid, &ports, Instant::now() + SETTLE).await;
    let warmed = began.elapsed();

    // Chaos.
    let load = Load::start(&targets, &stats, &mut rng);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut pace = rng.fork();
    while Instant::now() < end {
        // An event while the next 20–150 client connections are made.
        load.allow(pace.range(20, 150));
        chaos.step().await;
        load.made().await;
    }
    load.stop().await;

    // Back to the start state; the daemon must come back to its baseline.
    chaos.restore().await;
    one_idle_per_backend(pid, &ports, web, admin).await;
    chaos.wait_idle().await;
    let (after, settled) = settle(pid, &ports, &baseline).await;
    let metrics = common::scrape(chaos.admin).await;
    let exit = chaos.stop_daemon();

    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        metrics
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => {
                    v as u64
                }
                _ => 0,
            })
            .sum()
    };
    let per_listener = |name: &str, extra: &[(&str, &str)]| -> [u64; 3] {
        LISTENERS.map(|l| {
            let mut labels = vec![("listener", l)];
            labels.extend_from_slice(extra);
            counter(name, &labels)
        })
    };
    Report {
        secs,
        seed,
        warmed,
        began,
        stats: Arc::into_inner(stats).expect("workers are done"),
        outages: std::mem::take(&mut chaos.outages),
        tally: chaos.tally.clone(),
        baseline,
        steady_baseline,
        after,
        settled,
        reloads_ok: counter("switchyard_config_reloads_total", &[("result", "success")]),
        reloads_failed: counter("switchyard_config_reloads_total", &[("result", "failure")]),
        no_backend: per_listener(
            "switchyard_rejected_connections_total",
            &[("reason", "no_backend")],
        ),
        connect_errors: per_listener("switchyard_backend_connect_errors_total", &[]),
        downs: mark_downs(&chaos.daemon.raw, clocks),
        memberships: std::mem::take(&mut chaos.memberships),
        journal: std::mem::take(&mut chaos.journal),
        log: chaos.daemon.raw.clone(),
        exit,
    }
}

/// The daemon's memory and descriptors at one moment.
#[derive(Debug, Clone, Default)]
struct Footprint {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    fds: u64,
    threads: u64,
    /// Descriptors by what they are (sockets by their peer's role).
    kinds: BTreeMap<String, u64>,
}

/// TCP socket inode → (local port, remote port, listening), from the
/// daemon's view of /proc/net/tcp.
fn tcp_sockets(pid: u32) -> HashMap<u64, (u16, u16, bool)> {
    let mut sockets = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| {
                let hex = addr.rsplit(':').next().unwrap_or("0");
                u16::from_str_radix(hex, 16).unwrap_or(0)
            };
            if let (Some(l), Some(r), Some(st), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(9))
                && let Ok(inode) = inode.parse()
            {
                sockets.insert(inode, (port(l), port(r), *st == "0A"));
            }
        }
    }
    sockets
}

fn footprint(pid: u32, ports: &HashMap<u16, String>) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("daemon status");
    let field = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    let tcp = tcp_sockets(pid);
    let mut kinds = BTreeMap::new();
    let mut fds = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("daemon fds") {
        let Ok(target) = fd.and_then(|fd| std::fs::read_link(fd.path())) else {
            continue; // closed meanwhile
        };
        fds += 1;
        let target = target.to_string_lossy().into_owned();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        let kind = match inode.map(|i| tcp.get(&i)) {
            Some(Some((_, _, true))) => "listening".to_owned(),
            Some(Some((local, remote, false))) => ports
                .get(remote)
                .or_else(|| ports.get(local))
                .cloned()
                .unwrap_or_else(|| "tcp, other".into()),
            Some(None) => "socket, not tcp".into(),
            None if target.starts_with("pipe:") => "pipe".into(),
            None => target,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    Footprint {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        fds,
        threads: field("Threads:"),
        kinds,
    }
}

/// Samples in a steady window: 2 s.
const STEADY_SAMPLES: usize = 20;

/// The daemon at rest: the median sample of the first 2-second window in
/// which its heap (anonymous RSS) moved by at most 2 % — memory freed a
/// moment ago is still being handed back before that — or of the last
/// window at `deadline`. Whether it was steady.
async fn steady(pid: u32, ports: &HashMap<u16, String>, deadline: Instant) -> (Footprint, bool) {
    let mut window: std::collections::VecDeque<Footprint> = Default::default();
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        poll.tick().await;
        window.push_back(footprint(pid, ports));
        if window.len() > STEADY_SAMPLES {
            window.pop_front();
        }
        let anon = window.iter().map(|f| f.anon_kib);
        let (lo, hi) = (anon.clone().min().unwrap(), anon.max().unwrap());
        let steady = window.len() == STEADY_SAMPLES && (hi - lo) as f64 <= 0.02 * lo as f64;
        if steady || Instant::now() >= deadline {
            let mut sorted: Vec<&Footprint> = window.iter().collect();
            sorted.sort_by_key(|f| (f.rss_kib, f.fds));
            return (sorted[sorted.len() / 2].clone(), steady);
        }
    }
}

/// The web listener's idle keep-alive connections to its backends are
/// closed only when a later request's check-in sweeps them (once older
/// than 4 s), so at rest the pool holds whatever the last seconds of
/// traffic left, up to 64 per backend. Both measures are taken with the
/// pool in one state — one idle connection per backend in rotation —
/// reached with a request every half second (each keeps its backend's
/// connection fresh; the sweeps close the others).
async fn one_idle_per_backend(
    pid: u32,
    ports: &HashMap<u16, String>,
    web: SocketAddr,
    admin: SocketAddr,
) {
    let start = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    loop {
        poll.tick().await;
        let (code, body) = common::http(web, "GET", "/settle", &[], "").await;
        assert_eq!(code, 200, "{body}");
        let st = common::status_backends(admin, "web").await;
        let in_rotation: Vec<&String> = st
            .iter()
            .filter(|(_, b)| b["in_rotation"] == true)
            .map(|(n, _)| n)
            .collect();
        let f = footprint(pid, ports);
        let pooled: u64 = f
            .kinds
            .iter()
            .filter(|(k, _)| k.starts_with("backend w"))
            .map(|(_, n)| n)
            .sum();
        let one_each = in_rotation
            .iter()
            .all(|n| f.kinds.get(&format!("backend {n}")) == Some(&1));
        if one_each && pooled == in_rotation.len() as u64 {
            return;
        }
        assert!(
            start.elapsed() < SETTLE,
            "the web pool did not come to one idle connection per backend: {:?}",
            f.kinds
        );
    }
}

fn within(now: u64, base: u64) -> bool {
    (now as f64 - base as f64).abs() <= TOLERANCE * base as f64
}

fn change(now: u64, base: u64) -> f64 {
    100.0 * (now as f64 - base as f64) / base as f64
}

/// Wait (up to `SETTLE`) until the daemon at rest is within the tolerance
/// of the baseline; the last measure and how long it took.
async fn settle(pid: u32, ports: &HashMap<u16, String>, base: &Footprint) -> (Footprint, Duration) {
    let start = Instant::now();
    loop {
        let (now, _) = steady(pid, ports, start + SETTLE).await;
        let ok = within(now.rss_kib, base.rss_kib) && within(now.fds, base.fds);
        if ok || start.elapsed() >= SETTLE {
            return (now, start.elapsed());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Its backend (which the client learnt) died or froze while it was
    /// open.
    Excused,
    /// The client never learnt its backend, and the daemon closed it just
    /// after marking down a frozen server of the listener — a server that
    /// cannot close anything itself: `on_marked_down = "shutdown"` at work.
    CutAtMarkDown,
    /// The client never learnt its backend, and a backend of the listener
    /// was being killed while it was open (a window of milliseconds: the
    /// connection was in that backend's accept queue or greeting).
    ExcusedUnknown,
    Lost,
}

/// How long after the daemon logged a backend down its client may see a
/// connection that the mark-down cut close (the line is written first;
/// generous for a loaded machine).
const CUT_SLACK: Duration = Duration::from_secs(2);

/// A "backend down" line of the daemon's log.
struct MarkDown {
    listener: String,
    backend: String,
    /// On this process's monotonic clock.
    at: Instant,
}

fn field(line: &str, key: &str) -> Option<String> {
    let key = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key.as_str()).map(str::to_owned))
}

/// The daemon's "backend down" lines; their wall-clock times are put on
/// the monotonic clock by one reading of both, (`wall`, `mono`).
fn mark_downs(log: &[String], (wall, mono): (SystemTime, Instant)) -> Vec<MarkDown> {
    log.iter()
        .filter(|l| level(l) == "WARN" && message(l) == "backend down")
        .filter_map(|l| {
            let at = humantime::parse_rfc3339(l.split_whitespace().next()?).ok()?;
            let at = match at.duration_since(wall) {
                Ok(after) => mono + after,
                Err(before) => mono - before.duration(),
            };
            Some(MarkDown {
                at,
                listener: field(l, "listener")?,
                backend: field(l, "backend")?,
            })
        })
        .collect()
}

/// Which outage, if any, explains `f`.
fn verdict<'a>(
    f: &Failure,
    outages: &'a [Outage],
    downs: &[MarkDown],
) -> (Verdict, Option<&'a Outage>) {
    if !f.outage_shaped {
        return (Verdict::Lost, None);
    }
    let overlapping = || {
        outages
            .iter()
            .filter(|o| o.overlaps(f.listener, f.start, f.end))
    };
    if let Some(b) = &f.backend {
        return match overlapping().find(|o| o.backend == *b) {
            Some(o) => (Verdict::Excused, Some(o)),
            None => (Verdict::Lost, None),
        };
    }
    if let Some(o) = overlapping().find(|o| !o.frozen) {
        return (Verdict::ExcusedUnknown, Some(o));
    }
    let cut_by = |o: &&Outage| {
        downs.iter().any(|d| {
            d.listener == LISTENERS[f.listener]
                && d.backend == o.backend
                && f.end + Duration::from_millis(50) >= d.at
                && f.end <= d.at + CUT_SLACK
        })
    };
    match overlapping().filter(|o| o.frozen).find(cut_by) {
        Some(o) => (Verdict::CutAtMarkDown, Some(o)),
        None => (Verdict::Lost, None),
    }
}

struct Report {
    secs: u64,
    seed: u64,
    warmed: Duration,
    began: Instant,
    stats: Stats,
    outages: Vec<Outage>,
    tally: Tally,
    baseline: Footprint,
    /// Whether the baseline was taken at rest (else at the deadline).
    steady_baseline: bool,
    after: Footprint,
    settled: Duration,
    reloads_ok: u64,
    reloads_failed: u64,
    no_backend: [u64; 3],
    connect_errors: [u64; 3],
    log: Vec<String>,
    downs: Vec<MarkDown>,
    /// The chaos's events, when they were done.
    journal: Vec<(Instant, String)>,
    memberships: Vec<chaos::Membership>,
    exit: i32,
}

/// A log line's level (the text format: timestamp, then level).
fn level(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// A log line's message: after the target, up to the first field.
fn message(line: &str) -> String {
    let rest = line.split_once(": ").map_or(line, |(_, m)| m);
    rest.split(' ')
        .take_while(|w| !w.contains('='))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The one expected kind of error line: an invalid file refused.
fn expected_error(line: &str) -> bool {
    level(line) == "ERROR" && line.contains("reload failed; the running configuration stays")
}

impl Report {
    /// The daemon's log and the chaos journal, kept for a failed run.
    fn keep_logs(&self) -> String {
        let path = std::env::temp_dir().join(format!("switchyard-soak-{}.log", self.seed));
        let mut text = String::new();
        for (t, what) in &self.journal {
            let t = t.saturating_duration_since(self.began).as_secs_f64();
            let _ = writeln!(text, "chaos t+{t:.3}s: {what}");
        }
        text += "\n--- daemon log\n";
        for l in &self.log {
            text += l;
            text.push('\n');
        }
        match std::fs::write(&path, text) {
            Ok(()) => format!("chaos journal and daemon log: {}", path.display()),
            Err(e) => format!("could not keep the logs at {}: {e}", path.display()),
        }
    }

    /// Redis connections the daemon left open on a server past its
    /// mark-down, which `on_marked_down = "shutdown"` must cut: each failed
    /// or slow one whose own backend — the instance configured when it
    /// started, not one added again later — was marked down while it was
    /// open, and which did not end within `CUT_SLACK` of that.
    fn uncut(&self) -> Vec<String> {
        let failures = self.failures();
        let slow: Vec<Slow> = self.stats.slow.lock().unwrap().clone();
        let records = failures
            .iter()
            .map(|f| (f.listener, f.start, f.end, f.backend.clone(), "failed"))
            .chain(
                slow.iter()
                    .map(|s| (s.listener, s.start, s.end, s.backend.clone(), "succeeded")),
            );
        let at = |i: Instant| i.saturating_duration_since(self.began).as_secs_f64();
        let mut uncut = Vec::new();
        for (_, start, end, backend, how) in records.filter(|r| r.0 == REDIS) {
            // One that never heard from its server was on the frozen one
            // (never both are frozen).
            let backend = backend.or_else(|| {
                let frozen = self.outages.iter();
                let mut frozen = frozen.filter(|o| o.frozen && o.overlaps(REDIS, start, end));
                frozen.next().map(|o| o.backend.clone())
            });
            let Some(b) = backend else { continue };
            let member = self.memberships.iter().find(|m| {
                m.listener == REDIS
                    && m.backend == b
                    && m.from <= start
                    && m.to.is_none_or(|to| start < to)
            });
            let Some(member) = member else { continue };
            let late = self.downs.iter().find(|d| {
                d.listener == LISTENERS[REDIS]
                    && d.backend == b
                    && d.at > start + Duration::from_millis(50)
                    && d.at < end
                    && member.to.is_none_or(|to| d.at < to)
                    && end > d.at + CUT_SLACK
            });
            if let Some(d) = late {
                uncut.push(format!(
                    "redis t+{:.3}..{:.3}s on {b} ({how}): still open {:.3} s after {b} was \
                     marked down at t+{:.3}s",
                    at(start),
                    at(end),
                    (end - d.at).as_secs_f64(),
                    at(d.at)
                ));
            }
        }
        uncut
    }

    fn failures(&self) -> Vec<Failure> {
        self.stats.failures.lock().unwrap().clone()
    }

    /// Error-level lines, and panics (which have no level): the expected
    /// ones and the others.
    fn errors(&self) -> (Vec<&String>, Vec<&String>) {
        self.log
            .iter()
            .filter(|l| level(l) == "ERROR" || l.contains("panicked at"))
            .partition(|l| expected_error(l))
    }

    fn lost(&self) -> Vec<Failure> {
        self.failures()
            .into_iter()
            .filter(|f| verdict(f, &self.outages, &self.downs).0 == Verdict::Lost)
            .collect()
    }

    fn failed_invariants(&self) -> Vec<String> {
        let mut failed = Vec::new();
        let lost = self.lost();
        if !lost.is_empty() {
            failed.push(format!("{} connections lost", lost.len()));
        }
        if self.no_backend.iter().any(|&n| n > 0) {
            failed.push(format!(
                "connections closed for want of a backend (tcp, web, redis): {:?}",
                self.no_backend
            ));
        }
        let uncut = self.uncut();
        if !uncut.is_empty() {
            failed.push(format!(
                "{} redis connections not cut at their server's mark-down",
                uncut.len()
            ));
        }
        let not_whole = self.stats.http_not_whole.load(Relaxed);
        let cut_lost = lost.iter().filter(|f| f.cut_response).count();
        if not_whole > 0 || cut_lost > 0 {
            failed.push(format!(
                "HTTP responses not whole: {not_whole} ended cleanly short or different, \
                 {cut_lost} cut without their backend dying"
            ));
        }
        let (b, a) = (&self.baseline, &self.after);
        if !within(a.rss_kib, b.rss_kib) {
            failed.push(format!(
                "RSS {} KiB vs baseline {} KiB ({:+.1} %)",
                a.rss_kib,
                b.rss_kib,
                change(a.rss_kib, b.rss_kib)
            ));
        }
        if !within(a.fds, b.fds) {
            failed.push(format!("fds {} vs baseline {}", a.fds, b.fds));
        }
        let (expected, unexpected) = self.errors();
        if !unexpected.is_empty() {
            failed.push(format!("{} unexpected error lines", unexpected.len()));
        }
        if expected.len() as u64 != self.tally.invalid_reloads {
            failed.push(format!(
                "{} \"reload failed\" lines for {} invalid files",
                expected.len(),
                self.tally.invalid_reloads
            ));
        }
        let t = &self.tally;
        if self.reloads_ok != 1 + t.reloads || self.reloads_failed != t.invalid_reloads {
            failed.push(format!(
                "reload counters success {} failure {}, expected {} and {}",
                self.reloads_ok,
                self.reloads_failed,
                1 + t.reloads,
                t.invalid_reloads
            ));
        }
        if self.exit != 0 {
            failed.push(format!("the daemon exited {} after SIGTERM", self.exit));
        }
        for (l, c) in LISTENERS.iter().zip(&self.stats.conns) {
            if c.succeeded.load(Relaxed) == 0 {
                failed.push(format!("no connection through {l} succeeded"));
            }
        }
        failed
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let failures = self.failures();
        let judged: Vec<(Verdict, &Failure, Option<&Outage>)> = failures
            .iter()
            .map(|f| {
                let (v, o) = verdict(f, &self.outages, &self.downs);
                (v, f, o)
            })
            .collect();
        let count = |l: usize, v: Verdict| {
            judged
                .iter()
                .filter(|(jv, f, _)| *jv == v && f.listener == l)
                .count() as u64
        };
        let row = |w: &mut String, label: &str, vals: [u64; 3]| {
            let _ = writeln!(
                w,
                "  {label:<28}{:>10}{:>10}{:>10}{:>10}",
                vals[0],
                vals[1],
                vals[2],
                vals.iter().sum::<u64>()
            );
        };
        let s = &self.stats;
        let _ = writeln!(
            w,
            "\n== switchyard chaos soak: {} s of chaos after {:.1} s of warm-up, seed {} ==",
            self.secs,
            self.warmed.as_secs_f64(),
            self.seed
        );
        let _ = writeln!(
            w,
            "  {:<28}{:>10}{:>10}{:>10}{:>10}",
            "client connections", "tcp", "web", "redis", "total"
        );
        row(
            w,
            "attempted",
            [0, 1, 2].map(|l| s.conns[l].attempted.load(Relaxed)),
        );
        row(
            w,
            "succeeded",
            [0, 1, 2].map(|l| s.conns[l].succeeded.load(Relaxed)),
        );
        row(
            w,
            "excused: backend died",
            [0, 1, 2].map(|l| count(l, Verdict::Excused)),
        );
        row(
            w,
            "excused: cut at mark-down",
            [0, 1, 2].map(|l| count(l, Verdict::CutAtMarkDown)),
        );
        row(
            w,
            "excused: backend unknown",
            [0, 1, 2].map(|l| count(l, Verdict::ExcusedUnknown)),
        );
        row(w, "LOST", [0, 1, 2].map(|l| count(l, Verdict::Lost)));
        let slow: Vec<Slow> = self.stats.slow.lock().unwrap().clone();
        row(
            w,
            &format!("succeeded, slower than {SLOW:?}"),
            [0, 1, 2].map(|l| slow.iter().filter(|s| s.listener == l).count() as u64),
        );
        row(w, "no_backend rejections", self.no_backend);
        row(w, "connect errors (see note)", self.connect_errors);
        let _ = writeln!(
            w,
            "  {:<28}the daemon's counters of the backends configured at the end, since \
             each was last added",
            "  note"
        );
        let _ = writeln!(
            w,
            "  {:<28}{} requests; {} responses from a backend, {} whole, {} cut (body \
             ended in an error), {} not whole",
            "http (web)",
            s.http_requests.load(Relaxed),
            s.http_responses.load(Relaxed),
            s.http_whole.load(Relaxed),
            s.http_cut.load(Relaxed),
            s.http_not_whole.load(Relaxed),
        );
        let _ = writeln!(
            w,
            "  {:<28}tcp {:.1} MiB echoed, {} redis commands",
            "traffic",
            s.tcp_bytes.load(Relaxed) as f64 / (1 << 20) as f64,
            s.redis_commands.load(Relaxed),
        );
        let t = &self.tally;
        let kills = [0, 1, 2].map(|l| {
            self.outages
                .iter()
                .filter(|o| o.listener == l && !o.frozen)
                .count()
        });
        let _ = writeln!(
            w,
            "  {:<28}kills {} (tcp {}, web {}, redis {}), redis freezes {}, revivals {}, thaws {}",
            "chaos", t.kills, kills[0], kills[1], kills[2], t.freezes, t.revivals, t.thaws
        );
        let _ = writeln!(
            w,
            "  {:<28}reloads {} (backends added {}, removed {}, reweighted {}), invalid \
             files refused {}",
            "", t.reloads, t.added, t.removed, t.reweighted, t.invalid_reloads
        );
        let _ = writeln!(
            w,
            "  {:<28}drains {}, maints {}, readies {}, /metrics scrapes {}, events skipped \
             (precondition) {}",
            "", t.drains, t.maints, t.readies, t.scrapes, t.skipped
        );
        let cuts: Vec<Duration> = judged
            .iter()
            .filter_map(|(v, f, o)| {
                let cut = matches!(v, Verdict::Excused | Verdict::CutAtMarkDown);
                let o = o.filter(|o| cut && o.frozen)?;
                (f.listener == REDIS).then(|| f.end - f.start.max(o.from))
            })
            .collect();
        let _ = writeln!(
            w,
            "  {:<28}{} redis connections on a frozen server cut, the slowest {:.2} s after \
             the freeze (or its start)",
            "on_marked_down=shutdown",
            cuts.len(),
            cuts.iter().max().copied().unwrap_or_default().as_secs_f64()
        );
        let _ = writeln!(
            w,
            "  {:<28}success {} (1 + {} reloads), failure {} ({} invalid files)",
            "reload counters", self.reloads_ok, t.reloads, self.reloads_failed, t.invalid_reloads
        );
        let (b, a) = (&self.baseline, &self.after);
        let _ = writeln!(
            w,
            "  {:<28}baseline {} KiB (anon {}, file {}), end {} KiB (anon {}, file {}): {:+.1} %",
            "daemon RSS",
            b.rss_kib,
            b.anon_kib,
            b.file_kib,
            a.rss_kib,
            a.anon_kib,
            a.file_kib,
            change(a.rss_kib, b.rss_kib)
        );
        let _ = writeln!(
            w,
            "  {:<28}baseline {}, end {}: {:+.1} %; threads {} / {}; the end at rest {:.1} s \
             after the start state was back",
            "daemon fds",
            b.fds,
            a.fds,
            change(a.fds, b.fds),
            b.threads,
            a.threads,
            self.settled.as_secs_f64()
        );
        let kinds = |f: &Footprint| {
            f.kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(w, "  {:<28}{}", "  baseline fds", kinds(b));
        let _ = writeln!(w, "  {:<28}{}", "  end fds", kinds(a));
        if !self.steady_baseline {
            let _ = writeln!(
                w,
                "  {:<28}the heap was still moving by over 2 %",
                "  baseline not at rest:"
            );
        }
        let (expected, unexpected) = self.errors();
        let _ = writeln!(
            w,
            "  {:<28}{} expected (\"reload failed\", one per invalid file), {} unexpected",
            "error log lines",
            expected.len(),
            unexpected.len()
        );
        let mut warns: BTreeMap<String, usize> = BTreeMap::new();
        for l in self.log.iter().filter(|l| level(l) == "WARN") {
            *warns.entry(message(l)).or_default() += 1;
        }
        let warns: Vec<String> = warns.iter().map(|(m, n)| format!("{m:?} ×{n}")).collect();
        let _ = writeln!(w, "  {:<28}{}", "warn log lines", warns.join(", "));
        let _ = writeln!(w, "  {:<28}{}", "exit after SIGTERM", self.exit);
        let failed = self.failed_invariants();
        let _ = writeln!(w, "  invariants");
        let lost = self.lost();
        let checks = [
            ("zero lost connections", lost.is_empty()),
            (
                "zero no_backend rejections",
                self.no_backend.iter().all(|&n| n == 0),
            ),
            ("marked-down redis cut", self.uncut().is_empty()),
            (
                "every HTTP response whole",
                s.http_not_whole.load(Relaxed) == 0 && !lost.iter().any(|f| f.cut_response),
            ),
            ("RSS within 10 % of baseline", within(a.rss_kib, b.rss_kib)),
            ("fds within 10 % of baseline", within(a.fds, b.fds)),
            (
                "no unexpected error line",
                unexpected.is_empty() && expected.len() as u64 == t.invalid_reloads,
            ),
        ];
        for (what, ok) in checks {
            let _ = writeln!(w, "    {what:<34}{}", if ok { "ok" } else { "FAILED" });
        }
        let _ = writeln!(
            w,
            "    {:<34}{}",
            "all checks",
            if failed.is_empty() { "ok" } else { "FAILED" }
        );
        let at = |i: Instant| i.saturating_duration_since(self.began).as_secs_f64();
        for f in lost.iter().take(30) {
            let _ = writeln!(
                w,
                "  LOST {} t+{:.3}..{:.3}s backend {:?}: {}",
                LISTENERS[f.listener],
                at(f.start),
                at(f.end),
                f.backend,
                f.what
            );
            let near = self.journal.iter().filter(|(t, _)| {
                *t + Duration::from_secs(2) >= f.start && *t <= f.end + Duration::from_secs(1)
            });
            for (t, what) in near {
                let what = what.lines().next().unwrap_or_default();
                let _ = writeln!(w, "      chaos at t+{:.3}s: {what}", at(*t));
            }
        }
        for (label, verdict, n) in [
            ("excused", Verdict::Excused, 5),
            ("cut at mark-down", Verdict::CutAtMarkDown, 5),
            ("excused (unknown backend)", Verdict::ExcusedUnknown, 10),
        ] {
            for (_, f, o) in judged.iter().filter(|(v, ..)| *v == verdict).take(n) {
                let o = o.expect("an outage");
                let _ = writeln!(
                    w,
                    "  {label} {} t+{:.3}..{:.3}s, {} {} at t+{:.3}s: {}",
                    LISTENERS[f.listener],
                    at(f.start),
                    at(f.end),
                    o.backend,
                    if o.frozen { "frozen" } else { "killed" },
                    at(o.from),
                    f.what
                );
            }
        }
        for u in self.uncut().iter().take(20) {
            let _ = writeln!(w, "  NOT CUT {u}");
        }
        for l in unexpected.iter().take(20) {
            let _ = writeln!(w, "  unexpected error line: {l}");
        }
        if !failed.is_empty() {
            let _ = writeln!(w, "  failed: {}", failed.join("; "));
            let _ = writeln!(w, "  {}", self.keep_logs());
        }
        out
    }
}
