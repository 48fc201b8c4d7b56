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
//! - [`proxy`] — accept, pick a backend, connect with retry, relay bytes:
//!   [`proxy::tcp`] (accept loop, allow-list, a TCP connection's life),
//!   [`proxy::relay`] (the copy loop: pooled buffers, half-close, idle
//!   timeout), [`proxy::http`] (HTTP mode, lbCookie, backend connection
//!   pool), [`proxy::queue`] (per-backend caps and the fair queue),
//!   [`proxy::proxy_protocol`] (PROXY v1/v2 headers), [`proxy::tripwire`]
//!   (stop signals read with an atomic load).
//! - [`balancer`] — the [`balancer::Scheduler`] trait and its algorithms
//!   (`roundrobin`, `leastconn`, `source`), built into an immutable
//!   [`balancer::Pool`] snapshot.
//! - [`backend`] — backend identity and live state (atomic counters) that
//!   outlives snapshots, keyed by (listener, backend).
//!
//! Control plane:
//! - [`admin`] — the admin endpoint (hyper): `/metrics`, `/healthz`,
//!   `/readyz`, `/api/v1/status`, and runtime drain/maint.
//! - [`config`] — serde types, defaults and validation with file/line/field
//!   errors.
//! - [`health`] — TCP probes per backend and the rise/fall state machine;
//!   a flip rebuilds the listener's pool.
//! - [`metrics`] — every Prometheus metric, defined once; handles resolved
//!   ahead so the data path updates them with one atomic operation.
//! - [`reload`] — the difference between two configs as typed changes.
//! - [`server`] — binds listeners, builds and publishes routes, applies a
//!   reload (bind first, then swap), shuts down gracefully.
//! - [`daemon`] — the `run` command: config, server, signals.
//! - [`service`] — systemd: sd_notify readiness/reload/stop, watchdog.
//! - [`watch`] — `--watch`: reload when the config file changes.
//! - [`sockets`] — every socket option in one place (socket2).

pub mod admin;
pub mod backend;
pub mod backend_set;
pub mod balancer;
pub mod config;
pub mod daemon;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod server;
pub mod service;
pub mod sockets;
pub mod sync;
pub mod watch;
