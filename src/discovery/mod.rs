//! Discovery: backends that come from a name, kept up to date without a
//! reload.
//!
//! A `discover = "dns"` entry stands for every address its name resolves
//! to. Its *watch* task looks the name up every `dns_interval` (on a fixed
//! schedule, whatever the last lookup did, each bounded by a timeout no
//! longer than the interval, so never more than one lookup of a name is in
//! flight) and tells the listener's backend-set owner whenever the set of
//! addresses it believes in changes. The owner turns each address into a
//! backend named `<entry>@<ip>:<port>` ([`member`]) and treats the set like
//! a reload's backend list: new addresses join and are probed at once,
//! vanished ones leave like removed backends (open connections run on),
//! kept ones keep their health, admin state and counters.
//!
//! What to believe is [`Belief`]'s one decision: a failed lookup
//! (timeout, SERVFAIL, REFUSED, no server) changes nothing; an answer with
//! addresses replaces the set; an answer with none (NXDOMAIN, no records)
//! empties it only once such answers have lasted `dns_hold` since the
//! first one that followed a non-empty answer. So a resolver outage never
//! empties a pool, and a name that is really gone is dropped.
//!
//! A new discovery kind is one file here with a type that implements
//! [`Source`], plus its arm in `source_for` and its config fields. Kinds:
//! [`dns`] (A/AAAA of a host name, SRV).

pub mod dns;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hashbrown::HashMap;
use tokio::sync::{OnceCell, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::{BackendConfig, DnsBackend, DnsQuery, DnsSettings, MAX_WEIGHT};
use crate::health::{MAX_REASON, one_line};
use crate::metrics::LookupMetrics;
use crate::ticks::schedule;

/// A lookup never waits longer than this, however long the interval.
pub const MAX_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The future of one lookup.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// What one lookup said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// These addresses (never none), sorted, each once.
    Found(Vec<Found>),
    /// The name has no address (NXDOMAIN, or no records of the type).
    Empty,
    /// No answer to believe: timeout, SERVFAIL, REFUSED, no server reached.
    Failed(String),
}

impl Answer {
    /// `addresses` as an answer: sorted, duplicates (the same address in
    /// two records) kept once, preferring a primary's record.
    pub fn of(mut addresses: Vec<Found>) -> Answer {
        if addresses.is_empty() {
            return Answer::Empty;
        }
        addresses.sort();
        addresses.dedup_by_key(|f| f.addr);
        Answer::Found(addresses)
    }
}

/// One address of a discovered name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Found {
    pub addr: SocketAddr,
    /// Whether it belongs to the backup tier (SRV: not the lowest priority).
    pub backup: bool,
    /// From an SRV record; `None` = the entry's own weight.
    pub weight: Option<u32>,
}

/// The backend an address of `entry` becomes. Its name depends on the
/// entry and the address alone, so two instances that see the same answer
/// agree on source hashing and cookie ids.
pub fn member(entry: &DnsBackend, found: &Found) -> BackendConfig {
    BackendConfig {
        name: format!("{}@{}", entry.name, found.addr).into(),
        address: found.addr.to_string(),
        addr: found.addr,
        weight: found.weight.unwrap_or(entry.weight),
        backup: entry.backup || found.backup,
        max_connections: entry.max_connections,
        discovered_from: Some(entry.name.clone()),
    }
}

/// SRV weight to backend weight: 0 (only "pick rarely" in RFC 2782) counts
/// as 1, so such a target still serves, and large weights are capped.
pub fn srv_weight(weight: u16) -> u32 {
    u32::from(weight).clamp(1, MAX_WEIGHT)
}

/// One kind of discovery (DNS, …): what a single lookup of a name does.
pub trait Source: Send + Sync + fmt::Debug {
    /// Look the name up once. The watch bounds it by its timeout; a kind
    /// need not time itself.
    fn lookup(&self) -> LookupFuture<'_>;
}

/// What lookups of discovered names share: the resolver, the global
/// timing, and one source per name, so that listeners which name the same
/// one never have more than one lookup of it in flight. Cheap to clone;
/// rebuilt when `[global]`'s DNS settings change.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub settings: DnsSettings,
    resolver: Arc<dns::Resolver>,
    sources: Arc<Mutex<HashMap<DnsQuery, Weak<Coalesced>>>>,
}

impl Discovery {
    pub fn new(settings: DnsSettings) -> Discovery {
        let resolver = Arc::new(dns::Resolver::new(&settings));
        Discovery {
            settings,
            resolver,
            sources: Arc::default(),
        }
    }

    /// The source that resolves `query`, shared by every entry that asks
    /// the same.
    pub fn source(&self, query: &DnsQuery) -> Arc<dyn Source> {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.retain(|_, s| s.strong_count() > 0);
        if let Some(shared) = sources.get(query).and_then(Weak::upgrade) {
            return shared;
        }
        let shared = Arc::new(Coalesced::new(source_for(query, &self.resolver)));
        sources.insert(query.clone(), Arc::downgrade(&shared));
        shared
    }

    /// How long one lookup may take.
    pub fn timeout(&self) -> Duration {
        self.settings.interval.min(MAX_LOOKUP_TIMEOUT)
    }
}

impl Default for Discovery {
    fn default() -> Self {
        Discovery::new(DnsSettings::default())
    }
}

/// The source kind that resolves `query`.
fn source_for(query: &DnsQuery, resolver: &Arc<dns::Resolver>) -> Arc<dyn Source> {
    dns::source(query, resolver)
}

/// A source whose callers share one lookup while it is in flight: a
/// caller that comes while one runs waits for its answer instead of
/// asking again.
#[derive(Debug)]
pub struct Coalesced {
    inner: Arc<dyn Source>,
    current: Mutex<Option<Arc<OnceCell<Answer>>>>,
}

impl Coalesced {
    pub fn new(inner: Arc<dyn Source>) -> Coalesced {
        Coalesced {
            inner,
            current: Mutex::new(None),
        }
    }
}

impl Source for Coalesced {
    fn lookup(&self) -> LookupFuture<'_> {
        Box::pin(async move {
            let cell = {
                let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                match &*current {
                    Some(running) if running.get().is_none() => running.clone(),
                    _ => current.insert(Arc::default()).clone(),
                }
            };
            // If the caller running the lookup gives up (its timeout), a
            // waiting one runs the next: still one at a time.
            cell.get_or_init(|| self.inner.lookup()).await.clone()
        })
    }
}

/// How a watch looks its name up: the source and the timing.
#[derive(Debug, Clone)]
pub struct Params {
    pub source: Arc<dyn Source>,
    pub interval: Duration,
    pub timeout: Duration,
    pub hold: Duration,
}

impl Params {
    pub fn new(query: &DnsQuery, discovery: &Discovery) -> Params {
        Params {
            source: discovery.source(query),
            interval: discovery.settings.interval,
            timeout: discovery.timeout(),
            hold: discovery.settings.hold,
        }
    }
}

/// Which addresses to serve, given the answers so far.
#[derive(Debug, Default)]
pub struct Belief {
    known: Vec<Found>,
    /// When the first "no address" answer after a non-empty one came.
    empty_since: Option<Instant>,
}

impl Belief {
    /// Take one answer at `now`; the new set when it changed.
    pub fn observe(&mut self, answer: &Answer, now: Instant, hold: Duration) -> Option<Vec<Found>> {
        match answer {
            Answer::Found(set) => {
                self.empty_since = None;
                if *set == self.known {
                    return None;
                }
                self.known = set.clone();
                Some(self.known.clone())
            }
            Answer::Empty if self.known.is_empty() => None,
            Answer::Empty => {
                let since = *self.empty_since.get_or_insert(now);
                if now.duration_since(since) < hold {
                    return None;
                }
                self.empty_since = None;
                self.known.clear();
                Some(Vec::new())
            }
            Answer::Failed(_) => None,
        }
    }

    /// The addresses believed now.
    pub fn known(&self) -> &[Found] {
        &self.known
    }
}

/// Names a watch in its log lines.
#[derive(Debug, Clone)]
pub struct Target {
    pub listener: Arc<str>,
    pub entry: Arc<str>,
    /// The name as written.
    pub query: String,
}

/// One lookup, counted and logged, folded into `belief`: the new set when
/// it changed. `last` is the previous answer's kind, to log changes of
/// kind once rather than every interval.
async fn look_up(
    target: &Target,
    params: &Params,
    belief: &mut Belief,
    metrics: &LookupMetrics,
    last: &mut Option<Kind>,
) -> Option<Vec<Found>> {
    let answer = match tokio::time::timeout(params.timeout, params.source.lookup()).await {
        Ok(answer) => answer,
        Err(_) => Answer::Failed("timed out".into()),
    };
    let kind = Kind::of(&answer);
    match kind {
        Kind::Found => &metrics.success,
        Kind::Empty => &metrics.empty,
        Kind::Failed => &metrics.failure,
    }
    .inc();
    let (listener, entry, name) = (&target.listener, &target.entry, &target.query);
    let kept = belief.known().len();
    if *last != Some(kind) {
        match &answer {
            Answer::Failed(reason) if kept > 0 => {
                warn!(%listener, backend = %entry, %name, reason = %one_line(reason, MAX_REASON), kept, "DNS lookup failed; keeping the last answer");
            }
            Answer::Failed(reason) => {
                warn!(%listener, backend = %entry, %name, reason = %one_line(reason, MAX_REASON), "DNS lookup failed; no backends from this name yet");
            }
            Answer::Empty if kept > 0 => {
                warn!(%listener, backend = %entry, %name, kept, hold = %humantime::format_duration(params.hold), "DNS has no address for the name; keeping the last answer unless this lasts");
            }
            Answer::Empty => {
                warn!(%listener, backend = %entry, %name, "DNS has no address for the name; no backends from it");
            }
            Answer::Found(_) if last.is_some() => {
                info!(%listener, backend = %entry, %name, "DNS answers again");
            }
            Answer::Found(_) => {}
        }
        *last = Some(kind);
    }
    let changed = belief.observe(&answer, Instant::now(), params.hold)?;
    let addresses: Vec<String> = changed.iter().map(|f| f.addr.to_string()).collect();
    info!(%listener, backend = %entry, %name, addresses = %addresses.join(","), "discovered backends changed");
    Some(changed)
}

/// An answer's kind, for counting and for logging changes once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Found,
    Empty,
    Failed,
}

impl Kind {
    fn of(answer: &Answer) -> Kind {
        match answer {
            Answer::Found(_) => Kind::Found,
            Answer::Empty => Kind::Empty,
            Answer::Failed(_) => Kind::Failed,
        }
    }
}

/// A running watch; stopped when dropped.
#[derive(Debug)]
pub struct WatchHandle {
    /// New parameters, and how soon to look up with them.
    params: watch::Sender<(Params, Duration)>,
    task: JoinHandle<()>,
}

impl WatchHandle {
    /// Look up with these parameters after `delay` (a reload: at once, but
    /// spread over a listener's names), then every interval from there.
    /// The belief carries over.
    pub fn refresh(&self, params: Params, delay: Duration) {
        self.params.send_replace((params, delay));
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watch that has looked its name up once, not yet running: the owner
/// of a listener being started takes the first answers of all its names
/// before it serves, then starts them.
pub struct Primed {
    target: Target,
    params: Params,
    belief: Belief,
    metrics: Arc<LookupMetrics>,
    last: Option<Kind>,
}

impl Primed {
    /// Look `target` up once now.
    pub async fn new(target: Target, params: Params, metrics: Arc<LookupMetrics>) -> Primed {
        let mut primed = Primed::unprimed(target, params, metrics);
        look_up(
            &primed.target,
            &primed.params,
            &mut primed.belief,
            &primed.metrics,
            &mut primed.last,
        )
        .await;
        primed
    }

    /// A watch that knows nothing yet.
    fn unprimed(target: Target, params: Params, metrics: Arc<LookupMetrics>) -> Primed {
        Primed {
            target,
            params,
            belief: Belief::default(),
            metrics,
            last: None,
        }
    }

    /// The addresses believed after the first lookup.
    pub fn known(&self) -> &[Found] {
        self.belief.known()
    }

    /// Go on looking up every interval, the first after `first_delay`;
    /// `report` gets every change of the set.
    pub fn start(
        self,
        first_delay: Duration,
        report: impl Fn(Vec<Found>) + Send + 'static,
    ) -> WatchHandle {
        let (tx, rx) = watch::channel((self.params.clone(), first_delay));
        let task = tokio::spawn(run(self, rx, report));
        WatchHandle { params: tx, task }
    }
}

/// Start watching `target` from nothing: the first lookup after
/// `first_delay`.
pub fn spawn(
    target: Target,
    params: Params,
    metrics: Arc<LookupMetrics>,
    first_delay: Duration,
    report: impl Fn(Vec<Found>) + Send + 'static,
) -> WatchHandle {
    Primed::unprimed(target, params, metrics).start(first_delay, report)
}

async fn run(
    mut w: Primed,
    mut params: watch::Receiver<(Params, Duration)>,
    report: impl Fn(Vec<Found>),
) {
    let first_delay = params.borrow_and_update().1;
    let mut ticks = schedule(Instant::now() + first_delay, w.params.interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = params.changed() => {
                if changed.is_err() {
                    return; // the owner is gone
                }
                let (next, delay) = params.borrow_and_update().clone();
                w.params = next;
                ticks = schedule(Instant::now() + delay, w.params.interval);
                continue;
            }
        }
        if let Some(set) =
            look_up(&w.target, &w.params, &mut w.belief, &w.metrics, &mut w.last).await
        {
            report(set);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(addr: &str) -> Found {
        Found {
            addr: addr.parse().unwrap(),
            backup: false,
            weight: None,
        }
    }

    fn set(addrs: &[&str]) -> Answer {
        Answer::of(addrs.iter().map(|a| found(a)).collect())
    }

    #[test]
    fn answers_are_sorted_and_each_address_kept_once() {
        let mut backup = found("10.0.0.1:80");
        backup.backup = true;
        let answer = Answer::of(vec![found("10.0.0.2:80"), backup, found("10.0.0.1:80")]);
        assert_eq!(
            answer,
            Answer::Found(vec![found("10.0.0.1:80"), found("10.0.0.2:80")])
        );
        assert_eq!(Answer::of(Vec::new()), Answer::Empty);
    }

    #[test]
    fn failures_keep_the_set_and_empty_answers_wait_for_the_hold() {
        let hold = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Belief::default();
        // Nothing known: an empty answer or a failure changes nothing.
        assert_eq!(b.observe(&Answer::Empty, at(0), hold), None);
        assert_eq!(b.observe(&Answer::Failed("x".into()), at(0), hold), None);
        let two = set(&["10.0.0.1:80", "10.0.0.2:80"]);
        assert!(b.observe(&two, at(1), hold).is_some());
        assert_eq!(b.observe(&two, at(2), hold), None, "same answer");
        // A resolver outage of any length keeps the set.
        for s in 3..1000 {
            assert_eq!(
                b.observe(&Answer::Failed("timeout".into()), at(s), hold),
                None
            );
        }
        assert_eq!(b.known().len(), 2);
        // "No address" from 1000 s; failures in between neither reset nor
        // end the wait.
        assert_eq!(b.observe(&Answer::Empty, at(1000), hold), None);
        assert_eq!(b.observe(&Answer::Failed("x".into()), at(1010), hold), None);
        assert_eq!(b.observe(&Answer::Empty, at(1029), hold), None);
        assert_eq!(b.observe(&Answer::Empty, at(1030), hold), Some(Vec::new()));
        assert!(b.known().is_empty());
    }

    #[test]
    fn an_answer_with_addresses_ends_the_wait() {
        let hold = Duration::from_secs(30);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut b = Belief::default();
        let one = set(&["10.0.0.1:80"]);
        b.observe(&one, at(0), hold);
        assert_eq!(b.observe(&Answer::Empty, at(1), hold), None);
        assert_eq!(b.observe(&one, at(20), hold), None, "same set: no change");
        // The wait starts again from the next empty answer.
        assert_eq!(b.observe(&Answer::Empty, at(40), hold), None);
        assert_eq!(b.observe(&Answer::Empty, at(69), hold), None);
        assert_eq!(b.observe(&Answer::Empty, at(70), hold), Some(Vec::new()));
    }

    #[test]
    fn zero_hold_believes_an_empty_answer_at_once() {
        let mut b = Belief::default();
        let now = Instant::now();
        b.observe(&set(&["10.0.0.1:80"]), now, Duration::ZERO);
        assert_eq!(
            b.observe(&Answer::Empty, now, Duration::ZERO),
            Some(Vec::new())
        );
    }

    #[test]
    fn members_are_named_from_the_answer_alone() {
        let entry = DnsBackend {
            name: "web".into(),
            query: DnsQuery::Host {
                host: "web.internal".into(),
                port: 8080,
            },
            weight: 3,
            backup: false,
            max_connections: Some(10),
        };
        let v4 = member(&entry, &found("10.0.0.1:8080"));
        assert_eq!(&*v4.name, "web@10.0.0.1:8080");
        assert_eq!(v4.address, "10.0.0.1:8080");
        assert_eq!(
            (v4.weight, v4.backup, v4.max_connections),
            (3, false, Some(10))
        );
        assert_eq!(v4.discovered_from.as_deref(), Some("web"));
        let srv = Found {
            addr: "[2001:db8::1]:5432".parse().unwrap(),
            backup: true,
            weight: Some(7),
        };
        let v6 = member(&entry, &srv);
        assert_eq!(&*v6.name, "web@[2001:db8::1]:5432");
        assert_eq!((v6.weight, v6.backup), (7, true));
        assert_eq!(srv_weight(0), 1);
        assert_eq!(srv_weight(10), 10);
        assert_eq!(srv_weight(60000), MAX_WEIGHT);
    }

    /// A source that answers from a script, one answer per lookup, and
    /// counts how many lookups are in flight at once.
    #[derive(Debug)]
    struct Scripted {
        answers: Mutex<Vec<(Duration, Answer)>>,
        in_flight: std::sync::atomic::AtomicUsize,
        max_in_flight: std::sync::atomic::AtomicUsize,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Source for Scripted {
        fn lookup(&self) -> LookupFuture<'_> {
            use std::sync::atomic::Ordering::SeqCst;
            Box::pin(async move {
                let (delay, answer) = {
                    let mut a = self.answers.lock().unwrap();
                    if a.len() > 1 {
                        a.remove(0)
                    } else {
                        a[0].clone()
                    }
                };
                // Counted out on drop: a timed-out lookup is dropped
                // mid-sleep.
                struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);
                impl Drop for InFlight<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, SeqCst);
                    }
                }
                self.calls.fetch_add(1, SeqCst);
                let now = self.in_flight.fetch_add(1, SeqCst) + 1;
                self.max_in_flight.fetch_max(now, SeqCst);
                let _counted = InFlight(&self.in_flight);
                tokio::time::sleep(delay).await;
                answer
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn callers_of_one_name_share_the_lookup_in_flight() {
        let scripted = Arc::new(Scripted {
            answers: Mutex::new(vec![(Duration::from_secs(1), set(&["10.0.0.1:80"]))]),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            calls: Default::default(),
        });
        let shared = Coalesced::new(scripted.clone());
        let (a, b) = tokio::join!(shared.lookup(), shared.lookup());
        assert_eq!(a, set(&["10.0.0.1:80"]));
        assert_eq!(a, b);
        assert_eq!(scripted.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Once answered, the next lookup asks again.
        shared.lookup().await;
        assert_eq!(scripted.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_reports_changes_keeps_one_lookup_in_flight_and_times_out() {
        let fast = Duration::from_millis(1);
        let source = Arc::new(Scripted {
            answers: Mutex::new(vec![
                (fast, set(&["10.0.0.1:80"])),
                (fast, set(&["10.0.0.1:80"])),
                // Hangs past the timeout: a failure, the set stays.
                (Duration::from_secs(60), set(&["10.0.0.9:80"])),
                (fast, set(&["10.0.0.1:80", "10.0.0.2:80"])),
            ]),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            calls: Default::default(),
        });
        let params = Params {
            source: source.clone(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            hold: Duration::from_secs(30),
        };
        let target = Target {
            listener: "l".into(),
            entry: "web".into(),
            query: "web.internal:80".into(),
        };
        let metrics = Arc::new(LookupMetrics::detached());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _watch = spawn(target, params, metrics, Duration::ZERO, move |set| {
            let _ = tx.send((Instant::now(), set));
        });
        let t0 = Instant::now();
        let (_, first) = rx.recv().await.unwrap();
        assert_eq!(first, vec![found("10.0.0.1:80")]);
        let (when, second) = rx.recv().await.unwrap();
        assert_eq!(second, vec![found("10.0.0.1:80"), found("10.0.0.2:80")]);
        // Lookups at 0, 5, 10 (timed out at 15), then 15: the schedule
        // went on whatever the lookup did.
        assert!(when - t0 >= Duration::from_secs(15), "{:?}", when - t0);
        assert!(when - t0 < Duration::from_secs(16), "{:?}", when - t0);
        assert_eq!(
            source
                .max_in_flight
                .load(std::sync::atomic::Ordering::SeqCst),
            1
        );
    }
}
