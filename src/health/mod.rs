//! Health checks: one probe task per backend, a [`Probe`] kind behind one
//! interface, and the rise/fall machine ([`hysteresis`]) that turns results
//! into up/down.
//!
//! Each backend has its own probe task on its own schedule, so a slow or
//! hanging backend (bounded by `timeout`, which validation keeps at or below
//! `interval`) never delays another's probes. First probes are spread over
//! the start of the first interval so a large pool does not probe in one
//! burst. The task keeps its hysteresis for its whole life; a reload that
//! changes the listener's check settings hands them to the running task
//! ([`ProbeHandle::update`]), so counters and verdicts carry over. A flip is
//! logged and reported to the listener's backend-set owner, which records it
//! in the backend's live state, cuts connections if so configured, and
//! rebuilds the pool.
//!
//! A new probe kind is one file here with a type that implements [`Probe`],
//! plus its arm in [`probe_for`] and its config fields. Kinds: [`tcp`],
//! [`http`], [`postgres`], [`mysql`], [`redis`]; `none` runs no probe at
//! all (the backend-set owner starts none).
//!
//! With `role = "primary"` or `"replica"`, a server that answers with the
//! other role fails its check like a dead one, so fall/rise apply and a
//! listener follows a promotion within `interval × fall`.

pub mod http;
pub mod hysteresis;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod report;
pub mod tcp;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{CheckKind, HealthCheck, Role};
use crate::metrics::CheckMetrics;
use crate::ticks::schedule;
pub use hysteresis::{Flip, Hysteresis};
pub use report::HealthReport;

/// The future of one check.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome, Failure>> + Send + 'a>>;

/// What a successful check learnt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The server's role, for kinds that read one (`Primary` or
    /// `Replica`; never `Any`).
    pub role: Option<Role>,
}

/// One kind of health check (`tcp`, …): what a single check of a backend
/// does and what counts as success.
pub trait Probe: Send + Sync + fmt::Debug {
    /// Check the server at `addr` once. The probe task bounds the whole
    /// exchange by the listener's `timeout`; a kind need not time itself.
    fn check(&self, addr: SocketAddr) -> ProbeFuture<'_>;
}

/// Why a check failed, in one line (the server's own words where it gave
/// any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

/// The longest server text kept in a check's reason: the status page and
/// the "backend down" log line show it on one line.
pub const MAX_REASON: usize = 300;

impl Failure {
    /// A socket error: the short name of its kind where it has one
    /// ("connection refused"), else the error's own text.
    pub fn io(e: &std::io::Error) -> Failure {
        use std::io::ErrorKind::*;
        match e.kind() {
            kind @ (ConnectionRefused | ConnectionReset | ConnectionAborted | TimedOut
            | HostUnreachable | NetworkUnreachable | AddrNotAvailable) => Failure(kind.to_string()),
            _ => Failure(e.to_string()),
        }
    }

    /// A failure in the server's own words, made fit for one line: control
    /// characters become spaces, and past [`MAX_REASON`] characters an
    /// ellipsis marks the cut (a server's error text is not ours to trust).
    pub fn server(text: &str) -> Failure {
        Failure(one_line(text, MAX_REASON))
    }
}

/// `text` on one line (control characters as spaces), at most `max`
/// characters, an ellipsis marking a cut.
pub fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The probe kind a listener's settings ask for; `None` for `kind =
/// "none"`.
pub fn probe_for(settings: &HealthCheck) -> Option<Arc<dyn Probe>> {
    Some(match settings.kind {
        CheckKind::Tcp => Arc::new(tcp::TcpProbe),
        CheckKind::Http => Arc::new(http::HttpProbe::new(settings)),
        CheckKind::Postgres => Arc::new(postgres::PostgresProbe::new(settings)),
        CheckKind::Mysql => Arc::new(mysql::MysqlProbe::new(settings)),
        CheckKind::Redis => Arc::new(redis::RedisProbe::new(settings)),
        CheckKind::None => return None,
    })
}

/// A check's verdict once the wanted role is taken into account: a server
/// with the other role fails like a dead one.
pub fn judge(result: Result<Outcome, Failure>, wanted: Role) -> Result<Outcome, Failure> {
    let outcome = result?;
    match (wanted, outcome.role) {
        (Role::Any, _) => Ok(outcome),
        (want, Some(seen)) if seen == want => Ok(outcome),
        (_, Some(seen)) => Err(Failure(format!("role is {}", seen.as_str()))),
        (_, None) => Err(Failure("role unknown".into())),
    }
}

/// The settings a config file with these `[listener.health_check]` lines
/// gives, `password` read from a `password_file` as the daemon reads it.
#[cfg(test)]
pub(crate) fn settings_from(lines: &str, password: Option<&str>) -> HealthCheck {
    let dir = tempfile::tempdir().unwrap();
    let mut check = lines.to_owned();
    if let Some(password) = password {
        let file = dir.path().join("password");
        std::fs::write(&file, format!("{password}\n")).unwrap();
        check += &format!("\npassword_file = \"{}\"\n", file.display());
    }
    let toml = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\n\
         [listener.health_check]\n{check}\n\
         [[listener.backend]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\n"
    );
    let config = crate::config::load_str(&toml, std::path::Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    config.listeners[0].health_check.clone()
}

/// What a probe task checks, and names in its log lines.
#[derive(Debug, Clone)]
pub struct Target {
    pub listener: Arc<str>,
    pub backend: Arc<str>,
    /// The backend's address; `port` in the settings may replace its port.
    pub addr: SocketAddr,
    /// Where the task records each check for the status API.
    pub report: Arc<HealthReport>,
    /// The verdict carried from the process this one took over from (live
    /// upgrade): probing goes on from it, so a backend that was down
    /// stays down until `rise` checks pass. `None`: judged afresh.
    pub carried: Option<bool>,
}

/// A running probe task; stopped when dropped.
#[derive(Debug)]
pub struct ProbeHandle {
    settings: watch::Sender<HealthCheck>,
    task: JoinHandle<()>,
}

impl ProbeHandle {
    /// Hand the task new settings (a reload); it keeps its counters.
    pub fn update(&self, settings: HealthCheck) {
        self.settings.send_if_modified(|current| {
            let changed = *current != settings;
            *current = settings;
            changed
        });
    }
}

impl Drop for ProbeHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start probing `target` after `first_delay`, then every `interval`;
/// `report` is called on every flip.
pub fn spawn(
    target: Target,
    settings: HealthCheck,
    first_delay: Duration,
    metrics: Arc<CheckMetrics>,
    report: impl Fn(Flip) + Send + 'static,
) -> ProbeHandle {
    let (tx, rx) = watch::channel(settings);
    let task = tokio::spawn(run(target, rx, first_delay, metrics, report));
    ProbeHandle { settings: tx, task }
}

async fn run(
    target: Target,
    mut settings: watch::Receiver<HealthCheck>,
    first_delay: Duration,
    metrics: Arc<CheckMetrics>,
    report: impl Fn(Flip),
) {
    let mut current = settings.borrow_and_update().clone();
    let mut probe = probe_for(&current);
    let mut hysteresis = target
        .carried
        .map_or_else(Hysteresis::default, Hysteresis::carried);
    let mut ticks = schedule(Instant::now() + first_delay, current.interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = settings.changed() => {
                if changed.is_err() {
                    return; // the owner is gone
                }
                let next = settings.borrow_and_update().clone();
                if next.interval != current.interval {
                    ticks = schedule(Instant::now() + next.interval, next.interval);
                }
                current = next;
                probe = probe_for(&current);
                continue;
            }
        }
        let Some(kind) = &probe else {
            continue; // kind = "none": the owner stops such a task
        };
        let addr = SocketAddr::new(target.addr.ip(), current.port.unwrap_or(target.addr.port()));
        let started = Instant::now();
        let checked = match tokio::time::timeout(current.timeout, kind.check(addr)).await {
            Ok(result) => result,
            Err(_) => Err(Failure("timeout".into())),
        };
        let seen = checked.as_ref().ok().and_then(|o| o.role);
        let result = judge(checked, current.role);
        metrics.record(result.is_ok(), started.elapsed());
        target
            .report
            .record(result.as_ref().err().map(|f| f.0.as_str()), seen);
        let Some(flip) = hysteresis.observe(result.is_ok(), current.rise, current.fall) else {
            continue;
        };
        let streak = hysteresis.streak();
        match (flip, &result) {
            (Flip::Down, Err(reason)) => {
                warn!(listener = %target.listener, backend = %target.backend, address = %target.addr, %reason, failures = streak, "backend down");
            }
            _ => {
                info!(listener = %target.listener, backend = %target.backend, address = %target.addr, successes = streak, "backend up");
            }
        }
        report(flip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn socket_errors_read_as_their_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::io(&refused).to_string(), "connection refused");
        let other = std::io::Error::other("boom");
        assert_eq!(Failure::io(&other).to_string(), "boom");
    }

    #[test]
    fn a_server_of_the_other_role_fails_like_a_dead_one() {
        let seen = |role| Ok(Outcome { role: Some(role) });
        assert!(judge(seen(Role::Replica), Role::Any).is_ok());
        assert!(judge(seen(Role::Primary), Role::Primary).is_ok());
        assert_eq!(
            judge(seen(Role::Replica), Role::Primary),
            Err(Failure("role is replica".into()))
        );
        assert_eq!(
            judge(seen(Role::Primary), Role::Replica),
            Err(Failure("role is primary".into()))
        );
        assert_eq!(
            judge(Ok(Outcome::default()), Role::Primary),
            Err(Failure("role unknown".into()))
        );
        let down = Err(Failure("connection refused".into()));
        assert_eq!(judge(down.clone(), Role::Primary), down);
    }

    #[test]
    fn server_words_are_kept_on_one_bounded_line() {
        assert_eq!(
            Failure::server(" ERR bad\r\nthing\t ").to_string(),
            "ERR bad  thing"
        );
        let long = "é".repeat(MAX_REASON + 5);
        let cut = Failure::server(&long).0;
        assert_eq!(cut, format!("{}…", "é".repeat(MAX_REASON)));
    }

    fn settings(interval_ms: u64) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(interval_ms.min(1000)),
            fall: 3,
            rise: 2,
            ..HealthCheck::default()
        }
    }

    async fn until(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(600), "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The probe loop with tokio's clock paused: a healthy backend that
    /// stops accepting is reported down on exactly the `fall`th failure,
    /// once.
    #[tokio::test(start_paused = true)]
    async fn probe_loop_reports_down_on_the_fall_th_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(CheckMetrics::detached());
        let flips = Arc::new(Mutex::new(Vec::new()));
        let f = flips.clone();
        let target = Target {
            listener: "l".into(),
            backend: "b".into(),
            addr,
            report: Arc::default(),
            carried: None,
        };
        let handle = spawn(
            target,
            settings(2000),
            Duration::ZERO,
            metrics.clone(),
            move |flip| f.lock().unwrap().push(flip),
        );
        until("first success", || metrics.ok.get() >= 1).await;
        drop(listener); // refuses from now on
        until("two failures", || metrics.failed.get() >= 2).await;
        assert!(
            flips.lock().unwrap().is_empty(),
            "still up after 2 failures"
        );
        until("three failures", || metrics.failed.get() >= 3).await;
        assert_eq!(*flips.lock().unwrap(), [Flip::Down]);
        drop(handle);
    }

    /// New settings reach the running task: a shorter interval takes
    /// effect at once, without a restart (the counters carry on).
    #[tokio::test(start_paused = true)]
    async fn new_settings_reach_the_running_task() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = Target {
            listener: "l".into(),
            backend: "b".into(),
            addr: listener.local_addr().unwrap(),
            report: Arc::default(),
            carried: None,
        };
        let metrics = Arc::new(CheckMetrics::detached());
        let handle = spawn(
            target,
            settings(3_600_000),
            Duration::ZERO,
            metrics.clone(),
            |_| {},
        );
        until("first probe", || metrics.ok.get() == 1).await;
        handle.update(settings(100));
        until("probes at the new interval", || metrics.ok.get() >= 5).await;
        assert_eq!(metrics.failed.get(), 0);
    }
}
