//! The config file: serde types, defaults and validation.
//!
//! Loading is two steps. [`RawConfig`] mirrors the TOML exactly
//! (`deny_unknown_fields`, durations as "2s"); [`Config::from_raw`] then checks
//! what serde cannot (unique names, sane numbers, addresses that parse or
//! resolve) and produces the typed [`Config`] the daemon runs on. Every error
//! carries the *path* of the offending field (`listener[0].backend[1].weight`);
//! [`load_str`] resolves that path against the parsed document to report the
//! file, line and column, so an operator can jump straight to the mistake.
//! `switchyard check` and every (re)load go through [`load_file`].

use std::collections::HashSet;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

/// Default config path, as systemd units and packages expect it.
pub const DEFAULT_PATH: &str = "/etc/switchyard/switchyard.toml";

/// HAProxy's weight range; large enough for fine ratios, small enough that a
/// round-robin cycle (sum of weights) stays a few hundred KiB at 1000 backends.
pub const MAX_WEIGHT: u32 = 256;

// ---------------------------------------------------------------------------
// Raw (serde) types: exactly what the file may contain.
// ---------------------------------------------------------------------------

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub global: RawGlobal,
    pub admin: Option<RawAdmin>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<RawListener>,
}

/// `[global]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGlobal {
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for RawGlobal {
    fn default() -> Self {
        RawGlobal {
            shutdown_timeout: defaults::shutdown_timeout(),
        }
    }
}

/// `[admin]`: the metrics and admin API endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "defaults::admin_bind")]
    pub bind: String,
    pub token_file: Option<PathBuf>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub bind: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    #[serde(default)]
    pub freebind: bool,
    /// Source allow-list (CIDRs or addresses); absent = everyone.
    pub allow: Option<Vec<String>>,
    pub max_connections: Option<u32>,
    #[serde(default = "defaults::queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    #[serde(default = "defaults::keepalive")]
    pub keepalive: bool,
    #[serde(default = "defaults::keepalive_idle", with = "humantime_serde")]
    pub keepalive_idle: Duration,
    #[serde(default = "defaults::keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "defaults::keepalive_count")]
    pub keepalive_count: u32,
    #[serde(default)]
    pub on_marked_down: OnMarkedDown,
    #[serde(default)]
    pub health_check: HealthCheck,
    /// HTTP mode: how long a client may take to send a request's headers.
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    pub sticky: Option<RawSticky>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<RawBackend>,
}

/// `[listener.sticky]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub method: StickyMethod,
    #[serde(default = "defaults::cookie")]
    pub cookie: String,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// How a client is kept on one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StickyMethod {
    /// The balancer inserts a cookie naming the backend (HAProxy
    /// `cookie NAME insert indirect nocache`).
    Lbcookie,
}

/// A validated `[listener.sticky]` (lbCookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sticky {
    /// Cookie name.
    pub cookie: String,
    /// `Max-Age` of the inserted cookie; `None` = a session cookie.
    pub max_age: Option<Duration>,
}

/// `[[listener.backend]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub address: String,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
    pub max_connections: Option<u32>,
}

/// `[listener.health_check]`: a TCP connect probe per backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Time between the starts of two probes of one backend.
    #[serde(default = "defaults::check_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A probe fails unless the connection is established within this.
    #[serde(default = "defaults::check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures that mark an up backend down.
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    /// Consecutive successes that mark a down backend up.
    #[serde(default = "defaults::rise")]
    pub rise: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: defaults::check_interval(),
            timeout: defaults::check_timeout(),
            fall: defaults::fall(),
            rise: defaults::rise(),
        }
    }
}

/// A PROXY protocol header sent to backends before any client byte.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    /// Text header (`PROXY TCP4 …\r\n`).
    V1,
    /// Binary header.
    V2,
}

/// TCP keepalive on client and backend sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

/// What happens to open connections of a backend marked down.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMarkedDown {
    /// Leave them; they end when either side closes.
    #[default]
    Keep,
    /// Close them, so clients reconnect to a live backend (database failover).
    Shutdown,
}

mod defaults {
    use std::time::Duration;

    /// An operator interface: loopback unless the operator says otherwise.
    pub fn admin_bind() -> String {
        "127.0.0.1:9900".into()
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    /// HAProxy's `timeout connect` in CloudStack's generated config is 5s; 3s
    /// leaves time for a retry inside a typical 10s client connect timeout.
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(3)
    }
    /// Long enough for idle pooled database connections; short enough that
    /// abandoned ones do not pile up for days.
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    /// HAProxy's `retries` default is 3 on the same server; 2 attempts on
    /// other backends cover one dead backend plus one unlucky pick.
    pub fn retries() -> u32 {
        2
    }
    pub fn weight() -> u32 {
        1
    }
    /// How long a connection may wait for a backend below its cap; HAProxy's
    /// `timeout queue` is commonly a few seconds.
    pub fn queue_timeout() -> Duration {
        Duration::from_secs(5)
    }
    /// On by default: idle database connections survive stateful firewalls
    /// (which commonly drop idle flows after 5–60 minutes) and dead peers
    /// are found in idle + interval × count = 2 minutes.
    pub fn keepalive() -> bool {
        true
    }
    pub fn keepalive_idle() -> Duration {
        Duration::from_secs(60)
    }
    pub fn keepalive_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn keepalive_count() -> u32 {
        6
    }
    /// HAProxy's and CloudStack's default lbCookie name.
    pub fn cookie() -> String {
        "SERVERID".into()
    }
    /// HAProxy's `timeout http-request` in common configs: enough for a slow
    /// mobile client, short enough that idle sockets do not pile up.
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    /// The reference service's health check: TCP connect every 2 s, down
    /// after 3 failures (HAProxy's `inter 2s fall 3 rise 2`).
    pub fn check_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn check_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn fall() -> u32 {
        3
    }
    pub fn rise() -> u32 {
        2
    }
}

/// How a listener handles the byte stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plain Layer-4 relay: bytes in, bytes out.
    #[default]
    Tcp,
    /// HTTP/1.1: every request routed on its own; needed for lbCookie.
    Http,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        }
    }
}

/// How a listener picks a backend for a new connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Smooth weighted round robin.
    #[default]
    Roundrobin,
    /// Fewest active connections relative to weight.
    Leastconn,
    /// Consistent hash of the client IP address.
    Source,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Roundrobin => "roundrobin",
            Algorithm::Leastconn => "leastconn",
            Algorithm::Source => "source",
        }
    }
}

// ---------------------------------------------------------------------------
// Validated types: what the daemon runs on.
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was loaded from (for messages and reloads).
    pub source: PathBuf,
    pub shutdown_timeout: Duration,
    /// The admin endpoint; `None` when the `[admin]` table is absent.
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<Arc<ListenerConfig>>,
}

/// A validated `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Required as `Authorization: Bearer <token>` for state changes.
    pub token: Option<Secret>,
}

/// A secret read from a file: never printed, compared in constant time.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Whether `presented` is the secret, in time independent of where the
    /// two differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// One validated `[[listener]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: Arc<str>,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub algorithm: Algorithm,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// Further backends to try after a failed connect.
    pub retries: u32,
    /// Bind even if the address is not local yet (a VIP that moves between
    /// the members of an HA pair).
    pub freebind: bool,
    /// Client sources allowed; `None` = everyone.
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// Open client connections at most; beyond it accepting pauses.
    pub max_connections: Option<u32>,
    /// How long a connection waits for a backend below its cap.
    pub queue_timeout: Duration,
    pub proxy_protocol: ProxyProtocol,
    /// `None` = keepalive off.
    pub keepalive: Option<Keepalive>,
    pub on_marked_down: OnMarkedDown,
    pub health_check: HealthCheck,
    /// HTTP mode: time allowed for a request's headers.
    pub header_timeout: Duration,
    /// HTTP mode: lbCookie stickiness.
    pub sticky: Option<Sticky>,
    pub backends: Vec<BackendConfig>,
}

/// One validated `[[listener.backend]]`, its address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: Arc<str>,
    /// The address as written (a host name stays visible in status output).
    pub address: String,
    /// What `address` resolved to at load time.
    pub addr: SocketAddr,
    pub weight: u32,
    /// Used only while no non-backup backend is up.
    pub backup: bool,
    /// Connections at most; more wait in the listener's queue.
    pub max_connections: Option<u32>,
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// A config problem, located as precisely as the document allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {field}{message}")]
    Invalid {
        file: PathBuf,
        line: usize,
        column: usize,
        /// Dotted path of the field, with a trailing ": " when known.
        field: String,
        message: String,
    },
}

/// A validation failure before it is located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: FieldPath,
    pub message: String,
}

/// Path of a field in the document: `listener[1].backend[0].weight`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(&'static str),
    Index(usize),
}

impl FieldPath {
    fn key(&self, key: &'static str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Segment::Key(key));
        p
    }
    fn item(&self, key: &'static str, index: usize) -> FieldPath {
        let mut p = self.key(key);
        p.0.push(Segment::Index(index));
        p
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// Read, parse and validate a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    load_str(&text, path)
}

/// Parse and validate config text; `path` is used for messages only.
pub fn load_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let located = |span: Option<std::ops::Range<usize>>, field: String, message: String| {
        let (line, column) = line_col(text, span.map_or(0, |s| s.start));
        ConfigError::Invalid {
            file: path.to_owned(),
            line,
            column,
            field,
            message,
        }
    };
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        // serde's messages ("invalid value: integer `-1`, expected u32") do
        // not always say which field: name it from the error's position.
        let field = e
            .span()
            .and_then(|span| path_at(text, span.start))
            .map_or_else(String::new, |p| format!("{p}: "));
        located(e.span(), field, e.message().trim().to_owned())
    })?;
    Config::from_raw(raw, path).map_err(|e| {
        let span = span_of(text, &e.path);
        located(span, format!("{}: ", e.path), e.message)
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    (line, column)
}

/// The span of the deepest part of `path` that exists in the document: the
/// field itself, or the table it is missing from.
fn span_of(text: &str, path: &FieldPath) -> Option<std::ops::Range<usize>> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut span = None;
    let mut table: Option<&toml::de::DeTable<'_>> = Some(doc.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue<'_>>> = None;
    for seg in &path.0 {
        let next = match (seg, table, value) {
            (Segment::Key(k), Some(t), _) => t.get(*k),
            (Segment::Key(k), None, Some(v)) => v.get_ref().get(*k),
            (Segment::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        span = Some(next.span());
        table = None;
        value = Some(next);
    }
    span
}

/// The path of the deepest key or value that contains byte `offset`.
fn path_at(text: &str, offset: usize) -> Option<String> {
    use toml::de::DeValue;
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = String::new();
    let mut table = doc.get_ref();
    'descend: loop {
        for (key, value) in table.iter() {
            let in_key = key.span().contains(&offset);
            // Table values may span only their header: look inside too.
            if !in_key && !value_contains(value, offset) {
                continue;
            }
            let mut candidate = path.clone();
            if !candidate.is_empty() {
                candidate.push('.');
            }
            candidate.push_str(key.get_ref());
            if in_key {
                return Some(candidate);
            }
            match value.get_ref() {
                DeValue::Table(t) => {
                    path = candidate;
                    table = t;
                    continue 'descend;
                }
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        if !value_contains(item, offset) {
                            continue;
                        }
                        if let DeValue::Table(t) = item.get_ref() {
                            path = format!("{candidate}[{i}]");
                            table = t;
                            continue 'descend;
                        }
                        return Some(format!("{candidate}[{i}]"));
                    }
                    return Some(candidate);
                }
                _ => return Some(candidate),
            }
        }
        return (!path.is_empty()).then_some(path);
    }
}

/// Whether a value, or any key or value inside it, contains `offset`.
fn value_contains(value: &toml::Spanned<toml::de::DeValue<'_>>, offset: usize) -> bool {
    use toml::de::DeValue;
    value.span().contains(&offset)
        || match value.get_ref() {
            DeValue::Table(t) => t
                .iter()
                .any(|(k, v)| k.span().contains(&offset) || value_contains(v, offset)),
            DeValue::Array(items) => items.iter().any(|item| value_contains(item, offset)),
            _ => false,
        }
}

impl Config {
    /// Validate raw config; errors name the field by path.
    pub fn from_raw(raw: RawConfig, source: &Path) -> Result<Config, FieldError> {
        let root = FieldPath::default();
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut names = HashSet::new();
        let mut binds: Vec<SocketAddr> = Vec::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let at = root.item("listener", i);
            check_name(&l.name, &at.key("name"))?;
            if !names.insert(l.name.clone()) {
                return Err(err(
                    at.key("name"),
                    format!("duplicate listener name `{}`", l.name),
                ));
            }
            let bind: SocketAddr = l.bind.parse().map_err(|_| {
                err(
                    at.key("bind"),
                    format!(
                        "`{}` is not an IP address and port (\"0.0.0.0:5432\" or \"[::]:5432\")",
                        l.bind
                    ),
                )
            })?;
            // The same address twice, or a wildcard (0.0.0.0, [::]) and any
            // address on the same port: the second bind would fail.
            if bind.port() != 0
                && let Some(other) = binds.iter().find(|b: &&SocketAddr| {
                    b.port() == bind.port()
                        && (**b == bind || b.ip().is_unspecified() || bind.ip().is_unspecified())
                })
            {
                return Err(err(
                    at.key("bind"),
                    format!("`{bind}` overlaps `{other}` of another listener"),
                ));
            }
            binds.push(bind);
            positive(l.connect_timeout, &at.key("connect_timeout"))?;
            positive(l.idle_timeout, &at.key("idle_timeout"))?;
            check_health(&l.health_check, &at.key("health_check"))?;
            let sticky = match l.sticky {
                None => None,
                Some(_) if l.mode != Mode::Http => {
                    return Err(err(
                        at.key("sticky"),
                        "lbcookie stickiness needs `mode = \"http\"` (a tcp listener cannot see cookies)"
                            .into(),
                    ));
                }
                Some(st) => {
                    let StickyMethod::Lbcookie = st.method;
                    check_cookie_name(&st.cookie, &at.key("sticky").key("cookie"))?;
                    if let Some(age) = st.max_age {
                        // Max-Age is in whole seconds: less would be 0,
                        // which tells the browser to delete the cookie.
                        at_least_a_second(age, &at.key("sticky").key("max_age"))?;
                    }
                    Some(Sticky {
                        cookie: st.cookie,
                        max_age: st.max_age,
                    })
                }
            };
            if l.header_timeout.is_some() && l.mode != Mode::Http {
                return Err(err(
                    at.key("header_timeout"),
                    "only applies to `mode = \"http\"`".into(),
                ));
            }
            let header_timeout = l.header_timeout.unwrap_or_else(defaults::header_timeout);
            positive(header_timeout, &at.key("header_timeout"))?;
            let allow = match &l.allow {
                None => None,
                Some(list) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(k, entry)| parse_net(entry).map_err(|m| err(at.item("allow", k), m)))
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            if l.max_connections == Some(0) {
                return Err(err(at.key("max_connections"), "must be at least 1".into()));
            }
            positive(l.queue_timeout, &at.key("queue_timeout"))?;
            if l.proxy_protocol != ProxyProtocol::Off && l.mode == Mode::Http {
                return Err(err(
                    at.key("proxy_protocol"),
                    "applies to `mode = \"tcp\"`; in http mode the client address is in X-Forwarded-For"
                        .into(),
                ));
            }
            let keepalive = if l.keepalive {
                // The kernel takes whole seconds, and at most 127 probes.
                at_least_a_second(l.keepalive_idle, &at.key("keepalive_idle"))?;
                at_least_a_second(l.keepalive_interval, &at.key("keepalive_interval"))?;
                if !(1..=127).contains(&l.keepalive_count) {
                    return Err(err(
                        at.key("keepalive_count"),
                        format!("{} is out of range 1..=127", l.keepalive_count),
                    ));
                }
                Some(Keepalive {
                    idle: l.keepalive_idle,
                    interval: l.keepalive_interval,
                    count: l.keepalive_count,
                })
            } else {
                None
            };
            if l.backends.is_empty() {
                return Err(err(
                    at.key("backend"),
                    format!(
                        "listener `{}` needs at least one [[listener.backend]]",
                        l.name
                    ),
                ));
            }
            let mut backends = Vec::with_capacity(l.backends.len());
            let mut bnames = HashSet::new();
            for (j, b) in l.backends.into_iter().enumerate() {
                let at = at.item("backend", j);
                check_name(&b.name, &at.key("name"))?;
                if !bnames.insert(b.name.clone()) {
                    return Err(err(
                        at.key("name"),
                        format!(
                            "duplicate backend name `{}` in listener `{}`",
                            b.name, l.name
                        ),
                    ));
                }
                if b.max_connections == Some(0) {
                    return Err(err(at.key("max_connections"), "must be at least 1".into()));
                }
                if b.weight > MAX_WEIGHT {
                    return Err(err(
                        at.key("weight"),
                        format!("{} is out of range 0..={MAX_WEIGHT}", b.weight),
                    ));
                }
                let addr = resolve(&b.address).map_err(|m| err(at.key("address"), m))?;
                backends.push(BackendConfig {
                    name: b.name.into(),
                    address: b.address,
                    addr,
                    weight: b.weight,
                    backup: b.backup,
                    max_connections: b.max_connections,
                });
            }
            listeners.push(Arc::new(ListenerConfig {
                name: l.name.into(),
                bind,
                mode: l.mode,
                algorithm: l.algorithm,
                connect_timeout: l.connect_timeout,
                idle_timeout: l.idle_timeout,
                retries: l.retries,
                freebind: l.freebind,
                allow,
                max_connections: l.max_connections,
                queue_timeout: l.queue_timeout,
                proxy_protocol: l.proxy_protocol,
                keepalive,
                on_marked_down: l.on_marked_down,
                health_check: l.health_check,
                header_timeout,
                sticky,
                backends,
            }));
        }
        let admin = match raw.admin {
            None => None,
            Some(a) => {
                let at = root.key("admin");
                let bind = a.bind.parse().map_err(|_| {
                    err(
                        at.key("bind"),
                        format!(
                            "`{}` is not an IP address and port (\"127.0.0.1:9900\")",
                            a.bind
                        ),
                    )
                })?;
                let token = match &a.token_file {
                    None => None,
                    Some(file) => Some(read_token(file).map_err(|m| err(at.key("token_file"), m))?),
                };
                Some(AdminConfig { bind, token })
            }
        };
        // A zero shutdown_timeout is allowed: it means "do not wait".
        Ok(Config {
            source: source.to_owned(),
            shutdown_timeout: raw.global.shutdown_timeout,
            admin,
            listeners,
        })
    }

    /// A one-screen summary, printed by `switchyard check`.
    pub fn summary(&self) -> String {
        use fmt::Write;
        let mut s = String::new();
        if let Some(a) = &self.admin {
            let _ = writeln!(
                s,
                "admin on {}{}",
                a.bind,
                if a.token.is_some() {
                    " (token required for changes)"
                } else {
                    ""
                }
            );
        }
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener {} on {} ({}, {}): {} backend(s)",
                l.name,
                l.bind,
                l.mode.as_str(),
                l.algorithm.as_str(),
                l.backends.len()
            );
            for b in &l.backends {
                let _ = writeln!(
                    s,
                    "  backend {} {} ({}) weight {}{}",
                    b.name,
                    b.address,
                    b.addr,
                    b.weight,
                    if b.backup { " backup" } else { "" }
                );
            }
        }
        s
    }
}

fn err(path: FieldPath, message: String) -> FieldError {
    FieldError { path, message }
}

/// Names appear in metric labels, URLs and cookies: keep them plain.
fn check_name(name: &str, at: &FieldPath) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(err(
            at.clone(),
            format!("`{name}` is not a valid name (1 to 64 of letters, digits, '-', '_', '.')"),
        ))
    }
}

fn check_health(h: &HealthCheck, at: &FieldPath) -> Result<(), FieldError> {
    positive(h.interval, &at.key("interval"))?;
    positive(h.timeout, &at.key("timeout"))?;
    if h.timeout > h.interval {
        return Err(err(
            at.key("timeout"),
            format!(
                "{} is longer than the interval ({}): probes would overlap",
                humantime::format_duration(h.timeout),
                humantime::format_duration(h.interval)
            ),
        ));
    }
    for (value, key) in [(h.fall, "fall"), (h.rise, "rise")] {
        if value == 0 {
            return Err(err(at.key(key), "must be at least 1".into()));
        }
    }
    Ok(())
}

/// A cookie name is an RFC 6265 token.
fn check_cookie_name(name: &str, at: &FieldPath) -> Result<(), FieldError> {
    let token = |c: u8| c.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&c);
    if !name.is_empty() && name.len() <= 64 && name.bytes().all(token) {
        Ok(())
    } else {
        Err(err(
            at.clone(),
            format!("`{name}` is not a valid cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
        ))
    }
}

fn at_least_a_second(d: Duration, at: &FieldPath) -> Result<(), FieldError> {
    if d < Duration::from_secs(1) {
        Err(err(
            at.clone(),
            "must be at least 1s (it is counted in whole seconds)".into(),
        ))
    } else {
        Ok(())
    }
}

fn positive(d: Duration, at: &FieldPath) -> Result<(), FieldError> {
    if d.is_zero() {
        Err(err(at.clone(), "must be greater than zero".into()))
    } else {
        Ok(())
    }
}

/// A CIDR ("10.0.0.0/8", "::1/128") or a single address.
fn parse_net(entry: &str) -> Result<ipnet::IpNet, String> {
    entry
        .parse::<ipnet::IpNet>()
        .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("`{entry}` is not an address or CIDR (\"10.0.0.0/8\", \"::1\")"))
}

/// The admin token: the file's content without surrounding white space.
fn read_token(file: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read token file {}: {e}", file.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", file.display()));
    }
    Ok(Secret(token.to_owned()))
}

/// `ip:port`, or `host:port` resolved now (first address wins).
fn resolve(address: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = address.parse() {
        return Ok(addr);
    }
    let mut addrs = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{address}`: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("`{address}` resolved to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        load_str(text, Path::new("test.toml"))
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    const GOOD: &str = r#"
[global]
shutdown_timeout = "5s"

[[listener]]
name = "pg"
bind = "127.0.0.1:5432"
algorithm = "leastconn"
connect_timeout = "500ms"

[[listener.backend]]
name = "pg1"
address = "127.0.0.1:6001"

[[listener.backend]]
name = "pg2"
address = "localhost:6002"
weight = 3

[[listener]]
name = "v6"
bind = "[::1]:8080"
[[listener.backend]]
name = "a"
address = "[::1]:9000"
"#;

    #[test]
    fn parses_a_full_config_with_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.listeners.len(), 2);
        let pg = &c.listeners[0];
        assert_eq!(&*pg.name, "pg");
        assert_eq!(pg.algorithm, Algorithm::Leastconn);
        assert_eq!(pg.mode, Mode::Tcp);
        assert_eq!(pg.connect_timeout, Duration::from_millis(500));
        assert_eq!(pg.idle_timeout, Duration::from_secs(3600));
        assert_eq!(pg.backends[0].weight, 1);
        assert_eq!(pg.backends[1].weight, 3);
        assert_eq!(pg.backends[1].addr.port(), 6002);
        assert!(pg.backends[1].addr.ip().is_loopback());
        assert_eq!(c.listeners[1].bind, "[::1]:8080".parse().unwrap());
        assert_eq!(c.listeners[1].algorithm, Algorithm::Roundrobin);
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let e = error("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nbogus = 1\n");
        assert!(e.starts_with("test.toml:4:1: "), "{e}");
        assert!(e.contains("unknown field `bogus`"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_duration_are_located() {
        let e = error("[global]\nshutdown_timeout = \"soon\"\n");
        assert!(e.starts_with("test.toml:2:"), "{e}");
        let e =
            error("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nalgorithm = \"random\"\n");
        assert!(e.starts_with("test.toml:4:"), "{e}");
        assert!(e.contains("unknown variant `random`"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_field_and_line() {
        let base = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n";
        let cases: &[(&str, &str, &str)] = &[
            (
                "[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\nweight = 999\n",
                "test.toml:7:10: listener[0].backend[0].weight: 999 is out of range",
                "weight",
            ),
            (
                "[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:3\"\n",
                "test.toml:8:8: listener[0].backend[1].name: duplicate backend name `x`",
                "dup backend",
            ),
            (
                "[[listener.backend]]\nname = \"x y\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].backend[0].name: `x y` is not a valid name",
                "bad name",
            ),
            (
                "[[listener.backend]]\nname = \"x\"\naddress = \"no-such-host.invalid:2\"\n",
                "test.toml:6:11: listener[0].backend[0].address: cannot resolve",
                "unresolvable",
            ),
            (
                "connect_timeout = \"0s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:19: listener[0].connect_timeout: must be greater than zero",
                "zero timeout",
            ),
            (
                "",
                "test.toml:1:1: listener[0].backend: listener `a` needs at least one",
                "no backends",
            ),
            (
                "[listener.health_check]\ninterval = \"0s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:12: listener[0].health_check.interval: must be greater than zero",
                "zero interval",
            ),
            (
                "[listener.health_check]\ninterval = \"1s\"\ntimeout = \"2s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:11: listener[0].health_check.timeout: 2s is longer than the interval (1s)",
                "timeout above interval",
            ),
            (
                "[listener.health_check]\nfall = 0\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].health_check.fall: must be at least 1",
                "fall 0",
            ),
            (
                "[listener.health_check]\nrise = 0\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].health_check.rise: must be at least 1",
                "rise 0",
            ),
            (
                "[listener.sticky]\nmethod = \"lbcookie\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:1: listener[0].sticky: lbcookie stickiness needs `mode = \"http\"`",
                "sticky on tcp",
            ),
            (
                "mode = \"http\"\n[listener.sticky]\nmethod = \"lbcookie\"\ncookie = \"a b\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:7:10: listener[0].sticky.cookie: `a b` is not a valid cookie name",
                "bad cookie name",
            ),
            (
                "mode = \"http\"\n[listener.sticky]\nmethod = \"ipaddr\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:10: listener[0].sticky.method: unknown variant `ipaddr`",
                "bad method",
            ),
            (
                "header_timeout = \"5s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:18: listener[0].header_timeout: only applies",
                "header timeout on tcp",
            ),
            (
                "allow = [\"10.0.0.0/8\", \"10.0.0.300\"]\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:24: listener[0].allow[1]: `10.0.0.300` is not an address or CIDR",
                "bad allow entry",
            ),
            (
                "max_connections = 0\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:19: listener[0].max_connections: must be at least 1",
                "zero max_connections",
            ),
            (
                "mode = \"http\"\nproxy_protocol = \"v2\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:18: listener[0].proxy_protocol: applies to `mode = \"tcp\"`",
                "proxy protocol in http mode",
            ),
            (
                "keepalive_count = 0\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:19: listener[0].keepalive_count: 0 is out of range 1..=127",
                "zero keepalive count",
            ),
            (
                "keepalive_interval = \"500ms\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:22: listener[0].keepalive_interval: must be at least 1s",
                "sub-second keepalive",
            ),
            (
                "mode = \"http\"\n[listener.sticky]\nmethod = \"lbcookie\"\nmax_age = \"500ms\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:7:11: listener[0].sticky.max_age: must be at least 1s",
                "sub-second max_age",
            ),
            (
                "[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\nmax_connections = 0\n",
                "test.toml:7:19: listener[0].backend[0].max_connections: must be at least 1",
                "zero backend cap",
            ),
            (
                "on_marked_down = \"restart\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:18: listener[0].on_marked_down: unknown variant `restart`",
                "bad on_marked_down",
            ),
        ];
        for (tail, want, what) in cases {
            let e = error(&format!("{base}{tail}"));
            assert!(
                e.starts_with(want),
                "{what}: got {e:?}, want prefix {want:?}"
            );
        }
    }

    #[test]
    fn duplicate_listener_and_bad_bind() {
        let one = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n";
        let e = error(&format!("{one}{one}"));
        assert!(
            e.starts_with("test.toml:8:8: listener[1].name: duplicate listener name `a`"),
            "{e}"
        );
        let e = error(&one.replace("127.0.0.1:1", "localhost:1"));
        assert!(
            e.starts_with("test.toml:3:8: listener[0].bind: `localhost:1` is not an IP"),
            "{e}"
        );
        let e = error(&format!(
            "{one}{}",
            one.replace("name = \"a\"", "name = \"b\"")
        ));
        assert!(
            e.starts_with("test.toml:9:8: listener[1].bind: `127.0.0.1:1` overlaps `127.0.0.1:1`"),
            "{e}"
        );
        let wildcard = one.replace("127.0.0.1:1", "0.0.0.0:1");
        let e = error(&format!(
            "{wildcard}{}",
            one.replace("name = \"a\"", "name = \"b\"")
        ));
        assert!(
            e.starts_with("test.toml:9:8: listener[1].bind: `127.0.0.1:1` overlaps `0.0.0.0:1`"),
            "{e}"
        );
        // Different ports on a wildcard are fine.
        let other_port = one
            .replace("name = \"a\"", "name = \"b\"")
            .replace("127.0.0.1:1", "127.0.0.1:2");
        assert!(load(&format!("{wildcard}{other_port}")).is_ok());
    }

    #[test]
    fn serde_errors_name_the_field_by_position() {
        let e = error(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n[[listener.backend]]\nname = \"y\"\naddress = \"127.0.0.1:3\"\nweight = -1\n",
        );
        assert!(
            e.starts_with("test.toml:10:10: listener[0].backend[1].weight: invalid value"),
            "{e}"
        );
        let e = error("[global]\nshutdown_timeout = 5\n");
        assert!(
            e.starts_with("test.toml:2:20: global.shutdown_timeout: "),
            "{e}"
        );
        let e = error("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\nretries = \"x\"\n");
        assert!(
            e.starts_with("test.toml:4:11: listener[0].retries: "),
            "{e}"
        );
    }

    #[test]
    fn admin_table_and_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let c = load(&format!("[admin]\ntoken_file = \"{}\"\n", token.display())).unwrap();
        let admin = c.admin.unwrap();
        assert_eq!(admin.bind, "127.0.0.1:9900".parse().unwrap());
        let secret = admin.token.unwrap();
        assert!(secret.matches(b"s3cret"));
        assert!(!secret.matches(b"s3cre"));
        assert!(!format!("{secret:?}").contains("s3cret"));
        assert!(load("").unwrap().admin.is_none());

        std::fs::write(&token, " \n").unwrap();
        let e = error(&format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token.display()
        ));
        assert!(
            e.starts_with("test.toml:3:14: admin.token_file: token file"),
            "{e}"
        );
        let e = error("[admin]\nbind = \"localhost\"\n");
        assert!(
            e.starts_with("test.toml:2:8: admin.bind: `localhost` is not"),
            "{e}"
        );
        let e = error("[admin]\nport = 1\n");
        assert!(e.contains("unknown field `port`"), "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = error("[[listener]\nname = 1\n");
        assert!(e.starts_with("test.toml:1:"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
