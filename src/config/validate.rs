//! Raw into validated: what serde cannot check (unique names, sane numbers,
//! addresses that parse or resolve), one function per table.
//!
//! Each function takes the path of its table and names the offending field
//! below it, so `locate` can point at the line. The checks run in file
//! order and the first failure is the error: listeners (and, within each,
//! its settings top to bottom, then its backends), then `[admin]`.

use std::collections::HashSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::locate::{FieldError, FieldPath};
use super::raw::{
    RawAdmin, RawBackend, RawConfig, RawGlobal, RawHealthCheck, RawListener, RawSticky, RawTls,
    RawTlsVersion, StickyMethod, defaults,
};
use super::{
    AdminConfig, BackendConfig, BackendEntry, CheckKind, Config, Discover, DnsBackend, DnsQuery,
    DnsSettings, HealthCheck, Keepalive, ListenerConfig, MAX_WEIGHT, Mode, ProxyProtocol, Role,
    Secret, Sticky,
};

impl Config {
    /// Validate raw config; errors name the field by path.
    pub(super) fn from_raw(raw: RawConfig, source: &Path) -> Result<Config, FieldError> {
        let root = FieldPath::default();
        let (shutdown_timeout, dns) = global(raw.global, &root.key("global"))?;
        let mut listeners = Vec::with_capacity(raw.listeners.len());
        let mut names = HashSet::new();
        let mut binds = Vec::new();
        for (i, l) in raw.listeners.into_iter().enumerate() {
            let at = root.item("listener", i);
            listeners.push(Arc::new(listener(l, &at, &mut names, &mut binds)?));
        }
        let admin = match raw.admin {
            None => None,
            Some(a) => Some(admin(a, &root.key("admin"))?),
        };
        Ok(Config {
            source: source.to_owned(),
            shutdown_timeout,
            dns,
            admin,
            listeners,
        })
    }
}

/// `[global]`: the shutdown grace period and how discovered names are
/// resolved.
fn global(raw: RawGlobal, at: &FieldPath) -> Result<(Duration, DnsSettings), FieldError> {
    // A zero shutdown_timeout is allowed: it means "do not wait"; a zero
    // dns_hold means "believe an empty answer at once".
    positive(raw.dns_interval, &at.key("dns_interval"))?;
    let servers = match raw.dns_servers {
        None => None,
        Some(list) => Some(
            list.iter()
                .enumerate()
                .map(|(k, s)| dns_server(s).map_err(|m| err(at.item("dns_servers", k), m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    if servers.as_ref().is_some_and(Vec::is_empty) {
        return Err(err(
            at.key("dns_servers"),
            "is empty: list at least one server, or leave it out for /etc/resolv.conf's".into(),
        ));
    }
    let dns = DnsSettings {
        servers,
        interval: raw.dns_interval,
        hold: raw.dns_hold,
    };
    Ok((raw.shutdown_timeout, dns))
}

/// A name server: "ip:port", or an IP alone for port 53.
fn dns_server(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .map_err(|_| {
            format!("`{text}` is not an IP address, with or without a port (\"10.0.0.2\", \"127.0.0.1:8600\")")
        })
}

/// `[admin]`: an address that parses (no name to resolve) and a token file
/// that reads.
fn admin(a: RawAdmin, at: &FieldPath) -> Result<AdminConfig, FieldError> {
    let bind: SocketAddr = a.bind.parse().map_err(|_| {
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
    // State changes drain and stop backends: off loopback, whoever reaches
    // the address could do that without a token.
    if token.is_none() && !bind.ip().to_canonical().is_loopback() {
        return Err(err(
            at.key("bind"),
            format!(
                "`{bind}` is reachable off this host and `[admin] token_file` is not set; \
                 set `token_file` (state changes then need the token) or bind to loopback \
                 (\"127.0.0.1:9900\")"
            ),
        ));
    }
    Ok(AdminConfig { bind, token })
}

/// One `[[listener]]`; `names` and `binds` hold those of the listeners
/// before it, which this one must not repeat.
fn listener(
    l: RawListener,
    at: &FieldPath,
    names: &mut HashSet<String>,
    binds: &mut Vec<(SocketAddr, bool)>,
) -> Result<ListenerConfig, FieldError> {
    listener_name(&l.name, &at.key("name"), names)?;
    let udp = l.mode == Mode::Udp;
    let bind = listener_bind(&l.bind, udp, &at.key("bind"), binds)?;
    positive(l.connect_timeout, &at.key("connect_timeout"))?;
    if udp {
        not_on_udp(&l, at)?;
    } else if l.udp_replies.is_some() {
        return Err(err(
            at.key("udp_replies"),
            "only applies to `mode = \"udp\"`".into(),
        ));
    }
    at_least_one(l.udp_replies, &at.key("udp_replies"))?;
    let idle_timeout = l.idle_timeout.unwrap_or_else(if udp {
        defaults::udp_idle_timeout
    } else {
        defaults::idle_timeout
    });
    positive(idle_timeout, &at.key("idle_timeout"))?;
    let health_check = health_check(l.health_check, l.mode, &at.key("health_check"))?;
    let sticky = match l.sticky {
        None => None,
        Some(st) => Some(sticky(st, l.mode, &at.key("sticky"))?),
    };
    let tls = match l.tls {
        None => None,
        Some(t) => Some(tls(t, l.mode, &at.key("tls"))?),
    };
    let header_timeout = http_timeout(
        l.header_timeout,
        defaults::header_timeout,
        l.mode,
        &at.key("header_timeout"),
    )?;
    let body_timeout = http_timeout(
        l.body_timeout,
        defaults::body_timeout,
        l.mode,
        &at.key("body_timeout"),
    )?;
    let allow = match &l.allow {
        None => None,
        Some(list) => Some(allow(list, at)?),
    };
    at_least_one(l.max_connections, &at.key("max_connections"))?;
    let queue_timeout = l.queue_timeout.unwrap_or_else(defaults::queue_timeout);
    positive(queue_timeout, &at.key("queue_timeout"))?;
    let proxy_protocol = l.proxy_protocol.unwrap_or_default();
    check_proxy_protocol(proxy_protocol, l.mode, &at.key("proxy_protocol"))?;
    let keepalive = keepalive(
        l.keepalive,
        (l.keepalive_idle, l.keepalive_interval, l.keepalive_count),
        at,
    )?;
    let backends = backends(l.backends, &l.name, l.mode, at)?;
    Ok(ListenerConfig {
        name: l.name.into(),
        bind,
        mode: l.mode,
        algorithm: l.algorithm,
        connect_timeout: l.connect_timeout,
        idle_timeout,
        retries: l.retries.unwrap_or_else(defaults::retries),
        freebind: l.freebind,
        allow,
        max_connections: l.max_connections,
        queue_timeout,
        proxy_protocol,
        keepalive,
        on_marked_down: l.on_marked_down,
        health_check,
        header_timeout,
        body_timeout,
        sticky,
        tls,
        udp_replies: l.udp_replies,
        backends,
    })
}

/// What a udp listener may not set at all, whatever the value: stream
/// and HTTP settings that would silently mean nothing for datagrams.
fn not_on_udp(l: &RawListener, at: &FieldPath) -> Result<(), FieldError> {
    let set = [
        ("sticky", l.sticky.is_some()),
        ("tls", l.tls.is_some()),
        ("proxy_protocol", l.proxy_protocol.is_some()),
        ("retries", l.retries.is_some()),
        ("queue_timeout", l.queue_timeout.is_some()),
    ];
    if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
        return Err(err(
            at.key(key),
            "does not apply to `mode = \"udp\"` (a datagram is sent once, to one backend)".into(),
        ));
    }
    Ok(())
}

/// A listener's `name`: plain, and not taken by an earlier listener (in
/// `names`, which it joins).
fn listener_name(
    name: &str,
    at: &FieldPath,
    names: &mut HashSet<String>,
) -> Result<(), FieldError> {
    check_name(name, at)?;
    if !names.insert(name.to_owned()) {
        return Err(err(at.clone(), format!("duplicate listener name `{name}`")));
    }
    Ok(())
}

/// A listener's `bind`: an IP address and port that no earlier listener
/// of the same protocol (in `binds`, which it joins; `true` = udp) would
/// keep it from binding. A udp and a tcp listener may share a port (DNS).
fn listener_bind(
    text: &str,
    udp: bool,
    at: &FieldPath,
    binds: &mut Vec<(SocketAddr, bool)>,
) -> Result<SocketAddr, FieldError> {
    let bind: SocketAddr = text.parse().map_err(|_| {
        err(
            at.clone(),
            format!("`{text}` is not an IP address and port (\"0.0.0.0:5432\" or \"[::]:5432\")"),
        )
    })?;
    // The same address twice, or a wildcard (0.0.0.0, [::]) and any
    // address on the same port: the second bind would fail.
    if bind.port() != 0
        && let Some((other, _)) = binds.iter().find(|(b, other_udp)| {
            *other_udp == udp
                && b.port() == bind.port()
                && (*b == bind || b.ip().is_unspecified() || bind.ip().is_unspecified())
        })
    {
        return Err(err(
            at.clone(),
            format!("`{bind}` overlaps `{other}` of another listener"),
        ));
    }
    binds.push((bind, udp));
    Ok(bind)
}

/// An HTTP mode timeout (`header_timeout`, `body_timeout`): refused in
/// other modes, defaulted in http mode.
fn http_timeout(
    written: Option<Duration>,
    default: fn() -> Duration,
    mode: Mode,
    at: &FieldPath,
) -> Result<Duration, FieldError> {
    if written.is_some() && mode != Mode::Http {
        return Err(err(at.clone(), "only applies to `mode = \"http\"`".into()));
    }
    let timeout = written.unwrap_or_else(default);
    positive(timeout, at)?;
    Ok(timeout)
}

/// A PROXY header only in tcp mode: HTTP mode says who the client is in a
/// request header instead.
fn check_proxy_protocol(pp: ProxyProtocol, mode: Mode, at: &FieldPath) -> Result<(), FieldError> {
    if pp != ProxyProtocol::Off && mode == Mode::Http {
        return Err(err(
            at.clone(),
            "applies to `mode = \"tcp\"`; in http mode the client address is in X-Forwarded-For"
                .into(),
        ));
    }
    Ok(())
}

/// A listener's `allow` list, each entry located by its index.
fn allow(list: &[String], at: &FieldPath) -> Result<Vec<ipnet::IpNet>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(k, entry)| parse_net(entry).map_err(|m| err(at.item("allow", k), m)))
        .collect()
}

/// A listener's `keepalive*` settings; `None` when keepalive is off (the
/// other settings are then not checked).
fn keepalive(
    on: bool,
    (idle, interval, count): (Duration, Duration, u32),
    at: &FieldPath,
) -> Result<Option<Keepalive>, FieldError> {
    if !on {
        return Ok(None);
    }
    // The kernel takes whole seconds, at most 32767 (MAX_TCP_KEEPIDLE,
    // MAX_TCP_KEEPINTVL), and at most 127 probes.
    let secs = |d: Duration, key: &'static str| -> Result<u32, FieldError> {
        at_least_a_second(d, &at.key(key))?;
        match d.as_secs() {
            s @ 1..=32767 => Ok(s as u32),
            _ => Err(err(
                at.key(key),
                "must be at most 32767s (the kernel's limit)".into(),
            )),
        }
    };
    let idle_secs = secs(idle, "keepalive_idle")?;
    let interval_secs = secs(interval, "keepalive_interval")?;
    if !(1..=127).contains(&count) {
        return Err(err(
            at.key("keepalive_count"),
            format!("{count} is out of range 1..=127"),
        ));
    }
    Ok(Some(Keepalive {
        idle_secs,
        interval_secs,
        count,
    }))
}

/// `[listener.health_check]`: probes that end before the next one starts,
/// and of each kind only its own fields.
fn health_check(h: RawHealthCheck, mode: Mode, at: &FieldPath) -> Result<HealthCheck, FieldError> {
    positive(h.interval, &at.key("interval"))?;
    // A udp service has no standard probe: none unless asked for tcp
    // (DNS servers answer on TCP too).
    let kind = h.kind.unwrap_or(if mode == Mode::Udp {
        CheckKind::None
    } else {
        CheckKind::Tcp
    });
    if mode == Mode::Udp && !matches!(kind, CheckKind::None | CheckKind::Tcp) {
        return Err(err(
            at.key("kind"),
            format!(
                "kind = \"{}\" does not apply to `mode = \"udp\"` (\"none\" or \"tcp\")",
                kind.as_str()
            ),
        ));
    }
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
    check_kind_fields(&h, kind, at)?;
    if h.port == Some(0) {
        return Err(err(at.key("port"), "must be 1..=65535".into()));
    }
    if kind == CheckKind::Postgres && h.user.is_none() {
        return Err(err(
            at.key("user"),
            "kind = \"postgres\" needs `user` (the probe logs in)".into(),
        ));
    }
    if kind == CheckKind::Mysql && h.role.is_some() && h.user.is_none() {
        return Err(err(
            at.key("role"),
            "needs `user`: the role is read after a login".into(),
        ));
    }
    if let Some(path) = &h.path
        && !path.starts_with('/')
    {
        return Err(err(at.key("path"), format!("`{path}` must start with `/`")));
    }
    let password = match &h.password_file {
        None => None,
        Some(file) => Some(read_password(file).map_err(|m| err(at.key("password_file"), m))?),
    };
    Ok(HealthCheck {
        interval: h.interval,
        timeout: h.timeout,
        fall: h.fall,
        rise: h.rise,
        kind,
        port: h.port,
        role: h.role.unwrap_or(Role::Any),
        user: h.user,
        database: h.database,
        password,
        path: h.path.unwrap_or_else(|| "/".into()),
    })
}

/// Each check kind takes only its own fields (SPEC's table); any other is
/// an error naming it.
fn check_kind_fields(
    h: &RawHealthCheck,
    kind: CheckKind,
    at: &FieldPath,
) -> Result<(), FieldError> {
    use CheckKind::*;
    let given: [(&'static str, bool, &[CheckKind]); 6] = [
        (
            "port",
            h.port.is_some(),
            &[Tcp, Http, Postgres, Mysql, Redis],
        ),
        ("role", h.role.is_some(), &[Postgres, Mysql, Redis]),
        ("user", h.user.is_some(), &[Postgres, Mysql, Redis]),
        ("database", h.database.is_some(), &[Postgres]),
        (
            "password_file",
            h.password_file.is_some(),
            &[Postgres, Mysql, Redis],
        ),
        ("path", h.path.is_some(), &[Http]),
    ];
    for (key, set, kinds) in given {
        if set && !kinds.contains(&kind) {
            return Err(err(
                at.key(key),
                format!(
                    "does not apply to kind = \"{}\" (it applies to {})",
                    kind.as_str(),
                    kinds
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// `[listener.sticky]` of a listener in `mode`: only HTTP sees cookies.
fn sticky(st: RawSticky, mode: Mode, at: &FieldPath) -> Result<Sticky, FieldError> {
    if mode != Mode::Http {
        return Err(err(
            at.clone(),
            "lbcookie stickiness needs `mode = \"http\"` (a tcp listener cannot see cookies)"
                .into(),
        ));
    }
    let StickyMethod::Lbcookie = st.method;
    check_cookie_name(&st.cookie, &at.key("cookie"))?;
    if let Some(age) = st.max_age {
        // Max-Age is in whole seconds: less would be 0,
        // which tells the browser to delete the cookie.
        at_least_a_second(age, &at.key("max_age"))?;
    }
    Ok(Sticky {
        cookie: st.cookie,
        max_age: st.max_age,
    })
}

/// `[listener.tls]`: every certificate loaded and checked now (at start,
/// `check` and reload alike), so a bad file names its field.
fn tls(t: RawTls, mode: Mode, at: &FieldPath) -> Result<Arc<crate::tls::Terminator>, FieldError> {
    use crate::tls::{CertFiles, MinVersion, Terminator, Which};
    if t.certificates.is_empty() {
        return Err(err(
            at.key("certificates"),
            "needs at least one `{ cert = \"…\", key = \"…\" }`".into(),
        ));
    }
    let files: Vec<CertFiles> = t
        .certificates
        .into_iter()
        .map(|c| CertFiles {
            cert: c.cert,
            key: c.key,
        })
        .collect();
    let min_version = match t.min_version {
        RawTlsVersion::Tls12 => MinVersion::Tls12,
        RawTlsVersion::Tls13 => MinVersion::Tls13,
    };
    Terminator::load(&files, min_version, mode == Mode::Http)
        .map(Arc::new)
        .map_err(|(i, e)| {
            let field = match e.which {
                Which::Cert => "cert",
                Which::Key => "key",
            };
            err(at.item("certificates", i).key(field), e.message)
        })
}

/// The `[[listener.backend]]` list of listener `listener` (at `at`): at
/// least one, names unique within it.
fn backends(
    raw: Vec<RawBackend>,
    listener: &str,
    mode: Mode,
    at: &FieldPath,
) -> Result<Vec<BackendEntry>, FieldError> {
    if raw.is_empty() {
        return Err(err(
            at.key("backend"),
            format!("listener `{listener}` needs at least one [[listener.backend]]"),
        ));
    }
    let mut names = HashSet::new();
    raw.into_iter()
        .enumerate()
        .map(|(j, b)| {
            let at = at.item("backend", j);
            if mode == Mode::Udp && b.max_connections.is_some() {
                // Sessions cannot wait in a queue: there is nothing to hold.
                return Err(err(
                    at.key("max_connections"),
                    "does not apply to `mode = \"udp\"` (cap the listener's sessions instead)"
                        .into(),
                ));
            }
            backend(b, listener, &at, &mut names)
        })
        .collect()
}

/// One `[[listener.backend]]`, its address resolved now unless it is kept
/// resolved; `names` holds those of the listener's backends before it.
fn backend(
    b: RawBackend,
    listener: &str,
    at: &FieldPath,
    names: &mut HashSet<String>,
) -> Result<BackendEntry, FieldError> {
    check_name(&b.name, &at.key("name"))?;
    if !names.insert(b.name.clone()) {
        return Err(err(
            at.key("name"),
            format!(
                "duplicate backend name `{}` in listener `{listener}`",
                b.name
            ),
        ));
    }
    at_least_one(b.max_connections, &at.key("max_connections"))?;
    if let Some(w) = b.weight
        && w > MAX_WEIGHT
    {
        return Err(err(
            at.key("weight"),
            format!("{w} is out of range 0..={MAX_WEIGHT}"),
        ));
    }
    let weight = b.weight.unwrap_or_else(defaults::weight);
    if b.discover == Discover::Dns {
        let query = dns_query(&b.address).map_err(|m| err(at.key("address"), m))?;
        if matches!(query, DnsQuery::Srv { .. }) && b.weight.is_some() {
            return Err(err(
                at.key("weight"),
                "an SRV name's backends take the weights of its records".into(),
            ));
        }
        return Ok(BackendEntry::Dns(DnsBackend {
            name: b.name.into(),
            query,
            weight,
            backup: b.backup,
            max_connections: b.max_connections,
        }));
    }
    if b.address.starts_with('_') {
        return Err(err(
            at.key("address"),
            format!(
                "`{}` is an SRV name: it needs `discover = \"dns\"`",
                b.address
            ),
        ));
    }
    let addr = resolve(&b.address).map_err(|m| err(at.key("address"), m))?;
    Ok(BackendEntry::Fixed(BackendConfig {
        name: b.name.into(),
        address: b.address,
        addr,
        weight,
        backup: b.backup,
        max_connections: b.max_connections,
        discovered_from: None,
    }))
}

/// A discovered entry's `address`: `host:port` (A and AAAA), or an SRV
/// name (`_service._proto.name`, no port).
fn dns_query(address: &str) -> Result<DnsQuery, String> {
    if address.parse::<SocketAddr>().is_ok() {
        return Err(format!(
            "`{address}` is an address, not a name: leave out `discover` (there is nothing to keep resolved)"
        ));
    }
    if address.starts_with('_') {
        dns_name(address)?;
        return Ok(DnsQuery::Srv {
            name: address.to_owned(),
        });
    }
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "`{address}` needs a port (\"db.internal:5432\"), or is an SRV name starting with `_`"
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(format!("`{port}` in `{address}` is not a port (1..=65535)")),
    };
    dns_name(host)?;
    Ok(DnsQuery::Host {
        host: host.to_owned(),
        port,
    })
}

/// A name DNS can be asked about: letters, digits, `-` and `_` in dot-
/// separated labels, within DNS's length limits.
fn dns_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !plain {
        return Err(format!(
            "`{name}` is not a DNS name (letters, digits, `-`, `_` and dots)"
        ));
    }
    hickory_resolver::proto::rr::Name::from_ascii(name)
        .map(drop)
        .map_err(|e| format!("`{name}` is not a DNS name: {e}"))
}

// ---------------------------------------------------------------------------
// Checks shared by the tables
// ---------------------------------------------------------------------------

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

/// A connection cap, when there is one: zero would refuse everything.
fn at_least_one(cap: Option<u32>, at: &FieldPath) -> Result<(), FieldError> {
    if cap == Some(0) {
        Err(err(at.clone(), "must be at least 1".into()))
    } else {
        Ok(())
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
pub(crate) fn read_token(file: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read token file {}: {e}", file.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("token file {} is empty", file.display()));
    }
    Ok(Secret(token.to_owned()))
}

/// A check password: the file's content without one trailing newline.
fn read_password(file: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read password file {}: {e}", file.display()))?;
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    Ok(Secret(password.to_owned()))
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
    use crate::config::tests::{error, load};
    use crate::config::{BackendEntry, CheckKind, DnsBackend, DnsQuery, DnsSettings, Mode, Role};
    use std::net::SocketAddr;
    use std::time::Duration;

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
                "body_timeout = \"5s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:16: listener[0].body_timeout: only applies",
                "body timeout on tcp",
            ),
            (
                "mode = \"http\"\nbody_timeout = \"0s\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:16: listener[0].body_timeout: must be greater than zero",
                "zero body timeout",
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
            (
                "[listener.health_check]\nrole = \"primary\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].health_check.role: does not apply to kind = \"tcp\" (it applies to postgres, mysql, redis)",
                "role on tcp",
            ),
            (
                "[listener.health_check]\nkind = \"postgres\"\npath = \"/x\"\nuser = \"u\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:8: listener[0].health_check.path: does not apply to kind = \"postgres\"",
                "path on postgres",
            ),
            (
                "[listener.health_check]\nkind = \"none\"\nport = 8008\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:8: listener[0].health_check.port: does not apply to kind = \"none\"",
                "port on none",
            ),
            (
                "[listener.health_check]\nkind = \"postgres\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:4:1: listener[0].health_check.user: kind = \"postgres\" needs `user`",
                "postgres without user",
            ),
            (
                "[listener.health_check]\nkind = \"mysql\"\nrole = \"primary\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:8: listener[0].health_check.role: needs `user`",
                "mysql role without user",
            ),
            (
                "[listener.health_check]\nkind = \"http\"\npath = \"primary\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:8: listener[0].health_check.path: `primary` must start with `/`",
                "relative path",
            ),
            (
                "[listener.health_check]\nkind = \"redis\"\npassword_file = \"/nonexistent/check.pass\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:6:17: listener[0].health_check.password_file: cannot read password file /nonexistent/check.pass",
                "unreadable password file",
            ),
            (
                "[listener.health_check]\nkind = \"ldap\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].health_check.kind: unknown variant `ldap`",
                "unknown kind",
            ),
            (
                "[listener.health_check]\nport = 0\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
                "test.toml:5:8: listener[0].health_check.port: must be 1..=65535",
                "port 0",
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
    fn check_kinds_take_their_fields_and_the_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("check.pass");
        std::fs::write(&pass, " s3cret \n").unwrap();
        let text = format!(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[listener.health_check]\nkind = \"postgres\"\nport = 8008\nrole = \"replica\"\nuser = \"probe\"\ndatabase = \"app\"\npassword_file = \"{}\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n",
            pass.display()
        );
        let c = load(&text).unwrap();
        let h = &c.listeners[0].health_check;
        assert_eq!(h.kind, CheckKind::Postgres);
        assert_eq!((h.port, h.role), (Some(8008), Role::Replica));
        assert_eq!(
            (h.user.as_deref(), h.database.as_deref()),
            (Some("probe"), Some("app"))
        );
        let secret = h.password.as_ref().unwrap();
        // One trailing newline goes; spaces are part of the password.
        assert_eq!(secret.expose(), " s3cret ");
        assert!(!format!("{h:?}").contains("s3cret"));
        let plain = load("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[listener.health_check]\nkind = \"http\"\n[[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\n").unwrap();
        let h = &plain.listeners[0].health_check;
        assert_eq!(
            (h.kind, h.path.as_str(), h.role),
            (CheckKind::Http, "/", Role::Any)
        );
    }

    #[test]
    fn discovered_entries_and_dns_settings() {
        let c = load(
            "[global]\ndns_servers = [\"10.0.0.2\", \"127.0.0.1:8600\", \"[::1]:53\"]\ndns_interval = \"1s\"\ndns_hold = \"0s\"\n\
             [[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n\
             [[listener.backend]]\nname = \"web\"\naddress = \"web.internal:8080\"\ndiscover = \"dns\"\nweight = 3\nbackup = true\n\
             [[listener.backend]]\nname = \"pg\"\naddress = \"_pg._tcp.service.consul\"\ndiscover = \"dns\"\nmax_connections = 5\n\
             [[listener.backend]]\nname = \"x\"\naddress = \"127.0.0.1:2\"\ndiscover = \"once\"\n",
        )
        .unwrap();
        let servers: Vec<SocketAddr> = ["10.0.0.2:53", "127.0.0.1:8600", "[::1]:53"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(c.dns.servers.as_ref(), Some(&servers));
        assert_eq!(
            (c.dns.interval, c.dns.hold),
            (Duration::from_secs(1), Duration::ZERO)
        );
        let b = &c.listeners[0].backends;
        assert_eq!(
            b[0],
            BackendEntry::Dns(DnsBackend {
                name: "web".into(),
                query: DnsQuery::Host {
                    host: "web.internal".into(),
                    port: 8080
                },
                weight: 3,
                backup: true,
                max_connections: None,
            })
        );
        let BackendEntry::Dns(pg) = &b[1] else {
            panic!("{:?}", b[1])
        };
        assert_eq!(
            (&pg.query, pg.max_connections),
            (
                &DnsQuery::Srv {
                    name: "_pg._tcp.service.consul".into()
                },
                Some(5)
            )
        );
        assert!(b[2].fixed().is_some());
        let defaults = load("").unwrap().dns;
        assert_eq!(defaults, DnsSettings::default());
        assert_eq!(
            (defaults.servers, defaults.interval, defaults.hold),
            (None, Duration::from_secs(5), Duration::from_secs(30))
        );
    }

    #[test]
    fn discovery_mistakes_name_their_field() {
        let listener = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener.backend]]\nname = \"x\"\n";
        let cases = [
            (
                format!("{listener}address = \"10.0.0.1:80\"\ndiscover = \"dns\"\n"),
                "test.toml:6:11: listener[0].backend[0].address: `10.0.0.1:80` is an address, not a name",
            ),
            (
                format!("{listener}address = \"web.internal\"\ndiscover = \"dns\"\n"),
                "test.toml:6:11: listener[0].backend[0].address: `web.internal` needs a port",
            ),
            (
                format!("{listener}address = \"web.internal:0\"\ndiscover = \"dns\"\n"),
                "test.toml:6:11: listener[0].backend[0].address: `0` in `web.internal:0` is not a port",
            ),
            (
                format!("{listener}address = \"web internal:80\"\ndiscover = \"dns\"\n"),
                "test.toml:6:11: listener[0].backend[0].address: `web internal` is not a DNS name",
            ),
            (
                format!("{listener}address = \"_pg._tcp.db\"\ndiscover = \"dns\"\nweight = 2\n"),
                "test.toml:8:10: listener[0].backend[0].weight: an SRV name's backends take the weights of its records",
            ),
            (
                format!("{listener}address = \"_pg._tcp.db\"\n"),
                "test.toml:6:11: listener[0].backend[0].address: `_pg._tcp.db` is an SRV name: it needs `discover = \"dns\"`",
            ),
            (
                format!("{listener}address = \"web.internal:80\"\ndiscover = \"always\"\n"),
                "test.toml:7:12: listener[0].backend[0].discover: unknown variant `always`",
            ),
            (
                "[global]\ndns_servers = [\"10.0.0.2\", \"dns.internal\"]\n".into(),
                "test.toml:2:28: global.dns_servers[1]: `dns.internal` is not an IP address",
            ),
            (
                "[global]\ndns_servers = []\n".into(),
                "test.toml:2:15: global.dns_servers: is empty",
            ),
            (
                "[global]\ndns_interval = \"0s\"\n".into(),
                "test.toml:2:16: global.dns_interval: must be greater than zero",
            ),
        ];
        for (text, want) in cases {
            let e = error(&text);
            assert!(e.starts_with(want), "got {e:?}, want prefix {want:?}");
        }
    }

    #[test]
    fn udp_listeners_take_only_what_applies_to_datagrams() {
        let udp = "[[listener]]\nname = \"dns\"\nbind = \"127.0.0.1:53\"\nmode = \"udp\"\n";
        let backend = "[[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:5353\"\n";
        let c = load(&format!("{udp}udp_replies = 1\n{backend}")).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.mode, Mode::Udp);
        assert_eq!(l.idle_timeout, Duration::from_secs(30));
        assert_eq!(l.udp_replies, Some(1));
        assert_eq!(l.health_check.kind, CheckKind::None);
        let tcp_check = load(&format!(
            "{udp}[listener.health_check]\nkind = \"tcp\"\n{backend}"
        ))
        .unwrap();
        assert_eq!(tcp_check.listeners[0].health_check.kind, CheckKind::Tcp);
        // A tcp listener on the same address and port is another socket.
        let both = format!(
            "{udp}{backend}[[listener]]\nname = \"dns-tcp\"\nbind = \"127.0.0.1:53\"\n{backend}"
        );
        assert!(load(&both).is_ok());
        let cases = [
            (
                format!("{udp}retries = 0\n{backend}"),
                "test.toml:5:11: listener[0].retries: does not apply to `mode = \"udp\"`",
            ),
            (
                format!("{udp}proxy_protocol = \"off\"\n{backend}"),
                "test.toml:5:18: listener[0].proxy_protocol: does not apply",
            ),
            (
                format!("{udp}queue_timeout = \"1s\"\n{backend}"),
                "test.toml:5:17: listener[0].queue_timeout: does not apply",
            ),
            (
                format!("{udp}[listener.sticky]\nmethod = \"lbcookie\"\n{backend}"),
                "test.toml:5:1: listener[0].sticky: does not apply",
            ),
            (
                format!("{udp}{backend}max_connections = 5\n"),
                "test.toml:8:19: listener[0].backend[0].max_connections: does not apply to `mode = \"udp\"`",
            ),
            (
                format!(
                    "{udp}[listener.health_check]\nkind = \"postgres\"\nuser = \"u\"\n{backend}"
                ),
                "test.toml:6:8: listener[0].health_check.kind: kind = \"postgres\" does not apply to `mode = \"udp\"`",
            ),
            (
                format!("{udp}udp_replies = 0\n{backend}"),
                "test.toml:5:15: listener[0].udp_replies: must be at least 1",
            ),
            (
                format!("{udp}header_timeout = \"1s\"\n{backend}"),
                "test.toml:5:18: listener[0].header_timeout: only applies",
            ),
            (
                format!(
                    "[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:1\"\nudp_replies = 1\n{backend}"
                ),
                "test.toml:4:15: listener[0].udp_replies: only applies to `mode = \"udp\"`",
            ),
            (
                format!(
                    "{udp}{backend}[[listener]]\nname = \"dns2\"\nbind = \"0.0.0.0:53\"\nmode = \"udp\"\n{backend}"
                ),
                "test.toml:10:8: listener[1].bind: `0.0.0.0:53` overlaps `127.0.0.1:53`",
            ),
        ];
        for (text, want) in cases {
            let e = error(&text);
            assert!(e.starts_with(want), "got {e:?}, want prefix {want:?}");
        }
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

        for bind in ["0.0.0.0:9900", "[::]:9900", "10.1.2.3:9900"] {
            let e = error(&format!("[admin]\nbind = \"{bind}\"\n"));
            assert!(
                e.starts_with("test.toml:2:8: admin.bind: `") && e.contains("set `token_file`"),
                "{e}"
            );
            let with_token = format!(
                "[admin]\nbind = \"{bind}\"\ntoken_file = \"{}\"\n",
                token.display()
            );
            assert!(load(&with_token).is_ok(), "{bind}");
        }
        assert!(load("[admin]\nbind = \"[::1]:9900\"\n").is_ok());

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
}
