//! switchyard: a Layer-4 load balancer.
//!
//! It fronts TCP services on one address and spreads client connections over
//! a pool of backends (round robin, least connections or source-IP hash),
//! or in HTTP mode routes every request, with lbCookie stickiness.
//! The user-facing contract — CLI, config file, signals, metrics, admin API —
//! is in `SPEC.md`; the README documents the decisions taken where it is
//! silent.
//!
//! # Layout
//!
//! Data path (per connection, lock-free):
//! - `proxy` — accept, pick a backend, connect with retry, relay bytes.
//!   `proxy::Route` is what a listener publishes for new connections
//!   (settings, pool, lbCookie ids); `proxy::Bound`/`proxy::Frontend`
//!   are a listener's socket and its serving task, one variant per kind.
//!   `proxy::accept` (the TCP accept loop: allow-list, listener cap),
//!   `proxy::tcp` (a TCP connection's life), `proxy::connect` (the
//!   connect-with-retry loop both modes share), `proxy::relay` (the copy
//!   loop: pooled buffers, half-close, idle timeout), `proxy::http`
//!   (HTTP mode; `proxy::http::pool` its backend keep-alive pool),
//!   `proxy::lbcookie` (the cookie: id, find, strip, insert),
//!   `proxy::queue` (per-backend caps and the fair queue),
//!   `proxy::proxy_protocol` (PROXY v1/v2 headers), `proxy::udp` (UDP
//!   mode: sessions by client address; `proxy::udp::batch`, `recvmmsg`).
//! - `balancer` — the `balancer::Scheduler` trait and its algorithms
//!   (`roundrobin`, `leastconn`, `source`), built into an immutable
//!   `balancer::Pool`.
//! - `backend` — a backend's config and live state (atomics: health
//!   verdict, admin state, counters), and the one eligibility rule. A leaf:
//!   it knows nothing of health checks, HTTP or metric registration.
//! - `sync` — stop signals read with an atomic load (`sync::Tripwire`).
//!
//! Control plane:
//! - `backend_set` — the one owner of each listener's backend set: takes
//!   reloads, health flips, discovered addresses and admin changes, runs the
//!   probes and watches, rebuilds and publishes the route.
//! - `discovery` — a watch per `discover = "dns"` entry, source kinds behind
//!   `discovery::Source` (`discovery::dns`: A/AAAA and SRV), and what to
//!   believe of an answer (`discovery::Belief`).
//! - `ticks` — first runs spread over a pool, ticks that never burst (probes
//!   and watches share them).
//! - `registry` — live state keyed by (listener, backend) across reloads.
//! - `health` — probe tasks, probe kinds behind `health::Probe`
//!   (`health::tcp`), and the rise/fall machine (`health::hysteresis`).
//! - `admin` — the admin endpoint (hyper): `/metrics`, `/healthz`,
//!   `/readyz`, `/api/v1/status`, and runtime drain/maint.
//! - `config` — serde types, defaults and validation with file/line/field
//!   errors.
//! - `metrics` — every Prometheus metric, defined once; handles resolved
//!   ahead so the data path updates them with one atomic operation.
//! - `reload` — the difference between two configs as typed changes.
//! - `server` — binds listeners, hands each owner its config, applies a
//!   reload (bind first, then reconfigure), shuts down gracefully.
//! - `daemon` — the `run` command: config, server, signals.
//! - `upgrade` — live upgrade (SIGUSR2): start the new executable, hand it
//!   sockets, connections, backend state and counters over one inherited
//!   Unix socket (`upgrade::wire`: frames with descriptors); `handover` is
//!   the leaf switch that freezes established sessions for it.
//! - `service` — systemd: sd_notify readiness/reload/stop, watchdog.
//! - `watch` — `--watch`: reload when the config file changes.
//! - `sockets` — every socket option in one place (socket2).
//! - `control` — `switchyard status` / `state`: the CLI's client of the
//!   admin endpoint.

mod admin;
pub mod backend;
mod backend_set;
pub mod balancer;
pub mod config;
pub mod control;
pub mod daemon;
mod discovery;
mod handover;
mod health;
mod metrics;
pub mod proxy;
mod registry;
mod reload;
pub mod server;
mod service;
mod sockets;
mod sync;
mod ticks;
pub mod tls;
pub mod upgrade;
mod watch;
