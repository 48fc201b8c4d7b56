//! Every Prometheus metric, defined once.
//!
//! Names live in [`names`]; each metric is registered once per [`Metrics`]
//! (one per running server, so tests can run several). The data path never
//! looks a metric up by label: a backend's handles are resolved when its live
//! state is created ([`BackendMetrics`]), its health checks' when its probe
//! starts ([`CheckMetrics`]), and a listener's once ([`ListenerMetrics`]), so
//! updating one is a single atomic operation. This module depends on no other
//! part of the crate: the components that count are handed their handles.
//!
//! Label values come only from config names (listener, backend) and fixed
//! sets (direction, result, reason, HTTP status code), never from client
//! input, so cardinality is bounded by the config. A removed backend's series
//! disappear when its last connection ends: [`BackendMetrics`] removes its
//! label values when the last holder drops it, and [`CheckMetrics`] when its
//! probe stops.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use hashbrown::HashMap;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Metric names: the contract with dashboards and alerts.
pub mod names {
    pub const CONNECTIONS_TOTAL: &str = "switchyard_connections_total";
    pub const ACTIVE_CONNECTIONS: &str = "switchyard_active_connections";
    pub const BYTES_TOTAL: &str = "switchyard_bytes_total";
    pub const BACKEND_UP: &str = "switchyard_backend_up";
    pub const BACKEND_CONNECT_ERRORS_TOTAL: &str = "switchyard_backend_connect_errors_total";
    pub const HEALTH_CHECKS_TOTAL: &str = "switchyard_health_checks_total";
    pub const HEALTH_CHECK_DURATION_SECONDS: &str = "switchyard_health_check_duration_seconds";
    pub const REJECTED_CONNECTIONS_TOTAL: &str = "switchyard_rejected_connections_total";
    pub const CONNECTION_DURATION_SECONDS: &str = "switchyard_connection_duration_seconds";
    pub const HTTP_REQUESTS_TOTAL: &str = "switchyard_http_requests_total";
    pub const CONFIG_RELOADS_TOTAL: &str = "switchyard_config_reloads_total";
    pub const ACCEPT_PAUSED_TOTAL: &str = "switchyard_accept_paused_total";
    pub const DNS_LOOKUPS_TOTAL: &str = "switchyard_dns_lookups_total";
    pub const UDP_DATAGRAMS_TOTAL: &str = "switchyard_udp_datagrams_total";
    pub const UPGRADES_TOTAL: &str = "switchyard_upgrades_total";
    pub const TLS_HANDSHAKES_TOTAL: &str = "switchyard_tls_handshakes_total";
    pub const TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: &str =
        "switchyard_tls_certificate_expiry_timestamp_seconds";
    pub const CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP_SECONDS: &str =
        "switchyard_config_last_reload_success_timestamp_seconds";
}

/// Health-check (TCP connect) latency buckets: a LAN connect takes well
/// under a millisecond, a struggling server tens to hundreds, and a probe
/// is cut at its timeout (1 s by default, a few seconds at most).
pub const CHECK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Connection lifetime buckets: from HTTP-style one-shot connections
/// (milliseconds) to pooled database connections that live for hours.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
    86400.0,
];

/// Why a client connection was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Source address not in the listener's allow-list.
    Acl,
    /// Every candidate at its connection cap for longer than the queue timeout.
    MaxConnections,
    /// No backend could take it.
    NoBackend,
}

impl Reject {
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Acl => "acl",
            Reject::MaxConnections => "max_connections",
            Reject::NoBackend => "no_backend",
        }
    }
}

/// The metric families of one server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: IntCounterVec,
    active: IntGaugeVec,
    bytes: IntCounterVec,
    backend_up: IntGaugeVec,
    connect_errors: IntCounterVec,
    health_checks: IntCounterVec,
    health_check_duration: HistogramVec,
    rejected: IntCounterVec,
    connection_duration: HistogramVec,
    http_requests: IntCounterVec,
    udp_datagrams: IntCounterVec,
    reloads: IntCounterVec,
    accept_paused: IntCounterVec,
    dns_lookups: IntCounterVec,
    upgrades: IntCounterVec,
    tls_handshakes: IntCounterVec,
    tls_expiry: IntGaugeVec,
    /// The names each TLS listener's expiry series are labelled with now.
    tls_names: Mutex<HashMap<String, Vec<String>>>,
    last_reload_success: Gauge,
    /// Histogram series carried from the process a live upgrade took over
    /// from, added to the live ones whenever they are encoded (a
    /// histogram cannot be set).
    carried: Mutex<HashMap<SeriesId, HistogramValue>>,
    /// Live per-backend handle sets, so a backend that is re-added while its
    /// old incarnation still drains shares one set of series.
    backends: Mutex<HashMap<SeriesKey, Weak<BackendMetrics>>>,
    /// Live health-check handle sets, shared the same way (a probe that is
    /// being replaced and its successor).
    checks: Mutex<HashMap<SeriesKey, Weak<CheckMetrics>>>,
    /// Live DNS lookup counter sets, shared the same way.
    lookups: Mutex<HashMap<SeriesKey, Weak<LookupMetrics>>>,
}

/// (listener, backend) label values of one backend's series.
type SeriesKey = (Arc<str>, Arc<str>);

/// A series by family name and label pairs (sorted by name, as gathered).
type SeriesId = (String, Vec<(String, String)>);

fn labels(m: &prometheus::proto::Metric) -> Vec<(String, String)> {
    m.get_label()
        .iter()
        .map(|l| (l.name().to_owned(), l.value().to_owned()))
        .collect()
}

fn series_id(family: &str, m: &prometheus::proto::Metric) -> SeriesId {
    (family.to_owned(), labels(m))
}

/// One series as a live upgrade carries it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    pub family: String,
    pub labels: Vec<(String, String)>,
    pub value: CarriedValue,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CarriedValue {
    Counter(u64),
    Histogram(HistogramValue),
    Gauge(f64),
}

/// A histogram's count, sum and cumulative bucket counts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HistogramValue {
    pub count: u64,
    pub sum: f64,
    pub buckets: Vec<u64>,
}

impl HistogramValue {
    fn add(&mut self, other: &HistogramValue) {
        if self.buckets.len() != other.buckets.len() {
            return;
        }
        self.count += other.count;
        self.sum += other.sum;
        for (b, o) in self.buckets.iter_mut().zip(&other.buckets) {
            *b += o;
        }
    }

    fn subtract(&mut self, base: &HistogramValue) {
        if self.buckets.len() != base.buckets.len() {
            return;
        }
        self.count = self.count.saturating_sub(base.count);
        self.sum -= base.sum;
        for (b, o) in self.buckets.iter_mut().zip(&base.buckets) {
            *b = b.saturating_sub(*o);
        }
    }
}

const LB: &[&str] = &["listener", "backend"];

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("every metric is registered once");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).unwrap(),
            )
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            reg(&registry, HistogramVec::new(opts, labels).unwrap())
        };
        use names::*;
        let metrics = Arc::new(Metrics {
            connections: counter(
                CONNECTIONS_TOTAL,
                "Client connections established to a backend.",
                LB,
            ),
            active: gauge(
                ACTIVE_CONNECTIONS,
                "Connections assigned to a backend and still open.",
                LB,
            ),
            bytes: counter(
                BYTES_TOTAL,
                "Bytes relayed, by direction.",
                &["listener", "backend", "direction"],
            ),
            backend_up: gauge(BACKEND_UP, "1 if health checks say the backend is up.", LB),
            connect_errors: counter(
                BACKEND_CONNECT_ERRORS_TOTAL,
                "Failed connects to a backend (refused, unreachable, timed out).",
                LB,
            ),
            health_checks: counter(
                HEALTH_CHECKS_TOTAL,
                "Health probes, by result.",
                &["listener", "backend", "result"],
            ),
            health_check_duration: histogram(
                HEALTH_CHECK_DURATION_SECONDS,
                "Time to establish (or fail) a health probe connection.",
                LB,
                CHECK_BUCKETS,
            ),
            rejected: counter(
                REJECTED_CONNECTIONS_TOTAL,
                "Client connections closed without being served, by reason.",
                &["listener", "reason"],
            ),
            connection_duration: histogram(
                CONNECTION_DURATION_SECONDS,
                "Lifetime of served client connections.",
                &["listener"],
                DURATION_BUCKETS,
            ),
            http_requests: counter(
                HTTP_REQUESTS_TOTAL,
                "HTTP requests answered, by backend and status code.",
                &["listener", "backend", "code"],
            ),
            udp_datagrams: counter(
                UDP_DATAGRAMS_TOTAL,
                "UDP datagrams relayed, by direction.",
                &["listener", "backend", "direction"],
            ),
            reloads: counter(
                CONFIG_RELOADS_TOTAL,
                "Configuration reloads, by result.",
                &["result"],
            ),
            accept_paused: counter(
                ACCEPT_PAUSED_TOTAL,
                "Times a listener stopped accepting because it reached max_connections.",
                &["listener"],
            ),
            dns_lookups: counter(
                DNS_LOOKUPS_TOTAL,
                "Lookups of discovered names, by result (success, empty, failure).",
                &["listener", "backend", "result"],
            ),
            upgrades: counter(
                UPGRADES_TOTAL,
                "Live upgrades (SIGUSR2), by result, counted by the process that serves afterwards.",
                &["result"],
            ),
            tls_handshakes: counter(
                TLS_HANDSHAKES_TOTAL,
                "TLS handshakes on a listener, by result (success, failure).",
                &["listener", "result"],
            ),
            tls_expiry: gauge(
                TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS,
                "Unix time at which a listener's certificate for this name expires (notAfter).",
                &["listener", "name"],
            ),
            tls_names: Mutex::default(),
            last_reload_success: reg(
                &registry,
                Gauge::new(
                    CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP_SECONDS,
                    "Unix time of the last successful configuration (re)load.",
                )
                .unwrap(),
            ),
            registry,
            carried: Mutex::default(),
            backends: Mutex::default(),
            checks: Mutex::default(),
            lookups: Mutex::default(),
        });
        // Both results exist from the start at 0, so the first failure is
        // an increase that `increase()` (and the reload alert) can see.
        for result in ["success", "failure"] {
            metrics.reloads.with_label_values(&[result]);
            metrics.upgrades.with_label_values(&[result]);
        }
        metrics
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.gather(), &mut out)
            .expect("encoding into memory cannot fail");
        out
    }

    /// Every family, carried histogram values included.
    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.registry.gather();
        let carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        if carried.is_empty() {
            return families;
        }
        for family in &mut families {
            if family.get_field_type() != prometheus::proto::MetricType::HISTOGRAM {
                continue;
            }
            let name = family.name().to_owned();
            for m in family.mut_metric() {
                let Some(base) = carried.get(&series_id(&name, m)) else {
                    continue;
                };
                let mut h = m.get_histogram().clone();
                if h.get_bucket().len() != base.buckets.len() {
                    continue;
                }
                h.set_sample_count(h.get_sample_count() + base.count);
                h.set_sample_sum(h.get_sample_sum() + base.sum);
                let mut buckets = h.get_bucket().to_vec();
                for (b, add) in buckets.iter_mut().zip(&base.buckets) {
                    b.set_cumulative_count(b.cumulative_count() + add);
                }
                h.set_bucket(buckets);
                m.set_histogram(h);
            }
        }
        families
    }

    /// Every counter and histogram series as it reads now, and the last
    /// reload's time: what a live upgrade carries to the new process
    /// (gauges of live state are rebuilt there).
    pub fn snapshot(&self) -> Vec<Carried> {
        use prometheus::proto::MetricType;
        let mut out = Vec::new();
        for family in self.gather() {
            let name = family.name();
            for m in family.get_metric() {
                let value = match family.get_field_type() {
                    MetricType::COUNTER => {
                        CarriedValue::Counter(m.get_counter().get_value() as u64)
                    }
                    MetricType::HISTOGRAM => {
                        let h = m.get_histogram();
                        CarriedValue::Histogram(HistogramValue {
                            count: h.get_sample_count(),
                            sum: h.get_sample_sum(),
                            buckets: h
                                .get_bucket()
                                .iter()
                                .map(|b| b.cumulative_count())
                                .collect(),
                        })
                    }
                    MetricType::GAUGE
                        if name == names::CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP_SECONDS =>
                    {
                        CarriedValue::Gauge(m.get_gauge().get_value())
                    }
                    _ => continue,
                };
                out.push(Carried {
                    family: name.to_owned(),
                    labels: labels(m),
                    value,
                });
            }
        }
        out
    }

    /// What was counted between `base` (an earlier [`snapshot`](Self::snapshot))
    /// and now: after a live upgrade, what the connections that stayed in
    /// the old process counted once the first snapshot had gone.
    pub fn since(&self, base: &[Carried]) -> Vec<Carried> {
        type Series<'a> = (&'a str, &'a [(String, String)]);
        let base: HashMap<Series<'_>, &CarriedValue> = base
            .iter()
            .map(|c| ((c.family.as_str(), c.labels.as_slice()), &c.value))
            .collect();
        let mut out = self.snapshot();
        out.retain_mut(|c| {
            let before = base.get(&(c.family.as_str(), c.labels.as_slice()));
            match (&mut c.value, before) {
                (CarriedValue::Counter(v), Some(CarriedValue::Counter(b))) => {
                    *v = v.saturating_sub(*b);
                    *v > 0
                }
                (CarriedValue::Counter(v), _) => *v > 0,
                (CarriedValue::Histogram(h), Some(CarriedValue::Histogram(b))) => {
                    h.subtract(b);
                    h.count > 0
                }
                (CarriedValue::Histogram(h), _) => h.count > 0,
                // Gauges are state, not counts: the first snapshot had them.
                (CarriedValue::Gauge(_), _) => false,
            }
        });
        out
    }

    /// Go on from the values another process counted (live upgrade): each
    /// counter series `keep` accepts (by its labels) is raised by its
    /// carried value, each histogram series reads with its carried value
    /// added. Applied before the first scrape, and once more for what the
    /// old process's remaining connections counted afterwards.
    pub fn carry(&self, series: Vec<Carried>, keep: impl Fn(&[(String, String)]) -> bool) {
        use prometheus::core::Collector;
        let counters: [&IntCounterVec; 12] = [
            &self.connections,
            &self.bytes,
            &self.connect_errors,
            &self.health_checks,
            &self.rejected,
            &self.http_requests,
            &self.udp_datagrams,
            &self.reloads,
            &self.accept_paused,
            &self.dns_lookups,
            &self.upgrades,
            &self.tls_handshakes,
        ];
        let mut carried = self.carried.lock().unwrap_or_else(|e| e.into_inner());
        for s in series.into_iter().filter(|s| keep(&s.labels)) {
            match s.value {
                CarriedValue::Counter(v) => {
                    let labels: std::collections::HashMap<&str, &str> = s
                        .labels
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let family = counters
                        .iter()
                        .find(|c| c.desc().first().is_some_and(|d| d.fq_name == s.family));
                    if let Some(c) = family.and_then(|f| f.get_metric_with(&labels).ok()) {
                        c.inc_by(v);
                    }
                }
                CarriedValue::Histogram(h) => match carried.entry((s.family, s.labels)) {
                    hashbrown::hash_map::Entry::Occupied(mut e) => e.get_mut().add(&h),
                    hashbrown::hash_map::Entry::Vacant(e) => {
                        e.insert(h);
                    }
                },
                CarriedValue::Gauge(v) => {
                    if s.family == names::CONFIG_LAST_RELOAD_SUCCESS_TIMESTAMP_SECONDS {
                        self.last_reload_success.set(v);
                    }
                }
            }
        }
    }

    /// Count a live upgrade's outcome.
    pub fn record_upgrade(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.upgrades.with_label_values(&[result]).inc();
    }

    /// The handles of one backend, shared while any holder lives.
    pub fn backend(
        self: &Arc<Self>,
        listener: &Arc<str>,
        backend: &Arc<str>,
    ) -> Arc<BackendMetrics> {
        let key = (listener.clone(), backend.clone());
        shared(&self.backends, key, |key| {
            let l = [&**listener, &**backend];
            let m = BackendMetrics {
                connections: self.connections.with_label_values(&l),
                active: self.active.with_label_values(&l),
                bytes_client_to_backend: self.bytes.with_label_values(&[
                    &**listener,
                    &**backend,
                    "client_to_backend",
                ]),
                bytes_backend_to_client: self.bytes.with_label_values(&[
                    &**listener,
                    &**backend,
                    "backend_to_client",
                ]),
                up: self.backend_up.with_label_values(&l),
                connect_errors: self.connect_errors.with_label_values(&l),
                http: OnceLock::new(),
                http_family: self.http_requests.clone(),
                udp: OnceLock::new(),
                udp_family: self.udp_datagrams.clone(),
                owner: Some((Arc::downgrade(self), key.clone())),
            };
            m.up.set(1);
            m
        })
    }

    /// The health-check handles of one backend, shared while any holder
    /// (its probe) lives.
    pub fn checks(self: &Arc<Self>, listener: &Arc<str>, backend: &Arc<str>) -> Arc<CheckMetrics> {
        let key = (listener.clone(), backend.clone());
        shared(&self.checks, key, |key| {
            let result = |r| {
                self.health_checks
                    .with_label_values(&[&**listener, &**backend, r])
            };
            CheckMetrics {
                ok: result("success"),
                failed: result("failure"),
                duration: self
                    .health_check_duration
                    .with_label_values(&[&**listener, &**backend]),
                owner: Some((Arc::downgrade(self), key.clone())),
            }
        })
    }

    /// (successful, failed) health checks of a backend that is being
    /// probed now.
    pub fn check_counts(&self, listener: &str, backend: &str) -> Option<(u64, u64)> {
        let live = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let key: SeriesKey = (listener.into(), backend.into());
        let m = live.get(&key)?.upgrade()?;
        Some((m.ok.get(), m.failed.get()))
    }

    /// The lookup counters of a discovered entry, shared while any holder
    /// (its watch, and a replaced watch that is still winding down) lives;
    /// the series go with the last. All three exist from the start at 0.
    pub fn dns_lookups(
        self: &Arc<Self>,
        listener: &Arc<str>,
        entry: &Arc<str>,
    ) -> Arc<LookupMetrics> {
        let key = (listener.clone(), entry.clone());
        shared(&self.lookups, key, |key| {
            let result = |r| {
                self.dns_lookups
                    .with_label_values(&[&**listener, &**entry, r])
            };
            LookupMetrics {
                success: result("success"),
                empty: result("empty"),
                failure: result("failure"),
                owner: Some((Arc::downgrade(self), key.clone())),
            }
        })
    }

    /// The handles of one listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let reject = |r: Reject| self.rejected.with_label_values(&[listener, r.as_str()]);
        ListenerMetrics {
            rejected_acl: reject(Reject::Acl),
            rejected_max_connections: reject(Reject::MaxConnections),
            rejected_no_backend: reject(Reject::NoBackend),
            connection_duration: self.connection_duration.with_label_values(&[listener]),
            accept_paused: self.accept_paused.with_label_values(&[listener]),
            http_unrouted: Arc::new(HttpCodes::new(
                self.http_requests.clone(),
                (listener.into(), "".into()),
            )),
            tls: TlsHandshakes {
                family: self.tls_handshakes.clone(),
                listener: listener.into(),
            },
        }
    }

    /// A listener's certificates now: one expiry series per
    /// subjectAltName DNS name (the first certificate's wins where two
    /// share a name, as SNI picks it); none for a plain listener.
    pub fn certificates(&self, listener: &str, certs: &[(Vec<String>, SystemTime)]) {
        let mut names = self.tls_names.lock().unwrap_or_else(|e| e.into_inner());
        for old in names.remove(listener).unwrap_or_default() {
            let _ = self.tls_expiry.remove_label_values(&[listener, &old]);
        }
        let mut now = Vec::new();
        for (cert_names, not_after) in certs {
            let at = not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            for name in cert_names {
                if !now.contains(name) {
                    self.tls_expiry.with_label_values(&[listener, name]).set(at);
                    now.push(name.clone());
                }
            }
        }
        // Handshakes are counted for TLS listeners only; theirs read 0
        // from the start, a plain listener has none.
        for result in ["success", "failure"] {
            if certs.is_empty() {
                let _ = self.tls_handshakes.remove_label_values(&[listener, result]);
            } else {
                self.tls_handshakes.with_label_values(&[listener, result]);
            }
        }
        if !now.is_empty() {
            names.insert(listener.to_owned(), now);
        }
    }

    /// Count a reload attempt (the initial load counts as a success).
    pub fn record_reload(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.reloads.with_label_values(&[result]).inc();
        if success {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO);
            self.last_reload_success.set(now.as_secs_f64());
        }
    }

    /// Remove the data-path series of a backend (its last holder is gone).
    fn forget(&self, key: &SeriesKey) {
        if !last_holder_gone(&self.backends, key) {
            return;
        }
        let (l, b) = (&*key.0, &*key.1);
        let _ = self.connections.remove_label_values(&[l, b]);
        let _ = self.active.remove_label_values(&[l, b]);
        let _ = self.backend_up.remove_label_values(&[l, b]);
        let _ = self.connect_errors.remove_label_values(&[l, b]);
        for d in ["client_to_backend", "backend_to_client"] {
            let _ = self.bytes.remove_label_values(&[l, b, d]);
            let _ = self.udp_datagrams.remove_label_values(&[l, b, d]);
        }
        // HTTP codes are removed by the dropped `HttpCodes` itself.
    }

    /// Remove the health-check series of a backend (no probe runs for it).
    fn forget_checks(&self, key: &SeriesKey) {
        if !last_holder_gone(&self.checks, key) {
            return;
        }
        let (l, b) = (&*key.0, &*key.1);
        let _ = self.health_check_duration.remove_label_values(&[l, b]);
        let id = (
            names::HEALTH_CHECK_DURATION_SECONDS.to_owned(),
            vec![
                ("backend".to_owned(), b.to_owned()),
                ("listener".to_owned(), l.to_owned()),
            ],
        );
        self.carried
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        for r in ["success", "failure"] {
            let _ = self.health_checks.remove_label_values(&[l, b, r]);
        }
    }
}

/// The live handle set for `key`, or a new one from `make` registered in
/// `live`: holders of one series key share one set.
fn shared<T>(
    live: &Mutex<HashMap<SeriesKey, Weak<T>>>,
    key: SeriesKey,
    make: impl FnOnce(&SeriesKey) -> T,
) -> Arc<T> {
    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = live.get(&key).and_then(Weak::upgrade) {
        return existing;
    }
    let m = Arc::new(make(&key));
    live.insert(key, Arc::downgrade(&m));
    m
}

/// Drop `key` from a live map unless it was handed out again meanwhile (a
/// re-added backend: the series then belong to the new holder).
fn last_holder_gone<T>(live: &Mutex<HashMap<SeriesKey, Weak<T>>>, key: &SeriesKey) -> bool {
    let mut live = live.lock().unwrap_or_else(|e| e.into_inner());
    if live.get(key).is_some_and(|w| w.strong_count() > 0) {
        return false;
    }
    live.remove(key);
    true
}

/// `switchyard_http_requests_total` for one (listener, backend): one
/// counter per status code, resolved on first use, then one atomic load and
/// one increment per response.
#[derive(Debug)]
pub struct HttpCodes {
    family: IntCounterVec,
    key: SeriesKey,
    /// Index: status code − 100 (codes 100..=599).
    codes: Box<[OnceLock<IntCounter>]>,
}

impl HttpCodes {
    fn new(family: IntCounterVec, key: SeriesKey) -> HttpCodes {
        HttpCodes {
            family,
            key,
            codes: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Count a response with this status code.
    pub fn count(&self, code: u16) {
        let Some(slot) = usize::from(code)
            .checked_sub(100)
            .and_then(|i| self.codes.get(i))
        else {
            return; // hyper never produces codes outside 100..=599
        };
        slot.get_or_init(|| {
            self.family
                .with_label_values(&[&*self.key.0, &*self.key.1, &code.to_string()])
        })
        .inc();
    }
}

impl Drop for HttpCodes {
    fn drop(&mut self) {
        // Every code, not only those counted here: a live upgrade may have
        // carried others in.
        for code in 100..600u16 {
            let code = code.to_string();
            let _ = self
                .family
                .remove_label_values(&[&*self.key.0, &*self.key.1, &code]);
        }
    }
}

/// A backend's metric handles: each update is one atomic operation.
#[derive(Debug)]
pub struct BackendMetrics {
    pub connections: IntCounter,
    pub active: IntGauge,
    pub bytes_client_to_backend: IntCounter,
    pub bytes_backend_to_client: IntCounter,
    pub up: IntGauge,
    pub connect_errors: IntCounter,
    /// HTTP-mode response counters, created on first use.
    http: OnceLock<HttpCodes>,
    http_family: IntCounterVec,
    /// UDP-mode datagram counters, created on first use.
    udp: OnceLock<UdpDatagrams>,
    udp_family: IntCounterVec,
    /// Where the series are registered, to remove them on drop.
    owner: Option<(Weak<Metrics>, SeriesKey)>,
}

/// A backend's datagram counters (UDP mode).
#[derive(Debug)]
pub struct UdpDatagrams {
    pub client_to_backend: IntCounter,
    pub backend_to_client: IntCounter,
}

impl BackendMetrics {
    /// The (listener, backend) its series are labelled with; `None` when
    /// detached.
    pub fn key(&self) -> Option<&(Arc<str>, Arc<str>)> {
        self.owner.as_ref().map(|(_, k)| k)
    }

    /// Datagram counters of this backend (UDP mode).
    pub fn udp(&self) -> &UdpDatagrams {
        self.udp.get_or_init(|| {
            let (l, b) = self
                .owner
                .as_ref()
                .map_or_else(|| (Arc::from(""), Arc::from("")), |(_, k)| k.clone());
            let c = |d| self.udp_family.with_label_values(&[&*l, &*b, d]);
            UdpDatagrams {
                client_to_backend: c("client_to_backend"),
                backend_to_client: c("backend_to_client"),
            }
        })
    }

    /// Response counters of this backend (HTTP mode).
    pub fn http(&self) -> &HttpCodes {
        self.http.get_or_init(|| {
            let key = self
                .owner
                .as_ref()
                .map_or_else(|| ("".into(), "".into()), |(_, k)| k.clone());
            HttpCodes::new(self.http_family.clone(), key)
        })
    }

    /// Handles registered nowhere: for live state built outside a server
    /// (unit tests, benchmarks).
    pub fn detached() -> BackendMetrics {
        let c = || IntCounter::new("c", "c").unwrap();
        let g = || IntGauge::new("g", "g").unwrap();
        BackendMetrics {
            connections: c(),
            active: g(),
            bytes_client_to_backend: c(),
            bytes_backend_to_client: c(),
            up: {
                let up = g();
                up.set(1);
                up
            },
            connect_errors: c(),
            http: OnceLock::new(),
            http_family: IntCounterVec::new(Opts::new("r", "r"), &["listener", "backend", "code"])
                .unwrap(),
            udp: OnceLock::new(),
            udp_family: IntCounterVec::new(
                Opts::new("u", "u"),
                &["listener", "backend", "direction"],
            )
            .unwrap(),
            owner: None,
        }
    }
}

impl Drop for BackendMetrics {
    fn drop(&mut self) {
        if let Some((metrics, key)) = &self.owner
            && let Some(metrics) = metrics.upgrade()
        {
            metrics.forget(key);
        }
    }
}

/// A backend's health-check handles, held by its probe.
#[derive(Debug)]
pub struct CheckMetrics {
    pub ok: IntCounter,
    pub failed: IntCounter,
    pub duration: Histogram,
    /// Where the series are registered, to remove them on drop.
    owner: Option<(Weak<Metrics>, SeriesKey)>,
}

impl CheckMetrics {
    /// Count one check and how long it took.
    pub fn record(&self, ok: bool, took: Duration) {
        if ok { &self.ok } else { &self.failed }.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Handles registered nowhere (unit tests).
    pub fn detached() -> CheckMetrics {
        CheckMetrics {
            ok: IntCounter::new("c", "c").unwrap(),
            failed: IntCounter::new("c", "c").unwrap(),
            duration: Histogram::with_opts(HistogramOpts::new("h", "h")).unwrap(),
            owner: None,
        }
    }
}

impl Drop for CheckMetrics {
    fn drop(&mut self) {
        if let Some((metrics, key)) = &self.owner
            && let Some(metrics) = metrics.upgrade()
        {
            metrics.forget_checks(key);
        }
    }
}

/// A discovered entry's lookup counters (`switchyard_dns_lookups_total`).
#[derive(Debug)]
pub struct LookupMetrics {
    pub success: IntCounter,
    pub empty: IntCounter,
    pub failure: IntCounter,
    owner: Option<(Weak<Metrics>, SeriesKey)>,
}

impl LookupMetrics {
    /// Handles registered nowhere (unit tests).
    pub fn detached() -> LookupMetrics {
        let c = || IntCounter::new("c", "c").unwrap();
        LookupMetrics {
            success: c(),
            empty: c(),
            failure: c(),
            owner: None,
        }
    }
}

impl Drop for LookupMetrics {
    fn drop(&mut self) {
        if let Some((metrics, key)) = &self.owner
            && let Some(metrics) = metrics.upgrade()
            && last_holder_gone(&metrics.lookups, key)
        {
            for r in ["success", "empty", "failure"] {
                let _ = metrics
                    .dns_lookups
                    .remove_label_values(&[&*key.0, &*key.1, r]);
            }
        }
    }
}

/// A listener's metric handles.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub rejected_acl: IntCounter,
    pub rejected_max_connections: IntCounter,
    pub rejected_no_backend: IntCounter,
    pub connection_duration: Histogram,
    /// Times accepting paused at the listener's max_connections.
    pub accept_paused: IntCounter,
    /// HTTP responses that no backend produced (503, 502), `backend=""`.
    pub http_unrouted: Arc<HttpCodes>,
    pub tls: TlsHandshakes,
}

/// A listener's TLS handshake counts. Looked up per handshake (a TLS
/// listener's series exist from its load, a plain one's never), so a
/// reload that turns TLS on or off needs no new handles.
#[derive(Debug, Clone)]
pub struct TlsHandshakes {
    family: IntCounterVec,
    listener: Arc<str>,
}

impl TlsHandshakes {
    pub fn count(&self, success: bool) {
        let result = if success { "success" } else { "failure" };
        self.family
            .with_label_values(&[&*self.listener, result])
            .inc();
    }
}

impl ListenerMetrics {
    pub fn reject(&self, reason: Reject) {
        match reason {
            Reject::Acl => &self.rejected_acl,
            Reject::MaxConnections => &self.rejected_max_connections,
            Reject::NoBackend => &self.rejected_no_backend,
        }
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    #[test]
    fn backend_series_live_as_long_as_their_holders() {
        let m = Metrics::new();
        let (l, b): (Arc<str>, Arc<str>) = ("pg".into(), "pg1".into());
        let h = m.backend(&l, &b);
        h.connections.inc();
        assert!(
            text(&m).contains(r#"switchyard_connections_total{backend="pg1",listener="pg"} 1"#)
        );
        let again = m.backend(&l, &b);
        assert!(Arc::ptr_eq(&h, &again));
        drop(h);
        assert!(text(&m).contains("switchyard_backend_up{"));
        drop(again);
        let t = text(&m);
        assert!(!t.contains("pg1"), "{t}");
    }

    #[test]
    fn reloads_and_rejections_are_counted() {
        let m = Metrics::new();
        assert!(text(&m).contains(r#"switchyard_config_reloads_total{result="failure"} 0"#));
        m.record_reload(true);
        m.record_reload(false);
        m.record_reload(false);
        let lm = m.listener("web");
        lm.reject(Reject::NoBackend);
        let t = text(&m);
        assert!(
            t.contains(r#"switchyard_config_reloads_total{result="failure"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"switchyard_config_reloads_total{result="success"} 1"#),
            "{t}"
        );
        assert!(t.contains(
            r#"switchyard_rejected_connections_total{listener="web",reason="no_backend"} 1"#
        ));
        assert!(
            t.contains(r#"switchyard_rejected_connections_total{listener="web",reason="acl"} 0"#)
        );
    }

    /// A live upgrade carries a snapshot, then what the old process's
    /// remaining connections counted after it: the new process ends up
    /// with exactly what was counted in both, histograms included.
    #[test]
    fn a_snapshot_and_what_was_counted_since_add_up() {
        let old = Metrics::new();
        let lm = old.listener("web");
        lm.reject(Reject::Acl);
        lm.connection_duration.observe(0.5);
        let base = old.snapshot();
        lm.reject(Reject::Acl);
        lm.reject(Reject::Acl);
        lm.connection_duration.observe(2.0);
        let since = old.since(&base);
        assert!(
            since
                .iter()
                .all(|c| !matches!(c.value, CarriedValue::Gauge(_))),
            "{since:?}"
        );

        let new = Metrics::new();
        let _ = new.listener("web");
        new.carry(base, |_| true);
        new.carry(since, |_| true);
        let (t, want) = (text(&new), text(&old));
        for line in [
            r#"switchyard_rejected_connections_total{listener="web",reason="acl"} 3"#,
            r#"switchyard_connection_duration_seconds_count{listener="web"} 2"#,
            r#"switchyard_connection_duration_seconds_sum{listener="web"} 2.5"#,
        ] {
            assert!(want.contains(line), "the old process: {want}");
            assert!(t.contains(line), "{line} missing: {t}");
        }
    }
}
