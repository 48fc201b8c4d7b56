//! Reload: the difference between two configs as typed changes.
//!
//! Listeners are matched by name and backends by (listener, name), as the
//! reload contract says. [`diff`] only describes; [`crate::server::Server`]
//! applies the changes (bind first, then swap), so this module is pure and
//! tested table by table.

use std::sync::Arc;

use crate::config::{BackendEntry, Config, ListenerConfig, Mode};

/// One difference between the running config and the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ListenerAdded(Arc<str>),
    ListenerRemoved(Arc<str>),
    /// Settings other than the backend list changed. `rebind` when `bind`
    /// changed (the listener moves to a new socket); otherwise it keeps its
    /// socket and no connection attempt is ever refused.
    ListenerChanged {
        listener: Arc<str>,
        rebind: bool,
    },
    BackendAdded {
        listener: Arc<str>,
        backend: Arc<str>,
    },
    BackendRemoved {
        listener: Arc<str>,
        backend: Arc<str>,
    },
    /// Address, weight or backup flag changed. A new address is a different
    /// server: its health is judged afresh.
    BackendChanged {
        listener: Arc<str>,
        backend: Arc<str>,
        address_changed: bool,
    },
}

impl Change {
    /// The listener the change is about.
    pub fn listener(&self) -> &Arc<str> {
        match self {
            Change::ListenerAdded(l) | Change::ListenerRemoved(l) => l,
            Change::ListenerChanged { listener, .. }
            | Change::BackendAdded { listener, .. }
            | Change::BackendRemoved { listener, .. }
            | Change::BackendChanged { listener, .. } => listener,
        }
    }
}

/// What changes from `old` to `new`, listeners in the new file's order
/// (removed ones last).
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let mut changes = Vec::new();
    for n in &new.listeners {
        let Some(o) = old.listeners.iter().find(|o| o.name == n.name) else {
            changes.push(Change::ListenerAdded(n.name.clone()));
            continue;
        };
        if !same_settings(o, n) {
            // A udp listener and a tcp one need different sockets.
            let udp = |l: &ListenerConfig| l.mode == Mode::Udp;
            changes.push(Change::ListenerChanged {
                listener: n.name.clone(),
                rebind: o.bind != n.bind || udp(o) != udp(n),
            });
        }
        for nb in &n.backends {
            match o.backends.iter().find(|ob| ob.name() == nb.name()) {
                None => changes.push(Change::BackendAdded {
                    listener: n.name.clone(),
                    backend: nb.name().clone(),
                }),
                Some(ob) if ob != nb => changes.push(Change::BackendChanged {
                    listener: n.name.clone(),
                    backend: nb.name().clone(),
                    address_changed: !same_target(ob, nb),
                }),
                Some(_) => {}
            }
        }
        for ob in &o.backends {
            if !n.backends.iter().any(|nb| nb.name() == ob.name()) {
                changes.push(Change::BackendRemoved {
                    listener: n.name.clone(),
                    backend: ob.name().clone(),
                });
            }
        }
    }
    for o in &old.listeners {
        if !new.listeners.iter().any(|n| n.name == o.name) {
            changes.push(Change::ListenerRemoved(o.name.clone()));
        }
    }
    changes
}

/// Whether two entries point at the same servers: the same address, or
/// the same name kept resolved.
fn same_target(a: &BackendEntry, b: &BackendEntry) -> bool {
    match (a, b) {
        (BackendEntry::Fixed(a), BackendEntry::Fixed(b)) => a.addr == b.addr,
        (BackendEntry::Dns(a), BackendEntry::Dns(b)) => a.query == b.query,
        _ => false,
    }
}

/// Equal apart from the backend list.
fn same_settings(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    let ListenerConfig {
        name,
        bind,
        mode,
        algorithm,
        connect_timeout,
        idle_timeout,
        retries,
        freebind,
        allow,
        max_connections,
        queue_timeout,
        proxy_protocol,
        keepalive,
        on_marked_down,
        health_check,
        header_timeout,
        body_timeout,
        sticky,
        tls,
        udp_replies,
        backends: _,
    } = a;
    *name == b.name
        && *bind == b.bind
        && *mode == b.mode
        && *algorithm == b.algorithm
        && *connect_timeout == b.connect_timeout
        && *idle_timeout == b.idle_timeout
        && *retries == b.retries
        && *freebind == b.freebind
        && *allow == b.allow
        && *max_connections == b.max_connections
        && *queue_timeout == b.queue_timeout
        && *proxy_protocol == b.proxy_protocol
        && *keepalive == b.keepalive
        && *on_marked_down == b.on_marked_down
        && *health_check == b.health_check
        && *header_timeout == b.header_timeout
        && *body_timeout == b.body_timeout
        && *sticky == b.sticky
        // The same files with the same contents (see `tls::Terminator`).
        && *tls == b.tls
        && *udp_replies == b.udp_replies
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::load_str;

    fn config(text: &str) -> Config {
        load_str(text, Path::new("t.toml")).unwrap()
    }

    const BASE: &str = r#"
[[listener]]
name = "pg"
bind = "127.0.0.1:6000"
[[listener.backend]]
name = "a"
address = "127.0.0.1:7001"
[[listener.backend]]
name = "b"
address = "127.0.0.1:7002"
"#;

    fn l(name: &str) -> Arc<str> {
        name.into()
    }

    #[test]
    fn table() {
        let cases: &[(&str, String, Vec<Change>)] = &[
            ("identical", BASE.to_string(), vec![]),
            (
                "backend added",
                format!("{BASE}[[listener.backend]]\nname = \"c\"\naddress = \"127.0.0.1:7003\"\n"),
                vec![Change::BackendAdded {
                    listener: l("pg"),
                    backend: l("c"),
                }],
            ),
            (
                "backend removed",
                BASE.replace(
                    "[[listener.backend]]\nname = \"b\"\naddress = \"127.0.0.1:7002\"\n",
                    "",
                ),
                vec![Change::BackendRemoved {
                    listener: l("pg"),
                    backend: l("b"),
                }],
            ),
            (
                "weight changed",
                BASE.replace(
                    "address = \"127.0.0.1:7002\"",
                    "address = \"127.0.0.1:7002\"\nweight = 5",
                ),
                vec![Change::BackendChanged {
                    listener: l("pg"),
                    backend: l("b"),
                    address_changed: false,
                }],
            ),
            (
                "address changed",
                BASE.replace("7002", "7009"),
                vec![Change::BackendChanged {
                    listener: l("pg"),
                    backend: l("b"),
                    address_changed: true,
                }],
            ),
            (
                "fixed address becomes a discovered name",
                BASE.replace(
                    "address = \"127.0.0.1:7002\"",
                    "address = \"b.internal:7002\"\ndiscover = \"dns\"",
                ),
                vec![Change::BackendChanged {
                    listener: l("pg"),
                    backend: l("b"),
                    address_changed: true,
                }],
            ),
            (
                "settings changed, same socket",
                BASE.replace(
                    "bind = \"127.0.0.1:6000\"",
                    "bind = \"127.0.0.1:6000\"\nalgorithm = \"leastconn\"",
                ),
                vec![Change::ListenerChanged {
                    listener: l("pg"),
                    rebind: false,
                }],
            ),
            (
                "health settings changed",
                BASE.replace(
                    "bind = \"127.0.0.1:6000\"",
                    "bind = \"127.0.0.1:6000\"\n[listener.health_check]\nfall = 5",
                ),
                vec![Change::ListenerChanged {
                    listener: l("pg"),
                    rebind: false,
                }],
            ),
            (
                "tcp to udp on the same address needs another socket",
                BASE.replace(
                    "bind = \"127.0.0.1:6000\"",
                    "bind = \"127.0.0.1:6000\"\nmode = \"udp\"",
                ),
                vec![Change::ListenerChanged {
                    listener: l("pg"),
                    rebind: true,
                }],
            ),
            (
                "bind changed",
                BASE.replace("6000", "6001"),
                vec![Change::ListenerChanged {
                    listener: l("pg"),
                    rebind: true,
                }],
            ),
            (
                "listener renamed = removed + added",
                BASE.replace("name = \"pg\"", "name = \"pg2\""),
                vec![
                    Change::ListenerAdded(l("pg2")),
                    Change::ListenerRemoved(l("pg")),
                ],
            ),
            (
                "listener added",
                format!(
                    "{BASE}[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:6080\"\n[[listener.backend]]\nname = \"w\"\naddress = \"127.0.0.1:7080\"\n"
                ),
                vec![Change::ListenerAdded(l("web"))],
            ),
            (
                "everything removed",
                String::new(),
                vec![Change::ListenerRemoved(l("pg"))],
            ),
        ];
        let old = config(BASE);
        for (what, new, want) in cases {
            assert_eq!(&diff(&old, &config(new)), want, "{what}");
        }
    }

    #[test]
    fn backend_order_alone_is_no_change() {
        let swapped = BASE
            .replace("name = \"a\"\naddress = \"127.0.0.1:7001\"", "NAME_A")
            .replace(
                "name = \"b\"\naddress = \"127.0.0.1:7002\"",
                "name = \"a\"\naddress = \"127.0.0.1:7001\"",
            )
            .replace("NAME_A", "name = \"b\"\naddress = \"127.0.0.1:7002\"");
        assert_eq!(diff(&config(BASE), &config(&swapped)), vec![]);
    }
}
