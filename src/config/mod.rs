//! The config file: serde types, defaults and validation.
//!
//! Loading is two steps. `raw` mirrors the TOML exactly
//! (`deny_unknown_fields`, durations as "2s"); `validate` then checks what
//! serde cannot (unique names, sane numbers, addresses that parse or resolve)
//! and produces the typed [`Config`] the daemon runs on. Every error carries
//! the *path* of the offending field (`listener[0].backend[1].weight`);
//! [`load_str`] resolves that path against the parsed document to report the
//! file, line and column, so an operator can jump straight to the mistake.
//! `switchyard check` and every (re)load go through [`load_file`].
//!
//! - this file: the validated types the daemon runs on, [`ConfigError`] and
//!   loading. The enums and `[listener.health_check]` live here too: serde
//!   reads them as the daemon uses them, so there is no raw twin.
//! - `raw`: the file as written, serde types and their defaults.
//! - `validate`: raw into validated, one function per table.
//! - `locate`: field paths, and where in the file they are.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use self::locate::{line_col, path_at, span_of};
use self::raw::{RawConfig, defaults};

mod locate;
mod raw;
mod validate;

pub(crate) use self::validate::read_token;

/// Default config path, as systemd units and packages expect it.
pub const DEFAULT_PATH: &str = "/etc/switchyard/switchyard.toml";

/// HAProxy's weight range; large enough for fine ratios, small enough that a
/// round-robin cycle (sum of weights) stays a few hundred KiB at 1000 backends.
pub const MAX_WEIGHT: u32 = 256;

// ---------------------------------------------------------------------------
// Validated types: what the daemon runs on.
// ---------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was loaded from (for messages and reloads).
    pub source: PathBuf,
    pub shutdown_timeout: Duration,
    /// How discovered names are resolved.
    pub dns: DnsSettings,
    /// The admin endpoint; `None` when the `[admin]` table is absent.
    pub admin: Option<AdminConfig>,
    pub listeners: Vec<Arc<ListenerConfig>>,
}

/// `[global]`'s settings for `discover = "dns"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers to ask; `None` = those of /etc/resolv.conf.
    pub servers: Option<Vec<SocketAddr>>,
    /// Time between the starts of two lookups of one name.
    pub interval: Duration,
    /// How long "no address" must persist before the set is emptied.
    pub hold: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            servers: None,
            interval: defaults::dns_interval(),
            hold: defaults::dns_hold(),
        }
    }
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

impl Secret {
    /// The secret itself, for sending to the one server it is for (a
    /// check's login). Never log or print it.
    pub fn expose(&self) -> &str {
        &self.0
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
    /// HTTP mode: longest a request body may go without a byte from the
    /// client, or a response without the client taking a byte.
    pub body_timeout: Duration,
    /// HTTP mode: lbCookie stickiness.
    pub sticky: Option<Sticky>,
    /// TLS termination (tcp and http modes): certificates loaded.
    pub tls: Option<Arc<crate::tls::Terminator>>,
    /// UDP mode: a session ends after this many replies.
    pub udp_replies: Option<u32>,
    /// In file order.
    pub backends: Vec<BackendEntry>,
}

/// One validated `[[listener.backend]]`: a backend, or a name that stands
/// for as many as it resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendEntry {
    /// `discover = "once"`: resolved at (re)load.
    Fixed(BackendConfig),
    /// `discover = "dns"`: kept resolved (`crate::discovery`).
    Dns(DnsBackend),
}

impl BackendEntry {
    /// The entry's `name`.
    pub fn name(&self) -> &Arc<str> {
        match self {
            BackendEntry::Fixed(b) => &b.name,
            BackendEntry::Dns(d) => &d.name,
        }
    }

    /// The backend, if the entry is one fixed address.
    pub fn fixed(&self) -> Option<&BackendConfig> {
        match self {
            BackendEntry::Fixed(b) => Some(b),
            BackendEntry::Dns(_) => None,
        }
    }

    /// The entry's `address` as written.
    pub fn address(&self) -> String {
        match self {
            BackendEntry::Fixed(b) => b.address.clone(),
            BackendEntry::Dns(d) => d.query.to_string(),
        }
    }
}

/// One backend: an address and how it takes connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    pub name: Arc<str>,
    /// The address as written (a host name stays visible in status output);
    /// for a discovered backend, the address found.
    pub address: String,
    /// What `address` resolved to.
    pub addr: SocketAddr,
    pub weight: u32,
    /// Used only while no non-backup backend is up.
    pub backup: bool,
    /// Connections at most; more wait in the listener's queue.
    pub max_connections: Option<u32>,
    /// The name of the `discover = "dns"` entry it was found for.
    pub discovered_from: Option<Arc<str>>,
}

/// A `discover = "dns"` entry: the name to resolve and the fields every
/// address found takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsBackend {
    pub name: Arc<str>,
    pub query: DnsQuery,
    /// For a host name; an SRV name's backends take their records' weights.
    pub weight: u32,
    pub backup: bool,
    pub max_connections: Option<u32>,
}

/// What a discovered entry asks DNS.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DnsQuery {
    /// A and AAAA records of `host`, every address on `port`.
    Host { host: String, port: u16 },
    /// SRV records (`_service._proto.name`): targets, ports, weights.
    Srv { name: String },
}

impl fmt::Display for DnsQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsQuery::Host { host, port } => write!(f, "{host}:{port}"),
            DnsQuery::Srv { name } => f.write_str(name),
        }
    }
}

/// A validated `[listener.sticky]` (lbCookie).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sticky {
    /// Cookie name.
    pub cookie: String,
    /// `Max-Age` of the inserted cookie; `None` = a session cookie.
    pub max_age: Option<Duration>,
}

/// TCP keepalive on client and backend sockets, in the kernel's units
/// (whole seconds; 12 bytes, which every connection's task carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle seconds before the first probe.
    pub idle_secs: u32,
    /// Seconds between probes.
    pub interval_secs: u32,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

// ---------------------------------------------------------------------------
// Read by serde as written, used as read.
// ---------------------------------------------------------------------------

/// How a backend entry's address is resolved (`discover`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Discover {
    /// At (re)load, first address wins.
    #[default]
    Once,
    /// Every address, kept up to date.
    Dns,
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
    /// Datagrams: sessions keyed by client address.
    Udp,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
            Mode::Udp => "udp",
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

/// A validated `[listener.health_check]`: what a probe of each backend
/// does, how often, and when results flip its health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between the starts of two probes of one backend.
    pub interval: Duration,
    /// A probe fails unless its whole exchange ends within this.
    pub timeout: Duration,
    /// Consecutive failures that mark an up backend down.
    pub fall: u32,
    /// Consecutive successes that mark a down backend up.
    pub rise: u32,
    /// What a probe proves.
    pub kind: CheckKind,
    /// Probe this port on the backend's host instead of the backend's port.
    pub port: Option<u16>,
    /// Database kinds: the role a server must have to pass.
    pub role: Role,
    /// Database kinds: the probe's login.
    pub user: Option<String>,
    /// postgres: the database to connect to (default: the user's name).
    pub database: Option<String>,
    /// From `password_file`, read at (re)load.
    pub password: Option<Secret>,
    /// http: the request path.
    pub path: String,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: defaults::check_interval(),
            timeout: defaults::check_timeout(),
            fall: defaults::fall(),
            rise: defaults::rise(),
            kind: CheckKind::Tcp,
            port: None,
            role: Role::Any,
            user: None,
            database: None,
            password: None,
            path: "/".into(),
        }
    }
}

/// What a health check proves (`kind`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// The TCP connection is established.
    #[default]
    Tcp,
    /// A PostgreSQL session is authenticated up to ReadyForQuery.
    Postgres,
    /// A MySQL/MariaDB greeting (and with `user`, a login).
    Mysql,
    /// Redis answers PING with PONG.
    Redis,
    /// An HTTP GET is answered with 2xx or 3xx.
    Http,
    /// No probes: always up.
    None,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Postgres => "postgres",
            CheckKind::Mysql => "mysql",
            CheckKind::Redis => "redis",
            CheckKind::Http => "http",
            CheckKind::None => "none",
        }
    }
}

/// The role a database server must have to pass its check.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Whatever it is.
    #[default]
    Any,
    /// Takes writes (PostgreSQL not in recovery, Redis master, MySQL with
    /// `read_only = 0`).
    Primary,
    /// A read-only copy.
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Any => "any",
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
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

impl ConfigError {
    /// Whether this is about what a listener's certificate or key file
    /// holds (which a renewal may be rewriting right now), not about the
    /// config itself (a certificates entry without a `key` is the config's).
    pub fn is_certificate_file(&self) -> bool {
        matches!(self, ConfigError::Invalid { field, .. }
            if field.contains(".tls.certificates[")
                && (field.ends_with("].cert: ") || field.ends_with("].key: ")))
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// Read, parse and validate a config file.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        // Where the text stops being UTF-8, and in which field.
        let at = e.utf8_error().valid_up_to();
        let before = std::str::from_utf8(&e.as_bytes()[..at]).unwrap_or_default();
        let (line, column) = line_col(before, at);
        ConfigError::Invalid {
            file: path.to_owned(),
            line,
            column,
            field: path_at(before, at).map_or_else(String::new, |p| format!("{p}: ")),
            message: "is not UTF-8 (a TOML file is UTF-8 text)".into(),
        }
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

impl Config {
    /// Every file this configuration was read from: the config itself
    /// and each listener's certificates and keys (`--watch` watches
    /// these).
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.source.clone()];
        for tls in self.listeners.iter().filter_map(|l| l.tls.as_ref()) {
            for f in &tls.files {
                files.extend([f.cert.clone(), f.key.clone()]);
            }
        }
        files
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
            let h = &l.health_check;
            let role = match h.role {
                Role::Any => String::new(),
                role => format!(", role {}", role.as_str()),
            };
            let _ = writeln!(
                s,
                "listener {} on {} ({}, {}, {} check{role}): {} backend(s)",
                l.name,
                l.bind,
                l.mode.as_str(),
                l.algorithm.as_str(),
                h.kind.as_str(),
                l.backends.len()
            );
            for entry in &l.backends {
                let _ = match entry {
                    BackendEntry::Fixed(b) => writeln!(
                        s,
                        "  backend {} {} ({}) weight {}{}",
                        b.name,
                        b.address,
                        b.addr,
                        b.weight,
                        if b.backup { " backup" } else { "" }
                    ),
                    BackendEntry::Dns(d) => writeln!(
                        s,
                        "  backend {} {} (kept resolved every {}){}",
                        d.name,
                        d.query,
                        humantime::format_duration(self.dns.interval),
                        if d.backup { " backup" } else { "" }
                    ),
                };
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load `text` as if from `test.toml` (the tests of every file here).
    pub(super) fn load(text: &str) -> Result<Config, ConfigError> {
        load_str(text, Path::new("test.toml"))
    }

    /// The error `text` fails with, as the operator reads it.
    pub(super) fn error(text: &str) -> String {
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
        assert_eq!(pg.backends[0].fixed().unwrap().weight, 1);
        assert_eq!(pg.backends[1].fixed().unwrap().weight, 3);
        assert_eq!(pg.backends[1].fixed().unwrap().addr.port(), 6002);
        assert!(pg.backends[1].fixed().unwrap().addr.ip().is_loopback());
        assert_eq!(c.listeners[1].bind, "[::1]:8080".parse().unwrap());
        assert_eq!(c.listeners[1].algorithm, Algorithm::Roundrobin);
    }

    #[test]
    fn syntax_error_is_located() {
        let e = error("[[listener]\nname = 1\n");
        assert!(e.starts_with("test.toml:1:"), "{e}");
    }
}
