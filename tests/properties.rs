//! Property-based tests (proptest): what must hold for every input, not
//! only for the examples of the unit tests.
//!
//! 1. Config loading never panics, and every error names the file, a line
//!    and a field: on arbitrary bytes (as text, and as a file, where bytes
//!    that are not UTF-8 are an I/O error naming the file), on soups of
//!    TOML tokens, and on generated documents of the config's shape — every
//!    table (`[global]`, `[admin]`, `[[listener]]`, `[listener.health_check]`,
//!    `[listener.sticky]`, `[[listener.backend]]`, written as headers, inline
//!    tables or dotted keys) with valid and invalid values, wrong types,
//!    unknown keys, duplicate keys and tables, and clashing names and binds.
//!    For a generated document the line must be where the field named is
//!    written (or, for a field left out, its table); an error without a
//!    field is allowed only for text that is not TOML at all.
//! 2. PROXY protocol v1 and v2 headers, for arbitrary IPv4, IPv6 and
//!    IPv4-mapped source and destination addresses and ports, parse back with
//!    the independent `ppp` crate to the same addresses, and end exactly where
//!    the header does (the client's bytes follow).
//! 3. lbCookie: for arbitrary Cookie header lists (realistic names and
//!    values, separators with and without spaces, non-ASCII values, the
//!    balancer's cookie 0..n times anywhere), stripping removes exactly the
//!    balancer's cookie (with the separator after it, or before it when it
//!    is last) and passes every other byte unchanged, and finding returns
//!    the first of the balancer's cookies.
//! 4. Schedulers: smooth weighted round robin picks each backend exactly
//!    `weight` times in every window of `sum(weights)` picks; the source-hash
//!    table moves exactly the removed backend's slots when one backend is
//!    removed (every other slot keeps its owner), and does not depend on the
//!    order of the backends.
//!
//! # Case counts
//!
//! Each property runs a bounded number of cases (256, or 32 for the
//! source-hash tables, each of which is 65536 slots to build), so the file
//! runs in seconds in a debug build. To run more, set the count of every
//! property with `SWITCHYARD_PROPTEST_CASES` (or proptest's own
//! `PROPTEST_CASES`, which is read the same way):
//!
//! ```text
//! SWITCHYARD_PROPTEST_CASES=5000 cargo test --release --test properties
//! ```
//!
//! A failing case is shrunk to a small input and printed, and its seed is
//! saved in `tests/properties.proptest-regressions`, to be tried first next
//! time.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::path::Path;
use std::sync::Arc;

use hyper::header::{self, HeaderMap, HeaderValue};
use proptest::collection::{btree_set, vec};
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::FileFailurePersistence;
use switchyard::backend::{Backend, BackendState};
use switchyard::balancer::{Pool, SourceHash};
use switchyard::proxy::lbcookie::{find_cookie, strip_cookie};

use switchyard::config::{self, Algorithm, BackendConfig, ConfigError, MAX_WEIGHT, ProxyProtocol};
use switchyard::proxy::proxy_protocol;

/// The cases a property runs: `SWITCHYARD_PROPTEST_CASES` or
/// `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> u32 {
    ["SWITCHYARD_PROPTEST_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|var| {
            let value = std::env::var(var).ok()?;
            Some(
                value
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}={value:?} is not a number of cases")),
            )
        })
        .unwrap_or(default)
}

/// proptest's defaults (shrinking, `PROPTEST_*` variables) with [`cases`],
/// and failing cases saved in tests/properties.proptest-regressions (the
/// default place, beside a lib.rs, is not found for a file in tests/).
fn with_cases(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// 1. Config: a model of the document, rendered to TOML.
// ---------------------------------------------------------------------------

/// A TOML value as the generator writes it.
#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Val>),
    /// `{ key = value, … }`
    Inline(Vec<Field>),
}

/// `key = value`; a key of several segments is a dotted key.
#[derive(Debug, Clone)]
struct Field {
    key: Vec<String>,
    /// Written `"name" = …` even where a bare key would do.
    quoted: bool,
    value: Val,
}

/// How a sub-table (or `[global]`, `[admin]`) is written.
#[derive(Debug, Clone, Copy)]
enum Style {
    /// `[listener.health_check]`
    Header,
    /// `health_check = { … }`
    Inline,
    /// `health_check.kind = …`
    Dotted,
}

#[derive(Debug, Clone)]
struct SubTable {
    fields: Vec<Field>,
    style: Style,
    /// Header style: the header written a second time (a duplicate table).
    twice: bool,
}

#[derive(Debug, Clone)]
struct ListenerDoc {
    fields: Vec<Field>,
    health: Option<SubTable>,
    sticky: Option<SubTable>,
    backends: Vec<Vec<Field>>,
    /// `backend = [{ … }, …]` instead of `[[listener.backend]]` tables.
    inline_backends: bool,
}

#[derive(Debug, Clone)]
struct Doc {
    root: Vec<Field>,
    global: Option<SubTable>,
    admin: Option<SubTable>,
    /// `[global]` and `[admin]` after the listeners rather than before.
    tables_last: bool,
    listeners: Vec<ListenerDoc>,
}

/// Every key the config knows, at any depth.
const SCHEMA_KEYS: &[&str] = &[
    "global",
    "admin",
    "listener",
    "backend",
    "health_check",
    "sticky",
    "shutdown_timeout",
    "dns_servers",
    "dns_interval",
    "dns_hold",
    "bind",
    "token_file",
    "name",
    "mode",
    "algorithm",
    "connect_timeout",
    "idle_timeout",
    "retries",
    "freebind",
    "allow",
    "max_connections",
    "queue_timeout",
    "proxy_protocol",
    "udp_replies",
    "keepalive",
    "keepalive_idle",
    "keepalive_interval",
    "keepalive_count",
    "on_marked_down",
    "header_timeout",
    "body_timeout",
    "interval",
    "timeout",
    "fall",
    "rise",
    "kind",
    "port",
    "role",
    "user",
    "database",
    "password_file",
    "path",
    "method",
    "cookie",
    "max_age",
    "address",
    "weight",
    "backup",
    "discover",
];

/// Keys the config does not know: misspellings, plurals, other spellings,
/// keys that must be quoted (no `.` or `[`: they would read as a path).
const UNKNOWN_KEYS: &[&str] = &[
    "bogus",
    "nmae",
    "Name",
    "weigth",
    "backends",
    "listeners",
    "health-check",
    "timeout_ms",
    "with space",
    "\u{fc}n\u{ef}",
    "",
];

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn render_key(key: &[String], quoted: bool) -> String {
    let bare = |k: &String| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    key.iter()
        .map(|k| {
            if quoted || !bare(k) {
                quote(k)
            } else {
                k.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn render_value(v: &Val) -> String {
    match v {
        Val::Str(s) => quote(s),
        Val::Int(n) => n.to_string(),
        Val::Float(f) => format!("{f:?}"),
        Val::Bool(b) => b.to_string(),
        Val::Array(items) => format!(
            "[{}]",
            items
                .iter()
                .map(render_value)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Val::Inline(fields) if fields.is_empty() => "{}".into(),
        Val::Inline(fields) => format!(
            "{{ {} }}",
            fields
                .iter()
                .map(render_field)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn render_field(f: &Field) -> String {
    format!(
        "{} = {}",
        render_key(&f.key, f.quoted),
        render_value(&f.value)
    )
}

/// `key` under `table` in a path, as errors name it: a key that is not
/// bare is quoted (`listener[0]."with space"`). The keys of this file need
/// no escapes.
fn join(table: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("\"{key}\"")
    };
    if table.is_empty() {
        key
    } else {
        format!("{table}.{key}")
    }
}

/// What a path is in the document, to tell a duplicate from a repeat that
/// TOML allows (an array of tables, the tables of dotted keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defined {
    ArrayOfTables,
    Dotted,
    Other,
}

/// A document rendered, with where each path is written.
#[derive(Debug, Default)]
struct Rendered {
    text: String,
    /// Lines (1-based) on which each path (`listener[0].backend[1].weight`,
    /// `listener[0]`, `listener`) is written: its key, or its table's
    /// header.
    lines: HashMap<String, Vec<usize>>,
    /// Every key written, at any depth.
    keys: HashSet<String>,
    defined: HashMap<String, Defined>,
    /// Whether a key or table is defined twice (which TOML refuses).
    duplicate: bool,
}

impl Rendered {
    /// The number of the line written next.
    fn next_line(&self) -> usize {
        self.text.matches('\n').count() + 1
    }

    fn push_line(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }

    fn record(&mut self, path: &str, line: usize) {
        self.lines.entry(path.to_owned()).or_default().push(line);
    }

    fn define(&mut self, path: &str, how: Defined) {
        match self.defined.insert(path.to_owned(), how) {
            None => {}
            Some(was) if was == how && how != Defined::Other => {}
            Some(_) => self.duplicate = true,
        }
    }

    /// A `[table]` or `[[table]]` header for `path`; `parents` are the
    /// other paths the header line stands for (`listener` for
    /// `listener[0]`).
    fn header(&mut self, text: &str, path: &str, array: bool, parents: &[String]) {
        let line = self.next_line();
        self.record(path, line);
        for p in parents {
            self.record(p, line);
        }
        if array {
            self.define(
                parents.last().map_or(path, String::as_str),
                Defined::ArrayOfTables,
            );
        } else {
            self.define(path, Defined::Other);
        }
        self.push_line(text);
    }

    /// `f` in the table at `table`, on a line of its own.
    fn field(&mut self, table: &str, f: &Field) {
        let line = self.next_line();
        self.record_field(table, f, line);
        self.push_line(&render_field(f));
    }

    fn record_field(&mut self, table: &str, f: &Field, line: usize) {
        let mut path = table.to_owned();
        for (i, k) in f.key.iter().enumerate() {
            self.keys.insert(k.clone());
            path = join(&path, k);
            self.record(&path, line);
            let last = i + 1 == f.key.len();
            self.define(
                &path,
                if last {
                    Defined::Other
                } else {
                    Defined::Dotted
                },
            );
        }
        self.record_value(&path, &f.value, line);
    }

    fn record_value(&mut self, path: &str, v: &Val, line: usize) {
        match v {
            Val::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let at = format!("{path}[{i}]");
                    self.record(&at, line);
                    self.record_value(&at, item, line);
                }
            }
            Val::Inline(fields) => {
                for f in fields {
                    self.record_field(path, f, line);
                }
            }
            _ => {}
        }
    }

    /// A sub-table: its header and fields, or (inline or dotted) fields of
    /// the enclosing table at `table`, written now.
    fn sub_table(&mut self, table: &str, key: &str, header: &str, sub: &SubTable) {
        let path = join(table, key);
        match sub.style {
            Style::Header => {
                self.header(&format!("[{header}]"), &path, false, &[]);
                for f in &sub.fields {
                    self.field(&path, f);
                }
                if sub.twice {
                    self.header(&format!("[{header}]"), &path, false, &[]);
                }
            }
            Style::Inline => self.field(
                table,
                &Field {
                    key: vec![key.to_owned()],
                    quoted: false,
                    value: Val::Inline(sub.fields.clone()),
                },
            ),
            Style::Dotted => {
                for f in &sub.fields {
                    let mut dotted = f.clone();
                    dotted.key.insert(0, key.to_owned());
                    self.field(table, &dotted);
                }
            }
        }
    }
}

fn render(doc: &Doc) -> Rendered {
    let mut r = Rendered::default();
    for f in &doc.root {
        r.field("", f);
    }
    // Inline and dotted tables are root keys: before any header.
    let tops = [("global", &doc.global), ("admin", &doc.admin)];
    for (key, sub) in tops {
        if let Some(sub) = sub
            && !matches!(sub.style, Style::Header)
        {
            r.sub_table("", key, key, sub);
        }
    }
    let headed_tops = |r: &mut Rendered| {
        for (key, sub) in tops {
            if let Some(sub) = sub
                && matches!(sub.style, Style::Header)
            {
                r.sub_table("", key, key, sub);
            }
        }
    };
    if !doc.tables_last {
        headed_tops(&mut r);
    }
    for (i, l) in doc.listeners.iter().enumerate() {
        let at = format!("listener[{i}]");
        r.header("[[listener]]", &at, true, &["listener".to_owned()]);
        for f in &l.fields {
            r.field(&at, f);
        }
        let subs = [("health_check", &l.health), ("sticky", &l.sticky)];
        for (key, sub) in subs {
            if let Some(sub) = sub
                && !matches!(sub.style, Style::Header)
            {
                r.sub_table(&at, key, "", sub);
            }
        }
        if l.inline_backends {
            let backends = l.backends.iter().cloned().map(Val::Inline).collect();
            r.field(
                &at,
                &Field {
                    key: vec!["backend".into()],
                    quoted: false,
                    value: Val::Array(backends),
                },
            );
        }
        for (key, sub) in subs {
            if let Some(sub) = sub
                && matches!(sub.style, Style::Header)
            {
                r.sub_table(&at, key, &format!("listener.{key}"), sub);
            }
        }
        if !l.inline_backends {
            for (j, b) in l.backends.iter().enumerate() {
                let bat = format!("{at}.backend[{j}]");
                r.header(
                    "[[listener.backend]]",
                    &bat,
                    true,
                    &[format!("{at}.backend")],
                );
                for f in b {
                    r.field(&bat, f);
                }
            }
        }
    }
    if doc.tables_last {
        headed_tops(&mut r);
    }
    r
}

// Value strategies: mostly valid, some invalid, some of the wrong type.

fn strs(list: &'static [&'static str]) -> BoxedStrategy<Val> {
    select(list).prop_map(|s| Val::Str(s.to_owned())).boxed()
}

fn ints(list: &'static [i64]) -> BoxedStrategy<Val> {
    select(list).prop_map(Val::Int).boxed()
}

/// Any scalar but a string.
fn non_string_leaf() -> BoxedStrategy<Val> {
    prop_oneof![
        any::<i64>().prop_map(Val::Int),
        (-1e6..1e6f64).prop_map(Val::Float),
        any::<bool>().prop_map(Val::Bool),
    ]
    .boxed()
}

/// Any value but a string: a wrong type for most fields. A string field
/// whose value could be resolved as a host name gets only these, so no
/// case waits on DNS.
fn non_string() -> BoxedStrategy<Val> {
    let leaf = prop_oneof![non_string_leaf(), "[ -~]{0,8}".prop_map(Val::Str)];
    prop_oneof![
        3 => non_string_leaf(),
        1 => vec(leaf.clone(), 0..3).prop_map(Val::Array),
        1 => vec((select(UNKNOWN_KEYS), leaf), 0..3).prop_map(|kv| Val::Inline(
            kv.into_iter()
                .map(|(k, value)| Field { key: vec![k.into()], quoted: false, value })
                .collect()
        )),
    ]
    .boxed()
}

/// Any value at all.
fn any_value() -> BoxedStrategy<Val> {
    prop_oneof![3 => non_string(), 1 => "[ -~]{0,8}".prop_map(Val::Str)].boxed()
}

/// Mostly `valid`, sometimes `invalid`, sometimes a wrong type.
fn pick(valid: BoxedStrategy<Val>, invalid: BoxedStrategy<Val>) -> BoxedStrategy<Val> {
    prop_oneof![150 => valid, 4 => invalid, 1 => any_value()].boxed()
}

/// [`pick`] for a string that is resolved or read at load: no random
/// strings (a host name to look up, a file to read).
fn pick_safe(valid: BoxedStrategy<Val>, invalid: BoxedStrategy<Val>) -> BoxedStrategy<Val> {
    prop_oneof![150 => valid, 4 => invalid, 1 => non_string()].boxed()
}

fn duration() -> BoxedStrategy<Val> {
    pick(
        strs(&["500ms", "1s", "2s", "3s", "10s", "30s", "1h"]),
        strs(&["0s", "1ms", "40000s", "soon", "", "-1s", "5"]),
    )
}

/// A listener or backend name: now and then one of a few (names clash),
/// mostly one of many.
fn name() -> BoxedStrategy<Val> {
    pick(
        prop_oneof![
            1 => strs(&["a", "b", "pg", "web-1", "x.y_z"]),
            3 => "[a-z][a-z0-9_.-]{0,8}".prop_map(Val::Str),
        ]
        .boxed(),
        prop_oneof![
            strs(&["", "x y", "\u{fc}", "a/b"]),
            Just(Val::Str("n".repeat(65))),
        ]
        .boxed(),
    )
}

fn boolean() -> BoxedStrategy<Val> {
    pick(
        any::<bool>().prop_map(Val::Bool).boxed(),
        strs(&["yes", "true"]),
    )
}

fn cap() -> BoxedStrategy<Val> {
    pick(ints(&[1, 2, 100, 10_000]), ints(&[0, -5, 4_294_967_296]))
}

fn list_of(item: BoxedStrategy<Val>) -> BoxedStrategy<Val> {
    prop_oneof![9 => vec(item, 0..4).prop_map(Val::Array), 1 => any_value()].boxed()
}

/// A file to read (token, password): one that reads, one that is empty,
/// one that is missing, a directory.
fn file_path() -> BoxedStrategy<Val> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    pick_safe(
        Just(Val::Str(manifest.into())).boxed(),
        strs(&["/dev/null", "/nonexistent/switchyard-proptest", "/"]),
    )
}

/// An optional field: present with probability `p` (always, at 1).
fn opt(key: &'static str, p: f64, value: BoxedStrategy<Val>) -> BoxedStrategy<Option<Field>> {
    let field = (value, prop::bool::weighted(0.05)).prop_map(move |(value, quoted)| Field {
        key: vec![key.to_owned()],
        quoted,
        value,
    });
    if p >= 1.0 {
        field.prop_map(Some).boxed()
    } else {
        prop::option::weighted(p, field).boxed()
    }
}

/// A table's fields in any order, sometimes with an unknown key, and
/// sometimes with one of its keys written twice.
fn table(fields: Vec<BoxedStrategy<Option<Field>>>) -> BoxedStrategy<Vec<Field>> {
    let unknown = prop::option::weighted(0.01, (select(UNKNOWN_KEYS), any_value()));
    let twice = prop::option::weighted(0.01, (any::<Index>(), any_value()));
    (fields, unknown)
        .prop_map(|(fields, unknown)| {
            let mut fields: Vec<Field> = fields.into_iter().flatten().collect();
            if let Some((k, value)) = unknown {
                fields.push(Field {
                    key: vec![k.into()],
                    quoted: false,
                    value,
                });
            }
            fields
        })
        .prop_shuffle()
        .prop_flat_map(move |fields| (Just(fields), twice.clone()))
        .prop_map(|(mut fields, twice)| {
            if let Some((i, value)) = twice
                && !fields.is_empty()
            {
                let mut again = fields[i.index(fields.len())].clone();
                again.value = value;
                fields.push(again);
            }
            fields
        })
        .boxed()
}

fn sub_table(fields: BoxedStrategy<Vec<Field>>) -> BoxedStrategy<SubTable> {
    let style = prop_oneof![
        6 => Just(Style::Header),
        1 => Just(Style::Inline),
        1 => Just(Style::Dotted),
    ];
    (fields, style, prop::bool::weighted(0.01))
        .prop_map(|(fields, style, twice)| SubTable {
            fields,
            style,
            twice,
        })
        .boxed()
}

fn global_table() -> BoxedStrategy<Vec<Field>> {
    let server = pick(
        strs(&["10.0.0.2", "127.0.0.1:8600", "[::1]:53"]),
        strs(&["dns.internal", "10.0.0.2:99999", ""]),
    );
    table(vec![
        opt("shutdown_timeout", 0.4, duration()),
        opt("dns_servers", 0.3, list_of(server)),
        opt("dns_interval", 0.3, duration()),
        opt("dns_hold", 0.3, duration()),
    ])
}

fn admin_table() -> BoxedStrategy<Vec<Field>> {
    table(vec![
        opt(
            "bind",
            0.7,
            pick(
                strs(&[
                    "127.0.0.1:9900",
                    "[::1]:9900",
                    "127.0.0.1:0",
                    "0.0.0.0:9901",
                ]),
                strs(&["localhost", "localhost:9900", "127.0.0.1", ""]),
            ),
        ),
        opt("token_file", 0.3, file_path()),
    ])
}

/// `[listener.health_check]`: a kind, then mostly the fields it takes.
fn health_table(udp: bool) -> BoxedStrategy<Vec<Field>> {
    let kinds: &'static [Option<&'static str>] = if udp {
        &[None, Some("tcp"), Some("none")]
    } else {
        &[
            None,
            Some("tcp"),
            Some("postgres"),
            Some("mysql"),
            Some("redis"),
            Some("http"),
            Some("none"),
        ]
    };
    select(kinds)
        .prop_flat_map(|kind| {
            let of = |kinds: &[&str], p: f64| {
                if kinds.contains(&kind.unwrap_or("tcp")) {
                    p
                } else {
                    0.02
                }
            };
            let kind_field = match kind {
                None => opt("kind", 0.02, strs(&["ldap", "TCP"])),
                Some(k) => opt(
                    "kind",
                    1.0,
                    pick(Just(Val::Str(k.into())).boxed(), strs(&["ldap", "TCP"])),
                ),
            };
            let databases = ["postgres", "mysql", "redis"];
            table(vec![
                kind_field,
                opt(
                    "interval",
                    0.3,
                    pick(strs(&["2s", "5s", "10s"]), strs(&["0s", "soon"])),
                ),
                opt(
                    "timeout",
                    0.3,
                    pick(strs(&["500ms", "1s", "2s"]), strs(&["0s", "1h"])),
                ),
                opt("fall", 0.2, pick(ints(&[1, 2, 3, 10]), ints(&[0, -1]))),
                opt("rise", 0.2, pick(ints(&[1, 2, 3, 10]), ints(&[0, -1]))),
                opt(
                    "port",
                    of(&["tcp", "http", "postgres", "mysql", "redis"], 0.2),
                    pick(ints(&[1, 8008, 65535]), ints(&[0, 65536, -1])),
                ),
                opt(
                    "role",
                    of(&databases, 0.3),
                    pick(strs(&["any", "primary", "replica"]), strs(&["leader"])),
                ),
                opt(
                    "user",
                    if kind == Some("postgres") {
                        0.95
                    } else {
                        of(&databases, 0.5)
                    },
                    pick(strs(&["probe", "u"]), strs(&[""])),
                ),
                opt(
                    "database",
                    of(&["postgres"], 0.3),
                    strs(&["app", "postgres"]),
                ),
                opt("password_file", of(&databases, 0.2), file_path()),
                opt(
                    "path",
                    of(&["http"], 0.5),
                    pick(strs(&["/", "/primary"]), strs(&["primary", ""])),
                ),
            ])
        })
        .boxed()
}

fn sticky_table() -> BoxedStrategy<Vec<Field>> {
    table(vec![
        opt("method", 0.9, pick(strs(&["lbcookie"]), strs(&["ip", ""]))),
        opt(
            "cookie",
            0.5,
            pick(
                strs(&["SERVERID", "sid", "JSESSIONID"]),
                strs(&["bad name", "", "a;b", "x=y"]),
            ),
        ),
        opt("max_age", 0.3, duration()),
    ])
}

/// A backend: its address goes with `discover`, so that only a
/// `discover = "dns"` entry (never resolved at load) names hosts other
/// than `localhost`.
fn backend_table(udp: bool) -> BoxedStrategy<Vec<Field>> {
    let resolved = pick_safe(
        strs(&[
            "127.0.0.1:6001",
            "[::1]:6002",
            "localhost:6003",
            "10.0.0.1:5432",
        ]),
        strs(&[
            "127.0.0.1",
            "_pg._tcp.db",
            "",
            "127.0.0.1:99999",
            "localhost",
        ]),
    );
    let discovered = pick(
        strs(&[
            "web.internal:8080",
            "_pg._tcp.service.consul",
            "db-1.local:5432",
        ]),
        strs(&[
            "10.0.0.1:80",
            "web.internal",
            "web.internal:0",
            "web internal:80",
            "localhost:1",
        ]),
    );
    let address = prop_oneof![
        100 => (resolved.clone(), Just(None)),
        25 => (resolved, Just(Some(Val::Str("once".into())))),
        50 => (discovered, Just(Some(Val::Str("dns".into())))),
        // An invalid `discover` fails before any address is looked at.
        1 => (any_value(), prop_oneof![strs(&["always", "DNS"]), non_string()].prop_map(Some)),
        1 => (non_string(), Just(None)),
    ];
    let fields = vec![
        opt("name", 0.99, name()),
        opt(
            "weight",
            0.4,
            pick(
                ints(&[0, 1, 2, 3, 256]),
                prop_oneof![ints(&[257, -1]), Just(Val::Float(1.5))].boxed(),
            ),
        ),
        opt("backup", 0.1, boolean()),
        opt("max_connections", if udp { 0.02 } else { 0.1 }, cap()),
    ];
    (
        prop::option::weighted(0.99, address),
        prop::bool::weighted(0.05),
    )
        .prop_flat_map(move |(address, quoted)| {
            let mut fields = fields.clone();
            if let Some((address, discover)) = address {
                fields.push(
                    Just(Some(Field {
                        key: vec!["address".into()],
                        quoted,
                        value: address,
                    }))
                    .boxed(),
                );
                if let Some(value) = discover {
                    fields.push(
                        Just(Some(Field {
                            key: vec!["discover".into()],
                            quoted: false,
                            value,
                        }))
                        .boxed(),
                    );
                }
            }
            table(fields)
        })
        .boxed()
}

/// What a listener is for; its fields mostly fit it, so that many
/// documents load, and sometimes do not, so that the checks between
/// fields are met too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    Tcp,
    Http,
    Udp,
}

fn listener_doc() -> BoxedStrategy<ListenerDoc> {
    select(&[Profile::Tcp, Profile::Tcp, Profile::Http, Profile::Udp][..])
        .prop_flat_map(listener_of)
        .boxed()
}

fn listener_of(profile: Profile) -> BoxedStrategy<ListenerDoc> {
    // Few ports and addresses, so that binds overlap now and then.
    let bind = pick(
        prop_oneof![
            (select(&["127.0.0.1", "127.0.0.2", "0.0.0.0"][..]), 0u16..4)
                .prop_map(|(ip, port)| Val::Str(format!("{ip}:{port}"))),
            (select(&["[::1]", "[::]"][..]), 1u16..4)
                .prop_map(|(ip, port)| Val::Str(format!("{ip}:{port}"))),
        ]
        .boxed(),
        strs(&["localhost:1", "127.0.0.1", "127.0.0.1:70000", "", "[::1]"]),
    );
    let allow_entry = pick(
        strs(&["10.0.0.0/8", "192.168.10.0/24", "::1", "1.2.3.4", "::/0"]),
        strs(&["bogus", "10.0.0.0/33", ""]),
    );
    let (tcp, http, udp) = (
        profile == Profile::Tcp,
        profile == Profile::Http,
        profile == Profile::Udp,
    );
    // Likely where it applies, rare where it does not.
    let fits = |yes: bool, p: f64| if yes { p } else { 0.02 };
    let mode = match profile {
        Profile::Tcp => (0.3, "tcp"),
        Profile::Http => (1.0, "http"),
        Profile::Udp => (1.0, "udp"),
    };
    let fields = table(vec![
        opt("name", 0.99, name()),
        opt("bind", 0.99, bind),
        opt(
            "mode",
            mode.0,
            pick(
                Just(Val::Str(mode.1.into())).boxed(),
                strs(&["quic", "HTTP"]),
            ),
        ),
        opt(
            "algorithm",
            0.3,
            pick(
                strs(&["roundrobin", "leastconn", "source"]),
                strs(&["random"]),
            ),
        ),
        opt("connect_timeout", 0.1, duration()),
        opt("idle_timeout", 0.1, duration()),
        opt(
            "retries",
            fits(!udp, 0.1),
            pick(ints(&[0, 1, 2, 5]), ints(&[-1, 4_294_967_296])),
        ),
        opt("freebind", 0.05, boolean()),
        opt("allow", 0.1, list_of(allow_entry)),
        opt("max_connections", 0.1, cap()),
        opt("queue_timeout", fits(!udp, 0.1), duration()),
        opt(
            "proxy_protocol",
            fits(tcp, 0.2),
            pick(strs(&["off", "v1", "v2"]), strs(&["v3", "on"])),
        ),
        opt(
            "udp_replies",
            fits(udp, 0.3),
            pick(ints(&[1, 2]), ints(&[0])),
        ),
        opt("keepalive", 0.1, boolean()),
        opt("keepalive_idle", 0.05, duration()),
        opt("keepalive_interval", 0.05, duration()),
        opt(
            "keepalive_count",
            0.05,
            pick(ints(&[1, 6, 127]), ints(&[0, 128])),
        ),
        opt(
            "on_marked_down",
            0.05,
            pick(strs(&["keep", "shutdown"]), strs(&["kill"])),
        ),
        opt("header_timeout", fits(http, 0.2), duration()),
        opt("body_timeout", fits(http, 0.2), duration()),
    ]);
    (
        fields,
        prop::option::weighted(0.3, sub_table(health_table(udp))),
        prop::option::weighted(fits(http, 0.4), sub_table(sticky_table())),
        prop_oneof![1 => Just(Vec::new()), 19 => vec(backend_table(udp), 1..4)],
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(fields, health, sticky, backends, inline_backends)| ListenerDoc {
                fields,
                health,
                sticky,
                backends,
                inline_backends,
            },
        )
        .boxed()
}

fn doc() -> impl Strategy<Value = Doc> {
    // A root key: rarely, and then unknown or one of the tables' names
    // with a value of its own (which clashes with the table).
    let root = vec(
        (
            prop_oneof![
                select(UNKNOWN_KEYS),
                select(&["global", "admin", "listener"][..])
            ],
            any_value(),
        )
            .prop_map(|(k, value)| Field {
                key: vec![k.into()],
                quoted: false,
                value,
            }),
        0..2,
    );
    (
        prop_oneof![9 => Just(Vec::new()), 1 => root],
        prop::option::weighted(0.3, sub_table(global_table())),
        prop::option::weighted(0.3, sub_table(admin_table())),
        any::<bool>(),
        prop_oneof![1 => Just(Vec::new()), 19 => vec(listener_doc(), 1..4)],
    )
        .prop_map(|(root, global, admin, tables_last, listeners)| Doc {
            root,
            global,
            admin,
            tables_last,
            listeners,
        })
}

/// Token soup: fragments of config TOML in any order. Strings come whole
/// (no lone quote), and none of them is a host name but `localhost`.
const TOKENS: &[&str] = &[
    "[[listener]]",
    "[[listener.backend]]",
    "[listener.health_check]",
    "[listener.sticky]",
    "[global]",
    "[admin]",
    "\n",
    "\n",
    "\n",
    " ",
    " = ",
    "=",
    ".",
    ",",
    "[",
    "]",
    "{",
    "}",
    "#",
    "name",
    "bind",
    "address",
    "weight",
    "mode",
    "kind",
    "method",
    "health_check",
    "backend",
    "sticky",
    "listener",
    "discover",
    "allow",
    "interval",
    "timeout",
    "bogus",
    "\"a\"",
    "\"b\"",
    "\"127.0.0.1:1\"",
    "\"[::1]:2\"",
    "\"localhost:3\"",
    "\"0.0.0.0:1\"",
    "\"http\"",
    "\"udp\"",
    "\"lbcookie\"",
    "\"postgres\"",
    "\"dns\"",
    "\"1s\"",
    "\"0s\"",
    "\"x y\"",
    "\"\"",
    "1",
    "0",
    "-1",
    "257",
    "1.5",
    "true",
    "[\"10.0.0.0/8\"]",
    "[]",
    "{}",
];

/// `file:line:column: ` of every located error, with the line and column
/// in the text; returns the field (`""` when there is none).
fn check_located(
    text: &str,
    file: &Path,
    err: &ConfigError,
) -> Result<(String, usize), TestCaseError> {
    let shown = err.to_string();
    let ConfigError::Invalid {
        file: named,
        line,
        column,
        field,
        message,
    } = err
    else {
        return Err(TestCaseError::fail(format!("not located: {shown}")));
    };
    prop_assert_eq!(named.as_path(), file);
    prop_assert_eq!(
        &shown,
        &format!("{}:{line}:{column}: {field}{message}", file.display())
    );
    prop_assert!(!message.trim().is_empty(), "no message: {shown}");
    let lines: Vec<&str> = text.split('\n').collect();
    prop_assert!(
        (1..=lines.len()).contains(line),
        "line {line} of {}: {shown}",
        lines.len()
    );
    prop_assert!(
        (1..=lines[line - 1].len() + 1).contains(column),
        "column {column} of {:?}: {shown}",
        lines[line - 1]
    );
    let path = if field.is_empty() {
        String::new()
    } else {
        let path = field.strip_suffix(": ");
        prop_assert!(
            path.is_some_and(|p| !p.is_empty()),
            "field {field:?}: {shown}"
        );
        path.unwrap_or_default().to_owned()
    };
    Ok((path, *line))
}

/// The key names of a path (`listener[0].backend[1].weight`,
/// `listener[0]."with space"`, `"a.b"`), each index checked to be a
/// number.
fn path_keys(path: &str) -> Result<Vec<String>, TestCaseError> {
    let mut keys = Vec::new();
    let mut chars = path.chars().peekable();
    loop {
        let mut key = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => key.extend(chars.next()),
                    Some(c) => key.push(c),
                    None => return Err(TestCaseError::fail(format!("unclosed quote in {path:?}"))),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' || c == '[' {
                    break;
                }
                prop_assert!(
                    c.is_ascii_alphanumeric() || c == '_' || c == '-',
                    "{c:?} in a bare key of {path:?}"
                );
                key.push(c);
                chars.next();
            }
            prop_assert!(!key.is_empty(), "an empty bare key in {path:?}");
        }
        keys.push(key);
        while chars.peek() == Some(&'[') {
            chars.next();
            let index: String = chars.by_ref().take_while(|&c| c != ']').collect();
            prop_assert!(index.parse::<usize>().is_ok(), "bad index in {path:?}");
        }
        match chars.next() {
            None => return Ok(keys),
            Some('.') => {}
            Some(c) => {
                return Err(TestCaseError::fail(format!(
                    "{c:?} after a key in {path:?}"
                )));
            }
        }
    }
}

/// `path` and its ancestors, deepest first: `a[0].b`, `a[0]`, `a`.
fn ancestors(path: &str) -> Vec<&str> {
    let mut all = vec![path];
    for (i, c) in path.char_indices().rev() {
        if c == '.' || c == '[' {
            all.push(&path[..i]);
        }
    }
    all
}

/// Whether `text` is TOML at all (any table, any keys).
fn is_toml(text: &str) -> bool {
    toml::from_str::<toml::Table>(text).is_ok()
}

/// The loading properties shared by arbitrary text: no panic (a panic
/// fails the case), every error located in `text`, and a field named
/// whenever the text is TOML. For token soup (`keys_on_line`), the line
/// named also holds one of the path's keys.
fn check_any_text(text: &str, keys_on_line: bool) -> Result<(), TestCaseError> {
    let file = Path::new("test.toml");
    let Err(e) = config::load_str(text, file) else {
        return Ok(());
    };
    let (path, line) = check_located(text, file, &e)?;
    if is_toml(text) {
        prop_assert!(!path.is_empty(), "TOML, but no field named: {e}");
        let keys = path_keys(&path)?;
        if keys_on_line {
            let written = text.split('\n').nth(line - 1).unwrap_or_default();
            prop_assert!(
                keys.iter().any(|k| written.contains(k)),
                "line {line} ({written:?}) holds no key of {path}: {e}"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(with_cases(256))]

    #[test]
    fn config_from_arbitrary_bytes(bytes in vec(any::<u8>(), 0..512)) {
        check_any_text(&String::from_utf8_lossy(&bytes), false)?;
        // The same bytes as a file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bytes.toml");
        std::fs::write(&path, &bytes).unwrap();
        let utf8 = std::str::from_utf8(&bytes);
        match config::load_file(&path) {
            Ok(_) => prop_assert!(utf8.is_ok()),
            Err(e) if utf8.is_err() => {
                // Located at the first byte that is not UTF-8.
                let at = utf8.unwrap_err().valid_up_to();
                let before = std::str::from_utf8(&bytes[..at]).unwrap();
                let line = before.matches('\n').count() + 1;
                // Columns count bytes, as in every config error.
                let column = before.rsplit('\n').next().unwrap().len() + 1;
                let ConfigError::Invalid { file, line: l, column: c, message, .. } = &e else {
                    return Err(TestCaseError::fail(format!("not located: {e}")));
                };
                prop_assert_eq!(file, &path);
                prop_assert_eq!((*l, *c), (line, column), "{}", e);
                prop_assert!(message.contains("not UTF-8"), "{}", e);
                let shown = e.to_string();
                prop_assert!(shown.starts_with(&format!("{}:{line}:{column}: ", path.display())), "{shown}");
            }
            Err(e) => {
                let Ok(text) = utf8 else {
                    return Err(TestCaseError::fail(format!("not UTF-8, yet {e}")));
                };
                check_located(text, &path, &e)?;
            }
        }
    }

    #[test]
    fn config_from_token_soup(tokens in vec(select(TOKENS), 0..60)) {
        check_any_text(&tokens.concat(), true)?;
    }

    #[test]
    fn generated_configs_load_or_name_file_line_and_field(doc in doc()) {
        let r = render(&doc);
        let file = Path::new("test.toml");
        // The generator's own check: the text is TOML unless it defines
        // something twice.
        prop_assert_eq!(is_toml(&r.text), !r.duplicate, "{}", r.text);
        match config::load_str(&r.text, file) {
            Ok(c) => {
                // What loaded is what was written.
                let names: Vec<String> = doc
                    .listeners
                    .iter()
                    .map(|l| {
                        l.fields
                            .iter()
                            .find_map(|f| match (&f.key[..], &f.value) {
                                ([k], Val::Str(s)) if k == "name" => Some(s.clone()),
                                _ => None,
                            })
                            .unwrap_or_default()
                    })
                    .collect();
                let loaded: Vec<String> = c.listeners.iter().map(|l| l.name.to_string()).collect();
                prop_assert_eq!(loaded, names);
                for (l, want) in c.listeners.iter().zip(&doc.listeners) {
                    prop_assert_eq!(l.backends.len(), want.backends.len());
                }
            }
            Err(e) => {
                let (path, line) = check_located(&r.text, file, &e)?;
                prop_assert!(!path.is_empty(), "no field named: {e}\n{}", r.text);
                for key in path_keys(&path)? {
                    prop_assert!(
                        SCHEMA_KEYS.contains(&key.as_str()) || r.keys.contains(&key),
                        "{e}: `{key}` is neither a config key nor written"
                    );
                }
                // The line is where the deepest part of the path that is
                // written is written: the field, or the table it is
                // missing from.
                let written = ancestors(&path).into_iter().find_map(|p| r.lines.get(p));
                prop_assert!(written.is_some(), "{e}: {path} is not in\n{}", r.text);
                let lines = written.unwrap();
                prop_assert!(lines.contains(&line), "{e}: {path} is written on {lines:?}\n{}", r.text);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 2. PROXY protocol headers, read back with the `ppp` crate.
// ---------------------------------------------------------------------------

/// Any address a client or listener may have: IPv4, IPv6 (with flow info
/// and scope, which a header cannot carry), and IPv4-mapped IPv6, what a
/// dual-stack socket reports for an IPv4 client.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>(), any::<u32>()).prop_map(
            |(ip, port, flow, scope)| SocketAddr::V6(SocketAddrV6::new(
                ip.into(),
                port,
                flow,
                scope
            ))
        ),
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| {
            SocketAddr::new(Ipv4Addr::from(ip).to_ipv6_mapped().into(), port)
        }),
        (
            select(
                &[
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpAddr::V4(Ipv4Addr::BROADCAST),
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ][..]
            ),
            select(&[0u16, 1, 65535][..])
        )
            .prop_map(|(ip, port)| SocketAddr::new(ip, port)),
    ]
}

/// The address a header must carry: an IPv4-mapped address as IPv4.
fn unmapped(addr: SocketAddr) -> (IpAddr, u16) {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    (ip, addr.port())
}

proptest! {
    #![proptest_config(with_cases(256))]

    #[test]
    fn proxy_v1_reads_back(
        client in socket_addr(),
        local in socket_addr(),
        data in vec(any::<u8>(), 0..32),
    ) {
        let header = proxy_protocol::header(ProxyProtocol::V1, client, local);
        prop_assert!(header.is_some());
        let header = header.unwrap_or_default();
        prop_assert!(header.ends_with(b"\r\n") && header.len() <= 107, "{header:?}");
        // The client's first bytes follow the header on the wire.
        let mut wire = header.clone();
        wire.extend_from_slice(&data);
        let parsed = ppp::v1::Header::try_from(&wire[..]);
        prop_assert!(parsed.is_ok(), "{:?}: {parsed:?}", String::from_utf8_lossy(&header));
        let parsed = parsed.unwrap();
        prop_assert_eq!(parsed.header.as_bytes(), &header[..]);
        let want = match (unmapped(client), unmapped(local)) {
            ((IpAddr::V4(s), sp), (IpAddr::V4(d), dp)) => ppp::v1::Addresses::new_tcp4(s, d, sp, dp),
            ((IpAddr::V6(s), sp), (IpAddr::V6(d), dp)) => ppp::v1::Addresses::new_tcp6(s, d, sp, dp),
            _ => ppp::v1::Addresses::Unknown,
        };
        prop_assert_eq!(parsed.addresses, want);
    }

    #[test]
    fn proxy_v2_reads_back(
        client in socket_addr(),
        local in socket_addr(),
        data in vec(any::<u8>(), 0..32),
    ) {
        let header = proxy_protocol::header(ProxyProtocol::V2, client, local);
        prop_assert!(header.is_some());
        let header = header.unwrap_or_default();
        let mut wire = header.clone();
        wire.extend_from_slice(&data);
        let parsed = ppp::v2::Header::try_from(&wire[..]);
        prop_assert!(parsed.is_ok(), "{header:?}: {parsed:?}");
        let parsed = parsed.unwrap();
        // It ends where the header does: the client's bytes are not in it.
        prop_assert_eq!(parsed.as_bytes(), &header[..]);
        prop_assert_eq!(parsed.version, ppp::v2::Version::Two);
        prop_assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        prop_assert!(parsed.tlv_bytes().is_empty());
        let (want, protocol) = match (unmapped(client), unmapped(local)) {
            ((IpAddr::V4(s), sp), (IpAddr::V4(d), dp)) => (
                ppp::v2::Addresses::IPv4(ppp::v2::IPv4::new(s, d, sp, dp)),
                ppp::v2::Protocol::Stream,
            ),
            ((IpAddr::V6(s), sp), (IpAddr::V6(d), dp)) => (
                ppp::v2::Addresses::IPv6(ppp::v2::IPv6::new(s, d, sp, dp)),
                ppp::v2::Protocol::Stream,
            ),
            // Mixed families: AF_UNSPEC, the receiver uses the socket's.
            _ => (ppp::v2::Addresses::Unspecified, ppp::v2::Protocol::Unspecified),
        };
        prop_assert_eq!(parsed.addresses, want);
        prop_assert_eq!(parsed.protocol, protocol);
    }

    #[test]
    fn proxy_off_writes_nothing(client in socket_addr(), local in socket_addr()) {
        prop_assert_eq!(proxy_protocol::header(ProxyProtocol::Off, client, local), None);
    }
}

// ---------------------------------------------------------------------------
// 3. lbCookie: strip and find.
// ---------------------------------------------------------------------------

/// One pair of a Cookie header: the balancer's cookie, or another.
#[derive(Debug, Clone)]
enum Pair {
    Ours(String),
    Other(String, String),
}

/// A cookie header: pairs, each but the first after its separator.
type CookieHeader = Vec<(&'static str, Pair)>;

/// A cookie name: 1 to `max` RFC 6265 token characters.
fn token(max: usize) -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9!#$%&'*+.^_`|~-]{{1,{max}}}"))
        .expect("a regex")
        .boxed()
}

/// A cookie value: cookie-octets (no space, `"`, `,`, `;` or `\`), a
/// quoted value with a space inside (which browsers send), or non-ASCII
/// text in UTF-8.
fn cookie_value() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[!#-+\\--:<-\\[\\]-~]{0,16}",
        1 => "\"[a-z]{1,4} [a-z]{1,4}\"",
        1 => select(&["caf\u{e9}", "\u{65e5}\u{672c}", "na\u{ef}ve=1"][..]).prop_map(String::from),
    ]
    .boxed()
}

/// Our cookie name and the headers, with names of other cookies that are
/// near misses of ours (a prefix, an extension, other case) among them.
fn cookie_headers() -> impl Strategy<Value = (String, Vec<CookieHeader>)> {
    let ours = prop_oneof![
        select(&["SERVERID", "lb", "JSESSIONID_LB"][..]).prop_map(String::from),
        token(12),
    ];
    ours.prop_flat_map(|ours| {
        let near = vec![
            format!("{ours}X"),
            format!("X{ours}"),
            ours.to_lowercase(),
            ours.to_uppercase(),
            ours[..ours.len() - 1].to_owned(),
        ];
        let theirs = {
            let ours = ours.clone();
            prop_oneof![
                2 => token(10),
                1 => select(near),
            ]
            .prop_filter("another cookie's name", move |n| {
                *n != ours && !n.is_empty()
            })
        };
        let pair = prop_oneof![
            1 => cookie_value().prop_map(Pair::Ours),
            3 => (theirs, cookie_value()).prop_map(|(n, v)| Pair::Other(n, v)),
        ];
        let separator = select(&[";", "; ", ";  "][..]);
        let header = vec((separator, pair), 1..6);
        (Just(ours), vec(header, 0..4))
    })
}

fn pair_text(name: &str, pair: &Pair) -> String {
    match pair {
        Pair::Ours(v) => format!("{name}={v}"),
        Pair::Other(n, v) => format!("{n}={v}"),
    }
}

fn header_text(name: &str, header: &CookieHeader) -> String {
    let mut s = String::new();
    for (i, (sep, pair)) in header.iter().enumerate() {
        if i > 0 {
            s.push_str(sep);
        }
        s.push_str(&pair_text(name, pair));
    }
    s
}

/// The header once our cookie is out, computed from the pairs: the other
/// pairs, each followed (when another comes) by the separator written
/// after it; `None` when nothing is left.
fn expected_after_strip(name: &str, header: &CookieHeader) -> Option<String> {
    if !header.iter().any(|(_, p)| matches!(p, Pair::Ours(_))) {
        return Some(header_text(name, header));
    }
    let mut s = String::new();
    let mut last_kept: Option<usize> = None;
    for (i, (_, pair)) in header.iter().enumerate() {
        if matches!(pair, Pair::Ours(_)) {
            continue;
        }
        if let Some(k) = last_kept {
            s.push_str(header[k + 1].0);
        }
        s.push_str(&pair_text(name, pair));
        last_kept = Some(i);
    }
    (!s.is_empty()).then_some(s)
}

fn header_map(name: &str, headers: &[CookieHeader]) -> HeaderMap {
    let mut map = HeaderMap::new();
    // Headers around the cookies, which stripping must not touch.
    map.append(header::HOST, HeaderValue::from_static("example.com"));
    for h in headers {
        let v = HeaderValue::from_bytes(header_text(name, h).as_bytes()).unwrap();
        map.append(header::COOKIE, v);
    }
    map.append(header::ACCEPT, HeaderValue::from_static("*/*"));
    map
}

proptest! {
    #![proptest_config(with_cases(256))]

    #[test]
    fn strip_removes_only_our_cookie((name, headers) in cookie_headers()) {
        let mut map = header_map(&name, &headers);
        strip_cookie(&mut map, &name);
        let got: Vec<&str> = map
            .get_all(header::COOKIE)
            .iter()
            .map(|v| std::str::from_utf8(v.as_bytes()).expect("UTF-8 in, UTF-8 out"))
            .collect();
        let want: Vec<String> = headers.iter().filter_map(|h| expected_after_strip(&name, h)).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(&map[header::HOST], "example.com");
        prop_assert_eq!(&map[header::ACCEPT], "*/*");
        prop_assert_eq!(map.len(), 2 + map.get_all(header::COOKIE).iter().count());
        // Stripped, it is gone for good, and stripping again changes nothing.
        prop_assert_eq!(find_cookie(&map, &name), None);
        let before = map.clone();
        strip_cookie(&mut map, &name);
        prop_assert_eq!(map, before);
    }

    #[test]
    fn find_returns_the_first_of_our_cookies((name, headers) in cookie_headers()) {
        let map = header_map(&name, &headers);
        let first = headers.iter().flatten().find_map(|(_, p)| match p {
            Pair::Ours(v) => Some(v.clone()),
            Pair::Other(..) => None,
        });
        prop_assert_eq!(find_cookie(&map, &name), first);
    }
}

// ---------------------------------------------------------------------------
// 4. Schedulers.
// ---------------------------------------------------------------------------

/// Backends with these names and weights, on made-up addresses.
fn backends<'a>(list: impl IntoIterator<Item = (&'a str, u32)>) -> Vec<Arc<Backend>> {
    list.into_iter()
        .enumerate()
        .map(|(i, (name, weight))| {
            let address = format!("127.0.0.1:{}", 10_000 + i);
            Arc::new(Backend::new(
                &BackendConfig {
                    name: name.into(),
                    addr: address.parse().unwrap(),
                    address,
                    weight,
                    backup: false,
                    max_connections: None,
                    discovered_from: None,
                },
                Arc::new(BackendState::default()),
            ))
        })
        .collect()
}

/// The owner table of a source-hash scheduler over all of `list`, as the
/// owners' names.
fn owner_names(list: &[Arc<Backend>]) -> Vec<Arc<str>> {
    let all: Vec<usize> = (0..list.len()).collect();
    SourceHash::new(list, &all)
        .owners()
        .iter()
        .map(|&i| list[i as usize].name.clone())
        .collect()
}

/// Backend sets: distinct names, weights often equal (one weight group)
/// and often not.
fn weighted_set() -> impl Strategy<Value = Vec<(String, u32)>> {
    btree_set("[a-z][a-z0-9._-]{0,11}", 2..=8).prop_flat_map(|names| {
        let n = names.len();
        let weight = prop_oneof![1u32..=2, 1u32..=MAX_WEIGHT];
        (Just(names), vec(weight, n))
            .prop_map(|(names, weights)| names.into_iter().zip(weights).collect())
    })
}

proptest! {
    #![proptest_config(with_cases(256))]

    #[test]
    fn roundrobin_gives_exact_shares_in_every_window(
        weights in vec(prop_oneof![0u32..=4, 0u32..=MAX_WEIGHT], 1..=12),
    ) {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("b{i}")).collect();
        let list = backends(names.iter().map(String::as_str).zip(weights.iter().copied()));
        let pool = Pool::new(Algorithm::Roundrobin, list.clone());
        let client: IpAddr = "192.0.2.1".parse().unwrap();
        let total: usize = weights.iter().map(|&w| w as usize).sum();
        if total == 0 {
            prop_assert!(pool.candidates(client).next().is_none());
            return Ok(());
        }
        let picks: Vec<usize> = (0..3 * total)
            .map(|_| {
                let b = pool.candidates(client).next().expect("a backend");
                list.iter().position(|x| Arc::ptr_eq(x, b)).expect("one of ours")
            })
            .collect();
        // Slide a window of `total` picks over three cycles.
        let mut counts = vec![0u32; weights.len()];
        for &i in &picks[..total] {
            counts[i] += 1;
        }
        prop_assert_eq!(&counts, &weights, "window at 0");
        for start in 1..=2 * total {
            counts[picks[start - 1]] -= 1;
            counts[picks[start + total - 1]] += 1;
            prop_assert_eq!(&counts, &weights, "window at {}", start);
        }
    }
}

proptest! {
    #![proptest_config(with_cases(32))]

    #[test]
    fn source_hash_moves_only_the_removed_backends_slots(
        set in weighted_set(),
        removed in any::<Index>(),
    ) {
        let removed = removed.index(set.len());
        let all = backends(set.iter().map(|(n, w)| (n.as_str(), *w)));
        let rest: Vec<_> = all.iter().enumerate().filter(|&(i, _)| i != removed).map(|(_, b)| b.clone()).collect();
        let gone = &set[removed].0;
        let before = owner_names(&all);
        let after = owner_names(&rest);
        prop_assert_eq!(before.len(), after.len());
        let mut owned = 0;
        let mut moved = 0;
        for (slot, (b, a)) in before.iter().zip(&after).enumerate() {
            if &**b == gone {
                owned += 1;
                prop_assert_ne!(&**a, gone.as_str());
            } else {
                prop_assert_eq!(b, a, "slot {} moved off {}, which stayed", slot, b);
            }
            if b != a {
                moved += 1;
            }
        }
        prop_assert_eq!(moved, owned);
    }

    #[test]
    fn source_hash_ignores_the_order_of_backends(
        (set, shuffled) in weighted_set().prop_flat_map(|set| (Just(set.clone()), Just(set).prop_shuffle())),
    ) {
        let a = owner_names(&backends(set.iter().map(|(n, w)| (n.as_str(), *w))));
        let b = owner_names(&backends(shuffled.iter().map(|(n, w)| (n.as_str(), *w))));
        prop_assert!(a == b, "tables differ for {:?} and {:?}", set, shuffled);
    }
}
