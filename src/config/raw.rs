//! The file as written: serde types that mirror the TOML table by table
//! (`deny_unknown_fields`, so a misspelt key is an error rather than a
//! silently ignored setting), and the defaults of what may be left out.
//!
//! Nothing here is checked beyond what serde does; `validate` turns these
//! into the types the daemon runs on.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Algorithm, CheckKind, Discover, Mode, OnMarkedDown, ProxyProtocol, Role};

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub global: RawGlobal,
    pub admin: Option<RawAdmin>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<RawListener>,
}

/// `[global]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGlobal {
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Name servers for `discover = "dns"` ("ip" or "ip:port"); absent =
    /// those of /etc/resolv.conf.
    pub dns_servers: Option<Vec<String>>,
    #[serde(default = "defaults::dns_interval", with = "humantime_serde")]
    pub dns_interval: Duration,
    #[serde(default = "defaults::dns_hold", with = "humantime_serde")]
    pub dns_hold: Duration,
}

impl Default for RawGlobal {
    fn default() -> Self {
        RawGlobal {
            shutdown_timeout: defaults::shutdown_timeout(),
            dns_servers: None,
            dns_interval: defaults::dns_interval(),
            dns_hold: defaults::dns_hold(),
        }
    }
}

/// `[admin]`: the metrics and admin API endpoint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "defaults::admin_bind")]
    pub bind: String,
    pub token_file: Option<PathBuf>,
}

/// `[[listener]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub name: String,
    pub bind: String,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Absent = 1h, or 30s on udp.
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Absent = 2; an error on udp, as written.
    pub retries: Option<u32>,
    #[serde(default)]
    pub freebind: bool,
    /// Source allow-list (CIDRs or addresses); absent = everyone.
    pub allow: Option<Vec<String>>,
    pub max_connections: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// udp only: a session ends after this many replies.
    pub udp_replies: Option<u32>,
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
    pub health_check: RawHealthCheck,
    /// HTTP mode: how long a client may take to send a request's headers.
    #[serde(default, with = "humantime_serde")]
    pub header_timeout: Option<Duration>,
    /// HTTP mode: how long a body may go without a byte moving.
    #[serde(default, with = "humantime_serde")]
    pub body_timeout: Option<Duration>,
    pub sticky: Option<RawSticky>,
    pub tls: Option<RawTls>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<RawBackend>,
}

/// `[listener.tls]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub min_version: RawTlsVersion,
}

/// One entry of `[listener.tls] certificates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub(super) enum RawTlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// `[listener.health_check]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(default = "defaults::check_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "defaults::check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "defaults::fall")]
    pub fall: u32,
    #[serde(default = "defaults::rise")]
    pub rise: u32,
    /// Absent = tcp, or none on udp.
    pub kind: Option<CheckKind>,
    pub port: Option<u16>,
    pub role: Option<Role>,
    pub user: Option<String>,
    pub database: Option<String>,
    pub password_file: Option<PathBuf>,
    pub path: Option<String>,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        RawHealthCheck {
            interval: defaults::check_interval(),
            timeout: defaults::check_timeout(),
            fall: defaults::fall(),
            rise: defaults::rise(),
            kind: None,
            port: None,
            role: None,
            user: None,
            database: None,
            password_file: None,
            path: None,
        }
    }
}

/// `[listener.sticky]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSticky {
    pub method: StickyMethod,
    #[serde(default = "defaults::cookie")]
    pub cookie: String,
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

/// `[[listener.backend]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub name: String,
    pub address: String,
    /// Absent = 1, or from the SRV records of a discovered SRV name.
    pub weight: Option<u32>,
    #[serde(default)]
    pub backup: bool,
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub discover: Discover,
}

/// How a client is kept on one backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StickyMethod {
    /// The balancer inserts a cookie naming the backend (HAProxy
    /// `cookie NAME insert indirect nocache`).
    Lbcookie,
}

/// What the file may leave out; where a number is a choice, its comment says
/// where it comes from.
pub(super) mod defaults {
    use std::time::Duration;

    /// An operator interface: loopback unless the operator says otherwise.
    pub fn admin_bind() -> String {
        "127.0.0.1:9900".into()
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    /// Consul's and Kubernetes' DNS answer with TTLs of 0 to 30 s; 5 s
    /// follows a scale-up or a failover within seconds at one query per
    /// name every 5 s.
    pub fn dns_interval() -> Duration {
        Duration::from_secs(5)
    }
    /// Longer than a typical resolver restart or a registry's brief gap
    /// between deregistering and re-registering an instance, so neither
    /// empties a pool; short enough that a decommissioned name is dropped
    /// within a minute.
    pub fn dns_hold() -> Duration {
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
    /// nginx stream's `proxy_timeout` default is 10m, Envoy's UDP proxy
    /// idle timeout 60s; a UDP session is usually one exchange (DNS) or a
    /// steady stream (syslog), so 30s frees sessions quickly without
    /// splitting a live stream.
    pub fn udp_idle_timeout() -> Duration {
        Duration::from_secs(30)
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
    /// nginx's `client_body_timeout` and `send_timeout` are 60 s; half
    /// that is plenty for a client that is alive, and halves what a
    /// stalled one holds.
    pub fn body_timeout() -> Duration {
        Duration::from_secs(30)
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

#[cfg(test)]
mod tests {
    use crate::config::tests::error;

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
}
